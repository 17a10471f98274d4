#!/usr/bin/env bash
# Runs chorus-server and the peers (../shared/bench: Node Socket.IO + Redis adapter, Sails)
# through the same scenario sweep in the same run, alternating servers scenario by scenario,
# with each load generator, then writes the comparison (docs/benchmarks/ by default).
#
#   scripts/bench-compare.sh                       # everything, ~45 min
#   SERVERS="chorus socketio" LOADGENS=chorus-bench SCENARIOS="idle-c2000 http-c1000-k10-r500" \
#     DURATION=5 scripts/bench-compare.sh          # a subset
#
# Every server runs as REPLICAS processes (fresh for each scenario) on one redis-server, all on
# free loopback ports; the generator gets their pids and reads CPU and RSS from /proc.
#
# Knobs (defaults in brackets):
#   SERVERS [chorus socketio sails]     chorus = target/release/chorus-server; others = ../shared/bench/peer-<name>;
#                                       chorus-before = the binary BEFORE_BIN (an older build, for before/after);
#                                       chorus-nohistory = chorus with HISTORY_SIZE=0;
#                                       chorus-2bus = chorus on two independent Redis (REDIS_URL lists both)
#   LOADGENS [chorus-bench node]        chorus-bench = target/release/chorus-bench; node = ../shared/bench/loadgen
#   SCENARIOS [all below]               REPLICAS [3]   DURATION [10]   ROUNDS [1]
#                                       storm-c<N>-k<K> (not in the default sweep): a reconnect storm,
#                                       chorus servers and chorus-bench only (the peers cannot resume)
#   OUT [bench/results/compare-<date>.jsonl]   REPORT_DIR [docs/benchmarks] (empty: no report)
#   NICE [-10 as root, else 0]          the run's own scheduler autogroup gets this nice value
#   SHARED_BENCH [../shared/bench]      PEER_WORK [~/.cache/chorus-peers] (writable copy for npm ci)
set -Eeuo pipefail
# Any command that ends the run says which one it was.
trap 'rc=$?; printf "%s bench-compare: failed (exit %s) at line %s: %s\n" "$(date +%T)" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SERVERS=${SERVERS:-chorus socketio sails}
LOADGENS=${LOADGENS:-chorus-bench node}
REPLICAS=${REPLICAS:-3}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
ALL="idle-c2000 http-c1000-k10-r50 http-c1000-k10-r100 http-c1000-k10-r200 http-c1000-k10-r300
http-c1000-k10-r500 http-c1000-k10-r1000 http-c1000-k10-r2000 fanout-c2000-k1-r10 fanout-c2000-k1-r50
socket-c1000-k10-r250 multiroom-c1000-k10-r100"
SCENARIOS=${SCENARIOS:-$ALL}
OUT=${OUT:-$ROOT/bench/results/compare-$(date +%F).jsonl}
REPORT_DIR=${REPORT_DIR-$ROOT/docs/benchmarks}
SHARED_BENCH=${SHARED_BENCH:-$ROOT/../shared/bench}
PEER_WORK=${PEER_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus-peers}
NICE=${NICE:-$([ "$(id -u)" = 0 ] && echo -10 || echo 0)}

# Its own session, hence its own autogroup: the kernel shares CPU between autogroups before
# nice applies, so on a shared machine only this lets the benchmark have the CPU.
if [ "$NICE" != 0 ] && [ -z "${_CHORUS_OWN_SESSION:-}" ] && command -v setsid >/dev/null; then
  _CHORUS_OWN_SESSION=1 exec setsid --wait bash "${BASH_SOURCE[0]}" "$@"
