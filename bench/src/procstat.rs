//! CPU time and memory of processes, and whole-machine CPU, from `/proc` (Linux).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::Error;

/// Clock ticks per second for `/proc` CPU counters (`sysconf(_SC_CLK_TCK)`, 100 if unknown).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Online CPUs (what Node's `os.cpus().length` counts).
pub fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// The fields of `/proc/<pid>/stat` this crate needs, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    pub utime: u64,
    pub stime: u64,
    pub nice: i64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Result<StatFields, Error> {
    let close = text
        .rfind(')')
        .ok_or_else(|| Error::Proc("stat: no ')' after the command name".into()))?;
    // fields from 3 (state) on
    let f: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let get = |k: usize, name: &str| -> Result<&str, Error> {
        f.get(k)
            .copied()
            .ok_or_else(|| Error::Proc(format!("stat: missing {name}")))
    };
    let num = |k: usize, name: &str| -> Result<u64, Error> {
        get(k, name)?
            .parse::<u64>()
            .map_err(|_| Error::Proc(format!("stat: bad {name}")))
    };
    let nice = get(16, "nice")?
        .parse::<i64>()
        .map_err(|_| Error::Proc("stat: bad nice".into()))?;
    Ok(StatFields {
        utime: num(11, "utime")?, // field 14
        stime: num(12, "stime")?, // field 15
        nice,                     // field 19
    })
}

/// User and system CPU seconds of a process (all threads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSplit {
    pub user: f64,
    pub sys: f64,
}

impl CpuSplit {
    pub fn total(&self) -> f64 {
        self.user + self.sys
    }
}

fn read_stat(pid: u32) -> Option<StatFields> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).ok()
}

/// CPU seconds of `pid`, or `None` if it is gone.
pub fn cpu_split(pid: u32) -> Option<CpuSplit> {
    let s = read_stat(pid)?;
    let tck = clk_tck();
    Some(CpuSplit {
        user: s.utime as f64 / tck,
        sys: s.stime as f64 / tck,
    })
}

/// Nice value of `pid`.
pub fn nice_of(pid: u32) -> Option<i64> {
    read_stat(pid).map(|s| s.nice)
}

/// Resident memory of a process, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mem {
    pub rss_kb: Option<u64>,
    pub hwm_kb: Option<u64>,
}

/// Parses `VmRSS` and `VmHWM` out of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Mem {
    let mut m = Mem::default();
    for line in text.lines() {
        let kb = |rest: &str| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        };
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            m.rss_kb = kb(rest);
        } else if let Some(rest) = line.strip_prefix("VmHWM:") {
            m.hwm_kb = kb(rest);
        }
    }
    m
}

/// Memory of `pid`, or `None` if it is gone.
pub fn mem_kb(pid: u32) -> Option<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status(&text))
}

/// Whole-machine CPU counters in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineCpu {
    pub busy: f64,
    pub idle: f64,
    pub steal: f64,
    pub total: f64,
}

/// Parses the first (`cpu `) line of `/proc/stat`: busy = user + nice + system + irq +
/// softirq (guest time is already in user), idle = idle + iowait.
pub fn parse_machine(text: &str, tck: f64) -> Result<MachineCpu, Error> {
    let line = text
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| Error::Proc("/proc/stat: no cpu line".into()))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| Error::Proc("/proc/stat: bad number".into()))?;
    if v.len() < 7 {
        return Err(Error::Proc("/proc/stat: too few fields".into()));
    }
    let at = |k: usize| v.get(k).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let idle = at(3) + at(4);
    let steal = at(7);
    Ok(MachineCpu {
        busy: busy as f64 / tck,
        idle: idle as f64 / tck,
        steal: steal as f64 / tck,
        total: (busy + idle + steal) as f64 / tck,
    })
}

pub fn machine_cpu() -> Option<MachineCpu> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine(&text, clk_tck()).ok()
}

/// Nice value of this process's scheduler autogroup (`/proc/self/autogroup`).
pub fn autogroup_nice() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/autogroup").ok()?;
    let rest = &text[text.find("nice ")? + 5..];
    rest.split_ascii_whitespace().next()?.parse().ok()
}

/// 1-minute load average.
pub fn loadavg_1m() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// A measured process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// "server", "extra" or "loadgen"
    pub kind: &'static str,
    pub name: String,
    pub pid: u32,
    /// the server's URL (kind "server")
    pub url: Option<String>,
}

/// CPU of every process at one moment.
pub fn cpu_snapshot(procs: &[Proc]) -> Vec<Option<CpuSplit>> {
    procs.iter().map(|p| cpu_split(p.pid)).collect()
}

pub fn mem_snapshot(procs: &[Proc]) -> Vec<Option<Mem>> {
    procs.iter().map(|p| mem_kb(p.pid)).collect()
}

