//! One FUSE ring queue served on a ring of its own (SQE128, which glommio's rings cannot issue):
//! its entries are registered with `FUSE_IO_URING_CMD_REGISTER`, each completion carries one
//! request, and each answer goes back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also
//! re-arms the entry for the next request.
//!
//! An answer may come from another thread (a shard answering a READ): it fills the entry and
//! pushes the entry's tag on [`Commits`], waking this queue's thread through an eventfd read
//! that sits in the same ring, so one `io_uring_enter` waits for both.

use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::abi;
use super::decode::{decode, Decoded};
use super::reply::{Answer, Sink};
use crate::fs::Dispatcher;

/// Entries per queue: requests of one CPU that may be in the filesystem at once.
pub(super) const DEPTH: usize = 8;

/// The completion tag of the eventfd read.
const WAKE_TAG: u64 = u64::MAX;

/// One ring entry: the header and payload buffers the kernel fills with a request and reads
/// the answer from. Registered with the kernel by address, so they never move.
pub(super) struct RingEntry {
    header: UnsafeCell<Box<[u8]>>,
    payload: UnsafeCell<Box<[u8]>>,
    iov: [libc::iovec; 2],
}

// SAFETY: the buffers are used by one party at a time: the kernel between a REGISTER or COMMIT
// and the completion, then the queue thread while it copies the request out, then the request's
// `Answer` until it pushes the commit (see `Answer::send`).
unsafe impl Send for RingEntry {}
// SAFETY: as for `Send`: shared only to hand the entry from one user to the next.
unsafe impl Sync for RingEntry {}

