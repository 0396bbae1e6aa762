//! The FUSE contenders and their mounts: mount_vfs in each configuration (with this build or the
//! `BENCH_BASELINE_BIN` one), s3fs and rclone, each started fresh in the foreground and stopped
//! on drop, and a watchdog that unmounts everything when a step hangs.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::Build;
use crate::server::{Server, BUCKET, KEY, REGION, SECRET};

/// Longest any one measurement (mount + read) may take before its mounts are lazily unmounted,
/// which makes a hung read fail instead of hanging the bench.
pub const STEP_LIMIT: Duration = Duration::from_secs(180);

/// Mountpoints currently mounted by this process, and the deadline of the current step; a
/// watchdog thread lazily unmounts them all when a step overruns.
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static DEADLINE: Mutex<Option<Instant>> = Mutex::new(None);

/// Starts a step: the watchdog gives it [`STEP_LIMIT`].
pub fn step_deadline() {
    *DEADLINE.lock().unwrap() = Some(Instant::now() + STEP_LIMIT);
}

pub fn start_watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(1));
        let overrun = DEADLINE.lock().unwrap().is_some_and(|d| Instant::now() > d);
        if overrun {
            eprintln!("# watchdog: a step ran past {STEP_LIMIT:?}; unmounting everything");
            for mnt in ACTIVE.lock().unwrap().iter() {
                lazy_umount(mnt);
            }
            *DEADLINE.lock().unwrap() = None;
        }
    });
}

/// Ends the last step: nothing left for the watchdog to bound.
pub fn steps_done() {
    *DEADLINE.lock().unwrap() = None;
}

fn lazy_umount(mnt: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
}

fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&target)))
        .unwrap_or(false)
}

/// The peers' settings for large sequential reads, from their own documentation (`s3fs --help`
/// of s3fs 1.90, which also lists libfuse 2's `-o` options; `rclone mount --help` of rclone
/// 1.60.1), caches still off so that every read stays cold and like with like with mount_vfs's
/// cold rows. `BENCH_PEER_DEFAULTS=1` runs rclone with its defaults too (as before issue 15).
///
/// s3fs runs with its defaults. Tried with `-o parallel_count=8,multipart_size=16,
/// max_background=64` (its help documents the first two for multipart uploads; s3fs 1.90 also
/// splits read misses by them, and `max_background` is libfuse's read-ahead depth), it read
/// slower on the 2-core VM (one O_DIRECT reader 0.52 vs 0.81 GB/s, 2026-12-01, two invocations),
/// so those settings would only have flattered mount_vfs's /peer ratios. Left alone for the same
/// reason: `readwrite_timeout` (a stall timeout, not a rate), `max_readahead` (the kernel caps it
/// at the bdi's 128 KiB `read_ahead_kb`, see rclone below), `use_cache` (a cache).
///
/// rclone, one reason each (all "VFS" sections of `rclone mount --help`):
/// - `--buffer-size 128M` (default 16M): "the amount of memory that will be used to buffer
///   data in advance", per open file: how far ahead of the reader rclone downloads.
/// - `--vfs-read-chunk-size 128M --vfs-read-chunk-size-limit off`: "rclone will start reading
///   a chunk of size --vfs-read-chunk-size, and then double the size for each read" with no
///   limit when off: a sequential reader quickly gets few large GETs (these are the defaults,
///   spelled out so the settings line says what ran).
/// - `--no-modtime`, `--no-checksum`: "VFS Performance": "S3 and Swift benefit hugely from the
///   --no-modtime flag ... as each read of the modification time takes a transaction";
///   --no-checksum "Don't compare checksums on up/download" (rclone otherwise hashes what a
///   handle read sequentially; mount_vfs verifies every byte, so this favours rclone).
/// - Not applicable with caches off: `--vfs-read-ahead` ("Extra read ahead over --buffer-size
///   when using cache-mode full"), `--transfers` (uploads from the VFS write cache). Left
///   alone: `--max-read-ahead` (checked: 16M leaves the mount's bdi read_ahead_kb at 128, the
///   kernel's cap, so it changes nothing; mount_vfs raises read_ahead_kb itself).
pub const RCLONE_THROUGHPUT: &[&str] = &[
    "--buffer-size",
    "128M",
    "--vfs-read-chunk-size",
    "128M",
    "--vfs-read-chunk-size-limit",
    "off",
    "--no-modtime",
    "--no-checksum",
];

