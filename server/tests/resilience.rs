//! Redis going away and coming back, and SIGTERM, on the real binary.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    Api, Client, Cluster, Replica, eventually,
    rawws::{Frame, RawWs},
};

const QUIET: Duration = Duration::from_millis(400);

async fn ready_cluster_state(api: &Api) -> String {
    let (_, body) = api.get("/readyz").await;
    body["cluster"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn redis_outage_degrades_then_heals_without_restarts() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let mut cluster = Cluster::start(3, &[]);
    let apis: Vec<Api> = (0..3).map(|i| cluster.api(i)).collect();
    // Two clients per replica, all in one room.
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = Client::connect(&cluster.replicas[i % 3].url()).await;
        c.join("room").await;
        clients.push(c);
    }
    for api in &apis {
        assert_eq!(ready_cluster_state(api).await, "connected");
    }
    // Ids found while the cluster is up (the listing is a cluster call).
    let (id0, id5) = (clients[0].id(&apis[0]).await, clients[5].id(&apis[2]).await);

    cluster.redis.stop();

    // Every replica notices by itself (no traffic needed) and stays ready.
    for api in &apis {
        eventually("readyz says degraded", Duration::from_secs(10), || async {
            ready_cluster_state(api).await == "degraded"
        })
        .await;
        let (status, body) = api.get("/readyz").await;
        assert_eq!((status, body["status"].clone()), (200, json!("ready")));
    }

    // Cluster-wide calls answer 503 cluster_unavailable (the HTTP client gives up at 15 s,
    // so a hang fails the test).
    for (method, path, body) in [
        ("GET", "/v1/nodes", None),
        ("GET", "/v1/rooms/room/sockets", None),
        (
            "POST",
            "/v1/rooms/room/members",
            Some(br#"{"sockets":["AAAAAAAAAAAAAAAA"]}"#.to_vec()),
        ),
        (
            "DELETE",
            "/v1/rooms/room/members",
            Some(br#"{"sockets":["AAAAAAAAAAAAAAAA"]}"#.to_vec()),
        ),
        ("POST", "/v1/sockets/AAAAAAAAAAAAAAAA/disconnect", None),
    ] {
        let (status, answer) = apis[0].send(method, path, body).await;
        assert_eq!(status, 503, "{method} {path}: {answer}");
        assert_eq!(answer["error"], json!("cluster_unavailable"));
    }

    // Calls about a replica's own sockets work on that replica while Redis is away.
    let (status, answer) = apis[0]
        .post("/v1/rooms/own/members", json!({"sockets": [id0]}))
        .await;
    assert_eq!(status, 200, "members of node-0's own socket: {answer}");
    assert_eq!(answer["sockets"], json!([id0]));
    let (status, answer) = apis[2]
        .send("POST", &format!("/v1/sockets/{id5}/disconnect"), None)
        .await;
    assert_eq!(status, 200, "disconnect node-2's own socket: {answer}");
    expect_closed(&clients[5]).await;
    let (status, _) = apis[1]
        .send("POST", &format!("/v1/sockets/{id0}/disconnect"), None)
        .await;
    assert_eq!(status, 503, "another replica's socket needs the cluster");

    // Each replica still delivers to its own sockets: publish from client 0 (node-0) reaches
    // client 3 (node-0) only, and the sender is told the cluster is unavailable.
    let ack = clients[0]
        .ack(
            "publish",
            json!({"room": "room", "event": "local", "data": 1}),
        )
        .await;
    assert_eq!(ack["ok"], json!(false));
    assert_eq!(ack["error"], json!("cluster_unavailable"));
    assert_eq!(clients[3].expect("local").await, json!(1));
    // HTTP broadcast through node-1 reaches node-1's sockets (clients 1 and 4).
    let (status, body) = apis[1]
        .post(
            "/v1/broadcast",
            json!({"rooms": ["room"], "event": "http-local", "data": 2}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], json!("cluster_unavailable"));
    assert_eq!(clients[1].expect("http-local").await, json!(2));
    assert_eq!(clients[4].expect("http-local").await, json!(2));
    for i in [0, 2, 5] {
        clients[i].expect_silence(QUIET).await;
    }
    for r in &mut cluster.replicas {
        assert!(r.is_running(), "{} exited during the outage", r.name);
    }

    // Redis comes back on the same port, empty: replicas reconnect and resubscribe by
    // themselves. What it held is gone, messages the replicas missed while cut off from it
    // included, so every socket in a room is closed to resume (and be told by its resume).
    cluster.redis.restart();
    for api in &apis {
        eventually("readyz says connected", Duration::from_secs(15), || async {
            ready_cluster_state(api).await == "connected"
        })
        .await;
    }
    for c in &clients[..5] {
        expect_closed(c).await;
    }
    let mut closed = 0.0;
    for api in &apis {
        closed += api
            .metrics()
            .await
            .get("chorus_gap_sockets_closed_total", &[])
            .expect("chorus_gap_sockets_closed_total");
    }
    assert_eq!(closed, 5.0, "sockets closed to resume, all replicas");
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = Client::connect(&cluster.replicas[i].url()).await;
        c.join("room").await;
        clients.push(c);
    }
    let ack = clients[2]
        .ack(
            "publish",
            json!({"room": "room", "event": "back", "data": 3}),
        )
        .await;
    support::assert_ok(&ack);
    for (i, c) in clients.iter().enumerate() {
        if i != 2 {
            assert_eq!(c.expect("back").await, json!(3), "client {i}");
        }
        c.expect_silence(QUIET).await;
    }
    let (status, nodes) = apis[0].get("/v1/nodes").await;
    assert_eq!(status, 200);
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(3));
}

