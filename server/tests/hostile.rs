//! Hostile and broken clients against real replicas (docs/security.md): one test per attack.
//! Each asserts that the attacker is refused or cut off, that the other sockets keep working,
//! and that the replica's peak memory (VmHWM) stays under a stated bound. Every load loop is
//! bounded in count and time; everything runs on loopback.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    Api, Client, Cluster, EVENT_WAIT, Replica, jwt, now_secs,
    rawws::{self, Frame, RawWs},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// The replica's resident and peak resident memory, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn single(env: &[(&str, String)]) -> (Replica, Api) {
    let r = Replica::spawn("solo", env);
    r.wait_ready();
    let api = Api::new(&r.url(), None);
    (r, api)
}

/// Asserts that `text` is the successful ack `prefix[{"ok":true...}]` (a join's carries its offset).
fn ok_ack(text: String, prefix: &str) {
    assert!(
        text.starts_with(&format!(r#"{prefix}[{{"ok":true"#)),
        "{text}"
    );
}

async fn metric(api: &Api, name: &str, labels: &[(&str, &str)]) -> f64 {
    api.metrics().await.get(name, labels).unwrap_or(0.0)
}

/// Broadcasts event `big` with `{n, pad}` (`pad` of `size` bytes) to room `flood`, once per n.
async fn flood(api: &Api, ns: std::ops::Range<usize>, size: usize) {
    let pad = "y".repeat(size);
    for n in ns {
        let (status, body) = api
            .post(
                "/v1/broadcast",
                json!({"rooms": ["flood"], "event": "big", "data": {"n": n, "pad": pad}}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
}

/// Sends one oversized message as `frames` (header and payload bytes), bounded by `total`
/// bytes, while reading the server's answer; returns the close code seen.
async fn send_oversized(mut ws: RawWs, frames: Vec<(Vec<u8>, u64)>) -> Option<u16> {
    let mut wr = ws.take_writer();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for (header, len) in frames {
            if wr.write_all(&header).await.is_err() {
                return;
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if wr.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
    });
    let code = ws.until_closed(Duration::from_secs(20)).await;
    writer.abort();
    code
}

#[tokio::test]
async fn oversized_websocket_messages_close_with_1009_before_and_after_auth() {
    if !support::tools_present(&[]) {
        return;
    }
    let key = "hostile-test-key";
    let (r, api) = single(&[("JWT_SECRET", key.into())]);
    let token = jwt(
        json!({"sub": "eve", "rooms": ["*"], "publish": ["*"], "exp": now_secs() + 600}),
        key,
    );
    // A bystander that must keep working.
    let mut bystander = RawWs::open(r.port).await;
    let answer = bystander
        .sio_connect(Some(&json!({ "token": token })))
        .await;
    assert!(answer.starts_with("40{"), "{answer}");

    let (rss_before, _) = memory(r.pid());
    let mut attacks = Vec::new();
    for i in 0..8 {
        let mut ws = RawWs::open(r.port).await;
        // Half attack before authenticating (Engine.IO open only), half after.
        let open = ws.next_text(EVENT_WAIT).await;
        assert!(open.starts_with('0'), "{open}");
        if i % 2 == 1 {
            ws.send_text(&format!("40{}", json!({ "token": token })))
                .await
                .expect("CONNECT");
            let answer = ws.next_text(EVENT_WAIT).await;
            assert!(answer.starts_with("40{"), "{answer}");
        }
        // One 15 MiB frame, or a 60 MiB message in 512 KiB fragments.
        let frames = if i < 4 {
            vec![(rawws::header(true, 1, 15 * MIB), 15 * MIB)]
        } else {
            (0..120)
                .map(|n| {
                    let opcode = if n == 0 { 1 } else { 0 };
                    (rawws::header(n == 119, opcode, MIB / 2), MIB / 2)
                })
                .collect()
        };
        attacks.push(tokio::spawn(send_oversized(ws, frames)));
    }
    for (i, attack) in attacks.into_iter().enumerate() {
        assert_eq!(attack.await.expect("attack task"), Some(1009), "client {i}");
    }
    let (_, peak) = memory(r.pid());
    println!(
        "8 oversized messages: RSS {} MiB before, peak {} MiB",
        rss_before / MIB,
        peak / MIB
    );
    // Before: a 60 MiB message took a replica from 29 to 216 MiB, eight to 569 MiB.
    assert!(
        peak < rss_before + 40 * MIB,
        "peak {peak} vs {rss_before} before"
    );
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "max_payload")]
        )
        .await,
        8.0
    );
    // The bystander still works.
    bystander
        .send_text(r#"421["join","still-here"]"#)
        .await
        .expect("join");
    ok_ack(bystander.next_text(EVENT_WAIT).await, "431");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_counted_once() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(2, &[]);
    let a = &cluster.replicas[0];
    let (api_a, api_b) = (cluster.api(0), cluster.api(1));

    // The slow client: a small receive buffer, joins the room, then never reads again.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], a.port)).into())
        .expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    let tcp = tokio::net::TcpStream::from_std(socket.into()).expect("tokio stream");
    let mut slow = RawWs::upgrade(tcp, a.port, "").await.expect("upgrade");
    assert!(slow.sio_connect(None).await.starts_with("40{"));
    slow.send_text(r#"421["join","flood"]"#)
        .await
        .expect("join");
    ok_ack(slow.next_text(EVENT_WAIT).await, "431");

    let reader = Client::connect(&a.url()).await;
    reader.join("flood").await;
    let (rss_before, _) = memory(a.pid());

    // 100 broadcasts of 256 KiB, sent through the other replica.
    flood(&api_b, 0..100, 256 * 1024).await;
    // The reader gets every one, in order.
    for n in 0..100 {
        let got = reader.expect("big").await;
        assert_eq!(got["n"], json!(n));
    }
    support::eventually("the slow socket is disconnected", EVENT_WAIT, || async {
        metric(&api_a, "chorus_slow_socket_disconnects_total", &[]).await == 1.0
    })
    .await;
    let (_, peak) = memory(a.pid());
    println!(
        "100 x 256 KiB to a socket that does not read: RSS {} MiB before, peak {} MiB",
        rss_before / MIB,
        peak / MIB
    );
    // Before: two such sockets held 299 MiB after the flood.
    assert!(
        peak < rss_before + 64 * MIB,
        "peak {peak} vs {rss_before} before"
    );
    // Counted once, not logged once per message.
    let log = a.log_text();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 2, "{warnings} warnings:\n{log}");
    drop(slow);
}

#[tokio::test]
async fn joins_stop_at_the_room_limit() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[("SOCKET_RATE", "100000".into())]);
    let mut ws = RawWs::open(r.port).await;
    assert!(ws.sio_connect(None).await.starts_with("40{"));
    let (rss_before, _) = memory(r.pid());
    // 2,000 different rooms, without waiting for the acks.
    for i in 0..2000 {
        ws.send_text(&format!(r#"42{i}["join","room-{i}"]"#))
            .await
            .expect("join");
    }
    let mut ok = 0;
    let mut over = 0;
    // Which joins passed: the handlers of one socket's events may finish in any order.
    let mut joined = None;
    for _ in 0..2000 {
        let ack = ws.next_text(EVENT_WAIT).await;
        if ack.contains(r#"[{"ok":true"#) {
            ok += 1;
            joined = joined.or_else(|| {
                ack.strip_prefix("43")?
                    .split('[')
                    .next()?
                    .parse::<u32>()
                    .ok()
            });
        } else if ack.contains(r#""error":"limit_exceeded""#) {
            over += 1;
        } else {
            panic!("unexpected answer {ack}");
        }
    }
    assert_eq!((ok, over), (128, 1872));
    // Leaving frees a place (the leave answered before the next join is sent).
    let joined = joined.expect("a join's ack id");
    ws.send_text(&format!(r#"429998["leave","room-{joined}"]"#))
        .await
        .expect("leave");
    ok_ack(ws.next_text(EVENT_WAIT).await, "439998");
    ws.send_text(r#"429999["join","another"]"#)
        .await
        .expect("join");
    ok_ack(ws.next_text(EVENT_WAIT).await, "439999");
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "max_rooms_per_socket")]
        )
        .await,
        1872.0
    );
    let (_, peak) = memory(r.pid());
    assert!(
        peak < rss_before + 16 * MIB,
        "peak {peak} vs {rss_before} before"
    );
}

#[tokio::test]
async fn every_event_of_a_burst_gets_exactly_one_ack() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[]);
    let mut ws = RawWs::open(r.port).await;
    assert!(ws.sio_connect(None).await.starts_with("40{"));
    // 5,000 joins back to back (the default SOCKET_RATE is 100 a second, bursts of 200).
    let burst = 5000;
    let mut frames = Vec::new();
    for i in 0..burst {
        let text = format!(r#"42{i}["join","burst"]"#);
        frames.extend(rawws::header(true, 1, text.len() as u64));
        frames.extend(
            text.bytes()
                .enumerate()
                .map(|(j, b)| b ^ rawws::MASK[j % 4]),
        );
    }
    ws.send_raw(&frames).await.expect("burst");
    let mut seen = vec![0u32; burst];
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..burst {
        let ack = ws.next_text(EVENT_WAIT).await;
        let body = ack
            .strip_prefix("43")
            .unwrap_or_else(|| panic!("an ack, got {ack}"));
        let id: usize = body[..body.find('[').expect("args")]
            .parse()
            .expect("ack id");
        seen[id] += 1;
        if body.contains(r#"[{"ok":true"#) {
            ok += 1;
        } else if body.contains(r#""error":"rate_limited""#) {
            limited += 1;
        } else {
            panic!("unexpected ack {ack}");
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every ack exactly once");
    println!("{burst} joins: {ok} ok, {limited} rate_limited");
    assert!(ok >= 200, "the burst allowance passes: {ok}");
    assert_eq!(ok + limited, burst);
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "socket_rate")]
        )
        .await,
        limited as f64
    );
}

