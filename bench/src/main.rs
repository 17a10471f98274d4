//! chorus-bench binary: flags, runtime, one JSON line on stdout.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chorus_bench::cli::Args;
use chorus_bench::report::{Base, ErrorLine};
use chorus_bench::{Error, Options};
use clap::Parser;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chorus-bench: {e}");
            return ExitCode::from(64);
        }
    };
    let opts = match Options::from_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chorus-bench: {e}\n(see chorus-bench --help)");
            return ExitCode::from(64);
        }
    };
    match run(&opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chorus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<ExitCode> {
    chorus_bench::clock::now_ms();
    // Last resort if the runtime itself is wedged: the in-runtime limit fires first.
    let limit = opts.hard_limit_s();
    let watchdog_opts = opts.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(limit + 10.0));
        let _ = emit_error(
            &watchdog_opts,
            &Error::HardLimit(limit.round() as u64).to_string(),
        );
        std::process::exit(2);
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(opts.args.threads))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let task_opts = opts.clone();
    let result = rt
        .block_on(rt.spawn(async move { chorus_bench::run_bounded(&task_opts).await }))
        .context("the run task panicked")?;
    let code = match result {
        Ok(report) => {
            emit(
                opts,
                &serde_json::to_string(&report).context("serialising the report")?,
            )?;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chorus-bench: {e}");
            emit_error(opts, &e.to_string())?;
            if matches!(e, Error::HardLimit(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    };
    // Client tasks may still be closing: do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(code)
}

fn emit_error(opts: &Options, error: &str) -> anyhow::Result<()> {
    let line = ErrorLine {
        base: Base::new(opts),
        error: error.to_owned(),
    };
    emit(opts, &serde_json::to_string(&line)?)
}

/// Prints the line, and appends it to `--out` if given.
fn emit(opts: &Options, line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    if let Some(path) = &opts.args.out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
