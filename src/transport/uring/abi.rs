//! The parts of the FUSE wire protocol (`<linux/fuse.h>`, 7.45) this transport speaks, as
//! offsets and encoders: no crate on crates.io carries the 7.42+ ring structures, and the few
//! structures needed are simpler to write as bytes than to mirror as `repr(C)` types.
//! benches/fuse_transport.rs uses the same module.

use crate::fs::Op;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const IOCTL: u32 = 39;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;

/// `struct fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER: usize = 16;

pub const FUSE_ASYNC_READ: u64 = 1;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_DO_READDIRPLUS: u64 = 1 << 13;
pub const FUSE_READDIRPLUS_AUTO: u64 = 1 << 14;
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_PASSTHROUGH: u64 = 1 << 37;
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// `fuse_setattr_in.valid` bits.
pub const FATTR_MODE: u32 = 1;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

pub const FOPEN_DIRECT_IO: u32 = 1;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `FUSE_NOTIFY_INVAL_INODE`, sent as the out header's `error` with `unique` 0.
pub const NOTIFY_INVAL_INODE: i32 = 2;

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
pub const DEV_IOC_CLONE: u64 = 0x8004_e500;
/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)` (16 bytes: fd i32,
/// flags u32, padding u64); returns the backing id.
pub const DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`, the backing id.
pub const DEV_IOC_BACKING_CLOSE: u64 = 0x4004_e502;

/// `enum fuse_uring_cmd`.
pub const URING_CMD_REGISTER: u32 = 1;
pub const URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in_out[128], op_in[128], then `fuse_uring_ent_in_out`
/// {flags u64, commit_id u64, payload_sz u32, padding u32, reserved u64}.
pub const URING_OP_IN: usize = 128;
pub const URING_ENT_IN_OUT: usize = 256;
pub const URING_HEADER_SIZE: usize = 288;
/// Where the kernel puts the request's `commit_id` and we put the reply's payload size.
pub const URING_COMMIT_ID: usize = URING_ENT_IN_OUT + 8;
pub const URING_PAYLOAD_SZ: usize = URING_ENT_IN_OUT + 16;

/// `struct fuse_attr`, `fuse_entry_out`, `fuse_attr_out`, `fuse_open_out`, `fuse_kstatfs`,
/// `fuse_getxattr_out`, `fuse_dirent` (without its name).
pub const ATTR_SIZE: usize = 88;
pub const ENTRY_OUT_SIZE: usize = 40 + ATTR_SIZE;
pub const DIRENT_SIZE: usize = 24;

/// A little-endian `u32` at `at`; 0 past the end (a short request is rejected by its length
/// check, never by a panic).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |v| u32::from_le_bytes(v.try_into().unwrap_or_default()))
}

/// A little-endian `u64` at `at`; 0 past the end.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap_or_default()))
}

/// What a transport needs of `struct fuse_in_header`.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    /// The calling process's fs uid and gid: the owner of what it creates.
    pub uid: u32,
    pub gid: u32,
}

pub fn in_header(b: &[u8]) -> InHeader {
    InHeader {
        opcode: u32_at(b, 4),
        unique: u64_at(b, 8),
        nodeid: u64_at(b, 16),
        uid: u32_at(b, 24),
        gid: u32_at(b, 28),
    }
}

pub fn out_header(body_len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&((OUT_HEADER + body_len) as u32).to_le_bytes());
    out[4..8].copy_from_slice(&error.to_le_bytes());
    out[8..16].copy_from_slice(&unique.to_le_bytes());
    out
}

/// The size of the fixed argument struct that comes first in a request of `opcode` (what the
/// ring hands over in `op_in`; over `/dev/fuse` it precedes the payload). 0 for requests whose
/// arguments are only names (SYMLINK, UNLINK, RMDIR, REMOVEXATTR), or nothing.
pub fn op_in_size(opcode: u32) -> usize {
    match opcode {
        FORGET | INTERRUPT | BATCH_FORGET => 8,
        GETATTR => 16,
        OPEN | OPENDIR | ACCESS | GETXATTR | LISTXATTR => 8,
        READ | READDIR | READDIRPLUS => 40,
        RELEASE | RELEASEDIR | FLUSH => 24,
        // fuse_setattr_in
        SETATTR => 88,
        // fuse_mknod_in {mode, rdev, umask, padding}; fuse_mkdir_in {mode, umask}
        MKNOD => 16,
        MKDIR => 8,
        // fuse_create_in {flags, mode, umask, open_flags}
        CREATE => 16,
        // fuse_rename_in {newdir}; fuse_rename2_in {newdir, flags, padding}; fuse_link_in
        // {oldnodeid}
        RENAME | LINK => 8,
        RENAME2 => 16,
        // fuse_write_in {fh, offset, size, write_flags, lock_owner, flags, padding}
        WRITE => 40,
        // fuse_fsync_in {fh, fsync_flags, padding}
        FSYNC | FSYNCDIR => 16,
        // fuse_fallocate_in {fh, offset, length, mode, padding}
        FALLOCATE => 32,
        // fuse_setxattr_in without FUSE_SETXATTR_EXT (not negotiated): {size, flags}
        SETXATTR => 8,
        _ => 0,
    }
}

/// Appends little-endian values to a reply body.
pub trait Put {
    fn u32(&mut self, v: u32) -> &mut Self;
    fn u64(&mut self, v: u64) -> &mut Self;
}

impl Put for Vec<u8> {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// The filesystem operation of a request of `opcode`; `None` for the session's own messages
/// (INIT, FORGET, INTERRUPT, ...) and what the filesystem does not serve.
pub fn op(opcode: u32) -> Option<Op> {
    Some(match opcode {
        LOOKUP => Op::Lookup,
        GETATTR => Op::GetAttr,
        SETATTR => Op::SetAttr,
        READLINK => Op::ReadLink,
        SYMLINK => Op::Symlink,
        MKNOD => Op::Mknod,
        MKDIR => Op::Mkdir,
        UNLINK => Op::Unlink,
        RMDIR => Op::Rmdir,
        RENAME | RENAME2 => Op::Rename,
        LINK => Op::Link,
        OPEN => Op::Open,
        READ => Op::Read,
        WRITE => Op::Write,
        STATFS => Op::StatFs,
        RELEASE => Op::Release,
        FSYNC => Op::Fsync,
        SETXATTR => Op::SetXattr,
        GETXATTR => Op::GetXattr,
        LISTXATTR => Op::ListXattr,
        REMOVEXATTR => Op::RemoveXattr,
        FLUSH => Op::Flush,
        OPENDIR => Op::OpenDir,
        READDIR => Op::ReadDir,
        RELEASEDIR => Op::ReleaseDir,
        FSYNCDIR => Op::FsyncDir,
        ACCESS => Op::Access,
        CREATE => Op::Create,
        FALLOCATE => Op::Fallocate,
        READDIRPLUS => Op::ReadDirPlus,
        _ => return None,
    })
}
