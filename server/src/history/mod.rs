//! Room history, so a client that lost its connection can `resume` on any replica.
//!
//! Every room message gets a [`Stamp`]: the history's epoch, a sequence number that grows by one
//! per room message across the whole app, and the time. The stamp is assigned, the message kept
//! in each of its rooms' histories and published on the bus in one step (one Lua script on
//! Redis; one lock in memory), so the bus carries room messages in sequence order and every
//! replica sees them in that order. That is what makes the seam between replay and live
//! messages exact: a socket that read the history up to sequence `H` gets, live, exactly the
//! messages after `H`.
//!
//! On Redis a room's history is a stream `<prefix>#h#<room>` capped at `HISTORY_SIZE` entries
//! and expiring `HISTORY_TTL_SECONDS` after its last message; the epoch and the sequence are
//! the hash `<prefix>#seq`. A new epoch starts whenever that hash is gone (a Redis that lost its
//! data), so offsets from before can never be mistaken for current ones.
//!
//! With several Redis each keeps its own history of what it was sent, with its own epoch and
//! sequence (see `offsets`). A Redis that a replica could not reach while publishing gets a gap
//! mark when it returns, so a resume does not take it alone for complete over that time, and
//! then a copy of another Redis's history, which makes it complete again (see `catch_up`).

mod catch_up;
mod offsets;
mod recovery;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{FromRedisValue, Script, Value as RedisValue};

use crate::{
    bus::{Bus, BusError, Link, Outgoing},
    dedupe::now_ms,
};

pub use catch_up::Progress;
pub use offsets::{MAX_STAMPS, Position, Stamp};
pub use recovery::{Copied, Recovery, Replayed, RoomLog, Snapshot, complete_rooms, recover};

/// `HISTORY_SIZE` and `HISTORY_TTL_SECONDS`.
#[derive(Debug, Clone, Copy)]
pub struct HistoryConfig {
    pub size: usize,
    pub ttl: Duration,
}

/// The histories of this app's rooms.
pub struct History {
    config: HistoryConfig,
    /// Per link of the bus, whether its Redis is caught up (several Redis only, else empty).
    progress: Vec<Arc<Progress>>,
    store: Store,
    reads: tokio::sync::Semaphore,
}

enum Store {
    Memory { bus: Bus, mem: Mutex<Memory> },
    Redis(RedisStore),
}

struct RedisStore {
    bus: Bus,
    keys: Keys,
}

/// The names of the history's keys in Redis.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The hash of the epoch, the sequence, the gap mark and the catch-up record.
    seq: String,
    /// Prefix of each room's stream.
    room: String,
    /// Prefix of each room's copy of another Redis's history (see `catch_up`).
    copy: String,
    /// The lock a catch-up holds.
    lock: String,
    /// Prefix of the keys, in each Redis, that say another one missed messages (see
    /// `catch_up`).
    witness: String,
    /// Whether reads take the copies too: only with several Redis (one has nothing to copy).
    copies: bool,
}

impl Keys {
    fn new(prefix: &str, copies: bool) -> Self {
        Self {
            seq: format!("{prefix}#seq"),
            room: format!("{prefix}#h#"),
            copy: format!("{prefix}#c#"),
            lock: format!("{prefix}#catchup"),
            witness: format!("{prefix}#missed#"),
            copies,
        }
    }

    /// The publish script's KEYS: the sequence hash, then each room's stream.
    fn publish(&self, rooms: &[String]) -> Vec<String> {
        std::iter::once(self.seq.clone())
            .chain(rooms.iter().map(|r| format!("{}{r}", self.room)))
            .collect()
    }

    /// The key that says, in another Redis, that `link`'s Redis missed messages.
    fn witness(&self, link: &Link) -> String {
        format!("{}{}", self.witness, link.display())
    }

    /// The read script's KEYS: the sequence hash and each room's stream, then each room's
    /// copy.
    fn read(&self, rooms: &[String]) -> Vec<String> {
        let mut keys = self.publish(rooms);
        if self.copies {
            keys.extend(rooms.iter().map(|r| format!("{}{r}", self.copy)));
        }
        keys
    }
}

