"""The chart installed cluster-wide with `helm`, chorus-operator running as its ServiceAccount,
and what users do with kubectl: apply the examples, wait for Ready, scale, roll out, change
the Redis, autoscale with each engine, delete; two operators and their Lease; `helm upgrade`.
The tests run in order and build on each other (one cluster, one release).
"""

import json

import pytest
import yaml

from kube import (
    CHART,
    refused,
    EXAMPLES,
    Operator,
    Server,
    Sockets,
    Watch,
    apply,
    condition,
    free_port,
    get,
    helm,
    kubectl,
    owned_by,
    run,
    secret_value,
    wait_until,
)

RELEASE, RELEASE_NS, NS = "chorus", "chorus-system", "e2e"
INSTANCE = "app.kubernetes.io/instance"
SERVER = "app.kubernetes.io/component=server"
# What an app owns, directly or through its Deployment and StatefulSet.
CHILD_KINDS = [
    "deployments", "replicasets", "statefulsets", "services", "secrets",
    "poddisruptionbudgets", "horizontalpodautoscalers", "networkpolicies",
]
# One version of KEDA's CRDs, from its Go module.
KEDA_MODULE = "github.com/kedacore/keda/v2@v2.21.0"

state = {}


def rtapp(name, ns=NS, fields=False):
    return get("realtimeapp", name, ns, fields=fields)


def wait_ready(name, ns=NS):
    kubectl("wait", "--for=condition=Ready", f"rtapp/{name}", "-n", ns, "--timeout=180s", timeout=200)


def server_deployment_ready(name, replicas, ns=NS):
    def check():
        d = get("deployment", name, ns)
        s = (d or {}).get("status", {})
        return (
            d
            and d["spec"]["replicas"] == replicas
            and s.get("observedGeneration") == d["metadata"]["generation"]
            and s.get("readyReplicas") == replicas
            and s.get("updatedReplicas") == replicas
            and s.get("replicas") == replicas
        )

    wait_until(f"Deployment {ns}/{name} has {replicas} ready, updated replicas", check)


def poke(ns=NS):
    """Makes the operator reconcile every app of `ns` once more (a metadata change) and waits
    until it has."""
    op = state["leader"]
    apps = len(get("realtimeapp", ns=ns))
    before = op.metric("chorus_operator_reconciles_total")
    state["pokes"] = state.get("pokes", 0) + 1
    kubectl("annotate", "rtapp", "--all", "-n", ns, f"e2e.chorus.rs/poke={state['pokes']}", "--overwrite")
    wait_until(
        f"{apps} more reconciles",
        lambda: op.metric("chorus_operator_reconciles_total") >= before + apps,
    )


def managers_of_replicas(obj):
    """(manager, subresource) of each managedFields entry that owns spec.replicas."""
    return {
        (m["manager"], m.get("subresource", ""))
        for m in obj["metadata"].get("managedFields", [])
        if "f:replicas" in m.get("fieldsV1", {}).get("f:spec", {})
    }


@pytest.fixture(scope="module", autouse=True)
def release(control_plane):
    # Two chart replicas: the chart then grants the leader-election Lease.
    helm("install", RELEASE, CHART, "-n", RELEASE_NS, "--create-namespace",
         "--set", "replicas=2", "--wait", "--timeout", "180s", timeout=240)
    accounts = get("serviceaccount", ns=RELEASE_NS, selector=f"{INSTANCE}={RELEASE}")
    assert len(accounts) == 1, f"one ServiceAccount from the chart: {accounts}"
    state["sa"] = accounts[0]["metadata"]["name"]
    kubectl("create", "namespace", NS)
    yield
    for key in ("sockets", "server"):
        if key in state:
            state[key].stop()
    for op in state.get("operators", []):
        op.stop()
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False, timeout=240)
    kubectl("delete", "namespace", NS, "--wait=false", check=False)


def start_operator(identity):
    op = Operator(identity, state["sa"], RELEASE_NS)
    state.setdefault("operators", []).append(op)
    return op


def test_helm_install_makes_the_operator_available():
    status = json.loads(helm("status", RELEASE, "-n", RELEASE_NS, "-o", "json"))
    assert status["info"]["status"] == "deployed"
    deps = get("deployment", ns=RELEASE_NS, selector=f"{INSTANCE}={RELEASE}")
    assert len(deps) == 1
    available = condition(deps[0], "Available")
    assert available and available["status"] == "True", deps[0]["status"]
    assert deps[0]["status"].get("availableReplicas") == 2
    crd = get("crd", "realtimeapps.chorus.rs")
    assert condition(crd, "Established")["status"] == "True"
    state["leader"] = start_operator("op-a")


