//! How a message reaches sockets. Socket `publish` and `POST /v1/broadcast` both send a
//! [`Message`] on the bus; every replica, the sender's included, receives it there and hands it
//! to its own sockets, one by one, in the order the bus carries them. With history on, room
//! messages are stamped and kept on the way (`history`), and each socket gets the stamp as the
//! message's last argument `{id, offset}`. When the bus is down a message still reaches this
//! replica's own sockets, unstamped, and the caller is told `cluster_unavailable`.
//!
//! Handing each socket its copy here, rather than through the Socket.IO adapter's broadcast,
//! lets a socket that cannot take a message be named: it is disconnected (its client can
//! resume) instead of silently missing the message. It is also where `join` and `resume` meet
//! live messages: while a socket waits for the history, its live messages are held, and the
//! ack goes out right after the replay and the held messages, so no message is lost or
//! repeated at the seam.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};
use socketioxide::{SendError, SocketError, SocketIo, TransportType, socket::Sid};
use tokio::sync::{OnceCell, oneshot};

use crate::{
    bus::{Adapter, Bus},
    error::Failure,
    history::{History, Recovery, Stamp, recover},
    metrics::{Limit, Metrics},
};

type Socket = socketioxide::extract::SocketRef<Adapter>;

/// One message for sockets, as it travels between replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// Unique per message, cluster-wide.
    pub id: String,
    /// The rooms to reach (each socket at most once); empty: every socket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    /// Sockets that do not get it (a publishing socket, the API's `except`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Sid>,
    pub event: String,
    /// The JSON as the publisher sent it: parsed once where it comes in, then only copied.
    pub data: Box<RawValue>,
}

impl Message {
    pub fn new(rooms: Vec<String>, except: Vec<Sid>, event: String, data: &Value) -> Self {
        Self {
            id: format!("{:032x}", rand::random::<u128>()),
            rooms,
            except,
            event,
            // Serialising a Value cannot fail (its map keys are strings).
            data: serde_json::value::to_raw_value(data)
                .unwrap_or_else(|_| RawValue::NULL.to_owned()),
        }
    }
}

/// A message as this replica hands it out.
struct Delivered {
    msg: Message,
    /// Set for room messages kept in the history.
    stamp: Option<Stamp>,
    offset: Option<String>,
    /// What one copy weighs in a socket's backlog (its encoded size).
    size: usize,
}

impl Delivered {
    fn new(msg: Message, stamp: Option<Stamp>, size: usize) -> Self {
        Self {
            offset: stamp.map(|s| s.offset()),
            msg,
            stamp,
            size,
        }
    }

    fn parse(payload: &[u8]) -> Result<Self, serde_json::Error> {
        let (stamp, json) = Stamp::decode(payload);
        Ok(Self::new(
            serde_json::from_slice(json)?,
            stamp,
            payload.len(),
        ))
    }
}

/// The last argument of a room message.
#[derive(Serialize)]
struct Meta<'a> {
    id: &'a str,
    offset: &'a str,
}

/// What `resume` answers besides `ok`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    pub recovered: bool,
    /// Where the socket now stands; `None` with history off or Redis down.
    pub offset: Option<String>,
}

