//! `mount_vfs MANIFEST MOUNTPOINT`: wires manifest -> namespace -> shards -> FUSE session, waits
//! for SIGINT/SIGTERM (or an external unmount) and tears everything down in reverse order.
//!
//! - [`config`]: [`MountConfig`], what to mount and how, and the pool sizing rules;
//! - [`daemon`]: `--daemon`, the detached child and the pipe it reports through;
//! - [`helper`]: `/sbin/mount.fuse.mount_vfs`, mount(8)'s and /etc/fstab's way in;
//! - [`notify`]: systemd readiness (`sd_notify`) for `Type=notify` units;
//! - [`hugepages`]: `--hugepages reserve`, hugepages added for the pools and given back;
//! - [`mountpoint`]: the one-mount lock, the checks before mounting, unmounting;
//! - [`prefetch`]: the trace found, the prefetch plan and the trace writer;
//! - [`share_traces`]: `--share-traces`, traces read from and uploaded to the S3 bucket.
//!
//! The FUSE session itself is `crate::transport::fuser`.

mod config;
mod daemon;
pub mod helper;
mod hugepages;
pub mod mountpoint;
mod notify;
mod prefetch;
mod share_traces;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mount_vfs_executors::{ShardConfig, Shards};

pub use self::config::{ExportOnUnmount, MountConfig, StoreChoice};
pub use crate::transport::SessionError;

use self::mountpoint::{MountpointLock, Unmounted};
use self::share_traces::SharedTraces;
use crate::fs::shard::{run_shard, CounterSnapshot, ServiceConfig, ShardCounters, VerifyPolicy};
use crate::fs::Dispatcher;
use crate::manifest::Manifest;
use crate::metrics::{self, MetricSources, MetricsError};
use crate::namespace::Namespace;
use crate::overlay::{overlay_dir, Overlay, OverlayError, Owner};
use crate::signals::Signals;
use crate::store::s3::{S3ConfigError, S3StartError};
use crate::store::{
    CacheDirError, CacheJanitor, DiskCache, DiskCacheConfig, JanitorStartError, S3Target,
    SpillConfig, StoreConfig, VerificationLog,
};
use crate::trace::{manifest_id, trace_path};
use crate::transport::{self, Session as FuseSession, SessionOptions};

