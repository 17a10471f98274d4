//! The JSON line: field names and meanings as loadgen.js prints them (see
//! bench/README.md in the shared bench directory), plus `"loadgen":"chorus-bench"`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cli::{Options, Via};
use crate::histogram::{Summary, round};
use crate::procstat;

pub const LOADGEN: &str = "chorus-bench";

/// Fields every line starts with (loadgen.js's `baseOutput`).
#[derive(Debug, Clone, Serialize)]
pub struct Base {
    pub ts: String,
    pub loadgen: &'static str,
    pub loadgen_version: &'static str,
    pub server: Option<String>,
    pub scenario: Option<String>,
    pub mode: &'static str,
    pub replicas: usize,
    pub clients: usize,
    pub rooms: usize,
    pub rooms_per_client: usize,
    pub nice: Option<i64>,
    pub autogroup_nice: Option<i64>,
    /// tokio worker threads of this generator
    pub threads: u16,
}

impl Base {
    pub fn new(o: &Options) -> Self {
        let a = &o.args;
        Self {
            ts: iso_now(),
            loadgen: LOADGEN,
            loadgen_version: env!("CARGO_PKG_VERSION"),
            server: a.server.clone(),
            scenario: a.label.clone(),
            mode: if a.idle_memory {
                "idle-memory"
            } else if a.reconnect_storm {
                "reconnect-storm"
            } else {
                "load"
            },
            replicas: o.targets.len(),
            clients: a.clients,
            rooms: a.rooms,
            rooms_per_client: a.rooms_per_client,
            nice: procstat::nice_of(std::process::id()),
            autogroup_nice: procstat::autogroup_nice(),
            threads: a.threads,
        }
    }
}

/// After connecting (loadgen.js's `common`).
#[derive(Debug, Clone, Serialize)]
pub struct Common {
    pub clients_connected: usize,
    pub connect_errors: u64,
    pub join_errors: u64,
    pub connect_s: f64,
    /// always 0: one process (loadgen.js's `--workers 0`)
    pub workers: u32,
}

/// One process of a load run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcRow {
    pub name: String,
    pub kind: &'static str,
    pub pid: u32,
    pub cpu_s: Option<f64>,
    pub cpu_cores: Option<f64>,
    pub cpu_sys_s: Option<f64>,
    pub cpu_s_drain: Option<f64>,
    pub cpu_s_setup: Option<f64>,
    pub rss_peak_mb: f64,
    pub vm_hwm_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    #[serde(flatten)]
    pub base: Base,
    #[serde(flatten)]
    pub common: Common,
    pub via: Via,
    pub broadcast_rooms: usize,
    pub rate_target: f64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    pub scheduled: u64,
    pub sent: u64,
    pub send_errors: u64,
    pub not_sent: u64,
    pub send_rate_achieved: f64,
    pub send_max_lag_ms: f64,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    pub lost: u64,
    pub duplicates: Option<u64>,
    pub unexpected: u64,
    pub malformed: u64,
    pub received_unacked: u64,
    pub deliveries_per_s: f64,
    pub delivery_window_s: f64,
    pub drain_s: f64,
    pub latency_ms: Summary,
    pub latency_from_schedule_ms: Summary,
    pub ack_ms: Summary,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_cores: f64,
    pub servers_cpu_s: f64,
    pub servers_cpu_cores: f64,
    pub servers_rss_peak_mb: f64,
    pub extra_cpu_s: f64,
    pub cpu_window_s: f64,
    pub cpus: usize,
    pub machine_busy_cores: Option<f64>,
    pub other_cpu_cores: Option<f64>,
    pub steal_cores: Option<f64>,
    pub noisy_machine: bool,
    pub loadavg_1m: Option<f64>,
    pub target_met: bool,
    pub bottleneck: String,
    pub disconnects: u64,
    pub disconnect_reasons: BTreeMap<String, u64>,
    pub processes: Vec<ProcRow>,
    pub error_samples: Vec<String>,
}