struct Memory {
    epoch: u64,
    seq: u64,
    rooms: HashMap<String, MemoryRoom>,
    swept: Instant,
}

struct MemoryRoom {
    entries: VecDeque<Arc<str>>,
    added: u64,
    expires: Instant,
}

/// Stamps, keeps and publishes one room message. KEYS: the sequence hash, then each room's
/// stream, then the witness key of each other Redis known to be down (see `catch_up`): the
/// message and the record that those Redis missed it are written together. ARGV: channel,
/// message JSON, size, TTL in ms, an epoch to use if none exists, the number of rooms.
const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamped = 's' .. epoch .. '-' .. seq .. '-' .. ms .. '|' .. ARGV[2]
local rooms = tonumber(ARGV[6])
for i = 2, rooms + 1 do
  redis.call('XADD', KEYS[i], 'MAXLEN', ARGV[3], '*', 'm', stamped)
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
for i = rooms + 2, #KEYS do
  redis.call('SET', KEYS[i], ms, 'EX', 604800)
end
redis.call('PUBLISH', ARGV[1], stamped)
return 1
";

/// Lua of the scripts that read histories: `room_log(key, start)` answers {added, kept,
/// entries}: the oldest kept entry, then those from stream id `start` on (`-`: all of them);
/// `counts(key)` is its first half (shared with the catch-up's reads), `kept_from` its second
/// (shared with the copies' read).
const ROOM_LOG: &str = r"
local function kept_from(key, oldest, start)
  local entries = {}
  local from = redis.call('XRANGE', key, start, '+')
  if oldest and (not from[1] or from[1][1] ~= oldest[1]) then entries[1] = oldest[2][2] end
  for _, e in ipairs(from) do entries[#entries + 1] = e[2][2] end
  return entries
end
local function counts(key)
  if redis.call('EXISTS', key) == 0 then return 0, 0 end
  local info = redis.call('XINFO', 'STREAM', key)
  local added, kept = 0, 0
  for j = 1, #info, 2 do
    if info[j] == 'entries-added' then added = info[j + 1] end
    if info[j] == 'length' then kept = info[j + 1] end
  end
  return added, kept
end
local function room_log(key, start)
  local added, kept = counts(key)
  if added == 0 then return {0, 0, {}} end
  return {added, kept, kept_from(key, redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1], start)}
end
";

