//! Gaps: room messages a Redis carried that never reached this replica, because its link was
//! down, or the queue from Redis overflowed (`BUS_BACKLOG_BYTES`), or a message arrived whose
//! sequence number skipped some. The sockets must not miss them silently.
//!
//! The delivery loop notices a gap before it hands out anything that came after it, and then,
//! still in the loop (live messages wait in the queue meanwhile), catches up: it reads the
//! history of every room this replica has members in, from where the replica stood, and hands
//! out what it had not taken, in order, exactly as live messages are (a socket in the middle
//! of a `join` or `resume` holds them and drops what its own read covered). What the replica
//! had taken is dropped by message id, so nothing reaches a socket twice. The sockets of a
//! room whose history does not reach back to the gap (trimmed, expired, a Redis that lost its
//! data, history off) get nothing more and are closed, a few at a time, so that they resume
//! and are told what is lost.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::{Delivered, Delivery, Message, Outbox, Socket, close_transport};
use crate::{
    dedupe::now_ms,
    history::{History, Position, Snapshot, Stamp, complete_rooms, recover},
    metrics::{GapCause, GapLabels},
};

/// How soon a catch-up that could not read the history is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Bytes of history one catch-up reads at most; past it the rooms' sockets are closed instead.
pub const MAX_CATCH_UP_BYTES: usize = 64 << 20;
/// Rooms one catch-up reads at most (a hundred reads), those with the most members here
/// first; the sockets of the others are closed instead. It keeps the time the delivery loop
/// waits bounded, whatever the number of rooms clients joined.
pub const MAX_CATCH_UP_ROOMS: usize = 10_000;
/// Sockets closed per tick, and the tick: at most 1,000 a second, so that the replicas they
/// reconnect to see no storm.
const CLOSE_BATCH: usize = 10;
const CLOSE_TICK: Duration = Duration::from_millis(10);
/// A message published within this long of one this replica forgot may count as taken by its
/// publisher's clock (see `dedupe`).
const FORGET_MARGIN_MS: u64 = 1000;

/// Where this replica stands on each link, and which links owe it a catch-up.
pub(super) struct Tracker {
    /// Per link: the last stamp taken, and when (this replica's clock).
    at: Vec<Option<(Stamp, u64)>>,
    /// Per link: came up at least once.
    was_up: Vec<bool>,
    /// Per link: a gap not caught up yet.
    pending: Vec<bool>,
    /// When to try again after a catch-up that could not read the history.
    retry_at: Option<Instant>,
}

impl Tracker {
    pub(super) fn new(links: usize) -> Self {
        Self {
            at: vec![None; links],
            was_up: vec![false; links],
            pending: vec![false; links],
            retry_at: None,
        }
    }

    /// Where the replica stands: the last stamp taken from each link.
    pub(super) fn position(&self) -> Position {
        Position::of(self.at.iter().flatten().map(|(s, _)| *s))
    }

    /// Whether `stamp`, just arrived from `link`, shows that messages before it never came.
    pub(super) fn skips(&self, link: usize, stamp: Stamp) -> bool {
        match self.at.get(link).copied().flatten() {
            Some((last, _)) if last.epoch == stamp.epoch => stamp.seq > last.seq + 1,
            // A Redis that lost its data: what it had after `last` is gone with it.
            Some(_) => true,
            None => false,
        }
    }

    /// Takes `stamp` from `link` (never moving back within an epoch).
    pub(super) fn advance(&mut self, link: usize, stamp: Stamp) {
        if let Some(slot) = self.at.get_mut(link) {
            match slot {
                Some((last, _)) if last.epoch == stamp.epoch && last.seq >= stamp.seq => {}
                _ => *slot = Some((stamp, now_ms())),
            }
        }
    }

    /// The link came up; true when it had been up before (it was down in between: a gap).
    pub(super) fn up(&mut self, link: usize) -> bool {
        self.was_up
            .get_mut(link)
            .is_some_and(|was| std::mem::replace(was, true))
    }

