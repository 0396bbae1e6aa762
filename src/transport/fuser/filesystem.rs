//! fuser's callbacks turned into [`Request`]s for the [`Dispatcher`], and the reply traits
//! implemented on fuser's reply objects.
//!
//! A fuser reply dropped unanswered (a request that raced shutdown) answers EIO by itself.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request as FuseRequest,
    TimeOrNow, WriteFlags,
};

use crate::fs::request::{
    self, Attributes, BackingFile, Caller, Create, Fallocate, Open, Opened, Read, Release, Reply,
    Request, SetAttr, StatFs, Write,
};
use crate::fs::{Dispatcher, FsError, ReadData, PREFERRED_IO_SIZE};
use crate::namespace::NodeKind;

/// A [`Dispatcher`] served through fuser.
pub(super) struct FuserFilesystem {
    dispatcher: Dispatcher,
    /// Where to record whether the kernel agreed to passthrough; `None`: do not ask (no disk
    /// cache to pass through to).
    passthrough: Option<Arc<AtomicBool>>,
}

impl FuserFilesystem {
    pub fn new(dispatcher: Dispatcher, passthrough: Option<Arc<AtomicBool>>) -> FuserFilesystem {
        FuserFilesystem {
            dispatcher,
            passthrough,
        }
    }
}

fn file_attr(a: &Attributes) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn errno(error: FsError) -> Errno {
    Errno::from_i32(error.errno())
}

/// Implements [`Reply`] for fuser reply types, whose `error` takes an [`Errno`].
macro_rules! replies {
    ($($reply:ty),* $(,)?) => {$(
        impl Reply for $reply {
            fn error(self: Box<Self>, error: FsError) {
                (*self).error(errno(error));
            }
        }
    )*};
}

replies!(
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyEmpty,
    ReplyOpen,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyStatfs,
    ReplyXattr,
    ReplyWrite,
    ReplyCreate,
);

impl request::EntryReply for ReplyEntry {
    fn entry(self: Box<Self>, attributes: &Attributes) {
        (*self).entry(&attributes.ttl, &file_attr(attributes), Generation(0));
    }
}

impl request::AttrReply for ReplyAttr {
    fn attr(self: Box<Self>, attributes: &Attributes) {
        (*self).attr(&attributes.ttl, &file_attr(attributes));
    }
}

impl request::BytesReply for ReplyData {
    fn bytes(self: Box<Self>, bytes: &[u8]) {
        (*self).data(bytes);
    }
}

impl request::ReadReply for ReplyData {
    fn data(self: Box<Self>, data: ReadData) {
        // fuser writes the reply straight from the block: one `writev`, no copy here.
        (*self).data(data.bytes());
    }
}

impl request::EmptyReply for ReplyEmpty {
    fn ok(self: Box<Self>) {
        (*self).ok();
    }
}

impl request::OpenReply for ReplyOpen {
    fn backing_file(&self, file: &File) -> std::io::Result<BackingFile> {
        let id: BackingId = self.open_backing(file)?;
        Ok(BackingFile(Box::new(id)))
    }

    fn opened(self: Box<Self>, fh: u64, how: Opened<'_>) {
        match how {
            Opened::KeepCache => (*self).opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Opened::Uncached => (*self).opened(FileHandle(fh), FopenFlags::empty()),
            Opened::Passthrough(backing) => match backing.0.downcast_ref::<BackingId>() {
                Some(id) => (*self).opened_passthrough(FileHandle(fh), FopenFlags::empty(), id),
                // Only this transport makes backing files for its replies.
                None => (*self).error(Errno::EIO),
            },
        }
    }
}

impl request::OpenDirReply for ReplyOpen {
    fn opened(self: Box<Self>, fh: u64, cacheable: bool) {
        let flags = if cacheable {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
        } else {
            FopenFlags::empty()
        };
        (*self).opened(FileHandle(fh), flags);
    }
}

impl request::WriteReply for ReplyWrite {
    fn written(self: Box<Self>, size: u32) {
        (*self).written(size);
    }
}

/// A CREATE's reply once the node exists: the open's reply, carrying the new node's attributes.
struct Created {
    reply: ReplyCreate,
    attr: FileAttr,
    ttl: std::time::Duration,
}

impl Reply for Created {
    fn error(self: Box<Self>, error: FsError) {
        self.reply.error(errno(error));
    }
}

impl request::CreateReply for ReplyCreate {
    fn created(self: Box<Self>, attributes: &Attributes) -> Box<dyn request::OpenReply> {
        Box::new(Created {
            reply: *self,
            attr: file_attr(attributes),
            ttl: attributes.ttl,
        })
    }
}

