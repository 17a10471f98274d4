#!/usr/bin/env bash
# Runs every check and test of the project:
#   formatting and clippy; Rust unit and integration tests (real redis-server, server
#   processes, a Rust Socket.IO client, the operator against an in-memory API and the CRD on
#   shared/tools/crd-apiserver); the Helm chart and manifests checked with Helm 4's library and
#   the Kubernetes OpenAPI schemas (pinned Python tools in a venv); the JavaScript client tests
#   (socket.io-client 4 and 2); and the benchmark peers' protocol smoke check.
# Needs: cargo, node/npm, python3, kubectl, redis-server (.ci/run installs what a fresh
# machine lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shared=${CHORUS_SHARED:-$root/../shared}

step() { printf '\n==> %s\n' "$*"; }
command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust tests"
cargo test --workspace --locked

step "packaging checks (Helm 4 library, Kubernetes OpenAPI schemas)"
. scripts/venv.sh
(cd tests/packaging && CHORUS_OPERATOR_BIN=$root/target/debug/chorus-operator "$PY" -m pytest -q -p no:cacheprovider .)

step "JavaScript client tests"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
CHORUS_SERVER_BIN=$root/target/debug/chorus-server npm --prefix tests/js test

step "container images (podman): build both, three server containers on one Redis"
bash tests/images/run.sh

if [ -x "$shared/bench/run-peer.sh" ]; then
  step "benchmark protocol smoke check (three release replicas)"
  cargo build --release --locked -p chorus-server
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
else
  echo "note: $shared/bench/run-peer.sh not found; protocol smoke check skipped" >&2
fi
