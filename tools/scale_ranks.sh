#!/usr/bin/env bash
# Training throughput on 1 and 2 ranks of this machine with the same total threads, for a
# few expert counts: tokens/s, step time, what the collectives moved per step, and how
# much of their time overlapping micro-batches hid (dist.overlap, on several ranks).
#
# Usage: tools/scale_ranks.sh [--steps N] [--experts "4 16 64"] [--ranks "1 2"]
#                             [--overlap "false true"] [--repeats R] [--out DIR]
#                             [-- extra switch-train arguments]
# Runs are interleaved (W=1, W=2 without and with overlap, W=1, ...) so that a drifting
# machine hurts all alike; the table reports medians over the repeats. Needs a build
# (tools/setup.sh) and python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN="$ROOT/build/switch-train"
steps=200
experts="4 16 64"
ranks="1 2"
overlap="false true"
repeats=2
out="$ROOT/runs/scale-ranks-$(date +%Y%m%d-%H%M%S)"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --experts) experts="$2"; shift 2 ;;
    --ranks) ranks="$2"; shift 2 ;;
    --overlap) overlap="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "scale_ranks: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$TRAIN" ] || { echo "scale_ranks: no $TRAIN; run tools/setup.sh first" >&2; exit 1; }
cores=$(nproc)
mkdir -p "$out"
for r in $(seq 1 "$repeats"); do
  for E in $experts; do
    for W in $ranks; do
      modes=$overlap
      [ "$W" -eq 1 ] && modes="na"  # one rank has no collectives to overlap
      for o in $modes; do
        dir="$out/E$E-W$W-O$o-r$r"
        echo "scale_ranks: E=$E W=$W overlap=$o repeat $r -> $dir" >&2
        launch=()
        [ "$W" -gt 1 ] && launch=(--nproc "$W" --set "dist.overlap=$o")
        "$TRAIN" -q --out "$dir" "${launch[@]}" --set "moe.n_experts=$E" \
          --set "train.steps=$steps" --set "train.eval_every=$steps" \
          --set "train.checkpoint_every=$steps" \
          --set "train.threads=$(( cores / W > 0 ? cores / W : 1 ))" "${extra[@]}"
      done
    done
  done
done
python3 - "$out" <<'PY'
import json, os, statistics, sys
from collections import defaultdict
out = sys.argv[1]
runs = defaultdict(list)
for name in sorted(os.listdir(out)):
    d = os.path.join(out, name)
    if not os.path.exists(os.path.join(d, "summary.json")):
        continue
    E, W, O, _ = name.split("-")
    s = json.load(open(os.path.join(d, "summary.json")))
    recs = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if l.strip()]
    train = [r for r in recs if r["kind"] == "train"][1:]  # the first interval warms up
    comm = [r["comm"] for r in train if "comm" in r]
    tok = statistics.median(r["tokens_per_s"] for r in train)
    runs[(int(E[1:]), int(W[1:]), O[1:])].append({
        "tok_s": tok,
        "fwd": statistics.median(r["ms_forward"] for r in train),
        "bwd": statistics.median(r["ms_backward"] for r in train),
        "opt": statistics.median(r["ms_optimizer"] for r in train),
        "comm_ms": statistics.median(c["ms"] for c in comm) if comm else 0.0,
        "exposed_ms": statistics.median(c["exposed_ms"] for c in comm) if comm else 0.0,
        "hidden_ms": statistics.median(c["hidden_ms"] for c in comm) if comm else 0.0,
        "a2a_mb": statistics.median(c["all_to_all_bytes"] for c in comm) / 1e6 if comm else 0.0,
        "ar_mb": statistics.median(c["all_reduce_bytes"] for c in comm) / 1e6 if comm else 0.0,
        "a2a_calls": statistics.median(c["all_to_all_calls"] for c in comm) if comm else 0,
    })
print("| experts | ranks | overlap | tokens/s | vs 1 rank | fwd ms | bwd ms | optim ms | in collectives ms | exposed ms | hidden ms | all-to-all calls | all-to-all MB sent | all-reduce MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (E, W, O) in sorted(runs):
    m = {k: statistics.median(r[k] for r in runs[(E, W, O)]) for k in runs[(E, W, O)][0]}
    base = runs.get((E, 1, "na"))
    rel = f"{m['tok_s'] / statistics.median(r['tok_s'] for r in base):.2f}x" if base else "-"
    print(f"| {E} | {W} | {'-' if O == 'na' else O} | {m['tok_s']:.0f} | {rel} | {m['fwd']:.1f} | {m['bwd']:.1f} | {m['opt']:.1f} | "
          f"{m['comm_ms']:.1f} | {m['exposed_ms']:.1f} | {m['hidden_ms']:.1f} | {m['a2a_calls']:.0f} | {m['a2a_mb']:.3f} | {m['ar_mb']:.3f} |")
PY
