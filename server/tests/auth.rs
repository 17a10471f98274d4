//! The API bearer token and socket JWTs, across two replicas.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Client, Cluster, jwt, now_secs as now};

const KEY: &str = "test-jwt-key-0123456789abcdef0123";
const TOKEN: &str = "api-token-for-tests";
const QUIET: Duration = Duration::from_millis(400);

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
        (
            "not valid yet (nbf)",
            Some(json!({"token": jwt(json!({"sub": "u", "exp": exp, "nbf": now() + 300}), KEY)})),
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
    // Without JWT_AUDIENCE / JWT_ISSUER, `aud` and `iss` are not checked; a reached `nbf` is
    // fine.
    let token = jwt(
        json!({"sub": "a", "exp": exp, "aud": "some-api", "iss": "some-idp", "nbf": now() - 1}),
        KEY,
    );
    let c = Client::try_connect(&url, Some(json!({ "token": token }))).await;
    assert!(c.is_ok(), "{:?}", c.err());
}

#[tokio::test]
async fn audience_and_issuer_when_configured() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let replica = support::Replica::spawn(
        "aud-iss",
        &[
            ("JWT_SECRET", KEY.into()),
            ("JWT_AUDIENCE", "chorus".into()),
            ("JWT_ISSUER", "https://idp.test".into()),
        ],
    );
    let url = replica.url();
    let exp = now() + 600;
    let connect = |claims: Value| {
        let url = url.clone();
        async move { Client::try_connect(&url, Some(json!({"token": jwt(claims, KEY)}))).await }
    };
    assert!(
        connect(json!({"exp": exp, "aud": "chorus", "iss": "https://idp.test"}))
            .await
            .is_ok()
    );
    for claims in [
        json!({"exp": exp}),
        json!({"exp": exp, "aud": "chorus"}),
        json!({"exp": exp, "iss": "https://idp.test"}),
        json!({"exp": exp, "aud": "other", "iss": "https://idp.test"}),
        json!({"exp": exp, "aud": "chorus", "iss": "https://other.test"}),
    ] {
        match connect(claims.clone()).await {
            Ok(_) => panic!("{claims}: connected"),
            Err(e) => assert_eq!(connect_error_data(&e), json!({"message": "unauthorized"})),
        }
    }
}

/// Waits (generously) for the server to close `client`; any other event fails the test.
async fn closed_by_server(client: &Client) {
    match client.next_event(Duration::from_secs(30)).await {
        Some((name, _)) if name == "chorus-test:closed" => {}
        other => panic!("expected the server to disconnect the socket, got {other:?}"),
    }
}

