//! One link of the bus: a Redis server, or this process for a single node.
//!
//! - memory: a single node; a publish reaches this process's own subscribers.
//! - Redis: two RESP3 connections (redis-rs `ConnectionManager`), one for commands and one for
//!   subscriptions. Apart, because Redis applies its pub/sub output limit (32 MB by default) to
//!   everything a subscribed connection is sent: the history reads of a reconnect storm over
//!   the subscribed connection made Redis drop it, and with it the messages on their way. The
//!   link keeps the set of wanted channels itself, pings both connections every second so an
//!   idle replica notices a dead link, and resubscribes everything when the link comes back.
//!
//! Every Redis operation is bounded by [`OP_TIMEOUT`] and fails at once while the link is
//! known to be down, so callers never hang on a dead Redis.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{FromRedisValue, PushInfo, PushKind, Value, aio::ConnectionManager};
use tokio::sync::{Notify, watch};

use super::lane::{Host, Lane, Outgoing, Reply};
use super::queue::{Event, Queue};
use crate::config::RedisUrl;

/// A message as it arrives: the link it came by (its index in the bus), its channel and
/// payload.
#[derive(Debug, Clone)]
pub struct Item {
    pub link: usize,
    pub chan: String,
    pub payload: Vec<u8>,
}

/// Upper bound on any single Redis command.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the link is checked when nothing else happens.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("redis is unavailable")]
    Unavailable,
    #[error("{0} bytes of publishes already wait to leave for this redis")]
    Busy(usize),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

impl BusError {
    /// True when the link itself failed (not a command that Redis refused).
    pub fn is_link_failure(&self) -> bool {
        match self {
            BusError::Unavailable | BusError::Timeout(_) => true,
            BusError::Busy(_) => false,
            BusError::Redis(e) => e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
        }
    }
}

/// The cluster link as readiness reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No Redis configured.
    Single,
    /// Redis configured, never reached yet.
    Starting,
    Connected,
    /// Redis was reached once and is unreachable now.
    Degraded,
}

impl LinkState {
    /// The `cluster` field of `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Single => "single",
            LinkState::Connected => "connected",
            LinkState::Starting | LinkState::Degraded => "degraded",
        }
    }
}

/// The channels this process wants, and a version that moves with every change, so the
/// health loop can tell whether a channel was added while it was resubscribing.
#[derive(Default)]
struct Wanted {
    channels: HashSet<String>,
    version: u64,
}

/// State shared with redis-rs's push callback (which must not own the connection).
struct Shared {
    index: usize,
    handlers: RwLock<HashMap<String, Queue>>,
    /// Channels to (re)subscribe whenever the link comes up.
    wanted: Mutex<Wanted>,
    /// True while the link is believed up and every wanted channel is subscribed.
    up: AtomicBool,
    /// Wakes the health loop early (a disconnection was pushed, a subscribe failed).
    wake: Notify,
    state: watch::Sender<LinkState>,
    /// Set when a message meant for every link was not sent on this one (it was down), so
    /// that the link's history can be marked as having a gap when it returns.
    missed: AtomicBool,
    /// Operations this link failed or missed, ever (metrics).
    failures: AtomicU64,
}

impl Shared {
    fn deliver(&self, chan: String, payload: Vec<u8>) -> bool {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        match handlers.get(&chan) {
            Some(queue) => queue.push(Item {
                link: self.index,
                chan,
                payload,
            }),
            None => false,
        }
    }

