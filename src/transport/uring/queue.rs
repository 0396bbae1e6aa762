//! The FUSE ring queues of one shard, served from that shard's own executor: no thread of their
//! own. The queues live on a second io_uring of the shard's (SQE128, which glommio's rings
//! cannot issue): each entry is registered with `FUSE_IO_URING_CMD_REGISTER`, each completion
//! carries one request, and each answer goes back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`,
//! which also re-arms the entry for the next request.
//!
//! How the shard learns of work: the ring posts its completions to an eventfd
//! (`io_uring_register_eventfd`), and a task of the shard keeps a read of that eventfd in
//! flight on glommio's own ring, so a parked shard wakes for a FUSE request as for any of its
//! I/O. An answer pushes its entry on [`Commits`] and wakes the ring task through its glommio
//! waker, from whatever thread it was given on (a READ served by the owner shard, a metadata
//! change run on the blocking pool): glommio queues a foreign wake and writes its own eventfd
//! only when the shard is asleep, so a busy shard takes answers without a system call.

use std::cell::{Cell, UnsafeCell};
use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::task::AtomicWaker;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::abi;
use super::decode::{decode, Decoded};
use super::reply::{Answer, Sink};
use crate::fs::{Dispatcher, LocalShard};

/// Entries per queue: requests of one CPU that may be in the filesystem at once.
pub(super) const DEPTH: usize = 8;

/// One ring entry: the header and payload buffers the kernel fills with a request and reads
/// the answer from. Registered with the kernel by address, so they never move.
pub(super) struct RingEntry {
    header: UnsafeCell<Box<[u8]>>,
    payload: UnsafeCell<Box<[u8]>>,
    iov: [libc::iovec; 2],
    /// The queue (CPU) the entry is registered on.
    qid: u16,
}

// SAFETY: the buffers are used by one party at a time: the kernel between a REGISTER or COMMIT
// and the completion, then the ring task while it copies the request out, then the request's
// `Answer` until it pushes the commit (see `Answer::send`).
unsafe impl Send for RingEntry {}
// SAFETY: as for `Send`: shared only to hand the entry from one user to the next.
unsafe impl Sync for RingEntry {}

impl RingEntry {
    fn new(qid: u16, payload_size: usize) -> RingEntry {
        let mut header = vec![0u8; abi::URING_HEADER_SIZE].into_boxed_slice();
        let mut payload = vec![0u8; payload_size].into_boxed_slice();
        let iov = [
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ];
        RingEntry {
            header: UnsafeCell::new(header),
            payload: UnsafeCell::new(payload),
            iov,
            qid,
        }
    }

    /// The header and payload buffers.
    ///
    /// # Safety
    /// The caller must be the entry's one user at this point (see the `Send` impl).
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn buffers(&self) -> (&mut [u8], &mut [u8]) {
        (&mut *self.header.get(), &mut *self.payload.get())
    }
}

/// Answered entries waiting for their ring task to commit them.
pub(super) struct Commits {
    tags: Mutex<Vec<usize>>,
    /// Wakes the ring task.
    signal: Signal,
    /// The session's `/dev/fuse` descriptor: passthrough backing files are registered on it.
    pub(super) session: Arc<OwnedFd>,
}

