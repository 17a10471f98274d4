//! One reconcile of one RealtimeApp, in a span named after it: make the generated Secrets,
//! check the referenced ones, apply what changed, delete what is no longer wanted, and write
//! the status when it changed. A reconcile that finds nothing to do writes nothing; one that
//! fails says what failed in the Degraded condition, an event and the log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use serde_json::json;
use tracing::Instrument;

pub use crate::error::Error;
use crate::{
    apply::Applier,
    autoscale::{self, Engine, Report},
    cache::{Cached, Caches},
    conditions::{ConditionType, EventReason, Reason},
    crd::{AutoscalingEngine, AutoscalingStatus, RealtimeApp, RealtimeAppStatus, SecretKeyRef},
    error::ObjectName,
    metrics::Metrics,
    resources::{
        self, App, BuildError, Inputs, MANAGER, OperatorConfig,
        autoscaling::{scaled_object_resource, trigger_authentication_resource},
        env::{REDIS_URL_KEY, RedisEndpoint, api_token_ref, secret_refs},
    },
    secrets,
    status::{self, Observed, Problem},
};

/// While a referenced Secret is missing, look again this often (Secrets the user creates
/// are not owned, so no watch event brings them).
const RECHECK: Duration = Duration::from_secs(15);
/// While the app is not ready yet.
const WAITING: Duration = Duration::from_secs(30);
/// Periodic resync of a healthy app.
const RESYNC: Duration = Duration::from_secs(300);

/// Where condition times come from: [`now_seconds`], or a test's own clock.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub metrics: Arc<Metrics>,
    /// Who the events say recorded them.
    reporter: Reporter,
    /// The controller's watch caches of the children; without them, children are read
    /// from the API.
    caches: Option<Caches>,
    /// Consecutive failures per app, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Stamps condition transitions.
    clock: Clock,
    /// The Operator autoscaling engine.
    pub autoscaler: Engine,
}

impl Context {
    pub fn new(client: Client, config: OperatorConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            config,
            metrics,
            reporter: MANAGER.into(),
            caches: None,
            failures: Mutex::new(HashMap::new()),
            clock: Arc::new(now_seconds),
            autoscaler: Engine::new(autoscale::DEFAULT_ADDRESS),
        }
    }

    /// Reads the apps' `GET /v1/nodes` at `address` (`{name}`, `{namespace}` and `{port}`
    /// filled in) instead of their Service's address.
    pub fn with_readings_address(mut self, address: impl Into<String>) -> Self {
        self.autoscaler = Engine::new(address);
        self
    }

    /// Stamps condition transitions with `clock` instead of the system time.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Reads children from these caches instead of the API.
    pub fn with_caches(mut self, caches: Caches) -> Self {
        self.caches = Some(caches);
        self
    }

    /// The live child `name`, from the caches when there are any and they have it. What
    /// the caches lack is looked up in the API: they hold only objects with the operator's
    /// label, and an object of the same name without it must not be taken for absent (and
    /// overwritten).
    pub(crate) async fn live<K: Cached>(
        &self,
        api: &Api<K>,
        ns: &str,
        name: &str,
    ) -> Result<Option<K>, kube::Error> {
        if let Some(caches) = &self.caches
            && let Some(Some(cached)) = caches.get(ns, name).await
        {
            return Ok(Some(cached));
        }
        api.get_opt(name).await
    }

    /// The children of kind `K` in `ns` that `app` owns: from the caches when there are any,
    /// else listed by the app's labels.
    pub(crate) async fn owned<K: Cached>(
        &self,
        api: &Api<K>,
        ns: &str,
        app: &RealtimeApp,
    ) -> Result<Vec<K>, kube::Error> {
        let uid = app.uid().unwrap_or_default();
        if let Some(caches) = &self.caches
            && let Some(owned) = caches.owned(ns, &uid).await
        {
            return Ok(owned);
        }
        let params = ListParams::default().labels(&resources::children_selector(&app.name_any()));
        let listed = api.list(&params).await?;
        Ok(listed
            .items
            .into_iter()
            .filter(|obj| resources::is_owned_by(obj, &uid))
            .collect())
    }

    /// Records an event on `app`; failing to record one must not fail the reconcile.
    ///
    /// A fresh Recorder each time: a shared one takes an event of the same type, reason and
    /// object for a repeat of the first and keeps the first one's note, so a second failure
    /// (or a second child created) would show the first one's message.
    pub(crate) async fn event(
        &self,
        app: &RealtimeApp,
        type_: EventType,
        reason: EventReason,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.as_str().into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(&event, &app.object_ref(&())).await {
            tracing::debug!("could not record an event: {e}");
        }
    }
}

