//! Connections: the accept loop, the HTTP/1 settings of each connection, the timeouts and the
//! per-connection stream that enforces the websocket limits (docs/security.md).

mod frames;
mod stream;
mod timeouts;

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::{Instant, sleep_until},
};
use tower::Service;

pub use stream::StreamLimits;

use crate::metrics::Metrics;
use stream::{ConnStream, abort};
use timeouts::{DeadlineBody, HEADER_TIMEOUT, HeadTimer};

/// Pause after an accept error such as running out of file descriptors: new connections
/// wait in the kernel's backlog meanwhile, and the loop goes on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Raises the open-file soft limit to the hard limit, and says what it is now.
pub fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
}

/// When a draining replica closes its connections: each one at its own moment, picked at
/// random between `from` and `until`, so the clients do not all reconnect at once.
#[derive(Debug, Clone, Copy)]
pub struct DrainWindow {
    pub from: Instant,
    pub until: Instant,
}

/// The shortest drain (unless DRAIN_SECONDS is shorter): a replica with few connections still
/// leaves the Service's endpoints before they close, and they still close a few at a time.
const DRAIN_FLOOR: Duration = Duration::from_secs(5);
/// The share of a drain in which connections close: its last four fifths (see `DrainWindow::new`).
const CLOSING_SHARE: f64 = 0.8;
/// The longest window: an absurd DRAIN_SECONDS must not overflow the clock, and the pod is
/// killed long before a year is out anyway.
const LONGEST_WINDOW: Duration = Duration::from_secs(365 * 86_400);

impl DrainWindow {
    /// The window of a drain of `length` begun at `start`. The first fifth leaves time for the
    /// replica to leave the Service's endpoints, so that clients reconnect elsewhere.
    pub fn new(start: Instant, length: Duration) -> Self {
        let length = length.min(LONGEST_WINDOW);
        Self {
            from: start + length / 5,
            until: start + length,
        }
    }
}

