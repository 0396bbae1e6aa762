//! The FUSE transport ceiling: one do-nothing FUSE server of ours, served over `/dev/fuse`
//! (`read`/`writev` per request) and over io_uring (`FUSE_OVER_IO_URING`, Linux 6.14+: a
//! `URING_CMD` per reply that also fetches the next request), timed with the same clients in one
//! run. It is the baseline issue 13's io_uring transport is measured against, and the first
//! check that the kernel's ring protocol works on a machine (docs/transport-uring.md).
//!
//! The filesystem: a root directory with one file `f` (`FILE_SIZE` bytes, byte `i` = `i % 251`),
//! opened with `FOPEN_DIRECT_IO` so every read reaches the server, and attributes valid for 0 s
//! so every `stat` does too. Server: one thread per CPU, pinned; over `/dev/fuse` each has its
//! own cloned fd, over io_uring each has its own ring serving its CPU's queue. Clients: `stat`
//! of the root, 4 KiB reads at random offsets (also by one reader pinned to the CPU of the
//! shard that owns the file), 1 MiB reads (O_DIRECT, and buffered in order), by 1 and by `CPUS`
//! threads; every read's bytes are checked. Reported: requests per second and p50/p99 latency
//! per call.
//!
//! Needs root and `/dev/fuse`; the io_uring rows need a kernel built with
//! `CONFIG_FUSE_IO_URING`. The bench sets `/sys/module/fuse/parameters/enable_uring` for its
//! io_uring rows and restores the earlier value. `BENCH_OPS` sets the calls per row (default
//! 20000), `BENCH_RUNS` the runs (default 3; medians of them are printed, and charted per
//! workload as `fuse_transport_{stat,read4k,read1m}.{json,svg}`, see `common/chart.rs`).
//!
//! In the same runs, mount_vfs itself serves the same file (a local CAS, `--transport dev` and
//! `--transport uring`, one shard per CPU), warm: the file is read through once after mounting,
//! so every block is in the shards' pools and each row measures the request path, not the
//! store. Over io_uring a request arrives on the shard of the reader's CPU; the shares that then
//! crossed to the file's owner shard, and that were served where they arrived from that shard's
//! replica of the block, are printed from mount_vfs's log. Clients read with
//! `O_DIRECT` so that every read reaches the server (the do-nothing server also sets
//! `FOPEN_DIRECT_IO`; mount_vfs lets the kernel cache pages otherwise), except the buffered
//! rows, which evict the file's pages at the start of each pass. `BENCH_VFS=0` leaves the
//! mount_vfs rows out.

use std::ffi::CString;
use std::fs;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{cqueue, squeue, IoUring};

mod common;
use common::chart::BarChart;
use common::{env_usize, median, Daemon};

const FILE_SIZE: u64 = 64 << 20;
const MAX_WRITE: u32 = 1 << 20;
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

use mount_vfs::transport::uring::abi as wire;
use mount_vfs::transport::uring::queue::uring_cmd;

