//! The Socket.IO side: connection auth and the `join`, `leave`, `publish`, `resume` and
//! `refresh` events.

use std::{io, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide::{
    ParserError, SocketIo,
    extract::{AckSender, Event, SocketRef, State, TryData},
    handler::ConnectHandler,
};

use crate::{
    auth::{AuthError, Expiry, Grants, Policy, user_room},
    bus::Adapter,
    delivery::{self, Delivery, Message, Outbox},
    error::{Ack, Done, ErrorCode, Failure},
    history::Position,
    limits::{Admit, Capacity, SocketLimitConfig, SocketLimits},
    metrics::{ErrorLabels, Limit, Metrics},
    rebalance::Cooperative,
    validate,
};

pub type Socket = SocketRef<Adapter>;

/// What socket handlers share.
pub struct SocketCtx {
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub max_payload: usize,
    pub limits: SocketLimitConfig,
    pub capacity: Capacity,
    pub delivery: Arc<Delivery>,
    /// `SOCKET_BUFFER_BYTES`.
    pub socket_buffer: usize,
}

type Ctx = State<Arc<SocketCtx>>;

/// Registers the default namespace and its handlers.
pub fn register(io: &SocketIo<Adapter>) {
    io.ns("/", on_connect.with(authenticate));
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
    // Counted here too, not only at the HTTP handshake: handshakes can race past that check.
    let Some(admission) = ctx.capacity.admit() else {
        ctx.metrics.limit_hit(Limit::max_connections);
        return Err(AuthError::OverCapacity);
    };
    let token = if ctx.policy.requires_token() {
        // An auth payload without a string `token` is no token: the query may carry one.
        auth.ok()
            .map(|a| a.token)
            .or_else(|| query_token(s.req_parts().uri.query()))
    } else {
        None
    };
    let grants = ctx.policy.authenticate(token.as_deref())?;
    let limits = SocketLimits::new(ctx.limits, Instant::now(), Some(admission));
    if let Grants::Token(claims) = &grants
        && let Some(sub) = &claims.sub
    {
        let room = user_room(sub);
        limits.enter(&room);
        s.join(room);
    }
    if let Some(exp) = grants.expires_at() {
        s.extensions.insert(expire_at(exp, io, s.id));
    }
    s.extensions.insert(Arc::new(grants));
    s.extensions.insert(Arc::new(limits));
    s.extensions
        .insert(Arc::new(Outbox::new(ctx.socket_buffer)));
    s.on("join", on_join);
    s.on("leave", on_leave);
    s.on("publish", on_publish);
    s.on("resume", on_resume);
    s.on("refresh", on_refresh);
    s.on_fallback(on_unknown);
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

/// Charges one event to the socket's rate. Over the rate the event is refused; a socket that
/// stays over it for 10 s is disconnected.
/// Returns the socket's limits, for handlers that count more than events.
fn admit(s: &Socket, ctx: &SocketCtx) -> Result<Arc<SocketLimits>, Failure> {
    let Some(limits) = s.extensions.get::<Arc<SocketLimits>>() else {
        return Err(Failure::new(ErrorCode::Forbidden, "not authenticated"));
    };
    match limits.admit(Instant::now()) {
        Admit::Yes => Ok(limits),
        verdict => {
            ctx.metrics.limit_hit(Limit::socket_rate);
            if verdict == Admit::Disconnect {
                tracing::debug!(socket = %s.id, "over SOCKET_RATE for 10 s: disconnecting");
                delivery::close(s.clone());
            }
            Err(Failure::new(
                ErrorCode::RateLimited,
                "too many events: slow down (SOCKET_RATE)",
            ))
        }
    }
}

/// Sends the event's one ack. An ack that cannot be queued (the client does not read what it
/// is sent) is not dropped silently: the socket is disconnected, and the client can resume.
fn reply(s: &Socket, ctx: &SocketCtx, ack: AckSender<Adapter>, result: Result<Done, Failure>) {
    if let Err(f) = &result {
        count_refusal(&ctx.metrics, f.code);
    }
    // A client that sent no ack callback gets nothing; that is its choice.
    if let Err(e) = ack.send(&Ack::from(result)) {
        tracing::debug!(socket = %s.id, "ack not sent ({e})");
        delivery::disconnect_slow(&ctx.metrics, s.clone());
    }
}

/// Events with no handler: charged to the rate, and refused when they carry an ack.
async fn on_unknown(s: Socket, State(ctx): Ctx, Event(event): Event, ack: AckSender<Adapter>) {
    let result = admit(&s, &ctx).and_then(|_| {
        Err(Failure::invalid(format!(
            "unknown event {:?}",
            event.chars().take(64).collect::<String>()
        )))
    });
    reply(&s, &ctx, ack, result);
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
    let checked = admit(&s, &ctx).and_then(|limits| {
        let room = room_arg(room)?;
        enter(&s, &ctx, &limits, &room)?;
        Ok(room)
    });
    match checked {
        Ok(room) => {
            let reply_to = |offset| {
                let done = Done {
                    offset,
                    ..Done::default()
                };
                reply(&s, &ctx, ack, Ok(done));
            };
            ctx.delivery.join(&s, room, reply_to).await;
        }
        Err(f) => reply(&s, &ctx, ack, Err(f)),
    }
}

/// Checks that the socket may be in `room` and counts it against its room limit.
fn enter(s: &Socket, ctx: &SocketCtx, limits: &SocketLimits, room: &str) -> Result<(), Failure> {
    let grants =
        grants(s).ok_or_else(|| Failure::new(ErrorCode::Forbidden, "not authenticated"))?;
    if !ctx.policy.may_join(&grants, room) {
        return Err(Failure::new(
            ErrorCode::Forbidden,
            format!("not allowed to join {room:?}"),
        ));
    }
    if !limits.enter(room) {
        ctx.metrics.limit_hit(Limit::max_rooms_per_socket);
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "a socket may be in {} rooms (MAX_ROOMS_PER_SOCKET)",
                ctx.limits.max_rooms
            ),
        ));
    }
    Ok(())
}

