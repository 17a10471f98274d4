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
    metrics::{BusLabels, RequestLabels, RouteLabels},
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
    /// `connected` (at least one Redis up), `single` or `degraded`.
    pub cluster: &'static str,
    /// Each Redis of the bus, with several Redis only (one reads as `cluster`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buses: Vec<BusStatus>,
}

/// One Redis of the bus.
#[derive(Debug, Serialize, ToSchema)]
pub struct BusStatus {
    /// `host:port/db`, never the password.
    pub host: String,
    pub up: bool,
    /// With history on: true once this Redis holds the history the others hold, false while
    /// it is down or is being caught up after it returned.
    #[serde(rename = "caughtUp", skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
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
    let buses = state
        .bus
        .links()
        .iter()
        .filter(|_| state.bus.is_plural())
        .enumerate()
        .map(|(i, l)| BusStatus {
            host: l.display().to_owned(),
            up: l.is_up(),
            caught_up: state
                .delivery
                .history()
                .and_then(|h| h.progress(i))
                .map(|p| p.caught_up()),
        })
        .collect();
    (
        code,
        Json(Readiness {
            status,
            cluster: link.as_str(),
            buses,
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
    let (ids, bytes) = state.delivery.dedupe_stats();
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    state.metrics.dedupe_ids.set(gauge(ids));
    state.metrics.dedupe_bytes.set(gauge(bytes));
    let (queued, dropped) = state.delivery.backlog_stats();
    state.metrics.bus_backlog_bytes.set(gauge(queued));
    let overflows = &state.metrics.bus_backlog_overflows;
    overflows.inc_by(dropped.saturating_sub(overflows.get()));
    state
        .metrics
        .bus_backlog
        .set(gauge(state.delivery.backlog()));
    let history = state.delivery.history();
    for (i, link) in state.bus.links().iter().enumerate() {
        if link.is_memory() {
            continue;
        }
        let label = BusLabels {
            bus: link.display().to_owned(),
        };
        let failures = state.metrics.bus_failures.get_or_create(&label);
        failures.inc_by(link.failures().saturating_sub(failures.get()));
        if let Some(progress) = history.and_then(|h| h.progress(i)) {
            let done = state.metrics.bus_catch_ups.get_or_create(&label);
            done.inc_by(progress.done().saturating_sub(done.get()));
            state
                .metrics
                .bus_caught_up
                .get_or_create(&label)
                .set(progress.caught_up().into());
        }
    }
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
