#!/usr/bin/env bash
# Gateway benchmark: one small hyper "hello" upstream served
#   (a) directly, (b) through nginx (keepalive reverse proxy, 2 workers),
#   (c) through trellis-gateway with routing only, (d) through trellis-gateway with RS256 JWT
#   auth (verified-token cache on) and a per-subject rate limit that never trips, and
#   (e) through nginx again with the same Authorization header as (d), so d/e compares the
#   same bytes on the wire (nginx forwards the header without checking it),
# all on this machine in one run. Prints a markdown table of req/s and p50/p99 latency under
# load (wrk -t2 -c64), and the p50/p99 at one connection (the added latency per hop).
#
# Usage: bench/gateway/run.sh [duration_s]     (from the workspace root; needs root for apt)
# Then, at half of trellis' routing-only peak, a paced load (hey -q, 32 workers) through each
# path: the p50/p99 added to the direct path at that rate.
# Env:   CONNECTIONS (64), THREADS (2), ROUNDS (3), SKIP_BUILD=1 to reuse target/release.
set -euo pipefail

DURATION="${1:-10}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mktemp -d /tmp/trellis-gw-bench.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -f "$WORK/nginx.pid" ]]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need hey || ! need curl || { ! need nginx && [[ ! -x /usr/sbin/nginx ]]; }; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk hey nginx curl >/dev/null
fi
chmod 755 "$WORK"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

UP=127.0.0.1:19001; NG=127.0.0.1:19002; GW=127.0.0.1:19003; GWA=127.0.0.1:19004

