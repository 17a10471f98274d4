//! `chorus-operator run`: the controller, its leader election, and its HTTP endpoints.

use std::{
    future::Future,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use futures::StreamExt;
use kube::{
    Client,
    api::ListParams,
    runtime::{Controller, controller::Error as ControllerError, watcher},
};
use tokio::sync::watch;

use crate::{
    cache::{self, Caches},
    crd::RealtimeApp,
    metrics::Metrics,
    reconcile::{Context, error_policy, reconcile},
    resources::{self, MANAGER, OperatorConfig},
};

/// Settings of `chorus-operator run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub operator: OperatorConfig,
    /// Only RealtimeApps (and children) of this namespace; None = every namespace.
    pub watch_namespace: Option<String>,
    pub metrics_port: u16,
    pub leader_elect: bool,
    /// Where the leader Lease lives.
    pub lease_namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// How long the Lease is valid without a renewal; the leader renews it a third of that
    /// before it runs out, and notices then if another replica holds it.
    pub lease_duration_seconds: u64,
    /// Where the Operator autoscaling engine reads an app's `GET /v1/nodes`
    /// (`{name}`, `{namespace}`, `{port}` filled in).
    pub readings_address: String,
}

/// The default of [`RunConfig::lease_duration_seconds`].
pub const LEASE_DURATION_SECONDS: u64 = 15;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot serve metrics on port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("the RealtimeApp API is not reachable (is the CRD installed?): {0}")]
    Api(kube::Error),
    #[error("leader election failed: {0}")]
    Lease(String),
    #[error("lost the leader lease; exiting so that a new leader takes over")]
    LostLeadership,
}

struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Runs until `shutdown` resolves (or leadership is lost).
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    serve_http(
        config.metrics_port,
        health.clone(),
        stopped(stop_rx.clone()),
    )
    .await?;

    let apps = cache::api::<RealtimeApp>(&client, config.watch_namespace.as_deref());
    apps.list(&ListParams::default().limit(1))
        .await
        .map_err(RunError::Api)?;
    health.ready.store(true, Ordering::SeqCst);

    // Leadership: hold the Lease for as long as the controller runs.
    let mut leader = None;
    if config.leader_elect {
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "chorus-operator-leader")
                .with_namespace(config.lease_namespace.clone())
                .with_identity(config.identity.clone())
                .with_duration(config.lease_duration_seconds)
                .with_grace((config.lease_duration_seconds / 3).max(1))
                .with_field_manager(MANAGER)
                .build()
                .await
                .map_err(|e| RunError::Lease(e.to_string()))?;
        let (mut is_leader, task) = manager.watch().await;
        tracing::info!(identity = config.identity, "waiting for the leader lease");
        let mut stop = stop_rx.clone();
        while !*is_leader.borrow_and_update() {
            tokio::select! {
                changed = is_leader.changed() => {
                    changed.map_err(|_| RunError::Lease("lease task ended".into()))?;
                }
                _ = stop.changed() => return Ok(()),
            }
        }
        tracing::info!("became leader");
        leader = Some((is_leader, task));
    }

    // Children carry the managed-by label: watch only those.
    let owned = watcher::Config::default().labels(&resources::managed_selector());
    let ns = config.watch_namespace.clone();
    let (lost_tx, lost_rx) = watch::channel(false);
    if let Some((mut is_leader, _)) = leader.take() {
        tokio::spawn(async move {
            while is_leader.changed().await.is_ok() {
                if !*is_leader.borrow() {
                    break;
                }
            }
            let _ = lost_tx.send(true);
        });
    }
    let mut lost = lost_rx.clone();
    let trigger = {
        let stop = stopped(stop_rx.clone());
        let lost = stopped(lost_rx.clone());
        async move {
            tokio::select! {
                _ = stop => {}
                _ = lost => {}
            }
        }
    };
    tracing::info!(
        namespace = ns.as_deref().unwrap_or("(all)"),
        "controller running"
    );
    let controller = Controller::new(apps, watcher::Config::default().any_semantic());
    let (controller, caches) = Caches::attach(controller, &client, ns.as_deref(), &owned);
    let ctx = Arc::new(
        Context::new(client.clone(), config.operator.clone(), metrics)
            .with_caches(caches)
            .with_readings_address(config.readings_address.clone()),
    );
    controller
        .graceful_shutdown_on(trigger)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // A watch that fails (say, RBAC refuses it) is retried with backoff; until
                // it lists, reconciles read that kind from the API (see cache.rs).
                Err(ControllerError::QueueError(e)) => tracing::warn!("watch failed: {e}"),
                // Reconcile failures are already logged by error_policy.
                Err(e) => tracing::debug!("reconcile: {e}"),
                Ok(_) => {}
            }
        })
        .await;
    if *lost.borrow_and_update() {
        return Err(RunError::LostLeadership);
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Resolves once the flag turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// `/metrics`, `/healthz`, `/readyz` on the metrics port.
async fn serve_http(
    port: u16,
    health: Arc<Health>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                if h.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Arc<Health>>| async move { h.metrics.render() }),
        )
        .with_state(health);
    let listener = match tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .await
            .map_err(|source| RunError::Bind { port, source })?,
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok(())
}
