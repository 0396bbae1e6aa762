//! The dispatch point: every request of every transport passes [`Dispatcher::dispatch`], which
//! is where per-operation metrics and tracing attach.
//!
//! Metadata of the immutable namespace (lookup, getattr, readdir, readlink, statfs, access,
//! xattrs) is answered inline on the transport's thread from the `Arc`-shared [`Namespace`].
//! Data requests (open, read, release; on a writable mount also write, fallocate, truncate) go,
//! with their reply, to the shard that owns the inode ([`owner`], decided here and nowhere else);
//! that shard replies itself from its own buffers, so no byte read crosses a thread here (a
//! WRITE's bytes do, copied once out of the transport's buffer). On a read-only mount anything that would modify the tree
//! gets `EROFS`; on a `--writable` one the overlay answers (`writable`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::writable::Listings;
use crate::overlay::Overlay;

use mount_vfs_executors::ShardSender;

use super::error::FsError;
use super::op_counters::{Op, OpCounters};
use super::request::{fail, Attributes, DirPlusReply, DirReply, Open, Request, StatFs, ATTR_TTL};
use super::shard::{LocalShard, ShardRequest};
use crate::namespace::{owner, Attr, Ino, Namespace, NodeKind, ROOT_INO};

/// Reported as `st_blksize`: tools like `cp` size their reads from it, and 1 MiB matches the
/// largest FUSE READ the kernel sends (`max_pages` = 256 pages).
pub const PREFERRED_IO_SIZE: u32 = 1 << 20;

/// The filesystem as a transport sees it.
pub struct Dispatcher {
    namespace: Arc<Namespace>,
    shards: Vec<ShardSender<ShardRequest>>,
    pub(super) ops: Arc<OpCounters>,
    /// Every base file belongs to the user that mounted it.
    uid: u32,
    gid: u32,
    /// The copy-on-write overlay of a `--writable` mount.
    pub(super) overlay: Option<Arc<Overlay>>,
    /// Open directories' listings (writable mounts: a listing is taken at `opendir`).
    pub(super) listings: Listings,
    /// Builds the counters snapshot [`STATS_XATTR`] answers with.
    stats: Option<StatsSnapshot>,
}

/// The extended attribute of the mount's root that answers with a JSON snapshot of the shards'
/// counters (`mount_vfs stats MOUNTPOINT` reads it): read-only, not listed, built on request.
pub const STATS_XATTR: &str = "user.mount_vfs.stats";

/// Builds the [`STATS_XATTR`] value.
pub type StatsSnapshot = Box<dyn Fn() -> String + Send + Sync>;

impl Dispatcher {
    /// `ops` counts every request and failure (shared with the shards, which count theirs).
    pub fn new(
        namespace: Arc<Namespace>,
        shards: Vec<ShardSender<ShardRequest>>,
        ops: Arc<OpCounters>,
    ) -> Dispatcher {
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Dispatcher {
            namespace,
            shards,
            ops,
            uid,
            gid,
            overlay: None,
            listings: Listings::default(),
            stats: None,
        }
    }

    /// Serves the tree through `overlay` (a `--writable` mount).
    pub fn writable(mut self, overlay: Arc<Overlay>) -> Dispatcher {
        self.overlay = Some(overlay);
        self
    }

    /// Answers [`STATS_XATTR`] with what `snapshot` builds.
    pub fn stats(mut self, snapshot: StatsSnapshot) -> Dispatcher {
        self.stats = Some(snapshot);
        self
    }

    /// The shards' mailboxes, `[i]` for shard `i` (a transport may hand them work of its own).
    pub fn shards(&self) -> &[ShardSender<ShardRequest>] {
        &self.shards
    }

    /// Whether serving a request of `op` may block the calling thread on disk: on a writable
    /// mount everything the overlay answers (its journal is written and synced); never the
    /// requests this dispatcher only hands to a shard, or answers from memory.
    pub fn may_block(&self, op: Op) -> bool {
        self.overlay.is_some()
            && !matches!(
                op,
                Op::Read | Op::Write | Op::Release | Op::Flush | Op::Fallocate
            )
    }

