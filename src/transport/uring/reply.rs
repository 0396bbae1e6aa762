//! The reply traits of `fs::request`, implemented once for both ways a request arrives: over
//! `/dev/fuse` the answer is one `writev`; over the ring it is written into the request's ring
//! entry (out header in the header buffer, body in the payload buffer) and the entry handed back
//! to its queue thread, which commits it with the fetch of the next request.
//!
//! An [`Answer`] dropped unanswered (a request that raced shutdown) answers EIO by itself, so a
//! ring entry is never lost.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{self, Put};
use super::queue::{Commits, RingEntry};
use crate::fs::request::{self, Attributes, BackingFile, Opened, Reply, StatFs};
use crate::fs::{FsError, ReadData};
use crate::namespace::{Ino, NodeKind};

/// Where an answer goes.
pub(super) enum Sink {
    /// A request read from `/dev/fuse`: the answer is written back to it.
    Dev(Arc<OwnedFd>),
    /// A request taken from a ring entry: the answer fills the entry, then the queue commits it.
    Ring {
        entry: Arc<RingEntry>,
        tag: usize,
        commits: Arc<Commits>,
    },
}

/// The answer to one request, whatever its kind.
pub(super) struct Answer {
    sink: Option<Sink>,
    unique: u64,
    /// The most bytes a directory listing may hold (READDIR's `size`).
    limit: usize,
    /// A directory listing being built.
    listing: Vec<u8>,
}

impl Answer {
    pub fn new(sink: Sink, unique: u64) -> Answer {
        Answer {
            sink: Some(sink),
            unique,
            limit: 0,
            listing: Vec::new(),
        }
    }

    /// Caps a directory listing at `size` bytes (what the kernel asked for).
    pub fn limit(&mut self, size: u32) {
        self.limit = size as usize;
    }

    /// Sends `-errno` (0: success) and the body made of `parts`.
    pub fn send(&mut self, errno: i32, parts: &[&[u8]]) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        let error = -errno;
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        match sink {
            Sink::Dev(fd) => {
                let header = abi::out_header(body_len, error, self.unique);
                let mut iov = Vec::with_capacity(1 + parts.len());
                iov.push(libc::iovec {
                    iov_base: header.as_ptr() as *mut _,
                    iov_len: header.len(),
                });
                iov.extend(parts.iter().map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut _,
                    iov_len: p.len(),
                }));
                // SAFETY: every iovec points into a live buffer of its length. A failed write
                // (the request was interrupted, the connection is gone) has nobody to tell.
                unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            }
            Sink::Ring {
                entry,
                tag,
                commits,
            } => {
                // SAFETY: between the completion that delivered this request and the commit
                // below, the entry belongs to this answer alone: the kernel does not touch it
                // and its queue thread copied what it needed before dispatching.
                let (header, payload) = unsafe { entry.buffers() };
                let (error, body_len) = if body_len > payload.len() {
                    (-libc::EIO, 0)
                } else {
                    let mut at = 0;
                    for part in parts {
                        payload[at..at + part.len()].copy_from_slice(part);
                        at += part.len();
                    }
                    (error, body_len)
                };
                header[..abi::OUT_HEADER].copy_from_slice(&abi::out_header(
                    body_len,
                    error,
                    self.unique,
                ));
                header[abi::URING_PAYLOAD_SZ..abi::URING_PAYLOAD_SZ + 4]
                    .copy_from_slice(&(body_len as u32).to_le_bytes());
                commits.push(tag);
            }
        }
    }

    /// Takes no answer (FORGET, INTERRUPT over `/dev/fuse`).
    pub fn none(mut self) {
        match self.sink.take() {
            Some(Sink::Dev(_)) | None => {}
            // A ring entry must go back to the kernel whatever it carried.
            ring @ Some(Sink::Ring { .. }) => {
                self.sink = ring;
                self.send(libc::ENOSYS, &[]);
            }
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.send(libc::EIO, &[]);
    }
}

