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

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use redis::{FromRedisValue, Script, Value as RedisValue};

use crate::bus::{Bus, BusError};

/// `HISTORY_SIZE` and `HISTORY_TTL_SECONDS`.
#[derive(Debug, Clone, Copy)]
pub struct HistoryConfig {
    pub size: usize,
    pub ttl: Duration,
}

/// Where a room message sits in the app's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
    /// When it was stamped, in ms since the Unix epoch (Redis' clock, or this process').
    pub ms: u64,
}

impl Stamp {
    /// The offset clients receive and hand back to `resume`; opaque to them.
    pub fn offset(&self) -> String {
        format!("{:x}-{}-{}", self.epoch, self.seq, self.ms)
    }

    pub fn parse_offset(offset: &str) -> Option<Stamp> {
        let mut parts = offset.splitn(3, '-');
        let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
        let seq = parts.next()?.parse().ok()?;
        let ms = parts.next()?.parse().ok()?;
        Some(Stamp { epoch, seq, ms })
    }

    /// A stamped message as it travels on the bus and sits in a history:
    /// `s<offset>|<message JSON>`. Unstamped messages are their JSON alone.
    pub fn encode(&self, json: &str) -> String {
        format!("s{}|{json}", self.offset())
    }

    /// Splits a bus payload or history entry into its stamp (if any) and message JSON.
    pub fn decode(payload: &[u8]) -> (Option<Stamp>, &[u8]) {
        let Some(rest) = payload.strip_prefix(b"s") else {
            return (None, payload);
        };
        let Some(bar) = rest.iter().position(|b| *b == b'|') else {
            return (None, payload);
        };
        let stamp = std::str::from_utf8(&rest[..bar])
            .ok()
            .and_then(Stamp::parse_offset);
        match stamp {
            Some(stamp) => (Some(stamp), &rest[bar + 1..]),
            None => (None, payload),
        }
    }
}

/// What `resume` reads: the current head of the sequence and, per room asked for, what is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The current epoch and last sequence number; `ms` is the time of the read.
    pub head: Stamp,
    pub rooms: Vec<RoomLog>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoomLog {
    /// Messages ever added while the history existed (0: it does not exist).
    pub added: u64,
    /// The kept entries, oldest first, as encoded by [`Stamp::encode`].
    pub entries: Vec<String>,
}

/// What a client that last received `since` gets back.
#[derive(Debug, PartialEq)]
pub struct Recovery {
    /// Entries after `since`, each once, in sequence order.
    pub replay: Vec<(Stamp, String)>,
    /// False when messages may have been missed that are no longer kept.
    pub recovered: bool,
}

/// Decides what to replay. Pure, so every case is tested below.
pub fn recover(snapshot: &Snapshot, since: Option<Stamp>, ttl: Duration) -> Recovery {
    let head = snapshot.head;
    let current = |entry: &String| {
        let (stamp, _) = Stamp::decode(entry.as_bytes());
        stamp.filter(|s| s.epoch == head.epoch)
    };
    let after = since.filter(|s| s.epoch == head.epoch).map_or(0, |s| s.seq);
    let mut replay = BTreeMap::new();
    for log in &snapshot.rooms {
        for entry in &log.entries {
            if let Some(stamp) = current(entry)
                && stamp.seq > after
            {
                let (_, json) = Stamp::decode(entry.as_bytes());
                replay
                    .entry(stamp.seq)
                    .or_insert_with(|| (stamp, String::from_utf8_lossy(json).into_owned()));
            }
        }
    }
    let recovered = since.is_some_and(|since| {
        since.epoch == head.epoch
            && snapshot.rooms.iter().all(|log| {
                if log.added == 0 {
                    // No history: the room had no message for the TTL. A message after `since`
                    // would have kept it alive, unless `since` itself is older than the TTL.
                    return head.ms.saturating_sub(since.ms) < ttl.as_millis() as u64;
                }
                let stale = log.entries.iter().any(|e| current(e).is_none());
                let first = log.entries.iter().find_map(current);
                let trimmed = log.added > log.entries.len() as u64;
                // Trimmed entries are older than the first kept one; an entry of an older
                // epoch still kept means nothing of this epoch was trimmed.
                !trimmed || stale || first.is_some_and(|f| since.seq + 1 >= f.seq)
            })
    });
    Recovery {
        replay: replay.into_values().collect(),
        recovered,
    }
}

/// The histories of this app's rooms.
pub struct History {
    config: HistoryConfig,
    store: Store,
}

enum Store {
    Memory { bus: Bus, mem: Mutex<Memory> },
    Redis(RedisStore),
}

struct RedisStore {
    bus: Bus,
    seq_key: String,
    room_prefix: String,
}

