//! The load run: connect and join, send on an open-loop schedule (HTTP or socket
//! `publish`), drain, and measure CPU and memory over the send window.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::cli::{Options, Via};
use crate::clients::{Group, GroupConfig, bench_data, json_str};
use crate::clock::{now_ms, sleep_ms, sleep_until_ms};
use crate::histogram::round;
use crate::http::HttpPool;
use crate::plan::{expected_of, room_name, target_rooms, union_counts};
use crate::procstat::{self, CpuSplit, MachineCpu, Proc, RssSampler, cpu_snapshot, mem_snapshot};
use crate::report::{Base, Common, CoreSplit, LoadReport, ProcRow, bottleneck};
use crate::schedule::{ACK_TIMEOUT_MS, ST_ACKED, ScheduleOutcome, SendState, run_schedule};
use crate::target::Target;

/// The servers (`--pids`, named s1..sN after their URL) and `--extra-pids`.
pub fn measured_procs(o: &Options) -> Vec<Proc> {
    let servers = o.pids.iter().enumerate().filter_map(|(k, pid)| {
        pid.map(|pid| Proc {
            kind: "server",
            name: format!("s{}", k + 1),
            pid,
            url: o.targets.get(k).map(|t| t.url.clone()),
        })
    });
    let extras = o.extra_pids.iter().map(|(name, pid)| Proc {
        kind: "extra",
        name: name.clone(),
        pid: *pid,
        url: None,
    });
    servers.chain(extras).collect()
}

/// This process.
pub fn loadgen_proc() -> Proc {
    Proc {
        kind: "loadgen",
        name: "loadgen".into(),
        pid: std::process::id(),
        url: None,
    }
}

pub async fn resolve_all(targets: &[Target]) -> Result<Vec<(Target, SocketAddr)>, Error> {
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        out.push((t.clone(), t.resolve().await?));
    }
    Ok(out)
}

pub fn group_config(o: &Options, max_seq: u64) -> GroupConfig {
    let a = &o.args;
    GroupConfig {
        clients: a.clients,
        rooms: a.rooms,
        rooms_per_client: a.rooms_per_client,
        room_prefix: a.room_prefix.clone(),
        event: a.event.clone(),
        payload: a.payload,
        max_seq,
        connect_timeout: Duration::from_secs(20),
        join_timeout: Duration::from_secs(20),
        connect_concurrency: a.connect_concurrency,
    }
}

/// CPU counters at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    at_ms: f64,
    procs: Vec<Option<CpuSplit>>,
    machine: Option<MachineCpu>,
}

fn snapshot(procs: &[Proc]) -> Snapshot {
    Snapshot {
        at_ms: now_ms(),
        procs: cpu_snapshot(procs),
        machine: procstat::machine_cpu(),
    }
}

