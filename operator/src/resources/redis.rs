//! The managed Redis: password Secret, StatefulSet, Service, NetworkPolicy, and with
//! several buses a PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec},
        core::v1::{
            Affinity, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
            ExecAction, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, Secret, SecretKeySelector, Service, ServicePort, ServiceSpec,
            TCPSocketAction, TopologySpreadConstraint, Volume, VolumeMount,
            WeightedPodAffinityTerm,
        },
        networking::v1::{
            NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
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
    App, BuildError, IMMUTABLE_ANNOTATION, random_token, restricted_container, restricted_pod,
};
use crate::crd::{Flavor, MAX_REDIS_REPLICAS, RedisMode};

const COMPONENT: &str = "redis";
const PORT: i32 = 6379;
/// Redis runs as a high UID (above 10000, clear of any host user): it writes only to the
/// `emptyDir` at `/data`, which `fsGroup` makes writable, so it needs no user of the image (the
/// official images switch to their `redis` user, 999, only when started as root).
const REDIS_UID: i64 = 10999;

/// The objects of a managed Redis (the password Secret is generated separately).
#[derive(Debug, Clone)]
pub struct ManagedRedis {
    pub statefulset: StatefulSet,
    pub service: Service,
    pub network_policy: Option<NetworkPolicy>,
    /// With several buses: at most one down at a time through voluntary disruptions.
    pub pdb: Option<PodDisruptionBudget>,
}

pub fn managed(a: &App<'_>) -> Result<ManagedRedis, BuildError> {
    let n = buses(a)?;
    Ok(ManagedRedis {
        statefulset: statefulset(a, n)?,
        service: service(a, n),
        network_policy: a.app.spec.network_policy.enabled.then(|| network_policy(a)),
        pdb: (n > 1).then(|| super::pdb(a, a.redis_name(), COMPONENT, 1)),
    })
}

/// How many Redis buses the app wants (`spec.redis.replicas`), refusing what the CRD's
/// bounds and CEL rules refuse, for a CRD older than them.
pub fn buses(a: &App<'_>) -> Result<i32, BuildError> {
    let redis = &a.app.spec.redis;
    let n = redis.replicas;
    if !(1..=MAX_REDIS_REPLICAS).contains(&n) {
        return Err(BuildError::RedisReplicasOutOfRange(n));
    }
    if n > 1 && a.flavor() != Flavor::Chorus {
        return Err(BuildError::RedisReplicasNeedChorus(a.flavor().as_str()));
    }
    if n > 1 && redis.mode != RedisMode::Managed {
        return Err(BuildError::RedisReplicasNeedManaged);
    }
    Ok(n)
}

/// Marks `meta` with the values of fields the API server will not change in place
/// (see [`IMMUTABLE_ANNOTATION`]).
fn immutable(meta: &mut ObjectMeta, fields: &str) {
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(IMMUTABLE_ANNOTATION.into(), fields.into());
}

/// Redis's resources when `spec.redis.resources` is omitted: enough for a pub/sub bus, and
/// a memory limit so that one app's Redis cannot take a node's memory.
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("50m".into())),
            ("memory".into(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity("256Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The share of the memory limit Redis may fill with data (`--maxmemory`): the rest is for
/// client buffers (pub/sub output buffers are not counted against maxmemory until they are
/// freed), fragmentation and the process itself.
const MAXMEMORY_PERCENT: u64 = 80;

/// `--maxmemory` for these resources: 80 % of the memory limit, None without a limit.
pub fn maxmemory(resources: &ResourceRequirements) -> Result<Option<u64>, BuildError> {
    let Some(limit) = resources.limits.as_ref().and_then(|l| l.get("memory")) else {
        return Ok(None);
    };
    let bytes = quantity_bytes(&limit.0).ok_or_else(|| BuildError::InvalidQuantity {
        field: "spec.redis.resources.limits.memory",
        value: limit.0.clone(),
    })?;
    Ok(Some(bytes / 100 * MAXMEMORY_PERCENT))
}

/// A Kubernetes quantity in bytes (`256Mi`, `1G`, `1.5Gi`, `5e8`, `1024`), rounded down.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp => {
            let e: i32 = exp.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(e)
        }
    };
    let bytes = (number * factor).floor();
    // `as` saturates; a NaN cannot come from a parsed finite number times a finite factor.
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

/// `<name>-redis` with key `password`: random, URL-safe, created once.
pub fn password_secret(a: &App<'_>) -> Secret {
    Secret {
        metadata: a.meta(a.redis_name(), COMPONENT),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([("password".into(), random_token(32))])),
        ..Secret::default()
    }
}

