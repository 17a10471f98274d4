#!/usr/bin/env bash
# Runs every check and test of the project:
#   formatting and clippy; Rust unit and integration tests (real redis-server, server
#   processes, a Rust Socket.IO client, the operator against an in-memory API and the CRD on
#   shared/tools/crd-apiserver); the Helm chart and manifests checked with Helm 4's library and
#   the Kubernetes OpenAPI schemas, and checkov's static checks (pinned Python tools in venvs);
#   the JavaScript client tests (socket.io-client 4 and 2, and a chaos test: 200 clients behind a
#   sticky proxy across restarts, a kill and scaling); browser tests (Debian's Chromium
#   through puppeteer-core: pages on allowed and refused origins, and the example chat page
#   across a SIGKILL and restart of its replica); the benchmark peers' protocol
#   smoke check and a short chorus/peer comparison through scripts/bench-compare.sh.
# Needs: cargo, node/npm, python3, kubectl, redis-server, chromium (.ci/run installs what a fresh
# machine lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shared=${CHORUS_SHARED:-$root/../shared}

. scripts/suite.sh
# Suites that skip (only outside CI: see scripts/suite.sh) write a line here; the last line of
# the run lists them, and every failure names the step it happened in.
CHORUS_SKIP_LOG=$(mktemp)
export CHORUS_SKIP_LOG
# Every step's wall time and CPU time go in a table printed at the end (also after a failure).
# CPU: user+sys of the step's processes, from this shell's /proc stat (its own time plus that of
# the children it has waited for, which includes their waited-for descendants; containers that
# podman runs under conmon are not among them). machine: the CPU the whole machine was busy
# meanwhile (/proc/stat), this run's and any other work's: well above cpu means a shared machine.
clk_tck=$(getconf CLK_TCK)
sample() { # sets t_wall (microseconds), t_cpu and t_busy (clock ticks)
  local stat f
  t_wall=${EPOCHREALTIME//[^0-9]/}
  read -r stat <"/proc/$$/stat"
  read -r -a f <<<"${stat##*) }"   # fields from the 3rd (state) on: utime is f[11]
  t_cpu=$((f[11] + f[12] + f[13] + f[14]))
  read -r -a f </proc/stat           # cpu user nice system idle iowait irq softirq steal
  t_busy=$((f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))
}
sample
run_wall=$t_wall run_cpu=$t_cpu run_busy=$t_busy
timings=() # "wall_us cpu_ticks busy_ticks step" for each finished step
current=""
step_end() {
  [ -n "$current" ] || return 0
  sample
  timings+=("$((t_wall - step_wall)) $((t_cpu - step_cpu)) $((t_busy - step_busy)) $current")
}
step() {
  step_end
  current=$*
  printf '\n==> %s\n' "$*"
  sample
  step_wall=$t_wall step_cpu=$t_cpu step_busy=$t_busy
}
print_timings() {
  sample
  timings+=("$((t_wall - run_wall)) $((t_cpu - run_cpu)) $((t_busy - run_busy)) total")
  printf '%s\n' "${timings[@]}" | awk -v hz="$clk_tck" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" '
    BEGIN { print ""; printf "%8s %8s %8s  %s\n", "wall s", "cpu s", "machine", "step" }
    { name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
      printf "%8.1f %8.1f %8.1f  %s\n", $1 / 1e6, $2 / hz, $3 / hz, name }
    END { printf "(load average at the end: %s)\n", load }'
}
finish() {
  local rc=$? skipped
  step_end
  print_timings
  skipped=$(paste -sd ';' "$CHORUS_SKIP_LOG" | sed 's/;/; /g')
  rm -f "$CHORUS_SKIP_LOG"
  if [ "$rc" != 0 ]; then printf '\nFAILED (exit %s) in step: %s\n' "$rc" "${current:-setup}" >&2; fi
  printf 'skipped suites: %s\n' "${skipped:-none}"
  # A run that ends early takes the background build below (its own process group) with it.
  if [ -n "${cp_build_pid:-}" ]; then kill -- "-$cp_build_pid" 2>/dev/null || true; fi
}
trap finish EXIT
step "tools"
for tool in cargo node npm python3 redis-server openssl kubectl; do
  command -v "$tool" >/dev/null || { echo "$tool not found: .ci/run installs what the tests need" >&2; exit 1; }
done

# The control plane of the end-to-end suite is built from Go modules on first use (about 20
# CPU-minutes; cached afterwards, docs/control-plane.md). The build starts now, in the
# background at the lowest priority, so that it takes the CPU the suites below leave idle while
# they wait on timers and sockets; the end-to-end step waits for it.
# setsid gives it a session, hence a scheduler autogroup, of its own; the kernel shares the CPU
# between autogroups before nice counts, so the autogroup's own nice is what keeps it to the
# idle CPU (at an equal share it takes half of the CPU from the Rust builds while both run).
cp_build_log=$(mktemp)
(exec setsid -w bash -c '{ echo 19 >/proc/self/autogroup; } 2>/dev/null; exec nice -n 19 "$@"' _ \
  scripts/control-plane.sh build >"$cp_build_log" 2>&1) &
cp_build_pid=$!

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust tests"
cargo test --workspace --locked

step "packaging checks (Helm 4 library, Kubernetes OpenAPI schemas, checkov)"
. scripts/venv.sh
(cd tests/packaging && CHORUS_OPERATOR_BIN=$root/target/debug/chorus-operator "$PY" -m pytest -q -p no:cacheprovider .)

step "benchmark report script"
"$PY" -m pytest -q -p no:cacheprovider tests/bench_report

step "JavaScript client tests"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
CHORUS_SERVER_BIN=$root/target/debug/chorus-server npm --prefix tests/js test

if [ ! -x /usr/bin/chromium ]; then
  cannot_run "browser tests (cross-origin pages and the chat page in Chromium)" "/usr/bin/chromium not found (.ci/run installs Debian's chromium)"
else
  step "browser tests: Chromium pages on allowed and refused origins (socket.io-client 2 and 4); the chat page across a replica restart"
  (cd tests/browser && PUPPETEER_SKIP_DOWNLOAD=true npm ci --no-audit --no-fund --loglevel=error)
  CHORUS_SERVER_BIN=$root/target/debug/chorus-server CHROMIUM_BIN=/usr/bin/chromium npm --prefix tests/browser test
fi

# A real control plane (docs/control-plane.md): built from pinned Go modules on first use (about
# 17 CPU-minutes; cached afterwards), started on loopback for the end-to-end suite, stopped after.
step "control plane: the build started at the beginning, then start (scripts/control-plane.sh)"
cp_log=$(mktemp)
cp_build_rc=0
wait "$cp_build_pid" || cp_build_rc=$?
cp_build_pid=
cat "$cp_build_log" >&2
if [ "$cp_build_rc" != 0 ]; then
  cannot_run "end-to-end suite on a real control plane" "$(grep 'control-plane:' "$cp_build_log" | tail -n 1)"
elif ! cp_env=$(scripts/control-plane.sh start --audit-policy "$root/tests/e2e/audit-policy.yaml" 2>"$cp_log"); then
  cat "$cp_log" >&2
  cannot_run "end-to-end suite on a real control plane" "$(grep 'control-plane:' "$cp_log" | tail -n 1)"
else
  step "end-to-end on the control plane: helm install, kubectl, the operator as the chart's ServiceAccount"
  (
    eval "$cp_env"
    trap '"$root/scripts/control-plane.sh" stop "$CHORUS_K8S_DIR"' EXIT
    cd tests/e2e
    CHORUS_OPERATOR_BIN=$root/target/debug/chorus-operator CHORUS_SERVER_BIN=$root/target/debug/chorus-server \
      "$PY" -m pytest -q -p no:cacheprovider .
  )
fi
rm -f "$cp_log" "$cp_build_log"

# One release build of the three binaries, in one invocation so that they share their
# dependencies: the images package chorus-server and chorus-operator from it, the benchmark
# steps run chorus-server and chorus-bench.
step "release build (chorus-server, chorus-operator, chorus-bench)"
cargo build --release --locked -p chorus-server -p chorus-operator -p chorus-bench

step "container images (podman): package both release binaries, three server containers on one Redis"
bash tests/images/run.sh

if [ ! -x "$shared/bench/run-peer.sh" ]; then
  cannot_run "benchmark smoke check and comparison" "$shared/bench/run-peer.sh not found (set CHORUS_SHARED to the shared folder)"
else
  step "benchmark protocol smoke check (three release replicas)"
  out=$(mktemp -d)/smoke.jsonl
  SERVER_NAME=chorus SERVER_DIR=$root SERVER_CMD=target/release/chorus-server SCENARIOS=smoke \
    OUT=$out NICE=0 "$shared/bench/run-peer.sh"
  node -e '
    const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n");
    const r = JSON.parse(lines.pop());
    const failed = (r.checks || []).filter((c) => !c.ok).map((c) => c.name);
    console.log(`smoke: ${r.checks ? r.checks.length - failed.length : 0} passed, ${failed.length} failed`);
    if (!r.ok) { console.error("failed checks:", failed, r.error || ""); process.exit(1); }
  ' "$out"

  step "benchmark comparison, one short scenario (both servers, both load generators)"
  out=$(mktemp -d)
  SERVERS="chorus socketio" LOADGENS="chorus-bench node" SCENARIOS=http-c1000-k10-r100 DURATION=2 \
    NICE=0 OUT=$out/compare.jsonl REPORT_DIR=$out/report SHARED_BENCH=$shared/bench scripts/bench-compare.sh
  "$PY" - "$out/compare.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
runs = {(l["server"], l["loadgen"]): l for l in lines}
want = {(s, g) for s in ("chorus", "peer-socketio") for g in ("chorus-bench", "node-loadgen")}
problems = [f"no run of {s} with {g}" for s, g in sorted(want - set(runs))]
for (s, g), l in sorted(runs.items()):
    if "error" in l:
        problems.append(f"{s} with {g}: {l['error']}")
    elif not (l.get("sent") == l.get("scheduled") and (l.get("scheduled") or 0) > 0 and l.get("lost") == 0):
        problems.append(f"{s} with {g}: sent {l.get('sent')} of {l.get('scheduled')}, lost {l.get('lost')}")
if problems:
    sys.exit("benchmark comparison: " + "; ".join(problems))
print(f"compare: {len(runs)} runs, nothing lost")
EOF
  test -s "$out/report/results.md"
fi