/// The do-nothing filesystem: answers one request into `out`; `None` for requests that take no
/// reply, else the (negative) errno.
fn answer(h: &wire::InHeader, op_in: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Option<i32> {
    fn put(out: &mut Vec<u8>, values64: &[u64], values32: &[u32]) {
        values64
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        values32
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
    fn attr(out: &mut Vec<u8>, ino: u64) {
        let (size, mode, nlink) = if ino == 1 {
            (0, libc::S_IFDIR | 0o755, 2)
        } else {
            (FILE_SIZE, libc::S_IFREG | 0o644, 1)
        };
        put(
            out,
            &[ino, size, size.div_ceil(512), 0, 0, 0],
            &[0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0],
        );
    }
    out.clear();
    match h.opcode {
        wire::FORGET | wire::BATCH_FORGET | wire::INTERRUPT => None,
        wire::LOOKUP => {
            let name = payload.split(|&c| c == 0).next().unwrap_or_default();
            if h.nodeid != 1 || name != b"f" {
                return Some(-libc::ENOENT);
            }
            put(out, &[2, 0, 3600, 0], &[0, 0]);
            attr(out, 2);
            Some(0)
        }
        wire::GETATTR => {
            put(out, &[0], &[0, 0]);
            attr(out, h.nodeid);
            Some(0)
        }
        wire::OPEN | wire::OPENDIR => {
            let flags = if h.opcode == wire::OPEN {
                wire::FOPEN_DIRECT_IO
            } else {
                0
            };
            put(out, &[1], &[flags, 0]);
            Some(0)
        }
        wire::READ => {
            let offset = wire::u64_at(op_in, 8);
            let end = (offset + wire::u32_at(op_in, 16) as u64).min(FILE_SIZE);
            out.extend((offset..end.max(offset)).map(|i| (i % 251) as u8));
            Some(0)
        }
        wire::STATFS => {
            out.resize(80, 0);
            Some(0)
        }
        wire::RELEASE | wire::RELEASEDIR | wire::FLUSH | wire::DESTROY => Some(0),
        _ => Some(-libc::ENOSYS),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Dev,
    Uring,
}

impl Transport {
    /// mount_vfs's `--transport` value.
    fn flag(self) -> &'static str {
        match self {
            Transport::Dev => "dev",
            Transport::Uring => "uring",
        }
    }
}

/// What serves a row: our do-nothing server or mount_vfs (warm), over one transport.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    Null(Transport),
    MountVfs(Transport),
}

impl Contender {
    fn label(self) -> String {
        match self {
            Contender::Null(t) => format!("null {t:?}"),
            Contender::MountVfs(t) => format!("mount_vfs {t:?}"),
        }
    }

    /// The same server over `/dev/fuse`, for an io_uring contender.
    fn over_dev(self) -> Option<Contender> {
        match self {
            Contender::Null(Transport::Uring) => Some(Contender::Null(Transport::Dev)),
            Contender::MountVfs(Transport::Uring) => Some(Contender::MountVfs(Transport::Dev)),
            _ => None,
        }
    }
}

/// A mounted contender; unmounts when dropped.
enum Mounted {
    Null(Server),
    MountVfs(Daemon),
}

/// The manifest and local CAS mount_vfs serves: one file `f` with the bytes the clients check.
struct VfsFixture {
    manifest: PathBuf,
    cas: PathBuf,
}

impl VfsFixture {
    fn build() -> VfsFixture {
        let base = common::bench_dir("fuse_transport");
        let (tree, cas, manifest) = (base.join("tree"), base.join("cas"), base.join("manifest"));
        fs::create_dir_all(&tree).unwrap();
        let bytes: Vec<u8> = (0..FILE_SIZE).map(|i| (i % 251) as u8).collect();
        fs::write(tree.join("f"), bytes).unwrap();
        common::snapshot(&tree, &cas, &manifest, "2023-03-03");
        VfsFixture { manifest, cas }
    }

    /// Mounts it over `transport` and reads `f` through once, so every block is in the pools.
    fn mount_warm(&self, mnt: &Path, transport: Transport) -> Daemon {
        let mut command = std::process::Command::new(common::bin());
        command
            .arg(&self.manifest)
            .arg(mnt)
            .arg("--cas")
            .arg(&self.cas)
            .args(["--transport", transport.flag(), "--memory-limit", "1G"])
            // One shard per CPU, as mount_vfs picks for any job of at least that many files
            // (this manifest has one file, which alone would get one shard): every ring queue
            // is then served on its own CPU.
            .args(["--shards", &possible_cpus().to_string()]);
        let daemon = Daemon::start(command, mnt, &mnt.with_extension("log"))
            .unwrap_or_else(|e| panic!("mount_vfs --transport {}: {e}", transport.flag()));
        let read = fs::read(mnt.join("f")).expect("warm-up read through mount_vfs");
        assert_eq!(read.len() as u64, FILE_SIZE);
        daemon
    }
}

impl Contender {
    fn mount(self, mnt: &Path, vfs: Option<&VfsFixture>) -> Mounted {
        match self {
            Contender::Null(t) => Mounted::Null(Server::mount(mnt, t)),
            Contender::MountVfs(t) => {
                Mounted::MountVfs(vfs.expect("mount_vfs fixture").mount_warm(mnt, t))
            }
        }
    }
}

/// A mounted do-nothing server; unmounts and joins its threads when dropped.
struct Server {
    mnt: PathBuf,
    fd: RawFd,
    threads: Vec<JoinHandle<()>>,
    via_ring: Arc<AtomicU64>,
    via_dev: Arc<AtomicU64>,
}

impl Server {
    fn mount(mnt: &Path, transport: Transport) -> Server {
        fs::create_dir_all(mnt).unwrap();
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0, "/dev/fuse: {}", std::io::Error::last_os_error());
        let options = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0")).unwrap();
        let target = CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
        let rc = unsafe {
            libc::mount(
                c"fuse_transport".as_ptr(),
                target.as_ptr(),
                c"fuse.fuse_transport".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
        init(fd, transport);
        let via_ring = Arc::new(AtomicU64::new(0));
        let via_dev = Arc::new(AtomicU64::new(0));
        let cpus = possible_cpus();
        let mut threads = Vec::new();
        for cpu in 0..cpus {
            // Over io_uring the ring threads serve the requests; one /dev/fuse reader stays for
            // what the ring does not carry (interrupts) and anything sent before it was ready.
            if cpu == 0 || transport == Transport::Dev {
                let dev_fd = if cpu == 0 { fd } else { clone_fd(fd) };
                let count = via_dev.clone();
                threads.push(std::thread::spawn(move || {
                    pin(cpu);
                    serve_dev(dev_fd, &count);
                    if dev_fd != fd {
                        unsafe { libc::close(dev_fd) };
                    }
                }));
            }
            if transport == Transport::Uring {
                let count = via_ring.clone();
                let (ready, registered) = std::sync::mpsc::channel();
                threads.push(std::thread::spawn(move || {
                    pin(cpu);
                    serve_ring(fd, cpu as u16, 2, &count, ready)
                }));
                registered.recv().expect("ring thread failed to register");
            }
        }
        // The kernel switches to the ring once every queue has an entry.
        std::thread::sleep(Duration::from_millis(20));
        Server {
            mnt: mnt.to_path_buf(),
            fd,
            threads,
            via_ring,
            via_dev,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let target = CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        // The unmount ends the connection: blocked reads fail with ENODEV and ring entries
        // complete with ENOTCONN, so every server thread returns.
        for thread in self.threads.drain(..) {
            thread.join().ok();
        }
        unsafe { libc::close(self.fd) };
    }
}

/// Answers FUSE_INIT, asking for the ring when `transport` is io_uring.
fn init(fd: RawFd, transport: Transport) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 8192];
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0, "INIT: {}", std::io::Error::last_os_error());
    let h = wire::in_header(&buf);
    assert_eq!(h.opcode, wire::INIT);
    let minor = wire::u32_at(&buf, 44);
    let max_readahead = wire::u32_at(&buf, 48);
    let offered = wire::u32_at(&buf, 52) as u64 | (wire::u32_at(&buf, 56) as u64) << 32;
    if transport == Transport::Uring {
        assert!(
            offered & wire::FUSE_OVER_IO_URING != 0,
            "the kernel does not offer FUSE_OVER_IO_URING (CONFIG_FUSE_IO_URING, enable_uring)"
        );
    }
    let mut wanted =
        wire::FUSE_ASYNC_READ | wire::FUSE_BIG_WRITES | wire::FUSE_MAX_PAGES | wire::FUSE_INIT_EXT;
    if transport == Transport::Uring {
        wanted |= wire::FUSE_OVER_IO_URING;
    }
    let flags = wanted & offered;
    let mut body = Vec::with_capacity(64);
    for v in [7u32, minor, max_readahead, flags as u32] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&64u16.to_le_bytes()); // max_background
    body.extend_from_slice(&48u16.to_le_bytes()); // congestion_threshold
    body.extend_from_slice(&MAX_WRITE.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // time_gran
    body.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes()); // max_pages
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
    body.resize(64, 0);
    let mut message = wire::out_header(body.len(), 0, h.unique).to_vec();
    message.extend_from_slice(&body);
    let written = unsafe { libc::write(fd, message.as_ptr().cast(), message.len()) };
    assert_eq!(
        written as usize,
        message.len(),
        "INIT reply: {}",
        std::io::Error::last_os_error()
    );
}

