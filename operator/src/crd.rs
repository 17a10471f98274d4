//! The `RealtimeApp` custom resource (docs/operator.md, "The resource, field by field").
//!
//! Defaults live in serde (`#[serde(default ...)]`), so the API server (through the generated
//! schema) and `chorus-operator render` (through deserialization) default the same way.

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "chorus.rs";

/// One realtime app cluster: its server pods, its Redis, its Service and its scaling.
// kube's printcolumn(...) attributes repeat `type_`, which clippy misreads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "chorus.rs",
    version = "v1alpha1",
    kind = "RealtimeApp",
    plural = "realtimeapps",
    shortname = "rtapp",
    category = "chorus",
    namespaced,
    status = "RealtimeAppStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Flavor", type_ = "string", json_path = ".spec.flavor"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Redis", type_ = "string", json_path = ".spec.redis.mode"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A realtime (Socket.IO) app cluster managed by chorus-operator"
)]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || (has(self.image) && self.image != '')")
    .message("spec.image is required when spec.flavor is sails or socketio"))]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || !has(self.auth)")
    .message("spec.auth applies to flavor chorus only"))]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || !has(self.limits)")
    .message("spec.limits applies to flavor chorus only"))]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || !has(self.history)")
    .message("spec.history applies to flavor chorus only"))]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || !has(self.redis) || !has(self.redis.replicas) || self.redis.replicas == 1")
    .message("spec.redis.replicas above 1 needs flavor chorus: the sails and socketio Redis adapters speak to one Redis"))]
#[x_kube(validation = Rule::new("!has(self.redis) || !has(self.redis.replicas) || self.redis.replicas == 1 || !has(self.redis.mode) || self.redis.mode == 'Managed'")
    .message("spec.redis.replicas above 1 applies to a managed Redis only (spec.redis.mode Managed)"))]
#[x_kube(validation = Rule::new("self.redis.mode != 'External' || (has(self.redis.external) && self.redis.external.host != '')")
    .message("spec.redis.external.host is required when spec.redis.mode is External"))]
#[x_kube(validation = Rule::new("self.autoscaling.minReplicas <= self.autoscaling.maxReplicas")
    .message("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"))]
#[x_kube(validation = Rule::new("self.flavor == 'chorus' || !has(self.autoscaling.targetConnectionsPerReplica)")
    .message("spec.autoscaling.targetConnectionsPerReplica applies to flavor chorus only: only chorus-server reports its connections"))]
#[x_kube(validation = Rule::new("!self.autoscaling.enabled || has(self.autoscaling.targetConnectionsPerReplica) || (has(self.autoscaling.targetCPUUtilizationPercentage) && self.autoscaling.targetCPUUtilizationPercentage > 0)")
    .message("spec.autoscaling needs targetConnectionsPerReplica or targetCPUUtilizationPercentage: with neither there is nothing to scale on"))]
#[serde(rename_all = "camelCase")]
pub struct RealtimeAppSpec {
    /// Which server runs in the pods: chorus-server, a Sails 1.x app, or a Node Socket.IO app.
    #[serde(default)]
    pub flavor: Flavor,
    /// Server image. Defaults to the operator's --server-image for flavor chorus; required otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Server replicas (while autoscaling is enabled, the autoscaler sets it through /scale).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Container port; omitted = the flavor's (chorus 3000, sails 1337, socketio 3000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Extra environment for the server container; an entry wins over an injected one of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Resources of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pod-level settings of the server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOptions>,
    #[serde(default)]
    pub redis: RedisSpec,
    /// Client and API authentication of flavor chorus (omitted: the defaults below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Per-replica limits of flavor chorus; each omitted one is the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Room history for clients that resume after a pod move (flavor chorus); omitted = the
    /// server's default (100 messages per room for 300 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

fn default_replicas() -> i32 {
    2
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    #[default]
    Chorus,
    Sails,
    Socketio,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Chorus => "chorus",
            Flavor::Sails => "sails",
            Flavor::Socketio => "socketio",
        }
    }

    /// The container port when `spec.port` is omitted.
    pub fn default_port(self) -> i32 {
        match self {
            Flavor::Sails => 1337,
            Flavor::Chorus | Flavor::Socketio => 3000,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOptions {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RedisMode {
    /// The operator runs a Redis for this app.
    #[default]
    Managed,
    /// The app uses a Redis that exists already.
    External,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    #[serde(default)]
    pub mode: RedisMode,
    /// Managed, flavor chorus: how many independent Redis buses (no replication between
    /// them; the servers publish to all and listen on all), so that losing one loses no
    /// message. 1 for sails and socketio, whose adapters speak to one Redis.
    #[serde(default = "default_redis_replicas")]
    #[schemars(range(min = 1, max = 3))]
    pub replicas: i32,
    /// Managed: the Redis image (default: a pinned Redis 7 image chosen by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Managed: resources of the Redis container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// External: where the Redis is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

impl Default for RedisSpec {
    fn default() -> Self {
        Self {
            mode: RedisMode::default(),
            replicas: default_redis_replicas(),
            image: None,
            resources: None,
            external: None,
        }
    }
}

/// The most managed Redis buses an app may ask for.
pub const MAX_REDIS_REPLICAS: i32 = 3;

fn default_redis_replicas() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedis {
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default = "default_redis_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub db: i32,
    /// The Secret key holding the Redis password, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    #[serde(default)]
    pub tls: bool,
}

fn default_redis_port() -> i32 {
    6379
}

/// A key of a Secret in the RealtimeApp's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.anonymous) && self.anonymous && has(self.jwtSecretRef))")
    .message("spec.auth.jwtSecretRef and spec.auth.anonymous: true exclude each other"))]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Bearer token of the HTTP API; default: a generated Secret `<name>-api-token`, key `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_secret_ref: Option<SecretKeyRef>,
    /// HS256 key for socket JWTs; default: a generated Secret `<name>-jwt`, key `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// true: sockets need no token (development); no JWT_SECRET reaches the pods.
    #[serde(default)]
    pub anonymous: bool,
    /// Room patterns (`*` glob) anyone may join even with JWTs required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[^,]+$")))]
    pub public_rooms: Vec<String>,
    /// Browser origins allowed (CORS); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[^,]+$")))]
    pub cors_origins: Vec<String>,
}

/// Room history of chorus-server (`HISTORY_SIZE`, `HISTORY_TTL_SECONDS`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Messages kept per room for resume; 0 turns history off.
    #[serde(default = "default_history_size")]
    #[schemars(range(min = 0, max = 100000))]
    pub size: i32,
    /// How long a room's history outlives its last message.
    #[serde(default = "default_history_ttl")]
    #[schemars(range(min = 1))]
    pub ttl_seconds: i64,
}

