//! chorus-server: a clustered Socket.IO server that broadcasts through Redis.
//!
//! The binary (`main.rs`) only parses flags and calls [`app::run`]; tests and benchmarks
//! drive the same library.

pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod error;
pub mod metrics;
pub mod ops;
pub mod realtime;
pub mod validate;
