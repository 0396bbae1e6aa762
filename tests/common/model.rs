//! Model-based random testing of a writable filesystem against a reference tree.
//!
//! A [`Model`] applies each random operation to two directory trees with the same relative
//! paths and the same system calls: `mount` (the filesystem under test) and `reference` (a local
//! filesystem, e.g. tmpfs). After every operation both must have returned the same outcome
//! (success with the same value, or the same errno) and the entries it touched must look the
//! same: kind, size, permission bits, link count and content of files, symlink target, sorted
//! directory listing, user.* xattrs, and the mtime where utimensat set it (an mtime before 2010
//! can only come from utimensat, so it is compared wherever either side has one; atime and ctime
//! never are). Every `full_every` operations, and at the end, the whole trees are compared.
//!
//! The engine knows nothing of mount_vfs: two local filesystems must always agree (the self-test
//! in tests/writable_model.rs), so a mismatch on a mount is the mount's. Everything derives from
//! one seed (`MODEL_SEED` reproduces a run), and operations are generated from the reference
//! tree only, never from the filesystem under test, so a seed replays the same operations
//! whatever the mount answers.
//!
//! Symlink targets are bare names (or paths without `..` that do not exist), so following one
//! never leaves the tree. FIFOs are opened with O_NONBLOCK, so no operation blocks on one.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pattern;

pub const MIB: u64 = 1 << 20;
/// Writes, truncates and fallocates keep files below this size.
const MAX_FILE: u64 = 6 * MIB;
/// Past this many entries, creating operations turn into removals.
const MAX_ENTRIES: usize = 250;
/// Past this many bytes in the tree, growing operations turn into shrinking ones.
const MAX_BYTES: u64 = 32 * MIB;
/// 2010-01-01: an mtime before this was set by utimensat (the model only sets 2001..2009).
const PINNED_BEFORE: i64 = 1_262_304_000;
/// Names for new entries: a small pool (so names collide and errors happen), plus base names
/// (so deleted base files and directories get re-created).
const NAMES: &[&str] = &[
    "n0", "n1", "n2", "n3", "n4", "d0", "d1", "d2", "x", "y", "a.txt", "big.bin", "mid.bin",
    "docs", "src", "util", "empty",
];
const XATTRS: &[&str] = &["user.a", "user.b", "user.long.name.c", "user.d"];
/// How many recent operations a failure report lists.
const HISTORY: usize = 40;

/// An errno, printed by name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&errno_name(self.0))
    }
}

pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECANCELED => "ECANCELED",
        libc::EDQUOT => "EDQUOT",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

fn last_errno() -> Errno {
    Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn cpath(root: &Path, rel: &str) -> CString {
    let path = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// The parent of a relative path ("" for the root).
pub fn parent(rel: &str) -> &str {
    rel.rfind('/').map_or("", |i| &rel[..i])
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether `a` is `b`, or an ancestor or a descendant of it.
fn related(a: &str, b: &str) -> bool {
    a == b
        || (b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'/')
        || (a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'/')
}

/// An open file descriptor, closed on drop (errors ignored) or by [`Fd::close`] (checked).
pub struct Fd(libc::c_int);

/// How many descriptors a model keeps open across operations (on each side).
pub const SLOTS: usize = 4;

impl Fd {
    fn open(root: &Path, rel: &str, flags: i32, mode: u32) -> Result<Fd, Errno> {
        let path = cpath(root, rel);
        // SAFETY: a valid C string; open has no other preconditions.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd < 0 {
            Err(last_errno())
        } else {
            Ok(Fd(fd))
        }
    }

    fn close(mut self) -> Result<(), Errno> {
        let fd = std::mem::replace(&mut self.0, -1);
        // SAFETY: we own fd.
        check(unsafe { libc::close(fd) })
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: we own the descriptor.
            unsafe { libc::close(self.0) };
        }
    }
}

/// Data to write: `pattern(seed, len)`.
#[derive(Debug, Clone, Copy)]
pub struct Data {
    pub seed: u64,
    pub len: usize,
}

impl Data {
    /// The bytes (fastrand is built optimised; `pattern` in a debug test binary is slow). The
    /// last ones are kept, since each operation writes them twice.
    fn bytes(&self) -> std::rc::Rc<Vec<u8>> {
        type Last = Option<(u64, usize, std::rc::Rc<Vec<u8>>)>;
        thread_local! {
            static LAST: std::cell::RefCell<Last> = const { std::cell::RefCell::new(None) };
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some((seed, len, bytes)) if *seed == self.seed && *len == self.len => bytes.clone(),
                _ => {
                    let mut out = vec![0u8; self.len];
                    fastrand::Rng::with_seed(self.seed).fill(&mut out);
                    let out = std::rc::Rc::new(out);
                    *last = Some((self.seed, self.len, out.clone()));
                    out
                }
            }
        })
    }
}

/// One operation, applied identically to both trees (paths are relative to each root).
#[derive(Debug, Clone)]
pub enum Op {
    /// open(O_CREAT | O_WRONLY | flags, mode), then a write of `data` if not empty, then close.
    Create {
        path: String,
        flags: i32,
        mode: u32,
        data: Data,
    },
    /// open(O_WRONLY | flags); one pwrite at `offset` (one write with O_APPEND); close.
    Write {
        path: String,
        flags: i32,
        offset: u64,
        data: Data,
    },
    /// open(O_RDONLY | flags); one pread of `len` bytes at `offset`; close.
    Read {
        path: String,
        flags: i32,
        offset: u64,
        len: usize,
    },
    /// truncate(2) on the path, or open(O_WRONLY | flags) + ftruncate + close.
    Truncate {
        path: String,
        size: u64,
        by_fd: bool,
        flags: i32,
    },
    /// open(O_WRONLY | flags) + fallocate(mode 0) + close.
    Fallocate {
        path: String,
        flags: i32,
        offset: u64,
        len: u64,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    /// renameat2 with 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Readlink {
        path: String,
    },
    /// linkat without AT_SYMLINK_FOLLOW.
    Link {
        from: String,
        to: String,
    },
    /// chmod(2) (follows symlinks).
    Chmod {
        path: String,
        mode: u32,
    },
    /// utimensat(AT_FDCWD, path, times, 0); a nanosecond field may be UTIME_OMIT or UTIME_NOW.
    Utimens {
        path: String,
        atime: (i64, i64),
        mtime: (i64, i64),
    },
    /// open(O_RDONLY | flags) + fsync or fdatasync + close (directories too).
    Fsync {
        path: String,
        flags: i32,
        data_only: bool,
    },
    Statfs {
        path: String,
    },
    SetXattr {
        path: String,
        name: String,
        value: Data,
        flags: i32,
    },
    GetXattr {
        path: String,
        name: String,
    },
    /// The sorted user.* names.
    ListXattr {
        path: String,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    Mkfifo {
        path: String,
        mode: u32,
    },
    /// The sorted names of a directory.
    ListDir {
        path: String,
    },
    /// std::fs::remove_dir_all (what `rm -rf` does).
    RemoveTree {
        path: String,
    },
    /// open(flags, mode) kept open in `slot` across operations (renames, unlinks, writes
    /// through other names and descriptors).
    FdOpen {
        slot: usize,
        path: String,
        flags: i32,
        mode: u32,
    },
    /// One pwrite on the descriptor in `slot` (write, if it was opened O_APPEND).
    FdWrite {
        slot: usize,
        offset: u64,
        data: Data,
    },
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    FdSync {
        slot: usize,
    },
    /// fstat: kind, size, link count, permission bits.
    FdStat {
        slot: usize,
    },
    FdClose {
        slot: usize,
    },
}

/// What an operation returned on success.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    Unit,
    Count(u64),
    Bytes(Vec<u8>),
    Names(Vec<String>),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Unit => f.write_str("()"),
            Value::Count(n) => write!(f, "{n}"),
            Value::Bytes(b) => write!(
                f,
                "{} bytes (xxh3 {:016x}, starting {:02x?})",
                b.len(),
                xxhash_rust::xxh3::xxh3_64(b),
                &b[..b.len().min(12)]
            ),
            Value::Names(n) => write!(f, "{n:?}"),
        }
    }
}

pub type Outcome = Result<Value, Errno>;

fn fd_op(
    root: &Path,
    path: &str,
    flags: i32,
    mode: u32,
    f: impl FnOnce(&Fd) -> Outcome,
) -> Outcome {
    let fd = Fd::open(root, path, flags, mode)?;
    let value = f(&fd)?;
    fd.close()?;
    Ok(value)
}

fn count(ret: isize) -> Outcome {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(Value::Count(ret as u64))
    }
}

fn unit(ret: libc::c_int) -> Outcome {
    check(ret).map(|()| Value::Unit)
}

fn fstat(fd: &Fd) -> Result<libc::stat, Errno> {
    // SAFETY: a stat buffer for a descriptor we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.0, &mut st) })?;
    Ok(st)
}