/// Reads the head and each room's history, and the room's copy of another Redis's history
/// (see `catch_up`). KEYS: the sequence hash, then each room's stream, then (with several Redis)
/// each room's copy.
/// ARGV: an epoch to start if none exists (so a socket that joins before the first message
/// already holds an offset of the epoch that message will have), then the stream id (ms) to
/// read from: only entries from there on are sent (plus the oldest kept one), not the whole
/// history, so that a storm of resumes stays small; then '1' when copies are read too.
/// Returns {epoch, seq, secs, micros, gap, copy record, then per room {added, kept,
/// {entries...}, copy}}; a room's copy is {} (none), {'?'} (left by another catch-up than the
/// record's) or {header, entries...}, read like the room's own stream.
const READ: &str = r"
local function copied(key, start, id)
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 2)
  if not head[1] then return {} end
  local header = head[1][2][2]
  if head[1][1] ~= '0-1' or header:sub(1, #id + 1) ~= id .. ' ' then return {'?'} end
  local out = kept_from(key, head[2], start == '-' and '(0-1' or start)
  table.insert(out, 1, header)
  return out
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local t = redis.call('TIME')
local copy = redis.call('HGET', KEYS[1], 'copy') or ''
local id = copy:match('^([^|]*)|')
local out = {epoch, redis.call('HGET', KEYS[1], 'seq') or '0', t[1], t[2],
  redis.call('HGET', KEYS[1], 'gap') or '0', copy}
local copies = ARGV[3] == '1'
local rooms = copies and (#KEYS - 1) / 2 or #KEYS - 1
for i = 2, rooms + 1 do
  local log = room_log(KEYS[i], ARGV[2])
  log[4] = (copies and id) and copied(KEYS[i + rooms], ARGV[2], id) or {}
  out[#out + 1] = log
end
return out
";

/// How far before a client's offset a read starts (ms). Every Redis is read from the earliest
/// of the offset's stamps minus this: stream ids are each Redis's clock, as the stamps are, so
/// clocks that differ by less than this lose nothing, and the reads also find the copies of
/// what the client had that another Redis brought it first, unless that Redis lagged by more.
const READ_MARGIN_MS: u64 = 10_000;

/// History reads in flight per replica: more wait here, not in Redis's reply queue, where a
/// storm of resumes would make every read (and the link's health check) time out.
const READS_IN_FLIGHT: usize = 32;

/// Rooms per history read when many are read at once (see [`History::read_many`]).
const ROOMS_PER_READ: usize = 100;

/// How often expired rooms are dropped from the in-memory history.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl History {
    /// `None` when `HISTORY_SIZE` is 0 (history off).
    pub fn new(bus: Bus, prefix: &str, config: HistoryConfig) -> Option<Arc<Self>> {
        if config.size == 0 {
            return None;
        }
        // Only several Redis have anything to catch up.
        let progress: Vec<Arc<Progress>> = if bus.is_plural() {
            bus.links().iter().map(|_| Arc::default()).collect()
        } else {
            Vec::new()
        };
        let store = if bus.is_memory() {
            Store::Memory {
                bus,
                mem: Mutex::new(Memory {
                    epoch: new_epoch(),
                    seq: 0,
                    rooms: HashMap::new(),
                    swept: Instant::now(),
                }),
            }
        } else {
            let keys = Keys::new(prefix, bus.is_plural());
            for (me, progress) in progress.iter().enumerate() {
                tokio::spawn(catch_up::tend(
                    bus.clone(),
                    me,
                    keys.clone(),
                    config,
                    progress.clone(),
                ));
            }
            Store::Redis(RedisStore { bus, keys })
        };
        Some(Arc::new(Self {
            config,
            progress,
            store,
            reads: tokio::sync::Semaphore::new(READS_IN_FLIGHT),
        }))
    }

    pub fn config(&self) -> HistoryConfig {
        self.config
    }

    /// Where link `link`'s Redis stands in catching up (see `catch_up`).
    pub fn progress(&self, link: usize) -> Option<&Progress> {
        self.progress.get(link).map(Arc::as_ref)
    }

    /// Stamps `json` (a message for `rooms`), keeps it in each room's history and publishes it
    /// on `chan`, all in one step.
    pub async fn publish(&self, chan: &str, rooms: &[String], json: &str) -> Result<(), BusError> {
        match &self.store {
            Store::Memory { bus, mem } => {
                let mut mem = lock(mem);
                mem.seq += 1;
                let stamp = Stamp {
                    epoch: mem.epoch,
                    seq: mem.seq,
                    ms: now_ms(),
                };
                let entry: Arc<str> = stamp.encode(json).into();
                let now = Instant::now();
                mem.sweep(now);
                for room in rooms {
                    let log = mem.rooms.entry(room.clone()).or_insert_with(|| MemoryRoom {
                        entries: VecDeque::new(),
                        added: 0,
                        expires: now,
                    });
                    log.entries.push_back(entry.clone());
                    while log.entries.len() > self.config.size {
                        log.entries.pop_front();
                    }
                    log.added += 1;
                    log.expires = now + self.config.ttl;
                }
                // Under the lock: the bus then carries messages in sequence order.
                bus.deliver_here(chan.to_owned(), entry.as_bytes().to_vec());
                Ok(())
            }
            Store::Redis(redis) => {
                let mut keys = redis.keys.publish(rooms);
                keys.extend(
                    redis
                        .bus
                        .links()
                        .iter()
                        .filter(|l| redis.bus.is_plural() && !l.is_up())
                        .map(|l| redis.keys.witness(l)),
                );
                let keys: Arc<[String]> = keys.into();
                let args: Arc<[String]> = [
                    chan.to_owned(),
                    json.to_owned(),
                    self.config.size.to_string(),
                    self.config.ttl.as_millis().to_string(),
                    format!("{:x}", new_epoch()),
                    rooms.len().to_string(),
                ]
                .into();
                // Answered once one Redis has it: the others follow in the background.
                redis
                    .bus
                    .publish_first(Outgoing::Script {
                        script: script(&PUBLISH_SCRIPT, &[PUBLISH]),
                        code: PUBLISH,
                        keys,
                        args,
                    })
                    .await
            }
        }
    }

    /// What each Redis that can be read now (or the memory store) holds for `rooms` (from a
    /// little before `since` on); an error when none can.
    pub async fn read(
        &self,
        rooms: &[String],
        since: Option<&Position>,
    ) -> Result<Vec<Snapshot>, BusError> {
        match &self.store {
            Store::Memory { mem, .. } => {
                let mut mem = lock(mem);
                let now = Instant::now();
                mem.sweep(now);
                Ok(vec![Snapshot {
                    link: 0,
                    head: Stamp {
                        epoch: mem.epoch,
                        seq: mem.seq,
                        ms: now_ms(),
                    },
                    gap: 0,
                    copy: None,
                    rooms: rooms
                        .iter()
                        .map(|r| match mem.rooms.get(r) {
                            Some(log) if log.expires > now => RoomLog {
                                added: log.added,
                                kept: log.entries.len() as u64,
                                entries: log.entries.iter().map(|e| e.to_string()).collect(),
                            },
                            _ => RoomLog::default(),
                        })
                        .collect(),
                }])
            }
            Store::Redis(redis) => {
                let _permit = self.reads.acquire().await;
                let start = since
                    .and_then(|p| p.stamps().iter().map(|s| s.ms).min())
                    .map_or_else(
                        || "-".to_owned(),
                        |ms| ms.saturating_sub(READ_MARGIN_MS).to_string(),
                    );
                let reads = redis
                    .bus
                    .each(|link| {
                        let (keys, start) = (&redis.keys, &start);
                        async move { read_link(&link, keys, rooms, start).await }
                    })
                    .await;
                let mut snapshots = Vec::new();
                let mut failure = None;
                for (link, read) in reads.into_iter().enumerate() {
                    match read {
                        Ok(s) => snapshots.push(Snapshot { link, ..s }),
                        Err(e) => failure = failure.or(Some(e)),
                    }
                }
                match failure {
                    Some(e) if snapshots.is_empty() => Err(e),
                    _ => Ok(snapshots),
                }
            }
        }
    }

    /// What [`History::read`] answers for many rooms, read a batch of rooms at a time and put
    /// together as if read at once (each Redis's head is that of its first batch). `None`
    /// when a Redis answered some batches and not others, or restarted in between, or the
    /// entries read pass `max_bytes`; an error when none could be read.
    pub async fn read_many(
        &self,
        rooms: &[String],
        since: Option<&Position>,
        max_bytes: usize,
    ) -> Result<Option<Vec<Snapshot>>, BusError> {
        let mut joined: Vec<Snapshot> = Vec::new();
        let mut bytes = 0;
        for (n, batch) in rooms.chunks(ROOMS_PER_READ).enumerate() {
            let read = self.read(batch, since).await?;
            bytes += read
                .iter()
                .flat_map(|s| {
                    s.rooms
                        .iter()
                        .chain(s.copy.iter().flat_map(|c| c.rooms.iter().flatten()))
                })
                .flat_map(|r| r.entries.iter())
                .map(String::len)
                .sum::<usize>();
            if bytes > max_bytes {
                return Ok(None);
            }
            if n == 0 {
                joined = read;
                continue;
            }
            let same_links = read.len() == joined.len()
                && read
                    .iter()
                    .zip(&joined)
                    .all(|(r, j)| r.link == j.link && r.head.epoch == j.head.epoch);
            if !same_links {
                return Ok(None);
            }
            for (j, r) in joined.iter_mut().zip(read) {
                j.gap = j.gap.max(r.gap);
                j.rooms.extend(r.rooms);
                j.copy = match (j.copy.take(), r.copy) {
                    (Some(mut a), Some(b))
                        if (a.at, a.head.epoch, a.head.seq, a.whole)
                            == (b.at, b.head.epoch, b.head.seq, b.whole) =>
                    {
                        a.rooms.extend(b.rooms);
                        Some(a)
                    }
                    // A catch-up finished between two batches: the copies do not go together.
                    _ => None,
                };
            }
        }
        Ok(Some(joined))
    }

    /// The heads of the sequences, per link that could be read: where a socket that joins now
    /// starts.
    pub async fn heads(&self) -> Result<Vec<Snapshot>, BusError> {
        self.read(&[], None).await
    }
}

static PUBLISH_SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
static READ_SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();

/// The script made of `parts`, built once.
fn script(cell: &'static std::sync::OnceLock<Script>, parts: &[&str]) -> &'static Script {
    cell.get_or_init(|| Script::new(&parts.concat()))
}

/// What one Redis holds for `rooms`, from stream id `start` on (see [`READ`]).
async fn read_link(
    link: &Link,
    keys: &Keys,
    rooms: &[String],
    start: &str,
) -> Result<Snapshot, BusError> {
    let args = [
        format!("{:x}", new_epoch()),
        start.to_owned(),
        if keys.copies { "1" } else { "0" }.to_owned(),
    ];
    let value = link
        .script::<RedisValue>(
            script(&READ_SCRIPT, &[ROOM_LOG, READ]),
            &keys.read(rooms),
            &args,
        )
        .await?
        .unwrap_or(RedisValue::Nil);
    parse_snapshot(value, rooms.len()).ok_or_else(|| {
        BusError::Redis(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected answer to the history read",
        )))
    })
}

impl Memory {
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.swept) >= SWEEP_EVERY {
            self.rooms.retain(|_, log| log.expires > now);
            self.swept = now;
        }
    }
}