pub async fn run(o: &Options) -> Result<LoadReport, Error> {
    let a = &o.args;
    let base = Base::new(o);
    let resolved = resolve_all(&o.targets).await?;
    let mut all = measured_procs(o);
    all.push(loadgen_proc());
    let cpu_at_start = cpu_snapshot(&all);

    let max_seq = o.max_seq();
    let sends = Arc::new(SendState::new(max_seq));
    let mut group = Group::new(group_config(o, max_seq), resolved.clone(), sends.clone());
    eprintln!(
        "chorus-bench: connecting {} clients to {} replica(s)",
        a.clients,
        resolved.len()
    );
    let t_connect = now_ms();
    let ready = tokio::time::timeout(
        Duration::from_secs_f64(o.connect_budget_s()),
        group.connect(0, a.clients),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: "connecting and joining",
    })?;
    let connect_s = (now_ms() - t_connect) / 1000.0;
    eprintln!(
        "chorus-bench: {} joined, {} connect errors, {} join errors in {connect_s:.2} s",
        ready.joined.len(),
        ready.connect_errors,
        ready.join_errors
    );
    let (k, m) = (a.rooms, a.broadcast_rooms);
    let via_socket = a.via == Via::Socket;
    let union = union_counts(&ready.joined, k, a.rooms_per_client, m);

    let sampler = RssSampler::start(&all);
    let t0 = now_ms() + 300.0;
    let window_end = t0 + a.duration * 1000.0;
    let window = {
        let all = all.clone();
        tokio::spawn(async move {
            sleep_until_ms(t0 - 1.0).await;
            let start = snapshot(&all);
            sleep_until_ms(window_end).await;
            (start, snapshot(&all))
        })
    };

    eprintln!(
        "chorus-bench: sending {max_seq} broadcasts at {}/s via {:?} for {} s",
        a.rate, a.via, a.duration
    );
    let sched = match a.via {
        Via::Http => send_http(o, &resolved, &sends, t0).await?,
        Via::Socket => {
            let out = run_schedule(
                t0,
                a.rate,
                a.duration,
                a.max_inflight,
                sends.inflight_counter(),
                |s, intended| {
                    group.publish(s, intended);
                },
            )
            .await;
            wait_inflight(&sends, ACK_TIMEOUT_MS + 500.0).await;
            sends.abandon_inflight("publish ack: operation has timed out");
            out
        }
    };

    // Wait for the window to close, then for deliveries to settle.
    sleep_until_ms(window_end).await;
    let expected_so_far: u64 = (0..max_seq)
        .filter(|&s| sends.status(s) == ST_ACKED)
        .map(|s| expected_of(&union, s, via_socket))
        .sum();
    let drain_start = now_ms();
    let (mut last_total, mut last_change) = (u64::MAX, drain_start);
    loop {
        let total = group.received();
        let now = now_ms();
        if total != last_total {
            (last_total, last_change) = (total, now);
        }
        if total >= expected_so_far
            || now - last_change > 2000.0
            || now - drain_start > a.drain * 1000.0
        {
            break;
        }
        sleep_ms(200.0).await;
    }
    let (w0, w1) = window
        .await
        .map_err(|e| Error::Protocol(format!("measurement task: {e}")))?;
    let drain_end = snapshot(&all);
    let peaks = sampler.stop();
    let mem_end = mem_snapshot(&all);
    eprintln!("chorus-bench: drained; closing clients");
    let res = group.close().await?;

    // Deliveries: only broadcasts the server acknowledged count as expected.
    let (mut expected, mut received_acked, mut lost, mut received_unacked) =
        (0u64, 0u64, 0u64, 0u64);
    for s in 0..max_seq {
        let u = u64::from(res.uniq[s as usize]);
        if sends.status(s) == ST_ACKED {
            let e = expected_of(&union, s, via_socket);
            expected += e;
            received_acked += u.min(e);
            lost += e.saturating_sub(u);
        } else {
            received_unacked += u;
        }
    }
    let st = &res.stats;
    let window_s = (w1.at_ms - w0.at_ms) / 1000.0;
    let delivery_window_s = a.duration.max((st.last_recv_ms - t0) / 1000.0);

    let rows: Vec<ProcRow> = all
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let tot = |s: &[Option<CpuSplit>]| s[i].map(|c| c.total());
            let (cs, c0, c1, c2) = (
                tot(&cpu_at_start),
                tot(&w0.procs),
                tot(&w1.procs),
                tot(&drain_end.procs),
            );
            let diff = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| round(y - x, 2));
            ProcRow {
                name: p.name.clone(),
                kind: p.kind,
                pid: p.pid,
                cpu_s: diff(c0, c1),
                cpu_cores: c0.zip(c1).map(|(x, y)| round((y - x) / window_s, 3)),
                cpu_sys_s: w0.procs[i]
                    .zip(w1.procs[i])
                    .map(|(x, y)| round(y.sys - x.sys, 2)),
                cpu_s_drain: diff(c1, c2),
                cpu_s_setup: diff(cs, c0),
                rss_peak_mb: round(peaks[i] as f64 / 1024.0, 1),
                vm_hwm_mb: mem_end[i]
                    .and_then(|m| m.hwm_kb)
                    .map(|kb| round(kb as f64 / 1024.0, 1)),
            }
        })
        .collect();
    let sum_by = |kind: &str, f: fn(&ProcRow) -> Option<f64>| {
        round(
            rows.iter().filter(|r| r.kind == kind).filter_map(f).sum(),
            3,
        )
    };
    let split = CoreSplit {
        loadgen: sum_by("loadgen", |r| r.cpu_cores),
        servers: sum_by("server", |r| r.cpu_cores),
        extra: sum_by("extra", |r| r.cpu_cores),
    };
    let capacity = procstat::cpus();
    let total_cores = round(split.loadgen + split.servers + split.extra, 3);
    let machine = w0.machine.zip(w1.machine);
    let machine_busy_cores = machine.map(|(x, y)| round((y.busy - x.busy) / window_s, 3));
    let steal_cores = machine.map(|(x, y)| round((y.steal - x.steal) / window_s, 3));
    let other_cpu_cores = machine_busy_cores.map(|b| round((b - total_cores).max(0.0), 3));
    let noisy = other_cpu_cores.is_some_and(|c| c > 0.1 * capacity as f64);

    let sent = sends.sent();
    let send_errors = sends.errors();
    let scheduled = max_seq;
    let target_met = sched.not_sent == 0
        && send_errors == 0
        && lost == 0
        && sent as f64 >= 0.99 * scheduled as f64;
    let verdict = bottleneck(
        target_met,
        &rows,
        split,
        usize::from(a.threads),
        capacity,
        other_cpu_cores,
        noisy,
    );
    let mut error_samples = ready.error_samples.clone();
    error_samples.extend(sends.samples());
    error_samples.truncate(5);
    let disconnect_reasons: BTreeMap<String, u64> = st.disconnect_reasons.clone();

    Ok(LoadReport {
        base,
        common: Common {
            clients_connected: ready.joined.len(),
            connect_errors: ready.connect_errors,
            join_errors: ready.join_errors,
            connect_s: round(connect_s, 2),
            workers: 0,
        },
        via: a.via,
        broadcast_rooms: m,
        rate_target: a.rate,
        duration_s: a.duration,
        payload_bytes: a.payload,
        scheduled,
        sent,
        send_errors,
        not_sent: sched.not_sent,
        send_rate_achieved: round(sent as f64 / a.duration, 1),
        send_max_lag_ms: round(sched.max_lag_ms, 1),
        expected_deliveries: expected,
        received_deliveries: received_acked,
        lost,
        duplicates: res.duplicates,
        unexpected: st.unexpected,
        malformed: st.malformed,
        received_unacked,
        deliveries_per_s: round(st.received as f64 / delivery_window_s, 1),
        delivery_window_s: round(delivery_window_s, 2),
        drain_s: round((drain_end.at_ms - w1.at_ms) / 1000.0, 2),
        latency_ms: st.hist.summary(),
        latency_from_schedule_ms: st.hist_sched.summary(),
        ack_ms: sends.ack_hist().summary(),
        loadgen_cpu_s: sum_by("loadgen", |r| r.cpu_s),
        loadgen_cpu_cores: split.loadgen,
        servers_cpu_s: sum_by("server", |r| r.cpu_s),
        servers_cpu_cores: split.servers,
        servers_rss_peak_mb: sum_by("server", |r| Some(r.rss_peak_mb)),
        extra_cpu_s: sum_by("extra", |r| r.cpu_s),
        cpu_window_s: round(window_s, 2),
        cpus: capacity,
        machine_busy_cores,
        other_cpu_cores,
        steal_cores,
        noisy_machine: noisy,
        loadavg_1m: procstat::loadavg_1m().map(|l| round(l, 2)),
        target_met,
        bottleneck: verdict,
        disconnects: st.disconnects,
        disconnect_reasons,
        processes: rows,
        error_samples,
    })
}

