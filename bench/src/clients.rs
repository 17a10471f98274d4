//! The Socket.IO clients: connect and join, answer pings, check and time every
//! delivery, send `publish`es on request, count disconnects.
//!
//! Each client is one task that owns its websocket and its duplicate bitmap; shared
//! counters and latency histograms sit in a few mutex-guarded shards (by client index),
//! so two worker threads rarely meet on one lock.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::Error;
use crate::clock::now_ms;
use crate::engineio::{self, EventKind, EventMatcher, Packet, SioPacket, Ws};
use crate::histogram::LatencyHistogram;
use crate::plan::{client_in_target, room_name, rooms_of_client};
use crate::schedule::SendState;
use crate::target::Target;

const SHARDS: usize = 8;
/// Duplicate tracking is dropped (duplicates: null) past this much bitmap memory.
const MAX_BITMAP_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub clients: usize,
    pub rooms: usize,
    pub rooms_per_client: usize,
    pub room_prefix: String,
    pub event: String,
    pub payload: usize,
    /// broadcasts in the run (sequence numbers `0..max_seq`)
    pub max_seq: u64,
    pub connect_timeout: Duration,
    pub join_timeout: Duration,
    pub connect_concurrency: usize,
}

/// Counters and histograms of one shard of the clients.
#[derive(Debug, Default, Clone)]
pub struct RecvStats {
    pub hist: LatencyHistogram,
    pub hist_sched: LatencyHistogram,
    pub received: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub malformed: u64,
    pub disconnects: u64,
    pub disconnect_reasons: BTreeMap<String, u64>,
    pub first_recv_ms: f64,
    pub last_recv_ms: f64,
}

impl RecvStats {
    fn merge(&mut self, o: &Self) -> Result<(), Error> {
        self.hist.merge(&o.hist)?;
        self.hist_sched.merge(&o.hist_sched)?;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.unexpected += o.unexpected;
        self.malformed += o.malformed;
        self.disconnects += o.disconnects;
        for (k, v) in &o.disconnect_reasons {
            *self.disconnect_reasons.entry(k.clone()).or_default() += v;
        }
        if o.first_recv_ms > 0.0
            && (self.first_recv_ms == 0.0 || o.first_recv_ms < self.first_recv_ms)
        {
            self.first_recv_ms = o.first_recv_ms;
        }
        self.last_recv_ms = self.last_recv_ms.max(o.last_recv_ms);
        Ok(())
    }
}

/// State shared by all client tasks.
pub struct Shared {
    cfg: GroupConfig,
    matcher: EventMatcher,
    shards: Vec<Mutex<RecvStats>>,
    /// first copies received per broadcast
    uniq: Vec<AtomicU32>,
    track_duplicates: bool,
    closing: AtomicBool,
    sends: Arc<SendState>,
}

impl Shared {
    fn shard(&self, gi: usize) -> std::sync::MutexGuard<'_, RecvStats> {
        self.shards[gi % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

enum Cmd {
    /// `publish` with this already-encoded argument object; ack settles `seq`.
    Publish {
        seq: u64,
        t_send: f64,
        arg: String,
    },
    Close,
}

enum Outcome {
    Joined,
    ConnectFailed(String),
    JoinFailed(String),
}

/// Result of a connect phase.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    /// global indices of every client connected and joined so far
    pub joined: Vec<usize>,
    pub connect_errors: u64,
    pub join_errors: u64,
    pub error_samples: Vec<String>,
}

/// What the clients saw, merged.
#[derive(Debug, Clone)]
pub struct GroupResult {
    pub stats: RecvStats,
    /// `None` when the bitmaps would not fit in memory (loadgen.js does the same)
    pub duplicates: Option<u64>,
    pub uniq: Vec<u32>,
}

pub struct Group {
    shared: Arc<Shared>,
    targets: Arc<Vec<(Target, SocketAddr)>>,
    cmds: Vec<Option<mpsc::UnboundedSender<Cmd>>>,
    joined: Vec<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    permits: Arc<Semaphore>,
    ready: Ready,
    /// round-robin position per room for `publish` senders
    rr: Vec<usize>,
    members: Vec<Vec<usize>>,
}

impl Group {
    pub fn new(
        cfg: GroupConfig,
        targets: Vec<(Target, SocketAddr)>,
        sends: Arc<SendState>,
    ) -> Self {
        let words = cfg.max_seq.div_ceil(64);
        let track_duplicates = (cfg.clients as u64).saturating_mul(words * 8) <= MAX_BITMAP_BYTES;
        let shared = Arc::new(Shared {
            matcher: EventMatcher::new(&cfg.event),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(RecvStats::default()))
                .collect(),
            uniq: (0..cfg.max_seq).map(|_| AtomicU32::new(0)).collect(),
            track_duplicates,
            closing: AtomicBool::new(false),
            sends,
            cfg: cfg.clone(),
        });
        Self {
            shared,
            targets: Arc::new(targets),
            cmds: (0..cfg.clients).map(|_| None).collect(),
            joined: vec![false; cfg.clients],
            tasks: Vec::new(),
            permits: Arc::new(Semaphore::new(cfg.connect_concurrency.max(1))),
            ready: Ready::default(),
            rr: vec![0; cfg.rooms],
            members: vec![Vec::new(); cfg.rooms],
        }
    }

