#!/usr/bin/env bash
# Runs README.md's shell blocks as written, so a change that breaks a recipe breaks CI.
#
#   .ci/readme.sh [PATH_TO_TRELLIS]
#
# The blocks are the ```sh blocks marked `<!-- readme-test: NAME -->` in README.md:
#   up                   `cargo run --release -- up` (the shop in one process, embedded)
#   use                  "Using the shop": register, log in, order the first product
#   load                 `trellis load` with the invariants checked
#   serve                one process per service on PostgreSQL + NATS (orchestrated saga)
#   serve-choreography   the same with the choreographed saga
#   agent                `trellis agent` as Ann, then `trellis agent runs`
#   mcp                  `tools/list` on the gateway's /mcp with Ann's token
#   test                 `cargo test --workspace`: CI's own test step, not run again here
# Phases: `up`, then `use` (the order must reach CONFIRMED), `agent`, `mcp` and `load` against
# it; `use`, `mcp` and `load` against `serve`, then against `serve-choreography`.
# The agent's model is .ci/readme-model.py, a fixed-rule stand-in on 127.0.0.1:8199 named by
# OPENAI_BASE_URL, as a user names theirs: the loop, the tools and the shop are the real ones.
#
# Conventions (the only things varied from what a user types, as README.md says):
# - `trellis` and `cargo run --release --` run the binary CI built ($CARGO_TARGET_DIR/debug/
#   trellis by default) instead of a release build;
# - TRELLIS_ADMIN_EMAIL / TRELLIS_ADMIN_PASSWORD are set in the environment, as a user would;
# - database names `shop_*` / `shopc_*` get a per-run prefix, and TRELLIS_BUS_PREFIX a per-run
#   NATS prefix, so runs share nothing; every process started is stopped, every database
#   dropped and every NATS stream of the run deleted.
# Ports are README's own (gateway 8080, services 81xx): nothing else may listen on them.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/trellis-ci/target}"
VENV="${HOME}/.cache/trellis-ci/venv"
NATS_PY_VERSION="2.11.0"
SETTLE_S=90      # longest wait for the shop to answer, and for an order to be confirmed

