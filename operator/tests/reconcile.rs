//! The reconcile against an in-memory Kubernetes API (kube's real Client over a tower service).

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chorus_operator::{
    crd::RealtimeApp,
    metrics::Metrics,
    reconcile::{Context, Error, error_policy, reconcile},
    resources::{self, CHECKSUM_ANNOTATION, Inputs, OperatorConfig},
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use support::{
    FakeApi, access, add_app, app_path, base64, condition, deployment_path, eventually, logs::Logs,
    secret_path, statefulset_path,
};

const NS: &str = "team";

struct World {
    api: FakeApi,
    ctx: Arc<Context>,
    /// The reconciles' clock, in seconds since the epoch.
    seconds: Arc<AtomicI64>,
}

/// Each test's requests stay within what the chart's RBAC is checked against.
impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            access::assert_within_committed(&self.api);
        }
    }
}

impl World {
    fn new() -> Self {
        let api = FakeApi::default();
        let client = api.client();
        let config = OperatorConfig {
            server_image: "chorus-server:test".into(),
            redis_image: "redis:test".into(),
        };
        let seconds = Arc::new(AtomicI64::new(1_800_000_000));
        let clock = seconds.clone();
        let ctx = Context::new(client, config, Arc::new(Metrics::new())).with_clock(Arc::new(
            move || {
                let s = clock.load(Ordering::SeqCst);
                Time(Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH))
            },
        ));
        Self {
            api,
            ctx: Arc::new(ctx),
            seconds,
        }
    }

    /// Moves the reconciles' clock on.
    fn advance(&self, seconds: i64) {
        self.seconds.fetch_add(seconds, Ordering::SeqCst);
    }

    fn add_app(&self, name: &str, spec: Value) {
        add_app(&self.api, NS, name, spec);
    }

    fn app(&self, name: &str) -> RealtimeApp {
        serde_json::from_value(self.api.get(&app_path(NS, name)).expect("app stored")).expect("app")
    }

    async fn reconcile(&self, name: &str) -> Result<Action, Error> {
        reconcile(Arc::new(self.app(name)), self.ctx.clone()).await
    }

    /// One more reconcile, which must find nothing to write.
    async fn reconcile_writes_nothing(&self, name: &str) {
        let mark = self.api.log_len();
        self.reconcile(name).await.expect("a no-op reconcile");
        let writes = self.api.writes_since(mark);
        assert!(writes.is_empty(), "{writes:#?}");
    }

    fn condition(&self, name: &str, type_: &str) -> Value {
        condition(&self.api.get(&app_path(NS, name)).expect("app"), type_)
    }

    fn checksum(&self, name: &str) -> String {
        let d = self
            .api
            .get(&deployment_path(NS, name))
            .expect("deployment");
        d["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// What the Deployment and StatefulSet controllers would report once pods run.
    fn pods_become_ready(&self, name: &str, replicas: i64) {
        let d = self
            .api
            .get(&deployment_path(NS, name))
            .expect("deployment");
        let generation = d["metadata"]["generation"].clone();
        self.api.set_status(
            &deployment_path(NS, name),
            json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
                   "updatedReplicas": replicas, "availableReplicas": replicas,
                   "conditions": [{"type": "Available", "status": "True"}]}),
        );
        self.api.set_status(
            &statefulset_path(NS, &format!("{name}-redis")),
            json!({"replicas": 1, "readyReplicas": 1}),
        );
    }
}

