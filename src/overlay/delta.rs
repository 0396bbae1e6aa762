//! The overlay's state: what differs from the immutable base [`Namespace`], and the records
//! that change it. [`Delta::apply`] is the only way the state changes, live and at replay, so a
//! mount after a crash rebuilds exactly what the journal's records say.
//!
//! The base is never copied: a directory's entries are its base children overlaid by its
//! `dirs` delta (`name -> Present(ino) | Whiteout`), and an inode's attributes are its base
//! attributes unless `inodes` holds it (every inode created here, and every base inode whose
//! attributes, link count, parent or content changed). Renaming a base directory moves its
//! inode: its base children stay attached to it, so a whole tree moves with one record.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::namespace::{Ino, Namespace, NodeKind};

/// A file name (Linux bytes).
pub type Name = Vec<u8>;

/// Seconds and nanoseconds since the epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn now() -> Time {
        Time::from(std::time::SystemTime::now())
    }

    pub fn from_micros(us: i64) -> Time {
        Time {
            secs: us.div_euclid(1_000_000),
            nanos: (us.rem_euclid(1_000_000) * 1000) as u32,
        }
    }

    pub fn system_time(self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(self.secs.unsigned_abs()))
                .map_or(UNIX_EPOCH, |t| t + Duration::from_nanos(self.nanos as u64))
        }
    }
}

impl From<std::time::SystemTime> for Time {
    fn from(t: std::time::SystemTime) -> Time {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Time {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                Time::from_micros(-(d.as_micros() as i64))
            }
        }
    }
}

/// A directory entry of the delta.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Present(Ino),
    /// Hides the base entry of that name.
    Whiteout,
}

/// Bytes of a regular file that live in the upper layer (`files/{ino:016x}` in the overlay
/// directory). The upper file's length is the file's length.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Upper {
    /// Below this offset, bytes of blocks not in `present` come from the base object; at and
    /// above it everything is in the upper file (holes read as zeros). 0 for new and truncated
    /// files; only ever shrinks.
    pub base_len: u64,
    /// Blocks (of the mount's block size) below `base_len` already copied into the upper file.
    pub present: BTreeSet<u64>,
}

impl Upper {
    /// Whether byte `pos` comes from the base object.
    pub fn from_base(&self, pos: u64, block_size: u64) -> bool {
        pos < self.base_len && !self.present.contains(&(pos / block_size))
    }

    /// Whether nothing comes from the base any more.
    pub fn complete(&self, block_size: u64) -> bool {
        let base_blocks = self.base_len.div_ceil(block_size);
        self.present.range(..base_blocks).count() as u64 == base_blocks
    }
}

/// An inode whose attributes differ from the base, or that the base does not have.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub kind: NodeKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// The directory this directory is in (its `..`); files keep their first parent, for paths
    /// in log lines only.
    pub parent: Ino,
    pub mtime: Time,
    pub atime: Time,
    pub ctime: Time,
    /// Symlink target.
    pub target: Option<Name>,
    /// `user.*` extended attributes, in name order.
    pub xattrs: Vec<(Name, Vec<u8>)>,
    /// Regular files with bytes in the upper layer.
    pub upper: Option<Upper>,
}

/// Attributes that a `SetAttr` record changes (`None`: unchanged).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
}

/// One change of the overlay: one operation, applied whole or not at all.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A new inode `ino` named `name` in `parent` (a regular file's upper file exists already).
    Create {
        parent: Ino,
        name: Name,
        ino: Ino,
        kind: NodeKind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: Option<Name>,
        time: Time,
    },
    /// A hard link: `parent/name` names `ino` too.
    Link {
        ino: Ino,
        parent: Ino,
        name: Name,
        time: Time,
    },
    /// `unlink` or `rmdir` of `parent/name`.
    Remove {
        parent: Ino,
        name: Name,
        time: Time,
    },
    /// `rename` (replacing any target), or with `exchange` the two entries swap.
    Rename {
        parent: Ino,
        name: Name,
        new_parent: Ino,
        new_name: Name,
        exchange: bool,
        time: Time,
    },
    SetAttr {
        ino: Ino,
        change: AttrChange,
        time: Time,
    },
    /// The file's bytes now live in its upper file, with `base_len` base bytes below (a first
    /// write: the base size; a truncation: the new size); present blocks at or above it are
    /// forgotten.
    Upper {
        ino: Ino,
        base_len: u64,
        time: Time,
    },
    /// These blocks were copied into the upper file (written there before this record).
    Present {
        ino: Ino,
        blocks: Vec<u64>,
    },
    SetXattr {
        ino: Ino,
        name: Name,
        value: Vec<u8>,
        time: Time,
    },
    RemoveXattr {
        ino: Ino,
        name: Name,
        time: Time,
    },
}

