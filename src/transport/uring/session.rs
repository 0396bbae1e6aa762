//! A FUSE session served over io_uring: mount with mount(2) on a `/dev/fuse` descriptor of our
//! own, answer INIT asking for `FUSE_OVER_IO_URING`, then hand the ring queues (one per possible
//! CPU, as the kernel wants) to the shards, each serving those of the CPUs it runs on from its
//! own executor (`queue`), plus one `/dev/fuse` reader thread for what the ring does not carry
//! (FORGET, INTERRUPT) and what arrives before every queue is armed.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::abi::{self, Put};
use super::decode::{decode, Decoded};
use super::queue::{self, Counts, ShardQueues};
use super::reply::{Answer, Sink};
use crate::fs::{Dispatcher, ShardRequest, PREFERRED_IO_SIZE};
use crate::transport::SessionOptions;

/// The module parameter that lets the kernel offer FUSE over io_uring (read at INIT).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Largest WRITE and READ the kernel sends (INIT's `max_write`, and `max_pages` of 4 KiB).
const MAX_IO: u32 = 1 << 20;

/// A ring entry's payload buffer. The kernel refuses to register one smaller than the largest
/// payload the INIT answer allows (`max_write`, `max_pages` pages, at least 8 KiB), and sizes
/// every request by those: a WRITE's data is its whole payload (`fuse_write_in` comes in
/// `op_in`), a READ's answer at most `max_pages` pages.
const RING_PAYLOAD: usize = MAX_IO as usize;

/// Highest protocol minor whose structures `abi` and `reply` write.
const MINOR: u32 = 45;

/// Why the ring could not be used; the caller falls back to `/dev/fuse` or reports it.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// Nothing was mounted.
    #[error("{0}")]
    Unavailable(String),
    /// Mounted, then a later step failed; the mount is gone again.
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Whether this kernel and this process can serve a ring: `Err` says why not (and how to
/// change it) without touching anything.
pub fn available() -> Result<(), UringError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(UringError::Unavailable(
            "FUSE over io_uring mounts with mount(2), which needs root".into(),
        ));
    }
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) if v.trim() == "Y" => Ok(()),
        Ok(_) => Err(UringError::Unavailable(format!(
            "the kernel's FUSE over io_uring is off ({ENABLE_URING} is N); as root, \
             `echo Y > {ENABLE_URING}` turns it on for later mounts"
        ))),
        Err(_) => Err(UringError::Unavailable(format!(
            "this kernel has no FUSE over io_uring (no {ENABLE_URING}: needs Linux 6.14+ \
             with CONFIG_FUSE_IO_URING)"
        ))),
    }
}

/// A mounted session served over io_uring.
pub struct UringSession {
    fd: Arc<OwnedFd>,
    counts: Arc<Counts>,
}

/// Mounts `dispatcher` on `mountpoint` and serves it over the ring. On failure the mount is
/// undone and the dispatcher handed back (when no thread kept it), so the caller can fall back.
pub fn start(
    dispatcher: Dispatcher,
    passthrough: Option<&AtomicBool>,
    mountpoint: &Path,
    options: &SessionOptions,
) -> Result<UringSession, (UringError, Option<Box<Dispatcher>>)> {
    if let Err(e) = available() {
        return Err((e, Some(Box::new(dispatcher))));
    }
    let fd = match mount(mountpoint, options) {
        Ok(fd) => Arc::new(fd),
        Err(e) => return Err((e, Some(Box::new(dispatcher)))),
    };
    let setup =
        |what: &'static str| move |source: std::io::Error| UringError::Setup { what, source };
    if let Err(e) = init(fd.as_raw_fd(), passthrough).map_err(setup("FUSE INIT")) {
        unmount(mountpoint);
        return Err((e, Some(Box::new(dispatcher))));
    }
    let dispatcher = Arc::new(dispatcher);
    let shards = dispatcher.shards().len();
    let counts = Arc::new(Counts::new(shards));
    let mut queues_of: Vec<Vec<u16>> = vec![Vec::new(); shards];
    for cpu in 0..possible_cpus() {
        queues_of[shard_of_queue(cpu, &options.shard_cpus, shards)].push(cpu as u16);
    }
    let mut failure = None;
    for (shard, qids) in queues_of.into_iter().enumerate() {
        if qids.is_empty() {
            continue;
        }
        counts.serving.fetch_add(1, Ordering::AcqRel);
        let queues = ShardQueues {
            session: fd.clone(),
            qids,
            payload_size: RING_PAYLOAD,
            dispatcher: dispatcher.clone(),
            counts: counts.clone(),
            shard,
        };
        let (ready, registered) = std::sync::mpsc::channel();
        let job = ShardRequest::Run(Box::new(move |here| {
            let counts = queues.counts.clone();
            let result = queue::start(queues, here);
            if result.is_err() {
                counts.ended();
            }
            ready.send(result).ok();
        }));
        let result = match dispatcher.shards()[shard].send(job) {
            Ok(()) => registered
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the shard stopped"))),
            Err(_) => Err(std::io::Error::other("the shard stopped")),
        };
        if let Err(e) = result {
            failure = Some(setup("FUSE ring registration")(e));
            break;
        }
    }
    if let Some(e) = failure {
        // The unmount ends the connection; every ring task returns and lets go of the
        // dispatcher.
        unmount(mountpoint);
        return Err((e, take_back(dispatcher)));
    }
    counts.serving.fetch_add(1, Ordering::AcqRel);
    let reader = {
        let (fd, dispatcher, counts) = (fd.clone(), dispatcher, counts.clone());
        std::thread::Builder::new()
            .name("mount_vfs-fuse".into())
            .spawn(move || {
                serve_dev(&fd, &dispatcher, &counts);
                counts.ended();
            })
    };
    if let Err(e) = reader {
        unmount(mountpoint);
        return Err((setup("the /dev/fuse reader")(e), None));
    }
    tracing::info!(
        "FUSE over io_uring: {} queues of {} entries, served by {shards} shards",
        possible_cpus(),
        queue::DEPTH
    );
    Ok(UringSession { fd, counts })
}

