#!/usr/bin/env bash
# Regenerates the committed generated files; tests fail when a committed copy is stale:
#   crds/realtimeapps.chorus.rs.yaml     chorus-operator crd
#   charts/chorus/templates/crd.yaml     the same CRD as a chart template
#   manifests/install.yaml               the chart rendered with default values (Helm's library)
#   operator/tests/api-access.json       every API request the operator's tests saw it make
#                                        (tests/packaging/test_rbac.py checks the chart grants it)
set -euo pipefail
cd "$(dirname "$0")/.."
op() { cargo run -q -p chorus-operator -- "$@"; }
op crd > crds/realtimeapps.chorus.rs.yaml
op crd --helm-template > charts/chorus/templates/crd.yaml
CHORUS_REGENERATE=1 cargo test -q -p chorus-operator --locked --test api_access >/dev/null
. scripts/venv.sh
"$PY" tests/packaging/chorus_chart.py > manifests/install.yaml
# The benchmark report of the committed results (the same arguments are in
# tests/bench_report/test_bench_report.py, which checks the committed copy is current).
rm -rf docs/benchmarks
python3 scripts/bench-report.py --baseline chorus --out-dir docs/benchmarks \
  --title "chorus-server against Node Socket.IO and Sails, and before/after (2026-11-26)" \
  bench/results/2026-11-26-compare.jsonl >/dev/null
echo "wrote crds/realtimeapps.chorus.rs.yaml, charts/chorus/templates/crd.yaml, operator/tests/api-access.json, manifests/install.yaml, docs/benchmarks/"
