//! What a Redis that returns gets, with several Redis: a gap mark, then a catch-up.
//!
//! A Redis that a replica could not reach while publishing missed messages: that replica marks
//! a gap in it when it is back (see [`GAP`]). A Redis that restarted empty starts a new epoch.
//! Either way it holds less history than the others, and alone it could not answer a resume
//! for that time. So once it is back, one replica copies another Redis's history into it:
//! per room, the entries as that Redis keeps them (with that Redis's stamps), in a list beside
//! the room's own stream, under a record of where the copy began in this Redis's own sequence.
//! A resume that finds only this Redis then reads the copy for the time before and its own
//! history after (see `recovery`).
//!
//! A replica that publishes while a Redis is known to be down also leaves a witness of it in
//! each Redis that takes the message, in the same script: so when the Redis returns, any
//! replica marks the gap, even if the one that missed it is gone by then.
//!
//! A catch-up is due when the Redis never had one (a new epoch) or when a gap was marked after
//! the last one began. One replica at a time runs it, under a lock in that Redis renewed with
//! every batch; the others see it done at their next check. Copies expire like the history.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::Value as RedisValue;

use super::{
    HistoryConfig, Keys, READ_MARGIN_MS, ROOM_LOG, RoomLog, Stamp, read_link, recovery::Copied,
    script,
};
use crate::bus::{Bus, BusError, Link, LinkState, OP_TIMEOUT, PING_INTERVAL};

/// Marks a gap: the sequence moves on by one and the gap is there, so only a client that has a
/// later message of this Redis counts it as complete. KEYS: the sequence hash. Nothing to mark
/// in a Redis without history (a new epoch starts with its first message). Allowed in a full
/// Redis: a Redis that refused a message for want of memory must still learn it missed it.
const GAP: &str = r"#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'gap', redis.call('HINCRBY', KEYS[1], 'seq', 1))
end
return 1
";

/// Deletes a witness if it still says what was read (a newer one stays). KEYS: the witness.
/// ARGV: what was read.
const DROP_WITNESS: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// 1 when a catch-up is due. KEYS: the sequence hash.
const DUE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'caught', 'gap')
if not h[1] or tonumber(h[2] or '0') > tonumber(h[1]) then return 1 end
return 0
";

/// Takes the lock and answers where the copy begins in this Redis's own sequence (nil when
/// another replica holds the lock). The old record goes first: until this copy is complete,
/// none counts. KEYS: the sequence hash, the lock. ARGV: token, lock ms, an epoch to start if
/// none exists.
const BEGIN: &str = r"
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return nil end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3])
redis.call('HDEL', KEYS[1], 'copy')
local t = redis.call('TIME')
return {redis.call('HGET', KEYS[1], 'epoch'), redis.call('HGET', KEYS[1], 'seq') or '0',
  t[1], t[2]}
";

/// The next rooms of the Redis copied from. ARGV: SCAN cursor, pattern, count.
const ROOMS: &str = r"
return redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3], 'TYPE', 'stream')
";

