//! Builds a [`Namespace`] from manifest entries in one pass plus one sort.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{node_path, Namespace, Node, NodeKind, FLAG_CHUNKED, FLAG_EXEC};
use crate::manifest::{to_fs_name, Content, EntryKind, EntryRef};

/// Why a manifest cannot be turned into a mountable tree. The manifest decoder already rejects
/// most of these; the namespace checks again because it must never build an inconsistent table.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("`{0}` is a deletion: diff manifests cannot be mounted on their own, mount the snapshot they apply to")]
    DiffEntry(PathBuf),
    #[error("symlink `{path}` points to `{target}`, outside the manifest root")]
    EscapingSymlink { path: PathBuf, target: PathBuf },
    #[error("`{0}` appears twice (or as both a file and a directory)")]
    Duplicate(PathBuf),
    #[error("`{0}` has an empty, `.` or `..` component")]
    BadPath(PathBuf),
    #[error("the manifest is too large to mount (over 4 billion entries or 4 GiB of names)")]
    TooLarge,
}

fn display(path: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(&to_fs_name(path)).into()
}

fn index(value: usize) -> Result<u32, NamespaceError> {
    u32::try_from(value).map_err(|_| NamespaceError::TooLarge)
}

struct Builder<'m> {
    nodes: Vec<Node>,
    names: Vec<u8>,
    hashes: Vec<crate::manifest::Hash>,
    /// Directories by (parent index, manifest-side name): only used while building.
    dirs: HashMap<(u32, &'m [u8]), u32>,
}

impl<'m> Builder<'m> {
    fn push_name(&mut self, bytes: &[u8]) -> Result<(u32, u32), NamespaceError> {
        let start = index(self.names.len())?;
        self.names.extend_from_slice(bytes);
        Ok((start, index(bytes.len())?))
    }

    fn push_node(
        &mut self,
        parent: u32,
        name: &[u8],
        kind: NodeKind,
    ) -> Result<u32, NamespaceError> {
        let (name_start, name_len) = self.push_name(&to_fs_name(name))?;
        let id = index(self.nodes.len())?;
        self.nodes.push(Node {
            size: 0,
            mtime_us: 0,
            parent,
            name_start,
            name_len,
            a: 0,
            b: 0,
            kind,
            flags: 0,
            subdirs: 0,
        });
        if kind == NodeKind::Dir {
            self.nodes[parent as usize].subdirs += 1;
        }
        Ok(id)
    }

    /// Directories carry no mtime in manifests; each shows the newest mtime below it, which is
    /// stable across mounts of the same manifest.
    fn bubble_mtime(&mut self, mut dir: u32, mtime_us: i64) {
        loop {
            let node = &mut self.nodes[dir as usize];
            if node.mtime_us >= mtime_us && node.mtime_us != 0 {
                return;
            }
            node.mtime_us = mtime_us;
            if dir == 0 {
                return;
            }
            dir = node.parent;
        }
    }

    fn dir(&mut self, parent: u32, name: &'m [u8]) -> Result<u32, NamespaceError> {
        if let Some(&id) = self.dirs.get(&(parent, name)) {
            return Ok(id);
        }
        let id = self.push_node(parent, name, NodeKind::Dir)?;
        self.dirs.insert((parent, name), id);
        Ok(id)
    }
}

/// Splits a manifest path into components; absolute manifests are re-rooted at the mount point.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, NamespaceError> {
    let relative = path.strip_prefix(b"/").unwrap_or(path);
    let parts: Vec<&[u8]> = relative.split(|&b| b == b'/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == b"." || *p == b"..")
    {
        return Err(NamespaceError::BadPath(display(path)));
    }
    Ok(parts)
}

/// Turns a target relative to the manifest root into one relative to the link's directory.
fn parent_relative_target(link: &[&[u8]], target: &[u8]) -> Option<Vec<u8>> {
    let mut resolved: Vec<&[u8]> = Vec::new();
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                resolved.pop()?;
            }
            other => resolved.push(other),
        }
    }
    let link_dir = &link[..link.len() - 1];
    let common = link_dir
        .iter()
        .zip(&resolved)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = Vec::new();
    for _ in common..link_dir.len() {
        out.extend_from_slice(b"../");
    }
    for part in &resolved[common..] {
        out.extend_from_slice(&to_fs_name(part));
        out.push(b'/');
    }
    if out.is_empty() {
        out.push(b'.');
    } else {
        out.pop();
    }
    Some(out)
}

