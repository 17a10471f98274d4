#!/usr/bin/env bash
# Regenerates the committed generated files; tests fail when a committed copy is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p chorus-operator -- crd > crds/realtimeapps.chorus.rs.yaml
echo "wrote crds/realtimeapps.chorus.rs.yaml"