    /// Serves `request`: answers it here or hands it to its owner shard.
    pub fn dispatch(&self, request: Request<'_>) {
        self.ops.request(request.op());
        let Some(request) = self.answer_stats(request) else {
            return;
        };
        if let Some(overlay) = &self.overlay {
            return self.dispatch_writable(overlay, request);
        }
        match request {
            Request::Lookup {
                parent,
                name,
                reply,
            } => match self.lookup(parent, name) {
                Ok(attributes) => reply.entry(&attributes),
                Err(error) => fail(&self.ops, reply, Op::Lookup, parent, error),
            },
            Request::GetAttr { ino, reply } => match self.attributes(ino) {
                Ok(attributes) => reply.attr(&attributes),
                Err(error) => fail(&self.ops, reply, Op::GetAttr, ino, error),
            },
            Request::ReadLink { ino, reply } => match self.namespace.readlink(ino) {
                Some(target) => reply.bytes(target),
                None => fail(
                    &self.ops,
                    reply,
                    Op::ReadLink,
                    ino,
                    FsError::NotSymbolicLink,
                ),
            },
            Request::Open(open) => match self.check_open(&open) {
                Ok(()) => self.route(open.ino, ShardRequest::Open(open)),
                Err(error) => fail(&self.ops, open.reply, Op::Open, open.ino, error),
            },
            Request::Read(read) => self.route(read.ino, ShardRequest::Read(read, None)),
            Request::Release(release) => self.route(release.ino, ShardRequest::Release(release)),
            // Nothing is ever dirty on a read-only mount.
            Request::Flush { reply, .. } | Request::ReleaseDir { reply, .. } => reply.ok(),
            Request::OpenDir { ino, reply } => match self.directory(ino) {
                Ok(()) => reply.opened(0, true),
                Err(error) => fail(&self.ops, reply, Op::OpenDir, ino, error),
            },
            Request::ReadDir {
                ino,
                offset,
                mut reply,
                ..
            } => match self.directory(ino) {
                Ok(()) => {
                    self.list(ino, offset, &mut *reply);
                    reply.ok();
                }
                Err(error) => fail(&self.ops, reply, Op::ReadDir, ino, error),
            },
            Request::ReadDirPlus {
                ino,
                offset,
                mut reply,
                ..
            } => match self.directory(ino) {
                Ok(()) => {
                    self.list_plus(ino, offset, &mut *reply);
                    reply.ok();
                }
                Err(error) => fail(&self.ops, reply, Op::ReadDirPlus, ino, error),
            },
            Request::StatFs { reply } => reply.statfs(&self.statfs()),
            Request::Access { ino, mask, reply } => match self.access(ino, mask) {
                Ok(()) => reply.ok(),
                Err(error) => fail(&self.ops, reply, Op::Access, ino, error),
            },
            Request::GetXattr { ino, reply, .. } => match self.attributes(ino) {
                // No file has extended attributes.
                Ok(_) => fail(&self.ops, reply, Op::GetXattr, ino, FsError::NoAttribute),
                Err(error) => fail(&self.ops, reply, Op::GetXattr, ino, error),
            },
            Request::ListXattr { ino, size, reply } => match self.attributes(ino) {
                // No attributes: the list is empty, whether the caller asks for its size or
                // content.
                Ok(_) if size == 0 => reply.size(0),
                Ok(_) => reply.data(&[]),
                Err(error) => fail(&self.ops, reply, Op::ListXattr, ino, error),
            },
            change => {
                let op = change.op();
                let (reply, ino) = change.into_reply();
                fail(&self.ops, reply, op, ino, FsError::ReadOnly);
            }
        }
    }

    /// Serves `request`, which arrived on shard `here` (a transport that receives requests on
    /// the shards themselves calls this on that shard's thread): on a read-only mount a READ
    /// of an inode another shard owns is served from `here`'s replica of its block when it has
    /// one (`fs::shard::replica`), and otherwise forwarded as by [`Dispatcher::dispatch`],
    /// asking the owner for that replica. True when `here` served it from a replica.
    pub fn dispatch_on(&self, here: &LocalShard, request: Request<'_>) -> bool {
        match request {
            Request::Read(read) if self.overlay.is_none() && self.owner(read.ino) != here.id() => {
                self.ops.request(Op::Read);
                match here.read_replicated(read) {
                    Ok(()) => true,
                    Err((read, replica)) => {
                        self.route(read.ino, ShardRequest::Read(read, replica));
                        false
                    }
                }
            }
            request => {
                self.dispatch(request);
                false
            }
        }
    }

