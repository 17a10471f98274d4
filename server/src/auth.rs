//! Who may do what: the API bearer token, socket JWTs (checking, expiry, minting), and room
//! patterns.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, Secret, TokenArgs};

/// Clock skew allowed on `nbf` between the token's issuer and this server.
const NBF_LEEWAY_SECS: u64 = 5;

/// Claims of a socket's JWT (docs/server.md, "Authentication").
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    /// The user; the socket joins room `user:<sub>`.
    #[serde(default)]
    pub sub: Option<String>,
    /// Patterns of rooms it may join.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Patterns of rooms it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Expiry, seconds since the epoch: the socket is disconnected then unless refreshed.
    pub exp: u64,
}

/// What one socket may do.
#[derive(Debug, Clone)]
pub enum Grants {
    /// No JWT secret configured: development mode, anything goes.
    Open,
    Token(Claims),
}

impl Grants {
    /// When these grants end (seconds since the epoch); `None` in development mode.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Grants::Open => None,
            Grants::Token(c) => Some(c.exp),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    // The text is what Socket.IO clients see in `connect_error`: the contract's code only.
    #[error("unauthorized")]
    Unauthorized,
    /// MAX_CONNECTIONS reached (the `connect_error` message is the error code).
    #[error("over_capacity")]
    OverCapacity,
    #[error("the new token is for another subject than the socket's")]
    SubjectChanged,
}

/// Socket access policy: the JWT key and the public room patterns.
#[derive(Clone)]
pub struct Policy {
    jwt: Option<(DecodingKey, Validation)>,
    public_rooms: Vec<String>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.jwt_secret.as_ref(),
            config.public_rooms.clone(),
            config.jwt_audience.as_deref(),
            config.jwt_issuer.as_deref(),
        )
    }

    /// `audience` / `issuer`: when set, tokens must carry that `aud` / `iss`; when unset,
    /// those claims are not looked at.
    pub fn new(
        jwt_secret: Option<&Secret>,
        public_rooms: Vec<String>,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Self {
        let jwt = jwt_secret.map(|s| {
            let mut validation = Validation::new(Algorithm::HS256);
            // `exp` is required: a token that never expires is refused. A configured `aud` or
            // `iss` is required too: jsonwebtoken alone would let a token without it through.
            let mut required = vec!["exp"];
            validation.validate_aud = audience.is_some();
            if let Some(aud) = audience {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            if let Some(iss) = issuer {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            validation.validate_nbf = true;
            // The leeway serves `nbf` (a backend whose clock runs a little ahead); `exp` is
            // checked without it in `authenticate`, so that the server's clock alone decides
            // both whether a token is accepted and when its socket is disconnected.
            validation.leeway = NBF_LEEWAY_SECS;
            (DecodingKey::from_secret(s.expose().as_bytes()), validation)
        });
        Self { jwt, public_rooms }
    }

    pub fn requires_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// Checks a connecting socket's token (if one is required).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Grants, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            return Ok(Grants::Open);
        };
        let token = token.ok_or(AuthError::Unauthorized)?;
        // jsonwebtoken's error texts name the failed check, never the token or the key.
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| {
                tracing::debug!("socket token refused: {e}");
                AuthError::Unauthorized
            })?
            .claims;
        if claims.exp <= unix_now() {
            tracing::debug!("socket token refused: expired");
            return Err(AuthError::Unauthorized);
        }
        Ok(Grants::Token(claims))
    }

    /// Checks the token a connected socket sends to replace its own (`refresh`). The new token
    /// must name the same `sub`: the socket sits in `user:<sub>`, and a socket changing users
    /// midway is more likely a bug or an attack than a need.
    pub fn refresh(&self, current: &Grants, token: &str) -> Result<Grants, AuthError> {
        let fresh = self.authenticate(Some(token))?;
        match (current, &fresh) {
            (Grants::Token(old), Grants::Token(new)) if old.sub != new.sub => {
                Err(AuthError::SubjectChanged)
            }
            _ => Ok(fresh),
        }
    }

    pub fn may_join(&self, grants: &Grants, room: &str) -> bool {
        match grants {
            Grants::Open => true,
            Grants::Token(c) => {
                any_match(&c.rooms, room)
                    || any_match(&self.public_rooms, room)
                    || c.sub.as_deref().is_some_and(|s| user_room(s) == room)
            }
        }
    }

    pub fn may_publish(&self, grants: &Grants, room: &str) -> bool {
        match grants {
            Grants::Open => true,
            Grants::Token(c) => any_match(&c.publish, room),
        }
    }
}

