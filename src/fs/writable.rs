//! The dispatcher of a `--writable` mount: namespace requests answered inline through the
//! [`Overlay`] (its write lock serializes changes, each journaled before its reply), data
//! requests (open, read, write, fallocate, release) routed to the inode's owner shard as on a
//! read-only mount.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::dispatch::{openable, Dispatcher, PREFERRED_IO_SIZE};
use super::error::FsError;
use super::op_counters::Op;
use super::request::{
    fail, Attributes, Caller, Create, Open, Request, SetAttr, StatFs, Truncate, XattrReply,
    ATTR_TTL, WRITABLE_ATTR_TTL,
};
use super::shard::ShardRequest;
use crate::namespace::{Ino, NodeKind};
use crate::overlay::{AttrChange, DirEntry, NewNode, Node, Overlay, Time};

/// A directory's entries as they were at `opendir`: a listing read in several requests while
/// entries are removed (`rm -rf`) neither skips nor repeats one.
pub(super) struct Listing {
    dir: Ino,
    parent: Ino,
    entries: Vec<DirEntry>,
}

/// Open directories' listings by handle.
#[derive(Default)]
pub(crate) struct Listings {
    open: Mutex<HashMap<u64, Arc<Listing>>>,
    next: AtomicU64,
}

impl Listings {
    fn insert(&self, listing: Listing) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(listing));
        fh
    }

    fn get(&self, fh: u64) -> Option<Arc<Listing>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
    }

    fn remove(&self, fh: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }
}

impl Listing {
    /// Entries from position `offset` on: 0 is `.`, 1 is `..`, `2 + i` is entry `i`.
    fn from(&self, offset: u64) -> impl Iterator<Item = (u64, Ino, NodeKind, &[u8])> + '_ {
        (offset..).map_while(move |position| match position {
            0 => Some((position, self.dir, NodeKind::Dir, &b"."[..])),
            1 => Some((position, self.parent, NodeKind::Dir, &b".."[..])),
            n => self
                .entries
                .get((n - 2) as usize)
                .map(|e| (position, e.ino, e.kind, e.name.as_slice())),
        })
    }
}

pub(super) fn attributes(node: &Node) -> Attributes {
    Attributes {
        ino: node.ino,
        size: node.size,
        blocks: node.blocks,
        atime: node.atime.system_time(),
        mtime: node.mtime.system_time(),
        ctime: node.ctime.system_time(),
        kind: node.kind,
        perm: node.perm,
        nlink: node.nlink,
        uid: node.uid,
        gid: node.gid,
        blksize: PREFERRED_IO_SIZE,
        // An untouched manifest entry changes only through this mount, which the kernel sees:
        // cached as long as on a read-only mount (a worker stats every input once).
        ttl: if node.changed {
            WRITABLE_ATTR_TTL
        } else {
            ATTR_TTL
        },
    }
}

pub(super) fn change_of(set: &SetAttr) -> AttrChange {
    AttrChange {
        mode: set.mode,
        uid: set.uid,
        gid: set.gid,
        atime: set.atime.map(Time::from),
        mtime: set.mtime.map(Time::from),
    }
}

/// Answers an xattr request: the size asked for (`size` 0), the bytes, or ERANGE.
fn xattr_answer(reply: Box<dyn XattrReply>, size: u32, bytes: &[u8]) -> Result<(), FsError> {
    if size == 0 {
        reply.size(bytes.len() as u32);
    } else if bytes.len() > size as usize {
        return Err(FsError::Range);
    } else {
        reply.data(bytes);
    }
    Ok(())
}