impl RingEntry {
    fn new(payload_size: usize) -> RingEntry {
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

/// Answered entries waiting for their queue thread to commit them.
pub(super) struct Commits {
    tags: Mutex<Vec<usize>>,
    wake: OwnedFd,
    /// The queue's thread, which commits what it answered itself without a wake-up.
    owner: ThreadId,
    /// The session's `/dev/fuse` descriptor: passthrough backing files are registered on it.
    pub(super) session: Arc<OwnedFd>,
}

impl Commits {
    pub(super) fn push(&self, tag: usize) {
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tag);
        if std::thread::current().id() != self.owner {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn take(&self, into: &mut Vec<usize>) {
        into.append(&mut self.tags.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Counts of requests by the way they came.
#[derive(Default)]
pub(super) struct Counts {
    pub ring: AtomicU64,
    pub dev: AtomicU64,
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

/// Serves queue `qid` until the connection ends. `ready` learns whether registration worked.
pub(super) fn serve(
    session: Arc<OwnedFd>,
    qid: u16,
    payload_size: usize,
    dispatcher: &Dispatcher,
    counts: &Counts,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let fd = session.as_raw_fd();
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        match IoUring::builder().build((2 * DEPTH as u32 + 2).next_power_of_two()) {
            Ok(ring) => ring,
            Err(e) => {
                ready.send(Err(e)).ok();
                return;
            }
        };
    // SAFETY: eventfd has no preconditions; the result is checked.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if wake < 0 {
        ready.send(Err(std::io::Error::last_os_error())).ok();
        return;
    }
    // SAFETY: a fresh descriptor owned once, here.
    let wake = unsafe { OwnedFd::from_raw_fd(wake) };
    let wake_fd = wake.as_raw_fd();
    let commits = Arc::new(Commits {
        tags: Mutex::new(Vec::new()),
        wake,
        owner: std::thread::current().id(),
        session,
    });
    // Read by the kernel whenever the eventfd read completes, even after this thread gave up
    // on the ring: it lives as long as the process.
    let wake_buf: &'static mut u64 = Box::leak(Box::new(0u64));
    let wake_buf_ptr: *mut u64 = wake_buf;
    let entries: Vec<Arc<RingEntry>> = (0..DEPTH)
        .map(|_| Arc::new(RingEntry::new(payload_size)))
        .collect();
    let arm_wake = || {
        opcode::Read::new(types::Fd(wake_fd), wake_buf_ptr.cast(), 8)
            .build()
            .user_data(WAKE_TAG)
    };
    // SAFETY (pushes below): every SQE points at buffers that outlive its completion: entries
    // are kept until all came back (or leaked), the wake buffer is leaked.
    for (tag, entry) in entries.iter().enumerate() {
        let sqe = uring_cmd(
            fd,
            abi::URING_CMD_REGISTER,
            qid,
            0,
            entry.iov.as_ptr(),
            tag as u64,
        );
        // SAFETY: see above.
        unsafe { push(&mut ring, &sqe) };
    }
    let wake_sqe = arm_wake().into();
    // SAFETY: see above.
    unsafe { push(&mut ring, &wake_sqe) };
    if let Err(e) = ring.submit() {
        ready.send(Err(e)).ok();
        return;
    }
    // A refused REGISTER completes at once with its error.
    let mut done: Vec<(u64, i32)> = ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    if let Some(&(_, error)) = done
        .iter()
        .find(|&&(tag, result)| tag != WAKE_TAG && result < 0)
    {
        ready
            .send(Err(std::io::Error::from_raw_os_error(-error)))
            .ok();
        // Entries still registered may be written by the kernel until the connection ends.
        std::mem::forget(entries);
        return;
    }
    ready.send(Ok(())).ok();
    let mut in_kernel = DEPTH;
    let mut closing = false;
    let mut answered = Vec::new();
    let mut op_in = [0u8; abi::URING_OP_IN];
    let mut names = Vec::new();
    loop {
        for &(tag, result) in &done {
            if tag == WAKE_TAG {
                if !closing {
                    let sqe = arm_wake().into();
                    // SAFETY: see above.
                    unsafe { push(&mut ring, &sqe) };
                }
                continue;
            }
            in_kernel -= 1;
            if result < 0 {
                // ENOTCONN / ECANCELED: the connection is gone. Any other error ends this queue
                // too, and the request the entry answered never completes: say so, or a hung
                // request leaves no trace.
                if ![libc::ENOTCONN, libc::ECANCELED].contains(&-result) {
                    let error = std::io::Error::from_raw_os_error(-result);
                    tracing::warn!(qid, "FUSE ring entry {tag} failed: {error}; queue closing");
                }
                closing = true;
                continue;
            }
            counts.ring.fetch_add(1, Ordering::Relaxed);
            let entry = &entries[tag as usize];
            // Copy out what the request says, so the answer owns the buffers from here on.
            // SAFETY: the completion handed the entry to this thread.
            let (header, payload) = unsafe { entry.buffers() };
            let h = abi::in_header(header);
            op_in.copy_from_slice(&header[abi::URING_OP_IN..abi::URING_ENT_IN_OUT]);
            let payload_len =
                (abi::u32_at(header, abi::URING_PAYLOAD_SZ) as usize).min(payload.len());
            names.clear();
            names.extend_from_slice(&payload[..payload_len]);
            let answer = Answer::new(
                Sink::Ring {
                    entry: entry.clone(),
                    tag: tag as usize,
                    commits: commits.clone(),
                },
                h.unique,
            );
            if let Decoded::Request(request) = decode(&h, &op_in, &names, answer) {
                dispatcher.dispatch(request);
            }
        }
        commits.take(&mut answered);
        for tag in answered.drain(..) {
            let entry = &entries[tag];
            // SAFETY: the answer is done with the entry (it pushed the tag after writing).
            let commit_id = abi::u64_at(unsafe { entry.buffers().0 }, abi::URING_COMMIT_ID);
            let sqe = uring_cmd(
                fd,
                abi::URING_CMD_COMMIT_AND_FETCH,
                qid,
                commit_id,
                entry.iov.as_ptr(),
                tag as u64,
            );
            // SAFETY: see above.
            unsafe { push(&mut ring, &sqe) };
            in_kernel += 1;
        }
        if closing && in_kernel == 0 {
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => {
                std::mem::forget(entries);
                return;
            }
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// Pushes `sqe`, submitting first if the submission queue is full.
///
/// # Safety
/// What `sqe` points at must live until it completes.
unsafe fn push(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, sqe: &squeue::Entry128) {
    while ring.submission().push(sqe).is_err() {
        if ring.submit().is_err() {
            return;
        }
    }
}