fn clone_fd(session: RawFd) -> RawFd {
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let mut source = session as u32;
    let rc = unsafe { libc::ioctl(fd, wire::DEV_IOC_CLONE as _, &mut source) };
    assert_eq!(
        rc,
        0,
        "FUSE_DEV_IOC_CLONE: {}",
        std::io::Error::last_os_error()
    );
    fd
}

fn serve_dev(fd: RawFd, count: &AtomicU64) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 8192];
    let mut out = Vec::new();
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => continue,
                _ => return,
            }
        }
        let request = &buf[..n as usize];
        let h = wire::in_header(request);
        count.fetch_add(1, Ordering::Relaxed);
        let args = &request[wire::IN_HEADER..];
        let Some(error) = answer(&h, args, args, &mut out) else {
            continue;
        };
        let body: &[u8] = if error == 0 { &out } else { &[] };
        let header = wire::out_header(body.len(), error, h.unique);
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut _,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut _,
                iov_len: body.len(),
            },
        ];
        unsafe { libc::writev(fd, iov.as_ptr(), 2) };
    }
}

/// One ring entry: the header and payload buffers the kernel fills with a request and reads
/// the reply from.
struct RingEntry {
    header: Vec<u8>,
    payload: Vec<u8>,
    iov: [libc::iovec; 2],
}

