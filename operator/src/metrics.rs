//! Prometheus metrics of the operator.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{conditions::Reason, error::FAILURE_REASONS};

/// The label of a failed reconcile: why it failed (`ReadFailed`, `ApplyFailed`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: String,
}

impl FailureLabels {
    fn of(reason: Reason) -> Self {
        Self {
            reason: reason.as_str().to_owned(),
        }
    }
}

/// The label of an autoscaler metric: a direction (`up`, `down`) or a signal (`connections`,
/// `cpu`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AutoscalerLabels {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    /// Replicas changes the Operator autoscaling engine made, by direction.
    pub autoscaler_scales: Family<AutoscalerLabels, Counter>,
    /// Readings the Operator engine could not take, by signal.
    pub autoscaler_unread: Family<AutoscalerLabels, Counter>,
    pub reconciles: Counter,
    pub errors: Family<FailureLabels, Counter>,
    pub duration: Histogram,
    /// Writes to the Kubernetes API (applies, creates, deletes, status patches).
    pub writes: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        let errors = Family::<FailureLabels, Counter>::default();
        // Every reason from the start, at 0, so that rates and alerts see a series.
        for reason in FAILURE_REASONS {
            drop(errors.get_or_create(&FailureLabels::of(reason)));
        }
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
            "Reconciles that failed, by reason",
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
        let autoscaler_scales = Family::<AutoscalerLabels, Counter>::default();
        let autoscaler_unread = Family::<AutoscalerLabels, Counter>::default();
        for (family, kinds) in [
            (&autoscaler_scales, ["up", "down"]),
            (&autoscaler_unread, ["connections", "cpu"]),
        ] {
            for kind in kinds {
                drop(family.get_or_create(&AutoscalerLabels { kind: kind.into() }));
            }
        }
        registry.register(
            "chorus_operator_autoscaler_scales",
            "Replicas changes made by the Operator autoscaling engine, by direction (kind)",
            autoscaler_scales.clone(),
        );
        registry.register(
            "chorus_operator_autoscaler_unread",
            "Readings the Operator autoscaling engine could not take, by signal (kind)",
            autoscaler_unread.clone(),
        );
        Self {
            registry,
            autoscaler_scales,
            autoscaler_unread,
            reconciles,
            errors,
            duration,
            writes,
        }
    }

    /// One reconcile that took `took`; `failed` says why it failed, if it did.
    pub fn observe_reconcile(&self, took: Duration, failed: Option<Reason>) {
        self.reconciles.inc();
        if let Some(reason) = failed {
            self.errors.get_or_create(&FailureLabels::of(reason)).inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts one autoscaler event of `family` with label `kind`.
    pub fn count(family: &Family<AutoscalerLabels, Counter>, kind: &str) {
        family
            .get_or_create(&AutoscalerLabels { kind: kind.into() })
            .inc();
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