/// One socket's delivery state (a socket extension).
pub struct Outbox {
    /// `SOCKET_BUFFER_BYTES`.
    limit: usize,
    /// Bytes queued for the socket while it long-polls and not yet taken by a poll.
    backlog: AtomicUsize,
    /// Set once the socket is being disconnected for falling behind.
    slow: AtomicBool,
    /// True while a `join` or `resume` waits for the history (see `held`).
    holding: AtomicBool,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// `join`s and `resume`s in flight.
    holders: u32,
    messages: Vec<Arc<Delivered>>,
    bytes: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            backlog: AtomicUsize::new(0),
            slow: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            held: Mutex::new(Held::default()),
        }
    }

    /// Records a message of `bytes` queued for the socket; false once more than
    /// `SOCKET_BUFFER_BYTES` wait for a long-polling socket. Only long-polling backlogs are
    /// counted here: a websocket's is counted where it is written (`conn`), and a socket that
    /// has upgraded starts from zero.
    pub fn queued(&self, bytes: usize, polling: bool) -> bool {
        if !polling {
            self.backlog.store(0, Ordering::Relaxed);
            return true;
        }
        let total = self.backlog.fetch_add(bytes, Ordering::Relaxed) + bytes;
        total <= self.limit
    }

    /// Records that a poll took `bytes` of the backlog.
    pub fn polled(&self, bytes: usize) {
        let _ = self
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(bytes))
            });
    }

    /// Marks the socket as being disconnected for falling behind; true the first time only.
    pub fn mark_slow(&self) -> bool {
        !self.slow.swap(true, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on live messages wait in `held` until [`Delivery::finish`].
    fn hold(&self) {
        let mut held = self.lock();
        held.holders += 1;
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Keeps `d` for later when the socket is holding; false when it is not (send it now), or
    /// `Err` when holding it would pass the buffer limit.
    fn try_hold(&self, d: &Arc<Delivered>) -> Result<bool, ()> {
        if !self.holding.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut held = self.lock();
        if held.holders == 0 {
            return Ok(false);
        }
        held.bytes += d.size;
        if held.bytes > self.limit {
            return Err(());
        }
        held.messages.push(d.clone());
        Ok(true)
    }
}

/// This replica's end of message delivery.
pub struct Delivery {
    bus: Bus,
    chan: String,
    /// This replica's own channel for barriers; its messages share the delivery queue.
    barrier_chan: String,
    metrics: Arc<Metrics>,
    history: Option<Arc<History>>,
    io: OnceCell<SocketIo<Adapter>>,
    /// Barriers waiting for the delivery loop (see [`Delivery::barrier`]).
    barriers: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_barrier: AtomicU64,
}

/// Marks a barrier in the delivery loop's queue; no message starts with it.
const BARRIER: u8 = 0;
/// Longest wait for a barrier.
const BARRIER_WAIT: std::time::Duration = crate::bus::OP_TIMEOUT;

impl Delivery {
    pub fn new(
        bus: Bus,
        prefix: &str,
        metrics: Arc<Metrics>,
        history: Option<Arc<History>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            bus,
            chan: format!("{prefix}#msg"),
            barrier_chan: format!("{prefix}#msg#{:016x}", rand::random::<u64>()),
            metrics,
            history,
            io: OnceCell::new(),
            barriers: Mutex::new(HashMap::new()),
            next_barrier: AtomicU64::new(0),
        })
    }

    /// Subscribes to the message channel and hands what arrives to this replica's sockets,
    /// in the order the bus delivers it, for as long as the process runs.
    pub async fn start(self: &Arc<Self>, io: SocketIo<Adapter>) {
        let _ = self.io.set(io);
        let mut incoming = self
            .bus
            .subscribe_channels(vec![self.chan.clone(), self.barrier_chan.clone()])
            .await;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some((_, payload)) = incoming.recv().await {
                if let Some(id) = barrier_id(&payload) {
                    let waiting = this.lock_barriers().remove(&id);
                    if let Some(done) = waiting {
                        let _ = done.send(());
                    }
                    continue;
                }
                match Delivered::parse(&payload) {
                    Ok(d) => this.fan_out(Arc::new(d)),
                    Err(e) => tracing::warn!("unreadable message on the bus: {e}"),
                }
            }
        });
    }

    fn lock_barriers(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        self.barriers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once the delivery loop has handed out everything the bus delivered to this
    /// replica before the call. A history read answers before the messages it covers may have
    /// reached the loop (the Redis client hands pushes over on a queue of its own), so the seam
    /// waits for a marker sent through the same path after the read: Redis sends it to this
    /// replica after every message published before it.
    async fn barrier(&self) {
        let id = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let (done, wait) = oneshot::channel();
        self.lock_barriers().insert(id, done);
        let mut marker = vec![BARRIER];
        marker.extend_from_slice(&id.to_be_bytes());
        let sent = if self.bus.is_memory() {
            self.bus.deliver_here(self.chan.clone(), marker)
        } else {
            self.bus
                .publish_count(self.barrier_chan.clone(), marker)
                .await
                .is_ok_and(|n| n > 0)
        };
        // Bounded: a link that fails now must not hold the socket's messages forever.
        if !sent || tokio::time::timeout(BARRIER_WAIT, wait).await.is_err() {
            self.lock_barriers().remove(&id);
        }
    }

    /// Sends `msg` to every replica (stamped and kept when it is a room message and history
    /// is on). If the bus fails, this replica's own sockets still get it, and the caller is
    /// told `cluster_unavailable`.
    pub async fn send(&self, msg: Message) -> Result<(), Failure> {
        let json = serde_json::to_string(&msg)
            .map_err(|e| Failure::invalid(format!("the message cannot be encoded: {e}")))?;
        let size = json.len();
        let sent = match &self.history {
            Some(history) if !msg.rooms.is_empty() => {
                history.publish(&self.chan, &msg.rooms, &json).await
            }
            _ => self
                .bus
                .publish_count(self.chan.clone(), json.into_bytes())
                .await
                .map(|_| ()),
        };
        if let Err(e) = sent {
            tracing::debug!("cluster delivery failed, delivering locally: {e}");
            self.fan_out(Arc::new(Delivered::new(msg, None, size)));
            self.metrics.local_only_deliveries.inc();
            return Err(Failure::cluster_unavailable(
                "delivered to this replica's sockets only: the cluster link (Redis) is down",
            ));
        }
        Ok(())
    }

    /// Hands `d` to each of this replica's sockets it is for.
    fn fan_out(&self, d: Arc<Delivered>) {
        let Some(io) = self.io.get() else { return };
        let sockets = if d.msg.rooms.is_empty() {
            io.sockets()
        } else {
            io.to(d.msg.rooms.clone()).sockets()
        };
        for s in sockets {
            if d.msg.except.contains(&s.id) {
                continue;
            }
            let Some(outbox) = s.extensions.get::<Arc<Outbox>>() else {
                // Not set up yet (its connection is being accepted): nothing waits for it.
                continue;
            };
            match outbox.try_hold(&d) {
                Ok(true) => {}
                Ok(false) => self.send_now(&s, &outbox, &d),
                Err(()) => disconnect_slow(&self.metrics, s),
            }
        }
    }

    fn send_now(&self, s: &Socket, outbox: &Outbox, d: &Delivered) {
        let sent = match &d.offset {
            Some(offset) => {
                let meta = Meta {
                    id: &d.msg.id,
                    offset,
                };
                s.emit(&d.msg.event, &(&d.msg.data, meta))
            }
            None => s.emit(&d.msg.event, &d.msg.data),
        };
        match sent {
            Ok(()) => {
                // A websocket's backlog is bounded in `conn`, after the engine; a long-polling
                // socket's waits in the engine until the client polls (see `polled`).
                let polling = s.transport_type() == TransportType::Polling;
                if !outbox.queued(d.size, polling) {
                    disconnect_slow(&self.metrics, s.clone());
                }
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                disconnect_slow(&self.metrics, s.clone());
            }
            // Closing, or gone since the room was read: nothing is waiting for it.
            Err(e) => {
                tracing::debug!(socket = %s.id, "message not sent: {e}");
                self.metrics.socket_drops.inc();
            }
        }
    }

    /// Joins `s` to `room`. With history on, `reply` gets the offset from which the socket
    /// receives the room's messages, and goes out before any message after that offset.
    pub async fn join(&self, s: &Socket, room: String, reply: impl FnOnce(Option<String>)) {
        let (Some(history), Some(outbox)) = (&self.history, s.extensions.get::<Arc<Outbox>>())
        else {
            s.join(room);
            return reply(None);
        };
        outbox.hold();
        s.join(room);
        let head = match history.head().await {
            Ok(head) => Some(head),
            Err(e) => {
                tracing::debug!("history unavailable for a join: {e}");
                None
            }
        };
        self.barrier().await;
        self.finish(s, &outbox, Vec::new(), None, head, |last| {
            reply(last.map(|s| s.offset()));
        });
    }

    /// Joins `s` to `rooms` and sends it what those rooms got after `since`, then `reply`, then
    /// live messages: each message once across the seam.
    pub async fn resume(
        &self,
        s: &Socket,
        rooms: Vec<String>,
        since: Option<Stamp>,
        reply: impl FnOnce(Resumed),
    ) {
        let Some(outbox) = s.extensions.get::<Arc<Outbox>>() else {
            return reply(Resumed {
                recovered: false,
                offset: None,
            });
        };
        let Some(history) = &self.history else {
            s.join(rooms);
            return reply(Resumed {
                recovered: false,
                offset: None,
            });
        };
        outbox.hold();
        s.join(rooms.clone());
        let (replay, recovered, head) = match history.read(&rooms).await {
            Ok(snapshot) => {
                let Recovery { replay, recovered } =
                    recover(&snapshot, since, history.config().ttl);
                let (replay, complete) = self.replayable(replay, outbox.limit);
                (replay, recovered && complete, Some(snapshot.head))
            }
            Err(e) => {
                tracing::debug!("history unavailable for a resume: {e}");
                (Vec::new(), false, None)
            }
        };
        self.barrier().await;
        // The replay covered everything up to the head.
        self.finish(s, &outbox, replay, head, head, |last| {
            reply(Resumed {
                recovered,
                offset: last.map(|s| s.offset()),
            });
        });
    }

    /// Parses the replay, keeping the newest entries that fit in the socket's buffer; false
    /// when some had to be left out.
    fn replayable(&self, replay: Vec<(Stamp, String)>, limit: usize) -> (Vec<Delivered>, bool) {
        let mut bytes = 0;
        let mut kept = Vec::new();
        for (stamp, json) in replay.into_iter().rev() {
            bytes += json.len();
            if bytes > limit {
                return (kept.into_iter().rev().collect(), false);
            }
            match serde_json::from_str::<Message>(&json) {
                Ok(msg) => kept.push(Delivered::new(msg, Some(stamp), json.len())),
                Err(e) => tracing::warn!("unreadable history entry: {e}"),
            }
        }
        (kept.into_iter().rev().collect(), true)
    }

    /// Sends the replay, then the held live messages (skipping those at or before `skip_to`,
    /// which the replay covered), then calls `reply` with the last stamp the socket got (or
    /// `head`), all under the socket's lock so nothing live comes in between.
    fn finish(
        &self,
        s: &Socket,
        outbox: &Outbox,
        replay: Vec<Delivered>,
        skip_to: Option<Stamp>,
        head: Option<Stamp>,
        reply: impl FnOnce(Option<Stamp>),
    ) {
        let mut held = outbox.lock();
        let mut last = head;
        for d in &replay {
            self.send_now(s, outbox, d);
        }
        let covered = |stamp: Option<Stamp>| matches!((stamp, skip_to), (Some(m), Some(h)) if m.epoch == h.epoch && m.seq <= h.seq);
        for d in std::mem::take(&mut held.messages) {
            if covered(d.stamp) {
                continue;
            }
            self.send_now(s, outbox, &d);
            if let (Some(m), Some(l)) = (d.stamp, last)
                && m.epoch == l.epoch
                && m.seq > l.seq
            {
                last = Some(m);
            }
        }
        held.bytes = 0;
        held.holders = held.holders.saturating_sub(1);
        if held.holders == 0 {
            outbox.holding.store(false, Ordering::SeqCst);
        }
        reply(last);
    }
}

