//! The operator at scale: N RealtimeApps (default 500, `--apps N` or `APPS`) of every example
//! shape over a few namespaces, reconciled by the real controller against the in-memory
//! Kubernetes API of tests/support. Measures the time until every app is Ready, reconciles
//! per second, API requests by verb, process memory; then reconciles every app again with
//! nothing changed (once through the controller, by touching an annotation, once by calling
//! the reconcile function directly) and fails unless that wrote nothing.
//!
//! `cargo bench -p chorus-operator --bench scale [-- --apps N --namespaces K --timeout-s S]`
//! One JSON line on stdout, progress on stderr.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use chorus_operator::{
    controller::{self, RunConfig},
    resources::OperatorConfig,
};
use serde_json::json;
use support::{FakeApi, fleet};

struct Args {
    apps: usize,
    namespaces: usize,
    timeout: Duration,
}

fn args() -> Result<Args, String> {
    let env = |k: &str| std::env::var(k).ok();
    let mut apps = env("APPS");
    let mut namespaces = env("NAMESPACES");
    let mut timeout = env("TIMEOUT_S");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--apps" => apps = it.next(),
            "--namespaces" => namespaces = it.next(),
            "--timeout-s" => timeout = it.next(),
            // `cargo bench` passes --bench; other harness flags are of no use here.
            _ => {}
        }
    }
    let num = |v: Option<String>, default: u64, what: &str| -> Result<u64, String> {
        v.map_or(Ok(default), |s| {
            s.parse().map_err(|_| format!("{what}: not a number: {s}"))
        })
    };
    Ok(Args {
        apps: num(apps, 500, "apps")? as usize,
        namespaces: num(namespaces, 5, "namespaces")? as usize,
        timeout: Duration::from_secs(num(timeout, 120, "timeout-s")?),
    })
}

/// VmRSS and VmHWM of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A counter of the operator's own /metrics (served by `controller::run` on loopback),
/// summed over its labels if it has any.
async fn metric(port: u16, name: &str) -> Result<f64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    if values.is_empty() {
        return Err(format!("{name} not in /metrics"));
    }
    Ok(values.iter().sum())
}

