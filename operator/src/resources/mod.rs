//! Desired state: pure functions from a RealtimeApp (and the operator's configuration) to
//! every object the operator applies (docs/operator.md, "What gets created").

pub mod autoscaling;
pub mod env;
pub mod redis;
pub mod server;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{
            Capabilities, PodSecurityContext, SeccompProfile, Secret, SecurityContext, Service,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt, api::DynamicObject};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{Flavor, RealtimeApp, RedisMode, SecretKeyRef};

/// The field manager of every server-side apply.
pub const MANAGER: &str = "chorus-operator";
/// The labels on every child; the instance and component labels select a component's pods.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Pod-template annotation that changes when the injected configuration does.
pub const CHECKSUM_ANNOTATION: &str = "chorus.rs/config-checksum";
/// The values a child has in fields the API server will not change in place (a Service's
/// clusterIP, a StatefulSet's podManagementPolicy), when they are not the defaults: when the
/// live child's annotation differs from the desired one's, the operator deletes the child
/// and creates it again. Absent at the defaults, so children made before it match.
pub const IMMUTABLE_ANNOTATION: &str = "chorus.rs/immutable-fields";
/// A pinned Redis 7 image for managed Redis.
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.4.1-alpine";

/// Operator-wide settings that shape the children.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The chorus-server image for flavor chorus when `spec.image` is empty.
    pub server_image: String,
    /// The managed Redis image when `spec.redis.image` is empty.
    pub redis_image: String,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            server_image: format!("chorus-server:{}", env!("CARGO_PKG_VERSION")),
            redis_image: DEFAULT_REDIS_IMAGE.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("the RealtimeApp has no metadata.name")]
    Unnamed,
    #[error("spec.image is required for flavor {0}")]
    MissingImage(&'static str),
    #[error("spec.redis.external.host is required when spec.redis.mode is External")]
    MissingExternalHost,
    #[error("{field}: not a quantity: {value:?}")]
    InvalidQuantity { field: &'static str, value: String },
    #[error("spec.redis.replicas must be between 1 and {max}, not {0}", max = crate::crd::MAX_REDIS_REPLICAS)]
    RedisReplicasOutOfRange(i32),
    #[error(
        "spec.redis.replicas above 1 needs flavor chorus: the {0} Redis adapter speaks to one Redis"
    )]
    RedisReplicasNeedChorus(&'static str),
    #[error(
        "spec.redis.replicas above 1 applies to a managed Redis only (spec.redis.mode Managed)"
    )]
    RedisReplicasNeedManaged,
}

/// Every object for one RealtimeApp. Generated Secrets appear only in [`Generated`]: they are
/// created once when missing and never applied again, so a password is never rotated by
/// accident.
#[derive(Debug, Clone, Default)]
pub struct Children {
    pub redis: Option<redis::ManagedRedis>,
    pub deployment: Option<Deployment>,
    pub service: Option<Service>,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// engine KEDA: the ScaledObject and its TriggerAuthentication.
    pub keda: Vec<DynamicObject>,
    pub pdb: Option<PodDisruptionBudget>,
}

/// Objects serialized for `render` and for comparisons, in apply order.
impl Children {
    /// (kind, name) of every object, for the pass that deletes what is no longer wanted.
    pub fn names(&self) -> BTreeSet<(String, String)> {
        self.objects()
            .iter()
            .map(|o| {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                (text(&o["kind"]), text(&o["metadata"]["name"]))
            })
            .collect()
    }

    pub fn objects(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        if let Some(r) = &self.redis {
            push(&mut out, &r.statefulset);
            push(&mut out, &r.service);
            if let Some(np) = &r.network_policy {
                push(&mut out, np);
            }
            if let Some(pdb) = &r.pdb {
                push(&mut out, pdb);
            }
        }
        for obj in [
            self.deployment.as_ref().map(to_value),
            self.service.as_ref().map(to_value),
            self.hpa.as_ref().map(to_value),
            self.pdb.as_ref().map(to_value),
        ]
        .into_iter()
        .flatten()
        .chain(self.keda.iter().map(to_value))
        {
            out.push(obj);
        }
        out
    }
}

