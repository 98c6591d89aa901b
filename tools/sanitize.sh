#!/usr/bin/env bash
# Rebuilds the library and the library-level test suites with AddressSanitizer and
# UndefinedBehaviorSanitizer (-DSWITCH_SANITIZE=ON) and runs them: the fast suites (prepared
# token files among them) and test_train, test_sample and test_eval (training, resume,
# checkpoints, non-finite detection, sampling, switch-eval).
# Leak checking is off: LibTorch keeps allocations until exit.
#
# Usage: tools/sanitize.sh [--build-dir DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bdir="$ROOT/build/asan"
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) bdir="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "sanitize: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
suites=(test_config test_data test_corpus test_switch_ffn test_strategies test_model test_optimizer test_train test_sample
        test_eval)
cmake -S "$ROOT" -B "$bdir" -DSWITCH_SANITIZE=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$bdir" -j2 --target "${suites[@]}"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
regex="^($(IFS='|'; echo "${suites[*]}")):"
exec ctest --test-dir "$bdir" -R "$regex" --output-on-failure
