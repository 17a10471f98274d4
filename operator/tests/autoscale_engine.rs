//! The Operator autoscaling engine end to end on the in-memory API, reading a real
//! chorus-server's `GET /v1/nodes`: it scales up on connections through the scale
//! subresource (field manager `chorus-autoscaler`), reports `status.autoscaling` and
//! AutoscalingReady, holds while a ready replica does not answer, and marks the emptiest
//! replicas with the pod deletion cost before it scales down.

mod support;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use support::{
    FakeApi, add_app, app_path, condition, eventually,
    running::{Running, config},
    secret_path,
};

#[path = "../../tests/rust/cannot_run.rs"]
mod cannot_run;

const NS: &str = "team";
const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "autoscale-test-token";

/// A chorus-server process, killed on drop.
struct Server {
    port: u16,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_bin() -> Option<PathBuf> {
    let bin = std::env::var_os("CHORUS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/chorus-server")
        });
    if bin.exists() {
        Some(bin)
    } else {
        cannot_run::cannot_run(
            "chorus-operator tests/autoscale_engine.rs",
            &format!("{} not found (cargo build -p chorus-server)", bin.display()),
        );
        None
    }
}

async fn start_server(bin: &PathBuf, pod: &str) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    let child = Command::new(bin)
        .env_clear()
        .env("PORT", port.to_string())
        .env("POD_NAME", pod)
        .env("API_TOKEN", TOKEN)
        .env("DRAIN_SECONDS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chorus-server starts");
    let server = Server { port, child };
    let http = client();
    let deadline = std::time::Instant::now() + WAIT;
    while get(&http, port, "/healthz").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "chorus-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn request(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    method: &str,
    port: u16,
    path: &str,
    body: &str,
) -> (u16, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
        Err(_) => (0, String::new()),
    }
}

async fn get(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    port: u16,
    path: &str,
) -> (u16, String) {
    request(http, "GET", port, path, "").await
}

/// A Socket.IO socket over long-polling, opened with plain HTTP requests: the Engine.IO
/// handshake, then the namespace's CONNECT packet. Returns the session id.
async fn open_socket(port: u16) -> String {
    let http = client();
    let (status, body) = get(&http, port, "/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 200, "handshake: {body}");
    let open: Value = serde_json::from_str(body.trim_start_matches('0')).expect("open packet");
    let sid = open["sid"].as_str().expect("sid").to_owned();
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, body) = request(&http, "POST", port, &path, "40").await;
    assert_eq!(status, 200, "connect: {body}");
    // The CONNECT answer may come after a ping, which is answered as a client would.
    for _ in 0..5 {
        let (status, body) = get(&http, port, &path).await;
        assert_eq!(status, 200, "poll: {body}");
        let packets: Vec<&str> = body.split('\u{1e}').collect();
        if packets.contains(&"2") {
            request(&http, "POST", port, &path, "3").await;
        }
        if packets.iter().any(|p| p.starts_with("40{")) {
            return sid;
        }
    }
    panic!("no CONNECT answer for {sid}")
}

/// Closes a polling socket (an Engine.IO CLOSE packet).
async fn close_socket(port: u16, sid: &str) {
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    request(&client(), "POST", port, &path, "1").await;
}

fn pod(name: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS,
                        "labels": {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "server"}},
           "spec": {"containers": [{"name": "server", "image": "chorus-server"}]},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{name}")
}

fn app(api: &FakeApi) -> Value {
    api.get(&app_path(NS, "chat")).unwrap_or_default()
}

/// Makes the controller reconcile now (pods are not watched; a round also comes every 15 s).
fn touch(api: &FakeApi, n: u32) {
    api.edit(&app_path(NS, "chat"), |a| {
        a["metadata"]["annotations"] = json!({"test/round": n.to_string()});
    });
}

fn cost(api: &FakeApi, name: &str) -> Value {
    api.get(&pod_path(name)).unwrap_or_default()["metadata"]["annotations"]
        ["controller.kubernetes.io/pod-deletion-cost"]
        .clone()
}