fn push<T: Serialize>(out: &mut Vec<serde_json::Value>, obj: &T) {
    out.push(to_value(obj));
}

fn to_value<T: Serialize>(obj: &T) -> serde_json::Value {
    serde_json::to_value(obj).unwrap_or(serde_json::Value::Null)
}

/// Secrets the operator generates (each created once, when missing).
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub redis_password: Option<Secret>,
    pub api_token: Option<Secret>,
    pub jwt: Option<Secret>,
    /// The key of the pod template's checksum (src/secrets.rs); every app has one.
    pub checksum_key: Option<Secret>,
}

impl Generated {
    /// Every generated Secret wanted, in creation order.
    pub fn secrets(self) -> impl Iterator<Item = Secret> {
        [
            self.redis_password,
            self.api_token,
            self.jwt,
            self.checksum_key,
        ]
        .into_iter()
        .flatten()
    }
}

/// What the desired state needs besides the RealtimeApp and the operator configuration.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// A keyed digest of the values of every Secret key the pods read, so that a changed
    /// secret value rolls the pods. Empty when not known (render).
    pub secrets_digest: String,
}

/// `<name>-redis-url` with key `url`: the REDIS_URL of the server pods, with the password
/// percent-encoded (`password` is the value the password ref points at, None without one).
/// The operator rewrites it whenever the URL changes.
pub fn redis_url_secret(
    app: &RealtimeApp,
    config: &OperatorConfig,
    password: Option<&[u8]>,
) -> Result<Secret, BuildError> {
    let a = App::new(app, config)?;
    let url = env::RedisEndpoint::of(&a)?.url(password);
    Ok(Secret {
        metadata: a.meta(a.redis_url_name(), server::COMPONENT),
        type_: Some("Opaque".into()),
        // `data`, not `stringData`: server-side apply tracks the field it is sent, and the
        // API server stores stringData as data.
        data: Some(BTreeMap::from([(
            env::REDIS_URL_KEY.to_owned(),
            k8s_openapi::ByteString(url.into_bytes()),
        )])),
        ..Secret::default()
    })
}

/// Names and facts derived once from the RealtimeApp.
#[derive(Debug, Clone)]
pub struct App<'a> {
    pub app: &'a RealtimeApp,
    pub name: String,
    pub namespace: String,
    /// None only when rendering an object that was never stored (no uid yet).
    pub owner: Option<OwnerReference>,
    pub config: &'a OperatorConfig,
}

impl<'a> App<'a> {
    pub fn new(app: &'a RealtimeApp, config: &'a OperatorConfig) -> Result<Self, BuildError> {
        if app.metadata.name.as_deref().unwrap_or("").is_empty() {
            return Err(BuildError::Unnamed);
        }
        let owner = app.controller_owner_ref(&());
        let namespace = app.namespace().unwrap_or_else(|| "default".to_owned());
        Ok(Self {
            name: app.name_any(),
            namespace,
            owner,
            app,
            config,
        })
    }

    pub fn flavor(&self) -> Flavor {
        self.app.spec.flavor
    }

