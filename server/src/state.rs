//! What the HTTP handlers share.

use std::sync::{Arc, atomic::AtomicBool};

use socketioxide::SocketIo;

use crate::{
    bus::{Adapter, Bus},
    cluster::Cluster,
    config::Secret,
    delivery::Delivery,
    metrics::Metrics,
};

pub struct AppState {
    pub io: SocketIo<Adapter>,
    pub cluster: Arc<Cluster>,
    pub delivery: Arc<Delivery>,
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub api_token: Option<Secret>,
    /// Set on SIGTERM: readiness fails from then on (and rebalancing stops).
    pub draining: Arc<AtomicBool>,
}
