//! The HTTP timeouts of docs/security.md: request headers within 10 s of their first byte,
//! an idle keep-alive connection closed after 60 s, a request body within 30 s.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::body::{Body, Bytes, HttpBody};
use http_body::{Frame, SizeHint};

use super::stream::Shared;
use crate::metrics::{Limit, Metrics};

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// hyper's header-read timer, made to tell a slow client from an idle one.
///
/// hyper starts the timer whenever it waits for a request head, also between requests of a
/// keep-alive connection. Here the wait may last [`IDLE_TIMEOUT`] while no byte comes, and
/// [`HEADER_TIMEOUT`] from the first byte of the head.
#[derive(Clone)]
pub struct HeadTimer {
    pub conn: Arc<Shared>,
    pub metrics: Arc<Metrics>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = tokio::time::Instant::now();
        Box::pin(HeadSleep {
            conn: self.conn.clone(),
            metrics: self.metrics.clone(),
            reads_at_start: self.conn.reads(),
            first_byte: false,
            sleep: Box::pin(tokio::time::sleep_until(now + IDLE_TIMEOUT)),
        })
    }
}

struct HeadSleep {
    conn: Arc<Shared>,
    metrics: Arc<Metrics>,
    reads_at_start: u64,
    first_byte: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this after each read of a partial head, so the first poll that sees
        // new bytes is when they came.
        if !self.first_byte && self.conn.reads() != self.reads_at_start {
            self.first_byte = true;
            let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
            if deadline < self.sleep.deadline() {
                self.sleep.as_mut().reset(deadline);
            }
        }
        let fired = self.sleep.as_mut().poll(cx).is_ready();
        if fired {
            let limit = if self.first_byte {
                Limit::header_timeout
            } else {
                Limit::idle_timeout
            };
            self.metrics.limit_hit(limit);
            tracing::debug!(?limit, "closing an HTTP connection");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// A request body that must arrive whole within [`BODY_TIMEOUT`] of the request head.
pub struct DeadlineBody {
    inner: Body,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
pub struct BodyTimeout;

impl DeadlineBody {
    /// Wraps `body` unless it is known to be empty.
    pub fn wrap(body: Body, metrics: &Arc<Metrics>) -> Body {
        if body.is_end_stream() {
            return body;
        }
        Body::new(Self {
            inner: body,
            deadline: tokio::time::Instant::now() + BODY_TIMEOUT,
            sleep: None,
            metrics: metrics.clone(),
        })
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        // The timer is made only for bodies that are not already here.
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.metrics.limit_hit(Limit::body_timeout);
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
