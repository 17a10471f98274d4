//! The Socket.IO side: connection auth and the `join`, `leave`, `publish` and `refresh` events.

use std::{io, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide::{
    ParserError, SocketIo,
    extract::{AckSender, SocketRef, State, TryData},
    handler::ConnectHandler,
};

use crate::{
    auth::{AuthError, Expiry, Grants, Policy, user_room},
    bus::Adapter,
    delivery::deliver,
    error::{Ack, ErrorCode, Failure},
    metrics::{ErrorLabels, Metrics},
    validate,
};

pub type Socket = SocketRef<Adapter>;

/// What socket handlers share.
pub struct SocketCtx {
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub max_payload: usize,
}

type Ctx = State<Arc<SocketCtx>>;

/// Registers the default namespace and its handlers.
pub async fn register(io: &SocketIo<Adapter>) -> Result<(), String> {
    io.ns("/", on_connect.with(authenticate))
        .await
        .map_err(|e| format!("cannot start the Socket.IO adapter: {e}"))
}

/// The connection's auth payload: `auth: {token}` in Socket.IO clients.
#[derive(Deserialize)]
struct ConnectAuth {
    token: String,
}

/// Connect middleware: with a JWT secret, refuses sockets without a valid token
/// (`connect_error` with message `unauthorized`); then sets the socket up.
///
/// The setup happens here, not in the connect handler, because socketioxide sends the connect
/// packet before it spawns that handler: a `join` sent at once could arrive before its handler
/// was registered and be dropped unanswered (seen about once per 1000 connections under load).
/// Middlewares run before the connect packet, and rooms joined here are cleaned up if the
/// connection then fails.
async fn authenticate(
    s: Socket,
    State(ctx): Ctx,
    TryData(auth): TryData<ConnectAuth>,
    io: SocketIo<Adapter>,
) -> Result<(), AuthError> {
    let token = if ctx.policy.requires_token() {
        // An auth payload without a string `token` is no token: the query may carry one.
        auth.ok()
            .map(|a| a.token)
            .or_else(|| query_token(s.req_parts().uri.query()))
    } else {
        None
    };
    let grants = ctx.policy.authenticate(token.as_deref())?;
    s.join(validate::socket_room(s.id));
    if let Grants::Token(claims) = &grants
        && let Some(sub) = &claims.sub
    {
        s.join(user_room(sub));
    }
    if let Some(exp) = grants.expires_at() {
        s.extensions.insert(expire_at(exp, io, s.id));
    }
    s.extensions.insert(Arc::new(grants));
    s.on("join", on_join);
    s.on("leave", on_leave);
    s.on("publish", on_publish);
    s.on("refresh", on_refresh);
    Ok(())
}

/// The timer that disconnects socket `sid` at `exp`. It holds the server handle, not the
/// socket, so a socket that leaves earlier is freed at once (and its timer with it).
fn expire_at(exp: u64, io: SocketIo<Adapter>, sid: socketioxide::socket::Sid) -> Expiry {
    Expiry::start(exp, move || {
        if let Some(s) = io.get_socket(sid) {
            tracing::debug!(socket = %sid, "token expired without a refresh: disconnecting");
            // A server-side disconnect: clients see `io server disconnect` and do not retry
            // with the expired token on their own.
            let _ = s.disconnect();
        }
    })
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(str::to_owned)
}

/// Runs once the socket is connected: nothing left to do (see [`authenticate`] for the setup).
async fn on_connect() {}

fn grants(s: &Socket) -> Option<Arc<Grants>> {
    s.extensions.get::<Arc<Grants>>()
}

fn reply(ctx: &SocketCtx, ack: AckSender<Adapter>, result: Result<(), Failure>) {
    if let Err(f) = &result {
        count_refusal(&ctx.metrics, f.code);
    }
    // A client that sent no ack callback gets nothing; that is its choice.
    let _ = ack.send(&Ack::from(result));
}

fn count_refusal(metrics: &Metrics, code: ErrorCode) {
    let code = serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    metrics.refused.get_or_create(&ErrorLabels { code }).inc();
}

fn room_arg(room: Result<String, ParserError>) -> Result<String, Failure> {
    let room = room.map_err(|_| Failure::invalid("expected a room name (string)"))?;
    validate::room(&room)?;
    Ok(room)
}

async fn on_join(
    s: Socket,
    State(ctx): Ctx,
    TryData(room): TryData<String>,
    ack: AckSender<Adapter>,
) {
    let result = room_arg(room).and_then(|room| {
        let grants =
            grants(&s).ok_or_else(|| Failure::new(ErrorCode::Forbidden, "not authenticated"))?;
        if !ctx.policy.may_join(&grants, &room) {
            return Err(Failure::new(
                ErrorCode::Forbidden,
                format!("not allowed to join {room:?}"),
            ));
        }
        s.join(room);
        Ok(())
    });
    reply(&ctx, ack, result);
}

async fn on_leave(
    s: Socket,
    State(ctx): Ctx,
    TryData(room): TryData<String>,
    ack: AckSender<Adapter>,
) {
    let result = room_arg(room).map(|room| s.leave(room));
    reply(&ctx, ack, result);
}

/// A `refresh` event's payload.
#[derive(Deserialize)]
struct Refresh {
    token: String,
}

/// Replaces the socket's token: new grants and a new expiry, same subject. On any refusal the
/// old token stays in force.
async fn on_refresh(
    s: Socket,
    State(ctx): Ctx,
    TryData(body): TryData<Refresh>,
    ack: AckSender<Adapter>,
) {
    let result = body
        .map_err(|_| Failure::invalid("expected {token}"))
        .and_then(|body| {
            let current = grants(&s)
                .ok_or_else(|| Failure::new(ErrorCode::Forbidden, "not authenticated"))?;
            let fresh = ctx
                .policy
                .refresh(&current, &body.token)
                .map_err(|e| match e {
                    AuthError::Unauthorized => {
                        Failure::new(ErrorCode::Unauthorized, "the token is invalid or expired")
                    }
                    AuthError::SubjectChanged => Failure::new(ErrorCode::Forbidden, e.to_string()),
                })?;
            if let (Some(exp), Some(expiry)) = (fresh.expires_at(), s.extensions.get::<Expiry>()) {
                expiry.extend(exp);
            }
            s.extensions.insert(Arc::new(fresh));
            Ok(())
        });
    reply(&ctx, ack, result);
}

/// A `publish` event's payload.
#[derive(Deserialize, Serialize)]
struct Publish {
    room: String,
    event: String,
    #[serde(default)]
    data: Value,
}

async fn on_publish(
    s: Socket,
    State(ctx): Ctx,
    TryData(body): TryData<Publish>,
    ack: AckSender<Adapter>,
) {
    let result = publish(&s, &ctx, body).await;
    if result.is_ok()
        || result
            .as_ref()
            .is_err_and(|f| f.code == ErrorCode::ClusterUnavailable)
    {
        ctx.metrics.messages_published.inc();
    }
    reply(&ctx, ack, result);
}

async fn publish(
    s: &Socket,
    ctx: &SocketCtx,
    body: Result<Publish, ParserError>,
) -> Result<(), Failure> {
    let body =
        body.map_err(|e| Failure::invalid(format!("expected {{room, event, data}}: {e}")))?;
    let size = json_len(&body);
    if size > ctx.max_payload {
        return Err(Failure::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the message is {size} bytes; the limit is {}",
                ctx.max_payload
            ),
        ));
    }
    let Publish { room, event, data } = body;
    validate::room(&room)?;
    validate::event(&event)?;
    let grants =
        grants(s).ok_or_else(|| Failure::new(ErrorCode::Forbidden, "not authenticated"))?;
    if !ctx.policy.may_publish(&grants, &room) {
        return Err(Failure::new(
            ErrorCode::Forbidden,
            format!("not allowed to publish to {room:?}"),
        ));
    }
    deliver(&ctx.metrics, || s.to(room.clone()), &event, &data).await
}

/// The length of `value` as JSON, counted without building the text.
fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Not reachable for JSON that was just read; refuse rather than guess.
        Err(_) => usize::MAX,
    }
}
