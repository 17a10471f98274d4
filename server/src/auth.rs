//! Who may do what: the API bearer token, socket JWTs, and room patterns.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Secret;

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
}

/// What one socket may do.
#[derive(Debug, Clone)]
pub enum Grants {
    /// No JWT secret configured: development mode, anything goes.
    Open,
    Token(Claims),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unauthorized")]
    Unauthorized,
    /// MAX_CONNECTIONS reached (the `connect_error` message is the error code).
    #[error("over_capacity")]
    OverCapacity,
}

/// Socket access policy: the JWT key and the public room patterns.
#[derive(Clone)]
pub struct Policy {
    jwt: Option<(DecodingKey, Validation)>,
    public_rooms: Vec<String>,
}

impl Policy {
    pub fn new(jwt_secret: Option<&Secret>, public_rooms: Vec<String>) -> Self {
        let jwt = jwt_secret.map(|s| {
            let mut validation = Validation::new(Algorithm::HS256);
            // `exp` is required: a token that never expires is refused.
            validation.set_required_spec_claims(&["exp"]);
            validation.leeway = 5;
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
        jsonwebtoken::decode::<Claims>(token, key, validation)
            .map(|data| Grants::Token(data.claims))
            .map_err(|e| {
                tracing::debug!("socket token refused: {e}");
                AuthError::Unauthorized
            })
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
        let policy = Policy::new(Some(&key), vec!["lobby".into()]);
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
        let open = Policy::new(None, vec![]);
        assert!(matches!(open.authenticate(None), Ok(Grants::Open)));
    }
}
