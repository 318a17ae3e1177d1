#!/usr/bin/env bash
# The shop with OTLP trace export off and on, side by side in one run: bench/shop/run.sh at one
# rate, alternating off and on RUNS times, `trellis up` exporting to bench/otlp/sink.py (an
# OTLP/gRPC receiver that counts and drops what it gets) when on. Prints bench/shop/run.sh's
# line for each run (confirmed orders, latency, the shop's CPU per confirmed order) and the
# spans the sink received.
#
# Usage: bench/otlp/run.sh [RATE]   (default 500; RUNS=2, DURATION=20s)
# Needs a release build (cargo build --release -p trellis) and Python 3 with pip; the sink's
# packages (bench/otlp/requirements.txt) go into ~/.cache/trellis-ci/otlp-venv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rate=${1:-500}
runs=${RUNS:-2}
port=${OTLP_PORT:-14317}
venv=${OTLP_VENV:-$HOME/.cache/trellis-ci/otlp-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
log=$(mktemp)
"$venv/bin/python" "$here/sink.py" "$port" > "$log" 2>&1 &
sink=$!
trap 'kill "$sink" 2>/dev/null; wait 2>/dev/null; cat "$log"; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
for run in $(seq "$runs"); do
  echo "run $run, OTLP off: $(UP_ENV="" "$here/../shop/run.sh" "$rate")"
  echo "run $run, OTLP on:  $(UP_ENV="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$port" \
    "$here/../shop/run.sh" "$rate")"
done