/// Samples VmRSS of each process every 250 ms in a background task, keeping the peak.
pub struct RssSampler {
    peak: Arc<Mutex<Vec<u64>>>,
    procs: Vec<Proc>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(procs: &[Proc]) -> Self {
        let peak = Arc::new(Mutex::new(vec![0u64; procs.len()]));
        let (p2, procs2) = (peak.clone(), procs.to_vec());
        sample_into(&peak, procs);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                sample_into(&p2, &procs2);
            }
        });
        Self {
            peak,
            procs: procs.to_vec(),
            task,
        }
    }

    /// Stops sampling (after one last sample) and returns the peaks in KiB.
    pub fn stop(self) -> Vec<u64> {
        self.task.abort();
        sample_into(&self.peak, &self.procs);
        self.peak
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn sample_into(peak: &Mutex<Vec<u64>>, procs: &[Proc]) {
    let now: Vec<u64> = procs
        .iter()
        .map(|p| mem_kb(p.pid).and_then(|m| m.rss_kb).unwrap_or(0))
        .collect();
    let mut peak = peak.lock().unwrap_or_else(PoisonError::into_inner);
    for (p, n) in peak.iter_mut().zip(now) {
        *p = (*p).max(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        // comm "my (odd) server) x" contains spaces and both parentheses
        let line = "4242 (my (odd) server) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    1500 320 0 0 20 -5 9 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).expect("parses");
        assert_eq!(
            s,
            StatFields {
                utime: 1500,
                stime: 320,
                nice: -5
            }
        );
    }

    #[test]
    fn stat_malformed_is_an_error() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("12 (x) S 1 2").is_err());
        assert!(parse_stat("12 (x) S 1 2 3 4 5 6 7 8 9 10 abc 0 0 0 0 0 0").is_err());
    }

    /// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), seconds: a clock
    /// independent of /proc to check its readings against.
    fn thread_cpu_s() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to write.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    /// The process and machine CPU counters are seconds (clock ticks converted right) and
    /// grow by what a busy loop of this thread burnt, as its own CPU clock says.
    #[test]
    fn cpu_counters_follow_a_busy_loop() {
        let pid = std::process::id();
        let (p0, m0) = (
            cpu_split(pid).expect("own stat"),
            machine_cpu().expect("stat"),
        );
        let (wall, t0) = (std::time::Instant::now(), thread_cpu_s());
        // 0.3 s of this thread's CPU; a starved thread gives up after 60 s
        let mut x = 0u64;
        while thread_cpu_s() - t0 < 0.3 && wall.elapsed() < Duration::from_secs(60) {
            for k in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) ^ k);
            }
        }
        let burnt = thread_cpu_s() - t0;
        let (p1, m1) = (
            cpu_split(pid).expect("own stat"),
            machine_cpu().expect("stat"),
        );
        let wall = wall.elapsed().as_secs_f64();
        assert!(burnt >= 0.3, "only {burnt} s of CPU in {wall} s");
        // /proc rounds each reading down to a tick; other tests' threads add to it
        let slack = 3.0 / clk_tck();
        let grew = p1.total() - p0.total();
        assert!(
            grew >= burnt - slack && grew <= wall * cpus() as f64 + slack,
            "process CPU grew {grew} s; this thread burnt {burnt} s in {wall} s"
        );
        assert!(p1.user - p0.user >= burnt / 2.0, "{p0:?} -> {p1:?}");
        let busy = m1.busy - m0.busy;
        assert!(busy >= burnt - slack, "machine busy grew {busy} s");
    }

    /// VmRSS is this process's resident memory in KiB: plausible for a test process,
    /// and grows by a buffer once its pages are written; the sampler keeps that peak.
    #[tokio::test]
    async fn rss_follows_touched_memory() {
        const MIB: u64 = 64;
        let pid = std::process::id();
        let before = mem_kb(pid).and_then(|m| m.rss_kb).expect("VmRSS");
        assert!((1024..4 << 20).contains(&before), "{before} KiB");
        let sampler = RssSampler::start(&[Proc {
            kind: "loadgen",
            name: "self".into(),
            pid,
            url: None,
        }]);
        // written, so every page is resident (a zeroed buffer might not be)
        let buf = std::hint::black_box(vec![1u8; (MIB << 20) as usize]);
        let after = mem_kb(pid).expect("status");
        let peaks = sampler.stop();
        drop(buf);
        let rss = after.rss_kb.expect("VmRSS");
        let grew = rss.saturating_sub(before);
        assert!(
            grew >= (MIB - 8) * 1024,
            "RSS grew {grew} KiB after touching {MIB} MiB"
        );
        assert!(after.hwm_kb.expect("VmHWM") >= rss);
        assert!(peaks[0] >= before + (MIB - 8) * 1024, "{peaks:?}");
    }

    #[test]
    fn online_cpus_are_those_in_proc_stat() {
        let text = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let listed = text
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        assert_eq!(cpus(), listed);
    }

    #[test]
    fn nice_is_the_scheduler_s() {
        // SAFETY: getpriority has no preconditions; 0 is this process.
        let prio = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice_of(std::process::id()), Some(i64::from(prio)));
    }

    #[test]
    fn status_fields() {
        let text = "Name:\tx\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status(text),
            Mem {
                rss_kb: Some(10240),
                hwm_kb: Some(20480)
            }
        );
        assert_eq!(parse_status("Name:\tkthread\n"), Mem::default());
    }

    #[test]
    fn machine_line() {
        let text = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        let m = parse_machine(text, 100.0).expect("parses");
        assert_eq!(m.busy, 1.6);
        assert_eq!(m.idle, 10.2);
        assert_eq!(m.steal, 0.07);
        assert!(parse_machine("intr 1 2 3", 100.0).is_err());
    }
}
