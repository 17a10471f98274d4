//! Browser origins (docs/server.md, "Origins"): a request whose `Origin` is not in
//! `CORS_ORIGINS` is refused with 403 before Socket.IO or the API see it, so a refused
//! long-polling handshake or websocket upgrade creates no session; allowed origins get CORS
//! answers with credentials. Requests without `Origin` (servers, native clients) pass.

use std::{collections::HashSet, sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::{
    config::parse_origin,
    error::{ErrorCode, Failure},
};

/// How long browsers may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The allowed origins, normalised as [`parse_origin`] does.
#[derive(Debug)]
pub struct Origins {
    any: bool,
    allowed: HashSet<String>,
}

impl Origins {
    /// `origins` as `--cors-origins` takes them; `*` (or an empty list) allows any origin.
    pub fn new(origins: &[String]) -> Result<Self, String> {
        let mut allowed = HashSet::new();
        for origin in origins {
            let normal = parse_origin(origin).map_err(|_| origin.clone())?;
            if !normal.is_empty() {
                allowed.insert(normal);
            }
        }
        Ok(Self {
            any: allowed.is_empty() || allowed.contains("*"),
            allowed,
        })
    }

    pub fn allows(&self, origin: &HeaderValue) -> bool {
        if self.any {
            return true;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        // Browsers send origins already normalised: most requests match without parsing.
        self.allowed.contains(origin)
            || parse_origin(origin).is_ok_and(|o| !o.is_empty() && self.allowed.contains(&o))
    }

    /// The CORS answers, for the requests [`refuse`] let through: the request's own origin
    /// (never `*`, also when any origin is allowed) with `Access-Control-Allow-Credentials`,
    /// since clients that send cookies by default (socket.io-client v2 over polling) are
    /// refused by browsers otherwise.
    pub fn cors() -> CorsLayer {
        CorsLayer::new()
            .allow_origin(AllowOrigin::mirror_request())
            .allow_credentials(true)
            .allow_methods(AllowMethods::mirror_request())
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(PREFLIGHT_MAX_AGE)
    }
}

/// Middleware: 403 `forbidden` for a request whose `Origin` is not allowed.
pub async fn refuse(State(origins): State<Arc<Origins>>, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN)
        && !origins.allows(origin)
    {
        tracing::debug!(?origin, path = req.uri().path(), "origin refused");
        return Failure::new(
            ErrorCode::Forbidden,
            "this Origin is not allowed here (CORS_ORIGINS)",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        Origins::new(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).expect("valid")
    }

    fn allows(o: &Origins, origin: &str) -> bool {
        o.allows(&HeaderValue::from_str(origin).expect("header"))
    }

    #[test]
    fn matching() {
        let any = origins(&["*"]);
        assert!(allows(&any, "https://anything.test"));
        assert!(allows(&any, "not even an origin"));
        let list = origins(&[
            "https://app.test",
            "HTTP://Local.test:8080/",
            "https://x.test:443",
        ]);
        assert!(allows(&list, "https://app.test"));
        assert!(allows(&list, "http://local.test:8080"));
        assert!(allows(&list, "https://x.test"), "default port");
        assert!(!allows(&list, "http://app.test"), "other scheme");
        assert!(!allows(&list, "https://app.test:8443"), "other port");
        assert!(!allows(&list, "https://evil.app.test"));
        assert!(!allows(&list, "https://app.test.evil"));
        assert!(!allows(&list, "null"));
        assert!(!allows(&list, ""));
        assert!(Origins::new(&["app.test".to_owned()]).is_err());
    }
}