#[tokio::test]
async fn a_new_app_gets_every_child_then_its_status() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("reconciles");

    let paths = w.api.paths();
    for expected in [
        secret_path(NS, "chat-redis"),
        secret_path(NS, "chat-api-token"),
        secret_path(NS, "chat-jwt"),
        secret_path(NS, "chat-checksum-key"),
        secret_path(NS, "chat-redis-url"),
        statefulset_path(NS, "chat-redis"),
        format!("/api/v1/namespaces/{NS}/services/chat-redis"),
        format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/chat-redis"),
        deployment_path(NS, "chat"),
        format!("/api/v1/namespaces/{NS}/services/chat"),
        format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat"),
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:#?}"
        );
    }
    assert!(!paths.iter().any(|p| p.contains("horizontalpodautoscalers")));
    let secret = w.api.get(&secret_path(NS, "chat-redis")).expect("secret");
    assert!(
        secret["data"]["password"]
            .as_str()
            .is_some_and(|p| p.len() >= 32)
    );

    let app = w.api.get(&app_path(NS, "chat")).expect("app");
    let status = &app["status"];
    assert_eq!(status["observedGeneration"], json!(1));
    assert_eq!(
        status["selector"],
        json!("app.kubernetes.io/component=server,app.kubernetes.io/instance=chat")
    );
    assert_eq!(status["endpoint"], json!("chat.team.svc:80"));
    assert_eq!(
        status["redis"],
        json!({"endpoint": "chat-redis.team.svc:6379", "ready": false, "buses": 1, "readyBuses": 0})
    );
    let types: Vec<&str> = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| c["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        [
            "Ready",
            "RedisReady",
            "ServersAvailable",
            "Progressing",
            "Degraded",
            "AutoscalingReady"
        ]
    );
    assert_eq!(w.condition("chat", "Ready")["status"], json!("False"));
    assert_eq!(w.condition("chat", "Degraded")["status"], json!("False"));
    let reasons: Vec<String> = w
        .api
        .events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        reasons.contains(&"SecretCreated".to_owned()) && reasons.contains(&"Created".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_second_reconcile_with_nothing_changed_writes_nothing() {
    let w = World::new();
    w.add_app("chat", json!({"autoscaling": {"enabled": true}}));
    w.reconcile("chat").await.expect("first");
    w.pods_become_ready("chat", 2);
    w.reconcile("chat").await.expect("second (status changes)");
    w.reconcile_writes_nothing("chat").await;
}

#[tokio::test]
async fn spec_changes_patch_children_and_roll_pods_only_for_configuration() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("first");
    let checksum = w.checksum("chat");

    w.api
        .edit(&app_path(NS, "chat"), |a| a["spec"]["replicas"] = json!(5));
    w.reconcile("chat").await.expect("scaled");
    let d = w.api.get(&deployment_path(NS, "chat")).expect("deployment");
    assert_eq!(d["spec"]["replicas"], json!(5));
    assert_eq!(w.checksum("chat"), checksum, "scaling must not roll pods");
    assert_eq!(
        w.api.get(&app_path(NS, "chat")).expect("app")["status"]["observedGeneration"],
        json!(2)
    );

    w.api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["env"] = json!([{"name": "LOG_FORMAT", "value": "json"}])
    });
    w.reconcile("chat").await.expect("env");
    assert_ne!(w.checksum("chat"), checksum, "new configuration rolls pods");

    // A changed secret value rolls the pods too.
    let before = w.checksum("chat");
    w.api.edit(&secret_path(NS, "chat-api-token"), |s| {
        s["data"]["token"] = json!("bmV3LXRva2Vu")
    });
    w.reconcile("chat").await.expect("secret");
    assert_ne!(w.checksum("chat"), before);

    // Turning autoscaling on adds an HPA; scaling to one replica removes the PDB.
    w.api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["autoscaling"] =
            json!({"enabled": true, "engine": "HPA", "minReplicas": 1, "maxReplicas": 4});
        a["spec"]["replicas"] = json!(1);
    });
    w.reconcile("chat").await.expect("autoscaling");
    let paths = w.api.paths();
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("/horizontalpodautoscalers/chat"))
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with("/poddisruptionbudgets/chat"))
    );
}

