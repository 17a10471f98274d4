"""The autoscaler objects `chorus-operator render` makes of a RealtimeApp with
`spec.autoscaling.enabled`, checked against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: an unknown field fails) at the versions test_packaging.py pins: engine HPA renders one
autoscaling/v2 HorizontalPodAutoscaler that scales the RealtimeApp itself, engine Operator (the
default) and autoscaling off render none. KEDA's ScaledObject and TriggerAuthentication are
checked against KEDA's own schemas in tests/js/keda.test.js.

The operator binary comes from CHORUS_OPERATOR_BIN (scripts/test.sh sets it); under CI=true a
missing binary fails, elsewhere the module is skipped."""

import copy
import os
import subprocess

import kubernetes_validate as kv
import pytest
import yaml

from test_packaging import KUBE_VERSIONS, OPERATOR, by_kind, validate_all

NAMESPACE = "apps"
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")


def _operator():
    if os.access(OPERATOR, os.X_OK):
        return str(OPERATOR)
    reason = f"{OPERATOR} not found (cargo build -p chorus-operator, or set CHORUS_OPERATOR_BIN)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run under CI=true: {reason}")
    pytest.skip(reason)


def app(name, autoscaling, flavor=None):
    spec = {"autoscaling": autoscaling}
    if flavor:
        spec["flavor"] = flavor
    return {"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def render(*apps):
    """Every object the operator would apply for these RealtimeApps, as (app, object)."""
    out = subprocess.run([_operator(), "render", "-f", "-"], input=yaml.safe_dump_all(apps),
                         capture_output=True, text=True)
    assert out.returncode == 0, f"chorus-operator render failed: {out.stderr.strip()}"
    return [(d["metadata"].get("labels", {}).get("app.kubernetes.io/instance", "?"), d)
            for d in yaml.safe_load_all(out.stdout) if d]


def crd_autoscaling_defaults():
    out = subprocess.run([_operator(), "crd"], capture_output=True, text=True, check=True)
    crd = yaml.safe_load(out.stdout)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["autoscaling"]["default"]


def strictly_valid(doc, where):
    """The object against the Kubernetes OpenAPI schema of every pinned version."""
    for version in KUBE_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {doc['kind']} invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


SCALE_DOWN = {"stabilizationWindowSeconds": 120, "maxReplicasPerMinute": 2}
CPU_METRIC = {"type": "Resource", "resource": {"name": "cpu",
                                               "target": {"type": "Utilization", "averageUtilization": 70}}}
CONNECTIONS_METRIC = {"type": "Pods", "pods": {"metric": {"name": "chorus_sockets_connected"},
                                               "target": {"type": "AverageValue", "averageValue": "5000"}}}

HPA_CASES = {
    # name: (spec.autoscaling, the metrics the HPA must have)
    "connections-and-cpu": (
        {"enabled": True, "engine": "HPA", "minReplicas": 2, "maxReplicas": 8,
         "targetConnectionsPerReplica": 5000, "targetCPUUtilizationPercentage": 70, "scaleDown": SCALE_DOWN},
        [CPU_METRIC, CONNECTIONS_METRIC]),
    "cpu-only": (
        {"enabled": True, "engine": "HPA", "minReplicas": 3, "maxReplicas": 20,
         "targetCPUUtilizationPercentage": 70, "scaleDown": SCALE_DOWN},
        [CPU_METRIC]),
    "connections-only": (
        {"enabled": True, "engine": "HPA", "minReplicas": 1, "maxReplicas": 5,
         "targetConnectionsPerReplica": 5000, "targetCPUUtilizationPercentage": None, "scaleDown": SCALE_DOWN},
        [CONNECTIONS_METRIC]),
}


@pytest.mark.parametrize("case", sorted(HPA_CASES))
def test_engine_hpa_renders_one_valid_hpa_scaling_the_realtimeapp(case):
    autoscaling, metrics = HPA_CASES[case]
    docs = render(app(case, autoscaling))
    kinds = by_kind(docs)
    hpas = kinds.get("HorizontalPodAutoscaler", [])
    assert len(hpas) == 1, f"{case}: {len(hpas)} HorizontalPodAutoscalers: {sorted(kinds)}"
    assert not any(k in kinds for k in KEDA_KINDS), f"{case}: KEDA objects with engine HPA: {sorted(kinds)}"
    hpa = hpas[0]
    strictly_valid(hpa, case)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == case and hpa["metadata"]["namespace"] == NAMESPACE
    spec = hpa["spec"]
    # It scales the RealtimeApp through its scale subresource, not the Deployment behind it.
    assert spec["scaleTargetRef"] == {"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp", "name": case}
    assert spec["minReplicas"] == autoscaling["minReplicas"]
    assert spec["maxReplicas"] == autoscaling["maxReplicas"]
    assert spec["metrics"] == metrics
    assert spec["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": SCALE_DOWN["stabilizationWindowSeconds"],
        "policies": [{"type": "Pods", "value": SCALE_DOWN["maxReplicasPerMinute"], "periodSeconds": 60}],
    }
    # The rest of what the app renders with autoscaling on is valid too.
    assert validate_all(docs, case) == len(KUBE_VERSIONS) * len(docs)


def test_hpa_scale_down_defaults_are_the_crds():
    defaults = crd_autoscaling_defaults()
    docs = render(app("defaults", {"enabled": True, "engine": "HPA"}))
    [hpa] = by_kind(docs)["HorizontalPodAutoscaler"]
    strictly_valid(hpa, "defaults")
    spec = hpa["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (defaults["minReplicas"], defaults["maxReplicas"])
    assert spec["metrics"] == [{"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": defaults["targetCPUUtilizationPercentage"]}}}]
    down = defaults["scaleDown"]
    assert spec["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": down["stabilizationWindowSeconds"],
        "policies": [{"type": "Pods", "value": down["maxReplicasPerMinute"], "periodSeconds": 60}],
    }


