//! The environment injected into the server container, per flavor
//! (docs/operator.md, "Injected environment").

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, SecretKeySelector};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};

use super::{App, BuildError};
use crate::crd::{AuthSpec, Flavor, RedisMode, SecretKeyRef, SessionAffinity};

/// Where the app's Redis is and how to authenticate.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisEndpoint {
    /// `REDIS_HOST`: the Redis, or with several managed buses their (headless) Service.
    pub host: String,
    pub port: i32,
    pub db: i32,
    pub tls: bool,
    pub password: Option<SecretKeyRef>,
    /// The host of each independent bus, in pod ordinal order: `REDIS_URL` lists one URL
    /// per bus. `[host]` for a single Redis.
    pub buses: Vec<String>,
}

impl RedisEndpoint {
    pub fn of(a: &App<'_>) -> Result<Self, BuildError> {
        let redis = &a.app.spec.redis;
        let n = super::redis::buses(a)?;
        match redis.mode {
            RedisMode::Managed => {
                let service = format!("{}.{}.svc", a.redis_name(), a.namespace);
                // Several buses: each pod by its DNS name under the headless Service, so
                // that a server reaches every bus rather than one the Service picks.
                let buses = if n > 1 {
                    (0..n)
                        .map(|i| format!("{}-{i}.{service}", a.redis_name()))
                        .collect()
                } else {
                    vec![service.clone()]
                };
                Ok(Self {
                    host: service,
                    port: 6379,
                    db: 0,
                    tls: false,
                    password: Some(SecretKeyRef {
                        name: a.redis_name(),
                        key: "password".into(),
                    }),
                    buses,
                })
            }
            RedisMode::External => {
                let ext = redis
                    .external
                    .as_ref()
                    .filter(|e| !e.host.is_empty())
                    .ok_or(BuildError::MissingExternalHost)?;
                Ok(Self {
                    host: ext.host.clone(),
                    port: ext.port,
                    db: ext.db,
                    tls: ext.tls,
                    password: ext.password_secret_ref.clone(),
                    buses: vec![ext.host.clone()],
                })
            }
        }
    }

