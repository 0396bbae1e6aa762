//! Verification and re-reads: an object is streamed through its hash once per shard (from the
//! disk cache when it holds a copy, else from the store, writing the cache as it passes; without
//! a disk cache, an object too large for the pool goes to a spill file instead), and blocks read
//! again later are served only if they keep the digest they had then. Objects that
//! failed are quarantined: logged once, and left to on-demand reads (read-ahead skips them).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures::future::{FutureExt, LocalBoxFuture, Shared};
use futures::StreamExt;

use super::fetch::{Source, VERIFY_READS_IN_FLIGHT};
use super::read::ObjectRef;
use super::FileService;
use crate::fs::{BlockDigests, FsError, ObjectHasher, VerifiedBlock, VerifiedObject};
use crate::manifest::Hash;
use crate::namespace::Ino;
use crate::store::{Block, CasWriter, ObjectRange, SpillWriter, StoreError};

type Verify = Shared<LocalBoxFuture<'static, Result<(), FsError>>>;

/// Cache writes one verification stream keeps in flight on the shard's blocking thread.
const CACHE_WRITES_IN_FLIGHT: usize = 4;

/// A cache write that is done: its block is kept for publication (`keep`: its index) or
/// dropped, and the write's first failure noted.
fn settle(
    (keep, (block, written)): (Option<u32>, (Block, std::io::Result<()>)),
    hasher: &mut ObjectHasher,
    write_failed: &mut Option<std::io::Error>,
) {
    if let Err(e) = written {
        write_failed.get_or_insert(e);
    }
    if let Some(index) = keep {
        hasher.keep(index, block);
    }
}

/// Where a verification stream from the store writes the object as it passes, so that blocks
/// read again come from local storage rather than from the store a second time.
enum LocalCopy {
    /// A new disk-cache file, committed if the object verifies.
    CacheFile(CasWriter),
    /// A spill file of the blocks not kept in memory (no disk cache), kept if the object
    /// verifies.
    Spill(SpillWriter),
}

impl LocalCopy {
    /// Writes block `index` of the object, at `offset`.
    fn write(
        &mut self,
        index: u32,
        offset: u64,
        block: Block,
    ) -> impl std::future::Future<Output = (Block, std::io::Result<()>)> + 'static {
        match self {
            LocalCopy::CacheFile(file) => {
                file.write_block_off_executor(offset, block).left_future()
            }
            LocalCopy::Spill(file) => file
                .write_block_off_executor(index, offset, block)
                .right_future(),
        }
    }
}

/// What this shard knows about the objects it has verified, is verifying, or saw fail.
#[derive(Default)]
pub(super) struct Verification {
    /// Objects verified on this shard, with the digest of each of their blocks.
    verified: RefCell<HashMap<Hash, BlockDigests>>,
    verifying: RefCell<HashMap<Hash, Verify>>,
    /// Bytes of the objects being verified now (whether or not their blocks are kept).
    verifying_bytes: Cell<u64>,
    /// Bytes held by verification streams for publication once their object verifies.
    retained: Cell<usize>,
    /// Verified objects whose disk-cache file is known good.
    in_disk_cache: RefCell<HashSet<Hash>>,
    /// Objects that failed (logged once; read-ahead leaves them alone).
    quarantine: RefCell<HashSet<Hash>>,
    /// Verified objects whose digests came from an earlier mount's record, not a hash here.
    recorded: RefCell<HashSet<Hash>>,
    /// Verified objects whose cache file was there before this mount verified them (not
    /// written by it, so no dirty pages of it are waiting for the disk).
    found_in_disk_cache: RefCell<HashSet<Hash>>,
}

impl Verification {
    pub fn is_verified(&self, hash: Hash) -> bool {
        self.verified.borrow().contains_key(&hash)
    }

    pub fn is_verifying(&self, hash: Hash) -> bool {
        self.verifying.borrow().contains_key(&hash)
    }

    /// Objects being verified now.
    pub fn verifying_count(&self) -> usize {
        self.verifying.borrow().len()
    }

    pub fn verifying_bytes(&self) -> u64 {
        self.verifying_bytes.get()
    }

    pub fn quarantined(&self, hash: Hash) -> bool {
        self.quarantine.borrow().contains(&hash)
    }

