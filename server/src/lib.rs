//! chorus-server: a clustered Socket.IO server that broadcasts through Redis.
//!
//! The binary (`main.rs`) only parses flags and calls [`app::run`]; tests and benchmarks
//! drive the same library.
//!
//! Each module uses only modules listed above it (no cycles):
//!
//! | module | holds | uses |
//! |---|---|---|
//! | [`config`] | flags and environment | |
//! | [`error`] | the contract's error codes, acks and error bodies | |
//! | [`metrics`] | the Prometheus registry | |
//! | [`conn`] | accepting connections, HTTP timeouts, websocket size and backlog limits | metrics |
//! | [`limits`] | per-socket event rate and room limits, the replica's socket count | |
//! | [`validate`] | input rules for rooms, events, socket ids | error |
//! | [`origins`] | which browser origins may connect; CORS answers | config, error |
//! | [`auth`] | the API token, socket JWTs (checks, expiry timers, minting), room patterns | config |
//! | [`bus`] | the pub/sub links (one per Redis, or memory); the Socket.IO adapter type (local) | config |
//! | [`dedupe`] | the bounded memory of ids already taken | |
//! | [`cluster`] | acknowledged calls to every replica | bus, dedupe |
//! | [`history`] | room histories and offsets for `resume` | bus |
//! | [`delivery`] | messages to every replica over the bus, and to each local socket (or its disconnect when it falls behind); gaps and their catch-up | bus, conn, dedupe, error, history, metrics |
//! | [`rebalance`] | socket counts exchanged between replicas; shedding a replica's excess | bus, delivery, metrics |
//! | [`realtime`] | the Socket.IO handlers | auth, bus, delivery, error, history, limits, metrics, rebalance, validate |
//! | [`state`] | what the HTTP handlers share | bus, cluster, config, delivery, metrics |
//! | [`ops`] | health, readiness, metrics endpoints; request metrics | bus, metrics, state |
//! | [`client`] | the JavaScript client helper, served at `/client/chorus.js` | |
//! | [`api`] | the `/v1` HTTP API and its OpenAPI description | auth, cluster, delivery, error, ops, state, validate |
//! | [`app`] | wiring, serving and shutdown | api, auth, bus, client, cluster, config, conn, delivery, error, history, limits, metrics, ops, origins, realtime, rebalance, state |

pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dedupe;
pub mod delivery;
pub mod error;
pub mod history;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod origins;
pub mod realtime;
pub mod rebalance;
pub mod state;
pub mod validate;
