//! Which messages a replica has already taken, so that the copy of a message that comes by a
//! second Redis (or late, from a Redis that was frozen) is dropped.
//!
//! Memory is bounded by a number of ids and a time, not by traffic: past them, the oldest ids
//! are forgotten (by this replica's clock, when they arrived). From then on, a copy that its
//! publishing replica sent no later than the newest forgotten one of that replica's messages
//! counts as taken. Publish times are compared only with the same replica's, so clocks that
//! differ between replicas change nothing. A copy is never taken twice; the price is that a
//! copy that comes later than the window is dropped, which only happens to a message whose
//! every other copy was lost too (its publisher was then told the cluster was unavailable).

use std::collections::{HashMap, HashSet, VecDeque};

/// Ids remembered at most: 57 bytes each (40 in the order queue, 17 in the set), about 7 MiB
/// once both tables have grown to their power-of-two size.
pub const MAX_IDS: usize = 100_000;
/// How long an id is remembered at most, in ms.
pub const WINDOW_MS: u64 = 120_000;
/// Publishing replicas whose horizon is kept; one forgotten for a window more goes first.
const MAX_ORIGINS: usize = 1024;

/// What [`Recent::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    New,
    Taken,
    TooLate,
}

/// Who published a message and when, by that replica's clock (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub replica: u64,
    pub published: u64,
}

/// One taken id, in arrival order. Plain words, so an entry is 40 bytes.
struct Taken {
    id: [u64; 2],
    arrived: u64,
    /// `Origin` as two words; replica 0 for none.
    replica: u64,
    published: u64,
}

pub struct Recent {
    ids: HashSet<u128>,
    order: VecDeque<Taken>,
    /// Per publishing replica: its copies published at or before this time (its clock) count
    /// as taken; and when that was last moved (this replica's clock).
    horizons: HashMap<u64, (u64, u64)>,
    max_ids: usize,
    window_ms: u64,
}