    pub(super) fn mark(&mut self, link: usize) {
        if let Some(p) = self.pending.get_mut(link) {
            *p = true;
        }
    }

    pub(super) fn is_pending(&self, link: usize) -> bool {
        self.pending.get(link).copied().unwrap_or(false)
    }

    fn settle(&mut self, link: usize) {
        if let Some(p) = self.pending.get_mut(link) {
            *p = false;
        }
    }

    pub(super) fn any_pending(&self) -> bool {
        self.pending.contains(&true)
    }

    /// When the pending catch-up is to be tried again, if it failed.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.any_pending())
    }

    /// When the earliest pending link's last message was taken (this replica's clock): the
    /// gap began after it.
    fn gap_began(&self) -> u64 {
        self.pending
            .iter()
            .zip(&self.at)
            .filter(|(p, _)| **p)
            .map(|(_, at)| at.map_or(0, |(_, t)| t))
            .min()
            .unwrap_or(0)
    }

    /// Whether the links read (`heads`) hold nothing past where the replica stands on every
    /// pending one.
    fn nothing_missed(&self, heads: &[Snapshot]) -> bool {
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .all(|(link, _)| {
                let Some(head) = heads.iter().find(|s| s.link == link).map(|s| s.head) else {
                    // Not readable now: known only once it is.
                    return false;
                };
                match self.at[link] {
                    Some((at, _)) => at.epoch == head.epoch && at.seq >= head.seq,
                    None => head.seq == 0,
                }
            })
    }

    /// The links read are caught up to their heads; the others stay pending.
    fn caught_up(&mut self, heads: &[Snapshot]) {
        for s in heads {
            if let Some(p) = self.pending.get_mut(s.link) {
                *p = false;
            }
            self.advance(s.link, s.head);
        }
        self.retry_at = None;
    }

    /// Every link's gap is dealt with (the sockets concerned were closed).
    fn settle_all(&mut self) {
        self.pending.iter_mut().for_each(|p| *p = false);
        self.retry_at = None;
    }

    fn retry_later(&mut self) {
        self.retry_at = Some(Instant::now() + RETRY);
    }
}

impl Delivery {
    /// Counts a gap and marks its link; the caller catches up before handing out anything more.
    pub(super) fn gap(&self, gaps: &mut Tracker, link: usize, cause: GapCause) {
        tracing::debug!(
            link,
            ?cause,
            "messages from redis may have been missed: catching up"
        );
        self.metrics.gaps.get_or_create(&GapLabels { cause }).inc();
        gaps.mark(link);
    }

    /// The first time a link comes up, where the replica starts on it: its head.
    pub(super) async fn start_on(&self, gaps: &mut Tracker, link: usize) {
        let Some(history) = &self.history else { return };
        if gaps.at[link].is_some() {
            return;
        }
        if let Ok(heads) = history.heads().await
            && let Some(s) = heads.iter().find(|s| s.link == link)
        {
            gaps.advance(link, s.head);
        }
    }

