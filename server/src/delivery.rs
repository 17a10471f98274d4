//! How a message reaches sockets: through the adapter to every replica, or to this replica's
//! own sockets when the cluster link is down. Socket `publish` and `POST /v1/broadcast` both
//! deliver here.

use serde_json::Value;
use socketioxide::{BroadcastError, operators::BroadcastOperators};

use crate::{bus::Adapter, error::Failure, metrics::Metrics};

/// Emits through the adapter (every replica). If Redis fails, the message still reaches
/// this replica's own sockets and the caller is told `cluster_unavailable`.
///
/// `target` is called again for the local fallback: an emit consumes its operators.
pub async fn deliver(
    metrics: &Metrics,
    target: impl Fn() -> BroadcastOperators<Adapter>,
    event: &str,
    data: &Value,
) -> Result<(), Failure> {
    match target().emit(event, data).await {
        Ok(()) => Ok(()),
        Err(BroadcastError::Adapter(e)) => {
            tracing::debug!("cluster broadcast failed, delivering locally: {e}");
            if let Err(e) = target().local().emit(event, data).await {
                count_socket_drops(metrics, &e);
            }
            metrics.local_only_deliveries.inc();
            Err(Failure::cluster_unavailable(
                "delivered to this replica's sockets only: the cluster link (Redis) is down",
            ))
        }
        Err(e) => {
            // Some local sockets could not take the message (closed or buffer full); the
            // rest, and every other replica, got it.
            count_socket_drops(metrics, &e);
            Ok(())
        }
    }
}

fn count_socket_drops(metrics: &Metrics, e: &BroadcastError) {
    if let BroadcastError::Socket(errors) = e {
        metrics.socket_drops.inc_by(errors.len() as u64);
    }
    tracing::debug!("some sockets missed a message: {e}");
}
