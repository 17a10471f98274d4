//! `POST /v1/broadcast`.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{ApiJson, OkBody};
use crate::{
    delivery::Message,
    error::{ErrorBody, Failure},
    state::AppState,
    validate,
};

#[derive(Debug, Deserialize, ToSchema)]
pub struct BroadcastBody {
    /// Rooms to deliver to (each socket at most once); omit to reach every socket.
    pub rooms: Option<Vec<String>>,
    pub event: String,
    /// The event's one argument, any JSON.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
    /// Socket ids that must not receive it.
    #[serde(default)]
    pub except: Vec<String>,
}

/// Deliver an event to rooms (or every socket) on every replica.
#[utoipa::path(post, path = "/v1/broadcast", request_body = BroadcastBody,
    responses(
        (status = 202, body = OkBody, description = "delivered to the cluster"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "Redis is down: delivered to this replica's sockets only"),
    ),
    security(("bearer" = [])))]
pub async fn broadcast(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<BroadcastBody>,
) -> Result<(StatusCode, Json<OkBody>), Failure> {
    validate::event(&body.event)?;
    if let Some(rooms) = &body.rooms {
        if rooms.is_empty() {
            return Err(Failure::invalid(
                "rooms is empty; omit it to broadcast to every socket",
            ));
        }
        for room in rooms {
            validate::room(room)?;
        }
    }
    let except = body
        .except
        .iter()
        .map(|id| validate::socket_id(id))
        .collect::<Result<Vec<_>, _>>()?;
    let msg = Message::new(
        body.rooms.unwrap_or_default(),
        except,
        body.event,
        &body.data,
    );
    state.metrics.broadcasts.inc();
    state.delivery.send(msg).await?;
    Ok((StatusCode::ACCEPTED, Json(OkBody { ok: true })))
}