    /// Catches this replica's sockets up on what the pending links' gaps hold, or closes
    /// those it cannot (see the module's comment). Leaves the gaps pending, to be tried again
    /// shortly, when the history cannot be read now.
    pub(super) async fn catch_up(&self, gaps: &mut Tracker) {
        if !gaps.any_pending() {
            return;
        }
        let Some(io) = self.io.get() else {
            return gaps.settle_all();
        };
        let sockets = io.sockets();
        let rooms = rooms_of(&sockets);
        let Some(history) = &self.history else {
            // Nothing to catch up from: every socket in a room may have missed something.
            self.close_rooms(&sockets, &rooms.iter().collect());
            return gaps.settle_all();
        };
        let heads = match history.heads().await {
            Ok(heads) => heads,
            Err(e) => {
                tracing::debug!("catch-up: history unreadable, trying again: {e}");
                return gaps.retry_later();
            }
        };
        if gaps.nothing_missed(&heads) || rooms.is_empty() {
            return gaps.caught_up(&heads);
        }
        let (rooms, beyond) = rooms.split_at(rooms.len().min(MAX_CATCH_UP_ROOMS));
        self.close_rooms(&sockets, &beyond.iter().collect());
        let since = gaps.position();
        let read = if self.remembers_since(gaps.gap_began()) {
            history
                .read_many(rooms, Some(&since), MAX_CATCH_UP_BYTES)
                .await
        } else {
            Ok(None)
        };
        let snapshots = match read {
            Ok(Some(snapshots)) if !snapshots.is_empty() => snapshots,
            Ok(_) => {
                // Too much to read, or what was read does not go together, or the gap is older
                // than the ids this replica remembers: every room's sockets resume instead.
                self.close_rooms(&sockets, &rooms.iter().collect());
                return gaps.caught_up(&heads);
            }
            Err(e) => {
                tracing::debug!("catch-up: history unreadable, trying again: {e}");
                return gaps.retry_later();
            }
        };
        self.hand_out(history, &snapshots, rooms, &since);
        gaps.caught_up(&snapshots);
    }

    /// Closes the sockets of every room here, when `link`'s gap cannot be caught up on now and
    /// a message after it has come.
    pub(super) fn give_up(&self, gaps: &mut Tracker, link: usize) {
        if let Some(io) = self.io.get() {
            let sockets = io.sockets();
            let rooms: Vec<String> = rooms_of(&sockets);
            self.close_rooms(&sockets, &rooms.iter().collect());
        }
        gaps.settle(link);
    }