/// A failure that ends `mount_vfs` with a message and an exit status.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A usage mistake: a bad flag or combination, an unreadable manifest, an unusable
    /// `--cas` or `--cache-dir`.
    #[error("{0}")]
    Usage(String),
    /// The manifest is invalid.
    #[error("{0}")]
    Manifest(String),
    /// The mountpoint cannot be mounted on (not an empty directory, mounted, locked).
    #[error("{0}")]
    Mountpoint(String),
    /// Something that should have worked did not (a thread, the store, the background child).
    #[error("{0}")]
    Runtime(String),
    /// The S3 flags name no usable bucket or endpoint: a usage mistake.
    #[error(transparent)]
    S3Config(#[from] S3ConfigError),
    /// The S3 store cannot be used, or does not hold the manifest's objects.
    #[error(transparent)]
    S3Start(#[from] S3StartError),
    /// The FUSE session did not start.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// `--metrics-addr` cannot be served.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `--cache-dir` cannot hold a disk cache: a usage mistake.
    #[error(transparent)]
    CacheDir(#[from] CacheDirError),
    /// The cache janitor's thread did not start.
    #[error(transparent)]
    Janitor(#[from] JanitorStartError),
    /// The writable overlay cannot be opened (in use by another mount, unreadable).
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

impl MountError {
    /// 2 for usage mistakes, 1 for everything else (see `mount_vfs --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            MountError::Usage(_) | MountError::S3Config(_) | MountError::CacheDir(_) => 2,
            _ => 1,
        }
    }
}

/// Opens the chosen store; for S3, resolves credentials and proves bucket, region, endpoint
/// and credentials with one request before anything is mounted.
fn open_store(choice: StoreChoice) -> Result<StoreConfig, MountError> {
    match choice {
        StoreChoice::Local(root) => Ok(StoreConfig::Local { root }),
        StoreChoice::S3(config) => {
            let target = S3Target::start(&config)?;
            match target.probe()? {
                Some(warning) => tracing::warn!("{warning}"),
                None => tracing::info!("S3 store {} is reachable", target.describe()),
            }
            Ok(StoreConfig::S3(target))
        }
    }
}

/// Decodes and validates the manifest, naming the problem on failure; also returns its bytes.
fn load_manifest(path: &Path) -> Result<(Manifest, Vec<u8>), MountError> {
    // Unreadable is a usage mistake (exit 2), as in `validate`; invalid is exit 1.
    let bytes = std::fs::read(path)
        .map_err(|e| MountError::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    let manifest = Manifest::decode(&bytes, &path.display().to_string())
        .map_err(|e| MountError::Manifest(e.to_string()))?;
    Ok((manifest, bytes))
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

/// Mounts `config` and serves it until SIGINT/SIGTERM or an external unmount; with
/// `config.daemon`, returns once a detached child has mounted it.
pub fn run(config: MountConfig) -> Result<(), MountError> {
    let result = mount_and_serve(config);
    if let Err(e) = &result {
        daemon::report_to_parent(Err(e));
    }
    result
}

/// Raises the soft limit on open descriptors to the hard one: every file a job has open on a
/// writable mount holds its upper file open in the daemon.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn mount_and_serve(config: MountConfig) -> Result<(), MountError> {
    raise_open_files_limit();
    let mountpoint = config.mountpoint.as_path();
    if let StoreChoice::Local(cas) = &config.store {
        check_cas(cas)?;
    }
    // Where --export-on-unmount goes, checked now rather than at the end of the job.
    let export = match (&config.export_on_unmount, &config.store) {
        (Some(export), StoreChoice::Local(cas)) => {
            if let Some(problem) = crate::snapshot::output_problem(&export.output) {
                return Err(MountError::Usage(format!("--export-on-unmount: {problem}")));
            }
            Some((export.clone(), cas.clone()))
        }
        _ => None,
    };
    if config.daemon && !daemon::is_child() {
        // Checked here too so that the common mistakes are reported before forking; the child
        // checks again under the lock.
        mountpoint::check(mountpoint, config.allow_non_empty)?;
        return daemon::daemonize(config.log_file.as_deref());
    }
    mountpoint::check_unprivileged(config.allow_other)?;
    let _lock = MountpointLock::acquire(mountpoint)?;
    mountpoint::check(mountpoint, config.allow_non_empty)?;
    let cache_takes_direct_io = match &config.cache_dir {
        Some(dir) => DiskCache::prepare(dir)?,
        None if config.cache_size.is_some() => {
            return Err(MountError::Usage(
                "--cache-size limits the disk cache: give --cache-dir DIR too".into(),
            ))
        }
        None => false,
    };

    let started = Instant::now();
    let (manifest, manifest_bytes) = load_manifest(&config.manifest)?;
    let store = open_store(config.store)?;
    let namespace = Namespace::build(manifest.entries())
        .map_err(|e| MountError::Manifest(format!("{}: {e}", config.manifest.display())))?;
    drop(manifest);
    let namespace = Arc::new(namespace);
    let overlay = match (&config.cache_dir, config.writable) {
        (Some(dir), true) => {
            // SAFETY: getuid/getgid cannot fail and have no preconditions.
            let owner = unsafe {
                Owner {
                    uid: libc::getuid(),
                    gid: libc::getgid(),
                }
            };
            let dir = overlay_dir(dir, &manifest_bytes);
            let overlay = Overlay::open(&dir, namespace.clone(), owner, config.part_size)?;
            tracing::info!("writable: overlay in {}", dir.display());
            Some(Arc::new(overlay))
        }
        _ => None,
    };
    let trace_file = (config.cache_dir.as_deref()).map(|dir| trace_path(dir, &manifest_bytes));
    let shared_traces = match &store {
        StoreConfig::S3(target) if config.share_traces => Some(SharedTraces::new(
            target.clone(),
            &manifest_id(&manifest_bytes),
        )),
        _ => None,
    };
    drop(manifest_bytes);
    if let StoreConfig::S3(target) = &store {
        if let Some(warning) = target.check_objects(sample_objects(&namespace, 3))? {
            tracing::warn!("{warning}");
        }
    }

    let shards = match config.shards {
        Some(0) => return Err(MountError::Usage("--shards must be at least 1".into())),
        Some(n) => n,
        None => config::default_shards(namespace.file_count(), config.max_default_shards),
    };
    let pool_per_shard = config::pool_per_shard(
        config.memory_limit,
        shards,
        config.part_size,
        namespace.total_size(),
    )?;
    let traces = prefetch::start(
        config.prefetch,
        config.cache_dir.as_deref(),
        config.cache_size,
        trace_file,
        shared_traces,
        &namespace,
        shards,
        config.part_size,
    )?;
    // Given back when it drops: after the shards (and their pools) are gone, or on any error.
    let hugepages = config
        .reserve_hugepages
        .then(|| hugepages::reserve(shards, pool_per_shard));
    let counters: Vec<Arc<ShardCounters>> = (0..shards).map(|_| Arc::default()).collect();
    let shard_config = ShardConfig {
        shards,
        io_memory_per_shard: pool_per_shard as usize,
        hugepages: config.hugepages,
        spin_before_park: config::spin_before_park(),
    };
    let (janitor, recording, disk_cache) = match &config.cache_dir {
        Some(root) => {
            let (janitor, usage) = CacheJanitor::start(root, config.cache_size)?;
            let records = Arc::new(VerificationLog::load(root));
            let (recording, recorder) = records.start_recording().map_err(|e| {
                MountError::Runtime(format!("cannot start the verification log thread: {e}"))
            })?;
            let config = DiskCacheConfig {
                root: root.clone(),
                usage,
                records,
                recorder,
                recheck: config.recheck_cache,
                direct_io: cache_takes_direct_io,
            };
            (Some(janitor), Some(recording), Some(config))
        }
        None => (None, None, None),
    };
    // A local CAS is read again as cheaply as a spill file would be.
    let remote = matches!(store, StoreConfig::S3(_));
    let spill = match (disk_cache.is_none() && remote).then(|| SpillConfig::probe(shards)) {
        None => None,
        Some(Ok(spill)) => {
            tracing::info!(
                "no --cache-dir: objects too large for memory spill to unnamed files in {} \
                 (at most {} MiB per shard{}), so each is fetched once",
                spill.dir.display(),
                spill.budget_per_shard >> 20,
                if spill.direct_io { ", O_DIRECT" } else { "" }
            );
            Some(spill)
        }
        Some(Err(why)) => {
            tracing::info!(
                "no --cache-dir and no spill files ({why}): objects too large for memory are \
                 fetched again when read again"
            );
            None
        }
    };
    let service = ServiceConfig {
        namespace: namespace.clone(),
        store,
        block_size: config.part_size,
        disk_cache: disk_cache.clone(),
        spill,
        passthrough: Arc::default(),
        ops: Arc::default(),
        overlay: overlay.clone(),
        verify: VerifyPolicy::new(config.verify),
        trace: traces.recorder.clone(),
        prefetch: traces.plan.clone(),
    };
    let verify = service.verify.clone();
    let passthrough = match config.cache_dir {
        Some(_) if mountpoint::can_passthrough() => Some(service.passthrough.clone()),
        Some(_) => {
            tracing::info!(
                "FUSE passthrough off: the kernel lets only CAP_SYS_ADMIN register backing \
                 files; cached files are read through the shards"
            );
            None
        }
        None => None,
    };
    let ops = service.ops.clone();
    let shard_counters = counters.clone();
    let executors = Shards::start(&shard_config, move |ctx, mailbox| {
        let counters = shard_counters[ctx.id].clone();
        run_shard(ctx, mailbox, service.clone(), counters)
    })
    .map_err(|e| MountError::Runtime(format!("cannot start shards: {e}")))?;

    let senders: Vec<_> = (0..shards).map(|i| executors.sender(i).clone()).collect();
    let sources = MetricSources {
        shards: counters.clone(),
        pools: executors.stats().to_vec(),
        ops: ops.clone(),
        disk_cache: disk_cache.as_ref().map(|c| c.usage.clone()),
    };
    if let Some(addr) = config.metrics_addr {
        metrics::serve(addr, sources.clone())?;
    }
    let mut dispatcher = Dispatcher::new(namespace.clone(), senders, ops)
        .stats(Box::new(move || metrics::snapshot_json(&sources)));
    if let Some(overlay) = &overlay {
        dispatcher = dispatcher.writable(overlay.clone());
    }
    let options = SessionOptions {
        allow_other: config.allow_other,
        threads: shards,
        writable: overlay.is_some(),
        shard_cpus: (0..shards).map(|i| executors.cpu(i).cpu).collect(),
    };
    let session = transport::start(
        config.transport,
        dispatcher,
        passthrough,
        mountpoint,
        options,
    )?;
    verify.drop_cached_pages_with(session.page_cache_dropper());
    raise_readahead(mountpoint);

    // Before anyone is told the mount is ready: a SIGTERM right after READY=1 (systemctl stop)
    // or the ready line must unmount cleanly, not kill the process with the mount left stale.
    let signals = Signals::new();
    println!(
        "mount_vfs: mounted {} at {} ({} files, {} bytes, {shards} shards, ready in {:.2}s)",
        config.manifest.display(),
        mountpoint.display(),
        namespace.file_count(),
        namespace.total_size(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    daemon::report_to_parent(Ok(()));
    notify::ready(&format!(
        "mounted {} at {}",
        config.manifest.display(),
        mountpoint.display()
    ));

    let stop = wait_for_stop(&signals, &session, config.stats.then_some(&counters));
    notify::stopping(&format!("unmounting {}", mountpoint.display()));
    stop_serving(
        session,
        &signals,
        stop,
        mountpoint,
        config.stop_grace,
        &counters,
    );
    if let Err(e) = executors.shutdown() {
        tracing::warn!("shard shutdown: {e}");
    }
    drop(hugepages);
    // The last trace write, now that no shard notes more reads.
    drop(traces.writer);
    if traces.plan.is_some() {
        let total = total(&counters);
        tracing::info!(
            "prefetch: {} bytes prefetched, {} bytes served from them, {} bytes never read",
            total.prefetched_bytes,
            total.prefetch_hit_bytes,
            total.prefetch_wasted_bytes
        );
    }
    let mut exported = Ok(());
    if let Some(overlay) = overlay {
        // Nothing is lost without this (the journal has every change): it makes the upper
        // files durable and saves the next mount a replay.
        match overlay.close() {
            Ok(()) => tracing::info!("overlay {} saved", overlay.dir().display()),
            Err(e) => tracing::warn!(
                "overlay {}: cannot write a checkpoint ({e}); the next mount replays its journal",
                overlay.dir().display()
            ),
        }
        if let Some((export, cas)) = &export {
            exported = crate::export::on_unmount(
                &overlay,
                cas,
                config.cache_dir.as_deref(),
                export.format,
                &export.output,
            )
            .map_err(|e| {
                MountError::Runtime(format!(
                    "--export-on-unmount {}: {e} (the overlay is kept: run `mount_vfs export`)",
                    export.output.display()
                ))
            });
            if let Err(e) = &exported {
                tracing::error!("{e}");
            }
        }
    }
    drop(janitor);
    // Writes the verification records still queued, now that no shard can send more.
    drop(disk_cache);
    drop(recording);
    if config.stats {
        print_stats(&counters, "final");
    }
    exported
}

/// Refuses a `--cas` without a `Data/` directory, naming the likely mistake.
pub(crate) fn check_cas(cas: &Path) -> Result<(), MountError> {
    if cas.join("Data").is_dir() {
        return Ok(());
    }
    let named_data = cas.file_name().is_some_and(|n| n == "Data") && cas.is_dir();
    Err(MountError::Usage(match cas.parent() {
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
    }))
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
    session: &FuseSession,
    stats: Option<&Vec<Arc<ShardCounters>>>,
) -> Stop {
    let mut last_stats = Instant::now();
    let mut last_printed = None;
    loop {
        if let Some(signal) = signals.wait(Duration::from_millis(200)) {
            return Stop::Signal(signal);
        }
        if session.is_finished() {
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
    session: FuseSession,
    signals: &Signals,
    stop: Stop,
    mountpoint: &Path,
    grace: Duration,
    counters: &[Arc<ShardCounters>],
) {
    let reason = match stop {
        Stop::External => {
            tracing::info!("{} was unmounted externally", mountpoint.display());
            session.let_go();
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
    while !session.is_finished() && Instant::now() < deadline {
        if let Some(again) = signals.wait(Duration::from_millis(50)) {
            tracing::info!("{again} again: not waiting for open files any longer");
            break;
        }
    }
    if session.is_finished() {
        session.let_go();
        return;
    }
    tracing::warn!(
        "{} open files in the detached mount {} were not closed in time; exiting, their \
         readers get ENOTCONN",
        total(counters).open_handles(),
        mountpoint.display()
    );
    // The kernel ends the detached mount when this process exits.
    session.let_go();
}

fn total(counters: &[Arc<ShardCounters>]) -> CounterSnapshot {
    counters
        .iter()
        .map(|c| c.snapshot())
        .fold(CounterSnapshot::default(), |a, b| a + b)
}
