//! Command line: the flags of loadgen.js (so a script can swap the two generators),
//! plus `--threads`.

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::Error;
use crate::target::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// POST /v1/broadcast, round robin over the replicas
    Http,
    /// socket `publish` from a member of the first target room
    Socket,
}

/// chorus-bench: load generator for servers implementing the bench protocol
/// (Socket.IO v4 over websocket), a drop-in alternative to bench/loadgen/loadgen.js.
///
/// Prints one JSON line on stdout (the fields of loadgen.js, plus "loadgen":"chorus-bench");
/// progress goes to stderr. Exit codes: 0 done, 1 run failed (an error line is printed),
/// 2 hard time limit exceeded (an error line is printed), 64 bad arguments.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chorus-bench",
    version,
    about,
    long_about,
    args_override_self = true
)]
pub struct Args {
    /// Server base URLs, comma-separated; loopback only (127.0.0.0/8, [::1], localhost).
    #[arg(long, value_name = "URL[,URL...]")]
    pub urls: String,
    /// Clients, spread round-robin over --urls (client i connects to urls[i % U]).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Rooms; client i joins rooms (i + j) % K, j < J.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// J: rooms each client joins.
    #[arg(long, default_value_t = 1)]
    pub rooms_per_client: usize,
    /// M: each broadcast s targets rooms s % K .. s % K + M - 1.
    #[arg(long, default_value_t = 1)]
    pub broadcast_rooms: usize,
    /// Broadcasts per second, open loop.
    #[arg(long, default_value_t = 100.0, value_parser = non_negative)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub duration: f64,
    /// Padding string length in each broadcast.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How broadcasts are sent.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Accepted and ignored, so loadgen.js argument lists work unchanged: chorus-bench
    /// always runs as one process (its cost is in the "loadgen" process row); see --threads.
    #[arg(long, value_name = "N")]
    pub workers: Option<u64>,
    /// Tokio worker threads of this process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Server pids in the order of --urls (CPU and RSS from /proc).
    #[arg(
        long,
        value_name = "PID[,PID...]",
        default_value = "",
        hide_default_value = true
    )]
    pub pids: String,
    /// Other processes to measure, NAME:PID or PID, comma-separated (e.g. redis:1234).
    #[arg(
        long,
        value_name = "NAME:PID[,...]",
        default_value = "",
        hide_default_value = true
    )]
    pub extra_pids: String,
    /// Idle-memory mode: connect + join 10 % of the clients, read the servers' RSS
    /// --idle-baseline-wait s later, connect + join the rest, wait --idle-wait s, report
    /// RSS growth per added connection.
    #[arg(long)]
    pub idle_memory: bool,
    /// Idle-memory: seconds to wait with all clients connected.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub idle_wait: f64,
    /// Idle-memory: seconds between the first 10 % and the baseline reading.
    #[arg(long, default_value_t = 5.0, value_parser = non_negative)]
    pub idle_baseline_wait: f64,
    /// Idle-memory: signal sent to the --pids before each RSS reading (e.g. SIGWINCH,
    /// the Node peers' full-GC hook), after which RSS is read once it stops falling.
    #[arg(long, value_name = "SIG")]
    pub gc_signal: Option<String>,
    /// Reconnect-storm mode: connect + join every client, drop every connection at once,
    /// publish --missed messages to each room over HTTP, then reconnect every client at once
    /// (client i to the next URL) and `resume`; report the time until all have resumed and
    /// the servers' CPU and memory meanwhile.
    #[arg(long, conflicts_with = "idle_memory")]
    pub reconnect_storm: bool,
    /// Reconnect-storm: messages published to each room while the clients are away.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub missed: u64,
    /// Broadcast event name.
    #[arg(long, default_value = "bench")]
    pub event: String,
    /// Room name prefix.
    #[arg(long, default_value = "bench-")]
    pub room_prefix: String,
    /// Bearer token for /v1/broadcast (sockets send no auth).
    #[arg(
        long,
        env = "API_TOKEN",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    pub token: String,
    /// Outstanding broadcasts before the sender holds back.
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
    /// Keep-alive HTTP connections per replica.
    #[arg(long, default_value_t = 16)]
    pub http_conns: usize,
    /// Max seconds to wait for deliveries after the send window.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub drain: f64,
    /// Concurrent connection attempts.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Scenario name, copied to the output ("scenario").
    #[arg(long)]
    pub label: Option<String>,
    /// Server-under-test name, copied to the output.
    #[arg(long)]
    pub server: Option<String>,
    /// Also append the JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a non-negative number".into()),
    }
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct Options {
    pub args: Args,
    pub targets: Vec<Target>,
    /// server pid per URL index (`None` where not given)
    pub pids: Vec<Option<u32>>,
    pub extra_pids: Vec<(String, u32)>,
    pub gc_signal: Option<(String, i32)>,
}

