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
use crate::mountpoint::{self, MountpointLock, Unmounted};
use crate::namespace::Namespace;
use crate::service::{run_shard, CounterSnapshot, ServiceConfig, ShardCounters};
use crate::signals::Signals;
use crate::store::s3::S3Config;
use crate::store::{CacheJanitor, DiskCache, DiskCacheConfig, S3Target, StoreConfig};

/// Largest registered buffer one shard may have: the kernel refuses io_uring fixed buffers over
/// 1 GiB (verified on 6.18).
const MAX_POOL_PER_SHARD: u64 = 1 << 30;
/// Smallest pool a shard accepts: a verification window of reads in flight plus some cache.
const MIN_POOL_PER_SHARD: u64 = 32 << 20;
/// Store reads one shard keeps in flight (the service's verification window), so a pool must
/// hold at least this many parts.
const PARTS_PER_POOL: u64 = 8;

/// One shard per online CPU, but no more shards than files: a shard owns whole inodes, so more
/// would only pin memory.
fn default_shards(files: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(files.max(1).try_into().unwrap_or(usize::MAX))
}

/// Each shard's pool size. An explicit `--memory-limit` below the minimum is refused (a smaller
/// pool cannot keep a verification window in flight); the default follows the manifest: its
/// total size within [minimum, 1 GiB] per shard, and at most 1/8 of the machine's memory
/// unless the minimum needs more. The whole pool is pinned for the mount's lifetime.
fn pool_per_shard(
    limit: Option<u64>,
    shards: usize,
    part_size: u64,
    manifest_bytes: u64,
) -> Result<u64, MountError> {
    let shards = shards as u64;
    let minimum = MIN_POOL_PER_SHARD.max(PARTS_PER_POOL * part_size);
    match limit {
        Some(limit) => {
            let per_shard = limit / shards;
            if per_shard < minimum {
                return Err(MountError::Usage(format!(
                    "--memory-limit {} MiB gives each of {shards} shards {} MiB, below the {} MiB \
                     a shard needs ({PARTS_PER_POOL} reads of --part-size {} MiB in flight, at \
                     least 32 MiB): use --memory-limit {}M or more, fewer --shards, or a smaller \
                     --part-size",
                    limit >> 20,
                    per_shard >> 20,
                    minimum >> 20,
                    part_size >> 20,
                    (minimum * shards) >> 20,
                )));
            }
            if per_shard > MAX_POOL_PER_SHARD {
                tracing::info!(
                    "--memory-limit {} MiB: using 1 GiB per shard ({} MiB in all), the largest \
                     buffer io_uring registers; add --shards to use more",
                    limit >> 20,
                    (MAX_POOL_PER_SHARD * shards) >> 20
                );
            }
            Ok(per_shard.min(MAX_POOL_PER_SHARD))
        }
        None => {
            let memory = physical_memory().unwrap_or(8 << 30);
            let cap = (memory / 8 / shards).min(MAX_POOL_PER_SHARD).max(minimum);
            let wanted = manifest_bytes.div_ceil(shards).next_multiple_of(2 << 20);
            Ok(wanted.clamp(minimum, cap))
        }
    }
}

/// Bytes of RAM on this machine.
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64)
}

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
        .map(|mut config| {
            config.tuning.request_deadline = Duration::from_secs(args.read_timeout);
            StoreChoice::S3(config)
        })
        .map_err(|e| MountError::Usage(e.to_string()));
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
            let target =
                S3Target::start(&config).map_err(|e| MountError::Runtime(e.to_string()))?;
            match target.probe().map_err(MountError::Runtime)? {
                Some(warning) => tracing::warn!("{warning}"),
                None => tracing::info!("S3 store {} is reachable", target.describe()),
            }
            Ok(StoreConfig::S3(target))
        }
    }
}

