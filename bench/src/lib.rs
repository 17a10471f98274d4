//! chorus-bench: a load generator for servers that implement the bench protocol
//! (Socket.IO v4 over websocket, `join`/`publish` acks, `POST /v1/broadcast`), a
//! drop-in alternative to the shared Node generator (`bench/loadgen/loadgen.js`) with
//! the same flags and the same JSON line, at a fraction of its CPU per delivery.
//!
//! Everything lives in the library so tests can drive a run against a real server;
//! `main.rs` only parses flags, sets up the runtime and prints.

pub mod cli;
pub mod clients;
pub mod clock;
pub mod engineio;
pub mod error;
pub mod histogram;
pub mod http;
pub mod idle;
pub mod load;
pub mod plan;
pub mod procstat;
pub mod report;
pub mod schedule;
pub mod storm;
pub mod target;

use std::time::Duration;

pub use cli::Options;
pub use error::Error;
pub use report::Report;

/// One run (load, idle-memory or reconnect-storm, by the options).
pub async fn run(o: &Options) -> Result<Report, Error> {
    clock::now_ms(); // start the shared clock
    if o.args.idle_memory {
        Ok(Report::Idle(Box::new(idle::run(o).await?)))
    } else if o.args.reconnect_storm {
        Ok(Report::Storm(Box::new(storm::run(o).await?)))
    } else {
        Ok(Report::Load(Box::new(load::run(o).await?)))
    }
}

/// [`run`] under the hard time limit (`Options::hard_limit_s`).
pub async fn run_bounded(o: &Options) -> Result<Report, Error> {
    let limit = o.hard_limit_s();
    tokio::time::timeout(Duration::from_secs_f64(limit), run(o))
        .await
        .map_err(|_| Error::HardLimit(limit.round() as u64))?
}