/// How long closing `connections` takes at `rate` a second in a drain's last four fifths.
pub fn paced_drain(connections: usize, rate: u32) -> Duration {
    let secs = connections as f64 / (CLOSING_SHARE * f64::from(rate.max(1)));
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// A drain's length: as long as closing `connections` at `rate` a second takes, at least
/// `DRAIN_FLOOR`, at most `longest` (DRAIN_SECONDS, which the termination grace period covers).
pub fn drain_length(connections: usize, longest: Duration, rate: u32) -> Duration {
    paced_drain(connections, rate).max(DRAIN_FLOOR).min(longest)
}

/// What the accept loop shares with the shutdown sequence.
pub struct Drain {
    /// The window, once the drain has begun.
    pub window: watch::Receiver<Option<DrainWindow>>,
    /// Connections held, websockets included (they outlive the HTTP connection that `serve`
    /// waits for at the end): what the drain closes, so what sizes it.
    pub held: Arc<AtomicUsize>,
}

/// The connection a request came on, so that a Socket.IO session's transport can be closed
/// from outside (see `delivery`), as a drain closes it: the client sees its transport close and
/// reconnects by itself. Weak: a session keeps its handshake request for its whole life, and
/// must not keep the connection's file descriptor open with it.
#[derive(Clone)]
pub struct Transport(Weak<TcpStream>);

impl Transport {
    /// Closes the connection if it is still open; false when it was gone already.
    pub fn close(&self) -> bool {
        match self.0.upgrade() {
            Some(tcp) => {
                abort(&tcp);
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open requests finish for
/// at most `grace`. Once `drain` holds a window, every connection (websockets too) is closed in
/// it, at a random moment of its own; until then `drain` counts the connections. Upgraded
/// connections are not waited for at the end: their sockets are closed by the Socket.IO layer.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    drain: Drain,
    grace: Duration,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed_rx) = watch::channel(());
    let mut last_error_log: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // EMFILE and the like: log at most once a second, wait a moment, go on.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(%error, "cannot accept a connection");
                    last_error_log = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Realtime frames are small: without TCP_NODELAY, Nagle's algorithm holds a frame back
        // until the client acknowledges the previous one, which a delayed ACK can make 40 ms.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let stream = ConnStream::new(tcp, limits, metrics.clone());
        let shared = stream.shared();
        let tcp = stream.tcp();
        let conn_metrics = metrics.clone();
        let router = router.clone();
        let transport = Transport(Arc::downgrade(&tcp));
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let mut req = req.map(|b| DeadlineBody::wrap(Body::new(b), &conn_metrics));
            req.extensions_mut().insert(transport.clone());
            // Router is always ready and cheap to clone (an Arc inside).
            router.clone().call(req)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(HeadTimer {
                conn: shared.clone(),
                metrics: metrics.clone(),
            })
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stop = stop.clone();
        let window = drain.window.clone();
        let open = open.clone();
        let held = drain.held.clone();
        let closed_tx = closed_tx.clone();
        open.fetch_add(1, Ordering::SeqCst);
        held.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut close_at = std::pin::pin!(drain_turn(window));
            let drained = tokio::select! {
                result = conn.as_mut() => {
                    log_conn_end(result);
                    false
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    log_conn_end(conn.await);
                    false
                }
                () = close_at.as_mut() => {
                    abort(&tcp);
                    true
                }
            };
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = closed_tx.send(());
            // A websocket lives on after its HTTP connection is done: close it in its turn too.
            if !drained && shared.is_websocket() {
                tokio::select! {
                    () = shared.dropped() => {}
                    () = close_at => abort(&tcp),
                    _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {}
                }
            }
            held.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    let all_closed = async {
        while open.load(Ordering::SeqCst) > 0 {
            if closed_rx.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(grace, all_closed).await.is_err() {
        tracing::warn!("connections still open after the grace period; exiting");
    }
}

/// Resolves at this connection's moment in the drain window (never, if there is no drain).
async fn drain_turn(mut drain: watch::Receiver<Option<DrainWindow>>) {
    let window = match drain.wait_for(Option::is_some).await {
        Ok(window) => *window,
        Err(_) => None,
    };
    let Some(window) = window else {
        return std::future::pending().await;
    };
    let from = window.from.max(Instant::now());
    let span = window.until.saturating_duration_since(from);
    sleep_until(from + span.mul_f64(rand::random::<f64>())).await;
}

fn log_conn_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        // Clients that go away, time out or send garbage: routine at debug level.
        tracing::debug!(%error, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_drain_follows_the_connections_between_the_floor_and_drain_seconds() {
        let longest = 30 * SECOND;
        // Few or no connections: the floor.
        assert_eq!(drain_length(0, longest, 1000), DRAIN_FLOOR);
        assert_eq!(drain_length(4000, longest, 1000), DRAIN_FLOOR);
        // Past it, n / (0.8 × rate): 2,000 at 250 a second close over 8 s of a 10 s drain.
        assert_eq!(drain_length(2000, longest, 250), 10 * SECOND);
        assert_eq!(drain_length(20_000, longest, 1000), 25 * SECOND);
        // Never beyond DRAIN_SECONDS, even below the floor (tests drain in 0 or 1 s).
        assert_eq!(drain_length(50_000, longest, 1000), longest);
        assert_eq!(drain_length(0, SECOND, 1000), SECOND);
        assert_eq!(drain_length(0, Duration::ZERO, 1000), Duration::ZERO);
        // The default DRAIN_SECONDS drains in 5 s whatever the connections, as before.
        assert_eq!(drain_length(usize::MAX, 5 * SECOND, 1), 5 * SECOND);
    }

    #[test]
    fn the_paced_length_is_the_rate_over_four_fifths() {
        assert_eq!(paced_drain(0, 1000), Duration::ZERO);
        assert_eq!(paced_drain(800, 1000), SECOND);
        assert_eq!(paced_drain(8, 1), 10 * SECOND);
        // A rate of 0 cannot come from the flags; it is taken as 1, not divided by.
        assert_eq!(paced_drain(8, 0), 10 * SECOND);
        assert!(paced_drain(usize::MAX, 1) > 1_000_000_000 * SECOND);
    }

    #[test]
    fn the_window_is_the_last_four_fifths() {
        let start = Instant::now();
        let w = DrainWindow::new(start, 10 * SECOND);
        assert_eq!((w.from - start, w.until - start), (2 * SECOND, 10 * SECOND));
        // An end past what the clock holds does not panic.
        let w = DrainWindow::new(start, Duration::MAX);
        assert!(start < w.from && w.from < w.until);
    }
}