impl Commits {
    pub(super) fn push(&self, tag: usize) {
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tag);
        self.signal.notify();
    }

    fn take(&self, into: &mut Vec<usize>) {
        into.append(&mut self.tags.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Wakes the ring task from any thread; a wake-up given while it runs is kept for its next wait.
#[derive(Default)]
struct Signal {
    pending: AtomicBool,
    waiter: AtomicWaker,
}

impl Signal {
    fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waiter.wake();
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            self.waiter.register(cx.waker());
            if self.pending.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Counts of requests by the way they came, and how the session ends.
pub(super) struct Counts {
    /// Each shard's ring counts, kept apart so that shards counting every request do not
    /// share a cache line.
    shards: Box<[RingCounts]>,
    pub dev: AtomicU64,
    /// Ring tasks and the `/dev/fuse` reader still serving.
    pub serving: AtomicUsize,
}

/// What one shard's ring task served.
#[derive(Default)]
#[repr(align(128))]
struct RingCounts {
    ring: AtomicU64,
    /// READs and WRITEs that arrived on this shard but belong to another and went to it.
    crossed: AtomicU64,
    /// READs of other shards' inodes served here, from this shard's replica of the block.
    replicated: AtomicU64,
}

impl Counts {
    pub fn new(shards: usize) -> Counts {
        Counts {
            shards: (0..shards).map(|_| RingCounts::default()).collect(),
            dev: AtomicU64::new(0),
            serving: AtomicUsize::new(0),
        }
    }

    /// One server (a ring task, the `/dev/fuse` reader) has ended; the last one says what the
    /// session served.
    pub fn ended(&self) {
        if self.serving.fetch_sub(1, Ordering::AcqRel) == 1 {
            let sum = |count: fn(&RingCounts) -> &AtomicU64| -> u64 {
                self.shards
                    .iter()
                    .map(|s| count(s).load(Ordering::Relaxed))
                    .sum()
            };
            tracing::info!(
                "FUSE over io_uring: {} requests served over the ring ({} READs and WRITEs \
                 crossed to their inode's owner shard, {} READs of other shards' inodes were \
                 served from replicas where they arrived), {} over /dev/fuse",
                sum(|s| &s.ring),
                sum(|s| &s.crossed),
                sum(|s| &s.replicated),
                self.dev.load(Ordering::Relaxed)
            );
        }
    }

    /// Counts a request taken from shard `shard`'s ring.
    fn received(&self, shard: usize) {
        self.shards[shard].ring.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request that arrived over shard `shard`'s ring, on a shard other than its
    /// inode's owner when `crossing`: served there from a replica, or sent on to the owner.
    fn note(&self, shard: usize, crossing: bool, replicated: bool) {
        let counts = &self.shards[shard];
        match (crossing, replicated) {
            (true, true) => counts.replicated.fetch_add(1, Ordering::Relaxed),
            (true, false) => counts.crossed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn finished(&self) -> bool {
        self.serving.load(Ordering::Acquire) == 0
    }
}

/// A `FUSE_IO_URING_CMD_*` SQE for `entry` of queue `qid`.
pub fn uring_cmd(
    fd: RawFd,
    command: u32,
    qid: u16,
    commit_id: u64,
    iov: *const libc::iovec,
    tag: u64,
) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { flags u64, commit_id u64, qid u16, padding[6] } in the
    // SQE's 80-byte command area.
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(fd), command)
        .cmd(cmd)
        .addr(Some(iov as u64))
        .build()
        .user_data(tag);
    // The kernel takes the iovec count from sqe->len (offset 24), which io-uring 0.7 cannot
    // set for URING_CMD; Entry128 is repr(C) over the 128-byte SQE.
    // SAFETY: both types are 128 plain bytes.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// What a shard needs to serve its queues.
pub(super) struct ShardQueues {
    pub session: Arc<OwnedFd>,
    /// The queues (CPUs) this shard serves.
    pub qids: Vec<u16>,
    pub payload_size: usize,
    pub dispatcher: Arc<Dispatcher>,
    pub counts: Arc<Counts>,
    pub shard: usize,
}

/// The shard's ring and its entries. Entries the kernel still holds are never freed: dropping
/// a ring with entries out (a shard stopped before the connection ended) leaks them.
struct ShardRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Indexed by completion tag.
    entries: Vec<Arc<RingEntry>>,
    in_kernel: usize,
    fd: RawFd,
}

impl ShardRing {
    /// Queues `command` for entry `tag`.
    fn push(&mut self, command: u32, tag: usize, commit_id: u64) {
        let entry = &self.entries[tag];
        let sqe = uring_cmd(
            self.fd,
            command,
            entry.qid,
            commit_id,
            entry.iov.as_ptr(),
            tag as u64,
        );
        // SAFETY: the SQE points at the entry's buffers, which outlive its completion (kept
        // until every entry came back, or leaked).
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            if self.ring.submit().is_err() {
                return;
            }
        }
        self.in_kernel += 1;
    }
}

impl Drop for ShardRing {
    fn drop(&mut self) {
        if self.in_kernel > 0 {
            std::mem::forget(std::mem::take(&mut self.entries));
        }
    }
}

/// Registers the shard's queues on a ring of its own and starts the task that serves them.
/// Runs on the shard's thread; fails if the kernel refused any step.
pub(super) fn start(queues: ShardQueues, here: LocalShard) -> std::io::Result<()> {
    let fd = queues.session.as_raw_fd();
    let depth = DEPTH * queues.qids.len();
    let ring = IoUring::builder().build((2 * depth as u32).next_power_of_two())?;
    // Blocking (no EFD_NONBLOCK), so that a read of it on glommio's ring waits for a count.
    // SAFETY: eventfd has no preconditions; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned once, here.
    let wake = unsafe { OwnedFd::from_raw_fd(raw) };
    ring.submitter().register_eventfd(wake.as_raw_fd())?;
    // The watcher's own descriptor, which glommio closes.
    let watched = wake.try_clone()?;
    let entries: Vec<Arc<RingEntry>> = queues
        .qids
        .iter()
        .flat_map(|&qid| {
            let size = queues.payload_size;
            (0..DEPTH).map(move |_| Arc::new(RingEntry::new(qid, size)))
        })
        .collect();
    let mut ring = ShardRing {
        ring,
        entries,
        in_kernel: 0,
        fd,
    };
    for tag in 0..depth {
        ring.push(abi::URING_CMD_REGISTER, tag, 0);
    }
    ring.ring.submit()?;
    // A refused REGISTER completes at once with its error. Any other completion already there
    // is a request: once the last queue is armed, the kernel hands requests to these entries
    // at once (a process waiting on the new mount). Reading the queue takes its completions
    // off it, so they go to `serve` with the rest: a request dropped here would never be
    // answered, and its caller would hang for good (seen with racing mounts).
    let arrived: Vec<(u64, i32)> = ring
        .ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    if let Some(&(_, error)) = arrived.iter().find(|(_, result)| *result < 0) {
        return Err(std::io::Error::from_raw_os_error(-error));
    }
    let commits = Arc::new(Commits {
        tags: Mutex::new(Vec::new()),
        signal: Signal::default(),
        session: queues.session.clone(),
    });
    let closed = Rc::new(Cell::new(false));
    glommio::spawn_local(watch(watched, closed.clone(), commits.clone())).detach();
    glommio::spawn_local(async move {
        serve(ring, arrived, &queues, &here, &commits).await;
        // Ends the watcher's read.
        closed.set(true);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        queues.counts.ended();
    })
    .detach();
    Ok(())
}

/// Keeps a read of the eventfd in flight on glommio's ring and wakes the ring task each time
/// it completes, until the ring task is `closed`.
async fn watch(eventfd: OwnedFd, closed: Rc<Cell<bool>>, commits: Arc<Commits>) {
    use std::os::fd::IntoRawFd;
    // SAFETY: glommio takes over the descriptor (and closes it).
    let file = unsafe { glommio::io::BufferedFile::from_raw_fd(eventfd.into_raw_fd()) };
    while !closed.get() {
        if let Err(e) = file.read_at(0, 8).await {
            tracing::warn!("FUSE ring: cannot wait for requests: {e}");
            break;
        }
        commits.signal.notify();
    }
    let _ = file.close().await;
}

/// Serves the shard's queues, starting with the completions that `arrived` during setup, until
/// the connection ends.
async fn serve(
    mut ring: ShardRing,
    arrived: Vec<(u64, i32)>,
    queues: &ShardQueues,
    here: &LocalShard,
    commits: &Arc<Commits>,
) {
    let mut closing = false;
    let mut done = arrived;
    let mut answered = Vec::new();
    let mut op_in = [0u8; abi::URING_OP_IN];
    let mut names = Vec::new();
    loop {
        done.extend(ring.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(tag, result) in &done {
            ring.in_kernel -= 1;
            if result < 0 {
                // ENOTCONN / ECANCELED: the connection is gone. Any other error ends this ring
                // too, and the request the entry answered never completes: say so, or a hung
                // request leaves no trace.
                if ![libc::ENOTCONN, libc::ECANCELED].contains(&-result) {
                    let error = std::io::Error::from_raw_os_error(-result);
                    tracing::warn!(
                        shard = queues.shard,
                        "FUSE ring entry {tag} failed: {error}; the shard's queues close"
                    );
                }
                closing = true;
                continue;
            }
            queues.counts.received(queues.shard);
            let entry = &ring.entries[tag as usize];
            // Copy out what the request says, so the answer owns the buffers from here on.
            // SAFETY: the completion handed the entry to this task.
            let (header, payload) = unsafe { entry.buffers() };
            let h = abi::in_header(header);
            op_in.copy_from_slice(&header[abi::URING_OP_IN..abi::URING_ENT_IN_OUT]);
            let payload_len =
                (abi::u32_at(header, abi::URING_PAYLOAD_SZ) as usize).min(payload.len());
            // A WRITE's data is copied once, by the decoder into the request; everything else
            // (names, mostly) is copied out here, as the answer may write into the payload while
            // the request still refers to it.
            let body: &[u8] = if h.opcode == abi::WRITE {
                &payload[..payload_len]
            } else {
                names.clear();
                names.extend_from_slice(&payload[..payload_len]);
                &names
            };
            let answer = Answer::new(
                Sink::Ring {
                    entry: entry.clone(),
                    tag: tag as usize,
                    commits: commits.clone(),
                },
                h.unique,
            );
            let crossing = matches!(h.opcode, abi::READ | abi::WRITE)
                && queues.dispatcher.owner(h.nodeid) != queues.shard;
            if abi::op(h.opcode).is_some_and(|op| queues.dispatcher.may_block(op)) {
                // The overlay's changes write and sync its journal: never on the executor.
                let dispatcher = queues.dispatcher.clone();
                let payload = body.to_vec();
                glommio::spawn_local(glommio::executor().spawn_blocking(move || {
                    if let Decoded::Request(request) = decode(&h, &op_in, &payload, answer) {
                        dispatcher.dispatch(request);
                    }
                }))
                .detach();
                queues.counts.note(queues.shard, crossing, false);
            } else if let Decoded::Request(request) = decode(&h, &op_in, body, answer) {
                let replicated = queues.dispatcher.dispatch_on(here, request);
                queues.counts.note(queues.shard, crossing, replicated);
            }
        }
        done.clear();
        commits.take(&mut answered);
        for tag in answered.drain(..) {
            // SAFETY: the answer is done with the entry (it pushed the tag after writing).
            let commit_id = abi::u64_at(
                unsafe { ring.entries[tag].buffers().0 },
                abi::URING_COMMIT_ID,
            );
            ring.push(abi::URING_CMD_COMMIT_AND_FETCH, tag, commit_id);
        }
        if closing && ring.in_kernel == 0 {
            return;
        }
        if !ring.ring.submission().is_empty() {
            if let Err(e) = ring.ring.submit() {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::warn!(shard = queues.shard, "FUSE ring: {e}; the queues close");
                    return;
                }
            }
            // The queue is the CPU of the callers just answered: let the one woken run now,
            // not when the scheduler next preempts this shard (which spins before it parks).
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        if ring.ring.completion().is_empty() {
            commits.signal.wait().await;
        } else {
            glommio::yield_if_needed().await;
        }
    }
}
