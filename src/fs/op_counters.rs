//! Requests and failures per operation, counted where every request enters
//! ([`Dispatcher::dispatch`](super::Dispatcher::dispatch)) and where every failure leaves
//! ([`fail`](super::request::fail)). Relaxed atomics in fixed arrays: no lock, no allocation
//! on the request path; exporters read them from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::FsError;

/// The operations the core serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    GetAttr,
    ReadLink,
    Open,
    Read,
    Release,
    Flush,
    OpenDir,
    ReadDir,
    ReadDirPlus,
    ReleaseDir,
    StatFs,
    Access,
    GetXattr,
    ListXattr,
    Create,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    SetAttr,
    Write,
    Fsync,
    FsyncDir,
    Fallocate,
    SetXattr,
    RemoveXattr,
}

impl Op {
    pub const ALL: [Op; 30] = [
        Op::Lookup,
        Op::GetAttr,
        Op::ReadLink,
        Op::Open,
        Op::Read,
        Op::Release,
        Op::Flush,
        Op::OpenDir,
        Op::ReadDir,
        Op::ReadDirPlus,
        Op::ReleaseDir,
        Op::StatFs,
        Op::Access,
        Op::GetXattr,
        Op::ListXattr,
        Op::Create,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::SetAttr,
        Op::Write,
        Op::Fsync,
        Op::FsyncDir,
        Op::Fallocate,
        Op::SetXattr,
        Op::RemoveXattr,
    ];

    /// The name in logs and metrics (the FUSE operation, lower case).
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::GetAttr => "getattr",
            Op::ReadLink => "readlink",
            Op::Open => "open",
            Op::Read => "read",
            Op::Release => "release",
            Op::Flush => "flush",
            Op::OpenDir => "opendir",
            Op::ReadDir => "readdir",
            Op::ReadDirPlus => "readdirplus",
            Op::ReleaseDir => "releasedir",
            Op::StatFs => "statfs",
            Op::Access => "access",
            Op::GetXattr => "getxattr",
            Op::ListXattr => "listxattr",
            Op::Create => "create",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::SetAttr => "setattr",
            Op::Write => "write",
            Op::Fsync => "fsync",
            Op::FsyncDir => "fsyncdir",
            Op::Fallocate => "fallocate",
            Op::SetXattr => "setxattr",
            Op::RemoveXattr => "removexattr",
        }
    }
}

/// Counts per operation, and failures per operation and reason.
#[derive(Debug, Default)]
pub struct OpCounters {
    requests: [Padded; Op::ALL.len()],
    failures: [[AtomicU64; FsError::ALL.len()]; Op::ALL.len()],
}

/// One counter per cache line (128 bytes: adjacent-line prefetch pairs them): every front
/// thread counts every request, and a READ counted on one core must not bounce the line that
/// holds LOOKUP on another.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl OpCounters {
    pub fn request(&self, op: Op) {
        self.requests[op as usize].0.fetch_add(1, Relaxed);
    }

    pub fn failure(&self, op: Op, error: FsError) {
        self.failures[op as usize][error as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op as usize].0.load(Relaxed)
    }

    /// The failures of `op` so far, by reason (reasons that never happened left out).
    pub fn failures(&self, op: Op) -> impl Iterator<Item = (FsError, u64)> + '_ {
        FsError::ALL.into_iter().filter_map(move |error| {
            let n = self.failures[op as usize][error as usize].load(Relaxed);
            (n > 0).then_some((error, n))
        })
    }
}