#[tokio::test]
async fn deployment_becoming_available_turns_ready_true() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("first");
    let not_ready = w.condition("chat", "Ready");
    assert_eq!(not_ready["status"], json!("False"));
    let degraded_time = w.condition("chat", "Degraded")["lastTransitionTime"].clone();

    w.advance(7);
    w.pods_become_ready("chat", 2);
    w.reconcile("chat").await.expect("second");
    let ready = w.condition("chat", "Ready");
    assert_eq!(ready["status"], json!("True"), "{ready}");
    assert_eq!(ready["reason"], json!("Ready"));
    assert_eq!(
        (
            &not_ready["lastTransitionTime"],
            &ready["lastTransitionTime"]
        ),
        (
            &json!("2027-01-15T08:00:00Z"),
            &json!("2027-01-15T08:00:07Z")
        ),
        "Ready flipped: its time moved with the clock"
    );
    assert_eq!(
        w.condition("chat", "Degraded")["lastTransitionTime"],
        degraded_time,
        "Degraded did not flip"
    );
    assert_eq!(
        w.condition("chat", "ServersAvailable")["status"],
        json!("True")
    );
    assert_eq!(w.condition("chat", "RedisReady")["status"], json!("True"));
    assert_eq!(w.condition("chat", "Progressing")["status"], json!("False"));
    let app = w.api.get(&app_path(NS, "chat")).expect("app");
    assert_eq!(
        (
            app["status"]["replicas"].clone(),
            app["status"]["readyReplicas"].clone()
        ),
        (json!(2), json!(2))
    );
    assert!(w.api.events().iter().any(|e| e["reason"] == json!("Ready")));
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_breaks_nothing_until_it_appears() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("first");
    w.pods_become_ready("chat", 2);
    w.reconcile("chat").await.expect("ready");
    let deployment_before = w.api.get(&deployment_path(NS, "chat")).expect("deployment");

    w.api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["auth"] = json!({"jwtSecretRef": {"name": "team-jwt", "key": "key"}})
    });
    let action = w.reconcile("chat").await.expect("reconciles");
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    let ready = w.condition("chat", "Ready");
    assert_eq!(
        (ready["status"].clone(), ready["reason"].clone()),
        (json!("False"), json!("SecretNotFound"))
    );
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("team/team-jwt")),
        "{ready}"
    );
    assert_eq!(w.condition("chat", "Degraded")["status"], json!("True"));
    let deployment_now = w
        .api
        .get(&deployment_path(NS, "chat"))
        .expect("deployment kept");
    assert_eq!(
        deployment_now["spec"], deployment_before["spec"],
        "running pods untouched"
    );

    // The Secret exists but lacks the key.
    w.api.create(
        &secret_path(NS, "team-jwt"),
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "team-jwt", "namespace": NS}, "data": {"other": "eA=="}}),
    );
    w.reconcile("chat").await.expect("reconciles");
    let ready = w.condition("chat", "Ready");
    assert_eq!(ready["reason"], json!("SecretKeyNotFound"));
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"key\"")),
        "{ready}"
    );

    // Fixed by the user: the pods get the new configuration, nothing restarts by hand.
    w.api.edit(&secret_path(NS, "team-jwt"), |s| {
        s["data"]["key"] = json!("c2VjcmV0")
    });
    w.reconcile("chat").await.expect("reconciles");
    assert_eq!(w.condition("chat", "Degraded")["status"], json!("False"));
    let env = w.api.get(&deployment_path(NS, "chat")).expect("d")["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    assert!(
        env.as_array()
            .is_some_and(|e| e.iter().any(|v| v["name"] == json!("JWT_SECRET")))
    );
}

#[tokio::test]
async fn api_errors_and_conflicts_lead_to_retries_with_backoff() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.api.fail_next("PATCH", "/deployments/chat", 500);
    let err = w.reconcile("chat").await.expect_err("the API failed");
    let first = error_policy(Arc::new(w.app("chat")), &err, w.ctx.clone());
    w.api.fail_next("PATCH", "/realtimeapps/chat/status", 409);
    let err = w.reconcile("chat").await.expect_err("a conflict");
    assert!(
        err.to_string().contains("Conflict") || err.to_string().contains("409"),
        "{err}"
    );
    let second = error_policy(Arc::new(w.app("chat")), &err, w.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(Duration::from_secs(2)));
    w.reconcile("chat").await.expect("recovers");
    assert!(w.api.get(&deployment_path(NS, "chat")).is_some());
    let third = error_policy(Arc::new(w.app("chat")), &err, w.ctx.clone());
    assert_eq!(
        third,
        Action::requeue(Duration::from_secs(1)),
        "backoff resets after a success"
    );
}

