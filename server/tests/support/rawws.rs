//! A websocket client written out by hand, for what no well-behaved client library will do:
//! oversized and fragmented frames, never reading, thousands of events without waiting.
//! It speaks Engine.IO 4 / Socket.IO 5 text packets over RFC 6455 frames.

use std::time::Duration;

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

pub const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Close(Option<u16>),
    Other(u8),
}

pub struct RawWs {
    /// The server ended the stream (as opposed to a wait running out).
    pub ended: bool,
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
}

/// The header of a masked client frame.
pub fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![(u8::from(fin) << 7) | opcode];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if len <= 0xffff {
        h.push(0x80 | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    h.extend_from_slice(&MASK);
    h
}

fn masked(payload: &[u8]) -> Vec<u8> {
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ MASK[i % 4])
        .collect()
}

impl RawWs {
    /// Opens `/socket.io/?EIO=4&transport=websocket` on `tcp` (already connected) with
    /// `extra` request headers; Err holds the status line when the answer is not 101.
    pub async fn upgrade(mut tcp: TcpStream, port: u16, extra: &str) -> Result<Self, String> {
        let request = format!(
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_owned();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        let (rd, wr) = tcp.into_split();
        Ok(Self {
            ended: false,
            rd,
            wr: Some(wr),
            buf: buf[head_end..].to_vec(),
        })
    }

    pub async fn open(port: u16) -> Self {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Self::upgrade(tcp, port, "").await.expect("websocket opens")
    }

    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        let mut frame = header(true, 1, text.len() as u64);
        frame.extend(masked(text.as_bytes()));
        self.send_raw(&frame).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.wr {
            Some(wr) => wr.write_all(bytes).await,
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// The sending half, for a task that writes while this one reads.
    pub fn take_writer(&mut self) -> OwnedWriteHalf {
        self.wr.take().expect("writer not taken yet")
    }

    /// The next frame, answering Engine.IO pings on the way; None on end of stream or after
    /// `wait` without a frame.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if let Some(frame) = self.parse() {
                if frame == Frame::Text("2".into()) {
                    let _ = self.send_text("3").await;
                    continue;
                }
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout(wait, self.rd.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => {
                    self.ended = true;
                    return None;
                }
                Err(_elapsed) => return None,
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text packet (skipping nothing else): panics on a close or silence.
    pub async fn next_text(&mut self, wait: Duration) -> String {
        match self.next_frame(wait).await {
            Some(Frame::Text(t)) => t,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads frames until a close frame (returning its code) or the end of the stream.
    pub async fn until_closed(&mut self, wait: Duration) -> Option<u16> {
        loop {
            match self.next_frame(wait).await {
                Some(Frame::Close(code)) => return code,
                Some(_) => continue,
                None => return None,
            }
        }
    }

    fn parse(&mut self) -> Option<Frame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, start) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l), 10)
            }
            126 | 127 => return None,
            n => (u64::from(n), 2),
        };
        let end = start + len as usize;
        if b.len() < end {
            return None;
        }
        let payload = b[start..end].to_vec();
        let opcode = b[0] & 0x0f;
        self.buf.drain(..end);
        Some(match opcode {
            1 => Frame::Text(String::from_utf8_lossy(&payload).into_owned()),
            8 => Frame::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            other => Frame::Other(other),
        })
    }

    /// Engine.IO open, then Socket.IO CONNECT to `/` with `auth`; returns the CONNECT answer
    /// (`40{"sid":..}` or `44{"message":..}`).
    pub async fn sio_connect(&mut self, auth: Option<&Value>) -> String {
        let open = self.next_text(Duration::from_secs(5)).await;
        assert!(open.starts_with('0'), "engine open packet: {open}");
        let connect = match auth {
            Some(a) => format!("40{a}"),
            None => "40".to_owned(),
        };
        self.send_text(&connect).await.expect("send CONNECT");
        self.next_text(Duration::from_secs(5)).await
    }
}
