//! Keep-alive HTTP/1.1 publisher for `POST /v1/broadcast` on hyper's connection-level
//! client: a fixed pool of connections per replica, one request in flight per connection
//! (no pipelining). Errors, timeouts and `Connection: close` reopen the connection, up to
//! a bound on reconnects per pool.
//!
//! Each pooled connection is a task taking requests from the pool's queue, and beside
//! it the task that drives its hyper connection. (Driving the connection inside the
//! request task instead, with both polled together, measured about 8% more CPU per
//! request: every wakeup polled both.)

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::Error;
use crate::schedule::SendState;

/// A keep-alive connection idle longer than this is reopened instead of reused: a
/// server closing idle connections could otherwise race with the next request.
const MAX_IDLE: Duration = Duration::from_millis(2500);
/// Connections opened per pool (the first ones included) before every further request
/// fails at once: a server that keeps refusing or dropping them ends the run's sending
/// instead of being hammered.
const MAX_RECONNECTS: u64 = 1000;
const PATH: &str = "/v1/broadcast";

/// The `Authorization` header for `token` (none when empty); an error when the token
/// cannot be sent in a header (the CLI checks `--token` with this).
pub fn auth_header(token: &str) -> Result<Option<HeaderValue>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    HeaderValue::try_from(format!("Bearer {token}"))
        .map(Some)
        .map_err(|_| Error::Usage("--token: not a valid HTTP header value".into()))
}

/// What every request of a pool carries besides its body.
struct Template {
    uri: Uri,
    host: HeaderValue,
    auth: Option<HeaderValue>,
}

impl Template {
    fn request(&self, body: String) -> Request<String> {
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            h.insert(AUTHORIZATION, auth.clone());
        }
        // Content-Length comes from the body's exact size.
        req
    }
}

/// One request: its JSON body, and which broadcast it carries.
struct Job {
    seq: u64,
    t_send: f64,
    body: String,
}