/// `BENCH_PEER_DEFAULTS=1`: run rclone with its defaults as well (caches still off).
pub fn peer_defaults() -> bool {
    std::env::var("BENCH_PEER_DEFAULTS").is_ok_and(|v| v == "1")
}

/// A FUSE filesystem as measured: which one, in which configuration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Contender {
    /// `cache`: with `--cache-dir` (emptied before every mount, so still cold). `chunked`: the
    /// same files through the v2025 manifest (256 MiB chunk objects) instead of v2023.
    /// `stream`: `--verify stream` (bytes served as they arrive, checked afterwards). `build`:
    /// which mount_vfs binary runs it.
    MountVfs {
        shards: usize,
        cache: bool,
        chunked: bool,
        stream: bool,
        build: Build,
    },
    S3fs,
    Rclone,
}

impl Contender {
    pub fn name(self) -> String {
        match self {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream,
                build,
            } => format!(
                "mount_vfs --shards {shards}{}{}{}{}",
                if cache { " --cache-dir" } else { "" },
                if chunked { " v2025" } else { "" },
                if stream { " --verify stream" } else { "" },
                build.label()
            ),
            Contender::S3fs => "s3fs".into(),
            Contender::Rclone => "rclone".into(),
        }
    }

    pub fn is_peer(self) -> bool {
        !matches!(self, Contender::MountVfs { .. })
    }

    /// mount_vfs with `--cache-dir`: it has a disk cache a second mount can read.
    pub fn has_cache(self) -> bool {
        matches!(self, Contender::MountVfs { cache: true, .. })
    }

    /// This contender as run by each of `builds`, in order; a peer has only itself.
    pub fn versions(self, builds: &[Build]) -> Vec<Contender> {
        match self {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream,
                ..
            } => builds
                .iter()
                .map(|&build| Contender::MountVfs {
                    shards,
                    cache,
                    chunked,
                    stream,
                    build,
                })
                .collect(),
            peer => vec![peer],
        }
    }

    /// The row this build's mount_vfs row is compared with: the same mount run by the
    /// baseline binary. None for the peers and for the baseline itself.
    pub fn baseline(self) -> Option<Contender> {
        match self {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream,
                build: Build::New,
            } => Some(Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream,
                build: Build::Baseline,
            }),
            _ => None,
        }
    }
}

/// One mounted filesystem: the daemon (a child in the foreground), stopped and unmounted on
/// drop, also when the bench panics.
pub struct Mount {
    child: Child,
    mnt: PathBuf,
    /// Where `a.bin` and `b.bin` appear.
    pub files: PathBuf,
}

impl Mount {
    pub fn start(contender: Contender, server: &Server, env: &Env) -> Result<Mount, String> {
        if contender.has_cache() {
            let _ = fs::remove_dir_all(&env.cache_dir);
        }
        Mount::start_keeping_cache(contender, server, env)
    }

