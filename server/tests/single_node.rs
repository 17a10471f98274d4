//! One replica, no Redis: the local default.

mod support;

use serde_json::{Value, json};
use support::{Api, Client, EVENT_WAIT, Replica};

fn single(env: &[(&str, String)]) -> (Replica, Api) {
    let r = Replica::spawn("solo", env);
    r.wait_ready();
    let api = Api::new(&r.url(), None);
    (r, api)
}

#[tokio::test]
async fn single_node_is_ready_and_delivers() {
    let (r, api) = single(&[]);
    assert_eq!(
        api.get("/readyz").await,
        (200, json!({"status": "ready", "cluster": "single"}))
    );
    assert_eq!(api.get("/healthz").await.0, 200);

    let a = Client::connect(&r.url()).await;
    let b = Client::connect(&r.url()).await;
    let c = Client::connect(&r.url()).await;
    a.join("chat").await;
    b.join("chat").await;
    c.join("other").await;

    let ack = a
        .ack(
            "publish",
            json!({"room": "chat", "event": "msg", "data": {"text": "hi"}}),
        )
        .await;
    support::assert_ok(&ack);
    // The data, then the message's id (the one the publisher's ack named) and its offset.
    let (name, args) = b.next_message(support::EVENT_WAIT).await.expect("msg");
    assert_eq!((name.as_str(), &args[0]), ("msg", &json!({"text": "hi"})));
    assert_eq!(args[1]["id"], ack["id"], "{args:?}");
    assert!(args[1]["offset"].is_string(), "{args:?}");
    // One process delivers in order, so each socket's next event shows what it did not get:
    // the sender is excluded (a's next is "list"), other rooms hear nothing (c's is "all").

    // An array stays one argument.
    let (status, body) = api
        .post(
            "/v1/broadcast",
            json!({"rooms": ["chat"], "event": "list", "data": [1, 2, 3]}),
        )
        .await;
    assert_eq!((status, body), (202, json!({"ok": true})));
    assert_eq!(a.expect("list").await, json!([1, 2, 3]));
    assert_eq!(b.expect("list").await, json!([1, 2, 3]));

    // No rooms: every socket.
    let all = json!({"event": "all", "data": null});
    assert_eq!(api.post("/v1/broadcast", all).await.0, 202);
    for client in [&a, &b, &c] {
        assert_eq!(client.expect("all").await, Value::Null);
    }

    // Leaving stops delivery.
    assert_eq!(b.ack("leave", json!("chat")).await, json!({"ok": true}));
    let after = json!({"rooms": ["chat"], "event": "after", "data": 1});
    assert_eq!(api.post("/v1/broadcast", after).await.0, 202);
    assert_eq!(a.expect("after").await, json!(1));
    let end = json!({"event": "end", "data": 2});
    assert_eq!(api.post("/v1/broadcast", end).await.0, 202);
    assert_eq!(
        b.expect("end").await,
        json!(2),
        "b heard nothing since it left"
    );

    let (status, nodes) = api.get("/v1/nodes").await;
    assert_eq!(status, 200);
    assert_eq!(
        nodes,
        json!({"sockets": 3, "nodes": [{"id": "solo", "sockets": 3}]})
    );
}

