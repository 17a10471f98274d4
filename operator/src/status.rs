//! Status: conditions and counts, computed from what the operator observed (pure).

use k8s_openapi::{
    api::apps::v1::{Deployment, StatefulSet},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::crd::{RealtimeApp, RealtimeAppStatus, RedisStatus};

pub const READY: &str = "Ready";
pub const REDIS_READY: &str = "RedisReady";
pub const SERVERS_AVAILABLE: &str = "ServersAvailable";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Something that keeps the app from working, as the Degraded condition reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A CamelCase reason: `SecretNotFound`, `SecretKeyNotFound`, `InvalidSpec`, `ApplyFailed`.
    pub reason: &'static str,
    pub message: String,
}

/// What the operator saw of the app's children on this reconcile.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub deployment: Option<Deployment>,
    /// None for an external Redis.
    pub redis: Option<Option<StatefulSet>>,
    pub redis_endpoint: String,
    pub problems: Vec<Problem>,
}

fn cond(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// The label selector string of the server pods (for the scale subresource).
pub fn selector(app: &RealtimeApp) -> String {
    format!(
        "app.kubernetes.io/component=server,app.kubernetes.io/instance={}",
        app.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The whole status. `now` stamps conditions whose status flipped; the others keep their
/// lastTransitionTime from `app.status`.
pub fn status(app: &RealtimeApp, seen: &Observed, now: Time) -> RealtimeAppStatus {
    let generation = app.metadata.generation;
    let desired = app.spec.replicas;
    let dstatus = seen
        .deployment
        .as_ref()
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let replicas = dstatus.replicas.unwrap_or(0);
    let ready = dstatus.ready_replicas.unwrap_or(0);
    let updated = dstatus.updated_replicas.unwrap_or(0);
    let available = dstatus.available_replicas.unwrap_or(0);
    let deployment_current = seen.deployment.as_ref().is_some_and(|d| {
        d.metadata.generation.is_some() && dstatus.observed_generation >= d.metadata.generation
    });

    // An external Redis is not probed: it counts as up.
    let redis_up = match &seen.redis {
        None => true,
        Some(sts) => {
            sts.as_ref()
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                >= 1
        }
    };
    let redis_ready = match (&seen.redis, redis_up) {
        (None, _) => cond(
            REDIS_READY,
            true,
            "ExternalRedis",
            format!(
                "using the external Redis at {} (not probed)",
                seen.redis_endpoint
            ),
        ),
        (Some(_), true) => cond(
            REDIS_READY,
            true,
            "RedisReady",
            format!("Redis at {} is ready", seen.redis_endpoint),
        ),
        (Some(_), false) => cond(
            REDIS_READY,
            false,
            "RedisNotReady",
            "waiting for the Redis pod to be ready".into(),
        ),
    };

    let servers = if seen.deployment.is_none() {
        cond(
            SERVERS_AVAILABLE,
            false,
            "DeploymentMissing",
            "the server Deployment does not exist yet".into(),
        )
    } else if desired == 0 {
        cond(
            SERVERS_AVAILABLE,
            true,
            "ScaledToZero",
            "0 replicas wanted".into(),
        )
    } else if available >= 1 && ready >= 1 {
        cond(
            SERVERS_AVAILABLE,
            true,
            "ReplicasAvailable",
            format!("{ready}/{desired} server replicas ready"),
        )
    } else {
        cond(
            SERVERS_AVAILABLE,
            false,
            "NoReplicasAvailable",
            format!("{ready}/{desired} server replicas ready"),
        )
    };

    let rolling = seen.deployment.is_some()
        && (!deployment_current || updated < desired || replicas > updated || ready < desired);
    let progressing = if rolling {
        cond(
            PROGRESSING,
            true,
            "RollingOut",
            format!("{updated}/{desired} replicas updated, {ready} ready"),
        )
    } else if seen.deployment.is_none() {
        cond(
            PROGRESSING,
            false,
            "Waiting",
            "nothing to roll out yet".into(),
        )
    } else {
        cond(
            PROGRESSING,
            false,
            "RolloutComplete",
            format!("{desired} replicas up to date"),
        )
    };

    let degraded = match seen.problems.first() {
        Some(p) => cond(DEGRADED, true, p.reason, join(&seen.problems)),
        None => cond(DEGRADED, false, "AsExpected", "no problems found".into()),
    };

    let all_ok =
        redis_ready.status == "True" && servers.status == "True" && seen.problems.is_empty();
    let summary = if all_ok {
        cond(
            READY,
            true,
            "Ready",
            format!("{ready}/{desired} server replicas ready, Redis ready"),
        )
    } else if let Some(p) = seen.problems.first() {
        cond(READY, false, p.reason, join(&seen.problems))
    } else if redis_ready.status != "True" {
        cond(
            READY,
            false,
            &redis_ready.reason,
            redis_ready.message.clone(),
        )
    } else {
        cond(READY, false, &servers.reason, servers.message.clone())
    };

    let previous = app
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [summary, redis_ready, servers, progressing, degraded]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            c
        })
        .collect();

    let ns = app.metadata.namespace.as_deref().unwrap_or("default");
    let name = app.metadata.name.as_deref().unwrap_or_default();
    RealtimeAppStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        selector: Some(selector(app)),
        endpoint: Some(format!("{name}.{ns}.svc:{}", app.spec.service.port)),
        redis: Some(RedisStatus {
            endpoint: seen.redis_endpoint.clone(),
            ready: redis_up,
        }),
        conditions,
    }
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The condition of a type, if present.
pub fn condition<'a>(status: &'a RealtimeAppStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}
