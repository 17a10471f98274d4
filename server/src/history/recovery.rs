//! What a resuming client gets back, from what each Redis keeps. Pure, so every case is
//! tested here.
//!
//! A Redis that returned after missing messages holds, besides its own history, a copy of
//! another Redis's history taken when it returned (see `catch_up`). The copy is one more list
//! of messages, in the other Redis's order and with its stamps; and the copy, followed by this
//! Redis's own history from the moment the copy began, can make a client complete even when the
//! Redis the copy came from is gone.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use serde::Deserialize;

use super::offsets::{Position, Stamp};

/// What one Redis (or the memory store) holds for a `resume`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Which link of the bus it was read from.
    pub link: usize,
    /// The current epoch and last sequence number; `ms` is the time of the read.
    pub head: Stamp,
    /// The last sequence number marking a gap (0: none): messages published around it may be
    /// missing here, because this Redis was unreachable for a publisher.
    pub gap: u64,
    pub rooms: Vec<RoomLog>,
    /// The last complete copy of another Redis's history, if this one caught up.
    pub copy: Option<Copied>,
}

/// Another Redis's history as this one copied it when it returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    /// This Redis's own stamp when the copy began: its own history holds what came after.
    pub at: Stamp,
    /// The other Redis's head when the copy ended; `ms` is the time of this read, because a
    /// room missing from the copy may be a copy that expired.
    pub head: Stamp,
    /// The other Redis's gap mark when the copy ended.
    pub gap: u64,
    /// The other Redis's last sequence number when the copy began: rooms were copied one after
    /// the other, so only up to here does the copy hold every room's messages, and a position
    /// never moves past it on the copy's account.
    pub whole: u64,
    /// Per room, what was copied; `None` when not known (a copy left by another catch-up).
    pub rooms: Vec<Option<RoomLog>>,
}

impl Snapshot {
    /// The same snapshot of room `i` alone.
    fn room(&self, i: usize) -> Snapshot {
        Snapshot {
            link: self.link,
            head: self.head,
            gap: self.gap,
            rooms: self.rooms.get(i).cloned().into_iter().collect(),
            copy: self.copy.as_ref().map(|c| Copied {
                at: c.at,
                head: c.head,
                gap: c.gap,
                whole: c.whole,
                rooms: vec![c.rooms.get(i).cloned().flatten()],
            }),
        }
    }
}

impl Copied {
    /// The copy read like a snapshot of the Redis it came from.
    fn as_snapshot(&self, link: usize) -> Snapshot {
        Snapshot {
            link,
            head: self.head,
            gap: self.gap,
            rooms: self
                .rooms
                .iter()
                .map(|r| r.clone().unwrap_or_default())
                .collect(),
            copy: None,
        }
    }

    /// A copy's messages up to where it is whole are behind a client that has no stamp of the
    /// copied Redis but stood on the holding Redis (`own`) after the copy began: they came
    /// before it joined. Only the copy's own entries are skipped so; a message that is also in
    /// a Redis's own history is decided there.
    fn behind(&self, own: &Snapshot, since: &Position) -> Option<u64> {
        let stood = since.get(own.head.epoch)?;
        (since.get(self.head.epoch).is_none()
            && self.at.epoch == stood.epoch
            && stood.seq >= self.at.seq)
            .then_some(self.whole)
    }

    /// Whether the copy and then this Redis's own history hold everything after `since`.
    fn complete_since(&self, own: &Snapshot, since: &Position, ttl: Duration) -> bool {
        self.rooms.iter().all(Option::is_some)
            && self.at.epoch == own.head.epoch
            && since
                .get(self.head.epoch)
                .is_some_and(|v| complete_since(&self.as_snapshot(own.link), v, ttl))
            && complete_since(own, self.at, ttl)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoomLog {
    /// Messages ever added while the history existed (0: it does not exist).
    pub added: u64,
    /// Messages kept now.
    pub kept: u64,
    /// Kept entries, oldest first, as encoded by [`Stamp::encode`]: the oldest kept one, then
    /// those from a little before the client's offset (all of them without one).
    pub entries: Vec<String>,
}

/// One message to replay, with the position the client stands at once it has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub position: Position,
    /// The message's stamp in the list it was placed from.
    pub stamp: Stamp,
    pub json: String,
}

#[derive(Debug, PartialEq)]
pub struct Recovery {
    /// What the client missed, each message once; each Redis's order is kept.
    pub replay: Vec<Replayed>,
    /// False when messages may have been missed that are no longer kept anywhere readable.
    pub recovered: bool,
    /// Every message id the histories hold for these rooms: the replay covers a live copy of
    /// any of them (or the client had it before).
    pub seen: HashSet<String>,
    /// The heads read: where the client stands after the replay.
    pub head: Position,
}

/// What recovery reads of a message: its id, and its publishing replica and that replica's
/// clock (absent in messages of older versions).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    o: Option<u64>,
    t: Option<u64>,
}

