//! One reconcile of one RealtimeApp: make the generated Secrets, check the referenced ones,
//! apply what changed (server-side apply, field manager `chorus-operator`, force), delete
//! what is no longer wanted, and write the status when it changed. A reconcile that finds
//! nothing to do writes nothing.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{Secret, Service},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
    },
};
use serde_json::json;

use crate::{
    cache::{Cached, Caches},
    conditions::{ConditionType, Reason},
    crd::{RealtimeApp, RealtimeAppStatus, SecretKeyRef},
    metrics::Metrics,
    resources::{
        self, App, BuildError, Inputs, MANAGER, OperatorConfig, digest,
        env::{RedisEndpoint, secret_refs},
    },
    status::{self, Observed, Problem},
};

/// The hash of what the operator last applied to a child; equal hash, nothing to apply.
pub const APPLIED_ANNOTATION: &str = "chorus.rs/applied-hash";

/// While a referenced Secret is missing, look again this often (Secrets the user creates
/// are not owned, so no watch event brings them).
const RECHECK: Duration = Duration::from_secs(15);
/// While the app is not ready yet.
const WAITING: Duration = Duration::from_secs(30);
/// Periodic resync of a healthy app.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The controller's watch caches of the children; without them, children are read
    /// from the API.
    caches: Option<Caches>,
    /// Consecutive failures per app, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Stamps condition transitions.
    clock: Clock,
}

/// Where condition times come from: [`now_seconds`], or a test's own clock.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            config,
            recorder,
            metrics,
            caches: None,
            failures: Mutex::new(HashMap::new()),
            clock: Arc::new(now_seconds),
        }
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

    /// The live child `name`, from the caches when there are any.
    async fn live<K: Cached>(
        &self,
        api: &Api<K>,
        ns: &str,
        name: &str,
    ) -> Result<Option<K>, Error> {
        if let Some(caches) = &self.caches
            && let Some(cached) = caches.get(ns, name).await
        {
            return Ok(cached);
        }
        Ok(api.get_opt(name).await?)
    }

    async fn event(&self, app: &RealtimeApp, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // Events help people; failing to record one must not fail the reconcile.
        if let Err(e) = self.recorder.publish(&event, &app.object_ref(&())).await {
            tracing::debug!("could not record an event: {e}");
        }
    }
}

fn key(app: &RealtimeApp) -> String {
    format!("{}/{}", app.namespace().unwrap_or_default(), app.name_any())
}

/// The controller's reconcile function.
pub async fn reconcile(app: Arc<RealtimeApp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_app(&app, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.is_err());
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
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key(&app)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay =
        Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(app = %key(&app), attempt = n, retry_in = ?delay, "reconcile failed: {error}");
    let note = error.to_string();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        ctx.event(&app, EventType::Warning, "ReconcileFailed", note)
            .await;
    });
    Action::requeue(delay)
}

async fn reconcile_app(app: &RealtimeApp, ctx: &Context) -> Result<Action, Error> {
    let ns = app.namespace().unwrap_or_else(|| "default".into());
    let client = ctx.client.clone();
    let mut problems = Vec::new();

    let built = resources::generated(app, &ctx.config).and_then(|generated| {
        let a = App::new(app, &ctx.config)?;
        let endpoint = RedisEndpoint::of(&a)?;
        Ok((generated, secret_refs(&a, &endpoint), endpoint))
    });
    let (generated, refs, endpoint) = match built {
        Ok(b) => b,
        Err(e) => return invalid_spec(app, ctx, e).await,
    };

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for secret in [generated.redis_password, generated.api_token]
        .into_iter()
        .flatten()
    {
        create_once(&secrets, secret, app, ctx).await?;
    }
    let (secrets_digest, missing) = check_secrets(&secrets, &refs, &ns).await?;
    problems.extend(missing);

    let children = match resources::build(app, &ctx.config, &Inputs { secrets_digest }) {
        Ok(c) => c,
        Err(e) => return invalid_spec(app, ctx, e).await,
    };
    let owner_uid = app.uid().unwrap_or_default();

    let redis_name = format!("{}-redis", app.name_any());
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let np_api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let redis_sts = match &children.redis {
        Some(redis) => {
            let sts = apply(&sts_api, redis.statefulset.clone(), app, ctx).await?;
            apply(&svc_api, redis.service.clone(), app, ctx).await?;
            match &redis.network_policy {
                Some(np) => drop(apply(&np_api, np.clone(), app, ctx).await?),
                None => delete_owned(&np_api, &ns, &redis_name, &owner_uid, app, ctx).await?,
            }
            Some(Some(sts))
        }
        None => {
            delete_owned(&np_api, &ns, &redis_name, &owner_uid, app, ctx).await?;
            delete_owned(&sts_api, &ns, &redis_name, &owner_uid, app, ctx).await?;
            delete_owned(&svc_api, &ns, &redis_name, &owner_uid, app, ctx).await?;
            None
        }
    };

    let deploy_api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // With a referenced Secret missing, new pods could not start: leave the running
    // Deployment as it is until the Secret exists.
    let deployment = match (&children.deployment, problems.is_empty()) {
        (Some(d), true) => Some(apply(&deploy_api, d.clone(), app, ctx).await?),
        _ => ctx.live(&deploy_api, &ns, &app.name_any()).await?,
    };
    if let Some(svc) = &children.service {
        apply(&svc_api, svc.clone(), app, ctx).await?;
    }
    let hpa_api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    match &children.hpa {
        Some(h) => drop(apply(&hpa_api, h.clone(), app, ctx).await?),
        None => delete_owned(&hpa_api, &ns, &app.name_any(), &owner_uid, app, ctx).await?,
    }
    let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    match &children.pdb {
        Some(p) => drop(apply(&pdb_api, p.clone(), app, ctx).await?),
        None => delete_owned(&pdb_api, &ns, &app.name_any(), &owner_uid, app, ctx).await?,
    }

    let observed = Observed {
        deployment,
        redis: redis_sts,
        redis_endpoint: endpoint.address(),
        problems,
    };
    let ready = write_status(app, &observed, ctx).await?;
    Ok(if !observed.problems.is_empty() {
        Action::requeue(RECHECK)
    } else if !ready {
        Action::requeue(WAITING)
    } else {
        Action::requeue(RESYNC)
    })
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

/// Creates a generated Secret unless it exists; never updates it, so a value is never
/// rotated by accident.
async fn create_once(
    api: &Api<Secret>,
    secret: Secret,
    app: &RealtimeApp,
    ctx: &Context,
) -> Result<(), Error> {
    let name = secret.name_any();
    let ns = secret.namespace().unwrap_or_default();
    if ctx.live(api, &ns, &name).await?.is_some() {
        return Ok(());
    }
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            ctx.event(
                app,
                EventType::Normal,
                "SecretCreated",
                format!("created Secret {name}"),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()), // created meanwhile
        Err(e) => Err(e.into()),
    }
}

