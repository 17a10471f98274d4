//! The server side: Deployment, Service, PodDisruptionBudget, and
//! the generated API-token and JWT Secrets.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            ClientIPConfig, Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec,
            Probe, ResourceRequirements, Secret, Service, ServicePort, ServiceSpec,
            SessionAffinityConfig, TCPSocketAction,
        },
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::{
    App, BuildError, CHECKSUM_ANNOTATION, Inputs, digest,
    env::{RedisEndpoint, container_env},
    random_token, restricted_container, restricted_pod,
};
use crate::crd::{Flavor, SessionAffinity};

pub const COMPONENT: &str = "server";
/// The window of the Service's `sessionAffinity: ClientIP` for chorus-server, in seconds:
/// longer than a long-polling session's heartbeat (25 s + 20 s), whose polls may each come on a
/// new connection and must stay on one pod, and short enough that a client shed by
/// rebalancing is not kept away for long (chorus-server asks it to wait this out, see
/// `REBALANCE_AFFINITY_SECONDS`). Kubernetes' own default, kept for the other flavors, is
/// three hours.
pub const AFFINITY_SECONDS: i32 = 60;
/// chorus-server's image runs as this non-root user.
const CHORUS_UID: i64 = 65532;
/// The `node` user of the official Node.js images, which Sails and Socket.IO apps build on.
const NODE_UID: i64 = 1000;

/// `<name>-api-token` with key `token`: random, created once.
pub fn api_token_secret(a: &App<'_>) -> Secret {
    Secret {
        metadata: a.meta(a.api_token_name(), COMPONENT),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([("token".into(), random_token(40))])),
        ..Secret::default()
    }
}

/// `<name>-jwt` with key `secret`: a random HS256 key (64 letters and digits, about 380
/// bits), created once.
pub fn jwt_secret(a: &App<'_>) -> Secret {
    Secret {
        metadata: a.meta(a.jwt_name(), COMPONENT),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([("secret".into(), random_token(64))])),
        ..Secret::default()
    }
}

/// `<name>-checksum-key` with key `key`: the random key of the pod template's checksum
/// (src/secrets.rs), created once.
pub fn checksum_key_secret(a: &App<'_>) -> Secret {
    let key = a.checksum_key_ref();
    Secret {
        metadata: a.meta(key.name, COMPONENT),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(key.key, random_token(43))])),
        ..Secret::default()
    }
}

/// chorus-server's resources when `spec.resources` is omitted: requests, so that the
/// scheduler counts the pods and an HPA has a CPU request to measure utilization against.
/// No limits: a CPU limit throttles a latency-bound server, and its memory grows with its
/// connections (up to `limits.maxConnections`), which only the user can size. Sails and
/// Socket.IO apps are the user's own images: nothing is assumed for them.
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("100m".into())),
            ("memory".into(), Quantity("128Mi".into())),
        ])),
        ..ResourceRequirements::default()
    }
}

fn image(a: &App<'_>) -> Result<String, BuildError> {
    match a.app.spec.image.as_deref().filter(|i| !i.is_empty()) {
        Some(image) => Ok(image.to_owned()),
        None if a.flavor() == Flavor::Chorus => Ok(a.config.server_image.clone()),
        None => Err(BuildError::MissingImage(a.flavor().as_str())),
    }
}

fn probes(a: &App<'_>) -> (Option<Probe>, Option<Probe>) {
    match a.flavor() {
        // chorus-server: alive while the process runs; ready while it can serve and is not draining.
        Flavor::Chorus => {
            let http = |path: &str| HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            };
            (
                Some(Probe {
                    http_get: Some(http("/healthz")),
                    period_seconds: Some(10),
                    ..Probe::default()
                }),
                Some(Probe {
                    http_get: Some(http("/readyz")),
                    period_seconds: Some(2),
                    ..Probe::default()
                }),
            )
        }
        // Another app's health endpoints are unknown: ready once it accepts connections.
        Flavor::Sails | Flavor::Socketio => (
            None,
            Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::String("http".into()),
                    host: None,
                }),
                period_seconds: Some(5),
                ..Probe::default()
            }),
        ),
    }
}

