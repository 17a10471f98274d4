//! The byte stream under every HTTP connection, and what it enforces once the connection has
//! become a websocket:
//! - a frame or fragmented message over `MAX_PAYLOAD` is refused from its header, before its
//!   payload is read: the client gets close code 1009 and the connection ends;
//! - bytes the client does not take wait here, up to `SOCKET_BUFFER_BYTES`; beyond that the
//!   connection is closed and counted as a slow socket. The Socket.IO writer never waits on a
//!   slow client, so its queue never fills and no message is dropped silently: a socket gets
//!   every message, or is disconnected (and its client can resume).

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use super::frames::{CLOSE_MESSAGE_TOO_BIG, FrameScanner, TooBig};
use crate::metrics::{Limit, Metrics};

/// How long a closed connection may still take to accept the bytes waiting for it.
const LINGER: Duration = Duration::from_secs(5);
/// After a refused message, how long its remaining bytes are read and discarded, so that the
/// close frame is not lost to a reset.
const DISCARD: Duration = Duration::from_secs(1);
/// A drained buffer larger than this is released rather than kept for the next burst.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Largest websocket frame or message from a client (`MAX_PAYLOAD`).
    pub ws_message: u64,
    /// Bytes that may wait for a websocket client (`SOCKET_BUFFER_BYTES`).
    pub socket_buffer: usize,
}

/// One accepted connection. Reads and writes go straight to the socket; a websocket's writes
/// that the socket cannot take at once wait in a bounded buffer, written out by a task.
pub struct ConnStream {
    tcp: Arc<TcpStream>,
    shared: Arc<Shared>,
}

/// What the connection's stream, its flushing task and its HTTP timer share.
pub struct Shared {
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    reads: AtomicU64,
    state: Mutex<State>,
    /// Notified when the stream is dropped (its connection is over).
    dropped: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Http,
    WebSocket,
}

#[derive(Debug, Clone, Copy)]
enum Failed {
    TooBig,
    Slow,
}

impl Failed {
    fn error(self) -> io::Error {
        match self {
            Failed::TooBig => io::Error::new(
                io::ErrorKind::InvalidData,
                "websocket message over MAX_PAYLOAD",
            ),
            Failed::Slow => io::Error::new(
                io::ErrorKind::TimedOut,
                "client fell more than SOCKET_BUFFER_BYTES behind",
            ),
        }
    }
}

struct State {
    mode: Mode,
    inbound: FrameScanner,
    outbound: FrameScanner,
    pending: VecDeque<u8>,
    flushing: bool,
    /// Nothing more may be written (a close frame was queued, or the client was dropped).
    write_closed: bool,
    shutdown_wanted: bool,
    failed: Option<Failed>,
    dropped_at: Option<Instant>,
    read_waker: Option<Waker>,
}

impl ConnStream {
    pub fn new(tcp: TcpStream, limits: StreamLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            tcp: Arc::new(tcp),
            shared: Arc::new(Shared {
                limits,
                metrics,
                reads: AtomicU64::new(0),
                state: Mutex::new(State {
                    mode: Mode::Http,
                    inbound: FrameScanner::default(),
                    outbound: FrameScanner::default(),
                    pending: VecDeque::new(),
                    flushing: false,
                    write_closed: false,
                    shutdown_wanted: false,
                    failed: None,
                    dropped_at: None,
                    read_waker: None,
                }),
                dropped: tokio::sync::Notify::new(),
            }),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The socket, for [`abort`] from outside the stream.
    pub fn tcp(&self) -> Arc<TcpStream> {
        self.tcp.clone()
    }
}

/// Ends the connection in both directions at once, whoever holds its stream: the client sees
/// its transport close (and reconnects), the server side reads the end of the stream.
pub fn abort(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
}

impl Shared {
    /// True once the connection has become a websocket.
    pub fn is_websocket(&self) -> bool {
        self.lock().mode == Mode::WebSocket
    }

    /// Resolves once the stream has been dropped (at once if it already was).
    pub async fn dropped(&self) {
        self.dropped.notified().await;
    }