impl Namespace {
    /// Builds the inode table. Entries may come in any order; implied parent directories are
    /// created. Deletions (diff manifests) are refused.
    pub fn build<'m>(
        entries: impl IntoIterator<Item = EntryRef<'m>>,
    ) -> Result<Namespace, NamespaceError> {
        let mut b = Builder {
            nodes: Vec::new(),
            names: Vec::new(),
            hashes: Vec::new(),
            dirs: HashMap::new(),
        };
        b.push_node(0, b"", NodeKind::Dir)?;
        b.nodes[0].subdirs = 0;
        let mut total_size = 0u64;
        let mut files = 0u64;

        for entry in entries {
            let parts = components(entry.path)?;
            let (last, dirs) = parts.split_last().expect("split yields at least one part");
            let mut parent = 0u32;
            for dir in dirs {
                parent = b.dir(parent, dir)?;
            }
            match entry.kind {
                EntryKind::Dir => {
                    b.dir(parent, last)?;
                }
                EntryKind::File(file) => {
                    let id = b.push_node(parent, last, NodeKind::File)?;
                    let objects: &[crate::manifest::Hash] = match &file.content {
                        Content::Whole(hash) => std::slice::from_ref(hash),
                        Content::Chunked(chunks) => chunks,
                    };
                    let start = index(b.hashes.len())?;
                    b.hashes.extend_from_slice(objects);
                    let node = &mut b.nodes[id as usize];
                    node.size = file.size;
                    node.mtime_us = file.mtime_us;
                    node.a = start;
                    node.b = index(objects.len())?;
                    if file.executable {
                        node.flags |= FLAG_EXEC;
                    }
                    if matches!(file.content, Content::Chunked(_)) {
                        node.flags |= FLAG_CHUNKED;
                    }
                    b.bubble_mtime(parent, file.mtime_us);
                    total_size = total_size.saturating_add(file.size);
                    files += 1;
                }
                EntryKind::Symlink { target } => {
                    let relative = parent_relative_target(&parts, target).ok_or_else(|| {
                        NamespaceError::EscapingSymlink {
                            path: display(entry.path),
                            target: display(target),
                        }
                    })?;
                    let id = b.push_node(parent, last, NodeKind::Symlink)?;
                    let (start, len) = b.push_name(&relative)?;
                    let node = &mut b.nodes[id as usize];
                    node.a = start;
                    node.b = len;
                    node.size = len as u64;
                }
                EntryKind::Deleted { .. } => {
                    return Err(NamespaceError::DiffEntry(display(entry.path)))
                }
            }
        }
        let Builder {
            mut nodes,
            names,
            hashes,
            dirs,
        } = b;
        drop(dirs);

        // Group children by parent, each group sorted by name, so lookup is a binary search.
        let name = |n: &Node| &names[n.name_start as usize..(n.name_start + n.name_len) as usize];
        let mut children: Vec<u32> = (1..index(nodes.len())?).collect();
        children.sort_unstable_by(|&x, &y| {
            let (nx, ny) = (&nodes[x as usize], &nodes[y as usize]);
            nx.parent
                .cmp(&ny.parent)
                .then_with(|| name(nx).cmp(name(ny)))
        });
        for pair in children.windows(2) {
            let (x, y) = (&nodes[pair[0] as usize], &nodes[pair[1] as usize]);
            if x.parent == y.parent && name(x) == name(y) {
                return Err(NamespaceError::Duplicate(node_path(
                    &nodes, &names, pair[1],
                )));
            }
        }
        let mut run_start = 0usize;
        while run_start < children.len() {
            let parent = nodes[children[run_start] as usize].parent;
            let run_len = children[run_start..]
                .iter()
                .take_while(|&&c| nodes[c as usize].parent == parent)
                .count();
            let dir = &mut nodes[parent as usize];
            dir.a = run_start as u32;
            dir.b = run_len as u32;
            run_start += run_len;
        }
        let mut names = names;
        names.shrink_to_fit();
        nodes.shrink_to_fit();
        let mut hashes = hashes;
        hashes.shrink_to_fit();
        Ok(Namespace {
            nodes,
            names,
            children,
            hashes,
            total_size,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{FileEntry, Hash};
    use crate::namespace::{owner, NodeKind, ROOT_INO};

    fn file(path: &'static str, size: u64, hash: u128) -> EntryRef<'static> {
        EntryRef {
            path: path.as_bytes(),
            kind: EntryKind::File(FileEntry {
                size,
                mtime_us: 1_700_000_000_000_000,
                executable: false,
                content: Content::Whole(Hash(hash)),
            }),
        }
    }

    #[test]
    fn builds_tree_with_implied_dirs_and_sorted_lookup() {
        let ns = Namespace::build([
            file("b/z.txt", 3, 1),
            file("a.txt", 11, 2),
            file("b/c/d.bin", 5, 3),
            EntryRef {
                path: b"empty",
                kind: EntryKind::Dir,
            },
        ])
        .unwrap();
        assert_eq!(ns.total_size(), 19);
        assert_eq!(ns.file_count(), 3);
        assert_eq!(ns.child_count(ROOT_INO), Some(3));
        let names: Vec<_> = (0..3)
            .map(|i| ns.child_at(ROOT_INO, i).unwrap().1.to_vec())
            .collect();
        assert_eq!(
            names,
            vec![b"a.txt".to_vec(), b"b".to_vec(), b"empty".to_vec()]
        );
        let b = ns.lookup(ROOT_INO, b"b").unwrap();
        assert_eq!(ns.attr(b).unwrap().kind, NodeKind::Dir);
        assert_eq!(ns.attr(b).unwrap().nlink, 3);
        let c = ns.lookup(b, b"c").unwrap();
        let d = ns.lookup(c, b"d.bin").unwrap();
        assert_eq!(ns.file_content(d).unwrap().objects, &[Hash(3)]);
        assert_eq!(ns.path(d), PathBuf::from("b/c/d.bin"));
        assert_eq!(ns.parent(d), Some(c));
        assert!(ns.lookup(ROOT_INO, b"missing").is_none());
        assert!(ns.lookup(d, b"x").is_none());
        assert_eq!(
            ns.child_count(ns.lookup(ROOT_INO, b"empty").unwrap()),
            Some(0)
        );
    }

    #[test]
    fn symlink_targets_become_parent_relative() {
        let link = |path: &'static str, target: &'static str| EntryRef {
            path: path.as_bytes(),
            kind: EntryKind::Symlink {
                target: target.as_bytes(),
            },
        };
        let ns = Namespace::build([
            file("tex/a.txt", 1, 1),
            link("tex/latest", "tex/a.txt"),
            link("shots/sq/l", "tex/a.txt"),
            link("top", "tex"),
            link("self", ""),
        ])
        .unwrap();
        let target = |p: &[&[u8]]| {
            let mut ino = ROOT_INO;
            for part in p {
                ino = ns.lookup(ino, part).unwrap();
            }
            ns.readlink(ino).unwrap().to_vec()
        };
        assert_eq!(target(&[b"tex", b"latest"]), b"a.txt");
        assert_eq!(target(&[b"shots", b"sq", b"l"]), b"../../tex/a.txt");
        assert_eq!(target(&[b"top"]), b"tex");
        assert_eq!(target(&[b"self"]), b".");
    }

    #[test]
    fn refuses_escaping_symlinks_duplicates_and_deletions() {
        let escaping = EntryRef {
            path: b"a/l",
            kind: EntryKind::Symlink {
                target: b"../../etc/passwd",
            },
        };
        assert!(matches!(
            Namespace::build([escaping]),
            Err(NamespaceError::EscapingSymlink { .. })
        ));
        assert!(matches!(
            Namespace::build([file("x", 1, 1), file("x", 2, 2)]),
            Err(NamespaceError::Duplicate(_))
        ));
        let deleted = EntryRef {
            path: b"x",
            kind: EntryKind::Deleted { dir: false },
        };
        assert!(matches!(
            Namespace::build([deleted]),
            Err(NamespaceError::DiffEntry(_))
        ));
        assert!(matches!(
            Namespace::build([file("a//b", 1, 1)]),
            Err(NamespaceError::BadPath(_))
        ));
    }

    #[test]
    fn owner_is_stable_and_spreads() {
        let mut counts = [0usize; 4];
        for ino in 1..=4000 {
            counts[owner(ino, 4)] += 1;
        }
        // Stable across calls and builds: the routing of a mount must not change between runs
        // (pinned values, not the function compared with itself).
        let pinned: Vec<usize> = (1..=8).map(|ino| owner(ino, 4)).collect();
        assert_eq!(pinned, [1, 2, 0, 1, 3, 0, 2, 3]);
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert!((1..100).all(|ino| owner(ino, 1) == 0));
    }
}