/// Reads every referenced Secret key: the digest of their values (so that a changed value
/// rolls the pods) and a problem for each that is missing.
async fn check_secrets(
    api: &Api<Secret>,
    refs: &[SecretKeyRef],
    ns: &str,
) -> Result<(String, Vec<Problem>), Error> {
    let mut cache: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for r in refs {
        if !cache.contains_key(&r.name) {
            cache.insert(r.name.clone(), api.get_opt(&r.name).await?);
        }
        let value = match cache.get(&r.name).and_then(Option::as_ref) {
            None => {
                problems.push(Problem {
                    reason: Reason::SecretNotFound,
                    message: format!("Secret {ns}/{} not found", r.name),
                });
                continue;
            }
            Some(secret) => secret_value(secret, &r.key),
        };
        match value {
            Some(v) => {
                parts.push(format!("{}/{}", r.name, r.key).into_bytes());
                parts.push(v);
            }
            None => problems.push(Problem {
                reason: Reason::SecretKeyNotFound,
                message: format!("Secret {ns}/{} has no key {:?}", r.name, r.key),
            }),
        }
    }
    Ok((digest(parts.iter().map(Vec::as_slice)), problems))
}

fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}

/// Applies `obj` unless the live object already carries the same applied hash. Returns the
/// live object, for its status (from the caches it has metadata and status only).
async fn apply<K: Cached>(
    api: &Api<K>,
    mut obj: K,
    app: &RealtimeApp,
    ctx: &Context,
) -> Result<K, Error> {
    let name = obj.name_any();
    let hash = digest([serde_json::to_vec(&obj).unwrap_or_default().as_slice()]);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_ANNOTATION.into(), hash.clone());
    let ns = obj.namespace().unwrap_or_default();
    let live = ctx.live(api, &ns, &name).await?;
    if let Some(live) = live.as_ref()
        && live.annotations().get(APPLIED_ANNOTATION) == Some(&hash)
    {
        return Ok(live.clone());
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await?;
    ctx.metrics.writes.inc();
    let verb = if live.is_some() { "Updated" } else { "Created" };
    ctx.event(
        app,
        EventType::Normal,
        verb,
        format!("{verb} {} {name}", K::kind(&())),
    )
    .await;
    Ok(applied)
}

/// Deletes a child this app owns and no longer wants.
async fn delete_owned<K: Cached>(
    api: &Api<K>,
    ns: &str,
    name: &str,
    owner_uid: &str,
    app: &RealtimeApp,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(live) = ctx.live(api, ns, name).await? else {
        return Ok(());
    };
    if !live.owner_references().iter().any(|o| o.uid == owner_uid) {
        return Ok(()); // someone else's object of the same name: not ours to delete
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            ctx.event(
                app,
                EventType::Normal,
                "Deleted",
                format!("deleted {} {name}", K::kind(&())),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
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
    patch_status(&ctx.client, app, &new).await?;
    ctx.metrics.writes.inc();
    if was_ready != Some(ready) {
        let note = status::condition(&new, ConditionType::Ready)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default();
        let (type_, reason) = if ready {
            (EventType::Normal, "Ready")
        } else {
            (EventType::Warning, "NotReady")
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