/// What fstat says that is the filesystem's to decide (a directory's size and link count
/// differ between filesystems).
fn fstat_value(fd: &Fd) -> Outcome {
    let st = fstat(fd)?;
    let kind = kind_of(st.st_mode);
    let mode = st.st_mode & 0o7777;
    Ok(Value::Names(vec![if kind == Kind::File {
        format!(
            "{kind:?} size {} nlink {} mode {mode:o}",
            st.st_size,
            nlink(&st)
        )
    } else {
        format!("{kind:?} mode {mode:o}")
    }]))
}

impl Op {
    /// The descriptor slot of an operation on a kept descriptor.
    pub fn slot(&self) -> Option<usize> {
        match self {
            Op::FdOpen { slot, .. }
            | Op::FdWrite { slot, .. }
            | Op::FdRead { slot, .. }
            | Op::FdTruncate { slot, .. }
            | Op::FdSync { slot }
            | Op::FdStat { slot }
            | Op::FdClose { slot } => Some(*slot),
            _ => None,
        }
    }

    /// Applies the operation under `root`, with `fds` the descriptors kept open there.
    pub fn apply(&self, root: &Path, fds: &mut [Option<Fd>]) -> Outcome {
        let ebadf = Errno(libc::EBADF);
        // SAFETY (all unsafe blocks below): valid C strings and buffers of the lengths passed,
        // and descriptors we own.
        match self {
            Op::FdOpen {
                slot,
                path,
                flags,
                mode,
            } => {
                fds[*slot] = None;
                fds[*slot] = Some(Fd::open(root, path, *flags, *mode)?);
                Ok(Value::Unit)
            }
            Op::FdWrite { slot, offset, data } => {
                let fd = fds[*slot].as_ref().ok_or(ebadf)?;
                let bytes = data.bytes();
                // SAFETY: F_GETFL on a descriptor we own.
                let append = unsafe { libc::fcntl(fd.0, libc::F_GETFL) } & libc::O_APPEND != 0;
                if append {
                    count(unsafe { libc::write(fd.0, bytes.as_ptr().cast(), bytes.len()) })
                } else {
                    count(unsafe {
                        libc::pwrite(fd.0, bytes.as_ptr().cast(), bytes.len(), *offset as i64)
                    })
                }
            }
            Op::FdRead { slot, offset, len } => {
                let fd = fds[*slot].as_ref().ok_or(ebadf)?;
                pread_full(fd.0, *offset, *len).map(Value::Bytes)
            }
            Op::FdTruncate { slot, size } => {
                let fd = fds[*slot].as_ref().ok_or(ebadf)?;
                unit(unsafe { libc::ftruncate(fd.0, *size as i64) })
            }
            Op::FdSync { slot } => {
                let fd = fds[*slot].as_ref().ok_or(ebadf)?;
                unit(unsafe { libc::fsync(fd.0) })
            }
            Op::FdStat { slot } => fstat_value(fds[*slot].as_ref().ok_or(ebadf)?),
            Op::FdClose { slot } => fds[*slot]
                .take()
                .ok_or(ebadf)?
                .close()
                .map(|()| Value::Unit),
            Op::Create {
                path,
                flags,
                mode,
                data,
            } => fd_op(
                root,
                path,
                libc::O_CREAT | libc::O_WRONLY | flags,
                *mode,
                |fd| {
                    if data.len == 0 {
                        return Ok(Value::Unit);
                    }
                    let bytes = data.bytes();
                    count(unsafe { libc::write(fd.0, bytes.as_ptr().cast(), bytes.len()) })
                },
            ),
            Op::Write {
                path,
                flags,
                offset,
                data,
            } => fd_op(root, path, libc::O_WRONLY | flags, 0, |fd| {
                let bytes = data.bytes();
                if flags & libc::O_APPEND != 0 {
                    count(unsafe { libc::write(fd.0, bytes.as_ptr().cast(), bytes.len()) })
                } else {
                    count(unsafe {
                        libc::pwrite(fd.0, bytes.as_ptr().cast(), bytes.len(), *offset as i64)
                    })
                }
            }),
            Op::Read {
                path,
                flags,
                offset,
                len,
            } => fd_op(root, path, libc::O_RDONLY | flags, 0, |fd| {
                pread_full(fd.0, *offset, *len).map(Value::Bytes)
            }),
            Op::Truncate {
                path,
                size,
                by_fd,
                flags,
            } => {
                if *by_fd {
                    fd_op(root, path, libc::O_WRONLY | flags, 0, |fd| {
                        unit(unsafe { libc::ftruncate(fd.0, *size as i64) })
                    })
                } else {
                    let p = cpath(root, path);
                    unit(unsafe { libc::truncate(p.as_ptr(), *size as i64) })
                }
            }
            Op::Fallocate {
                path,
                flags,
                offset,
                len,
            } => fd_op(root, path, libc::O_WRONLY | flags, 0, |fd| {
                unit(unsafe { libc::fallocate(fd.0, 0, *offset as i64, *len as i64) })
            }),
            Op::Unlink { path } => {
                let p = cpath(root, path);
                unit(unsafe { libc::unlink(p.as_ptr()) })
            }
            Op::Mkdir { path, mode } => {
                let p = cpath(root, path);
                unit(unsafe { libc::mkdir(p.as_ptr(), *mode) })
            }
            Op::Rmdir { path } => {
                let p = cpath(root, path);
                unit(unsafe { libc::rmdir(p.as_ptr()) })
            }
            Op::Rename { from, to, flags } => {
                let (a, b) = (cpath(root, from), cpath(root, to));
                unit(unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        *flags,
                    )
                })
            }
            Op::Symlink { target, path } => {
                let t = CString::new(target.as_bytes()).unwrap();
                let p = cpath(root, path);
                unit(unsafe { libc::symlink(t.as_ptr(), p.as_ptr()) })
            }
            Op::Readlink { path } => std::fs::read_link(root.join(path))
                .map(|t| Value::Names(vec![t.to_string_lossy().into_owned()]))
                .map_err(|e| io_errno(&e)),
            Op::Link { from, to } => {
                let (a, b) = (cpath(root, from), cpath(root, to));
                unit(unsafe {
                    libc::linkat(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), 0)
                })
            }
            Op::Chmod { path, mode } => {
                let p = cpath(root, path);
                unit(unsafe { libc::chmod(p.as_ptr(), *mode) })
            }
            Op::Utimens { path, atime, mtime } => {
                let p = cpath(root, path);
                let times = [
                    libc::timespec {
                        tv_sec: atime.0,
                        tv_nsec: atime.1,
                    },
                    libc::timespec {
                        tv_sec: mtime.0,
                        tv_nsec: mtime.1,
                    },
                ];
                unit(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })
            }
            Op::Fsync {
                path,
                flags,
                data_only,
            } => fd_op(root, path, libc::O_RDONLY | flags, 0, |fd| {
                if *data_only {
                    unit(unsafe { libc::fdatasync(fd.0) })
                } else {
                    unit(unsafe { libc::fsync(fd.0) })
                }
            }),
            Op::Statfs { path } => {
                let p = cpath(root, path);
                let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
                check(unsafe { libc::statfs(p.as_ptr(), &mut buf) })?;
                if buf.f_bsize <= 0 || buf.f_blocks == 0 {
                    // Both sides must report a usable filesystem; the numbers differ.
                    return Ok(Value::Names(vec![format!(
                        "statfs: bsize {} blocks {}",
                        buf.f_bsize, buf.f_blocks
                    )]));
                }
                Ok(Value::Unit)
            }
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                let p = cpath(root, path);
                let n = CString::new(name.as_bytes()).unwrap();
                let v = value.bytes();
                unit(unsafe {
                    libc::lsetxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), *flags)
                })
            }
            Op::GetXattr { path, name } => get_xattr(root, path, name).map(Value::Bytes),
            Op::ListXattr { path } => list_xattrs(root, path).map(Value::Names),
            Op::RemoveXattr { path, name } => {
                let p = cpath(root, path);
                let n = CString::new(name.as_bytes()).unwrap();
                unit(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })
            }
            Op::Mkfifo { path, mode } => {
                let p = cpath(root, path);
                unit(unsafe { libc::mknod(p.as_ptr(), libc::S_IFIFO | *mode, 0) })
            }
            Op::ListDir { path } => list_dir(&root.join(path)).map(Value::Names),
            Op::RemoveTree { path } => std::fs::remove_dir_all(root.join(path))
                .map(|()| Value::Unit)
                .map_err(|e| io_errno(&e)),
        }
    }

    /// Paths whose entries the operation may change (compared after it): its paths and the
    /// directories holding them.
    fn touched(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |p: &str, with_parent: bool| {
            out.push(p.to_string());
            if with_parent {
                out.push(parent(p).to_string());
            }
        };
        match self {
            Op::Create { path, .. }
            | Op::Unlink { path }
            | Op::Mkdir { path, .. }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Mkfifo { path, .. }
            | Op::RemoveTree { path } => add(path, true),
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Chmod { path, .. }
            | Op::Utimens { path, .. }
            | Op::Fsync { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. } => add(path, false),
            Op::Rename { from, to, .. } => {
                add(from, true);
                add(to, true);
            }
            Op::Link { from, to } => {
                add(from, false);
                add(to, true);
            }
            Op::FdOpen { path, .. } => add(path, true),
            Op::Read { .. }
            | Op::Readlink { .. }
            | Op::Statfs { .. }
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::ListDir { .. }
            | Op::FdWrite { .. }
            | Op::FdRead { .. }
            | Op::FdTruncate { .. }
            | Op::FdSync { .. }
            | Op::FdStat { .. }
            | Op::FdClose { .. } => {}
        }
        out.sort();
        out.dedup();
        out
    }

    /// Paths whose existence or kind the operation may change.
    fn namespace(&self) -> Vec<String> {
        match self {
            Op::Create { path, .. }
            | Op::Unlink { path }
            | Op::Mkdir { path, .. }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Mkfifo { path, .. }
            | Op::RemoveTree { path } => vec![path.clone()],
            Op::Rename { from, to, .. } => vec![from.clone(), to.clone()],
            Op::Link { to, .. } => vec![to.clone()],
            Op::FdOpen { path, flags, .. } if flags & libc::O_CREAT != 0 => vec![path.clone()],
            _ => Vec::new(),
        }
    }

    /// The byte ranges the operation may have changed in its file, given the size before.
    fn windows(&self, old_size: u64) -> Vec<(u64, u64)> {
        let (start, len) = match self {
            Op::Write {
                flags,
                offset,
                data,
                ..
            } => (
                if flags & libc::O_APPEND != 0 {
                    if flags & libc::O_TRUNC != 0 {
                        0
                    } else {
                        old_size
                    }
                } else {
                    *offset
                },
                data.len as u64,
            ),
            Op::Create { flags, data, .. } => (
                if flags & libc::O_APPEND != 0 && flags & libc::O_TRUNC == 0 {
                    old_size
                } else {
                    0
                },
                data.len as u64,
            ),
            Op::Truncate { size, .. } | Op::FdTruncate { size, .. } => {
                (old_size.min(*size), old_size.abs_diff(*size))
            }
            Op::FdWrite { offset, data, .. } => (*offset, data.len as u64),
            Op::FdOpen { flags, .. } if flags & libc::O_TRUNC != 0 => (0, old_size),
            Op::Fallocate { offset, len, .. } => (*offset, *len),
            _ => return Vec::new(),
        };
        let (a, b) = (start.saturating_sub(4096), start + len + 4096);
        if len <= 256 << 10 {
            vec![(a, b)]
        } else {
            let mid = start + len / 2;
            vec![
                (a, start + (64 << 10)),
                (mid - 4096, mid + 4096),
                (start + len - (64 << 10), b),
            ]
        }
    }

    /// The path whose file content the operation may change (through symlinks).
    fn content_path(&self) -> Option<&str> {
        match self {
            Op::Create { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. } => Some(path),
            Op::FdOpen { path, flags, .. } if flags & libc::O_TRUNC != 0 => Some(path),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Truncate { .. } => "truncate",
            Op::Fallocate { .. } => "fallocate",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Link { .. } => "link",
            Op::Chmod { .. } => "chmod",
            Op::Utimens { .. } => "utimens",
            Op::Fsync { .. } => "fsync",
            Op::Statfs { .. } => "statfs",
            Op::SetXattr { .. } => "setxattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Mkfifo { .. } => "mkfifo",
            Op::ListDir { .. } => "listdir",
            Op::RemoveTree { .. } => "rmtree",
            Op::FdOpen { .. } => "fd-open",
            Op::FdWrite { .. } => "fd-write",
            Op::FdRead { .. } => "fd-read",
            Op::FdTruncate { .. } => "fd-truncate",
            Op::FdSync { .. } => "fd-fsync",
            Op::FdStat { .. } => "fd-stat",
            Op::FdClose { .. } => "fd-close",
        }
    }
}

