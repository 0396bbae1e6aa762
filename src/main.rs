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
        Some(Command::Snapshot(args)) => mount_vfs::snapshot::run(&args),
        Some(Command::Validate(args)) => mount_vfs::validate::run(&args),
        None => {
            eprintln!("mount_vfs: mounting is not yet supported");
            ExitCode::from(2)
        }
    }
}
