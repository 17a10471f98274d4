//! The API bearer token and socket JWTs, across two replicas.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use support::{Api, Client, Cluster};

const KEY: &str = "test-jwt-key-0123456789abcdef0123";
const TOKEN: &str = "api-token-for-tests";
const QUIET: Duration = Duration::from_millis(400);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn jwt(claims: Value, key: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("token")
}

/// The data of the `connect_error` in rust_socketio's report of a refused connection (the
/// whole report when it is not one).
fn connect_error_data(report: &str) -> Value {
    report
        .strip_prefix("Received an ConnectError frame: ")
        .and_then(|data| serde_json::from_str(data).ok())
        .unwrap_or_else(|| Value::String(report.to_owned()))
}

fn secured() -> Cluster {
    Cluster::start(
        2,
        &[
            ("API_TOKEN", TOKEN.into()),
            ("JWT_SECRET", KEY.into()),
            ("PUBLIC_ROOMS", "lobby,news:*".into()),
        ],
    )
}

#[tokio::test]
async fn api_needs_the_bearer_token() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = secured();
    let url = cluster.replicas[0].url();
    for api in [Api::new(&url, None), Api::new(&url, Some("wrong"))] {
        for (method, path) in [
            ("POST", "/v1/broadcast"),
            ("GET", "/v1/nodes"),
            ("GET", "/v1/rooms/x/sockets"),
            ("POST", "/v1/rooms/x/members"),
            ("DELETE", "/v1/rooms/x/members"),
            ("POST", "/v1/sockets/AAAAAAAAAAAAAAAA/disconnect"),
        ] {
            let (status, body) = api.send(method, path, Some(b"{}".to_vec())).await;
            assert_eq!(status, 401, "{method} {path}");
            assert_eq!(body["error"], json!("unauthorized"));
        }
    }
    // Operations stay open: probes and scrapers carry no token.
    let open = Api::new(&url, None);
    assert_eq!(open.get("/healthz").await.0, 200);
    assert_eq!(open.get("/readyz").await.0, 200);
    assert_eq!(open.get("/metrics").await.0, 200);
    assert_eq!(open.get("/openapi.json").await.0, 200);
    let (status, _) = Api::new(&url, Some(TOKEN)).get("/v1/nodes").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sockets_need_a_valid_jwt() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = secured();
    let url = cluster.replicas[0].url();
    let exp = now() + 600;
    for (what, auth) in [
        ("no token", None),
        ("empty auth", Some(json!({}))),
        ("garbage", Some(json!({"token": "not.a.jwt"}))),
        (
            "wrong key",
            Some(json!({"token": jwt(json!({"sub": "u", "exp": exp}), "other-key")})),
        ),
        (
            "expired",
            Some(json!({"token": jwt(json!({"sub": "u", "exp": now() - 3600}), KEY)})),
        ),
        (
            "no exp",
            Some(json!({"token": jwt(json!({"sub": "u"}), KEY)})),
        ),
    ] {
        match Client::try_connect(&url, auth).await {
            Ok(_) => panic!("{what}: connected"),
            Err(e) => assert_eq!(
                connect_error_data(&e),
                json!({"message": "unauthorized"}),
                "{what}: {e}"
            ),
        }
    }
    // The token may also come in the query string.
    let token = jwt(json!({"sub": "q", "exp": exp}), KEY);
    let c = Client::try_connect(&format!("{url}?token={token}"), None).await;
    assert!(c.is_ok(), "{:?}", c.err());
}

#[tokio::test]
async fn claims_limit_rooms_and_publishing_across_replicas() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = secured();
    let api0 = Api::new(&cluster.replicas[0].url(), Some(TOKEN));
    let exp = now() + 600;
    let alice = Client::try_connect(
        &cluster.replicas[0].url(),
        Some(json!({"token": jwt(json!({"sub": "alice", "rooms": ["chat:*"], "publish": ["chat:1"], "exp": exp}), KEY)})),
    )
    .await
    .expect("alice connects");
    let bob = Client::try_connect(
        &cluster.replicas[1].url(),
        Some(json!({"token": jwt(json!({"sub": "bob", "rooms": ["chat:1"], "exp": exp}), KEY)})),
    )
    .await
    .expect("bob connects");

    let forbidden = |ack: Value| assert_eq!(ack["error"], json!("forbidden"), "{ack}");
    forbidden(alice.ack("join", json!("admin")).await);
    forbidden(alice.ack("join", json!("user:bob")).await);
    forbidden(bob.ack("join", json!("chat:2")).await);
    alice.join("chat:1").await;
    alice.join("chat:2").await;
    alice.join("lobby").await; // public
    bob.join("chat:1").await;
    bob.join("news:today").await; // public pattern

    // Bob may not publish anywhere; Alice only to chat:1.
    forbidden(
        bob.ack(
            "publish",
            json!({"room": "chat:1", "event": "e", "data": 0}),
        )
        .await,
    );
    forbidden(
        alice
            .ack(
                "publish",
                json!({"room": "chat:2", "event": "e", "data": 0}),
            )
            .await,
    );
    forbidden(
        alice
            .ack("publish", json!({"room": "lobby", "event": "e", "data": 0}))
            .await,
    );
    // Bob's refused publish would reach Alice (in chat:1): her silence at the end checks it.
    let ack = alice
        .ack(
            "publish",
            json!({"room": "chat:1", "event": "hello", "data": "from alice"}),
        )
        .await;
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(bob.expect("hello").await, json!("from alice"));

    // `sub` puts each socket in user:<sub>, reachable from any replica.
    let (status, _) = api0
        .post(
            "/v1/broadcast",
            json!({"rooms": ["user:bob"], "event": "dm", "data": 1}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(bob.expect("dm").await, json!(1));
    alice.expect_silence(QUIET).await;
    assert_eq!(api0.room_sockets("user:alice").await.len(), 1);
}