impl request::OpenReply for Created {
    fn backing_file(&self, file: &File) -> std::io::Result<BackingFile> {
        let id: BackingId = self.reply.open_backing(file)?;
        Ok(BackingFile(Box::new(id)))
    }

    fn opened(self: Box<Self>, fh: u64, how: Opened<'_>) {
        let Created { reply, attr, ttl } = *self;
        let fh = FileHandle(fh);
        match how {
            Opened::KeepCache => {
                reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::FOPEN_KEEP_CACHE)
            }
            Opened::Uncached => reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::empty()),
            Opened::Passthrough(backing) => match backing.0.downcast_ref::<BackingId>() {
                Some(id) => reply.created_passthrough(
                    &ttl,
                    &attr,
                    Generation(0),
                    fh,
                    FopenFlags::empty(),
                    id,
                ),
                None => reply.error(Errno::EIO),
            },
        }
    }
}

fn caller(req: &FuseRequest) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

impl request::DirReply for ReplyDirectory {
    fn add(&mut self, ino: u64, next_offset: u64, kind: NodeKind, name: &[u8]) -> bool {
        ReplyDirectory::add(
            self,
            INodeNo(ino),
            next_offset,
            file_type(kind),
            OsStr::from_bytes(name),
        )
    }

    fn ok(self: Box<Self>) {
        (*self).ok();
    }
}

impl request::DirPlusReply for ReplyDirectoryPlus {
    fn add(&mut self, next_offset: u64, name: &[u8], attributes: &Attributes) -> bool {
        ReplyDirectoryPlus::add(
            self,
            INodeNo(attributes.ino),
            next_offset,
            OsStr::from_bytes(name),
            &attributes.ttl,
            &file_attr(attributes),
            Generation(0),
        )
    }

    fn ok(self: Box<Self>) {
        (*self).ok();
    }
}

impl request::StatFsReply for ReplyStatfs {
    fn statfs(self: Box<Self>, t: &StatFs) {
        (*self).statfs(
            t.blocks,
            t.blocks_free,
            t.blocks_available,
            t.files,
            t.files_free,
            t.block_size,
            t.name_len,
            t.block_size,
        );
    }
}

impl request::XattrReply for ReplyXattr {
    fn size(self: Box<Self>, size: u32) {
        (*self).size(size);
    }

    fn data(self: Box<Self>, bytes: &[u8]) {
        (*self).data(bytes);
    }
}

impl Filesystem for FuserFilesystem {
    /// No ioctls: ENOTTY, what a plain file answers (Python's `open` asks every file whether it
    /// is a terminal; fuser's default would log a warning for each).
    fn ioctl(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn init(&mut self, _req: &FuseRequest, config: &mut KernelConfig) -> std::io::Result<()> {
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

    fn lookup(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.dispatcher.dispatch(Request::Lookup {
            parent: parent.0,
            name: name.as_bytes(),
            reply: Box::new(reply),
        });
    }

    fn getattr(&self, _req: &FuseRequest, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.dispatcher.dispatch(Request::GetAttr {
            ino: ino.0,
            reply: Box::new(reply),
        });
    }

    fn readlink(&self, _req: &FuseRequest, ino: INodeNo, reply: ReplyData) {
        self.dispatcher.dispatch(Request::ReadLink {
            ino: ino.0,
            reply: Box::new(reply),
        });
    }

    fn open(&self, _req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.dispatcher.dispatch(Request::Open(Open {
            ino: ino.0,
            flags: flags.0,
            received: Instant::now(),
            reply: Box::new(reply),
        }));
    }

    fn read(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.dispatcher.dispatch(Request::Read(Read {
            ino: ino.0,
            fh: fh.0,
            offset,
            size,
            received: Instant::now(),
            reply: Box::new(reply),
        }));
    }

    fn release(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Release(Release {
            ino: ino.0,
            fh: fh.0,
            reply: Box::new(reply),
        }));
    }

    fn flush(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Flush {
            ino: ino.0,
            reply: Box::new(reply),
        });
    }

    fn opendir(&self, _req: &FuseRequest, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.dispatcher.dispatch(Request::OpenDir {
            ino: ino.0,
            reply: Box::new(reply),
        });
    }

