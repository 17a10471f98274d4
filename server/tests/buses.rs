//! Several Redis (docs/server.md, "Several Redis"): three replicas on two independent Redis,
//! under steady load from socket and HTTP publishers, while one Redis dies and returns and
//! then the other dies, or while each in turn is frozen. Counted message by message: nothing
//! lost, nothing twice, no failed broadcast or cluster call. A client away for the whole run
//! resumes at the end from the Redis that returned, which caught up on what it missed.

mod support;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use support::{Api, Client, Redis, Replica};

const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
/// 102 readers in all, each in every room.
const READERS_PER_REPLICA: usize = 34;

struct Setup {
    redis: [Redis; 2],
    replicas: Vec<Replica>,
}

fn start(env: &[(&str, String)]) -> Setup {
    let redis = [Redis::start(), Redis::start()];
    let url = format!("{},{}", redis[0].url(), redis[1].url());
    let replicas: Vec<Replica> = (0..3)
        .map(|i| {
            let mut env = env.to_vec();
            env.push(("REDIS_URL", url.clone()));
            Replica::spawn(&format!("node-{i}"), &env)
        })
        .collect();
    for r in &replicas {
        r.wait_ready();
    }
    Setup { redis, replicas }
}

/// What `/readyz` says of the buses: (cluster, [up...]).
async fn buses(r: &Replica) -> (String, Vec<bool>) {
    let (status, body) = Api::new(&r.url(), None).get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let up = body["buses"]
        .as_array()
        .expect("buses listed")
        .iter()
        .map(|b| {
            let host = b["host"].as_str().expect("host");
            assert!(host.starts_with("127.0.0.1:"), "{b}");
            b["up"].as_bool().expect("up")
        })
        .collect();
    (body["cluster"].as_str().unwrap_or_default().to_owned(), up)
}

/// Waits until every replica sees Redis `i` up with its history caught up; returns its host.
async fn wait_caught_up(s: &Setup, i: usize) -> String {
    let bus = |r: &Replica| {
        let api = Api::new(&r.url(), None);
        async move { api.get("/readyz").await.1["buses"][i].clone() }
    };
    for r in &s.replicas {
        support::eventually(
            &format!("{} sees Redis {i} caught up", r.name),
            Duration::from_secs(30),
            || async {
                let b = bus(r).await;
                b["up"] == json!(true) && b["caughtUp"] == json!(true)
            },
        )
        .await;
    }
    bus(&s.replicas[0]).await["host"]
        .as_str()
        .expect("host")
        .to_owned()
}

/// A client resumes `rooms` from `since` on replica `r`, which must answer `recovered: true`;
/// returns the `n` of each message replayed, in the order they came.
async fn resume_recovered(r: &Replica, rooms: serde_json::Value, since: &str) -> Vec<u64> {
    let back = Client::connect(&r.url()).await;
    let ack = back
        .ack("resume", json!({"rooms": rooms, "since": since}))
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    let mut got = Vec::new();
    while let Some((name, args)) = back.next_message(Duration::from_millis(1000)).await {
        assert_eq!(name, "m");
        got.push(args[0]["n"].as_u64().expect("n"));
    }
    got
}

async fn wait_buses(s: &Setup, want: [bool; 2]) {
    for r in &s.replicas {
        support::eventually(
            &format!("{} sees buses {want:?}", r.name),
            Duration::from_secs(20),
            || async { buses(r).await.1 == want },
        )
        .await;
    }
}

/// One reader's messages: (publisher, n) -> copies, and the last offset.
#[derive(Default)]
struct Seen {
    copies: BTreeMap<(String, u64), u32>,
    last: Option<String>,
}

