//! History and `resume` (docs/server.md, "History and resume"), with real clients against
//! real replicas: what a client that lost its connection gets back, counted message by message.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{Client, Cluster, EVENT_WAIT, Replica};

/// One received room message: who sent it, its number, its id and offset.
#[derive(Debug, Clone)]
struct Got {
    from: String,
    n: u64,
    id: String,
    offset: String,
}

/// Waits for the next event `m` and reads its `{from, n}` data and `{id, offset}` meta.
async fn next(c: &Client, wait: Duration) -> Option<Got> {
    let (name, args) = c.next_message(wait).await?;
    assert_eq!(name, "m", "{args:?}");
    assert_eq!(args.len(), 2, "data, then {{id, offset}}: {args:?}");
    Some(Got {
        from: args[0]["from"].as_str().expect("from").to_owned(),
        n: args[0]["n"].as_u64().expect("n"),
        id: args[1]["id"].as_str().expect("id").to_owned(),
        offset: args[1]["offset"].as_str().expect("offset").to_owned(),
    })
}

async fn publish(c: &Client, room: &str, from: &str, n: u64) {
    let ack = c
        .ack(
            "publish",
            json!({"room": room, "event": "m", "data": {"from": from, "n": n}}),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
}

async fn resume(c: &Client, rooms: &[&str], since: &str) -> Value {
    let ack = c
        .ack("resume", json!({"rooms": rooms, "since": since}))
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    ack
}

#[tokio::test]
async fn a_single_node_gives_back_what_a_client_missed() {
    if !support::tools_present(&[]) {
        return;
    }
    let r = Replica::spawn("solo", &[]);
    r.wait_ready();
    let publisher = Client::connect(&r.url()).await;
    let reader = Client::connect(&r.url()).await;
    let joined = reader.join("chat").await;
    let mut last = joined["offset"].as_str().expect("join offset").to_owned();

    for n in 0..3 {
        publish(&publisher, "chat", "p", n).await;
    }
    for n in 0..3 {
        let got = next(&reader, EVENT_WAIT).await.expect("live message");
        assert_eq!(got.n, n);
        last = got.offset;
    }
    let _ = reader.sio.disconnect().await;
    // Missed while away.
    for n in 3..8 {
        publish(&publisher, "chat", "p", n).await;
    }
    let back = Client::connect(&r.url()).await;
    let ack = resume(&back, &["chat"], &last).await;
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    let mut replayed = Vec::new();
    while let Some(got) = next(&back, Duration::from_millis(300)).await {
        replayed.push(got.n);
    }
    assert_eq!(replayed, vec![3, 4, 5, 6, 7]);
    // And live again, in the room it resumed.
    publish(&publisher, "chat", "p", 8).await;
    assert_eq!(next(&back, EVENT_WAIT).await.expect("live").n, 8);
}

#[tokio::test]
async fn a_resume_past_the_kept_history_says_so_and_replays_what_is_kept() {
    if !support::tools_present(&[]) {
        return;
    }
    let r = Replica::spawn("solo", &[("HISTORY_SIZE", "5".into())]);
    r.wait_ready();
    let publisher = Client::connect(&r.url()).await;
    let reader = Client::connect(&r.url()).await;
    let joined = reader.join("chat").await;
    let since = joined["offset"].as_str().expect("offset").to_owned();
    let _ = reader.sio.disconnect().await;
    for n in 0..12 {
        publish(&publisher, "chat", "p", n).await;
    }
    let back = Client::connect(&r.url()).await;
    let ack = resume(&back, &["chat"], &since).await;
    assert_eq!(ack["recovered"], json!(false), "{ack}");
    let mut replayed = Vec::new();
    while let Some(got) = next(&back, Duration::from_millis(300)).await {
        replayed.push(got.n);
    }
    assert_eq!(replayed, vec![7, 8, 9, 10, 11], "the five kept");
    // An offset the server never handed out is refused.
    let bad = back
        .ack(
            "resume",
            json!({"rooms": ["chat"], "since": "not-an-offset"}),
        )
        .await;
    assert_eq!(bad["error"], json!("invalid_request"), "{bad}");
}

#[tokio::test]
async fn with_history_off_messages_have_one_argument_and_resume_is_not_recovered() {
    if !support::tools_present(&[]) {
        return;
    }
    let r = Replica::spawn("solo", &[("HISTORY_SIZE", "0".into())]);
    r.wait_ready();
    let publisher = Client::connect(&r.url()).await;
    let reader = Client::connect(&r.url()).await;
    assert_eq!(reader.join("chat").await, json!({"ok": true}));
    publish(&publisher, "chat", "p", 1).await;
    let (name, args) = reader.next_message(EVENT_WAIT).await.expect("message");
    assert_eq!((name.as_str(), args.len()), ("m", 1), "{args:?}");
    let ack = reader
        .ack("resume", json!({"rooms": ["other"], "since": null}))
        .await;
    assert_eq!(ack, json!({"ok": true, "recovered": false}));
}

/// Per publisher, the numbers received must be 0..count, each once, in order.
fn check_counts(got: &[Got], publishers: &BTreeMap<String, u64>) {
    let mut by_from: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut ids = HashMap::new();
    for g in got {
        by_from.entry(&g.from).or_default().push(g.n);
        *ids.entry(&g.id).or_insert(0) += 1;
    }
    let duplicates = ids.values().filter(|c| **c > 1).count();
    for (i, g) in got.iter().enumerate().filter(|(_, g)| ids[&g.id] > 1) {
        let around: Vec<&str> = got[i.saturating_sub(3)..(i + 3).min(got.len())]
            .iter()
            .map(|g| g.offset.as_str())
            .collect();
        println!("duplicate at {i}: {g:?}; around: {around:?}");
    }
    let mut lost = 0;
    for (from, count) in publishers {
        let seen = by_from.get(from.as_str()).cloned().unwrap_or_default();
        let expected: Vec<u64> = (0..*count).collect();
        if seen != expected {
            lost += expected.iter().filter(|n| !seen.contains(n)).count();
            println!("{from}: expected 0..{count}, got {seen:?}");
        }
    }
    println!(
        "received {} messages from {} publishers: {} duplicate ids, {} lost",
        got.len(),
        publishers.len(),
        duplicates,
        lost
    );
    assert_eq!((duplicates, lost), (0, 0));
    for (from, count) in publishers {
        assert_eq!(
            by_from.get(from.as_str()).map(Vec::len),
            Some(*count as usize),
            "{from}"
        );
    }
}

/// Three replicas on one Redis, publishers on every one of them (socket and HTTP, to one room
/// and to two rooms at once). A reader in both rooms drops its connection twelve times while they
/// publish, and each time resumes on the next replica. In the end it has every message once,
/// in each publisher's order.
#[tokio::test]
async fn a_reader_that_keeps_moving_between_replicas_misses_nothing_and_repeats_nothing() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(3, &[]);
    const PER_PUBLISHER: u64 = 150;
    const MOVES: u64 = 12;
    // The reader is in both rooms before anyone publishes.
    let mut reader = Client::connect(&cluster.replicas[0].url()).await;
    reader.join("a").await;
    let mut last = reader.join("b").await["offset"]
        .as_str()
        .expect("offset")
        .to_owned();
    let mut publishers = BTreeMap::new();
    let mut tasks = Vec::new();
    for (i, replica) in cluster.replicas.iter().enumerate() {
        // A socket publisher (below SOCKET_RATE) and an HTTP one on each replica.
        let from = format!("socket-{i}");
        publishers.insert(from.clone(), PER_PUBLISHER);
        let url = replica.url();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(&url).await;
            for n in 0..PER_PUBLISHER {
                publish(&c, "a", &from, n).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
        let from = format!("http-{i}");
        publishers.insert(from.clone(), PER_PUBLISHER);
        let api = cluster.api(i);
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                // Every third message goes to both rooms: it must still arrive once.
                let rooms = match n % 3 {
                    0 => json!(["a", "b"]),
                    1 => json!(["b"]),
                    _ => json!(["a"]),
                };
                let (status, body) = api
                    .post(
                        "/v1/broadcast",
                        json!({"rooms": rooms, "event": "m", "data": {"from": from, "n": n}}),
                    )
                    .await;
                assert_eq!(status, 202, "{body}");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }

    let total: u64 = publishers.values().sum();
    let mut got: Vec<Got> = Vec::new();
    let mut moves = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (got.len() as u64) < total && Instant::now() < deadline {
        // Move after every ~1/13 of the traffic, twelve times.
        if moves < MOVES && got.len() as u64 >= (moves + 1) * total / (MOVES + 1) {
            moves += 1;
            let _ = reader.sio.disconnect().await;
            let next_replica = &cluster.replicas[moves as usize % 3];
            reader = Client::connect(&next_replica.url()).await;
            let ack = resume(&reader, &["a", "b"], &last).await;
            assert_eq!(ack["recovered"], json!(true), "{ack}");
            continue;
        }
        if let Some(g) = next(&reader, EVENT_WAIT).await {
            last = g.offset.clone();
            got.push(g);
        }
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    assert_eq!(moves, MOVES);
    // Nothing more arrives after the last one (a duplicate would).
    while let Some(g) = next(&reader, Duration::from_millis(500)).await {
        got.push(g);
    }
    check_counts(&got, &publishers);
}

/// On Redis, with nothing ever published: the join's offset already belongs to the epoch of
/// the messages that follow, so resuming from it recovers them.
#[tokio::test]
async fn an_offset_from_before_the_first_message_resumes_on_redis() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(2, &[]);
    let reader = Client::connect(&cluster.replicas[0].url()).await;
    let since = reader.join("fresh").await["offset"]
        .as_str()
        .expect("offset")
        .to_owned();
    let _ = reader.sio.disconnect().await;
    let publisher = Client::connect(&cluster.replicas[1].url()).await;
    for n in 0..3 {
        publish(&publisher, "fresh", "p", n).await;
    }
    let back = Client::connect(&cluster.replicas[1].url()).await;
    let ack = resume(&back, &["fresh"], &since).await;
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    let mut replayed = Vec::new();
    while let Some(got) = next(&back, Duration::from_millis(300)).await {
        replayed.push(got.n);
    }
    assert_eq!(replayed, vec![0, 1, 2]);
}
