#!/usr/bin/env bash
# Draws switch-board's page for the runs under PATH... into a PNG, with headless Chromium
# (Debian's chromium, which tools/setup.sh installs): how docs/figures/board.png is made.
#
# Usage: tools/board_screenshot.sh OUT.png PATH... [-- WIDTH,HEIGHT]
#   tools/board_screenshot.sh docs/figures/board.png runs/capacity runs/default
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BOARD="${SWITCH_BOARD:-$ROOT/build/switch-board}"
[ $# -ge 2 ] || { sed -n '2,7p' "$0"; exit 2; }
out="$1"; shift
size=1400,1700
paths=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then size="${2:?-- needs WIDTH,HEIGHT}"; break; fi
  paths+=("$1"); shift
done

work="$(mktemp -d)"
board_pid=""
cleanup() {
  [ -n "$board_pid" ] && kill "$board_pid" 2>/dev/null && wait "$board_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$BOARD" --port 0 "${paths[@]}" > "$work/board.log" 2>&1 &
board_pid=$!
url=""
for _ in $(seq 600); do  # the line that names the URL, 60 s at most
  url="$(grep -o 'http://[^ ]*/' "$work/board.log" || true)"
  [ -n "$url" ] && break
  kill -0 "$board_pid" 2>/dev/null || { cat "$work/board.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "board_screenshot: switch-board named no URL" >&2; exit 1; }

# --virtual-time-budget: the page's requests and drawing finish before the picture is taken.
chromium --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-quic \
  --no-first-run --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/profile" --hide-scrollbars --window-size="$size" \
  --virtual-time-budget=15000 --screenshot="$work/shot.png" "$url" > "$work/chromium.log" 2>&1 ||
  { cat "$work/chromium.log" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
mv "$work/shot.png" "$out"
echo "board_screenshot: $out ($url)"