pub fn deployment(
    a: &App<'_>,
    redis: &RedisEndpoint,
    inputs: &Inputs,
) -> Result<Deployment, BuildError> {
    let spec = &a.app.spec;
    let env = container_env(a, redis);
    let port = a.container_port();
    // The checksum covers what the operator injects and the secret values behind it, so a
    // change of either rolls the pods, and nothing else does. The Redis buses besides
    // REDIS_HOST are in it too (their list reaches the pods only inside REDIS_URL); a single
    // Redis adds nothing, so its checksum is the one it always was.
    let env_json = serde_json::to_vec(&env).unwrap_or_default();
    let port_text = port.to_string();
    let checksum = digest(
        [
            env_json.as_slice(),
            port_text.as_bytes(),
            inputs.secrets_digest.as_bytes(),
        ]
        .into_iter()
        .chain(redis.other_buses().map(str::as_bytes)),
    );
    let (liveness, readiness) = probes(a);
    let chorus = a.flavor() == Flavor::Chorus;
    let container = Container {
        name: COMPONENT.into(),
        image: Some(image(a)?),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: liveness,
        readiness_probe: readiness,
        resources: spec
            .resources
            .clone()
            .or_else(|| chorus.then(default_resources)),
        // chorus-server writes nothing; Node apps often write temp or cache files.
        security_context: Some(restricted_container(chorus)),
        ..Container::default()
    };
    let pod = spec.pod.clone().unwrap_or_default();
    let mut labels = pod.labels.clone();
    labels.extend(a.labels(COMPONENT));
    let mut annotations = pod.annotations.clone();
    annotations.insert(CHECKSUM_ANNOTATION.into(), checksum);
    let pod_spec = PodSpec {
        containers: vec![container],
        security_context: Some(restricted_pod(if chorus { CHORUS_UID } else { NODE_UID })),
        node_selector: (!pod.node_selector.is_empty()).then_some(pod.node_selector),
        tolerations: (!pod.tolerations.is_empty()).then_some(pod.tolerations),
        affinity: pod.affinity,
        topology_spread_constraints: (!pod.topology_spread_constraints.is_empty())
            .then_some(pod.topology_spread_constraints),
        image_pull_secrets: (!pod.image_pull_secrets.is_empty()).then_some(pod.image_pull_secrets),
        service_account_name: pod.service_account_name,
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(grace_period(a)),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: a.meta(a.name.clone(), COMPONENT),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(a.selector(COMPONENT)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            // A new pod is ready before an old one stops taking sockets: capacity never
            // drops during a rollout, and one extra pod at a time keeps the surge small.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// chorus-server's shortest drain (and its DRAIN_SECONDS default).
pub const DEFAULT_DRAIN_SECONDS: i64 = 5;
/// chorus-server's `DRAIN_RATE` default: the most sockets a draining replica closes a second.
pub const DRAIN_RATE: i64 = 1000;
/// chorus-server's `MAX_CONNECTIONS` default.
pub const SERVER_MAX_CONNECTIONS: i64 = 100_000;
/// After the drain, chorus-server closes its sockets (up to 5 s); the rest is margin.
pub const GRACE_AFTER_DRAIN: i64 = 15;
/// The other flavors: Kubernetes' default.
const OTHER_GRACE_SECONDS: i64 = 30;

/// The DRAIN_SECONDS the operator gives chorus-server: long enough that a replica holding
/// all the sockets it may (`limits.maxConnections`) closes them at [`DRAIN_RATE`] a second at
/// most. Its closes fall in the last four fifths of the drain, hence / 0.8. A replica holding
/// fewer drains sooner (the server sizes its drain by the sockets it holds).
pub fn drain_seconds(a: &App<'_>) -> i64 {
    let max = a
        .app
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.max_connections)
        .map_or(SERVER_MAX_CONNECTIONS, i64::from);
    let per_second = DRAIN_RATE * 8;
    let needed = max.max(0).saturating_mul(10).saturating_add(per_second - 1) / per_second;
    needed.max(DEFAULT_DRAIN_SECONDS)
}

/// The termination grace period: for chorus-server, its longest drain (DRAIN_SECONDS from
/// `spec.env` when set there as a number, else [`drain_seconds`]) plus
/// [`GRACE_AFTER_DRAIN`], so that the kubelet never kills a pod still draining.
pub fn grace_period(a: &App<'_>) -> i64 {
    if a.flavor() != Flavor::Chorus {
        return OTHER_GRACE_SECONDS;
    }
    let drain = a
        .app
        .spec
        .env
        .iter()
        .rev()
        .find(|e| e.name == "DRAIN_SECONDS")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|d| *d >= 0)
        .unwrap_or_else(|| drain_seconds(a));
    drain.saturating_add(GRACE_AFTER_DRAIN)
}

pub fn service(a: &App<'_>) -> Service {
    let spec = &a.app.spec.service;
    let mut meta = a.meta(a.name.clone(), COMPONENT);
    if !spec.annotations.is_empty() {
        meta.annotations = Some(spec.annotations.clone());
    }
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(format!("{:?}", spec.type_)),
            selector: Some(a.selector(COMPONENT)),
            session_affinity: Some(match spec.session_affinity {
                SessionAffinity::ClientIP => "ClientIP".into(),
                SessionAffinity::None => "None".into(),
            }),
            session_affinity_config: (spec.session_affinity == SessionAffinity::ClientIP
                && a.app.spec.flavor == Flavor::Chorus)
                .then_some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(AFFINITY_SECONDS),
                    }),
                }),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: spec.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A PodDisruptionBudget whenever more than one replica is wanted.
pub fn pdb(a: &App<'_>) -> Option<PodDisruptionBudget> {
    (a.app.spec.replicas > 1).then(|| {
        super::pdb(
            a,
            a.name.clone(),
            COMPONENT,
            a.app.spec.disruption_budget.max_unavailable,
        )
    })
}