#[tokio::test]
async fn a_socket_that_stays_over_its_rate_is_disconnected() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[("SOCKET_RATE", "5".into())]);
    let mut ws = RawWs::open(r.port).await;
    assert!(ws.sio_connect(None).await.starts_with("40{"));
    let bystander = Client::connect(&r.url()).await;
    bystander.join("calm").await;
    let mut wr = ws.take_writer();
    // 20 events a second (four times the rate), for at most 20 seconds.
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for i in 0..400 {
            tick.tick().await;
            let text = format!(r#"42{i}["join","busy"]"#);
            let mut frame = rawws::header(true, 1, text.len() as u64);
            frame.extend(
                text.bytes()
                    .enumerate()
                    .map(|(j, b)| b ^ rawws::MASK[j % 4]),
            );
            if wr.write_all(&frame).await.is_err() {
                return i;
            }
        }
        400
    });
    let started = Instant::now();
    // The server's Socket.IO disconnect packet, then the end of the stream.
    let mut disconnected = false;
    while let Some(frame) = ws.next_frame(Duration::from_secs(30)).await {
        if frame == Frame::Text("41".into()) {
            disconnected = true;
            break;
        }
    }
    assert!(disconnected, "the server disconnected the socket");
    println!(
        "disconnected after {:.1} s over the rate",
        started.elapsed().as_secs_f64()
    );
    sender.abort();
    bystander.join("calm-2").await;
    assert!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "socket_rate")]
        )
        .await
            > 0.0
    );
}

