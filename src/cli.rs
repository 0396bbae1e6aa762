//! Command-line interface. The bare form `mount_vfs MANIFEST MOUNTPOINT [options]` mounts;
//! `snapshot`, `validate` and `export` are subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::manifest::Format;
use crate::transport::TransportChoice;

#[derive(Debug, Parser)]
#[command(
    name = "mount_vfs",
    version,
    about = "Mount an AWS Deadline Cloud job-attachments manifest as a FUSE filesystem",
    long_about = "Mount an AWS Deadline Cloud job-attachments manifest as a FUSE filesystem.\n\n\
        The whole tree appears at once; file bytes are fetched from a content-addressed store \
        (CAS: DIR/Data/{hash}.xxh128) on first read, verified against their xxh128 hash, cached \
        in per-core hugepage buffer pools and served from there.\n\n\
        Examples:\n  \
        mount_vfs snapshot ./scene --cas ./cas --output scene.manifest\n  \
        mount_vfs scene.manifest ./vfs --cas ./cas\n  \
        mount_vfs validate scene.manifest",
    override_usage = "mount_vfs [OPTIONS] <MANIFEST> <MOUNTPOINT>   mount a manifest\n       \
        mount_vfs snapshot <DIR> --cas <CAS_DIR> [--output <FILE>]   hash a tree into a CAS\n       \
        mount_vfs validate <MANIFEST>   check a manifest\n       \
        mount_vfs export --cache-dir <DIR> --manifest <MANIFEST> --cas <CAS_DIR> --output <FILE>   \
        a --writable mount's tree as a manifest",
    after_help = "Exit status: 0 success; 1 the mount failed or the manifest is invalid; 2 a usage \
        mistake (bad flag or value, unreadable manifest).",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub mount: MountArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hash a directory tree into a CAS directory and write its manifest.
    Snapshot(SnapshotArgs),
    /// Check a manifest: print its format, counts, size and hash, or every error found.
    Validate(ValidateArgs),
    /// Turn what a --writable mount changed into a manifest: hash the new content into the CAS
    /// and write the whole tree's manifest (and, with --diff, a diff against the mounted one).
    /// Works beside a live mount (what it has fsynced or written so far) and after one.
    Export(ExportArgs),
    /// Install `deadline_vfs` where the AWS Deadline Cloud worker looks for it:
    /// PREFIX/bin/deadline_vfs, PREFIX/link/fusermount3, PREFIX/scripts/production/al2/run_deadline_vfs_al2.sh.
    InstallDeadlineVfs(InstallDeadlineVfsArgs),
    /// Live view of a running mount: throughput, cache hit rate, store GETs in flight and
    /// errors, per shard and in total, refreshed every second (no --metrics-addr needed).
    Stats(StatsArgs),
    /// Install PREFIX/mount.fuse.mount_vfs (a symlink to this binary), so that `mount -t
    /// fuse.mount_vfs MANIFEST DIR -o cas=...` and /etc/fstab lines work (docs/configuration.md).
    InstallMountHelper(InstallMountHelperArgs),
    /// What /sbin/mount.fuse.mount_vfs runs: `SOURCE TARGET [-o OPTIONS] [-sfnv]` from mount(8),
    /// mounted in the background like --daemon.
    MountHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Args)]