    /// Connects and joins clients `from..to` (at most `connect_concurrency` at a time).
    pub async fn connect(&mut self, from: usize, to: usize) -> Ready {
        let to = to.min(self.cmds.len());
        let mut waits = Vec::with_capacity(to.saturating_sub(from));
        for gi in from..to {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = oneshot::channel();
            self.cmds[gi] = Some(tx);
            let (shared, targets, permits) = (
                self.shared.clone(),
                self.targets.clone(),
                self.permits.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                client_task(shared, targets, permits, gi, rx, ready_tx).await;
            }));
            waits.push((gi, ready_rx));
        }
        for (gi, rx) in waits {
            match rx.await {
                Ok(Outcome::Joined) => self.joined[gi] = true,
                Ok(Outcome::ConnectFailed(e)) => {
                    self.ready.connect_errors += 1;
                    note(&mut self.ready.error_samples, e);
                }
                Ok(Outcome::JoinFailed(e)) => {
                    self.ready.join_errors += 1;
                    note(&mut self.ready.error_samples, e);
                }
                Err(_) => {
                    self.ready.connect_errors += 1;
                    note(
                        &mut self.ready.error_samples,
                        format!("client {gi}: task ended"),
                    );
                }
            }
        }
        let k = self.shared.cfg.rooms.max(1);
        self.ready.joined = (0..self.joined.len())
            .filter(|&gi| self.joined[gi])
            .collect();
        self.members = vec![Vec::new(); k];
        for &gi in &self.ready.joined {
            // a publisher must be in the room it publishes to (its first room)
            self.members[gi % k].push(gi);
        }
        self.ready.clone()
    }

    /// `--via socket`: broadcast `s` as a `publish` to room `s % K` from the next member
    /// of that room (round robin, like loadgen.js). Returns false if there is none.
    pub fn publish(&mut self, seq: u64, intended: f64) -> bool {
        let k = self.shared.cfg.rooms.max(1);
        let r = (seq % k as u64) as usize;
        let members = &self.members[r];
        if members.is_empty() {
            self.shared
                .sends
                .fail(seq, format!("no local sender for room {r}"));
            return false;
        }
        let gi = members[self.rr[r] % members.len()];
        self.rr[r] += 1;
        let cfg = &self.shared.cfg;
        let t_send = now_ms();
        let room = json_str(&room_name(&cfg.room_prefix, r));
        let event = json_str(&cfg.event);
        let data = bench_data(seq, t_send, intended, r, 1, gi as i64, cfg.payload);
        let arg = format!("{{\"room\":{room},\"event\":{event},\"data\":{data}}}");
        self.shared.sends.begin(seq);
        let delivered = self.cmds[gi]
            .as_ref()
            .is_some_and(|tx| tx.send(Cmd::Publish { seq, t_send, arg }).is_ok());
        if !delivered {
            self.shared
                .sends
                .fail(seq, format!("publish: client {gi} is gone"));
        }
        delivered
    }

    /// First copies received so far, over all clients.
    pub fn received(&self) -> u64 {
        self.shared
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).received)
            .sum()
    }

    /// Disconnects every client and returns what they saw.
    pub async fn close(mut self) -> Result<GroupResult, Error> {
        self.shared.closing.store(true, Ordering::SeqCst);
        for tx in self.cmds.iter().flatten() {
            let _ = tx.send(Cmd::Close);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in &mut self.tasks {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                t.abort();
            }
        }
        let mut stats = RecvStats::default();
        for s in &self.shared.shards {
            stats.merge(&s.lock().unwrap_or_else(PoisonError::into_inner))?;
        }
        let duplicates = self.shared.track_duplicates.then_some(stats.duplicates);
        let uniq = self
            .shared
            .uniq
            .iter()
            .map(|u| u.load(Ordering::Relaxed))
            .collect();
        Ok(GroupResult {
            stats,
            duplicates,
            uniq,
        })
    }
}