fi
if [ "$NICE" != 0 ]; then echo "$NICE" >/proc/self/autogroup 2>/dev/null || NICE=0; fi

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
want_server() { [[ " $SERVERS " == *" $1 "* ]]; }
want_loadgen() { [[ " $LOADGENS " == *" $1 "* ]]; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building chorus-server and chorus-bench (release)"
# The same packages as scripts/test.sh's release build: cargo unifies the dependencies'
# features over the packages of one build, so another set would rebuild them all.
cargo build -q --release --locked -p chorus-server -p chorus-operator -p chorus-bench

# The peers and the Node generator need their npm packages: a writable copy of the shared bench.
if [ -n "$(for s in $SERVERS; do [[ $s == chorus* ]] || echo "$s"; done)" ] || want_loadgen node; then
  command -v node >/dev/null || { log "node not found"; exit 1; }
  mkdir -p "$PEER_WORK"
  (cd "$SHARED_BENCH" && tar --exclude='./*/node_modules' --exclude=./results -cf - .) | (cd "$PEER_WORK" && tar -xf -)
  chmod -R u+w "$PEER_WORK"
  for d in loadgen $(for s in $SERVERS; do [[ $s == chorus* ]] || echo "peer-$s"; done); do
    if [ ! -d "$PEER_WORK/$d/node_modules" ]; then
      log "npm ci in $d"
      (cd "$PEER_WORK/$d" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
  done
fi

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/chorus-compare.XXXXXX")
TOKEN=bench-$RANDOM$RANDOM$RANDOM
REDIS_PID=""
REDIS2_PID=""
SERVER_PIDS=()
SERVER_URLS=()

stop_pid() { # pid: SIGTERM, then SIGKILL after 10 s
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do stop_pid "$pid"; done
  SERVER_PIDS=()
  SERVER_URLS=()
}
cleanup() {
  stop_servers
  [ -z "$REDIS_PID" ] || stop_pid "$REDIS_PID"
  [ -z "$REDIS2_PID" ] || stop_pid "$REDIS2_PID"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

start_redis() { # [name]: sets STARTED_PID and STARTED_URL
  local port i name=${1:-redis}
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --loglevel warning >"$LOGDIR/$name.log" 2>&1 &
  STARTED_PID=$!
  STARTED_URL=redis://127.0.0.1:$port
  for ((i = 0; i < 100; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  log "redis-server did not start: $(cat "$LOGDIR/$name.log")"
  exit 1
}

# server_cmd NAME: sets DIR, CMD and GC for a server
server_cmd() {
  case $1 in
    chorus) DIR=$ROOT CMD="$ROOT/target/release/chorus-server" GC="" LABEL=chorus EXTRA_ENV="" ;;
    chorus-nohistory) DIR=$ROOT CMD="$ROOT/target/release/chorus-server" GC="" LABEL=chorus-nohistory EXTRA_ENV="HISTORY_SIZE=0" ;;
    chorus-2bus) DIR=$ROOT CMD="$ROOT/target/release/chorus-server" GC="" LABEL=chorus-2bus EXTRA_ENV="REDIS_URL=$REDIS_URL,$REDIS2_URL" ;;
    chorus-before) DIR=$ROOT CMD=${BEFORE_BIN:?set BEFORE_BIN to the older chorus-server binary} GC="" LABEL=chorus-before EXTRA_ENV="" ;;
    *)
      LABEL=peer-$1 EXTRA_ENV=""
      DIR=$PEER_WORK/peer-$1
      CMD="node --expose-gc $(cd "$DIR" && node -p 'require("./package.json").main || "server.js"')"
      GC=SIGWINCH ;;
  esac
}

