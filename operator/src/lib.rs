//! chorus-operator: turns `RealtimeApp` resources into Redis, server pods with the Redis
//! adapter configuration injected, a Service, scaling objects, and status conditions.

pub mod apply;
pub mod autoscale;
pub mod cache;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod resources;
pub mod secrets;
pub mod status;
