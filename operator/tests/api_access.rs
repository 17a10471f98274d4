//! What the operator asks of the API server, by verb, API group, resource and scope, over a
//! scenario that takes it down every path (children created, changed and deleted, Secrets
//! generated and read, a missing Secret, a name in use, status, events, the leader Lease), in
//! both modes the chart installs it in: cluster-wide, and one namespace (--watch-namespace).
//! tests/api-access.json is that list; tests/packaging/test_rbac.py checks the chart's RBAC
//! grants each entry, and nothing else. `CHORUS_REGENERATE=1` rewrites the list.

mod support;

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};
use support::{
    FakeApi,
    access::{self, Access},
    add_app, app_path, condition, eventually, fleet,
    running::{Running, config},
    secret_path,
};

const NS: &str = "team";
const WAIT: Duration = Duration::from_secs(10);

fn app(api: &FakeApi, name: &str) -> Value {
    api.get(&app_path(NS, name)).unwrap_or_default()
}

/// Changes the app's spec and waits until its status is for that generation, then for `ok`.
async fn change(
    api: &FakeApi,
    what: &str,
    f: impl FnOnce(&mut Value),
    ok: impl Fn(&FakeApi) -> bool,
) {
    api.edit(&app_path(NS, "chat"), |a| f(&mut a["spec"]));
    let generation = app(api, "chat")["metadata"]["generation"].clone();
    eventually(what, WAIT, || {
        app(api, "chat")["status"]["observedGeneration"] == generation && ok(api)
    })
    .await;
}

fn exists(api: &FakeApi, path: &str) -> bool {
    api.get(path).is_some()
}

