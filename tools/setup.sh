#!/usr/bin/env bash
# Sets up everything switch needs on Debian (bookworm or newer), then builds it:
#   1. installs the Debian packages that are missing (apt-get; sudo when not root),
#   2. puts Tiny Shakespeare at data/tinyshakespeare.txt and verifies its size and sha256,
#   3. configures and builds into build/ (Release, -j2, ccache when present).
# Safe to run again: each step does only what is still missing.
#
# Usage: tools/setup.sh [--data FILE] [--no-build] [--build-dir DIR]
#   --data FILE   take the dataset from a local copy instead of downloading it
#   --no-build    stop after packages and data
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_FILE="$ROOT/data/tinyshakespeare.txt"
DATA_URL="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SIZE=1115394
DATA_SHA256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
PACKAGES=(build-essential cmake curl ca-certificates ccache libtorch-dev libgloo-dev
          libopenblas0-openmp libcli11-dev nlohmann-json3-dev libfmt-dev doctest-dev python3
          python3-matplotlib clang libxsmm-dev libdnnl-dev pkg-config libcpp-httplib-dev
          libjs-chart.js chromium chromium-driver libssl-dev
          libjemalloc2 python3-torch)

local_data=""
build=1
build_dir="$ROOT/build"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) local_data="${2:?--data needs a file}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# --- 1. Debian packages ------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
updated=0
install_missing() {  # install_missing PACKAGE...: apt-get install those not installed yet
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]}"
  local SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
    SUDO=sudo
  fi
  [ $updated = 1 ] || { $SUDO apt-get update -q; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
}
install_missing "${PACKAGES[@]}"
# libFuzzer's runtime ships apart from clang, versioned like it (libclang-rt-14-dev on bookworm).
clang_major=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
[ -n "$clang_major" ] || die "cannot tell clang's version"
install_missing "libclang-rt-${clang_major}-dev"
say "Debian packages: all present"

# --- 2. Tiny Shakespeare -----------------------------------------------------------------
verify() {  # verify FILE: exact size and sha256
  [ -f "$1" ] || return 1
  [ "$(stat -c %s "$1")" = "$DATA_SIZE" ] || return 1
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$DATA_SHA256" ]
}
install_data() {  # install_data FILE: verify then copy into place atomically
  verify "$1" || die "'$1' is not Tiny Shakespeare: expected $DATA_SIZE bytes with sha256 $DATA_SHA256, got $(stat -c %s "$1") bytes with sha256 $(sha256sum "$1" | cut -d' ' -f1)"
  mkdir -p "$(dirname "$DATA_FILE")"
  cp "$1" "$DATA_FILE.tmp" && mv "$DATA_FILE.tmp" "$DATA_FILE"
  say "dataset: $DATA_FILE (from $1, verified)"
}
if verify "$DATA_FILE"; then
  say "dataset: $DATA_FILE (verified)"
elif [ -n "$local_data" ]; then
  install_data "$local_data"
elif [ -n "${TINYSHAKESPEARE:-}" ]; then
  install_data "$TINYSHAKESPEARE"
elif verify "$ROOT/../shared/data/tinyshakespeare.txt"; then
  # A data folder shared beside the checkout, as on machines without internet access.
  install_data "$ROOT/../shared/data/tinyshakespeare.txt"
else
  [ -e "$DATA_FILE" ] && say "$DATA_FILE fails verification; fetching it again"
  say "downloading $DATA_URL"
  mkdir -p "$(dirname "$DATA_FILE")"
  if curl -fsSL --connect-timeout 15 --max-time 120 -o "$DATA_FILE.download" "$DATA_URL"; then
    install_data "$DATA_FILE.download"
    rm -f "$DATA_FILE.download"
  else
    rm -f "$DATA_FILE.download"
    die "could not download Tiny Shakespeare (offline?). Fetch $DATA_URL on a machine with
internet access and run: tools/setup.sh --data /path/to/input.txt
(or set TINYSHAKESPEARE=/path/to/input.txt). Expected: $DATA_SIZE bytes, sha256 $DATA_SHA256."
  fi
fi

# --- 3. Build ----------------------------------------------------------------------------
if [ "$build" = 1 ]; then
  say "building into $build_dir"
  cmake -S "$ROOT" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build_dir" -j2
  say "done: $build_dir/switch-train, $build_dir/switch-sample"
fi