#[tokio::test]
async fn generated_secrets_are_made_once() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("first");
    let pw = w.api.get(&secret_path(NS, "chat-redis")).expect("secret")["data"]["password"].clone();
    w.api
        .edit(&app_path(NS, "chat"), |a| a["spec"]["replicas"] = json!(3));
    w.reconcile("chat").await.expect("second");
    assert_eq!(
        w.api.get(&secret_path(NS, "chat-redis")).expect("secret")["data"]["password"],
        pw
    );
}

#[tokio::test]
async fn switching_to_external_redis_removes_the_managed_one() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("first");
    w.api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["redis"] = json!({"mode": "External", "external": {"host": "r.example"}})
    });
    w.reconcile("chat").await.expect("external");
    let paths = w.api.paths();
    assert!(!paths.contains(&statefulset_path(NS, "chat-redis")));
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with("/services/chat-redis")
                || p.ends_with("/networkpolicies/chat-redis"))
    );
    assert_eq!(
        w.condition("chat", "RedisReady")["reason"],
        json!("ExternalRedis")
    );
}

#[tokio::test]
async fn a_failed_request_is_named_in_degraded_an_event_the_log_and_the_metric() {
    let logs = Logs::capture();
    let w = World::new();
    w.add_app("broken", json!({}));
    w.reconcile("broken").await.expect("first");
    let jwt = json!({"auth": {"jwtSecretRef": {"name": "team-jwt", "key": "key"}}});
    // (what the API refuses, the spec that makes the reconcile ask, what the user reads)
    let cases = [
        (
            ("PATCH", "/deployments/broken"),
            json!({"replicas": 3}),
            "ApplyFailed",
            "applying Deployment team/broken: injected failure (500 InternalError)",
        ),
        (
            ("GET", "/secrets/team-jwt"),
            jwt,
            "ReadFailed",
            "reading Secret team/team-jwt: injected failure (500 InternalError)",
        ),
        (
            ("DELETE", "/poddisruptionbudgets/broken"),
            json!({"replicas": 1}),
            "DeleteFailed",
            "deleting PodDisruptionBudget team/broken: injected failure (500 InternalError)",
        ),
    ];
    for ((method, path), spec, reason, message) in cases {
        w.api
            .edit(&app_path(NS, "broken"), |a| a["spec"] = spec.clone());
        w.api.fail_next(method, path, 500);
        let err = w.reconcile("broken").await.expect_err("the API failed");
        assert_eq!(
            (err.reason().as_str(), err.to_string().as_str()),
            (reason, message)
        );
        for type_ in ["Degraded", "Ready"] {
            let c = w.condition("broken", type_);
            assert_eq!(
                (&c["reason"], &c["message"]),
                (&json!(reason), &json!(message)),
                "{type_}"
            );
        }
        // What the reconcile saw before it stopped still stands: the Deployment exists.
        assert_eq!(
            w.condition("broken", "ServersAvailable")["reason"],
            json!("NoReplicasAvailable")
        );
        error_policy(Arc::new(w.app("broken")), &err, w.ctx.clone());
        eventually("the ReconcileFailed event", Duration::from_secs(5), || {
            w.api
                .events()
                .iter()
                .any(|e| e["reason"] == json!("ReconcileFailed") && e["note"] == json!(message))
        })
        .await;
        let line = format!("chorus_operator_reconcile_errors_total{{reason=\"{reason}\"}} 1");
        assert!(w.ctx.metrics.render().contains(&line), "{line}");
        // The log line of the failure is in the app's span.
        let text = logs.text();
        assert!(
            text.lines()
                .any(|l| l.contains("WARN reconcile{namespace=team name=broken}")
                    && l.contains(&format!("reconcile failed: {message}"))),
            "{text}"
        );
    }

    // Once the API answers again, Degraded clears.
    w.reconcile("broken").await.expect("recovers");
    let degraded = w.condition("broken", "Degraded");
    assert_eq!(
        (&degraded["status"], &degraded["reason"]),
        (&json!("False"), &json!("AsExpected"))
    );
}

