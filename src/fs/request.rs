//! The filesystem's requests and replies, as a transport hands them in. A transport (fuser
//! today, FUSE over io_uring next) turns each kernel request into a [`Request`] carrying a reply
//! object of the matching kind, and implements the reply traits by writing the kernel's answer.
//!
//! Replies are boxed trait objects: a data request's reply travels to the owner shard and is
//! answered there, so it must be `Send`; one small allocation per request is nothing next to a
//! FUSE round trip.

use std::fs::File;
use std::time::{Duration, Instant, SystemTime};

use super::error::FsError;
use super::op_counters::{Op, OpCounters};
use super::verified::ReadData;
use crate::log_limit::LogLimit;
use crate::namespace::{Ino, NodeKind};

/// One request, with the reply it must be answered through.
pub enum Request<'a> {
    Lookup {
        parent: Ino,
        name: &'a [u8],
        reply: Box<dyn EntryReply>,
    },
    GetAttr {
        ino: Ino,
        reply: Box<dyn AttrReply>,
    },
    ReadLink {
        ino: Ino,
        reply: Box<dyn BytesReply>,
    },
    Open(Open),
    Read(Read),
    Release(Release),
    Flush {
        ino: Ino,
        reply: Box<dyn EmptyReply>,
    },
    OpenDir {
        ino: Ino,
        reply: Box<dyn OpenDirReply>,
    },
    ReadDir {
        ino: Ino,
        /// The handle `OpenDir` answered.
        fh: u64,
        /// 0 is `.`, 1 is `..`, `2 + i` is child `i`; a listing continues at `position + 1`.
        offset: u64,
        reply: Box<dyn DirReply>,
    },
    ReadDirPlus {
        ino: Ino,
        fh: u64,
        offset: u64,
        reply: Box<dyn DirPlusReply>,
    },
    ReleaseDir {
        ino: Ino,
        fh: u64,
        reply: Box<dyn EmptyReply>,
    },
    StatFs {
        reply: Box<dyn StatFsReply>,
    },
    Access {
        ino: Ino,
        /// `R_OK | W_OK | X_OK` bits, or `F_OK`.
        mask: i32,
        reply: Box<dyn EmptyReply>,
    },
    GetXattr {
        ino: Ino,
        name: &'a [u8],
        /// 0 asks for the value's size only.
        size: u32,
        reply: Box<dyn XattrReply>,
    },
    ListXattr {
        ino: Ino,
        size: u32,
        reply: Box<dyn XattrReply>,
    },
    // Changes (a `--writable` mount; `EROFS` otherwise).
    /// Create and open a regular file.
    Create(Create),
    /// A new file, directory, symlink or FIFO (`mode` holds the kind bits, as `mknod(2)`).
    MakeNode {
        parent: Ino,
        name: &'a [u8],
        kind: NodeKind,
        /// Permission bits, the caller's umask already applied.
        mode: u32,
        target: Option<&'a [u8]>,
        caller: Caller,
        reply: Box<dyn EntryReply>,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: &'a [u8],
        reply: Box<dyn EntryReply>,
    },
    /// `unlink` (`dir` false) or `rmdir` (`dir` true).
    Remove {
        parent: Ino,
        name: &'a [u8],
        dir: bool,
        reply: Box<dyn EmptyReply>,
    },
    Rename {
        parent: Ino,
        name: &'a [u8],
        new_parent: Ino,
        new_name: &'a [u8],
        /// `RENAME_NOREPLACE`, `RENAME_EXCHANGE`.
        flags: u32,
        reply: Box<dyn EmptyReply>,
    },
    SetAttr {
        ino: Ino,
        change: SetAttr,
        reply: Box<dyn AttrReply>,
    },
    Write(Write),
    Fallocate(Fallocate),
    /// `fsync`/`fdatasync` of a file, or (`dir`) `fsyncdir`.
    Fsync {
        ino: Ino,
        dir: bool,
        reply: Box<dyn EmptyReply>,
    },
    SetXattr {
        ino: Ino,
        name: &'a [u8],
        value: &'a [u8],
        flags: i32,
        reply: Box<dyn EmptyReply>,
    },
    RemoveXattr {
        ino: Ino,
        name: &'a [u8],
        reply: Box<dyn EmptyReply>,
    },
}