fn parse_snapshot(value: RedisValue, rooms: usize) -> Option<Snapshot> {
    let RedisValue::Array(items) = value else {
        return None;
    };
    let mut items = items.into_iter();
    let mut text = || String::from_redis_value(items.next()?).ok();
    let epoch = text()?;
    let seq = text()?.parse().ok()?;
    let secs: u64 = text()?.parse().ok()?;
    let micros: u64 = text()?.parse().ok()?;
    let gap = text()?.parse().ok()?;
    let record = text()?;
    let head = Stamp {
        epoch: u64::from_str_radix(&epoch, 16).ok()?,
        seq,
        ms: secs * 1000 + micros / 1000,
    };
    let mut logs = Vec::with_capacity(rooms);
    let mut copies = Vec::with_capacity(rooms);
    for item in items {
        let (added, kept, entries, copy) =
            <(u64, u64, Vec<String>, Vec<String>)>::from_redis_value(item).ok()?;
        logs.push(RoomLog {
            added,
            kept,
            entries,
        });
        copies.push(catch_up::parse_room(copy));
    }
    (logs.len() == rooms).then_some(Snapshot {
        link: 0, // set by the caller
        head,
        gap,
        rooms: logs,
        copy: catch_up::parse_record(&record, head.ms, copies),
    })
}