/// Waits for `c`'s connection to be closed by the server (a Socket.IO disconnect, or its
/// transport closed, which this client reports as an error), skipping what arrives before.
async fn expect_closed(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match c.next_event(Duration::from_millis(200)).await {
            Some((name, _)) if name == "chorus-test:closed" || name == "chorus-test:error" => {
                return;
            }
            Some((name, _)) => seen.push(name),
            None => {}
        }
    }
    panic!("the server did not close the socket; events meanwhile: {seen:?}");
}

#[tokio::test]
async fn replica_starting_before_redis_is_unready_until_it_connects() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let mut redis = support::Redis::start();
    redis.stop();
    let replica = Replica::spawn("early", &[("REDIS_URL", redis.url())]);
    let api = Api::new(&replica.url(), None);
    assert_eq!(
        api.get("/readyz").await,
        (503, json!({"status": "starting", "cluster": "degraded"}))
    );
    assert_eq!(api.get("/healthz").await.0, 200);
    redis.restart();
    replica.wait_ready();
    assert_eq!(ready_cluster_state(&api).await, "connected");
    let c = Client::connect(&replica.url()).await;
    c.join("late").await;
    assert_eq!(api.room_sockets("late").await.len(), 1);
}

#[tokio::test]
async fn sigterm_drains_then_closes_sockets_and_exits_zero() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let redis = support::Redis::start();
    let mut replica = Replica::spawn(
        "draining",
        // With so few connections the drain lasts its floor, 5 s (DRAIN_SECONDS is only its
        // longest), and connections start closing after a fifth of it: 1 s for what follows.
        &[("REDIS_URL", redis.url()), ("DRAIN_SECONDS", "10".into())],
    );
    replica.wait_ready();
    let api = Api::new(&replica.url(), None);
    let client = Client::connect(&replica.url()).await;
    client.join("r").await;

    replica.signal("TERM");
    // Not ready soon after the signal, well before the drain delay ends...
    eventually("readyz 503 draining", Duration::from_secs(2), || async {
        api.get("/readyz").await == (503, json!({"status": "draining", "cluster": "connected"}))
    })
    .await;
    // ...while the sockets still work during the drain.
    let (status, _) = api
        .post(
            "/v1/broadcast",
            json!({"rooms": ["r"], "event": "still", "data": 1}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(client.expect("still").await, json!(1));
    // Then the server closes the sockets and exits 0. (That the client sees its transport
    // close is checked with socket.io-client in tests/js; rust_socketio does not report it.)
    let status = replica.wait_exit(Duration::from_secs(25));
    assert_eq!(status.code(), Some(0), "log:\n{}", replica.log_text());
    let log = replica.log_text();
    assert!(!log.contains("panicked"), "{log}");
    let draining = log
        .find("shutting down: not ready, closing connections over the drain")
        .expect("drain logged");
    let closing = log.find("closing sockets").expect("socket close logged");
    assert!(draining < closing, "{log}");
}

#[tokio::test]
async fn json_logs_carry_no_secrets_even_at_debug_level() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    const PASSWORD: &str = "redis-pass-7f3a9c";
    const TOKEN: &str = "api-token-5e1b2d";
    const JWT_KEY: &str = "jwt-key-c4d8e2-0123456789abcdef";
    let redis = support::Redis::start_with(Some(PASSWORD));
    let mut replica = Replica::spawn(
        "quiet",
        &[
            ("REDIS_URL", redis.url()),
            ("API_TOKEN", TOKEN.into()),
            ("JWT_SECRET", JWT_KEY.into()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "debug".into()),
        ],
    );
    replica.wait_ready();
    let api = Api::new(&replica.url(), Some(TOKEN));
    assert_eq!(ready_cluster_state(&api).await, "connected");
    // Some traffic, including refused credentials, so there is something to log.
    assert_eq!(api.get("/v1/nodes").await.0, 200);
    assert_eq!(
        Api::new(&replica.url(), Some("wrong"))
            .get("/v1/nodes")
            .await
            .0,
        401
    );
    assert!(
        Client::try_connect(&replica.url(), Some(json!({"token": "bad"})))
            .await
            .is_err()
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 600)
        .unwrap_or(0);
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_KEY.as_bytes()),
    )
    .expect("token");
    let by_query = Client::try_connect(&format!("{}?token={jwt}", replica.url()), None).await;
    assert!(by_query.is_ok(), "{:?}", by_query.err());
    let by_auth = Client::try_connect(&replica.url(), Some(json!({"token": jwt}))).await;
    assert!(by_auth.is_ok(), "{:?}", by_auth.err());
    replica.signal("TERM");
    assert_eq!(replica.wait_exit(Duration::from_secs(15)).code(), Some(0));

    let log = replica.log_text();
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            parsed["level"].is_string() && parsed["timestamp"].is_string(),
            "{line}"
        );
    }
    for secret in [PASSWORD, TOKEN, JWT_KEY, jwt.as_str()] {
        assert!(!log.contains(secret), "a secret leaked into the log");
    }
}

