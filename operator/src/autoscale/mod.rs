//! Autoscaling with the Operator engine (REALTIMEAPP.md, "Autoscaling"): at each reconcile
//! of an app with `engine: Operator`, at least every [`PERIOD`], read the app's sockets from
//! its replicas and its CPU from `metrics.k8s.io`, decide (src/autoscale/decide.rs), mark the
//! emptiest replicas with the pod deletion cost before a scale-down, and set the replicas
//! through the RealtimeApp's scale subresource, as an HPA would.

pub mod decide;
pub mod reading;

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    conditions::Reason,
    crd::{AutoscalingEngine, AutoscalingStatus, RealtimeApp},
    error::{Error, ObjectName},
    metrics::Metrics,
    status,
};
use decide::{Autoscaler, Connections, Decision, Policy, Reading, Why};
use reading::NodesReader;

/// How often the Operator engine reads and decides.
pub const PERIOD: Duration = Duration::from_secs(15);
/// The field manager of the engine's writes (the replicas through /scale, the pod marks).
pub const MANAGER: &str = "chorus-autoscaler";
/// The ReplicaSet removes the pods with the lowest cost first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost the engine gives the replicas it wants removed (unmarked pods count as 0); it
/// clears this value, and only this one, from pods it no longer wants removed.
pub const REMOVE_FIRST: &str = "-100";
/// Where the engine reads `GET /v1/nodes` by default: the app's Service.
pub const DEFAULT_ADDRESS: &str = "{name}.{namespace}.svc:{port}";

/// What the autoscaler reports: `status.autoscaling` and the AutoscalingReady condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub status: AutoscalingStatus,
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
}

/// The Operator engine: its reader and, per app, the memory of its decisions.
pub struct Engine {
    reader: NodesReader,
    /// `{name}`, `{namespace}` and `{port}` (the Service's) filled in per app.
    address: String,
    autoscalers: Mutex<HashMap<String, Autoscaler>>,
}

