#!/usr/bin/env bash
# What the admin console's live overview costs the shop, in CPU: `trellis up` (release build)
# idle in a fresh data directory, its CPU time (user + system, from /proc) over a quiet period,
# then over as long a period with one overview update every GAP seconds (2.1 by default: just
# past the console's shared scrape interval of 2 s, so every update scrapes every service's
# /metrics and /readyz again). The difference is the console's cost: CPU per update, and the
# share of one core while a page is open (the page asks every 3 s; viewers share one scrape).
#
# Usage: bench/console/run.sh        (UPDATES=30, GAP=2.1, PORT=18191)
# Needs a release build: cargo build --release -p trellis
#
# An idle shop (after a few seconds of orders) is the quiet background this needs: under load, whole-process CPU of separate
# runs varies by more than the console costs (docs/BENCHMARKS.md), so the share at a given
# order rate is this per-update cost over the CPU the shop spends at that rate.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
bin=${TRELLIS_BIN:-$here/target/release/trellis}
updates=${UPDATES:-30}
gap=${GAP:-2.1}
port=${PORT:-18191}
work=$(mktemp -d)
export TRELLIS_ADMIN_EMAIL=bench@trellis.local TRELLIS_ADMIN_PASSWORD=bench-password-1
cleanup() { [ -n "${shop:-}" ] && kill -INT "$shop" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
RUST_LOG=warn "$bin" up --port "$port" --data-dir "$work/data" > "$work/up.log" 2>&1 &
shop=$!
for _ in $(seq 100); do curl -sf "localhost:$port/api/products" >/dev/null && break; sleep 0.1; done
token=$(curl -s -X POST "localhost:$port/api/auth/token" -H 'content-type: application/json' \
  -d "{\"email\":\"$TRELLIS_ADMIN_EMAIL\",\"password\":\"$TRELLIS_ADMIN_PASSWORD\"}" |
  sed 's/.*"access_token":"\([^"]*\)".*/\1/')
# Orders first, so every series a loaded shop exports exists (the /metrics bodies the console
# reads are as long as under load), then one update, then quiet.
"$bin" load --target "http://127.0.0.1:$port" --rate 100 --duration 5s --mix order=1 --quiet \
  --admin-email "$TRELLIS_ADMIN_EMAIL" --admin-password "$TRELLIS_ADMIN_PASSWORD" > /dev/null
curl -sf -o /dev/null -H "authorization: Bearer $token" "localhost:$port/admin/overview/live"
sleep 10
now() { date +%s.%N; }

t0=$(now); c0=$(cpu_seconds "$shop")
sleep "$(echo "$updates * $gap" | bc -l)"
t1=$(now); c1=$(cpu_seconds "$shop")
for _ in $(seq "$updates"); do
  curl -sf -o /dev/null -H "authorization: Bearer $token" "localhost:$port/admin/overview/live"
  sleep "$gap"
done
t2=$(now); c2=$(cpu_seconds "$shop")
awk -v q="$(echo "$c1 - $c0" | bc -l)" -v qw="$(echo "$t1 - $t0" | bc -l)" \
  -v w="$(echo "$c2 - $c1" | bc -l)" -v ww="$(echo "$t2 - $t1" | bc -l)" -v n="$updates" 'BEGIN {
  per = (w - q * ww / qw) / n
  printf "quiet: %.2f s CPU in %.0f s; watched: %.2f s CPU in %.0f s (%d updates)\n", q, qw, w, ww, n
  printf "%.1f ms CPU per update; a page open (one update per 3 s): %.2f%% of one core\n", per * 1000, per / 3 * 100
}'