/// HTTP sending: `--http-conns` keep-alive connections per replica, broadcast `s` to
/// replica `s % U`.
async fn send_http(
    o: &Options,
    resolved: &[(Target, SocketAddr)],
    sends: &Arc<SendState>,
    t0: f64,
) -> Result<ScheduleOutcome, Error> {
    let a = &o.args;
    let (k, m) = (a.rooms, a.broadcast_rooms);
    let mut pools = HttpPool::per_target(resolved, &a.token, a.http_conns, sends)?;
    let event = json_str(&a.event);
    let rooms_json: Vec<String> = (0..k)
        .map(|r| {
            let names: Vec<String> = target_rooms(r, k, m)
                .into_iter()
                .map(|x| json_str(&room_name(&a.room_prefix, x)))
                .collect();
            format!("[{}]", names.join(","))
        })
        .collect();
    let out = run_schedule(
        t0,
        a.rate,
        a.duration,
        a.max_inflight,
        sends.inflight_counter(),
        |s, intended| {
            let r = (s % k as u64) as usize;
            let t = now_ms();
            let data = bench_data(s, t, intended, r, m, -1, a.payload);
            let body = format!(
                "{{\"rooms\":{},\"event\":{event},\"data\":{data}}}",
                rooms_json[r]
            );
            sends.begin(s);
            if !pools[(s % pools.len() as u64) as usize].post(s, t, body) {
                sends.fail(s, "HTTP pool closed");
            }
        },
    )
    .await;
    wait_inflight(sends, 11_000.0).await;
    for p in &mut pools {
        p.close();
    }
    sends.abandon_inflight("no response before the end of the run");
    Ok(out)
}

async fn wait_inflight(sends: &SendState, max_ms: f64) {
    let deadline = now_ms() + max_ms;
    while sends.inflight() > 0 && now_ms() < deadline {
        sleep_ms(20.0).await;
    }
}