/// Reads rooms of the Redis copied from, in order, until about ARGV[1] bytes are read (at
/// least one entry, so any entry gets through). ARGV: the byte budget, then per room its key
/// and the id of the last entry already read ('' for none: then its counts come too).
/// Returns per room read {key, added, kept, {id, entry, id, entry...}, 1 when the room is
/// done}; rooms after the budget ran out are not in the answer.
const CHUNK: &str = r"
local budget = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  if budget <= 0 then break end
  local key, last = ARGV[i], ARGV[i + 1]
  local added, kept = 0, 0
  if last == '' then added, kept = counts(key) end
  local start = last == '' and '-' or '(' .. last
  local entries, done = {}, 0
  while budget > 0 do
    local batch = redis.call('XRANGE', key, start, '+', 'COUNT', 64)
    local taken = 0
    for _, e in ipairs(batch) do
      entries[#entries + 1] = e[1]
      entries[#entries + 1] = e[2][2]
      budget = budget - #e[1] - #e[2][2]
      start = '(' .. e[1]
      taken = taken + 1
      if budget <= 0 then break end
    end
    if taken == #batch and #batch < 64 then done = 1 break end
  end
  out[#out + 1] = {key, added, kept, entries, done}
end
return out
";

/// Writes what was read, while the lock is still this replica's (and renews it). KEYS: the
/// lock, then each room's copy. ARGV: token, TTL ms, lock ms, then per room its header ('' to
/// go on with a copy begun), its number of entries, and each entry's id and value. A copy is a
/// stream: the header at id 0-1, then the entries at the ids they had where they come from.
/// Returns 0 when the lock was lost.
const COPY: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local i = 4
for k = 2, #KEYS do
  local header, n = ARGV[i], tonumber(ARGV[i + 1])
  if header ~= '' then
    redis.call('DEL', KEYS[k])
    redis.call('XADD', KEYS[k], '0-1', 'h', header)
  end
  for j = i + 2, i + 2 * n, 2 do
    redis.call('XADD', KEYS[k], ARGV[j], 'm', ARGV[j + 1])
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[2])
  i = i + 2 + 2 * n
end
return 1
";

/// Records the copy and releases the lock; 0 (and nothing recorded) when the lock was lost or
/// the Redis restarted meanwhile. KEYS: the sequence hash, the lock. ARGV: token, epoch the
/// copy began in, record, sequence number the copy began at. An empty record only releases.
const FINISH: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[3] == '' or redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'copy', ARGV[3], 'caught', ARGV[4])
return 1
";

static GAP_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static DUE_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static WITNESS_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static DROP_WITNESS_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static BEGIN_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static ROOMS_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static CHUNK_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static COPY_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static FINISH_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();

/// How long the lock holds without a batch renewing it: a replica that dies mid-copy only
/// delays the next catch-up by this much.
const LOCK_MS: u64 = 30_000;
/// Keys per SCAN of the Redis copied from.
const SCAN_COUNT: usize = 100;
/// Bytes per read of the Redis copied from (and per write of the copy), so that neither Redis
/// is held for long nor a command comes near its timeout, and this replica holds at most this
/// much (plus one entry) of a catch-up at a time.
const CHUNK_BYTES: usize = 1 << 20;
/// How long a catch-up waits after it began before reading the other Redis: a publish that
/// missed this Redis before the copy began (its gap mark came first) and was acknowledged has
/// reached the other Redis by then.
const IN_FLIGHT: Duration = Duration::from_millis(OP_TIMEOUT.as_millis() as u64 + 500);

/// Where one Redis stands, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct Progress {
    /// True when the last check found no catch-up due (and the link up).
    caught_up: AtomicBool,
    /// Catch-ups this replica completed.
    done: AtomicU64,
}