/// Keep-alive connections to one replica, fed from one queue.
pub struct HttpPool {
    tx: Option<mpsc::UnboundedSender<Job>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HttpPool {
    /// Opens `connections` connections to `addr` (`authority` is the Host header); each
    /// request, its connect included, gets `timeout`. Results go to `sends`.
    pub fn new(
        addr: SocketAddr,
        authority: &str,
        token: &str,
        connections: usize,
        timeout: Duration,
        sends: Arc<SendState>,
    ) -> Result<Self, Error> {
        let template = Arc::new(Template {
            uri: Uri::from_static(PATH),
            host: HeaderValue::try_from(authority)
                .map_err(|_| Error::Http(format!("host {authority:?} is not a header value")))?,
            auth: auth_header(token)?,
        });
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let reconnects = Arc::new(AtomicU64::new(0));
        let tasks = (0..connections.max(1))
            .map(|_| {
                let conn = Conn {
                    addr,
                    timeout,
                    open: None,
                    reconnects: reconnects.clone(),
                    template: template.clone(),
                };
                tokio::spawn(conn.run(rx.clone(), sends.clone()))
            })
            .collect();
        Ok(Self {
            tx: Some(tx),
            tasks,
        })
    }

    /// One pool per target, each request bounded at 10 s.
    pub fn per_target(
        targets: &[(crate::target::Target, SocketAddr)],
        token: &str,
        connections: usize,
        sends: &Arc<SendState>,
    ) -> Result<Vec<Self>, Error> {
        targets
            .iter()
            .map(|(t, addr)| {
                Self::new(
                    *addr,
                    &t.authority,
                    token,
                    connections,
                    Duration::from_secs(10),
                    sends.clone(),
                )
            })
            .collect()
    }

    /// Queues broadcast `seq` (already marked in flight) with its JSON body.
    pub fn post(&self, seq: u64, t_send: f64, body: String) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send(Job { seq, t_send, body }).is_ok())
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

/// An open keep-alive connection: hyper's request handle and the task driving the
/// connection, which ends with it.
struct Open {
    sender: SendRequest<String>,
    _driver: AbortOnDrop,
    last_used: Instant,
}

/// A task stopped when its handle goes: a connection given up on is closed at once, not
/// whenever hyper notices its request handle is gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a request got no status.
enum Failure {
    /// The connection closed before taking the request: nothing was sent, it may go
    /// on another connection.
    NotTaken(Request<String>),
    Error(Error),
}

impl From<hyper::Error> for Failure {
    fn from(e: hyper::Error) -> Self {
        Self::Error(e.into())
    }
}

struct Conn {
    addr: SocketAddr,
    timeout: Duration,
    open: Option<Open>,
    reconnects: Arc<AtomicU64>,
    template: Arc<Template>,
}

impl Conn {
    async fn run(mut self, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>, sends: Arc<SendState>) {
        // open before the first request, so the send window does not pay for it
        if let Ok(Ok(open)) = tokio::time::timeout(self.timeout, self.connect()).await {
            self.open = Some(open);
        }
        loop {
            let job = {
                let mut rx = rx.lock().await;
                rx.recv().await
            };
            let Some(job) = job else { return };
            let req = self.template.request(job.body);
            let res = tokio::time::timeout(self.timeout, self.exchange(req))
                .await
                .unwrap_or(Err(Error::Timeout {
                    what: "HTTP request",
                }));
            match res {
                Ok(202) => sends.ok(job.seq, job.t_send),
                Ok(code) => sends.fail(job.seq, format!("HTTP {code}")),
                Err(e) => {
                    self.open = None;
                    sends.fail(job.seq, e.to_string());
                    if self.reconnects.load(Ordering::Relaxed) <= MAX_RECONNECTS {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Open, Error> {
        if self.reconnects.fetch_add(1, Ordering::Relaxed) >= MAX_RECONNECTS {
            return Err(Error::Http("too many reconnects".into()));
        }
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        // its error, if any, is also the answer to the request it failed
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Open {
            sender,
            _driver: AbortOnDrop(driver),
            last_used: Instant::now(),
        })
    }

    /// Sends one request and reads its response; returns the status. A request that a
    /// closing connection did not take goes once more on a fresh one.
    async fn exchange(&mut self, mut req: Request<String>) -> Result<u16, Error> {
        for _ in 0..2 {
            let mut open = match self.open.take() {
                Some(o) if o.last_used.elapsed() <= MAX_IDLE && !o.sender.is_closed() => o,
                _ => self.connect().await?,
            };
            let res = request(&mut open.sender, req).await;
            if res.is_ok() && !open.sender.is_closed() {
                open.last_used = Instant::now();
                self.open = Some(open);
            }
            match res {
                Ok(status) => return Ok(status),
                Err(Failure::Error(e)) => return Err(e),
                Err(Failure::NotTaken(r)) => req = r,
            }
        }
        Err(Error::Http("connection closed before the request".into()))
    }
}

/// One request on an open connection; its status once the body is read.
async fn request(sender: &mut SendRequest<String>, req: Request<String>) -> Result<u16, Failure> {
    if sender.ready().await.is_err() {
        return Err(Failure::NotTaken(req));
    }
    let mut res = sender
        .try_send_request(req)
        .await
        .map_err(|mut e| match e.take_message() {
            Some(req) => Failure::NotTaken(req),
            None => Failure::from(e.into_error()),
        })?;
    let status = res.status().as_u16();
    // Only the status counts, but the body must be read for the connection to be reused.
    let body: &mut Incoming = res.body_mut();
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        frame?;
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the test server saw: connections accepted and request heads, in order.
    #[derive(Default)]
    struct Seen {
        connections: usize,
        heads: Vec<String>,
    }

    /// A real HTTP/1.1 server on a loopback port: request `n` (counted over all
    /// connections, from 0) is answered with `answer(n)`, or not at all if `None`.
    /// Requests are a head and a `Content-Length` body.
    async fn server(
        answer: fn(usize) -> Option<&'static [u8]>,
    ) -> (SocketAddr, Arc<std::sync::Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen2.clone();
                seen.lock().expect("lock").connections += 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..h]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() < h + 4 + len {
                                break;
                            }
                            buf.drain(..h + 4 + len);
                            let n_req = {
                                let mut seen = seen.lock().expect("lock");
                                seen.heads.push(head);
                                seen.heads.len() - 1
                            };
                            let Some(a) = answer(n_req) else { continue };
                            if s.write_all(a).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

    /// Posts `n` broadcasts through a pool of `conns` and waits until each is settled
    /// (the pool's own timeout bounds that).
    async fn post_all(addr: SocketAddr, conns: usize, n: u64, timeout: Duration) -> Arc<SendState> {
        let sends = Arc::new(SendState::new(n));
        let mut pool = HttpPool::new(
            addr,
            &addr.to_string(),
            "tok",
            conns,
            timeout,
            sends.clone(),
        )
        .expect("pool");
        for s in 0..n {
            sends.begin(s);
            assert!(pool.post(s, crate::clock::now_ms(), "{}".into()));
        }
        // each request is bounded by `timeout`; this bound only turns a bug into a failure
        tokio::time::timeout(timeout * (n as u32 + 2), async {
            while sends.inflight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every request settled");
        pool.close();
        sends
    }

    /// Keep-alive reuse, then a `Connection: close` answer: 5 requests on 2 connections,
    /// each with the request line and headers the server's API expects.
    #[tokio::test]
    async fn keep_alive_and_connection_close() {
        let (addr, seen) = server(|n| {
            Some(if n == 1 {
                b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
            } else {
                ACCEPTED
            })
        })
        .await;
        let sends = post_all(addr, 1, 5, Duration::from_secs(10)).await;
        assert_eq!(sends.sent(), 5, "errors: {:?}", sends.samples());
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.connections, 2);
        assert_eq!(seen.heads.len(), 5);
        let head = &seen.heads[0];
        assert!(
            head.starts_with("post /v1/broadcast http/1.1\r\n"),
            "{head}"
        );
        for h in [
            format!("host: {addr}"),
            "content-type: application/json".into(),
            "authorization: bearer tok".into(),
            "content-length: 2".into(),
        ] {
            assert!(head.lines().any(|l| l == h), "no {h:?} in {head}");
        }
    }

    /// Answers other than 202 count as failures with their status; a chunked answer is
    /// read to its end and the connection reused.
    #[tokio::test]
    async fn statuses_other_than_202_fail() {
        let (addr, seen) = server(|n| {
            Some(match n % 2 {
                0 => b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
                _ => b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{\"ok\":true}\r\n0\r\n\r\n",
            })
        })
        .await;
        let sends = post_all(addr, 1, 4, Duration::from_secs(10)).await;
        assert_eq!((sends.sent(), sends.errors()), (2, 2));
        assert_eq!(sends.samples(), ["HTTP 401", "HTTP 401"]);
        assert_eq!(seen.lock().expect("lock").connections, 1);
    }

    /// A server that never answers: each request fails with a timeout, and the next
    /// one goes on a fresh connection.
    #[tokio::test]
    async fn unanswered_requests_time_out() {
        let (addr, seen) = server(|_| None).await;
        let sends = post_all(addr, 1, 2, Duration::from_millis(300)).await;
        assert_eq!((sends.sent(), sends.errors()), (0, 2));
        assert_eq!(sends.samples()[0], "HTTP request timed out");
        assert_eq!(seen.lock().expect("lock").connections, 2);
    }

    /// Garbage instead of a response, and a refused connection: failures, not hangs.
    #[tokio::test]
    async fn bad_answers_and_refused_connections_fail() {
        let (addr, _) = server(|_| Some(b"SSH-2.0-OpenSSH\r\n\r\n")).await;
        let sends = post_all(addr, 1, 2, Duration::from_secs(10)).await;
        assert_eq!((sends.sent(), sends.errors()), (0, 2));
        assert!(
            sends.samples()[0].starts_with("http: "),
            "{:?}",
            sends.samples()
        );

        // a port that was free a moment ago: nothing listens there
        let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let sends = post_all(addr, 2, 3, Duration::from_secs(10)).await;
        assert_eq!((sends.sent(), sends.errors()), (0, 3));
        assert!(
            sends.samples()[0].starts_with("i/o: "),
            "{:?}",
            sends.samples()
        );
    }

    #[test]
    fn tokens_that_cannot_be_sent_are_refused() {
        assert_eq!(auth_header("").expect("empty is fine"), None);
        assert_eq!(
            auth_header("abc").expect("valid").expect("some"),
            "Bearer abc"
        );
        assert!(matches!(
            auth_header("a\r\nX-Evil: 1"),
            Err(Error::Usage(_))
        ));
    }
}
