use std::{io::Read, process::ExitCode};

use chorus_operator::{
    autoscale,
    controller::{self, RunConfig},
    render,
    resources::OperatorConfig,
};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// chorus-operator: runs RealtimeApps on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "chorus-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Run(Run),
    /// Print the RealtimeApp CustomResourceDefinition as YAML.
    Crd {
        /// Print it as the Helm chart's CRD template instead.
        #[arg(long, hide = true)]
        helm_template: bool,
    },
    /// Print every object the operator would apply for the RealtimeApps in a file, as YAML.
    Render {
        /// A YAML file with one or more RealtimeApps; `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        images: Images,
    },
}

#[derive(Debug, clap::Args)]
struct Images {
    /// chorus-server image for flavor chorus when spec.image is empty.
    #[arg(long, env = "CHORUS_SERVER_IMAGE")]
    server_image: Option<String>,
    /// Managed Redis image when spec.redis.image is empty.
    #[arg(long, env = "CHORUS_REDIS_IMAGE")]
    redis_image: Option<String>,
}

impl Images {
    fn config(&self) -> OperatorConfig {
        let mut config = OperatorConfig::default();
        if let Some(i) = self.server_image.as_ref().filter(|i| !i.is_empty()) {
            config.server_image = i.clone();
        }
        if let Some(i) = self.redis_image.as_ref().filter(|i| !i.is_empty()) {
            config.redis_image = i.clone();
        }
        config
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct Run {
    #[command(flatten)]
    images: Images,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Run only while holding the coordination.k8s.io Lease `chorus-operator-leader`.
    #[arg(long, env = "LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds the leader Lease lasts without renewal (at least 2): a new leader takes over
    /// at most this long after the old one stops renewing.
    #[arg(long, env = "LEASE_DURATION", default_value_t = controller::LEASE_DURATION_SECONDS,
          value_parser = clap::value_parser!(u64).range(2..))]
    lease_duration: u64,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where the Operator autoscaling engine reads an app's connections (`GET /v1/nodes`):
    /// host:port, with `{name}`, `{namespace}` and `{port}` (the app's Service port) filled
    /// in. The default reaches the app's Service from inside the cluster.
    #[arg(long, env = "READINGS_ADDRESS", default_value = autoscale::DEFAULT_ADDRESS)]
    readings_address: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd { helm_template } => if helm_template {
            render::crd_chart_template()
        } else {
            render::crd_yaml()
        }
        .map_err(|e| e.to_string()),
        Command::Render { file, images } => read(&file)
            .and_then(|text| render::render(&text, &images.config()).map_err(|e| e.to_string())),
        Command::Run(run) => return run_controller(run),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_controller(run: Run) -> ExitCode {
    init_logs(run.log_format);
    let config = RunConfig {
        operator: run.images.config(),
        watch_namespace: run.watch_namespace.filter(|n| !n.is_empty()),
        metrics_port: run.metrics_port,
        leader_elect: run.leader_elect,
        lease_namespace: run.lease_namespace,
        identity: run
            .identity
            .filter(|i| !i.is_empty())
            .unwrap_or_else(hostname),
        lease_duration_seconds: run.lease_duration,
        readings_address: run.readings_address,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| anyhow::anyhow!("no Kubernetes client configuration: {e}"))?;
        controller::run(client, config, shutdown_signal()).await?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "chorus-operator".into())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn read(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}
