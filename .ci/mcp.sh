#!/usr/bin/env bash
# The shop's MCP server, driven by MCP clients nobody here wrote: the Python SDK (PyPI `mcp`,
# 2.x) and the MCP inspector's CLI (npm `@modelcontextprotocol/inspector`), each over stdio
# (`trellis mcp`) and over streamable HTTP (the gateway's /mcp), in both protocol eras (the
# initialize handshake of 2024-11-05..2025-11-25, and 2026-07-28 without it).
#
#   .ci/mcp.sh [PATH_TO_TRELLIS]
#
# Starts `trellis up` on a free gateway port with a fresh data directory (the services on
# DESIGN.md's ports, as .ci/schemathesis.sh does), registers two customers and checks:
# tools/list lists the six shop tools; tools/call list_products answers the catalog the public
# API shows; a customer's MCP call cannot read or cancel another customer's order; /mcp
# without a token is refused with 401 (and the clients fail). Builds nothing itself unless
# the binary is missing. Versions are pinned; installs are cached under ~/.cache/trellis-ci.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/trellis-ci/target}"
MCP_PY_VERSION="${MCP_PY_VERSION:-2.3.0}"
INSPECTOR_VERSION="${INSPECTOR_VERSION:-2.12.0}"
VENV="${HOME}/.cache/trellis-ci/venv"
NODE_DIR="${HOME}/.cache/trellis-ci/mcp-inspector"
SHOP_TOOLS="cancel_order check_stock get_order list_products place_order search_orders"