    /// `host:port`, for status.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `REDIS_URL`: one URL per bus, comma-separated in bus order, each with `password`
    /// percent-encoded: a password may hold any byte, and `@ / # : % ?` would otherwise end
    /// the userinfo early (clients percent-decode it). A comma cannot appear unencoded in
    /// one, so the list splits back unambiguously.
    pub fn url(&self, password: Option<&[u8]>) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = match password {
            Some(p) => format!(":{}@", percent_encode(p, USERINFO)),
            None => String::new(),
        };
        self.buses
            .iter()
            .map(|host| format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The bus hosts that `REDIS_HOST` does not already name (none for a single Redis):
    /// configuration the pod template's checksum must cover, since `REDIS_URL` comes from
    /// a Secret whose value it does not see.
    pub fn other_buses(&self) -> impl Iterator<Item = &str> {
        self.buses
            .iter()
            .map(String::as_str)
            .filter(|b| *b != self.host)
    }
}

/// Everything but RFC 3986's unreserved characters is encoded in the password.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The key of the REDIS_URL Secret (`<name>-redis-url`).
pub const REDIS_URL_KEY: &str = "url";

/// Flavor chorus with no `auth.apiTokenSecretRef`: the operator generates `<name>-api-token`.
pub fn generated_api_token(a: &App<'_>) -> bool {
    a.flavor() == Flavor::Chorus
        && a.app
            .spec
            .auth
            .as_ref()
            .and_then(|auth| auth.api_token_secret_ref.as_ref())
            .is_none()
}

/// The API token Secret key the chorus pods read.
pub fn api_token_ref(a: &App<'_>) -> Option<SecretKeyRef> {
    if a.flavor() != Flavor::Chorus {
        return None;
    }
    let explicit = a
        .app
        .spec
        .auth
        .as_ref()
        .and_then(|auth| auth.api_token_secret_ref.clone());
    Some(explicit.unwrap_or_else(|| SecretKeyRef {
        name: a.api_token_name(),
        key: "token".into(),
    }))
}

/// The auth settings of a chorus app (all defaults when `spec.auth` is omitted); None for
/// the other flavors.
fn auth<'s>(a: &'s App<'_>) -> Option<std::borrow::Cow<'s, AuthSpec>> {
    (a.flavor() == Flavor::Chorus).then(|| match &a.app.spec.auth {
        Some(auth) => std::borrow::Cow::Borrowed(auth),
        None => std::borrow::Cow::Owned(AuthSpec::default()),
    })
}

/// Flavor chorus, not anonymous, with no `auth.jwtSecretRef`: the operator generates
/// `<name>-jwt`.
pub fn generated_jwt(a: &App<'_>) -> bool {
    auth(a).is_some_and(|auth| !auth.anonymous && auth.jwt_secret_ref.is_none())
}

/// The JWT key the chorus pods read: None when anonymous (sockets need no token).
pub fn jwt_ref(a: &App<'_>) -> Option<SecretKeyRef> {
    let auth = auth(a)?;
    if auth.anonymous {
        return None;
    }
    Some(auth.jwt_secret_ref.clone().unwrap_or_else(|| SecretKeyRef {
        name: a.jwt_name(),
        key: "secret".into(),
    }))
}

/// Every Secret key the server pods read, for existence checks and the config checksum
/// (but the REDIS_URL one, which the operator writes from these).
pub fn secret_refs(a: &App<'_>, redis: &RedisEndpoint) -> Vec<SecretKeyRef> {
    redis
        .password
        .iter()
        .cloned()
        .chain(api_token_ref(a))
        .chain(jwt_ref(a))
        .collect()
}

fn plain(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn from_secret(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The container environment: the injected variables in a fixed order (a variable comes
/// before any `$(VAR)` use of it), then every `spec.env` entry; an injected variable that
/// `spec.env` also names is left out, so the user's value wins.
pub fn container_env(a: &App<'_>, redis: &RedisEndpoint) -> Vec<EnvVar> {
    let port = a.container_port().to_string();
    let key = format!("{}.{}", a.namespace, a.name);
    let mut env = vec![
        plain("REDIS_HOST", redis.host.clone()),
        plain("REDIS_PORT", redis.port.to_string()),
        plain("REDIS_DB", redis.db.to_string()),
    ];
    if let Some(p) = &redis.password {
        env.push(from_secret("REDIS_PASSWORD", p));
    }
    // The URL holds the password percent-encoded, which `$(VAR)` expansion cannot do: the
    // operator writes it to a Secret of its own.
    env.push(from_secret(
        "REDIS_URL",
        &SecretKeyRef {
            name: a.redis_url_name(),
            key: REDIS_URL_KEY.into(),
        },
    ));
    env.push(from_field("POD_NAME", "metadata.name"));
    env.push(from_field("POD_NAMESPACE", "metadata.namespace"));
    env.push(plain("PORT", port.clone()));
    match a.flavor() {
        Flavor::Chorus => {
            if let Some(r) = api_token_ref(a) {
                env.push(from_secret("API_TOKEN", &r));
            }
            if let Some(r) = jwt_ref(a) {
                env.push(from_secret("JWT_SECRET", &r));
            }
            env.push(plain("REDIS_CHANNEL_PREFIX", key));
            // Empty lists are left out: the server's own defaults (no public room, any
            // origin) apply, and an empty value would read as one empty entry.
            if let Some(auth) = auth(a) {
                if !auth.public_rooms.is_empty() {
                    env.push(plain("PUBLIC_ROOMS", auth.public_rooms.join(",")));
                }
                if !auth.cors_origins.is_empty() {
                    env.push(plain("CORS_ORIGINS", auth.cors_origins.join(",")));
                }
            }
            if let Some(limits) = &a.app.spec.limits {
                let set = [
                    ("MAX_CONNECTIONS", limits.max_connections.map(i64::from)),
                    (
                        "MAX_ROOMS_PER_SOCKET",
                        limits.max_rooms_per_socket.map(i64::from),
                    ),
                    ("SOCKET_RATE", limits.socket_rate.map(i64::from)),
                    ("MAX_PAYLOAD", limits.max_payload),
                ];
                for (name, v) in set {
                    if let Some(v) = v {
                        env.push(plain(name, v.to_string()));
                    }
                }
            }
            // Shed clients wait out the Service's affinity window (see `server::service`).
            env.push(plain(
                "DRAIN_SECONDS",
                super::server::drain_seconds(a).to_string(),
            ));
            if a.app.spec.service.session_affinity == SessionAffinity::ClientIP {
                env.push(plain(
                    "REBALANCE_AFFINITY_SECONDS",
                    super::server::AFFINITY_SECONDS.to_string(),
                ));
            }
            if let Some(history) = &a.app.spec.history {
                env.push(plain("HISTORY_SIZE", history.size.to_string()));
                env.push(plain(
                    "HISTORY_TTL_SECONDS",
                    history.ttl_seconds.to_string(),
                ));
            }
        }
        Flavor::Sails => {
            env.push(plain("sails_sockets__adapter", "@sailshq/socket.io-redis"));
            env.push(plain("sails_sockets__host", redis.host.clone()));
            env.push(plain("sails_sockets__port", redis.port.to_string()));
            env.push(plain("sails_sockets__db", redis.db.to_string()));
            if let Some(p) = &redis.password {
                env.push(from_secret("sails_sockets__pass", p));
            }
            env.push(plain("sails_sockets__key", key));
            env.push(plain("sails_port", port));
        }
        Flavor::Socketio => {}
    }
    let user = &a.app.spec.env;
    env.retain(|e| !user.iter().any(|u| u.name == e.name));
    env.extend(user.iter().cloned());
    env
}
