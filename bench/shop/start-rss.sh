#!/usr/bin/env bash
# Resident memory of `trellis up` just after start, once per set of environment variables:
# what an allocator setting costs or saves before any load. For each argument (a list of
# NAME=VALUE words, or "" for none) it starts `trellis up` on a fresh data directory, waits
# until it serves, waits 3 s more, prints VmRSS, its anonymous part, how much of that sits in
# transparent huge pages, and the thread count, then stops it.
#
# Usage: bench/shop/start-rss.sh "" "MIMALLOC_ALLOW_THP=0" "MIMALLOC_PURGE_DELAY=10"
# Needs a release build: cargo build --release -p trellis (or TRELLIS_BIN=...)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
bin=${TRELLIS_BIN:-$here/target/release/trellis}
port=${PORT:-18282}
[ $# -gt 0 ] || set -- ""
work=$(mktemp -d)
shop=
cleanup() { [ -n "$shop" ] && kill -INT "$shop" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for settings in "$@"; do
  rm -rf "$work/data"
  # shellcheck disable=SC2086 # settings is a list of NAME=VALUE words
  env RUST_LOG=warn TRELLIS_ADMIN_EMAIL=bench@example.com TRELLIS_ADMIN_PASSWORD=bench-password \
    $settings "$bin" up --port "$port" --data-dir "$work/data" > "$work/up.log" 2>&1 &
  shop=$!
  for _ in $(seq 200); do curl -sf "localhost:$port/api/products" >/dev/null && break; sleep 0.1; done
  sleep 3
  huge=$(awk '/^AnonHugePages:/ { printf "%.0f", $2 / 1024 }' "/proc/$shop/smaps_rollup")
  anon=$(awk '/^RssAnon:/ { printf "%.0f", $2 / 1024 }' "/proc/$shop/status")
  echo "[${settings:-as built}] RSS $(rss_mb "$shop") MB, anonymous $anon MB, in huge pages $huge MB, $(ls "/proc/$shop/task" | wc -l) threads"
  kill -INT "$shop"; wait "$shop" 2>/dev/null || true; shop=
done
