//! Minimal keep-alive HTTP/1.1 client for `POST /v1/broadcast`: a fixed pool of
//! connections per replica, one request in flight per connection (no pipelining).
//! Reads the status line, headers and a Content-Length (or small chunked) body;
//! `Connection: close`, errors and timeouts reopen the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::Error;
use crate::schedule::SendState;

/// A keep-alive connection idle longer than this is reopened instead of reused: a
/// server closing idle connections could otherwise race with the next request.
const MAX_IDLE: Duration = Duration::from_millis(2500);
/// Reconnects per pool before every further request fails at once.
const MAX_RECONNECTS: u64 = 1000;
const MAX_HEADERS: usize = 64;
const MAX_RESPONSE: usize = 1 << 20;

/// A complete response at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// bytes of the buffer this response took
    pub consumed: usize,
    /// the connection cannot be reused
    pub close: bool,
}

/// Parses a response from `buf`: `Ok(None)` while incomplete. Without Content-Length
/// or chunked framing the body runs to the end of the connection; only the status is
/// needed, so the response counts as complete at the end of its headers and the
/// connection as closed.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Http(format!("bad response: {e}"))),
    };
    let status = res
        .code
        .ok_or_else(|| Error::Http("no status code".into()))?;
    let mut close = res.version == Some(0);
    let mut content_length = None;
    let mut chunked = false;
    for h in res.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| Error::Http("non-UTF-8 header".into()))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| Error::Http(format!("bad Content-Length {value:?}")))?;
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let body = &buf[head_len..];
    if chunked {
        return Ok(chunked_len(body)?.map(|n| Response {
            status,
            consumed: head_len + n,
            close,
        }));
    }
    match content_length {
        Some(n) if body.len() < n => Ok(None),
        Some(n) => Ok(Some(Response {
            status,
            consumed: head_len + n,
            close,
        })),
        None if status == 204 || status == 304 || (100..200).contains(&status) => {
            Ok(Some(Response {
                status,
                consumed: head_len,
                close,
            }))
        }
        None => Ok(Some(Response {
            status,
            consumed: buf.len(),
            close: true,
        })),
    }
}

/// Length of a complete chunked body at the front of `b`, `None` while incomplete.
fn chunked_len(b: &[u8]) -> Result<Option<usize>, Error> {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&b[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&b[pos..pos + eol])
            .map_err(|_| Error::Http("bad chunk size".into()))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| Error::Http(format!("bad chunk size {size_hex:?}")))?;
        pos += eol + 2;
        if size == 0 {
            // optional trailers, then an empty line
            let rest = &b[pos..];
            if rest.starts_with(b"\r\n") {
                return Ok(Some(pos + 2));
            }
            return Ok(find(rest, b"\r\n\r\n").map(|k| pos + k + 4));
        }
        if b.len() < pos + size + 2 {
            return Ok(None);
        }
        pos += size + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request: the raw bytes, and which broadcast it carries.
struct Job {
    seq: u64,
    t_send: f64,
    raw: Vec<u8>,
}

/// Keep-alive connections to one replica, fed from one queue.
pub struct HttpPool {
    tx: Option<mpsc::UnboundedSender<Job>>,
    head: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HttpPool {
    /// Opens `connections` connections to `addr`; results go to `sends`.
    pub fn new(
        addr: SocketAddr,
        authority: &str,
        token: &str,
        connections: usize,
        timeout: Duration,
        sends: Arc<SendState>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let reconnects = Arc::new(AtomicU64::new(0));
        let tasks = (0..connections.max(1))
            .map(|_| {
                let conn = Conn {
                    addr,
                    timeout,
                    stream: None,
                    last_used: Instant::now(),
                    buf: Vec::with_capacity(1024),
                    reconnects: reconnects.clone(),
                };
                tokio::spawn(conn.run(rx.clone(), sends.clone()))
            })
            .collect();
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        let head = format!(
            "POST /v1/broadcast HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n{auth}Content-Length: "
        );
        Self {
            tx: Some(tx),
            head,
            tasks,
        }
    }

    /// Queues broadcast `seq` (already marked in flight) with its JSON body.
    pub fn post(&self, seq: u64, t_send: f64, body: &str) -> bool {
        let mut raw = Vec::with_capacity(self.head.len() + body.len() + 16);
        raw.extend_from_slice(self.head.as_bytes());
        raw.extend_from_slice(body.len().to_string().as_bytes());
        raw.extend_from_slice(b"\r\n\r\n");
        raw.extend_from_slice(body.as_bytes());
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send(Job { seq, t_send, raw }).is_ok())
    }