    pub fn in_disk_cache(&self, hash: Hash) -> bool {
        self.in_disk_cache.borrow().contains(&hash)
    }

    pub fn not_in_disk_cache(&self, hash: Hash) {
        self.in_disk_cache.borrow_mut().remove(&hash);
        self.found_in_disk_cache.borrow_mut().remove(&hash);
    }

    /// Whether the verified cache file of `hash` was found in the disk cache, not written by
    /// this mount.
    pub fn found_in_disk_cache(&self, hash: Hash) -> bool {
        self.found_in_disk_cache.borrow().contains(&hash)
    }

    /// Notes that the cache file of `hash`, just trusted or hashed, was there before.
    fn note_found_in_disk_cache(&self, hash: Hash) {
        self.found_in_disk_cache.borrow_mut().insert(hash);
    }

    /// The block digests of verified object `hash`.
    pub fn digests(&self, hash: Hash) -> Option<BlockDigests> {
        self.verified.borrow().get(&hash).cloned()
    }

    /// Quarantines `hash` without the log line of [`FileService::quarantine`] (the caller logs
    /// its own).
    pub fn quarantine_silently(&self, hash: Hash) {
        self.quarantine.borrow_mut().insert(hash);
    }
}

/// Why a verification stream ended without a verified object.
enum StreamError {
    /// The bytes arrived but hash to this digest instead.
    Mismatch(Hash),
    Failed(StoreError),
}

impl FileService {
    /// Makes sure object `hash` (of `len` bytes) was verified on this shard; see the module docs.
    /// Concurrent callers share one verification.
    pub(super) async fn verify(
        self: &Rc<Self>,
        ino: Ino,
        hash: Hash,
        len: u64,
    ) -> Result<(), FsError> {
        let v = &self.verification;
        if v.is_verified(hash) {
            return Ok(());
        }
        let existing = v.verifying.borrow().get(&hash).cloned();
        let run = match existing {
            Some(run) => run,
            None => {
                let service = self.clone();
                let run = async move {
                    let result = service.stream_and_verify(ino, hash, len).await;
                    let v = &service.verification;
                    v.verifying.borrow_mut().remove(&hash);
                    v.verifying_bytes.set(v.verifying_bytes.get() - len);
                    result
                }
                .boxed_local()
                .shared();
                v.verifying.borrow_mut().insert(hash, run.clone());
                v.verifying_bytes.set(v.verifying_bytes.get() + len);
                run
            }
        };
        run.await
    }