/// One process of an idle-memory run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRow {
    pub name: String,
    pub kind: &'static str,
    pub pid: u32,
    pub connections_added: usize,
    pub rss_before_mb: Option<f64>,
    pub rss_after_mb: Option<f64>,
    pub rss_after_before_gc_mb: Option<f64>,
    pub rss_delta_mb: Option<f64>,
    pub kib_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    #[serde(flatten)]
    pub base: Base,
    #[serde(flatten)]
    pub common: Common,
    pub idle_wait_s: f64,
    pub gc_signal: Option<String>,
    pub baseline_clients: usize,
    pub clients_added: usize,
    pub servers_rss_before_mb: f64,
    pub servers_rss_after_mb: f64,
    pub servers_kib_per_connection: Option<f64>,
    pub servers_rss_after_before_gc_mb: f64,
    pub servers_total_kib_per_connection: Option<f64>,
    pub processes: Vec<IdleRow>,
    pub loadgen_rss_mb: f64,
    pub error_samples: Vec<String>,
}

/// One process of a reconnect-storm run.
#[derive(Debug, Clone, Serialize)]
pub struct StormRow {
    pub name: String,
    pub kind: &'static str,
    pub pid: u32,
    /// CPU seconds from the reconnect signal until every client had resumed
    pub cpu_s: Option<f64>,
    /// the busiest 250 ms of the storm, in cores
    pub peak_cores: Option<f64>,
    /// with every client connected, before the drop
    pub rss_connected_mb: Option<f64>,
    pub rss_peak_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    #[serde(flatten)]
    pub base: Base,
    #[serde(flatten)]
    pub common: Common,
    /// messages published to each room while the clients were away
    pub missed_per_room: u64,
    pub missed_sent: u64,
    pub missed_send_errors: u64,
    pub resumed: usize,
    pub resume_errors: u64,
    /// resume acks with `recovered: false`
    pub not_recovered: u64,
    pub replay_expected: u64,
    pub replay_received: u64,
    pub replay_lost: u64,
    pub replay_duplicates: u64,
    /// from the reconnect signal until the last client had its resume ack
    pub all_resumed_s: f64,
    pub storm_window_s: f64,
    /// per client, from the reconnect signal to its resume ack
    pub resume_ms: Summary,
    pub servers_cpu_s: f64,
    pub servers_peak_cores: f64,
    pub servers_rss_connected_mb: f64,
    pub servers_rss_peak_mb: f64,
    /// CPU of processes other than the measured ones during the storm, in cores
    pub other_cpu_cores: Option<f64>,
    pub noisy_machine: bool,
    pub processes: Vec<StormRow>,
    pub error_samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Report {
    Load(Box<LoadReport>),
    Idle(Box<IdleReport>),
    Storm(Box<StormReport>),
}

/// The line printed when a run fails.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorLine {
    #[serde(flatten)]
    pub base: Base,
    pub error: String,
}

/// CPU use that decides the verdict.
#[derive(Debug, Clone, Copy)]
pub struct CoreSplit {
    pub loadgen: f64,
    pub servers: f64,
    pub extra: f64,
}