def test_the_realtimeapp_has_the_scale_subresource_an_hpa_needs():
    out = subprocess.run([_operator(), "crd"], capture_output=True, text=True, check=True)
    crd = yaml.safe_load(out.stdout)
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("chorus.rs", "RealtimeApp")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    # Resource and Pods metrics need the pods' selector from /scale.
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}


def test_the_schema_check_refuses_a_broken_hpa():
    """The same check must fail on a wrong object: an unknown field, a metric without target."""
    [hpa] = by_kind(render(app("canary", HPA_CASES["connections-and-cpu"][0])))["HorizontalPodAutoscaler"]
    unknown = copy.deepcopy(hpa)
    unknown["spec"]["metrics"][1]["pods"]["target"]["averageValues"] = "5000"
    no_target = copy.deepcopy(hpa)
    del no_target["spec"]["metrics"][1]["pods"]["target"]
    for broken in (unknown, no_target):
        for version in KUBE_VERSIONS:
            with pytest.raises(kv.ValidationError):
                kv.validate(broken, version, strict=True)


@pytest.mark.parametrize("autoscaling", [
    {"enabled": True, "engine": "Operator", "targetConnectionsPerReplica": 5000},
    {"enabled": True, "targetConnectionsPerReplica": 5000},
    {"enabled": False, "engine": "HPA", "targetConnectionsPerReplica": 5000},
    {"enabled": False, "engine": "KEDA", "targetConnectionsPerReplica": 5000},
], ids=["engine-operator", "engine-default", "off-hpa", "off-keda"])
def test_no_autoscaler_object_without_engine_hpa_or_keda(autoscaling):
    kinds = by_kind(render(app("plain", autoscaling)))
    assert "Deployment" in kinds
    for kind in ("HorizontalPodAutoscaler",) + KEDA_KINDS:
        assert kind not in kinds, f"{kind} rendered for {autoscaling}"


def test_engine_keda_renders_no_hpa():
    kinds = by_kind(render(app("keda", {"enabled": True, "engine": "KEDA", "targetConnectionsPerReplica": 5000})))
    assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds
