"""The chart installed for one namespace (`watchNamespace`: a Role and RoleBinding there
instead of cluster-wide ones), the CRD already in place, and chorus-operator running as its
ServiceAccount: apps in that namespace are served, apps elsewhere are not touched, and the API
refuses none of the operator's requests.
"""

import pytest

from kube import CHART, ROOT, Operator, apply, get, helm, kubectl, refused, wait_until

RELEASE, RELEASE_NS, WATCHED, OTHER = "team", "team-system", "team-a", "team-b"


def app(name):
    return {"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp", "metadata": {"name": name}, "spec": {}}


@pytest.fixture(scope="module")
def operator(control_plane):
    # The CRD installed on its own, as with a namespaced release (it may be there already: the
    # chart keeps it on uninstall).
    kubectl("apply", "--server-side", "--force-conflicts", "-f", ROOT / "crds" / "realtimeapps.chorus.rs.yaml")
    kubectl("wait", "--for=condition=Established", "crd/realtimeapps.chorus.rs", "--timeout=60s")
    for ns in (WATCHED, OTHER):
        kubectl("create", "namespace", ns)
    helm("install", RELEASE, CHART, "-n", RELEASE_NS, "--create-namespace",
         "--set", f"watchNamespace={WATCHED}", "--set", "crds.create=false",
         "--wait", "--timeout", "180s", timeout=240)
    accounts = get("serviceaccount", ns=RELEASE_NS, selector=f"app.kubernetes.io/instance={RELEASE}")
    assert len(accounts) == 1, accounts
    # One replica: the chart grants no Lease, so the operator runs without leader election.
    op = Operator("team", accounts[0]["metadata"]["name"], RELEASE_NS, watch_ns=WATCHED, leader=False)
    yield op
    op.stop()
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False, timeout=240)
    for ns in (WATCHED, OTHER):
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_chart_grants_a_role_in_the_watched_namespace_only(operator):
    roles = get("role", ns=WATCHED, selector=f"app.kubernetes.io/instance={RELEASE}")
    assert len(roles) == 1, roles
    cluster_roles = [r["metadata"]["name"] for r in get("clusterrole", selector=f"app.kubernetes.io/instance={RELEASE}")]
    # Only the aggregated view/edit roles for users, none for the operator itself.
    assert all(n.endswith(("-view", "-edit")) for n in cluster_roles), cluster_roles


def test_an_app_in_the_watched_namespace_becomes_ready(operator):
    apply(app("chat"), ns=WATCHED)
    kubectl("wait", "--for=condition=Ready", "rtapp/chat", "-n", WATCHED, "--timeout=180s", timeout=200)
    assert get("deployment", "chat", WATCHED)["status"].get("readyReplicas") == 2


def test_an_app_elsewhere_is_left_alone(operator):
    apply(app("chat"), ns=OTHER)
    # Once the operator has reconciled something after it, it had the chance to see it.
    before = operator.metric("chorus_operator_reconciles_total")
    kubectl("annotate", "rtapp", "chat", "-n", WATCHED, "e2e.chorus.rs/poke=1", "--overwrite")
    wait_until("a reconcile in the watched namespace", lambda: operator.metric("chorus_operator_reconciles_total") > before)
    other = get("realtimeapp", "chat", OTHER)
    assert not other.get("status"), other.get("status")
    assert get("deployment", "chat", OTHER) is None


def test_no_request_of_the_operator_was_refused(control_plane, operator):
    found = refused(control_plane, RELEASE_NS)
    assert not found, "\n".join(found)
