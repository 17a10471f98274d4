//! Test harness: a real `redis-server` on a free loopback port, chorus-server replicas as
//! separate processes of the real binary, a real Rust Socket.IO client, and an HTTP client.
#![allow(dead_code)] // each test binary uses part of the harness

pub mod openmetrics;
pub mod rawws;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Once,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
#[path = "../../../tests/rust/cannot_run.rs"]
mod cannot_run;
use openmetrics::Samples;
use rust_socketio::{
    Event, Payload, TransportType,
    asynchronous::{Client as SioClient, ClientBuilder},
};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

pub const BIN: &str = env!("CARGO_BIN_EXE_chorus-server");

/// Whether every program in `tools` is on PATH, for a test to return at once when not.
///
/// A missing one under `CI=true` fails the test with one line naming it: nothing may pass by
/// not running. Elsewhere the suite is skipped: `SKIPPED: <suite>: <reason>` on stderr and
/// `<suite>: <reason>` appended to `$CHORUS_SKIP_LOG` (if set), once per test binary, as
/// scripts/suite.sh does for the other suites.
pub fn tools_present(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let suite = format!("chorus-server tests/{}.rs", env!("CARGO_CRATE_NAME"));
    let reason = format!("{} not found on PATH", missing.join(", "));
    // Once per test binary; under CI=true every test fails.
    static LOGGED: Once = Once::new();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        cannot_run::cannot_run(&suite, &reason);
    }
    LOGGED.call_once(|| cannot_run::cannot_run(&suite, &reason));
    false
}

fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(paths) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&paths).any(|dir| {
        std::fs::metadata(dir.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A fresh directory under the system temp dir, removed when dropped (also when a test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{:016x}", rand_u64()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("chorus-test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Polls (bounded) until `f` holds.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {limit:?}");
}

pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not happen within {limit:?}");
}

/// A real redis-server, started by the test on a free loopback port; dropping it kills it.
pub struct Redis {
    pub port: u16,
    password: Option<String>,
    /// TLS only, with `redis.pem`, `redis.key` and `ca.pem` from this directory.
    tls: Option<PathBuf>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A Redis that requires `password` (`--requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        Self::launch(password.map(str::to_owned), None)
    }

    /// A Redis that speaks TLS only, with the server certificate `redis.pem` (key
    /// `redis.key`) signed by `ca.pem`, all three in `dir`.
    pub fn start_tls(dir: &Path) -> Self {
        Self::launch(None, Some(dir.to_owned()))
    }

    fn launch(password: Option<String>, tls: Option<PathBuf>) -> Self {
        let mut redis = Self {
            port: free_port(),
            password,
            tls,
            child: None,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let port = self.port.to_string();
        let log = log_dir().join(format!("redis-{port}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(dir) => cmd.current_dir(dir).args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                "redis.pem",
                "--tls-key-file",
                "redis.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
            ]),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("redis-server starts (tools_present checks it is installed)");
        self.child = Some(child);
        let (port, tls) = (self.port, self.tls.is_some());
        wait_until("redis answering", Duration::from_secs(10), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("redis-server exited at start ({status}):\n{text}");
            }
            // A TLS port does not answer a plaintext PING; accepting connections will do.
            if tls {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                redis_ping(port)
            }
        });
    }

    /// Sends `sig` (`STOP`, `CONT`, ...) to the redis-server.
    pub fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .expect("redis is running");
        let status = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    // Any answer will do: `+PONG`, or `-NOAUTH` from a Redis with a password.
    let mut first = [0u8; 1];
    s.write_all(b"PING\r\n").is_ok()
        && s.read_exact(&mut first).is_ok()
        && matches!(&first, b"+" | b"-")
}

/// One chorus-server process.
pub struct Replica {
    pub port: u16,
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Replica {
    /// Starts the binary with `env` (PORT and POD_NAME are set here) and waits for /healthz.
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Self {
        let port = free_port();
        let log = log_dir().join(format!("{name}-{port}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        // CHORUS_SERVER_BIN runs the replicas from another build (the hostile suite's memory
        // figures in docs/security.md come from the release binary).
        let bin = std::env::var("CHORUS_SERVER_BIN").unwrap_or_else(|_| BIN.to_owned());
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", port.to_string())
            .env("POD_NAME", name)
            .env("DRAIN_SECONDS", "0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("chorus-server starts");
        let replica = Self {
            port,
            name: name.to_owned(),
            child: Some(child),
            log,
        };
        wait_until("chorus-server /healthz", Duration::from_secs(20), || {
            http_status(port, "/healthz") == Some(200)
        });
        replica
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn wait_ready(&self) {
        let port = self.port;
        wait_until("chorus-server /readyz 200", Duration::from_secs(20), || {
            http_status(port, "/readyz") == Some(200)
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits (bounded) for the process to end and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bare blocking HTTP GET, for polling before any async client exists.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Redis plus `n` replicas on it, named node-0..node-(n-1).
pub struct Cluster {
    pub redis: Redis,
    pub replicas: Vec<Replica>,
}

impl Cluster {
    pub fn start(n: usize, env: &[(&str, String)]) -> Self {
        let redis = Redis::start();
        let replicas: Vec<Replica> = (0..n)
            .map(|i| {
                let mut env = env.to_vec();
                env.push(("REDIS_URL", redis.url()));
                Replica::spawn(&format!("node-{i}"), &env)
            })
            .collect();
        for r in &replicas {
            r.wait_ready();
        }
        Self { redis, replicas }
    }

    pub fn api(&self, i: usize) -> Api {
        Api::new(&self.replicas[i].url(), None)
    }
}

/// The HTTP API, with an optional bearer token.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self {
            base: base.to_owned(),
            token: token.map(str::to_owned),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("http client"),
        }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("the server answers");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, Some(body.to_string().into_bytes()))
            .await
    }

    pub async fn delete(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("DELETE", path, Some(body.to_string().into_bytes()))
            .await
    }

    /// One scrape of `/metrics`, read into exact samples.
    pub async fn metrics(&self) -> Samples {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        let text = body.as_str().expect("metrics are text");
        Samples::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Socket ids in a room, cluster-wide.
    pub async fn room_sockets(&self, room: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/v1/rooms/{room}/sockets")).await;
        assert_eq!(status, 200, "{body}");
        body["sockets"]
            .as_array()
            .expect("sockets")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

/// Asserts a successful ack: `ok` and no error (what else it carries depends on the event).
pub fn assert_ok(ack: &Value) {
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert!(ack.get("error").is_none(), "{ack}");
}

/// A real Socket.IO client (rust_socketio) that records every event it receives.
pub struct Client {
    pub sio: SioClient,
    events: Mutex<mpsc::UnboundedReceiver<(String, Vec<Value>)>>,
}

pub const EVENT_WAIT: Duration = Duration::from_secs(5);

impl Client {
    pub async fn connect(base: &str) -> Self {
        Self::try_connect(base, None)
            .await
            .expect("socket connects")
    }

    /// Connects (websocket) and waits for the namespace CONNECT or a `connect_error`.
    pub async fn try_connect(base: &str, auth: Option<Value>) -> Result<Self, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let any_tx = tx.clone();
        let err_tx = tx.clone();
        let ok_tx = conn_tx.clone();
        let mut builder = ClientBuilder::new(base)
            .transport_type(TransportType::Websocket)
            .reconnect(false)
            .on(Event::Connect, move |_, _| {
                let _ = ok_tx.send(Ok(()));
                async {}.boxed()
            })
            .on(Event::Error, move |payload, _| {
                let text = payload_text(&payload);
                let _ = err_tx.send((
                    "chorus-test:error".into(),
                    vec![Value::String(text.clone())],
                ));
                let _ = conn_tx.send(Err(text));
                async {}.boxed()
            })
            .on(Event::Close, move |_, _| {
                let _ = tx.send(("chorus-test:closed".into(), Vec::new()));
                async {}.boxed()
            })
            .on_any(move |event, payload, _| {
                let _ = any_tx.send((event.as_str().to_owned(), all_args(payload)));
                async {}.boxed()
            });
        if let Some(auth) = auth {
            builder = builder.auth(auth);
        }
        let sio = builder.connect().await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(EVENT_WAIT, conn_rx.recv()).await {
            Ok(Some(Ok(()))) => Ok(Self {
                sio,
                events: Mutex::new(rx),
            }),
            Ok(Some(Err(e))) => Err(e),
            _ => Err("no CONNECT within the wait".into()),
        }
    }

    /// Emits `event` with one argument and returns the server's ack.
    pub async fn ack(&self, event: &str, data: Value) -> Value {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.sio
            .emit_with_ack(event, data, EVENT_WAIT, move |payload, _| {
                // rust_socketio hands an ack's argument list over as one JSON array.
                let ack = match first_arg(payload) {
                    Value::Array(mut args) if args.len() == 1 => args.swap_remove(0),
                    other => other,
                };
                let _ = tx.send(ack);
                async {}.boxed()
            })
            .await
            .expect("emit");
        tokio::time::timeout(EVENT_WAIT, rx.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no ack for {event}"))
    }

    /// Joins `room`; returns the ack (with history on, it carries the offset).
    pub async fn join(&self, room: &str) -> Value {
        let ack = self.ack("join", json!(room)).await;
        assert_eq!(ack["ok"], json!(true), "join {room}: {ack}");
        ack
    }

    /// The next event and its first argument.
    pub async fn next_event(&self, wait: Duration) -> Option<(String, Value)> {
        self.next_message(wait)
            .await
            .map(|(name, args)| (name, args.into_iter().next().unwrap_or(Value::Null)))
    }

    /// The next event and all its arguments.
    pub async fn next_message(&self, wait: Duration) -> Option<(String, Vec<Value>)> {
        let mut rx = self.events.lock().await;
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    }

    /// The next event named `name`, skipping nothing: any other event fails the test.
    pub async fn expect(&self, name: &str) -> Value {
        match self.next_event(EVENT_WAIT).await {
            Some((n, v)) if n == name => v,
            other => panic!("expected event {name}, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&self, wait: Duration) {
        if let Some(e) = self.next_event(wait).await {
            panic!("expected no event, got {e:?}");
        }
    }

    /// This socket's id, found the way an operator would: join a unique room, list it.
    pub async fn id(&self, api: &Api) -> String {
        let room = format!("whoami-{:016x}", rand_u64());
        self.join(&room).await;
        let ids = api.room_sockets(&room).await;
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(self.ack("leave", json!(room)).await, json!({"ok": true}));
        ids[0].clone()
    }
}

fn first_arg(payload: Payload) -> Value {
    all_args(payload).into_iter().next().unwrap_or(Value::Null)
}

fn all_args(payload: Payload) -> Vec<Value> {
    match payload {
        Payload::Text(values) => values,
        Payload::Binary(b) => vec![Value::String(format!("<{} bytes>", b.len()))],
        #[allow(deprecated)]
        Payload::String(s) => vec![serde_json::from_str(&s).unwrap_or(Value::String(s))],
    }
}

fn payload_text(payload: &Payload) -> String {
    match payload {
        Payload::Text(values) => values
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
        #[allow(deprecated)]
        Payload::String(s) => s.clone(),
        Payload::Binary(_) => "<binary>".into(),
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// Seconds since the Unix epoch, for token claims.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HS256 token with `claims`, signed with `key`.
pub fn jwt(claims: Value, key: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("token")
}
