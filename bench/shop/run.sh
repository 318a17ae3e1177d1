#!/usr/bin/env bash
# The shop end to end on embedded backends: `trellis up` in a fresh data directory, stock raised
# so no order runs out, then `trellis load` (orders only) at rising rates. Prints one line per
# rate: confirmed orders/s, p50/p99/max latency of POST /api/orders, errors, invariants.
#
# Usage: bench/shop/run.sh [RATES...]   (default: 50 100 150 200 300)
#        SAGA=choreography bench/shop/run.sh ...   (the choreographed order saga)
#        UP_ENV="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317" bench/shop/run.sh ...
#            (variables for `trellis up` only, not for the load generator; bench/otlp/run.sh)
#        POLL_CONSOLE=0.05 bench/shop/run.sh ...   (during each load run, the admin console's
#            live overview fetched every 0.05 s as the admin: what an open /admin page costs)
#        RSS_EVERY=30 DURATION=10m bench/shop/run.sh 300   (a soak: every 30 s of the run, one
#            line with the elapsed seconds and `trellis up`'s resident memory in MB, split into
#            anonymous, file-backed and shared pages; after the run, the same once more)
#        THREADS=1 bench/shop/run.sh 300   (after each rate's line, `trellis up`'s CPU and context
#            switches per confirmed order by thread: each SQLite connection's thread is named
#            after its database file; bench/shop/threads.py)
# Each line also gives the CPU time `trellis up` spent during the load run (user + system,
# from /proc), per confirmed order; its threads' context switches per confirmed order (threads
# that ended during the run are not counted); the resident memory of `trellis up` after start and after
# the run (VmRSS); and the bytes the orders service's saga log (orders-saga.db, pages in use,
# its WAL included) holds per confirmed order (orchestrated only).
# Needs a release build: cargo build --release -p trellis
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
bin=${TRELLIS_BIN:-$here/target/release/trellis}
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(50 100 150 200 300)
port=${PORT:-18181}
duration=${DURATION:-20s}
saga=${SAGA:-orchestrated}
work=$(mktemp -d)
export TRELLIS_ADMIN_EMAIL=bench@trellis.local TRELLIS_ADMIN_PASSWORD=bench-password-1
# UP_LOG=FILE keeps the last `trellis up`'s output (for example mimalloc's statistics at exit,
# with UP_ENV=MIMALLOC_SHOW_STATS=1).
cleanup() {
  [ -n "${shop:-}" ] && kill -INT "$shop" 2>/dev/null
  wait 2>/dev/null
  [ -n "${UP_LOG:-}" ] && cp "$work/up.log" "$UP_LOG"
  rm -rf "$work"
}
trap cleanup EXIT
restart() {
  [ -n "${shop:-}" ] && { kill -INT "$shop"; wait "$shop" 2>/dev/null || true; }
  rm -rf "$work/data"
  # shellcheck disable=SC2086 # UP_ENV is a list of NAME=VALUE words
  env RUST_LOG=warn ${UP_ENV:-} "$bin" up --saga "$saga" --port "$port" --data-dir "$work/data" > "$work/up.log" 2>&1 &
  shop=$!
  for _ in $(seq 100); do curl -sf "localhost:$port/api/products" >/dev/null && break; sleep 0.1; done
  sleep 1   # let `up` install its Ctrl-C handler (a background job starts with SIGINT ignored)
  token=$(curl -s -X POST "localhost:$port/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$TRELLIS_ADMIN_EMAIL\",\"password\":\"$TRELLIS_ADMIN_PASSWORD\"}" |
    sed 's/.*"access_token":"\([^"]*\)".*/\1/')
  for id in $(curl -s "localhost:$port/api/products" | grep -o '"id":"[^"]*"' | cut -d'"' -f4); do
    curl -s -X PUT "localhost:$port/api/inventory/$id" -H "authorization: Bearer $token" \
      -H 'content-type: application/json' -d '{"total":10000000}' > /dev/null
  done
}
# One soak sample: seconds, then VmRSS and its anonymous / file / shared parts, MB, and how
# much of the anonymous part sits in transparent huge pages (2 MiB each, resident whole).
rss_split() {
  local huge
  huge=$(awk '/^AnonHugePages:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/smaps_rollup" 2>/dev/null)
  awk -v at="$2" -v huge="${huge:-?}" '/^(VmRSS|RssAnon|RssFile|RssShmem):/ { v[$1] = $2 / 1024 }
    END { printf "rss at %s s: %.0f MB (anon %.0f, of which huge pages %s; file %.0f, shmem %.0f)\n",
          at, v["VmRSS:"], v["RssAnon:"], huge, v["RssFile:"], v["RssShmem:"] }' "/proc/$1/status"
}
# Bytes in use in a SQLite file (pages in use, whatever is still in its WAL included).
sqlite_bytes() {
  [ -f "$1" ] || { echo 0; return; }
  python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); q=lambda s: c.execute(s).fetchone()[0]; print((q("PRAGMA page_count")-q("PRAGMA freelist_count"))*q("PRAGMA page_size"))' "$1"
}
for rate in "${rates[@]}"; do
  restart   # each rate on a fresh shop, so one rate's backlog does not slow the next
  cpu_before=$(cpu_seconds "$shop")
  ctx_before=$(ctx_switches "$shop")
  [ -n "${THREADS:-}" ] && python3 "$here/bench/shop/threads.py" "$shop" "$work/threads.json"
  rss_start=$(rss_mb "$shop")
  saga_before=$(sqlite_bytes "$work/data/orders-saga.db")
  polls=0
  if [ -n "${POLL_CONSOLE:-}" ]; then
    : > "$work/polls"
    (while :; do
      curl -s -o /dev/null -H "authorization: Bearer $token" "localhost:$port/admin/overview/live" &&
        echo >> "$work/polls"
      sleep "$POLL_CONSOLE"
    done) &
    poller=$!
  fi
  if [ -n "${RSS_EVERY:-}" ]; then
    (started=$(date +%s)
     while :; do
       sleep "$RSS_EVERY"
       rss_split "$shop" "$(( $(date +%s) - started ))"
     done) &
    sampler=$!
  fi
  out=$("$bin" load --target "http://127.0.0.1:$port" --rate "$rate" --duration "$duration" \
    --mix order=1 --quiet --admin-email "$TRELLIS_ADMIN_EMAIL" \
    --admin-password "$TRELLIS_ADMIN_PASSWORD" 2>&1 || true)
  order=$(echo "$out" | awk '$1=="order"{print "p50 "$5" ms, p99 "$7" ms, max "$8" ms"}')
  orders=$(echo "$out" | grep '^orders:' || true)
  errs=$(echo "$out" | grep '^errors:' || true)
  inv=$(echo "$out" | grep '^invariants:' | cut -c1-60 || true)
  if [ -n "${RSS_EVERY:-}" ]; then
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    sleep 10
    rss_split "$shop" "after the run, idle 10"
  fi
  if [ -n "${POLL_CONSOLE:-}" ]; then
    kill "$poller"; wait "$poller" 2>/dev/null || true
    polls=$(wc -l < "$work/polls")
  fi
  cpu=$(awk -v a="$cpu_before" -v b="$(cpu_seconds "$shop")" 'BEGIN { printf "%.1f", b - a }')
  rss_end=$(rss_mb "$shop")
  ctx=$(( $(ctx_switches "$shop") - ctx_before ))
  saga_after=$(sqlite_bytes "$work/data/orders-saga.db")
  confirmed=$(echo "$orders" | sed -n 's/.*confirmed \([0-9]*\).*/\1/p')
  per_order=$(awk -v c="$cpu" -v n="${confirmed:-0}" \
    'BEGIN { if (n > 0) printf "%.2f ms", 1000 * c / n; else print "n/a" }')
  ctx_per_order=$(awk -v c="$ctx" -v n="${confirmed:-0}" \
    'BEGIN { if (n > 0) printf "%.0f", c / n; else print "n/a" }')
  saga_per_order=$(awk -v a="$saga_before" -v b="$saga_after" -v n="${confirmed:-0}" \
    'BEGIN { if (n > 0) printf "%.0f B", (b - a) / n; else print "n/a" }')
  [ -n "${THREADS:-}" ] && python3 "$here/bench/shop/threads.py" "$shop" "$work/threads-after.json"
  echo "rate $rate/s for $duration ($saga): $order | $orders | $errs | $inv | up CPU ${cpu} s, $per_order per confirmed order, $ctx_per_order context switches per confirmed order | RSS ${rss_start} -> ${rss_end} MB | saga log $saga_per_order per confirmed order${POLL_CONSOLE:+ | $polls console overview updates}"
  if [ -n "${THREADS:-}" ] && [ "${confirmed:-0}" -gt 0 ]; then
    python3 "$here/bench/shop/threads.py" diff "$work/threads.json" "$work/threads-after.json" "$confirmed"
  fi
done
