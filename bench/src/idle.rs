//! The idle-memory run: the servers' RSS growth per added idle connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::cli::Options;
use crate::clients::Group;
use crate::clock::{now_ms, sleep_ms};
use crate::histogram::round;
use crate::load::{group_config, loadgen_proc, measured_procs, resolve_all};
use crate::procstat::{Mem, Proc, mem_kb, mem_snapshot};
use crate::report::{Base, Common, IdleReport, IdleRow};
use crate::schedule::SendState;

/// `--gc-signal`: signal the servers twice, then wait (at most 10 s) until their RSS
/// stops falling (three readings 0.5 s apart without a drop of 256 KiB or more).
async fn collect_garbage(o: &Options, servers: &[Proc]) {
    let Some((_, sig)) = o.gc_signal else { return };
    let signal = || {
        for p in servers {
            if let Ok(pid) = libc::pid_t::try_from(p.pid) {
                // SAFETY: kill(2) with a pid the user named and a known signal number.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    };
    let rss = || -> u64 {
        servers
            .iter()
            .filter_map(|p| mem_kb(p.pid).and_then(|m| m.rss_kb))
            .sum()
    };
    signal();
    sleep_ms(500.0).await;
    signal();
    let deadline = now_ms() + 10_000.0;
    let (mut last, mut steady) = (rss(), 0);
    while steady < 3 && now_ms() < deadline {
        sleep_ms(500.0).await;
        let now = rss();
        steady = if now + 256 > last { steady + 1 } else { 0 };
        last = last.min(now);
    }
}

fn mb(kb: Option<u64>) -> Option<f64> {
    kb.map(|k| round(k as f64 / 1024.0, 1))
}

pub async fn run(o: &Options) -> Result<IdleReport, Error> {
    let a = &o.args;
    let base = Base::new(o);
    let resolved = resolve_all(&o.targets).await?;
    let measured = measured_procs(o);
    let servers: Vec<Proc> = measured
        .iter()
        .filter(|p| p.kind == "server")
        .cloned()
        .collect();
    let budget = Duration::from_secs_f64(o.connect_budget_s());
    let mut group = Group::new(
        group_config(o, 0),
        resolved.clone(),
        Arc::new(SendState::new(0)),
    );

    let t_connect = now_ms();
    let first = (a.clients as f64 * 0.1).ceil() as usize;
    eprintln!("chorus-bench: idle-memory: connecting the first {first} clients");
    let first_ready = tokio::time::timeout(budget, group.connect(0, first))
        .await
        .map_err(|_| Error::Timeout {
            what: "connecting the first clients",
        })?;
    collect_garbage(o, &servers).await; // startup garbage
    sleep_ms(a.idle_baseline_wait * 1000.0).await;
    collect_garbage(o, &servers).await;
    let mem_before = mem_snapshot(&measured);
    eprintln!(
        "chorus-bench: baseline read; connecting the other {} clients",
        a.clients - first
    );
    let ready = tokio::time::timeout(budget, group.connect(first, a.clients))
        .await
        .map_err(|_| Error::Timeout {
            what: "connecting the rest of the clients",
        })?;
    let connect_s = (now_ms() - t_connect) / 1000.0;

    sleep_ms(a.idle_wait * 1000.0).await;
    let mem_after_no_gc = mem_snapshot(&measured);
    collect_garbage(o, &servers).await;
    let mem_after = mem_snapshot(&measured);

    // connections added between the two readings, per replica
    let baseline: HashSet<usize> = first_ready.joined.iter().copied().collect();
    let added: Vec<usize> = ready
        .joined
        .iter()
        .copied()
        .filter(|gi| !baseline.contains(gi))
        .collect();
    let u = o.targets.len().max(1);
    let mut per_url = vec![0usize; u];
    for gi in &added {
        per_url[gi % u] += 1;
    }
    let rss = |m: &Option<Mem>| m.and_then(|m| m.rss_kb);
    let rows: Vec<IdleRow> = measured
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let (b, af) = (rss(&mem_before[k]), rss(&mem_after[k]));
            let conns = match (&p.url, p.kind) {
                (Some(url), "server") => o
                    .targets
                    .iter()
                    .position(|t| &t.url == url)
                    .map_or(0, |i| per_url[i]),
                _ => added.len(),
            };
            let delta_kb = b.zip(af).map(|(b, a)| a as f64 - b as f64);
            IdleRow {
                name: p.name.clone(),
                kind: p.kind,
                pid: p.pid,
                connections_added: conns,
                rss_before_mb: mb(b),
                rss_after_mb: mb(af),
                rss_after_before_gc_mb: mb(rss(&mem_after_no_gc[k])),
                rss_delta_mb: delta_kb.map(|d| round(d / 1024.0, 1)),
                kib_per_connection: delta_kb
                    .filter(|_| conns > 0)
                    .map(|d| round(d / conns as f64, 2)),
            }
        })
        .collect();
    let srv: Vec<(usize, &IdleRow)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.kind == "server" && r.rss_delta_mb.is_some())
        .collect();
    let srv_delta_kb: f64 = srv
        .iter()
        .filter_map(|(k, _)| rss(&mem_before[*k]).zip(rss(&mem_after[*k])))
        .map(|(b, a)| a as f64 - b as f64)
        .sum();
    let srv_conns: usize = srv.iter().map(|(_, r)| r.connections_added).sum();
    let sum_mb =
        |f: fn(&IdleRow) -> Option<f64>| round(srv.iter().filter_map(|(_, r)| f(r)).sum(), 1);
    let joined = ready.joined.len();
    let loadgen_rss_kb = mem_kb(loadgen_proc().pid)
        .and_then(|m| m.rss_kb)
        .unwrap_or(0);
    let mut error_samples = ready.error_samples.clone();
    error_samples.truncate(5);

    let report = IdleReport {
        base,
        common: Common {
            clients_connected: joined,
            connect_errors: ready.connect_errors,
            join_errors: ready.join_errors,
            connect_s: round(connect_s, 2),
            workers: 0,
        },
        idle_wait_s: a.idle_wait,
        gc_signal: o.gc_signal.as_ref().map(|(name, _)| name.clone()),
        baseline_clients: baseline.len(),
        clients_added: added.len(),
        servers_rss_before_mb: sum_mb(|r| r.rss_before_mb),
        servers_rss_after_mb: sum_mb(|r| r.rss_after_mb),
        servers_kib_per_connection: (srv_conns > 0)
            .then(|| round(srv_delta_kb / srv_conns as f64, 2)),
        servers_rss_after_before_gc_mb: sum_mb(|r| r.rss_after_before_gc_mb),
        servers_total_kib_per_connection: (joined > 0)
            .then(|| round(sum_mb(|r| r.rss_after_mb) * 1024.0 / joined as f64, 1)),
        processes: rows,
        loadgen_rss_mb: round(loadgen_rss_kb as f64 / 1024.0, 1),
        error_samples,
    };
    group.close().await?;
    Ok(report)
}
