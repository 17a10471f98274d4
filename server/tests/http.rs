//! HTTP edges of one replica: browser origins on every entry (API, long-polling, websocket
//! upgrade), the JSON shape of every error answer, and the bearer scheme.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{Value, json};
use support::{Api, Replica};

const APP: &str = "https://app.test";
const EVIL: &str = "https://evil.test";

/// One request written by hand on a fresh connection (reqwest does not send upgrades);
/// returns the status and the body (empty for a 101, which leaves the connection open).
fn raw_request(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("writes");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_more = |answer: &mut Vec<u8>| match s.read(&mut buf) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            answer.extend_from_slice(&buf[..n]);
            true
        }
    };
    let head_end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(read_more(&mut answer), "no complete answer head");
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while answer.len() < head_end + length && read_more(&mut answer) {}
    (
        status,
        String::from_utf8_lossy(&answer[head_end..]).into_owned(),
    )
}

fn websocket_upgrade(port: u16, origin: Option<&str>) -> (u16, String) {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    raw_request(
        port,
        &format!(
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
        ),
    )
}

async fn get(
    http: &reqwest::Client,
    url: &str,
    origin: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = http.get(url);
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let resp = req.send().await.expect("answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap_or_default())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn assert_forbidden(status: u16, body: &str, what: &str) {
    assert_eq!(status, 403, "{what}: {body}");
    let body: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {body}"));
    assert_eq!(body["error"], json!("forbidden"), "{what}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn cors_origins_are_enforced_on_the_api_polling_and_websocket() {
    let r = Replica::spawn(
        "origins",
        &[("CORS_ORIGINS", format!("{APP},http://localhost:8080"))],
    );
    let http = reqwest::Client::new();
    let polling = format!("{}/socket.io/?EIO=4&transport=polling", r.url());
    let polling_v2 = format!("{}/socket.io/?EIO=3&transport=polling", r.url());
    let nodes = format!("{}/v1/nodes", r.url());

    // Refused: 403 in the contract's shape, before Engine.IO answers (no session id).
    for url in [&polling, &polling_v2, &nodes] {
        let (status, headers, body) = get(&http, url, Some(EVIL)).await;
        assert_forbidden(status, &body, url);
        assert!(!body.contains("sid"), "{body}");
        assert_eq!(header(&headers, "access-control-allow-origin"), None);
    }
    let (status, body) = websocket_upgrade(r.port, Some(EVIL));
    assert_forbidden(status, &body, "websocket upgrade");
    // A refused preflight too.
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &nodes)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let resp = preflight(EVIL).await.expect("answers");
    assert_eq!(resp.status(), 403);

    // Allowed: the origin echoed, with credentials, on every entry.
    for url in [&polling, &polling_v2, &nodes] {
        let (status, headers, body) = get(&http, url, Some(APP)).await;
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
        assert_eq!(
            header(&headers, "access-control-allow-credentials"),
            Some("true")
        );
    }
    let (status, headers, _) = get(&http, &polling, Some("http://localhost:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://localhost:8080")
    );
    let (status, _) = websocket_upgrade(r.port, Some(APP));
    assert_eq!(status, 101);
    let resp = preflight(APP).await.expect("answers");
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(
        header(resp.headers(), "access-control-allow-origin"),
        Some(APP)
    );
    assert_eq!(
        header(resp.headers(), "access-control-allow-credentials"),
        Some("true")
    );
    assert!(
        header(resp.headers(), "access-control-allow-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("authorization"))
    );

    // Without Origin (servers, native clients): not affected.
    for url in [&polling, &nodes] {
        assert_eq!(get(&http, url, None).await.0, 200, "{url}");
    }
    assert_eq!(websocket_upgrade(r.port, None).0, 101);
}

#[tokio::test]
async fn any_origin_is_echoed_with_credentials_by_default() {
    let r = Replica::spawn("any-origin", &[]);
    let http = reqwest::Client::new();
    for eio in [3, 4] {
        let url = format!("{}/socket.io/?EIO={eio}&transport=polling", r.url());
        let (status, headers, body) = get(&http, &url, Some(EVIL)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("sid"), "{body}");
        // Echoed, not `*`: browsers refuse `*` for requests that carry credentials.
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(EVIL));
        assert_eq!(
            header(&headers, "access-control-allow-credentials"),
            Some("true")
        );
    }
    assert_eq!(websocket_upgrade(r.port, Some(EVIL)).0, 101);
}

#[tokio::test]
async fn every_http_error_has_the_json_shape() {
    let r = Replica::spawn(
        "errors",
        &[("API_TOKEN", "tok".into()), ("MAX_PAYLOAD", "1024".into())],
    );
    let api = Api::new(&r.url(), Some("tok"));
    let open = Api::new(&r.url(), None);
    let big = format!(r#"{{"event":"e","data":"{}"}}"#, "x".repeat(2048)).into_bytes();
    // (client, method, path, body, status, code)
    type Case<'a> = (&'a Api, &'a str, &'a str, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        // Unknown paths are 404 without a token too, outside /v1.
        (&open, "GET", "/nope", None, 404, "not_found"),
        (&open, "GET", "/", None, 404, "not_found"),
        (&api, "GET", "/v1/no-such-call", None, 404, "not_found"),
        (&open, "GET", "/v1/no-such-call", None, 401, "unauthorized"),
        (&open, "DELETE", "/healthz", None, 405, "method_not_allowed"),
        (
            &open,
            "POST",
            "/openapi.json",
            None,
            405,
            "method_not_allowed",
        ),
        (
            &api,
            "GET",
            "/v1/broadcast",
            None,
            405,
            "method_not_allowed",
        ),
        (
            &api,
            "PUT",
            "/v1/rooms/r/members",
            None,
            405,
            "method_not_allowed",
        ),
        (
            &api,
            "GET",
            "/v1/rooms/%FF/sockets",
            None,
            400,
            "invalid_request",
        ),
        (
            &api,
            "POST",
            "/v1/broadcast",
            Some(b"{".to_vec()),
            400,
            "invalid_request",
        ),
        (&api, "POST", "/v1/broadcast", None, 400, "invalid_request"),
        (
            &api,
            "POST",
            "/v1/broadcast",
            Some(big),
            413,
            "payload_too_large",
        ),
    ];
    for (client, method, path, body, status, code) in cases {
        let (got, answer) = client.send(method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(answer["error"], json!(code), "{method} {path}: {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {path}: {answer}"
        );
    }
    // The body with no Content-Type at all is still read as JSON.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/broadcast", r.url()))
        .bearer_auth("tok")
        .body(r#"{"event":"e","data":1}"#)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 202);
    // A 405 still says which methods the route takes.
    let resp = reqwest::Client::new()
        .delete(format!("{}/healthz", r.url()))
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 405);
    assert!(header(resp.headers(), "allow").is_some_and(|a| a.contains("GET")));
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let r = Replica::spawn("bearer", &[("API_TOKEN", "tok-123".into())]);
    let http = reqwest::Client::new();
    for (value, status) in [
        ("Bearer tok-123", 200),
        ("bearer tok-123", 200),
        ("BEARER tok-123", 200),
        ("Bearer   tok-123", 200),
        ("Basic tok-123", 401),
        ("Bearertok-123", 401),
        ("Bearer tok-12", 401),
        ("tok-123", 401),
    ] {
        let resp = http
            .get(format!("{}/v1/nodes", r.url()))
            .header("authorization", value)
            .send()
            .await
            .expect("answers");
        assert_eq!(resp.status().as_u16(), status, "{value:?}");
    }
}

#[tokio::test]
async fn the_openapi_description_lists_the_new_error_answers() {
    let r = Replica::spawn("openapi-errors", &[]);
    let (status, doc) = Api::new(&r.url(), None).get("/openapi.json").await;
    assert_eq!(status, 200);
    let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
    for code in ["forbidden", "not_found", "method_not_allowed"] {
        assert!(
            codes.as_array().is_some_and(|c| c.contains(&json!(code))),
            "{code} in {codes}"
        );
    }
    for (path, method) in [("/v1/broadcast", "post"), ("/v1/nodes", "get")] {
        let refused = &doc["paths"][path][method]["responses"]["403"];
        assert!(refused.is_object(), "{path} {method}: {refused}");
    }
}

#[tokio::test]
async fn the_client_helper_is_served_byte_for_byte_without_a_token() {
    // With an API token and a JWT secret: the helper is loaded by a page before it has either.
    let r = Replica::spawn(
        "client-helper",
        &[
            ("API_TOKEN", "tok".into()),
            ("JWT_SECRET", "a-secret-of-some-length".into()),
        ],
    );
    let file = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../clients/js/chorus.js"
    ))
    .expect("clients/js/chorus.js");
    let http = reqwest::Client::new();
    let url = format!("{}/client/chorus.js", r.url());
    let resp = http.get(&url).send().await.expect("answers");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/javascript; charset=utf-8")
    );
    assert_eq!(
        header(&headers, "cache-control"),
        Some("public, max-age=300")
    );
    let body = resp.bytes().await.expect("body");
    assert!(
        body.as_ref() == file.as_slice(),
        "served bytes differ from the repository file"
    );

    // Revalidation: the ETag answers 304 without a body.
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    let resp = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 304);
    assert_eq!(header(resp.headers(), "etag"), Some(etag.as_str()));
    assert!(resp.bytes().await.expect("body").is_empty());
    let resp = http
        .get(&url)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 200);

    // A page on an allowed origin may fetch it too (CORS_ORIGINS is `*` here).
    let (status, headers, _) = get(&http, &url, Some(APP)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
}
