//! `deadline_vfs`: the AWS Deadline Cloud worker's VIRTUAL file-system mode, served by mount_vfs.
//! See `mount_vfs::deadline_vfs` for the command line and the README ("Use with Deadline Cloud
//! workers") for the install.

use std::process::ExitCode;

use mount_vfs_executors::ArenaAllocator;

/// Places each shard's registered io_uring arena on hugepages (see executors/).
#[global_allocator]
static ALLOCATOR: ArenaAllocator = ArenaAllocator;

use mount_vfs::deadline_vfs;

fn main() -> ExitCode {
    // The worker captures our stdout and stderr into its session log: plain lines, no colour.
    // By default, without what would repeat or expose: glommio's multi-line buffer-registration
    // warning (the shards say it in one line, with the numbers), and aws-config's credential
    // summaries (they name the access key id).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,glommio::sys::uring=error,aws_config=warn")
        })
        .add_directive("aws_sigv4=debug".parse().expect("a valid directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let result = deadline_vfs::parse(std::env::args_os().skip(1)).and_then(|args| {
        if !args.ignored_options.is_empty() {
            tracing::info!(
                "ignoring mount options {} (not used by mount_vfs)",
                args.ignored_options.join(",")
            );
        }
        let cache_dir = deadline_vfs::cache_dir(&args, std::env::var_os("DEADLINE_VFS_CACHE"));
        let config = deadline_vfs::mount_config(&args, &cache_dir)?;
        mount_vfs::mount::run(config)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deadline_vfs: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