impl Engine {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            reader: NodesReader::default(),
            address: address.into(),
            autoscalers: Mutex::new(HashMap::new()),
        }
    }

    /// Where the replicas of `app` answer `GET /v1/nodes`.
    pub fn address(&self, app: &RealtimeApp) -> String {
        self.address
            .replace("{name}", &app.name_any())
            .replace("{namespace}", &app.namespace().unwrap_or_default())
            .replace("{port}", &app.spec.service.port.to_string())
    }

    /// Forgets an app's decisions (its autoscaling is off or another engine's).
    pub fn forget(&self, app: &RealtimeApp) {
        self.lock().remove(&app.uid().unwrap_or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Autoscaler>> {
        self.autoscalers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One round for `app`: read, decide, mark and scale. `token` is the API token, None
    /// when it cannot be read (then connections are not a signal this round).
    pub async fn run(
        &self,
        app: &RealtimeApp,
        client: &Client,
        token: Option<&[u8]>,
        metrics: &Metrics,
    ) -> Result<Report, Error> {
        let ns = app.namespace().unwrap_or_default();
        let policy = Policy::of(&app.spec.autoscaling);
        let selector = status::selector(app);
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pods = pods_api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::List {
                kind: "Pod".into(),
                app: ObjectName::of(app),
                source,
            })?
            .items;
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let mut notes = Vec::new();
        let mut reading = Reading::default();
        let mut per_pod = HashMap::new();
        if policy.target_connections.is_some() {
            match token.map(String::from_utf8_lossy) {
                None => {
                    Metrics::count(&metrics.autoscaler_unread, "connections");
                    notes.push("connections: the API token cannot be read".to_owned());
                }
                Some(token) => match self.reader.read(&self.address(app), &token).await {
                    Ok(nodes) => {
                        let answered: BTreeSet<&str> =
                            nodes.nodes.iter().map(|n| n.id.as_str()).collect();
                        let silent = live
                            .iter()
                            .filter(|p| is_ready(p) && !answered.contains(p.name_any().as_str()))
                            .count();
                        if silent > 0 {
                            notes.push(format!(
                                "{silent} ready replica(s) did not answer: no scale-down on a partial count"
                            ));
                        }
                        per_pod.extend(nodes.nodes.iter().map(|n| (n.id.clone(), n.sockets)));
                        reading.connections = Some(Connections {
                            total: nodes.sockets,
                            complete: silent == 0,
                        });
                    }
                    Err(e) => {
                        Metrics::count(&metrics.autoscaler_unread, "connections");
                        notes.push(format!("connections: {e}"));
                    }
                },
            }
        }
        if policy.target_cpu_percent.is_some() {
            match reading::cpu_percent(client, &ns, &selector, &live).await {
                Ok(Ok(cpu)) => reading.cpu_percent = Some(cpu),
                Ok(Err(why)) => notes.push(format!("CPU is not a signal: {why}")),
                Err(e) => {
                    Metrics::count(&metrics.autoscaler_unread, "cpu");
                    notes.push(format!("CPU: {e}"));
                }
            }
        }

        let current = app.spec.replicas;
        let decision = {
            let mut autoscalers = self.lock();
            let autoscaler = autoscalers
                .entry(app.uid().unwrap_or_default())
                .or_insert_with(|| Autoscaler::new(Instant::now()));
            autoscaler.decide(&policy, current, &reading, Instant::now())
        };
        let mut last_scale_time = app
            .status
            .as_ref()
            .and_then(|s| s.autoscaling.as_ref())
            .and_then(|a| a.last_scale_time.clone());
        if decision.desired != current {
            if decision.desired < current {
                let remove = usize::try_from(current - decision.desired).unwrap_or(0);
                mark(&pods_api, &live, &per_pod, remove).await?;
            }
            scale(client, app, decision.desired).await?;
            let direction = if decision.desired > current {
                "up"
            } else {
                "down"
            };
            Metrics::count(&metrics.autoscaler_scales, direction);
            last_scale_time = Some(crate::reconcile::now_seconds());
            tracing::info!(
                from = current,
                to = decision.desired,
                why = ?decision.why,
                "autoscaler set the replicas"
            );
        }
        let any_signal = reading.connections.is_some() || reading.cpu_percent.is_some();
        Ok(Report {
            status: AutoscalingStatus {
                engine: AutoscalingEngine::Operator,
                connections: reading
                    .connections
                    .map(|c| i64::try_from(c.total).unwrap_or(i64::MAX)),
                desired_replicas: Some(decision.desired),
                last_scale_time,
            },
            ready: any_signal,
            reason: if any_signal {
                Reason::Active
            } else {
                Reason::NoReadings
            },
            message: message(&policy, &reading, &decision, &notes),
        })
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Marks the `remove` live pods holding the fewest sockets (those that did not answer
/// first) so that the ReplicaSet removes them, and clears the mark from the others.
async fn mark(
    api: &Api<Pod>,
    live: &[&Pod],
    sockets: &HashMap<String, u64>,
    remove: usize,
) -> Result<(), Error> {
    let mut ranked: Vec<(u64, String)> = live
        .iter()
        .map(|p| {
            let name = p.name_any();
            (sockets.get(&name).copied().unwrap_or(0), name)
        })
        .collect();
    ranked.sort();
    let chosen: BTreeSet<&str> = ranked
        .iter()
        .take(remove)
        .map(|(_, n)| n.as_str())
        .collect();
    for pod in live {
        let name = pod.name_any();
        let marked = pod.annotations().get(DELETION_COST).map(String::as_str) == Some(REMOVE_FIRST);
        let value = match (chosen.contains(name.as_str()), marked) {
            (true, false) => json!(REMOVE_FIRST),
            (false, true) => serde_json::Value::Null,
            _ => continue,
        };
        let patch = json!({"metadata": {"annotations": {DELETION_COST: value}}});
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        match api.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Gone meanwhile: nothing to mark.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    object: ObjectName::new("Pod", &pod.namespace().unwrap_or_default(), &name),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Sets the replicas through the scale subresource, as `kubectl scale` and an HPA do.
async fn scale(client: &Client, app: &RealtimeApp, replicas: i32) -> Result<(), Error> {
    let api: Api<RealtimeApp> =
        Api::namespaced(client.clone(), &app.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch_scale(
        &app.name_any(),
        &params,
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .map_err(|source| Error::Apply {
        object: ObjectName::of(app),
        source,
    })?;
    Ok(())
}

/// The AutoscalingReady message: what was read, what it asks for, and what was missing.
fn message(policy: &Policy, reading: &Reading, decision: &Decision, notes: &[String]) -> String {
    let mut parts = Vec::new();
    if let (Some(c), Some(target)) = (reading.connections, policy.target_connections) {
        parts.push(format!(
            "{} connections (target {target} per replica)",
            c.total
        ));
    }
    if let (Some(cpu), Some(target)) = (reading.cpu_percent, policy.target_cpu_percent) {
        parts.push(format!("CPU {cpu:.0}% (target {target}%)"));
    }
    let read = if parts.is_empty() {
        "no reading".to_owned()
    } else {
        parts.join(", ")
    };
    let why = match decision.why {
        Why::Steady => "steady",
        Why::Bounds => "brought within minReplicas..maxReplicas",
        Why::ScaleUp => "scaling up",
        Why::ScaleDown => "scaling down",
        Why::Window => "held by the scale-down window",
        Why::Rate => "held by maxReplicasPerMinute",
        Why::Incomplete => "held: a signal is missing",
    };
    let mut text = format!(
        "{read}: {} replicas recommended, {} set ({why})",
        decision.recommended, decision.desired
    );
    for note in notes {
        text.push_str("; ");
        text.push_str(note);
    }
    text
}
