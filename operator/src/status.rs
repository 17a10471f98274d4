//! Status: conditions and counts, computed from what the operator observed (pure).

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    autoscale,
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
    /// The HPA (engine HPA), for its status.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// engine KEDA: the API does not serve KEDA's kinds.
    pub keda_missing: bool,
    /// What the autoscaler reported, when autoscaling is on and it got to report.
    pub autoscaling: Option<autoscale::Report>,
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

    // (wanted, ready) Redis buses of a managed Redis; an external one is not probed and
    // counts as up. A StatefulSet still scaling down may report more ready than wanted.
    let buses = seen.redis.as_ref().map(|sts| {
        let wanted = app.spec.redis.replicas.max(1);
        let ready = sts
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            .clamp(0, wanted);
        (wanted, ready)
    });
    let redis_up = buses.is_none_or(|(_, ready)| ready >= 1);
    let endpoint = &seen.redis_endpoint;
    let redis_ready = match buses {
        None => verdict(
            true,
            Reason::ExternalRedis,
            format!("using the external Redis at {endpoint} (not probed)"),
        ),
        Some((1, 1)) => verdict(
            true,
            Reason::RedisReady,
            format!("Redis at {endpoint} is ready"),
        ),
        Some((1, _)) => verdict(
            false,
            Reason::RedisNotReady,
            "waiting for the Redis pod to be ready",
        ),
        Some((n, ready)) => {
            let message = format!("{ready} of {n} Redis buses ready");
            match ready {
                0 => verdict(false, Reason::RedisNotReady, message),
                r if r < n => verdict(true, Reason::SomeBusesDown, message),
                _ => verdict(true, Reason::RedisReady, message),
            }
        }
    };
    // Some buses down but not all: the app runs on the others (Ready stays True), and a
    // person should look.
    let buses_down = buses
        .filter(|&(n, ready)| ready >= 1 && ready < n)
        .map(|(n, ready)| format!("{} of {n} Redis buses down", n - ready));

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

    // Degraded is True for a problem, or for some Redis buses down; Ready is False with a
    // problem's first cause (not for buses down while one is up).
    let degraded = if let Some(p) = seen.problems.first() {
        let mut message = join(&seen.problems);
        if let Some(down) = &buses_down {
            message = format!("{message}; {down}");
        }
        verdict(true, p.reason, message)
    } else if let Some(down) = buses_down {
        verdict(true, Reason::SomeBusesDown, down)
    } else {
        verdict(false, Reason::AsExpected, "no problems found")
    };
    let summary = if let Some(p) = seen.problems.first() {
        verdict(false, p.reason, join(&seen.problems))
    } else if !redis_ready.ok {
        verdict(false, redis_ready.reason, redis_ready.message.clone())
    } else if !servers.ok {
        verdict(false, servers.reason, servers.message.clone())
    } else {
        let redis = match buses {
            Some((n, up)) if n > 1 => format!("{up} of {n} Redis buses ready"),
            _ => "Redis ready".to_owned(),
        };
        verdict(
            true,
            Reason::Ready,
            format!("{ready}/{desired} server replicas ready, {redis}"),
        )
    };

    let previous = app
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let (autoscaling, autoscaling_status) = autoscaling(app, seen, previous);
    let conditions = [
        (ConditionType::Ready, summary),
        (ConditionType::RedisReady, redis_ready),
        (ConditionType::ServersAvailable, servers),
        (ConditionType::Progressing, progressing),
        (ConditionType::Degraded, degraded),
        (ConditionType::AutoscalingReady, autoscaling),
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
            buses: buses.map(|(n, _)| n),
            ready_buses: buses.map(|(_, ready)| ready),
        }),
        autoscaling: autoscaling_status,
        conditions,
    }
}

/// The AutoscalingReady condition and `status.autoscaling`: off, what the autoscaler
/// reported, or (a reconcile that failed before it reported) what the last status said.
fn autoscaling(
    app: &RealtimeApp,
    seen: &Observed,
    previous: &[Condition],
) -> (Verdict, Option<crate::crd::AutoscalingStatus>) {
    if !app.spec.autoscaling.enabled {
        let off = "autoscaling is off: spec.replicas is set by hand (kubectl scale)";
        return (verdict(true, Reason::Disabled, off), None);
    }
    if let Some(report) = &seen.autoscaling {
        let v = verdict(report.ready, report.reason, report.message.clone());
        return (v, Some(report.status.clone()));
    }
    let kept = app.status.as_ref().and_then(|s| s.autoscaling.clone());
    let last = previous
        .iter()
        .find(|c| c.type_ == ConditionType::AutoscalingReady.as_str())
        .and_then(|c| {
            let reason = Reason::ALL.iter().find(|r| r.as_str() == c.reason)?;
            Some(verdict(c.status == "True", *reason, c.message.clone()))
        })
        .filter(|v| v.reason != Reason::Disabled);
    let v = last.unwrap_or_else(|| verdict(false, Reason::NoReadings, "not read yet"));
    (v, kept.filter(|k| k.engine == app.spec.autoscaling.engine))
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
