//! `mount_vfs MANIFEST MOUNTPOINT`: wires manifest -> namespace -> shards -> FUSE session, waits
//! for SIGINT/SIGTERM (or an external unmount) and tears everything down in reverse order.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};
use mount_vfs_executors::{HugepageMode, ShardConfig, Shards};

use crate::cli::{self, MountArgs};
use crate::fuse_front::FuseFront;
use crate::manifest::Manifest;
use crate::namespace::Namespace;
use crate::service::{run_shard, CounterSnapshot, ServiceConfig, ShardCounters};
use crate::store::s3::S3Config;
use crate::store::{CacheJanitor, DiskCache, DiskCacheConfig, S3Target, StoreConfig};

/// Largest registered buffer one shard may have: the kernel refuses io_uring fixed buffers over
/// 1 GiB (verified on 6.18).
const MAX_POOL_PER_SHARD: u64 = 1 << 30;
/// Smallest useful pool: a few blocks in flight plus some cache.
const MIN_POOL_PER_SHARD: u64 = 32 << 20;

/// Idle shards poll this long before sleeping. Measured on 2 vCPUs (docs/benchmarks.md): warm
/// 1 MiB O_DIRECT reads went from 5.42 to 6.02 GB/s with 200 us; the cost is at most 200 us of
/// one CPU after each burst of requests. Tunable with `UNSTABLE_MOUNT_VFS_SPIN_US`.
const DEFAULT_SPIN_US: u64 = 200;

fn spin_before_park() -> Duration {
    let micros = std::env::var("UNSTABLE_MOUNT_VFS_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SPIN_US);
    Duration::from_micros(micros)
}

/// Environment variable through which a `--daemon` parent learns that its child is mounted.
const READY_FD_ENV: &str = "MOUNT_VFS_READY_FD";

/// A failure that ends `mount_vfs` with a message and an exit status.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Manifest(String),
    #[error("{0}")]
    Mountpoint(String),
    #[error("{0}")]
    Runtime(String),
}

impl MountError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Refuses flags that are accepted for compatibility but not implemented yet, loudly.
fn check_supported(args: &MountArgs) -> Result<StoreChoice, MountError> {
    if args.writable {
        return Err(MountError::Usage(
            "--writable is not yet supported (the copy-on-write overlay is planned); \
             drop --writable to mount read-only"
                .into(),
        ));
    }
    if let Some(cas) = &args.cas {
        return Ok(StoreChoice::Local(cas.clone()));
    }
    if args.s3.is_some() || args.bucket.is_some() {
        return S3Config::from_cli(
            args.s3.as_deref(),
            args.bucket.as_deref(),
            args.root_prefix.as_deref(),
            args.region.as_deref(),
            args.endpoint_url.as_deref(),
            args.profile.as_deref(),
        )
        .map(StoreChoice::S3)
        .map_err(MountError::Usage);
    }
    Err(MountError::Usage(
        "no content store: pass --cas DIR (a directory holding Data/{hash}.xxh128 objects) \
         or --s3 s3://BUCKET/ROOT_PREFIX"
            .into(),
    ))
}

/// Where the mount's bytes come from, as the user asked (not yet opened).
// One short-lived value per run: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum StoreChoice {
    Local(PathBuf),
    S3(S3Config),
}

/// Opens the chosen store; for S3, resolves credentials and proves bucket, region, endpoint
/// and credentials with one request before anything is mounted.
fn open_store(choice: StoreChoice) -> Result<StoreConfig, MountError> {
    match choice {
        StoreChoice::Local(root) => Ok(StoreConfig::Local { root }),
        StoreChoice::S3(config) => {
            let target = S3Target::start(&config).map_err(MountError::Runtime)?;
            match target.probe().map_err(MountError::Runtime)? {
                Some(warning) => tracing::warn!("{warning}"),
                None => tracing::info!("S3 store {} is reachable", target.describe()),
            }
            Ok(StoreConfig::S3(target))
        }
    }
}