impl Progress {
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// Why a catch-up stopped short.
#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("{0}")]
    Bus(#[from] BusError),
    #[error("unexpected answer from redis to {0}")]
    Answer(&'static str),
    #[error("another replica took over the catch-up")]
    LostLock,
    #[error("the Redis copied from restarted during the copy")]
    SourceRestarted,
}

/// Tends link `me` of the bus for as long as the process runs: marks gaps this replica left in
/// it, and catches it up when that is due.
pub(super) async fn tend(
    bus: Bus,
    me: usize,
    keys: Keys,
    config: HistoryConfig,
    progress: Arc<Progress>,
) {
    let link = bus.links()[me].clone();
    let mut state = link.state();
    // A catch-up that keeps failing (a full Redis) is logged once per cause, not every second.
    let mut last_failure = None;
    loop {
        // Checked on every change of the link and every second while it is up: a write that
        // Redis refused (a full Redis) leaves the link up, and other replicas mark gaps too.
        let up = *state.borrow_and_update() == LinkState::Connected;
        let caught_up = up && {
            mark_gap(&link, &keys).await;
            take_witnesses(&bus, &link, &keys).await;
            check(&bus, &link, &keys, config, &progress, &mut last_failure).await
        };
        progress.caught_up.store(caught_up, Ordering::Relaxed);
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
    }
}

/// Marks the gap this replica left in `link`'s Redis, if it missed a message for it.
async fn mark_gap(link: &Link, keys: &Keys) {
    if link.take_missed() && !gap(link, keys).await {
        link.note_missed();
    }
}

/// Marks a gap in `link`'s Redis for each witness another Redis holds of it, then drops the
/// witness (a witness stays until its gap is marked).
async fn take_witnesses(bus: &Bus, link: &Link, keys: &Keys) {
    let witness = [keys.witness(link)];
    for other in bus
        .links()
        .iter()
        .filter(|l| l.is_up() && l.display() != link.display())
    {
        let Ok(Some(Some(seen))) = other
            .script::<Option<String>>(
                script(&WITNESS_SCRIPT, &["return redis.call('GET', KEYS[1])"]),
                &witness,
                &[],
            )
            .await
        else {
            continue;
        };
        if gap(link, keys).await {
            let _ = other
                .script::<i64>(
                    script(&DROP_WITNESS_SCRIPT, &[DROP_WITNESS]),
                    &witness,
                    &[seen],
                )
                .await;
        }
    }
}

/// Marks a gap in `link`'s Redis; false when it could not.
async fn gap(link: &Link, keys: &Keys) -> bool {
    match link
        .script::<RedisValue>(
            script(&GAP_SCRIPT, &[GAP]),
            std::slice::from_ref(&keys.seq),
            &[],
        )
        .await
    {
        Ok(_) => {
            tracing::info!(redis = %link.display(), "marked a gap in this Redis's history");
            true
        }
        Err(e) => {
            tracing::debug!(redis = %link.display(), "could not mark a gap yet: {e}");
            false
        }
    }
}

/// Whether `link`'s Redis is caught up; runs the catch-up when it is due and another Redis
/// is up to copy from.
async fn check(
    bus: &Bus,
    link: &Link,
    keys: &Keys,
    config: HistoryConfig,
    progress: &Progress,
    last_failure: &mut Option<String>,
) -> bool {
    let due = link
        .script::<i64>(
            script(&DUE_SCRIPT, &[DUE]),
            std::slice::from_ref(&keys.seq),
            &[],
        )
        .await;
    match due {
        Ok(Some(0)) => return true,
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(redis = %link.display(), "could not check the history: {e}");
            return false;
        }
    }
    let Some(source) = bus
        .links()
        .iter()
        .find(|l| l.is_up() && l.display() != link.display())
    else {
        return false;
    };
    match catch_up(link, source, keys, config).await {
        Ok(Some(rooms)) => {
            progress.done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                redis = %link.display(),
                from = %source.display(),
                rooms,
                "caught up this Redis's history"
            );
        }
        Ok(None) => {} // another replica is at it
        Err(e) => {
            let cause = e.to_string();
            if last_failure.as_ref() != Some(&cause) {
                tracing::warn!(redis = %link.display(), from = %source.display(), "catch-up stopped, retried every second: {cause}");
            }
            *last_failure = Some(cause);
            return false;
        }
    }
    *last_failure = None;
    false
}

