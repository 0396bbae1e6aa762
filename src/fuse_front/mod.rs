//! The FUSE front: a thin translation layer between fuser and the rest of mount_vfs.
//!
//! Metadata of the immutable namespace (lookup, getattr, readdir, readlink, statfs, access,
//! xattrs) is answered inline on the fuser worker thread from the `Arc`-shared [`Namespace`].
//! Data operations (open, read, release) are sent, together with their `Reply*` object, to the
//! shard that owns the inode ([`owner`]); that shard replies itself from its own buffers, so no
//! file byte ever crosses a thread here. Anything that would modify the tree gets `EROFS`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use mount_vfs_executors::ShardSender;

use crate::namespace::{owner, Attr, Namespace, NodeKind};
use crate::service::ShardRequest;

/// Content never changes while mounted, so the kernel may cache entries and attributes for as
/// long as it likes; a day keeps numbers sane in tools that print them.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Reported as `st_blksize`: tools like `cp` size their reads from it, and 1 MiB matches the
/// largest FUSE READ the kernel sends (`max_pages` = 256 pages).
const PREFERRED_IO_SIZE: u32 = 1 << 20;

pub struct FuseFront {
    namespace: Arc<Namespace>,
    shards: Vec<ShardSender<ShardRequest>>,
    uid: u32,
    gid: u32,
    /// Where to record whether the kernel agreed to passthrough; `None`: do not ask (no disk
    /// cache to pass through to).
    passthrough: Option<Arc<AtomicBool>>,
}

impl FuseFront {
    pub fn new(
        namespace: Arc<Namespace>,
        shards: Vec<ShardSender<ShardRequest>>,
        passthrough: Option<Arc<AtomicBool>>,
    ) -> FuseFront {
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseFront {
            namespace,
            shards,
            uid,
            gid,
            passthrough,
        }
    }

    fn file_attr(&self, attr: &Attr) -> FileAttr {
        let mtime = system_time(attr.mtime_us);
        FileAttr {
            ino: INodeNo(attr.ino),
            size: attr.size,
            blocks: attr.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: match attr.kind {
                NodeKind::Dir => FileType::Directory,
                NodeKind::File => FileType::RegularFile,
                NodeKind::Symlink => FileType::Symlink,
            },
            perm: attr.perm,
            nlink: attr.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PREFERRED_IO_SIZE,
            flags: 0,
        }
    }

    /// Hands a data request to the inode's owner shard. If the shard is gone (shutting down) the
    /// request, and with it the reply, is dropped, which fuser answers with EIO.
    fn route(&self, ino: u64, request: ShardRequest) {
        let shard = owner(ino, self.shards.len());
        if self.shards[shard].send(request).is_err() {
            tracing::warn!(shard, ino, "shard mailbox closed; request dropped");
        }
    }
}

impl FuseFront {
    /// A directory's entries from position `offset` on: 0 is `.`, 1 is `..`, `2 + i` is child
    /// `i` in name order. The kernel passes back `position + 1` to continue a listing.
    fn dir_entries(&self, dir: u64, offset: u64) -> impl Iterator<Item = (u64, u64, &[u8])> + '_ {
        let ns = &self.namespace;
        let parent = ns.parent(dir).unwrap_or(dir);
        (offset..).map_while(move |position| match position {
            0 => Some((position, dir, &b"."[..])),
            1 => Some((position, parent, &b".."[..])),
            n => ns
                .child_at(dir, (n - 2) as usize)
                .map(|(child, name, _)| (position, child, name)),
        })
    }
}

/// Manifest mtimes are microseconds since the epoch; negative ones are before it.
fn system_time(mtime_us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(mtime_us.unsigned_abs());
    if mtime_us >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

impl Filesystem for FuseFront {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for the largest readahead the kernel allows; mount.rs raises the bdi read_ahead_kb
        // afterwards so buffered readers get 1 MiB READs.
        if let Err(max) = config.set_max_readahead(PREFERRED_IO_SIZE) {
            let _ = config.set_max_readahead(max);
        }
        if let Some(granted) = &self.passthrough {
            // Stack depth 1: backing files on a plain local filesystem, as the cache dir is.
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) if config.set_max_stack_depth(1).is_ok() => {
                    granted.store(true, Ordering::Relaxed);
                    tracing::info!(
                        "FUSE passthrough on: verified cached files are read by the kernel"
                    );
                }
                _ => tracing::info!(
                    "this kernel offers no FUSE passthrough (needs Linux 6.9+); \
                     every read goes through the shards"
                ),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .namespace
            .lookup(parent.0, name.as_bytes())
            .and_then(|ino| self.namespace.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &self.file_attr(&attr), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.namespace.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &self.file_attr(&attr)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.namespace.readlink(ino.0) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.namespace.attr(ino.0).map(|a| a.kind) {
            Some(NodeKind::File) => self.route(
                ino.0,
                ShardRequest::Open {
                    ino: ino.0,
                    direct: flags.0 & libc::O_DIRECT != 0,
                    reply,
                },
            ),
            Some(NodeKind::Dir) => reply.error(Errno::EISDIR),
            Some(NodeKind::Symlink) => reply.error(Errno::ELOOP),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.route(
            ino.0,
            ShardRequest::Read {
                ino: ino.0,
                fh: fh.0,
                offset,
                size,
                reply,
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.route(
            ino.0,
            ShardRequest::Release {
                ino: ino.0,
                fh: fh.0,
                reply,
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever dirty on a read-only mount.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.namespace.child_count(ino.0) {
            // Listings never change: let the kernel cache them.
            Some(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            None if self.namespace.attr(ino.0).is_some() => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.namespace.child_count(ino.0).is_none() {
            return reply.error(Errno::ENOTDIR);
        }
        for (position, entry, name) in self.dir_entries(ino.0, offset) {
            let kind = self
                .namespace
                .attr(entry)
                .map_or(NodeKind::File, |a| a.kind);
            if reply.add(
                INodeNo(entry),
                position + 1,
                file_type(kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if self.namespace.child_count(ino.0).is_none() {
            return reply.error(Errno::ENOTDIR);
        }
        for (position, entry, name) in self.dir_entries(ino.0, offset) {
            let Some(attr) = self.namespace.attr(entry) else {
                break;
            };
            let full = reply.add(
                INodeNo(entry),
                position + 1,
                OsStr::from_bytes(name),
                &TTL,
                &self.file_attr(&attr),
                Generation(0),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BLOCK: u32 = 4096;
        let blocks = self.namespace.total_size().div_ceil(BLOCK as u64);
        let files = self.namespace.len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.namespace.attr(ino.0).is_none() {
            reply.error(Errno::ENOENT);
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            // Permission bits are enforced by the kernel (`default_permissions`).
            reply.ok();
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        match self.namespace.attr(ino.0) {
            Some(_) => reply.error(Errno::NO_XATTR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.namespace.attr(ino.0) {
            // No attributes: the list is empty, whether the caller asks for its size or content.
            Some(_) if size == 0 => reply.size(0),
            Some(_) => reply.data(&[]),
            None => reply.error(Errno::ENOENT),
        }
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
    }
}