    /// Streams object `hash` through the hasher: from the disk cache when it holds a copy,
    /// else from the store (writing it into the disk cache as it passes).
    async fn stream_and_verify(
        self: &Rc<Self>,
        ino: Ino,
        hash: Hash,
        len: u64,
    ) -> Result<(), FsError> {
        let c = &self.counters;
        if let Some(cache) = self.disk_cache.as_ref().filter(|d| d.has(hash, len)) {
            if let Some(digests) = cache.recorded_digests(hash, len, self.block_size) {
                let digests = BlockDigests::recorded(digests);
                c.add(&c.objects_trusted, 1);
                c.add(&c.objects_from_disk_cache, 1);
                self.verification.recorded.borrow_mut().insert(hash);
                self.keep_in_disk_cache(hash, &digests, true);
                self.verification.note_found_in_disk_cache(hash);
                self.accept(
                    hash,
                    VerifiedObject {
                        kept: Vec::new(),
                        digests,
                    },
                );
                return Ok(());
            }
            let before = cache.identity(hash);
            match self.stream(hash, len, Source::DiskCache, &mut None).await {
                Ok(verified) => {
                    c.add(&c.objects_from_disk_cache, 1);
                    // Recorded for later mounts only if nobody wrote the file while it was hashed.
                    let unchanged = before.is_some() && cache.identity(hash) == before;
                    self.keep_in_disk_cache(hash, &verified.digests, unchanged);
                    self.verification.note_found_in_disk_cache(hash);
                    self.accept(hash, verified);
                    return Ok(());
                }
                Err(StreamError::Mismatch(digest)) => tracing::warn!(
                    shard = self.shard,
                    "cache file {} is corrupt (content hash {digest}); removed, fetching {hash} again",
                    cache.location(hash).display()
                ),
                Err(StreamError::Failed(error)) => {
                    tracing::warn!(shard = self.shard, "{error}; removed, fetching {hash} again")
                }
            }
            cache.discard(hash);
        }
        let mut last_digest = hash;
        for _attempt in 0..2 {
            let mut copy = self.local_copy(hash);
            match self.stream(hash, len, Source::Store, &mut copy).await {
                Ok(verified) => {
                    match (copy, &self.disk_cache, &self.spill) {
                        (Some(LocalCopy::CacheFile(writer)), Some(cache), _) => {
                            match writer.commit(hash) {
                                Ok(()) => {
                                    cache.added(len);
                                    c.add(&c.objects_cached, 1);
                                    self.keep_in_disk_cache(hash, &verified.digests, true);
                                }
                                Err(e) => self.warn_cache_write(&self.cache_location(hash), e),
                            }
                        }
                        (Some(LocalCopy::Spill(writer)), _, Some(spill)) => {
                            c.add(&c.spill_bytes_written, writer.bytes());
                            spill.keep(hash, writer);
                        }
                        _ => {}
                    }
                    self.accept(hash, verified);
                    return Ok(());
                }
                Err(StreamError::Failed(error)) => {
                    self.quarantine(ino, hash, &error);
                    return Err(FsError::from(&error));
                }
                Err(StreamError::Mismatch(digest)) => {
                    // Corrupted in transit or at rest: one more fetch tells the two apart.
                    c.add(&c.verify_failures, 1);
                    last_digest = digest;
                }
            }
        }
        self.quarantine(
            ino,
            hash,
            &format_args!(
                "object {} has content hash {last_digest} (twice): corrupt, not served",
                self.store.location(hash).display()
            ),
        );
        Err(FsError::Corrupt)
    }

    /// A new cache file for a verification of `hash` from the store (none without a disk
    /// cache: the stream then starts a spill file at its first block not kept, if it can).
    fn local_copy(&self, hash: Hash) -> Option<LocalCopy> {
        let cache = self.disk_cache.as_ref()?;
        cache
            .begin(hash)
            .map_err(|e| self.warn_cache_write(&self.cache_location(hash), e))
            .map(LocalCopy::CacheFile)
            .ok()
    }

    /// Notes that the disk cache holds a verified copy of `hash`: marked used (last to be
    /// evicted) and, when `record`, recorded with its identity after that touch, so later mounts
    /// trust it without hashing it.
    pub(super) fn keep_in_disk_cache(&self, hash: Hash, digests: &BlockDigests, record: bool) {
        if let Some(cache) = &self.disk_cache {
            cache.touch(hash);
            if record {
                cache.record_verified(hash, self.block_size, digests.as_slice());
            }
            self.verification.in_disk_cache.borrow_mut().insert(hash);
        }
    }

    /// Marks a verified object and publishes the blocks its stream kept.
    pub(super) fn accept(&self, hash: Hash, verified: VerifiedObject) {
        let c = &self.counters;
        c.add(&c.objects_verified, 1);
        self.verification
            .verified
            .borrow_mut()
            .insert(hash, verified.digests);
        for (index, block) in verified.kept {
            self.publish((hash, index), block.into());
        }
    }

    /// One pass over object `hash` from `source`, one block at a time with several in flight,
    /// hashing in order; the head of the object is kept for publication within a shard-wide
    /// budget, and blocks go to `copy`: every block to a cache file when given; without one, the
    /// blocks after the head to a spill file started here, if the shard has spill files.
    async fn stream(
        self: &Rc<Self>,
        hash: Hash,
        len: u64,
        source: Source,
        copy: &mut Option<LocalCopy>,
    ) -> Result<VerifiedObject, StreamError> {
        let block_size = self.block_size;
        let blocks = len.div_ceil(block_size);
        let mut hasher = ObjectHasher::new(hash, blocks as usize);
        let mut kept_bytes = 0usize;
        let retained = &self.verification.retained;
        // Memory is granted one block at a time, in block order, and only then is the read
        // started: the block the hasher waits for always holds its memory before any later one
        // asks, so later blocks cannot take the last of a small pool while the head waits
        // behind them (that deadlocked 32 MiB pools).
        let mut reads = Box::pin(
            futures::stream::iter(0..blocks)
                .then(|index| async move {
                    let offset = index * block_size;
                    let part = (len - offset).min(block_size);
                    let range = ObjectRange {
                        hash,
                        object_len: len,
                        offset,
                        len: part as usize,
                    };
                    (range, self.grant(hash, part).await)
                })
                .map(|(range, memory)| async move { self.fetch(memory?, range, source).await })
                .buffered(VERIFY_READS_IN_FLIGHT),
        );
        // Copies (cache or spill file) are written on the shard's blocking thread, a few at a
        // time, each holding its block until written (then kept or dropped): the copy into the
        // page cache stays off the shard, which goes on fetching, hashing and serving meanwhile.
        let mut writes = futures::stream::FuturesOrdered::new();
        let mut write_failed = None;
        let mut index = 0u32;
        let mut spill_tried = false;
        let result = loop {
            let Some(block) = reads.next().await else {
                break Ok(());
            };
            let block: Block = match block {
                Ok(block) => block,
                Err(error) => break Err(StreamError::Failed(error)),
            };
            hasher.update(&block);
            // Keep the head of the object for the reader that is waiting, within a shard-wide
            // budget that leaves room for the reads in flight, so concurrent verifications
            // cannot fill the pool with unpublished blocks. Every block not kept is read
            // again after verification, so keep as much as the cache could hold.
            // Once spilling, only an unbroken head: a later block kept alone would likely be
            // evicted before its reader came, then fetched again, as it is not in the file.
            let spilling = matches!(copy, Some(LocalCopy::Spill(_)));
            let keep = !spilling
                && self.may_keep(hash)
                && retained.get() + block.len() <= self.retention_budget();
            if !keep && copy.is_none() && !spill_tried {
                spill_tried = true;
                *copy = (self.spill.as_ref())
                    .and_then(|spill| spill.begin(hash, len))
                    .map(LocalCopy::Spill);
            }
            if keep {
                retained.set(retained.get() + block.len());
                kept_bytes += block.len();
            }
            // A spill file starts at the first block not kept and takes every block after it.
            match copy.as_mut().filter(|_| write_failed.is_none()) {
                Some(file) => {
                    let offset = index as u64 * block_size;
                    // Tagged with the index to keep the block under once it is written.
                    let keep_as = keep.then_some(index);
                    let write = file.write(index, offset, block);
                    writes.push_back(write.map(move |done| (keep_as, done)));
                    while writes.len() >= CACHE_WRITES_IN_FLIGHT {
                        let done = writes.next().await.expect("writes in flight");
                        settle(done, &mut hasher, &mut write_failed);
                    }
                }
                None if keep => hasher.keep(index, block),
                None => {}
            }
            index += 1;
        };
        drop(reads);
        while let Some(done) = writes.next().await {
            settle(done, &mut hasher, &mut write_failed);
        }
        if let Some(e) = write_failed {
            match (copy.take(), &self.spill) {
                (Some(LocalCopy::Spill(_)), Some(spill)) => {
                    spill.warn(format_args!("cannot write a spill file: {e}"))
                }
                // Dropping the writer deletes its temporary file: no cache copy this time.
                _ => self.warn_cache_write(&self.cache_location(hash), e),
            }
        }
        retained.set(retained.get() - kept_bytes);
        result?;
        hasher.finish().map_err(StreamError::Mismatch)
    }