fn default_history_size() -> i32 {
    100
}

fn default_history_ttl() -> i64 {
    300
}

/// Per-replica limits of chorus-server; each omitted one is the server's default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Sockets one replica accepts (`MAX_CONNECTIONS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i32>,
    /// Rooms one socket may be in (`MAX_ROOMS_PER_SOCKET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_rooms_per_socket: Option<i32>,
    /// Client events per second per socket (`SOCKET_RATE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub socket_rate: Option<i32>,
    /// Largest socket message or HTTP body, in bytes (`MAX_PAYLOAD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_payload: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SessionAffinity {
    /// Socket.IO long-polling needs every request of a session on one replica.
    #[default]
    ClientIP,
    None,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
            session_affinity: SessionAffinity::default(),
        }
    }
}

fn default_service_port() -> i32 {
    80
}

/// Which autoscaler scales the app (docs/operator.md, "Autoscaling").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AutoscalingEngine {
    /// The operator itself: reads the connections from the app's replicas, nothing to install.
    #[default]
    Operator,
    /// A HorizontalPodAutoscaler (connections need a custom-metrics adapter).
    HPA,
    /// A KEDA ScaledObject (KEDA must be installed).
    KEDA,
}

impl AutoscalingEngine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "Operator",
            Self::HPA => "HPA",
            Self::KEDA => "KEDA",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    #[serde(default)]
    pub engine: AutoscalingEngine,
    /// Flavor chorus: sockets one replica should hold; replicas = ceil(connections / this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_connections_per_replica: Option<i32>,
    /// CPU utilization (of the requests) to keep; 0 or null: CPU is not a signal (`kubectl
    /// apply` drops a null, which the API server then defaults to 70: write 0 there).
    /// Serialized even when null: an omitted field would be defaulted back to 70.
    #[serde(
        default = "default_cpu_target",
        rename = "targetCPUUtilizationPercentage"
    )]
    #[schemars(range(min = 0, max = 1000))]
    pub target_cpu_utilization_percentage: Option<i32>,
    #[serde(default)]
    pub scale_down: ScaleDownSpec,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            engine: AutoscalingEngine::default(),
            target_connections_per_replica: None,
            target_cpu_utilization_percentage: default_cpu_target(),
            scale_down: ScaleDownSpec::default(),
        }
    }
}

/// How fast the autoscaler may remove replicas (scale-ups happen at once).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownSpec {
    /// Scale down only to the highest answer of this window.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: i32,
    /// Replicas removed per minute at most.
    #[serde(default = "default_max_replicas_per_minute")]
    #[schemars(range(min = 1))]
    pub max_replicas_per_minute: i32,
}

impl Default for ScaleDownSpec {
    fn default() -> Self {
        Self {
            stabilization_window_seconds: default_stabilization(),
            max_replicas_per_minute: default_max_replicas_per_minute(),
        }
    }
}

fn default_min_replicas() -> i32 {
    2
}
fn default_max_replicas() -> i32 {
    10
}
fn default_cpu_target() -> Option<i32> {
    Some(70)
}
fn default_stabilization() -> i32 {
    300
}
fn default_max_replicas_per_minute() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Pods that may be down at once during voluntary disruptions (a PDB exists when replicas > 1).
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 0))]
    pub max_unavailable: i32,
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_max_unavailable() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Only this app's server pods may reach its managed Redis.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// What the operator last saw and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RealtimeAppStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the server pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `<name>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What the autoscaler last read and decided.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    pub engine: AutoscalingEngine,
    /// The app's sockets at the last reading (engine Operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// The replicas the autoscaler last asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the autoscaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisStatus {
    pub endpoint: String,
    /// At least one Redis bus is ready (an external Redis is not probed: true).
    pub ready: bool,
    /// Managed: the Redis buses wanted (`spec.redis.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buses: Option<i32>,
    /// Managed: the Redis buses ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_buses: Option<i32>,
}