if [[ -z "${SKIP_BUILD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -q -p trellis-gateway --examples)
fi
BIN="$ROOT/target/release/examples"

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}

# --- upstream -----------------------------------------------------------------------------
"$BIN/hello_upstream" "$UP" 2>/dev/null & PIDS+=($!)
wait_port "$UP"

# --- nginx ----------------------------------------------------------------------------------
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream hello { server $UP; keepalive 128; }
  server {
    listen $NG;
    location / {
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf"
wait_port "$NG"

# --- trellis-gateway: routing only, and JWT + rate limit -------------------------------------
KEYS="$ROOT/crates/gateway/tests/it/keys"
cat > "$WORK/routing.toml" <<EOF
[server]
listen = "$GW"
[clusters.hello]
endpoints = ["$UP"]
[[routes]]
name = "hello"
path_prefix = "/"
cluster = "hello"
EOF
cat > "$WORK/auth.toml" <<EOF
[server]
listen = "$GWA"
[clusters.hello]
endpoints = ["$UP"]
[auth.users]
type = "jwt"
issuers = ["bench"]
audiences = ["bench"]
claims_to_headers = { sub = "x-user-id" }
keys = [{ kid = "rsa", alg = "RS256", pem_file = "$KEYS/rsa_public.pem" }]
[rate_limits.per_user]
key = "jwt_sub"
requests_per_second = 10000000
burst = 10000000
[[routes]]
name = "hello"
path_prefix = "/"
cluster = "hello"
auth = ["users"]
rate_limit = "per_user"
EOF
"$BIN/serve" "$WORK/routing.toml" & PIDS+=($!)
"$BIN/serve" "$WORK/auth.toml" & PIDS+=($!)
wait_port "$GW"; wait_port "$GWA"

# An RS256 token signed with the test key (openssl; no JWT tool needed).
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
HEADER=$(printf '{"alg":"RS256","typ":"JWT","kid":"rsa"}' | b64url)
EXP=$(( $(date +%s) + 86400 ))
PAYLOAD=$(printf '{"sub":"bench-user","iss":"bench","aud":"bench","exp":%d}' "$EXP" | b64url)
SIG=$(printf '%s.%s' "$HEADER" "$PAYLOAD" | openssl dgst -sha256 -sign "$KEYS/rsa_private.pem" -binary | b64url)
TOKEN="$HEADER.$PAYLOAD.$SIG"
test "$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" "http://$GWA/")" = 200 \
  || { echo "the auth gateway refused the bench token" >&2; exit 1; }
test "$(curl -s -o /dev/null -w '%{http_code}' "http://$GWA/")" = 401 \
  || { echo "the auth gateway accepted a request without a token" >&2; exit 1; }

# --- measure --------------------------------------------------------------------------------
# wrk prints latency percentiles with --latency; pull req/s, p50 and p99 (converted to µs).
to_us() { awk '{ v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v+0} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000000} else print v }'; }
measure() { # name url threads connections duration [header]
  local out
  if [[ -n "${6:-}" ]]; then
    out=$(wrk -t"$2" -c"$3" -d"$4"s --latency -H "$6" "$5")
  else
    out=$(wrk -t"$2" -c"$3" -d"$4"s --latency "$5")
  fi
  local rps p50 p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}' | to_us)
  p99=$(echo "$out" | awk '$1=="99%" {print $2}' | to_us)
  errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  echo "$1|$rps|$p50|$p99|$errors"
}

AUTH="authorization: Bearer $TOKEN"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A R
for warm in "http://$UP/" "http://$NG/" "http://$GW/"; do wrk -t1 -c8 -d1s "$warm" >/dev/null; done
wrk -t1 -c8 -d1s -H "$AUTH" "http://$GWA/" >/dev/null

echo "# load: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, $ROUNDS interleaved rounds, median by req/s" >&2
# Rounds interleave the four paths so a burst of other load on the machine hits them alike;
# each path's reported line is its median round by req/s.
median() { sort -t'|' -k2 -g | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'; }
declare -A ALL
for round in $(seq 1 "$ROUNDS"); do
  ALL[a]+="$(measure "a direct" "$THREADS" "$CONNECTIONS" "$DURATION" "http://$UP/")"$'\n'
  ALL[b]+="$(measure "b nginx" "$THREADS" "$CONNECTIONS" "$DURATION" "http://$NG/")"$'\n'
  ALL[c]+="$(measure "c trellis routing" "$THREADS" "$CONNECTIONS" "$DURATION" "http://$GW/")"$'\n'
  ALL[d]+="$(measure "d trellis jwt+rl" "$THREADS" "$CONNECTIONS" "$DURATION" "http://$GWA/" "$AUTH")"$'\n'
  ALL[e]+="$(measure "e nginx + same token" "$THREADS" "$CONNECTIONS" "$DURATION" "http://$NG/" "$AUTH")"$'\n'
  echo "# round $round: $(for k in a b c d e; do echo "${ALL[$k]}" | grep -v '^$' | tail -1 | cut -d'|' -f1,2; done | tr '\n' ' ')" >&2
done
for k in a b c d e; do R[$k]=$(echo "${ALL[$k]}" | grep -v '^$' | median); done
echo "# one connection: wrk -t1 -c1 -d${DURATION}s --latency" >&2
S1=$(measure "a direct" 1 1 "$DURATION" "http://$UP/")
S2=$(measure "b nginx" 1 1 "$DURATION" "http://$NG/")
S3=$(measure "c trellis routing" 1 1 "$DURATION" "http://$GW/")
S4=$(measure "d trellis jwt+rl" 1 1 "$DURATION" "http://$GWA/" "$AUTH")
S5=$(measure "e nginx + same token" 1 1 "$DURATION" "http://$NG/" "$AUTH")

field() { echo "$1" | cut -d'|' -f"$2"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f", a - b }'; }

echo
echo "Machine: $(nproc) cores (load average before the run: $LOAD_BEFORE), $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'); $(date -u +%FT%TZ)"
echo
echo "| path | req/s (-c$CONNECTIONS) | p50 µs | p99 µs | p50 µs (-c1) | p99 µs (-c1) | added p50 µs (-c1) | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
BASE_P50=$(field "$S1" 3)
for pair in "a:$S1" "b:$S2" "c:$S3" "d:$S4" "e:$S5"; do
  k=${pair%%:*}; single=${pair#*:}; load=${R[$k]}
  echo "| $(field "$load" 1) | $(field "$load" 2) | $(field "$load" 3) | $(field "$load" 4) | $(field "$single" 3) | $(field "$single" 4) | $(minus "$(field "$single" 3)" "$BASE_P50") | $(field "$load" 5)$(field "$single" 5) |"
done
echo
echo "c/b req/s = $(ratio "$(field "${R[c]}" 2)" "$(field "${R[b]}" 2)");  d/b req/s = $(ratio "$(field "${R[d]}" 2)" "$(field "${R[b]}" 2)");  d/e req/s = $(ratio "$(field "${R[d]}" 2)" "$(field "${R[e]}" 2)");  c/a = $(ratio "$(field "${R[c]}" 2)" "$(field "${R[a]}" 2)");  b/a = $(ratio "$(field "${R[b]}" 2)" "$(field "${R[a]}" 2)")"

# --- paced load at half of trellis' peak (hey paces each worker; wrk2 is not packaged) ------
PEAK=$(field "${R[c]}" 2)
WORKERS=32
PER_WORKER=$(awk -v p="$PEAK" -v w="$WORKERS" 'BEGIN { printf "%d", p / 2 / w }')
paced() { # url [header]
  local out
  if [[ -n "${2:-}" ]]; then
    out=$(hey -z "${DURATION}s" -c "$WORKERS" -q "$PER_WORKER" -H "$2" "$1")
  else
    out=$(hey -z "${DURATION}s" -c "$WORKERS" -q "$PER_WORKER" "$1")
  fi
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
  p50=$(echo "$out" | awk '$1=="50%%" || $1=="50%" {printf "%d", $3 * 1000000}')
  p99=$(echo "$out" | awk '$1=="99%%" || $1=="99%" {printf "%d", $3 * 1000000}')
  echo "$rps|$p50|$p99"
}
P1=$(paced "http://$UP/")
P2=$(paced "http://$NG/")
P3=$(paced "http://$GW/")
P4=$(paced "http://$GWA/" "$AUTH")
echo
echo "Paced: hey -z ${DURATION}s -c $WORKERS -q $PER_WORKER (target $((PER_WORKER * WORKERS)) req/s = half of c's peak)"
echo
echo "| path | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for pair in "a direct:$P1" "b nginx:$P2" "c trellis routing:$P3" "d trellis jwt+rl:$P4"; do
  name=${pair%%:*}; v=${pair#*:}
  echo "| $name | $(field "$v" 1) | $(field "$v" 2) | $(field "$v" 3) | $(minus "$(field "$v" 2)" "$(field "$P1" 2)") | $(minus "$(field "$v" 3)" "$(field "$P1" 3)") |"
done