/// The shard that serves the ring queue of `cpu`: the shard pinned to that CPU, else one
/// spread by CPU number (a CPU no shard runs on still has a queue the kernel may use).
fn shard_of_queue(cpu: usize, shard_cpus: &[usize], shards: usize) -> usize {
    shard_cpus
        .iter()
        .position(|&c| c == cpu)
        .unwrap_or(cpu % shards)
}

/// The dispatcher back from the ring tasks once they have ended (after an unmount), so the
/// caller can serve it over `/dev/fuse`; `None` if they do not end within seconds.
fn take_back(mut dispatcher: Arc<Dispatcher>) -> Option<Box<Dispatcher>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(dispatcher) {
            Ok(dispatcher) => return Some(Box::new(dispatcher)),
            Err(_) if std::time::Instant::now() >= deadline => return None,
            Err(shared) => {
                dispatcher = shared;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

impl UringSession {
    /// See `FuseSession::page_cache_dropper`: the same notification, written to `/dev/fuse`.
    pub fn page_cache_dropper(&self) -> Box<dyn Fn(u64) + Send + Sync> {
        let fd = self.fd.clone();
        Box::new(move |ino| {
            let fd = fd.clone();
            let _ = std::thread::Builder::new()
                .name("mount_vfs-inval".into())
                .spawn(move || {
                    let mut body = Vec::with_capacity(24);
                    body.u64(ino).u64(0).u64(0);
                    let mut message =
                        abi::out_header(body.len(), abi::NOTIFY_INVAL_INODE, 0).to_vec();
                    message.extend_from_slice(&body);
                    // SAFETY: writes a live buffer to our /dev/fuse descriptor.
                    let n = unsafe {
                        libc::write(fd.as_raw_fd(), message.as_ptr().cast(), message.len())
                    };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        tracing::warn!("cannot drop the kernel's cached pages of inode {ino}: {e}");
                    }
                });
        })
    }

    /// Whether the kernel has ended the session (and every serving thread has returned).
    pub fn is_finished(&self) -> bool {
        self.counts.finished()
    }
}

/// Opens `/dev/fuse` and mounts it on `mountpoint`.
fn mount(mountpoint: &Path, options: &SessionOptions) -> Result<OwnedFd, UringError> {
    let setup = |what| move |source| UringError::Setup { what, source };
    // SAFETY: a constant path; the result is checked.
    let raw = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(setup("/dev/fuse")(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor owned once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data =
        format!("fd={raw},rootmode=40000,user_id={uid},group_id={gid},default_permissions");
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if !options.writable {
        flags |= libc::MS_RDONLY;
    }
    let bad_path = || setup("mountpoint")(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes()).map_err(|_| bad_path())?;
    let data = CString::new(data).map_err(|_| bad_path())?;
    // SAFETY: valid C strings; mount(2) copies them.
    let rc = unsafe {
        libc::mount(
            c"mount_vfs".as_ptr(),
            target.as_ptr(),
            c"fuse.mount_vfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(setup("mount(2)")(std::io::Error::last_os_error()));
    }
    Ok(fd)
}

fn unmount(mountpoint: &Path) {
    if let Ok(target) = CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Answers FUSE_INIT, taking the ring; fails if the kernel does not offer it. With
/// `passthrough`, also asks for FUSE passthrough and records whether it was granted.
fn init(fd: RawFd, passthrough: Option<&AtomicBool>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let n = loop {
        // SAFETY: reads into a live buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break n;
        }
    };
    if n < abi::IN_HEADER as isize + 16 {
        return Err(std::io::Error::last_os_error());
    }
    let h = abi::in_header(&buf);
    if h.opcode != abi::INIT {
        return Err(std::io::Error::other(format!(
            "the kernel's first request is {}, not INIT",
            h.opcode
        )));
    }
    let args = &buf[abi::IN_HEADER..n as usize];
    let minor = abi::u32_at(args, 4).min(MINOR);
    let max_readahead = abi::u32_at(args, 8).min(PREFERRED_IO_SIZE);
    let offered = abi::u32_at(args, 12) as u64 | (abi::u32_at(args, 16) as u64) << 32;
    let refuse = |why: String| {
        // A failed INIT ends the connection; the caller unmounts.
        let header = abi::out_header(0, -libc::EPROTO, h.unique);
        // SAFETY: writes a live buffer to our descriptor.
        unsafe { libc::write(fd, header.as_ptr().cast(), header.len()) };
        Err(std::io::Error::other(why))
    };
    if offered & abi::FUSE_OVER_IO_URING == 0 {
        return refuse("the kernel does not offer FUSE_OVER_IO_URING".into());
    }
    let wanted = abi::FUSE_ASYNC_READ
        | abi::FUSE_BIG_WRITES
        | abi::FUSE_PARALLEL_DIROPS
        | abi::FUSE_DO_READDIRPLUS
        | abi::FUSE_READDIRPLUS_AUTO
        | abi::FUSE_MAX_PAGES
        | abi::FUSE_INIT_EXT
        | abi::FUSE_OVER_IO_URING;
    let passthrough_wanted = if passthrough.is_some() {
        abi::FUSE_PASSTHROUGH
    } else {
        0
    };
    let flags = (wanted | passthrough_wanted) & offered;
    let mut body = Vec::with_capacity(64);
    body.u32(7).u32(minor).u32(max_readahead).u32(flags as u32);
    body.extend_from_slice(&64u16.to_le_bytes()); // max_background
    body.extend_from_slice(&48u16.to_le_bytes()); // congestion_threshold
    body.u32(MAX_IO).u32(1); // max_write, time_gran
    body.extend_from_slice(&((MAX_IO / 4096) as u16).to_le_bytes()); // max_pages
    body.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
    body.u32((flags >> 32) as u32);
    // max_stack_depth 1: backing files on a plain local filesystem, as the cache dir is.
    body.u32(u32::from(flags & abi::FUSE_PASSTHROUGH != 0));
    body.resize(64, 0);
    let mut message = abi::out_header(body.len(), 0, h.unique).to_vec();
    message.extend_from_slice(&body);
    // SAFETY: writes a live buffer to our descriptor.
    let written = unsafe { libc::write(fd, message.as_ptr().cast(), message.len()) };
    if written as usize != message.len() {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(granted) = passthrough {
        if flags & abi::FUSE_PASSTHROUGH != 0 {
            granted.store(true, Ordering::Relaxed);
            tracing::info!("FUSE passthrough on: verified cached files are read by the kernel");
        } else {
            tracing::info!(
                "this kernel offers no FUSE passthrough (needs Linux 6.9+); every read goes \
                 through the shards"
            );
        }
    }
    Ok(())
}

/// Serves what comes through `/dev/fuse` until the connection ends.
fn serve_dev(fd: &Arc<OwnedFd>, dispatcher: &Dispatcher, counts: &Counts) {
    let mut buf = vec![0u8; MAX_IO as usize + 8192];
    loop {
        // SAFETY: reads into a live buffer of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => continue,
                _ => return, // ENODEV: unmounted.
            }
        }
        let request = &buf[..n as usize];
        if request.len() < abi::IN_HEADER {
            continue;
        }
        counts.dev.fetch_add(1, Ordering::Relaxed);
        let h = abi::in_header(request);
        let args = &request[abi::IN_HEADER..];
        let answer = Answer::new(Sink::Dev(fd.clone()), h.unique);
        let fixed = abi::op_in_size(h.opcode);
        if args.len() < fixed {
            let mut answer = answer;
            answer.send(libc::EINVAL, &[]);
            continue;
        }
        let (op_in, payload) = args.split_at(fixed);
        if let Decoded::Request(request) = decode(&h, op_in, payload, answer) {
            dispatcher.dispatch(request);
        }
    }
}

/// One ring queue per possible CPU: the kernel only switches to the ring once each has an entry.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|text| {
            let last = text
                .trim()
                .rsplit(['-', ','])
                .next()?
                .parse::<usize>()
                .ok()?;
            Some(last + 1)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