/// The overlay's state. See the module docs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// The unit of `Upper::present`, fixed when the overlay is started (the mount's
    /// `--part-size` then); later mounts keep it whatever their `--part-size`.
    #[serde(default)]
    pub block_size: u64,
    /// The next inode number to give out; starts past the base's, never reused.
    pub next_ino: Ino,
    /// Entries that differ from the base, per directory.
    #[serde(with = "dirs_as_list")]
    pub dirs: HashMap<Ino, BTreeMap<Name, Entry>>,
    pub inodes: HashMap<Ino, Inode>,
}

/// What one merged directory entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Name,
    pub ino: Ino,
    pub kind: NodeKind,
}

/// The mounting user, owner of every base inode.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Delta {
    pub fn new(base: &Namespace) -> Delta {
        Delta {
            next_ino: base.len() as Ino + 1,
            ..Delta::default()
        }
    }

    fn is_base(base: &Namespace, ino: Ino) -> bool {
        ino >= 1 && ino <= base.len() as Ino
    }

    /// The inode's current attributes, from the delta or the base.
    pub fn inode(&self, base: &Namespace, owner: Owner, ino: Ino) -> Option<Inode> {
        if let Some(inode) = self.inodes.get(&ino) {
            return Some(inode.clone());
        }
        Self::base_inode(base, owner, ino)
    }

    fn base_inode(base: &Namespace, owner: Owner, ino: Ino) -> Option<Inode> {
        let attr = base.attr(ino)?;
        let time = Time::from_micros(attr.mtime_us);
        Some(Inode {
            kind: attr.kind,
            mode: attr.perm as u32,
            uid: owner.uid,
            gid: owner.gid,
            nlink: attr.nlink,
            parent: base.parent(ino).unwrap_or(ino),
            mtime: time,
            atime: time,
            ctime: time,
            target: base.readlink(ino).map(<[u8]>::to_vec),
            xattrs: Vec::new(),
            upper: None,
        })
    }

    /// The delta's copy of `ino`, made from the base on first change.
    fn inode_mut(&mut self, base: &Namespace, owner: Owner, ino: Ino) -> Option<&mut Inode> {
        match self.inodes.entry(ino) {
            std::collections::hash_map::Entry::Occupied(entry) => Some(entry.into_mut()),
            std::collections::hash_map::Entry::Vacant(entry) => {
                Some(entry.insert(Self::base_inode(base, owner, ino)?))
            }
        }
    }

    pub fn kind(&self, base: &Namespace, ino: Ino) -> Option<NodeKind> {
        match self.inodes.get(&ino) {
            Some(inode) => Some(inode.kind),
            None => base.attr(ino).map(|a| a.kind),
        }
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, base: &Namespace, parent: Ino, name: &[u8]) -> Option<Ino> {
        if let Some(entry) = self.dirs.get(&parent).and_then(|d| d.get(name)) {
            return match entry {
                Entry::Present(ino) => Some(*ino),
                Entry::Whiteout => None,
            };
        }
        if Self::is_base(base, parent) {
            base.lookup(parent, name)
        } else {
            None
        }
    }

    /// The merged entries of directory `dir` in name order.
    pub fn children(&self, base: &Namespace, dir: Ino) -> Vec<DirEntry> {
        let delta = self.dirs.get(&dir);
        let mut merged = Vec::new();
        let mut base_children = (0..base.child_count(dir).unwrap_or(0))
            .filter_map(|i| base.child_at(dir, i))
            .peekable();
        let mut changed = delta.into_iter().flatten().peekable();
        loop {
            let take_base = match (base_children.peek(), changed.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((_, b, _)), Some((c, _))) => *b < c.as_slice(),
            };
            if take_base {
                let (ino, name, _) = base_children.next().unwrap();
                let kind = self.kind(base, ino).unwrap_or(NodeKind::File);
                merged.push(DirEntry {
                    name: name.to_vec(),
                    ino,
                    kind,
                });
            } else {
                let (name, entry) = changed.next().unwrap();
                if base_children
                    .peek()
                    .is_some_and(|(_, b, _)| *b == name.as_slice())
                {
                    base_children.next();
                }
                if let Entry::Present(ino) = *entry {
                    let kind = self.kind(base, ino).unwrap_or(NodeKind::File);
                    merged.push(DirEntry {
                        name: name.clone(),
                        ino,
                        kind,
                    });
                }
            }
        }
        merged
    }

    pub fn is_empty_dir(&self, base: &Namespace, dir: Ino) -> bool {
        let delta = self.dirs.get(&dir);
        if delta.is_some_and(|d| d.values().any(|e| matches!(e, Entry::Present(_)))) {
            return false;
        }
        (0..base.child_count(dir).unwrap_or(0))
            .filter_map(|i| base.child_at(dir, i))
            .all(|(_, name, _)| delta.is_some_and(|d| d.contains_key(name)))
    }

    /// Whether `ino` is `dir` or below it (renaming a directory into itself is refused).
    pub fn is_within(&self, base: &Namespace, owner: Owner, mut ino: Ino, dir: Ino) -> bool {
        loop {
            if ino == dir {
                return true;
            }
            let parent = self.inode(base, owner, ino).map_or(ino, |i| i.parent);
            if parent == ino {
                return false;
            }
            ino = parent;
        }
    }

    fn set_entry(&mut self, base: &Namespace, parent: Ino, name: &[u8], entry: Option<Ino>) {
        let in_base = Self::is_base(base, parent) && base.lookup(parent, name).is_some();
        let dir = self.dirs.entry(parent).or_default();
        match (entry, in_base) {
            (Some(ino), _) => {
                dir.insert(name.to_vec(), Entry::Present(ino));
            }
            (None, true) => {
                dir.insert(name.to_vec(), Entry::Whiteout);
            }
            (None, false) => {
                dir.remove(name);
            }
        }
    }

    fn touch(&mut self, base: &Namespace, owner: Owner, ino: Ino, time: Time) {
        if let Some(inode) = self.inode_mut(base, owner, ino) {
            inode.mtime = time;
            inode.ctime = time;
        }
    }

    fn add_links(&mut self, base: &Namespace, owner: Owner, ino: Ino, delta: i32, time: Time) {
        if let Some(inode) = self.inode_mut(base, owner, ino) {
            inode.nlink = inode.nlink.saturating_add_signed(delta);
            inode.ctime = time;
        }
    }

    /// Drops the entry's target link; a directory's parent loses its `..` link.
    fn unlink_target(&mut self, base: &Namespace, owner: Owner, parent: Ino, ino: Ino, time: Time) {
        let is_dir = self.kind(base, ino) == Some(NodeKind::Dir);
        if is_dir {
            self.add_links(base, owner, parent, -1, time);
            if let Some(inode) = self.inode_mut(base, owner, ino) {
                inode.nlink = 0;
            }
            self.dirs.remove(&ino);
        } else {
            self.add_links(base, owner, ino, -1, time);
        }
    }

    /// Applies one record. Records are checked before they are journaled; one that no longer
    /// fits (a journal from another build) changes what it can and never panics.
    pub fn apply(&mut self, base: &Namespace, owner: Owner, record: &Record) {
        match record {
            Record::Create {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                target,
                time,
            } => {
                let inode = Inode {
                    kind: *kind,
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                    nlink: if *kind == NodeKind::Dir { 2 } else { 1 },
                    parent: *parent,
                    mtime: *time,
                    atime: *time,
                    ctime: *time,
                    target: target.clone(),
                    xattrs: Vec::new(),
                    upper: (*kind == NodeKind::File).then(Upper::default),
                };
                self.inodes.insert(*ino, inode);
                self.next_ino = self.next_ino.max(ino + 1);
                self.set_entry(base, *parent, name, Some(*ino));
                if *kind == NodeKind::Dir {
                    self.add_links(base, owner, *parent, 1, *time);
                }
                self.touch(base, owner, *parent, *time);
            }
            Record::Link {
                ino,
                parent,
                name,
                time,
            } => {
                self.set_entry(base, *parent, name, Some(*ino));
                self.add_links(base, owner, *ino, 1, *time);
                self.touch(base, owner, *parent, *time);
            }
            Record::Remove { parent, name, time } => {
                if let Some(ino) = self.lookup(base, *parent, name) {
                    self.set_entry(base, *parent, name, None);
                    self.unlink_target(base, owner, *parent, ino, *time);
                    self.touch(base, owner, *parent, *time);
                }
            }
            Record::Rename {
                parent,
                name,
                new_parent,
                new_name,
                exchange,
                time,
            } => self.rename(
                base,
                owner,
                (*parent, name),
                (*new_parent, new_name),
                *exchange,
                *time,
            ),
            Record::SetAttr { ino, change, time } => {
                if let Some(inode) = self.inode_mut(base, owner, *ino) {
                    if let Some(mode) = change.mode {
                        inode.mode = mode & 0o7777;
                    }
                    if let Some(uid) = change.uid {
                        inode.uid = uid;
                    }
                    if let Some(gid) = change.gid {
                        inode.gid = gid;
                    }
                    if let Some(atime) = change.atime {
                        inode.atime = atime;
                    }
                    if let Some(mtime) = change.mtime {
                        inode.mtime = mtime;
                    }
                    inode.ctime = *time;
                }
            }
            Record::Upper {
                ino,
                base_len,
                time,
            } => {
                if let Some(inode) = self.inode_mut(base, owner, *ino) {
                    let upper = inode.upper.get_or_insert_with(|| Upper {
                        base_len: *base_len,
                        present: BTreeSet::new(),
                    });
                    upper.base_len = upper.base_len.min(*base_len);
                    inode.ctime = *time;
                }
            }
            Record::Present { ino, blocks } => {
                if let Some(upper) = self.inodes.get_mut(ino).and_then(|i| i.upper.as_mut()) {
                    upper.present.extend(blocks.iter().copied());
                }
            }
            Record::SetXattr {
                ino,
                name,
                value,
                time,
            } => {
                if let Some(inode) = self.inode_mut(base, owner, *ino) {
                    match inode.xattrs.binary_search_by(|(n, _)| n.cmp(name)) {
                        Ok(i) => inode.xattrs[i].1 = value.clone(),
                        Err(i) => inode.xattrs.insert(i, (name.clone(), value.clone())),
                    }
                    inode.ctime = *time;
                }
            }
            Record::RemoveXattr { ino, name, time } => {
                if let Some(inode) = self.inode_mut(base, owner, *ino) {
                    inode.xattrs.retain(|(n, _)| n != name);
                    inode.ctime = *time;
                }
            }
        }
    }

    fn rename(
        &mut self,
        base: &Namespace,
        owner: Owner,
        (parent, name): (Ino, &[u8]),
        (new_parent, new_name): (Ino, &[u8]),
        exchange: bool,
        time: Time,
    ) {
        let Some(ino) = self.lookup(base, parent, name) else {
            return;
        };
        let target = self.lookup(base, new_parent, new_name);
        if target == Some(ino) {
            // Two names of one inode: Linux does nothing.
            return;
        }
        let moves_dir = |delta: &Delta, ino: Ino| delta.kind(base, ino) == Some(NodeKind::Dir);
        if exchange {
            let Some(other) = target else {
                return;
            };
            self.set_entry(base, parent, name, Some(other));
            self.set_entry(base, new_parent, new_name, Some(ino));
            if parent != new_parent {
                for (moved, from, to) in [(ino, parent, new_parent), (other, new_parent, parent)] {
                    if moves_dir(self, moved) {
                        self.add_links(base, owner, from, -1, time);
                        self.add_links(base, owner, to, 1, time);
                    }
                    if let Some(inode) = self.inode_mut(base, owner, moved) {
                        inode.parent = to;
                        inode.ctime = time;
                    }
                }
            }
        } else {
            if let Some(old) = target {
                self.unlink_target(base, owner, new_parent, old, time);
            }
            self.set_entry(base, parent, name, None);
            self.set_entry(base, new_parent, new_name, Some(ino));
            if moves_dir(self, ino) {
                self.add_links(base, owner, parent, -1, time);
                self.add_links(base, owner, new_parent, 1, time);
            }
            if let Some(inode) = self.inode_mut(base, owner, ino) {
                inode.parent = new_parent;
                inode.ctime = time;
            }
        }
        self.touch(base, owner, parent, time);
        self.touch(base, owner, new_parent, time);
    }

    /// New inodes no entry names any more (their upper files can go), dropped from the delta.
    pub fn collect_unlinked(&mut self, base: &Namespace) -> Vec<Ino> {
        let gone: Vec<Ino> = self
            .inodes
            .iter()
            .filter(|(ino, inode)| inode.nlink == 0 && !Self::is_base(base, **ino))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in &gone {
            self.inodes.remove(ino);
        }
        gone
    }
}

/// JSON object keys must be strings: the directory deltas are stored as a list of pairs.
mod dirs_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Dirs = HashMap<Ino, BTreeMap<Name, Entry>>;

    pub fn serialize<S: Serializer>(dirs: &Dirs, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<(Ino, Vec<(&Name, &Entry)>)> = dirs
            .iter()
            .map(|(ino, entries)| (*ino, entries.iter().collect()))
            .collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dirs, D::Error> {
        let list: Vec<(Ino, Vec<(Name, Entry)>)> = Vec::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|(ino, entries)| (ino, entries.into_iter().collect()))
            .collect())
    }
}