#[tokio::test]
async fn slow_http_clients_are_cut_off() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[]);
    let port = r.port;
    // 20 slowloris connections: a request head one byte a second. 20 slow bodies: a POST
    // whose 1,000-byte body comes one byte a second. Each for at most 60 s.
    let slow = |head: &'static str, then: &'static [u8]| async move {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("head");
        let started = Instant::now();
        for b in then.iter().cycle().take(60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A closed connection shows as a failed write or, below, an ended read.
            if tcp.write_all(&[*b]).await.is_err() {
                return started.elapsed();
            }
            let mut buf = [0u8; 1024];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(10), tcp.read(&mut buf)).await
            {
                return started.elapsed();
            }
        }
        panic!("a slow client was never cut off");
    };
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(tokio::spawn(slow(
            "GET /healthz HTTP/1.1\r\nX-Slow: ",
            b"a",
        )));
        clients.push(tokio::spawn(slow(
            "POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"event\":\"e\",\"data\":\"",
            b"b",
        )));
    }
    // Meanwhile the replica serves everyone else.
    let c = Client::connect(&r.url()).await;
    c.join("fine").await;
    assert_eq!(api.get("/healthz").await.0, 200);
    for client in clients {
        let took = client.await.expect("slow client task");
        println!("slow client cut off after {:.0} s", took.as_secs_f64());
    }
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "header_timeout")]
        )
        .await,
        20.0
    );
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "body_timeout")]
        )
        .await,
        20.0
    );
}