    /// Reads that returned data so far (the HTTP timer tells idle from slow with it).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ConnStream {
    fn drop(&mut self) {
        self.shared.lock().dropped_at = Some(Instant::now());
        // Stores a permit when nobody waits yet.
        self.shared.dropped.notify_one();
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut st = this.shared.lock();
            if let Some(failed) = st.failed {
                return Poll::Ready(Err(failed.error()));
            }
            if st.mode == Mode::WebSocket
                && !st
                    .read_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
            {
                st.read_waker = Some(cx.waker().clone());
            }
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let n = match this.tcp.try_read(unfilled) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n > 0 {
                this.shared.reads.fetch_add(1, Ordering::Relaxed);
                let mut st = this.shared.lock();
                if st.mode == Mode::WebSocket
                    && let Err(TooBig { size }) = st
                        .inbound
                        .feed(&unfilled[..n], this.shared.limits.ws_message)
                {
                    tracing::debug!(size, "websocket message over MAX_PAYLOAD: closing (1009)");
                    this.shared.metrics.limit_hit(Limit::max_payload);
                    refuse_too_big(&this.tcp, &this.shared, &mut st);
                    return Poll::Ready(Err(Failed::TooBig.error()));
                }
            }
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.shared.lock();
        if let Some(failed) = st.failed {
            return Poll::Ready(Err(failed.error()));
        }
        if st.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if st.mode == Mode::WebSocket {
            return Poll::Ready(write_websocket(&this.tcp, &this.shared, &mut st, buf));
        }
        loop {
            ready!(this.tcp.poll_write_ready(cx))?;
            match this.tcp.try_write(buf) {
                Ok(n) => {
                    // Only Socket.IO's websocket upgrade answers 101; what follows it is
                    // websocket frames (hyper writes a response head in one piece).
                    if buf.starts_with(b"HTTP/1.1 101 ") && n == buf.len() {
                        st.mode = Mode::WebSocket;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered in HTTP mode; a websocket's waiting bytes are the flusher's.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.shared.lock();
        if st.pending.is_empty() {
            shutdown_write(&this.tcp);
        } else {
            st.shutdown_wanted = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Accepts a websocket write: straight to the socket when nothing waits, else behind the
/// waiting bytes, up to the limit.
fn write_websocket(
    tcp: &Arc<TcpStream>,
    shared: &Arc<Shared>,
    st: &mut State,
    buf: &[u8],
) -> io::Result<usize> {
    // Frames are written whole or buffered whole, so the scanner sees the stream's order.
    let _ = st.outbound.feed(buf, u64::MAX);
    let mut rest = buf;
    if st.pending.is_empty() {
        match tcp.try_write(buf) {
            Ok(n) => rest = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if rest.is_empty() {
        return Ok(buf.len());
    }
    if st.pending.len() + rest.len() > shared.limits.socket_buffer {
        tracing::debug!(
            waiting = st.pending.len() + rest.len(),
            "socket fell behind SOCKET_BUFFER_BYTES: disconnecting"
        );
        shared.metrics.slow_socket_disconnects.inc();
        shared.metrics.limit_hit(Limit::socket_buffer_bytes);
        st.failed = Some(Failed::Slow);
        st.write_closed = true;
        st.pending = VecDeque::new();
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        return Err(Failed::Slow.error());
    }
    st.pending.extend(rest);
    if !st.flushing {
        st.flushing = true;
        tokio::spawn(flush(tcp.clone(), shared.clone()));
    }
    Ok(buf.len())
}

/// Queues the 1009 close frame (when no outgoing frame is half written), ends writing, and
/// reads away what the client still sends for a moment so the close frame is delivered.
fn refuse_too_big(tcp: &Arc<TcpStream>, shared: &Arc<Shared>, st: &mut State) {
    st.failed = Some(Failed::TooBig);
    if st.outbound.at_boundary() && !st.write_closed {
        if st.pending.is_empty() {
            match tcp.try_write(&CLOSE_MESSAGE_TOO_BIG) {
                Ok(n) => st.pending.extend(&CLOSE_MESSAGE_TOO_BIG[n..]),
                Err(_) => st.pending.extend(&CLOSE_MESSAGE_TOO_BIG),
            }
        } else {
            st.pending.extend(&CLOSE_MESSAGE_TOO_BIG);
        }
    }
    st.write_closed = true;
    if st.pending.is_empty() {
        shutdown_write(tcp);
    } else {
        st.shutdown_wanted = true;
        if !st.flushing {
            st.flushing = true;
            tokio::spawn(flush(tcp.clone(), shared.clone()));
        }
    }
    tokio::spawn(discard(tcp.clone()));
}

/// Writes the waiting bytes as the client takes them. Gives up once the connection has been
/// closed for [`LINGER`] without progress.
async fn flush(tcp: Arc<TcpStream>, shared: Arc<Shared>) {
    loop {
        let writable = tokio::time::timeout(Duration::from_secs(1), tcp.writable()).await;
        let mut st = shared.lock();
        if st.failed.is_some_and(|f| matches!(f, Failed::Slow)) {
            st.flushing = false;
            return;
        }
        if let Err(_elapsed) = writable {
            if st.dropped_at.is_some_and(|t| t.elapsed() > LINGER) {
                st.pending = VecDeque::new();
                st.flushing = false;
                return;
            }
            continue;
        }
        let (front, _) = st.pending.as_slices();
        match tcp.try_write(front) {
            Ok(n) => {
                st.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                st.pending = VecDeque::new();
                st.flushing = false;
                return;
            }
        }
        if st.pending.is_empty() {
            if st.pending.capacity() > KEEP_CAPACITY {
                st.pending = VecDeque::new();
            }
            if st.shutdown_wanted {
                shutdown_write(&tcp);
            }
            st.flushing = false;
            return;
        }
    }
}

/// Reads and drops what a refused client still sends, for at most [`DISCARD`].
async fn discard(tcp: Arc<TcpStream>) {
    let mut sink = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(DISCARD, async {
        loop {
            if tcp.readable().await.is_err() {
                return;
            }
            match tcp.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

fn shutdown_write(tcp: &TcpStream) {
    // Ends our direction with a FIN; the socket closes when the last owner drops it.
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
}
