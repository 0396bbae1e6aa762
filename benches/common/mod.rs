//! Pieces shared by the mount benchmarks: the do-nothing FUSE baseline, process accounting, and
//! the same-invocation A/B comparison with an older mount_vfs binary (`BENCH_BASELINE_BIN`).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};

const TTL: Duration = Duration::from_secs(3600);

/// The transport ceiling: files of `size` bytes whose every READ is answered from one static
/// buffer, with no work at all behind it.
pub struct NullFs {
    size: u64,
    names: Vec<&'static str>,
    buffer: Vec<u8>,
}

impl NullFs {
    /// Files `names` (inodes 2, 3, ...) in the root, each `size` bytes long.
    pub fn new(size: u64, names: &[&'static str]) -> NullFs {
        NullFs {
            size,
            names: names.to_vec(),
            buffer: vec![7u8; 16 << 20],
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

impl Filesystem for NullFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.names.iter().position(|n| OsStr::new(n) == name) {
            Some(i) if parent.0 == 1 => reply.entry(&TTL, &self.attr(i as u64 + 2), Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        reply.data(&self.buffer[..len.min(self.buffer.len())]);
    }
}

/// (minor faults, CPU seconds) of a process, from /proc/PID/stat; zeros if it is gone.
pub fn faults_and_cpu(pid: u32) -> (u64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    if fields.len() < 13 {
        return (0, 0.0);
    }
    // After the command name: minflt is field 10, utime 14, stime 15.
    let minflt: u64 = fields[7].parse().unwrap_or(0);
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (minflt, ticks / hz)
}

/// Mounts a [`NullFs`] on `mnt` the way mount_vfs mounts (read-only, 2 threads, `clone_fd`).
/// Dropping the session unmounts it.
pub fn mount_null(
    mnt: &std::path::Path,
    size: u64,
    names: &[&'static str],
) -> fuser::BackgroundSession {
    std::fs::create_dir_all(mnt).unwrap();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("nullfs".into()),
    ];
    config.n_threads = Some(2);
    config.clone_fd = true;
    fuser::Session::new(NullFs::new(size, names), mnt, &config)
        .unwrap()
        .spawn()
        .unwrap()
}

/// This checkout's mount_vfs, built by cargo for the bench.
pub const BIN: &str = env!("CARGO_BIN_EXE_mount_vfs");

/// Names an older mount_vfs binary to measure beside this build in the same invocation.
const BASELINE_BIN: &str = "BENCH_BASELINE_BIN";

/// Which mount_vfs binary a row measures. With `BENCH_BASELINE_BIN` set, every mount_vfs row is
/// measured with both, interleaved within each run so both see the same machine state: the way
/// to show that a refactor kept the speed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Build {
    /// [`BIN`].
    New,
    /// `BENCH_BASELINE_BIN`.
    Baseline,
}

impl Build {
    /// The builds each run measures, in that order: [`Build::New`], then [`Build::Baseline`]
    /// when `BENCH_BASELINE_BIN` is set (and names a file: a typo fails now, not mid-run).
    pub fn all() -> Vec<Build> {
        match std::env::var_os(BASELINE_BIN) {
            None => vec![Build::New],
            Some(path) => {
                assert!(
                    std::path::Path::new(&path).is_file(),
                    "{BASELINE_BIN}={}: no such file",
                    path.to_string_lossy()
                );
                vec![Build::New, Build::Baseline]
            }
        }
    }

    pub fn bin(self) -> PathBuf {
        match self {
            Build::New => BIN.into(),
            Build::Baseline => std::env::var_os(BASELINE_BIN)
                .expect("BENCH_BASELINE_BIN is set")
                .into(),
        }
    }

    /// Appended to a row's label: nothing for this build, so its rows read as without a
    /// baseline.
    pub fn label(self) -> &'static str {
        match self {
            Build::New => "",
            Build::Baseline => " (baseline)",
        }
    }
}

/// `new/baseline 1.02x`: a row of this build against the same row of the baseline, median
/// against median (for a time, below 1 is faster; for a rate, above 1).
pub fn vs_baseline(new: f64, baseline: f64) -> String {
    format!("new/baseline {:.2}x", new / baseline)
}
