//! What a resuming client gets back, from what each Redis keeps. Pure, so every case is
//! tested here.

use std::{
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

#[derive(Deserialize)]
struct Id<'a> {
    #[serde(borrow)]
    id: &'a str,
}

/// A message in one Redis's history.
#[derive(Debug, Clone)]
struct Entry {
    stamp: Stamp,
    id: String,
    json: String,
}

/// The entries of the snapshot's epoch, once each (a message to two rooms is in both), in
/// sequence order.
fn entries(snapshot: &Snapshot) -> Vec<Entry> {
    let mut by_seq = BTreeMap::new();
    for log in &snapshot.rooms {
        for raw in &log.entries {
            let (stamp, json) = Stamp::decode(raw.as_bytes());
            let Some(stamp) = stamp.filter(|s| s.epoch == snapshot.head.epoch) else {
                continue;
            };
            by_seq.entry(stamp.seq).or_insert_with(|| {
                let json = String::from_utf8_lossy(json).into_owned();
                let id = serde_json::from_str::<Id>(&json)
                    .map(|m| m.id.to_owned())
                    .unwrap_or_default();
                Entry { stamp, id, json }
            });
        }
    }
    by_seq.into_values().collect()
}

/// Decides what to replay to a client at `since`, from the snapshots of the Redis that could
/// be read.
pub fn recover(snapshots: &[Snapshot], since: Option<&Position>, ttl: Duration) -> Recovery {
    let at = |s: &Snapshot| since.and_then(|p| p.get(s.head.epoch));
    let logs: Vec<(Option<Stamp>, Vec<Entry>)> =
        snapshots.iter().map(|s| (at(s), entries(s))).collect();
    // Received before: at or before the client's stamp on any Redis that holds it.
    let covered = |e: &Entry| since.is_some_and(|p| p.covers(e.stamp));
    let mut had: HashSet<&str> = HashSet::new();
    let mut seen = HashSet::new();
    for (_, list) in &logs {
        for e in list {
            seen.insert(e.id.clone());
            if covered(e) {
                had.insert(&e.id);
            }
        }
    }
    let after: Vec<Vec<&Entry>> = logs
        .iter()
        .map(|(_, list)| list.iter().filter(|e| !covered(e)).collect())
        .collect();
    let order = merge(&after, &had);
    let replay = positions(&logs, &after, &had, &order);
    let recovered = since.is_some()
        && snapshots
            .iter()
            .zip(&logs)
            .any(|(s, (v, _))| v.is_some_and(|v| complete_since(s, v, ttl)));
    Recovery {
        replay,
        recovered,
        seen,
        head: Position::of(snapshots.iter().map(|s| s.head)),
    }
}

/// The messages to replay in one order that keeps each Redis's: the longest list first, then
/// each other list's new messages right after the last message before them in that list.
fn merge<'a>(after: &[Vec<&'a Entry>], had: &HashSet<&str>) -> Vec<&'a Entry> {
    let mut lists: Vec<&Vec<&Entry>> = after.iter().collect();
    lists.sort_by_key(|l| std::cmp::Reverse(l.len()));
    let mut out: Vec<&Entry> = Vec::new();
    for list in lists {
        let at: HashMap<&str, usize> = out
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();
        // After which element of `out` each new one goes (None: at the start); never earlier
        // than the one before it, so this list's own order holds.
        let mut inserts: Vec<(Option<usize>, &Entry)> = Vec::new();
        let mut anchor: Option<usize> = None;
        for e in list {
            if had.contains(e.id.as_str()) {
                continue;
            }
            match at.get(e.id.as_str()) {
                Some(&i) => anchor = anchor.max(Some(i)),
                None if inserts.iter().any(|(_, x)| x.id == e.id) => {}
                None => inserts.push((anchor, e)),
            }
        }
        let mut merged = Vec::with_capacity(out.len() + inserts.len());
        let mut pending = inserts.into_iter().peekable();
        while let Some((_, e)) = pending.next_if(|(a, _)| a.is_none()) {
            merged.push(e);
        }
        for (i, e) in out.into_iter().enumerate() {
            merged.push(e);
            while let Some((_, x)) = pending.next_if(|(a, _)| *a == Some(i)) {
                merged.push(x);
            }
        }
        out = merged;
    }
    out
}

/// Each replayed message with the position after it: per Redis, the last stamp up to which
/// the client has every message (received before, or replayed by then).
fn positions(
    logs: &[(Option<Stamp>, Vec<Entry>)],
    after: &[Vec<&Entry>],
    had: &HashSet<&str>,
    order: &[&Entry],
) -> Vec<Replayed> {
    let mut done: HashSet<&str> = had.clone();
    let mut next = vec![0usize; after.len()];
    let mut at: Vec<Option<Stamp>> = logs.iter().map(|(v, _)| *v).collect();
    order
        .iter()
        .map(|e| {
            done.insert(e.id.as_str());
            for (k, list) in after.iter().enumerate() {
                while let Some(x) = list.get(next[k]).filter(|x| done.contains(x.id.as_str())) {
                    at[k] = Some(x.stamp);
                    next[k] += 1;
                }
            }
            Replayed {
                position: Position::of(at.iter().flatten().copied()),
                json: e.json.clone(),
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
}
