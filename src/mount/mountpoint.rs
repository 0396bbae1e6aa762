//! The mountpoint's life around a mount: one mount_vfs per mountpoint at a time (a lock), the
//! checks before mounting (directory, empty, not mounted, stale mounts cleaned), and unmounting
//! without ever leaving a stale mount behind (busy mounts are detached, not left mounted).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::MountError;

/// Held for the whole life of a mount: a second `mount_vfs` on the same mountpoint is refused
/// with this process's pid instead of stacking a second FUSE mount on the first. An advisory
/// `flock` on a file named after the mountpoint's canonical path; the kernel releases it when
/// the process ends, however it ends.
#[derive(Debug)]
pub struct MountpointLock {
    _file: File,
}

/// How long a new mount waits for a previous one on the same mountpoint, already unmounted, to
/// finish exiting.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl MountpointLock {
    /// Takes the lock for `mountpoint` (an existing directory), or says who holds it.
    pub fn acquire(mountpoint: &Path) -> Result<MountpointLock, MountError> {
        let canonical = canonical_mountpoint(mountpoint);
        let dir = lock_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            MountError::Mountpoint(format!(
                "cannot create the lock directory {}: {e}",
                dir.display()
            ))
        })?;
        let key = xxhash_rust::xxh3::xxh3_64(canonical.as_os_str().as_bytes());
        let path = dir.join(format!("{key:016x}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                MountError::Mountpoint(format!("cannot open the lock file {}: {e}", path.display()))
            })?;
        // A holder whose mount is already gone is finishing its shutdown (saving the overlay):
        // a launcher that unmounts and mounts again at once (the Deadline worker replacing a
        // mount) waits for it, up to LOCK_WAIT. A holder with a live mount is refused at once.
        let try_lock = || {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        };
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut locked = try_lock();
        while !locked && std::time::Instant::now() < deadline && !is_mounted(mountpoint) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            locked = try_lock();
        }
        if !locked {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another mount_vfs".to_string()
            } else {
                format!("mount_vfs pid {holder}")
            };
            return Err(MountError::Mountpoint(format!(
                "{} is already being mounted or served by {who} (lock {}); stop that one first",
                mountpoint.display(),
                path.display()
            )));
        }
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()));
        if let Err(e) = written {
            tracing::debug!("cannot record our pid in {}: {e}", path.display());
        }
        Ok(MountpointLock { _file: file })
    }
}

/// The mountpoint's absolute path with its parent resolved: the mountpoint itself may be a stale
/// mount that cannot be resolved (ENOTCONN), and every mount of it must find the same lock.
fn canonical_mountpoint(mountpoint: &Path) -> PathBuf {
    let absolute = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.into());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// Where mountpoint locks live: `/run/mount_vfs` for root, else the user's runtime directory,
/// else a per-user directory under the temporary directory.
fn lock_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 && Path::new("/run").is_dir() {
        return PathBuf::from("/run/mount_vfs");
    }
    // `sudo -E -u JOB_USER` (the Deadline worker) passes the caller's XDG_RUNTIME_DIR through:
    // only a runtime directory of our own will do.
    let own = |dir: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == uid)
    };
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if own(Path::new(&dir)) => Path::new(&dir).join("mount_vfs"),
        _ => std::env::temp_dir().join(format!("mount_vfs-{uid}")),
    }
}

/// What mounting as a user other than root needs, checked before anything starts so that a
/// launcher polling for the mount gets one clear line at once: the setuid `fusermount3`, a
/// /dev/fuse the user may open, and for `allow_other`, `user_allow_other` in /etc/fuse.conf.
/// Root needs none of it.
pub fn check_unprivileged(allow_other: bool) -> Result<(), MountError> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return Ok(());
    }
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
    };
    if !on_path("fusermount3") && !on_path("fusermount") {
        return Err(MountError::Mountpoint(format!(
            "mounting as a non-root user (uid {uid}) goes through the setuid fusermount3, and \
             it is not on PATH: install fuse3 (as root: apt-get install fuse3 / dnf install fuse3)"
        )));
    }
    // fusermount3 opens /dev/fuse as the calling user.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(MountError::Mountpoint(format!(
            "uid {uid} cannot open /dev/fuse ({e}), and a non-root mount needs it: make it \
             world read-write as distributions ship it (as root: chmod 0666 /dev/fuse)"
        )));
    }
    if allow_other {
        let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
        if !conf.lines().any(|line| line.trim() == "user_allow_other") {
            return Err(MountError::Mountpoint(format!(
                "allow_other (other users, such as the Deadline worker agent, reading the mount) \
                 as a non-root user (uid {uid}) needs a line `user_allow_other` in \
                 /etc/fuse.conf; as root: echo user_allow_other >> /etc/fuse.conf"
            )));
        }
    }
    Ok(())
}

