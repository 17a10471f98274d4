#!/usr/bin/env bash
# Rebalancing after a scale-up from 2 to 3 replicas: how long until balanced, how many sockets
# moved, what it cost in CPU, and that nothing was lost (docs/benchmarks.md, *Rebalancing after
# a scale-up*). Runs bench/rebalance.js once per entry of RUNS, one at a time, and appends one
# JSON line per run to the output file.
#
#   scripts/bench-rebalance.sh [OUT]          # OUT: bench/results/<date>-rebalance.jsonl
#   RUNS="2000 5000:affinity5" scripts/bench-rebalance.sh /tmp/rb.jsonl
#
# Knobs (defaults in brackets):
#   RUNS ["2000 2000 5000 5000 2000:affinity5"]  N clients per run; `:affinityS` puts the proxy in
#                               ClientIP affinity mode with an S-second window and sets
#                               REBALANCE_AFFINITY_SECONDS=S on the replicas
#   CHORUS_SERVER_BIN           a chorus-server binary; unset: `cargo build --release -p chorus-server`
#   TIMEOUT_S [600]             longest wait for balance after the third replica starts (then up
#                               to 60 s plus ten affinity windows for the last clients to come back)
#   NICE [-10 as root, else 0]  each run's scheduler autogroup gets this nice value
#
# Needs redis-server, node and tests/js/node_modules (`npm ci` in tests/js). Each client holds
# one websocket and the proxy two sockets per client, all in the node process: the soft limit
# of open files is raised to what the largest run needs (3 per client and 1024 more), or the
# script stops and says so. Every process a run starts is in that run's own process group,
# which is killed when the script exits, fails or is interrupted.
set -Eeuo pipefail
trap 'rc=$?; printf "%s bench-rebalance: failed (exit %s) at line %s: %s\n" "$(date +%T)" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

OUT=${1:-$ROOT/bench/results/$(date +%F)-rebalance.jsonl}
RUNS=${RUNS:-2000 2000 5000 5000 2000:affinity5}
TIMEOUT_S=${TIMEOUT_S:-600}
NICE=${NICE:-$([ "$(id -u)" = 0 ] && echo -10 || echo 0)}
log() { printf '%s bench-rebalance: %s\n' "$(date +%T)" "$*" >&2; }

RUN_PGID=""
cleanup() {
  if [ -n "$RUN_PGID" ] && kill -0 -- "-$RUN_PGID" 2>/dev/null; then
    log "stopping run (process group $RUN_PGID)"
    kill -TERM -- "-$RUN_PGID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$RUN_PGID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$RUN_PGID" 2>/dev/null || true
  fi
  RUN_PGID=""
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

command -v redis-server >/dev/null || { log "redis-server not found on PATH"; exit 1; }
command -v node >/dev/null || { log "node not found on PATH"; exit 1; }
command -v setsid >/dev/null || { log "setsid not found (util-linux)"; exit 1; }
[ -d tests/js/node_modules/socket.io-client ] || { log "tests/js/node_modules missing: run npm ci in tests/js"; exit 1; }

if [ -z "${CHORUS_SERVER_BIN:-}" ]; then
  log "building chorus-server (release)"
  cargo build -q --release --locked -p chorus-server
  CHORUS_SERVER_BIN=$ROOT/target/release/chorus-server
fi
[ -x "$CHORUS_SERVER_BIN" ] || { log "$CHORUS_SERVER_BIN is not an executable"; exit 1; }
export CHORUS_SERVER_BIN

largest=0
for run in $RUNS; do
  n=${run%%:*}
  [[ $n =~ ^[0-9]+$ ]] || { log "RUNS: $run is not N or N:affinityS"; exit 1; }
  if [[ $run == *:* ]] && ! [[ ${run#*:} =~ ^affinity[0-9]+$ ]]; then log "RUNS: $run is not N or N:affinityS"; exit 1; fi
  [ "$n" -gt "$largest" ] && largest=$n
done
need=$((3 * largest + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
    log "open files limited to $(ulimit -n) (hard $(ulimit -Hn)); $largest clients need $need"; exit 1
  fi
  log "raised the open-file limit to $(ulimit -n)"
fi

mkdir -p "$(dirname "$OUT")"
log "runs: $RUNS; results appended to $OUT"
failed=0
for run in $RUNS; do
  n=${run%%:*}
  aff=0
  [[ $run == *:affinity* ]] && aff=${run##*:affinity}
  log "run: $n clients, affinity ${aff}s"
  # setsid: the run (node, its proxy, redis-server and the replicas it starts) is a process
  # group of its own, and a scheduler autogroup of its own; timeout bounds the whole run.
  setsid timeout -k 30 $((TIMEOUT_S + 900 + 10 * aff)) \
    node bench/rebalance.js --clients "$n" --affinity-seconds "$aff" --timeout-s "$TIMEOUT_S" --out "$OUT" &
  RUN_PGID=$!
  if [ "$NICE" != 0 ]; then echo "$NICE" >"/proc/$RUN_PGID/autogroup" 2>/dev/null || true; fi
  rc=0
  wait "$RUN_PGID" || rc=$?
  cleanup
  if [ "$rc" != 0 ]; then log "run $run ended with exit $rc"; failed=$((failed + 1)); fi
done
log "done: $failed of $(wc -w <<<"$RUNS") runs failed; results in $OUT"
[ "$failed" = 0 ]
