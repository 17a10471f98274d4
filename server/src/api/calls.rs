//! The calls answered once every replica has: presence, membership, disconnect, nodes.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
};
use serde::{Deserialize, Serialize};
use socketioxide::socket::Sid;
use utoipa::ToSchema;

use super::{ApiJson, OkBody};
use crate::{
    cluster::{ClusterError, Op, Outcome, Reply},
    error::{ErrorBody, ErrorCode, Failure},
    state::AppState,
    validate,
};

#[derive(Debug, Serialize, ToSchema)]
pub struct SocketEntry {
    pub id: String,
    pub node: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoomSockets {
    pub room: String,
    pub sockets: Vec<SocketEntry>,
}

/// Every socket in a room, cluster-wide.
#[utoipa::path(get, path = "/v1/rooms/{room}/sockets",
    params(("room" = String, Path, description = "room name")),
    responses((status = 200, body = RoomSockets), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn room_sockets(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
) -> Result<Json<RoomSockets>, Failure> {
    validate::room(&room)?;
    let replies = call(&state, Op::Sockets { room: room.clone() }).await?;
    let mut sockets: Vec<SocketEntry> = replies
        .into_iter()
        .flat_map(|r| {
            let node = r.node;
            held(r.outcome).into_iter().map(move |sid| SocketEntry {
                id: sid.to_string(),
                node: node.clone(),
            })
        })
        .collect();
    sockets.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    Ok(Json(RoomSockets { room, sockets }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct MembersBody {
    /// Socket ids to add to (or remove from) the room.
    pub sockets: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MembersResult {
    pub ok: bool,
    pub room: String,
    /// The sockets that some replica held and changed.
    pub sockets: Vec<String>,
    /// The sockets no replica holds (already disconnected, or never existed).
    pub missing: Vec<String>,
}

/// Add sockets to a room; answers once every replica has applied it.
#[utoipa::path(post, path = "/v1/rooms/{room}/members", request_body = MembersBody,
    params(("room" = String, Path, description = "room name")),
    responses((status = 200, body = MembersResult, description = "applied on every replica"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "none of the sockets exists"),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_members(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<MembersBody>,
) -> Result<Json<MembersResult>, Failure> {
    members(&state, room, body, |room, sockets| Op::Join {
        room,
        sockets,
    })
    .await
}

/// Remove sockets from a room; answers once every replica has applied it.
#[utoipa::path(delete, path = "/v1/rooms/{room}/members", request_body = MembersBody,
    params(("room" = String, Path, description = "room name")),
    responses((status = 200, body = MembersResult, description = "applied on every replica"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "none of the sockets exists"),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_members(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<MembersBody>,
) -> Result<Json<MembersResult>, Failure> {
    members(&state, room, body, |room, sockets| Op::Leave {
        room,
        sockets,
    })
    .await
}

async fn members(
    state: &AppState,
    room: String,
    body: MembersBody,
    op: impl FnOnce(String, Vec<Sid>) -> Op,
) -> Result<Json<MembersResult>, Failure> {
    validate::room(&room)?;
    if body.sockets.is_empty() {
        return Err(Failure::invalid("sockets is empty"));
    }
    let mut wanted = body
        .sockets
        .iter()
        .map(|id| validate::socket_id(id))
        .collect::<Result<Vec<_>, _>>()?;
    wanted.sort_unstable_by_key(|s| s.to_string());
    wanted.dedup();
    let replies = call(state, op(room.clone(), wanted.clone())).await?;
    let mut done: Vec<Sid> = replies.into_iter().flat_map(|r| held(r.outcome)).collect();
    done.sort_unstable_by_key(|s| s.to_string());
    done.dedup();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|s| !done.contains(s))
        .map(ToString::to_string)
        .collect();
    if done.is_empty() {
        return Err(Failure::new(
            ErrorCode::NotFound,
            format!(
                "no replica holds any of these sockets: {}",
                missing.join(", ")
            ),
        ));
    }
    Ok(Json(MembersResult {
        ok: true,
        room,
        sockets: done.iter().map(ToString::to_string).collect(),
        missing,
    }))
}

/// Disconnect one socket wherever it is connected.
#[utoipa::path(post, path = "/v1/sockets/{id}/disconnect",
    params(("id" = String, Path, description = "socket id")),
    responses((status = 200, body = OkBody), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disconnect(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<OkBody>, Failure> {
    let sid = validate::socket_id(&id)?;
    let replies = call(&state, Op::Disconnect { socket: sid }).await?;
    if replies.into_iter().all(|r| held(r.outcome).is_empty()) {
        return Err(Failure::new(
            ErrorCode::NotFound,
            format!("no replica holds socket {id}"),
        ));
    }
    Ok(Json(OkBody { ok: true }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeEntry {
    pub id: String,
    pub sockets: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Nodes {
    /// The sockets of every replica that answered, in all (what an autoscaler reads).
    pub sockets: usize,
    pub nodes: Vec<NodeEntry>,
}

/// The replicas that answered, with their socket counts.
#[utoipa::path(get, path = "/v1/nodes",
    responses((status = 200, body = Nodes), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn nodes(State(state): State<Arc<AppState>>) -> Result<Json<Nodes>, Failure> {
    let replies = call(&state, Op::Nodes).await?;
    let mut nodes: Vec<NodeEntry> = replies
        .into_iter()
        .map(|r| NodeEntry {
            sockets: match r.outcome {
                Outcome::Count { sockets } => sockets,
                Outcome::Held { sockets } => sockets.len(),
            },
            id: r.node,
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let sockets = nodes.iter().map(|n| n.sockets).sum();
    Ok(Json(Nodes { sockets, nodes }))
}

async fn call(state: &AppState, op: Op) -> Result<Vec<Reply>, Failure> {
    state.cluster.call(op).await.map_err(|e| match e {
        ClusterError::Unavailable(_) => {
            Failure::cluster_unavailable("the cluster link (Redis) is down")
        }
        e @ ClusterError::Timeout { .. } => Failure::cluster_unavailable(e.to_string()),
    })
}

fn held(outcome: Outcome) -> Vec<Sid> {
    match outcome {
        Outcome::Held { sockets } => sockets,
        Outcome::Count { .. } => Vec::new(),
    }
}
