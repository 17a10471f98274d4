//! Per-socket limits (docs/security.md): the event rate, the rooms a socket may be in, and
//! the count of sockets this replica has admitted.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a socket may keep sending over its rate before it is disconnected.
pub const OVER_RATE_GRACE: Duration = Duration::from_secs(10);
/// A pause in refusals this long ends an episode of going over the rate.
const EPISODE_GAP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct SocketLimitConfig {
    /// Events per second; bursts of twice that.
    pub rate: u32,
    pub max_rooms: usize,
}

/// What to do with one client event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Over the rate: answer `rate_limited`.
    RateLimited,
    /// Over the rate for [`OVER_RATE_GRACE`]: disconnect the socket.
    Disconnect,
}

/// One socket's counters.
pub struct SocketLimits {
    config: SocketLimitConfig,
    state: Mutex<State>,
    _admission: Option<Admission>,
}

struct State {
    tokens: f64,
    refilled: Instant,
    over_since: Option<Instant>,
    last_refusal: Option<Instant>,
    rooms: HashSet<String>,
}

impl SocketLimits {
    pub fn new(config: SocketLimitConfig, now: Instant, admission: Option<Admission>) -> Self {
        Self {
            config,
            state: Mutex::new(State {
                tokens: f64::from(config.rate) * 2.0,
                refilled: now,
                over_since: None,
                last_refusal: None,
                rooms: HashSet::new(),
            }),
            _admission: admission,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one event from the socket's budget (a token bucket refilled at `rate` per
    /// second, holding at most twice that).
    pub fn admit(&self, now: Instant) -> Admit {
        let rate = f64::from(self.config.rate);
        let mut st = self.lock();
        let elapsed = now.saturating_duration_since(st.refilled).as_secs_f64();
        st.tokens = (st.tokens + elapsed * rate).min(rate * 2.0);
        st.refilled = now;
        if st.tokens >= 1.0 {
            st.tokens -= 1.0;
            return Admit::Yes;
        }
        let new_episode = st
            .last_refusal
            .is_none_or(|t| now.saturating_duration_since(t) > EPISODE_GAP);
        if new_episode {
            st.over_since = Some(now);
        }
        st.last_refusal = Some(now);
        match st.over_since {
            Some(since) if now.saturating_duration_since(since) >= OVER_RATE_GRACE => {
                Admit::Disconnect
            }
            _ => Admit::RateLimited,
        }
    }

    /// Records that the socket is in `room`; false when that would pass the room limit.
    pub fn enter(&self, room: &str) -> bool {
        let mut st = self.lock();
        if st.rooms.contains(room) {
            return true;
        }
        if st.rooms.len() >= self.config.max_rooms {
            return false;
        }
        st.rooms.insert(room.to_owned());
        true
    }

    pub fn has(&self, room: &str) -> bool {
        self.lock().rooms.contains(room)
    }

    pub fn exit(&self, room: &str) {
        self.lock().rooms.remove(room);
    }
}

/// The sockets this replica has admitted, against `MAX_CONNECTIONS`.
#[derive(Clone)]
pub struct Capacity {
    admitted: Arc<AtomicUsize>,
    max: usize,
}

/// One admitted socket; dropping it (with the socket) frees its place.
pub struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Capacity {
    pub fn new(max: usize) -> Self {
        Self {
            admitted: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// True while new sockets may come.
    pub fn has_room(&self) -> bool {
        self.admitted.load(Ordering::SeqCst) < self.max
    }

    /// Takes a place, or None when the replica is full.
    pub fn admit(&self) -> Option<Admission> {
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission(self.admitted.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, max_rooms: usize) -> (SocketLimits, Instant) {
        let now = Instant::now();
        (
            SocketLimits::new(SocketLimitConfig { rate, max_rooms }, now, None),
            now,
        )
    }

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_the_rate_holds() {
        let (l, t0) = limits(10, 8);
        let admitted = (0..100).filter(|_| l.admit(t0) == Admit::Yes).count();
        assert_eq!(admitted, 20);
        // One second later, ten more.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| l.admit(t1) == Admit::Yes).count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn staying_over_the_rate_for_ten_seconds_disconnects() {
        let (l, t0) = limits(10, 8);
        let mut verdicts = Vec::new();
        // 30 events a second for 12 seconds: always over, never a second without refusals.
        for tenth in 0..120 {
            let now = t0 + Duration::from_millis(tenth * 100);
            for _ in 0..3 {
                verdicts.push((tenth, l.admit(now)));
            }
        }
        let first = |verdict: Admit| {
            verdicts
                .iter()
                .find(|(_, v)| *v == verdict)
                .map(|(t, _)| *t)
                .expect("seen")
        };
        // Ten seconds (100 tenths) after the first refusal.
        assert_eq!(first(Admit::Disconnect) - first(Admit::RateLimited), 100);
    }

    #[test]
    fn short_bursts_over_the_rate_never_disconnect() {
        let (l, t0) = limits(10, 8);
        // 40 events at once every 5 seconds, for a minute.
        for burst in 0..12 {
            let now = t0 + Duration::from_secs(burst * 5);
            for _ in 0..40 {
                assert_ne!(l.admit(now), Admit::Disconnect, "burst {burst}");
            }
        }
    }

    #[test]
    fn rooms_are_counted_once_and_freed_on_exit() {
        let (l, _) = limits(10, 2);
        assert!(l.enter("a"));
        assert!(l.enter("a"));
        assert!(l.enter("b"));
        assert!(!l.enter("c"));
        l.exit("a");
        assert!(l.enter("c"));
    }

    #[test]
    fn capacity_counts_admissions_until_they_drop() {
        let c = Capacity::new(2);
        let a = c.admit().expect("first");
        let _b = c.admit().expect("second");
        assert!(c.admit().is_none());
        assert!(!c.has_room());
        drop(a);
        assert!(c.has_room());
        assert!(c.admit().is_some());
    }
}
