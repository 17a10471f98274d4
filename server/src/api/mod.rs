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
        .route("/v1/broadcast", post(broadcast::broadcast))
        .route("/v1/rooms/{room}/sockets", get(calls::room_sockets))
        .route(
            "/v1/rooms/{room}/members",
            post(calls::add_members).delete(calls::remove_members),
        )
        .route("/v1/sockets/{id}/disconnect", post(calls::disconnect))
        .route("/v1/nodes", get(calls::nodes))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state, require_token));
    Router::new().route("/openapi.json", get(openapi)).merge(v1)
}

/// `Authorization: Bearer <API_TOKEN>` on every `/v1` call when a token is configured.
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(expected, presented.trim()) {
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
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

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