/// Whether this process may register FUSE passthrough backing files (CAP_SYS_ADMIN).
pub fn can_passthrough() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Checks `path` is an existing, empty directory with nothing mounted on it. A stale FUSE mount
/// (its server died: every access gives ENOTCONN) is detached first, with one log line.
/// `allow_non_empty` accepts a directory with entries (they are hidden while mounted).
pub fn check(path: &Path, allow_non_empty: bool) -> Result<(), MountError> {
    let is_disconnected = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    let already_mounted = || {
        MountError::Mountpoint(format!(
            "{} is already a mount point; unmount it first (`umount {}`)",
            path.display(),
            path.display()
        ))
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(MountError::Mountpoint(format!(
                "mountpoint {} is not a directory",
                path.display()
            )))
        }
        Err(e) if is_disconnected(&e) => clean_stale(path)?,
        Err(e) => {
            return Err(MountError::Mountpoint(format!(
                "mountpoint {}: {e}",
                path.display()
            )))
        }
    }
    if is_mounted(path) {
        // Attributes may still be cached by the kernel after a FUSE server died; opening the
        // directory always reaches the server, so it tells a live mount from a stale one.
        match std::fs::read_dir(path) {
            Err(e) if is_disconnected(&e) => clean_stale(path)?,
            _ => return Err(already_mounted()),
        }
    }
    if !allow_non_empty {
        let first = std::fs::read_dir(path)
            .map_err(|e| MountError::Mountpoint(format!("mountpoint {}: {e}", path.display())))?
            .next();
        if let Some(Ok(entry)) = first {
            // A mount that raced this one may have appeared since the check above: what the
            // directory shows now is that mount's, not the directory's own.
            if is_mounted(path) {
                return Err(already_mounted());
            }
            return Err(MountError::Mountpoint(format!(
                "mountpoint {} is not empty (it holds {:?}, which the mount would hide); use an \
                 empty directory, or pass --allow-non-empty",
                path.display(),
                entry.file_name()
            )));
        }
    }
    Ok(())
}

/// Detaches the stale mount on `path`, proven stale by ENOTCONN.
fn clean_stale(path: &Path) -> Result<(), MountError> {
    match unmount(path, true) {
        Ok(_) => {
            tracing::info!(
                "{} was a stale FUSE mount (its server died); detached it",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(MountError::Mountpoint(format!(
            "mountpoint {} is a stale FUSE mount left by a process that died, and it cannot be \
             detached ({e}); run `umount -l {}` and try again",
            path.display(),
            path.display()
        ))),
    }
}

/// Whether `path` is a mount point right now (per /proc/self/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .any(|mounted| Path::new(&unescape_mount_path(mounted)) == canonical)
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Nothing held the mount: it is gone.
    Clean,
    /// Files or working directories were still open in it: it was detached (the path is free
    /// at once) and lives on until the last of them is closed.
    Detached,
}

/// Unmounts `path`. A busy mount is detached (`umount -l`), never left in place; `lazy` skips
/// the plain attempt (a stale mount). Root uses umount2(2); other users go through
/// `fusermount3 -u` (or `fusermount`), the setuid helper that may unmount their FUSE mounts.
pub fn unmount(path: &Path, lazy: bool) -> std::io::Result<Unmounted> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("mountpoint path holds a NUL byte"))?;
    let umount2 = |flags: libc::c_int| {
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if !lazy {
        match umount2(0) {
            Ok(()) => return Ok(Unmounted::Clean),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                return fusermount_unmount(path);
            }
            Err(e) => return Err(e),
        }
    }
    match umount2(libc::MNT_DETACH) {
        Ok(()) => Ok(Unmounted::Detached),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            fusermount(path, true).map(|()| Unmounted::Detached)
        }
        Err(e) => Err(e),
    }
}

/// The unprivileged path: a plain unmount, then a detach if the mount is busy.
fn fusermount_unmount(path: &Path) -> std::io::Result<Unmounted> {
    match fusermount(path, false) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(_) => fusermount(path, true).map(|()| Unmounted::Detached),
    }
}

fn fusermount(path: &Path, lazy: bool) -> std::io::Result<()> {
    let mut last = std::io::Error::other("neither fusermount3 nor fusermount is installed");
    for helper in ["fusermount3", "fusermount"] {
        let mut command = Command::new(helper);
        command.arg("-u").arg("-q");
        if lazy {
            command.arg("-z");
        }
        let output = command
            .arg("--")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match output {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                return Err(std::io::Error::other(format!(
                    "{helper}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => last = e,
        }
    }
    Err(last)
}