    /// [`start`](Self::start), leaving mount_vfs's disk cache as the last mount left it.
    pub fn start_keeping_cache(
        contender: Contender,
        server: &Server,
        env: &Env,
    ) -> Result<Mount, String> {
        let mnt = env.base.join("mnt");
        let endpoint = server.endpoint();
        let command = match contender {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream,
                build,
            } => {
                let manifest = if chunked {
                    &env.manifest_v2025
                } else {
                    &env.manifest
                };
                let mut c = mount_vfs_command(&build.bin(), manifest, &mnt, &endpoint);
                if cache {
                    c.arg("--cache-dir").arg(&env.cache_dir);
                }
                if stream {
                    c.args(["--verify", "stream"]);
                }
                c.args(["--shards", &shards.to_string(), "--memory-limit", "4G"]);
                c
            }
            Contender::S3fs => s3fs_command(&mnt, &endpoint, &env.passwd),
            Contender::Rclone => rclone_command(&mnt, &endpoint, &env.base),
        };
        let files = if contender.is_peer() {
            mnt.join("plain")
        } else {
            mnt.clone()
        };
        Mount::spawn(&contender.name(), command, mnt, files, Path::new("a.bin"))
    }

    /// Starts `command`, a FUSE daemon in the foreground that mounts `mnt`, and returns once
    /// `files/ready` exists (where the daemon shows the bench's files), with what it logged
    /// when it exits or does not mount within 60 s. The daemon is `name` in messages.
    pub fn spawn(
        name: &str,
        mut command: Command,
        mnt: PathBuf,
        files: PathBuf,
        ready: &Path,
    ) -> Result<Mount, String> {
        fs::create_dir_all(&mnt).unwrap();
        if is_mounted(&mnt) {
            lazy_umount(&mnt);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        ACTIVE.lock().unwrap().push(mnt.clone());
        let mut mount = Mount { child, files, mnt };
        // Drain the daemon's output so it never blocks on a full pipe; keep the last lines.
        let tail = Arc::new(Mutex::new(Vec::<String>::new()));
        for pipe in [
            mount
                .child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            mount
                .child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut tail = tail.lock().unwrap();
                    if tail.len() > 20 {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if is_mounted(&mount.mnt) && mount.files.join(ready).exists() {
                return Ok(mount);
            }
            if let Ok(Some(status)) = mount.child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}) before mounting: {}",
                    tail.lock().unwrap().join(" | ")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} did not mount in 60 s: {}",
                    tail.lock().unwrap().join(" | ")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
        ACTIVE.lock().unwrap().retain(|m| m != &self.mnt);
    }
}

/// mount_vfs (`bin`) mounting `manifest` on `mnt` from the CAS under `root/` of the bench
/// bucket at `endpoint`, with the bench's key and nothing from the caller's AWS environment;
/// the caller adds its performance and cache options.
pub fn mount_vfs_command(bin: &Path, manifest: &Path, mnt: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(bin);
    c.arg(manifest).arg(mnt);
    bench_s3_store(&mut c, endpoint);
    c
}

/// Points a mount_vfs command at the CAS under `root/` of the bench bucket at `endpoint`, with
/// the bench's key and nothing from the caller's AWS environment.
pub fn bench_s3_store(c: &mut Command, endpoint: &str) {
    c.args(["--s3", &format!("s3://{BUCKET}/root")])
        .args(["--endpoint-url", endpoint])
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", REGION)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("AWS_ENDPOINT_URL");
}

/// s3fs mounting the whole bucket on `mnt` read-only, in the foreground, with its defaults (see
/// [`RCLONE_THROUGHPUT`] for why), credentials from `passwd` (`KEY:SECRET`, mode 600).
pub fn s3fs_command(mnt: &Path, endpoint: &str, passwd: &Path) -> Command {
    let mut c = Command::new("s3fs");
    c.arg(BUCKET).arg(mnt).arg("-f").arg("-o").arg(format!(
        "passwd_file={},url={endpoint},use_path_request_style,endpoint={REGION},ro",
        passwd.display()
    ));
    c
}

/// rclone mounting the whole bucket on `mnt` read-only with its cache off and
/// [`RCLONE_THROUGHPUT`] (unless `BENCH_PEER_DEFAULTS=1`); its (empty) config file in `base`.
pub fn rclone_command(mnt: &Path, endpoint: &str, base: &Path) -> Command {
    let mut c = Command::new("rclone");
    c.args(["mount", &format!("bench:{BUCKET}")])
        .arg(mnt)
        .args(["--read-only", "--vfs-cache-mode", "off"])
        .args(if peer_defaults() {
            &[][..]
        } else {
            RCLONE_THROUGHPUT
        })
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
        .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
        .env("RCLONE_CONFIG_BENCH_ENDPOINT", endpoint)
        .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", KEY)
        .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET)
        .env("RCLONE_CONFIG_BENCH_REGION", REGION)
        .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
        .env("RCLONE_CONFIG", base.join("rclone.conf"));
    c
}

/// What every mount needs besides the server: where to mount, the manifests, the peers'
/// credentials file.
pub struct Env {
    pub base: PathBuf,
    /// mount_vfs's `--cache-dir`: local storage, not /dev/shm, as on a render node.
    pub cache_dir: PathBuf,
    pub manifest: PathBuf,
    /// The same files as a v2025-12-04-beta manifest: 256 MiB chunk objects.
    pub manifest_v2025: PathBuf,
    pub passwd: PathBuf,
}