impl Options {
    /// Parses a full argument list (first item: program name).
    pub fn parse_from<I, T>(args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Args::try_parse_from(args).map_err(|e| Error::Usage(e.to_string()))?;
        Self::from_args(args)
    }

    /// Checks the values the way loadgen.js does.
    pub fn from_args(a: Args) -> Result<Self, Error> {
        let usage = |m: &str| Error::Usage(m.to_owned());
        let urls: Vec<&str> = a
            .urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(usage("--urls is required"));
        }
        let targets = urls
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let pids = parse_pids(&a.pids)?;
        if pids.len() > targets.len() {
            return Err(usage("--pids: at most one pid per --urls entry"));
        }
        let extra_pids = parse_extra_pids(&a.extra_pids)?;
        if a.clients < 1 || a.rooms < 1 {
            return Err(usage("--clients and --rooms must be >= 1"));
        }
        if a.rooms_per_client < 1 || a.rooms_per_client > a.rooms {
            return Err(usage("--rooms-per-client must be in [1, rooms]"));
        }
        if a.broadcast_rooms < 1 || a.broadcast_rooms > a.rooms {
            return Err(usage("--broadcast-rooms must be in [1, rooms]"));
        }
        if a.via == Via::Socket && a.broadcast_rooms != 1 {
            return Err(usage(
                "--via socket publishes to one room: use --broadcast-rooms 1",
            ));
        }
        if !a.idle_memory && !a.reconnect_storm && (a.rate <= 0.0 || a.duration <= 0.0) {
            return Err(usage("--rate and --duration must be > 0"));
        }
        if a.duration > 3600.0 || a.rate * a.duration > 50e6 {
            return Err(usage(
                "refusing a run longer than 1 h or over 50M broadcasts",
            ));
        }
        if a.clients > 100_000 {
            return Err(usage("refusing more than 100000 clients"));
        }
        if a.drain > 3600.0 || a.idle_wait > 3600.0 || a.idle_baseline_wait > 3600.0 {
            return Err(usage("refusing waits longer than 1 h"));
        }
        if a.max_inflight < 1 || a.http_conns < 1 || a.connect_concurrency < 1 {
            return Err(usage(
                "--max-inflight, --http-conns and --connect-concurrency must be >= 1",
            ));
        }
        crate::http::auth_header(&a.token)?;
        let gc_signal = match &a.gc_signal {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some((
                s.clone(),
                signal_number(s)
                    .ok_or_else(|| usage(&format!("--gc-signal: unknown signal {s}")))?,
            )),
        };
        Ok(Self {
            targets,
            pids: pids.into_iter().map(|p| (p != 0).then_some(p)).collect(),
            extra_pids,
            gc_signal,
            args: a,
        })
    }

    /// Broadcasts scheduled: floor(rate × duration), none in idle-memory mode.
    pub fn max_seq(&self) -> u64 {
        if self.args.idle_memory || self.args.reconnect_storm {
            0
        } else {
            (self.args.rate * self.args.duration).floor() as u64
        }
    }

    /// Time allowed for connecting and joining (per phase), seconds.
    pub fn connect_budget_s(&self) -> f64 {
        30.0 + self.args.clients as f64 / 50.0
    }

    /// The hard bound on the whole run, seconds.
    pub fn hard_limit_s(&self) -> f64 {
        let a = &self.args;
        let rest = if a.idle_memory {
            let gc = if self.gc_signal.is_some() {
                2.0 * 11.0 + 11.0
            } else {
                0.0
            };
            self.connect_budget_s() + a.idle_wait + a.idle_baseline_wait + gc
        } else if a.reconnect_storm {
            // the missed messages (at 500/s, a generous floor), their last acks, the storm
            // (bounded like a connect phase) and the clients' close
            let missed = (a.missed * a.rooms as u64) as f64 / 500.0;
            missed + 11.0 + self.connect_budget_s() + 5.0
        } else {
            a.duration + a.drain + 25.0
        };
        self.connect_budget_s() + rest + 30.0
    }
}