    /// Answers a `getxattr` of [`STATS_XATTR`] on the root; gives any other request back.
    fn answer_stats<'a>(&self, request: Request<'a>) -> Option<Request<'a>> {
        match (request, &self.stats) {
            (
                Request::GetXattr {
                    ino: ROOT_INO,
                    name,
                    size,
                    reply,
                },
                Some(snapshot),
            ) if name == STATS_XATTR.as_bytes() => {
                let value = snapshot();
                if size == 0 {
                    reply.size(value.len() as u32);
                } else if (size as usize) < value.len() {
                    fail(&self.ops, reply, Op::GetXattr, ROOT_INO, FsError::Range);
                } else {
                    reply.data(value.as_bytes());
                }
                None
            }
            (other, _) => Some(other),
        }
    }

    /// Hands a data request to the inode's owner shard. A shard that is gone (shutting down)
    /// fails the request.
    /// The shard that owns inode `ino` and serves its data requests.
    pub fn owner(&self, ino: Ino) -> usize {
        owner(ino, self.shards.len())
    }

    pub(super) fn route(&self, ino: Ino, request: ShardRequest) {
        let shard = self.owner(ino);
        if let Err(unsent) = self.shards[shard].send(request) {
            tracing::warn!(shard, ino, "shard mailbox closed; request failed");
            unsent.msg.fail(&self.ops, FsError::ShuttingDown);
        }
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attributes, FsError> {
        crate::overlay::check_name(name)?;
        let ino = self
            .namespace
            .lookup(parent, name)
            .ok_or(FsError::NotFound)?;
        self.attributes(ino)
    }

    fn attributes(&self, ino: Ino) -> Result<Attributes, FsError> {
        let attr = self.namespace.attr(ino).ok_or(FsError::NotFound)?;
        Ok(self.present(&attr))
    }

    fn present(&self, attr: &Attr) -> Attributes {
        Attributes {
            ino: attr.ino,
            size: attr.size,
            blocks: attr.size.div_ceil(512),
            atime: system_time(attr.mtime_us),
            mtime: system_time(attr.mtime_us),
            ctime: system_time(attr.mtime_us),
            kind: attr.kind,
            perm: attr.perm,
            nlink: attr.nlink,
            uid: self.uid,
            gid: self.gid,
            blksize: PREFERRED_IO_SIZE,
            ttl: ATTR_TTL,
        }
    }

    /// Only reading opens of files reach a shard.
    fn check_open(&self, open: &Open) -> Result<(), FsError> {
        if open.flags & libc::O_ACCMODE != libc::O_RDONLY || open.flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        openable(self.namespace.attr(open.ino).map(|a| a.kind))
    }

    fn directory(&self, ino: Ino) -> Result<(), FsError> {
        match self.namespace.child_count(ino) {
            Some(_) => Ok(()),
            None if self.namespace.attr(ino).is_some() => Err(FsError::NotDirectory),
            None => Err(FsError::NotFound),
        }
    }

    fn access(&self, ino: Ino, mask: i32) -> Result<(), FsError> {
        if self.namespace.attr(ino).is_none() {
            Err(FsError::NotFound)
        } else if mask & libc::W_OK != 0 {
            Err(FsError::ReadOnly)
        } else {
            // Permission bits are enforced by the kernel (`default_permissions`).
            Ok(())
        }
    }

    fn statfs(&self) -> StatFs {
        const BLOCK: u32 = 4096;
        StatFs {
            blocks: self.namespace.total_size().div_ceil(BLOCK as u64),
            blocks_free: 0,
            blocks_available: 0,
            files: self.namespace.len() as u64,
            files_free: 0,
            block_size: BLOCK,
            name_len: 255,
        }
    }

    /// A directory's entries from position `offset` on: 0 is `.`, 1 is `..`, `2 + i` is child
    /// `i` in name order.
    fn entries(&self, dir: Ino, offset: u64) -> impl Iterator<Item = (u64, Ino, &[u8])> + '_ {
        let ns = &self.namespace;
        let parent = ns.parent(dir).unwrap_or(dir);
        (offset..).map_while(move |position| match position {
            0 => Some((position, dir, &b"."[..])),
            1 => Some((position, parent, &b".."[..])),
            n => ns
                .child_at(dir, (n - 2) as usize)
                .map(|(child, name, _)| (position, child, name)),
        })
    }

    fn list(&self, dir: Ino, offset: u64, reply: &mut dyn DirReply) {
        for (position, entry, name) in self.entries(dir, offset) {
            let kind = self
                .namespace
                .attr(entry)
                .map_or(NodeKind::File, |a| a.kind);
            if reply.add(entry, position + 1, kind, name) {
                break;
            }
        }
    }

    fn list_plus(&self, dir: Ino, offset: u64, reply: &mut dyn DirPlusReply) {
        for (position, entry, name) in self.entries(dir, offset) {
            let Some(attr) = self.namespace.attr(entry) else {
                break;
            };
            if reply.add(position + 1, name, &self.present(&attr)) {
                break;
            }
        }
    }
}

