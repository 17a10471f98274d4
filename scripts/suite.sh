# Sourced by the test scripts: what a suite does when a tool or data it needs is missing.
#
#   cannot_run SUITE REASON
#
# Under CI=true (set by CI) the run fails with one line naming what is missing: nothing may
# pass by not running. Elsewhere the suite is skipped, and the skip is written to
# $CHORUS_SKIP_LOG (if set) so that scripts/test.sh lists it at the end. Returns 0 after a
# skip so the caller can `cannot_run ... && exit 0` or skip a block.
cannot_run() {
  local suite=$1 reason=$2
  if [ "${CI:-}" = true ]; then
    printf 'FAILED: %s cannot run under CI=true: %s\n' "$suite" "$reason" >&2
    exit 1
  fi
  printf 'SKIPPED: %s: %s\n' "$suite" "$reason" >&2
  if [ -n "${CHORUS_SKIP_LOG:-}" ]; then printf '%s: %s\n' "$suite" "$reason" >>"$CHORUS_SKIP_LOG"; fi
  return 0
}
