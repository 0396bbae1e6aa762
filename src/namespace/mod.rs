//! The immutable inode table built once from a decoded manifest and shared read-only (`Arc`) by
//! the FUSE front threads and every shard.
//!
//! Inode numbers are dense: `ino = index + 1`, the root is [`ROOT_INO`]. A node never changes after
//! [`Namespace::build`], so lookups need no locks. [`owner`] is the one definition of which shard
//! owns an inode's open handles, cache and fetches.
//!
//! Memory: one 48-byte [`Node`] per entry plus its name bytes, one `u32` per directory child and
//! 16 bytes per content hash.

mod build;

use std::path::PathBuf;

use crate::manifest::Hash;

pub use build::NamespaceError;

/// Inode number as FUSE sees it.
pub type Ino = u64;

/// FUSE's fixed root inode.
pub const ROOT_INO: Ino = 1;

/// Which shard owns `ino`, for a mount with `shards` shards.
///
/// A multiplicative (Fibonacci) mix spreads consecutive inodes, which are usually files of the
/// same directory read together, over all shards; it is stable for the life of the mount.
pub fn owner(ino: Ino, shards: usize) -> usize {
    debug_assert!(shards > 0);
    let mixed = ino.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards as u64) as usize
}

/// What kind of node an inode is. Manifests hold the first three; a writable mount can also
/// create FIFOs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    Fifo,
}

/// Attributes of one inode, independent of the FUSE crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: NodeKind,
    pub size: u64,
    pub mtime_us: i64,
    /// Permission bits: 0o755 for dirs and executables, 0o644 for files, 0o777 for symlinks.
    pub perm: u16,
    pub nlink: u32,
}

/// Where a file's bytes are: one CAS object, or one object per [`crate::manifest::CHUNK_SIZE`]
/// chunk (v2025 chunked files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileContent<'a> {
    pub size: u64,
    pub objects: &'a [Hash],
    pub chunked: bool,
}

const FLAG_EXEC: u8 = 1;
const FLAG_CHUNKED: u8 = 2;

/// One inode. `a`/`b` depend on the kind: dir -> children range, file -> hash range,
/// symlink -> target bytes in the name arena.
#[derive(Clone, Copy, Debug)]
struct Node {
    size: u64,
    mtime_us: i64,
    parent: u32,
    name_start: u32,
    name_len: u32,
    a: u32,
    b: u32,
    kind: NodeKind,
    flags: u8,
    /// Number of subdirectories (dirs only), for `nlink`.
    subdirs: u32,
}

/// The inode table. See the module docs.
pub struct Namespace {
    nodes: Vec<Node>,
    /// File names (already mapped to Linux names) and symlink targets, back to back.
    names: Vec<u8>,
    /// Child indices, each directory's run sorted by name bytes for binary search.
    children: Vec<u32>,
    hashes: Vec<Hash>,
    total_size: u64,
    files: u64,
}

impl Namespace {
    /// Number of inodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root exists even for an empty manifest.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Sum of all file sizes.
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Number of regular files.
    pub fn file_count(&self) -> u64 {
        self.files
    }

    fn node(&self, ino: Ino) -> Option<&Node> {
        let index = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(index)
    }

    fn name_of(&self, node: &Node) -> &[u8] {
        let start = node.name_start as usize;
        &self.names[start..start + node.name_len as usize]
    }

    fn child_slice(&self, node: &Node) -> &[u32] {
        if node.kind != NodeKind::Dir {
            return &[];
        }
        &self.children[node.a as usize..(node.a + node.b) as usize]
    }

    /// The child called `name` (a Linux file name) of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let dir = self.node(parent)?;
        let kids = self.child_slice(dir);
        kids.binary_search_by(|&child| self.name_of(&self.nodes[child as usize]).cmp(name))
            .ok()
            .map(|i| kids[i] as Ino + 1)
    }

    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        let node = self.node(ino)?;
        let (perm, nlink) = match node.kind {
            NodeKind::Dir => (0o755, 2 + node.subdirs),
            NodeKind::File if node.flags & FLAG_EXEC != 0 => (0o755, 1),
            NodeKind::File => (0o644, 1),
            NodeKind::Symlink => (0o777, 1),
            // Manifests hold no FIFOs.
            NodeKind::Fifo => (0o644, 1),
        };
        Some(Attr {
            ino,
            kind: node.kind,
            size: node.size,
            mtime_us: node.mtime_us,
            perm,
            nlink,
        })
    }

    /// Parent directory (the root is its own parent).
    pub fn parent(&self, ino: Ino) -> Option<Ino> {
        Some(self.node(ino)?.parent as Ino + 1)
    }

    /// Number of entries in directory `ino` (without `.` and `..`), or None if not a directory.
    pub fn child_count(&self, ino: Ino) -> Option<usize> {
        let node = self.node(ino)?;
        (node.kind == NodeKind::Dir).then_some(node.b as usize)
    }

    /// The `index`-th child of directory `ino` in name order: (inode, name, kind).
    pub fn child_at(&self, ino: Ino, index: usize) -> Option<(Ino, &[u8], NodeKind)> {
        let dir = self.node(ino)?;
        let child = *self.child_slice(dir).get(index)?;
        let node = &self.nodes[child as usize];
        Some((child as Ino + 1, self.name_of(node), node.kind))
    }

    /// A symlink's target, relative to the symlink's own directory.
    pub fn readlink(&self, ino: Ino) -> Option<&[u8]> {
        let node = self.node(ino)?;
        (node.kind == NodeKind::Symlink)
            .then(|| &self.names[node.a as usize..(node.a + node.b) as usize])
    }

    /// Where a regular file's bytes are.
    pub fn file_content(&self, ino: Ino) -> Option<FileContent<'_>> {
        let node = self.node(ino)?;
        (node.kind == NodeKind::File).then(|| FileContent {
            size: node.size,
            objects: &self.hashes[node.a as usize..(node.a + node.b) as usize],
            chunked: node.flags & FLAG_CHUNKED != 0,
        })
    }

    /// The inode's path relative to the mount root, for log lines.
    pub fn path(&self, ino: Ino) -> PathBuf {
        match ino.checked_sub(1).and_then(|i| u32::try_from(i).ok()) {
            Some(index) if (index as usize) < self.nodes.len() => {
                node_path(&self.nodes, &self.names, index)
            }
            _ => PathBuf::new(),
        }
    }
}

/// Path of node `index` from the root, following parent links.
fn node_path(nodes: &[Node], names: &[u8], mut index: u32) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut parts = Vec::new();
    while index != 0 {
        let node = &nodes[index as usize];
        let start = node.name_start as usize;
        parts.push(std::ffi::OsStr::from_bytes(
            &names[start..start + node.name_len as usize],
        ));
        index = node.parent;
    }
    parts.iter().rev().collect()
}