#[tokio::test]
async fn objects_of_a_childs_name_that_the_app_does_not_own_are_never_touched() {
    let w = World::new();
    // Someone's Service `chat`, and someone's PodDisruptionBudget `chat` (which the app, at
    // one replica, would delete if it were its own).
    let service = format!("/api/v1/namespaces/{NS}/services/chat");
    let pdb = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat");
    w.api.create(
        &service,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "chat", "namespace": NS, "labels": {"team": "web"}},
               "spec": {"ports": [{"port": 8080}]}}),
    );
    w.api.create(
        &pdb,
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
               "metadata": {"name": "chat", "namespace": NS}, "spec": {"maxUnavailable": 1}}),
    );
    let before = (w.api.get(&service), w.api.get(&pdb));
    w.add_app("chat", json!({"replicas": 1}));
    w.reconcile("chat").await.expect("reconciles");
    w.api
        .edit(&app_path(NS, "chat"), |a| a["spec"]["replicas"] = json!(3));
    w.reconcile("chat").await.expect("reconciles again");

    assert_eq!((w.api.get(&service), w.api.get(&pdb)), before, "untouched");
    let degraded = w.condition("chat", "Degraded");
    assert_eq!(degraded["reason"], json!("NameInUse"));
    assert_eq!(
        degraded["message"],
        json!(
            "Service team/chat exists and is not owned by this RealtimeApp: rename the app or remove it; \
             PodDisruptionBudget team/chat exists and is not owned by this RealtimeApp: rename the app or remove it"
        )
    );
    // The rest of the app is there.
    assert!(w.api.get(&deployment_path(NS, "chat")).is_some());
    assert!(w.api.get(&statefulset_path(NS, "chat-redis")).is_some());
}

#[tokio::test]
async fn a_setting_removed_from_the_spec_is_removed_from_the_children() {
    let w = World::new();
    w.add_app(
        "chat",
        json!({"service": {"annotations": {"lb.example/idle-timeout": "3600"}},
               "pod": {"nodeSelector": {"pool": "realtime"}}}),
    );
    w.reconcile("chat").await.expect("first");
    let service = format!("/api/v1/namespaces/{NS}/services/chat");
    // Someone else's annotation, set with kubectl: not the operator's to remove.
    w.api.edit(&service, |s| {
        s["metadata"]["annotations"]["team.example/owner"] = json!("web")
    });
    let annotations =
        |w: &World| w.api.get(&service).expect("service")["metadata"]["annotations"].clone();
    assert_eq!(annotations(&w)["lb.example/idle-timeout"], json!("3600"));

    w.api.edit(&app_path(NS, "chat"), |a| {
        a["spec"]["service"]["annotations"] = json!({});
        a["spec"]["pod"] = json!({});
    });
    w.reconcile("chat").await.expect("settings removed");
    let now = annotations(&w);
    assert!(now.get("lb.example/idle-timeout").is_none(), "{now}");
    assert_eq!(now["team.example/owner"], json!("web"));
    let d = w.api.get(&deployment_path(NS, "chat")).expect("deployment");
    assert!(
        d["spec"]["template"]["spec"].get("nodeSelector").is_none(),
        "{}",
        d["spec"]["template"]["spec"]
    );
}