/// Serves queue `qid` on a ring of its own until the connection goes away.
fn serve_ring(
    fd: RawFd,
    qid: u16,
    depth: usize,
    count: &AtomicU64,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .build((2 * depth as u32).next_power_of_two())
        .expect("io_uring with SQE128");
    let mut entries: Vec<RingEntry> = (0..depth)
        .map(|_| {
            let mut header = vec![0u8; 4096];
            let mut payload = vec![0u8; MAX_WRITE as usize + 4096];
            let iov = [
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: wire::URING_HEADER_SIZE,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: payload.len(),
                },
            ];
            RingEntry {
                header,
                payload,
                iov,
            }
        })
        .collect();
    for (tag, entry) in entries.iter().enumerate() {
        let sqe = uring_cmd(
            fd,
            wire::URING_CMD_REGISTER,
            qid,
            0,
            entry.iov.as_ptr(),
            tag as u64,
        );
        unsafe { ring.submission().push(&sqe).unwrap() };
    }
    ring.submit().expect("REGISTER");
    ready.send(()).ok();
    let mut out = Vec::new();
    let mut done = Vec::new();
    loop {
        if ring.submit_and_wait(1).is_err() {
            return;
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(tag, result) in &done {
            if result < 0 {
                return; // ENOTCONN / ECANCELED: the connection is gone.
            }
            let entry = &mut entries[tag as usize];
            let h = wire::in_header(&entry.header);
            let commit_id = wire::u64_at(&entry.header, wire::URING_ENT_IN_OUT + 8);
            let payload_len = wire::u32_at(&entry.header, wire::URING_ENT_IN_OUT + 16) as usize;
            count.fetch_add(1, Ordering::Relaxed);
            let op_in = &entry.header[wire::URING_OP_IN..wire::URING_ENT_IN_OUT];
            let error = answer(&h, op_in, &entry.payload[..payload_len], &mut out).unwrap_or(0);
            let body = if error == 0 { out.len() } else { 0 };
            entry.payload[..body].copy_from_slice(&out[..body]);
            entry.header[..wire::OUT_HEADER]
                .copy_from_slice(&wire::out_header(body, error, h.unique));
            let at = wire::URING_ENT_IN_OUT + 16;
            entry.header[at..at + 4].copy_from_slice(&(body as u32).to_le_bytes());
            let sqe = uring_cmd(
                fd,
                wire::URING_CMD_COMMIT_AND_FETCH,
                qid,
                commit_id,
                entry.iov.as_ptr(),
                tag,
            );
            unsafe { ring.submission().push(&sqe).unwrap() };
        }
    }
}

fn possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last = text.trim().rsplit(['-', ',']).next().unwrap();
    last.parse::<usize>().unwrap() + 1
}