/// Whether a node of `kind` can be opened as a file (the kernel opens FIFOs itself).
pub(super) fn openable(kind: Option<NodeKind>) -> Result<(), FsError> {
    match kind {
        Some(NodeKind::File) => Ok(()),
        Some(NodeKind::Dir) => Err(FsError::IsDirectory),
        Some(NodeKind::Symlink) => Err(FsError::SymbolicLink),
        Some(NodeKind::Fifo) => Err(FsError::Invalid),
        None => Err(FsError::NotFound),
    }
}

/// Manifest mtimes are microseconds since the epoch; negative ones are before it.
fn system_time(mtime_us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(mtime_us.unsigned_abs());
    if mtime_us >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use std::time::Instant;

    use mount_vfs_executors::{ShardConfig, Shards};

    use super::*;
    use crate::fs::request::{Read, Request};
    use crate::fs::testing::{capture, namespace, Listing};
    use crate::namespace::ROOT_INO;

    fn dispatcher() -> (Dispatcher, Arc<Namespace>) {
        let ns = namespace(&[("a", b"hello"), ("b", b"")]);
        (Dispatcher::new(ns.clone(), Vec::new(), Arc::default()), ns)
    }

    fn lookup(d: &Dispatcher, parent: Ino, name: &str) -> Result<Attributes, FsError> {
        let (reply, answer) = capture::<Attributes>();
        d.dispatch(Request::Lookup {
            parent,
            name: name.as_bytes(),
            reply,
        });
        answer.try_recv().unwrap()
    }

    #[test]
    fn metadata_is_answered_inline_with_the_namespace_errnos() {
        let (d, ns) = dispatcher();
        let a = lookup(&d, ROOT_INO, "a").unwrap();
        assert_eq!(
            (a.size, a.kind, a.perm, a.blocks),
            (5, NodeKind::File, 0o644, 1)
        );
        assert_eq!(lookup(&d, ROOT_INO, "nope"), Err(FsError::NotFound));
        let dir = lookup(&d, ROOT_INO, "dir").unwrap().ino;
        let link = lookup(&d, ROOT_INO, "link").unwrap().ino;

        let (reply, answer) = capture::<Vec<u8>>();
        d.dispatch(Request::ReadLink { ino: link, reply });
        assert_eq!(answer.try_recv().unwrap().unwrap(), b"a");
        let (reply, answer) = capture::<Vec<u8>>();
        d.dispatch(Request::ReadLink { ino: a.ino, reply });
        let error = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(error.errno(), libc::EINVAL);

        let (reply, answer) = capture::<u64>();
        d.dispatch(Request::OpenDir { ino: a.ino, reply });
        assert_eq!(
            answer.try_recv().unwrap().unwrap_err().errno(),
            libc::ENOTDIR
        );
        let (reply, answer) = capture::<u64>();
        d.dispatch(Request::OpenDir { ino: 999, reply });
        assert_eq!(
            answer.try_recv().unwrap().unwrap_err().errno(),
            libc::ENOENT
        );

        let (tx, listed) = mpsc::channel();
        let reply = Box::new(Listing {
            names: Vec::new(),
            room: 3,
            done: tx,
        });
        d.dispatch(Request::ReadDir {
            ino: ROOT_INO,
            fh: 0,
            offset: 0,
            reply,
        });
        let names: Vec<Vec<u8>> = listed
            .try_recv()
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [&b"."[..], b"..", b"a"],
            "a full reply stops the listing"
        );
        let (tx, listed) = mpsc::channel();
        let reply = Box::new(Listing {
            names: Vec::new(),
            room: 10,
            done: tx,
        });
        d.dispatch(Request::ReadDirPlus {
            ino: ROOT_INO,
            fh: 0,
            offset: 3,
            reply,
        });
        let rest = listed.try_recv().unwrap().unwrap();
        assert_eq!(
            rest,
            [
                (b"b".to_vec(), NodeKind::File),
                (b"dir".to_vec(), NodeKind::Dir),
                (b"link".to_vec(), NodeKind::Symlink),
            ]
        );

        let (reply, answer) = capture::<()>();
        d.dispatch(Request::Access {
            ino: a.ino,
            mask: libc::R_OK,
            reply,
        });
        assert_eq!(answer.try_recv().unwrap(), Ok(()));
        let (reply, answer) = capture::<()>();
        d.dispatch(Request::Access {
            ino: dir,
            mask: libc::W_OK,
            reply,
        });
        assert_eq!(answer.try_recv().unwrap().unwrap_err().errno(), libc::EROFS);

        let (reply, answer) = capture::<Result<u32, Vec<u8>>>();
        d.dispatch(Request::GetXattr {
            ino: a.ino,
            name: b"user.x",
            size: 0,
            reply,
        });
        assert_eq!(
            answer.try_recv().unwrap().unwrap_err().errno(),
            libc::ENODATA
        );
        let (reply, answer) = capture::<Result<u32, Vec<u8>>>();
        d.dispatch(Request::ListXattr {
            ino: a.ino,
            size: 0,
            reply,
        });
        assert_eq!(answer.try_recv().unwrap(), Ok(Ok(0)));

        let (reply, answer) = capture::<StatFs>();
        d.dispatch(Request::StatFs { reply });
        let totals = answer.try_recv().unwrap().unwrap();
        assert_eq!((totals.blocks, totals.files), (1, ns.len() as u64));
    }

    #[test]
    fn the_root_answers_the_stats_attribute_and_nothing_else_changes() {
        let (d, _) = dispatcher();
        let value = r#"{"shards":[]}"#;
        let d = d.stats(Box::new(move || value.to_owned()));
        let get = |ino, name: &'static str, size| {
            let (reply, answer) = capture::<Result<u32, Vec<u8>>>();
            d.dispatch(Request::GetXattr {
                ino,
                name: name.as_bytes(),
                size,
                reply,
            });
            answer.try_recv().unwrap()
        };
        let errno = |answer: Result<_, FsError>| answer.unwrap_err().errno();
        assert_eq!(get(ROOT_INO, STATS_XATTR, 0), Ok(Ok(value.len() as u32)));
        assert_eq!(
            get(ROOT_INO, STATS_XATTR, 64),
            Ok(Err(value.as_bytes().to_vec()))
        );
        assert_eq!(errno(get(ROOT_INO, STATS_XATTR, 4)), libc::ERANGE);
        let a = lookup(&d, ROOT_INO, "a").unwrap().ino;
        assert_eq!(errno(get(a, STATS_XATTR, 64)), libc::ENODATA);
        assert_eq!(errno(get(ROOT_INO, "user.other", 64)), libc::ENODATA);
    }

    #[test]
    fn opens_that_cannot_be_served_are_refused_before_routing() {
        let (d, _) = dispatcher();
        let a = lookup(&d, ROOT_INO, "a").unwrap().ino;
        let dir = lookup(&d, ROOT_INO, "dir").unwrap().ino;
        let link = lookup(&d, ROOT_INO, "link").unwrap().ino;
        let cases = [
            (a, libc::O_WRONLY, libc::EROFS),
            (a, libc::O_RDWR, libc::EROFS),
            (a, libc::O_RDONLY | libc::O_TRUNC, libc::EROFS),
            (dir, libc::O_RDONLY, libc::EISDIR),
            (link, libc::O_RDONLY, libc::ELOOP),
            (999, libc::O_RDONLY, libc::ENOENT),
        ];
        for (ino, flags, errno) in cases {
            let (reply, answer) = capture::<(u64, bool)>();
            d.dispatch(Request::Open(Open {
                ino,
                flags,
                received: Instant::now(),
                reply,
            }));
            let error = answer.try_recv().unwrap().unwrap_err();
            assert_eq!(error.errno(), errno, "ino {ino} flags {flags:#o}");
        }
    }

    #[test]
    fn a_request_for_a_stopped_shard_fails_instead_of_vanishing() {
        let shards = Shards::<ShardRequest>::start(
            &ShardConfig::plain(1, 2 << 20),
            |_ctx, _mailbox| async {},
        )
        .unwrap();
        let sender = shards.sender(0).clone();
        shards.shutdown().unwrap();
        let ns = namespace(&[("a", b"x")]);
        let a = ns.lookup(ROOT_INO, b"a").unwrap();
        let ops = Arc::new(OpCounters::default());
        let d = Dispatcher::new(ns, vec![sender], ops.clone());
        let (reply, answer) = capture::<Vec<u8>>();
        d.dispatch(Request::Read(Read {
            ino: a,
            fh: 1,
            offset: 0,
            size: 1,
            received: std::time::Instant::now(),
            reply,
        }));
        let error = answer.try_recv().unwrap().unwrap_err();
        assert_eq!((error, error.errno()), (FsError::ShuttingDown, libc::EIO));
        assert_eq!(ops.requests(Op::Read), 1);
        let failures: Vec<_> = ops.failures(Op::Read).collect();
        assert_eq!(failures, [(FsError::ShuttingDown, 1)]);
    }
}
