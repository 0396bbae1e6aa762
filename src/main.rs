use std::process::ExitCode;

use clap::Parser;
use mount_vfs::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Snapshot(_args)) => {
            eprintln!("mount_vfs: snapshot is not yet supported");
            ExitCode::from(2)
        }
        Some(Command::Validate(_args)) => {
            eprintln!("mount_vfs: validate is not yet supported");
            ExitCode::from(2)
        }
        None => {
            eprintln!("mount_vfs: mounting is not yet supported");
            ExitCode::from(2)
        }
    }
}
