//! Minimal Engine.IO v4 / Socket.IO v5 client over the websocket transport, default
//! namespace only: frame parsing, the bench event's data, and the connect handshake.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Error;
use crate::target::Target;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown engine.io packet type {0:?}")]
    EngineType(char),
    #[error("unknown socket.io packet type {0:?}")]
    SocketType(char),
    #[error("binary socket.io packets are not supported")]
    Binary,
    #[error("namespace {0:?} (only the default namespace is used)")]
    Namespace(String),
    #[error("bad ack id")]
    AckId,
    #[error("socket.io payload is not a JSON array")]
    Payload,
}

/// An Engine.IO packet (one websocket text message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0{...}` handshake
    Open(&'a str),
    /// `1`
    Close,
    /// `2` (answered with `3`)
    Ping(&'a str),
    /// `3`
    Pong(&'a str),
    /// `4...` a Socket.IO packet
    Message(SioPacket<'a>),
    /// `5`
    Upgrade,
    /// `6`
    Noop,
}

/// A Socket.IO packet of the default namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SioPacket<'a> {
    /// `0{"sid":...}`
    Connect(&'a str),
    /// `1`
    Disconnect,
    /// `2[<id>]["event",...]`
    Event { id: Option<u64>, payload: &'a str },
    /// `3<id>[...]`
    Ack { id: u64, payload: &'a str },
    /// `4{"message":...}`
    ConnectError(&'a str),
}

/// Parses one websocket text message.
pub fn parse_packet(text: &str) -> Result<Packet<'_>, FrameError> {
    let first = *text.as_bytes().first().ok_or(FrameError::Empty)?;
    // the type is one ASCII digit; anything else (a multi-byte char too) is an error
    let Some(rest) = text.get(1..).filter(|_| first.is_ascii_digit()) else {
        return Err(FrameError::EngineType(first_char(text)));
    };
    Ok(match first {
        b'0' => Packet::Open(rest),
        b'1' => Packet::Close,
        b'2' => Packet::Ping(rest),
        b'3' => Packet::Pong(rest),
        b'4' => Packet::Message(parse_sio(rest)?),
        b'5' => Packet::Upgrade,
        b'6' => Packet::Noop,
        _ => return Err(FrameError::EngineType(first_char(text))),
    })
}

fn first_char(s: &str) -> char {
    s.chars().next().unwrap_or('\0')
}

fn parse_sio(s: &str) -> Result<SioPacket<'_>, FrameError> {
    let kind = *s.as_bytes().first().ok_or(FrameError::Empty)?;
    let Some(mut rest) = s.get(1..).filter(|_| kind.is_ascii_digit()) else {
        return Err(FrameError::SocketType(first_char(s)));
    };
    if matches!(kind, b'5' | b'6') {
        return Err(FrameError::Binary);
    }
    if rest.starts_with('/') {
        let (nsp, after) = match rest.find(',') {
            Some(c) => (&rest[..c], &rest[c + 1..]),
            None => (rest, ""),
        };
        if nsp != "/" {
            return Err(FrameError::Namespace(nsp.to_owned()));
        }
        rest = after;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        Some(
            rest[..digits]
                .parse::<u64>()
                .map_err(|_| FrameError::AckId)?,
        )
    } else {
        None
    };
    let payload = &rest[digits..];
    Ok(match kind {
        b'0' => SioPacket::Connect(payload),
        b'1' => SioPacket::Disconnect,
        b'2' => {
            if !payload.starts_with('[') {
                return Err(FrameError::Payload);
            }
            SioPacket::Event { id, payload }
        }
        b'3' => {
            let id = id.ok_or(FrameError::AckId)?;
            if !payload.starts_with('[') {
                return Err(FrameError::Payload);
            }
            SioPacket::Ack { id, payload }
        }
        b'4' => SioPacket::ConnectError(payload),
        _ => return Err(FrameError::SocketType(first_char(s))),
    })
}

/// The data of one bench broadcast, as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub s: u64,
    pub t: f64,
    pub i: f64,
    pub r: u64,
    pub m: u64,
    pub x: i64,
    /// length of the padding string
    pub p_len: usize,
}

/// The bench data as sent; `P` is `&str` on the fast path (borrowed from the frame) and
/// `String` when it comes out of a parsed array.
#[derive(Deserialize)]
struct WireData<P> {
    s: u64,
    t: f64,
    i: f64,
    r: u64,
    m: u64,
    x: i64,
    p: P,
}

impl<P: AsRef<str>> WireData<P> {
    fn into_delivery(self) -> Delivery {
        Delivery {
            s: self.s,
            t: self.t,
            i: self.i,
            r: self.r,
            m: self.m,
            x: self.x,
            p_len: self.p.as_ref().chars().count(),
        }
    }
}

/// What an event packet turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Bench(Delivery),
    /// another event name: ignored
    Other,
    /// the bench event with data that is not the bench object
    Malformed,
}

/// Recognises the bench event in an event payload (`["bench",{...}]`) without
/// building a JSON tree: a prefix check and one borrowed deserialisation.
#[derive(Debug, Clone)]
pub struct EventMatcher {
    event: String,
    prefix: String,
}

impl EventMatcher {
    pub fn new(event: &str) -> Self {
        let name = serde_json::to_string(event).unwrap_or_else(|_| format!("\"{event}\""));
        Self {
            event: event.to_owned(),
            prefix: format!("[{name},"),
        }
    }

    pub fn classify(&self, payload: &str) -> EventKind {
        if let Some(inner) = payload
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_suffix(']'))
        {
            // The data, then possibly more arguments (chorus' `{id, offset}` of a room
            // message): only the data is read.
            let mut values =
                serde_json::Deserializer::from_str(inner).into_iter::<WireData<&str>>();
            if let Some(Ok(d)) = values.next() {
                let rest = &inner[values.byte_offset()..];
                if rest.is_empty() || rest.starts_with(',') {
                    return EventKind::Bench(d.into_delivery());
                }
            }
        }
        self.classify_slow(payload)
    }

    // Other spacing, escapes in the padding, other events: parse the array.
    fn classify_slow(&self, payload: &str) -> EventKind {
        let Ok(mut arr) = serde_json::from_str::<Vec<serde_json::Value>>(payload) else {
            return EventKind::Malformed;
        };
        match arr.first() {
            Some(serde_json::Value::String(name)) if *name == self.event => {}
            Some(serde_json::Value::String(_)) => return EventKind::Other,
            _ => return EventKind::Malformed,
        }
        if arr.len() < 2 {
            return EventKind::Malformed;
        }
        match serde_json::from_value::<WireData<String>>(arr.swap_remove(1)) {
            Ok(d) => EventKind::Bench(d.into_delivery()),
            Err(_) => EventKind::Malformed,
        }
    }
}

#[derive(Deserialize)]
struct AckBody {
    ok: bool,
}

/// Whether an ack payload is `[{"ok":true, ...}]`.
pub fn ack_ok(payload: &str) -> bool {
    matches!(
        serde_json::from_str::<(AckBody,)>(payload),
        Ok((AckBody { ok: true },))
    )
}

/// The next text frame (other frames are skipped); an error once the connection is over.
pub async fn next_text(ws: &mut Ws) -> Result<tokio_tungstenite::tungstenite::Utf8Bytes, Error> {
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| Error::Protocol("connection closed".into()))??;
        if let Message::Text(text) = msg {
            return Ok(text);
        }
    }
}

