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
/// it, at a random moment of its own. Upgraded connections are not waited for at the end:
/// their sockets are closed by the Socket.IO layer.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    drain: watch::Receiver<Option<DrainWindow>>,
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
        let drain = drain.clone();
        let open = open.clone();
        let closed_tx = closed_tx.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut close_at = std::pin::pin!(drain_turn(drain));
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