#[tokio::test]
async fn sockets_past_max_connections_are_refused() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[("MAX_CONNECTIONS", "20".into())]);
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut ws = RawWs::open(r.port).await;
        assert!(ws.sio_connect(None).await.starts_with("40{"));
        held.push(ws);
    }
    // A websocket handshake and a long-polling handshake both get 503 over_capacity.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", r.port))
        .await
        .expect("connect");
    let refused = RawWs::upgrade(tcp, r.port, "")
        .await
        .err()
        .expect("refused");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let (status, body) = api.get("/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], json!("over_capacity"), "{body}");
    // Those connected keep working.
    held[0]
        .send_text(r#"421["join","full"]"#)
        .await
        .expect("join");
    ok_ack(held[0].next_text(EVENT_WAIT).await, "431");
    // A place freed is a place taken again.
    held.pop();
    support::eventually("a freed place", EVENT_WAIT, || async {
        api.get("/socket.io/?EIO=4&transport=polling").await.0 == 200
    })
    .await;
    assert!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "max_connections")]
        )
        .await
            >= 2.0
    );
}

/// A Socket.IO v4 client over long-polling only, spoken by hand so the test decides when it
/// polls.
struct Polling {
    api: Api,
    path: String,
}

impl Polling {
    async fn connect(base: &str) -> Self {
        let api = Api::new(base, None);
        let (status, open) = api.get("/socket.io/?EIO=4&transport=polling").await;
        assert_eq!(status, 200, "{open}");
        let open = open.as_str().expect("open packet").to_owned();
        let sid = serde_json::from_str::<Value>(&open[1..]).expect("open JSON")["sid"]
            .as_str()
            .expect("sid")
            .to_owned();
        let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let p = Self { api, path };
        p.post("40").await;
        p.poll_until(|p| p.starts_with("40{")).await;
        p
    }