fn barrier_id(payload: &[u8]) -> Option<u64> {
    match payload {
        [BARRIER, id @ ..] => Some(u64::from_be_bytes(id.try_into().ok()?)),
        _ => None,
    }
}

/// A socket that cannot take what it is sent is disconnected and counted once, so its client
/// reconnects and resumes instead of silently missing messages.
pub fn disconnect_slow(metrics: &Metrics, s: Socket) {
    let first = s
        .extensions
        .get::<Arc<Outbox>>()
        .is_none_or(|o| o.mark_slow());
    if first {
        tracing::debug!(socket = %s.id, "socket fell behind SOCKET_BUFFER_BYTES: disconnecting");
        metrics.slow_socket_disconnects.inc();
        metrics.limit_hit(Limit::socket_buffer_bytes);
        close(s);
    }
}

/// Records that a long-polling request took `bytes` of socket `sid`'s backlog.
pub fn polled(io: &SocketIo<Adapter>, sid: Sid, bytes: usize) {
    if let Some(outbox) = io
        .get_socket(sid)
        .and_then(|s| s.extensions.get::<Arc<Outbox>>())
    {
        outbox.polled(bytes);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_polling_backlog_over_the_limit_is_refused_until_polled() {
        let o = Outbox::new(1000);
        assert!(o.queued(600, true));
        assert!(!o.queued(600, true), "1200 of 1000 bytes waiting");
        o.polled(1200);
        assert!(o.queued(1000, true), "a poll took it all");
        o.polled(5000);
        assert!(
            o.queued(1000, true),
            "a poll never takes more than was counted"
        );
        // An upgraded socket's backlog is counted elsewhere.
        assert!(o.queued(10_000, false));
        assert!(o.queued(1000, true));
    }

    #[test]
    fn a_slow_socket_is_marked_once() {
        let o = Outbox::new(1000);
        assert!(o.mark_slow());
        assert!(!o.mark_slow());
    }

    #[test]
    fn held_messages_are_bounded_and_only_while_holding() {
        let o = Outbox::new(100);
        let d = Arc::new(Delivered::new(
            Message::new(vec![], vec![], "e".into(), &Value::Null),
            None,
            60,
        ));
        assert_eq!(o.try_hold(&d), Ok(false), "not holding: send it now");
        o.hold();
        assert_eq!(o.try_hold(&d), Ok(true));
        assert_eq!(o.try_hold(&d), Err(()), "120 of 100 bytes held");
    }

    #[test]
    fn message_ids_differ() {
        let a = Message::new(vec![], vec![], "e".into(), &Value::Null);
        let b = Message::new(vec![], vec![], "e".into(), &Value::Null);
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 32);
    }
}