    /// Tells every subscriber that the link is up with every channel subscribed (see
    /// [`Event::Up`]).
    fn announce_up(&self) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        let mut told: Vec<&Queue> = Vec::new();
        for queue in handlers.values() {
            if !told.iter().any(|q| q.same(queue)) {
                queue.signal(Event::Up(self.index));
                told.push(queue);
            }
        }
    }

    fn on_push(&self, msg: PushInfo) {
        match msg.kind {
            PushKind::Message => {
                let mut data = msg.data.into_iter();
                let (Some(chan), Some(payload)) = (data.next(), data.next()) else {
                    return;
                };
                match (
                    String::from_redis_value(chan),
                    Vec::<u8>::from_redis_value(payload),
                ) {
                    (Ok(chan), Ok(payload)) => {
                        self.deliver(chan, payload);
                    }
                    _ => tracing::warn!("unreadable pub/sub message from redis"),
                }
            }
            PushKind::Disconnection => {
                self.mark_down();
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    fn note_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn note_missed(&self) {
        self.missed.store(true, Ordering::SeqCst);
        self.note_failure();
    }

    fn mark_down(&self) {
        if self.up.swap(false, Ordering::SeqCst) {
            tracing::warn!("redis connection lost; serving local sockets only until it returns");
        }
        self.state.send_if_modified(|s| {
            let next = match *s {
                LinkState::Connected => LinkState::Degraded,
                other => other,
            };
            std::mem::replace(s, next) != next
        });
    }
}

impl Host for Shared {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn link_failed(&self) {
        self.mark_down();
        self.wake.notify_one();
    }

    fn command_failed(&self, missed: bool) {
        if missed {
            self.note_missed();
        } else {
            self.note_failure();
        }
    }
}

struct RedisLink {
    /// Commands: reads, scripts.
    conn: ConnectionManager,
    /// Publishes, in order (on a clone of `conn`).
    lane: Lane,
    /// Subscriptions only; what arrives goes to the push callback.
    sub: ConnectionManager,
    display: String,
}

/// Cheap to clone; clones share the connections and one handler table.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    redis: Option<Arc<RedisLink>>,
}

impl Link {
    fn with_state(index: usize, state: LinkState) -> Arc<Shared> {
        let (state, _) = watch::channel(state);
        Arc::new(Shared {
            index,
            handlers: RwLock::new(HashMap::new()),
            wanted: Mutex::new(Wanted::default()),
            up: AtomicBool::new(false),
            wake: Notify::new(),
            state,
            missed: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        })
    }

    /// A single node's link: publishes loop back to this process's own subscribers.
    pub fn memory() -> Self {
        Self {
            shared: Self::with_state(0, LinkState::Single),
            redis: None,
        }
    }

    /// A link to one Redis, link number `index` of the bus. An unreachable Redis is not an
    /// error: the link comes up in the background (see [`Link::run_health`]) and
    /// [`Link::state`] tells when. Needs a tokio runtime.
    pub fn redis(url: &RedisUrl, index: usize, backlog: usize) -> Result<Self, BusError> {
        let shared = Self::with_state(index, LinkState::Starting);
        let client = redis::Client::open(url.info.clone())?;
        let push_shared = shared.clone();
        let config = || {
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(OP_TIMEOUT))
                .set_response_timeout(Some(OP_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500))
        };
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config())?;
        let sub = ConnectionManager::new_lazy_with_config(
            client,
            config().set_push_sender(move |msg: PushInfo| {
                push_shared.on_push(msg);
                Ok::<(), std::convert::Infallible>(())
            }),
        )?;
        let lane = Lane::start(conn.clone(), shared.clone(), backlog);
        Ok(Self {
            shared,
            redis: Some(Arc::new(RedisLink {
                conn,
                lane,
                sub,
                display: url.display.clone(),
            })),
        })
    }

    /// True for a single node's in-process link.
    pub fn is_memory(&self) -> bool {
        self.redis.is_none()
    }

    /// `host:port/db` of the Redis (no password); empty for a single node.
    pub fn display(&self) -> &str {
        self.redis.as_ref().map_or("", |r| r.display.as_str())
    }

    /// Watch the link state (readiness, metrics).
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }

    /// True while the link is up and every wanted channel is subscribed.
    pub fn is_up(&self) -> bool {
        self.redis.is_none() || self.shared.up.load(Ordering::SeqCst)
    }

    /// Records that a message meant for every link was not sent on this one.
    pub fn note_missed(&self) {
        self.shared.note_missed();
    }

    /// Counts an operation this link failed or skipped (metrics).
    pub fn note_failure(&self) {
        self.shared.note_failure();
    }

    /// Operations this link failed or missed since the process started.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Whether something was missed since the last call (and clears it).
    pub fn take_missed(&self) -> bool {
        self.shared.missed.swap(false, Ordering::SeqCst)
    }

    /// Bounds what may wait in this link's lane (see `lane`).
    pub fn set_backlog(&self, bytes: usize) {
        if let Some(link) = &self.redis {
            link.lane.set_limit(bytes);
        }
    }

    /// Keeps the Redis link alive: pings every [`PING_INTERVAL`] (or at once when woken),
    /// and after any outage resubscribes every wanted channel before reporting the link up.
    /// Returns at once for the memory bus.
    pub async fn run_health(self) {
        let Some(link) = self.redis.clone() else {
            return;
        };
        // The cause is logged once per change, not every second while Redis stays away.
        let mut last_failure: Option<String> = None;
        loop {
            match self.check_link(&link).await {
                Ok(came_up) => {
                    if came_up {
                        tracing::info!(redis = %link.display, "redis connected; cluster delivery on");
                    }
                    last_failure = None;
                    self.shared.state.send_replace(LinkState::Connected);
                }
                Err(e) => {
                    let cause = e.to_string();
                    if last_failure.as_ref() != Some(&cause) {
                        tracing::warn!(redis = %link.display, "redis unreachable, retrying every second: {cause}");
                        last_failure = Some(cause);
                    }
                    self.shared.mark_down();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PING_INTERVAL) => {}
                _ = self.shared.wake.notified() => {}
            }
        }
    }

    /// Pings; after an outage (or at start) subscribes every wanted channel and only then
    /// marks the link up. Returns whether the link came up on this call.
    async fn check_link(&self, link: &RedisLink) -> Result<bool, BusError> {
        let (mut conn, mut sub) = (link.conn.clone(), link.sub.clone());
        bounded(redis::cmd("PING").query_async::<()>(&mut conn)).await?;
        bounded(redis::cmd("PING").query_async::<()>(&mut sub)).await?;
        if self.shared.up.load(Ordering::SeqCst) {
            return Ok(false);
        }
        loop {
            let (channels, version) = {
                let w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
                (w.channels.iter().cloned().collect::<Vec<_>>(), w.version)
            };
            if !channels.is_empty() {
                bounded(sub.subscribe(&channels)).await?;
            }
            // Marked up under the lock: a channel added before this point is in a newer
            // version (so it is subscribed on the next turn), one added after sees the link up
            // and subscribes itself.
            let w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            if w.version == version {
                self.shared.up.store(true, Ordering::SeqCst);
                // Before any read or publish can see the link up, so that subscribers learn
                // of the outage ahead of anything that follows it.
                self.shared.announce_up();
                return Ok(true);
            }
        }
    }

    fn live_conn(&self) -> Result<Option<ConnectionManager>, BusError> {
        match &self.redis {
            None => Ok(None),
            Some(_) if !self.shared.up.load(Ordering::SeqCst) => Err(BusError::Unavailable),
            Some(link) => Ok(Some(link.conn.clone())),
        }
    }

    /// Queues `out` behind this link's earlier publishes (see `lane`); on a single node a
    /// publish reaches this process's subscriber at once and a script does nothing. `missed`
    /// says whether a failure means a message this link's history lacks. Fails at once, and
    /// counts it, while the link is down or its lane is full.
    pub fn send(&self, out: &Arc<Outgoing>, missed: bool) -> Result<Reply, BusError> {
        let result = match &self.redis {
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let value = match &**out {
                    Outgoing::Publish { chan, payload } => Value::Int(i64::from(
                        self.shared.deliver(chan.to_string(), payload.to_vec()),
                    )),
                    Outgoing::Script { .. } => Value::Nil,
                };
                let _ = tx.send(Ok(value));
                Ok(rx)
            }
            Some(_) if !self.is_up() => Err(BusError::Unavailable),
            Some(link) => link.lane.send(out, missed),
        };
        if result.is_err() {
            self.shared.command_failed(missed);
        }
        result
    }

    /// Publishes (in order, see [`Link::send`]) and returns how many subscribers received the
    /// message (Redis' own count, so the cluster calls know how many replicas to wait for).
    pub async fn publish_count(&self, out: &Arc<Outgoing>) -> Result<usize, BusError> {
        let value = self
            .send(out, false)?
            .await
            .unwrap_or(Err(BusError::Unavailable))?;
        usize::from_redis_value(value).map_err(|e| BusError::Redis(e.into()))
    }

    /// Hands `payload` to this process's subscriber of `chan` at once, behind everything that
    /// arrived for it before: a memory bus's publish (so the history can publish under its own
    /// lock), or a marker that a subscriber uses to know it has handled all that came before.
    /// False when nobody here listens on `chan`.
    pub fn deliver_here(&self, chan: String, payload: Vec<u8>) -> bool {
        self.shared.deliver(chan, payload)
    }

    /// Runs a Lua script on Redis; `None` on a memory bus. A lost link marks the bus down, an
    /// error raised by the script itself does not.
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Option<T>, BusError> {
        let Some(mut conn) = self.live_conn()? else {
            return Ok(None);
        };
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let result = bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = &result
            && e.is_link_failure()
        {
            self.shared.mark_down();
            self.shared.wake.notify_one();
        }
        result.map(Some)
    }

    /// Subscribes to channels whose messages go to `tx`, in the order Redis sent them. Never
    /// fails for a Redis that is down: the channels are subscribed as soon as the link returns.
    pub async fn subscribe_channels(&self, chans: &[String], tx: &Queue) {
        {
            let mut handlers = self
                .shared
                .handlers
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for chan in chans {
                handlers.insert(chan.clone(), tx.clone());
            }
        }
        let up = {
            let mut w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            w.channels.extend(chans.iter().cloned());
            w.version += 1;
            self.shared.up.load(Ordering::SeqCst)
        };
        if up && let Some(link) = &self.redis {
            match bounded(link.sub.clone().subscribe(chans)).await {
                // The link came up before this subscriber was there: it is told now, once its
                // channels are subscribed, as it would have been then.
                Ok(()) => {
                    tx.signal(Event::Up(self.shared.index));
                }
                Err(e) => {
                    tracing::debug!(
                        ?chans,
                        "subscribe failed, retried when the link is back: {e}"
                    );
                    self.shared.mark_down();
                    self.shared.wake.notify_one();
                }
            }
        }
    }
}

pub(super) async fn bounded<T>(
    fut: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BusError::Timeout(OP_TIMEOUT)),
    }
}