/// `42<id>[<event>,<arg>]`: an event with an ack request; `arg_json` is already JSON.
pub fn emit_with_ack(id: u64, event: &str, arg_json: &str) -> String {
    let name = serde_json::to_string(event).unwrap_or_else(|_| format!("\"{event}\""));
    format!("42{id}[{name},{arg_json}]")
}

/// Per-connection websocket buffers: small, since every message here is small and
/// thousands of connections may be open. tungstenite zero-fills the free part of its
/// read buffer (up to this size) before every read, i.e. about twice per message here,
/// so a large buffer costs CPU on every delivery, not only memory.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Opens a websocket to `target`, completes the Engine.IO handshake and connects to
/// the default namespace (no auth payload, like loadgen.js). Returns the socket id.
pub async fn connect(
    target: &Target,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<(Ws, String), Error> {
    tokio::time::timeout(timeout, connect_inner(target, addr))
        .await
        .map_err(|_| Error::Timeout { what: "connect" })?
}

async fn connect_inner(target: &Target, addr: std::net::SocketAddr) -> Result<(Ws, String), Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(target.ws_url(), tcp, Some(ws_config()))
            .await?;
    let mut opened = false;
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| Error::Protocol("closed during the handshake".into()))??;
        let Message::Text(text) = msg else { continue };
        match parse_packet(text.as_str())? {
            Packet::Open(_) if !opened => {
                opened = true;
                ws.send(Message::text("40")).await?;
            }
            Packet::Ping(p) => ws.send(Message::text(format!("3{p}"))).await?,
            Packet::Message(SioPacket::Connect(body)) if opened => {
                #[derive(Deserialize)]
                struct Sid {
                    sid: String,
                }
                let sid = serde_json::from_str::<Sid>(body)
                    .map(|s| s.sid)
                    .unwrap_or_default();
                return Ok((ws, sid));
            }
            Packet::Message(SioPacket::ConnectError(body)) => {
                return Err(Error::Protocol(format!("connect refused: {body}")));
            }
            Packet::Close => {
                return Err(Error::Protocol(
                    "engine.io close during the handshake".into(),
                ));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        assert_eq!(parse_packet("2"), Ok(Packet::Ping("")));
        assert_eq!(parse_packet("3probe"), Ok(Packet::Pong("probe")));
        assert_eq!(parse_packet("1"), Ok(Packet::Close));
        assert_eq!(parse_packet("6"), Ok(Packet::Noop));
        assert_eq!(
            parse_packet(r#"0{"sid":"abc","pingInterval":25000}"#),
            Ok(Packet::Open(r#"{"sid":"abc","pingInterval":25000}"#))
        );
        assert_eq!(parse_packet(""), Err(FrameError::Empty));
        assert_eq!(parse_packet("x"), Err(FrameError::EngineType('x')));
        assert_eq!(parse_packet("é"), Err(FrameError::EngineType('é')));
        assert_eq!(parse_packet("4é"), Err(FrameError::SocketType('é')));
        assert_eq!(parse_packet("42é"), Err(FrameError::Payload));
    }

    #[test]
    fn socket_packets() {
        assert_eq!(
            parse_packet(r#"40{"sid":"s1"}"#),
            Ok(Packet::Message(SioPacket::Connect(r#"{"sid":"s1"}"#)))
        );
        assert_eq!(
            parse_packet(r#"42["bench",{"s":1}]"#),
            Ok(Packet::Message(SioPacket::Event {
                id: None,
                payload: r#"["bench",{"s":1}]"#
            }))
        );
        assert_eq!(
            parse_packet(r#"4217["join","bench-3"]"#),
            Ok(Packet::Message(SioPacket::Event {
                id: Some(17),
                payload: r#"["join","bench-3"]"#
            }))
        );
        assert_eq!(
            parse_packet(r#"4312[{"ok":true}]"#),
            Ok(Packet::Message(SioPacket::Ack {
                id: 12,
                payload: r#"[{"ok":true}]"#
            }))
        );
        assert_eq!(
            parse_packet(r#"42/,["x"]"#),
            Ok(Packet::Message(SioPacket::Event {
                id: None,
                payload: r#"["x"]"#
            }))
        );
        assert_eq!(
            parse_packet("41"),
            Ok(Packet::Message(SioPacket::Disconnect))
        );
        assert!(matches!(
            parse_packet(r#"44{"message":"no"}"#),
            Ok(Packet::Message(SioPacket::ConnectError(_)))
        ));
    }

    #[test]
    fn malformed_socket_packets_are_errors() {
        assert_eq!(parse_packet("4"), Err(FrameError::Empty));
        assert_eq!(parse_packet("43[{}]"), Err(FrameError::AckId));
        assert_eq!(
            parse_packet("4399999999999999999999[1]"),
            Err(FrameError::AckId)
        );
        assert_eq!(parse_packet("42{}"), Err(FrameError::Payload));
        assert_eq!(parse_packet("451-[\"x\"]"), Err(FrameError::Binary));
        assert_eq!(parse_packet("49"), Err(FrameError::SocketType('9')));
        assert_eq!(
            parse_packet(r#"42/chat,["x"]"#),
            Err(FrameError::Namespace("/chat".into()))
        );
    }

    fn bench(s: u64) -> Delivery {
        Delivery {
            s,
            t: 12.5,
            i: 11.25,
            r: 3,
            m: 1,
            x: -1,
            p_len: 4,
        }
    }

    #[test]
    fn bench_event_fast_and_slow_paths() {
        let m = EventMatcher::new("bench");
        let fast = r#"["bench",{"s":7,"t":12.5,"i":11.25,"r":3,"m":1,"x":-1,"p":"xxxx"}]"#;
        assert_eq!(m.classify(fast), EventKind::Bench(bench(7)));
        // keys re-ordered (a server that re-serialises), spaces, escapes
        let slow = r#"[ "bench" , {"i":11.25,"m":1,"p":"x\u0078xx","r":3,"s":8,"t":12.5,"x":-1} ]"#;
        assert_eq!(m.classify(slow), EventKind::Bench(bench(8)));
        // A room message with history on: the data, then {id, offset}.
        let with_meta = r#"["bench",{"s":9,"t":12.5,"i":11.25,"r":3,"m":1,"x":-1,"p":"xxxx"},{"id":"ab","offset":"1-2-3"}]"#;
        assert_eq!(m.classify(with_meta), EventKind::Bench(bench(9)));
        assert_eq!(m.classify(r#"["other",{"s":1}]"#), EventKind::Other);
        assert_eq!(m.classify(r#"["bench",{"s":-1}]"#), EventKind::Malformed);
        assert_eq!(m.classify(r#"["bench"]"#), EventKind::Malformed);
        assert_eq!(m.classify(r#"["bench",{"s":1,"t":"#), EventKind::Malformed);
        assert_eq!(m.classify("[1,2]"), EventKind::Malformed);
        assert_eq!(m.classify("not json"), EventKind::Malformed);
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let m = EventMatcher::new("bench");
        let seeds = [
            r#"42["bench",{"s":1,"t":2,"i":3,"r":0,"m":1,"x":-1,"p":"é"}]"#,
            r#"4312[{"ok":true}]"#,
            r#"40/é,{"sid":"x"}"#,
            "0{\"sid\":\"ü\"}",
        ];
        for seed in seeds {
            // every prefix, and every prefix with a multi-byte character appended
            for (k, _) in seed.char_indices().chain([(seed.len(), ' ')]) {
                for text in [seed[..k].to_owned(), format!("{}é", &seed[..k])] {
                    if let Ok(Packet::Message(SioPacket::Event { payload, .. })) =
                        parse_packet(&text)
                    {
                        let _ = m.classify(payload);
                    }
                    let _ = ack_ok(&text);
                }
            }
        }
    }

    #[test]
    fn acks_and_emits() {
        assert!(ack_ok(r#"[{"ok":true}]"#));
        assert!(!ack_ok(r#"[{"ok":false,"error":"no"}]"#));
        assert!(!ack_ok(r#"[]"#));
        assert!(!ack_ok(r#"[{"ok":true},2]"#));
        assert!(!ack_ok("garbage"));
        assert_eq!(
            emit_with_ack(3, "join", r#""bench-1""#),
            r#"423["join","bench-1"]"#
        );
    }
}
