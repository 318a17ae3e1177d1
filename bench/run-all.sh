#!/usr/bin/env bash
# Every side-by-side comparison of docs/BENCHMARKS.md in one run, and one table of ratios
# (issue 19). Each ratio is against a peer or raw baseline measured in the same run:
#   shop       `trellis up` against bench/baseline (one process, one database) under the same
#              `trellis load` at the same rates: CPU per confirmed order (baseline / shop, so
#              1.0 means "costs what the baseline costs", 0.4 "costs 2.5x") and the highest
#              rate with p99 under 100 ms and every order confirmed (shop / baseline)
#   saga       PostgreSQL and SQLite saga stores against raw single-row INSERTs (c1, c256)
#   eventstore event-store appends against raw batched INSERTs (SQLite, PostgreSQL)
#   bus        trellis-bus on NATS JetStream, ordered and unordered, against a bare
#              async-nats loop
#   gateway    trellis-gateway against nginx, routing only and JWT + rate limit
#
# Usage: bench/run-all.sh                      (everything: about 45 minutes plus builds)
#        ONLY="shop saga" bench/run-all.sh     (some parts)
#        RATES="300 500 700" DURATION=20s      (the shop part's rates and run length)
# Needs: release builds (`cargo build --release -p trellis -p trellis-bench-baseline`),
# PostgreSQL and NATS for their parts (skipped, and said, when they do not answer), root for
# the gateway part (it installs nginx, wrk and hey from Debian when missing). Run it on a quiet
# machine: every figure here is CPU time or throughput on the same two cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
only=${ONLY:-shop saga eventstore bus gateway}
rates=${RATES:-300 500 700}
export DURATION=${DURATION:-20s}
target=${CARGO_TARGET_DIR:-target}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rows=()
row() { rows+=("| $1 | $2 | $3 | $4 |"); }
wants() { [[ " $only " == *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo "# run-all: $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg), parts: $only" >&2

# Median throughput (elements/s) of a criterion benchmark from its last run, or nothing.
criterion_rate() {
  python3 - "$target/criterion" "$1" <<'PY'
import json, pathlib, sys
root, wanted = pathlib.Path(sys.argv[1]), sys.argv[2]
for bench in root.rglob("new/benchmark.json"):
    meta = json.loads(bench.read_text())
    if meta["full_id"] != wanted:
        continue
    median_ns = json.loads((bench.parent / "estimates.json").read_text())["median"]["point_estimate"]
    elements = (meta.get("throughput") or {}).get("Elements", 1)
    print(f"{elements * 1e9 / median_ns:.1f}")
PY
}
# A criterion pair as a table row: name, measured id, baseline id, goal.
criterion_row() {
  local a b
  a=$(criterion_rate "$2"); b=$(criterion_rate "$3")
  row "$1" "${a:-n/a} / ${b:-n/a} per s" "$(ratio "${a:-0}" "${b:-0}")" "$4"
}

if wants shop; then
  for bin in target/release/trellis target/release/trellis-baseline; do
    [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p trellis -p trellis-bench-baseline" >&2; exit 1; }
  done
  # shellcheck disable=SC2086 # RATES is a list
  bench/shop/run.sh $rates | tee "$out/shop"
  # shellcheck disable=SC2086
  bench/baseline/run.sh $rates | tee "$out/baseline"
  # Per rate: CPU per confirmed order of each, and whether the rate held (p99 < 100 ms, every
  # order confirmed, invariants OK).
  summarize() {
    awk '{
      rate = $2; sub("/s", "", rate)
      p99 = ""; for (i = 1; i <= NF; i++) if ($i == "p99") { p99 = $(i + 1) }
      cpu = ""; for (i = 1; i <= NF; i++) if ($i == "per" && $(i + 1) == "confirmed" && $(i - 1) == "ms") { cpu = $(i - 2) }
      held = (p99 != "" && p99 + 0 < 100 && $0 ~ /pending 0 / && $0 ~ /invariants: OK/) ? 1 : 0
      print rate, cpu, held, p99
    }' "$1"
  }
  summarize "$out/shop" > "$out/shop.sum"
  summarize "$out/baseline" > "$out/baseline.sum"
  best_shop=0; best_base=0
  while read -r rate cpu held p99; do
    read -r _ bcpu bheld bp99 < <(awk -v r="$rate" '$1 == r' "$out/baseline.sum")
    row "shop CPU per order at $rate/s (baseline / shop)" "shop ${cpu:-n/a} ms (p99 $p99), baseline ${bcpu:-n/a} ms (p99 $bp99)" \
      "$(ratio "${bcpu:-0}" "${cpu:-0}")" ">= 0.40 (at most 2.5x); shop < 2 ms"
    [ "$held" = 1 ] && best_shop=$rate
    [ "${bheld:-0}" = 1 ] && best_base=$rate
  done < "$out/shop.sum"
  row "highest rate held, p99 < 100 ms (shop / baseline)" "shop $best_shop/s, baseline $best_base/s (of: $rates)" \
    "$(ratio "$best_shop" "$best_base")" "shop 1,000/s"
fi

if wants saga; then
  cargo bench -p trellis-saga --bench saga 2>&1 | grep -E '^saga/|thrpt' >&2 || true
  criterion_row "saga store, SQLite, 256 in flight" saga/sqlite/c256 saga/raw_insert_sqlite/c256 ">= 1.0"
  criterion_row "saga store, PostgreSQL, 256 in flight" saga/postgres/c256 saga/raw_insert_postgres/c256 ">= 1.0"
  criterion_row "saga store, PostgreSQL, 1 in flight" saga/postgres/c1 saga/raw_insert_postgres/c1 "-"
fi

if wants eventstore; then
  cargo bench -p trellis-eventstore --bench eventstore -- append 2>&1 | grep -E '^append/|thrpt' >&2 || true
  for case in b1/w1 b1/w4 b100/w1 b100/w4; do
    criterion_row "event store, SQLite, $case" "append/sqlite/$case" "append/sqlite/raw_$case" ">= 0.8"
  done
  for case in b1/w1 b1/w4 b100/w1 b100/w4; do
    criterion_row "event store, PostgreSQL, $case" "append/postgres/$case" "append/postgres/raw_$case" ">= 0.8"
  done
fi

if wants bus; then
  cargo bench -p trellis-bus --bench throughput -- nats 2>&1 | tee "$out/bus" | grep -E 'median of|thrpt' >&2 || true
  while read -r line; do
    name=$(echo "$line" | sed -n 's/.*NATS \([a-z]*\) .*/\1/p')
    value=$(echo "$line" | sed -n 's/.*ratio \([0-9.]*\).*/\1/p')
    rates_text=$(echo "$line" | sed -n 's/.*NATS [a-z]* \([0-9]*\) msgs\/s, bare \([0-9]*\) msgs\/s.*/\1 \/ \2 msgs per s/p')
    row "bus on NATS, $name (median of rounds)" "$rates_text" "$value" ">= 0.8"
  done < <(grep 'median of' "$out/bus" || true)
fi

if wants gateway; then
  SKIP_BUILD=1 bench/gateway/run.sh | tee "$out/gateway" >&2
  ratios=$(grep '^c/b req/s' "$out/gateway" || true)
  c_b=$(echo "$ratios" | sed -n 's/^c\/b req\/s = \([0-9.n\/a]*\).*/\1/p')
  d_b=$(echo "$ratios" | sed -n 's/.*d\/b req\/s = \([0-9.n\/a]*\).*/\1/p')
  row "gateway, routing only (trellis / nginx req/s)" "see the table above" "${c_b:-n/a}" ">= 1.0"
  d_e=$(echo "$ratios" | sed -n 's/.*d\/e req\/s = \([0-9.n\/a]*\).*/\1/p')
  row "gateway, JWT + rate limit (trellis / nginx req/s)" "see the table above" "${d_b:-n/a}" ">= 0.85"
  row "gateway, JWT + rate limit (trellis / nginx carrying the same token)" "see the table above" "${d_e:-n/a}" "-"
fi

echo
echo "run-all $(date -u +%FT%TZ), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| comparison | measured | ratio | goal (issue 19) |"
echo "| --- | --- | ---: | --- |"
printf '%s\n' "${rows[@]}"
