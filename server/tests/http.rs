//! HTTP edges of one replica: browser origins on every entry (API, long-polling, websocket
//! upgrade).

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{Value, json};
use support::Replica;

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
