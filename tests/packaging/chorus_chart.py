"""Render the chorus Helm chart with Helm 4's own library (helm-python-sdk).

`python3 tests/packaging/chorus_chart.py` prints manifests/install.yaml: the chart rendered with
default values (release `chorus`, namespace `chorus-system`), ready for `kubectl apply --server-side`.
"""

import json
import pathlib
import sys

import helm_python as helm
import yaml
from helm_python import _native

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "chorus"
INSTALL = ROOT / "manifests" / "install.yaml"
RELEASE = "chorus"
NAMESPACE = "chorus-system"


def render(values=None, *, name=RELEASE, namespace=NAMESPACE, kube_version=None, api_versions=None):
    """Template path -> rendered text, as `helm template` gives it (NOTES.txt included).

    Chart.render() does not expose the kube version or API versions, so this calls the same
    native entry point with those options (helm-python-sdk is pinned for that reason).
    """
    opts = {"name": name, "namespace": namespace, "strict": True}
    if kube_version:
        opts["kube_version"] = kube_version
    if api_versions:
        opts["api_versions"] = list(api_versions)
    with helm.Chart.load(str(CHART)) as chart:
        out = _native.call_string(
            "helm_render",
            chart._raw(),
            None if values is None else json.dumps(values),
            json.dumps(opts),
        )
    return json.loads(out)


def documents(manifests):
    """(template path, object) for every non-empty YAML document, in a stable order."""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def install_yaml():
    manifests = render()
    parts = [
        "# chorus-operator and the RealtimeApp CRD, rendered from charts/chorus with default values\n"
        f"# (release {RELEASE}, namespace {NAMESPACE}) by tests/packaging/chorus_chart.py; do not edit.\n"
        f"# kubectl create namespace {NAMESPACE} && kubectl apply --server-side -f manifests/install.yaml\n"
    ]
    for path, text in sorted(manifests.items(), key=lambda kv: (not kv[0].endswith("crd.yaml"), kv[0])):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(install_yaml())