/// The scenario, with the operator configured by `watch_namespace`; returns the API.
async fn scenario(watch_namespace: Option<&str>) -> FakeApi {
    let api = FakeApi::default();
    let mut cfg = config(0, true);
    cfg.watch_namespace = watch_namespace.map(str::to_owned);
    let running = Running::start(&api, cfg);

    add_app(&api, NS, "chat", json!({}));
    let kubelet = fleet::spawn_kubelet(api.clone());
    eventually("chat Ready", WAIT, || {
        condition(&app(&api, "chat"), "Ready")["status"] == json!("True")
    })
    .await;
    kubelet.abort();

    let degraded = |api: &FakeApi| condition(&app(api, "chat"), "Degraded")["reason"].clone();
    change(
        &api,
        "a missing Secret reported",
        |s| s["auth"] = json!({"jwtSecretRef": {"name": "team-jwt", "key": "key"}}),
        |api| degraded(api) == json!("SecretNotFound"),
    )
    .await;
    api.create(
        &secret_path(NS, "team-jwt"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "team-jwt", "namespace": NS}, "data": {"key": "eA=="}}),
    );
    change(
        &api,
        "the Secret found, autoscaling on with an HPA",
        |s| s["autoscaling"] = json!({"enabled": true, "engine": "HPA"}),
        |api| degraded(api) == json!("AsExpected") && exists(api, &hpa_path()),
    )
    .await;
    // The Operator engine: it lists the pods, reads their CPU from metrics.k8s.io, marks the
    // replica to remove, and scales down through /scale (at 10 % of a 70 % target, 1 replica).
    api.serve("/apis/metrics.k8s.io/v1beta1", &[("pods", "PodMetrics")]);
    for pod in ["chat-a", "chat-b"] {
        api.create(
            &format!("/api/v1/namespaces/{NS}/pods/{pod}"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod, "namespace": NS,
                                "labels": {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "server"}},
                   "spec": {"containers": [{"name": "server", "image": "i",
                                            "resources": {"requests": {"cpu": "100m"}}}]},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        api.create(
            &format!("/apis/metrics.k8s.io/v1beta1/namespaces/{NS}/pods/{pod}"),
            json!({"apiVersion": "metrics.k8s.io/v1beta1", "kind": "PodMetrics",
                   "metadata": {"name": pod, "namespace": NS,
                                "labels": {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "server"}},
                   "containers": [{"name": "server", "usage": {"cpu": "10m"}}]}),
        );
    }
    // (The scale-down is a new generation: wait for the status of the app's latest.)
    api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["autoscaling"] = json!({"enabled": true, "minReplicas": 1,
            "scaleDown": {"stabilizationWindowSeconds": 0, "maxReplicasPerMinute": 5}})
    });
    eventually("the Operator engine scaled down", WAIT, || {
        let a = app(&api, "chat");
        a["spec"]["replicas"] == json!(1)
            && a["status"]["observedGeneration"] == a["metadata"]["generation"]
    })
    .await;
    let autoscaling =
        |api: &FakeApi| condition(&app(api, "chat"), "AutoscalingReady")["reason"].clone();
    change(
        &api,
        "KEDA missing",
        |s| {
            s["autoscaling"] =
                json!({"enabled": true, "engine": "KEDA", "targetConnectionsPerReplica": 100})
        },
        |api| autoscaling(api) == json!("EngineMissing") && !exists(api, &hpa_path()),
    )
    .await;
    api.serve(
        "/apis/keda.sh/v1alpha1",
        &[
            ("scaledobjects", "ScaledObject"),
            ("triggerauthentications", "TriggerAuthentication"),
        ],
    );
    change(
        &api,
        "KEDA installed",
        |s| s["autoscaling"]["minReplicas"] = json!(1),
        |api| autoscaling(api) == json!("Active") && exists(api, &keda_path("scaledobjects")),
    )
    .await;
    change(
        &api,
        "the HPA, PDB, NetworkPolicy and managed Redis deleted",
        |s| {
            s["autoscaling"] = json!({"enabled": false});
            s["replicas"] = json!(1);
            s["redis"] = json!({"mode": "External", "external": {"host": "r.example"}});
        },
        |api| {
            !exists(api, &hpa_path())
                && !exists(api, &keda_path("scaledobjects"))
                && !exists(api, &keda_path("triggerauthentications"))
                && !api.paths().iter().any(|p| {
                    p.ends_with("/poddisruptionbudgets/chat")
                        || p.ends_with("/networkpolicies/chat-redis")
                        || p.ends_with("/statefulsets/chat-redis")
                })
        },
    )
    .await;

    // A child's name taken by someone else's object.
    api.create(
        &format!("/api/v1/namespaces/{NS}/services/taken"),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "taken", "namespace": NS}, "spec": {}}),
    );
    add_app(&api, NS, "taken", json!({}));
    eventually("NameInUse", WAIT, || {
        condition(&app(&api, "taken"), "Degraded")["reason"] == json!("NameInUse")
    })
    .await;

    running.shut_down().await
}

fn keda_path(resource: &str) -> String {
    format!("/apis/keda.sh/v1alpha1/namespaces/{NS}/{resource}/chat")
}

fn hpa_path() -> String {
    format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/chat")
}

#[tokio::test]
async fn the_committed_list_is_what_the_operator_asks_for_in_both_modes() {
    let cluster = scenario(None).await;
    let scoped = scenario(Some(NS)).await;

    // Scoped to one namespace, it reaches no other, and nothing cluster-wide: the chart
    // then grants it a Role there (and one for the Lease in its own namespace).
    let outside: Vec<_> = scoped
        .requests()
        .into_iter()
        .filter(|r| !matches!(r.namespace.as_deref(), Some(NS | "ops")))
        .collect();
    assert!(outside.is_empty(), "{outside:#?}");

    let used: BTreeSet<Access> = access::used(&cluster)
        .union(&access::used(&scoped))
        .cloned()
        .collect();
    let text = access::render(&used);
    let path = access::committed_path();
    if std::env::var("CHORUS_REGENERATE").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &text).expect("write tests/api-access.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "tests/api-access.json is stale: run `CHORUS_REGENERATE=1 cargo test -p chorus-operator \
         --test api_access`, then make charts/chorus/templates/rbac.yaml grant exactly that \
         (tests/packaging/test_rbac.py checks). Now:\n{text}"
    );
}
