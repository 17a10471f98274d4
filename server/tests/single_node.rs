//! One replica, no Redis: the local default.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Client, EVENT_WAIT, Replica};

const QUIET: Duration = Duration::from_millis(300);

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
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(b.expect("msg").await, json!({"text": "hi"}));
    a.expect_silence(QUIET).await; // the sender is excluded
    c.expect_silence(QUIET).await; // other rooms hear nothing

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
    c.expect_silence(QUIET).await;

    // No rooms: every socket.
    api.post("/v1/broadcast", json!({"event": "all", "data": null}))
        .await;
    for client in [&a, &b, &c] {
        assert_eq!(client.expect("all").await, Value::Null);
    }

    // Leaving stops delivery.
    assert_eq!(b.ack("leave", json!("chat")).await, json!({"ok": true}));
    api.post(
        "/v1/broadcast",
        json!({"rooms": ["chat"], "event": "after", "data": 1}),
    )
    .await;
    assert_eq!(a.expect("after").await, json!(1));
    b.expect_silence(QUIET).await;

    let (status, nodes) = api.get("/v1/nodes").await;
    assert_eq!(status, 200);
    assert_eq!(nodes, json!({"nodes": [{"id": "solo", "sockets": 3}]}));
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
    let big = "x".repeat(4096);
    let ack = a
        .ack(
            "publish",
            json!({"room": "room", "event": "e", "data": big}),
        )
        .await;
    assert_eq!(invalid(ack), "payload_too_large");
    b.expect_silence(QUIET).await;

    // Still serving, both over the socket and over HTTP.
    let ack = a
        .ack("publish", json!({"room": "room", "event": "ok", "data": 1}))
        .await;
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(b.expect("ok").await, json!(1));
    assert_eq!(api.get("/healthz").await.0, 200);
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
    b.expect_silence(QUIET).await;

    // Still serving.
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
    a.ack("publish", json!({"room": "m", "event": "e", "data": 1}))
        .await;
    api.post("/v1/broadcast", json!({"event": "e"})).await;
    let (status, text) = api.get("/metrics").await;
    assert_eq!(status, 200);
    let text = text.as_str().expect("text").to_owned();
    for line in [
        "chorus_sockets_connected 1",
        "chorus_messages_published_total 1",
        "chorus_broadcasts_total 1",
        "chorus_redis_connected 0",
        // a client that reads its messages loses none
        "chorus_socket_drops_total 0",
    ] {
        assert!(text.contains(line), "{line:?} not in metrics:\n{text}");
    }
    assert!(text.contains(
        r#"chorus_http_requests_total{method="POST",route="/v1/broadcast",status="202"} 1"#
    ));
    assert!(text.contains("chorus_http_request_duration_seconds_bucket"));

    // The gauge follows disconnects.
    a.sio.disconnect().await.expect("disconnect");
    support::eventually("chorus_sockets_connected back to 0", EVENT_WAIT, || async {
        let (_, text) = api.get("/metrics").await;
        text.as_str()
            .is_some_and(|t| t.contains("chorus_sockets_connected 0"))
    })
    .await;
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
