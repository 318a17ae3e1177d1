#!/usr/bin/env bash
# The short fuzz pass: build every target of fuzz/ (cargo-fuzz, libFuzzer, no sanitizer: the
# stable toolchain, see docs/decisions/0012-fuzzing-on-stable.md) and run each for a few
# seconds from its checked-in seed corpus (fuzz/corpus/TARGET). Any crash, panic, timeout or
# out-of-memory fails the script; libFuzzer leaves the input in fuzz/artifacts/TARGET/.
#
#   .ci/fuzz.sh                  every target, FUZZ_SECONDS (default 5) each
#   .ci/fuzz.sh jwt_verify 600   one target, ten minutes
#
# cargo-fuzz is installed once into ~/.cache/trellis-ci/tools (about 30 s cold). The fuzz
# crate builds in its own target dir, FUZZ_TARGET_DIR (default ~/.cache/trellis-ci/fuzz-target,
# so CI's fresh clones build warm), apart from the workspace's (different RUSTFLAGS).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION="0.13.2"
TOOLS="${HOME}/.cache/trellis-ci/tools"
export PATH="${TOOLS}/bin:${PATH}"
# The workspace's shared target dir must not be used: instrumented builds would evict it.
unset CARGO_TARGET_DIR
target_dir="${FUZZ_TARGET_DIR:-${HOME}/.cache/trellis-ci/fuzz-target}"

log() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz ${CARGO_FUZZ_VERSION}" ]]; then
  log "installing cargo-fuzz ${CARGO_FUZZ_VERSION} into ${TOOLS}"
  cargo install --locked --quiet cargo-fuzz --version "=${CARGO_FUZZ_VERSION}" --root "${TOOLS}"
fi

seconds="${FUZZ_SECONDS:-5}"
if [[ $# -ge 1 ]]; then
  targets=("$1")
  seconds="${2:-${seconds}}"
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# -s none: no sanitizer, so no nightly-only -Zsanitizer flag. cargo-fuzz builds in release
# mode with debug assertions on (its default), which is also what keeps overflow checks.
log "building ${#targets[@]} target(s)"
started=$(date +%s)
if [[ ${#targets[@]} -eq 1 ]]; then
  cargo fuzz build --fuzz-dir fuzz --target-dir "${target_dir}" -s none "${targets[0]}"
else
  cargo fuzz build --fuzz-dir fuzz --target-dir "${target_dir}" -s none
fi
log "built in $(( $(date +%s) - started )) s"

failed=0
for target in "${targets[@]}"; do
  # New inputs go to a scratch directory; the checked-in seeds are only read.
  scratch=$(mktemp -d)
  log "${target}: ${seconds} s"
  if ! cargo fuzz run --fuzz-dir fuzz --target-dir "${target_dir}" -s none "${target}" "${scratch}" "fuzz/corpus/${target}" -- \
      -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"${scratch}.log" 2>&1; then
    failed=1
    log "${target}: FAILED"
    tail -n 40 "${scratch}.log"
  else
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^Done' "${scratch}.log" | tr '\n' ' '
    echo
  fi
  rm -rf "${scratch}" "${scratch}.log"
done
if [[ ${failed} -ne 0 ]]; then
  echo "FATAL: a fuzz target crashed; the input is in fuzz/artifacts/" >&2
  exit 1
fi
log "every target ran clean"
