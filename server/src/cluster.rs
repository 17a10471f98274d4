//! Acknowledged cluster calls: membership, presence, disconnect and the node list.
//!
//! socketioxide-redis publishes `join` without waiting for remote replicas and returns partial
//! results on timeout, while the contract wants "answered once every replica applied it".
//! So every call here is published on one request channel; Redis' PUBLISH answers how many
//! replicas received it, each replica applies the call to its own sockets and answers on the
//! caller's response channel, and the caller waits for exactly that many answers or reports
//! a timeout. The caller is itself subscribed, so its own sockets go through the same path.
//!
//! With several Redis the call goes out on each, a replica applies it once (the first copy)
//! and answers on each, and the caller waits until as many different replicas have answered,
//! on any Redis, as the Redis that counted the most subscribers: one Redis lost or frozen
//! during the call costs nothing. Replicas answer in the background, so a Redis that hangs
//! delays a call by its command timeout at most, and only until it is known to be down.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socketioxide::{SocketIo, extract::SocketRef, socket::Sid};
use tokio::sync::{OnceCell, mpsc};

use crate::{
    bus::{Adapter, Bus, BusError},
    dedupe::Recent,
};

/// How long a caller waits for every replica's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests remembered as served: well past a call's lifetime, a few MB at most.
const SERVED_MAX: usize = 50_000;
const SERVED_WINDOW_MS: u64 = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Join { room: String, sockets: Vec<Sid> },
    Leave { room: String, sockets: Vec<Sid> },
    Sockets { room: String },
    Disconnect { socket: Sid },
    Nodes,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The sockets of the request that this replica holds (and acted on).
    Held { sockets: Vec<Sid> },
    /// This replica's count of connected sockets.
    Count { sockets: usize },
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    id: u64,
    /// The caller's response channel.
    reply_to: String,
    op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    id: u64,
    pub node: String,
    /// Tells replicas apart even when two share a name.
    #[serde(default)]
    uid: String,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster is unavailable: {0}")]
    Unavailable(#[from] BusError),
    #[error("{missing} of {expected} replicas did not answer within {timeout:?}")]
    Timeout {
        missing: usize,
        expected: usize,
        timeout: Duration,
    },
}

/// One replica's end of the cluster calls.
pub struct Cluster {
    bus: Bus,
    node: String,
    uid: String,
    /// Requests already served (a copy comes by every Redis).
    served: Mutex<Recent>,
    req_chan: String,
    res_chan: String,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    io: OnceCell<SocketIo<Adapter>>,
    /// Which sockets count as held (a socket being closed to resume elsewhere does not).
    live: Live,
}

/// Whether a socket counts in this replica's socket count.
pub type Live = fn(&SocketRef<Adapter>) -> bool;

impl Cluster {
    pub fn new(bus: Bus, prefix: &str, node: String, live: Live) -> Arc<Self> {
        // A random id keeps response channels apart even if two replicas share a name.
        let uid = format!("{:016x}", rand::random::<u64>());
        Arc::new(Self {
            bus,
            req_chan: format!("{prefix}#cluster#req"),
            res_chan: format!("{prefix}#cluster#res#{uid}"),
            uid,
            served: Mutex::new(Recent::new(SERVED_MAX, SERVED_WINDOW_MS)),
            node,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            io: OnceCell::new(),
            live,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Subscribes to the request and response channels and serves them for as long as the
    /// process runs.
    pub async fn start(self: &Arc<Self>, io: SocketIo<Adapter>) {
        let _ = self.io.set(io);
        let mut requests = self.bus.subscribe_channel(self.req_chan.clone()).await;
        let mut responses = self.bus.subscribe_channel(self.res_chan.clone()).await;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(item) = requests.recv_message().await {
                this.serve(&item.payload).await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(item) = responses.recv_message().await {
                match serde_json::from_slice::<Reply>(&item.payload) {
                    Ok(reply) => {
                        let pending = this.pending.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(tx) = pending.get(&reply.id) {
                            let _ = tx.send(reply);
                        }
                    }
                    Err(e) => tracing::warn!("unreadable cluster reply: {e}"),
                }
            }
        });
    }

    /// Runs `op` on every replica and returns each one's answer.
    pub async fn call(&self, op: Op) -> Result<Vec<Reply>, ClusterError> {
        if let Some(reply) = self.answer_here(&op) {
            return Ok(vec![reply]);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let _cleanup = PendingGuard { cluster: self, id };

        let request = Request {
            id,
            reply_to: self.res_chan.clone(),
            op,
        };
        let payload = serde_json::to_vec(&request).unwrap_or_default();
        // Waits for every Redis's count (a Redis that hangs is given up on after its command
        // timeout): completing on a lower count, from a Redis that some replicas have not
        // resubscribed to yet, would answer before those replicas applied the call.
        let listeners = self.bus.publish_each(&self.req_chan, &payload).await;
        // The caller itself listens: a count of 0 is a Redis that lost its subscribers (it
        // restarted and nobody has resubscribed yet), not an empty cluster.
        let Some(expected) = listeners.iter().flatten().copied().filter(|&n| n > 0).max() else {
            return Err(ClusterError::Unavailable(BusError::Unavailable));
        };

        let mut replies = Vec::with_capacity(expected);
        let mut from = HashSet::new();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        while replies.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) if counts(&mut from, &reply) => replies.push(reply),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(ClusterError::Timeout {
                        missing: expected - replies.len(),
                        expected,
                        timeout: CALL_TIMEOUT,
                    });
                }
            }
        }
        Ok(replies)
    }

    /// A call about sockets that this replica holds, every one of them, is applied here and
    /// answered at once: socket ids are unique cluster-wide, so no other replica has anything
    /// to do, and it works while Redis is away.
    fn answer_here(&self, op: &Op) -> Option<Reply> {
        let io = self.io.get()?;
        let sockets = match op {
            Op::Join { sockets, .. } | Op::Leave { sockets, .. } => sockets.as_slice(),
            Op::Disconnect { socket } => std::slice::from_ref(socket),
            Op::Sockets { .. } | Op::Nodes => return None,
        };
        if sockets.is_empty() || !sockets.iter().all(|sid| io.get_socket(*sid).is_some()) {
            return None;
        }
        Some(Reply {
            id: 0,
            node: self.node.clone(),
            uid: self.uid.clone(),
            outcome: apply(io, op.clone(), self.live),
        })
    }

    async fn serve(&self, payload: &[u8]) {
        let request: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("unreadable cluster request: {e}");
                return;
            }
        };
        let Some(io) = self.io.get() else { return };
        let key = request_key(&request.reply_to, request.id);
        let first = self.served.lock().unwrap_or_else(|e| e.into_inner()).first(
            key,
            None,
            crate::dedupe::now_ms(),
        );
        if !first {
            return;
        }
        let outcome = apply(io, request.op, self.live);
        let reply = Reply {
            id: request.id,
            node: self.node.clone(),
            uid: self.uid.clone(),
            outcome,
        };
        let payload = serde_json::to_vec(&reply).unwrap_or_default();
        // In the background: a Redis that hangs must not hold up the next requests.
        let bus = self.bus.clone();
        tokio::spawn(async move {
            if bus
                .publish_each(&request.reply_to, &payload)
                .await
                .iter()
                .all(Option::is_none)
            {
                tracing::debug!("could not answer a cluster call: no Redis took the answer");
            }
        });
    }
}