impl Recent {
    pub fn new(max_ids: usize, window_ms: u64) -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
            horizons: HashMap::new(),
            max_ids: max_ids.max(1),
            window_ms,
        }
    }

    /// True the first time `id` is seen (take it), false for another copy. `now` is this
    /// replica's time (ms).
    pub fn first(&mut self, id: u128, origin: Option<Origin>, now: u64) -> bool {
        self.take(id, origin, now) == Take::New
    }

    /// Takes `id` if it is new, and says whether it was: or remembered as taken, or too late to
    /// tell (published no later than a forgotten one of its replica's: counted as taken, and
    /// it may or may not have been).
    pub fn take(&mut self, id: u128, origin: Option<Origin>, now: u64) -> Take {
        while self.order.len() >= self.max_ids
            || self
                .order
                .front()
                .is_some_and(|t| t.arrived.saturating_add(self.window_ms) < now)
        {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.ids
                .remove(&((u128::from(old.id[0]) << 64) | u128::from(old.id[1])));
            if old.replica != 0 {
                let h = self.horizons.entry(old.replica).or_insert((0, now));
                *h = (h.0.max(old.published), now);
            }
        }
        self.prune_horizons(now);
        let too_late = origin.is_some_and(|o| {
            self.horizons
                .get(&o.replica)
                .is_some_and(|(h, _)| o.published <= *h)
        });
        if self.ids.contains(&id) {
            return Take::Taken;
        }
        if too_late {
            return Take::TooLate;
        }
        self.ids.insert(id);
        self.order.push_back(Taken {
            id: [(id >> 64) as u64, id as u64],
            arrived: now,
            replica: origin.map_or(0, |o| o.replica),
            published: origin.map_or(0, |o| o.published),
        });
        Take::New
    }

    /// Keeps the horizons of at most [`MAX_ORIGINS`] replicas (replicas come and go with pods).
    fn prune_horizons(&mut self, now: u64) {
        if self.horizons.len() <= MAX_ORIGINS {
            return;
        }
        let stale = now.saturating_sub(2 * self.window_ms);
        self.horizons.retain(|_, (_, moved)| *moved > stale);
        while self.horizons.len() > MAX_ORIGINS {
            let Some(oldest) = self
                .horizons
                .iter()
                .min_by_key(|(_, (_, moved))| *moved)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.horizons.remove(&oldest);
        }
    }

    /// Heap memory of the tables, in bytes (what their capacity takes, used or not).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket next to the value
        self.ids.capacity() * (std::mem::size_of::<u128>() + 1)
            + self.order.capacity() * std::mem::size_of::<Taken>()
            + self.horizons.capacity() * (std::mem::size_of::<(u64, (u64, u64))>() + 1)
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// This process's clock, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message id (32 hex digits) as a number; `None` for anything else.
pub fn parse_id(id: &str) -> Option<u128> {
    if id.len() != 32 {
        return None;
    }
    u128::from_str_radix(id, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(replica: u64, published: u64) -> Option<Origin> {
        Some(Origin { replica, published })
    }

    #[test]
    fn a_second_copy_is_dropped() {
        let mut r = Recent::new(10, 1000);
        assert!(r.first(1, from(7, 100), 100));
        assert!(!r.first(1, from(7, 100), 101));
        assert!(r.first(2, from(7, 101), 101));
        assert!(r.first(3, None, 101), "a message without origin");
        assert!(!r.first(3, None, 102));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn memory_is_bounded_and_what_is_forgotten_stays_taken() {
        let mut r = Recent::new(3, 1_000_000);
        for id in 0..10u128 {
            assert!(r.first(id, from(7, id as u64 + 1), 10));
        }
        assert_eq!(r.len(), 3);
        // 0..=6 were forgotten: their late copies are still refused, by their time
        assert_eq!(r.take(2, from(7, 3), 11), Take::TooLate);
        assert_eq!(r.take(8, from(7, 9), 11), Take::Taken);
        assert!(!r.first(6, from(7, 7), 11));
        // a new message published after the horizon is taken
        assert!(r.first(100, from(7, 11), 11));
    }

    #[test]
    fn ids_expire_after_the_window_of_this_replicas_clock() {
        let mut r = Recent::new(100, 1000);
        assert!(r.first(1, from(7, 0), 0));
        assert!(r.first(2, from(7, 1500), 1500));
        assert_eq!(r.len(), 1, "id 1 arrived longer ago than the window");
        assert!(
            !r.first(1, from(7, 0), 1600),
            "its late copy is still refused"
        );
    }

    #[test]
    fn clocks_that_differ_between_replicas_lose_nothing() {
        // Replica 8's clock is an hour ahead, replica 9's an hour behind; this one's is right.
        let hour = 3_600_000;
        let now = 10 * hour;
        let mut r = Recent::new(4, 1000);
        for i in 0..20u64 {
            let at = now + i * 10;
            assert!(r.first(u128::from(i) * 2, from(8, at + hour), at), "8 #{i}");
            assert!(
                r.first(u128::from(i) * 2 + 1, from(9, at - hour), at),
                "9 #{i}"
            );
        }
        // and the late copies of either are still refused
        assert!(!r.first(0, from(8, now + hour), now + 500));
        assert!(!r.first(1, from(9, now - hour), now + 500));
    }

    #[test]
    fn memory_at_the_bound_is_what_the_docs_say() {
        let mut r = Recent::new(MAX_IDS, WINDOW_MS);
        for id in 0..(MAX_IDS as u128 + 1000) {
            assert!(r.first(id, from(7, 1000 + id as u64), 1000));
        }
        assert_eq!(r.len(), MAX_IDS);
        let mib = r.heap_bytes() as f64 / (1024.0 * 1024.0);
        assert!(mib > 5.0 && mib < 8.0, "{mib} MiB");
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id(&format!("{:032x}", 255u128)), Some(255));
        assert_eq!(parse_id("ff"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }
}
