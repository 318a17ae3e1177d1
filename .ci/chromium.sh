#!/usr/bin/env bash
# What the admin console's browser test (shop-app: the_console_works_in_a_real_browser) needs,
# installed when missing: Debian's `chromium` (and `chromium-driver`, for WebDriver clients),
# and playwright-core from npm into shop/app/tests/browser/node_modules, at the version its
# package-lock.json pins. playwright-core drives the system's /usr/bin/chromium; never
# `playwright install` (it downloads a browser of its own, which fails here).
#
#   .ci/chromium.sh
set -euo pipefail
cd "$(dirname "$0")/.."

browser_dir=shop/app/tests/browser

log() { printf '[chromium %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
  echo "FATAL: $*" >&2
  exit 1
}

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}') is installed"
else
  policy="$(apt-cache policy chromium 2>/dev/null || true)"
  if [[ "${policy}" != *"Candidate: "[0-9]* ]]; then
    log "no chromium package known to apt; running apt-get update"
    apt-get update -qq || fail "apt-get update failed; cannot install chromium"
  fi
  log "installing Debian's chromium and chromium-driver"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null ||
    fail "apt-get install chromium chromium-driver failed"
fi

command -v node >/dev/null || fail "no node: the browser test runs a Node script (apt-get install nodejs npm)"
if [[ -d "${browser_dir}/node_modules/playwright-core" ]]; then
  log "playwright-core is installed in ${browser_dir}"
else
  log "npm ci in ${browser_dir} (playwright-core)"
  npm ci --prefix "${browser_dir}" --no-audit --no-fund --loglevel=error ||
    fail "npm ci in ${browser_dir} failed"
fi
