//! [`MountConfig`]: what a mount was asked to do, resolved from the command line (or built by an
//! embedder) so that [`run`](super::run) never sees clap; and the sizing rules that turn it into
//! shards and buffer pools once the manifest is known.

use std::path::PathBuf;
use std::time::Duration;

use mount_vfs_executors::HugepageMode;

use super::MountError;
use crate::cli::{self, MountArgs};
use crate::fs::shard::VerifyMode;
use crate::manifest::Format;
use crate::store::s3::S3Config;

/// One mount's settings, as resolved values. Checks that need the filesystem, the manifest or
/// the store (an existing `--cas`, a usable `--cache-dir`, pool sizes) are made by
/// [`run`](super::run), in the order a user would fix them.
#[derive(Debug)]
pub struct MountConfig {
    /// Manifest to mount (any job-attachments format).
    pub manifest: PathBuf,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Where file bytes come from.
    pub store: StoreChoice,
    /// Disk cache of verified objects (`--cache-dir`), also the source of passthrough opens.
    pub cache_dir: Option<PathBuf>,
    /// Largest size of the disk cache; `None`: bounded only by the filesystem's free space.
    /// Refused without `cache_dir`.
    pub cache_size: Option<u64>,
    /// Capture writes in a copy-on-write overlay in `cache_dir` (refused without it).
    pub writable: bool,
    /// Export the overlay as a manifest at a clean unmount (writable, local CAS only).
    pub export_on_unmount: Option<ExportOnUnmount>,
    /// Hash every cache file once even when a verification record vouches for it.
    pub recheck_cache: bool,
    /// `--verify`: whether bytes are served only after their object verified.
    pub verify: VerifyMode,
    /// What to fetch into the disk cache before it is read (`--prefetch`).
    pub prefetch: cli::PrefetchMode,
    /// `--share-traces`: read and upload traces under `{rootPrefix}/Traces/` (S3 store and
    /// `cache_dir` only).
    pub share_traces: bool,
    /// Shards (pinned executor threads); `None`: one per CPU, no more than files. `Some(0)` is
    /// refused.
    pub shards: Option<usize>,
    /// The most shards the default (`shards: None`) picks; `None`: one per CPU. A shared node
    /// (`deadline_vfs`) caps it so the mount does not pin a pool and a thread on every core.
    pub max_default_shards: Option<usize>,
    /// Buffer-pool memory of all shards together; `None`: sized from the manifest.
    pub memory_limit: Option<u64>,
    /// Bytes per store read and per cached block: a power of two from 1 MiB to 64 MiB.
    pub part_size: u64,
    /// Whether the buffer pools are backed by hugepages.
    pub hugepages: HugepageMode,
    /// `--hugepages reserve`: add the pages the pools need to the kernel's pool for the mount's
    /// lifetime (root), then allocate as `hugepages` (`Auto`) says.
    pub reserve_hugepages: bool,
    /// How long a busy mount keeps serving open files after SIGTERM/SIGINT.
    pub stop_grace: Duration,
    /// Return once mounted and serve from a detached child process.
    pub daemon: bool,
    /// Where the log goes (the caller sets up logging; a daemon names it when it detaches).
    pub log_file: Option<PathBuf>,
    /// Let users other than the mounting one access the mount.
    pub allow_other: bool,
    /// Mount on a directory with entries (hidden while mounted).
    pub allow_non_empty: bool,
    /// Print per-shard counters every second while they change, and at unmount.
    /// `--metrics-addr`: where to serve `/metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub stats: bool,
    /// `--transport`: how FUSE requests arrive.
    pub transport: crate::transport::TransportChoice,
}

/// `--export-on-unmount FILE --export-format F`.
#[derive(Debug, Clone)]
pub struct ExportOnUnmount {
    pub output: PathBuf,
    pub format: Format,
}

/// Where the mount's bytes come from, as the user asked (not yet opened).
// One short-lived value per run: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum StoreChoice {
    /// A local CAS directory holding `Data/{hash}.xxh128`.
    Local(PathBuf),
    /// An S3 bucket and root prefix; `--read-timeout` is already in its tuning.
    S3(S3Config),
}

impl TryFrom<MountArgs> for MountConfig {
    type Error = MountError;