pub struct InstallMountHelperArgs {
    /// Where mount(8) looks for helpers (it runs /sbin/mount.TYPE).
    #[arg(long, value_name = "DIR", default_value = "/sbin")]
    pub prefix: PathBuf,
    /// The binary the helper runs (default: this mount_vfs).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The mountpoint of a running mount_vfs.
    pub mountpoint: PathBuf,
    /// Print one sample (rates over 1 s) and exit.
    #[arg(long)]
    pub once: bool,
    /// Print the daemon's raw counters as one JSON line per sample instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InstallDeadlineVfsArgs {
    /// Where to install (the worker's DEADLINE_VFS_PATH; it defaults to /opt/deadline_vfs).
    #[arg(long, value_name = "DIR", default_value = "/opt/deadline_vfs")]
    pub prefix: PathBuf,
    /// The deadline_vfs binary to install (default: the one beside this mount_vfs).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Directory to snapshot.
    pub dir: PathBuf,
    /// CAS directory that receives the content as CAS_DIR/Data/{hash}.xxh128.
    #[arg(long, value_name = "CAS_DIR")]
    pub cas: PathBuf,
    /// Where to write the manifest (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Manifest format to write.
    #[arg(long, value_enum, default_value_t = SnapshotFormat::V2023_03_03)]
    pub format: SnapshotFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotFormat {
    /// What released Deadline clients write: files only, byte-identical to `deadline manifest snapshot`.
    #[value(name = "2023-03-03")]
    V2023_03_03,
    /// Beta format: also directories, symlinks, the exec bit and 256 MiB chunks.
    #[value(name = "2025-12-04-beta")]
    V2025_12_04Beta,
}

impl SnapshotFormat {
    pub fn format(self) -> Format {
        match self {
            SnapshotFormat::V2023_03_03 => Format::V2023_03_03,
            SnapshotFormat::V2025_12_04Beta => Format::V2025_12_04Beta,
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The --cache-dir of the writable mount (its overlay is in DIR/Overlay/).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// The manifest that was mounted (the same file: the overlay is found by its hash).
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Local CAS directory: base objects are read from CAS_DIR/Data/, new objects written there.
    #[arg(long, value_name = "CAS_DIR")]
    pub cas: PathBuf,
    /// Where to write the new manifest (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also write a 2025-12-04-beta diff manifest against the mounted one: new and changed
    /// entries, and deletions.
    #[arg(long, value_name = "FILE")]
    pub diff: Option<PathBuf>,
    /// Format of the new manifest (2023-03-03 cannot say symlinks, empty directories, exec bits).
    #[arg(long, value_enum, default_value_t = SnapshotFormat::V2023_03_03)]
    pub format: SnapshotFormat,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Manifest file to check.
    pub manifest: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HugepageMode {
    /// Use explicit hugepages if reserved, else transparent hugepages, else normal pages (logged).
    Auto,
    /// Fail at start if explicit hugepages cannot back every shard's buffer pool.
    Require,
    /// Normal pages only.
    Off,
    /// As root: add the 2 MiB hugepages the pools need to nr_hugepages at start (per NUMA node)
    /// and take them back at exit; otherwise, or if refused, one line and `auto`.
    Reserve,
}

/// `--verify`: when the bytes of an object may be served (docs/semantics.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyMode {
    /// Serve an object's bytes only after the whole object (a v2023 file, or one 256 MiB v2025
    /// chunk) matched its hash.
    Object,
    /// Serve bytes as ranged GETs bring them; an object read through in order is checked at its
    /// end, and with --cache-dir completed and checked in the background before it is cached.
    /// A mismatch found after bytes were served makes every later open and read fail (EIO).
    Stream,
}

/// `--prefetch`: what a mount fetches into its disk cache before readers ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefetchMode {
    /// Nothing: every object is fetched when it is first read.
    Off,
    /// The objects an earlier mount of the same manifest read, in the order it read them
    /// (its trace in --cache-dir's Traces/).
    Trace,
    /// Every object of the manifest, smallest first.
    All,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Manifest to mount (any job-attachments format).
    #[arg(required = true)]
    pub manifest: Option<PathBuf>,
    /// Empty directory to mount on.
    #[arg(required = true)]
    pub mountpoint: Option<PathBuf>,

    /// Number of shards (pinned executor threads). Default: one per online CPU, but no more
    /// than the manifest has files.
    #[arg(long, value_name = "N", help_heading = "Performance")]
    pub shards: Option<usize>,
    /// Memory for the shards' buffer pools, all shards together (e.g. 512M, 4G). It is
    /// allocated, pre-faulted and registered with io_uring at start-up, so it stays resident for
    /// the whole mount. Each shard needs at least 32 MiB and 8 parts (--part-size); at most
    /// 1 GiB per shard is used (the io_uring limit for one registered buffer). Default: the
    /// manifest's total size within those bounds, and at most 1/8 of the machine's memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Performance")]
    pub memory_limit: Option<u64>,
    /// Unit of fetching and caching: each store read (one S3 ranged GET) and each cached block
    /// is this large. A power of two from 1M to 64M; at most 1/8 of a shard's pool
    /// (--memory-limit / --shards), since 8 reads are kept in flight per object.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_part_size, help_heading = "Performance")]
    pub part_size: u64,
    /// Back the buffer pools with hugepages.
    #[arg(long, value_enum, default_value_t = HugepageMode::Auto, help_heading = "Performance")]
    pub hugepages: HugepageMode,
    /// How FUSE requests arrive: FUSE over io_uring (`uring`: Linux 6.14+ with
    /// /sys/module/fuse/parameters/enable_uring = Y, root), each shard taking the requests of
    /// its CPUs from its own ring; fuser on /dev/fuse (`dev`); or `auto`: the ring when
    /// available and every CPU has a shard, else /dev/fuse with one line saying why. The environment variable
    /// MOUNT_VFS_TRANSPORT sets it when the flag is not given (the test suite runs under either).
    #[arg(long, value_enum, env = "MOUNT_VFS_TRANSPORT", default_value_t = TransportChoice::Auto, help_heading = "Performance")]
    pub transport: TransportChoice,

    /// Local CAS directory holding Data/{hash}.xxh128 objects.
    #[arg(long, value_name = "DIR", help_heading = "Content store", conflicts_with_all = ["s3", "bucket"])]
    pub cas: Option<PathBuf>,
    /// S3 CAS as s3://BUCKET/ROOT_PREFIX (objects at ROOT_PREFIX/Data/{hash}.xxh128).
    #[arg(long, value_name = "S3_URI", help_heading = "Content store", conflicts_with_all = ["bucket", "root_prefix"])]
    pub s3: Option<String>,
    /// S3 bucket holding the CAS (the Deadline client's form; or use --s3).
    #[arg(long, help_heading = "Content store")]
    pub bucket: Option<String>,
    /// Root prefix of the CAS in the bucket (with --bucket).
    #[arg(long, help_heading = "Content store", requires = "bucket")]
    pub root_prefix: Option<String>,
    /// AWS region of the bucket (default: AWS_REGION or the profile's region).
    #[arg(long, help_heading = "Content store")]
    pub region: Option<String>,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000, addressed path-style (default:
    /// AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS S3 in --region).
    #[arg(long, value_name = "URL", help_heading = "Content store")]
    pub endpoint_url: Option<String>,
    /// AWS profile for credentials and region (default: AWS_PROFILE, else "default").
    #[arg(long, help_heading = "Content store")]
    pub profile: Option<String>,

    /// Longest time one S3 request may take, retries included; past it the read fails with
    /// EIO and one log line (a server that accepts but never answers).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Content store")]
    pub read_timeout: u64,
    /// Disk cache on local storage: verified objects are kept in DIR/Data/{hash}.xxh128, so
    /// later reads and later mounts skip the store, and the kernel reads cached files itself
    /// (FUSE passthrough, Linux 6.9+). A later mount trusts a cache file that an earlier one
    /// verified and that is unchanged since (DIR/verified.log); any other is hashed once before
    /// it is used. See --cache-size for eviction. Without it, an S3 object too large for memory
    /// still comes from S3 once: the blocks not kept in memory go to an unnamed file in $TMPDIR
    /// (else /var/tmp), which has no name and is gone when the mount is.
    #[arg(long, value_name = "DIR", help_heading = "Content store")]
    pub cache_dir: Option<PathBuf>,
    /// Largest size of the disk cache; least recently used files are deleted past it. Whatever
    /// the size, 5% of the cache's filesystem is kept free. Default: no limit but that.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Content store")]
    pub cache_size: Option<u64>,
    /// Hash every disk-cache file once before trusting it, even one an earlier mount verified
    /// and that is unchanged since (for the cautious, or as a periodic scrub).
    #[arg(long, requires = "cache_dir", help_heading = "Content store")]
    pub recheck_cache: bool,
    /// When bytes may be served: `object` verifies each object (or v2025 chunk) before its
    /// first byte is served, so no wrong byte is ever served; `stream` serves ranged GETs as
    /// they arrive, for large objects read partially or randomly (a 1 MiB read of a 20 GiB file
    /// fetches about 1 MiB), and checks what was read through afterwards.
    #[arg(long, value_enum, default_value_t = VerifyMode::Object, help_heading = "Content store")]
    pub verify: VerifyMode,
    /// Fetch objects into the disk cache before they are read, verified as always and behind
    /// the readers (reads go first; at most 2 objects per shard at a time): `trace` takes the
    /// objects an earlier mount of this manifest read, in its order (every mount with
    /// --cache-dir records one in DIR/Traces/; --share-traces adds those of other nodes);
    /// `all` the whole manifest, smallest first; `off` nothing. Never more than fits
    /// --cache-size (or the free space). Without --cache-dir nothing is recorded or prefetched.
    #[arg(long, value_enum, default_value_t = PrefetchMode::Trace, help_heading = "Content store")]
    pub prefetch: PrefetchMode,
    /// Share traces through the S3 bucket, so that a mount on one node prefetches what mounts
    /// of the same manifest on other nodes read: at start-up, list
    /// ROOT_PREFIX/Traces/{manifest-id}/ and read its 8 newest objects (one LIST and up to 8
    /// GETs), behind the local trace; while mounted (every 60 s while it changes) and at
    /// unmount, upload this mount's trace as one object of at most 8 MiB (a few KiB for a
    /// typical job) under that prefix: one new object per mount, which the bucket keeps until a
    /// lifecycle rule or someone removes it. S3 failures cost a log line, never the mount. Needs
    /// an S3 store and --cache-dir.
    #[arg(long, help_heading = "Content store")]
    pub share_traces: bool,

    /// Let the job write: a copy-on-write overlay kept in --cache-dir (DIR/Overlay/), which
    /// survives a crash and is given back by the next mount of the same manifest with the same
    /// --cache-dir; `mount_vfs export` turns it into a manifest. Needs --cache-dir.
    #[arg(long, help_heading = "Writable overlay")]
    pub writable: bool,
    /// At a clean unmount, export the overlay to FILE as `mount_vfs export` does, new content
    /// into --cas (a local CAS). Needs --writable.
    #[arg(long, value_name = "FILE", help_heading = "Writable overlay")]
    pub export_on_unmount: Option<PathBuf>,
    /// Format of the --export-on-unmount manifest.
    #[arg(long, value_enum, default_value_t = SnapshotFormat::V2023_03_03, requires = "export_on_unmount", help_heading = "Writable overlay")]
    pub export_format: SnapshotFormat,

    /// Print per-shard counters every second, and a summary at unmount.
    #[arg(long, help_heading = "Mount")]
    pub stats: bool,
    /// Serve Prometheus/OpenMetrics metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464;
    /// docs/metrics.md lists them).
    #[arg(long, value_name = "HOST:PORT", help_heading = "Mount")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Let users other than the mounting one access the mount.
    #[arg(long, help_heading = "Mount")]
    pub allow_other: bool,
    /// Return once the mount is ready, leaving the filesystem running in the background
    /// (detached from the terminal; its log goes to --log-file, else nowhere).
    #[arg(long, help_heading = "Mount")]
    pub daemon: bool,
    /// Append the log to FILE instead of standard error.
    #[arg(long, value_name = "FILE", help_heading = "Mount")]
    pub log_file: Option<PathBuf>,
    /// Log level when RUST_LOG is unset (RUST_LOG, if set, wins) [default: info]
    #[arg(long, value_enum, value_name = "LEVEL", help_heading = "Mount")]
    pub log_level: Option<crate::logging::LogLevel>,
    /// Mount on a directory that is not empty (its entries are hidden while mounted).
    #[arg(long, help_heading = "Mount")]
    pub allow_non_empty: bool,
    /// On SIGTERM/SIGINT with files still open in the mount: the mount is detached at once
    /// (the path is free), open files are served until closed or for this many seconds, then
    /// the process exits. A second signal ends the wait.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        help_heading = "Mount"
    )]
    pub stop_grace: u64,
}

/// A `--memory-limit`, `--cache-size` or `--part-size` value that is not usable; clap prints it
/// after the flag's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size; write e.g. 512M or 4G")]
    NotASize(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
    #[error("{0} is not a power of two between 1M and 64M (e.g. 4M, 8M, 16M)")]
    NotAPartSize(String),
}

/// A [`parse_size`] that is also a power of two from 1 MiB to 64 MiB.
fn parse_part_size(text: &str) -> Result<u64, SizeError> {
    let size = parse_size(text)?;
    if !size.is_power_of_two() || !(1 << 20..=64 << 20).contains(&size) {
        return Err(SizeError::NotAPartSize(text.to_string()));
    }
    Ok(size)
}

/// Parses `1073741824`, `512K`, `64M`, `4G`, `1T` (binary units; an optional trailing `iB`/`B`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn seed_invocation_parses() {
        let cli = Cli::try_parse_from([
            "mount_vfs",
            "job_bundles_manifest_v2.json",
            "./vfs",
            "--writable",
            "--cache-dir",
            "/tmp/vfs-cache",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert!(cli.mount.writable);
    }

    #[test]
    fn store_flags_are_exclusive() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["mount_vfs", "m.json", "./vfs"].iter().chain(args.iter()))
        };
        let cli = parse(&["--s3", "s3://bucket/root", "--region", "eu-west-1"]).unwrap();
        assert_eq!(cli.mount.s3.as_deref(), Some("s3://bucket/root"));
        assert!(parse(&["--bucket", "b", "--root-prefix", "r", "--profile", "p"]).is_ok());
        assert!(parse(&["--cas", "d", "--s3", "s3://b/r"]).is_err());
        assert!(parse(&["--cas", "d", "--bucket", "b"]).is_err());
        assert!(parse(&["--s3", "s3://b/r", "--bucket", "b"]).is_err());
    }

    #[test]
    fn export_flags_parse() {
        let cli = Cli::try_parse_from([
            "mount_vfs",
            "export",
            "--cache-dir",
            "c",
            "--manifest",
            "m",
            "--cas",
            "cas",
            "-o",
            "new",
            "--diff",
            "d",
            "--format",
            "2025-12-04-beta",
        ])
        .unwrap();
        let Some(Command::Export(args)) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.format, SnapshotFormat::V2025_12_04Beta);
        assert!(Cli::try_parse_from(["mount_vfs", "export", "--manifest", "m"]).is_err());
        let mount = |extra: &[&str]| {
            Cli::try_parse_from(["mount_vfs", "m", "vfs", "--writable"].iter().chain(extra))
        };
        assert!(mount(&["--export-on-unmount", "new"]).is_ok());
        assert!(mount(&["--export-format", "2025-12-04-beta"]).is_err());
        assert!(
            mount(&[]).is_ok(),
            "the default format needs no --export-on-unmount"
        );
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from(["mount_vfs", "validate", "m.json"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Validate(_))));
    }
}
