//! The Operator engine's decisions (pure): from one reading of the app's connections and CPU
//! to the replicas it should run, with the bounds, scale-up at once, and scale-down only to
//! the highest answer of the stabilization window and by at most `maxReplicasPerMinute`
//! replicas a minute.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::crd::AutoscalingSpec;

/// Inside this distance from the CPU target no change is made (the HPA's own tolerance), so
/// that noise around the target does not add and remove replicas.
pub const CPU_TOLERANCE: f64 = 0.1;
const MINUTE: Duration = Duration::from_secs(60);

/// The settings of one app's autoscaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    pub target_connections: Option<u32>,
    pub target_cpu_percent: Option<u32>,
    pub window: Duration,
    pub max_down_per_minute: i32,
}

impl Policy {
    pub fn of(spec: &AutoscalingSpec) -> Self {
        let positive = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
        Self {
            min: spec.min_replicas.max(0),
            max: spec.max_replicas.max(spec.min_replicas.max(0)),
            target_connections: positive(spec.target_connections_per_replica),
            target_cpu_percent: positive(spec.target_cpu_utilization_percentage),
            window: Duration::from_secs(
                u64::try_from(spec.scale_down.stabilization_window_seconds).unwrap_or(0),
            ),
            max_down_per_minute: spec.scale_down.max_replicas_per_minute.max(1),
        }
    }
}

/// The app's sockets as its replicas reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    pub total: u64,
    /// Every ready replica answered: the total is not missing anyone's sockets.
    pub complete: bool,
}

/// One reading; None where the signal could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    pub connections: Option<Connections>,
    /// Mean CPU use of the server pods, in percent of their requests.
    pub cpu_percent: Option<f64>,
}

/// What one decision came to, and why (for the status and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub desired: i32,
    /// What the signals alone asked for, bounded by min and max.
    pub recommended: i32,
    pub why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The signals ask for the current replicas.
    Steady,
    /// Outside min..max: brought inside at once.
    Bounds,
    /// The signals ask for more: at once.
    ScaleUp,
    /// The signals ask for fewer, and the window and the rate allow it.
    ScaleDown,
    /// The signals ask for fewer, but a higher answer within the window holds the replicas.
    Window,
    /// The signals ask for fewer, but this minute's removals are used up.
    Rate,
    /// A signal is missing or partial: never fewer on what cannot be read.
    Incomplete,
}

/// The memory of one app's decisions: its recent answers and removals.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    since: Instant,
    answers: VecDeque<(Instant, i32)>,
    removals: VecDeque<(Instant, i32)>,
}

impl Autoscaler {
    /// An autoscaler that started watching at `now`: until it has watched for a whole window
    /// it does not scale down (what it did not see may have asked for more).
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            answers: VecDeque::new(),
            removals: VecDeque::new(),
        }
    }

    /// The replicas to run, given `current` (spec.replicas) and a reading taken at `now`.
    pub fn decide(
        &mut self,
        policy: &Policy,
        current: i32,
        reading: &Reading,
        now: Instant,
    ) -> Decision {
        let bound = |n: i32| n.clamp(policy.min, policy.max);
        let mut answers = Vec::new();
        let mut incomplete = false;
        if let Some(target) = policy.target_connections {
            match reading.connections {
                Some(c) => {
                    answers.push(saturate(c.total.div_ceil(u64::from(target))));
                    incomplete |= !c.complete;
                }
                None => incomplete = true,
            }
        }
        if let Some(target) = policy.target_cpu_percent {
            match reading.cpu_percent {
                Some(used) => answers.push(cpu_answer(current, used, target)),
                None => incomplete = true,
            }
        }
        // With both signals the larger answer wins; with none, nothing changes.
        let asked = answers.into_iter().max().unwrap_or(current);
        let recommended = bound(if incomplete {
            asked.max(current)
        } else {
            asked
        });
        self.answers.push_back((now, recommended));
        while self
            .answers
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > policy.window)
        {
            self.answers.pop_front();
        }
        while self
            .removals
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= MINUTE)
        {
            self.removals.pop_front();
        }
        let decision = |desired, why| Decision {
            desired,
            recommended,
            why,
        };
        if current != bound(current) {
            return self.record(decision(bound(current), Why::Bounds), current, now);
        }
        if recommended > current {
            return decision(recommended, Why::ScaleUp);
        }
        if recommended == current {
            let why = if incomplete && asked < current {
                Why::Incomplete
            } else {
                Why::Steady
            };
            return decision(current, why);
        }
        // Fewer: only to the highest answer of the window (the current replicas while the
        // window has not been watched whole), and only as many as this minute allows.
        let watched_whole = now.saturating_duration_since(self.since) >= policy.window;
        let highest = self
            .answers
            .iter()
            .map(|(_, n)| *n)
            .chain((!watched_whole).then_some(current))
            .max()
            .unwrap_or(current);
        if highest >= current {
            return decision(current, Why::Window);
        }
        let removed: i32 = self.removals.iter().map(|(_, n)| *n).sum();
        let allowed = policy.max_down_per_minute.saturating_sub(removed);
        if allowed <= 0 {
            return decision(current, Why::Rate);
        }
        let desired = highest.max(current.saturating_sub(allowed));
        self.record(decision(desired, Why::ScaleDown), current, now)
    }

    /// Counts a scale-down towards the minute's removals.
    fn record(&mut self, decision: Decision, current: i32, now: Instant) -> Decision {
        if decision.desired < current {
            self.removals.push_back((now, current - decision.desired));
        }
        decision
    }
}

/// The HPA's answer for CPU: the current replicas scaled by used / target, unless within the
/// tolerance.
fn cpu_answer(current: i32, used_percent: f64, target_percent: u32) -> i32 {
    let ratio = used_percent / f64::from(target_percent);
    if !ratio.is_finite() || (ratio - 1.0).abs() <= CPU_TOLERANCE {
        return current;
    }
    let wanted = (f64::from(current.max(1)) * ratio).ceil();
    if wanted >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        wanted.max(0.0) as i32
    }
}

fn saturate(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