    /// Refuses flags that are accepted for compatibility but not implemented yet, loudly, and
    /// resolves the store flags. Touches no file: a `--daemon` child converts the same
    /// arguments again and cannot fail where its parent did not.
    fn try_from(args: MountArgs) -> Result<MountConfig, MountError> {
        if args.writable && args.cache_dir.is_none() {
            return Err(MountError::Usage(
                "--writable keeps what the job writes in the cache directory: give \
                 --cache-dir DIR too (on a local filesystem with room for the job's outputs)"
                    .into(),
            ));
        }
        if args.prefetch == cli::PrefetchMode::All && args.cache_dir.is_none() {
            return Err(MountError::Usage(
                "--prefetch all fetches the manifest into the disk cache: give --cache-dir DIR \
                 too (or --prefetch off)"
                    .into(),
            ));
        }
        let store = store_choice(&args)?;
        if args.share_traces {
            if !matches!(store, StoreChoice::S3(_)) {
                return Err(MountError::Usage(
                    "--share-traces keeps traces in the S3 bucket next to the data: it needs an \
                     S3 store (--s3 or --bucket); with --cas, copy --cache-dir's Traces/ \
                     between nodes instead"
                        .into(),
                ));
            }
            if args.cache_dir.is_none() {
                return Err(MountError::Usage(
                    "--share-traces needs --cache-dir DIR: traces are recorded, and prefetched \
                     objects kept, in the disk cache"
                        .into(),
                ));
            }
        }
        if args.export_on_unmount.is_some() {
            if !args.writable {
                return Err(MountError::Usage(
                    "--export-on-unmount exports what a --writable mount changed: add \
                     --writable --cache-dir DIR, or export a read-only mount's manifest as it is"
                        .into(),
                ));
            }
            if !matches!(store, StoreChoice::Local(_)) {
                return Err(MountError::Usage(
                    "--export-on-unmount writes the new content into a local CAS: mount with \
                     --cas DIR (exporting to S3 is not supported yet)"
                        .into(),
                ));
            }
        }
        let (Some(manifest), Some(mountpoint)) = (args.manifest, args.mountpoint) else {
            return Err(MountError::Usage(
                "MANIFEST and MOUNTPOINT are required".into(),
            ));
        };
        Ok(MountConfig {
            manifest,
            mountpoint,
            store,
            cache_dir: args.cache_dir,
            cache_size: args.cache_size,
            writable: args.writable,
            export_on_unmount: args.export_on_unmount.map(|output| ExportOnUnmount {
                output,
                format: args.export_format.format(),
            }),
            recheck_cache: args.recheck_cache,
            verify: match args.verify {
                cli::VerifyMode::Object => VerifyMode::Object,
                cli::VerifyMode::Stream => VerifyMode::Stream,
            },
            prefetch: args.prefetch,
            share_traces: args.share_traces,
            shards: args.shards,
            max_default_shards: None,
            memory_limit: args.memory_limit,
            part_size: args.part_size,
            hugepages: match args.hugepages {
                cli::HugepageMode::Auto | cli::HugepageMode::Reserve => HugepageMode::Auto,
                cli::HugepageMode::Require => HugepageMode::Require,
                cli::HugepageMode::Off => HugepageMode::Off,
            },
            reserve_hugepages: args.hugepages == cli::HugepageMode::Reserve,
            stop_grace: Duration::from_secs(args.stop_grace),
            daemon: args.daemon,
            log_file: args.log_file,
            allow_other: args.allow_other,
            allow_non_empty: args.allow_non_empty,
            stats: args.stats,
            metrics_addr: args.metrics_addr,
            transport: args.transport,
        })
    }
}

/// `--cas DIR`, or the S3 flags with `--read-timeout` as the request deadline.
fn store_choice(args: &MountArgs) -> Result<StoreChoice, MountError> {
    if let Some(cas) = &args.cas {
        return Ok(StoreChoice::Local(cas.clone()));
    }
    if args.s3.is_some() || args.bucket.is_some() {
        let mut config = S3Config::from_cli(
            args.s3.as_deref(),
            args.bucket.as_deref(),
            args.root_prefix.as_deref(),
            args.region.as_deref(),
            args.endpoint_url.as_deref(),
            args.profile.as_deref(),
        )?;
        config.tuning.request_deadline = Duration::from_secs(args.read_timeout);
        return Ok(StoreChoice::S3(config));
    }
    Err(MountError::Usage(
        "no content store: pass --cas DIR (a directory holding Data/{hash}.xxh128 objects) \
         or --s3 s3://BUCKET/ROOT_PREFIX"
            .into(),
    ))
}

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
pub(super) fn default_shards(files: u64, cap: Option<usize>) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(cap.unwrap_or(usize::MAX).max(1))
        .min(files.max(1).try_into().unwrap_or(usize::MAX))
}

/// Each shard's pool size. An explicit `--memory-limit` below the minimum is refused (a smaller
/// pool cannot keep a verification window in flight); the default follows the manifest: its
/// total size within [minimum, 1 GiB] per shard, and at most 1/8 of the machine's memory
/// unless the minimum needs more. The whole pool is pinned for the mount's lifetime.
pub(super) fn pool_per_shard(
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

/// How long idle shards spin before parking (an unstable tuning knob, not a flag).
pub(super) fn spin_before_park() -> Duration {
    let micros = std::env::var("UNSTABLE_MOUNT_VFS_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SPIN_US);
    Duration::from_micros(micros)
}