#[tokio::test]
async fn deleting_the_app_deletes_what_it_owns_and_nothing_else() {
    let w = World::new();
    let theirs = format!("/api/v1/namespaces/{NS}/services/chat");
    w.api.create(
        &theirs,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "chat", "namespace": NS}, "spec": {"ports": [{"port": 8080}]}}),
    );
    w.add_app(
        "chat",
        json!({"autoscaling": {"enabled": true, "engine": "HPA"}}),
    );
    w.reconcile("chat").await.expect("reconciles");
    let owned = |w: &World| {
        let uid = w
            .api
            .get(&app_path(NS, "chat"))
            .map(|a| a["metadata"]["uid"].clone());
        w.api.count(|_, o| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| Some(&r["uid"]) == uid.as_ref()))
        })
    };
    // Secrets (Redis password, API token, JWT key, checksum key, REDIS_URL), Redis
    // (StatefulSet, Service, NetworkPolicy), Deployment, HPA, PDB (the Service `chat` is theirs).
    assert_eq!(owned(&w), 11);

    w.api.delete(&app_path(NS, "chat"));
    let left: Vec<String> = w.api.paths();
    assert_eq!(
        left,
        [theirs],
        "the garbage collector took the app's children only"
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

impl World {
    /// The value of `key` in the stored Secret `name`.
    fn secret_value(&self, name: &str, key: &str) -> Vec<u8> {
        let s = self.api.get(&secret_path(NS, name)).expect("secret");
        base64_decode(s["data"][key].as_str().expect("key"))
    }

    fn set_secret_value(&self, name: &str, key: &str, value: &[u8]) {
        self.api.edit(&secret_path(NS, name), |s| {
            s["data"][key] = json!(base64(value))
        });
    }
}

#[tokio::test]
async fn an_external_password_with_url_characters_reaches_the_pods_encoded_and_only_by_reference() {
    let w = World::new();
    let password = "p@ss/w#rd:50%?";
    w.api.create(
        &secret_path(NS, "shared-redis"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "shared-redis", "namespace": NS},
               "data": {"password": base64(password.as_bytes())}}),
    );
    w.add_app(
        "chat",
        json!({"redis": {"mode": "External", "external": {"host": "redis.shared.svc", "tls": true,
            "passwordSecretRef": {"name": "shared-redis", "key": "password"}}}}),
    );
    w.reconcile("chat").await.expect("reconciles");
    let url = String::from_utf8(w.secret_value("chat-redis-url", "url")).expect("text");
    assert_eq!(
        url,
        "rediss://:p%40ss%2Fw%23rd%3A50%25%3F@redis.shared.svc:6379/0"
    );
    let d = w.api.get(&deployment_path(NS, "chat")).expect("deployment");
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    let redis_url = env
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == json!("REDIS_URL")))
        .expect("REDIS_URL");
    assert_eq!(
        redis_url["valueFrom"]["secretKeyRef"],
        json!({"name": "chat-redis-url", "key": "url", "optional": false})
    );
    let deployment_text = d.to_string();
    assert!(
        !deployment_text.contains("p@ss") && !deployment_text.contains("p%40ss"),
        "the password is in the Deployment"
    );
    let secret = w
        .api
        .get(&secret_path(NS, "chat-redis-url"))
        .expect("secret");
    assert!(
        secret["metadata"]
            .get("annotations")
            .is_none_or(|a| !a.to_string().contains(&url)),
        "{secret}"
    );

    // The user changes the password: the URL follows and the pods roll.
    let (mark, checksum) = (w.api.log_len(), w.checksum("chat"));
    w.set_secret_value("shared-redis", "password", b"new#one");
    w.reconcile("chat").await.expect("reconciles");
    assert_eq!(
        String::from_utf8(w.secret_value("chat-redis-url", "url")).expect("text"),
        "rediss://:new%23one@redis.shared.svc:6379/0"
    );
    assert_ne!(w.checksum("chat"), checksum, "pods roll onto the new URL");
    assert!(
        w.api
            .writes_since(mark)
            .iter()
            .any(|l| l.method == "PATCH" && l.path.ends_with("/secrets/chat-redis-url")),
        "{:#?}",
        w.api.writes_since(mark)
    );
    // Nothing changed: the Secret is not written again.
    let mark = w.api.log_len();
    w.reconcile("chat").await.expect("reconciles");
    assert!(
        w.api
            .writes_since(mark)
            .iter()
            .all(|l| !l.path.contains("/secrets/")),
        "{:#?}",
        w.api.writes_since(mark)
    );
}

