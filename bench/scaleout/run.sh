#!/usr/bin/env bash
# The shop as processes on PostgreSQL + NATS JetStream (issue 18's scale-out figure): `trellis
# up --processes --db … --bus nats://…` with one process per service, then with replicas, each
# on fresh databases and a fresh NATS server; `trellis load` (orders only) at each rate. One
# line per setting and rate: confirmed orders/s, POST /api/orders latency, errors,
# invariants, the CPU the shop's processes, PostgreSQL and NATS used during the load (from
# /proc), and how busy the machine was.
#
# Usage: bench/scaleout/run.sh [RATES...]            (default: 100 200 300)
#        SETTINGS="none orders=2,payments=2" bench/scaleout/run.sh ...   (the default)
#        PG=postgres://postgres@127.0.0.1:5432/postgres NATS_SERVER=/usr/sbin/nats-server
# Needs a release build (cargo build --release -p trellis), a PostgreSQL server it may create
# and drop the databases trellis_* on, and a nats-server executable.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${TRELLIS_BIN:-$here/target/release/trellis}
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(100 200 300)
read -r -a settings <<< "${SETTINGS:-none orders=2,payments=2}"
pg=${PG:-postgres://postgres@127.0.0.1:5432/postgres}
nats_server=${NATS_SERVER:-/usr/sbin/nats-server}
port=${PORT:-18281}
nats_port=${NATS_PORT:-14322}
duration=${DURATION:-20s}
work=$(mktemp -d)
export TRELLIS_ADMIN_EMAIL=bench@trellis.local TRELLIS_ADMIN_PASSWORD=bench-password-1
stop() {
  [ -n "${shop:-}" ] && { kill -INT "$shop" 2>/dev/null; wait "$shop" 2>/dev/null || true; }
  [ -n "${nats:-}" ] && { kill "$nats" 2>/dev/null; wait "$nats" 2>/dev/null || true; }
  shop=""; nats=""
}
cleanup() { stop; rm -rf "$work"; }
trap cleanup EXIT
drop_databases() {
  for service in users products inventory orders payments shipping console; do
    psql "$pg" -qc "DROP DATABASE IF EXISTS trellis_$service WITH (FORCE)" >/dev/null
  done
}
start() {   # $1: the --replicas value, or "none"
  stop
  drop_databases
  rm -rf "$work/data" "$work/nats"
  "$nats_server" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" > "$work/nats.log" 2>&1 &
  nats=$!
  local replicas=()
  [ "$1" != none ] && replicas=(--replicas "$1")
  RUST_LOG=warn "$bin" up --processes --free-ports --port "$port" --operator-port 0 \
    --data-dir "$work/data" --db "$pg" --bus "nats://127.0.0.1:$nats_port" "${replicas[@]}" \
    > "$work/up.log" 2>&1 &
  shop=$!
  for _ in $(seq 600); do curl -sf "localhost:$port/api/products" >/dev/null && break; sleep 0.1; done
  sleep 1
  token=$(curl -s -X POST "localhost:$port/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$TRELLIS_ADMIN_EMAIL\",\"password\":\"$TRELLIS_ADMIN_PASSWORD\"}" |
    sed 's/.*"access_token":"\([^"]*\)".*/\1/')
  for id in $(curl -s "localhost:$port/api/products" | grep -o '"id":"[^"]*"' | cut -d'"' -f4); do
    curl -s -X PUT "localhost:$port/api/inventory/$id" -H "authorization: Bearer $token" \
      -H 'content-type: application/json' -d '{"total":10000000}' > /dev/null
  done
}
# CPU seconds (user + system) used so far by the shop (`up` and its children), PostgreSQL's
# processes and the NATS server.
cpu_of() {
  local pids
  pids=$( { echo "$shop"; pgrep -P "$shop"; pgrep -x postgres; echo "$nats"; } | sort -u)
  for p in $pids; do [ -r "/proc/$p/stat" ] && awk '{ print $14 + $15 }' "/proc/$p/stat"; done |
    awk -v hz="$(getconf CLK_TCK)" '{ s += $1 } END { printf "%.1f", s / hz }'
}
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat; }
for setting in "${settings[@]}"; do
  for rate in "${rates[@]}"; do
    start "$setting"
    cpu_before=$(cpu_of); read -r busy_before idle_before < <(busy)
    out=$("$bin" load --target "http://127.0.0.1:$port" --rate "$rate" --duration "$duration" \
      --mix order=1 --quiet --admin-email "$TRELLIS_ADMIN_EMAIL" \
      --admin-password "$TRELLIS_ADMIN_PASSWORD" 2>&1 || true)
    read -r busy_after idle_after < <(busy)
    cpu=$(awk -v a="$cpu_before" -v b="$(cpu_of)" 'BEGIN { printf "%.1f", b - a }')
    load_pct=$(awk -v b=$((busy_after - busy_before)) -v i=$((idle_after - idle_before)) \
      'BEGIN { printf "%.0f", 100 * b / (b + i) }')
    order=$(echo "$out" | awk '$1=="order"{print "p50 "$5" ms, p99 "$7" ms"}')
    orders=$(echo "$out" | grep '^orders:' || true)
    errs=$(echo "$out" | grep '^errors:' || true)
    inv=$(echo "$out" | grep '^invariants:' | cut -c1-40 || true)
    confirmed=$(echo "$orders" | sed -n 's/.*confirmed \([0-9]*\).*/\1/p')
    per_order=$(awk -v c="$cpu" -v n="${confirmed:-0}" \
      'BEGIN { if (n > 0) printf "%.1f ms", 1000 * c / n; else print "n/a" }')
    [ -n "${SHOW:-}" ] && echo "$out" | grep -A12 "^invariants:"
    echo "replicas $setting, rate $rate/s for $duration: $order | $orders | $errs | $inv | shop+PG+NATS CPU ${cpu} s ($per_order per confirmed order), machine ${load_pct}% busy"
  done
done
stop
drop_databases
