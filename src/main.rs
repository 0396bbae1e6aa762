use std::process::ExitCode;

use mount_vfs_executors::ArenaAllocator;

/// Places each shard's registered io_uring arena on hugepages (see executors/).
#[global_allocator]
static ALLOCATOR: ArenaAllocator = ArenaAllocator;

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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::Snapshot(args)) => mount_vfs::snapshot::run(&args),
        Some(Command::Validate(args)) => mount_vfs::validate::run(&args),
        None => match mount_vfs::mount::run(cli.mount) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mount_vfs: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}