#[tokio::test]
async fn the_pod_checksum_is_keyed_and_not_a_plain_hash_of_the_secret_values() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("reconciles");
    let checksum = w.checksum("chat");
    // The annotation as an unkeyed hash of the same values would make it: the same
    // configuration with a plain digest of the Secret values in place of the keyed one.
    let app = w.app("chat");
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (name, key) in [
        ("chat-redis", "password"),
        ("chat-api-token", "token"),
        ("chat-jwt", "secret"),
    ] {
        parts.push(format!("{name}/{key}").into_bytes());
        parts.push(w.secret_value(name, key));
    }
    let plain = resources::digest(parts.iter().map(Vec::as_slice));
    let config = OperatorConfig {
        server_image: "chorus-server:test".into(),
        redis_image: "redis:test".into(),
    };
    let unkeyed = resources::build(
        &app,
        &config,
        &Inputs {
            secrets_digest: plain,
        },
    )
    .expect("builds")
    .deployment
    .and_then(|d| d.spec?.template.metadata?.annotations)
    .and_then(|a| a.get(CHECKSUM_ANNOTATION).cloned())
    .expect("annotation");
    assert_ne!(
        checksum, unkeyed,
        "the checksum is a plain hash of the secret values"
    );

    // The app's own key decides it: another key, another checksum (one roll, nothing else).
    w.set_secret_value("chat-checksum-key", "key", b"another-random-key");
    w.reconcile("chat").await.expect("reconciles");
    assert_ne!(w.checksum("chat"), checksum);
    let rotated = w.checksum("chat");
    w.reconcile("chat").await.expect("reconciles");
    assert_eq!(w.checksum("chat"), rotated, "stable under one key");
}

#[tokio::test]
async fn a_redis_url_secret_the_app_does_not_own_is_left_alone_and_reported() {
    let w = World::new();
    let path = secret_path(NS, "chat-redis-url");
    w.api.create(
        &path,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "chat-redis-url", "namespace": NS}, "data": {"url": "eA=="}}),
    );
    let before = w.api.get(&path);
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("reconciles");
    assert_eq!(w.api.get(&path), before, "untouched");
    let ready = w.condition("chat", "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"], &ready["message"]),
        (
            &json!("False"),
            &json!("NameInUse"),
            &json!(
                "Secret team/chat-redis-url exists and is not owned by this RealtimeApp: rename the app or remove it"
            )
        )
    );
    assert!(
        w.api.get(&deployment_path(NS, "chat")).is_none(),
        "no pods that would read someone else's URL"
    );
}

