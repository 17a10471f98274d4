//! The controller itself (watches, owned children, shutdown) against the in-memory API.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    FakeApi, access, add_app, app_path, condition, deployment_path, eventually,
    running::{Running, config},
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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
    let running = Running::start(&api, config(0, false));

    add_app(&api, "team", "chat", json!({}));
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

    running.stop().await;
}

#[tokio::test]
async fn with_leader_election_it_takes_the_lease_and_serves_metrics() {
    let api = FakeApi::default();
    let port = free_port();
    let running = Running::start(&api, config(port, true));
    add_app(&api, "team", "chat", json!({}));
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
        "chorus_operator_autoscaler_scales_total{kind=\"down\"} 0",
        "chorus_operator_autoscaler_unread_total{kind=\"cpu\"} 0",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let reconciles: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chorus_operator_reconciles_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(reconciles >= 1.0, "{metrics}");

    running.stop().await;
}

#[tokio::test]
async fn watch_namespace_limits_the_controller_to_one_namespace() {
    let api = FakeApi::default();
    let mut cfg = config(0, false);
    cfg.watch_namespace = Some("team".into());
    let running = Running::start(&api, cfg);
    for ns in ["other", "team"] {
        add_app(&api, ns, "chat", json!({}));
    }
    eventually(
        "the watched namespace's app reconciled",
        Duration::from_secs(10),
        || {
            api.get(&app_path("team", "chat"))
                .is_some_and(|a| a["status"]["observedGeneration"] == json!(1))
        },
    )
    .await;
    // Every request so far (the lists and watches that would have brought the other app
    // included) stayed in the watched namespace: the other app cannot have been seen.
    let outside: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.namespace.as_deref() != Some("team"))
        .collect();
    assert!(outside.is_empty(), "{outside:#?}");
    assert!(api.get(&deployment_path("other", "chat")).is_none());
    assert!(
        api.get(&app_path("other", "chat"))
            .is_some_and(|a| a.get("status").is_none())
    );
    running.stop().await;
}

#[tokio::test]
async fn a_refused_child_list_is_reported_after_every_child_is_applied() {
    // As with RBAC that lacks list and watch on PodDisruptionBudgets: that kind's cache never
    // fills, so a reconcile waits for it at most cache::LIST_WAIT, then reads from the API;
    // the children are applied, and the pass that deletes unwanted ones, which must list
    // them, fails and says so.
    let api = FakeApi::default();
    api.refuse_list_and_watch("poddisruptionbudgets");
    let running = Running::start(&api, config(0, false));

    add_app(&api, "team", "chat", json!({"replicas": 2}));
    let limit = chorus_operator::cache::LIST_WAIT + Duration::from_secs(10);
    let degraded = |a: &serde_json::Value| condition(a, "Degraded");
    eventually("the app's children and status", limit, || {
        api.get(&deployment_path("team", "chat")).is_some()
            && api
                .get("/apis/policy/v1/namespaces/team/poddisruptionbudgets/chat")
                .is_some()
            && api
                .get(&app_path("team", "chat"))
                .is_some_and(|a| degraded(&a)["reason"] == json!("ReadFailed"))
    })
    .await;
    let app = api.get(&app_path("team", "chat")).expect("app");
    assert_eq!(
        degraded(&app)["message"],
        json!(
            "listing the PodDisruptionBudget objects of RealtimeApp team/chat: \
             list and watch refused (403 Forbidden)"
        )
    );

    running.stop().await;
}

#[tokio::test]
async fn an_object_without_the_operators_label_is_not_taken_for_absent() {
    // The controller's caches hold only what carries the managed-by label; someone's Service
    // of the app's name does not, and must be neither applied over nor deleted.
    let api = FakeApi::default();
    let service = "/api/v1/namespaces/team/services/chat";
    api.create(
        service,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "chat", "namespace": "team"},
               "spec": {"ports": [{"port": 8080}]}}),
    );
    let before = api.get(service);
    let running = Running::start(&api, config(0, false));
    add_app(&api, "team", "chat", json!({}));
    eventually("Degraded, NameInUse", Duration::from_secs(10), || {
        api.get(&app_path("team", "chat"))
            .is_some_and(|a| condition(&a, "Degraded")["reason"] == json!("NameInUse"))
    })
    .await;
    assert!(api.get(&deployment_path("team", "chat")).is_some());
    assert_eq!(api.get(service), before);
    running.stop().await;
}

#[tokio::test]
async fn the_operator_exits_non_zero_when_another_replica_takes_the_lease() {
    // The real binary, on the in-memory API served over HTTP.
    let api = FakeApi::default();
    let addr = api.serve_http().await;
    let dir = std::env::temp_dir().join(format!("chorus-operator-lease-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .expect("kubeconfig");
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus-operator"))
        .args([
            "run",
            "--leader-elect",
            "--metrics-port",
            "0",
            "--lease-duration",
            "3",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", "ops")
        .env("POD_NAME", "operator-0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chorus-operator starts");

    let lease = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/chorus-operator-leader";
    let holder = |api: &FakeApi| api.get(lease).map(|l| l["spec"]["holderIdentity"].clone());
    eventually(
        "the lease held by the operator",
        Duration::from_secs(10),
        || holder(&api) == Some(json!("operator-0")),
    )
    .await;
    // Another replica holds it now (as after this one missed its renewals).
    api.edit(lease, |l| l["spec"]["holderIdentity"] = json!("operator-1"));

    let status = tokio::time::timeout(Duration::from_secs(10), operator.wait())
        .await
        .expect("the operator exits within a renewal period")
        .expect("exit status");
    let mut stderr = String::new();
    if let Some(mut pipe) = operator.stderr.take() {
        use tokio::io::AsyncReadExt;
        pipe.read_to_string(&mut stderr).await.expect("stderr");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("lost the leader lease"), "{stderr}");
    assert_eq!(
        holder(&api),
        Some(json!("operator-1")),
        "it did not take the lease back"
    );
    access::assert_within_committed(&api);
}