fn key(app: &RealtimeApp) -> String {
    format!("{}/{}", app.namespace().unwrap_or_default(), app.name_any())
}

/// The span of everything done for `app`: every log line says which app it is about.
fn span(app: &RealtimeApp) -> tracing::Span {
    tracing::info_span!(
        "reconcile",
        namespace = %app.namespace().unwrap_or_default(),
        name = %app.name_any(),
    )
}

/// The controller's reconcile function.
pub async fn reconcile(app: Arc<RealtimeApp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_app(&app, &ctx).instrument(span(&app)).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::reason));
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(&app));
    }
    result
}

/// Retry with exponential backoff (1 s doubling to 5 min) and record why.
pub fn error_policy(app: Arc<RealtimeApp>, error: &Error, ctx: Arc<Context>) -> Action {
    let _span = span(&app).entered();
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key(&app)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay =
        Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(reason = %error.reason(), attempt = n, retry_in = ?delay, "reconcile failed: {error}");
    let note = error.to_string();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        ctx.event(&app, EventType::Warning, EventReason::ReconcileFailed, note)
            .await;
    });
    Action::requeue(delay)
}

/// The Secrets one reconcile deals with, derived from the spec.
struct SecretPlan {
    /// Generated Secrets, created when missing.
    to_create: Vec<Secret>,
    /// Every key the server pods read (the REDIS_URL Secret aside).
    refs: Vec<SecretKeyRef>,
    /// The key of the pod template's checksum.
    checksum_key: SecretKeyRef,
    /// The REDIS_URL Secret the operator writes.
    redis_url: SecretKeyRef,
    endpoint: RedisEndpoint,
    /// The API token, which the Operator autoscaling engine reads `/v1/nodes` with.
    api_token: Option<SecretKeyRef>,
}

async fn reconcile_app(app: &RealtimeApp, ctx: &Context) -> Result<Action, Error> {
    let built = resources::generated(app, &ctx.config).and_then(|generated| {
        let a = App::new(app, &ctx.config)?;
        let endpoint = RedisEndpoint::of(&a)?;
        let redis_name = generated.redis_password.is_some().then(|| a.redis_name());
        let plan = SecretPlan {
            to_create: generated.secrets().collect(),
            refs: secret_refs(&a, &endpoint),
            checksum_key: a.checksum_key_ref(),
            redis_url: SecretKeyRef {
                name: a.redis_url_name(),
                key: REDIS_URL_KEY.into(),
            },
            endpoint,
            api_token: api_token_ref(&a),
        };
        Ok((plan, redis_name))
    });
    let (plan, redis_name) = match built {
        Ok(b) => b,
        Err(e) => return invalid_spec(app, ctx, e).await,
    };
    let mut seen = Observed {
        redis_endpoint: plan.endpoint.address(),
        ..Observed::default()
    };
    let applier = Applier::new(app, ctx);
    let converged = async {
        // What runs now first: the status reports it even if a step below fails.
        seen.deployment = applier.live_owned(&app.name_any()).await?;
        if let Some(name) = &redis_name {
            seen.redis = Some(applier.live_owned(name).await?);
        }
        let converged = converge(&applier, plan, &mut seen).await?;
        if let Converged::Done { api_token } = &converged {
            let report = autoscale_app(app, ctx, &seen, api_token.as_deref()).await?;
            seen.autoscaling = report;
        }
        Ok::<_, Error>(converged)
    };
    match converged.await {
        Ok(Converged::Done { .. }) => {}
        Ok(Converged::InvalidSpec(e)) => return invalid_spec(app, ctx, e).await,
        Err(e) => {
            // What stopped the reconcile comes first; then what it saw on the way.
            seen.problems.insert(
                0,
                Problem {
                    reason: e.reason(),
                    message: e.to_string(),
                },
            );
            if let Err(also) = write_status(app, &seen, ctx).await {
                tracing::debug!("the status could not say so either: {also}");
            }
            return Err(e);
        }
    }
    let ready = write_status(app, &seen, ctx).await?;
    let next = if !seen.problems.is_empty() {
        RECHECK
    } else if !ready {
        WAITING
    } else {
        RESYNC
    };
    let operator_engine =
        app.spec.autoscaling.enabled && app.spec.autoscaling.engine == AutoscalingEngine::Operator;
    Ok(Action::requeue(if operator_engine {
        next.min(autoscale::PERIOD)
    } else {
        next
    }))
}