fn lock(mem: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
    mem.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random epoch, never 0 (0 means "none yet").
fn new_epoch() -> u64 {
    rand::random::<u64>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    #[tokio::test]
    async fn memory_history_keeps_size_per_room_and_publishes_in_order() {
        let bus = Bus::memory();
        let mut rx = bus.subscribe_channel("c".into()).await;
        let h = History::new(bus, "p", HistoryConfig { size: 2, ttl: TTL }).expect("on");
        for n in 0..3 {
            h.publish(
                "c",
                &["a".into(), "b".into()],
                &format!(r#"{{"id":"m{n}","n":{n}}}"#),
            )
            .await
            .expect("memory");
        }
        let mut published = Vec::new();
        while !rx.is_empty() {
            let item = rx.recv_message().await.expect("queued");
            published.push(Stamp::decode(&item.payload).0.expect("stamped").seq);
        }
        assert_eq!(published, vec![1, 2, 3]);
        let snaps = h
            .read(&["a".into(), "z".into()], None)
            .await
            .expect("memory");
        let [snap] = &snaps[..] else {
            panic!("one snapshot: {snaps:?}")
        };
        assert_eq!(snap.head.seq, 3);
        assert_eq!(snap.rooms[0].added, 3);
        assert_eq!(snap.rooms[0].entries.len(), 2);
        assert_eq!(snap.rooms[1], RoomLog::default());
        let r = recover(&snaps, Some(&Position::of([snap.head])), TTL);
        assert!(r.replay.is_empty() && r.recovered);
    }
}
