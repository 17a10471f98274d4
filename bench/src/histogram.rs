//! Latency histogram: `hdrhistogram` over integer microseconds (3 significant digits,
//! up to one hour), plus the exact count, sum and max for `mean` and `max`.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Error;

/// Largest recordable value: one hour in microseconds (larger values are clamped).
const MAX_US: u64 = 3_600_000_000;

#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    h: Histogram<u64>,
    n: u64,
    sum_ms: f64,
    max_ms: f64,
}

/// `{n, p50, p90, p99, p999, max, mean}` in milliseconds, all null when empty
/// (the shape loadgen.js prints).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub n: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // Constant, valid bounds: creation cannot fail.
        let h = Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds");
        Self {
            h,
            n: 0,
            sum_ms: 0.0,
            max_ms: 0.0,
        }
    }

    /// Records one latency in milliseconds (negative values count as 0).
    pub fn record_ms(&mut self, ms: f64) {
        let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
        let us = (ms * 1000.0).round() as u64;
        self.h.saturating_record(us);
        self.n += 1;
        self.sum_ms += ms;
        if ms > self.max_ms {
            self.max_ms = ms;
        }
    }

    pub fn merge(&mut self, other: &Self) -> Result<(), Error> {
        self.h
            .add(&other.h)
            .map_err(|e| Error::Histogram(format!("{e:?}")))?;
        self.n += other.n;
        self.sum_ms += other.sum_ms;
        if other.max_ms > self.max_ms {
            self.max_ms = other.max_ms;
        }
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The `p`th percentile in ms (upper edge of its bucket, at most the exact max).
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let us = self.h.value_at_quantile((p / 100.0).clamp(0.0, 1.0));
        Some((us as f64 / 1000.0).min(self.max_ms))
    }

    pub fn summary(&self) -> Summary {
        let r = |x: Option<f64>| x.map(|v| round(v, 3));
        if self.n == 0 {
            return Summary {
                n: 0,
                p50: None,
                p90: None,
                p99: None,
                p999: None,
                max: None,
                mean: None,
            };
        }
        Summary {
            n: self.n,
            p50: r(self.percentile_ms(50.0)),
            p90: r(self.percentile_ms(90.0)),
            p99: r(self.percentile_ms(99.0)),
            p999: r(self.percentile_ms(99.9)),
            max: r(Some(self.max_ms)),
            mean: r(Some(self.sum_ms / self.n as f64)),
        }
    }
}

/// Rounds to `digits` decimals (loadgen.js's `Number(x.toFixed(d))`); never `-0`.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    // + 0.0 turns -0.0 (e.g. an empty f64 sum) into 0.0
    (x * f).round() / f + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_summary_is_null() {
        let s = LatencyHistogram::new().summary();
        assert_eq!(s.n, 0);
        assert_eq!(s.p50, None);
        assert_eq!(s.mean, None);
    }

    #[test]
    fn percentiles_within_a_tenth_of_a_percent() {
        let mut h = LatencyHistogram::new();
        for v in 1..=1000 {
            h.record_ms(v as f64);
        }
        let s = h.summary();
        assert_eq!(s.n, 1000);
        let close = |got: Option<f64>, want: f64| {
            let got = got.unwrap_or(f64::NAN);
            assert!(
                (got - want).abs() <= want * 0.001 + 0.001,
                "{got} vs {want}"
            );
        };
        close(s.p50, 500.0);
        close(s.p90, 900.0);
        close(s.p99, 990.0);
        close(s.p999, 999.0);
        assert_eq!(s.max, Some(1000.0));
        assert_eq!(s.mean, Some(500.5));
    }

    #[test]
    fn microsecond_resolution_and_merge() {
        let mut a = LatencyHistogram::new();
        a.record_ms(0.123);
        let mut b = LatencyHistogram::new();
        b.record_ms(0.123);
        b.record_ms(-5.0); // clamped to 0
        b.record_ms(1e12); // clamped to one hour
        a.merge(&b).expect("same bounds");
        assert_eq!(a.len(), 4);
        assert_eq!(a.percentile_ms(50.0), Some(0.123));
        assert_eq!(a.percentile_ms(0.0), Some(0.0));
    }

    #[test]
    fn rounding() {
        assert_eq!(round(1.23456, 2), 1.23);
        assert_eq!(round(-0.0049, 2).to_string(), "0");
        assert_eq!(round(std::iter::empty::<f64>().sum(), 3).to_string(), "0");
    }
}
