//! Prometheus metrics of the operator.

use std::time::Duration;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Counter,
    pub duration: Histogram,
    /// Writes to the Kubernetes API (applies, creates, deletes, status patches).
    pub writes: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        let errors = Counter::default();
        let writes = Counter::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "chorus_operator_reconciles",
            "Reconciles run",
            reconciles.clone(),
        );
        registry.register(
            "chorus_operator_reconcile_errors",
            "Reconciles that failed",
            errors.clone(),
        );
        registry.register(
            "chorus_operator_reconcile_duration_seconds",
            "Time per reconcile",
            duration.clone(),
        );
        registry.register(
            "chorus_operator_writes",
            "Writes to the Kubernetes API (apply, create, delete, status)",
            writes.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            writes,
        }
    }

    pub fn observe_reconcile(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.errors.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