#[tokio::test]
async fn redis_buses_come_and_go_with_spec_redis_replicas() {
    let w = World::new();
    w.add_app("chat", json!({}));
    w.reconcile("chat").await.expect("one bus");
    let service = format!("/api/v1/namespaces/{NS}/services/chat-redis");
    let pdb = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat-redis");
    let sts = statefulset_path(NS, "chat-redis");
    // One bus: a ClusterIP Service (an address allocated), as always.
    let cluster_ip = |w: &World| {
        let svc = w.api.get(&service).expect("Redis Service");
        let ip = svc["spec"]["clusterIP"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (svc, ip)
    };
    let (one, ip) = cluster_ip(&w);
    assert!(!ip.is_empty() && ip != "None", "{one}");
    assert!(w.api.get(&pdb).is_none(), "no Redis PDB for one bus");
    let password = String::from_utf8(w.secret_value("chat-redis", "password")).expect("text");
    let url = |w: &World| String::from_utf8(w.secret_value("chat-redis-url", "url")).expect("text");
    assert_eq!(
        url(&w),
        format!("redis://:{password}@chat-redis.team.svc:6379/0")
    );
    let checksum_one = w.checksum("chat");
    let set_buses = |n: i64| {
        w.api.edit(&app_path(NS, "chat"), |a| {
            a["spec"]["redis"]["replicas"] = json!(n)
        })
    };

    // Two: a clusterIP cannot change in place (the API refuses it), nor the StatefulSet's
    // podManagementPolicy: both are made anew.
    set_buses(2);
    w.reconcile("chat").await.expect("two buses");
    let (two, ip) = cluster_ip(&w);
    assert_eq!(ip, "None", "headless");
    assert_ne!(two["metadata"]["uid"], one["metadata"]["uid"], "replaced");
    let set = w.api.get(&sts).expect("StatefulSet");
    assert_eq!(set["spec"]["replicas"], json!(2));
    assert_eq!(set["spec"]["podManagementPolicy"], json!("Parallel"));
    let budget = w.api.get(&pdb).expect("Redis PDB");
    assert_eq!(budget["spec"]["maxUnavailable"], json!(1));
    assert_eq!(
        url(&w),
        format!(
            "redis://:{password}@chat-redis-0.chat-redis.team.svc:6379/0,\
             redis://:{password}@chat-redis-1.chat-redis.team.svc:6379/0"
        )
    );
    assert_ne!(
        w.checksum("chat"),
        checksum_one,
        "the servers roll onto both buses"
    );

    // One of two down: the app runs on the other and says so.
    w.pods_become_ready("chat", 2);
    w.api
        .set_status(&sts, json!({"replicas": 2, "readyReplicas": 1}));
    w.reconcile("chat").await.expect("one bus down");
    let redis_ready = w.condition("chat", "RedisReady");
    assert_eq!(
        (&redis_ready["status"], &redis_ready["reason"]),
        (&json!("True"), &json!("SomeBusesDown"))
    );
    assert_eq!(w.condition("chat", "Degraded")["status"], json!("True"));
    assert_eq!(w.condition("chat", "Ready")["status"], json!("True"));
    let app = w.api.get(&app_path(NS, "chat")).expect("app");
    assert_eq!(
        (
            &app["status"]["redis"]["buses"],
            &app["status"]["redis"]["readyBuses"]
        ),
        (&json!(2), &json!(1))
    );

    // Three: the same Service and StatefulSet, scaled.
    set_buses(3);
    w.reconcile("chat").await.expect("three buses");
    let three = w.api.get(&service).expect("Redis Service");
    assert_eq!(three["metadata"]["uid"], two["metadata"]["uid"], "kept");
    assert_eq!(
        w.api.get(&sts).expect("StatefulSet")["spec"]["replicas"],
        json!(3)
    );
    assert_eq!(url(&w).split(',').count(), 3);

    // Back to one: a ClusterIP Service again, the Redis PDB gone, the URL as it was.
    set_buses(1);
    w.reconcile("chat").await.expect("one bus again");
    let (again, ip) = cluster_ip(&w);
    assert!(!ip.is_empty() && ip != "None", "{again}");
    let set = w.api.get(&sts).expect("StatefulSet");
    assert_eq!(set["spec"]["replicas"], json!(1));
    assert_eq!(set["spec"]["podManagementPolicy"], json!("OrderedReady"));
    assert!(w.api.get(&pdb).is_none(), "the Redis PDB is deleted");
    assert!(
        w.api
            .get(&format!(
                "/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat"
            ))
            .is_some(),
        "the server PDB stays"
    );
    assert_eq!(
        url(&w),
        format!("redis://:{password}@chat-redis.team.svc:6379/0")
    );
    assert_eq!(w.checksum("chat"), checksum_one);
    let deleted: Vec<String> = w
        .api
        .events()
        .iter()
        .filter(|e| e["reason"] == json!("Deleted"))
        .map(|e| e["note"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        deleted.contains(&"deleted PodDisruptionBudget chat-redis".to_owned()),
        "{deleted:?}"
    );
    // And once settled, a reconcile with nothing changed writes nothing.
    w.reconcile("chat").await.expect("settled");
    w.reconcile_writes_nothing("chat").await;
}
