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

/// The `Instant` for a time on this clock: times before the epoch (and NaN) clamp to
/// it, times beyond what an `Instant` holds to about a century after it.
pub fn instant_at(ms: f64) -> Instant {
    let after = Duration::try_from_secs_f64(ms.max(0.0) / 1000.0).unwrap_or(Duration::MAX);
    epoch()
        .checked_add(after)
        .or_else(|| epoch().checked_add(FAR))
        .unwrap_or_else(epoch)
}

/// "Never" for a deadline (tokio's own far future is a few decades).
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Sleeps until `ms` on this clock.
pub async fn sleep_until_ms(ms: f64) {
    tokio::time::sleep_until(instant_at(ms).into()).await;
}

/// Sleeps for `ms` milliseconds (negative or NaN: no sleep).
pub async fn sleep_ms(ms: f64) {
    if ms > 0.0 {
        let d = Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(FAR);
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instant_at_is_the_inverse_of_now_ms() {
        let before = Instant::now();
        let at = instant_at(now_ms());
        let after = Instant::now();
        // f64 milliseconds round to within a nanosecond or so
        let slack = Duration::from_micros(1);
        assert!(before <= at + slack && at <= after + slack);
        assert_eq!(
            instant_at(1500.0) - instant_at(500.0),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn out_of_range_times_clamp_instead_of_panicking() {
        assert_eq!(instant_at(-20.0), instant_at(0.0));
        assert_eq!(instant_at(f64::NAN), instant_at(0.0));
        assert!(instant_at(f64::INFINITY) >= instant_at(1e12));
    }

    #[tokio::test]
    async fn sleeping_for_no_time_returns() {
        // negative and NaN durations would panic in Duration::from_secs_f64
        sleep_ms(-5.0).await;
        sleep_ms(f64::NAN).await;
        sleep_until_ms(-5.0).await;
    }
}