impl Request<'_> {
    pub fn op(&self) -> Op {
        match self {
            Request::Lookup { .. } => Op::Lookup,
            Request::GetAttr { .. } => Op::GetAttr,
            Request::ReadLink { .. } => Op::ReadLink,
            Request::Open(_) => Op::Open,
            Request::Read(_) => Op::Read,
            Request::Release(_) => Op::Release,
            Request::Flush { .. } => Op::Flush,
            Request::OpenDir { .. } => Op::OpenDir,
            Request::ReadDir { .. } => Op::ReadDir,
            Request::ReadDirPlus { .. } => Op::ReadDirPlus,
            Request::ReleaseDir { .. } => Op::ReleaseDir,
            Request::StatFs { .. } => Op::StatFs,
            Request::Access { .. } => Op::Access,
            Request::GetXattr { .. } => Op::GetXattr,
            Request::ListXattr { .. } => Op::ListXattr,
            Request::Create(_) => Op::Create,
            Request::MakeNode {
                kind: NodeKind::Dir,
                ..
            } => Op::Mkdir,
            Request::MakeNode {
                kind: NodeKind::Symlink,
                ..
            } => Op::Symlink,
            Request::MakeNode { .. } => Op::Mknod,
            Request::Link { .. } => Op::Link,
            Request::Remove { dir: false, .. } => Op::Unlink,
            Request::Remove { dir: true, .. } => Op::Rmdir,
            Request::Rename { .. } => Op::Rename,
            Request::SetAttr { .. } => Op::SetAttr,
            Request::Write(_) => Op::Write,
            Request::Fallocate(_) => Op::Fallocate,
            Request::Fsync { dir: false, .. } => Op::Fsync,
            Request::Fsync { dir: true, .. } => Op::FsyncDir,
            Request::SetXattr { .. } => Op::SetXattr,
            Request::RemoveXattr { .. } => Op::RemoveXattr,
        }
    }
}

impl Request<'_> {
    /// The reply of a request and the inode it is about, to fail it.
    pub fn into_reply(self) -> (Box<dyn Reply>, Ino) {
        match self {
            Request::Lookup { parent, reply, .. } => (reply, parent),
            Request::GetAttr { ino, reply } => (reply, ino),
            Request::ReadLink { ino, reply } => (reply, ino),
            Request::Open(open) => (open.reply, open.ino),
            Request::Read(read) => (read.reply, read.ino),
            Request::Release(release) => (release.reply, release.ino),
            Request::Flush { ino, reply }
            | Request::ReleaseDir { ino, reply, .. }
            | Request::Access { ino, reply, .. }
            | Request::Fsync { ino, reply, .. }
            | Request::SetXattr { ino, reply, .. }
            | Request::RemoveXattr { ino, reply, .. } => (reply, ino),
            Request::OpenDir { ino, reply } => (reply, ino),
            Request::ReadDir { ino, reply, .. } => (reply, ino),
            Request::ReadDirPlus { ino, reply, .. } => (reply, ino),
            Request::StatFs { reply } => (reply, crate::namespace::ROOT_INO),
            Request::GetXattr { ino, reply, .. } | Request::ListXattr { ino, reply, .. } => {
                (reply, ino)
            }
            Request::Create(create) => (create.reply, create.parent),
            Request::MakeNode { parent, reply, .. } => (reply, parent),
            Request::Link { ino, reply, .. } => (reply, ino),
            Request::Remove { parent, reply, .. } | Request::Rename { parent, reply, .. } => {
                (reply, parent)
            }
            Request::SetAttr { ino, reply, .. } => (reply, ino),
            Request::Write(write) => (write.reply, write.ino),
            Request::Fallocate(fallocate) => (fallocate.reply, fallocate.ino),
        }
    }
}

/// Open a file. Served by the inode's owner shard.
pub struct Open {
    pub ino: Ino,
    /// `open(2)` flags.
    pub flags: i32,
    /// When the transport received it (the latency histograms start here).
    pub received: Instant,
    pub reply: Box<dyn OpenReply>,
}

/// Read from an open file. Served by the inode's owner shard.
pub struct Read {
    pub ino: Ino,
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    /// When the transport received it (the latency histograms start here).
    pub received: Instant,
    pub reply: Box<dyn ReadReply>,
}

/// Close an open file. Served by the inode's owner shard.
pub struct Release {
    pub ino: Ino,
    pub fh: u64,
    pub reply: Box<dyn EmptyReply>,
}

/// Who asked: owner of what a request creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Create and open `parent/name`. The node is made by the dispatcher, the open by its owner
/// shard.
pub struct Create {
    pub parent: Ino,
    pub name: Vec<u8>,
    /// Permission bits, the caller's umask already applied.
    pub mode: u32,
    /// `open(2)` flags.
    pub flags: i32,
    pub caller: Caller,
    pub received: Instant,
    pub reply: Box<dyn CreateReply>,
}

/// What a `setattr` changes (`None`: unchanged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// A `setattr` that changes a file's size (and maybe more): a change of its bytes, served by the
/// inode's owner shard.
pub struct Truncate {
    pub ino: Ino,
    pub change: SetAttr,
    pub reply: Box<dyn AttrReply>,
}

/// Write to an open file. Served by the inode's owner shard.
pub struct Write {
    pub ino: Ino,
    pub fh: u64,
    pub offset: u64,
    /// The bytes, copied out of the transport's request buffer (which is reused once the
    /// transport's callback returns).
    pub data: Vec<u8>,
    pub received: Instant,
    pub reply: Box<dyn WriteReply>,
}

/// `fallocate(2)` on an open file. Served by the inode's owner shard.
pub struct Fallocate {
    pub ino: Ino,
    pub offset: u64,
    pub length: u64,
    pub mode: i32,
    pub reply: Box<dyn EmptyReply>,
}

