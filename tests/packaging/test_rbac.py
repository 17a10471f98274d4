"""The chart's RBAC against what the operator asks of the API server.

operator/tests/api-access.json lists every kind of request the operator makes: verb, API group,
resource, subresource, and whether it names a namespace (a list or watch across all namespaces
does not). The operator's own tests record it against their in-memory API: tests/api_access.rs runs
the controller down every path in both modes and fails when the committed list is stale, and every
other controller and reconcile test fails if the operator asks for something the list lacks. Here
the chart, rendered with Helm's library in both of its modes, must grant each entry where the
operator makes it, and grant nothing that no entry needs."""

import json

import pytest

import chorus_chart as chart

ACCESS = chart.ROOT / "operator" / "tests" / "api-access.json"
LEASES = ("coordination.k8s.io", "leases")
WATCHED = "apps"
# Leader election on (more than one replica), so that its Role renders too.
MODES = {
    "cluster-wide": {"replicas": 2},
    "watchNamespace": {"replicas": 2, "watchNamespace": WATCHED},
}


def accesses():
    assert ACCESS.exists(), f"{ACCESS} is missing (the operator's tests write it: CHORUS_REGENERATE=1)"
    items = json.loads(ACCESS.read_text())
    assert items, f"{ACCESS} is empty"
    return items


def resource(a):
    return a["resource"] + ("/" + a["subresource"] if a["subresource"] else "")


def scope_of(a, watch_namespace):
    """Where the operator makes the request: a namespace, None for anywhere (a cluster-wide
    grant), or "skip" for a request the operator does not make in this mode."""
    if (a["apiGroup"], a["resource"]) == LEASES:
        return chart.NAMESPACE  # the Lease lives in the operator's own namespace
    if watch_namespace:
        # The scoped operator makes no request across namespaces (tests/api_access.rs asserts it).
        return watch_namespace if a["namespaced"] else "skip"
    return None  # RealtimeApps may be in any namespace


def operator_rules(docs):
    """{scope: [rule]}: the rules bound to the operator's ServiceAccount, by where they apply
    (a namespace, or None for a ClusterRoleBinding)."""
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for _, d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = {}
    for _, binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": chart.NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        out.setdefault(scope, []).extend(role["rules"])
    return out


def grants(rule):
    """(group, resource, verb) of each grant of a rule: no wildcards, no resourceNames."""
    for key in ("apiGroups", "resources", "verbs"):
        assert "*" not in rule[key], f"wildcard in {rule}"
    assert not rule.get("resourceNames"), f"the operator's requests name any object: {rule}"
    for group in rule["apiGroups"]:
        for res in rule["resources"]:
            for verb in rule["verbs"]:
                yield (group, res, verb)


def needed_and_granted(values):
    docs = list(chart.documents(chart.render(values)))
    rules = operator_rules(docs)
    granted = {scope: {g for rule in rs for g in grants(rule)} for scope, rs in rules.items()}
    needed = {}
    for a in accesses():
        scope = scope_of(a, values.get("watchNamespace"))
        if scope != "skip":
            needed.setdefault(scope, set()).add((a["apiGroup"], resource(a), a["verb"]))
    return needed, granted


def beyond(these, those):
    """{scope: [(group, resource, verb)]} of what `these` has and `those` lacks, per scope."""
    out = {scope: sorted(have - those.get(scope, set())) for scope, have in these.items()}
    return {scope: gap for scope, gap in out.items() if gap}


@pytest.mark.parametrize("mode", MODES)
def test_the_chart_grants_every_request_the_operator_makes(mode):
    needed, granted = needed_and_granted(MODES[mode])
    missing = beyond(needed, granted)
    assert not missing, f"{mode}: not granted (scope: [(group, resource, verb)]): {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_the_chart_grants_nothing_the_operator_does_not_use(mode):
    needed, granted = needed_and_granted(MODES[mode])
    extra = beyond(granted, needed)
    assert not extra, f"{mode}: granted but never used (scope: [(group, resource, verb)]): {extra}"


@pytest.mark.parametrize("mode", MODES)
def test_the_operator_cannot_list_update_or_delete_a_secret(mode):
    # It creates the generated Secrets, reads by name the ones its pods use, and applies the
    # REDIS_URL Secret it derives from them (patch); listing or watching would expose every
    # Secret of the namespaces, and it never updates or deletes one.
    _, granted = needed_and_granted(MODES[mode])
    secrets = {verb for scope in granted.values() for group, res, verb in scope
               if (group, res) == ("", "secrets")}
    assert secrets == {"get", "create", "patch"}, secrets