fn pin(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Restores `enable_uring` to what it was, also when a row panics.
struct UringParameter(Option<String>);

impl UringParameter {
    fn enable() -> UringParameter {
        let earlier = fs::read_to_string(ENABLE_URING).ok();
        if earlier.is_some() {
            fs::write(ENABLE_URING, "Y").expect("set enable_uring (root?)");
        }
        UringParameter(earlier)
    }
}

impl Drop for UringParameter {
    fn drop(&mut self) {
        if let Some(earlier) = &self.0 {
            fs::write(ENABLE_URING, earlier.trim()).ok();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Stat,
    Read4K,
    /// 4 KiB reads by one reader pinned to the CPU of the shard that owns `f` (mount_vfs pins
    /// shard `i` to CPU `i` on one NUMA node): over io_uring its requests arrive on the owner
    /// itself, so none crosses shards. The do-nothing server serves every CPU alike.
    Read4KOwnerCpu,
    Read1M,
    /// 1 MiB buffered reads, each reader going through the file in order and evicting its pages
    /// (`POSIX_FADV_DONTNEED`) at the start of each pass, so the kernel's read-ahead asks the
    /// server for every page (the do-nothing server's `FOPEN_DIRECT_IO` makes these direct).
    Read1MBuffered,
}

/// Calls per second and per-call latencies of `readers` threads doing `ops` calls each.
fn run(mnt: &Path, workload: Workload, readers: usize, ops: usize) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let threads: Vec<_> = (0..readers)
        .map(|reader| {
            let mnt = mnt.to_path_buf();
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(ops);
                let root = CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
                let file = CString::new(mnt.join("f").as_os_str().as_encoded_bytes()).unwrap();
                let flags = match workload {
                    Workload::Read1MBuffered => libc::O_RDONLY,
                    _ => libc::O_RDONLY | libc::O_DIRECT,
                };
                let fd = unsafe { libc::open(file.as_ptr(), flags) };
                assert!(fd >= 0, "open: {}", std::io::Error::last_os_error());
                if workload == Workload::Read4KOwnerCpu {
                    let ino = fs::metadata(mnt.join("f")).unwrap().ino();
                    pin(mount_vfs::namespace::owner(ino, possible_cpus()));
                }
                let size = match workload {
                    Workload::Read1M | Workload::Read1MBuffered => 1 << 20,
                    _ => 4096,
                };
                // O_DIRECT wants a page-aligned buffer.
                let mut raw = vec![0u8; size + 4096];
                let align = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[align..align + size];
                let mut stat: libc::stat = unsafe { std::mem::zeroed() };
                let mut rng = fastrand::Rng::with_seed(reader as u64);
                let blocks = FILE_SIZE / size as u64;
                for call in 0..ops {
                    let offset = if workload == Workload::Read1MBuffered {
                        let offset =
                            (call as u64 + reader as u64 * blocks / 2) % blocks * size as u64;
                        if offset == 0 {
                            // SAFETY: an advice on our own descriptor.
                            unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
                        }
                        offset
                    } else {
                        rng.u64(0..blocks) * size as u64
                    };
                    let t = Instant::now();
                    match workload {
                        Workload::Stat => {
                            assert_eq!(unsafe { libc::stat(root.as_ptr(), &mut stat) }, 0)
                        }
                        _ => {
                            let n = unsafe {
                                libc::pread(fd, buf.as_mut_ptr().cast(), size, offset as i64)
                            };
                            assert_eq!(n as usize, size);
                        }
                    }
                    latencies.push(t.elapsed());
                    if !matches!(workload, Workload::Stat) {
                        let last = size as u64 - 1;
                        assert_eq!(buf[0], (offset % 251) as u8);
                        assert_eq!(buf[last as usize], ((offset + last) % 251) as u8);
                    }
                }
                unsafe { libc::close(fd) };
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (rate, latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

/// One contender's runs of one workload: calls per second, p50 and p99 in µs, and how many
/// requests the do-nothing server took from its rings and from /dev/fuse (last run).
#[derive(Clone, Default)]
struct Row {
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    via_ring: u64,
    via_dev: u64,
    /// mount_vfs's CPU (all its threads) per call, µs.
    cpu_per_call: Vec<f64>,
    /// mount_vfs over io_uring: the shares of ring requests that arrived on a shard other than
    /// their inode's owner and crossed to it, and that were served where they arrived from a
    /// replica of the block (last run).
    crossed: Option<(f64, f64)>,
}

/// The shares of ring requests that crossed shards and that were served from replicas, from the
/// last session summary in a mount_vfs log ("N requests served over the ring (M READs and
/// WRITEs crossed to their inode's owner shard, R READs of other shards' inodes were served
/// from replicas ...").
fn crossed_share(log: &Path) -> Option<(f64, f64)> {
    let text = fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("requests served over the ring"))?;
    let number_before = |marker: &str| -> Option<f64> {
        let head = &line[..line.find(marker)?];
        head.trim_end().rsplit([' ', '(']).next()?.parse().ok()
    };
    let ring = number_before(" requests served over the ring")?;
    let crossed = number_before(" READs and WRITEs crossed")?;
    let replicated = number_before(" READs of other shards' inodes")?;
    (ring > 0.0).then(|| (crossed / ring, replicated / ring))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ops = env_usize("BENCH_OPS", 20_000);
    let runs = env_usize("BENCH_RUNS", 3);
    let uring_available = fs::metadata(ENABLE_URING).is_ok();
    if !uring_available {
        println!("io_uring rows skipped: this kernel has no {ENABLE_URING} (CONFIG_FUSE_IO_URING)");
    }
    let transports: &[Transport] = if uring_available {
        &[Transport::Dev, Transport::Uring]
    } else {
        &[Transport::Dev]
    };
    let vfs = (env_usize("BENCH_VFS", 1) != 0).then(VfsFixture::build);
    let contenders: Vec<Contender> = transports
        .iter()
        .map(|&t| Contender::Null(t))
        .chain(
            vfs.iter()
                .flat_map(|_| transports.iter().map(|&t| Contender::MountVfs(t))),
        )
        .collect();
    let _parameter = UringParameter::enable();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let cpus = possible_cpus();
    println!("{cpus} CPUs, {ops} calls per row (1 MiB: a 20th), O_DIRECT but Read1MBuffered, medians of {runs} runs (contenders alternating)");
    println!(
        "{:<9} {:<15} {:>7} {:>12} {:>9} {:>9} {:>10}",
        "workload", "contender", "readers", "calls/s", "p50 us", "p99 us", "ring/dev|cpu"
    );
    for workload in [
        Workload::Stat,
        Workload::Read4K,
        Workload::Read4KOwnerCpu,
        Workload::Read1M,
        Workload::Read1MBuffered,
    ] {
        // One chart per workload: their call rates differ by orders of magnitude.
        let mut chart = BarChart::new(
            &format!("fuse_transport_{}", format!("{workload:?}").to_lowercase()),
            &format!(
                "{workload:?}: do-nothing server and mount_vfs (warm), /dev/fuse and io_uring"
            ),
            "calls/s",
        );
        // mount_vfs's attributes stay valid in the kernel (the tree is immutable), so its stats
        // never reach it: a Stat row would time the kernel's attribute cache.
        let contenders: Vec<Contender> = contenders
            .iter()
            .copied()
            .filter(|c| !matches!((workload, c), (Workload::Stat, Contender::MountVfs(_))))
            .collect();
        let reader_counts: &[usize] = if workload == Workload::Read4KOwnerCpu {
            &[1]
        } else {
            &[1, cpus]
        };
        for &readers in reader_counts {
            let mut rows: Vec<Row> = vec![Row::default(); contenders.len()];
            for _ in 0..runs {
                for (row, &contender) in rows.iter_mut().zip(&contenders) {
                    let mounted = contender.mount(&mnt, vfs.as_ref());
                    let ops = if matches!(workload, Workload::Read1M | Workload::Read1MBuffered) {
                        ops / 20
                    } else {
                        ops
                    };
                    let daemon_cpu = || match &mounted {
                        Mounted::MountVfs(daemon) => common::faults_and_cpu(daemon.child.id()).1,
                        Mounted::Null(_) => 0.0,
                    };
                    let cpu_before = daemon_cpu();
                    let (rate, latencies) = run(&mnt, workload, readers, ops);
                    row.cpu_per_call
                        .push((daemon_cpu() - cpu_before) * 1e6 / latencies.len() as f64);
                    row.rates.push(rate);
                    row.p50.push(percentile(&latencies, 0.50));
                    row.p99.push(percentile(&latencies, 0.99));
                    if let Mounted::Null(server) = &mounted {
                        row.via_ring = server.via_ring.load(Ordering::Relaxed);
                        row.via_dev = server.via_dev.load(Ordering::Relaxed);
                    }
                    drop(mounted);
                    if contender == Contender::MountVfs(Transport::Uring) {
                        row.crossed = crossed_share(&mnt.with_extension("log"));
                    }
                }
            }
            for (row, contender) in rows.into_iter().zip(&contenders) {
                let label = |c: Contender| format!("{}, {readers} reader(s)", c.label());
                // io_uring rows are compared with the same server over /dev/fuse.
                match contender.over_dev() {
                    Some(dev) => chart.bar_vs(&label(*contender), &row.rates, &label(dev)),
                    None => chart.bar(&label(*contender), &row.rates),
                }
                println!(
                    "{:<9} {:<15} {:>7} {:>12.0} {:>9.1} {:>9.1} {:>10}",
                    format!("{workload:?}"),
                    contender.label(),
                    readers,
                    median(row.rates),
                    median(row.p50),
                    median(row.p99),
                    match contender {
                        Contender::Null(_) => format!("{}/{}", row.via_ring, row.via_dev),
                        Contender::MountVfs(_) => format!(
                            "cpu {:.1} us/call{}",
                            median(row.cpu_per_call),
                            row.crossed
                                .map_or(String::new(), |(crossed, replicated)| format!(
                                    ", {:.0}% crossed shards, {:.0}% from replicas",
                                    crossed * 100.0,
                                    replicated * 100.0
                                ))
                        ),
                    }
                );
            }
        }
        chart.write();
    }
}
