//! The generated CRD on a real API server: `shared/tools/crd-apiserver` (the upstream
//! apiextensions-apiserver on etcd), driven with kubectl and with the operator's own client code.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use chorus_operator::{
    crd::RealtimeApp,
    reconcile::{now_seconds, patch_status},
    status::{self, Observed},
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::Api;
use serde_json::{Value, json};

#[path = "../../tests/rust/cannot_run.rs"]
mod cannot_run;
#[path = "common/invalid_specs.rs"]
mod invalid_specs;

const SUITE: &str = "chorus-operator tests/crd_apiserver.rs";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool_dir() -> PathBuf {
    std::env::var_os("CHORUS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared"))
        .join("tools/crd-apiserver")
}

/// A running crd-apiserver, stopped on drop.
struct ApiServer {
    dir: String,
    kubeconfig: String,
}

impl ApiServer {
    /// None when the tool or kubectl is missing (see [`cannot_run::cannot_run`]).
    fn start() -> Option<Self> {
        let start = tool_dir().join("start.sh");
        if !start.exists() {
            cannot_run::cannot_run(SUITE, &format!("{} not found", start.display()));
            return None;
        }
        if Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_err()
        {
            cannot_run::cannot_run(SUITE, "kubectl not found on PATH");
            return None;
        }
        let out = Command::new("bash")
            .arg(&start)
            .output()
            .expect("start.sh runs");
        assert!(
            out.status.success(),
            "start.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars = String::from_utf8_lossy(&out.stdout).into_owned();
        let var = |name: &str| {
            vars.lines()
                .find_map(|l| {
                    l.trim_start_matches("export ")
                        .strip_prefix(&format!("{name}="))
                })
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
                .unwrap_or_else(|| panic!("start.sh printed no {name}: {vars}"))
        };
        Some(Self {
            dir: var("CRD_APISERVER_DIR"),
            kubeconfig: var("KUBECONFIG"),
        })
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("kubectl finishes")
    }

    /// Runs kubectl, fails the test on error, returns stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args, None)).expect("kubectl printed JSON")
    }

    async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("client config");
        kube::Client::try_from(cfg).expect("client")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(tool_dir().join("stop.sh"))
            .arg(&self.dir)
            .output();
    }
}