fn split(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn ttl(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

fn mode(kind: NodeKind, perm: u16) -> u32 {
    let kind = match kind {
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::File => libc::S_IFREG,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::Fifo => libc::S_IFIFO,
    };
    kind | perm as u32
}

fn dirent_type(kind: NodeKind) -> u32 {
    (mode(kind, 0) >> 12) & 0o17
}

/// `struct fuse_attr`.
fn put_attr(out: &mut Vec<u8>, a: &Attributes) {
    let (atime, atime_ns) = split(a.atime);
    let (mtime, mtime_ns) = split(a.mtime);
    let (ctime, ctime_ns) = split(a.ctime);
    out.u64(a.ino)
        .u64(a.size)
        .u64(a.blocks)
        .u64(atime)
        .u64(mtime)
        .u64(ctime);
    out.u32(atime_ns).u32(mtime_ns).u32(ctime_ns);
    out.u32(mode(a.kind, a.perm))
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid);
    out.u32(0).u32(a.blksize).u32(0); // rdev, blksize, flags
}

/// `struct fuse_entry_out`.
fn put_entry(out: &mut Vec<u8>, a: &Attributes) {
    let (secs, nanos) = ttl(a.ttl);
    out.u64(a.ino)
        .u64(0)
        .u64(secs)
        .u64(secs)
        .u32(nanos)
        .u32(nanos);
    put_attr(out, a);
}

/// `struct fuse_dirent` with its name, padded to 8 bytes.
fn put_dirent(out: &mut Vec<u8>, ino: Ino, next_offset: u64, kind: NodeKind, name: &[u8]) {
    out.u64(ino)
        .u64(next_offset)
        .u32(name.len() as u32)
        .u32(dirent_type(kind));
    out.extend_from_slice(name);
    out.resize(out.len().next_multiple_of(8), 0);
}

impl Reply for Answer {
    fn error(mut self: Box<Self>, error: FsError) {
        self.send(error.errno(), &[]);
    }
}

impl request::EntryReply for Answer {
    fn entry(mut self: Box<Self>, attributes: &Attributes) {
        let mut body = Vec::with_capacity(abi::ENTRY_OUT_SIZE);
        put_entry(&mut body, attributes);
        self.send(0, &[&body]);
    }
}

impl request::AttrReply for Answer {
    fn attr(mut self: Box<Self>, attributes: &Attributes) {
        let (secs, nanos) = ttl(attributes.ttl);
        let mut body = Vec::with_capacity(16 + abi::ATTR_SIZE);
        body.u64(secs).u32(nanos).u32(0);
        put_attr(&mut body, attributes);
        self.send(0, &[&body]);
    }
}

impl request::BytesReply for Answer {
    fn bytes(mut self: Box<Self>, bytes: &[u8]) {
        self.send(0, &[bytes]);
    }
}

impl request::ReadReply for Answer {
    fn data(mut self: Box<Self>, data: ReadData) {
        self.send(0, &[data.bytes()]);
    }
}

impl request::EmptyReply for Answer {
    fn ok(mut self: Box<Self>) {
        self.send(0, &[]);
    }
}

/// `struct fuse_open_out`.
fn open_body(fh: u64, flags: u32, backing_id: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(16);
    body.u64(fh).u32(flags).u32(backing_id);
    body
}

/// The `fuse_open_out` of an open answered `how`; `None` for a backing file this transport did
/// not make.
fn open_out(fh: u64, how: Opened<'_>) -> Option<Vec<u8>> {
    Some(match how {
        Opened::KeepCache => open_body(fh, abi::FOPEN_KEEP_CACHE, 0),
        Opened::Uncached => open_body(fh, 0, 0),
        Opened::Passthrough(backing) => {
            let id = backing.0.downcast_ref::<BackingId>()?.id;
            open_body(fh, abi::FOPEN_PASSTHROUGH, id)
        }
    })
}

/// A file registered with the kernel as a passthrough backing file (`FUSE_DEV_IOC_BACKING_OPEN`
/// on the session's `/dev/fuse` descriptor); its id is released when this is dropped, while
/// files the kernel opened with it keep their own reference.
struct BackingId {
    session: Arc<OwnedFd>,
    id: u32,
}

impl BackingId {
    fn register(session: &Arc<OwnedFd>, file: &File) -> std::io::Result<BackingId> {
        /// `struct fuse_backing_map`.
        #[repr(C)]
        struct BackingMap {
            fd: i32,
            flags: u32,
            padding: u64,
        }
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads one `fuse_backing_map` from a live value.
        let id = unsafe {
            libc::ioctl(
                session.as_raw_fd(),
                abi::DEV_IOC_BACKING_OPEN as _,
                &map as *const BackingMap,
            )
        };
        if id < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(BackingId {
            session: session.clone(),
            id: id as u32,
        })
    }
}

impl Drop for BackingId {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 from a live value. A failure (the connection is
        // gone) leaves nothing to release.
        unsafe {
            libc::ioctl(
                self.session.as_raw_fd(),
                abi::DEV_IOC_BACKING_CLOSE as _,
                &self.id as *const u32,
            )
        };
    }
}

impl request::OpenReply for Answer {
    fn backing_file(&self, file: &File) -> std::io::Result<BackingFile> {
        let session = match &self.sink {
            Some(Sink::Dev(fd)) => fd,
            Some(Sink::Ring { commits, .. }) => &commits.session,
            None => return Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        };
        Ok(BackingFile(Box::new(BackingId::register(session, file)?)))
    }

    fn opened(mut self: Box<Self>, fh: u64, how: Opened<'_>) {
        match open_out(fh, how) {
            Some(body) => self.send(0, &[&body]),
            None => self.send(libc::EIO, &[]),
        }
    }
}

impl request::WriteReply for Answer {
    /// `struct fuse_write_out`.
    fn written(mut self: Box<Self>, size: u32) {
        let mut body = Vec::with_capacity(8);
        body.u32(size).u32(0);
        self.send(0, &[&body]);
    }
}

/// A CREATE's answer once the node exists: `fuse_entry_out` of the new node, then (when the open
/// is answered) `fuse_open_out`.
struct Created {
    answer: Answer,
    entry: Vec<u8>,
}

impl Reply for Created {
    fn error(mut self: Box<Self>, error: FsError) {
        self.answer.send(error.errno(), &[]);
    }
}

impl request::CreateReply for Answer {
    fn created(self: Box<Self>, attributes: &Attributes) -> Box<dyn request::OpenReply> {
        let mut entry = Vec::with_capacity(abi::ENTRY_OUT_SIZE);
        put_entry(&mut entry, attributes);
        Box::new(Created {
            answer: *self,
            entry,
        })
    }
}

impl request::OpenReply for Created {
    fn backing_file(&self, file: &File) -> std::io::Result<BackingFile> {
        self.answer.backing_file(file)
    }

    fn opened(mut self: Box<Self>, fh: u64, how: Opened<'_>) {
        match open_out(fh, how) {
            Some(open) => self.answer.send(0, &[&self.entry, &open]),
            None => self.answer.send(libc::EIO, &[]),
        }
    }
}

impl request::OpenDirReply for Answer {
    fn opened(mut self: Box<Self>, fh: u64, cacheable: bool) {
        let flags = if cacheable {
            abi::FOPEN_KEEP_CACHE | abi::FOPEN_CACHE_DIR
        } else {
            0
        };
        self.send(0, &[&open_body(fh, flags, 0)]);
    }
}

impl request::DirReply for Answer {
    fn add(&mut self, ino: Ino, next_offset: u64, kind: NodeKind, name: &[u8]) -> bool {
        let size = (abi::DIRENT_SIZE + name.len()).next_multiple_of(8);
        if self.listing.len() + size > self.limit {
            return true;
        }
        put_dirent(&mut self.listing, ino, next_offset, kind, name);
        false
    }

    fn ok(mut self: Box<Self>) {
        let listing = std::mem::take(&mut self.listing);
        self.send(0, &[&listing]);
    }
}

impl request::DirPlusReply for Answer {
    fn add(&mut self, next_offset: u64, name: &[u8], attributes: &Attributes) -> bool {
        let size = (abi::ENTRY_OUT_SIZE + abi::DIRENT_SIZE + name.len()).next_multiple_of(8);
        if self.listing.len() + size > self.limit {
            return true;
        }
        put_entry(&mut self.listing, attributes);
        put_dirent(
            &mut self.listing,
            attributes.ino,
            next_offset,
            attributes.kind,
            name,
        );
        false
    }

    fn ok(mut self: Box<Self>) {
        let listing = std::mem::take(&mut self.listing);
        self.send(0, &[&listing]);
    }
}

impl request::StatFsReply for Answer {
    fn statfs(mut self: Box<Self>, t: &StatFs) {
        let mut body = Vec::with_capacity(80);
        body.u64(t.blocks)
            .u64(t.blocks_free)
            .u64(t.blocks_available);
        body.u64(t.files).u64(t.files_free);
        body.u32(t.block_size)
            .u32(t.name_len)
            .u32(t.block_size)
            .u32(0);
        body.resize(80, 0);
        self.send(0, &[&body]);
    }
}

impl request::XattrReply for Answer {
    fn size(mut self: Box<Self>, size: u32) {
        let mut body = Vec::with_capacity(8);
        body.u32(size).u32(0);
        self.send(0, &[&body]);
    }

    fn data(mut self: Box<Self>, bytes: &[u8]) {
        self.send(0, &[bytes]);
    }
}
