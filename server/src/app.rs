//! Wiring: the bus, the Socket.IO layer, the HTTP routes, and the shutdown sequence.

use std::{
    future::Future,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderValue, Method, Uri, header::CONTENT_LENGTH},
    middleware,
    response::IntoResponse,
};
use socketioxide::{SocketIo, socket::Sid};
use tokio::net::TcpListener;

use crate::{
    api,
    auth::Policy,
    bus::{Adapter, Bus, BusError, LinkState},
    client,
    cluster::Cluster,
    config::Config,
    conn::{self, Drain, DrainWindow, StreamLimits},
    delivery::{self, Delivery},
    error::{self, ErrorCode, Failure},
    history::{History, HistoryConfig},
    limits::{Capacity, SocketLimitConfig},
    metrics::{BusLabels, Limit, Metrics},
    ops,
    origins::{self, Origins},
    realtime::{self, SocketCtx},
    rebalance::{RebalanceConfig, Rebalancer},
    state::AppState,
};

/// What a websocket may buffer beyond `MAX_PAYLOAD` (the contract's bound): the limit on
/// tungstenite's own reads, behind the exact check on frame headers in `conn`.
const FRAME_SLACK: u64 = 64 * 1024;
/// See `max_buffer_size` below.
const SOCKET_QUEUE: usize = 8192;
/// A session that does not connect to a namespace within this long is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer of each websocket: client messages are small (join, leave, publish), and a
/// bigger one grows the buffer as needed.
const WS_READ_BUFFER: usize = 1024;
/// Longest wait for open HTTP requests after the sockets are closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("redis: {0}")]
    Redis(#[from] BusError),
    #[error("invalid --cors-origins value {0:?}")]
    Cors(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// A server that is listening.
pub struct Server {
    pub addr: SocketAddr,
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    /// DRAIN_SECONDS: the longest a drain may take.
    longest_drain: Duration,
    /// DRAIN_RATE: the most connections a drain closes per second.
    drain_rate: u32,
    limits: StreamLimits,
}

impl Server {
    /// Builds everything and binds the port; nothing is served until [`Server::serve`].
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let bus = match &config.redis_urls[..] {
            [] => Bus::memory(),
            urls => Bus::redis(urls)?,
        }
        .with_backlog(usize::try_from(config.bus_backlog_bytes).unwrap_or(usize::MAX));
        tokio::spawn(bus.clone().run_health());

        let metrics = Arc::new(Metrics::new());
        tokio::spawn(track_up(bus.state(), metrics.redis_connected.clone()));
        for link in bus.links().iter().filter(|l| !l.is_memory()) {
            let up = metrics.bus_up.get_or_create(&BusLabels {
                bus: link.display().to_owned(),
            });
            tokio::spawn(track_up(link.state(), up.clone()));
        }

        let origins = Arc::new(Origins::new(&config.cors_origins).map_err(ServerError::Cors)?);
        let max_payload = usize::try_from(config.max_payload).unwrap_or(usize::MAX);
        let capacity = Capacity::new(config.max_connections as usize);
        let socket_buffer = usize::try_from(config.socket_buffer_bytes).unwrap_or(usize::MAX);
        let history = History::new(
            bus.clone(),
            &config.channel_prefix,
            HistoryConfig {
                size: config.history_size as usize,
                ttl: Duration::from_secs(config.history_ttl_seconds),
            },
        );
        let delivery = Delivery::new(
            bus.clone(),
            &config.channel_prefix,
            metrics.clone(),
            history,
        );
        let socket_ctx = Arc::new(SocketCtx {
            policy: Policy::from_config(config),
            metrics: metrics.clone(),
            max_payload,
            limits: SocketLimitConfig {
                rate: config.socket_rate,
                max_rooms: config.max_rooms_per_socket as usize,
            },
            capacity: capacity.clone(),
            delivery: delivery.clone(),
            socket_buffer,
        });
        let ws_limit =
            usize::try_from(config.max_payload.saturating_add(FRAME_SLACK)).unwrap_or(usize::MAX);
        let (layer, io) = SocketIo::builder()
            .max_payload(config.max_payload)
            .ws_max_frame_size(ws_limit)
            .ws_max_message_size(ws_limit)
            .connect_timeout(CONNECT_TIMEOUT)
            // Packets queued per socket before a send fails. A websocket's queue drains into
            // its connection at once (bounded there by SOCKET_BUFFER_BYTES), so this only has to
            // absorb bursts, such as the acks of thousands of events sent back to back while
            // the socket's writer waits for a busy CPU.
            .max_buffer_size(SOCKET_QUEUE)
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(socket_ctx)
            .build_layer();
        realtime::register(&io);
        delivery.start(io.clone()).await;

        let cluster = Cluster::new(
            bus.clone(),
            &config.channel_prefix,
            config.node_name(),
            delivery::is_live,
        );
        cluster.start(io.clone()).await;
        let draining = Arc::new(AtomicBool::new(false));
        let rebalancer = Rebalancer::new(
            bus.clone(),
            &config.channel_prefix,
            RebalanceConfig {
                enabled: config.rebalance,
                tolerance: config.rebalance_tolerance,
                rate: config.rebalance_rate,
                affinity: Duration::from_secs(config.rebalance_affinity_seconds),
            },
            metrics.clone(),
            draining.clone(),
        );
        rebalancer.start(io.clone()).await;

        let state = Arc::new(AppState {
            io,
            cluster,
            delivery,
            bus,
            metrics,
            api_token: config.api_token.clone(),
            draining,
        });
        let router = Router::new()
            .merge(ops::router())
            .merge(client::router())
            .merge(api::router(state.clone()))
            .layer(middleware::map_response(error::json_errors))
            .layer(DefaultBodyLimit::max(max_payload))
            .layer(middleware::from_fn_with_state(state.clone(), ops::track))
            .layer(layer)
            .layer(middleware::from_fn_with_state(state.io.clone(), sessions))
            .layer(middleware::from_fn_with_state(
                (capacity, state.metrics.clone(), rebalancer),
                refuse_over_capacity,
            ))
            .layer(middleware::map_request(detach_request_head))
            // Outermost, so long-polling requests from browsers get CORS answers too, and a
            // refused Origin is answered before Socket.IO or the API see the request.
            .layer(Origins::cors())
            .layer(middleware::from_fn_with_state(origins, origins::refuse))
            .with_state(state.clone());

        let listener = listen(config.port).await?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            port: config.port,
            source,
        })?;
        Ok(Self {
            addr,
            listener,
            router,
            state,
            longest_drain: Duration::from_secs(config.drain_seconds),
            drain_rate: config.drain_rate,
            limits: StreamLimits {
                ws_message: config.max_payload,
                socket_buffer,
            },
        })
    }

    pub fn node(&self) -> &str {
        self.state.cluster.node()
    }

    /// Serves until `shutdown` resolves, then drains: readiness fails at once, connections are
    /// closed one by one over the drain window (so clients reconnect elsewhere and resume), at
    /// most DRAIN_RATE a second where DRAIN_SECONDS allows, what is left is closed at its end,
    /// and the call returns.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self {
            listener,
            router,
            state,
            longest_drain,
            drain_rate,
            limits,
            ..
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(None);
        let held = Arc::new(AtomicUsize::new(0));
        let drain_state = state.clone();
        let drain_held = held.clone();
        tokio::spawn(async move {
            shutdown.await;
            drain_state.draining.store(true, Ordering::SeqCst);
            // Sized by the connections held now: each close lands on the other replicas as a
            // reconnect, so they come at most DRAIN_RATE a second unless DRAIN_SECONDS is short.
            let connections = drain_held.load(Ordering::SeqCst);
            let drain = conn::drain_length(connections, longest_drain, drain_rate);
            tracing::info!(
                connections,
                seconds = (drain.as_secs_f64() * 10.0).round() / 10.0,
                rate = drain_rate,
                "shutting down: not ready, closing connections over the drain"
            );
            if conn::paced_drain(connections, drain_rate) > longest_drain {
                tracing::warn!(
                    connections,
                    drain_seconds = longest_drain.as_secs(),
                    rate = drain_rate,
                    "DRAIN_SECONDS is too short to close these connections at DRAIN_RATE: they \
                     close faster; raise DRAIN_SECONDS (and the termination grace period with it)"
                );
            }
            // Each connection closes at a moment of its own, so the other replicas see no
            // reconnect storm.
            let _ = drain_tx.send(Some(DrainWindow::new(tokio::time::Instant::now(), drain)));
            tokio::time::sleep(drain).await;
            tracing::info!("closing sockets");
            drain_state.io.close().await;
            let _ = stop_tx.send(true);
        });
        // Long-polling requests and slow clients get a bounded grace period.
        conn::serve(
            listener,
            router,
            limits,
            state.metrics.clone(),
            stop_rx,
            Drain {
                window: drain_rx,
                held,
            },
            SHUTDOWN_GRACE,
        )
        .await;
        Ok(())
    }
}

