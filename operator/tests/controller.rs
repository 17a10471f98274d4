//! The controller itself (watches, owned children, shutdown) against the in-memory API.

mod support;

use std::time::{Duration, Instant};

use chorus_operator::{
    controller::{self, RunConfig},
    resources::OperatorConfig,
};
use serde_json::json;
use support::{FakeApi, app_path, deployment_path};

async fn eventually(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test]
async fn the_controller_reconciles_new_apps_and_repairs_deleted_children() {
    let api = FakeApi::default();
    let client = api.client();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = RunConfig {
        operator: OperatorConfig::default(),
        watch_namespace: None,
        metrics_port: 0,
        leader_elect: false,
        lease_namespace: "default".into(),
        identity: "test".into(),
    };
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

    stop_tx.send(()).expect("running");
    let result = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the controller stops on shutdown")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}
