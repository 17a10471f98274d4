//! Many RealtimeApps at once, for the scale benchmark (benches/scale.rs) and the no-op
//! resync test: the shapes of manifests/examples/*.yaml spread over a few namespaces, the
//! part of the Deployment and StatefulSet controllers (pods become ready), waiting for
//! convergence, and a pass that reconciles every app directly.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chorus_operator::{
    crd::RealtimeApp,
    metrics::Metrics,
    reconcile::{Context, reconcile},
    resources::OperatorConfig,
};
use futures::StreamExt;
use serde_json::{Value, json};

use super::{FakeApi, app_path, secret_path};

/// The example shapes: chat.yaml, autoscaling.yaml, external-redis.yaml, sails.yaml,
/// socketio.yaml.
pub const SHAPES: [&str; 5] = ["chat", "autoscaling", "external", "sails", "socketio"];

/// The spec of an example shape (the external one refers to Secrets of its namespace that
/// `create` makes).
pub fn spec(shape: &str) -> Value {
    match shape {
        "autoscaling" => json!({
            "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}},
            "autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 20,
                            "targetCPUUtilizationPercentage": 60},
            "disruptionBudget": {"maxUnavailable": 2}
        }),
        "external" => json!({
            "replicas": 3,
            "redis": {"mode": "External", "external": {
                "host": "redis.shared.svc", "port": 6380, "db": 2, "tls": true,
                "passwordSecretRef": {"name": "shared-redis", "key": "password"}}},
            "auth": {"apiTokenSecretRef": {"name": "shared-api", "key": "token"},
                     "jwtSecretRef": {"name": "shared-jwt", "key": "hs256-key"}},
            "pod": {"labels": {"team": "platform"}, "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"tier": "realtime"}}}]}
        }),
        "sails" => json!({
            "flavor": "sails", "image": "example.org/acme/sails-app:1.4.2", "replicas": 3,
            "env": [{"name": "NODE_ENV", "value": "production"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"memory": "256Mi"}}
        }),
        "socketio" => json!({
            "flavor": "socketio", "image": "example.org/acme/node-chat:2.0.0", "port": 8080,
            "service": {"type": "LoadBalancer", "port": 443, "annotations": {
                "service.beta.kubernetes.io/aws-load-balancer-backend-protocol": "tcp"}}
        }),
        _ => json!({}),
    }
}

/// Creates `n` apps, the shapes in turn, over `namespaces` namespaces (`team-0`, ...), and
/// the user's Secrets that the external shape refers to. Returns (namespace, name) of each.
pub fn create(api: &FakeApi, n: usize, namespaces: usize) -> Vec<(String, String)> {
    let namespaces = namespaces.max(1);
    for i in 0..namespaces {
        let ns = format!("team-{i}");
        for (name, key, value) in [
            ("shared-redis", "password", "cmVkaXMtcGFzc3dvcmQ="),
            ("shared-api", "token", "YXBpLXRva2Vu"),
            ("shared-jwt", "hs256-key", "and0LWtleQ=="),
        ] {
            api.create(
                &secret_path(&ns, name),
                json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": name, "namespace": ns}, "data": {key: value}}),
            );
        }
    }
    (0..n)
        .map(|i| {
            let shape = SHAPES[i % SHAPES.len()];
            let ns = format!("team-{}", i % namespaces);
            let name = format!("{shape}-{i:05}");
            api.create(
                &app_path(&ns, &name),
                json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
                       "metadata": {"name": name, "namespace": ns}, "spec": spec(shape)}),
            );
            (ns, name)
        })
        .collect()
}

fn lags(obj: &Value) -> bool {
    obj["status"]["observedGeneration"] != obj["metadata"]["generation"]
}

