#!/usr/bin/env bash
# Runs the event store benchmarks and prints events/s with each result's ratio to the raw
# INSERT baseline measured in the same run. PostgreSQL cases need TRELLIS_TEST_POSTGRES_URL
# (default postgres://postgres@127.0.0.1:5432/test) to answer.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
if [[ "${1:-}" != "--report-only" ]]; then
  cargo bench -p trellis-eventstore --bench eventstore
fi
python3 - "$target/criterion" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
rows = {}
for bench in root.rglob("new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    median_ns = est["median"]["point_estimate"]
    elements = (meta.get("throughput") or {}).get("Elements", 1)
    rows[meta["full_id"]] = (elements * 1e9 / median_ns, median_ns)
print("| benchmark | events/s (median) | ratio to raw INSERT |")
print("| --- | ---: | ---: |")
for full_id in sorted(rows):
    if not full_id.startswith("append/") or "/raw_" in full_id:
        continue
    rate, _ = rows[full_id]
    group, case, writers = full_id.split("/")[0:2], full_id.split("/")[2], full_id.split("/")[3]
    raw = rows.get("/".join(group) + f"/raw_{case}/{writers}")
    ratio = f"{rate / raw[0]:.2f}" if raw else "—"
    raw_rate = f" (raw {raw[0]:,.0f})" if raw else ""
    print(f"| {full_id} | {rate:,.0f}{raw_rate} | {ratio} |")
print()
print("| benchmark | median time | events/s |")
print("| --- | ---: | ---: |")
for full_id in sorted(rows):
    if full_id.startswith(("load/", "read_all/")):
        rate, ns = rows[full_id]
        shown = f"{ns / 1e6:.2f} ms" if ns >= 1e5 else f"{ns / 1e3:.1f} µs"
        if full_id.startswith("load/"):
            # One load per iteration: the rate of events is the stream length over the time.
            events = int(full_id.rsplit("/", 1)[1])
            read = events if "/replay/" in full_id else 0
            rate_shown = f"{read * 1e9 / ns:,.0f} events replayed/s" if read else "(snapshot, no events replayed)"
        else:
            rate_shown = f"{rate:,.0f}"
        print(f"| {full_id} | {shown} | {rate_shown} |")
PY
