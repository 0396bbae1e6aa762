//! Spill files: a mount without a disk cache still fetches each byte from the store once. When
//! an object is too large to stay in its shard's pool, the blocks its verification stream does
//! not keep in memory are written, as they pass, to an unnamed file (`O_TMPFILE`) in a scratch
//! directory; once the object verified, those blocks come from that file instead of a second GET,
//! and are served only if they keep the digest they had when the object was verified. Blocks
//! kept in memory are not written (they are served from there): the file is sparse, and knows
//! which blocks it holds.
//!
//! Rules:
//! - The file has no name: a crash or a kill leaves nothing behind, and closing it frees its
//!   space. A shard keeps its spill files within a byte budget and closes the least recently
//!   used to make room; an object larger than the budget is not spilled (it is fetched again,
//!   as before spill files).
//! - The file is opened `O_DIRECT` where its filesystem allows: blocks go from the shard's
//!   registered buffers to the disk and back by DMA, without a page-cache copy either way, which
//!   cost more than the second GET it saves (docs/benchmarks.md, "Spill files"). Direct writes
//!   need 4 KiB-aligned blocks; a block that is not (an object's short last block) is not
//!   spilled. Elsewhere the file is buffered. Writes run on the shard's blocking thread, like
//!   the disk cache's ([`write_block_off_executor`]); reads are io_uring reads into the shard's
//!   arena.
//! - A spill file is private to its shard and to this mount, and never trusted without the
//!   block digests of its verification.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use futures::future::{FutureExt, LocalBoxFuture};
use glommio::io::BufferedFile;
use mount_vfs_executors::{BufferPool, Reservation};

use super::object::write_block_off_executor;
use super::{cache_room, Block, ObjectRange, ObjectStore, StoreError};
use crate::manifest::Hash;

/// Where shards spill, and how much each may hold (found by [`SpillConfig::probe`]).
#[derive(Clone, Debug)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bytes of spill files one shard may hold at once.
    pub budget_per_shard: u64,
    /// Whether `dir` takes `O_DIRECT` opens.
    pub direct_io: bool,
}

impl SpillConfig {
    /// Spill files go to `$TMPDIR`, else `/var/tmp`, and may take a quarter of what that
    /// filesystem can spare, shared by `shards`. `Err` says why there is no spill (a directory
    /// that refuses unnamed files, no room).
    pub fn probe(shards: usize) -> Result<SpillConfig, String> {
        let dir = std::env::var_os("TMPDIR")
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        let budget_per_shard = cache_room(&dir, None) / 4 / shards.max(1) as u64;
        let config = SpillConfig::at(dir, budget_per_shard)?;
        if config.budget_per_shard == 0 {
            return Err(format!("no room in {}", config.dir.display()));
        }
        Ok(config)
    }

    /// Spill files in `dir`, `O_DIRECT` if it takes them; `Err` if it takes no unnamed files.
    pub fn at(dir: PathBuf, budget_per_shard: u64) -> Result<SpillConfig, String> {
        let direct_io = unnamed_file(&dir, true).is_ok();
        if !direct_io {
            unnamed_file(&dir, false)
                .map_err(|e| format!("cannot create unnamed files in {}: {e}", dir.display()))?;
        }
        Ok(SpillConfig {
            dir,
            budget_per_shard,
            direct_io,
        })
    }
}

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;

/// An unnamed file in `dir`, open for reading and writing.
fn unnamed_file(dir: &Path, direct_io: bool) -> io::Result<File> {
    let direct = if direct_io { libc::O_DIRECT } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | direct)
        .mode(0o600)
        .open(dir)
}

/// Whether a spill file can take `bytes` at `offset`: a direct write needs them aligned.
fn takes(direct_io: bool, bytes: &[u8], offset: u64) -> bool {
    let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
    !direct_io
        || aligned(bytes.as_ptr() as usize) && aligned(bytes.len()) && aligned(offset as usize)
}

/// Notes that a spill file holds block `index`.
fn mark(blocks: &mut Vec<bool>, index: u32) {
    let index = index as usize;
    if blocks.len() <= index {
        blocks.resize(index + 1, false);
    }
    blocks[index] = true;
}

/// Bytes of the budget held by one spill file, given back when it is dropped.
struct Charge {
    used: Rc<Cell<u64>>,
    len: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.used.set(self.used.get() - self.len);
    }
}