#[tokio::test]
async fn the_crd_works_on_a_real_api_server() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    let crd = root().join("crds/realtimeapps.chorus.rs.yaml");
    server.ok(
        &["apply", "--server-side", "-f", &crd.to_string_lossy()],
        None,
    );
    // `kubectl wait` gives up at once while the new CRD has no status conditions yet (seen on a
    // busy machine), so read the condition until it says True.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let established = server.kubectl(
            &[
                "get",
                "crd/realtimeapps.chorus.rs",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
            ],
            None,
        );
        if String::from_utf8_lossy(&established.stdout).trim() == "True" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CRD is not Established after 30 s: {}",
            String::from_utf8_lossy(&established.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Every example is accepted, and the API server's defaults are the ones render uses.
    for entry in std::fs::read_dir(root().join("manifests/examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        server.ok(&["apply", "-f", &path.to_string_lossy()], None);
        let local: RealtimeApp = serde_saphyr::from_str(&text).expect("example parses");
        let name = local.metadata.name.clone().expect("name");
        let stored = server.json(&["get", "rtapp", &name, "-o", "json"]);
        let stored_spec: Value = stored["spec"].clone();
        let local_spec = serde_json::to_value(&local.spec).expect("json");
        assert_eq!(
            stored_spec,
            local_spec,
            "{}: API server defaults differ from render's",
            path.display()
        );
    }
    let chat = server.json(&["get", "rtapp", "chat", "-o", "json"]);
    assert_eq!(
        chat["spec"],
        json!({"flavor": "chorus", "replicas": 2, "redis": {"mode": "Managed", "replicas": 1},
               "service": {"type": "ClusterIP", "port": 80, "sessionAffinity": "ClientIP"},
               "autoscaling": {"enabled": false, "minReplicas": 2, "maxReplicas": 10, "engine": "Operator",
                               "targetCPUUtilizationPercentage": 70,
                               "scaleDown": {"stabilizationWindowSeconds": 300, "maxReplicasPerMinute": 1}},
               "disruptionBudget": {"maxUnavailable": 1}, "networkPolicy": {"enabled": true}})
    );

    // Each CEL rule refuses its broken spec with its own message; bounds and enums too.
    let mut cases: Vec<(String, String)> = invalid_specs::INVALID
        .iter()
        .map(|(spec, message)| (spec.to_string(), message.to_string()))
        .collect();
    cases.push((
        r#"{"replicas": -1}"#.into(),
        "should be greater than or equal to 0".into(),
    ));
    cases.push((
        r#"{"flavor": "rails"}"#.into(),
        "Unsupported value: \"rails\"".into(),
    ));
    cases.push((
        r#"{"port": 70000}"#.into(),
        "should be less than or equal to 65535".into(),
    ));
    cases.push((
        r#"{"limits": {"maxConnections": 0}}"#.into(),
        "should be greater than or equal to 1".into(),
    ));
    // The lists reach the server comma-joined: an entry with a comma would split in two.
    cases.push((
        r#"{"auth": {"publicRooms": ["lobby,news"]}}"#.into(),
        "should match '^[^,]+$'".into(),
    ));
    cases.push((
        r#"{"service": {"type": "Ingress"}}"#.into(),
        "Unsupported value: \"Ingress\"".into(),
    ));
    cases.push((
        r#"{"redis": {"replicas": 4}}"#.into(),
        "should be less than or equal to 3".into(),
    ));
    cases.push((
        r#"{"redis": {"replicas": 0}}"#.into(),
        "should be greater than or equal to 1".into(),
    ));
    for (i, (spec, message)) in cases.iter().enumerate() {
        let doc = format!(
            "{{\"apiVersion\":\"chorus.rs/v1alpha1\",\"kind\":\"RealtimeApp\",\"metadata\":{{\"name\":\"bad-{i}\"}},\"spec\":{spec}}}"
        );
        let out = server.kubectl(&["apply", "-f", "-"], Some(&doc));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(
            stderr.contains(message.as_str()),
            "{spec}: expected {message:?} in:\n{stderr}"
        );
    }

    // Several Redis buses: accepted for flavor chorus, up to 3.
    let buses = r#"{"apiVersion":"chorus.rs/v1alpha1","kind":"RealtimeApp","metadata":{"name":"buses"},"spec":{"redis":{"replicas":3}}}"#;
    server.ok(&["apply", "-f", "-"], Some(buses));
    let stored = server.json(&["get", "rtapp", "buses", "-o", "json"]);
    assert_eq!(
        stored["spec"]["redis"],
        json!({"mode": "Managed", "replicas": 3})
    );
    server.ok(&["delete", "rtapp", "buses"], None);

    // Connections alone: CPU off by an explicit null, which the API server keeps (an
    // omitted field would be defaulted back to 70). `kubectl apply` would drop the null:
    // create sends it.
    let conns = r#"{"apiVersion":"chorus.rs/v1alpha1","kind":"RealtimeApp","metadata":{"name":"conns"},"spec":{"autoscaling":{"enabled":true,"engine":"KEDA","targetConnectionsPerReplica":5000,"targetCPUUtilizationPercentage":null}}}"#;
    server.ok(&["create", "-f", "-"], Some(conns));
    let stored = server.json(&["get", "rtapp", "conns", "-o", "json"]);
    assert_eq!(
        stored["spec"]["autoscaling"],
        json!({"enabled": true, "engine": "KEDA", "minReplicas": 2, "maxReplicas": 10,
               "targetConnectionsPerReplica": 5000, "targetCPUUtilizationPercentage": null,
               "scaleDown": {"stabilizationWindowSeconds": 300, "maxReplicasPerMinute": 1}})
    );
    let parsed: RealtimeApp = serde_json::from_value(stored).expect("the operator reads it");
    assert_eq!(
        parsed.spec.autoscaling.target_cpu_utilization_percentage,
        None
    );
    server.ok(&["delete", "rtapp", "conns"], None);
    // Neither target (CPU null, no connections target): refused too.
    let neither = conns.replace(r#""targetConnectionsPerReplica":5000,"#, "");
    let out = server.kubectl(&["create", "-f", "-"], Some(&neither));
    assert!(
        !out.status.success(),
        "an autoscaler with nothing to scale on was accepted"
    );
    for (spec, message) in [
        (
            r#"{"autoscaling": {"engine": "Custom"}}"#,
            "Unsupported value: \"Custom\"",
        ),
        (
            r#"{"autoscaling": {"scaleDown": {"stabilizationWindowSeconds": 4000}}}"#,
            "should be less than or equal to 3600",
        ),
        (
            r#"{"autoscaling": {"targetConnectionsPerReplica": 0}}"#,
            "should be greater than or equal to 1",
        ),
    ] {
        let doc = format!(
            "{{\"apiVersion\":\"chorus.rs/v1alpha1\",\"kind\":\"RealtimeApp\",\"metadata\":{{\"name\":\"bad-auto\"}},\"spec\":{spec}}}"
        );
        let out = server.kubectl(&["apply", "-f", "-"], Some(&doc));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{spec}: {stderr}"
        );
    }

    // Printer columns.
    let table = server.ok(&["get", "rtapp"], None);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "FLAVOR", "DESIRED", "READY", "REDIS", "STATUS", "AGE"
        ]
    );
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("chat "))
        .expect("chat row")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["chat", "chorus", "2"]);

    // kubectl scale moves spec.replicas through the scale subresource.
    server.ok(&["scale", "rtapp", "chat", "--replicas=4"], None);
    let chat = server.json(&["get", "rtapp", "chat", "-o", "json"]);
    assert_eq!(chat["spec"]["replicas"], json!(4));

    // The status the operator's own code writes (status subresource, server-side apply) is
    // accepted as is, /scale reads it, and `kubectl wait --for=condition=Ready` returns.
    let app: RealtimeApp = serde_json::from_value(chat).expect("app");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "chat", "generation": 3},
        "status": {"observedGeneration": 3, "replicas": 4, "readyReplicas": 4, "updatedReplicas": 4, "availableReplicas": 4}
    }))
    .expect("deployment");
    let redis: StatefulSet = serde_json::from_value(
        json!({"metadata": {"name": "chat-redis"}, "status": {"replicas": 1, "readyReplicas": 1}}),
    )
    .expect("sts");
    let observed = Observed {
        deployment: Some(deployment),
        redis: Some(Some(redis)),
        redis_endpoint: "chat-redis.default.svc:6379".into(),
        ..Observed::default()
    };
    let new_status = status::status(&app, &observed, now_seconds());
    let client = server.client().await;
    patch_status(&client, &app, &new_status)
        .await
        .expect("status accepted");
    let stored: RealtimeApp = Api::<RealtimeApp>::namespaced(client, "default")
        .get("chat")
        .await
        .expect("get");
    assert_eq!(
        stored.status.as_ref(),
        Some(&new_status),
        "the API server kept the status as written"
    );

    let scale = server.json(&[
        "get",
        "--raw",
        "/apis/chorus.rs/v1alpha1/namespaces/default/realtimeapps/chat/scale",
    ]);
    assert_eq!(scale["spec"]["replicas"], json!(4));
    assert_eq!(scale["status"]["replicas"], json!(4));
    assert_eq!(
        scale["status"]["selector"],
        json!("app.kubernetes.io/component=server,app.kubernetes.io/instance=chat")
    );
    server.ok(
        &[
            "wait",
            "--for=condition=Ready",
            "rtapp/chat",
            "--timeout=20s",
        ],
        None,
    );
    let row = server.ok(&["get", "rtapp", "chat", "--no-headers"], None);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..6], ["chat", "chorus", "4", "4", "Managed", "True"]);
}
