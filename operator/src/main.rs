use std::{io::Read, process::ExitCode};

use chorus_operator::{render, resources::OperatorConfig};
use clap::{Parser, Subcommand};

/// chorus-operator: runs RealtimeApps on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "chorus-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the RealtimeApp CustomResourceDefinition as YAML.
    Crd,
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
        if let Some(i) = &self.server_image {
            config.server_image = i.clone();
        }
        if let Some(i) = &self.redis_image {
            config.redis_image = i.clone();
        }
        config
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => render::crd_yaml().map_err(|e| e.to_string()),
        Command::Render { file, images } => read(&file)
            .and_then(|text| render::render(&text, &images.config()).map_err(|e| e.to_string())),
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