#[tokio::test]
async fn the_operator_engine_scales_on_a_real_servers_connections() {
    let Some(bin) = server_bin() else {
        return;
    };
    let server = start_server(&bin, "chat-abc").await;
    let api = FakeApi::default();
    api.create(
        &secret_path(NS, "chat-api-token"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "chat-api-token", "namespace": NS},
               "stringData": {"token": TOKEN}}),
    );
    api.create(&pod_path("chat-abc"), pod("chat-abc", true));
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    let mut cfg = config(metrics_port, false);
    cfg.readings_address = format!("127.0.0.1:{}", server.port);
    let running = Running::start(&api, cfg);
    add_app(
        &api,
        NS,
        "chat",
        json!({"replicas": 1, "autoscaling": {
            "enabled": true, "minReplicas": 1, "maxReplicas": 5,
            "targetConnectionsPerReplica": 2, "targetCPUUtilizationPercentage": null,
            "scaleDown": {"stabilizationWindowSeconds": 0, "maxReplicasPerMinute": 5}}}),
    );
    let mut sids = Vec::new();
    for _ in 0..5 {
        sids.push(open_socket(server.port).await);
    }
    touch(&api, 1);
    // 5 sockets at 2 per replica: 3 replicas, set through /scale by chorus-autoscaler.
    eventually("scaled up to 3", WAIT, || {
        app(&api)["spec"]["replicas"] == json!(3)
    })
    .await;
    let scaled = api
        .requests()
        .into_iter()
        .any(|r| r.resource == "realtimeapps" && r.subresource == "scale" && r.verb == "patch");
    assert!(
        scaled,
        "the replicas were set through the scale subresource"
    );
    eventually("status.autoscaling", WAIT, || {
        let a = app(&api);
        a["status"]["autoscaling"]["connections"] == json!(5)
            && a["status"]["autoscaling"]["engine"] == json!("Operator")
            && a["status"]["autoscaling"]["desiredReplicas"] == json!(3)
            && a["status"]["autoscaling"]["lastScaleTime"].is_string()
            && condition(&a, "AutoscalingReady")["status"] == json!("True")
            && condition(&a, "Ready")["status"] != json!("Unknown")
    })
    .await;

    // A second ready replica that does not answer: its sockets would be missing from the
    // count, so the engine does not scale down on it.
    api.create(&pod_path("chat-def"), pod("chat-def", true));
    for sid in sids.drain(1..) {
        close_socket(server.port, &sid).await;
    }
    touch(&api, 2);
    eventually("held on a partial count", WAIT, || {
        let a = app(&api);
        let message = condition(&a, "AutoscalingReady")["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        a["status"]["autoscaling"]["connections"] == json!(1) && message.contains("did not answer")
    })
    .await;
    assert_eq!(app(&api)["spec"]["replicas"], json!(3));

    // Once that replica is no longer ready, the count is whole: down to 1 replica, and the
    // two replicas holding the fewest sockets are marked to go first.
    api.create(&pod_path("chat-ghi"), pod("chat-ghi", false));
    api.set_status(
        &pod_path("chat-def"),
        json!({"conditions": [{"type": "Ready", "status": "False"}]}),
    );
    touch(&api, 3);
    eventually("scaled down to 1", WAIT, || {
        app(&api)["spec"]["replicas"] == json!(1)
    })
    .await;
    assert_eq!(cost(&api, "chat-def"), json!("-100"));
    assert_eq!(cost(&api, "chat-ghi"), json!("-100"));
    assert_eq!(
        cost(&api, "chat-abc"),
        Value::Null,
        "the replica with the socket stays"
    );

    // No replica answers at all: AutoscalingReady turns False, Ready does not change.
    drop(server);
    touch(&api, 4);
    eventually("no readings", WAIT, || {
        condition(&app(&api), "AutoscalingReady")["reason"] == json!("NoReadings")
    })
    .await;
    assert_eq!(app(&api)["spec"]["replicas"], json!(1));

    // The operator's metrics count what it did and what it could not read.
    let (status, metrics) = get(&client(), metrics_port, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(
        value("chorus_operator_autoscaler_scales_total{kind=\"up\"} "),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value("chorus_operator_autoscaler_scales_total{kind=\"down\"} "),
        1.0,
        "{metrics}"
    );
    assert!(
        value("chorus_operator_autoscaler_unread_total{kind=\"connections\"} ") >= 1.0,
        "{metrics}"
    );
    running.stop().await;
}