/// Reads every `m` event until `stop`, then until quiet.
fn read(
    c: Arc<Client>,
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = if stop.load(Ordering::SeqCst) {
                Duration::from_secs(3)
            } else {
                Duration::from_millis(500)
            };
            match c.next_message(wait).await {
                Some((name, args)) if name == "m" => {
                    let from = args[0]["from"].as_str().unwrap_or("?").to_owned();
                    let n = args[0]["n"].as_u64().unwrap_or(u64::MAX);
                    let mut s = seen.lock().expect("seen");
                    *s.copies.entry((from, n)).or_default() += 1;
                    s.last = args
                        .get(1)
                        .and_then(|m| m["offset"].as_str())
                        .map(str::to_owned);
                }
                Some(_) => {}
                None if stop.load(Ordering::SeqCst) => return,
                None => {}
            }
        }
    })
}

/// Per publisher, the numbers and rooms of its acknowledged messages.
type Acked = HashMap<String, Vec<(u64, &'static str)>>;

/// Publishers: per replica, a socket publisher and an HTTP publisher, each sending numbered
/// messages to one room in turn, one after the other's ack. Returns what was acknowledged.
struct Load {
    acked: Arc<std::sync::Mutex<Acked>>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    calls: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_load(s: &Setup) -> Load {
    let load = Load {
        acked: Arc::default(),
        failures: Arc::default(),
        calls: Arc::default(),
        stop: Arc::default(),
        tasks: Vec::new(),
    };
    let mut tasks = Vec::new();
    for (i, r) in s.replicas.iter().enumerate() {
        let api = Api::new(&r.url(), None);
        for (kind, via_socket) in [("sock", true), ("http", false)] {
            let name = format!("{kind}-{i}");
            let (acked, failures, stop) =
                (load.acked.clone(), load.failures.clone(), load.stop.clone());
            let (socket, api) = (
                if via_socket {
                    Some(Arc::new(Client::connect(&r.url()).await))
                } else {
                    None
                },
                api.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && n < 5000 {
                    let room = ROOMS[(n % 3) as usize];
                    let data = json!({"from": name, "n": n});
                    let ok = match &socket {
                        Some(c) => {
                            let ack = c
                                .ack("publish", json!({"room": room, "event": "m", "data": data}))
                                .await;
                            (ack["ok"] == json!(true))
                                .then_some(())
                                .ok_or_else(|| ack.to_string())
                        }
                        None => {
                            let (status, body) = api
                                .post(
                                    "/v1/broadcast",
                                    json!({"rooms": [room], "event": "m", "data": data}),
                                )
                                .await;
                            (status == 200 || status == 202)
                                .then_some(())
                                .ok_or_else(|| format!("{status} {body}"))
                        }
                    };
                    match ok {
                        Ok(()) => acked
                            .lock()
                            .expect("acked")
                            .entry(name.clone())
                            .or_default()
                            .push((n, room)),
                        Err(e) => failures
                            .lock()
                            .expect("failures")
                            .push(format!("{name} #{n}: {e}")),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }));
        }
        // Cluster calls: this replica lists a room's sockets, again and again.
        let (failures, stop, calls) =
            (load.failures.clone(), load.stop.clone(), load.calls.clone());
        let api = Api::new(&r.url(), None);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (status, body) = api.get("/v1/rooms/r0/sockets").await;
                let listed = body["sockets"].as_array().map_or(0, Vec::len);
                if status != 200 || listed != 3 * READERS_PER_REPLICA {
                    failures
                        .lock()
                        .expect("failures")
                        .push(format!("room listing: {status}, {listed} sockets: {body}"));
                }
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    Load { tasks, ..load }
}

/// Every reader joins all three rooms; returns them with their seen-lists.
async fn readers(
    s: &Setup,
    stop: &Arc<AtomicBool>,
) -> Vec<(
    Arc<Client>,
    Arc<std::sync::Mutex<Seen>>,
    tokio::task::JoinHandle<()>,
)> {
    let mut out = Vec::new();
    for r in &s.replicas {
        for _ in 0..READERS_PER_REPLICA {
            let c = Arc::new(Client::connect(&r.url()).await);
            let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
            for room in ROOMS {
                let ack = c.join(room).await;
                seen.lock().expect("seen").last = ack["offset"].as_str().map(str::to_owned);
            }
            let task = read(c.clone(), seen.clone(), stop.clone());
            out.push((c, seen, task));
        }
    }
    out
}

/// Checks that every reader got every acknowledged message exactly once, and returns the
/// deliveries counted.
fn check(acked: &Acked, seen: &Seen, who: usize) -> usize {
    let mut want: HashSet<(String, u64)> = HashSet::new();
    for (from, list) in acked {
        for (n, _) in list {
            want.insert((from.clone(), *n));
        }
    }
    let twice: Vec<_> = seen.copies.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "reader {who} got {} messages twice: {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let missing: Vec<_> = want
        .iter()
        .filter(|k| !seen.copies.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "reader {who} missed {} of {}: {:?}",
        missing.len(),
        want.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    want.len()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    Kill,
    Freeze,
}

async fn run(outage: Outage) {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let mut s = start(&[]);
    wait_buses(&s, [true, true]).await;
    let stop_readers = Arc::new(AtomicBool::new(false));
    let readers = readers(&s, &stop_readers).await;
    let load = start_load(&s).await;
    let pause = || tokio::time::sleep(Duration::from_millis(1500));

    // Redis i goes down (killed or frozen) or comes back (restarted, empty, or thawed).
    let turn = |redis: &mut Redis, down: bool| match (outage, down) {
        (Outage::Kill, true) => redis.stop(),
        (Outage::Kill, false) => redis.restart(),
        (Outage::Freeze, true) => redis.signal("STOP"),
        (Outage::Freeze, false) => redis.signal("CONT"),
    };
    // A client away for the whole run, from before the first outage: it resumes at the end,
    // when only the Redis that died and returned is left, which must have caught up on what
    // it missed. Its room gets two messages before and after each turn.
    let r = &s.replicas;
    let away = Client::connect(&r[0].url()).await;
    let since = away.join("later").await["offset"]
        .as_str()
        .expect("offset")
        .to_owned();
    drop(away);
    let later = Client::connect(&r[1].url()).await;
    let mut sent = 0;
    let mut send_later = async || {
        for _ in 0..2 {
            let ack = later
                .ack(
                    "publish",
                    json!({"room": "later", "event": "m", "data": {"from": "late", "n": sent}}),
                )
                .await;
            assert_eq!(ack["ok"], json!(true), "{ack}");
            sent += 1;
        }
    };
    send_later().await;
    let mut caught_up = String::new();
    for (i, down, after) in [
        (0, true, [false, true]),
        (0, false, [true, true]),
        (1, true, [true, false]),
    ] {
        pause().await;
        turn(&mut s.redis[i], down);
        wait_buses(&s, after).await;
        if !down {
            caught_up = wait_caught_up(&s, i).await;
        }
        send_later().await;
    }
    pause().await;

    load.stop.store(true, Ordering::SeqCst);
    for t in load.tasks {
        t.await.expect("publisher");
    }
    stop_readers.store(true, Ordering::SeqCst);
    let failures = load.failures.lock().expect("failures").clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let acked = load.acked.lock().expect("acked").clone();
    let mut deliveries = 0;
    let mut lasts = Vec::new();
    for (who, (_, seen, task)) in readers.into_iter().enumerate() {
        task.await.expect("reader");
        let seen = seen.lock().expect("seen");
        deliveries += check(&acked, &seen, who);
        lasts.push(seen.last.clone());
    }
    let published: usize = acked.values().map(Vec::len).sum();
    // Both Redis carried the messages: each replica dropped second copies and remembers ids.
    for r in &s.replicas {
        let m = Api::new(&r.url(), None).metrics().await;
        let copies = m
            .get("chorus_bus_duplicate_copies_total", &[])
            .unwrap_or(0.0);
        let ids = m.get("chorus_bus_dedupe_ids", &[]).unwrap_or(0.0);
        assert!(
            copies > 0.0 && ids > 0.0,
            "{}: {copies} copies dropped, {ids} ids",
            r.name
        );
        assert!(m.get("chorus_bus_dedupe_bytes", &[]).unwrap_or(0.0) > 0.0);
        // Once quiet, nothing waits between Redis and the sockets.
        assert_eq!(m.get("chorus_bus_backlog_messages", &[]), Some(0.0));
    }
    eprintln!(
        "{outage:?}: {published} messages acknowledged, {deliveries} deliveries, 0 lost, 0 twice, {} cluster calls",
        load.calls.load(Ordering::Relaxed)
    );

    // Redis A's history was caught up by one of the replicas, and each says so.
    let mut catch_ups = 0.0;
    for r in &s.replicas {
        let m = Api::new(&r.url(), None).metrics().await;
        let label = [("bus", caught_up.as_str())];
        catch_ups += m.get("chorus_bus_catch_ups_total", &label).unwrap_or(0.0);
        assert_eq!(m.get("chorus_bus_history_caught_up", &label), Some(1.0));
    }
    assert!(catch_ups >= 1.0, "{catch_ups} catch-ups of {caught_up}");

    // Only A is left, and the away client gets back everything, from both sides of A's outage.
    let got = resume_recovered(&r[2], json!(["later"]), &since).await;
    assert_eq!(
        got,
        (0..sent).collect::<Vec<_>>(),
        "replayed in order, each once"
    );
    if outage == Outage::Freeze {
        s.redis[1].signal("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_either_redis_loses_nothing() {
    run(Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_loses_nothing() {
    run(Outage::Freeze).await;
}

/// A catch-up reads and writes in chunks of about 1 MiB and scans rooms a hundred at a time:
/// rooms of several MiB each, among 250 rooms, are copied whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_redis_copies_large_histories_whole() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    // Room for the whole replay in one socket's buffer.
    let mut s = start(&[("SOCKET_BUFFER_BYTES", (64 << 20).to_string())]);
    wait_buses(&s, [true, true]).await;
    let r = &s.replicas;
    let big = ["big0", "big1", "big2"];
    let away = Client::connect(&r[0].url()).await;
    let mut since = String::new();
    for room in big {
        since = away.join(room).await["offset"]
            .as_str()
            .expect("offset")
            .to_owned();
    }
    drop(away);

    s.redis[1].stop();
    wait_buses(&s, [true, false]).await;
    let api = Api::new(&r[1].url(), None);
    let filler = "x".repeat(20_000);
    let mut sent = 0u64;
    // 100 messages of 20 kB per big room (2 MB each), one message to each of 250 small rooms.
    for n in 0..100u64 {
        for room in big {
            let data = json!({"n": sent, "fill": filler});
            let (status, body) = api
                .post(
                    "/v1/broadcast",
                    json!({"rooms": [room], "event": "m", "data": data}),
                )
                .await;
            assert_eq!(status, 202, "{body}");
            sent += 1;
        }
        for small in 0..3 {
            let room = format!("small{}", n * 3 + small);
            let (status, body) = api
                .post(
                    "/v1/broadcast",
                    json!({"rooms": [room], "event": "m", "data": {}}),
                )
                .await;
            assert_eq!(status, 202, "{body}");
        }
    }
    s.redis[1].restart();
    wait_buses(&s, [true, true]).await;
    wait_caught_up(&s, 1).await;
    s.redis[0].stop();
    wait_buses(&s, [false, true]).await;

    let got = resume_recovered(&r[2], json!(big), &since).await;
    assert_eq!(
        got,
        (0..sent).collect::<Vec<_>>(),
        "replayed whole, in order, each once"
    );
}

/// A replica that published while a Redis was down, and died before that Redis returned,
/// cannot mark the gap it left: the message it wrote to the other Redis carries a witness, and
/// the replicas left mark the gap, so the returning Redis catches up instead of claiming it has
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_misses_of_a_replica_that_died_are_marked_by_the_others() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let mut s = start(&[]);
    wait_buses(&s, [true, true]).await;
    for i in 0..2 {
        wait_caught_up(&s, i).await;
    }
    let away = Client::connect(&s.replicas[1].url()).await;
    let since = away.join("w").await["offset"]
        .as_str()
        .expect("offset")
        .to_owned();
    drop(away);

    // Redis B freezes; only replica 0 publishes, then dies before B thaws.
    s.redis[1].signal("STOP");
    wait_buses(&s, [true, false]).await;
    let api = Api::new(&s.replicas[0].url(), None);
    for n in 0..3 {
        let (status, body) = api
            .post(
                "/v1/broadcast",
                json!({"rooms": ["w"], "event": "m", "data": {"n": n}}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let dead = s.replicas.remove(0);
    dead.signal("KILL");
    drop(dead);
    s.redis[1].signal("CONT");
    wait_buses(&s, [true, true]).await;
    wait_caught_up(&s, 1).await;
    s.redis[0].stop();
    wait_buses(&s, [false, true]).await;

    let got = resume_recovered(&s.replicas[1], json!(["w"]), &since).await;
    assert_eq!(
        got,
        vec![0, 1, 2],
        "replayed from B alone, in order, each once"
    );
}

/// One publisher's messages keep their order on every Redis, also on one that answers late or
/// has to be sent a script again: each Redis stamps them in the order they reach it and keeps
/// them so for resumes, and the publisher gets its answer from the first Redis that took a
/// message, so the next one leaves before the slower Redis has the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publishers_messages_keep_their_order_on_each_redis() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    const SENT: u64 = 400;
    let s = start(&[
        ("SOCKET_RATE", "100000".into()),
        ("HISTORY_SIZE", SENT.to_string()),
    ]);
    wait_buses(&s, [true, true]).await;
    // Redis B forgets its scripts over and over while the messages go out: each publish it
    // gets first is refused (NOSCRIPT) and has to follow the script.
    let done = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (done, url) = (done.clone(), s.redis[1].url());
        tokio::task::spawn_blocking(move || {
            let mut conn = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .expect("a connection to Redis B");
            let mut flushes = 0u64;
            while !done.load(Ordering::SeqCst) && flushes < 100_000 {
                redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .exec(&mut conn)
                    .expect("SCRIPT FLUSH");
                flushes += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            flushes
        })
    };
    let socket = Client::connect(&s.replicas[0].url()).await;
    for n in 0..SENT {
        let ack = socket
            .ack(
                "publish",
                json!({"room": "o", "event": "m", "data": {"n": n}}),
            )
            .await;
        support::assert_ok(&ack);
    }
    done.store(true, Ordering::SeqCst);
    let flushes = flusher.await.expect("the flusher ran");
    assert!(flushes > 10, "Redis B forgot its scripts {flushes} times");

    for (i, redis) in s.redis.iter().enumerate() {
        // The publishes still on their way to this Redis land within a few round trips.
        let url = redis.url();
        let mut kept = Vec::new();
        support::eventually(
            &format!("Redis {i} holds all {SENT} messages"),
            Duration::from_secs(10),
            || {
                kept = room_history(&url, "o");
                let n = kept.len() as u64;
                async move { n == SENT }
            },
        )
        .await;
        assert_eq!(
            kept,
            (0..SENT).collect::<Vec<_>>(),
            "Redis {i} keeps the messages in the order they were published"
        );
    }
}

/// The `n` of each message that a Redis keeps for `room`, in stream order.
fn room_history(url: &str, room: &str) -> Vec<u64> {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("a connection to Redis");
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("chorus#h#{room}"))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE");
    entries
        .into_iter()
        .flat_map(|(_, fields)| fields)
        .map(|(_, stamped)| {
            let json = stamped.split_once('|').expect("a stamped message").1;
            let msg: serde_json::Value = serde_json::from_str(json).expect("JSON");
            msg["data"]["n"].as_u64().expect("n")
        })
        .collect()
}