enum Converged {
    /// Applied; the API token's value when it could be read.
    Done {
        api_token: Option<Vec<u8>>,
    },
    InvalidSpec(BuildError),
}

/// The autoscaler's round and report: the Operator engine reads and scales; the HPA and
/// KEDA engines are reported from what they show.
async fn autoscale_app(
    app: &RealtimeApp,
    ctx: &Context,
    seen: &Observed,
    api_token: Option<&[u8]>,
) -> Result<Option<Report>, Error> {
    let auto = &app.spec.autoscaling;
    if !auto.enabled || auto.engine != AutoscalingEngine::Operator {
        ctx.autoscaler.forget(app);
    }
    if !auto.enabled {
        return Ok(None);
    }
    let name = app.name_any();
    let report = |ready, reason, message: String, status| Report {
        status,
        ready,
        reason,
        message,
    };
    Ok(Some(match auto.engine {
        AutoscalingEngine::Operator => {
            ctx.autoscaler
                .run(app, &ctx.client, api_token, &ctx.metrics)
                .await?
        }
        AutoscalingEngine::HPA => {
            let hpa = seen.hpa.as_ref().and_then(|h| h.status.as_ref());
            let stuck = hpa.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "ScalingActive" && c.status == "False")
            });
            let status = AutoscalingStatus {
                engine: AutoscalingEngine::HPA,
                connections: None,
                desired_replicas: hpa.map(|s| s.desired_replicas),
                last_scale_time: hpa.and_then(|s| s.last_scale_time.clone()),
            };
            match stuck {
                Some(c) => report(
                    false,
                    Reason::EngineNotScaling,
                    format!(
                        "HorizontalPodAutoscaler {name}: {}",
                        c.message.clone().unwrap_or_default()
                    ),
                    status,
                ),
                None => report(
                    true,
                    Reason::Active,
                    format!("HorizontalPodAutoscaler {name} scales the app"),
                    status,
                ),
            }
        }
        AutoscalingEngine::KEDA => {
            let status = AutoscalingStatus {
                engine: AutoscalingEngine::KEDA,
                ..AutoscalingStatus::default()
            };
            if seen.keda_missing {
                report(
                    false,
                    Reason::EngineMissing,
                    "KEDA is not installed (no keda.sh/v1alpha1 ScaledObject in the API): install KEDA, or choose engine Operator or HPA".into(),
                    status,
                )
            } else {
                report(
                    true,
                    Reason::Active,
                    format!("KEDA ScaledObject {name} scales the app"),
                    status,
                )
            }
        }
    }))
}