/// Disconnects a socket when its token expires: one timer task per socket, which
/// [`Expiry::extend`] moves (a `refresh`) and which ends when the last clone is dropped (the
/// socket is gone), so an expiry far ahead holds nothing but a sleeping task.
#[derive(Clone)]
pub struct Expiry(Arc<watch::Sender<u64>>);

impl Expiry {
    /// Calls `on_expiry` once `exp` (seconds since the epoch) has passed, unless moved first.
    pub fn start(exp: u64, on_expiry: impl FnOnce() + Send + 'static) -> Self {
        let (tx, mut rx) = watch::channel(exp);
        tokio::spawn(async move {
            loop {
                let exp = *rx.borrow_and_update();
                let Some(left) = time_left(exp) else {
                    on_expiry();
                    return;
                };
                // Bounded sleeps: a far-off `exp` cannot overflow the timer, and the time
                // left is re-read from the wall clock at each wake-up.
                let nap = left.min(Duration::from_secs(24 * 3600));
                tokio::select! {
                    () = tokio::time::sleep(nap) => {}
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return; // the socket is gone
                        }
                    }
                }
            }
        });
        Self(Arc::new(tx))
    }

    /// Moves the expiry (to the `exp` of a refreshed token).
    pub fn extend(&self, exp: u64) {
        self.0.send_replace(exp);
    }
}