/// The `bottleneck` text (loadgen.js's wording; the generator counts as pegged at
/// 0.9 × the cores its threads can use, not at one core).
pub fn bottleneck(
    target_met: bool,
    rows: &[ProcRow],
    split: CoreSplit,
    loadgen_threads: usize,
    capacity: usize,
    other_cores: Option<f64>,
    noisy: bool,
) -> String {
    let total = round(split.loadgen + split.servers + split.extra, 3);
    let pegged = |kind: &str, limit: f64| -> Vec<String> {
        rows.iter()
            .filter(|r| r.kind == kind && r.cpu_cores.is_some_and(|c| c >= limit))
            .map(|r| format!("{}@{}", r.name, r.cpu_cores.unwrap_or(0.0)))
            .collect()
    };
    let lg_limit = 0.9 * loadgen_threads.min(capacity).max(1) as f64;
    let lg = pegged("loadgen", lg_limit);
    let srv = pegged("server", 0.9);
    let extra = pegged("extra", 0.9);
    let machine_busy = total >= 0.9 * capacity as f64;
    let mut out = if target_met && !machine_busy && lg.is_empty() && srv.is_empty() {
        format!("none: target met, {total}/{capacity} cores busy")
    } else {
        let mut parts = Vec::new();
        if !lg.is_empty() {
            parts.push(format!(
                "loadgen process at its thread limit ({loadgen_threads} threads): {}",
                lg.join(", ")
            ));
        }
        if !srv.is_empty() {
            parts.push(format!(
                "server process(es) at a full core: {}",
                srv.join(", ")
            ));
        }
        if !extra.is_empty() {
            parts.push(format!("other: {}", extra.join(", ")));
        }
        if machine_busy {
            parts.push(format!(
                "machine CPU saturated: {total}/{capacity} cores (loadgen {}, servers {}, other {})",
                round(split.loadgen, 3),
                round(split.servers, 3),
                round(split.extra, 3)
            ));
        }
        if parts.is_empty() {
            parts.push(format!(
                "no process pegged ({total}/{capacity} cores busy); see lost/not_sent/latency"
            ));
        }
        format!(
            "{}{}",
            if target_met {
                "target met, but "
            } else {
                "target missed: "
            },
            parts.join("; ")
        )
    };
    if noisy {
        out.push_str(&format!(
            "; WARNING: {} cores used by unmeasured processes during the run",
            other_cores.unwrap_or(0.0)
        ));
    }
    out
}

/// Now as `2026-11-26T03:41:30.626Z`.
pub fn iso_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    iso_from_unix_ms(d.as_millis() as i64)
}

/// Unix milliseconds as an ISO 8601 UTC timestamp with milliseconds.
pub fn iso_from_unix_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &'static str, name: &str, cores: f64) -> ProcRow {
        ProcRow {
            name: name.into(),
            kind,
            pid: 1,
            cpu_s: Some(cores * 10.0),
            cpu_cores: Some(cores),
            cpu_sys_s: None,
            cpu_s_drain: None,
            cpu_s_setup: None,
            rss_peak_mb: 0.0,
            vm_hwm_mb: None,
        }
    }

    #[test]
    fn verdicts() {
        let rows = [row("loadgen", "loadgen", 0.2), row("server", "s1", 0.3)];
        let split = CoreSplit {
            loadgen: 0.2,
            servers: 0.3,
            extra: 0.0,
        };
        assert_eq!(
            bottleneck(true, &rows, split, 2, 2, Some(0.0), false),
            "none: target met, 0.5/2 cores busy"
        );
        let rows = [row("loadgen", "loadgen", 1.85), row("server", "s1", 0.1)];
        let split = CoreSplit {
            loadgen: 1.85,
            servers: 0.1,
            extra: 0.0,
        };
        let v = bottleneck(false, &rows, split, 2, 2, Some(0.0), false);
        assert!(
            v.starts_with("target missed: loadgen process at its thread limit"),
            "{v}"
        );
        assert!(
            v.contains("machine CPU saturated: 1.95/2 cores (loadgen 1.85, servers 0.1, other 0)"),
            "{v}"
        );
        let rows = [row("loadgen", "loadgen", 0.5), row("server", "s1", 0.8)];
        let split = CoreSplit {
            loadgen: 0.5,
            servers: 0.8,
            extra: 0.0,
        };
        let v = bottleneck(false, &rows, split, 2, 2, Some(0.5), true);
        assert!(v.starts_with("target missed: no process pegged"), "{v}");
        assert!(
            v.ends_with("WARNING: 0.5 cores used by unmeasured processes during the run"),
            "{v}"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(iso_from_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso_from_unix_ms(1_795_664_490_626),
            "2026-11-26T03:41:30.626Z"
        );
        assert_eq!(
            iso_from_unix_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
