//! The reconnect-storm run: every client drops at the same instant, as when the replica
//! holding them vanishes, then reconnects to the next replica and `resume`s; how long until
//! all have resumed (with every message sent while they were away), and what the storm
//! costs the replicas in CPU and memory.
//!
//! Phases: connect and join (each client keeps its join ack's offset); drop every
//! connection without a close handshake; publish `--missed` messages to each room over
//! HTTP and wait for their acks; reconnect every client at once (client i to URL i + 1)
//! and `resume` from its offset, while CPU and RSS are sampled; count what came back.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::Error;
use crate::cli::Options;
use crate::clients::{bench_data, json_str, note};
use crate::clock::{now_ms, sleep_ms};
use crate::engineio::{self, EventKind, EventMatcher, Packet, SioPacket, Ws};
use crate::histogram::{LatencyHistogram, round};
use crate::http::HttpPool;
use crate::load::{loadgen_proc, measured_procs, resolve_all};
use crate::plan::{room_name, rooms_of_client};
use crate::procstat::{self, CpuSplit, Proc, RssSampler, cpu_snapshot, mem_snapshot};
use crate::report::{Base, Common, StormReport, StormRow};
use crate::schedule::SendState;
use crate::target::Target;

/// How often the replicas' CPU is read during the storm: the peak is the busiest window
/// of this length.
const CPU_WINDOW_MS: f64 = 250.0;

/// What every client task is told to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connected,
    Drop,
    Reconnect,
    Close,
}

/// How one client's first connection ended.
enum Joined {
    Yes,
    ConnectFailed(String),
    JoinFailed(String),
}

/// How one client's resume ended.
struct Resumed {
    /// from the reconnect signal to the resume ack
    ms: f64,
    recovered: bool,
    /// distinct messages replayed before the ack
    replayed: u64,
    duplicates: u64,
}

struct Ctx {
    opts: Options,
    targets: Vec<(Target, SocketAddr)>,
    matcher: EventMatcher,
    timeout: Duration,
}

