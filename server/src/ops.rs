//! Operations endpoints (health, readiness, metrics) and the request metrics of every route.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    bus::LinkState,
    metrics::{RequestLabels, RouteLabels},
    state::AppState,
};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `starting` (Redis not reached yet) or `draining` (shutting down).
    pub status: &'static str,
    /// `connected`, `single` or `degraded`.
    pub cluster: &'static str,
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Readiness>) {
    let link = *state.bus.state().borrow();
    let status = if state.draining.load(Ordering::SeqCst) {
        "draining"
    } else if link == LinkState::Starting {
        "starting"
    } else {
        "ready"
    };
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            status,
            cluster: link.as_str(),
        }),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    // Counted at scrape time rather than kept by connect/disconnect handlers: a socket that
    // closed before its connect handler ran would have left such a gauge one too high.
    let sockets = state.io.of("/").map_or(0, |ns| ns.sockets().len());
    state
        .metrics
        .sockets_connected
        .set(i64::try_from(sockets).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Counts and times every HTTP request by its route pattern (not the raw path, which would
/// give one series per room).
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    state
        .metrics
        .request_seconds
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    response
}