const RECONCILES: &str = "chorus_operator_reconciles_total";
const ERRORS: &str = "chorus_operator_reconcile_errors_total";

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// A JSON object with its keys in the order given (serde_json's maps sort them).
fn ordered(fields: &[(&str, serde_json::Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(bench(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("scale: FAILED: {e}");
            ExitCode::from(2)
        }
    }
}

/// Ok(false): measured, but a no-op reconcile wrote something.
async fn bench(args: Args) -> Result<bool, String> {
    let n = args.apps;
    let api = FakeApi::default();
    let apps = fleet::create(&api, n, args.namespaces);
    let (rss_base, _) = memory_kib();
    eprintln!(
        "scale: {n} RealtimeApps over {} namespaces ({} shapes) in the in-memory API; starting the controller",
        args.namespaces,
        fleet::SHAPES.len()
    );

    let port = free_port();
    let config = RunConfig {
        operator: OperatorConfig::default(),
        watch_namespace: None,
        metrics_port: port,
        leader_elect: false,
        lease_namespace: "ops".into(),
        identity: "bench".into(),
        lease_duration_seconds: controller::LEASE_DURATION_SECONDS,
        readings_address: chorus_operator::autoscale::DEFAULT_ADDRESS.into(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let running = tokio::spawn(controller::run(api.client(), config, async move {
        let _ = stop_rx.await;
    }));
    let kubelet = fleet::spawn_kubelet(api.clone());

    // 1. Initial pass: until every app is Ready, then until the API has been quiet.
    let converge = fleet::wait_ready(&api, n, args.timeout, |ready, took| {
        eprintln!("scale: {ready}/{n} Ready after {:.1} s", took.as_secs_f64());
    })
    .await;
    let converge = match converge {
        Ok(_) => started.elapsed(),
        Err(e) => {
            let _ = stop_tx.send(());
            return Err(format!("the apps did not converge: {e}"));
        }
    };
    let reconciles = metric(port, RECONCILES).await?;
    eprintln!(
        "scale: all {n} Ready after {:.2} s ({reconciles} reconciles)",
        converge.as_secs_f64()
    );
    if !fleet::quiesce(&api, Duration::from_millis(500), Duration::from_secs(60)).await {
        return Err("the controller kept calling the API after convergence".into());
    }
    let settled = started.elapsed() - Duration::from_millis(500);
    let requests_initial = api.client_requests();
    let reconciles_initial = metric(port, RECONCILES).await?;
    let errors_initial = metric(port, ERRORS).await?;
    let event_writes_initial = api.events().len() as u64;
    let (rss, hwm) = memory_kib();
    let writes_initial = fleet::writes(&requests_initial);
    eprintln!(
        "scale: settled after {:.2} s, {reconciles_initial} reconciles, requests {requests_initial:?}",
        settled.as_secs_f64()
    );

    // 2. No-op pass through the controller: an annotation changes, the spec does not.
    let before = api.client_requests();
    let touch_started = Instant::now();
    fleet::touch_all(&api, &apps, "1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, RECONCILES).await? < reconciles_initial + n as f64 {
        if Instant::now() > deadline {
            return Err("the touched apps were not all reconciled within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let touch_took = touch_started.elapsed();
    fleet::quiesce(&api, Duration::from_millis(500), Duration::from_secs(30)).await;
    let touch_requests = fleet::since(&before, &api.client_requests());
    let touch_reconciles = metric(port, RECONCILES).await? - reconciles_initial;
    let touch_writes = fleet::writes(&touch_requests);
    eprintln!(
        "scale: no-op pass through the controller: {touch_reconciles} reconciles in {:.2} s, requests {touch_requests:?}",
        touch_took.as_secs_f64()
    );

    // 3. No-op pass calling the reconcile function on every app.
    let ctx = fleet::context(&api);
    let before = api.client_requests();
    let direct_started = Instant::now();
    let (direct_ok, direct_errors) = fleet::reconcile_all(&api, &ctx, &apps, 16).await;
    let direct_took = direct_started.elapsed();
    let direct_requests = fleet::since(&before, &api.client_requests());
    let direct_writes = fleet::writes(&direct_requests);
    eprintln!(
        "scale: no-op pass calling reconcile: {direct_ok} reconciles in {:.2} s, requests {direct_requests:?}",
        direct_took.as_secs_f64()
    );
    if let Some(e) = direct_errors.first() {
        return Err(format!(
            "{} direct reconciles failed, e.g. {e}",
            direct_errors.len()
        ));
    }

    let _ = stop_tx.send(());
    kubelet.abort();
    match tokio::time::timeout(Duration::from_secs(15), running).await {
        Ok(Ok(Ok(()))) => {}
        other => eprintln!("scale: the controller did not stop cleanly: {other:?}"),
    }

    let noop_reconciles = touch_reconciles as u64 + direct_ok as u64;
    let noop_writes = touch_writes + direct_writes;
    let mib = |kib: u64| round(kib as f64 / 1024.0, 1);
    // What the in-memory API holds (objects and recorded events), as JSON text: its share
    // of the process memory is a multiple of this.
    let events = api.events();
    let stored = api.matching(|_, _| true);
    let stored_json: usize = stored
        .iter()
        .map(|(_, o)| serde_json::to_vec(o).map_or(0, |v| v.len()))
        .sum::<usize>()
        + events
            .iter()
            .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()))
            .sum::<usize>();
    let line = ordered(&[
        ("benchmark", json!("operator-scale")),
        ("apps", json!(n)),
        ("namespaces", json!(args.namespaces)),
        ("converge_s", json!(round(converge.as_secs_f64(), 3))),
        ("reconciles", json!(reconciles as u64)),
        (
            "reconciles_per_s",
            json!(round(reconciles / converge.as_secs_f64(), 1)),
        ),
        ("settled_s", json!(round(settled.as_secs_f64(), 3))),
        ("reconciles_initial", json!(reconciles_initial as u64)),
        ("reconcile_errors_initial", json!(errors_initial as u64)),
        ("requests_initial", json!(requests_initial)),
        ("writes_initial", json!(writes_initial)),
        (
            "writes_per_app_initial",
            json!(round(writes_initial as f64 / n as f64, 2)),
        ),
        ("event_writes_initial", json!(event_writes_initial)),
        (
            "object_writes_per_app_initial",
            json!(round(
                writes_initial.saturating_sub(event_writes_initial) as f64 / n as f64,
                2
            )),
        ),
        ("noop_reconciles", json!(noop_reconciles)),
        ("noop_writes", json!(noop_writes)),
        (
            "writes_per_noop_reconcile",
            json!(noop_writes as f64 / noop_reconciles.max(1) as f64),
        ),
        (
            "noop_controller",
            json!({"reconciles": touch_reconciles as u64,
                   "s": round(touch_took.as_secs_f64(), 3), "requests": touch_requests}),
        ),
        (
            "noop_direct",
            json!({"reconciles": direct_ok, "s": round(direct_took.as_secs_f64(), 3),
                   "reconciles_per_s": round(direct_ok as f64 / direct_took.as_secs_f64(), 1),
                   "requests": direct_requests}),
        ),
        ("rss_mb", json!(mib(rss))),
        ("hwm_mb", json!(mib(hwm))),
        ("rss_baseline_mb", json!(mib(rss_base))),
        (
            "rss_kib_per_app",
            json!(round(rss.saturating_sub(rss_base) as f64 / n as f64, 1)),
        ),
        ("api_objects", json!(stored.len())),
        (
            "api_json_mb",
            json!(round(stored_json as f64 / 1024.0 / 1024.0, 1)),
        ),
    ]);
    println!("{line}");
    if noop_writes != 0 {
        eprintln!(
            "scale: FAILED: {noop_writes} writes in {noop_reconciles} no-op reconciles (must be 0)"
        );
        return Ok(false);
    }
    Ok(true)
}
