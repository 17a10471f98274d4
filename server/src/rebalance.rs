//! Rebalancing: a replica holding more than its share of the app's sockets sheds the excess,
//! so that replicas added by a scale-up get their share of the existing sockets, not only new
//! ones.
//!
//! Every replica publishes its socket count every [`LOAD_EVERY`] on `<prefix>#load` (on every
//! Redis) and keeps the others' for three periods. Once a second each replica compares itself
//! with the mean of the ready replicas: above `(1 + REBALANCE_TOLERANCE)` times the mean, it
//! starts a round that closes its sockets above the mean, no more, at most `REBALANCE_RATE` of
//! its sockets a second, each at a random moment of its second. A round's count is fixed when
//! it starts (sockets on their way to another replica are in nobody's count meanwhile), and the
//! next round waits until the counts have settled, so a replica never sheds more than its
//! excess and two replicas never trade sockets back and forth: only replicas above the mean
//! shed, and they stop at it. Nothing happens while a replica drains, while a Redis is down, or
//! for [`SETTLE`] after the set of replicas changed.
//!
//! A shed socket's transport is closed, so its client reconnects through the Service and
//! resumes. Behind a Service that spreads new connections, the shedding replica answers new
//! handshakes with 503 `over_capacity` while its round lasts, so they land elsewhere. Behind
//! one with `sessionAffinity: ClientIP` (`REBALANCE_AFFINITY_SECONDS` > 0) a reconnect within
//! the affinity window comes back to the same replica, so handshakes are not refused there
//! (nobody could get in), only sockets whose client said it honours `chorus:rebalance` are
//! shed, and each is first sent `chorus:rebalance` with `retryAfterMs` past the window: the
//! client helper waits that long before it reconnects, and its next connection is placed anew;
//! it names the replica that shed it in its handshake (`chorus_shed`), which refuses it while
//! it still holds more than the mean, and then waits as long again before it tries anew.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socketioxide::SocketIo;
use tokio::{sync::OnceCell, time::Instant};

use crate::{
    bus::{Adapter, Bus, LinkState},
    delivery::{self, Outbox},
    metrics::Metrics,
};

type SocketRef = socketioxide::extract::SocketRef<Adapter>;

/// How long a shed socket keeps its connection after `chorus:rebalance`, so that the event
/// reaches its client before the transport closes.
const TELL_FIRST: Duration = Duration::from_millis(250);

/// How often a replica publishes its socket count.
pub const LOAD_EVERY: Duration = Duration::from_secs(2);
/// A replica not heard from for this long is gone.
const GONE_AFTER: Duration = Duration::from_secs(6);
/// No round for this long after the set of replicas changed (a new replica starts empty; a
/// gone one's clients are still arriving elsewhere).
pub const SETTLE: Duration = Duration::from_secs(10);
/// After a round, the wait before the counts are trusted again: the last shed clients have
/// reconnected and every replica has published its new count.
const COOL_DOWN: Duration = Duration::from_secs(8);
/// Behind an affinity, how many of a shed client's waits the cool-down covers.
const AWAY_WAITS: u32 = 3;
/// How often a replica decides.
const TICK: Duration = Duration::from_secs(1);
/// How long a replica must have been above the tolerance before a round starts: during a burst
/// of new connections every replica's own count runs ahead of the others' (published every
/// [`LOAD_EVERY`]), and each would think itself above its share.
const SUSTAINED: Duration = Duration::from_secs(6);
/// The handshake query parameter by which a shed client names the replica that shed it.
const SHED_PARAM: &str = "chorus_shed=";

/// `REBALANCE*`.
#[derive(Debug, Clone, Copy)]
pub struct RebalanceConfig {
    pub enabled: bool,
    pub tolerance: f64,
    pub rate: f64,
    /// The Service's ClientIP affinity window (0: none).
    pub affinity: Duration,
}

/// What a replica publishes.
#[derive(Debug, Serialize, Deserialize)]
struct Load {
    uid: String,
    sockets: usize,
    #[serde(default)]
    draining: bool,
}

struct Peer {
    sockets: usize,
    draining: bool,
    seen: Instant,
}