fn statefulset(a: &App<'_>, n: i32) -> Result<StatefulSet, BuildError> {
    let spec = &a.app.spec.redis;
    let resources = spec.resources.clone().unwrap_or_else(default_resources);
    let mut args = [
        "--requirepass",
        "$(REDIS_PASSWORD)",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(String::from)
    .to_vec();
    if let Some(bytes) = maxmemory(&resources)? {
        // chorus-server keeps each room's history in Redis streams: a stream evicted
        // silently would let a resume claim messages it no longer has, so a full Redis
        // refuses the write and the publisher is told. The Sails and Socket.IO adapters
        // keep nothing there that cannot be rebuilt: evict the least recently used key
        // rather than refuse writes.
        let policy = match a.flavor() {
            Flavor::Chorus => "noeviction",
            Flavor::Sails | Flavor::Socketio => "allkeys-lru",
        };
        args.extend([
            "--maxmemory".to_owned(),
            bytes.to_string(),
            "--maxmemory-policy".to_owned(),
            policy.to_owned(),
        ]);
    }
    let password = EnvVar {
        name: "REDIS_PASSWORD".into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: a.redis_name(),
                key: "password".into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    };
    // The password reaches redis-server and redis-cli through the environment
    // (`$(VAR)` expansion, REDISCLI_AUTH), never through the pod spec.
    let container = Container {
        name: "redis".into(),
        image: Some(
            spec.image
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| a.config.redis_image.clone()),
        ),
        args: Some(args),
        env: Some(vec![
            password,
            EnvVar {
                name: "REDISCLI_AUTH".into(),
                value: Some("$(REDIS_PASSWORD)".into()),
                value_from: None,
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(["redis-cli", "ping"].map(String::from).to_vec()),
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(2),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(PORT),
                host: None,
            }),
            initial_delay_seconds: Some(5),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        resources: Some(resources),
        security_context: Some(restricted_container(true)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let mut metadata = a.meta(a.redis_name(), COMPONENT);
    let several = n > 1;
    if several {
        immutable(&mut metadata, "podManagementPolicy=Parallel");
    }
    Ok(StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(n),
            // Independent buses need no order: one that is down must not hold back another
            // from starting (as OrderedReady would).
            pod_management_policy: several.then(|| "Parallel".into()),
            service_name: Some(a.redis_name()),
            selector: LabelSelector {
                match_labels: Some(a.selector(COMPONENT)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(a.labels(COMPONENT)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    affinity: several.then(|| spread_affinity(a)),
                    topology_spread_constraints: several.then(|| spread_zones(a)),
                    security_context: Some(restricted_pod(REDIS_UID)),
                    automount_service_account_token: Some(false),
                    volumes: Some(vec![Volume {
                        name: "data".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

/// Several buses on one node would all go with it: prefer a node without another.
fn spread_affinity(a: &App<'_>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(a.selector(COMPONENT)),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// And across zones where the nodes have them; preferred only, so that a cluster with
/// fewer nodes or zones than buses still runs them all.
fn spread_zones(a: &App<'_>) -> Vec<TopologySpreadConstraint> {
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(a.selector(COMPONENT)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }]
}

/// One bus: a ClusterIP Service, as always. Several: headless, so that each pod has a DNS
/// name (`<name>-redis-<i>.<name>-redis.<ns>.svc`) and REDIS_URL reaches every one.
fn service(a: &App<'_>, n: i32) -> Service {
    let mut metadata = a.meta(a.redis_name(), COMPONENT);
    let headless = n > 1;
    if headless {
        immutable(&mut metadata, "clusterIP=None");
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".into()),
            selector: Some(a.selector(COMPONENT)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: PORT,
                target_port: Some(IntOrString::String("redis".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Ingress to the Redis pods only from this app's server pods, on the Redis port.
fn network_policy(a: &App<'_>) -> NetworkPolicy {
    NetworkPolicy {
        metadata: a.meta(a.redis_name(), COMPONENT),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(a.selector(COMPONENT)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(a.selector(super::server::COMPONENT)),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(PORT)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}
