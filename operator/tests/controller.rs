//! The controller itself (watches, owned children, shutdown) against the in-memory API.

mod support;

use std::time::Duration;

use chorus_operator::{
    controller::{self, RunConfig},
    resources::OperatorConfig,
};
use serde_json::json;
use support::{FakeApi, app_path, deployment_path, eventually};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn config(port: u16, leader_elect: bool) -> RunConfig {
    RunConfig {
        operator: OperatorConfig::default(),
        watch_namespace: None,
        metrics_port: port,
        leader_elect,
        lease_namespace: "ops".into(),
        identity: "operator-0".into(),
    }
}

/// Shuts the controller down and checks that it stopped cleanly.
async fn stop(
    stop_tx: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), controller::RunError>>,
) {
    stop_tx.send(()).expect("running");
    let result = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the controller stops on shutdown")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}

async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn the_controller_reconciles_new_apps_and_repairs_deleted_children() {
    let api = FakeApi::default();
    let client = api.client();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = config(0, false);
    let running = tokio::spawn(controller::run(client, config, async move {
        let _ = stop_rx.await;
    }));

    api.create(
        &app_path("team", "chat"),
        json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
               "metadata": {"name": "chat", "namespace": "team"}, "spec": {}}),
    );
    let d = deployment_path("team", "chat");
    eventually("the new app's Deployment", Duration::from_secs(10), || {
        api.get(&d).is_some()
    })
    .await;
    eventually("the new app's status", Duration::from_secs(10), || {
        api.get(&app_path("team", "chat"))
            .is_some_and(|a| a["status"]["observedGeneration"] == json!(1))
    })
    .await;

    // Deleting an owned child brings its parent back into reconcile at once (the periodic
    // resync is minutes away), and the child comes back.
    let uid_before = api.get(&d).expect("deployment")["metadata"]["uid"].clone();
    api.delete(&d);
    eventually("the Deployment re-created", Duration::from_secs(10), || {
        api.get(&d)
            .is_some_and(|o| o["metadata"]["uid"] != uid_before)
    })
    .await;

    // A spec change reaches the children through the RealtimeApp watch.
    api.edit(&app_path("team", "chat"), |a| {
        a["spec"]["replicas"] = json!(4)
    });
    eventually("replicas passed on", Duration::from_secs(10), || {
        api.get(&d)
            .is_some_and(|o| o["spec"]["replicas"] == json!(4))
    })
    .await;

    stop(stop_tx, running).await;
}

#[tokio::test]
async fn with_leader_election_it_takes_the_lease_and_serves_metrics() {
    let api = FakeApi::default();
    let port = free_port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller::run(
        api.client(),
        config(port, true),
        async move {
            let _ = stop_rx.await;
        },
    ));
    api.create(
        &app_path("team", "chat"),
        json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
               "metadata": {"name": "chat", "namespace": "team"}, "spec": {}}),
    );
    let lease = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/chorus-operator-leader";
    eventually(
        "the lease held by this replica",
        Duration::from_secs(10),
        || {
            api.get(lease)
                .is_some_and(|l| l["spec"]["holderIdentity"] == json!("operator-0"))
        },
    )
    .await;
    let d = deployment_path("team", "chat");
    eventually("the leader reconciles", Duration::from_secs(10), || {
        api.get(&d).is_some()
    })
    .await;

    assert_eq!(http_get(port, "/healthz").await.0, 200);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    let (code, metrics) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "chorus_operator_reconciles_total",
        // By reason, each at 0 from the start.
        "chorus_operator_reconcile_errors_total{reason=\"ApplyFailed\"} 0",
        "chorus_operator_reconcile_duration_seconds_count",
        "chorus_operator_writes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let reconciles: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chorus_operator_reconciles_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(reconciles >= 1.0, "{metrics}");

    stop(stop_tx, running).await;
}

#[tokio::test]
async fn watch_namespace_limits_the_controller_to_one_namespace() {
    let api = FakeApi::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = config(0, false);
    cfg.watch_namespace = Some("team".into());
    let running = tokio::spawn(controller::run(api.client(), cfg, async move {
        let _ = stop_rx.await;
    }));
    for ns in ["other", "team"] {
        api.create(
            &app_path(ns, "chat"),
            json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
                   "metadata": {"name": "chat", "namespace": ns}, "spec": {}}),
        );
    }
    eventually(
        "the watched namespace's app reconciled",
        Duration::from_secs(10),
        || api.get(&deployment_path("team", "chat")).is_some(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.get(&deployment_path("other", "chat")).is_none());
    assert!(
        api.get(&app_path("other", "chat"))
            .is_some_and(|a| a.get("status").is_none())
    );
    stop_tx.send(()).expect("running");
    let _ = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("stops");
}

#[tokio::test]
async fn a_refused_child_watch_slows_reconciles_but_does_not_stop_them() {
    // As with RBAC that lacks list and watch on PodDisruptionBudgets: that kind's cache never
    // fills, so a reconcile waits for it at most cache::LIST_WAIT, then reads from the API.
    let api = FakeApi::default();
    api.refuse_list_and_watch("poddisruptionbudgets");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller::run(
        api.client(),
        config(0, false),
        async move {
            let _ = stop_rx.await;
        },
    ));

    api.create(
        &app_path("team", "chat"),
        json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
               "metadata": {"name": "chat", "namespace": "team"}, "spec": {"replicas": 2}}),
    );
    let limit = chorus_operator::cache::LIST_WAIT + Duration::from_secs(10);
    eventually("the app's children and status", limit, || {
        api.get(&deployment_path("team", "chat")).is_some()
            && api
                .get("/apis/policy/v1/namespaces/team/poddisruptionbudgets/chat")
                .is_some()
            && api
                .get(&app_path("team", "chat"))
                .is_some_and(|a| a["status"]["observedGeneration"] == json!(1))
    })
    .await;

    stop(stop_tx, running).await;
}
