use std::process::ExitCode;

use chorus_server::{
    app, auth,
    config::{Command, Config, LogFormat},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let mut config = match Config::from_args(std::env::args_os()) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line naming the flag, as the contract asks; clap's hints follow on others.
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid configuration"));
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token(args)) = config.command.take() {
        // stdout carries the token alone, so that `$(chorus-server token ...)` just works.
        return match auth::mint(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            // Usage errors exit 2, like a malformed flag.
            Err(e @ (auth::MintError::NoSecret | auth::MintError::TtlTooLong)) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logs(config.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