#[tokio::test]
async fn expiry_disconnects_unless_refreshed() {
    if !support::tools_present(&["redis-server"]) {
        return;
    }
    let cluster = secured();
    let url = cluster.replicas[0].url();
    let connect = |claims: Value| {
        let url = url.clone();
        async move {
            Client::try_connect(&url, Some(json!({"token": jwt(claims, KEY)})))
                .await
                .expect("connects")
        }
    };
    // `kept` would expire first but refreshes; `dropped` expires a second later without one.
    // (A few seconds ahead, so that a busy machine still refreshes in time.)
    let start = now();
    let kept = connect(json!({"sub": "kim", "rooms": ["old:*"], "exp": start + 6})).await;
    let dee_token = jwt(json!({"sub": "dee", "exp": start + 7}), KEY);
    let dropped = Client::try_connect(&url, Some(json!({"token": dee_token})))
        .await
        .expect("connects");
    kept.join("old:1").await;
    assert_eq!(
        kept.ack("join", json!("new:1")).await["error"],
        json!("forbidden")
    );

    // Refusals leave the old token in force.
    let expect_refusal = |ack: Value, code: &str| assert_eq!(ack["error"], json!(code), "{ack}");
    expect_refusal(
        kept.ack("refresh", json!({"token": "x.y.z"})).await,
        "unauthorized",
    );
    expect_refusal(
        kept.ack(
            "refresh",
            json!({"token": jwt(json!({"sub": "kim", "exp": start + 600}), "wrong-key")}),
        )
        .await,
        "unauthorized",
    );
    expect_refusal(
        kept.ack(
            "refresh",
            json!({"token": jwt(json!({"sub": "kim", "exp": start - 60}), KEY)}),
        )
        .await,
        "unauthorized",
    );
    expect_refusal(
        kept.ack(
            "refresh",
            json!({"token": jwt(json!({"sub": "eve", "rooms": ["*"], "exp": start + 600}), KEY)}),
        )
        .await,
        "forbidden",
    );
    expect_refusal(
        kept.ack("refresh", json!("not an object")).await,
        "invalid_request",
    );
    kept.join("old:2").await;

    // A valid refresh replaces the grants and moves the expiry.
    let fresh = jwt(
        json!({"sub": "kim", "rooms": ["new:*"], "exp": start + 600}),
        KEY,
    );
    assert_eq!(
        kept.ack("refresh", json!({ "token": fresh })).await,
        json!({"ok": true})
    );
    kept.join("new:1").await;
    assert_eq!(
        kept.ack("join", json!("old:3")).await["error"],
        json!("forbidden")
    );

    // `dropped` is disconnected by the server at its `exp`; by then `kept`'s old `exp` has
    // passed too, and it is still connected and served.
    closed_by_server(&dropped).await;
    let again = Client::try_connect(&url, Some(json!({"token": dee_token}))).await;
    match again {
        Ok(_) => panic!("an expired token connected again"),
        Err(e) => assert_eq!(connect_error_data(&e), json!({"message": "unauthorized"})),
    }
    kept.join("new:2").await;
    kept.expect_silence(QUIET).await;
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
    support::assert_ok(&ack);
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

/// Runs `chorus-server token ...` with only PATH and `env` set.
fn token_command(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("token")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("chorus-server runs")
}

#[tokio::test]
async fn the_token_subcommand_prints_a_working_token() {
    let before = now();
    let out = token_command(
        &[
            "--sub",
            "alice",
            "--rooms",
            "chat:*,lobby",
            "--publish",
            "chat:1",
            "--ttl",
            "1h",
        ],
        &[("JWT_SECRET", KEY)],
    );
    let after = now();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = stdout.strip_suffix('\n').expect("one line");
    assert!(
        !token.contains('\n'),
        "stdout is the token alone: {stdout:?}"
    );

    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(KEY.as_bytes()),
        &validation,
    )
    .expect("signed with JWT_SECRET")
    .claims;
    assert_eq!(claims["sub"], json!("alice"));
    assert_eq!(claims["rooms"], json!(["chat:*", "lobby"]));
    assert_eq!(claims["publish"], json!(["chat:1"]));
    let exp = claims["exp"].as_u64().expect("exp");
    assert!((before + 3600..=after + 3600).contains(&exp), "exp {exp}");
    assert!(claims.get("aud").is_none() && claims.get("iss").is_none());

    // The server takes it, and its grants are the ones asked for.
    let replica = support::Replica::spawn("token-cmd", &[("JWT_SECRET", KEY.into())]);
    let alice = Client::try_connect(&replica.url(), Some(json!({ "token": token })))
        .await
        .expect("the printed token connects");
    alice.join("chat:7").await;
    assert_eq!(
        alice.ack("join", json!("admin")).await["error"],
        json!("forbidden")
    );
    let ack = alice
        .ack(
            "publish",
            json!({"room": "chat:1", "event": "e", "data": 1}),
        )
        .await;
    support::assert_ok(&ack);

    // `aud` and `iss` default to what the server checks (JWT_AUDIENCE, JWT_ISSUER).
    let out = token_command(
        &["--ttl", "90s"],
        &[
            ("JWT_SECRET", KEY),
            ("JWT_AUDIENCE", "chorus"),
            ("JWT_ISSUER", "me"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["chorus"]);
    validation.set_issuer(&["me"]);
    let claims = jsonwebtoken::decode::<Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(KEY.as_bytes()),
        &validation,
    )
    .expect("aud and iss set")
    .claims;
    assert!(claims.get("sub").is_none());
}

#[test]
fn the_token_subcommand_refuses_clearly() {
    // No key: one line naming JWT_SECRET, exit 2, nothing on stdout.
    let out = token_command(&["--sub", "alice"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("JWT_SECRET"), "{stderr}");

    // A malformed value names its flag; the key never shows.
    for args in [&["--ttl", "soon"][..], &["--ttl", "0s"], &["--bogus"]] {
        let out = token_command(args, &[("JWT_SECRET", "hunter2-secret-key")]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(args[0]), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}