#[tokio::test]
async fn bad_socket_input_is_refused_and_the_server_keeps_serving() {
    let (r, api) = single(&[("MAX_PAYLOAD", "2048".into())]);
    let a = Client::connect(&r.url()).await;
    let b = Client::connect(&r.url()).await;
    b.join("room").await;

    let invalid = |ack: Value| {
        assert_eq!(ack["ok"], json!(false), "{ack}");
        ack["error"].as_str().unwrap_or_default().to_owned()
    };
    for (event, data) in [
        ("join", json!(42)),
        ("join", json!("")),
        ("join", json!("x".repeat(201))),
        ("join", json!("bad\u{7}room")),
        ("join", json!({"room": "r"})),
        ("leave", json!(null)),
        ("publish", json!("just a string")),
        ("publish", json!({"room": "room", "data": 1})),
        ("publish", json!({"room": 5, "event": "e", "data": 1})),
        ("publish", json!({"room": "room", "event": "", "data": 1})),
        (
            "publish",
            json!({"room": "room", "event": "chorus:internal", "data": 1}),
        ),
        (
            "publish",
            json!({"room": "room", "event": "disconnect", "data": 1}),
        ),
        (
            "publish",
            json!({"room": "room", "event": "connect", "data": 1}),
        ),
    ] {
        let ack = a.ack(event, data.clone()).await;
        assert_eq!(invalid(ack), "invalid_request", "{event} {data}");
    }
    // The message says what was wrong.
    for (event, data, message) in [
        ("join", json!(42), "expected a room name (string)"),
        (
            "publish",
            json!({"room": "room", "data": 1}),
            "expected {room, event, data}: missing field `event` at line 1 column 35",
        ),
        (
            "publish",
            json!({"room": "room", "event": "chorus:x"}),
            "the event name \"chorus:x\" is reserved",
        ),
    ] {
        let ack = a.ack(event, data).await;
        assert_eq!(ack["message"], json!(message), "{ack}");
    }
    // Still serving, both over the socket and over HTTP; and b's first event is this one,
    // so none of the refused publishes reached it.
    let ack = a
        .ack("publish", json!({"room": "room", "event": "ok", "data": 1}))
        .await;
    support::assert_ok(&ack);
    assert_eq!(b.expect("ok").await, json!(1));
    assert_eq!(api.get("/healthz").await.0, 200);

    // A websocket message over MAX_PAYLOAD ends that connection (tests/hostile.rs checks the
    // close code); the message reaches no one.
    let big = "x".repeat(4096);
    a.sio
        .emit(
            "publish",
            json!({"room": "room", "event": "e", "data": big}),
        )
        .await
        .expect("emit");
    // The client library does not report a close it did not start: the server's count does.
    support::eventually("a's socket closed for max_payload", EVENT_WAIT, || async {
        let m = api.metrics().await;
        m.get("chorus_sockets_connected", &[]) == Some(1.0)
            && m.get("chorus_limit_refusals_total", &[("limit", "max_payload")]) == Some(1.0)
    })
    .await;
    // b's next event is a later broadcast: the big one never came before it.
    let (status, _) = api
        .post(
            "/v1/broadcast",
            json!({"rooms": ["room"], "event": "after", "data": 2}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(b.expect("after").await, json!(2));
}

#[tokio::test]
async fn bad_http_input_gets_the_contract_errors() {
    let (r, api) = single(&[("MAX_PAYLOAD", "2048".into())]);
    let b = Client::connect(&r.url()).await;
    b.join("room").await;

    let raw = |body: &str| Some(body.as_bytes().to_vec());
    // (method, path, body, expected status, expected error code)
    type Case<'a> = (&'a str, String, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/broadcast".into(),
            raw("{not json"),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(""),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":"room","event":"e"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":["room"]}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":[],"event":"e"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":[""],"event":"e"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":["room"],"event":"chorus:x"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":["room"],"event":"disconnecting"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            raw(r#"{"rooms":["room"],"event":"e","except":["nope"]}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/broadcast".into(),
            Some(
                format!(
                    r#"{{"rooms":["room"],"event":"e","data":"{}"}}"#,
                    "x".repeat(4096)
                )
                .into_bytes(),
            ),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/rooms/room/members".into(),
            raw(r#"{"sockets":["not-a-socket-id"]}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/rooms/room/members".into(),
            raw(r#"{"sockets":[]}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/rooms/room/members".into(),
            raw(r#"{"sockets":"x"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/rooms/room/members".into(),
            raw(r#"{"sockets":["AAAAAAAAAAAAAAAA"]}"#),
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/rooms/room/members".into(),
            raw(r#"{"sockets":["AAAAAAAAAAAAAAAA"]}"#),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sockets/AAAAAAAAAAAAAAAA/disconnect".into(),
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sockets/nope/disconnect".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "GET",
            format!("/v1/rooms/{}/sockets", "r".repeat(201)),
            None,
            400,
            "invalid_request",
        ),
        (
            "GET",
            "/v1/rooms/bad%07room/sockets".into(),
            None,
            400,
            "invalid_request",
        ),
        ("GET", "/v1/no-such-route".into(), None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = api.send(method, &path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(answer["error"], json!(code), "{method} {path}: {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    // Still serving; and b's first event is this one, so no refused broadcast reached it.
    let (status, _) = api
        .post(
            "/v1/broadcast",
            json!({"rooms": ["room"], "event": "fine", "data": 2}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(b.expect("fine").await, json!(2));
}

#[tokio::test]
async fn openapi_and_metrics_describe_the_server() {
    let (r, api) = single(&[]);
    let (status, doc) = api.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/v1/broadcast",
        "/v1/rooms/{room}/sockets",
        "/v1/rooms/{room}/members",
        "/v1/sockets/{id}/disconnect",
        "/v1/nodes",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    assert!(doc["paths"]["/v1/rooms/{room}/members"]["delete"].is_object());

    let a = Client::connect(&r.url()).await;
    a.join("m").await;
    let ack = a
        .ack("publish", json!({"room": "m", "event": "e", "data": 1}))
        .await;
    support::assert_ok(&ack);
    assert_eq!(
        api.post("/v1/broadcast", json!({"event": "e"})).await,
        (202, json!({"ok": true}))
    );
    let metrics = api.metrics().await;
    let broadcast = [("method", "POST"), ("route", "/v1/broadcast")];
    for (name, labels, value) in [
        ("chorus_sockets_connected", &[][..], 1.0),
        ("chorus_messages_published_total", &[], 1.0),
        ("chorus_broadcasts_total", &[], 1.0),
        ("chorus_redis_connected", &[], 0.0),
        // a client that reads its messages loses none
        ("chorus_socket_drops_total", &[], 0.0),
        ("chorus_local_only_deliveries_total", &[], 0.0),
        (
            "chorus_http_requests_total",
            &[broadcast[0], broadcast[1], ("status", "202")],
            1.0,
        ),
        (
            "chorus_http_request_duration_seconds_count",
            &broadcast,
            1.0,
        ),
    ] {
        assert_eq!(
            metrics.get(name, labels),
            Some(value),
            "{name}{labels:?} in {metrics:?}"
        );
    }

    // The gauge follows disconnects.
    a.sio.disconnect().await.expect("disconnect");
    support::eventually("chorus_sockets_connected back to 0", EVENT_WAIT, || async {
        api.metrics().await.get("chorus_sockets_connected", &[]) == Some(0.0)
    })
    .await;
}

#[tokio::test]
async fn refused_socket_events_are_counted_by_code() {
    let (r, api) = single(&[]);
    let a = Client::connect(&r.url()).await;
    for _ in 0..12 {
        assert_eq!(
            a.ack("join", json!("")).await["error"],
            json!("invalid_request")
        );
    }
    let ack = a
        .ack("publish", json!({"room": "r", "event": "connect"}))
        .await;
    assert_eq!(ack["error"], json!("invalid_request"));
    let metrics = api.metrics().await;
    assert_eq!(
        metrics.get("chorus_refused_total", &[("code", "invalid_request")]),
        Some(13.0)
    );
    assert_eq!(
        metrics.get("chorus_refused_total", &[("code", "forbidden")]),
        None
    );
}

/// The reader that the metric checks rely on tells `1` from `12` and labels apart.
#[test]
fn metrics_are_read_exactly() {
    let text =
        "# TYPE x counter\nx_total 12\nx_total{a=\"1\",b=\"q\\\"\"} 1\ny 0.5 1700000000\n# EOF\n";
    let m = support::openmetrics::Samples::parse(text).expect("parses");
    assert_eq!(m.get("x_total", &[]), Some(12.0));
    assert_eq!(m.get("x_total", &[("b", "q\""), ("a", "1")]), Some(1.0));
    assert_eq!(m.get("x_total", &[("a", "1")]), None);
    assert_eq!(m.get("x", &[]), None);
    assert_eq!(m.get("y", &[]), Some(0.5));
    for bad in ["x_total", "x_total{a=\"1\" 1", "x_total one", "x 1 2 3"] {
        assert!(
            support::openmetrics::Samples::parse(bad).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn malformed_configuration_stops_with_one_line_naming_the_flag() {
    for (env, flag) in [
        (("PORT", "http"), "--port"),
        (("REDIS_URL", "localhost:6379"), "--redis-url"),
        (("MAX_PAYLOAD", "-1"), "--max-payload"),
        (("LOG_FORMAT", "yaml"), "--log-format"),
        (("DRAIN_SECONDS", "soon"), "--drain-seconds"),
    ] {
        let out = std::process::Command::new(support::BIN)
            .env(env.0, env.1)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(flag), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn secrets_stay_out_of_error_messages() {
    let out = std::process::Command::new(support::BIN)
        .env("REDIS_URL", "redis://:sup3r-secret@127.0.0.1:notaport")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("sup3r-secret"), "{stderr}");
}

#[tokio::test]
async fn cors_covers_the_api_and_long_polling() {
    let (r, _) = single(&[(
        "CORS_ORIGINS",
        "https://app.example,https://admin.example".into(),
    )]);
    let http = reqwest::Client::new();
    for path in ["/v1/broadcast", "/socket.io/?EIO=4&transport=polling"] {
        for (origin, allowed) in [
            ("https://app.example", true),
            ("https://evil.example", false),
        ] {
            let resp = http
                .request(reqwest::Method::OPTIONS, format!("{}{path}", r.url()))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .send()
                .await
                .expect("answers");
            let acao = resp
                .headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert_eq!(
                acao.as_deref() == Some(origin),
                allowed,
                "{path} {origin}: {acao:?}"
            );
        }
    }
}
