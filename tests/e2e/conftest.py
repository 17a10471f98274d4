"""The control plane under the end-to-end suite (docs/control-plane.md).

scripts/test.sh starts it and exports CHORUS_K8S_DIR, KUBECONFIG and PATH before pytest runs;
run alone, the suite starts one itself (with the audit policy below) and stops it at the end.
"""

import os
import pathlib

import pytest

from kube import ROOT, run

AUDIT_POLICY = pathlib.Path(__file__).with_name("audit-policy.yaml")


@pytest.fixture(scope="session", autouse=True)
def control_plane():
    if os.environ.get("CHORUS_K8S_DIR"):
        yield pathlib.Path(os.environ["CHORUS_K8S_DIR"])
        return
    script = ROOT / "scripts" / "control-plane.sh"
    # The exports as a shell reads them (PATH is extended, not replaced).
    env = run("bash", "-c", f'eval "$("{script}" start --audit-policy "{AUDIT_POLICY}")" && env -0', timeout=3600)
    for entry in env.split("\0"):
        name, sep, value = entry.partition("=")
        if sep and (name in ("KUBECONFIG", "PATH") or name.startswith("CHORUS_K8S_")):
            os.environ[name] = value
    try:
        yield pathlib.Path(os.environ["CHORUS_K8S_DIR"])
    finally:
        run(script, "stop", os.environ["CHORUS_K8S_DIR"], check=False)
