//! The pub/sub bus under message delivery, the cluster calls and the history: one link per
//! Redis in `REDIS_URL` (or this process alone for a single node).
//!
//! With several Redis the links are independent buses, not replicas of one another: what is
//! published goes to each link that is up, every replica listens on all of them, and the
//! receivers drop the second copy (`dedupe`). Losing a link loses nothing as long as another is
//! up; there is no failover to wait for.

mod lane;
mod link;
mod queue;

use std::{future::Future, sync::Arc};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::watch;

use crate::config::RedisUrl;

pub use lane::Outgoing;
pub use link::{BusError, Item, Link, LinkState, OP_TIMEOUT, PING_INTERVAL};
pub use queue::{Event, Incoming, QueueStats};

/// The Socket.IO adapter: local rooms only. What crosses replicas travels on the [`Bus`]
/// (`delivery`, `cluster`).
pub type Adapter = socketioxide::adapter::LocalAdapter;

/// Cheap to clone; clones share the links.
#[derive(Clone)]
pub struct Bus {
    links: Arc<[Link]>,
    /// The links taken together (see [`Bus::state`]).
    state: watch::Sender<LinkState>,
    /// Bytes each subscription's queue, and each link's lane of publishes, hold at most
    /// (`BUS_BACKLOG_BYTES`).
    backlog: usize,
}

/// `BUS_BACKLOG_BYTES` unless set otherwise.
pub const DEFAULT_BACKLOG_BYTES: usize = 64 << 20;

impl Bus {
    fn of(links: Vec<Link>, state: LinkState) -> Self {
        let (state, _) = watch::channel(state);
        Self {
            links: links.into(),
            state,
            backlog: DEFAULT_BACKLOG_BYTES,
        }
    }

    /// The same bus with subscriptions' queues and publish lanes bounded at `bytes`.
    pub fn with_backlog(mut self, bytes: usize) -> Self {
        self.backlog = bytes;
        for link in self.links.iter() {
            link.set_backlog(bytes);
        }
        self
    }

    /// A single node's bus: publishes loop back to this process's own subscribers.
    pub fn memory() -> Self {
        Self::of(vec![Link::memory()], LinkState::Single)
    }