/// Answers a new Socket.IO session (a handshake: no `sid` yet) with 503 `over_capacity` while
/// the replica holds MAX_CONNECTIONS sockets, before any session state is made.
async fn refuse_over_capacity(
    axum::extract::State((capacity, metrics, rebalancer)): axum::extract::State<(
        Capacity,
        Arc<Metrics>,
        Arc<Rebalancer>,
    )>,
    req: Request,
    next: middleware::Next,
) -> axum::response::Response {
    let handshake = req.uri().path().starts_with("/socket.io")
        && !req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("sid=")));
    if handshake && !capacity.has_room() {
        metrics.limit_hit(Limit::max_connections);
        return Failure::new(
            ErrorCode::OverCapacity,
            "this replica holds MAX_CONNECTIONS sockets; try again later",
        )
        .into_response();
    }
    // Shedding its excess: a new client (a shed one among them) goes to another replica.
    if handshake && rebalancer.refuses(req.uri().query()) {
        return Failure::new(
            ErrorCode::OverCapacity,
            "this replica holds more than its share of sockets; try again",
        )
        .into_response();
    }
    next.run(req).await
}

/// Every request of an existing Socket.IO session: one of a session being closed to resume
/// (see `delivery::close_transport`) is answered as an unknown session is, so its client
/// reconnects by itself; otherwise the session remembers the connection the request came on
/// (its transport, to be closed that way), and what a long-polling response takes from its
/// backlog is counted (see `delivery::Outbox::queued`): the engine sends at most `MAX_PAYLOAD`
/// of it per poll.
async fn sessions(
    axum::extract::State(io): axum::extract::State<SocketIo<Adapter>>,
    req: Request,
    next: middleware::Next,
) -> axum::response::Response {
    let Some((sid, polling)) = session_of(&req) else {
        return next.run(req).await;
    };
    let polling_get = polling && req.method() == Method::GET;
    if let Some(s) = io.get_socket(sid) {
        if delivery::is_closing(&s) {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"code": 1, "message": "Session ID unknown"})),
            )
                .into_response();
        }
        // GETs only: a long poll (what a client waits on) or a websocket upgrade, not a POST
        // that is answered at once; a poll never stands for the session's websocket.
        if req.method() == Method::GET
            && let Some(transport) = req.extensions().get::<conn::Transport>()
        {
            if polling {
                s.extensions.insert(delivery::PollConn(transport.clone()));
            } else {
                s.extensions
                    .insert(delivery::WebsocketConn(transport.clone()));
            }
        }
    }
    let res = next.run(req).await;
    if polling_get
        && let Some(len) = res
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        delivery::polled(&io, sid, len);
    }
    res
}

