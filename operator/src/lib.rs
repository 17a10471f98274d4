//! chorus-operator: turns `RealtimeApp` resources into Redis, server pods with the Redis
//! adapter configuration injected, a Service, scaling objects, and status conditions.

pub mod crd;
pub mod render;
pub mod resources;
