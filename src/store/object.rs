//! What every store shares: the bytes of an object range ([`Block`]), the range itself
//! ([`ObjectRange`]), object keys, the per-shard table of open object files, and the one writer
//! that puts a new object into a CAS directory ([`CasWriter`], used by `snapshot` and the disk
//! cache).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use glommio::io::ReadResult;
use mount_vfs_executors::{PoolBuffer, Reservation};

use crate::manifest::Hash;

/// Object key suffix used by the Deadline client for xxh128-named objects.
pub const OBJECT_SUFFIX: &str = ".xxh128";

/// `Data/{hash}.xxh128`: an object's key relative to the CAS root (directory or S3 root prefix).
pub fn object_key(hash: Hash) -> String {
    format!("Data/{hash}{OBJECT_SUFFIX}")
}

/// Bytes `[offset, offset + len)` of object `hash`, whose full length is `object_len`. Callers
/// keep the range inside the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRange {
    pub hash: Hash,
    pub object_len: u64,
    pub offset: u64,
    pub len: usize,
}

/// Bytes of one object range, in the shard's registered memory. Not yet trusted: only
/// verification turns a block into something a reply may send (`fs::VerifiedBlock`).
pub struct Block {
    data: BlockData,
}

enum BlockData {
    /// Filled by one `read_at`: glommio allocated it from the arena; we hold its accounting.
    Read {
        data: ReadResult,
        /// Held only for its `Drop`: returns the bytes to the pool's accounting.
        _accounting: Reservation,
    },
    /// Assembled from several reads (short reads), or filled by a socket.
    Owned(PoolBuffer, usize),
    /// The empty range.
    Empty,
}

impl Block {
    pub fn empty() -> Block {
        Block {
            data: BlockData::Empty,
        }
    }

    /// A buffer glommio filled and allocated from the arena, under `accounting`.
    pub fn from_read(data: ReadResult, accounting: Reservation) -> Block {
        Block {
            data: BlockData::Read {
                data,
                _accounting: accounting,
            },
        }
    }

    /// The first `len` bytes of `buffer` (filled by a socket read, for example).
    pub fn from_pool(buffer: PoolBuffer, len: usize) -> Block {
        debug_assert!(len <= buffer.len());
        Block {
            data: BlockData::Owned(buffer, len),
        }
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.data {
            BlockData::Read { data, .. } => data,
            BlockData::Owned(buffer, len) => &buffer[..*len],
            BlockData::Empty => &[],
        }
    }
}

/// Object files a shard keeps open, by hash. Past [`OpenFiles::LIMIT`] the table is cleared:
/// objects are large and read sequentially, so reopening is rare and cheap next to the reads.
pub(crate) struct OpenFiles<F> {
    files: RefCell<HashMap<Hash, Rc<F>>>,
}

impl<F> OpenFiles<F> {
    const LIMIT: usize = 256;

    pub fn new() -> OpenFiles<F> {
        OpenFiles {
            files: RefCell::new(HashMap::new()),
        }
    }

    pub fn get(&self, hash: Hash) -> Option<Rc<F>> {
        self.files.borrow().get(&hash).cloned()
    }

    pub fn insert(&self, hash: Hash, file: F) -> Rc<F> {
        let file = Rc::new(file);
        let mut files = self.files.borrow_mut();
        if files.len() >= Self::LIMIT {
            files.clear();
        }
        files.insert(hash, file.clone());
        file
    }

    /// Closes object `hash` (its file is about to be deleted or replaced).
    pub fn forget(&self, hash: Hash) {
        self.files.borrow_mut().remove(&hash);
    }
}

/// A new object being written into a CAS directory (`ROOT/Data/`): under a temporary name
/// `.{name}.partial-{pid}-{writer}` until [`commit`](Self::commit) renames it to
/// `{hash}.xxh128`. Dropped uncommitted, it deletes its temporary file, so a failed or abandoned
/// write leaves nothing; after a crash the pid in the name lets the next start remove it
/// ([`partial_owner`]). No fsync: a torn object fails its hash and is written again.
pub struct CasWriter {
    /// Shared with the writes in flight on the executor's blocking thread.
    file: Arc<File>,
    temporary: PathBuf,
    committed: bool,
}

impl CasWriter {
    /// Starts an object in `root/Data/`; `name` and `writer` make the temporary name unique
    /// among this process's writers.
    pub fn create(root: &Path, name: &str, writer: usize) -> io::Result<CasWriter> {
        let temporary = root
            .join("Data")
            .join(format!(".{name}.partial-{}-{writer}", std::process::id()));
        let file = Arc::new(File::create(&temporary)?);
        Ok(CasWriter {
            file,
            temporary,
            committed: false,
        })
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Writes `block` at `offset` off the shard (see [`write_block_off_executor`]).
    pub fn write_block_off_executor(
        &self,
        offset: u64,
        block: Block,
    ) -> impl std::future::Future<Output = (Block, io::Result<()>)> + 'static {
        write_block_off_executor(self.file.clone(), offset, block)
    }