/// A message in one Redis's history, borrowed from what was read.
#[derive(Debug, Clone)]
struct Entry<'a> {
    stamp: Stamp,
    id: Cow<'a, str>,
    /// The publishing replica and when it published, by its own clock.
    origin: Option<(u64, u64)>,
    json: &'a str,
}

impl Entry<'_> {
    /// Whether this message goes before `other` (or with it) where only time can tell: by the
    /// publishing replica's clock when both come from the same replica (so one publisher's
    /// order holds whatever the Redis clocks say), else by the Redis clocks.
    fn not_after(&self, other: &Entry) -> bool {
        match (self.origin, other.origin) {
            (Some((o, t)), Some((p, u))) if o == p && t != u => t < u,
            _ => self.stamp.ms <= other.stamp.ms,
        }
    }
}

/// The entries of `epoch` in these rooms' logs, once each (a message to two rooms is in both),
/// in sequence order.
fn entries<'a>(epoch: u64, rooms: impl Iterator<Item = &'a RoomLog>) -> Vec<Entry<'a>> {
    let mut by_seq = BTreeMap::new();
    for log in rooms {
        for raw in &log.entries {
            let (stamp, rest) = Stamp::decode(raw.as_bytes());
            let Some(stamp) = stamp.filter(|s| s.epoch == epoch) else {
                continue;
            };
            // The JSON follows an ASCII '|': a suffix of the entry, on a character boundary.
            let json = &raw[raw.len() - rest.len()..];
            by_seq.entry(stamp.seq).or_insert_with(|| {
                let (id, origin) = serde_json::from_str::<Head>(json)
                    .map(|m| (m.id, m.o.zip(m.t)))
                    .unwrap_or_default();
                Entry {
                    stamp,
                    id,
                    origin,
                    json,
                }
            });
        }
    }
    by_seq.into_values().collect()
}

/// One list of messages to replay from: a Redis's own history, or a copy it holds.
struct List<'a> {
    /// The client's stamp of the list's epoch.
    since: Option<Stamp>,
    entries: Vec<Entry<'a>>,
    /// How far the list may move a position (a copy: see [`Copied::whole`]).
    cap: Option<u64>,
    /// Up to here the list is behind the client (see [`Copied::behind`]).
    behind: Option<u64>,
}

/// Decides what to replay to a client at `since`, from the snapshots of the Redis that could
/// be read.
pub fn recover(snapshots: &[Snapshot], since: Option<&Position>, ttl: Duration) -> Recovery {
    // Each Redis's own history, then the copies they hold of others'.
    let logs: Vec<List> = snapshots
        .iter()
        .map(|s| List {
            since: since.and_then(|p| p.get(s.head.epoch)),
            entries: entries(s.head.epoch, s.rooms.iter()),
            cap: None,
            behind: None,
        })
        .chain(snapshots.iter().filter_map(|s| {
            let c = s.copy.as_ref()?;
            Some(List {
                since: since.and_then(|p| p.get(c.head.epoch)),
                entries: entries(c.head.epoch, c.rooms.iter().flatten()),
                cap: Some(c.whole),
                behind: since.and_then(|p| c.behind(s, p)),
            })
        }))
        .collect();
    // Received before: at or before the client's stamp on any Redis that holds it.
    let covered = |e: &Entry| since.is_some_and(|p| p.covers(e.stamp));
    let mut had: HashSet<&str> = HashSet::new();
    let mut seen = HashSet::new();
    for list in &logs {
        for e in &list.entries {
            if !seen.contains(e.id.as_ref()) {
                seen.insert(e.id.to_string());
            }
            if covered(e) {
                had.insert(&e.id);
            }
        }
    }
    let after: Vec<Vec<&Entry>> = logs
        .iter()
        .map(|list| {
            list.entries
                .iter()
                .filter(|e| !covered(e) && list.behind.is_none_or(|w| e.stamp.seq > w))
                .collect()
        })
        .collect();
    let order = merge(&after, &had);
    let replay = positions(&logs, &after, &had, &order);
    let recovered = since.is_some_and(|p| complete(snapshots, p, ttl));
    Recovery {
        replay,
        recovered,
        seen,
        head: Position::of(snapshots.iter().map(|s| s.head)),
    }
}