log() { printf '[readme %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "FATAL: $*" >&2; exit 1; }

trellis="${1:-${CARGO_TARGET_DIR}/debug/trellis}"
if [[ ! -x "$trellis" ]]; then
  log "no $trellis; building it"
  cargo build -p trellis
  trellis="${CARGO_TARGET_DIR}/debug/trellis"
fi
trellis=$(readlink -f "$trellis")

# nats-py, pinned, in the venv .ci/schemathesis.sh uses: it deletes the run's streams at the end.
if ! "$VENV/bin/python" -c "import nats" 2>/dev/null; then
  log "installing nats-py $NATS_PY_VERSION into $VENV"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-py==$NATS_PY_VERSION"
fi

run_id="readme$(date +%s)$$"
work=$(mktemp -d)
# `trellis` on PATH, and `cargo run --release -- ARGS` as `trellis ARGS` (the convention above).
mkdir -p "$work/bin"
ln -s "$trellis" "$work/bin/trellis"
cat > "$work/bin/cargo" <<'EOF'
#!/usr/bin/env bash
if [[ "${1:-} ${2:-} ${3:-}" == "run --release --" ]]; then shift 3; exec trellis "$@"; fi
echo "readme.sh: only 'cargo run --release -- ...' is run from README blocks, not: cargo $*" >&2
exit 1
EOF
chmod +x "$work/bin/cargo"
export PATH="$work/bin:$PATH"
export TRELLIS_ADMIN_EMAIL="admin@readme.test"
export TRELLIS_ADMIN_PASSWORD="readme-$(head -c 9 /dev/urandom | base64 | tr -d '/+=')"
export TRELLIS_BUS_PREFIX="$run_id"
unset TRELLIS_DATA_DIR TRELLIS_DB TRELLIS_BUS TRELLIS_SERVICE_KEY TRELLIS_GATEWAY_PORT

databases=()
runners=()
cleanup() {
  local status=$?
  for runner in "${runners[@]}"; do
    stop_all $(pgrep -P "$runner" || true) "$runner"
  done
  for db in "${databases[@]}"; do
    dropdb -h 127.0.0.1 -U postgres --if-exists "$db" 2>/dev/null || true
  done
  "$VENV/bin/python" - "$run_id" <<'EOF' || true
import asyncio, sys
import nats

async def main(prefix):
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    for info in await js.streams_info():
        if info.config.name.lower().startswith(prefix.lower()):
            await js.delete_stream(info.config.name)
    await nc.close()

asyncio.run(main(sys.argv[1]))
EOF
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# The body of the block marked NAME.
block() {
  python3 - "$repo/README.md" "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"<!-- readme-test: %s -->\n```sh\n(.*?)```" % re.escape(sys.argv[2]), text, re.S)
if not m:
    sys.exit("README.md has no block marked readme-test: " + sys.argv[2])
print(m.group(1), end="")
EOF
}

# Per-run database names (the convention above); remembers them for the cleanup.
vary_names() {
  sed -e "s/\bshopc_/${run_id}c_/g" -e "s/\bshop_/${run_id}_/g"
}
for service in users products inventory orders payments shipping console; do
  databases+=("${run_id}_$service" "${run_id}c_$service")
done

# Waits until the gateway lists a catalog (the services are up and the seed catalog exists).
wait_for_catalog() {
  for _ in $(seq 1 "$SETTLE_S"); do
    if curl -sf "http://127.0.0.1:8080/api/products" | grep -q '"id"'; then return 0; fi
    sleep 1
  done
  return 1
}

# Runs `use` in this shell (it sets GW, TOKEN, ORDER), then waits for the order to be confirmed.
# The block is tried again (up to 10 times, 2 s apart) while the shop is still starting: the
# catalog answers before every service does.
use_and_confirm() {
  local phase=$1
  for try in $(seq 1 10); do
    ORDER=""
    set +e
    # shellcheck disable=SC1090
    source <(block use) > "$work/$phase-use.out" 2>&1
    set -e
    [[ "$ORDER" =~ ^[0-9a-f-]{36}$ ]] && break
    log "$phase: try $try of 'use' gave no order id yet"
    sleep 2
  done
  [[ "$ORDER" =~ ^[0-9a-f-]{36}$ ]] || die "$phase: no order id from the 'use' block: $(cat "$work/$phase-use.out")"
  for _ in $(seq 1 "$SETTLE_S"); do
    status=$(curl -s "$GW/api/orders/$ORDER" -H "authorization: Bearer $TOKEN")
    case "$status" in
      *'"status":"CONFIRMED"'*) log "$phase: order $ORDER confirmed"; return 0 ;;
      *'"status":"CANCELLED"'*) die "$phase: order $ORDER cancelled: $status" ;;
    esac
    sleep 1
  done
  die "$phase: order $ORDER not confirmed after ${SETTLE_S} s: $status"
}

# The agent recipe against a stand-in model: the answer must name the order `use` placed.
run_agent() {
  local phase=$1 port=8199
  python3 "$repo/.ci/readme-model.py" "$port" &
  local model=$!
  for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  if ! OPENAI_BASE_URL="http://127.0.0.1:$port/v1" OPENAI_MODEL=readme OPENAI_API_KEY="" \
      bash -euo pipefail -c "$(block agent)" > "$work/$phase-agent.out" 2>&1; then
    kill "$model" 2>/dev/null || true
    cat "$work/$phase-agent.out" >&2
    die "$phase: the 'agent' block failed"
  fi
  kill "$model" 2>/dev/null || true
  grep -q "search_orders" "$work/$phase-agent.out" && grep -q "$ORDER" "$work/$phase-agent.out" \
    && grep -q "completed" "$work/$phase-agent.out" \
    || { cat "$work/$phase-agent.out" >&2; die "$phase: the agent did not find order $ORDER"; }
  log "$phase: agent: $(grep -c '✓' "$work/$phase-agent.out") tool call(s), answer names order $ORDER"
}