/// How long until `exp`, `None` once it has passed.
fn time_left(exp: u64) -> Option<Duration> {
    let Some(at) = UNIX_EPOCH.checked_add(Duration::from_secs(exp)) else {
        return Some(Duration::MAX); // beyond what the clock can hold: never, in practice
    };
    at.duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why `chorus-server token` could not print a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "JWT_SECRET is not set: pass --jwt-secret or set JWT_SECRET to the key the servers check tokens with"
    )]
    NoSecret,
    #[error("--ttl is too long: the expiry would be past the year 9999")]
    TtlTooLong,
    // jsonwebtoken's error texts never include the key.
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The claims `chorus-server token` signs.
#[derive(Serialize)]
struct MintClaims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    rooms: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    publish: &'a [String],
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// Signs an HS256 socket token as `chorus-server token` describes it.
pub fn mint(args: &TokenArgs) -> Result<String, MintError> {
    /// 9999-12-31T23:59:59Z: JWT libraries in other languages choke on later dates.
    const LATEST_EXP: u64 = 253_402_300_799;
    let secret = args.jwt_secret.as_ref().ok_or(MintError::NoSecret)?;
    let now = unix_now();
    let exp = now
        .checked_add(args.ttl.as_secs())
        .filter(|&exp| exp <= LATEST_EXP)
        .ok_or(MintError::TtlTooLong)?;
    let claims = MintClaims {
        sub: args.sub.as_deref(),
        rooms: &args.rooms,
        publish: &args.publish,
        iat: now,
        exp,
        aud: args.aud.as_deref(),
        iss: args.iss.as_deref(),
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// The room a socket with JWT subject `sub` joins automatically.
pub fn user_room(sub: &str) -> String {
    format!("user:{sub}")
}

fn any_match(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, room))
}

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let tail: Vec<&str> = parts.collect();
    let Some((last, middle)) = tail.split_last() else {
        return rest.is_empty(); // no `*` at all: exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Constant-time comparison of a presented bearer token with the configured one.
pub fn token_matches(expected: &Secret, presented: &str) -> bool {
    let a = expected.expose().as_bytes();
    let b = presented.as_bytes();
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "abc"));
        assert!(glob_match("chat:*", "chat:1"));
        assert!(glob_match("chat:*", "chat:"));
        assert!(!glob_match("chat:*", "chatx"));
        assert!(glob_match("a*b*c", "a-b-c"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("*:admin", "team:admin"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn tokens_compare_whole() {
        let s = Secret::from("secret-token".to_owned());
        assert!(token_matches(&s, "secret-token"));
        assert!(!token_matches(&s, "secret-toke"));
        assert!(!token_matches(&s, "secret-token2"));
        assert!(!token_matches(&s, ""));
    }

    fn token(claims: serde_json::Value, key: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .expect("encodes")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn jwt_rules() {
        let key = Secret::from("k".repeat(32));
        let policy = Policy::new(Some(&key), vec!["lobby".into()], None, None);
        let good = token(
            serde_json::json!({"sub":"u1","rooms":["chat:*"],"publish":["chat:1"],"exp":now()+60}),
            &"k".repeat(32),
        );
        let grants = policy.authenticate(Some(&good)).expect("valid");
        assert!(policy.may_join(&grants, "chat:9"));
        assert!(policy.may_join(&grants, "lobby"));
        assert!(policy.may_join(&grants, "user:u1"));
        assert!(!policy.may_join(&grants, "user:u2"));
        assert!(!policy.may_join(&grants, "admin"));
        assert!(policy.may_publish(&grants, "chat:1"));
        assert!(!policy.may_publish(&grants, "chat:2"));
        assert!(!policy.may_publish(&grants, "lobby"));

        let expired = token(
            serde_json::json!({"sub":"u1","exp":now()-600}),
            &"k".repeat(32),
        );
        let wrong_key = token(serde_json::json!({"sub":"u1","exp":now()+60}), "other");
        let no_exp = token(serde_json::json!({"sub":"u1"}), &"k".repeat(32));
        for bad in [
            Some(expired.as_str()),
            Some(&wrong_key),
            Some(&no_exp),
            Some("x.y.z"),
            None,
        ] {
            assert_eq!(
                policy.authenticate(bad).err(),
                Some(AuthError::Unauthorized)
            );
        }
        let open = Policy::new(None, vec![], None, None);
        assert!(matches!(open.authenticate(None), Ok(Grants::Open)));
    }

    #[test]
    fn nbf_aud_and_iss() {
        let key = "k".repeat(32);
        let secret = Secret::from(key.clone());
        let plain = Policy::new(Some(&secret), vec![], None, None);
        let strict = Policy::new(Some(&secret), vec![], Some("chorus"), Some("https://idp"));
        let exp = now() + 60;
        let ok = |p: &Policy, claims: serde_json::Value| p.authenticate(Some(&token(claims, &key)));

        // Unset audience / issuer: those claims are not looked at.
        assert!(
            ok(
                &plain,
                serde_json::json!({"exp": exp, "aud": "elsewhere", "iss": "x"})
            )
            .is_ok()
        );
        assert!(ok(&plain, serde_json::json!({"exp": exp, "aud": ["a", "b"]})).is_ok());
        // Set: required and matched.
        assert!(
            ok(
                &strict,
                serde_json::json!({"exp": exp, "aud": "chorus", "iss": "https://idp"})
            )
            .is_ok()
        );
        assert!(
            ok(
                &strict,
                serde_json::json!({"exp": exp, "aud": ["x", "chorus"], "iss": "https://idp"})
            )
            .is_ok()
        );
        for bad in [
            serde_json::json!({"exp": exp, "iss": "https://idp"}),
            serde_json::json!({"exp": exp, "aud": "chorus"}),
            serde_json::json!({"exp": exp, "aud": "other", "iss": "https://idp"}),
            serde_json::json!({"exp": exp, "aud": "chorus", "iss": "https://other"}),
        ] {
            assert_eq!(
                ok(&strict, bad.clone()).err(),
                Some(AuthError::Unauthorized),
                "{bad}"
            );
        }
        // `nbf` in the future (beyond the skew allowed) is refused; just now is fine.
        assert!(ok(&plain, serde_json::json!({"exp": exp, "nbf": now() + 30})).is_err());
        assert!(ok(&plain, serde_json::json!({"exp": exp, "nbf": now()})).is_ok());
        // `exp` gets no leeway: the server's clock alone decides.
        assert!(ok(&plain, serde_json::json!({"exp": now() - 1})).is_err());
    }

    #[test]
    fn refresh_keeps_the_subject() {
        let key = "k".repeat(32);
        let secret = Secret::from(key.clone());
        let policy = Policy::new(Some(&secret), vec![], None, None);
        let exp = now() + 60;
        let alice = token(serde_json::json!({"sub": "alice", "exp": exp}), &key);
        let current = policy.authenticate(Some(&alice)).expect("valid");
        let longer = token(
            serde_json::json!({"sub": "alice", "rooms": ["x"], "exp": exp + 600}),
            &key,
        );
        let fresh = policy.refresh(&current, &longer).expect("same subject");
        assert_eq!(fresh.expires_at(), Some(exp + 600));
        assert!(policy.may_join(&fresh, "x"));
        let bob = token(serde_json::json!({"sub": "bob", "exp": exp}), &key);
        assert_eq!(
            policy.refresh(&current, &bob).err(),
            Some(AuthError::SubjectChanged)
        );
        let anonymous = token(serde_json::json!({"exp": exp}), &key);
        assert_eq!(
            policy.refresh(&current, &anonymous).err(),
            Some(AuthError::SubjectChanged)
        );
        assert_eq!(
            policy.refresh(&current, "x.y.z").err(),
            Some(AuthError::Unauthorized)
        );
    }

    #[test]
    fn time_left_ends_at_exp() {
        assert_eq!(time_left(now().saturating_sub(1)), None);
        assert!(time_left(now() + 100).is_some_and(|d| d > Duration::from_secs(98)));
        assert_eq!(time_left(u64::MAX), Some(Duration::MAX));
    }
}