    fn readdir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.dispatcher.dispatch(Request::ReadDir {
            ino: ino.0,
            fh: _fh.0,
            offset,
            reply: Box::new(reply),
        });
    }

    fn readdirplus(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.dispatcher.dispatch(Request::ReadDirPlus {
            ino: ino.0,
            fh: _fh.0,
            offset,
            reply: Box::new(reply),
        });
    }

    fn releasedir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::ReleaseDir {
            ino: ino.0,
            fh: _fh.0,
            reply: Box::new(reply),
        });
    }

    fn statfs(&self, _req: &FuseRequest, _ino: INodeNo, reply: ReplyStatfs) {
        self.dispatcher.dispatch(Request::StatFs {
            reply: Box::new(reply),
        });
    }

    fn access(&self, _req: &FuseRequest, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.dispatcher.dispatch(Request::Access {
            ino: ino.0,
            mask: mask.bits(),
            reply: Box::new(reply),
        });
    }

    fn getxattr(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        self.dispatcher.dispatch(Request::GetXattr {
            ino: ino.0,
            name: name.as_bytes(),
            size,
            reply: Box::new(reply),
        });
    }

    fn listxattr(&self, _req: &FuseRequest, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.dispatcher.dispatch(Request::ListXattr {
            ino: ino.0,
            size,
            reply: Box::new(reply),
        });
    }

    fn create(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.dispatcher.dispatch(Request::Create(Create {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            mode,
            flags,
            caller: caller(req),
            received: Instant::now(),
            reply: Box::new(reply),
        }));
    }

    fn mknod(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => NodeKind::File,
            libc::S_IFIFO => NodeKind::Fifo,
            // Devices and sockets have no place in a job's outputs.
            _ => return reply.error(Errno::EPERM),
        };
        self.dispatcher.dispatch(Request::MakeNode {
            parent: parent.0,
            name: name.as_bytes(),
            kind,
            mode,
            target: None,
            caller: caller(req),
            reply: Box::new(reply),
        });
    }

    fn mkdir(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.dispatcher.dispatch(Request::MakeNode {
            parent: parent.0,
            name: name.as_bytes(),
            kind: NodeKind::Dir,
            mode,
            target: None,
            caller: caller(req),
            reply: Box::new(reply),
        });
    }

    fn symlink(
        &self,
        req: &FuseRequest,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.dispatcher.dispatch(Request::MakeNode {
            parent: parent.0,
            name: link_name.as_bytes(),
            kind: NodeKind::Symlink,
            mode: 0o777,
            target: Some(target.as_os_str().as_bytes()),
            caller: caller(req),
            reply: Box::new(reply),
        });
    }

    fn link(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.dispatcher.dispatch(Request::Link {
            ino: ino.0,
            new_parent: newparent.0,
            new_name: newname.as_bytes(),
            reply: Box::new(reply),
        });
    }

    fn unlink(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.dispatcher.dispatch(Request::Remove {
            parent: parent.0,
            name: name.as_bytes(),
            dir: false,
            reply: Box::new(reply),
        });
    }

    fn rmdir(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.dispatcher.dispatch(Request::Remove {
            parent: parent.0,
            name: name.as_bytes(),
            dir: true,
            reply: Box::new(reply),
        });
    }

    fn rename(
        &self,
        _req: &FuseRequest,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Rename {
            parent: parent.0,
            name: name.as_bytes(),
            new_parent: newparent.0,
            new_name: newname.as_bytes(),
            flags: flags.bits(),
            reply: Box::new(reply),
        });
    }

    fn setattr(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.dispatcher.dispatch(Request::SetAttr {
            ino: ino.0,
            change: SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: time(atime),
                mtime: time(mtime),
            },
            reply: Box::new(reply),
        });
    }

    fn write(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.dispatcher.dispatch(Request::Write(Write {
            ino: ino.0,
            fh: fh.0,
            offset,
            data: data.to_vec(),
            received: Instant::now(),
            reply: Box::new(reply),
        }));
    }

    fn fallocate(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Fallocate(Fallocate {
            ino: ino.0,
            offset,
            length,
            mode,
            reply: Box::new(reply),
        }));
    }

    fn fsync(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Fsync {
            ino: ino.0,
            dir: false,
            reply: Box::new(reply),
        });
    }

    fn fsyncdir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::Fsync {
            ino: ino.0,
            dir: true,
            reply: Box::new(reply),
        });
    }

    fn setxattr(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.dispatcher.dispatch(Request::SetXattr {
            ino: ino.0,
            name: name.as_bytes(),
            value,
            flags,
            reply: Box::new(reply),
        });
    }

    fn removexattr(&self, _req: &FuseRequest, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.dispatcher.dispatch(Request::RemoveXattr {
            ino: ino.0,
            name: name.as_bytes(),
            reply: Box::new(reply),
        });
    }
}