impl RedisStore {
    /// A script's KEYS: the sequence hash, then each room's stream.
    fn keys(&self, rooms: &[String]) -> Vec<String> {
        std::iter::once(self.seq_key.clone())
            .chain(rooms.iter().map(|r| format!("{}{r}", self.room_prefix)))
            .collect()
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
/// stream. ARGV: channel, message JSON, size, TTL in ms, an epoch to use if none exists.
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
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], 'MAXLEN', ARGV[3], '*', 'm', stamped)
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], stamped)
return 1
";

/// Reads the head and each room's history. KEYS: the sequence hash, then each room's stream.
/// ARGV: an epoch to start if none exists (so a socket that joins before the first message
/// already holds an offset of the epoch that message will have).
/// Returns {epoch, seq, secs, micros, then per room {added, {entries...}}}.
const READ: &str = r"
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local t = redis.call('TIME')
local out = {redis.call('HGET', KEYS[1], 'epoch'), redis.call('HGET', KEYS[1], 'seq') or '0', t[1], t[2]}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[i])
    local added = 0
    for j = 1, #info, 2 do
      if info[j] == 'entries-added' then added = info[j + 1] end
    end
    local entries = {}
    for j, e in ipairs(redis.call('XRANGE', KEYS[i], '-', '+')) do entries[j] = e[2][2] end
    out[#out + 1] = {added, entries}
  else
    out[#out + 1] = {0, {}}
  end
end
return out
";

/// How often expired rooms are dropped from the in-memory history.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl History {
    /// `None` when `HISTORY_SIZE` is 0 (history off).
    pub fn new(bus: Bus, prefix: &str, config: HistoryConfig) -> Option<Arc<Self>> {
        if config.size == 0 {
            return None;
        }
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
            Store::Redis(RedisStore {
                bus,
                seq_key: format!("{prefix}#seq"),
                room_prefix: format!("{prefix}#h#"),
            })
        };
        Some(Arc::new(Self { config, store }))
    }

    pub fn config(&self) -> HistoryConfig {
        self.config
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
                let (bus, keys) = (&redis.bus, redis.keys(rooms));
                let args = [
                    chan.to_owned(),
                    json.to_owned(),
                    self.config.size.to_string(),
                    self.config.ttl.as_millis().to_string(),
                    format!("{:x}", new_epoch()),
                ];
                bus.script::<RedisValue>(script(&PUBLISH_SCRIPT, PUBLISH), &keys, &args)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// The head of the sequence and what each of `rooms` keeps.
    pub async fn read(&self, rooms: &[String]) -> Result<Snapshot, BusError> {
        match &self.store {
            Store::Memory { mem, .. } => {
                let mut mem = lock(mem);
                let now = Instant::now();
                mem.sweep(now);
                Ok(Snapshot {
                    head: Stamp {
                        epoch: mem.epoch,
                        seq: mem.seq,
                        ms: now_ms(),
                    },
                    rooms: rooms
                        .iter()
                        .map(|r| match mem.rooms.get(r) {
                            Some(log) if log.expires > now => RoomLog {
                                added: log.added,
                                entries: log.entries.iter().map(|e| e.to_string()).collect(),
                            },
                            _ => RoomLog::default(),
                        })
                        .collect(),
                })
            }
            Store::Redis(redis) => {
                let (bus, keys) = (&redis.bus, redis.keys(rooms));
                let value = bus
                    .script::<RedisValue>(
                        script(&READ_SCRIPT, READ),
                        &keys,
                        &[format!("{:x}", new_epoch())],
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
        }
    }

    /// The head of the sequence: where a socket that joins now starts.
    pub async fn head(&self) -> Result<Stamp, BusError> {
        self.read(&[]).await.map(|s| s.head)
    }
}

static PUBLISH_SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
static READ_SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();

fn script(cell: &'static std::sync::OnceLock<Script>, code: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(code))
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
    let head = Stamp {
        epoch: u64::from_str_radix(&epoch, 16).ok()?,
        seq,
        ms: secs * 1000 + micros / 1000,
    };
    let logs: Vec<RoomLog> = items
        .map(|item| {
            let (added, entries) = <(u64, Vec<String>)>::from_redis_value(item).ok()?;
            Some(RoomLog { added, entries })
        })
        .collect::<Option<_>>()?;
    (logs.len() == rooms).then_some(Snapshot { head, rooms: logs })
}

fn lock(mem: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
    mem.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random epoch, never 0 (0 means "none yet").
fn new_epoch() -> u64 {
    rand::random::<u64>().max(1)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    fn stamp(seq: u64) -> Stamp {
        Stamp {
            epoch: 7,
            seq,
            ms: 1_000_000 + seq,
        }
    }

    fn entry(seq: u64) -> String {
        stamp(seq).encode(&format!(r#"{{"n":{seq}}}"#))
    }

    fn log(added: u64, seqs: &[u64]) -> RoomLog {
        RoomLog {
            added,
            entries: seqs.iter().map(|s| entry(*s)).collect(),
        }
    }

    fn snapshot(head: u64, rooms: Vec<RoomLog>) -> Snapshot {
        Snapshot {
            head: stamp(head),
            rooms,
        }
    }

    fn seqs(r: &Recovery) -> Vec<u64> {
        r.replay.iter().map(|(s, _)| s.seq).collect()
    }

    #[test]
    fn offsets_and_payloads_round_trip() {
        let s = stamp(42);
        assert_eq!(Stamp::parse_offset(&s.offset()), Some(s));
        let encoded = s.encode(r#"{"a":"b|c"}"#);
        assert_eq!(
            Stamp::decode(encoded.as_bytes()),
            (Some(s), &br#"{"a":"b|c"}"#[..])
        );
        assert_eq!(Stamp::decode(b"{}"), (None, &b"{}"[..]));
        assert_eq!(Stamp::parse_offset("nope"), None);
        assert_eq!(Stamp::parse_offset("7-1"), None);
    }

    #[test]
    fn replays_what_came_after_since_once_and_in_order() {
        // Message 3 went to both rooms.
        let snap = snapshot(6, vec![log(4, &[1, 3, 4, 6]), log(2, &[2, 3])]);
        let r = recover(&snap, Some(stamp(2)), TTL);
        assert_eq!(seqs(&r), vec![3, 4, 6]);
        assert!(r.recovered);
        assert_eq!(r.replay[0].1, r#"{"n":3}"#);
    }

    #[test]
    fn trimmed_history_is_recovered_only_when_since_reaches_it() {
        // Ten added, 5..=9 kept (among other rooms' sequence numbers).
        let snap = snapshot(9, vec![log(10, &[5, 6, 7, 8, 9])]);
        assert!(recover(&snap, Some(stamp(4)), TTL).recovered);
        assert!(recover(&snap, Some(stamp(7)), TTL).recovered);
        let r = recover(&snap, Some(stamp(3)), TTL);
        assert!(!r.recovered, "message 4 may have been trimmed");
        assert_eq!(seqs(&r), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn an_expired_room_is_recovered_only_within_the_ttl() {
        let mut snap = snapshot(9, vec![RoomLog::default()]);
        snap.head.ms = stamp(5).ms + 1000;
        assert!(recover(&snap, Some(stamp(5)), TTL).recovered);
        snap.head.ms = stamp(5).ms + TTL.as_millis() as u64 + 1;
        assert!(!recover(&snap, Some(stamp(5)), TTL).recovered);
    }

    #[test]
    fn another_epoch_replays_everything_kept_and_is_not_recovered() {
        let snap = snapshot(3, vec![log(3, &[1, 2, 3])]);
        let old = Stamp {
            epoch: 6,
            seq: 100,
            ms: 0,
        };
        let r = recover(&snap, Some(old), TTL);
        assert_eq!(seqs(&r), vec![1, 2, 3]);
        assert!(!r.recovered);
        let r = recover(&snap, None, TTL);
        assert_eq!(seqs(&r), vec![1, 2, 3]);
        assert!(
            !r.recovered,
            "no offset: the client cannot know what it missed"
        );
    }

    #[test]
    fn entries_of_an_older_epoch_are_never_replayed() {
        let old = Stamp {
            epoch: 6,
            seq: 50,
            ms: 0,
        }
        .encode("{}");
        let snap = snapshot(
            3,
            vec![RoomLog {
                added: 60,
                entries: vec![old, entry(2), entry(3)],
            }],
        );
        let r = recover(&snap, Some(stamp(1)), TTL);
        assert_eq!(seqs(&r), vec![2, 3]);
        assert!(r.recovered, "nothing of this epoch was trimmed");
    }

    #[tokio::test]
    async fn memory_history_keeps_size_per_room_and_publishes_in_order() {
        let bus = Bus::memory();
        let mut rx = bus.subscribe_channel("c".into()).await;
        let h = History::new(bus, "p", HistoryConfig { size: 2, ttl: TTL }).expect("on");
        for n in 0..3 {
            h.publish("c", &["a".into(), "b".into()], &format!("{{\"n\":{n}}}"))
                .await
                .expect("memory");
        }
        let mut published = Vec::new();
        while let Ok((_, payload)) = rx.try_recv() {
            published.push(Stamp::decode(&payload).0.expect("stamped").seq);
        }
        assert_eq!(published, vec![1, 2, 3]);
        let snap = h.read(&["a".into(), "z".into()]).await.expect("memory");
        assert_eq!(snap.head.seq, 3);
        assert_eq!(snap.rooms[0].added, 3);
        assert_eq!(snap.rooms[0].entries.len(), 2);
        assert_eq!(snap.rooms[1], RoomLog::default());
        let r = recover(&snap, Some(snap.head), TTL);
        assert!(r.replay.is_empty() && r.recovered);
    }
}
