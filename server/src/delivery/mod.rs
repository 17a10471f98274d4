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
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};
use socketioxide::{SendError, SocketError, SocketIo, TransportType, socket::Sid};
use tokio::sync::{OnceCell, oneshot};

mod gaps;

use crate::{
    bus::{Adapter, Bus, Event, Item, Outgoing, QueueStats},
    conn::Transport,
    dedupe::{self, Origin, Recent, Take},
    error::Failure,
    history::{History, Position, Recovery, Replayed, Snapshot, Stamp, recover},
    metrics::{GapCause, Limit, Metrics},
};
pub use gaps::MAX_CATCH_UP_BYTES;
use gaps::Tracker;

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
    /// When it was published (ms since the Unix epoch, the publishing replica's clock) and by
    /// which replica (a random number): a copy that comes later than a replica remembers ids is
    /// dropped (`dedupe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub o: Option<u64>,
}

impl Message {
    pub fn new(rooms: Vec<String>, except: Vec<Sid>, event: String, data: &Value) -> Self {
        Self {
            t: Some(dedupe::now_ms()),
            o: None,
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

/// The room name under which messages to every socket (no rooms) are kept in the history:
/// not for `resume` (no client can name it: room names are never empty), only for a replica
/// that missed some to catch up (see `gaps`).
pub(crate) const ALL: &str = "";

/// A message as this replica hands it out.
struct Delivered {
    msg: Message,
    /// Set for room messages kept in the history: where a socket stands once it has this one.
    position: Option<Position>,
    offset: Option<String>,
    /// The message's stamp on the Redis it came by (or was read from).
    stamp: Option<Stamp>,
    /// Replayed by a catch-up (see `gaps`): not for a socket whose own `join` or `resume`
    /// already stands past it.
    caught_up: bool,
    /// What one copy weighs in a socket's backlog (its encoded size).
    size: usize,
}

impl Delivered {
    fn new(msg: Message, position: Option<Position>, size: usize) -> Self {
        Self {
            offset: position.as_ref().map(Position::offset),
            msg,
            position,
            stamp: None,
            caught_up: false,
            size,
        }
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
    /// Set once the socket is being closed because it missed messages the history no longer
    /// holds (see `gaps`): it gets nothing more, so that it resumes from before them.
    closing: AtomicBool,
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
    /// Where the last `join` or `resume` left the socket: it has every message this covers.
    acked: Option<Position>,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            backlog: AtomicUsize::new(0),
            slow: AtomicBool::new(false),
            closing: AtomicBool::new(false),
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

    /// Marks the socket as closing to resume (it gets nothing more, and its session takes no
    /// more requests); true the first time only.
    pub fn start_closing(&self) -> bool {
        !self.closing.swap(true, Ordering::AcqRel)
    }

    /// True while a `join` or `resume` of the socket waits for the history.
    pub fn is_holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
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

    /// Whether the socket's last `join` or `resume` stood past `d` (a catch-up's replay).
    fn had(&self, d: &Delivered) -> bool {
        d.caught_up
            && d.stamp
                .is_some_and(|st| self.lock().acked.as_ref().is_some_and(|a| a.covers(st)))
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
    barriers: Mutex<HashMap<u64, Waiting>>,
    next_barrier: AtomicU64,
    /// Messages already taken (another Redis's copy is dropped).
    taken: Mutex<Recent>,
    /// This replica as a publisher (`Message::o`); never 0.
    origin: u64,
    /// Items from the bus waiting for the delivery loop, as the loop last saw them (metrics).
    backlog: AtomicUsize,
    /// The delivery queue's counters, once started.
    queue: std::sync::OnceLock<QueueStats>,
}

/// A barrier: the links whose marker is still to come, those whose marker came.
struct Waiting {
    pending: HashSet<usize>,
    confirmed: HashSet<usize>,
    done: Option<oneshot::Sender<()>>,
}

impl Waiting {
    /// Wakes the barrier once no marker is pending.
    fn settle(&mut self) {
        if self.pending.is_empty()
            && let Some(done) = self.done.take()
        {
            let _ = done.send(());
        }
    }
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
            taken: Mutex::new(Recent::new(dedupe::MAX_IDS, dedupe::WINDOW_MS)),
            origin: rand::random::<u64>().max(1),
            backlog: AtomicUsize::new(0),
            queue: std::sync::OnceLock::new(),
        })
    }

    /// Subscribes to the message channel and hands what arrives to this replica's sockets,
    /// in the order the bus delivers it, for as long as the process runs. A gap (see `gaps`)
    /// is caught up on before anything after it is handed out.
    pub async fn start(self: &Arc<Self>, io: SocketIo<Adapter>) {
        let _ = self.io.set(io);
        let mut incoming = self
            .bus
            .subscribe_channels(vec![self.chan.clone(), self.barrier_chan.clone()])
            .await;
        let _ = self.queue.set(incoming.stats());
        let this = self.clone();
        tokio::spawn(async move {
            let mut gaps = Tracker::new(this.bus.links().len());
            loop {
                let retry = gaps.retry_at();
                let event = tokio::select! {
                    event = incoming.recv() => event,
                    () = sleep_until(retry), if retry.is_some() => {
                        this.catch_up(&mut gaps).await;
                        continue;
                    }
                };
                let Some(event) = event else { return };
                this.backlog.store(incoming.len(), Ordering::Relaxed);
                match event {
                    Event::Message(item) => this.take(item, &mut gaps).await,
                    Event::Overflow(link) => {
                        this.gap(&mut gaps, link, GapCause::overflow);
                        this.catch_up(&mut gaps).await;
                    }
                    Event::Up(link) if gaps.up(link) => {
                        this.gap(&mut gaps, link, GapCause::link_down);
                        this.catch_up(&mut gaps).await;
                    }
                    Event::Up(link) => this.start_on(&mut gaps, link).await,
                }
            }
        });
    }

    /// One message of the delivery queue: a barrier marker, or a message for sockets.
    async fn take(&self, item: Item, gaps: &mut Tracker) {
        if let Some(id) = barrier_id(&item.payload) {
            if let Some(w) = self.lock_barriers().get_mut(&id)
                && w.pending.remove(&item.link)
            {
                // A link that owes a catch-up does not vouch for what was read from it: the
                // catch-up will hand those messages out, and must not a second time.
                if !gaps.is_pending(item.link) {
                    w.confirmed.insert(item.link);
                }
                w.settle();
            }
            return;
        }
        let (stamp, json) = Stamp::decode(&item.payload);
        let msg: Message = match serde_json::from_slice(json) {
            Ok(msg) => msg,
            Err(e) => return tracing::warn!("unreadable message on the bus: {e}"),
        };
        if let Some(stamp) = stamp {
            if gaps.skips(item.link, stamp) {
                self.gap(gaps, item.link, GapCause::skipped);
            }
            if gaps.is_pending(item.link) {
                // Hands out everything up to the history's head, this message included when
                // it is for a room here (its copy below is then dropped as taken); nothing
                // after the gap goes out before the gap itself, so when the history cannot be
                // read now, the sockets resume instead.
                self.catch_up(gaps).await;
                if gaps.is_pending(item.link) {
                    self.give_up(gaps, item.link);
                }
            }
            gaps.advance(item.link, stamp);
        }
        if !self.first_copy(&msg) {
            self.metrics.duplicate_copies.inc();
            return;
        }
        // Messages to every socket are stamped (kept for catch-ups) but carry no offset.
        let position = stamp
            .filter(|_| !msg.rooms.is_empty())
            .map(|_| gaps.position());
        let mut d = Delivered::new(msg, position, item.payload.len());
        d.stamp = stamp;
        self.fan_out(Arc::new(d));
    }

    /// True for the first copy of a message this replica sees.
    fn first_copy(&self, msg: &Message) -> bool {
        self.take_copy(msg) == Take::New
    }

    /// Takes a copy of a message, saying whether it is new (see [`Recent::take`]).
    fn take_copy(&self, msg: &Message) -> Take {
        let Some(id) = dedupe::parse_id(&msg.id) else {
            return Take::New;
        };
        let origin = msg
            .t
            .zip(msg.o)
            .map(|(published, replica)| Origin { replica, published });
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.take(id, origin, dedupe::now_ms())
    }

    /// Items from the bus waiting for this replica's delivery loop.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Bytes of messages waiting for the delivery loop, and messages dropped at the bound.
    pub fn backlog_stats(&self) -> (usize, u64) {
        self.queue
            .get()
            .map_or((0, 0), |q| (q.bytes(), q.dropped()))
    }

    /// The room histories, when history is on.
    pub fn history(&self) -> Option<&History> {
        self.history.as_deref()
    }

    /// Message ids remembered now and their heap memory (read at scrape time, not per message).
    pub fn dedupe_stats(&self) -> (usize, usize) {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        (taken.len(), taken.heap_bytes())
    }

    fn lock_barriers(&self) -> MutexGuard<'_, HashMap<u64, Waiting>> {
        self.barriers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once the delivery loop has handed out everything the bus delivered to this
    /// replica before the call. A history read answers before the messages it covers may have
    /// reached the loop (the Redis client hands pushes over on a queue of its own), so the seam
    /// waits for a marker sent through the same path after the read: Redis sends it to this
    /// replica after every message published before it.
    /// With several Redis the marker goes by each that is up, and the barrier waits for all of
    /// them. Returns the links whose marker came back: only what was read from those is
    /// known to have been taken.
    async fn barrier(&self) -> HashSet<usize> {
        let id = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let (done, wait) = oneshot::channel();
        // Registered before anything is sent: a marker may come back at once.
        self.lock_barriers().insert(
            id,
            Waiting {
                pending: (0..self.bus.links().len()).collect(),
                confirmed: HashSet::new(),
                done: Some(done),
            },
        );
        let mut marker = vec![BARRIER];
        marker.extend_from_slice(&id.to_be_bytes());
        let took: Vec<bool> = if self.bus.is_memory() {
            vec![self.bus.deliver_here(self.chan.clone(), marker)]
        } else {
            let counts = self.bus.publish_each(&self.barrier_chan, &marker).await;
            counts.iter().map(|n| n.is_some_and(|n| n > 0)).collect()
        };
        // Links that did not take the marker will not bring it back.
        if let Some(w) = self.lock_barriers().get_mut(&id) {
            for (link, took) in took.iter().enumerate() {
                if !took {
                    w.pending.remove(&link);
                }
            }
            w.settle();
        }
        // Bounded: a link that fails now must not hold the socket's messages forever.
        let _ = tokio::time::timeout(BARRIER_WAIT, wait).await;
        self.lock_barriers()
            .remove(&id)
            .map(|w| w.confirmed)
            .unwrap_or_default()
    }

    /// Sends `msg` to every replica (stamped and kept when it is a room message and history
    /// is on). If the bus fails, this replica's own sockets still get it, and the caller is
    /// told `cluster_unavailable`.
    pub async fn send(&self, mut msg: Message) -> Result<(), Failure> {
        msg.o = Some(self.origin);
        let json = serde_json::to_string(&msg)
            .map_err(|e| Failure::invalid(format!("the message cannot be encoded: {e}")))?;
        let size = json.len();
        let sent = match &self.history {
            Some(history) if msg.rooms.is_empty() => {
                history.publish(&self.chan, &[ALL.to_owned()], &json).await
            }
            Some(history) => history.publish(&self.chan, &msg.rooms, &json).await,
            _ => {
                self.bus
                    .publish_first(Outgoing::Publish {
                        chan: self.chan.as_str().into(),
                        payload: json.into_bytes().into(),
                    })
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::debug!("cluster delivery failed, delivering locally: {e}");
            // A copy that a frozen Redis sends later must not reach the sockets again.
            if self.first_copy(&msg) {
                self.fan_out(Arc::new(Delivered::new(msg, None, size)));
            }
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
            if outbox.is_closing() || outbox.had(&d) {
                continue;
            }
            match outbox.try_hold(&d) {
                Ok(true) => {}
                Ok(false) => self.send_now(&s, &outbox, &d),
                Err(()) => disconnect_slow(&self.metrics, s),
            }
        }
    }

    fn send_now(&self, s: &Socket, outbox: &Outbox, d: &Delivered) {
        if outbox.is_closing() {
            return;
        }
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
        let heads = history.heads().await;
        let confirmed = self.barrier().await;
        let head = match heads {
            Ok(heads) => confirmed_only(heads, &confirmed)
                .map(|heads| Position::of(heads.iter().map(|s| s.head))),
            Err(e) => {
                tracing::debug!("history unavailable for a join: {e}");
                None
            }
        };
        self.finish(s, &outbox, Vec::new(), None, None, head, |last| {
            reply(last.map(|p| p.offset()));
        });
    }

    /// Joins `s` to `rooms` and sends it what those rooms got after `since`, then `reply`, then
    /// live messages: each message once across the seam.
    pub async fn resume(
        &self,
        s: &Socket,
        rooms: Vec<String>,
        since: Option<Position>,
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
        let read = history.read(&rooms, since.as_ref()).await;
        let confirmed = self.barrier().await;
        let snapshots = match read {
            Ok(snapshots) => confirmed_only(snapshots, &confirmed),
            Err(e) => {
                tracing::debug!("history unavailable for a resume: {e}");
                None
            }
        };
        let (replay, recovered, seen, head) = match snapshots {
            Some(snapshots) => {
                let Recovery {
                    replay,
                    recovered,
                    seen,
                    head,
                } = recover(&snapshots, since.as_ref(), history.config().ttl);
                let (replay, complete) = self.replayable(replay, outbox.limit);
                (replay, recovered && complete, Some(seen), Some(head))
            }
            None => (Vec::new(), false, None, None),
        };
        self.finish(
            s,
            &outbox,
            replay,
            seen.as_ref(),
            since.as_ref(),
            head,
            |last| {
                reply(Resumed {
                    // No position (history unreadable, or the socket is closing): nothing is known
                    // to be recovered.
                    recovered: recovered && last.is_some(),
                    offset: last.map(|p| p.offset()),
                });
            },
        );
    }

    /// Parses the replay, keeping the newest entries that fit in the socket's buffer; false
    /// when some had to be left out.
    fn replayable(&self, replay: Vec<Replayed>, limit: usize) -> (Vec<Delivered>, bool) {
        let mut bytes = 0;
        let mut kept = Vec::new();
        for Replayed { position, json, .. } in replay.into_iter().rev() {
            bytes += json.len();
            if bytes > limit {
                return (kept.into_iter().rev().collect(), false);
            }
            match serde_json::from_str::<Message>(&json) {
                Ok(msg) => kept.push(Delivered::new(msg, Some(position), json.len())),
                Err(e) => tracing::warn!("unreadable history entry: {e}"),
            }
        }
        (kept.into_iter().rev().collect(), true)
    }

    /// Sends the replay, then the held live messages (skipping those the histories read hold:
    /// the replay covered them, or those the client had: at or before `had`, a resume's
    /// offset), then calls `reply` with where the socket stands (`head` and the held messages
    /// sent), all under the socket's lock so nothing live comes in between. A socket being
    /// closed to resume (see `gaps`) is sent nothing and answered no position: it must resume
    /// from where it was.
    #[allow(clippy::too_many_arguments)] // the seam's parts, each from the read before it
    fn finish(
        &self,
        s: &Socket,
        outbox: &Outbox,
        replay: Vec<Delivered>,
        seen: Option<&HashSet<String>>,
        had: Option<&Position>,
        head: Option<Position>,
        reply: impl FnOnce(Option<Position>),
    ) {
        let mut held = outbox.lock();
        let mut last = head;
        for d in &replay {
            self.send_now(s, outbox, d);
        }
        for d in std::mem::take(&mut held.messages) {
            let covered = d.stamp.is_some_and(|st| had.is_some_and(|h| h.covers(st)));
            if covered || seen.is_some_and(|ids| ids.contains(&d.msg.id)) {
                continue;
            }
            self.send_now(s, outbox, &d);
            if let (Some(last), Some(p)) = (last.as_mut(), &d.position) {
                last.merge(p);
            }
        }
        held.bytes = 0;
        let mut acked = had.cloned().unwrap_or_default();
        if let Some(last) = &last {
            acked.merge(last);
        }
        if let Some(before) = held.acked.take() {
            acked.merge(&before);
        }
        held.acked = Some(acked);
        reply(last.filter(|_| !outbox.is_closing()));
        // After the reply: a live message that finds the socket holding waits for this lock,
        // so it goes out behind the ack.
        held.holders = held.holders.saturating_sub(1);
        if held.holders == 0 {
            outbox.holding.store(false, Ordering::SeqCst);
        }
    }
}

/// The snapshots read from links whose barrier marker came back (every message they cover has
/// been taken by this replica, so none of them can come again as a first copy); `None` when no
/// such link is left.
fn confirmed_only(snapshots: Vec<Snapshot>, confirmed: &HashSet<usize>) -> Option<Vec<Snapshot>> {
    let kept: Vec<Snapshot> = snapshots
        .into_iter()
        .filter(|s| confirmed.contains(&s.link))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// Waits until `at` (for ever without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

/// Whether `s` counts as held by this replica: not being closed to resume elsewhere (a
/// long-polling session lingers until its heartbeat ends it).
pub fn is_live(s: &Socket) -> bool {
    !is_closing(s)
}

/// Whether `s` is being closed to resume (see `gaps`): its session takes no more requests.
pub fn is_closing(s: &Socket) -> bool {
    s.extensions
        .get::<Arc<Outbox>>()
        .is_some_and(|o| o.is_closing())
}

/// The connection of a session's websocket, and that of its latest long poll, kept by the
/// `sessions` middleware (see `app`) so that its transport can be closed from here.
#[derive(Clone)]
pub struct WebsocketConn(pub Transport);
#[derive(Clone)]
pub struct PollConn(pub Transport);

/// Closes `s`'s transport, as a drain does: its client sees the transport close and reconnects
/// by itself (a plain `socket.io-client` too, which a Socket.IO disconnect would not make
/// reconnect), then resumes. A websocket's connection is closed (the session ends with it); a
/// long-polling session's pending poll is cut, and every later request of the session is
/// answered as an unknown session's (see [`is_closing`]) until the heartbeat ends it. Only a
/// websocket whose connection is not known gets a Socket.IO disconnect.
pub fn close_transport(s: Socket) {
    if s.transport_type() == TransportType::Websocket {
        let conn = s
            .extensions
            .get::<WebsocketConn>()
            .map(|c| c.0)
            .or_else(|| s.req_parts().extensions.get::<Transport>().cloned());
        if !conn.is_some_and(|t| t.close()) {
            close(s);
        }
    } else if let Some(poll) = s.extensions.get::<PollConn>() {
        poll.0.close();
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
