//! Status: conditions and counts, computed from what the operator observed (pure).

use k8s_openapi::{
    api::apps::v1::{Deployment, StatefulSet},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    conditions::{ConditionType, Reason},
    crd::{RealtimeApp, RealtimeAppStatus, RedisStatus},
    resources::{self, server},
};

/// Something that keeps the app from working, as the Degraded condition reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
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

/// One condition before it is stamped with times and generation.
struct Verdict {
    ok: bool,
    reason: Reason,
    message: String,
}

fn verdict(ok: bool, reason: Reason, message: impl Into<String>) -> Verdict {
    Verdict {
        ok,
        reason,
        message: message.into(),
    }
}

/// The label selector string of the server pods (for the scale subresource).
pub fn selector(app: &RealtimeApp) -> String {
    let name = app.metadata.name.as_deref().unwrap_or_default();
    resources::selector_string(&resources::selector(name, server::COMPONENT))
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
    let endpoint = &seen.redis_endpoint;
    let redis_ready = match (&seen.redis, redis_up) {
        (None, _) => verdict(
            true,
            Reason::ExternalRedis,
            format!("using the external Redis at {endpoint} (not probed)"),
        ),
        (Some(_), true) => verdict(
            true,
            Reason::RedisReady,
            format!("Redis at {endpoint} is ready"),
        ),
        (Some(_), false) => verdict(
            false,
            Reason::RedisNotReady,
            "waiting for the Redis pod to be ready",
        ),
    };

    let servers = if seen.deployment.is_none() {
        verdict(
            false,
            Reason::DeploymentMissing,
            "the server Deployment does not exist yet",
        )
    } else if desired == 0 {
        verdict(true, Reason::ScaledToZero, "0 replicas wanted")
    } else if available >= 1 && ready >= 1 {
        verdict(
            true,
            Reason::ReplicasAvailable,
            format!("{ready}/{desired} server replicas ready"),
        )
    } else {
        verdict(
            false,
            Reason::NoReplicasAvailable,
            format!("{ready}/{desired} server replicas ready"),
        )
    };

    let rolling = seen.deployment.is_some()
        && (!deployment_current || updated < desired || replicas > updated || ready < desired);
    let progressing = if rolling {
        verdict(
            true,
            Reason::RollingOut,
            format!("{updated}/{desired} replicas updated, {ready} ready"),
        )
    } else if seen.deployment.is_none() {
        verdict(false, Reason::Waiting, "nothing to roll out yet")
    } else {
        verdict(
            false,
            Reason::RolloutComplete,
            format!("{desired} replicas up to date"),
        )
    };

    // Degraded is True for a problem; Ready is False with the first cause.
    let degraded = match seen.problems.first() {
        Some(p) => verdict(true, p.reason, join(&seen.problems)),
        None => verdict(false, Reason::AsExpected, "no problems found"),
    };
    let summary = if let Some(p) = seen.problems.first() {
        verdict(false, p.reason, join(&seen.problems))
    } else if !redis_ready.ok {
        verdict(false, redis_ready.reason, redis_ready.message.clone())
    } else if !servers.ok {
        verdict(false, servers.reason, servers.message.clone())
    } else {
        verdict(
            true,
            Reason::Ready,
            format!("{ready}/{desired} server replicas ready, Redis ready"),
        )
    };

    let previous = app
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [
        (ConditionType::Ready, summary),
        (ConditionType::RedisReady, redis_ready),
        (ConditionType::ServersAvailable, servers),
        (ConditionType::Progressing, progressing),
        (ConditionType::Degraded, degraded),
    ]
    .into_iter()
    .map(|(type_, v)| {
        let status = if v.ok { "True" } else { "False" };
        let last_transition_time = previous
            .iter()
            .find(|p| p.type_ == type_.as_str() && p.status == status)
            .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
        Condition {
            type_: type_.as_str().into(),
            status: status.into(),
            reason: v.reason.as_str().into(),
            message: v.message,
            last_transition_time,
            observed_generation: generation,
        }
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
pub fn condition(status: &RealtimeAppStatus, type_: ConditionType) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Whether the status says Ready=True.
pub fn is_ready(status: &RealtimeAppStatus) -> bool {
    condition(status, ConditionType::Ready).is_some_and(|c| c.status == "True")
}
