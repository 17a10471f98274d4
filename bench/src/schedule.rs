//! The open-loop sender schedule and the per-broadcast send bookkeeping shared by the
//! HTTP pools and the publishing clients.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::clock::{now_ms, sleep_ms, sleep_until_ms};
use crate::histogram::LatencyHistogram;

pub const ST_NONE: u8 = 0;
pub const ST_INFLIGHT: u8 = 1;
pub const ST_ACKED: u8 = 2;
pub const ST_ERROR: u8 = 3;

/// An acknowledgement later than this counts as a failed send (loadgen.js's timeout).
pub const ACK_TIMEOUT_MS: f64 = 10_000.0;

/// Status of every broadcast, in-flight count, acks.
pub struct SendState {
    status: Vec<AtomicU8>,
    inflight: AtomicUsize,
    sent: AtomicU64,
    errors: AtomicU64,
    ack_hist: Mutex<LatencyHistogram>,
    samples: Mutex<Vec<String>>,
}

impl SendState {
    pub fn new(max_seq: u64) -> Self {
        Self {
            status: (0..max_seq).map(|_| AtomicU8::new(ST_NONE)).collect(),
            inflight: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ack_hist: Mutex::new(LatencyHistogram::new()),
            samples: Mutex::new(Vec::new()),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn inflight_counter(&self) -> &AtomicUsize {
        &self.inflight
    }

    /// Broadcast `s` was started.
    pub fn begin(&self, s: u64) {
        if let Some(st) = self.status.get(s as usize) {
            st.store(ST_INFLIGHT, Ordering::Relaxed);
            self.inflight.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn settle(&self, s: u64, to: u8) -> bool {
        let Some(st) = self.status.get(s as usize) else {
            return false;
        };
        let moved = st
            .compare_exchange(ST_INFLIGHT, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
        }
        moved
    }

    /// The server acknowledged broadcast `s`, started at `t_send` (ms).
    pub fn ok(&self, s: u64, t_send: f64) {
        let rtt = now_ms() - t_send;
        if rtt > ACK_TIMEOUT_MS {
            self.fail(s, format!("ack after {:.0} ms (timeout)", rtt));
            return;
        }
        if self.settle(s, ST_ACKED) {
            self.sent.fetch_add(1, Ordering::Relaxed);
            self.ack_hist
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record_ms(rtt);
        }
    }

    /// Broadcast `s` failed (error answer, timeout, no sender, ...).
    pub fn fail(&self, s: u64, why: impl Into<String>) {
        if self.status.get(s as usize).is_some()
            && self.status[s as usize].load(Ordering::Relaxed) == ST_NONE
        {
            // failed before it was started (e.g. no member to publish from)
            self.status[s as usize].store(ST_ERROR, Ordering::Relaxed);
        } else if !self.settle(s, ST_ERROR) {
            return;
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.note(why);
    }

    pub fn note(&self, why: impl Into<String>) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() < 5 {
            samples.push(why.into());
        }
    }

    /// Every broadcast still in flight has failed with `why`.
    pub fn abandon_inflight(&self, why: &str) {
        for s in 0..self.status.len() as u64 {
            if self.status[s as usize].load(Ordering::Relaxed) == ST_INFLIGHT {
                self.fail(s, why);
            }
        }
    }

    pub fn status(&self, s: u64) -> u8 {
        self.status
            .get(s as usize)
            .map_or(ST_NONE, |st| st.load(Ordering::Relaxed))
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn ack_hist(&self) -> LatencyHistogram {
        self.ack_hist
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleOutcome {
    /// broadcasts never started (held back by `max_inflight` until the window closed)
    pub not_sent: u64,
    /// latest start relative to schedule, ms
    pub max_lag_ms: f64,
}

/// Open loop: broadcast `s` (`s < floor(rate × duration)`) is due at `t0 + s / rate`.
/// Each wakeup starts every due broadcast unless `max_inflight` are outstanding; nothing
/// is started after `t0 + duration`. Above 200/s it wakes every 5 ms at most (each
/// broadcast carries its actual send time, so batching does not bias latency).
pub async fn run_schedule(
    t0_ms: f64,
    rate: f64,
    duration_s: f64,
    max_inflight: usize,
    inflight: &AtomicUsize,
    mut send: impl FnMut(u64, f64),
) -> ScheduleOutcome {
    let total = (rate * duration_s).floor() as u64;
    let end_ms = t0_ms + duration_s * 1000.0;
    let interval = 1000.0 / rate;
    let min_tick = if rate >= 200.0 { 5.0 } else { 1.0 };
    let mut s = 0u64;
    let mut max_lag_ms = 0f64;
    sleep_until_ms(t0_ms).await;
    loop {
        let mut now = now_ms();
        while s < total {
            let intended = t0_ms + s as f64 * interval;
            if intended > now || inflight.load(Ordering::Relaxed) >= max_inflight {
                break;
            }
            max_lag_ms = max_lag_ms.max(now - intended);
            send(s, intended);
            s += 1;
            now = now_ms();
        }
        if s >= total || now >= end_ms {
            return ScheduleOutcome {
                not_sent: total - s,
                max_lag_ms,
            };
        }
        let until_next = t0_ms + s as f64 * interval - now_ms();
        sleep_ms(until_next.clamp(min_tick, 50.0)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_state_transitions() {
        let st = SendState::new(4);
        st.begin(0);
        st.begin(1);
        st.begin(2);
        assert_eq!(st.inflight(), 3);
        st.ok(0, now_ms());
        st.ok(0, now_ms()); // a second ack changes nothing
        st.fail(1, "HTTP 500");
        st.ok(1, now_ms()); // a late ack after a failure changes nothing
        st.ok(2, now_ms() - 20_000.0); // beyond the ack timeout
        st.fail(3, "no sender"); // never started
        st.fail(9, "out of range");
        assert_eq!(st.inflight(), 0);
        assert_eq!(st.sent(), 1);
        assert_eq!(st.errors(), 3);
        assert_eq!(
            [0, 1, 2, 3].map(|s| st.status(s)),
            [ST_ACKED, ST_ERROR, ST_ERROR, ST_ERROR]
        );
        assert_eq!(st.ack_hist().len(), 1);
        assert_eq!(st.samples().len(), 3);
    }

    #[test]
    fn abandon_fails_what_is_in_flight() {
        let st = SendState::new(3);
        st.begin(0);
        st.begin(1);
        st.ok(1, now_ms());
        st.abandon_inflight("no response before the end of the run");
        assert_eq!(st.status(0), ST_ERROR);
        assert_eq!(st.status(1), ST_ACKED);
        assert_eq!(st.status(2), ST_NONE);
        assert_eq!(st.inflight(), 0);
    }

    #[tokio::test]
    async fn schedule_sends_everything_in_order_when_unbounded() {
        let inflight = AtomicUsize::new(0);
        let mut seen = Vec::new();
        let t0 = now_ms();
        let out = run_schedule(t0, 1000.0, 0.02, 100, &inflight, |s, intended| {
            seen.push((s, intended));
        })
        .await;
        assert_eq!(out.not_sent, 0);
        assert_eq!(seen.len(), 20);
        for (k, (s, intended)) in seen.iter().enumerate() {
            assert_eq!(*s, k as u64);
            assert!((intended - (t0 + k as f64)).abs() < 1e-9);
        }
    }

    #[tokio::test]
    async fn schedule_holds_back_at_max_inflight() {
        let inflight = AtomicUsize::new(0);
        let mut n = 0;
        let out = run_schedule(now_ms(), 1000.0, 0.02, 5, &inflight, |_, _| {
            n += 1;
            inflight.fetch_add(1, Ordering::Relaxed); // never completes
        })
        .await;
        assert_eq!(n, 5);
        assert_eq!(out.not_sent, 15);
    }
}