async fn on_leave(
    s: Socket,
    State(ctx): Ctx,
    TryData(room): TryData<String>,
    ack: AckSender<Adapter>,
) {
    let result = admit(&s, &ctx)
        .and_then(|limits| Ok((limits, room_arg(room)?)))
        .map(|(limits, room)| {
            limits.exit(&room);
            s.leave(room);
            Done::default()
        });
    reply(&s, &ctx, ack, result);
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
    let result = admit(&s, &ctx)
        .and_then(|_| body.map_err(|_| Failure::invalid("expected {token}")))
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
                    AuthError::OverCapacity => Failure::new(ErrorCode::OverCapacity, e.to_string()),
                })?;
            if let (Some(exp), Some(expiry)) = (fresh.expires_at(), s.extensions.get::<Expiry>()) {
                expiry.extend(exp);
            }
            s.extensions.insert(Arc::new(fresh));
            Ok(Done::default())
        });
    reply(&s, &ctx, ack, result);
}

/// A `resume` event's payload.
#[derive(Deserialize)]
struct Resume {
    rooms: Vec<String>,
    #[serde(default)]
    since: Option<String>,
    /// The client honours `chorus:rebalance` (waits before reconnecting; see `rebalance`).
    #[serde(default)]
    rebalance: bool,
}

/// Joins the rooms a client was in and sends it what it missed since its last offset.
async fn on_resume(
    s: Socket,
    State(ctx): Ctx,
    TryData(body): TryData<Resume>,
    ack: AckSender<Adapter>,
) {
    let checked = admit(&s, &ctx).and_then(|limits| {
        let body = body.map_err(|_| Failure::invalid("expected {rooms, since}"))?;
        if body.rebalance {
            s.extensions.insert(Cooperative);
        }
        let since = match &body.since {
            None => None,
            Some(offset) => Some(Position::parse(offset).ok_or_else(|| {
                Failure::invalid("since is not an offset this server handed out")
            })?),
        };
        for room in &body.rooms {
            validate::room(room)?;
        }
        let mut entered = Vec::new();
        for room in &body.rooms {
            let new = !limits.has(room);
            if let Err(f) = enter(&s, &ctx, &limits, room) {
                // All or nothing: the rooms this resume counted are given back.
                for room in entered {
                    limits.exit(room);
                }
                return Err(f);
            }
            if new {
                entered.push(room);
            }
        }
        Ok((body.rooms, since))
    });
    match checked {
        // No rooms: nothing to read or replay (a helper saying it honours `chorus:rebalance`).
        Ok((rooms, _)) if rooms.is_empty() => {
            let done = Done {
                recovered: Some(true),
                ..Done::default()
            };
            reply(&s, &ctx, ack, Ok(done));
        }
        Ok((rooms, since)) => {
            let reply_to = |r: delivery::Resumed| {
                let done = Done {
                    recovered: Some(r.recovered),
                    offset: r.offset,
                    ..Done::default()
                };
                reply(&s, &ctx, ack, Ok(done));
            };
            ctx.delivery.resume(&s, rooms, since, reply_to).await;
        }
        Err(f) => reply(&s, &ctx, ack, Err(f)),
    }
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
    let result = match admit(&s, &ctx) {
        Ok(_) => publish(&s, &ctx, body).await,
        Err(f) => Err(f),
    };
    if result.is_ok()
        || result
            .as_ref()
            .is_err_and(|f| f.code == ErrorCode::ClusterUnavailable)
    {
        ctx.metrics.messages_published.inc();
    }
    reply(&s, &ctx, ack, result);
}

async fn publish(
    s: &Socket,
    ctx: &SocketCtx,
    body: Result<Publish, ParserError>,
) -> Result<Done, Failure> {
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
    let msg = Message::new(vec![room], vec![s.id], event, &data);
    let id = msg.id.clone();
    ctx.delivery.send(msg).await?;
    Ok(Done {
        id: Some(id),
        ..Done::default()
    })
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