fn get_xattr(root: &Path, path: &str, name: &str) -> Result<Vec<u8>, Errno> {
    let p = cpath(root, path);
    let n = CString::new(name.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length passed.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(last_errno());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// The sorted user.* xattr names of `path` (not following a symlink).
fn list_xattrs(root: &Path, path: &str) -> Result<Vec<String>, Errno> {
    let p = cpath(root, path);
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: a valid C string and a buffer of the length passed.
    let len = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(last_errno());
    }
    let mut names: Vec<String> = buf[..len as usize]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn list_dir(path: &Path) -> Result<Vec<String>, Errno> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_errno(&e))? {
        let entry = entry.map_err(|e| io_errno(&e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn lstat(root: &Path, rel: &str) -> Result<libc::stat, Errno> {
    let p = cpath(root, rel);
    // SAFETY: a valid C string and a stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::lstat(p.as_ptr(), &mut st) })?;
    Ok(st)
}

fn stat(root: &Path, rel: &str) -> Result<libc::stat, Errno> {
    let p = cpath(root, rel);
    // SAFETY: a valid C string and a stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::stat(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Up to `len` bytes at `offset`, as a careful reader gets them: a short read is followed by
/// another until end of file or an error. A regular file on a local filesystem answers in one
/// `pread`; a FUSE read cut off by the daemon's death may return the bytes it had first, and
/// the next call then says why (ENOTCONN), which is what the crash test checks for.
fn pread_full(fd: libc::c_int, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        // SAFETY: reads into the live tail of `buf`.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                len - done,
                (offset + done as u64) as i64,
            )
        };
        match n {
            n if n < 0 => return Err(last_errno()),
            0 => break,
            n => done += n as usize,
        }
    }
    buf.truncate(done);
    Ok(buf)
}

pub static BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads a whole file (O_NONBLOCK, so a FIFO cannot block).
pub fn read_file(path: &Path) -> Result<Vec<u8>, Errno> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_errno(&e))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out).map_err(|e| io_errno(&e))?;
    BYTES_READ.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Other,
}

fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        _ => Kind::Other,
    }
}

/// What is compared of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        mode: u32,
        size: u64,
        nlink: u64,
        /// xxh3 of the content, or the error reading it.
        content: Result<u64, Errno>,
        mtime: Option<(i64, i64)>,
        xattrs: Result<Vec<(String, Vec<u8>)>, Errno>,
    },
    Dir {
        mode: u32,
        names: Result<Vec<String>, Errno>,
        mtime: Option<(i64, i64)>,
        xattrs: Result<Vec<(String, Vec<u8>)>, Errno>,
    },
    Symlink {
        target: Result<String, Errno>,
    },
    Fifo {
        mode: u32,
        nlink: u64,
        mtime: Option<(i64, i64)>,
    },
    Other {
        mode: u32,
    },
}

fn xattrs(root: &Path, rel: &str) -> Result<Vec<(String, Vec<u8>)>, Errno> {
    list_xattrs(root, rel)?
        .into_iter()
        .map(|n| get_xattr(root, rel, &n).map(|v| (n, v)))
        .collect()
}

/// st_nlink as u64 (it is u32 on some architectures).
#[allow(clippy::useless_conversion)]
fn nlink(st: &libc::stat) -> u64 {
    u64::from(st.st_nlink)
}

/// The comparable state of `rel` under `root` (without following a symlink).
///
/// With `windows`, a file over [`FULL_CONTENT`] bytes is compared by its bytes in those ranges
/// (plus its head, tail and the bytes around each 1 MiB block boundary) rather than all of them:
/// the per-operation compare of big files, whose whole content the full-tree compares check.
pub fn describe(root: &Path, rel: &str, windows: Option<&[(u64, u64)]>) -> Result<Entry, Errno> {
    let st = lstat(root, rel)?;
    let mode = st.st_mode & 0o7777;
    let mtime = (st.st_mtime < PINNED_BEFORE).then_some((st.st_mtime, st.st_mtime_nsec));
    let path = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    Ok(match kind_of(st.st_mode) {
        Kind::File => Entry::File {
            mode,
            size: st.st_size as u64,
            nlink: nlink(&st),
            content: match windows {
                Some(w) if st.st_size as u64 > FULL_CONTENT => {
                    read_windows(&path, st.st_size as u64, w)
                }
                _ => read_file(&path).map(|b| xxhash_rust::xxh3::xxh3_64(&b)),
            },
            mtime,
            xattrs: xattrs(root, rel),
        },
        Kind::Dir => Entry::Dir {
            mode,
            names: list_dir(&path),
            mtime,
            xattrs: xattrs(root, rel),
        },
        Kind::Symlink => Entry::Symlink {
            target: std::fs::read_link(&path)
                .map(|t| t.to_string_lossy().into_owned())
                .map_err(|e| io_errno(&e)),
        },
        Kind::Fifo => Entry::Fifo {
            mode,
            nlink: nlink(&st),
            mtime,
        },
        Kind::Other => Entry::Other { mode: st.st_mode },
    })
}

/// Files up to this size are always compared whole.
pub const FULL_CONTENT: u64 = 512 << 10;

