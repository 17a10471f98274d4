"""The Helm chart and the manifests, checked with the real tools: Helm 4's library (lint, render,
values schema), the Kubernetes OpenAPI schemas (kubernetes-validate) for the oldest and newest
Kubernetes versions the project claims, and the CRD's own schema for the examples."""

import os
import pathlib
import subprocess

import helm_python as helm
import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

import chorus_chart as chart

ROOT = chart.ROOT
# The oldest Kubernetes the project claims (k8s-openapi's v1_33, the chart's kubeVersion) and the
# newest the schemas know.
KUBE_VERSIONS = ["1.33", "1.37"]
OPERATOR = pathlib.Path(os.environ.get("CHORUS_OPERATOR_BIN", ROOT / "target" / "debug" / "chorus-operator"))

NON_DEFAULT = {
    "replicas": 3,
    "watchNamespace": "apps",
    "image": {"repository": "registry.example/chorus-operator", "tag": "9.9.9", "pullPolicy": "Always"},
    "serverImage": {"repository": "registry.example/chorus-server", "tag": "9.9.9"},
    "redisImage": "registry.example/redis:7.4.1",
    "metrics": {"port": 9090, "service": {"enabled": True, "port": 9090},
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
    "serviceAccount": {"create": True, "name": "chorus-op", "annotations": {"a": "b"}},
    "logFormat": "text",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "imagePullSecrets": [{"name": "regcred"}],
    "networkPolicy": {"enabled": True, "metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
}


def validate_all(docs, where):
    """Every object against the Kubernetes OpenAPI schemas (strict: unknown fields fail)."""
    checked = 0
    for version in KUBE_VERSIONS:
        for path, doc in docs:
            group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
            try:
                kv.validate(doc, version, strict=True)
                checked += 1
            except kv.SchemaNotFoundError:
                # Only custom resources of other projects may lack a schema; a built-in kind
                # without one is an API that does not exist in this version.
                builtin = "." not in group or group.endswith(".k8s.io")
                assert not builtin, f"{where} {path}: {doc['kind']} {doc['apiVersion']} unknown in Kubernetes {version}"
            except kv.ValidationError as e:
                pytest.fail(f"{where} {path}: {doc['kind']} invalid for Kubernetes {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
    return checked


def by_kind(docs):
    out = {}
    for _, doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_chart_lints_clean():
    for values in (None, NON_DEFAULT):
        report = helm.lint(str(chart.CHART), values, strict=True)
        errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 3]
        assert not report.get("errors") and not errors, report


def test_default_render_is_complete_and_valid():
    docs = list(chart.documents(chart.render()))
    kinds = by_kind(docs)
    for kind in ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]:
        assert kind in kinds, f"{kind} missing: {sorted(kinds)}"
    assert "Role" not in kinds and "ServiceMonitor" not in kinds
    crd = kinds["CustomResourceDefinition"][0]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "chorus-operator:0.1.0"
    assert container["args"] == ["run"], "one replica: no leader election"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CHORUS_SERVER_IMAGE"] == "chorus-server:0.1.0"
    # The restricted Pod Security Standard and a read-only root filesystem.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Ingress to the operator's pods only on the metrics port, its one listening port.
    policy = kinds["NetworkPolicy"][0]
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    assert validate_all(docs, "default values") > 0


def test_non_default_values_render_scoped_rbac_leader_election_and_monitoring():
    docs = list(chart.documents(chart.render(NON_DEFAULT)))
    kinds = by_kind(docs)
    roles = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in kinds.get("Role", [])}
    assert ("Role", "chorus", "apps") in roles, roles
    assert ("Role", "chorus-leader-election", "chorus-system") in roles, roles
    binding = next(d for d in kinds["RoleBinding"] if d["metadata"]["namespace"] == "apps")
    assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": "chorus-op", "namespace": "chorus-system"}
    # No cluster-wide rights for the operator when it watches one namespace: only the aggregate roles.
    cluster_roles = [d["metadata"]["name"] for d in kinds.get("ClusterRole", [])]
    assert sorted(cluster_roles) == ["chorus-edit", "chorus-view"]
    assert "ClusterRoleBinding" not in kinds
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["run", "--leader-elect"]
    assert container["image"] == "registry.example/chorus-operator:9.9.9"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WATCH_NAMESPACE"] == "apps"
    assert env["CHORUS_REDIS_IMAGE"] == "registry.example/redis:7.4.1"
    assert env["CHORUS_SERVER_IMAGE"] == "registry.example/chorus-server:9.9.9"
    assert kinds["ServiceMonitor"][0]["spec"]["endpoints"][0]["interval"] == "15s"
    assert kinds["NetworkPolicy"][0]["spec"]["ingress"][0]["from"] == NON_DEFAULT["networkPolicy"]["metricsFrom"]
    validate_all(docs, "non-default values")
    no_policy = by_kind(list(chart.documents(chart.render({"networkPolicy": {"enabled": False}}))))
    assert "NetworkPolicy" not in no_policy

    no_crd = by_kind(list(chart.documents(chart.render({"crds": {"create": False}}))))
    assert "CustomResourceDefinition" not in no_crd


@pytest.mark.parametrize("values, complaint", [
    ({"replicas": 0}, "/replicas"),
    ({"replicas": "two"}, "/replicas"),
    ({"watchNamespace": "Not_A_Namespace"}, "/watchNamespace"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"logFormat": "xml"}, "/logFormat"),
    ({"replica": 2}, "replica"),
    ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
])
def test_values_schema_refuses_bad_values_with_a_clear_message(values, complaint):
    with pytest.raises(helm.HelmValuesError) as e:
        chart.render(values)
    assert complaint in str(e.value), str(e.value)


def test_install_yaml_is_the_rendered_chart():
    committed = (ROOT / "manifests" / "install.yaml").read_text()
    assert committed == chart.install_yaml(), "manifests/install.yaml is stale: run scripts/generate.sh"
    docs = [(str(i), d) for i, d in enumerate(yaml.safe_load_all(committed)) if d]
    assert by_kind(docs)["CustomResourceDefinition"]
    validate_all(docs, "manifests/install.yaml")


def example_paths():
    return sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def test_examples_match_the_crd_schema():
    crd = yaml.safe_load((ROOT / "crds" / "realtimeapps.chorus.rs.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert len(example_paths()) >= 5
    for path in example_paths():
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
                             "metadata": {"name": "x"}, "spec": {"flavor": "rails"}}, schema)


@pytest.mark.parametrize("example", example_paths(), ids=lambda p: p.name)
def test_operator_render_output_is_valid_kubernetes(example):
    assert OPERATOR.exists(), f"{OPERATOR} not built (cargo build -p chorus-operator)"
    out = subprocess.run([str(OPERATOR), "render", "-f", str(example)], capture_output=True, text=True, check=True)
    docs = [(example.name, d) for d in yaml.safe_load_all(out.stdout) if d]
    assert "Deployment" in by_kind(docs)
    assert validate_all(docs, example.name) == 2 * len(docs)
