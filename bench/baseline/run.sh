#!/usr/bin/env bash
# The one-process, one-database baseline (issue 19): `trellis-baseline` in a fresh data
# directory, stock raised so no order runs out, then the same `trellis load` (orders only, as
# bench/shop/run.sh drives the shop) at rising rates. Prints one line per rate in
# bench/shop/run.sh's format: p50/p99/max latency of POST /api/orders, orders, errors,
# invariants, and the CPU time the baseline process spent during the load run (user + system,
# from /proc; the provider simulator runs inside it, as inside `trellis up`), per confirmed
# order; then its resident memory after start and after the run (VmRSS).
# The shop's CPU per order and highest rate under p99 100 ms, as ratios to these lines, are
# the price of the distributed design: run both scripts in the same session.
#
# Usage: bench/baseline/run.sh [RATES...]   (default: 50 100 150 200 300)
#        DURATION=60s PORT=18182 bench/baseline/run.sh ...
#        PROVIDER_LATENCY_MS=20 bench/baseline/run.sh ...   (match `trellis up --provider-latency-ms`)
# Needs release builds: cargo build --release -p trellis -p trellis-bench-baseline
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
bin=${TRELLIS_BIN:-$here/target/release/trellis}
baseline_bin=${BASELINE_BIN:-$here/target/release/trellis-baseline}
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(50 100 150 200 300)
port=${PORT:-18182}
duration=${DURATION:-20s}
provider_latency_ms=${PROVIDER_LATENCY_MS:-0}
work=$(mktemp -d)
export TRELLIS_ADMIN_EMAIL=bench@trellis.local TRELLIS_ADMIN_PASSWORD=bench-password-1
cleanup() { [ -n "${baseline:-}" ] && kill -INT "$baseline" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
restart() {
  [ -n "${baseline:-}" ] && { kill -INT "$baseline"; wait "$baseline" 2>/dev/null || true; }
  rm -rf "$work/data"
  env RUST_LOG=warn "$baseline_bin" --port "$port" --data-dir "$work/data" \
    --provider-latency-ms "$provider_latency_ms" > "$work/baseline.log" 2>&1 &
  baseline=$!
  for _ in $(seq 100); do curl -sf "localhost:$port/api/products" >/dev/null && break; sleep 0.1; done
  sleep 1   # let it install its Ctrl-C handler (a background job starts with SIGINT ignored)
  token=$(curl -s -X POST "localhost:$port/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$TRELLIS_ADMIN_EMAIL\",\"password\":\"$TRELLIS_ADMIN_PASSWORD\"}" |
    sed 's/.*"access_token":"\([^"]*\)".*/\1/')
  for id in $(curl -s "localhost:$port/api/products" | grep -o '"id":"[^"]*"' | cut -d'"' -f4); do
    curl -s -X PUT "localhost:$port/api/inventory/$id" -H "authorization: Bearer $token" \
      -H 'content-type: application/json' -d '{"total":10000000}' > /dev/null
  done
}
for rate in "${rates[@]}"; do
  restart   # each rate on a fresh baseline, so one rate's backlog does not slow the next
  cpu_before=$(cpu_seconds "$baseline")
  ctx_before=$(ctx_switches "$baseline")
  rss_start=$(rss_mb "$baseline")
  out=$("$bin" load --target "http://127.0.0.1:$port" --rate "$rate" --duration "$duration" \
    --mix order=1 --quiet --admin-email "$TRELLIS_ADMIN_EMAIL" \
    --admin-password "$TRELLIS_ADMIN_PASSWORD" 2>&1 || true)
  order=$(echo "$out" | awk '$1=="order"{print "p50 "$5" ms, p99 "$7" ms, max "$8" ms"}')
  orders=$(echo "$out" | grep '^orders:' || true)
  errs=$(echo "$out" | grep '^errors:' || true)
  inv=$(echo "$out" | grep '^invariants:' | cut -c1-60 || true)
  cpu=$(awk -v a="$cpu_before" -v b="$(cpu_seconds "$baseline")" 'BEGIN { printf "%.1f", b - a }')
  rss_end=$(rss_mb "$baseline")
  ctx=$(( $(ctx_switches "$baseline") - ctx_before ))
  confirmed=$(echo "$orders" | sed -n 's/.*confirmed \([0-9]*\).*/\1/p')
  per_order=$(awk -v c="$cpu" -v n="${confirmed:-0}" \
    'BEGIN { if (n > 0) printf "%.2f ms", 1000 * c / n; else print "n/a" }')
  ctx_per_order=$(awk -v c="$ctx" -v n="${confirmed:-0}" \
    'BEGIN { if (n > 0) printf "%.0f", c / n; else print "n/a" }')
  echo "rate $rate/s for $duration (baseline): $order | $orders | $errs | $inv | baseline CPU ${cpu} s, $per_order per confirmed order, $ctx_per_order context switches per confirmed order | RSS ${rss_start} -> ${rss_end} MB"
done