/// Whether one of the snapshots (or a copy it holds) has everything its rooms got after
/// `since`.
fn complete(snapshots: &[Snapshot], since: &Position, ttl: Duration) -> bool {
    snapshots.iter().any(|s| {
        since
            .get(s.head.epoch)
            .is_some_and(|v| complete_since(s, v, ttl))
            || s.copy
                .as_ref()
                .is_some_and(|c| c.complete_since(s, since, ttl))
    })
}

/// Per room, in the snapshots' order, whether what was read holds everything the room got
/// after `since` (what [`Recovery::recovered`] says of all the rooms together).
pub fn complete_rooms(snapshots: &[Snapshot], since: &Position, ttl: Duration) -> Vec<bool> {
    let rooms = snapshots.first().map_or(0, |s| s.rooms.len());
    (0..rooms)
        .map(|i| {
            let one: Vec<Snapshot> = snapshots.iter().map(|s| s.room(i)).collect();
            complete(&one, since, ttl)
        })
        .collect()
}

/// The messages to replay in one order that keeps each Redis's: the longest list first, then
/// each other list's new messages between the messages it shares with those placed before
/// (its anchors). Between two anchors, or where a list shares none, new messages go by their
/// time (see [`Entry::not_after`]).
fn merge<'a, 'b>(after: &[Vec<&'a Entry<'b>>], had: &HashSet<&str>) -> Vec<&'a Entry<'b>> {
    let mut lists: Vec<&Vec<&Entry>> = after.iter().collect();
    lists.sort_by_key(|l| std::cmp::Reverse(l.len()));
    let mut out: Vec<&Entry> = Vec::new();
    for list in lists {
        let at: HashMap<&str, usize> = out
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_ref(), i))
            .collect();
        // Each new message with the first slot of `out` it may take (after its last anchor)
        // and the last (before its next anchor).
        let mut new: Vec<(usize, usize, &Entry)> = Vec::new();
        let mut queued: HashSet<&str> = HashSet::new();
        let mut anchor: Option<usize> = None;
        for e in list.iter().filter(|e| !had.contains(e.id.as_ref())) {
            match at.get(e.id.as_ref()) {
                Some(&i) => {
                    for n in new.iter_mut().rev().take_while(|n| n.1 == usize::MAX) {
                        n.1 = i;
                    }
                    anchor = anchor.max(Some(i));
                }
                None if !queued.insert(e.id.as_ref()) => {}
                None => new.push((anchor.map_or(0, |i| i + 1), usize::MAX, e)),
            }
        }
        // Never before the message placed before it, so this list's own order holds.
        let mut slots: Vec<(usize, &Entry)> = Vec::with_capacity(new.len());
        let mut floor = 0;
        for (lo, hi, e) in new {
            let from = lo.max(floor);
            let to = hi.min(out.len()).max(from);
            let slot = from + out[from..to].iter().take_while(|x| x.not_after(e)).count();
            slots.push((slot, e));
            floor = slot;
        }
        let mut merged = Vec::with_capacity(out.len() + slots.len());
        let mut pending = slots.into_iter().peekable();
        for (i, e) in out.into_iter().enumerate() {
            while let Some((_, x)) = pending.next_if(|(slot, _)| *slot <= i) {
                merged.push(x);
            }
            merged.push(e);
        }
        merged.extend(pending.map(|(_, x)| x));
        out = merged;
    }
    out
}