    /// `app.kubernetes.io/name`: `chorus-server` or the flavor.
    pub fn app_label(&self) -> &'static str {
        match self.flavor() {
            Flavor::Chorus => "chorus-server",
            other => other.as_str(),
        }
    }

    /// The labels that select one component's pods.
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        selector(&self.name, component)
    }

    /// The labels on everything: the selector plus name and managed-by.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut labels = self.selector(component);
        labels.insert(NAME_LABEL.into(), self.app_label().into());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
        labels
    }

    /// Metadata of a child: name, namespace, labels, and the RealtimeApp as controller owner.
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    pub fn redis_name(&self) -> String {
        format!("{}-redis", self.name)
    }

    pub fn api_token_name(&self) -> String {
        format!("{}-api-token", self.name)
    }

    pub fn jwt_name(&self) -> String {
        format!("{}-jwt", self.name)
    }

    /// The Secret holding the REDIS_URL the server pods read.
    pub fn redis_url_name(&self) -> String {
        format!("{}-redis-url", self.name)
    }

    /// The generated key of the pod template's checksum.
    pub fn checksum_key_ref(&self) -> SecretKeyRef {
        SecretKeyRef {
            name: format!("{}-checksum-key", self.name),
            key: "key".into(),
        }
    }

    pub fn container_port(&self) -> i32 {
        self.app
            .spec
            .port
            .unwrap_or_else(|| self.flavor().default_port())
    }
}

/// The labels that select the pods of one component of the app `name`.
pub fn selector(name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INSTANCE_LABEL.to_owned(), name.to_owned()),
        (COMPONENT_LABEL.to_owned(), component.to_owned()),
    ])
}

/// Labels as a label selector string: `key=value,key=value`.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Selects everything the operator manages (what the controller watches).
pub fn managed_selector() -> String {
    selector_string(&BTreeMap::from([(
        MANAGED_BY_LABEL.to_owned(),
        MANAGER.to_owned(),
    )]))
}

/// Selects the children of the app `name` (with the owner check, what it may delete).
pub fn children_selector(name: &str) -> String {
    selector_string(&BTreeMap::from([
        (INSTANCE_LABEL.to_owned(), name.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
    ]))
}

/// Whether `obj` has the object `owner_uid` among its owners: only then may the operator
/// change or delete it.
pub fn is_owned_by<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    obj.owner_references().iter().any(|o| o.uid == owner_uid)
}

/// Builds every child. Pure: the same inputs give the same objects.
pub fn build(
    app: &RealtimeApp,
    config: &OperatorConfig,
    inputs: &Inputs,
) -> Result<Children, BuildError> {
    let a = App::new(app, config)?;
    let redis = match app.spec.redis.mode {
        RedisMode::Managed => Some(redis::managed(&a)?),
        RedisMode::External => None,
    };
    let endpoint = env::RedisEndpoint::of(&a)?;
    let deployment = server::deployment(&a, &endpoint, inputs)?;
    Ok(Children {
        redis,
        deployment: Some(deployment),
        service: Some(server::service(&a)),
        hpa: autoscaling::hpa(&a),
        keda: autoscaling::keda(&a),
        pdb: server::pdb(&a),
    })
}

/// The Secrets the operator generates for this app, with fresh random values; the caller
/// creates only those that do not exist yet.
pub fn generated(app: &RealtimeApp, config: &OperatorConfig) -> Result<Generated, BuildError> {
    let a = App::new(app, config)?;
    Ok(Generated {
        redis_password: (app.spec.redis.mode == RedisMode::Managed)
            .then(|| redis::password_secret(&a)),
        api_token: env::generated_api_token(&a).then(|| server::api_token_secret(&a)),
        jwt: env::generated_jwt(&a).then(|| server::jwt_secret(&a)),
        checksum_key: Some(server::checksum_key_secret(&a)),
    })
}

/// A URL-safe random string (letters and digits) from the thread's CSPRNG.
pub fn random_token(len: usize) -> String {
    use rand::{Rng, distr::Alphanumeric};
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// sha256 of the given parts, hex.
pub fn digest<'p>(parts: impl IntoIterator<Item = &'p [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A PodDisruptionBudget `name` over one component's pods.
pub fn pdb(
    a: &App<'_>,
    name: String,
    component: &str,
    max_unavailable: i32,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: a.meta(name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(a.selector(component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The `restricted` Pod Security Standard, pod level.
pub fn restricted_pod(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The `restricted` Pod Security Standard, container level.
pub fn restricted_container(read_only_root: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(read_only_root),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// The kinds the operator applies: namespaced, typed, serializable.
pub trait Child:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<T> Child for T where
    T: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}