/// Copies `source`'s history into `target`; the number of rooms copied, or `None` when
/// another replica holds the lock.
async fn catch_up(
    target: &Link,
    source: &Link,
    keys: &Keys,
    config: HistoryConfig,
) -> Result<Option<usize>, CatchUpError> {
    let token = format!("{:x}", rand::random::<u64>());
    let lock_keys = [keys.seq.clone(), keys.lock.clone()];
    let begun = target
        .script::<Option<(String, u64, u64, u64)>>(
            script(&BEGIN_SCRIPT, &[BEGIN]),
            &lock_keys,
            &[
                token.clone(),
                LOCK_MS.to_string(),
                format!("{:x}", super::new_epoch()),
            ],
        )
        .await?
        .ok_or(CatchUpError::Answer("the catch-up's start"))?;
    let Some((epoch, seq, secs, micros)) = begun else {
        return Ok(None);
    };
    let at = Stamp {
        epoch: u64::from_str_radix(&epoch, 16).map_err(|_| CatchUpError::Answer("the epoch"))?,
        seq,
        ms: secs * 1000 + micros / 1000,
    };
    let copied = copy_rooms(target, source, keys, config, &token, &at.offset()).await;
    let record = match &copied {
        Ok(c) => format!("{}|{}|{}|{}", at.offset(), c.head.offset(), c.gap, c.whole),
        Err(_) => String::new(),
    };
    let finished = target
        .script::<i64>(
            script(&FINISH_SCRIPT, &[FINISH]),
            &lock_keys,
            &[token, format!("{:x}", at.epoch), record, at.seq.to_string()],
        )
        .await;
    let rooms = copied?.rooms;
    match finished? {
        Some(1) => Ok(Some(rooms)),
        _ => Err(CatchUpError::LostLock),
    }
}

/// What a copy holds: the other Redis's head and gap mark once every room was read, its last
/// sequence number before the first was, and the number of rooms.
struct Copy {
    head: Stamp,
    gap: u64,
    whole: u64,
    rooms: usize,
}

/// A room being read: its key, and the id of the last entry read ('' for none yet).
type Cursor = (String, String);

/// Copies every room of `source` into `target`, chunk by chunk, each room's copy headed by `id`
/// (where the copy began).
async fn copy_rooms(
    target: &Link,
    source: &Link,
    keys: &Keys,
    config: HistoryConfig,
    token: &str,
    id: &str,
) -> Result<Copy, CatchUpError> {
    tokio::time::sleep(IN_FLIGHT).await;
    let before = read_link(source, keys, &[], "-").await?;
    let pattern = format!("{}*", glob_escape(&keys.room));
    let ttl = config.ttl.as_millis().to_string();
    let mut scan = "0".to_owned();
    let mut rooms = 0;
    loop {
        let (next, found) = source
            .script::<(String, Vec<String>)>(
                script(&ROOMS_SCRIPT, &[ROOMS]),
                &[],
                &[scan, pattern.clone(), SCAN_COUNT.to_string()],
            )
            .await?
            .ok_or(CatchUpError::Answer("the rooms' scan"))?;
        let mut pending: Vec<Cursor> = found.into_iter().map(|k| (k, String::new())).collect();
        rooms += pending.len();
        // Also when nothing was found: every batch renews the lock.
        loop {
            let read = if pending.is_empty() {
                Vec::new()
            } else {
                read_chunk(source, &pending).await?
            };
            let mut copy_keys = vec![keys.lock.clone()];
            let mut args = vec![token.to_owned(), ttl.clone(), LOCK_MS.to_string()];
            let mut left: Vec<Cursor> = pending.split_off(read.len().min(pending.len()));
            for ((key, last), (_, added, kept, entries, done)) in pending.into_iter().zip(read) {
                let Some(room) = key.strip_prefix(&keys.room) else {
                    continue;
                };
                copy_keys.push(format!("{}{room}", keys.copy));
                args.push(if last.is_empty() {
                    format!("{id} {added} {kept}")
                } else {
                    String::new()
                });
                args.push((entries.len() / 2).to_string());
                let next_last = entries.iter().rev().nth(1).cloned();
                args.extend(entries);
                if done == 0 {
                    // Goes on from its last entry read, before the rooms not read yet.
                    left.insert(0, (key, next_last.unwrap_or(last)));
                }
            }
            let written = target
                .script::<i64>(script(&COPY_SCRIPT, &[COPY]), &copy_keys, &args)
                .await?;
            if written != Some(1) {
                return Err(CatchUpError::LostLock);
            }
            pending = left;
            if pending.is_empty() {
                break;
            }
        }
        scan = next;
        if scan == "0" {
            break;
        }
    }
    let after = read_link(source, keys, &[], "-").await?;
    if after.head.epoch != before.head.epoch {
        return Err(CatchUpError::SourceRestarted);
    }
    Ok(Copy {
        head: after.head,
        gap: after.gap,
        whole: before.head.seq,
        rooms,
    })
}