    /// Stops every connection; requests without an answer stay in flight for the
    /// caller to settle.
    pub fn close(&mut self) {
        self.tx = None;
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for HttpPool {
    fn drop(&mut self) {
        self.close();
    }
}

struct Conn {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    last_used: Instant,
    buf: Vec<u8>,
    reconnects: Arc<AtomicU64>,
}

impl Conn {
    async fn run(mut self, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>, sends: Arc<SendState>) {
        // open before the first request, so the send window does not pay for it
        let _ = self.ensure_open().await;
        loop {
            let job = {
                let mut rx = rx.lock().await;
                rx.recv().await
            };
            let Some(job) = job else { return };
            match self.exchange(&job.raw).await {
                Ok(202) => sends.ok(job.seq, job.t_send),
                Ok(code) => sends.fail(job.seq, format!("HTTP {code}")),
                Err(e) => {
                    self.stream = None;
                    sends.fail(job.seq, e.to_string());
                    if self.reconnects.load(Ordering::Relaxed) <= MAX_RECONNECTS {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn ensure_open(&mut self) -> Result<(), Error> {
        if self.stream.is_some() && self.last_used.elapsed() > MAX_IDLE {
            self.stream = None;
        }
        if self.stream.is_some() {
            return Ok(());
        }
        if self.reconnects.fetch_add(1, Ordering::Relaxed) > MAX_RECONNECTS {
            return Err(Error::Http("too many reconnects".into()));
        }
        let s = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| Error::Timeout {
                what: "HTTP connect",
            })??;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.buf.clear();
        self.last_used = Instant::now();
        Ok(())
    }

    /// Sends one request and reads its response; returns the status.
    async fn exchange(&mut self, raw: &[u8]) -> Result<u16, Error> {
        self.ensure_open().await?;
        let timeout = self.timeout;
        let res = tokio::time::timeout(timeout, self.exchange_open(raw))
            .await
            .map_err(|_| Error::Timeout {
                what: "HTTP request",
            })?;
        self.last_used = Instant::now();
        res
    }

    async fn exchange_open(&mut self, raw: &[u8]) -> Result<u16, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Http("not connected".into()));
        };
        stream.write_all(raw).await?;
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(Error::Http("connection closed".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(r) = parse_response(&self.buf)? {
                if r.close || r.consumed < self.buf.len() {
                    // closing, or bytes we did not ask for: start afresh
                    self.stream = None;
                }
                self.buf.clear();
                return Ok(r.status);
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(Error::Http("response too large".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
        assert_eq!(
            parse_response(raw).expect("valid"),
            Some(Response {
                status: 202,
                consumed: raw.len(),
                close: false
            })
        );
        // incomplete head, incomplete body
        assert_eq!(parse_response(&raw[..20]).expect("valid"), None);
        assert_eq!(parse_response(&raw[..raw.len() - 1]).expect("valid"), None);
    }

    #[test]
    fn connection_close_and_http10() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let r = parse_response(raw).expect("valid").expect("complete");
        assert_eq!((r.status, r.close), (401, true));
        let raw = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert!(parse_response(raw).expect("valid").expect("complete").close);
        let raw = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
        assert!(!parse_response(raw).expect("valid").expect("complete").close);
    }

    #[test]
    fn chunked_response() {
        let raw = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{\"ok\":true}\r\n0\r\n\r\n";
        let r = parse_response(raw).expect("valid").expect("complete");
        assert_eq!((r.status, r.consumed), (202, raw.len()));
        assert_eq!(parse_response(&raw[..raw.len() - 2]).expect("valid"), None);
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad).is_err());
    }

    #[test]
    fn unframed_body_reads_to_close() {
        let raw = b"HTTP/1.1 500 Internal Server Error\r\n\r\noops";
        let r = parse_response(raw).expect("valid").expect("complete");
        assert_eq!((r.status, r.close), (500, true));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 202 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    /// Against a real socket: keep-alive reuse, then a `Connection: close` answer.
    #[tokio::test]
    async fn pool_against_a_tiny_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n_req = 0;
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // one request = head + "{}" body (Content-Length: 2)
                        while let Some(h) = find(&buf, b"\r\n\r\n") {
                            if buf.len() < h + 6 {
                                break;
                            }
                            buf.drain(..h + 6);
                            n_req += 1;
                            let answer: &[u8] = if n_req == 2 {
                                b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
                            } else {
                                b"HTTP/1.1 202 Accepted\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
                            };
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let sends = Arc::new(SendState::new(5));
        let mut pool = HttpPool::new(
            addr,
            &addr.to_string(),
            "tok",
            1,
            Duration::from_secs(5),
            sends.clone(),
        );
        for s in 0..5 {
            sends.begin(s);
            assert!(pool.post(s, crate::clock::now_ms(), "{}"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while sends.inflight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pool.close();
        assert_eq!(sends.sent(), 5, "errors: {:?}", sends.samples());
    }
}