/// Checks the mountpoint is an existing directory, not already (or stale-ly) mounted.
fn check_mountpoint(path: &Path) -> Result<(), MountError> {
    let stale = || {
        MountError::Mountpoint(format!(
            "mountpoint {} is a stale FUSE mount left by a process that died; \
             run `umount -l {}` and try again",
            path.display(),
            path.display()
        ))
    };
    let is_disconnected = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(MountError::Mountpoint(format!(
                "mountpoint {} is not a directory",
                path.display()
            )))
        }
        Err(e) if is_disconnected(&e) => return Err(stale()),
        Err(e) => {
            return Err(MountError::Mountpoint(format!(
                "mountpoint {}: {e}",
                path.display()
            )))
        }
    }
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .any(|mounted| Path::new(&mounted.replace("\\040", " ")) == canonical)
    {
        // Attributes may still be cached by the kernel after a FUSE server died; opening the
        // directory always reaches the server, so it tells a live mount from a stale one.
        if let Err(e) = std::fs::read_dir(path) {
            if is_disconnected(&e) {
                return Err(stale());
            }
        }
        return Err(MountError::Mountpoint(format!(
            "{} is already a mount point; unmount it first (`umount {}`)",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Decodes and validates the manifest, naming the problem on failure.
fn load_manifest(path: &Path) -> Result<Manifest, MountError> {
    let bytes = std::fs::read(path).map_err(|e| {
        MountError::Manifest(format!("cannot read manifest {}: {e}", path.display()))
    })?;
    Manifest::decode(&bytes, &path.display().to_string())
        .map_err(|e| MountError::Manifest(e.to_string()))
}

/// Raises the mount's readahead so buffered readers get 1 MiB READs instead of 128 KiB ones.
fn raise_readahead(mountpoint: &Path) {
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&bdi, "1024") {
        tracing::info!("could not raise readahead ({bdi}): {e}; buffered READs stay at 128 KiB");
    }
}

/// Mounts and serves until SIGINT/SIGTERM or an external unmount.
pub fn run(args: MountArgs) -> Result<(), MountError> {
    let store = check_supported(&args)?;
    let (Some(manifest_path), Some(mountpoint)) =
        (args.manifest.as_deref(), args.mountpoint.as_deref())
    else {
        return Err(MountError::Usage(
            "MANIFEST and MOUNTPOINT are required".into(),
        ));
    };
    if let StoreChoice::Local(cas) = &store {
        if !cas.join("Data").is_dir() {
            return Err(MountError::Usage(format!(
                "--cas {}: no Data/ directory there; create the CAS with `mount_vfs snapshot DIR --cas {}`",
                cas.display(),
                cas.display()
            )));
        }
    }
    check_mountpoint(mountpoint)?;
    if let Some(dir) = &args.cache_dir {
        DiskCache::prepare(dir).map_err(MountError::Usage)?;
    } else if args.cache_size.is_some() {
        return Err(MountError::Usage(
            "--cache-size limits the disk cache: give --cache-dir DIR too".into(),
        ));
    }
    if args.daemon && std::env::var_os(READY_FD_ENV).is_none() {
        return daemonize();
    }

    let started = Instant::now();
    let manifest = load_manifest(manifest_path)?;
    let store = open_store(store)?;
    let namespace = Namespace::build(manifest.entries())
        .map_err(|e| MountError::Manifest(format!("{}: {e}", manifest_path.display())))?;
    drop(manifest);
    let namespace = Arc::new(namespace);

    let shards = match args.shards {
        Some(0) => return Err(MountError::Usage("--shards must be at least 1".into())),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let pool_per_shard =
        (args.memory_limit / shards as u64).clamp(MIN_POOL_PER_SHARD, MAX_POOL_PER_SHARD);
    if args.part_size * 8 > pool_per_shard {
        return Err(MountError::Usage(format!(
            "--part-size {} MiB is too large for a {} MiB pool per shard (--memory-limit / \
             --shards, at most 1 GiB each): use at most {} MiB, or raise --memory-limit",
            args.part_size >> 20,
            pool_per_shard >> 20,
            ((pool_per_shard / 8) >> 20).max(1)
        )));
    }
    let counters: Vec<Arc<ShardCounters>> = (0..shards).map(|_| Arc::default()).collect();
    let config = ShardConfig {
        shards,
        io_memory_per_shard: pool_per_shard as usize,
        hugepages: match args.hugepages {
            cli::HugepageMode::Auto => HugepageMode::Auto,
            cli::HugepageMode::Require => HugepageMode::Require,
            cli::HugepageMode::Off => HugepageMode::Off,
        },
        spin_before_park: spin_before_park(),
    };
    let (janitor, disk_cache) = match &args.cache_dir {
        Some(root) => {
            let (janitor, usage) =
                CacheJanitor::start(root, args.cache_size).map_err(MountError::Runtime)?;
            let config = DiskCacheConfig {
                root: root.clone(),
                usage,
            };
            (Some(janitor), Some(config))
        }
        None => (None, None),
    };
    let service = ServiceConfig {
        namespace: namespace.clone(),
        store,
        block_size: args.part_size,
        disk_cache: disk_cache.clone(),
        passthrough: Arc::default(),
    };
    let passthrough = args
        .cache_dir
        .is_some()
        .then(|| service.passthrough.clone());
    let shard_counters = counters.clone();
    let executors = Shards::start(&config, move |ctx, mailbox| {
        let counters = shard_counters[ctx.id].clone();
        run_shard(ctx, mailbox, service.clone(), counters)
    })
    .map_err(|e| MountError::Runtime(format!("cannot start shards: {e}")))?;

    let senders: Vec<_> = (0..shards).map(|i| executors.sender(i).clone()).collect();
    let front = FuseFront::new(namespace.clone(), senders, passthrough);
    let mut options = vec![
        MountOption::RO,
        MountOption::FSName("mount_vfs".into()),
        MountOption::Subtype("mount_vfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if args.allow_other {
        options.push(MountOption::CUSTOM("allow_other".into()));
    }
    let mut fuse_config = Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(shards);
    fuse_config.clone_fd = true;
    let session = fuser::Session::new(front, mountpoint, &fuse_config).map_err(|e| {
        MountError::Mountpoint(format!("cannot mount on {}: {e}", mountpoint.display()))
    })?;
    let session = session
        .spawn()
        .map_err(|e| MountError::Runtime(format!("cannot start the FUSE session: {e}")))?;
    raise_readahead(mountpoint);

    println!(
        "mount_vfs: mounted {} at {} ({} files, {} bytes, {shards} shards, ready in {:.2}s)",
        manifest_path.display(),
        mountpoint.display(),
        namespace.file_count(),
        namespace.total_size(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    signal_ready();

    let stop = wait_for_stop(&session, args.stats.then_some(&counters));
    tracing::info!("{stop}; unmounting {}", mountpoint.display());
    if let Err(e) = session.umount_and_join() {
        tracing::warn!("unmount of {}: {e}", mountpoint.display());
    }
    if let Err(e) = executors.shutdown() {
        tracing::warn!("shard shutdown: {e}");
    }
    drop(janitor);
    if args.stats {
        print_stats(&counters, "final");
    }
    Ok(())
}

fn print_stats(counters: &[Arc<ShardCounters>], label: &str) {
    let shards: Vec<CounterSnapshot> = counters.iter().map(|c| c.snapshot()).collect();
    let total = shards
        .iter()
        .fold(CounterSnapshot::default(), |a, &b| a + b);
    let line = serde_json::json!({ "stats": label, "total": total, "shards": shards });
    eprintln!("{line}");
}

/// Blocks until SIGINT/SIGTERM or until the session ends by itself (external `umount`).
fn wait_for_stop(
    session: &fuser::BackgroundSession,
    stats: Option<&Vec<Arc<ShardCounters>>>,
) -> &'static str {
    let signals = crate::signals::Signals::new();
    let mut last_stats = Instant::now();
    loop {
        if let Some(signal) = signals.wait(Duration::from_millis(200)) {
            return signal;
        }
        if session.guard.is_finished() {
            return "the filesystem was unmounted externally";
        }
        if let Some(counters) = stats {
            if last_stats.elapsed() >= Duration::from_secs(1) {
                print_stats(counters, "interval");
                last_stats = Instant::now();
            }
        }
    }
}

/// Re-runs this command in the background and returns once the child reports the mount ready.
fn daemonize() -> Result<(), MountError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(MountError::Runtime(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: write_fd is a valid descriptor we own; clearing CLOEXEC lets the child inherit it.
    unsafe { libc::fcntl(write_fd, libc::F_SETFD, 0) };
    let exe =
        std::env::current_exe().map_err(|e| MountError::Runtime(format!("current_exe: {e}")))?;
    let mut command = std::process::Command::new(exe);
    // The child keeps stderr for its log; its stdout is not ours to hold open after we exit.
    command
        .args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, write_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| MountError::Runtime(format!("cannot start the background process: {e}")))?;
    // SAFETY: the child holds its own copy; we close ours so EOF means "child gone".
    unsafe { libc::close(write_fd) };
    let mut byte = [0u8; 1];
    // SAFETY: read into a valid 1-byte buffer from the pipe we own.
    let n = unsafe { libc::read(read_fd, byte.as_mut_ptr().cast(), 1) };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(read_fd) };
    if n == 1 {
        println!("mount_vfs: mounted in the background (pid {})", child.id());
        return Ok(());
    }
    let status = child
        .wait()
        .map_err(|e| MountError::Runtime(e.to_string()))?;
    Err(MountError::Runtime(format!(
        "the background mount failed ({status})"
    )))
}

/// Tells a waiting `--daemon` parent that the mount is ready.
fn signal_ready() {
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: the parent passed us this pipe's write end; we write one byte and close it.
    unsafe {
        libc::write(fd, b"1".as_ptr().cast(), 1);
        libc::close(fd);
    }
}
