//! The copy-on-write overlay of a `--writable` mount: what the job changed, on disk in
//! `CACHE_DIR/Overlay/{manifest-id}/`, over the immutable base [`Namespace`].
//!
//! - [`delta`]: the state (entries, inodes, upper content) and the records that change it;
//! - [`journal`]: the append-only journal and checkpoint that make it survive a crash.
//!
//! Layout of the overlay directory:
//! ```text
//! lock            flock held by the mounting process, holding its pid
//! journal         one line per namespace change (see `journal`)
//! checkpoint      the whole state at a journal sequence number
//! files/{ino:016x} upper bytes of inode ino (sparse; its length is the file's length)
//! ```
//!
//! Who changes what: namespace changes (create, link, remove, rename, attributes, xattrs,
//! truncate) are made under one write lock by the dispatcher, each journaled as one record
//! before it is answered. File bytes are written by the inode's owner shard (or by the kernel,
//! through passthrough to the upper file); the shard journals only which base blocks it copied
//! up, after their bytes are in the upper file.

pub mod delta;
pub mod journal;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

pub use delta::{AttrChange, DirEntry, Owner, Time, Upper};

use self::delta::{Delta, Inode, Record};
use self::journal::Journal;
use crate::fs::FsError;
use crate::namespace::{Ino, Namespace, NodeKind, ROOT_INO};

/// `renameat2` flags.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// Why the overlay cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay {} is in use by another writable mount (pid {pid}); unmount that one first", .dir.display())]
    Locked { dir: PathBuf, pid: String },
    #[error("overlay {}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An inode's attributes as the overlay reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub ino: Ino,
    pub kind: NodeKind,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// The overlay changed (or made) this inode; false: the manifest's, untouched.
    pub changed: bool,
}

/// Filesystem totals of the cache directory's filesystem, which holds the upper layer.
#[derive(Clone, Copy, Debug)]
pub struct SpaceTotals {
    pub block_size: u32,
    pub blocks: u64,
    pub free: u64,
    pub available: u64,
    pub files: u64,
    pub files_free: u64,
}

/// A node to create.
pub struct NewNode<'a> {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<&'a [u8]>,
}

/// The overlay of one writable mount. See the module docs.
pub struct Overlay {
    base: Arc<Namespace>,
    owner: Owner,
    dir: PathBuf,
    files: PathBuf,
    block_size: u64,
    state: RwLock<Delta>,
    journal: Mutex<Journal>,
    /// Open upper files by inode, shared by the shards and the dispatcher (positional I/O).
    uppers: Mutex<HashMap<Ino, Arc<File>>>,
    /// Open handles per inode: an unlinked file keeps its upper file until the last close.
    open_handles: Mutex<HashMap<Ino, u32>>,
    /// An upper file was created since `files/` was last synced.
    files_unsynced: std::sync::atomic::AtomicBool,
    /// Holds the flock for the life of the mount (`None`: a read-only view for an export).
    _lock: Option<File>,
}

/// The overlay directory of `manifest_bytes` in `cache_dir`: named by the xxh128 of the
/// manifest's bytes, the hash a diff manifest names as its parent.
pub fn overlay_dir(cache_dir: &Path, manifest_bytes: &[u8]) -> PathBuf {
    let id = crate::manifest::Hash::of(manifest_bytes);
    cache_dir.join("Overlay").join(id.to_string())
}

fn lock(dir: &Path) -> Result<File, OverlayError> {
    let io = |source| OverlayError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(dir.join("lock"))
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(OverlayError::Locked {
            dir: dir.to_path_buf(),
            pid: pid.trim().to_string(),
        });
    }
    file.set_len(0).map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// Names are at most 255 bytes, as on every Linux filesystem.
pub fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

fn upper_name(ino: Ino) -> String {
    format!("{ino:016x}")
}