/// Each replayed message with the position after it: per Redis, the last stamp up to which
/// the client has every message (received before, or replayed by then).
fn positions(
    logs: &[List],
    after: &[Vec<&Entry>],
    had: &HashSet<&str>,
    order: &[&Entry],
) -> Vec<Replayed> {
    let mut done: HashSet<&str> = had.clone();
    let mut next = vec![0usize; after.len()];
    let mut at: Vec<Option<Stamp>> = logs.iter().map(|l| l.since).collect();
    order
        .iter()
        .map(|e| {
            done.insert(e.id.as_ref());
            for (k, list) in after.iter().enumerate() {
                while let Some(x) = list.get(next[k]).filter(|x| done.contains(x.id.as_ref())) {
                    if logs[k].cap.is_none_or(|cap| x.stamp.seq <= cap) {
                        at[k] = Some(x.stamp);
                    }
                    next[k] += 1;
                }
            }
            Replayed {
                position: Position::of(at.iter().flatten().copied()),
                stamp: e.stamp,
                json: e.json.to_owned(),
            }
        })
        .collect()
}

/// Whether this Redis alone holds everything its rooms got after `since` (same epoch, no gap
/// since, nothing trimmed or expired that came after it).
fn complete_since(snapshot: &Snapshot, since: Stamp, ttl: Duration) -> bool {
    let head = snapshot.head;
    let current = |entry: &String| {
        let (stamp, _) = Stamp::decode(entry.as_bytes());
        stamp.filter(|s| s.epoch == head.epoch)
    };
    since.epoch == head.epoch
        && snapshot.gap <= since.seq
        && snapshot.rooms.iter().all(|log| {
            if log.added == 0 {
                // No history: the room had no message for the TTL. A message after `since`
                // would have kept it alive, unless `since` itself is older than the TTL.
                return head.ms.saturating_sub(since.ms) < ttl.as_millis() as u64;
            }
            let stale = log.entries.iter().any(|e| current(e).is_none());
            let first = log.entries.iter().find_map(current);
            let trimmed = log.added > log.kept;
            // Trimmed entries are older than the first kept one; an entry of an older epoch
            // still kept means nothing of this epoch was trimmed.
            !trimmed || stale || first.is_some_and(|f| since.seq + 1 >= f.seq)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    /// A stamp of Redis `epoch`; message numbers differ from sequence numbers on purpose.
    fn st(epoch: u64, seq: u64) -> Stamp {
        Stamp {
            epoch,
            seq,
            ms: 1_000_000 + seq,
        }
    }

    fn stamp(seq: u64) -> Stamp {
        st(7, seq)
    }

    /// Message `n` kept on Redis `epoch` at `seq`.
    fn kept(epoch: u64, seq: u64, n: u64) -> String {
        st(epoch, seq).encode(&format!(r#"{{"id":"m{n}","n":{n}}}"#))
    }

    fn log(added: u64, seqs: &[u64]) -> RoomLog {
        RoomLog {
            added,
            kept: seqs.len() as u64,
            entries: seqs.iter().map(|s| kept(7, *s, *s)).collect(),
        }
    }

    fn snapshot(head: u64, rooms: Vec<RoomLog>) -> Snapshot {
        Snapshot {
            link: 0,
            head: stamp(head),
            gap: 0,
            rooms,
            copy: None,
        }
    }

    fn at(s: Stamp) -> Position {
        Position::of([s])
    }

    /// The message numbers replayed.
    fn ns(r: &Recovery) -> Vec<u64> {
        r.replay
            .iter()
            .map(|x| {
                let v: serde_json::Value = serde_json::from_str(&x.json).expect("json");
                v["n"].as_u64().expect("n")
            })
            .collect()
    }

    #[test]
    fn replays_what_came_after_since_once_and_in_order() {
        // Message 3 went to both rooms.
        let snap = snapshot(6, vec![log(4, &[1, 3, 4, 6]), log(2, &[2, 3])]);
        let r = recover(&[snap], Some(&at(stamp(2))), TTL);
        assert_eq!(ns(&r), vec![3, 4, 6]);
        assert!(r.recovered);
        assert_eq!(r.replay[0].json, r#"{"id":"m3","n":3}"#);
        // with one Redis, each message's position is its own stamp
        let offsets: Vec<String> = r.replay.iter().map(|x| x.position.offset()).collect();
        assert_eq!(
            offsets,
            [3, 4, 6].map(|s| stamp(s).offset()).to_vec(),
            "positions"
        );
        assert_eq!(r.head, at(stamp(6)));
        assert_eq!(r.seen.len(), 5);
    }

    #[test]
    fn trimmed_history_is_recovered_only_when_since_reaches_it() {
        // Ten added, 5..=9 kept (among other rooms' sequence numbers).
        let snap = snapshot(9, vec![log(10, &[5, 6, 7, 8, 9])]);
        let snaps = [snap];
        assert!(recover(&snaps, Some(&at(stamp(4))), TTL).recovered);
        assert!(recover(&snaps, Some(&at(stamp(7))), TTL).recovered);
        let r = recover(&snaps, Some(&at(stamp(3))), TTL);
        assert!(!r.recovered, "message 4 may have been trimmed");
        assert_eq!(ns(&r), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn completeness_per_room_names_the_room_trimmed_past_since() {
        // Room 0 kept 8-10 of 10 (6 and 7 trimmed), room 1 all it got; the client is at 5.
        let snaps = [snapshot(10, vec![log(10, &[8, 9, 10]), log(2, &[6, 9])])];
        let since = at(stamp(5));
        assert!(!recover(&snaps, Some(&since), TTL).recovered);
        assert_eq!(complete_rooms(&snaps, &since, TTL), [false, true]);
        assert_eq!(complete_rooms(&snaps, &at(stamp(7)), TTL), [true, true]);
        // Another epoch (the Redis lost its data): nothing is complete.
        assert_eq!(complete_rooms(&snaps, &at(st(8, 5)), TTL), [false, false]);
    }

    #[test]
    fn a_read_from_near_since_is_complete_when_nothing_was_trimmed() {
        // Ten kept of ten added; the read sent the oldest and those from near since.
        let mut room = log(10, &[1, 8, 9, 10]);
        room.kept = 10;
        let r = recover(
            &[snapshot(10, vec![room.clone()])],
            Some(&at(stamp(7))),
            TTL,
        );
        assert_eq!(ns(&r), vec![8, 9, 10]);
        assert!(r.recovered);
        // Twelve added, ten kept from 3 on: since 7 is still covered.
        room.added = 12;
        room.entries[0] = kept(7, 3, 3);
        assert!(recover(&[snapshot(12, vec![room])], Some(&at(stamp(7))), TTL).recovered);
    }

    #[test]
    fn an_expired_room_is_recovered_only_within_the_ttl() {
        let mut snap = snapshot(9, vec![RoomLog::default()]);
        snap.head.ms = stamp(5).ms + 1000;
        assert!(recover(&[snap.clone()], Some(&at(stamp(5))), TTL).recovered);
        snap.head.ms = stamp(5).ms + TTL.as_millis() as u64 + 1;
        assert!(!recover(&[snap], Some(&at(stamp(5))), TTL).recovered);
    }

    #[test]
    fn another_epoch_replays_everything_kept_and_is_not_recovered() {
        let snaps = [snapshot(3, vec![log(3, &[1, 2, 3])])];
        let r = recover(&snaps, Some(&at(st(6, 100))), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3]);
        assert!(!r.recovered);
        let r = recover(&snaps, None, TTL);
        assert_eq!(ns(&r), vec![1, 2, 3]);
        assert!(
            !r.recovered,
            "no offset: the client cannot know what it missed"
        );
    }

    #[test]
    fn entries_of_an_older_epoch_are_never_replayed() {
        let old = st(6, 50).encode(r#"{"id":"old"}"#);
        let snap = snapshot(
            3,
            vec![RoomLog {
                added: 60,
                kept: 3,
                entries: vec![old, kept(7, 2, 2), kept(7, 3, 3)],
            }],
        );
        let r = recover(&[snap], Some(&at(stamp(1))), TTL);
        assert_eq!(ns(&r), vec![2, 3]);
        assert!(r.recovered, "nothing of this epoch was trimmed");
    }

    /// Two Redis, epochs 7 (A) and 9 (B), with their own sequence numbers.
    fn two(a: &[(u64, u64)], b: &[(u64, u64)]) -> [Snapshot; 2] {
        let side = |epoch: u64, list: &[(u64, u64)]| Snapshot {
            link: (epoch == 9).into(),
            head: st(epoch, list.iter().map(|x| x.0).max().unwrap_or(0)),
            gap: 0,
            rooms: vec![RoomLog {
                added: list.len() as u64,
                kept: list.len() as u64,
                entries: list.iter().map(|(s, n)| kept(epoch, *s, *n)).collect(),
            }],
            copy: None,
        };
        [side(7, a), side(9, b)]
    }

    #[test]
    fn with_two_redis_a_message_received_on_either_is_not_replayed() {
        // Messages 1..=5 on both, in the same order, at other sequence numbers.
        let snaps = two(
            &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
            &[(21, 1), (22, 2), (23, 3), (24, 4), (25, 5)],
        );
        // The client had 3 from A while B's copy of 2 had not come yet.
        let since = Position::of([st(7, 13), st(9, 21)]);
        let r = recover(&snaps, Some(&since), TTL);
        assert_eq!(ns(&r), vec![4, 5]);
        assert!(r.recovered);
        // after 4, the client has everything up to 4 on both
        assert_eq!(r.replay[0].position, Position::of([st(7, 14), st(9, 24)]));
        assert_eq!(r.head, Position::of([st(7, 15), st(9, 25)]));
    }

    #[test]
    fn with_two_redis_what_one_missed_comes_from_the_other_in_order() {
        // A was down for messages 3 and 4; B for message 6.
        let snaps = two(
            &[(11, 1), (12, 2), (13, 5), (14, 6), (15, 7)],
            &[(21, 1), (22, 2), (23, 3), (24, 4), (25, 5), (26, 7)],
        );
        let since = Position::of([st(7, 11), st(9, 21)]);
        let r = recover(&snaps, Some(&since), TTL);
        assert_eq!(ns(&r), vec![2, 3, 4, 5, 6, 7]);
        // Each position claims only what the client has by then.
        let after_3 = &r.replay[1].position;
        assert!(after_3.covers(st(9, 23)) && !after_3.covers(st(9, 24)));
        assert!(after_3.covers(st(7, 12)) && !after_3.covers(st(7, 13)));
        // only from A: nothing of B's is claimed past 5 until 7
        let after_6 = &r.replay[4].position;
        assert!(after_6.covers(st(7, 14)) && !after_6.covers(st(9, 26)));
    }

    #[test]
    fn with_one_redis_readable_the_other_positions_are_ignored() {
        // B is down: only A is read, and the client's B stamp does not hide anything on A.
        let [a, _] = two(&[(11, 1), (12, 2), (13, 3)], &[]);
        let since = Position::of([st(7, 11), st(9, 99)]);
        let r = recover(&[a], Some(&since), TTL);
        assert_eq!(ns(&r), vec![2, 3]);
        assert!(r.recovered);
    }

    #[test]
    fn a_gap_after_since_makes_that_redis_incomplete() {
        let [mut a, b] = two(&[(11, 1), (13, 4)], &[(21, 1), (22, 2), (23, 3), (24, 4)]);
        a.gap = 12; // A missed something around 12 (messages 2 and 3)
        let since = Position::of([st(7, 11), st(9, 21)]);
        assert!(
            recover(&[a.clone()], Some(&since), TTL)
                .recovered
                .eq(&false)
        );
        let r = recover(&[a.clone(), b], Some(&since), TTL);
        assert!(r.recovered, "B has them");
        assert_eq!(ns(&r), vec![2, 3, 4]);
        // a gap before since does not matter
        let since = Position::of([st(7, 12)]);
        assert!(recover(&[a], Some(&since), TTL).recovered);
    }

    #[test]
    fn messages_ordered_differently_on_two_redis_are_replayed_once() {
        // Two publishers' messages 2 and 3 crossed: A has 2 then 3, B has 3 then 2.
        let snaps = two(
            &[(11, 1), (12, 2), (13, 3), (14, 4)],
            &[(21, 1), (22, 3), (23, 2), (24, 5)],
        );
        let since = Position::of([st(7, 11), st(9, 21)]);
        let r = recover(&snaps, Some(&since), TTL);
        let mut got = ns(&r);
        assert_eq!(got.len(), 4, "{got:?}");
        got.sort_unstable();
        assert_eq!(got, vec![2, 3, 4, 5]);
    }

    /// Redis B (epoch 9) returned empty at its sequence `at` and copied A's (epoch 7) history
    /// of one room: `copied` as (seq on A, message); its own history since is `own`.
    fn returned(at: u64, copied: &[(u64, u64)], own: &[(u64, u64)]) -> Snapshot {
        let [a, mut b] = two(copied, own);
        b.head.seq = b.head.seq.max(at);
        b.copy = Some(Copied {
            at: st(9, at),
            head: a.head,
            gap: 0,
            whole: a.head.seq,
            rooms: a.rooms.into_iter().map(Some).collect(),
        });
        b
    }

    #[test]
    fn a_returned_redis_with_a_copy_is_complete_alone() {
        // The client had message 1 (A's 11) before B restarted empty. B copied A's 11..=15
        // (messages 1 to 5, of which 4 and 5 also reached B itself after it came back), then
        // got 6 when A was gone.
        let b = returned(
            0,
            &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
            &[(1, 4), (2, 5), (3, 6)],
        );
        let since = Position::of([st(7, 11), st(8, 40)]);
        let r = recover(std::slice::from_ref(&b), Some(&since), TTL);
        assert_eq!(ns(&r), vec![2, 3, 4, 5, 6], "in order, each once");
        assert!(r.recovered);
        // Positions claim A's stamps through the copy, and B's own.
        let after_5 = &r.replay[3].position;
        assert!(after_5.covers(st(7, 15)) && after_5.covers(st(9, 2)));
        assert!(!after_5.covers(st(9, 3)));
        assert_eq!(r.head, Position::of([b.head]));
        // A client that had everything up to 5 gets 6 alone.
        let since = Position::of([st(7, 15), st(9, 2)]);
        let r = recover(&[b], Some(&since), TTL);
        assert_eq!(ns(&r), vec![6]);
        assert!(r.recovered);
    }

    #[test]
    fn a_copy_counts_only_when_nothing_is_missing_around_it() {
        let b = returned(2, &[(11, 1), (12, 2), (13, 3)], &[(1, 2), (2, 3), (3, 4)]);
        let since = Position::of([st(7, 11)]);
        assert!(recover(std::slice::from_ref(&b), Some(&since), TTL).recovered);
        let mut gap_after = b.clone();
        gap_after.gap = 3; // a replica missed B after the copy began
        assert!(!recover(&[gap_after], Some(&since), TTL).recovered);
        let mut source_gap = b.clone();
        if let Some(c) = source_gap.copy.as_mut() {
            c.gap = 12; // A itself had missed something after the client's 11
        }
        assert!(!recover(&[source_gap], Some(&since), TTL).recovered);
        let mut unknown = b.clone();
        if let Some(c) = unknown.copy.as_mut() {
            c.rooms[0] = None;
        }
        assert!(!recover(&[unknown], Some(&since), TTL).recovered);
        let mut trimmed = b.clone();
        if let Some(c) = trimmed.copy.as_mut() {
            // A had trimmed what came after 11: it kept 13 alone.
            c.rooms[0] = Some(RoomLog {
                added: 5,
                kept: 1,
                entries: vec![kept(7, 13, 3)],
            });
        }
        assert!(!recover(&[trimmed], Some(&since), TTL).recovered);
        let mut other_epoch = b.clone();
        if let Some(c) = other_epoch.copy.as_mut() {
            c.at.epoch = 5; // B restarted again since the copy
        }
        assert!(!recover(&[other_epoch], Some(&since), TTL).recovered);
        // A client with no stamp of the copied Redis gains nothing from the copy.
        assert!(!recover(&[b], Some(&Position::of([st(8, 1)])), TTL).recovered);
    }

    #[test]
    fn lists_that_share_no_message_are_merged_by_time() {
        // A's copy holds 1..=3; B got 4 and 5 after the copy, with nothing in common.
        let b = returned(0, &[(11, 1), (12, 2), (13, 3)], &[(14, 4), (15, 5)]);
        let since = Position::of([st(7, 10)]);
        let r = recover(std::slice::from_ref(&b), Some(&since), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3, 4, 5]);
        // and the other way round: the longer list is the later one
        let b = returned(0, &[(11, 1), (12, 2)], &[(13, 3), (14, 4), (15, 5)]);
        let r = recover(std::slice::from_ref(&b), Some(&since), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_copy_moves_positions_only_as_far_as_it_is_whole() {
        // The copy holds A's 11..=15, but rooms were read one after the other from A's 13 on:
        // past 13 it may lack a message of another room.
        let mut b = returned(0, &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)], &[]);
        if let Some(c) = b.copy.as_mut() {
            c.whole = 13;
        }
        let since = Position::of([st(7, 10)]);
        let r = recover(&[b], Some(&since), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3, 4, 5]);
        let claimed: Vec<Option<u64>> = r
            .replay
            .iter()
            .map(|x| x.position.get(7).map(|s| s.seq))
            .collect();
        assert_eq!(claimed, [11, 12, 13, 13, 13].map(Some).to_vec());
    }

    /// Message `n` of publishing replica `origin` at its time `t`, kept on Redis `epoch`.
    fn from_replica(epoch: u64, seq: u64, ms: u64, n: u64, origin: u64, t: u64) -> String {
        Stamp { epoch, seq, ms }.encode(&format!(r#"{{"id":"m{n}","n":{n},"o":{origin},"t":{t}}}"#))
    }

    #[test]
    fn one_publishers_messages_keep_its_order_whatever_the_redis_clocks_say() {
        // A's copy holds 1 and 2 of replica 5, B (its clock 3 s behind A's) got 3 and 4 after:
        // nothing in common, and by the Redis clocks 3 and 4 would come first.
        // (seq, Redis ms, message, the replica's ms) on Redis `epoch`
        let room = |epoch: u64, list: [(u64, u64, u64, u64); 2]| RoomLog {
            added: 2,
            kept: 2,
            entries: list
                .iter()
                .map(|&(seq, ms, n, t)| from_replica(epoch, seq, ms, n, 5, t))
                .collect(),
        };
        let copied = room(7, [(11, 5_000, 1, 100), (12, 5_010, 2, 110)]);
        let own = room(9, [(1, 2_020, 3, 120), (2, 2_030, 4, 130)]);
        let b = Snapshot {
            link: 1,
            head: st(9, 2),
            gap: 0,
            rooms: vec![own],
            copy: Some(Copied {
                at: st(9, 0),
                head: st(7, 12),
                gap: 0,
                whole: 12,
                rooms: vec![Some(copied)],
            }),
        };
        let r = recover(&[b], Some(&Position::of([st(7, 10)])), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_copy_is_behind_a_client_that_joined_the_holding_redis_after_it() {
        // B, frozen around its 15, copied A's 11..=13 at its own 20, then got 4 and 5 (A also
        // had 4). A client that joined B at 21 while A was down has no stamp of A: the copy is
        // behind it.
        let mut b = returned(20, &[(11, 1), (12, 2), (13, 3)], &[(21, 4), (22, 5)]);
        b.gap = 15;
        let since = Position::of([st(9, 21)]);
        let r = recover(std::slice::from_ref(&b), Some(&since), TTL);
        assert_eq!(ns(&r), vec![5]);
        assert!(r.recovered);
        // One that left B before the copy began gets the copy, and is told it may miss more.
        let since = Position::of([st(9, 1)]);
        let r = recover(std::slice::from_ref(&b), Some(&since), TTL);
        assert_eq!(ns(&r), vec![1, 2, 3, 4, 5]);
        assert!(!r.recovered);
        // Past where the copy is whole, its messages are decided as any other.
        let mut b = returned(20, &[(11, 1), (12, 2), (13, 3)], &[(21, 4)]);
        if let Some(c) = b.copy.as_mut() {
            c.whole = 12;
        }
        let r = recover(&[b], Some(&Position::of([st(9, 21)])), TTL);
        assert_eq!(ns(&r), vec![3]);
    }
}
