use std::process::ExitCode;

use mount_vfs_executors::ArenaAllocator;

/// Places each shard's registered io_uring arena on hugepages (see executors/).
#[global_allocator]
static ALLOCATOR: ArenaAllocator = ArenaAllocator;

use clap::Parser;
use mount_vfs::cli::{Cli, Command};
use mount_vfs::mount::MountConfig;

fn main() -> ExitCode {
    // mount(8) runs us as /sbin/mount.fuse.mount_vfs with its own argument convention.
    if mount_vfs::mount::helper::invoked_as_helper() {
        return mount_vfs::mount::helper::main(std::env::args_os().skip(1));
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // aws-sigv4 traces each request's signing parameters, access key id included: never
        // write those, whatever RUST_LOG asks for.
        .add_directive("aws_sigv4=debug".parse().expect("a valid directive"));
    let log_file = cli.mount.log_file.as_ref().map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open --log-file {}: {e}", path.display()))
    });
    match log_file {
        Some(Err(e)) => {
            eprintln!("mount_vfs: {e}");
            return ExitCode::from(2);
        }
        Some(Ok(file)) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match cli.command {
        Some(Command::Snapshot(args)) => mount_vfs::snapshot::run(&args),
        Some(Command::Validate(args)) => mount_vfs::validate::run(&args),
        Some(Command::Export(args)) => mount_vfs::export::run(&args),
        Some(Command::InstallDeadlineVfs(args)) => {
            match mount_vfs::deadline_vfs::install(&args.prefix, args.binary.as_deref()) {
                Ok(done) => {
                    for line in done {
                        println!("installed {line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mount_vfs install-deadline-vfs: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::MountHelper { args }) => mount_vfs::mount::helper::main(args),
        Some(Command::InstallMountHelper(args)) => {
            match mount_vfs::mount::helper::install(&args.prefix, args.binary.as_deref()) {
                Ok(helper) => {
                    println!("installed {}", helper.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mount_vfs install-mount-helper: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => match MountConfig::try_from(cli.mount).and_then(mount_vfs::mount::run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mount_vfs: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}