impl Overlay {
    /// Opens (or starts) the overlay in `dir`: takes its lock, replays its journal, deletes
    /// upper files nothing refers to, and checkpoints what it replayed.
    pub fn open(
        dir: &Path,
        base: Arc<Namespace>,
        owner: Owner,
        block_size: u64,
    ) -> Result<Overlay, OverlayError> {
        let io = |source| OverlayError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(io)?;
        let lock = lock(dir)?;
        let replayed = Journal::open(dir, &base, owner, true).map_err(io)?;
        let mut delta = replayed.delta;
        let mut journal = replayed.journal;
        if delta.block_size == 0 {
            delta.block_size = block_size;
        }
        delta.collect_unlinked(&base);
        // Upper files: clamp base_len to the file (a crash after a shrinking ftruncate and
        // before its record), delete files no inode refers to (created, then a crash before
        // the record; or unlinked while open).
        for entry in std::fs::read_dir(&files).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let ino = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok());
            match ino.and_then(|ino| delta.inodes.get_mut(&ino)?.upper.as_mut()) {
                Some(upper) => {
                    let len = entry.metadata().map_err(io)?.len();
                    upper.base_len = upper.base_len.min(len);
                }
                None => std::fs::remove_file(entry.path()).map_err(io)?,
            }
        }
        if replayed.records > 0 || replayed.cut > 0 {
            tracing::info!(
                "overlay {}: replayed {} journal records",
                dir.display(),
                replayed.records
            );
        }
        // Only saves the next mount a replay: a full disk must not keep the job from mounting
        // (and deleting what filled it).
        if let Err(e) = journal.checkpoint(&delta) {
            tracing::warn!(
                "overlay {}: cannot write a checkpoint ({e}); continuing with the journal",
                dir.display()
            );
            let _ = std::fs::remove_file(dir.join("checkpoint.tmp"));
        }
        Ok(Overlay::with(base, owner, dir, delta, journal, Some(lock)))
    }

    /// A read-only view of the overlay in `dir` as its journal says now, beside a live mount
    /// or after one: no lock taken, nothing on disk changed. Changes through it fail.
    pub fn view(dir: &Path, base: Arc<Namespace>, owner: Owner) -> Result<Overlay, OverlayError> {
        let io = |source| OverlayError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        if !dir.join("files").is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no overlay here: nothing was mounted --writable with this manifest and \
                 --cache-dir",
            )));
        }
        let replayed = Journal::open(dir, &base, owner, false).map_err(io)?;
        let mut delta = replayed.delta;
        delta.collect_unlinked(&base);
        Ok(Overlay::with(
            base,
            owner,
            dir,
            delta,
            replayed.journal,
            None,
        ))
    }

    fn with(
        base: Arc<Namespace>,
        owner: Owner,
        dir: &Path,
        delta: Delta,
        journal: Journal,
        lock: Option<File>,
    ) -> Overlay {
        Overlay {
            base,
            owner,
            dir: dir.to_path_buf(),
            files: dir.join("files"),
            block_size: delta.block_size,
            state: RwLock::new(delta),
            journal: Mutex::new(journal),
            uppers: Mutex::new(HashMap::new()),
            open_handles: Mutex::new(HashMap::new()),
            files_unsynced: false.into(),
            _lock: lock,
        }
    }

    /// Where the upper bytes of `ino` are.
    pub fn upper_path(&self, ino: Ino) -> PathBuf {
        self.files.join(upper_name(ino))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Delta> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Delta> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Journals `record`, then applies it: the operation happened, or (error) did not.
    fn commit(&self, delta: &mut Delta, record: Record) -> Result<(), FsError> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal
            .append(&record)
            .map_err(|e| FsError::overlay("journal append", &e))?;
        delta.apply(&self.base, self.owner, &record);
        Ok(())
    }

    // ----- namespace queries -----

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Ino, FsError> {
        check_name(name)?;
        let delta = self.read();
        match delta.kind(&self.base, parent) {
            Some(NodeKind::Dir) => delta
                .lookup(&self.base, parent, name)
                .ok_or(FsError::NotFound),
            Some(_) => Err(FsError::NotDirectory),
            None => Err(FsError::NotFound),
        }
    }

    pub fn node(&self, ino: Ino) -> Result<Node, FsError> {
        let (inode, changed) = {
            let delta = self.read();
            let inode = delta
                .inode(&self.base, self.owner, ino)
                .ok_or(FsError::NotFound)?;
            (inode, delta.inodes.contains_key(&ino))
        };
        self.describe(ino, &inode, changed)
    }

    /// The inode's attributes; `inode` is its current state, `changed` whether the delta
    /// holds it (both read under one lock by the caller).
    fn describe(&self, ino: Ino, inode: &Inode, changed: bool) -> Result<Node, FsError> {
        let mut node = Node {
            ino,
            kind: inode.kind,
            size: 0,
            blocks: 0,
            perm: inode.mode as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            changed,
        };
        match inode.kind {
            NodeKind::File if inode.upper.is_some() => {
                // The upper file's length and times are the file's (passthrough writes change
                // them without telling us).
                let meta = std::fs::metadata(self.files.join(upper_name(ino)))
                    .map_err(|e| FsError::overlay("stat upper file", &e))?;
                node.size = meta.len();
                node.blocks = meta.blocks();
                node.atime = Time {
                    secs: meta.atime(),
                    nanos: meta.atime_nsec() as u32,
                };
                node.mtime = Time {
                    secs: meta.mtime(),
                    nanos: meta.mtime_nsec() as u32,
                };
                node.ctime = node.ctime.max_by_secs(Time {
                    secs: meta.ctime(),
                    nanos: meta.ctime_nsec() as u32,
                });
            }
            NodeKind::File => {
                node.size = self.base.file_content(ino).map_or(0, |c| c.size);
                node.blocks = node.size.div_ceil(512);
            }
            NodeKind::Symlink => node.size = inode.target.as_ref().map_or(0, |t| t.len() as u64),
            NodeKind::Dir => node.size = 4096,
            NodeKind::Fifo => {}
        }
        Ok(node)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let inode = self
            .read()
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        inode.target.ok_or(FsError::NotSymbolicLink)
    }

    /// Directory `dir`'s parent and entries (without `.` and `..`), in name order.
    pub fn children(&self, dir: Ino) -> Result<(Ino, Vec<DirEntry>), FsError> {
        let delta = self.read();
        let inode = delta
            .inode(&self.base, self.owner, dir)
            .ok_or(FsError::NotFound)?;
        if inode.kind != NodeKind::Dir {
            return Err(FsError::NotDirectory);
        }
        Ok((inode.parent, delta.children(&self.base, dir)))
    }

    pub fn kind(&self, ino: Ino) -> Option<NodeKind> {
        self.read().kind(&self.base, ino)
    }

    // ----- namespace changes -----

    fn dir_for_change(&self, delta: &Delta, parent: Ino, name: &[u8]) -> Result<(), FsError> {
        match delta.kind(&self.base, parent) {
            Some(NodeKind::Dir) => {}
            Some(_) => return Err(FsError::NotDirectory),
            None => return Err(FsError::NotFound),
        }
        if delta
            .inode(&self.base, self.owner, parent)
            .is_none_or(|p| p.nlink == 0)
        {
            // A removed directory (still open somewhere) takes no new entries.
            return Err(FsError::NotFound);
        }
        check_name(name)
    }

    /// Creates a file, directory, symlink or FIFO `parent/name`.
    pub fn create(&self, parent: Ino, name: &[u8], new: NewNode<'_>) -> Result<Node, FsError> {
        let mut delta = self.write();
        self.dir_for_change(&delta, parent, name)?;
        if delta.lookup(&self.base, parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let ino = delta.next_ino;
        if new.kind == NodeKind::File {
            // The upper file exists before the record that names it.
            self.create_upper_file(ino, 0)?;
        }
        let record = Record::Create {
            parent,
            name: name.to_vec(),
            ino,
            kind: new.kind,
            mode: new.mode & 0o7777,
            uid: new.uid,
            gid: new.gid,
            target: new.target.map(<[u8]>::to_vec),
            time: Time::now(),
        };
        if let Err(e) = self.commit(&mut delta, record) {
            let _ = std::fs::remove_file(self.files.join(upper_name(ino)));
            return Err(e);
        }
        let inode = delta.inodes[&ino].clone();
        drop(delta);
        self.describe(ino, &inode, true)
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Node, FsError> {
        let mut delta = self.write();
        self.dir_for_change(&delta, parent, name)?;
        match delta.inode(&self.base, self.owner, ino) {
            None => return Err(FsError::NotFound),
            Some(i) if i.kind == NodeKind::Dir => return Err(FsError::NotPermitted),
            Some(i) if i.nlink == 0 => return Err(FsError::NotFound),
            Some(_) => {}
        }
        if delta.lookup(&self.base, parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let record = Record::Link {
            ino,
            parent,
            name: name.to_vec(),
            time: Time::now(),
        };
        self.commit(&mut delta, record)?;
        let inode = delta.inodes[&ino].clone();
        drop(delta);
        self.describe(ino, &inode, true)
    }

    /// `unlink` (`dir` false) or `rmdir` (`dir` true) of `parent/name`.
    pub fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> Result<(), FsError> {
        let mut delta = self.write();
        self.dir_for_change(&delta, parent, name)?;
        let ino = delta
            .lookup(&self.base, parent, name)
            .ok_or(FsError::NotFound)?;
        let kind = delta.kind(&self.base, ino).ok_or(FsError::NotFound)?;
        match (dir, kind == NodeKind::Dir) {
            (true, false) => return Err(FsError::NotDirectory),
            (false, true) => return Err(FsError::IsDirectory),
            (true, true) if !delta.is_empty_dir(&self.base, ino) => return Err(FsError::NotEmpty),
            _ => {}
        }
        let record = Record::Remove {
            parent,
            name: name.to_vec(),
            time: Time::now(),
        };
        self.commit(&mut delta, record)?;
        self.reap(&mut delta, ino);
        Ok(())
    }

    pub fn rename(
        &self,
        (parent, name): (Ino, &[u8]),
        (new_parent, new_name): (Ino, &[u8]),
        flags: u32,
    ) -> Result<(), FsError> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(FsError::Invalid);
        }
        let exchange = flags & RENAME_EXCHANGE != 0;
        let mut delta = self.write();
        self.dir_for_change(&delta, parent, name)?;
        self.dir_for_change(&delta, new_parent, new_name)?;
        let ino = delta
            .lookup(&self.base, parent, name)
            .ok_or(FsError::NotFound)?;
        let target = delta.lookup(&self.base, new_parent, new_name);
        let is_dir = |ino| delta.kind(&self.base, ino) == Some(NodeKind::Dir);
        if target == Some(ino) {
            return Ok(());
        }
        let within = |moved: Ino, into: Ino| {
            is_dir(moved) && delta.is_within(&self.base, self.owner, into, moved)
        };
        if exchange {
            let other = target.ok_or(FsError::NotFound)?;
            if within(ino, new_parent) || within(other, parent) {
                return Err(FsError::Invalid);
            }
        } else {
            if within(ino, new_parent) {
                return Err(FsError::Invalid);
            }
            if let Some(old) = target {
                if flags & RENAME_NOREPLACE != 0 {
                    return Err(FsError::Exists);
                }
                match (is_dir(ino), is_dir(old)) {
                    (true, false) => return Err(FsError::NotDirectory),
                    (false, true) => return Err(FsError::IsDirectory),
                    (true, true) if !delta.is_empty_dir(&self.base, old) => {
                        return Err(FsError::NotEmpty)
                    }
                    _ => {}
                }
            }
        }
        let record = Record::Rename {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            exchange,
            time: Time::now(),
        };
        self.commit(&mut delta, record)?;
        if let (Some(old), false) = (target, exchange) {
            self.reap(&mut delta, old);
        }
        Ok(())
    }

    /// `chmod`, `chown`, `utimens` and `truncate`, in one request as the kernel sends them.
    pub fn set_attr(
        &self,
        ino: Ino,
        change: AttrChange,
        size: Option<u64>,
    ) -> Result<Node, FsError> {
        let mut delta = self.write();
        let inode = delta
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        if let Some(size) = size {
            match inode.kind {
                NodeKind::File => self.truncate(&mut delta, ino, &inode, size)?,
                NodeKind::Dir => return Err(FsError::IsDirectory),
                _ => return Err(FsError::Invalid),
            }
        }
        if change != AttrChange::default() {
            if inode.kind == NodeKind::File && inode.upper.is_some() {
                self.set_upper_times(ino, &change)?;
            }
            let record = Record::SetAttr {
                ino,
                change,
                time: Time::now(),
            };
            self.commit(&mut delta, record)?;
        }
        let inode = delta
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        let changed = delta.inodes.contains_key(&ino);
        drop(delta);
        self.describe(ino, &inode, changed)
    }

    /// A file with upper bytes shows the upper file's times: `utimens` sets them there.
    fn set_upper_times(&self, ino: Ino, change: &AttrChange) -> Result<(), FsError> {
        if change.atime.is_none() && change.mtime.is_none() {
            return Ok(());
        }
        let spec = |t: Option<Time>| match t {
            Some(t) => libc::timespec {
                tv_sec: t.secs,
                tv_nsec: t.nanos as i64,
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        };
        let times = [spec(change.atime), spec(change.mtime)];
        let file = self.upper_file(ino)?;
        // SAFETY: a valid descriptor and a two-element timespec array.
        if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
            return Err(FsError::overlay(
                "set upper file times",
                &std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn truncate(
        &self,
        delta: &mut Delta,
        ino: Ino,
        inode: &Inode,
        size: u64,
    ) -> Result<(), FsError> {
        match &inode.upper {
            None => {
                let base_size = self.base.file_content(ino).map_or(0, |c| c.size);
                self.create_upper_file(ino, size)?;
                let record = Record::Upper {
                    ino,
                    base_len: base_size.min(size),
                    time: Time::now(),
                };
                self.commit(delta, record)
            }
            Some(upper) => {
                // The file first, then the record: a crash between leaves a file shorter than
                // base_len, which the next open clamps.
                self.upper_file(ino)?
                    .set_len(size)
                    .map_err(|e| FsError::overlay("truncate upper file", &e))?;
                if size < upper.base_len {
                    let record = Record::Upper {
                        ino,
                        base_len: size,
                        time: Time::now(),
                    };
                    self.commit(delta, record)?;
                }
                Ok(())
            }
        }
    }

    pub fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>, FsError> {
        let inode = self
            .read()
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        inode
            .xattrs
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoAttribute)
    }

    /// The names, each followed by a NUL, as `listxattr` returns them.
    pub fn list_xattr(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let inode = self
            .read()
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        let mut list = Vec::new();
        for (name, _) in inode.xattrs {
            list.extend_from_slice(&name);
            list.push(0);
        }
        Ok(list)
    }

    /// `flags`: `XATTR_CREATE` (1) or `XATTR_REPLACE` (2).
    pub fn set_xattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), FsError> {
        if !name.starts_with(b"user.") {
            return Err(FsError::NotSupported);
        }
        let mut delta = self.write();
        let inode = delta
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        let exists = inode.xattrs.iter().any(|(n, _)| n == name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttribute);
        }
        let record = Record::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            time: Time::now(),
        };
        self.commit(&mut delta, record)
    }

    pub fn remove_xattr(&self, ino: Ino, name: &[u8]) -> Result<(), FsError> {
        let mut delta = self.write();
        let inode = delta
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        if !inode.xattrs.iter().any(|(n, _)| n == name) {
            return Err(FsError::NoAttribute);
        }
        let record = Record::RemoveXattr {
            ino,
            name: name.to_vec(),
            time: Time::now(),
        };
        self.commit(&mut delta, record)
    }

    // ----- durability -----

    /// `fsync`/`fdatasync` of file `ino`: its upper bytes, the upper file's directory entry,
    /// and every record so far (its name and attributes among them).
    pub fn sync_file(&self, ino: Ino) -> Result<(), FsError> {
        if self.has_upper(ino) {
            self.upper_file(ino)?
                .sync_data()
                .map_err(|e| FsError::overlay("sync upper file", &e))?;
        }
        self.sync_namespace()
    }

    /// `fsyncdir`, and the part of `fsync` about names: every record so far.
    pub fn sync_namespace(&self) -> Result<(), FsError> {
        use std::sync::atomic::Ordering;
        if self.files_unsynced.swap(false, Ordering::AcqRel) {
            if let Err(e) = File::open(&self.files).and_then(|d| d.sync_all()) {
                self.files_unsynced.store(true, Ordering::Release);
                return Err(FsError::overlay("sync upper directory", &e));
            }
        }
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync()
            .map_err(|e| FsError::overlay("sync journal", &e))
    }

    /// A clean unmount: everything durable, and a checkpoint so the next mount replays nothing.
    pub fn close(&self) -> std::io::Result<()> {
        // Every upper file written since the mount, open or not: one syncfs of their filesystem.
        let files = File::open(&self.files)?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(files.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        File::open(&self.files)?.sync_all()?;
        let delta = self.read();
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checkpoint(&delta)
    }

    pub fn space(&self) -> SpaceTotals {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        let path =
            std::ffi::CString::new(self.files.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: a NUL-terminated path and a statvfs buffer.
        let ok = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } == 0;
        // SAFETY: zeroed is a valid statvfs; filled in when ok.
        let st = unsafe { st.assume_init() };
        let files = self.read().inodes.len() as u64 + self.base.len() as u64;
        if !ok {
            return SpaceTotals {
                block_size: 4096,
                blocks: 0,
                free: 0,
                available: 0,
                files,
                files_free: 0,
            };
        }
        SpaceTotals {
            block_size: st.f_frsize as u32,
            blocks: st.f_blocks + self.base.total_size().div_ceil(st.f_frsize.max(1)),
            free: st.f_bfree,
            available: st.f_bavail,
            files: files + st.f_ffree,
            files_free: st.f_ffree,
        }
    }

    // ----- file bytes (used by the owner shard) -----

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The upper content of file `ino`, if it has any.
    pub fn upper(&self, ino: Ino) -> Option<Upper> {
        self.read().inodes.get(&ino)?.upper.clone()
    }

    fn has_upper(&self, ino: Ino) -> bool {
        self.read()
            .inodes
            .get(&ino)
            .is_some_and(|i| i.upper.is_some())
    }

    fn create_upper_file(&self, ino: Ino, len: u64) -> Result<(), FsError> {
        let path = self.files.join(upper_name(ino));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| FsError::overlay("create upper file", &e))?;
        if len > 0 {
            file.set_len(len)
                .map_err(|e| FsError::overlay("size upper file", &e))?;
        }
        self.files_unsynced
            .store(true, std::sync::atomic::Ordering::Release);
        // Replaces a descriptor of an orphan from before a crash, if one was open.
        let mut uppers = self.uppers.lock().unwrap_or_else(|e| e.into_inner());
        if uppers.contains_key(&ino) {
            uppers.insert(ino, Arc::new(file));
        }
        Ok(())
    }

    /// The upper file of `ino`, open for reading and writing. Kept open (and shared) while the
    /// inode has open handles, so a job that writes a million outputs holds descriptors only
    /// for the files it has open; otherwise opened for this use only.
    pub fn upper_file(&self, ino: Ino) -> Result<Arc<File>, FsError> {
        let mut uppers = self.uppers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = uppers.get(&ino) {
            return Ok(file.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.files.join(upper_name(ino)))
            .map_err(|e| FsError::overlay("open upper file", &e))?;
        let file = Arc::new(file);
        let handles = self.open_handles.lock().unwrap_or_else(|e| e.into_inner());
        if handles.contains_key(&ino) {
            uppers.insert(ino, file.clone());
        }
        Ok(file)
    }

    /// Gives base file `ino` an upper file holding nothing yet (its base bytes stay below
    /// `base_len`), for its first write. Returns its upper content either way.
    pub fn start_upper(&self, ino: Ino) -> Result<Upper, FsError> {
        let mut delta = self.write();
        let inode = delta
            .inode(&self.base, self.owner, ino)
            .ok_or(FsError::NotFound)?;
        if let Some(upper) = inode.upper {
            return Ok(upper);
        }
        if inode.kind != NodeKind::File {
            return Err(FsError::Invalid);
        }
        let size = self.base.file_content(ino).map_or(0, |c| c.size);
        self.create_upper_file(ino, size)?;
        let record = Record::Upper {
            ino,
            base_len: size,
            time: Time::now(),
        };
        self.commit(&mut delta, record)?;
        Ok(delta.inodes[&ino].upper.clone().unwrap_or_default())
    }

    /// Records that `blocks` of `ino` were copied into its upper file (their bytes are there).
    pub fn mark_present(&self, ino: Ino, blocks: Vec<u64>) -> Result<(), FsError> {
        let mut delta = self.write();
        self.commit(&mut delta, Record::Present { ino, blocks })
    }

    pub fn opened(&self, ino: Ino) {
        *self
            .open_handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_default() += 1;
    }

    pub fn released(&self, ino: Ino) {
        {
            let mut open = self.open_handles.lock().unwrap_or_else(|e| e.into_inner());
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return;
                }
                Some(_) => {
                    open.remove(&ino);
                }
                None => return,
            }
        }
        // The last close: the descriptor goes (its bytes stay in the page cache until synced).
        self.uppers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
        let mut delta = self.write();
        self.reap(&mut delta, ino);
    }

    /// Deletes the upper file of an inode no name refers to and no handle has open.
    fn reap(&self, delta: &mut Delta, ino: Ino) {
        let unlinked = delta
            .inodes
            .get(&ino)
            .is_some_and(|i| i.nlink == 0 && i.upper.is_some());
        let open = self
            .open_handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&ino);
        if !unlinked || open {
            return;
        }
        self.uppers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
        if let Err(e) = std::fs::remove_file(self.files.join(upper_name(ino))) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "overlay: cannot delete the upper file of unlinked inode {ino}: {e}"
                );
            }
        }
        if ino > self.base.len() as Ino {
            delta.inodes.remove(&ino);
        } else if let Some(inode) = delta.inodes.get_mut(&ino) {
            inode.upper = None;
        }
    }

    /// Everything an export needs: the merged tree from the root, as (path, inode, node).
    pub fn walk(&self) -> Vec<(PathBuf, Ino, Node)> {
        use std::os::unix::ffi::OsStrExt;
        let mut out = Vec::new();
        let mut stack = vec![(PathBuf::new(), ROOT_INO)];
        while let Some((path, dir)) = stack.pop() {
            let Ok((_, entries)) = self.children(dir) else {
                continue;
            };
            for entry in entries {
                let child = path.join(std::ffi::OsStr::from_bytes(&entry.name));
                if let Ok(node) = self.node(entry.ino) {
                    if node.kind == NodeKind::Dir {
                        stack.push((child.clone(), entry.ino));
                    }
                    out.push((child, entry.ino, node));
                }
            }
        }
        out
    }

    pub fn base(&self) -> &Namespace {
        &self.base
    }
}

impl Time {
    /// The later of two times.
    fn max_by_secs(self, other: Time) -> Time {
        if (other.secs, other.nanos) > (self.secs, self.nanos) {
            other
        } else {
            self
        }
    }
}
