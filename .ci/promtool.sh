#!/usr/bin/env bash
# The Prometheus rules of deploy/prometheus/: `promtool check config` on the example scrape
# configuration, `promtool check rules` on recording.yml and alerts.yml, and
# `promtool test rules` on their unit tests (deploy/prometheus/tests/*.yml). Any failure fails
# the script with promtool's own report.
#
#   .ci/promtool.sh
#
# promtool comes from Debian's `prometheus` package, unpacked without installing it (no
# server is started, no service enabled): `apt-get download` + `dpkg-deb -x`, once, into
# PROMTOOL_DIR (default ~/.cache/trellis-ci/promtool), so later runs and fresh clones reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

PROMTOOL_DIR="${PROMTOOL_DIR:-${HOME}/.cache/trellis-ci/promtool}"
promtool="${PROMTOOL_DIR}/promtool"
rules=deploy/prometheus

log() { printf '[promtool %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
  echo "FATAL: $*" >&2
  exit 1
}

work=""
trap 'rm -rf "${work}"' EXIT

install_promtool() {
  work="$(mktemp -d)"
  local policy
  policy="$(apt-cache policy prometheus 2>/dev/null || true)"
  if [[ "${policy}" != *"Candidate: "[0-9]* ]]; then
    log "no prometheus package known to apt; running apt-get update"
    apt-get update -qq || fail "apt-get update failed; cannot fetch promtool"
  fi
  log "downloading Debian's prometheus package for promtool into ${PROMTOOL_DIR}"
  (cd "${work}" && apt-get download -q prometheus) ||
    fail "apt-get download prometheus failed"
  dpkg-deb -x "${work}"/prometheus_*.deb "${work}/root" || fail "cannot unpack the prometheus package"
  [[ -x "${work}/root/usr/bin/promtool" ]] || fail "the prometheus package has no usr/bin/promtool"
  mkdir -p "${PROMTOOL_DIR}"
  install -m 0755 "${work}/root/usr/bin/promtool" "${promtool}"
}

if ! "${promtool}" --version >/dev/null 2>&1; then
  install_promtool
fi
log "$("${promtool}" --version 2>&1 | head -n1)"

shopt -s nullglob
tests=("${rules}"/tests/*.yml)
[[ ${#tests[@]} -gt 0 ]] || fail "no rule tests in ${rules}/tests"

log "check config ${rules}/prometheus.yml"
"${promtool}" check config "${rules}/prometheus.yml" || fail "promtool check config failed"
log "check rules ${rules}/recording.yml ${rules}/alerts.yml"
"${promtool}" check rules "${rules}/recording.yml" "${rules}/alerts.yml" ||
  fail "promtool check rules failed"
log "test rules (${#tests[@]} files)"
"${promtool}" test rules "${tests[@]}" || fail "promtool test rules failed"
log "rules ok"
