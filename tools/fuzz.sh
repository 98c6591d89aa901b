#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) and runs each for a bounded
# time: the parsers (configs, --set, sweep files, state.json) from fuzz/corpus, then the
# checkpoint readers from a checkpoint that switch-train makes. A crash, sanitizer report
# or an exception other than sw::Error fails it; the input is saved under <build-dir>/crashes/.
#
# Usage: tools/fuzz.sh [--seconds N] [--build-dir DIR] [--switch-train PATH] [--data FILE]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds=60
bdir="$ROOT/build/fuzz"
train="$ROOT/build/switch-train"
data="$ROOT/data/tinyshakespeare.txt"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --build-dir) bdir="$2"; shift 2 ;;
    --switch-train) train="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "fuzz: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
command -v clang++ >/dev/null || { echo "fuzz: clang++ is missing; run tools/setup.sh" >&2; exit 1; }
cmake -S "$ROOT/fuzz" -B "$bdir" -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$bdir" -j2
mkdir -p "$bdir/corpus" "$bdir/crashes" "$bdir/corpus-checkpoint"

echo "fuzz: the parsers, $seconds s"
"$bdir/switch-fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$bdir/crashes/" -print_final_stats=1 "$bdir/corpus" "$ROOT/fuzz/corpus"

# The checkpoint readers, seeded with a real checkpoint of the tiny config: each seed is one
# of its files behind the byte that names it (0 model.pt, 1 optim.pt, 2 rng.pt, 3 state.json).
[ -x "$train" ] || { echo "fuzz: $train is missing; build switch-train first (tools/setup.sh)" >&2; exit 1; }
run="$bdir/seed-run"
rm -rf "$run"
"$train" --config "$ROOT/configs/tiny.json" --set "data.path=$data" --set train.steps=4 \
  --set train.checkpoint_every=4 --set train.eval_every=4 --out "$run" -q
ckpt="$run/ckpt-000004"
files=(model.pt optim.pt rng.pt state.json)
for i in 0 1 2 3; do
  { printf "\\x0$i"; cat "$ckpt/${files[$i]}"; } > "$bdir/corpus-checkpoint/seed-$i"
done
# 4: the pickle inside model.pt alone, put back into the real archive by the target.
python3 - "$ckpt/model.pt" > "$bdir/corpus-checkpoint/seed-4" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
sys.stdout.buffer.write(b"\x04" + z.read(name))
PY
# 5: model.safetensors, read where a checkpoint has no model.pt.
{ printf "\\x05"; cat "$ckpt/model.safetensors"; } > "$bdir/corpus-checkpoint/seed-5"
echo "fuzz: the checkpoint readers, $seconds s"
# LibTorch keeps allocations for the life of the process by design: leaks are not looked for.
SWITCH_FUZZ_CKPT="$ckpt" ASAN_OPTIONS=detect_leaks=0 "$bdir/switch-fuzz-checkpoint" \
  -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 \
  -artifact_prefix="$bdir/crashes/checkpoint-" -print_final_stats=1 "$bdir/corpus-checkpoint"