def test_every_example_becomes_ready_except_the_one_missing_its_secrets():
    names = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kubectl("apply", "-n", NS, "-f", path)
        names += [d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text()) if d]
    assert "chat" in names and "notifications" in names, names
    for name in names:
        if name != "notifications":
            wait_ready(name)
    # The real controllers made ReplicaSets and pods, and kwok's nodes run them.
    rs = get("replicaset", ns=NS, selector=f"{INSTANCE}=chat,{SERVER}")
    assert len(rs) == 1 and rs[0]["status"].get("readyReplicas") == 2, rs
    pods = get("pod", ns=NS, selector=f"{INSTANCE}=chat,{SERVER}")
    assert len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods), pods
    redis = get("statefulset", "chat-redis", NS)
    assert redis["status"].get("readyReplicas") == 1
    # kubectl get shows the columns.
    table = kubectl("get", "rtapp", "-n", NS).splitlines()
    assert table[0].split() == ["NAME", "FLAVOR", "DESIRED", "READY", "REDIS", "STATUS", "AGE"], table[0]
    chat = next(line.split() for line in table if line.startswith("chat "))
    assert chat[1:6] == ["chorus", "2", "2", "Managed", "True"], chat


def test_a_missing_secret_shows_ready_false_with_its_reason_until_it_exists():
    def not_ready():
        ready = condition(rtapp("notifications"), "Ready")
        return ready if ready and ready["status"] == "False" and ready["reason"] == "SecretNotFound" else None

    ready = wait_until("notifications Ready=False/SecretNotFound", not_ready)
    missing = {"shared-redis": "password", "notifications-api": "token", "notifications-jwt": "hs256-key"}
    assert any(name in ready["message"] for name in missing), ready
    for name, key in missing.items():
        kubectl("create", "secret", "generic", name, "-n", NS, f"--from-literal={key}=e2e-{name}-value")
    wait_ready("notifications")


def test_kubectl_scale_sets_the_replicas():
    kubectl("scale", "rtapp/chat", "-n", NS, "--replicas=3")
    server_deployment_ready("chat", 3)
    wait_until("chat reports 3 ready", lambda: rtapp("chat")["status"].get("readyReplicas") == 3)
    row = next(line.split() for line in kubectl("get", "rtapp", "chat", "-n", NS).splitlines()[1:])
    assert row[2:4] == ["3", "3"], row


def test_a_spec_change_rolls_out_one_surge_pod_at_a_time():
    before = get("deployment", "chat", NS)
    strategy = before["spec"]["strategy"]["rollingUpdate"]
    assert (strategy["maxSurge"], strategy["maxUnavailable"]) == (1, 0), strategy
    watch = Watch("replicaset", "-n", NS, "-l", f"{INSTANCE}=chat,{SERVER}")
    wait_until("the watch lists the current ReplicaSet", lambda: watch.events)
    kubectl("patch", "rtapp", "chat", "-n", NS, "--type=merge",
            "-p", json.dumps({"spec": {"env": [{"name": "E2E_ROLLOUT", "value": "1"}]}}))
    wait_until("a new ReplicaSet", lambda: len(get("replicaset", ns=NS, selector=f"{INSTANCE}=chat,{SERVER}")) == 2)
    server_deployment_ready("chat", 3)
    wait_until("the old ReplicaSet at 0", lambda: all(
        r["status"].get("replicas", 0) == 0 for r in get("replicaset", ns=NS, selector=f"{INSTANCE}=chat,{SERVER}")
        if r["spec"]["replicas"] == 0) and any(r["spec"]["replicas"] == 0 for r in get("replicaset", ns=NS, selector=f"{INSTANCE}=chat,{SERVER}")))
    events = watch.stop()
    # Replay the ReplicaSets' desired sizes event by event.
    sizes, steps, most = {}, {}, 0
    for e in events:
        o = e["object"]
        name, n = o["metadata"]["name"], o["spec"]["replicas"]
        if sizes.get(name) != n:
            steps.setdefault(name, []).append(n)
        sizes[name] = n
        most = max(most, sum(sizes.values()))
    assert most <= 4, f"at most one surge pod over 3: {steps}"
    new = [name for name, s in steps.items() if s[0] != 3]
    old = [name for name, s in steps.items() if s[0] == 3]
    assert len(new) == 1 and len(old) == 1, steps
    assert steps[new[0]][-3:] == [1, 2, 3], f"the new ReplicaSet grew one at a time: {steps}"
    assert steps[old[0]] == [3, 2, 1, 0], f"the old one shrank one at a time: {steps}"
    wait_ready("chat")


