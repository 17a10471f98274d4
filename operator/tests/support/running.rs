//! The real controller (`controller::run`) on the in-memory API.

use std::time::Duration;

use chorus_operator::{
    controller::{self, LEASE_DURATION_SECONDS, RunConfig, RunError},
    resources::OperatorConfig,
};

use super::{FakeApi, access};

/// A configuration for tests: every namespace, metrics on `port` (0: any), the Lease in
/// namespace `ops` when `leader_elect`.
pub fn config(port: u16, leader_elect: bool) -> RunConfig {
    RunConfig {
        operator: OperatorConfig::default(),
        watch_namespace: None,
        metrics_port: port,
        leader_elect,
        lease_namespace: "ops".into(),
        identity: "operator-0".into(),
        lease_duration_seconds: LEASE_DURATION_SECONDS,
        readings_address: chorus_operator::autoscale::DEFAULT_ADDRESS.into(),
    }
}

/// `controller::run` on `api`'s client, until [`Running::stop`].
pub struct Running {
    api: FakeApi,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl Running {
    pub fn start(api: &FakeApi, config: RunConfig) -> Self {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(api.client(), config, async move {
            let _ = stop_rx.await;
        }));
        Self {
            api: api.clone(),
            stop_tx,
            task,
        }
    }

    /// Shuts the controller down, checks that it stopped cleanly and that it asked the API
    /// only for what tests/api-access.json lists.
    pub async fn stop(self) {
        let api = self.shut_down().await;
        access::assert_within_committed(&api);
    }

    /// Shuts the controller down and checks that it stopped cleanly; returns the API.
    pub async fn shut_down(self) -> FakeApi {
        self.stop_tx.send(()).expect("running");
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the controller stops on shutdown")
            .expect("task");
        assert!(result.is_ok(), "{result:?}");
        self.api
    }
}