/// Creates the generated Secrets, writes the REDIS_URL Secret, applies the children, deletes
/// those no longer wanted; records in `seen` what it finds on the way (so that a failure
/// part-way still reports it).
async fn converge(
    applier: &Applier<'_>,
    plan: SecretPlan,
    seen: &mut Observed,
) -> Result<Converged, Error> {
    let (app, ctx) = (applier.app, applier.ctx);
    let ns = &applier.namespace;
    // The generated Secrets are among those read: those missing are created.
    let mut to_read = plan.refs.clone();
    to_read.push(plan.checksum_key.clone());
    to_read.push(plan.redis_url.clone());
    let mut read = secrets::read(&applier.api(), &to_read, ns).await?;
    for secret in plan.to_create {
        let name = secret.name_any();
        if read.get(&name).is_none_or(Option::is_none) {
            let created = applier.create_secret(secret).await?;
            read.insert(name, created);
        }
    }
    let checked = secrets::check(&read, &plan.refs, &plan.checksum_key, ns);
    let mut secrets_ok = checked.problems.is_empty();
    seen.problems.extend(checked.problems);
    if secrets_ok {
        let password = plan
            .endpoint
            .password
            .as_ref()
            .and_then(|r| checked.values.get(&(r.name.clone(), r.key.clone())));
        let url = match resources::redis_url_secret(app, &ctx.config, password.map(Vec::as_slice)) {
            Ok(s) => s,
            Err(e) => return Ok(Converged::InvalidSpec(e)),
        };
        let live = read.get(&plan.redis_url.name).and_then(Option::as_ref);
        secrets_ok = applier
            .apply_secret(url, live, &plan.redis_url.key, &mut seen.problems)
            .await?;
    }

    let inputs = Inputs {
        secrets_digest: checked.digest,
    };
    let children = match resources::build(app, &ctx.config, &inputs) {
        Ok(c) => c,
        Err(e) => return Ok(Converged::InvalidSpec(e)),
    };
    let problems = &mut seen.problems;
    if let Some(redis) = &children.redis {
        seen.redis = Some(applier.apply(redis.statefulset.clone(), problems).await?);
        applier.apply(redis.service.clone(), problems).await?;
        if let Some(np) = &redis.network_policy {
            applier.apply(np.clone(), problems).await?;
        }
        if let Some(pdb) = &redis.pdb {
            applier.apply(pdb.clone(), problems).await?;
        }
    }
    // With a Secret the pods read missing, new pods could not start: leave the running
    // Deployment as it is until the Secret exists.
    if let (Some(d), true) = (&children.deployment, secrets_ok) {
        seen.deployment = applier.apply(d.clone(), problems).await?;
    }
    if let Some(svc) = &children.service {
        applier.apply(svc.clone(), problems).await?;
    }
    if let Some(h) = &children.hpa {
        seen.hpa = applier.apply(h.clone(), problems).await?;
    }
    if let Some(p) = &children.pdb {
        applier.apply(p.clone(), problems).await?;
    }
    if !children.keda.is_empty() {
        let scaled = scaled_object_resource();
        if applier.serves(&scaled).await? {
            for obj in &children.keda {
                let resource = match obj.types.as_ref() {
                    Some(t) if t.kind == scaled.kind => scaled.clone(),
                    _ => trigger_authentication_resource(),
                };
                applier
                    .apply_dynamic(obj.clone(), &resource, problems)
                    .await?;
            }
        } else {
            seen.keda_missing = true;
        }
    }
    applier.delete_unwanted(&children).await?;
    // KEDA's kinds are looked at only where the app uses KEDA or used it last: listing them
    // for every app would cost a request each, and fail where KEDA is not installed.
    let used_keda = app
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .is_some_and(|a| a.engine == AutoscalingEngine::KEDA);
    if used_keda || !children.keda.is_empty() {
        for resource in [scaled_object_resource(), trigger_authentication_resource()] {
            applier
                .delete_unwanted_dynamic(&children, &resource)
                .await?;
        }
    }
    let api_token = plan
        .api_token
        .and_then(|r| checked.values.get(&(r.name, r.key)).cloned());
    Ok(Converged::Done { api_token })
}

/// A spec the API server should have refused (say, an older CRD without the CEL rules):
/// report it and apply nothing.
async fn invalid_spec(app: &RealtimeApp, ctx: &Context, e: BuildError) -> Result<Action, Error> {
    let observed = Observed {
        problems: vec![Problem {
            reason: Reason::InvalidSpec,
            message: e.to_string(),
        }],
        ..Observed::default()
    };
    write_status(app, &observed, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

/// Writes the status when it differs from the stored one; returns whether the app is Ready.
async fn write_status(
    app: &RealtimeApp,
    observed: &Observed,
    ctx: &Context,
) -> Result<bool, Error> {
    let new = status::status(app, observed, (ctx.clock)());
    let ready = status::is_ready(&new);
    if app.status.as_ref() == Some(&new) {
        return Ok(ready);
    }
    let was_ready = app.status.as_ref().map(status::is_ready);
    patch_status(&ctx.client, app, &new)
        .await
        .map_err(|source| Error::Status {
            object: ObjectName::of(app),
            source,
        })?;
    ctx.metrics.writes.inc();
    if was_ready != Some(ready) {
        let note = status::condition(&new, ConditionType::Ready)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default();
        let (type_, reason) = if ready {
            (EventType::Normal, EventReason::Ready)
        } else {
            (EventType::Warning, EventReason::NotReady)
        };
        ctx.event(app, type_, reason, note).await;
    }
    Ok(ready)
}

/// Writes `status` through the status subresource with server-side apply.
pub async fn patch_status(
    client: &Client,
    app: &RealtimeApp,
    status: &RealtimeAppStatus,
) -> Result<(), kube::Error> {
    let api: Api<RealtimeApp> =
        Api::namespaced(client.clone(), &app.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": RealtimeApp::api_version(&()),
        "kind": RealtimeApp::kind(&()),
        "status": status,
    });
    api.patch_status(
        &app.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Now, to the second: the API server stores condition times in seconds, and equal inputs
/// must give an equal status for a no-op reconcile to write nothing.
pub fn now_seconds() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}