pub async fn run(o: &Options) -> Result<StormReport, Error> {
    let a = &o.args;
    let base = Base::new(o);
    let targets = resolve_all(&o.targets).await?;
    let measured = measured_procs(o);
    let ctx = Arc::new(Ctx {
        opts: o.clone(),
        targets: targets.clone(),
        matcher: EventMatcher::new(&a.event),
        timeout: Duration::from_secs(20),
    });
    let budget = Duration::from_secs_f64(o.connect_budget_s());

    // Connect and join.
    let (phase_tx, phase_rx) = watch::channel(Phase::Connected);
    let permits = Arc::new(Semaphore::new(a.connect_concurrency));
    let (resumed_tx, mut resumed_rx) = mpsc::unbounded_channel::<Result<Resumed, String>>();
    let t_connect = now_ms();
    let mut joins = Vec::with_capacity(a.clients);
    let mut tasks = Vec::with_capacity(a.clients);
    for gi in 0..a.clients {
        let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
        let (ctx, permits, phase, resumed) = (
            ctx.clone(),
            permits.clone(),
            phase_rx.clone(),
            resumed_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            client(&ctx, gi, &permits, phase, joined_tx, resumed).await;
        }));
        joins.push(joined_rx);
    }
    drop(resumed_tx);
    let mut common = Common {
        clients_connected: 0,
        connect_errors: 0,
        join_errors: 0,
        connect_s: 0.0,
        workers: 0,
    };
    let mut errors = Vec::new();
    let joined = tokio::time::timeout(budget, async {
        for rx in joins {
            match rx.await {
                Ok(Joined::Yes) => common.clients_connected += 1,
                Ok(Joined::ConnectFailed(e)) => {
                    common.connect_errors += 1;
                    note(&mut errors, e);
                }
                Ok(Joined::JoinFailed(e)) => {
                    common.join_errors += 1;
                    note(&mut errors, e);
                }
                Err(_) => common.connect_errors += 1,
            }
        }
    })
    .await;
    if joined.is_err() {
        return Err(Error::Timeout {
            what: "connecting the clients",
        });
    }
    common.connect_s = round((now_ms() - t_connect) / 1000.0, 2);
    let rss_connected = mem_snapshot(&measured);

    // Drop every connection at once, then send what the clients will miss.
    phase_tx.send_replace(Phase::Drop);
    let missed = a.missed * a.rooms as u64;
    let sends = publish_missed(o, &targets, missed).await?;

    // The storm.
    let mut procs = measured.clone();
    procs.push(loadgen_proc());
    let rss = RssSampler::start(&procs);
    let mut cpu = CpuPeak::new(&procs);
    let machine0 = procstat::machine_cpu();
    let t0 = now_ms();
    phase_tx.send_replace(Phase::Reconnect);
    let mut resume_hist = LatencyHistogram::new();
    let (mut resumed, mut resume_errors, mut not_recovered) = (0usize, 0u64, 0u64);
    let (mut replayed, mut duplicates) = (0u64, 0u64);
    let mut last_ms = 0.0f64;
    let deadline = tokio::time::Instant::now() + budget;
    let mut outstanding = common.clients_connected;
    while outstanding > 0 {
        let next = tokio::time::timeout(Duration::from_millis(CPU_WINDOW_MS as u64), async {
            resumed_rx.recv().await
        });
        match next.await {
            Ok(Some(Ok(r))) => {
                outstanding -= 1;
                resumed += 1;
                resume_hist.record_ms(r.ms);
                last_ms = last_ms.max(r.ms);
                not_recovered += u64::from(!r.recovered);
                replayed += r.replayed;
                duplicates += r.duplicates;
            }
            Ok(Some(Err(e))) => {
                outstanding -= 1;
                resume_errors += 1;
                note(&mut errors, e);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        cpu.sample(false);
        if tokio::time::Instant::now() > deadline {
            note(
                &mut errors,
                format!("{outstanding} clients had not resumed"),
            );
            resume_errors += outstanding as u64;
            break;
        }
    }
    let storm_ms = now_ms() - t0;
    cpu.sample(true);
    let machine1 = procstat::machine_cpu();
    let rss_peak = rss.stop();
    phase_tx.send_replace(Phase::Close);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    // Each message went to one room; a client is in `rooms_per_client` rooms.
    let replay_expected = resumed as u64 * a.missed * a.rooms_per_client as u64;
    let mb = |kb: u64| round(kb as f64 / 1024.0, 1);
    let rows: Vec<StormRow> = procs
        .iter()
        .enumerate()
        .map(|(k, p)| StormRow {
            name: p.name.clone(),
            kind: p.kind,
            pid: p.pid,
            cpu_s: cpu.total_s(k).map(|s| round(s, 3)),
            peak_cores: cpu.peak_cores(k).map(|c| round(c, 2)),
            rss_connected_mb: rss_connected
                .get(k)
                .and_then(|m| m.and_then(|m| m.rss_kb))
                .map(mb),
            rss_peak_mb: mb(rss_peak[k]),
        })
        .collect();
    let servers = |f: &dyn Fn(&StormRow) -> Option<f64>| {
        round(
            rows.iter()
                .filter(|r| r.kind == "server")
                .filter_map(f)
                .sum(),
            2,
        )
    };
    let servers_cpu_s = servers(&|r| r.cpu_s);
    // Like a load run, the storm is flagged when other processes took more than a tenth of
    // the machine meanwhile.
    let measured_s: f64 = (0..procs.len()).filter_map(|k| cpu.total_s(k)).sum();
    let other_cpu_cores = machine0.zip(machine1).map(|(a, b)| {
        let secs = (storm_ms / 1000.0).max(1e-3);
        round(((b.busy - a.busy) - measured_s).max(0.0) / secs, 3)
    });
    let noisy_machine = other_cpu_cores.is_some_and(|c| c > 0.1 * procstat::cpus() as f64);
    errors.extend(sends.samples());
    errors.truncate(5);
    Ok(StormReport {
        base,
        common,
        missed_per_room: a.missed,
        missed_sent: sends.sent(),
        missed_send_errors: sends.errors(),
        resumed,
        resume_errors,
        not_recovered,
        replay_expected,
        replay_received: replayed,
        replay_lost: replay_expected.saturating_sub(replayed),
        replay_duplicates: duplicates,
        all_resumed_s: round(last_ms / 1000.0, 3),
        storm_window_s: round(storm_ms / 1000.0, 3),
        resume_ms: resume_hist.summary(),
        servers_cpu_s,
        servers_peak_cores: round(cpu.servers_peak(), 2),
        servers_rss_connected_mb: servers(&|r| r.rss_connected_mb),
        servers_rss_peak_mb: servers(&|r| Some(r.rss_peak_mb)),
        other_cpu_cores,
        noisy_machine,
        processes: rows,
        error_samples: errors,
    })
}

/// Publishes `count` messages, message s to room `s % K`, round robin over the replicas,
/// and waits for their acks (at most 11 s after the last).
async fn publish_missed(
    o: &Options,
    targets: &[(Target, SocketAddr)],
    count: u64,
) -> Result<Arc<SendState>, Error> {
    let a = &o.args;
    let sends = Arc::new(SendState::new(count));
    let mut pools = HttpPool::per_target(targets, &a.token, a.http_conns, &sends)?;
    let event = json_str(&a.event);
    for s in 0..count {
        // Bounded like a load run: at most --max-inflight outstanding.
        while sends.inflight() >= a.max_inflight {
            sleep_ms(2.0).await;
        }
        let r = (s % a.rooms as u64) as usize;
        let t = now_ms();
        let room = json_str(&room_name(&a.room_prefix, r));
        let data = bench_data(s, t, t, r, 1, -1, a.payload);
        let body = format!("{{\"rooms\":[{room}],\"event\":{event},\"data\":{data}}}");
        sends.begin(s);
        if !pools[(s % pools.len() as u64) as usize].post(s, t, body) {
            sends.fail(s, "HTTP pool closed");
        }
    }
    let deadline = now_ms() + 11_000.0;
    while sends.inflight() > 0 && now_ms() < deadline {
        sleep_ms(10.0).await;
    }
    for p in &mut pools {
        p.close();
    }
    sends.abandon_inflight("no response to a missed message");
    Ok(sends)
}

/// One client through every phase.
async fn client(
    ctx: &Ctx,
    gi: usize,
    permits: &Semaphore,
    mut phase: watch::Receiver<Phase>,
    joined: tokio::sync::oneshot::Sender<Joined>,
    resumed: mpsc::UnboundedSender<Result<Resumed, String>>,
) {
    let a = &ctx.opts.args;
    let rooms: Vec<String> = rooms_of_client(gi, a.rooms, a.rooms_per_client)
        .map(|r| room_name(&a.room_prefix, r))
        .collect();
    let permit = permits.acquire().await;
    let (mut ws, offset) = match connect_and_join(ctx, gi % ctx.targets.len(), &rooms).await {
        Ok(v) => v,
        Err(e) => {
            let _ = joined.send(e);
            return;
        }
    };
    drop(permit);
    let _ = joined.send(Joined::Yes);
    // Until the drop, answer pings so that the server keeps the connection.
    if !idle_until(&mut ws, &mut phase, Phase::Drop).await {
        let _ = resumed.send(Err(format!("client {gi}: connection lost before the drop")));
        return;
    }
    // No close handshake: the connection just ends, as when its replica dies.
    drop(ws);
    if phase.wait_for(|p| *p >= Phase::Reconnect).await.is_err() {
        return;
    }
    let t0 = now_ms();
    let target = (gi + 1) % ctx.targets.len();
    match resume(ctx, target, &rooms, offset).await {
        Ok((ws_new, mut r)) => {
            r.ms = now_ms() - t0;
            let _ = resumed.send(Ok(r));
            ws = ws_new;
            idle_until(&mut ws, &mut phase, Phase::Close).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
        Err(e) => {
            let _ = resumed.send(Err(format!("client {gi}: resume: {e}")));
        }
    }
}

async fn connect_and_join(
    ctx: &Ctx,
    target: usize,
    rooms: &[String],
) -> Result<(Ws, Option<String>), Joined> {
    let (t, addr) = &ctx.targets[target];
    let (mut ws, _) = engineio::connect(t, *addr, ctx.timeout)
        .await
        .map_err(|e| Joined::ConnectFailed(format!("connect {}: {e}", t.url)))?;
    let mut offset = None;
    for (id, room) in rooms.iter().enumerate() {
        let text = engineio::emit_with_ack(id as u64, "join", &json_str(room));
        let ack = request(ctx, &mut ws, text, id as u64, |_| {})
            .await
            .map_err(|e| Joined::JoinFailed(format!("join {room}: {e}")))?;
        // Offsets are one sequence over all rooms: the last join's is the newest.
        offset = ack.offset.or(offset);
    }
    Ok((ws, offset))
}

async fn resume(
    ctx: &Ctx,
    target: usize,
    rooms: &[String],
    since: Option<String>,
) -> Result<(Ws, Resumed), Error> {
    let (t, addr) = &ctx.targets[target];
    let (mut ws, _) = engineio::connect(t, *addr, ctx.timeout).await?;
    let body = serde_json::json!({ "rooms": rooms, "since": since }).to_string();
    let text = engineio::emit_with_ack(0, "resume", &body);
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let ack = request(ctx, &mut ws, text, 0, |s| {
        if !seen.insert(s) {
            duplicates += 1;
        }
    })
    .await?;
    let r = Resumed {
        ms: 0.0,
        recovered: ack.recovered == Some(true),
        replayed: seen.len() as u64,
        duplicates,
    };
    Ok((ws, r))
}

#[derive(Deserialize)]
struct Ack {
    ok: bool,
    #[serde(default)]
    offset: Option<String>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Sends `text` and reads until ack `id`, answering pings and handing the sequence number of
/// every bench message before it to `on_message`.
async fn request(
    ctx: &Ctx,
    ws: &mut Ws,
    text: String,
    id: u64,
    mut on_message: impl FnMut(u64),
) -> Result<Ack, Error> {
    let exchange = async {
        ws.send(Message::text(text)).await?;
        loop {
            let text = engineio::next_text(ws).await?;
            match engineio::parse_packet(text.as_str())? {
                Packet::Message(SioPacket::Ack { id: got, payload }) if got == id => {
                    let (ack,): (Ack,) = serde_json::from_str(payload)
                        .map_err(|e| Error::Protocol(format!("ack {payload}: {e}")))?;
                    if !ack.ok {
                        let why = ack.error.map(|e| e.to_string()).unwrap_or_default();
                        return Err(Error::Protocol(format!("refused: {why}")));
                    }
                    return Ok(ack);
                }
                Packet::Message(SioPacket::Event { payload, .. }) => {
                    if let EventKind::Bench(d) = ctx.matcher.classify(payload) {
                        on_message(d.s);
                    }
                }
                Packet::Ping(p) => ws.send(Message::text(format!("3{p}"))).await?,
                Packet::Close | Packet::Message(SioPacket::Disconnect) => {
                    return Err(Error::Protocol("disconnected by the server".into()));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(ctx.timeout, exchange)
        .await
        .map_err(|_| Error::Timeout { what: "an ack" })?
}

/// Answers pings until the phase reaches `until` (true) or the connection ends (false).
async fn idle_until(ws: &mut Ws, phase: &mut watch::Receiver<Phase>, until: Phase) -> bool {
    loop {
        if *phase.borrow_and_update() >= until {
            return true;
        }
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { return false },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(Packet::Ping(p)) = engineio::parse_packet(text.as_str())
                        && ws.send(Message::text(format!("3{p}"))).await.is_err()
                    {
                        return false;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            },
        }
    }
}

/// The processes' CPU, read every [`CPU_WINDOW_MS`]: total over the storm and the busiest
/// window (the whole storm's average when it was shorter than a window).
struct CpuPeak {
    procs: Vec<Proc>,
    first: Vec<Option<CpuSplit>>,
    last: Vec<Option<CpuSplit>>,
    first_ms: f64,
    last_ms: f64,
    /// full windows read so far
    windows: usize,
    peak: Vec<f64>,
    servers_peak: f64,
}

impl CpuPeak {
    fn new(procs: &[Proc]) -> Self {
        let first = cpu_snapshot(procs);
        Self {
            procs: procs.to_vec(),
            last: first.clone(),
            first,
            first_ms: now_ms(),
            last_ms: now_ms(),
            windows: 0,
            peak: vec![0.0; procs.len()],
            servers_peak: 0.0,
        }
    }

    /// Reads the CPU once a window has passed, or now if `force`.
    fn sample(&mut self, force: bool) {
        let now = now_ms();
        if now - self.last_ms < CPU_WINDOW_MS && !(force && now > self.last_ms) {
            return;
        }
        let snap = cpu_snapshot(&self.procs);
        // CPU time is counted in ticks (10 ms): over a short remainder a rate would be noise,
        // so only full windows make the peak; the remainder counts in the totals.
        let full = now - self.last_ms >= CPU_WINDOW_MS;
        let base = if full { &self.last } else { &self.first };
        let secs = (now - if full { self.last_ms } else { self.first_ms }) / 1000.0;
        if full || self.windows == 0 {
            let mut servers = 0.0;
            for (k, (a, b)) in base.iter().zip(&snap).enumerate() {
                if let (Some(a), Some(b)) = (a, b) {
                    let cores = (b.total() - a.total()) / secs.max(1e-3);
                    self.peak[k] = self.peak[k].max(cores);
                    if self.procs[k].kind == "server" {
                        servers += cores;
                    }
                }
            }
            self.servers_peak = self.servers_peak.max(servers);
        }
        self.windows += usize::from(full);
        self.last = snap;
        self.last_ms = now;
    }

    fn total_s(&self, k: usize) -> Option<f64> {
        let (a, b) = (self.first[k]?, self.last[k]?);
        Some(b.total() - a.total())
    }

    fn peak_cores(&self, k: usize) -> Option<f64> {
        self.first[k].map(|_| self.peak[k])
    }

    fn servers_peak(&self) -> f64 {
        self.servers_peak
    }
}
