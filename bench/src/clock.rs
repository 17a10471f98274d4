//! One process-wide monotonic clock in milliseconds (`f64`), shared by the sender and
//! every receiving client: broadcasts carry their send time, receivers subtract it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process-wide epoch (set on first use).
pub fn now_ms() -> f64 {
    epoch().elapsed().as_secs_f64() * 1000.0
}

/// The `Instant` for a time on this clock (times before the epoch clamp to it).
pub fn instant_at(ms: f64) -> Instant {
    epoch() + Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

/// Sleeps until `ms` on this clock.
pub async fn sleep_until_ms(ms: f64) {
    tokio::time::sleep_until(instant_at(ms).into()).await;
}

/// Sleeps for `ms` milliseconds (negative: no sleep).
pub async fn sleep_ms(ms: f64) {
    if ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic() {
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
    }
}