/// xxh3 of the bytes of `path` in `windows` and around every block boundary below `size`, and
/// of its head and tail.
fn read_windows(path: &Path, size: u64, windows: &[(u64, u64)]) -> Result<u64, Errno> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_errno(&e))?;
    let mut ranges: Vec<(u64, u64)> = windows.to_vec();
    ranges.push((0, 4096));
    ranges.push((size.saturating_sub(64 << 10), size));
    for k in 1..=size / MIB {
        ranges.push((k * MIB - 4096, k * MIB + 4096));
    }
    ranges.sort_unstable();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut covered = 0u64;
    for (start, end) in ranges {
        let (start, end) = (start.max(covered), end.min(size + 4096));
        if start >= end {
            continue;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], start + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(io_errno(&e)),
            }
        }
        BYTES_READ.fetch_add(filled as u64, std::sync::atomic::Ordering::Relaxed);
        hasher.update(&start.to_le_bytes());
        hasher.update(&buf[..filled]);
        covered = end;
    }
    Ok(hasher.digest())
}

/// Where two files' contents first differ, for a failure report.
fn content_diff(a: &Path, b: &Path) -> String {
    match (read_file(a), read_file(b)) {
        (Ok(x), Ok(y)) => {
            let first = x.iter().zip(&y).position(|(p, q)| p != q);
            match first {
                Some(i) => format!(
                    "contents differ first at byte {i} (block {} of 1 MiB): mount {:02x?}, \
                     reference {:02x?}; lengths {} and {}",
                    i >> 20,
                    &x[i..(i + 16).min(x.len())],
                    &y[i..(i + 16).min(y.len())],
                    x.len(),
                    y.len()
                ),
                None => format!("lengths differ: mount {}, reference {}", x.len(), y.len()),
            }
        }
        (x, y) => format!(
            "read: mount {:?}, reference {:?}",
            x.map(|b| b.len()),
            y.map(|b| b.len())
        ),
    }
}