/// Set on a socket whose client honours `chorus:rebalance` (it said so in a `resume`).
#[derive(Clone, Copy)]
pub struct Cooperative;

/// Set on a socket once it is shed: between `chorus:rebalance` and its close (250 ms) it must
/// not be picked again, told twice and counted twice.
#[derive(Clone, Copy)]
struct Shed;

/// What one decision found (pure, see [`decide`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub mean: f64,
    /// Sockets above the mean, when above the tolerance; 0 otherwise.
    pub excess: usize,
    /// Sockets above the mean, whatever the tolerance (where a round stops).
    pub over: usize,
}

/// This replica's share: the mean of the ready replicas' counts (its own included), and what
/// it holds above the mean when it holds more than `(1 + tolerance)` times it.
pub fn decide(mine: usize, others: &[usize], tolerance: f64) -> Share {
    let total: usize = mine + others.iter().sum::<usize>();
    let mean = total as f64 / (others.len() + 1) as f64;
    let over = mine.saturating_sub(mean.ceil() as usize);
    let excess = if (mine as f64) > (1.0 + tolerance) * mean {
        over
    } else {
        0
    };
    Share { mean, excess, over }
}

pub struct Rebalancer {
    bus: Bus,
    chan: String,
    uid: String,
    config: RebalanceConfig,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    peers: Mutex<HashMap<String, Peer>>,
    /// Set while a round lasts and handshakes are refused (no affinity).
    refusing: AtomicBool,
    /// Set while this replica holds more than the mean: shed clients are refused.
    above: AtomicBool,
    io: OnceCell<SocketIo<Adapter>>,
}