/// One read of [`CHUNK`]: per room read, (key, added, kept, ids and entries, done).
async fn read_chunk(
    source: &Link,
    rooms: &[Cursor],
) -> Result<Vec<(String, u64, u64, Vec<String>, u8)>, CatchUpError> {
    let mut args = vec![CHUNK_BYTES.to_string()];
    for (key, last) in rooms {
        args.push(key.clone());
        args.push(last.clone());
    }
    source
        .script(script(&CHUNK_SCRIPT, &[ROOM_LOG, CHUNK]), &[], &args)
        .await?
        .ok_or(CatchUpError::Answer("the rooms' read"))
}

/// A string matched literally by a SCAN pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A room's copy as the read script answers it: `Some(default)` when the copied Redis had no
/// history for the room, `None` when the copy is not the recorded one's.
pub(super) fn parse_room(copy: Vec<String>) -> Option<RoomLog> {
    let mut items = copy.into_iter();
    let Some(header) = items.next() else {
        return Some(RoomLog::default());
    };
    let mut fields = header.split(' ').skip(1);
    let added = fields.next()?.parse().ok()?;
    let kept = fields.next()?.parse().ok()?;
    Some(RoomLog {
        added,
        kept,
        entries: items.collect(),
    })
}

/// The copy recorded in a Redis (`at|head|gap|whole`, empty when none), with its rooms as read
/// at `read_ms`. A room missing from the copy may be a copy that expired: it is judged by the
/// read's time, moved on by the margin that covers clocks differing between Redis.
pub(super) fn parse_record(
    record: &str,
    read_ms: u64,
    rooms: Vec<Option<RoomLog>>,
) -> Option<Copied> {
    let mut parts = record.split('|');
    let at = Stamp::parse_offset(parts.next()?)?;
    let head = Stamp::parse_offset(parts.next()?)?;
    let gap = parts.next()?.parse().ok()?;
    let whole = parts.next()?.parse().ok()?;
    Some(Copied {
        at,
        head: Stamp {
            ms: read_ms + READ_MARGIN_MS,
            ..head
        },
        gap,
        whole,
        rooms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_room_copies_parse_as_written() {
        let at = Stamp {
            epoch: 9,
            seq: 4,
            ms: 100,
        };
        let head = Stamp {
            epoch: 7,
            seq: 20,
            ms: 90,
        };
        let record = format!("{}|{}|3|18", at.offset(), head.offset());
        let rooms = vec![
            parse_room(vec![]),
            parse_room(vec!["?".into()]),
            parse_room(vec![
                format!("{} 12 2", at.offset()),
                "a".into(),
                "b".into(),
            ]),
        ];
        let copied = parse_record(&record, 500, rooms).expect("a record");
        assert_eq!(copied.at, at);
        assert_eq!(
            copied.head,
            Stamp {
                ms: 500 + READ_MARGIN_MS,
                ..head
            }
        );
        assert_eq!((copied.gap, copied.whole), (3, 18));
        assert_eq!(copied.rooms[0], Some(RoomLog::default()));
        assert_eq!(copied.rooms[1], None);
        assert_eq!(
            copied.rooms[2],
            Some(RoomLog {
                added: 12,
                kept: 2,
                entries: vec!["a".into(), "b".into()],
            })
        );
        assert_eq!(parse_record("", 500, vec![]), None);
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