    /// Puts the object in place as `root/Data/{hash}.xxh128`, replacing any file of that name
    /// (the caller vouches for the bytes: verified, or hashed as they were written).
    pub fn commit(mut self, hash: Hash) -> io::Result<()> {
        let target = self
            .temporary
            .with_file_name(format!("{hash}{OBJECT_SUFFIX}"));
        std::fs::rename(&self.temporary, target)?;
        self.committed = true;
        Ok(())
    }

    /// The temporary file, for messages.
    pub fn temporary(&self) -> &Path {
        &self.temporary
    }
}

/// Bytes that stay at their address while their owner moves: a [`Block`] (its bytes are in the
/// arena or a pool buffer) and a block shared by `Rc`. A write off the executor reads them from
/// another thread while the future that owns them is moved and polled.
///
/// # Safety
/// `bytes` must return the same memory for the owner's whole life, however it is moved.
pub unsafe trait StableBytes: 'static {
    fn bytes(&self) -> &[u8];
}

// SAFETY: a block's bytes live in the arena or in a pool buffer, never inline.
unsafe impl StableBytes for Block {
    fn bytes(&self) -> &[u8] {
        self
    }
}

// SAFETY: an `Rc`'s value lives on the heap, and the block's bytes do not move with it.
unsafe impl StableBytes for Rc<Block> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Writes `block` at `offset` of `file` on the glommio executor's blocking thread, so the copy
/// into the page cache does not run on the shard, and hands the block back with the outcome.
/// The block stays alive until the write is done: dropping the future early waits for the write
/// to finish before the block is freed.
pub(super) async fn write_block_off_executor<B: StableBytes>(
    file: Arc<File>,
    offset: u64,
    block: B,
) -> (B, io::Result<()>) {
    // Declared first, so dropped last: after `_wait` saw the write end.
    let block = block;
    let done = Arc::new(AtomicBool::new(false));
    let bytes = SendBytes(block.bytes().as_ptr(), block.bytes().len());
    let finished = Finished(done.clone());
    let write = glommio::executor().spawn_blocking(move || {
        let _finished = finished;
        // SAFETY: the block these bytes belong to is freed only after `done` is set (by
        // `_finished`, when this closure returns or is dropped unrun): the future owns it, and
        // `_wait` below holds a dropped future until then.
        file.write_all_at(unsafe { bytes.as_slice() }, offset)
    });
    let _wait = WaitFor(done);
    let result = write.await;
    (block, result)
}

/// The bytes of a [`Block`] lent to the blocking thread for one write.
struct SendBytes(*const u8, usize);

// SAFETY: only read, and only while the block is kept alive (see `write_block_off_executor`).
unsafe impl Send for SendBytes {}

impl SendBytes {
    /// # Safety
    /// The block must still be alive.
    unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.0, self.1)
    }
}

/// Sets its flag when dropped: the blocking write is over, or will never run.
struct Finished(Arc<AtomicBool>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Waits, when dropped, until the blocking write is over (a future dropped mid-write).
struct WaitFor(Arc<AtomicBool>);

impl Drop for WaitFor {
    fn drop(&mut self) {
        while !self.0.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
}

impl Drop for CasWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// The pid in a temporary file's name `.{name}.partial-{pid}-{writer}`.
pub fn partial_owner(name: &str) -> Option<u32> {
    let (_, owner) = name.strip_prefix('.')?.split_once(".partial-")?;
    owner.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_carry_their_owner() {
        assert_eq!(partial_owner(".0011.partial-4242-3"), Some(4242));
        assert_eq!(partial_owner("0011.xxh128"), None);
        assert_eq!(partial_owner(".write-test-12"), None);
    }

    #[test]
    fn uncommitted_writers_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("Data")).unwrap();
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path().join("Data"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let writer = CasWriter::create(dir.path(), "x", 0).unwrap();
        writer.write_at(0, b"abc").unwrap();
        assert_eq!(partial_owner(&listing()[0]), Some(std::process::id()));
        drop(writer);
        assert!(listing().is_empty());
        let writer = CasWriter::create(dir.path(), "x", 0).unwrap();
        writer.write_at(0, b"abc").unwrap();
        writer.commit(Hash(7)).unwrap();
        assert_eq!(listing(), [format!("{}{OBJECT_SUFFIX}", Hash(7))]);
    }
}
