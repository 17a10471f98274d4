//! Three replicas, each its own process, on one real Redis.

mod support;

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};
use support::{Client, Cluster};

const QUIET: Duration = Duration::from_millis(400);

#[tokio::test]
async fn publish_reaches_every_replica_once_and_skips_the_sender() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(3, &[]);
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = Client::connect(&cluster.replicas[i % 3].url()).await;
        c.join("chat").await;
        clients.push(c);
    }
    let outsider = Client::connect(&cluster.replicas[1].url()).await;
    outsider.join("elsewhere").await;

    for (n, sender) in clients.iter().enumerate() {
        let ack = sender
            .ack(
                "publish",
                json!({"room": "chat", "event": "msg", "data": {"n": n}}),
            )
            .await;
        support::assert_ok(&ack);
        for (i, c) in clients.iter().enumerate() {
            if i != n {
                assert_eq!(c.expect("msg").await, json!({"n": n}), "client {i}");
            }
        }
    }
    // Exactly once: nothing else is queued anywhere, and the sender never heard itself.
    for c in clients.iter().chain([&outsider]) {
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test]
async fn http_broadcast_merges_rooms_without_duplicates_and_honours_except() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(3, &[]);
    let api = cluster.api(0);
    // Socket i is in rooms by the bits of i: 1 -> a, 2 -> b, 4 -> c.
    let mut clients = Vec::new();
    for i in 0..8usize {
        let c = Client::connect(&cluster.replicas[i % 3].url()).await;
        for (bit, room) in [(1, "a"), (2, "b"), (4, "c")] {
            if i & bit != 0 {
                c.join(room).await;
            }
        }
        clients.push(c);
    }
    let excluded_id = clients[3].id(&api).await;

    for via in 0..3 {
        let (status, body) = cluster
            .api(via)
            .post(
                "/v1/broadcast",
                json!({"rooms": ["a", "b"], "event": "ab", "data": via, "except": [excluded_id]}),
            )
            .await;
        assert_eq!((status, body), (202, json!({"ok": true})));
        for (i, c) in clients.iter().enumerate() {
            if i & 3 != 0 && i != 3 {
                assert_eq!(c.expect("ab").await, json!(via), "socket {i}");
            }
        }
        for c in &clients {
            c.expect_silence(QUIET).await;
        }
    }

    // No rooms: every socket on every replica, once.
    let all = json!({"event": "all", "data": "x"});
    assert_eq!(api.post("/v1/broadcast", all).await.0, 202);
    for c in &clients {
        assert_eq!(c.expect("all").await, json!("x"));
        c.expect_silence(QUIET).await;
    }
}

#[tokio::test]
async fn presence_nodes_and_disconnect_are_cluster_wide() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(3, &[]);
    let api = cluster.api(2);
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = Client::connect(&cluster.replicas[i].url()).await;
        ids.push(c.id(&api).await);
        c.join("lobby").await;
        clients.push(c);
    }

    let (status, body) = api.get("/v1/rooms/lobby/sockets").await;
    assert_eq!(status, 200);
    assert_eq!(body["room"], json!("lobby"));
    let seen: HashMap<String, String> = body["sockets"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or_default().to_owned(),
                s["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: HashMap<String, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("node-{i}")))
        .collect();
    assert_eq!(seen, expected);

    let (status, nodes) = api.get("/v1/nodes").await;
    assert_eq!(status, 200);
    assert_eq!(
        nodes,
        json!({"sockets": 3, "nodes": [
            {"id": "node-0", "sockets": 1}, {"id": "node-1", "sockets": 1}, {"id": "node-2", "sockets": 1}
        ]})
    );

    // Disconnect a socket held by another replica than the one asked.
    let (status, body) = api
        .post(&format!("/v1/sockets/{}/disconnect", ids[0]), json!(null))
        .await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    assert_eq!(clients[0].expect("chorus-test:closed").await, Value::Null);
    let left = api.room_sockets("lobby").await;
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&ids[0]));
    let (status, body) = api
        .post(&format!("/v1/sockets/{}/disconnect", ids[0]), json!(null))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], json!("not_found"));
}

#[tokio::test]
async fn membership_calls_apply_on_every_replica_before_answering() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(3, &[]);
    let apis: Vec<_> = (0..3).map(|i| cluster.api(i)).collect();
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let c = Client::connect(&cluster.replicas[i].url()).await;
        ids.push(c.id(&apis[0]).await);
        clients.push(c);
    }

    // Join through one replica, broadcast through another, right after the answer.
    // Sails documents its equivalent as volatile across servers; this one must never miss.
    const ROUNDS: usize = 210;
    let mut misses = Vec::new();
    for round in 0..ROUNDS {
        let target = round % 3;
        let room = format!("r{round}");
        let (status, body) = apis[(round + 1) % 3]
            .post(
                &format!("/v1/rooms/{room}/members"),
                json!({"sockets": [ids[target]]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["sockets"], json!([ids[target]]));
        assert_eq!(body["missing"], json!([]));
        let (status, _) = apis[(round + 2) % 3]
            .post(
                "/v1/broadcast",
                json!({"rooms": [room], "event": "m", "data": round}),
            )
            .await;
        assert_eq!(status, 202);
        match clients[target].next_event(Duration::from_secs(5)).await {
            Some((name, data)) if name == "m" && data == json!(round) => {}
            other => misses.push((round, other)),
        }
    }
    assert!(
        misses.is_empty(),
        "{} of {ROUNDS} missed: {misses:?}",
        misses.len()
    );
    for c in &clients {
        c.expect_silence(QUIET).await;
    }

    // Leave through the API: a broadcast right after reaches nobody removed.
    let (status, body) = apis[1]
        .delete(
            "/v1/rooms/r0/members",
            json!({"sockets": [ids[0], "AAAAAAAAAAAAAAAA"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sockets"], json!([ids[0]]));
    assert_eq!(body["missing"], json!(["AAAAAAAAAAAAAAAA"]));
    let gone = json!({"rooms": ["r0"], "event": "gone", "data": 0});
    assert_eq!(apis[2].post("/v1/broadcast", gone).await.0, 202);
    // Client 0 (node-0) is still in r3. A second broadcast from node-2 follows the first on the
    // same Redis channel, so client 0's next event is the second only if the first missed it.
    let marker = json!({"rooms": ["r3"], "event": "marker", "data": 3});
    assert_eq!(apis[2].post("/v1/broadcast", marker).await.0, 202);
    assert_eq!(clients[0].expect("marker").await, json!(3));
}

#[tokio::test]
async fn apps_with_different_prefixes_do_not_hear_each_other() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(1, &[("REDIS_CHANNEL_PREFIX", "ns.app-one".into())]);
    let other = support::Replica::spawn(
        "other-app",
        &[
            ("REDIS_URL", cluster.redis.url()),
            ("REDIS_CHANNEL_PREFIX", "ns.app-two".into()),
        ],
    );
    other.wait_ready();
    let a = Client::connect(&cluster.replicas[0].url()).await;
    let b = Client::connect(&other.url()).await;
    a.join("shared-name").await;
    b.join("shared-name").await;
    let (status, _) = cluster
        .api(0)
        .post(
            "/v1/broadcast",
            json!({"rooms": ["shared-name"], "event": "e", "data": 1}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(a.expect("e").await, json!(1));
    b.expect_silence(QUIET).await;
    let (_, nodes) = support::Api::new(&other.url(), None).get("/v1/nodes").await;
    assert_eq!(
        nodes,
        json!({"sockets": 1, "nodes": [{"id": "other-app", "sockets": 1}]})
    );
}