/// On SIGTERM each connection is closed at its own moment of the drain window, by closing its
/// transport (so Socket.IO clients reconnect by themselves), never with a Socket.IO disconnect
/// (after which they would not).
#[tokio::test]
async fn a_drain_closes_transports_one_by_one() {
    if !support::tools_present(&[]) {
        return;
    }
    const CLIENTS: usize = 40;
    let mut replica = Replica::spawn("spread", &[("DRAIN_SECONDS", "4".into())]);
    replica.wait_ready();
    let mut ends = Vec::new();
    for _ in 0..CLIENTS {
        let mut ws = RawWs::open(replica.port).await;
        assert!(ws.sio_connect(None).await.starts_with("40{"));
        ends.push(tokio::spawn(async move {
            let mut disconnect_packet = false;
            loop {
                match ws.next_frame(Duration::from_secs(30)).await {
                    Some(Frame::Text(t)) if t == "41" => disconnect_packet = true,
                    Some(Frame::Close(_)) | None => break,
                    Some(_) => {}
                }
            }
            (Instant::now(), ws.ended, disconnect_packet)
        }));
    }
    let signalled = Instant::now();
    replica.signal("TERM");
    let mut offsets = Vec::new();
    for end in ends {
        let (at, ended, disconnect_packet) = end.await.expect("client task");
        assert!(ended, "the connection was closed, not left waiting");
        assert!(
            !disconnect_packet,
            "a transport close, not a Socket.IO disconnect"
        );
        offsets.push(at.duration_since(signalled));
    }
    assert_eq!(replica.wait_exit(Duration::from_secs(15)).code(), Some(0));
    // Spread over the window rather than all at once: 40 closes over 3.2 s fall in many
    // quarter-second slots (about 13 on average; at once they would fill one or two).
    let mut slots: Vec<u128> = offsets.iter().map(|d| d.as_millis() / 250).collect();
    slots.sort_unstable();
    slots.dedup();
    println!(
        "{CLIENTS} connections closed between {:?} and {:?} after SIGTERM, in {} quarter-second slots",
        offsets.iter().min(),
        offsets.iter().max(),
        slots.len()
    );
    assert!(
        slots.len() >= 5,
        "closes in {} slots: {offsets:?}",
        slots.len()
    );
}