/// Keeps the first five error samples.
pub fn note(samples: &mut Vec<String>, e: String) {
    if samples.len() < 5 {
        samples.push(e);
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The broadcast data object `{"s","t","i","r","m","x","p"}` (loadgen.js's layout).
pub fn bench_data(
    seq: u64,
    t: f64,
    intended: f64,
    r: usize,
    m: usize,
    x: i64,
    payload: usize,
) -> String {
    let mut out =
        format!("{{\"s\":{seq},\"t\":{t},\"i\":{intended},\"r\":{r},\"m\":{m},\"x\":{x},\"p\":\"");
    out.extend(std::iter::repeat_n('x', payload));
    out.push_str("\"}");
    out
}

/// Per-client state kept by its task.
struct Client {
    gi: usize,
    shared: Arc<Shared>,
    /// one bit per sequence number (duplicate detection)
    bits: Vec<u64>,
    next_id: u64,
    /// publishes awaiting their ack: (ack id, seq, send time)
    pending: VecDeque<(u64, u64, f64)>,
}

enum Flow {
    Continue,
    /// the connection is over (reason for the disconnect count)
    Stop(&'static str),
}

async fn client_task(
    shared: Arc<Shared>,
    targets: Arc<Vec<(Target, SocketAddr)>>,
    permits: Arc<Semaphore>,
    gi: usize,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ready: oneshot::Sender<Outcome>,
) {
    let (target, addr) = &targets[gi % targets.len()];
    let mut client = Client {
        gi,
        bits: Vec::new(),
        next_id: 0,
        pending: VecDeque::new(),
        shared: shared.clone(),
    };
    let permit = permits.acquire().await;
    let mut ws = match engineio::connect(target, *addr, shared.cfg.connect_timeout).await {
        Ok((ws, _sid)) => ws,
        Err(e) => {
            let _ = ready.send(Outcome::ConnectFailed(format!(
                "connect {}: {e}",
                target.url
            )));
            return;
        }
    };
    let cfg = &shared.cfg;
    for r in rooms_of_client(gi, cfg.rooms, cfg.rooms_per_client) {
        let room = room_name(&cfg.room_prefix, r);
        let id = client.next_id;
        client.next_id += 1;
        let text = engineio::emit_with_ack(id, "join", &json_str(&room));
        let answer =
            tokio::time::timeout(cfg.join_timeout, client.await_ack(&mut ws, text, id)).await;
        let failure = match answer {
            Ok(Ok(payload)) if engineio::ack_ok(&payload) => None,
            Ok(Ok(payload)) => Some(payload),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("operation has timed out".to_owned()),
        };
        if let Some(why) = failure {
            let _ = ready.send(Outcome::JoinFailed(format!("join {room}: {why}")));
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            return;
        }
    }
    drop(permit);
    if shared.track_duplicates {
        client.bits = vec![0; cfg.max_seq.div_ceil(64) as usize];
    }
    let _ = ready.send(Outcome::Joined);

    let reason = loop {
        tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                Some(Cmd::Publish { seq, t_send, arg }) => {
                    let id = client.next_id;
                    client.next_id += 1;
                    client.pending.push_back((id, seq, t_send));
                    let text = format!("42{id}[\"publish\",{arg}]");
                    if let Err(e) = ws.send(Message::text(text)).await {
                        shared.sends.fail(seq, format!("publish: {e}"));
                        break Some("transport error");
                    }
                }
                Some(Cmd::Close) | None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break None;
                }
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Flow::Stop(why) = client.on_text(&mut ws, text.as_str()).await {
                        break Some(why);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break Some("transport close"),
                Some(Ok(_)) => {}
                Some(Err(_)) => break Some("transport error"),
            },
        }
    };
    for (_, seq, _) in client.pending.drain(..) {
        shared
            .sends
            .fail(seq, "publish: connection closed before the ack");
    }
    if let Some(why) = reason
        && !shared.closing.load(Ordering::SeqCst)
    {
        let mut st = shared.shard(gi);
        st.disconnects += 1;
        *st.disconnect_reasons.entry(why.to_owned()).or_default() += 1;
    }
}

impl Client {
    /// Sends `text` and reads until the ack `id` arrives (answering pings meanwhile).
    async fn await_ack(&mut self, ws: &mut Ws, text: String, id: u64) -> Result<String, Error> {
        ws.send(Message::text(text)).await?;
        loop {
            let text = engineio::next_text(ws).await?;
            if let Ok(Packet::Message(SioPacket::Ack { id: got, payload })) =
                engineio::parse_packet(text.as_str())
                && got == id
            {
                return Ok(payload.to_owned());
            }
            if let Flow::Stop(why) = self.on_text(ws, text.as_str()).await {
                return Err(Error::Protocol(why.into()));
            }
        }
    }

    async fn on_text(&mut self, ws: &mut Ws, text: &str) -> Flow {
        match engineio::parse_packet(text) {
            Ok(Packet::Message(SioPacket::Event { payload, .. })) => self.on_event(payload),
            Ok(Packet::Ping(p)) => {
                if ws.send(Message::text(format!("3{p}"))).await.is_err() {
                    return Flow::Stop("transport error");
                }
            }
            Ok(Packet::Message(SioPacket::Ack { id, payload })) => self.on_ack(id, payload),
            Ok(Packet::Message(SioPacket::Disconnect)) => {
                return Flow::Stop("io server disconnect");
            }
            Ok(Packet::Close) => return Flow::Stop("transport close"),
            Ok(_) => {}
            Err(_) => self.shared.shard(self.gi).malformed += 1,
        }
        Flow::Continue
    }

    fn on_ack(&mut self, id: u64, payload: &str) {
        let Some(pos) = self.pending.iter().position(|p| p.0 == id) else {
            return;
        };
        let Some((_, seq, t_send)) = self.pending.remove(pos) else {
            return;
        };
        if engineio::ack_ok(payload) {
            self.shared.sends.ok(seq, t_send);
        } else {
            self.shared
                .sends
                .fail(seq, format!("publish ack: {payload}"));
        }
    }

    /// The hot path: one delivery.
    fn on_event(&mut self, payload: &str) {
        let now = now_ms();
        let shared = &*self.shared;
        let cfg = &shared.cfg;
        let d = match shared.matcher.classify(payload) {
            EventKind::Bench(d) => d,
            EventKind::Other => return,
            EventKind::Malformed => {
                shared.shard(self.gi).malformed += 1;
                return;
            }
        };
        if d.s >= cfg.max_seq || d.p_len != cfg.payload {
            shared.shard(self.gi).malformed += 1;
            return;
        }
        if d.x == self.gi as i64
            || !client_in_target(self.gi, d.r, cfg.rooms, cfg.rooms_per_client, d.m)
        {
            shared.shard(self.gi).unexpected += 1;
            return;
        }
        if !self.bits.is_empty() {
            let (w, b) = ((d.s / 64) as usize, 1u64 << (d.s % 64));
            if self.bits[w] & b != 0 {
                shared.shard(self.gi).duplicates += 1;
                return;
            }
            self.bits[w] |= b;
        }
        shared.uniq[d.s as usize].fetch_add(1, Ordering::Relaxed);
        let mut st = shared.shard(self.gi);
        st.received += 1;
        st.hist.record_ms(now - d.t);
        st.hist_sched.record_ms(now - d.i);
        if st.first_recv_ms == 0.0 {
            st.first_recv_ms = now;
        }
        if now > st.last_recv_ms {
            st.last_recv_ms = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_data_is_the_loadgen_layout() {
        let d = bench_data(5, 1.5, 1.25, 3, 2, -1, 4);
        assert_eq!(
            d,
            r#"{"s":5,"t":1.5,"i":1.25,"r":3,"m":2,"x":-1,"p":"xxxx"}"#
        );
        let m = EventMatcher::new("bench");
        match m.classify(&format!("[\"bench\",{d}]")) {
            EventKind::Bench(got) => {
                assert_eq!((got.s, got.r, got.m, got.x, got.p_len), (5, 3, 2, -1, 4))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(json_str("a\"b"), r#""a\"b""#);
    }
}
