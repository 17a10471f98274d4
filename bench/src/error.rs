//! The library's error type.

use crate::engineio::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad command-line value (the binary exits 64 on it, like loadgen.js).
    #[error("{0}")]
    Usage(String),
    #[error("refusing non-loopback target {0}")]
    NotLoopback(String),
    #[error("bad URL {url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("hard time limit {0} s exceeded")]
    HardLimit(u64),
    #[error("{what} timed out")]
    Timeout { what: &'static str },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    WebSocket(String),
    #[error("engine.io/socket.io frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("http: {0}")]
    Http(String),
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("/proc: {0}")]
    Proc(String),
    #[error("histogram: {0}")]
    Histogram(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::WebSocket(e.to_string())
    }
}