# The MCP recipe: the gateway's /mcp lists the six tools for Ann.
run_mcp() {
  local phase=$1
  GW="$GW" TOKEN="$TOKEN" bash -euo pipefail -c "$(block mcp)" > "$work/$phase-mcp.out" 2>&1 \
    || { cat "$work/$phase-mcp.out" >&2; die "$phase: the 'mcp' block failed"; }
  for tool in search_orders get_order cancel_order list_products check_stock place_order; do
    grep -q "\"name\":\"$tool\"" "$work/$phase-mcp.out" \
      || { cat "$work/$phase-mcp.out" >&2; die "$phase: /mcp did not list $tool"; }
  done
  log "$phase: mcp: the six tools listed"
}

# The console behind the gateway's /admin: the administrator gets the live overview, and it
# shows the gateway and every service ready.
check_console() {
  local phase=$1 admin body
  admin=$(curl -s -X POST "$GW/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$TRELLIS_ADMIN_EMAIL\",\"password\":\"$TRELLIS_ADMIN_PASSWORD\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])') \
    || die "$phase: the administrator could not log in"
  body=$(curl -sf -H "authorization: Bearer $admin" "$GW/admin/overview/live") \
    || die "$phase: GET /admin/overview/live through the gateway did not answer 200"
  for service in gateway users products inventory orders payments shipping payment-provider mcp; do
    grep -q "data-service=\"$service\"" <<<"$body" \
      || die "$phase: the console's overview does not list $service: $body"
  done
  local ready
  ready=$(grep -o 'badge good">ready<' <<<"$body" | wc -l)
  [[ $ready -ge 9 ]] || die "$phase: the console shows $ready of 9 processes ready: $body"
  log "$phase: console: the overview shows the gateway and 8 services ready"
}

run_load() {
  local phase=$1
  if ! bash -euo pipefail -c "$(block load)" > "$work/$phase-load.out" 2>&1; then
    cat "$work/$phase-load.out" >&2
    die "$phase: the 'load' block failed"
  fi
  log "$phase: load: $(grep -E '^(orders|invariants):' "$work/$phase-load.out" | tr '\n' ' ')"
}

# Stops the processes a phase started (SIGTERM: they drain, as on Ctrl-C), and waits for them.
stop_all() {
  local pids=("$@")
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

# Phase 1: the shop in one process.
phase=up
mkdir -p "$work/$phase" && cd "$work/$phase"
log "$phase: $(block up | tr '\n' ' ')"
bash -c "$(block up)"$'\nwait' > "$work/$phase.log" 2>&1 &
runner=$!
runners+=("$runner")
wait_for_catalog || { tail -30 "$work/$phase.log" >&2; die "$phase: the shop did not come up"; }
use_and_confirm "$phase"
check_console "$phase"
run_agent "$phase"
run_mcp "$phase"
run_load "$phase"
stop_all $(pgrep -P "$runner" || true)
wait "$runner" 2>/dev/null || true

# Phases 2 and 3: one process per service on PostgreSQL + NATS.
for phase in serve serve-choreography; do
  mkdir -p "$work/$phase" && cd "$work/$phase"
  script=$(block "$phase" | vary_names)
  log "$phase: starting $(grep -c '&' <<<"$script") processes"
  # The block's `&` jobs are children of this subshell, which waits for them.
  bash -c "$script"$'\nwait' > "$work/$phase.log" 2>&1 &
  runner=$!
  runners+=("$runner")
  if ! wait_for_catalog; then
    tail -40 "$work/$phase.log" >&2
    die "$phase: the shop did not come up with a catalog"
  fi
  use_and_confirm "$phase"
  check_console "$phase"
  run_mcp "$phase"
  run_load "$phase"
  stop_all $(pgrep -P "$runner" || true)
  wait "$runner" 2>/dev/null || true
done

cd "$repo"
log "every README recipe ran"