    /// A block of a verified object that was not kept: from its cache file when there is one,
    /// else from the store, and served only if it still has the digest it had when the object
    /// was verified (a store that changed its mind or a flip in transit gives one more fetch,
    /// then EIO; a cache file that changed is discarded).
    pub(super) async fn reload(
        self: &Rc<Self>,
        ino: Ino,
        object: ObjectRef,
        block: u32,
    ) -> Result<VerifiedBlock, FsError> {
        let ObjectRef { hash, len } = object;
        let offset = block as u64 * self.block_size;
        let range = ObjectRange {
            hash,
            object_len: len,
            offset,
            len: (len - offset).min(self.block_size) as usize,
        };
        let v = &self.verification;
        let digests = v.verified.borrow().get(&hash).cloned();
        let Some(digests) = digests else {
            return Err(FsError::Corrupt);
        };
        let read_from = |source| async move {
            let memory = self.grant(hash, range.len as u64).await?;
            self.fetch(memory, range, source).await
        };
        if v.in_disk_cache(hash) {
            match read_from(Source::DiskCache).await {
                Ok(bytes) => match digests.check(block, bytes) {
                    Ok(verified) => return Ok(verified),
                    Err(_) => {
                        if let Some(cache) = &self.disk_cache {
                            tracing::warn!(
                                shard = self.shard,
                                "cache file {} changed since it was verified; removed",
                                cache.location(hash).display()
                            );
                            cache.discard(hash);
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(shard = self.shard, "{error}; reading the store instead")
                }
            }
            v.not_in_disk_cache(hash);
        }
        if let Some(leaving) = self.leaving((hash, block)) {
            return Ok(leaving);
        }
        if let Some(spill) = self.spill.as_ref().filter(|s| s.has(hash, block)) {
            match read_from(Source::Spill).await {
                Ok(bytes) => match digests.check(block, bytes) {
                    Ok(verified) => return Ok(verified),
                    Err(_) => spill.warn(format_args!(
                        "block {block} of the spill file of {hash} differs from the verified object"
                    )),
                },
                Err(error) => spill.warn(format_args!("{error}")),
            }
            spill.forget(hash);
        }
        let c = &self.counters;
        for _attempt in 0..2 {
            match read_from(Source::Store).await {
                Ok(bytes) => match digests.check(block, bytes) {
                    Ok(verified) => return Ok(verified),
                    Err(_) => c.add(&c.verify_failures, 1),
                },
                Err(error) => {
                    self.quarantine(ino, hash, &error);
                    return Err(FsError::from(&error));
                }
            }
        }
        // Digests that came from a record, not from hashing here, may not describe the object
        // (a wrong record): that must cost a verification, not the object. The first reload to
        // find out forgets them and verifies afresh; concurrent reloads that used the same
        // digests find them replaced and join that verification; all then read the block
        // against the new digests.
        let current = v.verified.borrow().get(&hash).cloned();
        let replaced = !current.is_some_and(|current| current.same(&digests));
        if replaced || v.recorded.borrow_mut().remove(&hash) {
            if !replaced {
                tracing::warn!(
                    shard = self.shard,
                    "recorded digests of {hash} match neither the cache file nor the store; \
                     verifying it again"
                );
                v.verified.borrow_mut().remove(&hash);
                v.not_in_disk_cache(hash);
                if let Some(cache) = &self.disk_cache {
                    cache.discard(hash);
                }
            }
            self.verify(ino, hash, len).await?;
            return Box::pin(self.reload(ino, object, block)).await;
        }
        self.quarantine(
            ino,
            hash,
            &format_args!(
                "block {block} of object {} differs from the verified object (twice): not served",
                self.store.location(hash).display()
            ),
        );
        Err(FsError::Corrupt)
    }

    /// Puts a failed object in quarantine; the first failure of an object is logged.
    pub(super) fn quarantine(&self, ino: Ino, hash: Hash, error: &dyn std::fmt::Display) {
        if self.verification.quarantine.borrow_mut().insert(hash) {
            crate::limited!(
                tracing::Level::ERROR,
                "objects that cannot be served",
                shard = self.shard,
                file = %self.namespace.path(ino).display(),
                %hash,
                "cannot serve file: {error}"
            );
        }
    }

    pub(super) fn cache_location(&self, hash: Hash) -> PathBuf {
        self.disk_cache
            .as_ref()
            .map_or_else(PathBuf::new, |cache| cache.location(hash))
    }

    /// A failed cache write costs the cache copy, not the read: one warning per shard.
    pub(super) fn warn_cache_write(&self, location: &Path, error: std::io::Error) {
        let c = &self.counters;
        if c.disk_cache_write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tracing::warn!(
                shard = self.shard,
                "cannot write cache file {}: {error}; serving without the disk cache",
                location.display()
            );
        }
        c.add(&c.disk_cache_write_errors, 1);
    }
}
