//! The managed Redis: password Secret, StatefulSet, Service, NetworkPolicy.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
            PodSpec, PodTemplateSpec, Probe, Secret, SecretKeySelector, Service, ServicePort,
            ServiceSpec, TCPSocketAction, Volume, VolumeMount,
        },
        networking::v1::{
            NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{App, random_token, restricted_container, restricted_pod};

const COMPONENT: &str = "redis";
const PORT: i32 = 6379;
/// The `redis` user of the official Redis images.
const REDIS_UID: i64 = 999;

/// The objects of a managed Redis (the password Secret is generated separately).
#[derive(Debug, Clone)]
pub struct ManagedRedis {
    pub statefulset: StatefulSet,
    pub service: Service,
    pub network_policy: Option<NetworkPolicy>,
}

pub fn managed(a: &App<'_>) -> ManagedRedis {
    ManagedRedis {
        statefulset: statefulset(a),
        service: service(a),
        network_policy: a.app.spec.network_policy.enabled.then(|| network_policy(a)),
    }
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

fn statefulset(a: &App<'_>) -> StatefulSet {
    let spec = &a.app.spec.redis;
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
        args: Some(
            [
                "--requirepass",
                "$(REDIS_PASSWORD)",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from)
            .to_vec(),
        ),
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
        resources: spec.resources.clone(),
        security_context: Some(restricted_container(true)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    StatefulSet {
        metadata: a.meta(a.redis_name(), COMPONENT),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(a.redis_name()),
            selector: LabelSelector {
                match_labels: Some(a.selector(COMPONENT)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    labels: Some(a.labels(COMPONENT)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
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
    }
}

fn service(a: &App<'_>) -> Service {
    Service {
        metadata: a.meta(a.redis_name(), COMPONENT),
        spec: Some(ServiceSpec {
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
