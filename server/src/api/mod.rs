//! The HTTP API under `/v1` (docs/server.md, "HTTP API") and its OpenAPI description.
//!
//! Handlers: [`broadcast`] delivers messages; [`calls`] answers through the acknowledged
//! cluster calls (membership, presence, disconnect, the node list).

mod broadcast;
mod calls;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Serialize, de::DeserializeOwned};
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::{
    auth::token_matches,
    error::{ErrorBody, ErrorCode, Failure},
    ops::Readiness,
    state::AppState,
};

/// The `/v1` routes behind the bearer token, and `/openapi.json` (open, like the
/// operations endpoints).
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let v1 = Router::new()
        .route("/broadcast", post(broadcast::broadcast))
        .route("/rooms/{room}/sockets", get(calls::room_sockets))
        .route(
            "/rooms/{room}/members",
            post(calls::add_members).delete(calls::remove_members),
        )
        .route("/sockets/{id}/disconnect", post(calls::disconnect))
        .route("/nodes", get(calls::nodes))
        // Behind the token too, so that the API's routes cannot be probed without it.
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state, require_token));
    // Nested, not merged: a merged fallback would answer every unknown path, outside /v1 too.
    Router::new()
        .route("/openapi.json", get(openapi))
        .nest("/v1", v1)
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 9110), so `bearer` and `BEARER` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `Authorization: Bearer <API_TOKEN>` on every `/v1` call when a token is configured.
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if !token_matches(expected, presented) {
            let mut response =
                Failure::new(ErrorCode::Unauthorized, "a valid bearer token is required")
                    .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(req).await
}

async fn not_found() -> Failure {
    Failure::new(ErrorCode::NotFound, "no such API route")
}

/// A JSON body, whatever its Content-Type, with the contract's errors: 413
/// `payload_too_large` past MAX_PAYLOAD and 400 `invalid_request` for anything unreadable.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Failure::new(
                    ErrorCode::PayloadTooLarge,
                    "the body is larger than MAX_PAYLOAD",
                )
            } else {
                Failure::invalid(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| Failure::invalid(format!("the body is not valid JSON for this call: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for (header, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Bearer\tabc", Some("abc")),
            ("Basic abc", None),
            ("Bearerabc", None),
            ("abc", None),
        ] {
            assert_eq!(super::bearer_token(header), token, "{header:?}");
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OkBody {
    pub ok: bool,
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The OpenAPI 3 description, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "chorus-server HTTP API", description = "Broadcast, membership and presence for a Chorus Socket.IO cluster."),
    paths(broadcast::broadcast, calls::room_sockets, calls::add_members, calls::remove_members, calls::disconnect, calls::nodes),
    components(schemas(ErrorBody, ErrorCode, Readiness)),
    modifiers(&BearerAuth, &RefusedOrigin)
)]
pub struct ApiDoc;

/// Every call may be refused for its `Origin` (docs/server.md, "Origins").
struct RefusedOrigin;

impl Modify for RefusedOrigin {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let refused = ResponseBuilder::new()
            .description("the request's Origin is not in CORS_ORIGINS (`forbidden`)")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                op.responses
                    .responses
                    .entry("403".to_owned())
                    .or_insert_with(|| refused.clone().into());
            }
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