impl Rebalancer {
    pub fn new(
        bus: Bus,
        prefix: &str,
        config: RebalanceConfig,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            bus,
            chan: format!("{prefix}#load"),
            uid: format!("{:016x}", rand::random::<u64>()),
            config,
            metrics,
            draining,
            peers: Mutex::new(HashMap::new()),
            refusing: AtomicBool::new(false),
            above: AtomicBool::new(false),
            io: OnceCell::new(),
        })
    }

    /// Whether a new handshake with this query is refused now: every one while a round is
    /// shedding without affinity; one from a client some replica shed (the helper says so:
    /// `chorus_shed=<replica>`) while this one holds more than the mean (as of its last
    /// decision, a second ago at most), so that shed clients land on the replicas below it.
    pub fn refuses(&self, query: Option<&str>) -> bool {
        if self.refusing.load(Ordering::Relaxed) {
            return true;
        }
        // Behind an affinity each refusal costs the client another window away, but a shed
        // client accepted by another replica above the mean would have to move again.
        self.above.load(Ordering::Relaxed)
            && query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with(SHED_PARAM)))
    }

    /// Publishes this replica's count, listens to the others' and decides once a second, for
    /// as long as the process runs. A single node has nobody to balance with.
    pub async fn start(self: &Arc<Self>, io: SocketIo<Adapter>) {
        let _ = self.io.set(io);
        if self.bus.is_memory() {
            return;
        }
        let mut incoming = self.bus.subscribe_channel(self.chan.clone()).await;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(item) = incoming.recv_message().await {
                this.heard(&item.payload);
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOAD_EVERY);
            loop {
                tick.tick().await;
                this.publish().await;
            }
        });
        if self.config.enabled {
            tokio::spawn(self.clone().run());
        }
    }

    /// The sockets this replica holds (not those being closed to resume elsewhere).
    fn sockets(&self) -> Vec<SocketRef> {
        let mut sockets = self.io.get().map(|io| io.sockets()).unwrap_or_default();
        sockets.retain(delivery::is_live);
        sockets
    }

    async fn publish(&self) {
        let load = Load {
            uid: self.uid.clone(),
            sockets: self.sockets().len(),
            draining: self.draining.load(Ordering::Relaxed),
        };
        if let Ok(payload) = serde_json::to_vec(&load) {
            self.bus.publish_each(&self.chan, &payload).await;
        }
    }

    fn heard(&self, payload: &[u8]) {
        let Ok(load) = serde_json::from_slice::<Load>(payload) else {
            return tracing::debug!("unreadable load message");
        };
        if load.uid == self.uid {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Also with rebalancing off (nobody else prunes): pods come and go.
        peers.retain(|_, p| now.duration_since(p.seen) < GONE_AFTER);
        peers.insert(
            load.uid,
            Peer {
                sockets: load.sockets,
                draining: load.draining,
                seen: now,
            },
        );
    }

    /// The ready replicas' counts and their set, or `None` when one of them drains.
    fn others(&self) -> Option<(Vec<usize>, BTreeSet<String>)> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        peers.retain(|_, p| now.duration_since(p.seen) < GONE_AFTER);
        if peers.values().any(|p| p.draining) {
            return None;
        }
        Some((
            peers.values().map(|p| p.sockets).collect(),
            peers.keys().cloned().collect(),
        ))
    }

    /// Why no round may start now, if any.
    fn paused(&self) -> bool {
        let bus_ok = *self.bus.state().borrow() == LinkState::Connected
            && self.bus.links().iter().all(|l| l.is_up());
        self.draining.load(Ordering::Relaxed) || !bus_ok
    }

    /// This replica's share now, or `None` when no round may run: it or another replica
    /// drains, a Redis is down, or it is alone. Keeps `above` current either way.
    fn share(&self) -> Option<(Share, BTreeSet<String>)> {
        let found = self
            .others()
            .filter(|(others, _)| !others.is_empty() && !self.paused());
        let Some((others, set)) = found else {
            self.above.store(false, Ordering::Relaxed);
            return None;
        };
        let mine = self.sockets().len();
        let share = decide(mine, &others, self.config.tolerance);
        // Above the exact mean (not rounded up): a shed client taken by a replica at the mean
        // leaves the replicas below it short; when every replica holds exactly the mean, none
        // refuses.
        self.above
            .store(mine as f64 > share.mean, Ordering::Relaxed);
        Some((share, set))
    }

    /// The wait after a round before the counts are trusted again. Behind an affinity a shed
    /// client stays away up to one and a half windows, and as long again after each refusal
    /// (the replicas above the mean refuse it): a third of them are still away after two
    /// waits. Clients still away count for no replica, so the mean looks low and a replica that
    /// decided on it would start a second round it does not need (the benchmark saw 1.4 times
    /// the sockets moved behind a 60 s window); three waits leave few enough away that the
    /// counts stay within the tolerance.
    fn cool_down(&self) -> Duration {
        if self.config.affinity.is_zero() {
            return COOL_DOWN;
        }
        COOL_DOWN + (self.config.affinity.mul_f64(1.5) + Duration::from_secs(1)) * AWAY_WAITS
    }

    async fn run(self: Arc<Self>) {
        let mut set = BTreeSet::new();
        let mut wait_until = Instant::now() + SETTLE;
        let mut above_since: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let Some((share, now_set)) = self.share() else {
                // Paused (or alone): the counts are not settled when it ends.
                wait_until = wait_until.max(now + SETTLE);
                above_since = None;
                continue;
            };
            if now_set != set {
                set = now_set;
                wait_until = wait_until.max(now + SETTLE);
            }
            if now < wait_until || share.excess == 0 {
                above_since = None;
                continue;
            }
            if now.duration_since(*above_since.get_or_insert(now)) < SUSTAINED {
                continue;
            }
            above_since = None;
            tracing::info!(
                excess = share.excess,
                mean = share.mean,
                "holding more than its share of sockets: shedding the excess"
            );
            self.round(share.excess, &set).await;
            wait_until = Instant::now() + self.cool_down();
        }
    }

    /// Sheds `excess` sockets, at most `REBALANCE_RATE` of the sockets a second; stops early
    /// when a round may no longer run (see [`Rebalancer::share`]), the set of replicas
    /// changes, or this replica no longer holds more than the mean.
    async fn round(&self, excess: usize, set: &BTreeSet<String>) {
        let affinity = !self.config.affinity.is_zero();
        self.refusing.store(!affinity, Ordering::Relaxed);
        let mut left = excess;
        while left > 0 {
            match self.share() {
                Some((share, now_set)) if &now_set == set => left = left.min(share.over),
                _ => break,
            }
            if left == 0 {
                break;
            }
            let sockets = self.sockets();
            let per_second = ((self.config.rate * sockets.len() as f64).ceil() as usize).max(1);
            // Not a socket in the middle of a join or resume: its ack would tell a gap.
            let candidates: Vec<SocketRef> = sockets
                .into_iter()
                .filter(|s| {
                    s.extensions
                        .get::<Arc<Outbox>>()
                        .is_some_and(|o| !o.is_holding())
                        && s.extensions.get::<Shed>().is_none()
                        && (!affinity || s.extensions.get::<Cooperative>().is_some())
                })
                .collect();
            if candidates.is_empty() {
                break;
            }
            let batch = pick(candidates, per_second.min(left));
            left -= batch.len();
            let second = Instant::now() + Duration::from_secs(1);
            let mut moments: Vec<(Duration, SocketRef)> = batch
                .into_iter()
                .map(|s| (Duration::from_millis(rand::random::<u64>() % 1000), s))
                .collect();
            moments.sort_by_key(|(at, _)| *at);
            let start = Instant::now();
            for (at, s) in moments {
                tokio::time::sleep_until(start + at).await;
                self.shed(s);
            }
            tokio::time::sleep_until(second).await;
        }
        self.refusing.store(false, Ordering::Relaxed);
    }

    fn shed(&self, s: SocketRef) {
        if s.extensions
            .get::<Arc<Outbox>>()
            .is_none_or(|o| o.is_closing())
            || s.extensions.insert(Shed).is_some()
        {
            return;
        }
        self.metrics.rebalance_closes.inc();
        // Behind an affinity: past its window, spread over half of it again, so those shed
        // together do not come back together.
        let window = self.config.affinity.as_millis() as u64;
        let retry = if window == 0 {
            0
        } else {
            window + 1000 + rand::random::<u64>() % (window / 2 + 1)
        };
        let _ = s.emit(
            "chorus:rebalance",
            &serde_json::json!({ "retryAfterMs": retry, "from": self.uid }),
        );
        // Told first, closed after: a closing session takes no more polls, and the event
        // must have gone out on one.
        tokio::spawn(async move {
            tokio::time::sleep(TELL_FIRST).await;
            if s.extensions
                .get::<Arc<Outbox>>()
                .is_some_and(|o| o.start_closing())
            {
                delivery::close_transport(s);
            }
        });
    }
}