log() { printf '[mcp %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "FATAL: $*" >&2; exit 1; }

trellis="${1:-${CARGO_TARGET_DIR}/debug/trellis}"
if [[ ! -x "$trellis" ]]; then
  log "no $trellis; building it"
  cargo build -p trellis
  trellis="${CARGO_TARGET_DIR}/debug/trellis"
fi
trellis=$(readlink -f "$trellis")

# The Python SDK, pinned, in the venv the other CI scripts use.
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
if [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null)" != "$MCP_PY_VERSION" ]]; then
  log "installing mcp $MCP_PY_VERSION (Python SDK) into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "mcp==$MCP_PY_VERSION"
fi
# The inspector, pinned, in its own folder.
inspector="$NODE_DIR/node_modules/.bin/mcp-inspector"
if [[ "$(node -p "require('$NODE_DIR/node_modules/@modelcontextprotocol/inspector/package.json').version" 2>/dev/null)" != "$INSPECTOR_VERSION" ]]; then
  log "installing @modelcontextprotocol/inspector $INSPECTOR_VERSION into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" \
    "@modelcontextprotocol/inspector@$INSPECTOR_VERSION"
fi

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

work=$(mktemp -d)
pid=""
cleanup() {
  local status=$?
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  if [[ $status != 0 && -f "$work/up.log" ]]; then
    echo "--- trellis up (last lines)" >&2
    tail -20 "$work/up.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

port=$(free_port)
operator_port=$(free_port)
while [[ "$operator_port" == "$port" ]]; do operator_port=$(free_port); done
gw="http://127.0.0.1:$port"

log "trellis up on 127.0.0.1:$port (operator $operator_port), data in $work"
TRELLIS_ADMIN_EMAIL="mcp-admin@trellis.local" \
  TRELLIS_ADMIN_PASSWORD="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
  RUST_LOG="${RUST_LOG:-warn}" \
  "$trellis" up --data-dir "$work/data" --port "$port" --operator-port "$operator_port" \
  >"$work/up.log" 2>&1 &
pid=$!
up=false
for _ in $(seq 1 120); do
  kill -0 "$pid" 2>/dev/null || die "trellis up exited"
  if curl -sf "$gw/api/products" | grep -q '"id"'; then up=true; break; fi
  sleep 1
done
$up || die "the shop did not answer with a catalog within 120 s"

# Two customers; A places an order B must not see.
login() {
  local email=$1
  curl -sf -X POST "$gw/api/users" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"mcp-password-1\",\"name\":\"MCP test\"}" >/dev/null
  curl -sf -X POST "$gw/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"mcp-password-1\"}" |
    "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
token_a=$(login "mcp-a-$$@trellis.local")
token_b=$(login "mcp-b-$$@trellis.local")
product=$(curl -sf "$gw/api/products?limit=1" |
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["items"][0]["id"])')
order_a=$(curl -sf -X POST "$gw/api/orders" -H "authorization: Bearer $token_a" \
  -H 'content-type: application/json' -H "idempotency-key: mcp-ci-$$" \
  -d "{\"items\":[{\"product_id\":\"$product\",\"quantity\":1}]}" |
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["id"])')
log "customers A and B registered; A placed order $order_a"

# /mcp without a credential: 401 from the gateway, before MCP.
status=$(curl -s -o "$work/anon.json" -w '%{http_code}' -X POST "$gw/mcp" \
  -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
  -d '{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
[[ "$status" == 401 ]] || die "/mcp without a token answered $status: $(cat "$work/anon.json")"
log "/mcp without a token: 401"

failures=0
passes=0
check() { # check NAME COMMAND...: runs the check, counts it
  local name=$1; shift
  if "$@" >"$work/check.out" 2>&1; then
    passes=$((passes + 1)); log "ok   $name"
  else
    failures=$((failures + 1)); log "FAIL $name"; sed 's/^/    /' "$work/check.out" | tail -25 >&2
  fi
}

# --- the Python SDK ----------------------------------------------------------------------
cat > "$work/sdk.py" <<'EOF'
"""One client run of the Python MCP SDK against the shop: transport and era from argv."""
import asyncio, json, os, sys, urllib.request

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

transport, era = sys.argv[1], sys.argv[2]
gw, trellis = os.environ["GW"], os.environ["TRELLIS"]
token_a, token_b, order_a = os.environ["TOKEN_A"], os.environ["TOKEN_B"], os.environ["ORDER_A"]
tools_expected = set(os.environ["SHOP_TOOLS"].split())
mode = "legacy" if era == "legacy" else "2026-07-28"

def server(token):
    if transport == "http":
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        return streamable_http_client(f"{gw}/mcp", http_client=http)
    env = {"TRELLIS_TOKEN": token, "RUST_LOG": "warn", "PATH": os.environ["PATH"]}
    return StdioServerParameters(command=trellis, args=["mcp", "--gateway", gw], env=env)

def result_json(result):
    text = "".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    return json.loads(text)

async def main():
    async with Client(server(token_a), mode=mode) as a:
        version = a.protocol_version
        assert (version == "2026-07-28") == (era == "modern"), f"{era} negotiated {version}"
        tools = {t.name for t in (await a.list_tools()).tools}
        assert tools == tools_expected, f"tools/list: {sorted(tools)}"
        listed = await a.call_tool("list_products", {"limit": 50})
        assert not listed.is_error, listed
        with urllib.request.urlopen(f"{gw}/api/products?limit=50") as r:
            catalog = {p["id"] for p in json.load(r)["items"]}
        got = {p["id"] for p in result_json(listed)["products"]}
        assert got == catalog and catalog, f"list_products {sorted(got)} != catalog {sorted(catalog)}"
        own = await a.call_tool("get_order", {"order_id": order_a})
        assert not own.is_error and result_json(own)["id"] == order_a, own
        bad = await a.call_tool("get_order", {"order_id": "not-an-id"})
        assert bad.is_error, f"a bad argument must be a tool error: {bad}"
    async with Client(server(token_b), mode=mode) as b:
        for tool in ("get_order", "cancel_order"):
            other = await b.call_tool(tool, {"order_id": order_a})
            assert other.is_error, f"B's {tool} on A's order must fail: {other}"
        mine = result_json(await b.call_tool("search_orders", {}))
        assert all(o["id"] != order_a for o in mine.get("orders", [])), mine
    print(f"{transport} {era} ({version}): {len(tools)} tools, {len(got)} products, isolation holds")

asyncio.run(main())
EOF

# A client without a token is refused (HTTP): the SDK run fails.
cat > "$work/sdk_anon.py" <<'EOF'
import asyncio, os, sys
from mcp import Client
try:
    async def main():
        async with Client(os.environ["GW"] + "/mcp", mode=sys.argv[1]) as c:
            await c.list_tools()
    asyncio.run(main())
except BaseException as e:  # the SDK raises (an exception group) on a 401
    print(f"refused as expected: {type(e).__name__}")
    sys.exit(0)
sys.exit("a client without a token listed the tools")
EOF

export GW="$gw" TRELLIS="$trellis" TOKEN_A="$token_a" TOKEN_B="$token_b" ORDER_A="$order_a" SHOP_TOOLS
for transport in http stdio; do
  for era in legacy modern; do
    check "python sdk $MCP_PY_VERSION, $transport, $era" "$VENV/bin/python" "$work/sdk.py" "$transport" "$era"
  done
done
check "python sdk, http without a token is refused" "$VENV/bin/python" "$work/sdk_anon.py" legacy

# --- the MCP inspector (CLI mode) ----------------------------------------------------------
inspect() { # inspect TRANSPORT ERA TOKEN ARGS...: one inspector call, JSON result on stdout
  local transport=$1 era=$2 token=$3; shift 3
  if [[ $transport == http ]]; then
    timeout 120 "$inspector" --cli --transport http --server-url "$gw/mcp" \
      --header "Authorization: Bearer $token" --protocol-era "$era" --format json -q "$@"
  else
    timeout 120 "$inspector" --cli --protocol-era "$era" -e "TRELLIS_TOKEN=$token" -e RUST_LOG=warn \
      --format json -q "$@" -- "$trellis" mcp --gateway "$gw"
  fi
}
inspector_run() {
  local transport=$1 era=$2
  # (Each step returns on failure: `set -e` does not apply inside a function run by `if`.)
  inspect "$transport" "$era" "$token_a" --method tools/list > "$work/list.json" || return 1
  "$VENV/bin/python" - "$work/list.json" <<'EOF' || return 1
import json, os, sys
doc = json.load(open(sys.argv[1]))
tools = {t["name"] for t in doc.get("result", doc)["tools"]}
assert tools == set(os.environ["SHOP_TOOLS"].split()), f"tools/list: {sorted(tools)}"
EOF
  inspect "$transport" "$era" "$token_a" --method tools/call --tool-name list_products \
    --tool-args-json '{"limit": 50}' > "$work/call.json" || return 1
  "$VENV/bin/python" - "$work/call.json" <<'EOF' || return 1
import json, os, sys, urllib.request
doc = json.load(open(sys.argv[1]))
result = doc.get("result", doc)
assert not result.get("isError"), result
got = {p["id"] for p in json.loads(result["content"][0]["text"])["products"]}
with urllib.request.urlopen(os.environ["GW"] + "/api/products?limit=50") as r:
    catalog = {p["id"] for p in json.load(r)["items"]}
assert got == catalog and catalog, f"{sorted(got)} != {sorted(catalog)}"
EOF
  inspect "$transport" "$era" "$token_b" --method tools/call --tool-name get_order \
    --tool-args-json "{\"order_id\": \"$order_a\"}" > "$work/other.json" || true
  "$VENV/bin/python" - "$work/other.json" <<'EOF' || return 1
import json, sys
doc = json.load(open(sys.argv[1]))
result = doc.get("result", doc)
assert result.get("isError") is True, f"B read A's order: {doc}"
EOF
  echo "$transport $era: tools listed, catalog returned, A's order hidden from B"
}
for transport in http stdio; do
  for era in legacy modern; do
    check "inspector $INSPECTOR_VERSION, $transport, $era" inspector_run "$transport" "$era"
  done
done
inspector_anon() {
  if timeout 120 "$inspector" --cli --transport http --server-url "$gw/mcp" --protocol-era legacy --stored-auth-only \
    --format json -q --method tools/list >"$work/anon.out" 2>&1; then
    echo "the inspector listed the tools without a token: $(cat "$work/anon.out")"
    return 1
  fi
  # The inspector reports the 401 as `auth_required`, quoting the gateway's error body.
  grep -q '"auth_required"' "$work/anon.out" && grep -q 'unauthenticated' "$work/anon.out" ||
    { echo "not refused as unauthenticated: $(cat "$work/anon.out")"; return 1; }
}
check "inspector, http without a token is refused (401)" inspector_anon

echo "mcp: $passes passed, $failures failed"
[[ $failures == 0 ]]