    /// Polls until a packet matches (pings come in between).
    async fn poll_until(&self, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let (status, packets) = self.poll().await;
            assert_eq!(status, 200, "{packets:?}");
            if packets.iter().any(|p| wanted(p)) {
                return;
            }
            assert!(Instant::now() < deadline, "last poll: {packets:?}");
        }
    }

    async fn post(&self, packet: &str) {
        let (status, body) = self
            .api
            .send("POST", &self.path, Some(packet.as_bytes().to_vec()))
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// One poll: the status and the packets it carried (answering pings on the way).
    async fn poll(&self) -> (u16, Vec<String>) {
        let (status, body) = self.api.get(&self.path).await;
        let text = match body {
            Value::String(s) => s,
            other => other.to_string(),
        };
        let packets: Vec<String> = text.split('\u{1e}').map(str::to_owned).collect();
        if status == 200 && packets.iter().any(|p| p == "2") {
            self.post("3").await;
        }
        (status, packets)
    }

    async fn join(&self, room: &str) {
        self.post(&format!(r#"421["join","{room}"]"#)).await;
        self.poll_until(|p| p.starts_with(r#"431[{"ok":true"#))
            .await;
    }
}

#[tokio::test]
async fn a_long_polling_client_that_stops_polling_is_disconnected_at_its_buffer_limit() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = Cluster::start(2, &[]);
    let a = &cluster.replicas[0];
    let (api_a, api_b) = (cluster.api(0), cluster.api(1));
    let stalled = Polling::connect(&a.url()).await;
    stalled.join("flood").await;
    let poller = Polling::connect(&a.url()).await;
    poller.join("flood").await;
    let (rss_before, _) = memory(a.pid());

    // Ten rounds of ten 64 KiB broadcasts through the other replica (6.4 MiB in all, over six
    // times SOCKET_BUFFER_BYTES). The poller takes each round before the next is sent; the
    // stalled client never polls again.
    let mut received = Vec::new();
    for round in 0..10 {
        flood(&api_b, round * 10..round * 10 + 10, 64 * 1024).await;
        let deadline = Instant::now() + EVENT_WAIT;
        while received.len() < round * 10 + 10 {
            assert!(Instant::now() < deadline, "round {round}: got {received:?}");
            let (status, packets) = poller.poll().await;
            assert_eq!(status, 200, "{} packets", packets.len());
            for p in packets.iter().filter_map(|p| p.strip_prefix("42")) {
                let v: Value = serde_json::from_str(p).expect("event packet");
                assert_eq!(v[0], "big");
                received.push(v[1]["n"].as_u64().expect("n"));
            }
        }
    }
    // Everything, in order, without a disconnect: each poll took its bytes off the backlog.
    assert_eq!(received, (0..100).collect::<Vec<u64>>());
    assert_eq!(
        metric(&api_a, "chorus_slow_socket_disconnects_total", &[]).await,
        1.0,
        "only the stalled client"
    );
    assert_eq!(
        metric(
            &api_a,
            "chorus_limit_refusals_total",
            &[("limit", "socket_buffer_bytes")]
        )
        .await,
        1.0
    );
    // When the stalled client polls again it gets what was queued before the limit (about
    // SOCKET_BUFFER_BYTES), then the disconnect: it is told, and nothing after it is queued.
    let mut queued = 0;
    let ended = loop {
        let (status, packets) = stalled.poll().await;
        if status != 200 {
            break status;
        }
        queued += packets.iter().filter(|p| p.starts_with("42")).count();
        if packets.iter().any(|p| p == "41") {
            break status;
        }
        assert!(queued < 100, "the stalled client got everything");
    };
    assert_eq!(ended, 200, "the disconnect packet reaches the client");
    assert!(
        (15..=17).contains(&queued),
        "{queued} messages of 64 KiB were queued for 1 MiB"
    );
    let (_, peak) = memory(a.pid());
    println!(
        "6.4 MiB to a long-polling client that stopped polling: RSS {} MiB before, peak {} MiB",
        rss_before / MIB,
        peak / MIB
    );
    assert!(
        peak < rss_before + 32 * MIB,
        "peak {peak} vs {rss_before} before"
    );
}

#[tokio::test]
async fn a_long_polling_message_over_max_payload_gets_413() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[("MAX_PAYLOAD", "65536".into())]);
    let (status, open) = api.get("/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 200);
    let open = open.as_str().expect("open packet").to_owned();
    let sid = serde_json::from_str::<Value>(&open[1..]).expect("open JSON")["sid"]
        .as_str()
        .expect("sid")
        .to_owned();
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    // CONNECT, then a publish whose body is twice the limit.
    assert_eq!(api.send("POST", &path, Some(b"40".to_vec())).await.0, 200);
    let big = format!(
        r#"42["publish",{{"room":"r","event":"e","data":"{}"}}]"#,
        "z".repeat(128 * 1024)
    );
    let (status, _) = api.send("POST", &path, Some(big.into_bytes())).await;
    assert_eq!(status, 413);
    // The replica keeps serving.
    let c = Client::connect(&r.url()).await;
    c.join("after").await;
}

#[tokio::test]
async fn idle_connections_and_sessions_that_never_connect_are_closed() {
    if !support::tools_present(&[]) {
        return;
    }
    let (r, api) = single(&[]);
    let port = r.port;
    // A keep-alive connection outlives the 10 s head timeout between requests, and is closed
    // once idle for 60 s.
    let keep_alive = tokio::spawn(async move {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut buf = [0u8; 4096];
        tcp.write_all(request).await.expect("first request");
        let n = tcp.read(&mut buf).await.expect("first answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_secs(15)).await;
        tcp.write_all(request).await.expect("second request");
        let n = tcp.read(&mut buf).await.expect("second answer");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "still open after 15 s idle"
        );
        let idle = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(120), tcp.read(&mut buf)).await;
        assert!(matches!(end, Ok(Ok(0) | Err(_))), "closed by the server");
        idle.elapsed()
    });
    // An Engine.IO websocket session that never connects to the namespace.
    let mut silent = RawWs::open(port).await;
    let open = silent.next_text(EVENT_WAIT).await;
    assert!(open.starts_with('0'), "{open}");
    let started = Instant::now();
    let closed = loop {
        match silent.next_frame(Duration::from_secs(60)).await {
            Some(Frame::Close(_)) => break true,
            Some(_) => continue,
            None => break silent.ended,
        }
    };
    assert!(closed, "the session without CONNECT was closed");
    println!(
        "a session without CONNECT closed after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let idle = keep_alive.await.expect("keep-alive task");
    println!(
        "an idle keep-alive connection closed after {:.0} s",
        idle.as_secs_f64()
    );
    assert_eq!(
        metric(
            &api,
            "chorus_limit_refusals_total",
            &[("limit", "idle_timeout")]
        )
        .await,
        1.0
    );
}