/// Whether `reply` is the first from its replica, whichever Redis brought it. A replica of an
/// older version sends no uid (and answers once, on its one Redis): each of its replies counts.
fn counts(from: &mut HashSet<String>, reply: &Reply) -> bool {
    reply.uid.is_empty() || from.insert(reply.uid.clone())
}

/// One request among all callers' (its caller's response channel and number).
fn request_key(reply_to: &str, id: u64) -> u128 {
    let mut h = std::hash::DefaultHasher::new();
    reply_to.hash(&mut h);
    (u128::from(h.finish()) << 64) | u128::from(id)
}

/// Applies one call to this replica's own sockets.
fn apply(io: &SocketIo<Adapter>, op: Op, live: Live) -> Outcome {
    // Runs `act` on each of `sockets` this replica holds; answers the ids it held.
    let on_held = |sockets: &[Sid], act: &dyn Fn(SocketRef<Adapter>) -> bool| Outcome::Held {
        sockets: sockets
            .iter()
            .filter_map(|sid| io.get_socket(*sid))
            .filter_map(|s| {
                let id = s.id;
                act(s).then_some(id)
            })
            .collect(),
    };
    match op {
        Op::Join { room, sockets } => on_held(&sockets, &|s| {
            s.join(room.clone());
            true
        }),
        Op::Leave { room, sockets } => on_held(&sockets, &|s| {
            s.leave(room.clone());
            true
        }),
        Op::Disconnect { socket } => on_held(&[socket], &|s| s.disconnect().is_ok()),
        Op::Sockets { room } => Outcome::Held {
            sockets: io.to(room).local().sockets().iter().map(|s| s.id).collect(),
        },
        Op::Nodes => Outcome::Count {
            sockets: io.sockets().iter().filter(|s| live(s)).count(),
        },
    }
}

struct PendingGuard<'a> {
    cluster: &'a Cluster,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.cluster
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(uid: &str) -> Reply {
        Reply {
            id: 1,
            node: "n".into(),
            uid: uid.into(),
            outcome: Outcome::Count { sockets: 0 },
        }
    }

    #[test]
    fn a_replica_counts_once_and_an_older_one_each_time() {
        let mut from = HashSet::new();
        assert!(counts(&mut from, &reply("a")));
        assert!(
            !counts(&mut from, &reply("a")),
            "its copy from another Redis"
        );
        assert!(counts(&mut from, &reply("b")));
        // replicas from before several Redis: no uid, one answer each
        assert!(counts(&mut from, &reply("")));
        assert!(counts(&mut from, &reply("")));
        let old: Reply =
            serde_json::from_str(r#"{"id":1,"node":"old","outcome":{"kind":"count","sockets":2}}"#)
                .expect("an older replica's reply parses");
        assert!(counts(&mut from, &old));
    }
}
