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
    if let Err(e) = mount_vfs::logging::init(cli.mount.log_file.as_deref(), cli.mount.log_level) {
        eprintln!("mount_vfs: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::Snapshot(args)) => mount_vfs::snapshot::run(&args),
        Some(Command::Validate(args)) => mount_vfs::validate::run(&args),
        Some(Command::Export(args)) => mount_vfs::export::run(&args),
        Some(Command::Stats(args)) => mount_vfs::stats::run(&args),
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