    /// Replays what `snapshots` hold after `since` that this replica had not taken, to the
    /// sockets of the rooms it covers; closes the sockets of the rooms it does not.
    fn hand_out(
        &self,
        history: &History,
        snapshots: &[Snapshot],
        rooms: &[String],
        since: &Position,
    ) {
        let ttl = history.config().ttl;
        let recovery = recover(snapshots, Some(since), ttl);
        let lost: HashSet<&String> = if recovery.recovered {
            HashSet::new()
        } else {
            complete_rooms(snapshots, since, ttl)
                .into_iter()
                .zip(rooms)
                .filter(|(complete, _)| !complete)
                .map(|(_, room)| room)
                .collect()
        };
        let Some(io) = self.io.get() else { return };
        let sockets = io.sockets();
        // First, so that the closing sockets get none of what follows.
        self.close_rooms(&sockets, &lost);
        let mut replayed = 0;
        for r in recovery.replay {
            match serde_json::from_str::<Message>(&r.json) {
                Ok(msg) if self.first_copy(&msg) => {
                    let size = r.json.len();
                    self.fan_out(Arc::new(Delivered::new(msg, Some(r.position), size)));
                    replayed += 1;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("unreadable history entry: {e}"),
            }
        }
        let caught_up = sockets
            .iter()
            .filter(|s| {
                s.rooms()
                    .iter()
                    .any(|r| rooms.iter().any(|x| x == r.as_ref()))
                    && s.extensions
                        .get::<Arc<Outbox>>()
                        .is_some_and(|o| !o.is_closing())
            })
            .count();
        self.metrics.gap_replayed.inc_by(replayed);
        self.metrics.gap_caught_up.inc_by(caught_up as u64);
        tracing::info!(
            replayed,
            sockets = caught_up,
            rooms_lost = lost.len(),
            "caught up on messages missed from redis"
        );
    }

    /// Whether this replica still remembers every message id taken since `began`, so that
    /// what it did not take can be told apart (see `dedupe`).
    fn remembers_since(&self, began: u64) -> bool {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        !taken.forgot_since(began.saturating_sub(FORGET_MARGIN_MS))
    }

    /// Stops delivery to the sockets in any of `rooms` and closes them, a few at a time, so
    /// that they resume (and are told, by their resume, what the history no longer holds).
    fn close_rooms(&self, sockets: &[Socket], rooms: &HashSet<&String>) {
        if rooms.is_empty() {
            return;
        }
        let doomed: Vec<Socket> = sockets
            .iter()
            .filter(|s| {
                s.rooms()
                    .iter()
                    .any(|r| rooms.iter().any(|x| *x == r.as_ref()))
            })
            .filter(|s| {
                s.extensions
                    .get::<Arc<Outbox>>()
                    .is_some_and(|o| o.mark_closing())
            })
            .cloned()
            .collect();
        if doomed.is_empty() {
            return;
        }
        self.metrics.gap_closed.inc_by(doomed.len() as u64);
        tracing::warn!(
            sockets = doomed.len(),
            "the history does not cover messages missed from redis: closing these sockets so that they resume"
        );
        tokio::spawn(async move {
            let mut doomed = doomed.into_iter().peekable();
            while doomed.peek().is_some() {
                for s in doomed.by_ref().take(CLOSE_BATCH) {
                    close_transport(s);
                }
                tokio::time::sleep(CLOSE_TICK).await;
            }
        });
    }
}

/// The rooms these sockets are in, each once.
/// The rooms these sockets are in, each once, those with the most of them first.
fn rooms_of(sockets: &[Socket]) -> Vec<String> {
    let mut members: HashMap<String, usize> = HashMap::new();
    for room in sockets.iter().flat_map(|s| s.rooms()) {
        *members.entry(room.to_string()).or_default() += 1;
    }
    let mut rooms: Vec<(String, usize)> = members.into_iter().collect();
    rooms.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
    rooms.into_iter().map(|(room, _)| room).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(epoch: u64, seq: u64) -> Stamp {
        Stamp::test(epoch, seq)
    }

    fn head(link: usize, stamp: Stamp) -> Snapshot {
        Snapshot {
            link,
            head: stamp,
            gap: 0,
            rooms: Vec::new(),
            copy: None,
        }
    }

    #[test]
    fn a_skipped_sequence_number_or_a_new_epoch_is_a_gap() {
        let mut t = Tracker::new(2);
        assert!(!t.skips(0, st(7, 5)), "nothing taken yet: where it starts");
        t.advance(0, st(7, 5));
        assert!(!t.skips(0, st(7, 6)));
        assert!(!t.skips(0, st(7, 5)), "a copy of one taken");
        assert!(t.skips(0, st(7, 7)), "6 never came");
        assert!(t.skips(0, st(8, 1)), "the Redis lost what it had after 5");
        assert!(!t.skips(1, st(9, 40)), "links are apart");
        t.advance(0, st(7, 3));
        assert_eq!(t.position(), Position::of([st(7, 5)]), "never back");
    }

    #[test]
    fn the_first_up_is_no_gap_and_later_ones_are() {
        let mut t = Tracker::new(2);
        assert!(!t.up(0));
        assert!(t.up(0));
        assert!(!t.up(1));
    }

    #[test]
    fn a_gap_is_settled_by_the_links_read_only() {
        let mut t = Tracker::new(2);
        t.advance(0, st(7, 5));
        t.advance(1, st(9, 2));
        t.mark(0);
        t.mark(1);
        assert!(t.nothing_missed(&[head(0, st(7, 5)), head(1, st(9, 2))]));
        assert!(!t.nothing_missed(&[head(0, st(7, 5))]), "link 1 not read");
        assert!(!t.nothing_missed(&[head(0, st(7, 6)), head(1, st(9, 2))]));
        assert!(!t.nothing_missed(&[head(0, st(8, 0)), head(1, st(9, 2))]));
        t.caught_up(&[head(0, st(7, 9))]);
        assert!(t.any_pending(), "link 1 still owes its catch-up");
        assert_eq!(t.position(), Position::of([st(7, 9), st(9, 2)]));
        t.retry_later();
        assert!(t.retry_at().is_some());
        t.caught_up(&[head(1, st(9, 4))]);
        assert!(!t.any_pending() && t.retry_at().is_none());
    }
}