def test_two_redis_buses_and_back_to_one():
    def buses(n):
        def check():
            sts = get("statefulset", "chat-redis", NS)
            url = secret_value(NS, "chat-redis-url", "url") if get("secret", "chat-redis-url", NS) else ""
            app = rtapp("chat")
            redis = app.get("status", {}).get("redis", {})
            return (
                sts and sts["spec"]["replicas"] == n and sts["status"].get("readyReplicas") == n
                and url.count("redis://") == n
                and redis.get("buses") == n and redis.get("readyBuses") == n
                and condition(app, "Ready")["status"] == "True"
            )
        return check

    kubectl("patch", "rtapp", "chat", "-n", NS, "--type=merge", "-p", '{"spec":{"redis":{"replicas":2}}}')
    wait_until("two Redis buses, both ready, in REDIS_URL and status", buses(2))
    kubectl("patch", "rtapp", "chat", "-n", NS, "--type=merge", "-p", '{"spec":{"redis":{"replicas":1}}}')
    wait_until("one Redis bus again", buses(1))


def test_the_hpa_scales_the_realtimeapp_through_its_scale_subresource():
    apply({
        "apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
        "metadata": {"name": "hpa-app"},
        "spec": {"replicas": 1, "autoscaling": {
            "enabled": True, "engine": "HPA", "minReplicas": 2, "maxReplicas": 4,
            "targetConnectionsPerReplica": 100, "targetCPUUtilizationPercentage": 0}},
    }, ns=NS)
    hpa = wait_until("the HPA hpa-app", lambda: get("hpa", "hpa-app", NS))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp", "name": "hpa-app"}
    # Below its minimum, the HPA controller raises the RealtimeApp through /scale.
    wait_until("the HPA controller read the RealtimeApp's scale", lambda: (
        (c := condition(get("hpa", "hpa-app", NS), "AbleToScale")) and c["status"] == "True"))
    app = wait_until("hpa-app at 2 replicas", lambda: (a := rtapp("hpa-app", fields=True)) and a["spec"]["replicas"] == 2 and a)
    assert ("kube-controller-manager", "scale") in managers_of_replicas(app), app["metadata"]["managedFields"]
    server_deployment_ready("hpa-app", 2)
    # The HPA has no connection metric here (no custom metrics API): the app says so.
    active = condition(get("hpa", "hpa-app", NS), "ScalingActive")
    def reported():
        c = condition(rtapp("hpa-app"), "AutoscalingReady")
        if active and active["status"] == "False":
            return c and c["status"] == "False" and c["reason"] == "EngineNotScaling" and c
        return c and c["status"] == "True" and c
    wait_until(f"AutoscalingReady follows the HPA's ScalingActive {active}", reported)


def keda_crds():
    """KEDA's CRD files, from its Go module (downloaded once into the module cache)."""
    done = run("go", "mod", "download", "-json", KEDA_MODULE, timeout=600)
    root = json.loads(done)["Dir"]
    return [f"{root}/config/crd/bases/keda.sh_{kind}.yaml" for kind in ("scaledobjects", "triggerauthentications")]


def test_the_keda_engine_reports_keda_missing_then_applies_its_objects():
    apply({
        "apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
        "metadata": {"name": "keda-app"},
        "spec": {"autoscaling": {
            "enabled": True, "engine": "KEDA", "minReplicas": 1, "maxReplicas": 3,
            "targetConnectionsPerReplica": 100, "targetCPUUtilizationPercentage": 50}},
    }, ns=NS)
    wait_until("keda-app AutoscalingReady=False/EngineMissing", lambda: (
        (c := condition(rtapp("keda-app"), "AutoscalingReady")) and c["status"] == "False"
        and c["reason"] == "EngineMissing"))
    wait_ready("keda-app")
    for path in keda_crds():
        kubectl("apply", "--server-side", "-f", path)
    kubectl("wait", "--for=condition=Established", "crd/scaledobjects.keda.sh",
            "crd/triggerauthentications.keda.sh", "--timeout=60s")
    poke()
    so = wait_until("the ScaledObject keda-app", lambda: get("scaledobject", "keda-app", NS))
    assert so["spec"]["scaleTargetRef"]["kind"] == "RealtimeApp", so["spec"]
    assert get("triggerauthentication", ns=NS), "a TriggerAuthentication"
    wait_until("AutoscalingReady no longer EngineMissing", lambda: (
        (c := condition(rtapp("keda-app"), "AutoscalingReady")) and c["reason"] != "EngineMissing"))