/// One shard's spill files. `!Send`: it holds that shard's open files.
pub struct Spill {
    dir: PathBuf,
    direct_io: bool,
    budget: u64,
    used: Rc<Cell<u64>>,
    clock: Cell<u64>,
    /// Verified objects with a spill file, and when each was last read.
    files: RefCell<HashMap<Hash, Spilled>>,
    /// Whether a failure was already logged (one line per shard).
    warned: Cell<bool>,
}

struct Spilled {
    file: Rc<BufferedFile>,
    /// The same file, for blocks added after verification ([`Spill::add_block`]).
    writer: Arc<File>,
    /// Which blocks the file holds.
    blocks: Vec<bool>,
    used_at: u64,
    _charge: Charge,
}

/// An object being written to a new spill file by its verification stream. Dropped without
/// [`Spill::keep`], its file is closed and its space freed.
pub struct SpillWriter {
    file: Arc<File>,
    direct_io: bool,
    charge: Charge,
    blocks: Vec<bool>,
    bytes: u64,
}

impl SpillWriter {
    /// Writes `block`, block `index` of the object at `offset`, off the shard (see
    /// [`write_block_off_executor`]); a block a direct write cannot take is skipped.
    pub fn write_block_off_executor(
        &mut self,
        index: u32,
        offset: u64,
        block: Block,
    ) -> impl std::future::Future<Output = (Block, io::Result<()>)> + 'static {
        if !takes(self.direct_io, &block, offset) {
            return futures::future::Either::Left(async move { (block, Ok(())) });
        }
        mark(&mut self.blocks, index);
        self.bytes += block.len() as u64;
        futures::future::Either::Right(write_block_off_executor(self.file.clone(), offset, block))
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Spill {
    pub fn new(config: &SpillConfig) -> Spill {
        Spill {
            dir: config.dir.clone(),
            direct_io: config.direct_io,
            budget: config.budget_per_shard,
            used: Rc::default(),
            clock: Cell::new(0),
            files: RefCell::default(),
            warned: Cell::new(false),
        }
    }

    /// A new spill file for object `hash` of `len` bytes, after closing the least recently
    /// used files it needs the room of; `None` when it cannot have one.
    pub fn begin(&self, hash: Hash, len: u64) -> Option<SpillWriter> {
        if len > self.budget {
            return None;
        }
        self.forget(hash);
        while self.used.get() + len > self.budget {
            let oldest = self
                .files
                .borrow()
                .iter()
                .min_by_key(|(_, spilled)| spilled.used_at)
                .map(|(hash, _)| *hash);
            // Writers in flight hold the rest: no room now.
            self.forget(oldest?);
        }
        match unnamed_file(&self.dir, self.direct_io) {
            Ok(file) => {
                self.used.set(self.used.get() + len);
                Some(SpillWriter {
                    file: Arc::new(file),
                    direct_io: self.direct_io,
                    charge: Charge {
                        used: self.used.clone(),
                        len,
                    },
                    blocks: Vec::new(),
                    bytes: 0,
                })
            }
            Err(e) => {
                self.warn(format_args!("cannot create a spill file: {e}"));
                None
            }
        }
    }

    /// Object `hash`, written through `writer`, verified: later reads of it may use the file.
    pub fn keep(&self, hash: Hash, writer: SpillWriter) {
        let SpillWriter {
            file,
            charge,
            blocks,
            ..
        } = writer;
        let fd = match file.try_clone() {
            Ok(file) => OwnedFd::from(file),
            Err(e) => return self.warn(format_args!("cannot open a spill file again: {e}")),
        };
        // SAFETY: the descriptor is ours (a new one for the same file), handed to glommio to own.
        let reader = unsafe { BufferedFile::from_raw_fd(fd.into_raw_fd()) };
        let spilled = Spilled {
            file: Rc::new(reader),
            writer: file,
            blocks,
            used_at: self.tick(),
            _charge: charge,
        };
        self.files.borrow_mut().insert(hash, spilled);
    }

    /// Adds block `index` of object `hash`, at `offset`, to the object's spill file (kept): a
    /// verified block leaving memory before it was read, so that its reader does not fetch it
    /// again. Resolves with the bytes written, once the file is marked as holding the block; 0
    /// when the object has no spill file (any more) or a direct write cannot take the block.
    pub async fn add_block(&self, hash: Hash, index: u32, offset: u64, block: Rc<Block>) -> u64 {
        let file = match self.files.borrow().get(&hash) {
            Some(spilled) if takes(self.direct_io, &block, offset) => spilled.writer.clone(),
            _ => return 0,
        };
        let len = block.len() as u64;
        let (_, written) = write_block_off_executor(file.clone(), offset, block).await;
        if let Err(e) = written {
            self.warn(format_args!("cannot write a spill file: {e}"));
            self.forget(hash);
            return 0;
        }
        let mut files = self.files.borrow_mut();
        // Only into the file written: the object's may have been closed, or replaced, meanwhile.
        match files.get_mut(&hash) {
            Some(spilled) if Arc::ptr_eq(&spilled.writer, &file) => {
                mark(&mut spilled.blocks, index);
                len
            }
            _ => 0,
        }
    }

    /// Whether object `hash` has a spill file.
    pub fn has_file(&self, hash: Hash) -> bool {
        self.files.borrow().contains_key(&hash)
    }

    /// Whether the spill file of object `hash` holds its block `index`.
    pub fn has(&self, hash: Hash, index: u32) -> bool {
        self.files
            .borrow()
            .get(&hash)
            .is_some_and(|spilled| spilled.blocks.get(index as usize) == Some(&true))
    }

    /// Closes the spill file of `hash`, if any (its bytes differ from the verified object, or
    /// its room is needed).
    pub fn forget(&self, hash: Hash) {
        self.files.borrow_mut().remove(&hash);
    }

    /// The descriptor of the spill file of `hash`, for tests that change its bytes.
    #[cfg(test)]
    pub fn raw_fd(&self, hash: Hash) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.files
            .borrow()
            .get(&hash)
            .map(|spilled| spilled.file.as_raw_fd())
    }

