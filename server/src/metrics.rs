//! Prometheus metrics (`GET /metrics`).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

/// One Redis of the bus, as `host:port/db`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BusLabels {
    pub bus: String,
}

/// Why this replica may have missed messages from a Redis (see `delivery`'s gaps).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values
pub enum GapCause {
    /// The link was down and came back.
    link_down,
    /// A message arrived whose sequence number skipped some.
    skipped,
    /// Messages were dropped at `BUS_BACKLOG_BYTES`.
    overflow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabels {
    pub cause: GapCause,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub code: String,
}

/// The limits of docs/security.md, one label value each.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values of the contract
pub enum Limit {
    max_payload,
    max_connections,
    max_rooms_per_socket,
    socket_rate,
    socket_buffer_bytes,
    header_timeout,
    body_timeout,
    idle_timeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: Limit,
}

pub struct Metrics {
    registry: Registry,
    pub sockets_connected: Gauge,
    pub messages_published: Counter,
    pub broadcasts: Counter,
    pub redis_connected: Gauge,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram>,
    pub refused: Family<ErrorLabels, Counter>,
    pub local_only_deliveries: Counter,
    pub socket_drops: Counter,
    pub limit_refusals: Family<LimitLabels, Counter>,
    pub slow_socket_disconnects: Counter,
    pub bus_up: Family<BusLabels, Gauge>,
    pub bus_failures: Family<BusLabels, Counter>,
    pub bus_catch_ups: Family<BusLabels, Counter>,
    pub bus_caught_up: Family<BusLabels, Gauge>,
    pub duplicate_copies: Counter,
    pub dedupe_ids: Gauge,
    pub dedupe_bytes: Gauge,
    pub bus_backlog: Gauge,
    pub bus_backlog_bytes: Gauge,
    pub bus_backlog_overflows: Counter,
    pub gaps: Family<GapLabels, Counter>,
    pub gap_caught_up: Counter,
    pub gap_closed: Counter,
    pub gap_replayed: Counter,
    pub rebalance_closes: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sockets_connected = Gauge::default();
        let messages_published = Counter::default();
        let broadcasts = Counter::default();
        let redis_connected = Gauge::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        let refused = Family::<ErrorLabels, Counter>::default();
        let local_only_deliveries = Counter::default();
        let socket_drops = Counter::default();
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        let slow_socket_disconnects = Counter::default();
        let bus_up = Family::<BusLabels, Gauge>::default();
        let bus_failures = Family::<BusLabels, Counter>::default();
        let bus_catch_ups = Family::<BusLabels, Counter>::default();
        let bus_caught_up = Family::<BusLabels, Gauge>::default();
        let duplicate_copies = Counter::default();
        let dedupe_ids = Gauge::default();
        let dedupe_bytes = Gauge::default();
        let bus_backlog = Gauge::default();
        let bus_backlog_bytes = Gauge::default();
        let bus_backlog_overflows = Counter::default();
        let gaps = Family::<GapLabels, Counter>::default();
        let gap_caught_up = Counter::default();
        let gap_closed = Counter::default();
        let gap_replayed = Counter::default();
        let rebalance_closes = Counter::default();
        registry.register(
            "chorus_rebalance_closes",
            "Sockets this replica closed because it held more than its share (rebalancing)",
            rebalance_closes.clone(),
        );
        registry.register(
            "chorus_bus_backlog_bytes",
            "Bytes of messages from Redis waiting for this replica's delivery (at most \
             BUS_BACKLOG_BYTES)",
            bus_backlog_bytes.clone(),
        );
        registry.register(
            "chorus_bus_backlog_overflows",
            "Messages from Redis dropped at BUS_BACKLOG_BYTES (each recovered as a gap)",
            bus_backlog_overflows.clone(),
        );
        registry.register(
            "chorus_bus_gaps",
            "Times this replica found it may have missed room messages from a Redis, by cause",
            gaps.clone(),
        );
        registry.register(
            "chorus_gap_sockets_caught_up",
            "Sockets sent the messages of a gap from the history",
            gap_caught_up.clone(),
        );
        registry.register(
            "chorus_gap_sockets_closed",
            "Sockets closed so that they resume, because the history could not cover a gap",
            gap_closed.clone(),
        );
        registry.register(
            "chorus_gap_messages_replayed",
            "Messages of gaps replayed from the history (each counted once, whatever its sockets)",
            gap_replayed.clone(),
        );
        registry.register(
            "chorus_bus_up",
            "1 while this Redis of the bus is up, by Redis (host:port/db)",
            bus_up.clone(),
        );
        registry.register(
            "chorus_bus_failures",
            "Publishes, history writes and reads that one Redis of the bus failed or missed \
             while down, by Redis",
            bus_failures.clone(),
        );
        registry.register(
            "chorus_bus_catch_ups",
            "Copies of another Redis's history into one that returned, completed by this \
             replica, by Redis",
            bus_catch_ups.clone(),
        );
        registry.register(
            "chorus_bus_history_caught_up",
            "1 while this Redis holds the history the others hold (several Redis, history on)",
            bus_caught_up.clone(),
        );
        registry.register(
            "chorus_bus_duplicate_copies",
            "Copies of messages dropped because another Redis (or a late one) brought them first",
            duplicate_copies.clone(),
        );
        registry.register(
            "chorus_bus_backlog_messages",
            "Messages from Redis waiting for this replica to hand them to its sockets",
            bus_backlog.clone(),
        );
        registry.register(
            "chorus_bus_dedupe_ids",
            "Message ids this replica remembers to drop second copies",
            dedupe_ids.clone(),
        );
        registry.register(
            "chorus_bus_dedupe_bytes",
            "Heap memory of the message ids this replica remembers (bounded)",
            dedupe_bytes.clone(),
        );
        registry.register(
            "chorus_sockets_connected",
            "Sockets connected to this replica",
            sockets_connected.clone(),
        );
        registry.register(
            "chorus_messages_published",
            "Socket publish events accepted",
            messages_published.clone(),
        );
        registry.register(
            "chorus_broadcasts",
            "HTTP broadcasts accepted",
            broadcasts.clone(),
        );
        registry.register(
            "chorus_redis_connected",
            "1 while at least one Redis of the bus is up (0 when all are down or none is configured)",
            redis_connected.clone(),
        );
        registry.register(
            "chorus_http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "chorus_http_request_duration_seconds",
            "HTTP request latency by route",
            request_seconds.clone(),
        );
        registry.register(
            "chorus_refused",
            "Socket events refused, by error code",
            refused.clone(),
        );
        registry.register(
            "chorus_local_only_deliveries",
            "Publishes and broadcasts delivered to this replica only because Redis was down",
            local_only_deliveries.clone(),
        );
        registry.register(
            "chorus_socket_drops",
            "Copies of messages not given to one of this replica's sockets because it was closing \
             (a socket that cannot keep up is disconnected instead, see \
             chorus_slow_socket_disconnects)",
            socket_drops.clone(),
        );
        registry.register(
            "chorus_limit_refusals",
            "Requests, messages and connections refused or closed by a limit, by limit",
            limit_refusals.clone(),
        );
        registry.register(
            "chorus_slow_socket_disconnects",
            "Sockets disconnected because more than SOCKET_BUFFER_BYTES waited for them",
            slow_socket_disconnects.clone(),
        );
        Self {
            registry,
            sockets_connected,
            messages_published,
            broadcasts,
            redis_connected,
            requests,
            request_seconds,
            refused,
            local_only_deliveries,
            socket_drops,
            limit_refusals,
            slow_socket_disconnects,
            bus_up,
            bus_failures,
            bus_catch_ups,
            bus_caught_up,
            duplicate_copies,
            dedupe_ids,
            dedupe_bytes,
            bus_backlog,
            bus_backlog_bytes,
            bus_backlog_overflows,
            gaps,
            gap_caught_up,
            gap_closed,
            gap_replayed,
            rebalance_closes,
        }
    }

    /// Counts one refusal or closing by `limit`.
    pub fn limit_hit(&self, limit: Limit) {
        self.limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