def test_the_operator_engine_scales_on_real_connections():
    port = free_port()
    apply({
        "apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
        "metadata": {"name": "op-app"},
        "spec": {"replicas": 1, "service": {"port": port},
                 "autoscaling": {
                     "enabled": True, "engine": "Operator", "minReplicas": 1, "maxReplicas": 3,
                     "targetConnectionsPerReplica": 10, "targetCPUUtilizationPercentage": 0}},
    }, ns=NS)
    wait_ready("op-app")
    token = wait_until("op-app's API token", lambda: get("secret", "op-app-api-token", NS)
                       and secret_value(NS, "op-app-api-token", "token"))
    # Where the test-only readings address points for this app: a real server holding 25.
    state["server"] = Server(port, token, "op-app-e2e")
    state["sockets"] = Sockets(f"http://127.0.0.1:{port}", 25)
    app = wait_until("op-app scaled to 3 for 25 connections at 10 each", lambda: (
        (a := rtapp("op-app", fields=True))["spec"]["replicas"] == 3
        and a.get("status", {}).get("autoscaling", {}).get("connections") == 25 and a))
    assert app["status"]["autoscaling"]["desiredReplicas"] == 3, app["status"]
    assert ("chorus-autoscaler", "scale") in managers_of_replicas(app), app["metadata"]["managedFields"]
    server_deployment_ready("op-app", 3)
    assert condition(app, "AutoscalingReady")["status"] == "True"


def generations(ns=NS):
    """metadata.generation of every app and every child that has one (Services and Secrets
    have none: their resourceVersion, which only a write moves)."""
    seen = {}
    for kind in ["realtimeapps", *CHILD_KINDS, "scaledobjects", "triggerauthentications"]:
        for o in get(kind, ns=ns) or []:
            key = f"{o['kind']}/{o['metadata']['name']}"
            if o["kind"] in ("Service", "Secret", "NetworkPolicy", "TriggerAuthentication"):
                seen[key] = o["metadata"]["resourceVersion"]
            else:
                seen[key] = o["metadata"].get("generation")
    return seen


def test_ten_reconcile_passes_move_no_generation():
    # The HPA holds hpa-app at 2, the autoscaler holds op-app at 3, kubectl set chat to 3.
    before = generations()
    for _ in range(10):
        poke()
    after = generations()
    moved = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not moved, f"written without a spec change: {moved}"


def test_deleting_an_app_lets_the_garbage_collector_remove_every_child():
    # A Service named like gc-app's own, made by someone else: never adopted, never deleted.
    kubectl("create", "service", "clusterip", "gc-app", "-n", NS, "--tcp=80:3000")
    foreign = get("service", "gc-app", NS)
    apply({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
           "metadata": {"name": "gc-app"}, "spec": {}}, ns=NS)
    wait_until("gc-app reports its Service's name in use", lambda: any(
        c.get("reason") == "NameInUse" for c in rtapp("gc-app").get("status", {}).get("conditions", [])))
    wait_until("gc-app's Deployment", lambda: get("deployment", "gc-app", NS))
    for name in ("gc-app", "chat"):
        uid = rtapp(name)["metadata"]["uid"]
        assert owned_by(uid, CHILD_KINDS, NS), f"{name} owns children"
        kubectl("delete", "rtapp", name, "-n", NS, "--wait=true", timeout=200)
        wait_until(f"every child of {name} deleted", lambda: not owned_by(uid, CHILD_KINDS, NS)
                   and not get("pod", ns=NS, selector=f"{INSTANCE}={name}"))
    still = get("service", "gc-app", NS)
    assert still and still["metadata"]["uid"] == foreign["metadata"]["uid"], "the foreign Service is left alone"
    assert still["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
    assert not still["metadata"].get("ownerReferences")


def lease_holder():
    lease = get("lease", "chorus-operator-leader", RELEASE_NS)
    return lease and lease["spec"].get("holderIdentity")


def test_a_second_operator_takes_over_when_the_leader_stops():
    assert lease_holder() == "op-a"
    standby = start_operator("op-b")
    assert lease_holder() == "op-a", "the standby does not take a held Lease"
    state["leader"].stop()
    wait_until("op-b holds the Lease", lambda: lease_holder() == "op-b", timeout=60)
    state["leader"] = standby
    apply({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
           "metadata": {"name": "after-takeover"}, "spec": {}}, ns=NS)
    wait_ready("after-takeover")


def release_objects():
    """generation (or resourceVersion where there is none) of every object of the release."""
    manifest = helm("get", "manifest", RELEASE, "-n", RELEASE_NS)
    listed = json.loads(kubectl("get", "-n", RELEASE_NS, "-f", "-", "-o", "json", input=manifest))
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["metadata"].get("generation") or o["metadata"]["resourceVersion"]
        for o in listed["items"]
    }


def test_helm_upgrade_with_the_same_values_rewrites_nothing():
    release_before, children_before = release_objects(), generations()
    writes = state["leader"].metric("chorus_operator_writes_total")
    helm("upgrade", RELEASE, CHART, "-n", RELEASE_NS, "--reuse-values", "--wait", "--timeout", "180s", timeout=240)
    poke()
    assert release_objects() == release_before, "the release's objects were rewritten"
    assert generations() == children_before, "the apps' children were rewritten"
    assert state["leader"].metric("chorus_operator_writes_total") == writes


def test_no_request_of_the_operator_was_refused(control_plane):
    found = refused(control_plane, RELEASE_NS)
    assert not found, "\n".join(found)