    /// Logs `what` once per shard: spill files are an economy, their failures cost a refetch.
    pub fn warn(&self, what: std::fmt::Arguments<'_>) {
        if !self.warned.replace(true) {
            tracing::warn!("{what}; objects that do not fit in memory are fetched again instead");
        }
    }

    fn tick(&self) -> u64 {
        self.clock.set(self.clock.get() + 1);
        self.clock.get()
    }

    async fn read_range(
        &self,
        memory: Reservation,
        range: ObjectRange,
    ) -> Result<Block, StoreError> {
        let io = |source: io::Error| StoreError::Io {
            location: self.location(range.hash),
            source,
        };
        let file = {
            let mut files = self.files.borrow_mut();
            let used_at = self.tick();
            let spilled = files
                .get_mut(&range.hash)
                .ok_or_else(|| io(io::ErrorKind::NotFound.into()))?;
            spilled.used_at = used_at;
            spilled.file.clone()
        };
        // These reads allocate exactly `len` from the arena (the caller's grant covers it), at a
        // 4 KiB-aligned address: a direct read of a spilled block, which is aligned, can take it.
        let data = file
            .read_at(range.offset, range.len)
            .await
            .map_err(|e| io(e.into()))?;
        Ok(Block::from_read(data, memory))
    }
}

impl ObjectStore for Spill {
    fn read<'a>(
        &'a self,
        _pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>> {
        self.read_range(memory, range).boxed_local()
    }

    fn location(&self, hash: Hash) -> PathBuf {
        self.dir.join(format!("(spill file of {hash})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill(budget: u64) -> Spill {
        Spill::new(&SpillConfig::at(std::env::temp_dir(), budget).unwrap())
    }

    #[test]
    fn files_past_the_budget_close_the_least_recently_used() {
        glommio::LocalExecutor::default().run(async {
            let spill = spill(10);
            assert!(spill.begin(Hash(1), 11).is_none(), "larger than the budget");
            let a = spill.begin(Hash(1), 4).unwrap();
            let b = spill.begin(Hash(2), 4).unwrap();
            spill.keep(Hash(1), a);
            spill.keep(Hash(2), b);
            assert_eq!(spill.used.get(), 8);
            let c = spill.begin(Hash(3), 4).unwrap();
            let files = || spill.files.borrow().keys().copied().collect::<Vec<_>>();
            assert_eq!(files(), [Hash(2)], "the oldest made room");
            assert_eq!(spill.used.get(), 8);
            drop(c);
            assert_eq!(
                spill.used.get(),
                4,
                "an abandoned writer gives its room back"
            );
            let d = spill.begin(Hash(4), 6).unwrap();
            assert!(
                spill.begin(Hash(5), 6).is_none(),
                "writers in flight hold the rest"
            );
            drop(d);
        });
    }
}
