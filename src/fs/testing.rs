//! Test support for the core without a kernel: replies that capture what they were answered
//! with, namespaces built from in-memory objects, and a one-shard runtime.

use std::fs::File;
use std::sync::mpsc;
use std::sync::Arc;

use mount_vfs_executors::{run_on_one_shard, BufferPool, ShardConfig};

use super::request::{
    AttrReply, Attributes, BackingFile, BytesReply, DirPlusReply, DirReply, EmptyReply, EntryReply,
    OpenDirReply, OpenReply, Opened, ReadReply, Reply, StatFs, StatFsReply, XattrReply,
};
use super::{FsError, ReadData};
use crate::manifest::{Content, EntryKind, EntryRef, FileEntry, Hash};
use crate::namespace::{Ino, Namespace, NodeKind};

/// A reply that sends what it was answered with down a channel.
pub struct Capture<T>(pub mpsc::Sender<Result<T, FsError>>);

/// A capturing reply and the receiver of its answer.
pub fn capture<T>() -> (Box<Capture<T>>, mpsc::Receiver<Result<T, FsError>>) {
    let (tx, rx) = mpsc::channel();
    (Box::new(Capture(tx)), rx)
}

impl<T: Send> Capture<T> {
    fn send(self, value: T) {
        let _ = self.0.send(Ok(value));
    }
}

impl<T: Send> Reply for Capture<T> {
    fn error(self: Box<Self>, error: FsError) {
        let _ = self.0.send(Err(error));
    }
}

impl ReadReply for Capture<Vec<u8>> {
    fn data(self: Box<Self>, data: ReadData) {
        (*self).send(data.bytes().to_vec());
    }
}

impl BytesReply for Capture<Vec<u8>> {
    fn bytes(self: Box<Self>, bytes: &[u8]) {
        (*self).send(bytes.to_vec());
    }
}

/// An open answered with (file handle, passthrough?).
impl OpenReply for Capture<(u64, bool)> {
    fn backing_file(&self, _file: &File) -> std::io::Result<BackingFile> {
        Err(std::io::Error::other(
            "no kernel to register a backing file with",
        ))
    }

    fn opened(self: Box<Self>, fh: u64, how: Opened<'_>) {
        let passthrough = matches!(how, Opened::Passthrough(_));
        (*self).send((fh, passthrough));
    }
}

impl OpenDirReply for Capture<u64> {
    fn opened(self: Box<Self>, fh: u64, _cacheable: bool) {
        (*self).send(fh);
    }
}

impl EmptyReply for Capture<()> {
    fn ok(self: Box<Self>) {
        (*self).send(());
    }
}

impl EntryReply for Capture<Attributes> {
    fn entry(self: Box<Self>, attributes: &Attributes) {
        (*self).send(*attributes);
    }
}

impl AttrReply for Capture<Attributes> {
    fn attr(self: Box<Self>, attributes: &Attributes) {
        (*self).send(*attributes);
    }
}

impl StatFsReply for Capture<StatFs> {
    fn statfs(self: Box<Self>, totals: &StatFs) {
        (*self).send(*totals);
    }
}

/// An xattr answer: `Ok(size)` or the bytes.
impl XattrReply for Capture<Result<u32, Vec<u8>>> {
    fn size(self: Box<Self>, size: u32) {
        (*self).send(Ok(size));
    }

    fn data(self: Box<Self>, bytes: &[u8]) {
        (*self).send(Err(bytes.to_vec()));
    }
}

/// Names and kinds of directory entries, in order.
pub type Entries = Vec<(Vec<u8>, NodeKind)>;

/// A listing: the entries collected until `room` of them fill the reply.
pub struct Listing {
    pub names: Entries,
    pub room: usize,
    pub done: mpsc::Sender<Result<Entries, FsError>>,
}

impl Reply for Listing {
    fn error(self: Box<Self>, error: FsError) {
        let _ = self.done.send(Err(error));
    }
}

impl DirReply for Listing {
    fn add(&mut self, _ino: Ino, _next: u64, kind: NodeKind, name: &[u8]) -> bool {
        if self.names.len() == self.room {
            return true;
        }
        self.names.push((name.to_vec(), kind));
        false
    }

    fn ok(self: Box<Self>) {
        let _ = self.done.send(Ok(self.names));
    }
}

impl DirPlusReply for Listing {
    fn add(&mut self, _next: u64, name: &[u8], attributes: &Attributes) -> bool {
        DirReply::add(self, attributes.ino, 0, attributes.kind, name)
    }

    fn ok(self: Box<Self>) {
        DirReply::ok(self);
    }
}

/// A namespace with one file per `(name, object)`, each file one v2023 object, plus a
/// directory `dir/` holding `dir/inner` and a symlink `link -> a`.
pub fn namespace(files: &[(&str, &[u8])]) -> Arc<Namespace> {
    let mut entries: Vec<EntryRef<'_>> = files
        .iter()
        .map(|(name, bytes)| EntryRef {
            path: name.as_bytes(),
            kind: EntryKind::File(FileEntry {
                size: bytes.len() as u64,
                mtime_us: 1_700_000_000_000_000,
                executable: false,
                content: Content::Whole(Hash::of(bytes)),
            }),
        })
        .collect();
    entries.push(EntryRef {
        path: b"dir/inner",
        kind: EntryKind::Dir,
    });
    entries.push(EntryRef {
        path: b"link",
        kind: EntryKind::Symlink { target: b"a" },
    });
    Arc::new(Namespace::build(entries).expect("a valid namespace"))
}

/// `len` bytes that differ per `seed` and per position (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Runs `body` on one fresh shard with a `pool_bytes` pool and returns its result.
pub fn on_shard<T, F, Fut>(pool_bytes: usize, body: F) -> T
where
    T: Send + 'static,
    F: FnOnce(BufferPool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    run_on_one_shard(&ShardConfig::plain(1, pool_bytes), body).expect("the shard ran the body")
}