/// The session of a Socket.IO request (`/socket.io/?...&sid=...`), and whether it is a
/// long-polling one.
fn session_of(req: &Request) -> Option<(Sid, bool)> {
    if !req.uri().path().starts_with("/socket.io") {
        return None;
    }
    let query = req.uri().query()?;
    let sid = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sid="))?
        .parse()
        .ok()?;
    Some((sid, query.split('&').any(|kv| kv == "transport=polling")))
}

/// Copies the URI and header values of Socket.IO requests out of the connection's read buffer.
///
/// hyper parses them as slices of that buffer (16 KiB), and the Socket.IO layer keeps each
/// socket's request head for the socket's lifetime: without the copy, every idle socket
/// pins a whole read buffer (measured: 16 of 29 KiB per connection).
async fn detach_request_head(mut req: Request) -> Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    if let Ok(uri) = Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri;
    }
    for value in req.headers_mut().values_mut() {
        if let Ok(mut owned) = HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
    req
}

/// Binds every interface, IPv6 and IPv4 when the host has IPv6, IPv4 only otherwise.
async fn listen(port: u16) -> Result<TcpListener, ServerError> {
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|source| ServerError::Bind { port, source }),
    }
}

/// Keeps `up` at 1 while the link (or the bus) is connected.
async fn track_up(
    mut state: tokio::sync::watch::Receiver<LinkState>,
    up: prometheus_client::metrics::gauge::Gauge,
) {
    loop {
        up.set(i64::from(
            *state.borrow_and_update() == LinkState::Connected,
        ));
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), ServerError> {
    if config.api_token.is_none() {
        tracing::warn!("API_TOKEN is not set: /v1/* is open to anyone who can reach this port");
    }
    if config.jwt_secret.is_none() {
        tracing::warn!("JWT_SECRET is not set: any socket may join and publish anywhere");
    }
    conn::raise_nofile_limit();
    let server = Server::bind(&config).await?;
    let redis: Vec<&str> = config
        .redis_urls
        .iter()
        .map(|u| u.display.as_str())
        .collect();
    tracing::info!(
        addr = %server.addr,
        node = server.node(),
        redis = if redis.is_empty() { "none (single node)".to_owned() } else { redis.join(", ") },
        "chorus-server listening"
    );
    server.serve(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = ctrl_c => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