/// Decodes and validates the manifest, naming the problem on failure.
fn load_manifest(path: &Path) -> Result<Manifest, MountError> {
    // Unreadable is a usage mistake (exit 2), as in `validate`; invalid is exit 1.
    let bytes = std::fs::read(path)
        .map_err(|e| MountError::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    Manifest::decode(&bytes, &path.display().to_string())
        .map_err(|e| MountError::Manifest(e.to_string()))
}

/// Up to `count` distinct objects of non-empty files, for the start-up check of the store.
fn sample_objects(namespace: &Namespace, count: usize) -> Vec<crate::manifest::Hash> {
    let mut sample = Vec::new();
    for ino in 1..=namespace.len() as u64 {
        if let Some(content) = namespace.file_content(ino) {
            match content.objects.first() {
                Some(hash) if content.size > 0 && !sample.contains(hash) => sample.push(*hash),
                _ => {}
            }
        }
        if sample.len() == count {
            break;
        }
    }
    sample
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
    let result = mount_and_serve(args);
    if let Err(e) = &result {
        report_to_parent(Err(e));
    }
    result
}

fn mount_and_serve(args: MountArgs) -> Result<(), MountError> {
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
            let named_data = cas.file_name().is_some_and(|n| n == "Data") && cas.is_dir();
            return Err(MountError::Usage(match cas.parent() {
                Some(root) if named_data => format!(
                    "--cas {}: that is the CAS's Data/ directory itself; pass the directory \
                     above it: --cas {}",
                    cas.display(),
                    if root.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        root
                    }
                    .display()
                ),
                _ => format!(
                    "--cas {}: no Data/ directory there; create the CAS with `mount_vfs \
                     snapshot DIR --cas {}`",
                    cas.display(),
                    cas.display()
                ),
            }));
        }
    }
    if args.daemon && std::env::var_os(READY_FD_ENV).is_none() {
        // Checked here too so that the common mistakes are reported before forking; the child
        // checks again under the lock.
        mountpoint::check(mountpoint, args.allow_non_empty)?;
        return daemonize(args.log_file.as_deref());
    }
    let _lock = MountpointLock::acquire(mountpoint)?;
    mountpoint::check(mountpoint, args.allow_non_empty)?;
    if let Some(dir) = &args.cache_dir {
        DiskCache::prepare(dir).map_err(|e| MountError::Usage(e.to_string()))?;
    } else if args.cache_size.is_some() {
        return Err(MountError::Usage(
            "--cache-size limits the disk cache: give --cache-dir DIR too".into(),
        ));
    }

    let started = Instant::now();
    let manifest = load_manifest(manifest_path)?;
    let store = open_store(store)?;
    let namespace = Namespace::build(manifest.entries())
        .map_err(|e| MountError::Manifest(format!("{}: {e}", manifest_path.display())))?;
    drop(manifest);
    let namespace = Arc::new(namespace);
    if let StoreConfig::S3(target) = &store {
        match target.check_objects(sample_objects(&namespace, 3)) {
            Ok(Some(warning)) => tracing::warn!("{warning}"),
            Ok(None) => {}
            Err(e) => return Err(MountError::Runtime(e.to_string())),
        }
    }

    let shards = match args.shards {
        Some(0) => return Err(MountError::Usage("--shards must be at least 1".into())),
        Some(n) => n,
        None => default_shards(namespace.file_count()),
    };
    let pool_per_shard = pool_per_shard(
        args.memory_limit,
        shards,
        args.part_size,
        namespace.total_size(),
    )?;
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
            let (janitor, usage) = CacheJanitor::start(root, args.cache_size)
                .map_err(|e| MountError::Runtime(e.to_string()))?;
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
    report_to_parent(Ok(()));

    let signals = Signals::new();
    let stop = wait_for_stop(&signals, &session, args.stats.then_some(&counters));
    stop_serving(
        session,
        &signals,
        stop,
        mountpoint,
        Duration::from_secs(args.stop_grace),
        &counters,
    );
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
    let total = total(counters);
    let line = serde_json::json!({ "stats": label, "total": total, "shards": shards });
    eprintln!("{line}");
}

/// Why the mount is ending.
enum Stop {
    Signal(&'static str),
    /// Someone ran `umount` (or `fusermount -u`): the FUSE session has already ended.
    External,
}

/// Blocks until SIGINT/SIGTERM or until the session ends by itself (external `umount`). With
/// `--stats`, prints the counters every second while they change.
fn wait_for_stop(
    signals: &Signals,
    session: &fuser::BackgroundSession,
    stats: Option<&Vec<Arc<ShardCounters>>>,
) -> Stop {
    let mut last_stats = Instant::now();
    let mut last_printed = None;
    loop {
        if let Some(signal) = signals.wait(Duration::from_millis(200)) {
            return Stop::Signal(signal);
        }
        if session.guard.is_finished() {
            return Stop::External;
        }
        if let Some(counters) = stats {
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                let now = total(counters);
                if last_printed != Some(now) {
                    print_stats(counters, "interval");
                    last_printed = Some(now);
                }
            }
        }
    }
}

