//! Which messages a replica has already taken, so that the copy of a message that comes by a
//! second Redis (or late, from a Redis that was frozen) is dropped.
//!
//! Memory is bounded by a number of ids, not by traffic: past it, the oldest ids are forgotten,
//! and from then on any copy published no later than the newest forgotten one counts as already
//! taken.
//! So a copy is never taken twice; the price is that a copy that comes later than the window it
//! would need is dropped, which only happens to a message whose every other copy was lost too
//! (its publisher was then told the cluster was unavailable).

use std::collections::{HashSet, VecDeque};

/// Ids remembered at most: 49 bytes each (32 in the order queue, 17 in the set), about 12 MiB
/// once both tables have grown to their power-of-two size.
pub const MAX_IDS: usize = 200_000;
/// How long an id is remembered at most, in ms.
pub const WINDOW_MS: u64 = 120_000;

pub struct Recent {
    ids: HashSet<u128>,
    /// Ids in the order they were taken, with their publish time.
    order: VecDeque<(u128, u64)>,
    /// Copies published at or before this time (ms) count as taken.
    horizon: Option<u64>,
    max_ids: usize,
    window_ms: u64,
}

impl Recent {
    pub fn new(max_ids: usize, window_ms: u64) -> Self {
        Self {
            ids: HashSet::new(),
            order: VecDeque::new(),
            horizon: None,
            max_ids: max_ids.max(1),
            window_ms,
        }
    }

    /// True the first time `id` is seen (take it), false for another copy. `published` is when
    /// the message was published (ms, the publisher's clock), `now` this replica's time.
    pub fn first(&mut self, id: u128, published: Option<u64>, now: u64) -> bool {
        while self.order.len() >= self.max_ids
            || self
                .order
                .front()
                .is_some_and(|(_, t)| t.saturating_add(self.window_ms) < now)
        {
            let Some((old, t)) = self.order.pop_front() else {
                break;
            };
            self.ids.remove(&old);
            self.horizon = self.horizon.max(Some(t));
        }
        let too_late = published.is_some_and(|t| self.horizon.is_some_and(|h| t <= h));
        if too_late || !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((id, published.unwrap_or(now)));
        true
    }

    /// Heap memory of the two tables, in bytes (what their capacity takes, used or not).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket next to the value
        self.ids.capacity() * (std::mem::size_of::<u128>() + 1)
            + self.order.capacity() * std::mem::size_of::<(u128, u64)>()
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

    #[test]
    fn a_second_copy_is_dropped() {
        let mut r = Recent::new(10, 1000);
        assert!(r.first(1, Some(100), 100));
        assert!(!r.first(1, Some(100), 101));
        assert!(r.first(2, Some(101), 101));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn memory_is_bounded_and_what_is_forgotten_stays_taken() {
        let mut r = Recent::new(3, 1_000_000);
        for id in 0..10u128 {
            assert!(r.first(id, Some(id as u64 + 1), 10));
        }
        assert_eq!(r.len(), 3);
        // 0..=6 were forgotten: their late copies are still refused, by their time
        assert!(!r.first(2, Some(3), 11));
        assert!(!r.first(6, Some(7), 11));
        // a new message published after the horizon is taken
        assert!(r.first(100, Some(11), 11));
    }

    #[test]
    fn memory_at_the_bound_is_what_the_docs_say() {
        let mut r = Recent::new(MAX_IDS, WINDOW_MS);
        for id in 0..(MAX_IDS as u128 + 1000) {
            assert!(r.first(id, Some(1000 + id as u64), 1000));
        }
        assert_eq!(r.len(), MAX_IDS);
        let mib = r.heap_bytes() as f64 / (1024.0 * 1024.0);
        assert!(mib > 8.0 && mib < 13.0, "{mib} MiB");
    }

    #[test]
    fn ids_expire_after_the_window() {
        let mut r = Recent::new(100, 1000);
        assert!(r.first(1, Some(0), 0));
        assert!(r.first(2, Some(1500), 1500));
        assert_eq!(r.len(), 1, "id 1 is older than the window");
        assert!(!r.first(1, Some(0), 1600), "its late copy is still refused");
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id(&format!("{:032x}", 255u128)), Some(255));
        assert_eq!(parse_id("ff"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }
}