/// `n` of `sockets`, chosen at random.
fn pick(mut sockets: Vec<SocketRef>, n: usize) -> Vec<SocketRef> {
    let n = n.min(sockets.len());
    for i in 0..n {
        let j = i + rand::random::<u64>() as usize % (sockets.len() - i);
        sockets.swap(i, j);
    }
    sockets.truncate(n);
    sockets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_replica_above_the_tolerance_sheds_and_only_down_to_the_mean() {
        // 300, 300, 0: the mean is 200; each full one sheds 100, the new one nothing.
        assert_eq!(decide(300, &[300, 0], 0.2).excess, 100);
        assert_eq!(decide(0, &[300, 300], 0.2).excess, 0);
        // 230 of a mean of 200 is inside a tolerance of 0.2: nothing.
        assert_eq!(decide(230, &[200, 170], 0.2).excess, 0);
        assert_eq!(decide(250, &[200, 150], 0.2).excess, 50);
        // Shedding stops at the mean, so the receiving replicas never go above it on this
        // replica's account: no trading back and forth.
        let after = decide(200, &[200, 200], 0.2);
        assert_eq!((after.mean, after.excess), (200.0, 0));
        // Alone, or everyone empty: nothing.
        assert_eq!(decide(0, &[0], 0.2).excess, 0);
        assert_eq!(decide(7, &[], 0.2).excess, 0);
    }

    #[test]
    fn an_uneven_mean_rounds_up() {
        // 101 sockets over 2: the mean is 50.5; the one with 101 keeps 51.
        assert_eq!(decide(101, &[0], 0.0).excess, 50);
    }
}