/// Unmounts without ever leaving a stale mount: a busy mount (files or working directories
/// still open in it) is detached, so the path is free at once, and its open files are served
/// until they are closed, another signal arrives or `grace` is over. Past that the process
/// exits anyway and the kernel fails the remaining readers with ENOTCONN.
fn stop_serving(
    session: fuser::BackgroundSession,
    signals: &Signals,
    stop: Stop,
    mountpoint: &Path,
    grace: Duration,
    counters: &[Arc<ShardCounters>],
) {
    let reason = match stop {
        Stop::External => {
            tracing::info!("{} was unmounted externally", mountpoint.display());
            let_go(session);
            return;
        }
        Stop::Signal(reason) => reason,
    };
    signals.reset();
    match mountpoint::unmount(mountpoint, false) {
        Ok(Unmounted::Clean) => tracing::info!("{reason}; unmounted {}", mountpoint.display()),
        Ok(Unmounted::Detached) => {
            let open = total(counters).open_handles();
            tracing::info!(
                "{reason}; {} is busy ({open} open files, and maybe working directories): \
                 detached it, so the path is free; serving what is open for up to {}s",
                mountpoint.display(),
                grace.as_secs()
            );
        }
        Err(e) => tracing::warn!("{reason}; cannot unmount {}: {e}", mountpoint.display()),
    }
    // Once the last user of the mount is gone the kernel ends the session.
    let deadline = Instant::now() + grace;
    while !session.guard.is_finished() && Instant::now() < deadline {
        if let Some(again) = signals.wait(Duration::from_millis(50)) {
            tracing::info!("{again} again: not waiting for open files any longer");
            break;
        }
    }
    if session.guard.is_finished() {
        let_go(session);
        return;
    }
    tracing::warn!(
        "{} open files in the detached mount {} were not closed in time; exiting, their \
         readers get ENOTCONN",
        total(counters).open_handles(),
        mountpoint.display()
    );
    // The kernel ends the detached mount when this process exits.
    let_go(session);
}

/// Lets go of the session without dropping it: its drop would unmount `mountpoint` by path
/// again, and by now that path is unmounted already or belongs to a new mount.
fn let_go(session: fuser::BackgroundSession) {
    std::mem::forget(session);
}

fn total(counters: &[Arc<ShardCounters>]) -> CounterSnapshot {
    counters
        .iter()
        .map(|c| c.snapshot())
        .fold(CounterSnapshot::default(), |a, b| a + b)
}

/// Re-runs this command in the background and returns once the child reports the mount ready,
/// or with the child's own error if it could not mount. The child keeps none of the caller's
/// stdio (a pipe reading our output would never close): it logs to `--log-file`, else nowhere.
fn daemonize(log_file: Option<&Path>) -> Result<(), MountError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;

    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(MountError::Runtime(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pipe2 just returned these two descriptors; each is owned once, here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: a valid descriptor we own; clearing CLOEXEC lets the child inherit it.
    unsafe { libc::fcntl(fds[1], libc::F_SETFD, 0) };
    let exe =
        std::env::current_exe().map_err(|e| MountError::Runtime(format!("current_exe: {e}")))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, fds[1].to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| MountError::Runtime(format!("cannot start the background process: {e}")))?;
    // The child holds its own copy; closing ours makes EOF mean "child gone".
    drop(write_end);
    let mut report = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut report);
    match report.split_first() {
        Some((b'R', _)) => {
            let log = log_file.map_or(String::new(), |f| format!(", log in {}", f.display()));
            println!(
                "mount_vfs: mounted in the background (pid {}{log})",
                child.id()
            );
            Ok(())
        }
        Some((_, failure)) => {
            let _ = child.wait();
            let (code, message) = failure.split_first().unwrap_or((&b'1', b""));
            let message = String::from_utf8_lossy(message).into_owned();
            Err(if *code == b'2' {
                MountError::Usage(message)
            } else {
                MountError::Runtime(message)
            })
        }
        None => {
            let status = child
                .wait()
                .map_err(|e| MountError::Runtime(e.to_string()))?;
            Err(MountError::Runtime(format!(
                "the background mount failed ({status}){}",
                log_file.map_or(String::new(), |f| format!("; see {}", f.display()))
            )))
        }
    }
}

/// Tells a waiting `--daemon` parent how mounting went: `R` ready, or `E`, the exit code's
/// digit and the error message.
fn report_to_parent(outcome: Result<(), &MountError>) {
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let message = match outcome {
        Ok(()) => b"R".to_vec(),
        Err(e) => format!("E{}{e}", e.exit_code()).into_bytes(),
    };
    // SAFETY: the parent passed us this pipe's write end and nothing else uses it; we write
    // the message and close it, once (`REPORTED`).
    unsafe {
        libc::write(fd, message.as_ptr().cast(), message.len());
        libc::close(fd);
    }
}
