//! Gaps: messages a Redis carried that never reached this replica, because its link was down,
//! or the queue from Redis overflowed (`BUS_BACKLOG_BYTES`), or a message arrived whose
//! sequence number skipped some. The sockets must not miss them silently.
//!
//! The delivery loop notices a gap before it hands out anything that came after it, and then,
//! still in the loop (live messages wait in the queue meanwhile), catches up: it reads the
//! history of every room this replica has members in, and of messages to every socket ([`ALL`]),
//! from where the replica stood, and hands out what it had not taken, in order, exactly as live
//! messages are (a socket in the middle of a `join` or `resume` holds them and drops what its
//! own read covered; one whose `join` or `resume` stood past a message does not get it). What
//! the replica had taken is dropped by message id, so nothing reaches a socket twice. The
//! sockets of a room whose history does not reach back to the gap (trimmed, expired, a Redis
//! that lost its data, history off) get nothing more and have their transports closed, a few at
//! a time, so that they resume and are told what is lost.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::{ALL, Delivered, Delivery, Message, Outbox, Socket, close_transport};
use crate::{
    dedupe::Take,
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

/// Where this replica stands on each link, and which links owe it a catch-up.
pub(super) struct Tracker {
    /// Per link: the last stamp taken.
    at: Vec<Option<Stamp>>,
    /// Per link: the head when the link first came up, where the replica stands until it
    /// takes a message (never handed out as a socket's position: messages before it may still
    /// be on their way).
    base: Vec<Option<Stamp>>,
    /// Per link: came up at least once.
    was_up: Vec<bool>,
    /// Per link: a gap not caught up yet.
    pending: Vec<bool>,
    /// When to try again after a catch-up that could not read every pending link.
    retry_at: Option<Instant>,
}

impl Tracker {
    pub(super) fn new(links: usize) -> Self {
        Self {
            at: vec![None; links],
            base: vec![None; links],
            was_up: vec![false; links],
            pending: vec![false; links],
            retry_at: None,
        }
    }

    /// Where the replica stands: the last stamp taken from each link. A socket that got the
    /// latest message stands there.
    pub(super) fn position(&self) -> Position {
        Position::of(self.at.iter().flatten().copied())
    }

    /// Where the replica stands for a catch-up: on links it took nothing from yet, their head
    /// when they came up.
    fn standing(&self) -> Position {
        Position::of(
            self.at
                .iter()
                .zip(&self.base)
                .filter_map(|(at, base)| at.or(*base)),
        )
    }

    fn last(&self, link: usize) -> Option<Stamp> {
        self.at
            .get(link)
            .copied()
            .flatten()
            .or(self.base.get(link).copied().flatten())
    }

    /// Whether `stamp`, just arrived from `link`, shows that messages before it never came.
    pub(super) fn skips(&self, link: usize, stamp: Stamp) -> bool {
        match self.last(link) {
            Some(last) if last.epoch == stamp.epoch => stamp.seq > last.seq + 1,
            // A Redis that lost its data: what it had after `last` is gone with it.
            Some(_) => true,
            None => false,
        }
    }

    /// Takes `stamp` from `link` (never moving back within an epoch).
    pub(super) fn advance(&mut self, link: usize, stamp: Stamp) {
        if let Some(slot) = self.at.get_mut(link) {
            match slot {
                Some(last) if last.epoch == stamp.epoch && last.seq >= stamp.seq => {}
                _ => *slot = Some(stamp),
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
                match self.last(link) {
                    Some(at) => at.epoch == head.epoch && at.seq >= head.seq,
                    None => head.seq == 0,
                }
            })
    }

    /// The links read are caught up to their heads; the others stay pending and are tried
    /// again shortly.
    fn caught_up(&mut self, heads: &[Snapshot]) {
        for s in heads {
            self.settle(s.link);
            self.advance(s.link, s.head);
        }
        self.retry_at = None;
        if self.any_pending() {
            self.retry_later();
        }
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
        if gaps.last(link).is_some() {
            return;
        }
        if let Ok(heads) = history.heads().await
            && let Some(s) = heads.iter().find(|s| s.link == link)
            && let Some(base) = gaps.base.get_mut(link)
        {
            *base = Some(s.head);
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
        let Some(history) = &self.history else {
            // Nothing to catch up from: any socket may have missed something.
            self.close(&sockets, &Lost::All);
            return gaps.settle_all();
        };
        let heads = match history.heads().await {
            Ok(heads) => heads,
            Err(e) => {
                tracing::debug!("catch-up: history unreadable, trying again: {e}");
                return gaps.retry_later();
            }
        };
        if gaps.nothing_missed(&heads) {
            return gaps.caught_up(&heads);
        }
        let rooms = rooms_of(&sockets);
        let (rooms, beyond) = rooms.split_at(rooms.len().min(MAX_CATCH_UP_ROOMS));
        self.close(
            &sockets,
            &Lost::Rooms(beyond.iter().map(String::as_str).collect()),
        );
        let since = gaps.standing();
        let snapshots = match history
            .read_many(rooms, Some(&since), MAX_CATCH_UP_BYTES)
            .await
        {
            Ok(Some(snapshots)) if !snapshots.is_empty() => snapshots,
            Ok(_) => {
                // Too much to read, or what was read does not go together: every socket
                // resumes instead.
                self.close(&sockets, &Lost::All);
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

    /// Closes every socket here, when `link`'s gap cannot be caught up on now and a message
    /// after it has come.
    pub(super) fn give_up(&self, gaps: &mut Tracker, link: usize) {
        if let Some(io) = self.io.get() {
            self.close(&io.sockets(), &Lost::All);
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
        let lost: HashSet<&str> = if recovery.recovered {
            HashSet::new()
        } else {
            complete_rooms(snapshots, since, ttl)
                .into_iter()
                .zip(rooms)
                .filter(|(complete, _)| !complete)
                .map(|(_, room)| room.as_str())
                .collect()
        };
        let Some(io) = self.io.get() else { return };
        let sockets = io.sockets();
        // First, so that the closing sockets get none of what follows.
        self.close(&sockets, &Lost::of(lost));
        // What a later read of the batch held goes no further than the first read's heads:
        // the rest comes live, in its order with the messages of other rooms.
        let heads = heads_of(snapshots);
        let mut replayed = 0;
        for r in recovery.replay {
            if heads.get(&r.stamp.epoch).is_some_and(|h| r.stamp.seq > *h) {
                continue;
            }
            let msg = match serde_json::from_str::<Message>(&r.json) {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!("unreadable history entry: {e}");
                    continue;
                }
            };
            match self.take_copy(&msg) {
                Take::New => {
                    let position = (!msg.rooms.is_empty()).then_some(r.position);
                    let size = r.json.len();
                    let mut d = Delivered::new(msg, position, size);
                    d.stamp = Some(r.stamp);
                    d.caught_up = true;
                    self.fan_out(Arc::new(d));
                    replayed += 1;
                }
                Take::Taken => {}
                // Counted as taken by a forgotten message of its publisher: whether this
                // replica handed it out cannot be told, so its sockets resume instead.
                Take::TooLate => self.close(&io.sockets(), &Lost::rooms_of(&msg)),
            }
        }
        let read: HashSet<&str> = rooms.iter().map(String::as_str).collect();
        let caught_up = sockets
            .iter()
            .filter(|s| {
                s.rooms().iter().any(|r| read.contains(r.as_ref()))
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
            "caught up on messages missed from redis"
        );
    }

    /// Stops delivery to the sockets `lost` names and closes their transports, a few at a
    /// time, so that they resume (and are told, by their resume, what the history no longer
    /// holds).
    fn close(&self, sockets: &[Socket], lost: &Lost) {
        if lost.is_empty() {
            return;
        }
        let doomed: Vec<Socket> = sockets
            .iter()
            .filter(|s| lost.names(s))
            .filter(|s| {
                s.extensions
                    .get::<Arc<Outbox>>()
                    .is_some_and(|o| o.start_closing())
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

/// The sockets whose messages a gap may have lost for good.
enum Lost<'a> {
    /// Every socket: a message to all of them may be among the lost.
    All,
    /// The members of these rooms (the rooms' names; [`ALL`] among them stands for every
    /// socket).
    Rooms(HashSet<&'a str>),
}

impl<'a> Lost<'a> {
    fn of(rooms: HashSet<&'a str>) -> Self {
        if rooms.contains(ALL) {
            Lost::All
        } else {
            Lost::Rooms(rooms)
        }
    }

    fn rooms_of(msg: &'a Message) -> Self {
        if msg.rooms.is_empty() {
            Lost::All
        } else {
            Lost::of(msg.rooms.iter().map(String::as_str).collect())
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Lost::Rooms(rooms) if rooms.is_empty())
    }

    fn names(&self, s: &Socket) -> bool {
        match self {
            Lost::All => true,
            Lost::Rooms(rooms) => s.rooms().iter().any(|r| rooms.contains(r.as_ref())),
        }
    }
}

/// Each epoch's head in what was read (a Redis's own, or the Redis a copy came from).
fn heads_of(snapshots: &[Snapshot]) -> HashMap<u64, u64> {
    let mut heads = HashMap::new();
    for s in snapshots {
        heads.insert(s.head.epoch, s.head.seq);
        if let Some(c) = &s.copy {
            heads.entry(c.head.epoch).or_insert(c.head.seq);
        }
    }
    heads
}

/// The history of messages to every socket, read with the rooms in every catch-up, and the
/// rooms these sockets are in, each once, those with the most of them first.
fn rooms_of(sockets: &[Socket]) -> Vec<String> {
    let mut members: HashMap<String, usize> = HashMap::new();
    for room in sockets.iter().flat_map(|s| s.rooms()) {
        *members.entry(room.to_string()).or_default() += 1;
    }
    let mut rooms: Vec<(String, usize)> = members.into_iter().collect();
    rooms.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
    std::iter::once(ALL.to_owned())
        .chain(rooms.into_iter().map(|(room, _)| room))
        .collect()
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
        // Before taking anything, a link's head when it came up stands in for it.
        t.base[1] = Some(st(9, 40));
        assert!(t.skips(1, st(9, 42)) && !t.skips(1, st(9, 41)));
        assert_eq!(t.position(), Position::of([st(7, 5)]), "not handed out");
        assert_eq!(t.standing(), Position::of([st(7, 5), st(9, 40)]));
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
