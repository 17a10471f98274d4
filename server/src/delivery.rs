//! How a message reaches sockets. Socket `publish` and `POST /v1/broadcast` both send a
//! [`Message`] on the bus; every replica, the sender's included, receives it there and hands it
//! to its own sockets, one by one. When the bus is down the message still reaches this
//! replica's own sockets and the caller is told `cluster_unavailable`.
//!
//! Handing each socket its copy here, rather than through the Socket.IO adapter's broadcast,
//! is what lets a socket that cannot take a message be named: it is disconnected (its client
//! can resume) instead of silently missing the message. For long-polling sockets the bytes
//! waiting for the next poll are counted against `SOCKET_BUFFER_BYTES` (websocket backlogs are
//! counted in `conn`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide::{SendError, SocketError, SocketIo, TransportType, socket::Sid};
use tokio::sync::OnceCell;

use crate::{
    bus::{Adapter, Bus},
    error::Failure,
    limits::SocketLimits,
    metrics::{Limit, Metrics},
};

type Socket = socketioxide::extract::SocketRef<Adapter>;

/// One message for sockets, as it travels between replicas.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// The rooms to reach (each socket at most once); empty: every socket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    /// Sockets that do not get it (a publishing socket, the API's `except`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Sid>,
    pub event: String,
    pub data: Value,
}

/// This replica's end of message delivery.
pub struct Delivery {
    bus: Bus,
    chan: String,
    metrics: Arc<Metrics>,
    io: OnceCell<SocketIo<Adapter>>,
}

impl Delivery {
    pub fn new(bus: Bus, prefix: &str, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            chan: format!("{prefix}#msg"),
            metrics,
            io: OnceCell::new(),
        })
    }

    /// Subscribes to the message channel and hands what arrives to this replica's sockets,
    /// in the order the bus delivers it, for as long as the process runs.
    pub async fn start(self: &Arc<Self>, io: SocketIo<Adapter>) {
        let _ = self.io.set(io);
        let mut incoming = self.bus.subscribe_channel(self.chan.clone()).await;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some((_, payload)) = incoming.recv().await {
                match serde_json::from_slice::<Message>(&payload) {
                    Ok(msg) => this.fan_out(&msg, payload.len()),
                    Err(e) => tracing::warn!("unreadable message on the bus: {e}"),
                }
            }
        });
    }

    /// Sends `msg` to every replica. If the bus fails, this replica's own sockets still get
    /// it, and the caller is told `cluster_unavailable`.
    pub async fn send(&self, msg: &Message) -> Result<(), Failure> {
        let payload = serde_json::to_vec(msg)
            .map_err(|e| Failure::invalid(format!("the message cannot be encoded: {e}")))?;
        let size = payload.len();
        match self.bus.publish_count(self.chan.clone(), payload).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!("cluster delivery failed, delivering locally: {e}");
                self.fan_out(msg, size);
                self.metrics.local_only_deliveries.inc();
                Err(Failure::cluster_unavailable(
                    "delivered to this replica's sockets only: the cluster link (Redis) is down",
                ))
            }
        }
    }

    /// Hands `msg` to each of this replica's sockets it is for. `size` is what one copy
    /// weighs in a socket's backlog (the encoded message; close to what the socket is sent).
    fn fan_out(&self, msg: &Message, size: usize) {
        let Some(io) = self.io.get() else { return };
        let sockets = if msg.rooms.is_empty() {
            io.sockets()
        } else {
            io.to(msg.rooms.clone()).sockets()
        };
        for s in sockets {
            if !msg.except.contains(&s.id) {
                self.send_to(s, msg, size);
            }
        }
    }

    fn send_to(&self, s: Socket, msg: &Message, size: usize) {
        let limits = s.extensions.get::<Arc<SocketLimits>>();
        match s.emit(&msg.event, &msg.data) {
            Ok(()) => {
                // A websocket's backlog is bounded in `conn`, after the engine; a long-polling
                // socket's waits in the engine until the client polls (see `polled`).
                let polling = s.transport_type() == TransportType::Polling;
                if limits.is_some_and(|l| !l.queued(size, polling)) {
                    disconnect_slow(&self.metrics, s);
                }
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                disconnect_slow(&self.metrics, s);
            }
            // Closing, or gone since the room was read: nothing is waiting for it.
            Err(e) => {
                tracing::debug!(socket = %s.id, "message not sent: {e}");
                self.metrics.socket_drops.inc();
            }
        }
    }
}

/// A socket that cannot take what it is sent is disconnected and counted once, so its client
/// reconnects and resumes instead of silently missing messages.
pub fn disconnect_slow(metrics: &Metrics, s: Socket) {
    let first = s
        .extensions
        .get::<Arc<SocketLimits>>()
        .is_none_or(|l| l.mark_slow());
    if first {
        tracing::debug!(socket = %s.id, "socket fell behind SOCKET_BUFFER_BYTES: disconnecting");
        metrics.slow_socket_disconnects.inc();
        metrics.limit_hit(Limit::socket_buffer_bytes);
        close(s);
    }
}

/// Records that a long-polling request took `bytes` of socket `sid`'s backlog.
pub fn polled(io: &SocketIo<Adapter>, sid: Sid, bytes: usize) {
    if let Some(limits) = io
        .get_socket(sid)
        .and_then(|s| s.extensions.get::<Arc<SocketLimits>>())
    {
        limits.polled(bytes);
    }
}

/// Disconnects `s`. When its transport is busy (a full queue), the disconnect is retried for
/// up to 10 s; by then the transport's own timeouts have closed it.
pub fn close(s: Socket) {
    if s.clone().disconnect().is_ok() {
        return;
    }
    tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if !s.connected() || s.clone().disconnect().is_ok() {
                return;
            }
        }
    });
}
