#!/usr/bin/env bash
# Builds the parsers' libFuzzer target (fuzz/, clang with ASan + UBSan) and runs it for a
# bounded time, starting from fuzz/corpus. A crash, leak, sanitizer report or an exception
# other than sw::Error fails it; the input is saved under <build-dir>/crashes/.
#
# Usage: tools/fuzz.sh [--seconds N] [--build-dir DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds=60
bdir="$ROOT/build/fuzz"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --build-dir) bdir="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "fuzz: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
command -v clang++ >/dev/null || { echo "fuzz: clang++ is missing; run tools/setup.sh" >&2; exit 1; }
cmake -S "$ROOT/fuzz" -B "$bdir" -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$bdir" -j2
mkdir -p "$bdir/corpus" "$bdir/crashes"
exec "$bdir/switch-fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$bdir/crashes/" -print_final_stats=1 "$bdir/corpus" "$ROOT/fuzz/corpus"