    /// One link per Redis URL. Unreachable Redis are not an error: links come up in the
    /// background (see [`Bus::run_health`]). Needs a tokio runtime.
    pub fn redis(urls: &[RedisUrl]) -> Result<Self, BusError> {
        let links = urls
            .iter()
            .enumerate()
            .map(|(i, url)| Link::redis(url, i, DEFAULT_BACKLOG_BYTES))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::of(links, LinkState::Starting))
    }

    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// True for a single node's in-process bus.
    pub fn is_memory(&self) -> bool {
        self.links.iter().all(Link::is_memory)
    }

    /// True with more than one Redis.
    pub fn is_plural(&self) -> bool {
        self.links.len() > 1
    }

    /// The links taken together: `Connected` while at least one is up, `Degraded` when all
    /// are down after one was up, `Starting` before any was reached.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Keeps every link alive (see [`Link::run_health`]) and [`Bus::state`] current. Returns at
    /// once for the memory bus.
    pub async fn run_health(self) {
        if self.is_memory() {
            return;
        }
        let mut states: Vec<watch::Receiver<LinkState>> =
            self.links.iter().map(Link::state).collect();
        for link in self.links.iter() {
            tokio::spawn(link.clone().run_health());
        }
        loop {
            let now: Vec<LinkState> = states.iter_mut().map(|s| *s.borrow_and_update()).collect();
            self.state.send_if_modified(|s| {
                let next = combined(&now, *s);
                std::mem::replace(s, next) != next
            });
            let changes: FuturesUnordered<_> = states.iter_mut().map(|s| s.changed()).collect();
            let mut changes = changes;
            if !matches!(changes.next().await, Some(Ok(()))) {
                return;
            }
        }
    }

    /// Subscribes to `chans` on every link; what arrives on any of them comes out of one
    /// queue (bounded, see `queue`), each link's messages in the order its Redis sent them.
    pub async fn subscribe_channels(&self, chans: Vec<String>) -> Incoming {
        let (tx, rx) = queue::bounded(self.links.len(), self.backlog);
        for link in self.links.iter() {
            link.subscribe_channels(&chans, &tx).await;
        }
        rx
    }

    /// Subscribes to one channel on every link.
    pub async fn subscribe_channel(&self, chan: String) -> Incoming {
        self.subscribe_channels(vec![chan]).await
    }

    /// Publishes on every link that is up and answers each one's subscriber count (`None`
    /// where it failed or was down), after all have answered or timed out.
    pub async fn publish_each(&self, chan: &str, payload: &[u8]) -> Vec<Option<usize>> {
        let out = Arc::new(Outgoing::Publish {
            chan: chan.into(),
            payload: payload.into(),
        });
        let counts = self.links.iter().map(|link| link.publish_count(&out));
        futures_util::future::join_all(counts)
            .await
            .into_iter()
            .map(Result::ok)
            .collect()
    }

    /// Runs `op` on every link that is up, concurrently; the results in link order. A link
    /// that is down is not tried (`Unavailable`).
    pub async fn each<T, F, Fut>(&self, op: F) -> Vec<Result<T, BusError>>
    where
        F: Fn(Link) -> Fut,
        Fut: Future<Output = Result<T, BusError>>,
    {
        if let [link] = &self.links[..] {
            return vec![counted(link, op(link.clone()).await)];
        }
        let runs = self.links.iter().map(|link| {
            let run = link.is_up().then(|| op(link.clone()));
            async move {
                let result = match run {
                    Some(run) => run.await,
                    None => Err(BusError::Unavailable),
                };
                counted(link, result)
            }
        });
        futures_util::future::join_all(runs).await
    }

    /// Publishes `out` on every link that is up, behind this replica's earlier publishes on
    /// each (see `lane`), and answers as soon as one Redis took it (the others go on without
    /// holding the caller); the first error when none does. A link that did not take it
    /// remembers that it missed a message (see `history`'s gap marks).
    pub async fn publish_first(&self, out: Outgoing) -> Result<(), BusError> {
        let out = Arc::new(out);
        let mut error = BusError::Unavailable;
        // Queued on every lane before anything is awaited, so that the order of calls is the
        // order on every Redis.
        let mut replies: FuturesUnordered<_> = self
            .links
            .iter()
            .filter_map(|link| link.send(&out, true).map_err(|e| error = e).ok())
            .collect();
        while let Some(reply) = replies.next().await {
            match reply {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => error = e,
                Err(_) => {} // the lane is gone (shutdown)
            }
        }
        Err(error)
    }

    /// Hands `payload` to this process's subscriber of `chan` at once (see
    /// [`Link::deliver_here`]); only meaningful on the memory bus.
    pub fn deliver_here(&self, chan: String, payload: Vec<u8>) -> bool {
        self.links[0].deliver_here(chan, payload)
    }
}

/// `result`, counted as a failure of its link when it failed.
fn counted<T>(link: &Link, result: Result<T, BusError>) -> Result<T, BusError> {
    if result.is_err() {
        link.note_failure();
    }
    result
}

/// The bus's state from its links' (`before` is the previous combined state).
fn combined(links: &[LinkState], before: LinkState) -> LinkState {
    if links.contains(&LinkState::Connected) {
        LinkState::Connected
    } else if before == LinkState::Connected || links.contains(&LinkState::Degraded) {
        LinkState::Degraded
    } else {
        before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkState::*;

    #[test]
    fn the_bus_is_up_while_one_link_is() {
        assert_eq!(combined(&[Starting, Starting], Starting), Starting);
        assert_eq!(combined(&[Starting, Connected], Starting), Connected);
        assert_eq!(combined(&[Degraded, Connected], Connected), Connected);
        assert_eq!(combined(&[Degraded, Starting], Connected), Degraded);
        assert_eq!(combined(&[Degraded, Degraded], Connected), Degraded);
        // a link that was up and one never reached: degraded, not starting
        assert_eq!(combined(&[Degraded, Starting], Starting), Degraded);
    }
}