start_servers() { # name tag
  local name=$1 tag=$2 i port url
  server_cmd "$name"
  for ((i = 1; i <= REPLICAS; i++)); do
    port=$(free_port)
    # DRAIN_SECONDS=0: chorus-server would otherwise keep its sockets open for the drain delay.
    (cd "$DIR" && PORT=$port REDIS_URL=$REDIS_URL API_TOKEN=$TOKEN NODE_ENV=production \
      DRAIN_SECONDS=0 exec env $EXTRA_ENV $CMD) >"$LOGDIR/$tag-s$i.log" 2>&1 &
    SERVER_PIDS+=("$!")
    SERVER_URLS+=("http://127.0.0.1:$port")
  done
  python3 - "${SERVER_URLS[@]}" <<'EOF' || { log "$name did not become healthy; logs in $LOGDIR"; exit 1; }
import sys, time, urllib.request
deadline = time.monotonic() + 30
for url in sys.argv[1:]:
    while True:
        try:
            if urllib.request.urlopen(url + "/healthz", timeout=2).status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url}/healthz did not answer 200 within 30 s")
        time.sleep(0.1)
EOF
  sleep 0.5
}

# wait_quiet: up to 15 s for other processes to leave the CPU (< 0.2 cores busy). A machine that
# stays busy is not an error: the run goes on, and the generator measures and flags the other
# processes' CPU (noisy_machine), which the report excludes.
wait_quiet() {
  local i a b
  for ((i = 0; i < 15; i++)); do
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat)
    if awk -v a="$a" -v b="$b" 'BEGIN { split(a, x); split(b, y); busy = y[1] - x[1]; all = busy + y[2] - x[2];
      exit !(all > 0 && busy / all * 2 < 0.2) }'; then return 0; fi
  done
  log "  the machine is still busy after 15 s; going on (the figures will be flagged if noisy)"
  return 0
}

# scenario_args NAME: the generator arguments of a scenario (the shared sweep's shapes)
scenario_args() {
  local name=$1 c k r
  case $name in
    idle-c*) echo "--idle-memory --clients ${name#idle-c} --rooms 10 --idle-wait 10" ;;
    http-c*-k*-r*|fanout-c*-k*-r*)
      IFS=- read -r _ c k r <<<"$name"
      echo "--clients ${c#c} --rooms ${k#k} --rate ${r#r} --duration $DURATION --payload 100" ;;
    socket-c*-k*-r*)
      IFS=- read -r _ c k r <<<"$name"
      echo "--via socket --clients ${c#c} --rooms ${k#k} --rate ${r#r} --duration $DURATION --payload 100" ;;
    multiroom-c*-k*-r*)
      IFS=- read -r _ c k r <<<"$name"
      echo "--clients ${c#c} --rooms ${k#k} --rooms-per-client 2 --broadcast-rooms 3 --rate ${r#r} --duration $DURATION --payload 100" ;;
    storm-c*-k*)
      IFS=- read -r _ c k <<<"$name"
      echo "--reconnect-storm --clients ${c#c} --rooms ${k#k} --rooms-per-client 2 --missed 20 --payload 100 --connect-concurrency 500" ;;
    *) log "unknown scenario $name"; return 1 ;;
  esac
}

run_one() { # round scenario loadgen server
  local round=$1 name=$2 lg=$3 server=$4 args res urls pids gen extra
  args=$(scenario_args "$name")
  # Every run starts on empty Redis: what an earlier run left (room histories, copies) would
  # make the later runs read more, and bias the comparison against whoever runs last.
  redis-cli -u "$REDIS_URL" FLUSHALL >/dev/null
  if [ -n "${REDIS2_URL:-}" ]; then redis-cli -u "$REDIS2_URL" FLUSHALL >/dev/null; fi
  if [[ $name == storm-* ]] && { [[ $server != chorus* ]] || [ "$lg" != chorus-bench ]; }; then
    log "round $round $name: skipped for $server with $lg (a storm needs resume and chorus-bench)"
    return 0
  fi
  case $lg in
    chorus-bench) gen=("$ROOT/target/release/chorus-bench" --threads 2) ;;
    node) gen=(node "$PEER_WORK/loadgen/loadgen.js" --workers 1) ;;
  esac
  start_servers "$server" "$round-$name-$lg-$server"   # also sets GC and LABEL (server_cmd)
  if [ -n "$GC" ] && [[ $args == --idle-memory* ]]; then args="$args --gc-signal $GC"; fi
  wait_quiet
  urls=$(IFS=,; echo "${SERVER_URLS[*]}")
  pids=$(IFS=,; echo "${SERVER_PIDS[*]}")
  res=$LOGDIR/$round-$name-$lg-$server.json
  log "round $round $name: $server with $lg"
  extra="redis:$REDIS_PID"
  if [ "$server" = chorus-2bus ]; then extra="$extra,redis2:$REDIS2_PID"; fi
  # shellcheck disable=SC2086 # args are words
  API_TOKEN=$TOKEN "${gen[@]}" --urls "$urls" --pids "$pids" --extra-pids "$extra" \
    --server "$LABEL" --label "$name" $args >"$res" 2>"${res%.json}.err" ||
    log "  generator exited non-zero (see ${res%.json}.err)"
  stop_servers
  python3 - "$res" "$OUT" "$round" "$name" "$lg" "$LABEL" "$NICE" <<'EOF'