/// What the Deployment and StatefulSet controllers report once the pods run: every
/// Deployment and StatefulSet whose status lags its generation gets all replicas ready.
/// Returns how many statuses were written.
pub fn pods_become_ready(api: &FakeApi) -> usize {
    let lagging = api
        .matching(|p, o| (p.contains("/deployments/") || p.contains("/statefulsets/")) && lags(o));
    for (path, obj) in &lagging {
        let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
        let mut status = json!({"observedGeneration": obj["metadata"]["generation"],
            "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
            "availableReplicas": replicas});
        if path.contains("/deployments/") {
            status["conditions"] = json!([{"type": "Available", "status": "True"}]);
        }
        api.set_status(path, status);
    }
    lagging.len()
}

/// Runs `pods_become_ready` every 20 ms until aborted.
pub fn spawn_kubelet(api: FakeApi) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            pods_become_ready(&api);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn is_ready(obj: &Value) -> bool {
    let ready = obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == json!("Ready")));
    ready.is_some_and(|c| c["status"] == json!("True"))
        && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

/// RealtimeApps whose Ready condition is True for their current generation.
pub fn ready(api: &FakeApi) -> usize {
    api.count(|p, o| p.contains("/realtimeapps/") && is_ready(o))
}

/// Waits until `n` apps are Ready; `progress` is called about once a second with the count.
/// On timeout, says how many were Ready and why one of the others was not.
pub async fn wait_ready(
    api: &FakeApi,
    n: usize,
    limit: Duration,
    mut progress: impl FnMut(usize, Duration),
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut reported = Duration::ZERO;
    loop {
        let ready = ready(api);
        let took = started.elapsed();
        if ready >= n {
            return Ok(took);
        }
        if took > limit {
            let example = api
                .matching(|p, o| p.contains("/realtimeapps/") && !is_ready(o))
                .into_iter()
                .next()
                .map(|(p, o)| format!("{p}: status {}", o["status"]))
                .unwrap_or_default();
            return Err(format!(
                "{ready}/{n} apps Ready after {limit:?}; for instance {example}"
            ));
        }
        if took >= reported + Duration::from_secs(1) {
            reported = took;
            progress(ready, took);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no request has come through the client for `quiet`; false if that takes
/// longer than `limit`.
pub async fn quiesce(api: &FakeApi, quiet: Duration, limit: Duration) -> bool {
    let started = Instant::now();
    let mut last = api.client_requests();
    let mut since = Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = api.client_requests();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// Changes an annotation of every app (not its spec, so not its generation): the
/// controller's watch brings each app back into reconcile.
pub fn touch_all(api: &FakeApi, apps: &[(String, String)], value: &str) {
    for (ns, name) in apps {
        api.edit(&app_path(ns, name), |a| {
            a["metadata"]["annotations"]["bench.chorus.rs/touched"] = json!(value)
        });
    }
}

/// A reconcile context like the controller's, on the fake's client.
pub fn context(api: &FakeApi) -> Arc<Context> {
    Arc::new(Context::new(
        api.client(),
        OperatorConfig::default(),
        Arc::new(Metrics::new()),
    ))
}

/// Calls the reconcile function once on every app, `concurrency` at a time; returns how
/// many reconciles succeeded and the errors of the others.
pub async fn reconcile_all(
    api: &FakeApi,
    ctx: &Arc<Context>,
    apps: &[(String, String)],
    concurrency: usize,
) -> (usize, Vec<String>) {
    let results: Vec<Result<(), String>> = futures::stream::iter(apps)
        .map(|(ns, name)| {
            let ctx = ctx.clone();
            let stored = api.get(&app_path(ns, name));
            async move {
                let app: RealtimeApp = serde_json::from_value(stored.unwrap_or_default())
                    .map_err(|e| format!("{ns}/{name}: {e}"))?;
                reconcile(Arc::new(app), ctx)
                    .await
                    .map(drop)
                    .map_err(|e| format!("{ns}/{name}: {e}"))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    (ok, results.into_iter().filter_map(Result::err).collect())
}

/// Per-verb counts of `after` minus `before`.
pub fn since(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// POST, PUT, PATCH and DELETE requests among per-verb counts.
pub fn writes(by_verb: &BTreeMap<String, u64>) -> u64 {
    ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|v| by_verb.get(*v).copied().unwrap_or(0))
        .sum()
}