/// Every entry under `root` (relative paths, not following symlinks), sorted.
pub fn walk(root: &Path) -> Result<Vec<String>, String> {
    fn go(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), String> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let names = list_dir(&dir).map_err(|e| format!("list {}: {e:?}", dir.display()))?;
        for name in names {
            let child = join(rel, &name);
            out.push(child.clone());
            let st = lstat(root, &child)
                .map_err(|e| format!("lstat {}: {e:?}", root.join(&child).display()))?;
            if kind_of(st.st_mode) == Kind::Dir {
                go(root, &child, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(root, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Compares two whole trees: the same entries, each described the same. Returns a report of
/// the differences (at most 20).
pub fn compare_trees(mount: &Path, reference: &Path) -> Result<(), String> {
    let a = walk(mount).map_err(|e| format!("walking the mount: {e}"))?;
    let b = walk(reference).map_err(|e| format!("walking the reference: {e}"))?;
    let mut problems = Vec::new();
    let (sa, sb): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
        (a.iter().collect(), b.iter().collect());
    for extra in sa.difference(&sb) {
        problems.push(format!("only in the mount: {extra}"));
    }
    for missing in sb.difference(&sa) {
        problems.push(format!("missing from the mount: {missing}"));
    }
    for rel in std::iter::once(&String::new()).chain(sa.intersection(&sb).copied()) {
        if problems.len() >= 20 {
            break;
        }
        if let Some(p) = compare_entry(mount, reference, rel, None) {
            problems.push(p);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("trees differ:\n  {}", problems.join("\n  ")))
    }
}

/// A report if `rel` differs between the trees.
fn compare_entry(
    mount: &Path,
    reference: &Path,
    rel: &str,
    windows: Option<&[(u64, u64)]>,
) -> Option<String> {
    let (x, y) = (
        describe(mount, rel, windows),
        describe(reference, rel, windows),
    );
    if x == y {
        return None;
    }
    let mut report = format!("`{rel}`:\n    mount:     {x:?}\n    reference: {y:?}");
    if let (Ok(Entry::File { content: c1, .. }), Ok(Entry::File { content: c2, .. })) = (&x, &y) {
        if c1 != c2 {
            report.push_str("\n    ");
            report.push_str(&content_diff(&mount.join(rel), &reference.join(rel)));
        }
    }
    Some(report)
}

/// Copies a tree of directories and files, setting the modes a manifest mount shows (0o755 for
/// directories, 0o644 for files), so `to` starts equal to a read-only mount of it.
pub fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// The base tree of the model tests under `prefix` ("" or e.g. "t0/"): 31 files in nested
/// directories, 0 bytes to 3 MiB, some crossing 1 MiB block boundaries.
pub fn base_files(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), b"alpha\n".to_vec()),
        ("empty".into(), Vec::new()),
        ("b.bin".into(), pattern(2, 100)),
        ("c.bin".into(), pattern(3, 4096)),
        ("big.bin".into(), pattern(4, 3 * MIB as usize + 4321)),
        ("mid.bin".into(), pattern(5, MIB as usize + 17)),
        ("one.bin".into(), pattern(6, MIB as usize)),
        ("docs/readme.md".into(), b"# readme\nsome text\n".to_vec()),
        ("docs/notes.txt".into(), pattern(7, 3000)),
        ("docs/empty".into(), Vec::new()),
        ("docs/deep/er/leaf.txt".into(), b"leaf".to_vec()),
        ("src/main.rs".into(), b"fn main() {}\n".to_vec()),
        ("src/lib.rs".into(), pattern(8, 12_345)),
        ("src/util/mod.rs".into(), pattern(9, 777)),
        ("src/util/io.rs".into(), pattern(10, 65_536)),
        ("src/util/big.dat".into(), pattern(11, 2 * MIB as usize + 5)),
        ("x/y/z/w.txt".into(), b"w".to_vec()),
    ];
    for i in 0..8u64 {
        let len = 10_000 + (i as usize) * 40_000;
        files.push((format!("assets/img{i}.bin"), pattern(20 + i, len)));
    }
    for i in 0..6u64 {
        let len = 64 << 10 << (i % 4);
        files.push((format!("data/part-{i:04}"), pattern(40 + i, len)));
    }
    files
        .into_iter()
        .map(|(p, b)| (format!("{prefix}{p}"), b))
        .collect()
}

/// `name` from the environment as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// `MODEL_SEED` if set, else a random seed (printed, and in every failure report).
pub fn seed() -> u64 {
    let seed = match std::env::var("MODEL_SEED") {
        Ok(v) => v.trim().parse().expect("MODEL_SEED is not a number"),
        Err(_) => fastrand::u64(..),
    };
    eprintln!("MODEL_SEED={seed}");
    seed
}

/// What the crash test checks after a kill: files fsynced and not changed since, and renames
/// of which exactly one name must exist.
#[derive(Debug, Default)]
pub struct Durability {
    /// Path -> (inode in the reference, xxh3 of the content at the fsync).
    pub synced: BTreeMap<String, (u64, u64)>,
    /// (from, to) of renames onto names that did not exist, neither name touched since.
    pub renames: Vec<(String, String)>,
}

impl Durability {
    fn forget_related(&mut self, path: &str) {
        self.synced.retain(|p, _| !related(p, path));
        self.renames
            .retain(|(a, b)| !related(a, path) && !related(b, path));
    }

    /// Checks the weak (POSIX) guarantees on `mount`; a list of violations.
    pub fn check(&self, mount: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for (path, (_, hash)) in &self.synced {
            match read_file(&mount.join(path)) {
                Ok(b) if xxhash_rust::xxh3::xxh3_64(&b) == *hash => {}
                Ok(b) => out.push(format!(
                    "fsynced `{path}` has other content ({} bytes, xxh3 {:016x} instead of {hash:016x})",
                    b.len(),
                    xxhash_rust::xxh3::xxh3_64(&b)
                )),
                Err(e) => out.push(format!("fsynced `{path}` cannot be read: {e:?}")),
            }
        }
        for (from, to) in &self.renames {
            let (a, b) = (lstat(mount, from).is_ok(), lstat(mount, to).is_ok());
            if a == b {
                out.push(format!(
                    "rename `{from}` -> `{to}`: {} exist",
                    if a { "both names" } else { "neither name" }
                ));
            }
        }
        out
    }
}

/// The operation a model ran last and the reference's state before it.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub op: Op,
    /// What it may touch, as it was in the reference before it.
    pub before: Vec<(String, Result<Entry, Errno>)>,
    /// The inodes of the files under the names it removes, replaces or writes.
    pub inodes: Vec<u64>,
}

/// The model: two roots, the reference's entries, and the random source.
pub struct Model {
    pub mount: PathBuf,
    pub reference: PathBuf,
    pub seed: u64,
    rng: fastrand::Rng,
    /// Every entry of the reference tree (relative path -> kind).
    known: BTreeMap<String, Kind>,
    /// Paths that existed once (re-creating deleted entries).
    gone: Vec<String>,
    pub ops_done: u64,
    /// Full-tree compare every this many operations (0: only when asked).
    pub full_every: u64,
    /// Recent operations and outcomes, shared so a watchdog can print them on a hang.
    pub trace: Trace,
    /// Counts per operation name: (succeeded, failed).
    pub stats: BTreeMap<&'static str, (u64, u64)>,
    /// Crash-test bookkeeping, when enabled.
    pub durability: Option<Durability>,
    /// Record the reference's state before each operation (for [`Model::check_interrupted`]).
    pub capture: bool,
    /// The last operation and the reference's state before it, when `capture` is on.
    pub in_flight: Option<InFlight>,
    /// Tolerate the documented ETXTBSY of --writable (docs/semantics.md: an open for writing
    /// while the same file is open read-only through passthrough of its cache file): the
    /// operation is then not applied to the reference and counted in `stats` as
    /// "etxtbsy-tolerated". Off with `MODEL_STRICT=1` (tests/writable_ops.rs checks that case
    /// strictly).
    pub tolerate_etxtbsy: bool,
    /// Descriptors kept open across operations, on the mount and on the reference.
    mount_fds: Vec<Option<Fd>>,
    ref_fds: Vec<Option<Fd>>,
    shrink: bool,
}

impl Model {
    /// A model over two trees that are equal now (checked by the first full compare).
    pub fn new(mount: &Path, reference: &Path, seed: u64) -> Model {
        let mut model = Model {
            mount: mount.to_path_buf(),
            reference: reference.to_path_buf(),
            seed,
            rng: fastrand::Rng::with_seed(seed),
            known: BTreeMap::new(),
            gone: Vec::new(),
            ops_done: 0,
            full_every: env_u64("MODEL_FULL_EVERY", 500),
            trace: Arc::new(Mutex::new(VecDeque::new())),
            stats: BTreeMap::new(),
            durability: None,
            capture: false,
            in_flight: None,
            tolerate_etxtbsy: std::env::var("MODEL_STRICT").map_or(true, |v| v != "1"),
            mount_fds: (0..SLOTS).map(|_| None).collect(),
            ref_fds: (0..SLOTS).map(|_| None).collect(),
            shrink: false,
        };
        model.resync("");
        model
    }

    /// Header of every failure report.
    fn context(&self) -> String {
        format!(
            "MODEL_SEED={} after {} ops (mount {}, reference {})",
            self.seed,
            self.ops_done,
            self.mount.display(),
            self.reference.display()
        )
    }

    /// The recent operations, oldest first.
    pub fn history(&self) -> String {
        let trace = self.trace.lock().unwrap();
        trace
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `ops` random operations with a full compare every `full_every` and at the end.
    pub fn run(&mut self, ops: u64) -> Result<(), String> {
        for _ in 0..ops {
            self.step()?;
            if self.full_every > 0 && self.ops_done.is_multiple_of(self.full_every) {
                self.full_compare()?;
            }
        }
        self.close_fds()?;
        self.full_compare()
    }

    /// Closes the kept descriptors (compared, like any operation), so nothing holds the mount.
    pub fn close_fds(&mut self) -> Result<(), String> {
        for slot in 0..SLOTS {
            if self.ref_fds[slot].is_some() || self.mount_fds[slot].is_some() {
                self.apply(&Op::FdClose { slot })?;
            }
        }
        Ok(())
    }

    /// Drops the kept descriptors without comparing (the mount's died with its daemon).
    pub fn forget_fds(&mut self) {
        self.mount_fds.iter_mut().for_each(|fd| *fd = None);
        self.ref_fds.iter_mut().for_each(|fd| *fd = None);
    }

    /// Whether `op` opens for writing a file that a kept descriptor has open read-only.
    fn open_read_only(&self, op: &Op) -> bool {
        let path = match op {
            Op::FdOpen { path, flags, .. } if flags & libc::O_ACCMODE != libc::O_RDONLY => path,
            _ => match op.content_path() {
                Some(path) => path,
                None => return false,
            },
        };
        let Ok(st) = stat(&self.reference, path) else {
            return false;
        };
        self.ref_fds.iter().flatten().any(|fd| {
            // SAFETY: F_GETFL on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.0, libc::F_GETFL) };
            flags & libc::O_ACCMODE == libc::O_RDONLY
                && fstat(fd).is_ok_and(|f| f.st_ino == st.st_ino)
        })
    }

    /// The reference's names of the file open in `slot` (none if unlinked), and its stat.
    fn fd_file(&self, slot: Option<usize>) -> Option<(libc::stat, Vec<String>)> {
        let st = fstat(self.ref_fds[slot?].as_ref()?).ok()?;
        let names = self
            .known
            .iter()
            .filter(|(_, k)| **k == Kind::File)
            .filter(|(p, _)| lstat(&self.reference, p).is_ok_and(|l| l.st_ino == st.st_ino))
            .map(|(p, _)| p.clone())
            .collect();
        Some((st, names))
    }

    /// Compares the whole trees (and checks the model's own view of the reference).
    pub fn full_compare(&mut self) -> Result<(), String> {
        self.record(format!("full compare after #{} ...", self.ops_done));
        let walked = walk(&self.reference)?;
        let known: Vec<&String> = self.known.keys().collect();
        if walked.iter().collect::<Vec<_>>() != known {
            return Err(format!(
                "{}: model bug: its entries differ from the reference tree",
                self.context()
            ));
        }
        compare_trees(&self.mount, &self.reference).map_err(|e| {
            format!(
                "{}: full-tree compare: {e}\nlast ops:\n{}",
                self.context(),
                self.history()
            )
        })?;
        self.finish();
        Ok(())
    }

    /// Keeps the tree's bytes bounded: past [`MAX_BYTES`], growing operations shrink.
    fn measure(&mut self) {
        let bytes: u64 = self
            .known
            .iter()
            .filter(|(_, k)| **k == Kind::File)
            .filter_map(|(p, _)| lstat(&self.reference, p).ok())
            .map(|st| st.st_size as u64)
            .sum();
        self.shrink = bytes > MAX_BYTES;
    }

    /// Re-reads the reference's entries at and under `rel`.
    fn resync(&mut self, rel: &str) {
        let old: Vec<String> = self.subtree(rel);
        for p in &old {
            self.known.remove(p);
        }
        if !rel.is_empty() {
            if let Ok(st) = lstat(&self.reference, rel) {
                self.known.insert(rel.to_string(), kind_of(st.st_mode));
            }
        }
        if rel.is_empty() || self.known.get(rel) == Some(&Kind::Dir) {
            let base = self.reference.join(rel);
            if let Ok(entries) = walk(&base) {
                for e in entries {
                    let full = join(rel, &e);
                    if let Ok(st) = lstat(&self.reference, &full) {
                        self.known.insert(full, kind_of(st.st_mode));
                    }
                }
            }
        }
        for p in old {
            if !self.known.contains_key(&p) && !self.gone.contains(&p) {
                if self.gone.len() >= 64 {
                    let i = self.rng.usize(..self.gone.len());
                    self.gone.swap_remove(i);
                }
                self.gone.push(p);
            }
        }
    }

    /// `rel` and everything under it that the model knows.
    fn subtree(&self, rel: &str) -> Vec<String> {
        if rel.is_empty() {
            return self.known.keys().cloned().collect();
        }
        let mut out: Vec<String> = self
            .known
            .get_key_value(rel)
            .map(|(k, _)| k.clone())
            .into_iter()
            .collect();
        let (lo, hi) = (format!("{rel}/"), format!("{rel}0"));
        out.extend(self.known.range(lo..hi).map(|(k, _)| k.clone()));
        out
    }

    fn record(&self, line: String) {
        let mut trace = self.trace.lock().unwrap();
        if trace.len() >= HISTORY {
            trace.pop_front();
        }
        trace.push_back(line);
    }

    /// One random operation on both trees, and the comparison of what it touched.
    pub fn step(&mut self) -> Result<(), String> {
        if self.ops_done.is_multiple_of(50) {
            self.measure();
        }
        let op = self.generate();
        self.apply(&op)
    }

    /// Applies `op` to both trees and compares (also for scripted operations).
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.ops_done += 1;
        let index = self.ops_done;
        self.record(format!("#{index} {op:?} ..."));
        // Crash bookkeeping needs the reference's state before the operation.
        let fd_file = match op {
            Op::FdOpen { .. } => None,
            _ => self.fd_file(op.slot()),
        };
        let content_stat = match op {
            Op::FdWrite { .. } | Op::FdTruncate { .. } => fd_file.as_ref().map(|(st, _)| *st),
            _ => op
                .content_path()
                .and_then(|p| stat(&self.reference, p).ok()),
        };
        let content_ino = content_stat.map(|st| st.st_ino);
        let old_size = content_stat.map_or(0, |st| st.st_size as u64);
        let renamed_onto_nothing = matches!(op, Op::Rename { to, flags, .. }
            if *flags & libc::RENAME_EXCHANGE == 0 && lstat(&self.reference, to).is_err());
        // Creating through a symlink creates its target (a sibling name).
        let mut namespace = op.namespace();
        let through_symlink = namespace.iter().any(|p| self.symlink_ancestor(p));
        let created = match op {
            Op::Create { path, .. } => Some(path),
            Op::FdOpen { path, flags, .. } if flags & libc::O_CREAT != 0 => Some(path),
            _ => None,
        };
        if let Some(path) = created {
            let mut link = path.clone();
            for _ in 0..8 {
                match std::fs::read_link(self.reference.join(&link)) {
                    Ok(t) => {
                        link = join(parent(&link), &t.to_string_lossy());
                        namespace.push(link.clone());
                    }
                    Err(_) => break,
                }
            }
        }

        if self.capture {
            self.in_flight = Some(self.capture_before(op, &namespace, fd_file.as_ref()));
        }
        let got = op.apply(&self.mount, &mut self.mount_fds);
        if got == Err(Errno(libc::ETXTBSY)) && self.tolerate_etxtbsy && self.open_read_only(op) {
            if let Op::FdOpen { slot, .. } = op {
                // The mount's side closed what the slot held before it opened (and was
                // refused); the reference's side does the same, or the slots part ways.
                self.ref_fds[*slot] = None;
            }
            self.stats.entry("etxtbsy-tolerated").or_default().1 += 1;
            let mut trace = self.trace.lock().unwrap();
            if let Some(last) = trace.back_mut() {
                *last = format!("#{index} {op:?} -> ETXTBSY on the mount (tolerated)");
            }
            return Ok(());
        }
        let want = op.apply(&self.reference, &mut self.ref_fds);
        let counter = self.stats.entry(op.name()).or_default();
        if want.is_ok() {
            counter.0 += 1;
        } else {
            counter.1 += 1;
        }
        {
            let mut trace = self.trace.lock().unwrap();
            if let Some(last) = trace.back_mut() {
                *last = format!("#{index} {op:?} -> {want:?} ...");
            }
        }
        if through_symlink {
            // An entry was made or moved through a symlinked directory: re-read everything.
            self.resync("");
        } else {
            for p in &namespace {
                self.resync(p);
            }
        }
        if let Some(d) = self.durability.as_mut() {
            if want.is_ok() && through_symlink {
                *d = Durability::default();
            } else if want.is_ok() {
                if let Some(ino) = content_ino {
                    d.synced.retain(|_, (i, _)| *i != ino);
                }
                for p in &namespace {
                    d.forget_related(p);
                }
                match op {
                    Op::Fsync { path, .. } => {
                        if let Ok(st) = lstat(&self.reference, path) {
                            if kind_of(st.st_mode) == Kind::File {
                                let bytes = read_file(&self.reference.join(path)).unwrap();
                                d.synced.insert(
                                    path.clone(),
                                    (st.st_ino, xxhash_rust::xxh3::xxh3_64(&bytes)),
                                );
                            }
                        }
                    }
                    Op::Rename { from, to, .. } if renamed_onto_nothing && from != to => {
                        d.renames.push((from.clone(), to.clone()));
                    }
                    _ => {}
                }
            }
        }
        if got != want {
            return Err(format!(
                "{}: outcomes differ\n  op #{index}: {op:?}\n  mount:     {got:?}\n  \
                 reference: {want:?}\nlast ops:\n{}",
                self.context(),
                self.history()
            ));
        }
        // A descriptor op: the descriptors must agree, and the file's names are what it touched.
        if let Some(slot) = op.slot() {
            if let (Some(a), Some(b)) = (&self.mount_fds[slot], &self.ref_fds[slot]) {
                let (x, y) = (fstat_value(a), fstat_value(b));
                if x != y {
                    return Err(format!(
                        "{}: fstat differs after op #{index}: {op:?} (both returned {want:?})\n  \
                         mount:     {x:?}\n  reference: {y:?}\nlast ops:\n{}",
                        self.context(),
                        self.history()
                    ));
                }
            }
        }
        let windows = op.windows(old_size);
        let mut touched = op.touched();
        if let Some((_, names)) = &fd_file {
            touched.extend(names.iter().cloned());
        }
        // What a symlink among them points to (a write through it changed the target).
        for p in touched.clone() {
            let mut link = p;
            for _ in 0..8 {
                match std::fs::read_link(self.reference.join(&link)) {
                    Ok(t) if !t.to_string_lossy().contains('/') => {
                        link = join(parent(&link), &t.to_string_lossy());
                        touched.push(link.clone());
                    }
                    _ => break,
                }
            }
        }
        for p in &touched {
            if let Some(problem) = compare_entry(&self.mount, &self.reference, p, Some(&windows)) {
                return Err(format!(
                    "{}: entries differ after op #{index}: {op:?} (both returned {want:?})\n  \
                     {problem}\nlast ops:\n{}",
                    self.context(),
                    self.history()
                ));
            }
        }
        self.finish();
        Ok(())
    }

    /// The reference's state of what `op` may touch, before it.
    fn capture_before(
        &self,
        op: &Op,
        namespace: &[String],
        fd_file: Option<&(libc::stat, Vec<String>)>,
    ) -> InFlight {
        let mut entries = op.touched();
        if let Some((_, names)) = fd_file {
            entries.extend(names.iter().cloned());
        }
        for p in namespace {
            if !entries.contains(p) {
                entries.push(p.clone());
            }
        }
        for p in entries.clone() {
            let mut link = p;
            for _ in 0..8 {
                match std::fs::read_link(self.reference.join(&link)) {
                    Ok(t) if !t.to_string_lossy().contains('/') => {
                        link = join(parent(&link), &t.to_string_lossy());
                        if !entries.contains(&link) {
                            entries.push(link.clone());
                        }
                    }
                    _ => break,
                }
            }
        }
        // Files whose link count the operation may change: those under a removed or replaced
        // name, and every name of a file it writes.
        let mut inodes: Vec<u64> = fd_file.map(|(st, _)| st.st_ino).into_iter().collect();
        for p in namespace
            .iter()
            .chain(op.content_path().map(String::from).iter())
        {
            let under = std::iter::once(p.clone()).chain(
                walk(&self.reference.join(p))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| join(p, &e)),
            );
            for q in under {
                if let Ok(st) = stat(&self.reference, &q) {
                    if kind_of(st.st_mode) == Kind::File {
                        inodes.push(st.st_ino);
                    }
                }
            }
        }
        let before = entries
            .iter()
            .map(|p| (p.clone(), describe(&self.reference, p, Some(&[]))))
            .collect();
        InFlight {
            op: op.clone(),
            before,
            inodes,
        }
    }

    /// After a kill during the last operation (the one in `in_flight`) and a remount on
    /// `self.mount`: a list of what is wrong. Everything the operation cannot have touched must
    /// equal the reference (which applied it); what it touched must be all as before it or all
    /// as after it, for operations that are one request to the filesystem; for those that are
    /// several (create and write: open, write, close; rm -rf), any state of what they touch is
    /// allowed.
    pub fn check_interrupted(&self) -> Vec<String> {
        let Some(f) = &self.in_flight else {
            return compare_trees(&self.mount, &self.reference)
                .err()
                .into_iter()
                .collect();
        };
        let mut problems = Vec::new();
        let mut entry_only: Vec<String> = f.before.iter().map(|(p, _)| p.clone()).collect();
        let subtrees: Vec<String> = f.op.namespace();
        // Other names of the files involved (their link count or content may differ).
        let mut inodes = f.inodes.clone();
        for (p, _) in &f.before {
            if let Ok(st) = stat(&self.reference, p) {
                if kind_of(st.st_mode) == Kind::File {
                    inodes.push(st.st_ino);
                }
            }
        }
        let walked_ref = walk(&self.reference).unwrap_or_default();
        for p in &walked_ref {
            if let Ok(st) = lstat(&self.reference, p) {
                if inodes.contains(&st.st_ino) {
                    entry_only.push(p.clone());
                }
            }
        }
        let within = |p: &str, root: &str| {
            p == root
                || (p.len() > root.len() && p.starts_with(root) && p.as_bytes()[root.len()] == b'/')
        };
        let skipped =
            |p: &str| entry_only.iter().any(|e| e == p) || subtrees.iter().any(|r| within(p, r));
        let walked_mount = match walk(&self.mount) {
            Ok(w) => w,
            Err(e) => return vec![format!("walking the mount: {e}")],
        };
        let all: std::collections::BTreeSet<&String> =
            walked_ref.iter().chain(walked_mount.iter()).collect();
        for p in std::iter::once(&String::new()).chain(all) {
            if skipped(p) || problems.len() >= 20 {
                continue;
            }
            if let Some(problem) = compare_entry(&self.mount, &self.reference, p, None) {
                problems.push(format!("untouched by the interrupted op: {problem}"));
            }
        }
        let one_request = !matches!(
            f.op,
            Op::Create { .. } | Op::Write { .. } | Op::RemoveTree { .. } | Op::FdWrite { .. }
        );
        if one_request {
            let now: Vec<_> = f
                .before
                .iter()
                .map(|(p, _)| describe(&self.mount, p, Some(&[])))
                .collect();
            let before: Vec<_> = f.before.iter().map(|(_, e)| e.clone()).collect();
            let after: Vec<_> = f
                .before
                .iter()
                .map(|(p, _)| describe(&self.reference, p, Some(&[])))
                .collect();
            if now != before && now != after {
                let mut report = String::from("half-applied:");
                for (i, (p, _)) in f.before.iter().enumerate() {
                    report.push_str(&format!(
                        "\n    `{p}`: now {:?}\n      before {:?}\n      after  {:?}",
                        now[i], before[i], after[i]
                    ));
                }
                problems.push(report);
            }
        }
        problems
    }

    /// Marks the last traced operation as finished (a watchdog treats one ending in " ..." as
    /// in flight).
    fn finish(&self) {
        let mut trace = self.trace.lock().unwrap();
        if let Some(last) = trace.back_mut() {
            if let Some(done) = last.strip_suffix(" ...") {
                *last = done.to_string();
            }
        }
    }

    /// Whether a proper ancestor of `rel` is a symlink in the reference.
    fn symlink_ancestor(&self, rel: &str) -> bool {
        let mut p = parent(rel);
        while !p.is_empty() {
            if self.known.get(p) == Some(&Kind::Symlink) {
                return true;
            }
            p = parent(p);
        }
        false
    }

    // ---- generation (from the reference only) ----

    fn pick_known(&mut self, kind: Option<Kind>) -> Option<String> {
        let candidates: Vec<&String> = self
            .known
            .iter()
            .filter(|(_, k)| kind.is_none_or(|want| **k == want))
            .map(|(p, _)| p)
            .collect();
        if candidates.is_empty() {
            None
        } else {
            Some(candidates[self.rng.usize(..candidates.len())].clone())
        }
    }

    /// A new name: usually in an existing directory, sometimes under a file or a missing
    /// directory (ENOTDIR, ENOENT).
    fn fresh(&mut self) -> String {
        let name = NAMES[self.rng.usize(..NAMES.len())];
        let dir = match self.rng.u32(0..100) {
            0..15 => String::new(),
            15..95 => self.pick_known(Some(Kind::Dir)).unwrap_or_default(),
            95..98 => self.pick_known(Some(Kind::File)).unwrap_or_default(),
            _ => "missing".to_string(),
        };
        join(&dir, name)
    }

    /// Any path: mostly an existing entry (of `kind` if given), else a deleted or new name.
    fn pick(&mut self, kind: Option<Kind>) -> String {
        let r = self.rng.u32(0..100);
        if r < 80 {
            if let Some(p) = self.pick_known(if r < 65 { kind } else { None }) {
                return p;
            }
        }
        if r < 88 && !self.gone.is_empty() {
            return self.gone[self.rng.usize(..self.gone.len())].clone();
        }
        self.fresh()
    }

    /// A path for a new entry: mostly fresh, sometimes existing (EEXIST).
    fn pick_new(&mut self) -> String {
        match self.rng.u32(0..100) {
            0..70 => self.fresh(),
            70..82 if !self.gone.is_empty() => self.gone[self.rng.usize(..self.gone.len())].clone(),
            _ => self.pick(None),
        }
    }

    /// Mostly an entry that has user.* xattrs in the reference (they are rare otherwise).
    fn pick_xattr_holder(&mut self) -> String {
        if self.rng.u32(0..100) < 70 {
            for _ in 0..8 {
                if let Some(p) = self.pick_known(None) {
                    if list_xattrs(&self.reference, &p).is_ok_and(|n| !n.is_empty()) {
                        return p;
                    }
                }
            }
        }
        self.pick(None)
    }

    /// O_NONBLOCK when `path` leads to a FIFO in the reference (so no open blocks). Nothing is
    /// ever written into a FIFO: a write into the pipe updates the FIFO's mtime on a local
    /// filesystem, which FUSE leaves to the kernel's inode (the daemon never hears of it), so
    /// the two would differ for a reason that is not the mount's.
    fn open_flags(&self, path: &str) -> i32 {
        match stat(&self.reference, path) {
            Ok(st) if kind_of(st.st_mode) == Kind::Fifo => libc::O_NONBLOCK,
            _ => 0,
        }
    }

    fn size_of(&self, path: &str) -> u64 {
        stat(&self.reference, path).map_or(0, |st| st.st_size as u64)
    }

    fn data(&mut self) -> Data {
        let len = match self.rng.u32(0..100) {
            0..55 => self.rng.usize(1..=512),
            55..92 => self.rng.usize(513..=65_536),
            _ => self.rng.usize(65_537..=(5 * MIB as usize / 4)),
        };
        Data {
            seed: self.rng.u64(..),
            len: if self.shrink { len.min(4096) } else { len },
        }
    }

    /// An offset for a write of a file of `size` bytes: inside, at or past the end, or near a
    /// 1 MiB block boundary.
    fn offset(&mut self, size: u64) -> u64 {
        let near_block = |rng: &mut fastrand::Rng| {
            let block = rng.u64(0..=size / MIB + 1) * MIB;
            (block + rng.u64(0..64)).saturating_sub(rng.u64(0..64))
        };
        let offset = match self.rng.u32(0..100) {
            _ if self.shrink => self.rng.u64(0..=size),
            0..30 => self.rng.u64(0..=size),
            30..50 => size,
            50..65 => size + self.rng.u64(1..=3 * MIB / 2),
            65..85 => near_block(&mut self.rng),
            _ => 0,
        };
        offset.min(MAX_FILE)
    }

    fn new_size(&mut self, size: u64) -> u64 {
        let s = match self.rng.u32(0..100) {
            _ if self.shrink => self.rng.u64(0..=size / 2),
            0..25 => self.rng.u64(0..=size),
            25..35 => 0,
            35..65 => size + self.rng.u64(1..=2 * MIB),
            _ => {
                let block = self.rng.u64(0..=size / MIB + 2) * MIB;
                (block + self.rng.u64(0..16)).saturating_sub(self.rng.u64(0..16))
            }
        }
        .min(MAX_FILE);
        // Truncating to the same size changes no mtime on ext4 or tmpfs; keep clear of that
        // corner.
        if s == size {
            s + 1
        } else {
            s
        }
    }

    fn mode(&mut self, choices: &[u32]) -> u32 {
        choices[self.rng.usize(..choices.len())]
    }

    fn time(&mut self) -> (i64, i64) {
        match self.rng.u32(0..100) {
            0..8 => (0, libc::UTIME_OMIT),
            8..14 => (0, libc::UTIME_NOW),
            _ => (
                self.rng.i64(978_307_200..1_230_768_000),
                self.rng.i64(0..1_000_000_000),
            ),
        }
    }

    /// The next random operation.
    pub fn generate(&mut self) -> Op {
        let crowded = self.known.len() > MAX_ENTRIES;
        let mut r = self.rng.u32(0..112);
        if r >= 102 && self.ref_fds.iter().all(Option::is_none) {
            r = 100;
        }
        if crowded && matches!(r, 16..22 | 40..45 | 56..59 | 61..65 | 84..86) {
            // Too many entries: remove instead of creating.
            r = if self.rng.bool() { 35 } else { 90 };
        }
        match r {
            0..16 | 91..100 => {
                let path = self.pick(Some(Kind::File));
                let size = self.size_of(&path);
                let mut flags = self.open_flags(&path);
                let offset = if self.rng.u32(0..100) < 25 {
                    flags |= libc::O_APPEND;
                    0
                } else {
                    self.offset(size)
                };
                if self.rng.u32(0..100) < 3 {
                    flags |= libc::O_TRUNC;
                }
                let data = self.data();
                if flags & libc::O_APPEND != 0 && size + data.len as u64 > MAX_FILE {
                    flags &= !libc::O_APPEND;
                }
                if flags & libc::O_NONBLOCK != 0 {
                    // A FIFO: pwrite (ESPIPE), never data into the pipe (see `open_flags`).
                    flags &= !libc::O_APPEND;
                }
                let offset = offset.min(MAX_FILE.saturating_sub(data.len as u64));
                Op::Write {
                    path,
                    flags,
                    offset,
                    data,
                }
            }
            16..22 => {
                let path = self.pick_new();
                let choices = [
                    0,
                    libc::O_EXCL,
                    libc::O_TRUNC,
                    libc::O_APPEND,
                    libc::O_EXCL | libc::O_APPEND,
                    libc::O_TRUNC | libc::O_APPEND,
                ];
                let flags = choices[self.rng.usize(..choices.len())] | self.open_flags(&path);
                let mode = self.mode(&[0o644, 0o600, 0o755, 0o640, 0o444]);
                let mut data = self.data();
                if self.rng.u32(0..100) < 30 {
                    data.len = 0;
                }
                if flags & libc::O_APPEND != 0 {
                    let room = MAX_FILE.saturating_sub(self.size_of(&path));
                    data.len = data.len.min(room as usize);
                }
                if flags & libc::O_NONBLOCK != 0 {
                    data.len = 0;
                }
                Op::Create {
                    path,
                    flags,
                    mode,
                    data,
                }
            }
            22..28 => {
                let path = self.pick(Some(Kind::File));
                let size = self.size_of(&path);
                let offset = self.offset(size);
                let len = self.rng.usize(1..=(256 << 10));
                Op::Read {
                    flags: self.open_flags(&path),
                    path,
                    offset,
                    len,
                }
            }
            28..33 => {
                let path = self.pick(Some(Kind::File));
                let size = self.new_size(self.size_of(&path));
                Op::Truncate {
                    flags: self.open_flags(&path),
                    by_fd: self.rng.bool(),
                    path,
                    size,
                }
            }
            33..35 => {
                let path = self.pick(Some(Kind::File));
                let size = self.size_of(&path);
                let offset = if self.shrink {
                    0
                } else {
                    self.rng.u64(0..=size + MIB).min(MAX_FILE)
                };
                // Always past the end (unless shrinking): ext4 and tmpfs differ on whether an
                // fallocate inside the file changes its mtime.
                let len = if self.shrink {
                    size.max(1)
                } else {
                    (size + 1).saturating_sub(offset).max(1) + self.rng.u64(0..=2 * MIB)
                };
                Op::Fallocate {
                    flags: self.open_flags(&path),
                    path,
                    offset,
                    len: len.min(MAX_FILE + 2 * MIB - offset),
                }
            }
            35..40 => Op::Unlink {
                path: self.pick(Some(Kind::File)),
            },
            40..45 => Op::Mkdir {
                path: self.pick_new(),
                mode: self.mode(&[0o755, 0o700, 0o775]),
            },
            45..48 => Op::Rmdir {
                path: self.pick(Some(Kind::Dir)),
            },
            48..56 => {
                let kind = self.rng.bool().then_some(Kind::Dir);
                let from = self.pick(kind);
                let to = if self.rng.u32(0..100) < 40 {
                    self.pick(None)
                } else {
                    self.pick_new()
                };
                let flags = match self.rng.u32(0..100) {
                    0..70 => 0,
                    70..85 => libc::RENAME_NOREPLACE,
                    _ => libc::RENAME_EXCHANGE,
                };
                Op::Rename { from, to, flags }
            }
            56..59 => {
                let path = self.pick_new();
                let target = match self.rng.u32(0..100) {
                    0..60 => {
                        // A sibling: an existing one or a pool name.
                        let dir = parent(&path).to_string();
                        let siblings: Vec<String> = self
                            .known
                            .keys()
                            .filter(|k| parent(k) == dir)
                            .map(|k| k[k.rfind('/').map_or(0, |i| i + 1)..].to_string())
                            .collect();
                        if siblings.is_empty() || self.rng.u32(0..4) == 0 {
                            NAMES[self.rng.usize(..NAMES.len())].to_string()
                        } else {
                            siblings[self.rng.usize(..siblings.len())].clone()
                        }
                    }
                    60..80 => "nowhere/at/all".to_string(),
                    _ => path[path.rfind('/').map_or(0, |i| i + 1)..].to_string(),
                };
                Op::Symlink { target, path }
            }
            59..61 => Op::Readlink {
                path: self.pick(Some(Kind::Symlink)),
            },
            61..65 => {
                let from = self.pick(Some(Kind::File));
                Op::Link {
                    from,
                    to: self.pick_new(),
                }
            }
            65..68 => {
                let path = self.pick(None);
                let mode = self.rng.u32(0..0o1000);
                Op::Chmod { path, mode }
            }
            68..71 => {
                let path = self.pick(None);
                Op::Utimens {
                    path,
                    atime: self.time(),
                    mtime: self.time(),
                }
            }
            71..75 => {
                let kind = if self.rng.u32(0..4) == 0 {
                    Kind::Dir
                } else {
                    Kind::File
                };
                let path = self.pick(Some(kind));
                Op::Fsync {
                    flags: self.open_flags(&path),
                    data_only: self.rng.bool(),
                    path,
                }
            }
            75..76 => Op::Statfs {
                path: self.pick(None),
            },
            76..79 => {
                let path = self.pick(None);
                let name = XATTRS[self.rng.usize(..XATTRS.len())].to_string();
                let flags = match self.rng.u32(0..10) {
                    0..6 => 0,
                    6..8 => libc::XATTR_CREATE,
                    _ => libc::XATTR_REPLACE,
                };
                let value = Data {
                    seed: self.rng.u64(..),
                    len: self.rng.usize(0..=64),
                };
                Op::SetXattr {
                    path,
                    name,
                    value,
                    flags,
                }
            }
            79..81 => {
                let path = self.pick_xattr_holder();
                let name = XATTRS[self.rng.usize(..XATTRS.len())].to_string();
                Op::GetXattr { path, name }
            }
            81..82 => Op::ListXattr {
                path: self.pick_xattr_holder(),
            },
            82..84 => {
                let path = self.pick_xattr_holder();
                let name = XATTRS[self.rng.usize(..XATTRS.len())].to_string();
                Op::RemoveXattr { path, name }
            }
            84..86 => Op::Mkfifo {
                path: self.pick_new(),
                mode: self.mode(&[0o644, 0o600]),
            },
            86..90 => Op::ListDir {
                path: self.pick(Some(Kind::Dir)),
            },
            90 => {
                // rm -rf: mostly of small directories, so the base tree lasts.
                let path = self.pick(Some(Kind::Dir));
                if self.subtree(&path).len() > 12 && !crowded && self.rng.u32(0..4) != 0 {
                    Op::ListDir { path }
                } else {
                    Op::RemoveTree { path }
                }
            }
            100..102 => {
                let slot = self.rng.usize(..SLOTS);
                let choices = [
                    libc::O_RDONLY,
                    libc::O_RDWR,
                    libc::O_WRONLY,
                    libc::O_RDWR | libc::O_APPEND,
                    libc::O_WRONLY | libc::O_TRUNC,
                    libc::O_RDWR | libc::O_CREAT,
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                ];
                let flags = choices[self.rng.usize(..choices.len())];
                let path = if flags & libc::O_CREAT != 0 && !crowded {
                    self.pick_new()
                } else {
                    self.pick(Some(Kind::File))
                };
                Op::FdOpen {
                    slot,
                    flags: flags | self.open_flags(&path),
                    path,
                    mode: 0o644,
                }
            }
            _ => {
                // On a kept descriptor.
                let open: Vec<usize> = (0..SLOTS).filter(|&s| self.ref_fds[s].is_some()).collect();
                let slot = open[self.rng.usize(..open.len())];
                let fd = self.ref_fds[slot].as_ref().unwrap();
                let size = fstat(fd).map_or(0, |st| st.st_size as u64);
                // SAFETY: F_GETFL on a descriptor we own.
                let append = unsafe { libc::fcntl(fd.0, libc::F_GETFL) } & libc::O_APPEND != 0;
                let fifo = fstat(fd).is_ok_and(|st| kind_of(st.st_mode) == Kind::Fifo);
                match r {
                    102..105 if fifo && append => Op::FdStat { slot },
                    102..105 => {
                        let mut data = self.data();
                        let offset = if append {
                            data.len = data.len.min(MAX_FILE.saturating_sub(size).max(1) as usize);
                            size
                        } else {
                            self.offset(size)
                                .min(MAX_FILE.saturating_sub(data.len as u64))
                        };
                        Op::FdWrite { slot, offset, data }
                    }
                    105..107 => Op::FdRead {
                        slot,
                        offset: self.offset(size),
                        len: self.rng.usize(1..=(256 << 10)),
                    },
                    107 => Op::FdTruncate {
                        slot,
                        size: self.new_size(size),
                    },
                    108 => {
                        if self.rng.bool() {
                            Op::FdSync { slot }
                        } else {
                            Op::FdStat { slot }
                        }
                    }
                    _ => Op::FdClose { slot },
                }
            }
        }
    }

    /// A summary of the operations run: name: ok/failed.
    pub fn summary(&self) -> String {
        self.stats
            .iter()
            .map(|(n, (ok, err))| format!("{n} {ok}/{err}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Recent operations of a model, shared with a watchdog.
pub type Trace = Arc<Mutex<VecDeque<String>>>;

/// Runs `f` on its own thread and waits for it, failing with `what` and the recent operations
/// of the models whose `traces` these are if one operation stays in flight longer than `stall`
/// (an operation hung in the filesystem under test would otherwise hang the suite).
pub fn with_watchdog<T: Send + 'static>(
    stall: Duration,
    what: &str,
    traces: Vec<Trace>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let mut seen: Vec<(String, Instant)> = traces
        .iter()
        .map(|_| (String::new(), Instant::now()))
        .collect();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(v) => return v,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{what}: the thread running it panicked")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        for (trace, (last, since)) in traces.iter().zip(seen.iter_mut()) {
            let trace = trace.lock().unwrap();
            let now = trace.back().cloned().unwrap_or_default();
            if now != *last {
                *last = now;
                *since = Instant::now();
            } else if last.ends_with(" ...") && since.elapsed() > stall {
                panic!(
                    "{what}: an operation has been in flight for {:?} (hung); last ops:\n  {}",
                    since.elapsed(),
                    trace.iter().cloned().collect::<Vec<_>>().join("\n  ")
                );
            }
        }
    }
}