import json, sys
res, out, rnd, name, lg, server, nice = sys.argv[1:]
try:
    with open(res) as f:
        line = json.loads(f.read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    line = {"error": "the load generator printed no result"}
line.update(scenario=name, server=server, round=int(rnd), autogroup_nice=int(nice))
line["loadgen"] = "chorus-bench" if lg == "chorus-bench" else "node-loadgen"
with open(out, "a") as f:
    f.write(json.dumps(line) + "\n")
if "error" in line:
    print(f"  error: {line['error']}", file=sys.stderr)
elif line.get("mode") == "idle-memory":
    print(f"  {line.get('servers_kib_per_connection')} KiB per connection", file=sys.stderr)
elif line.get("mode") == "reconnect-storm":
    print(f"  {line.get('resumed')}/{line.get('clients_connected')} resumed in {line.get('all_resumed_s')} s, "
          f"replay lost {line.get('replay_lost')} dup {line.get('replay_duplicates')}, "
          f"servers peak {line.get('servers_peak_cores')} cores, RSS {line.get('servers_rss_connected_mb')} -> "
          f"{line.get('servers_rss_peak_mb')} MB", file=sys.stderr)
else:
    cpu, n = line.get("servers_cpu_s") or 0, line.get("received_deliveries") or 0
    print(f"  sent {line.get('sent')}/{line.get('scheduled')}, lost {line.get('lost')}, "
          f"{line.get('deliveries_per_s')}/s, p99 {(line.get('latency_ms') or {}).get('p99')} ms, "
          f"servers {cpu / n * 1e6 if n else 0:.1f} us/delivery", file=sys.stderr)
EOF
}

mkdir -p "$(dirname "$OUT")"
start_redis redis
REDIS_PID=$STARTED_PID REDIS_URL=$STARTED_URL
if want_server chorus-2bus; then
  start_redis redis2
  REDIS2_PID=$STARTED_PID REDIS2_URL=$STARTED_URL
fi
log "servers: $SERVERS; generators: $LOADGENS; $ROUNDS round(s); out $OUT; logs $LOGDIR"
T0=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
  combo=0
  for name in $SCENARIOS; do
    for lg in $LOADGENS; do
      # Rotate the order, step by step and round by round, so that no server always runs
      # first or last in a scenario (on a warmer machine, or after the others).
      read -r -a servers <<<"$SERVERS"
      shift_by=$(( (combo++ + round - 1) % ${#servers[@]} ))
      order=("${servers[@]:shift_by}" "${servers[@]:0:shift_by}")
      for server in "${order[@]}"; do
        run_one "$round" "$name" "$lg" "$server"
      done
    done
  done
done
log "sweep done in $(( $(date +%s) - T0 )) s"
if [ -n "$REPORT_DIR" ] && want_server chorus && [ "$SERVERS" != chorus ]; then
  python3 "$ROOT/scripts/bench-report.py" --baseline chorus --out-dir "$REPORT_DIR" "$OUT"
fi