fn parse_pids(s: &str) -> Result<Vec<u32>, Error> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| Error::Usage(format!("--pids: bad pid {p:?}")))
        })
        .collect()
}

fn parse_extra_pids(s: &str) -> Result<Vec<(String, u32)>, Error> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|item| {
            let (name, pid) = match item.split_once(':') {
                Some((n, p)) => (n.to_owned(), p),
                None => (format!("pid{item}"), item),
            };
            let pid = pid
                .parse::<u32>()
                .map_err(|_| Error::Usage(format!("--extra-pids: bad entry {item:?}")))?;
            Ok((name, pid))
        })
        .collect()
}

/// A signal by name (`SIGWINCH`, `WINCH`) or number.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        "URG" => libc::SIGURG,
        "PWR" => libc::SIGPWR,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Options, Error> {
        let mut v = vec![
            "chorus-bench",
            "--urls",
            "http://127.0.0.1:3001,http://127.0.0.1:3002",
        ];
        v.extend_from_slice(extra);
        Options::parse_from(v)
    }

    #[test]
    fn loadgen_argument_list_is_accepted() {
        let o = parse(&[
            "--clients",
            "1000",
            "--rooms",
            "10",
            "--rate",
            "500",
            "--duration",
            "20",
            "--payload",
            "100",
            "--workers",
            "1",
            "--pids",
            "11,12",
            "--extra-pids",
            "redis:13",
            "--token",
            "t",
            "--server",
            "rust",
            "--label",
            "http-c1000-k10-r500",
        ])
        .expect("valid");
        assert_eq!(o.targets.len(), 2);
        assert_eq!(o.pids, vec![Some(11), Some(12)]);
        assert_eq!(o.extra_pids, vec![("redis".to_owned(), 13)]);
        assert_eq!(o.max_seq(), 10_000);
        assert_eq!(o.args.threads, 2);
        // the hard limit leaves room for every phase of the run
        let a = &o.args;
        assert!(o.hard_limit_s() > o.connect_budget_s() + a.duration + a.drain);
        let o = parse(&[
            "--idle-memory",
            "--clients=2000",
            "--idle-wait",
            "10",
            "--gc-signal",
            "SIGWINCH",
        ])
        .expect("valid");
        assert_eq!(o.max_seq(), 0);
        let a = &o.args;
        assert!(o.hard_limit_s() > 2.0 * o.connect_budget_s() + a.idle_wait + a.idle_baseline_wait);
        assert_eq!(o.gc_signal, Some(("SIGWINCH".to_owned(), libc::SIGWINCH)));
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--rooms-per-client", "11"][..],
            &["--broadcast-rooms", "0"],
            &["--via", "socket", "--broadcast-rooms", "2"],
            &["--rate", "-1"],
            &["--rate", "0"],
            &["--duration", "4000"],
            &["--pids", "1,2,3"],
            &["--pids", "x"],
            &["--extra-pids", "redis:x"],
            &["--gc-signal", "SIGNOPE"],
            &["--clients", "0"],
            &["--unknown", "1"],
            &["--token", "a\r\nX-Injected: 1"],
        ] {
            assert!(matches!(parse(bad), Err(Error::Usage(_))), "{bad:?}");
        }
        assert!(matches!(
            Options::parse_from(["chorus-bench", "--urls", "http://10.1.2.3:3000"]),
            Err(Error::NotLoopback(_))
        ));
        assert!(matches!(
            Options::parse_from(["chorus-bench", "--urls", ","]),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn a_repeated_flag_takes_the_last_value() {
        let o = parse(&[
            "--rooms",
            "4",
            "--rooms",
            "10",
            "--workers",
            "1",
            "--workers",
            "2",
        ])
        .expect("valid");
        assert_eq!(o.args.rooms, 10);
    }

    #[test]
    fn signals() {
        assert_eq!(signal_number("WINCH"), Some(libc::SIGWINCH));
        assert_eq!(signal_number("sigusr2"), Some(libc::SIGUSR2));
        assert_eq!(signal_number("28"), Some(28));
        assert_eq!(signal_number("0"), None);
    }
}