impl Dispatcher {
    pub(super) fn dispatch_writable(&self, overlay: &Overlay, request: Request<'_>) {
        let op = request.op();
        let node = |ino: Ino| overlay.node(ino).map(|n| attributes(&n));
        match request {
            Request::Lookup {
                parent,
                name,
                reply,
            } => match overlay.lookup(parent, name).and_then(node) {
                Ok(a) => reply.entry(&a),
                Err(e) => fail(&self.ops, reply, op, parent, e),
            },
            Request::GetAttr { ino, reply } => match node(ino) {
                Ok(a) => reply.attr(&a),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::ReadLink { ino, reply } => match overlay.readlink(ino) {
                Ok(target) => reply.bytes(&target),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::Open(open) => match self.prepare_open(overlay, &open) {
                Ok(()) => self.route(open.ino, ShardRequest::Open(open)),
                Err(e) => fail(&self.ops, open.reply, op, open.ino, e),
            },
            Request::Create(create) => self.create(overlay, create),
            Request::Read(read) => self.route(read.ino, ShardRequest::Read(read, None)),
            Request::Write(write) => self.route(write.ino, ShardRequest::Write(write)),
            Request::Fallocate(f) => self.route(f.ino, ShardRequest::Fallocate(f)),
            Request::Release(release) => self.route(release.ino, ShardRequest::Release(release)),
            // Writes reach the upper file before they are answered: nothing to flush.
            Request::Flush { reply, .. } => reply.ok(),
            Request::OpenDir { ino, reply } => match overlay.children(ino) {
                Ok((parent, entries)) => {
                    let fh = self.listings.insert(Listing {
                        dir: ino,
                        parent,
                        entries,
                    });
                    reply.opened(fh, false);
                }
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::ReadDir {
                ino,
                fh,
                offset,
                mut reply,
            } => match self.listings.get(fh) {
                Some(listing) => {
                    for (position, entry, kind, name) in listing.from(offset) {
                        if reply.add(entry, position + 1, kind, name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                None => fail(&self.ops, reply, op, ino, FsError::Invalid),
            },
            Request::ReadDirPlus {
                ino,
                fh,
                offset,
                mut reply,
            } => match self.listings.get(fh) {
                Some(listing) => {
                    for (position, entry, _, name) in listing.from(offset) {
                        // Removed since the listing was taken: left out.
                        let Ok(attributes) = node(entry) else {
                            continue;
                        };
                        if reply.add(position + 1, name, &attributes) {
                            break;
                        }
                    }
                    reply.ok();
                }
                None => fail(&self.ops, reply, op, ino, FsError::Invalid),
            },
            Request::ReleaseDir { fh, reply, .. } => {
                self.listings.remove(fh);
                reply.ok();
            }
            Request::StatFs { reply } => {
                let space = overlay.space();
                reply.statfs(&StatFs {
                    blocks: space.blocks,
                    blocks_free: space.free,
                    blocks_available: space.available,
                    files: space.files,
                    files_free: space.files_free,
                    block_size: space.block_size,
                    name_len: 255,
                });
            }
            // Permission bits are enforced by the kernel (`default_permissions`).
            Request::Access { ino, reply, .. } => match overlay.node(ino) {
                Ok(_) => reply.ok(),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::GetXattr {
                ino,
                name,
                size,
                reply,
            } => match overlay.get_xattr(ino, name) {
                Ok(value) => {
                    if let Err(e) = xattr_answer(reply, size, &value) {
                        self.ops.failure(op, e);
                    }
                }
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::ListXattr { ino, size, reply } => match overlay.list_xattr(ino) {
                Ok(list) => {
                    if let Err(e) = xattr_answer(reply, size, &list) {
                        self.ops.failure(op, e);
                    }
                }
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::MakeNode {
                parent,
                name,
                kind,
                mode,
                target,
                caller,
                reply,
            } => {
                let new = NewNode {
                    kind,
                    mode,
                    uid: caller.uid,
                    gid: caller.gid,
                    target,
                };
                match overlay.create(parent, name, new) {
                    Ok(n) => reply.entry(&attributes(&n)),
                    Err(e) => fail(&self.ops, reply, op, parent, e),
                }
            }
            Request::Link {
                ino,
                new_parent,
                new_name,
                reply,
            } => match overlay.link(ino, new_parent, new_name) {
                Ok(n) => reply.entry(&attributes(&n)),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::Remove {
                parent,
                name,
                dir,
                reply,
            } => match overlay.remove(parent, name, dir) {
                Ok(()) => reply.ok(),
                Err(e) => fail(&self.ops, reply, op, parent, e),
            },
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                reply,
            } => match overlay.rename((parent, name), (new_parent, new_name), flags) {
                Ok(()) => reply.ok(),
                Err(e) => fail(&self.ops, reply, op, parent, e),
            },
            // A new size changes the file's bytes: the owner shard does it, in order with the
            // inode's writes.
            Request::SetAttr { ino, change, reply } if change.size.is_some() => {
                self.route(ino, ShardRequest::Truncate(Truncate { ino, change, reply }))
            }
            Request::SetAttr { ino, change, reply } => {
                match overlay.set_attr(ino, change_of(&change), None) {
                    Ok(n) => reply.attr(&attributes(&n)),
                    Err(e) => fail(&self.ops, reply, op, ino, e),
                }
            }
            Request::Fsync { ino, dir, reply } => {
                let synced = if dir {
                    overlay.sync_namespace()
                } else {
                    overlay.sync_file(ino)
                };
                match synced {
                    Ok(()) => reply.ok(),
                    Err(e) => fail(&self.ops, reply, op, ino, e),
                }
            }
            Request::SetXattr {
                ino,
                name,
                value,
                flags,
                reply,
            } => match overlay.set_xattr(ino, name, value, flags) {
                Ok(()) => reply.ok(),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
            Request::RemoveXattr { ino, name, reply } => match overlay.remove_xattr(ino, name) {
                Ok(()) => reply.ok(),
                Err(e) => fail(&self.ops, reply, op, ino, e),
            },
        }
    }

    /// Checks an open before routing it (an `O_TRUNC` the kernel left to us is done by the
    /// owner shard).
    fn prepare_open(&self, overlay: &Overlay, open: &Open) -> Result<(), FsError> {
        openable(overlay.kind(open.ino))
    }

    fn create(&self, overlay: &Overlay, create: Create) {
        let Create {
            parent,
            name,
            mode,
            flags,
            caller: Caller { uid, gid },
            received,
            reply,
        } = create;
        let new = NewNode {
            kind: NodeKind::File,
            mode,
            uid,
            gid,
            target: None,
        };
        match overlay.create(parent, &name, new) {
            Ok(node) => {
                let reply = reply.created(&attributes(&node));
                let open = Open {
                    ino: node.ino,
                    // The file is new and empty: nothing to truncate.
                    flags: flags & !libc::O_TRUNC,
                    received,
                    reply,
                };
                self.route(node.ino, ShardRequest::Open(open));
            }
            Err(e) => fail(&self.ops, reply, Op::Create, parent, e),
        }
    }
}
