//! Requests and failures per operation, counted where every request enters
//! ([`Dispatcher::dispatch`](super::Dispatcher::dispatch)) and where every failure leaves
//! ([`fail`](super::request::fail)). Relaxed atomics in fixed arrays: no lock, no allocation
//! on the request path; exporters read them from any thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

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
#[derive(Debug)]
pub struct OpCounters {
    /// Summed over stripes when read.
    requests: Box<[Stripe]>,
    failures: [[AtomicU64; FsError::ALL.len()]; Op::ALL.len()],
}

/// Request counters are striped by thread (threads past this many share stripes): every READ
/// is counted, and two shards counting into one cache line pass it back and forth on each.
const STRIPES: usize = 64;

/// One thread's request counters, on cache lines of their own (128 bytes: adjacent-line
/// prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe([AtomicU64; Op::ALL.len()]);

/// The stripe of the calling thread.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES);
    STRIPE.with(|stripe| *stripe)
}

impl Default for OpCounters {
    fn default() -> OpCounters {
        OpCounters {
            requests: (0..STRIPES).map(|_| Stripe::default()).collect(),
            failures: Default::default(),
        }
    }
}

impl OpCounters {
    pub fn request(&self, op: Op) {
        self.requests[stripe()].0[op as usize].fetch_add(1, Relaxed);
    }

    pub fn failure(&self, op: Op, error: FsError) {
        self.failures[op as usize][error as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, op: Op) -> u64 {
        self.requests
            .iter()
            .map(|stripe| stripe.0[op as usize].load(Relaxed))
            .sum()
    }

    /// The failures of `op` so far, by reason (reasons that never happened left out).
    pub fn failures(&self, op: Op) -> impl Iterator<Item = (FsError, u64)> + '_ {
        FsError::ALL.into_iter().filter_map(move |error| {
            let n = self.failures[op as usize][error as usize].load(Relaxed);
            (n > 0).then_some((error, n))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_counted_on_many_threads_add_up() {
        let counters = OpCounters::default();
        // More threads than stripes, so that some share one.
        std::thread::scope(|scope| {
            for _ in 0..STRIPES + 8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        counters.request(Op::Read);
                    }
                    counters.request(Op::Lookup);
                });
            }
        });
        assert_eq!(counters.requests(Op::Read), (STRIPES as u64 + 8) * 1000);
        assert_eq!(counters.requests(Op::Lookup), STRIPES as u64 + 8);
        assert_eq!(counters.requests(Op::Write), 0);
    }
}
