#!/usr/bin/env bash
# Training tokens/s of configs/labml.json against the Python reference with the experts in
# a loop (tools/labml_reference.py), the two taking turns so that both see the same
# machine speed. Prints one row per pair and the ratio of each pair.
#
#   tools/labml_vs_python.sh [--rounds N] [--steps N] [--experts "4 32"] [--out DIR]
#
# Needs build/switch-train and PyTorch for Python (Debian: apt-get install python3-torch).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
steps=300
experts="4 32"
out=runs/labml_vs_python
python=${PYTHON:-/usr/bin/python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "labml_vs_python.sh: unknown argument '$1' (accepted: --rounds N, --steps N, --experts \"E ...\", --out DIR)" >&2; exit 2 ;;
  esac
done
[[ -x build/switch-train ]] || { echo "labml_vs_python.sh: build/switch-train not found; build first" >&2; exit 2; }
"$python" -c "import torch" 2>/dev/null || {
  echo "labml_vs_python.sh: $python cannot import torch; on Debian: apt-get install python3-torch" >&2; exit 2; }

mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
for round in $(seq "$rounds"); do
  for e in $experts; do
    py=$("$python" tools/labml_reference.py --experts "$e" --steps "$steps" --data data/tinyshakespeare.txt)
    run="$out/switch-e$e-$round"
    rm -rf "$run"
    build/switch-train --config configs/labml.json --set moe.n_experts="$e" \
      --set train.steps="$steps" --set train.eval_every=100000 \
      --set train.checkpoint_every=100000 --out "$run" > /dev/null
    "$python" - "$results" "$round" "$e" "$py" "$run" <<'EOF'
import json, statistics, sys
results, rnd, e, py, run = sys.argv[1:]
py = json.loads(py)
summary = json.load(open(f"{run}/summary.json"))
train = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
windows = [r["tokens_per_s"] for r in train if r["kind"] == "train"]
row = {"round": int(rnd), "n_experts": int(e),
       "python_tokens_per_s": py["tokens_per_s"], "switch_tokens_per_s": summary["tokens_per_s"],
       "python_median_window": py["tokens_per_s_median_10"],
       "switch_median_window": statistics.median(windows)}
row["ratio"] = row["switch_tokens_per_s"] / row["python_tokens_per_s"]
open(results, "a").write(json.dumps(row) + "\n")
print(f"round {rnd} E={e:>2}: python {row['python_tokens_per_s']/1e3:5.1f}k  "
      f"switch {row['switch_tokens_per_s']/1e3:5.1f}k  ratio {row['ratio']:.2f}x", flush=True)
EOF
  done
done
"$python" - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for e in sorted({r["n_experts"] for r in rows}):
    rs = [r["ratio"] for r in rows if r["n_experts"] == e]
    print(f"E={e:>2}: ratio median {statistics.median(rs):.2f}x, min {min(rs):.2f}x, max {max(rs):.2f}x over {len(rs)} pairs")
EOF
