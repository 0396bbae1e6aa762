//! Pieces shared by the mount benchmarks: the do-nothing FUSE baseline, process accounting, and
//! the same-invocation A/B comparison with an older mount_vfs binary (`BENCH_BASELINE_BIN`).
#![allow(dead_code)]

pub mod chart;
pub mod mountpoint_s3;

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};

const TTL: Duration = Duration::from_secs(3600);

/// The transport ceiling: files of `size` bytes whose every READ is answered from one static
/// buffer, with no work at all behind it.
pub struct NullFs {
    size: u64,
    names: Vec<&'static str>,
    buffer: Vec<u8>,
}

impl NullFs {
    /// Files `names` (inodes 2, 3, ...) in the root, each `size` bytes long.
    pub fn new(size: u64, names: &[&'static str]) -> NullFs {
        NullFs {
            size,
            names: names.to_vec(),
            buffer: vec![7u8; 16 << 20],
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

impl Filesystem for NullFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.names.iter().position(|n| OsStr::new(n) == name) {
            Some(i) if parent.0 == 1 => reply.entry(&TTL, &self.attr(i as u64 + 2), Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        reply.data(&self.buffer[..len.min(self.buffer.len())]);
    }
}

/// (minor faults, major faults, CPU seconds: utime + stime) of a process, from /proc/PID/stat;
/// zeros if it is gone.
pub fn proc_counters(pid: u32) -> (u64, u64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    if fields.len() < 13 {
        return (0, 0, 0.0);
    }
    // After the command name: minflt is field 10, majflt 12, utime 14, stime 15.
    let minflt: u64 = fields[7].parse().unwrap_or(0);
    let majflt: u64 = fields[9].parse().unwrap_or(0);
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (minflt, majflt, ticks / hz)
}

/// (minor faults, CPU seconds) of a process, from /proc/PID/stat; zeros if it is gone.
pub fn faults_and_cpu(pid: u32) -> (u64, f64) {
    let (minflt, _, cpu) = proc_counters(pid);
    (minflt, cpu)
}

/// Mounts a [`NullFs`] on `mnt` the way mount_vfs mounts (read-only, 2 threads, `clone_fd`).
/// Dropping the session unmounts it.
pub fn mount_null(
    mnt: &std::path::Path,
    size: u64,
    names: &[&'static str],
) -> fuser::BackgroundSession {
    mount_null_threads(mnt, size, names, 2)
}

/// [`mount_null`] with `threads` FUSE threads (mount_vfs runs one per shard).
pub fn mount_null_threads(
    mnt: &std::path::Path,
    size: u64,
    names: &[&'static str],
    threads: usize,
) -> fuser::BackgroundSession {
    std::fs::create_dir_all(mnt).unwrap();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("nullfs".into()),
    ];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    fuser::Session::new(NullFs::new(size, names), mnt, &config)
        .unwrap()
        .spawn()
        .unwrap()
}

/// The mount_vfs binary the bench measures: `MOUNT_VFS_BIN` (a bench executable carried to
/// another machine, see benches/scaling.sh), else this checkout's, built by cargo for the bench.
pub fn bin() -> PathBuf {
    std::env::var_os("MOUNT_VFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_mount_vfs").into())
}

/// Names an older mount_vfs binary to measure beside this build in the same invocation.
const BASELINE_BIN: &str = "BENCH_BASELINE_BIN";

/// Which mount_vfs binary a row measures. With `BENCH_BASELINE_BIN` set, every mount_vfs row is
/// measured with both, interleaved within each run so both see the same machine state: the way
/// to show that a refactor kept the speed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Build {
    /// [`bin()`].
    New,
    /// `BENCH_BASELINE_BIN`.
    Baseline,
}

impl Build {
    /// The builds each run measures, in that order: [`Build::New`], then [`Build::Baseline`]
    /// when `BENCH_BASELINE_BIN` is set (and names a file: a typo fails now, not mid-run).
    pub fn all() -> Vec<Build> {
        match std::env::var_os(BASELINE_BIN) {
            None => vec![Build::New],
            Some(path) => {
                assert!(
                    std::path::Path::new(&path).is_file(),
                    "{BASELINE_BIN}={}: no such file",
                    path.to_string_lossy()
                );
                vec![Build::New, Build::Baseline]
            }
        }
    }

    pub fn bin(self) -> PathBuf {
        match self {
            Build::New => bin(),
            Build::Baseline => std::env::var_os(BASELINE_BIN)
                .expect("BENCH_BASELINE_BIN is set")
                .into(),
        }
    }

    /// Appended to a row's label: nothing for this build, so its rows read as without a
    /// baseline.
    pub fn label(self) -> &'static str {
        match self {
            Build::New => "",
            Build::Baseline => " (baseline)",
        }
    }
}

/// `new/baseline 1.02x`: a row of this build against the same row of the baseline, median
/// against median (for a time, below 1 is faster; for a rate, above 1).
pub fn vs_baseline(new: f64, baseline: f64) -> String {
    format!("new/baseline {:.2}x", new / baseline)
}

/// Every timed read asks for this much.
const READ_SIZE: usize = 1 << 20;

/// One timed sequential read: its speed, and the xxh3-128 of the bytes it returned (hashed after
/// the clock stopped), so a contender that returns wrong bytes cannot win.
pub struct Timed {
    pub bytes_per_sec: f64,
    pub digest: u128,
}

/// Where a timed read's clock starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Clock {
    /// After open(2) returned: the reads alone.
    AfterOpen,
    /// Before open(2): a filesystem that does its work at open (a disk cache filled and
    /// verified before the open returns) is charged for it.
    AtOpen,
}

/// Reads `path` sequentially in 1 MiB requests into one pre-faulted buffer (the same work for
/// every contender), then hashes what it read outside the timed region.
pub fn sequential_read(path: &Path, direct: bool, clock: Clock) -> Timed {
    let open = || {
        let mut options = fs::OpenOptions::new();
        options.read(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        options
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    };
    let len = fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len() as usize;
    let capacity = len.next_multiple_of(READ_SIZE).max(READ_SIZE);
    let layout = std::alloc::Layout::from_size_align(capacity, 4096).unwrap();
    // SAFETY: the layout has a non-zero size; the buffer is freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: ptr points to `capacity` initialised (zeroed) bytes that we own exclusively.
    let buffer = unsafe { std::slice::from_raw_parts_mut(ptr, capacity) };
    // Fault every page in before the clock starts.
    for page in buffer.chunks_mut(4096) {
        page[0] = 1;
    }
    let (started, mut file) = match clock {
        Clock::AfterOpen => {
            let file = open();
            (Instant::now(), file)
        }
        Clock::AtOpen => (Instant::now(), open()),
    };
    let mut total = 0usize;
    loop {
        let n = file
            .read(&mut buffer[total..total + READ_SIZE])
            .unwrap_or_else(|e| panic!("read {} at {total}: {e}", path.display()));
        if n == 0 {
            break;
        }
        total += n;
        if total + READ_SIZE > capacity {
            // The last request may only ask for what is left of the buffer.
            let n = file
                .read(&mut buffer[total..])
                .unwrap_or_else(|e| panic!("read {} at {total}: {e}", path.display()));
            total += n;
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let digest = xxhash_rust::xxh3::xxh3_128(&buffer[..total]);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    Timed {
        bytes_per_sec: total as f64 / secs,
        digest,
    }
}

/// A timed read that must have returned exactly the bytes whose xxh3-128 is `expected`.
pub fn checked_read(path: &Path, direct: bool, clock: Clock, expected: u128) -> f64 {
    let timed = sequential_read(path, direct, clock);
    assert_eq!(
        timed.digest,
        expected,
        "{} returned wrong bytes: its result is void",
        path.display()
    );
    timed.bytes_per_sec
}

/// "median (range low-high, n runs)", or a single sample labelled as one.
pub fn spread(samples: &[f64]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => "no run finished".into(),
        1 => format!("{} (single sample)", gbs(sorted[0])),
        n => format!(
            "{} (median; range {:.2}-{:.2}, {n}/{n} runs ok)",
            gbs(sorted[n / 2]),
            sorted[0] / 1e9,
            sorted[n - 1] / 1e9
        ),
    }
}

pub fn gbs(bytes_per_sec: f64) -> String {
    format!("{:.2} GB/s", bytes_per_sec / 1e9)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A mount_vfs mount running in the foreground. Dropping it stops it (SIGTERM, then waits for
/// it to exit) and lazily unmounts the mountpoint, should it still be mounted: no mount outlives
/// the bench, not even a panicking one.
pub struct Daemon {
    pub child: Child,
    pub mnt: PathBuf,
}

impl Daemon {
    /// Runs `command` (a mount_vfs mount of `mnt`) with its standard error appended to `log`,
    /// and returns once it printed its "mounted" line; when it does not, the error holds what
    /// it logged.
    pub fn start(mut command: Command, mnt: &Path, log: &Path) -> Result<Daemon, String> {
        fs::create_dir_all(mnt).unwrap();
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let logged_before = stderr.metadata().map_or(0, |m| m.len()) as usize;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let daemon = Daemon {
            child,
            mnt: mnt.to_path_buf(),
        };
        if line.contains("mounted") {
            return Ok(daemon);
        }
        drop(daemon);
        let logged = fs::read(log).unwrap_or_default();
        let logged = String::from_utf8_lossy(logged.get(logged_before..).unwrap_or_default());
        let said: Vec<&str> = [line.trim(), logged.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        Err(format!("mount failed: {}", said.join(" | ")))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes dirty pages back first (a disk-cache file written by the previous mount would stay
/// in memory otherwise), then drops the page cache, and checks that it worked: a "cold" row
/// measured on a warm cache would flatter whoever reads from disk. Aborts the run otherwise.
pub fn drop_caches() {
    let cached = || -> u64 {
        fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Cached:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .map_or(u64::MAX, |kib: u64| kib << 10)
    };
    let before = cached();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "3") {
        panic!("cannot drop the page cache ({e}): cold rows would be warm; run as root");
    }
    let after = cached();
    // What stays cached after a drop is what cannot be dropped (tmpfs, /dev/shm, mapped pages):
    // it must not have grown, and the drop must have freed what it could.
    assert!(
        after < before || after < 512 << 20,
        "the page cache did not shrink ({} MiB before, {} MiB after drop_caches): cold rows \
         would be warm",
        before >> 20,
        after >> 20
    );
}

/// A `usize` from the environment variable `name`, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64* bytes: incompressible enough, generated at memory speed.
pub fn fill(seed: u64, data: &mut [u8]) {
    let mut x = seed;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// "2 CPUs, model name : ..., kernel 6.18.44", for the first lines of a report.
pub fn machine() -> String {
    let host = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| Some(l.split_once(':')?.1.trim().to_string()))
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let reporting = if reports_free_memory() {
        "; freed memory goes back to the hypervisor (virtio-balloon free page reporting), so \
         memory allocated after a drop of the page cache or a mount's exit is slow to touch: \
         see 'This VM hands freed memory back' in docs/benchmarks.md"
    } else {
        ""
    };
    format!(
        "{} CPUs, {host}, kernel {}{reporting}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// Whether a virtio balloon with free page reporting (feature bit 5) is bound: the guest then
/// hands memory it frees back to the host, and touching it again costs a host fault per page.
/// On the 2 vCPU VMs that made cold reads cost up to twice the CPU of the same reads on memory
/// that stays backed (docs/benchmarks.md).
fn reports_free_memory() -> bool {
    fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|device| fs::read_to_string(device.path().join("features")).ok())
        .any(|features| features.as_bytes().get(5) == Some(&b'1'))
}

/// The bench's working directory, emptied: `BENCH_DIR`, else `name` under cargo's target tmpdir.
pub fn bench_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    base
}

/// `mount_vfs snapshot tree --cas cas --output manifest --format format`; panics with its log
/// when it fails.
pub fn snapshot(tree: &Path, cas: &Path, manifest: &Path, format: &str) {
    let output = Command::new(bin())
        .arg("snapshot")
        .arg(tree)
        .arg("--cas")
        .arg(cas)
        .arg("--output")
        .arg(manifest)
        .args(["--format", format])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "mount_vfs snapshot --format {format} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// CPU seconds of each thread of process `pid`, by thread name (`comm`; threads of the same
/// name summed): the nanoseconds on CPU from /proc/PID/task/*/schedstat, else utime + stime from
/// .../stat (clock ticks: 10 ms, too coarse for a thread that works microseconds per request).
pub fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let on_cpu_ns = fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
        let secs = match on_cpu_ns {
            Some(ns) => ns / 1e9,
            None => {
                let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                if fields.len() < 13 {
                    continue;
                }
                (fields[11].parse::<f64>().unwrap_or(0.0)
                    + fields[12].parse::<f64>().unwrap_or(0.0))
                    / hz
            }
        };
        *by_name.entry(name).or_insert(0.0) += secs;
    }
    by_name
}

/// `GET /metrics` from a mount's `--metrics-addr 127.0.0.1:PORT`, over plain HTTP/1.0; the body.
pub fn scrape_metrics(port: u16) -> Result<String, String> {
    use std::io::Write;
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    match response.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(body.to_string())
        }
        _ => Err(format!(
            "unexpected answer: {}",
            response.lines().next().unwrap_or("")
        )),
    }
}

/// The sum over all label sets of the samples of `metric` (e.g. `mount_vfs_bytes_served_total`,
/// or `mount_vfs_requests_total{op="read"` to pick labels) in a scrape.
pub fn metric_sum(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.starts_with(metric)
                && matches!(
                    l.as_bytes().get(metric.len()),
                    Some(b' ' | b'{' | b',' | b'}')
                )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free port on 127.0.0.1 (bound and released: a daemon binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The 1, 5 and 15 minute load averages, so a result can say what else ran meanwhile.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a peer's command is installed (on `PATH`).
pub fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