/// An inode's attributes as the kernel gets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    pub ino: Ino,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: NodeKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Preferred I/O size (`st_blksize`).
    pub blksize: u32,
    /// How long the kernel may cache them (and the entry that named the inode).
    pub ttl: Duration,
}

/// Filesystem totals for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_len: u32,
}

/// How long the kernel may cache entries and attributes of a read-only mount. Content never
/// changes while mounted, so as long as it likes; a day keeps numbers sane in tools that print
/// them.
pub const ATTR_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The same on a writable mount for inodes the overlay changed or made: every change passes
/// through the kernel, which updates what it caches, but merged attributes (link counts of moved
/// directories, sizes written by passthrough) are re-read after a second rather than trusted for
/// a day. Untouched manifest entries keep [`ATTR_TTL`].
pub const WRITABLE_ATTR_TTL: Duration = Duration::from_secs(1);

/// How an open file is served.
pub enum Opened<'a> {
    /// READs come to the filesystem; the page cache may keep the content across opens.
    KeepCache,
    /// READs and WRITEs come to the filesystem; pages cached by earlier opens are dropped (the
    /// file has or gets upper bytes).
    Uncached,
    /// The kernel reads this backing file itself (FUSE passthrough).
    Passthrough(&'a BackingFile),
}

/// A file the transport registered with the kernel for passthrough, closed on drop. The
/// transport knows what it holds; the core only keeps it while handles use it.
pub struct BackingFile(pub Box<dyn std::any::Any>);

/// Every reply can fail the request instead.
pub trait Reply: Send {
    fn error(self: Box<Self>, error: FsError);
}

pub trait EntryReply: Reply {
    fn entry(self: Box<Self>, attributes: &Attributes);
}

pub trait AttrReply: Reply {
    fn attr(self: Box<Self>, attributes: &Attributes);
}

/// Bytes that are metadata, not file content (a link target).
pub trait BytesReply: Reply {
    fn bytes(self: Box<Self>, bytes: &[u8]);
}

pub trait EmptyReply: Reply {
    fn ok(self: Box<Self>);
}

pub trait OpenReply: Reply {
    /// Registers `file` with the kernel as a passthrough backing file.
    fn backing_file(&self, file: &File) -> std::io::Result<BackingFile>;
    fn opened(self: Box<Self>, fh: u64, how: Opened<'_>);
}

pub trait ReadReply: Reply {
    fn data(self: Box<Self>, data: ReadData);
}

pub trait OpenDirReply: Reply {
    /// An open directory; `cacheable`: its listing never changes, so the kernel may cache it.
    fn opened(self: Box<Self>, fh: u64, cacheable: bool);
}

pub trait WriteReply: Reply {
    fn written(self: Box<Self>, size: u32);
}

pub trait CreateReply: Reply {
    /// The node exists (with `attributes`); what is left is the open's reply.
    fn created(self: Box<Self>, attributes: &Attributes) -> Box<dyn OpenReply>;
}

pub trait DirReply: Reply {
    /// Adds an entry; true when the reply is full (the entry was not added).
    fn add(&mut self, ino: Ino, next_offset: u64, kind: NodeKind, name: &[u8]) -> bool;
    fn ok(self: Box<Self>);
}

pub trait DirPlusReply: Reply {
    /// Adds an entry with its attributes; true when the reply is full (the entry was not added).
    fn add(&mut self, next_offset: u64, name: &[u8], attributes: &Attributes) -> bool;
    fn ok(self: Box<Self>);
}

pub trait StatFsReply: Reply {
    fn statfs(self: Box<Self>, totals: &StatFs);
}

pub trait XattrReply: Reply {
    /// The size a buffer for the answer needs (the request asked with size 0).
    fn size(self: Box<Self>, size: u32);
    fn data(self: Box<Self>, bytes: &[u8]);
}

/// Fails a request (`op` about `ino`) with `error`: the one place a failed request is counted
/// and logged (at the error's level), whichever layer failed it.
pub fn fail(counters: &OpCounters, reply: Box<dyn Reply>, op: Op, ino: Ino, error: FsError) {
    counters.failure(op, error);
    let (op, errno) = (op.name(), error.errno());
    let limit = &FAILURE_LOG[error as usize];
    if error.log_level() == tracing::Level::TRACE {
        crate::limited!(
            limit = limit,
            tracing::Level::TRACE,
            op,
            ino,
            errno,
            "{error}"
        );
    } else {
        crate::limited!(
            limit = limit,
            tracing::Level::DEBUG,
            op,
            ino,
            errno,
            "{error}"
        );
    }
    reply.error(error);
}

/// One log rate limit per failure reason: a reader retrying a bad file thousands of times
/// writes a few lines, and does not hide failures of another kind.
static FAILURE_LOG: [LogLimit; FsError::ALL.len()] = {
    let mut table = [const { LogLimit::new("") }; FsError::ALL.len()];
    let mut i = 0;
    while i < table.len() {
        table[i] = LogLimit::new(FsError::ALL[i].reason());
        i += 1;
    }
    table
};
