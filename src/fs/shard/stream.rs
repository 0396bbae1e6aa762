//! `--verify stream`: an object's blocks are served as their ranged GETs arrive, and the object
//! is checked afterwards. Its blocks are hashed in order as the in-order prefix grows (xxh128 is
//! a streaming hash: the hasher waits at the first block not fetched yet and picks the
//! following ones up from the block cache when it arrives), so an object read through in order
//! is checked at its end at no extra cost. With a disk cache a background pass completes every
//! object a reader touched, in order, and writes the cache file as the hasher consumes it: the
//! file is committed (and later passed through) only once the whole object matched.
//!
//! An object whose hash does not match after some of its bytes were served is quarantined for
//! the whole mount ([`ServedCorrupt`], shared by the shards): every later open and read of a
//! file holding it fails with EIO, its cache copy is discarded, one error line is logged and
//! `verify_failures_after_serve` counted. Objects a disk-cache file already holds are verified
//! from that file as in object mode (a local pass, no store read) before it is used.
//!
//! The first read of an object starts with a small GET ([`FIRST_WINDOW`], see
//! [`FileService::stream_first_read`]): its block is fetched in windows that double up to the
//! block (part) size, and the read is answered from the first window. Blocks stay the unit of
//! everything else (cache keys, hashing, the disk-cache file): the windows are assembled into the
//! block before it is published.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use futures::channel::oneshot;
use futures::future::FutureExt;
use futures::StreamExt;

use super::cache::Load;
use super::fetch::{Source, VERIFY_READS_IN_FLIGHT};
use super::read::ObjectRef;
use super::FileService;
use crate::fs::{FsError, ObjectHasher, ReadData, Servable, StreamedBlock};
use crate::manifest::Hash;
use crate::namespace::Ino;
use crate::store::{Block, CasWriter, ObjectRange, StoreError};

/// The first GET of an object streamed from the store: small, so the first byte a reader waits
/// for costs about one small request rather than a whole part. The GETs after it double.
const FIRST_WINDOW: u64 = 1 << 20;

/// The first window of a block streamed for an object's first read, and where it goes.
struct Head {
    window: Range<u64>,
    sender: oneshot::Sender<StreamedBlock>,
}

/// `--verify`: when the bytes of an object may be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyMode {
    /// Only after the whole object (a v2023 file, or one 256 MiB v2025 chunk) matched its hash.
    #[default]
    Object,
    /// As they arrive; the object is checked once it was read through in order, or completed in
    /// the background into the disk cache.
    Stream,
}

/// Makes the kernel drop its cached pages of an inode (from any thread, without blocking it).
pub type DropCachedPages = Box<dyn Fn(Ino) + Send + Sync>;

/// The verification mode and what its shards share: one value per mount, cloned into shards.
#[derive(Clone, Debug, Default)]
pub struct VerifyPolicy {
    pub mode: VerifyMode,
    served_corrupt: Arc<ServedCorrupt>,
    /// Set by the mount once the transport runs: pages of a quarantined file that the kernel
    /// cached must not be read again from open descriptors.
    page_cache: Arc<PageCache>,
}

#[derive(Default)]
struct PageCache(OnceLock<DropCachedPages>);

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "PageCache(set)"
        } else {
            "PageCache"
        })
    }
}

impl VerifyPolicy {
    pub fn new(mode: VerifyMode) -> VerifyPolicy {
        VerifyPolicy {
            mode,
            served_corrupt: Arc::default(),
            page_cache: Arc::default(),
        }
    }

    /// How to make the kernel drop an inode's cached pages (given once, by the transport).
    pub fn drop_cached_pages_with(&self, drop_pages: DropCachedPages) {
        let _ = self.page_cache.0.set(drop_pages);
    }

    fn drop_cached_pages(&self, ino: Ino) {
        if let Some(drop_pages) = self.page_cache.0.get() {
            drop_pages(ino);
        }
    }

    /// Whether `hash` was found corrupt after bytes of it were served (any shard).
    pub fn served_corrupt(&self, hash: Hash) -> bool {
        self.served_corrupt.contains(hash)
    }
}

/// Objects found corrupt under `--verify stream`, for every shard: the flag spares the lock on
/// every read while there are none (the usual case).
#[derive(Debug, Default)]
struct ServedCorrupt {
    any: AtomicBool,
    hashes: RwLock<HashSet<Hash>>,
}

impl ServedCorrupt {
    fn contains(&self, hash: Hash) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .hashes
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(&hash)
    }

    fn insert(&self, hash: Hash) {
        self.hashes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(hash);
        self.any.store(true, Ordering::Release);
    }
}

/// Store reads the background completion of one object keeps in flight: half a verification
/// window, so demand reads of other objects still get pool memory and connections.
const COMPLETION_READS_IN_FLIGHT: usize = VERIFY_READS_IN_FLIGHT / 2;

/// One object being streamed on this shard: how far its in-order prefix was hashed.
struct Streaming {
    hasher: ObjectHasher,
    /// Blocks `[0, next)` were hashed (and written to `writer`).
    next: u32,
    blocks: u32,
    /// The disk-cache file being written in order, committed only if the object matches.
    writer: Option<CasWriter>,
    /// A background pass is completing the object (disk cache only).
    completing: bool,
    /// A reader was sent bytes of it.
    served: bool,
}

/// The objects this shard is streaming.
#[derive(Default)]
pub(super) struct Streams {
    objects: RefCell<HashMap<Hash, Streaming>>,
    /// Blocks being fetched in windows ([`FileService::fetch_in_windows`]): each holds its
    /// windows while it waits for the memory of the whole block, so their number is bounded
    /// ([`FileService::max_first_windows`]) for loads to always progress.
    first_windows: Cell<usize>,
}

impl FileService {
    /// Whether block reads of `object` are streamed (served before it is verified): in stream
    /// mode, for an object neither verified nor being verified, unless a disk-cache file holds
    /// it (that copy is verified locally, as in object mode, before it is used).
    pub(super) fn streams(&self, object: ObjectRef) -> bool {
        if self.policy.mode != VerifyMode::Stream {
            return false;
        }
        if self.is_streaming(object.hash) {
            return true;
        }
        let v = &self.verification;
        !v.is_verified(object.hash)
            && !v.is_verifying(object.hash)
            && !self
                .disk_cache
                .as_ref()
                .is_some_and(|cache| cache.has(object.hash, object.len))
    }

    /// Block `index` of `object`, fetched once (single-flight) and served before the object is
    /// verified; the load feeds the object's hasher. Starts the background completion of the
    /// object when there is a disk cache.
    pub(super) async fn stream_block(
        self: &Rc<Self>,
        ino: Ino,
        object: ObjectRef,
        index: u32,
    ) -> Result<Servable, FsError> {
        self.start_stream(object);
        if self.disk_cache.is_some() {
            self.complete_in_background(ino, object);
        }
        let block = self.load_streamed(ino, object, index, None).await?;
        // Feeding this block may have completed the object, and found it corrupt.
        if self.policy.served_corrupt(object.hash) {
            return Err(FsError::Corrupt);
        }
        Ok(block)
    }

    /// The one load of streamed block `index` of `object` (readers and the background
    /// completion alike join it, so each block is fetched once): fetched whole, or in windows
    /// after `head` when given, then published to the block cache and fed to the hasher.
    fn load_streamed(
        self: &Rc<Self>,
        ino: Ino,
        object: ObjectRef,
        index: u32,
        head: Option<Head>,
    ) -> Load {
        let key = (object.hash, index);
        let service = self.clone();
        self.cache.load_or_join(key, move || {
            async move {
                let result = match head {
                    None => service.fetch_streamed(ino, object, index).await,
                    Some(head) => service.fetch_in_windows(ino, object, index, head).await,
                };
                if let Ok(block) = &result {
                    service.publish(key, Servable::Streamed(block.clone()));
                    service.feed(ino, object, index, block);
                }
                service.cache.finish_load(key);
                result.map(Servable::Streamed)
            }
            .boxed_local()
        })
    }

    /// Whether object `hash` is being streamed on this shard: a reader started it, and with a
    /// disk cache its background completion brings it there, so prefetch must not fetch it a
    /// second time.
    pub(super) fn is_streaming(&self, hash: Hash) -> bool {
        self.streams.objects.borrow().contains_key(&hash)
    }

    /// Notes that a reader is being sent bytes of `block` of object `hash` (for the log line of
    /// a later mismatch).
    pub(super) fn note_served(&self, hash: Hash, block: &Servable) {
        if let Servable::Streamed(_) = block {
            if let Some(stream) = self.streams.objects.borrow_mut().get_mut(&hash) {
                stream.served = true;
            }
        }
    }

    /// Under `--verify stream`, the first read of an object (on this shard) answered after one
    /// small GET: when nothing holds or loads its block yet and `[start, start + wanted)` of the
    /// block lies in one [`FIRST_WINDOW`], the block's load fetches that window first and hands
    /// it to this read, then fetches the rest of the block in doubling windows and publishes the
    /// whole block as [`FileService::stream_block`] would. `None`: the read takes the usual path
    /// (also while [`FileService::max_first_windows`] blocks are already fetched in windows).
    ///
    /// Only the first block of a stream is split: later blocks are part-size GETs that
    /// read-ahead issues before the reader needs them, so their size costs no latency. The
    /// background completion starts only once the first window arrived, so no part-size GET
    /// of it competes with the small one.
    pub(super) async fn stream_first_read(
        self: &Rc<Self>,
        ino: Ino,
        object: ObjectRef,
        index: u32,
        start: usize,
        wanted: usize,
    ) -> Result<Option<ReadData>, FsError> {
        if self.policy.mode != VerifyMode::Stream
            || self.is_streaming(object.hash)
            || self.cache.contains((object.hash, index))
            || self.policy.served_corrupt(object.hash)
            || !self.streams(object)
        {
            return Ok(None);
        }
        let block_len = self.range(object, index).len as u64;
        let Some(window) = first_window(start as u64..(start + wanted) as u64, block_len) else {
            return Ok(None);
        };
        let first_windows = &self.streams.first_windows;
        if first_windows.get() >= self.max_first_windows() {
            return Ok(None);
        }
        first_windows.set(first_windows.get() + 1);
        let c = &self.counters;
        c.add(&c.cache_misses, 1);
        self.start_stream(object);
        let (sender, receiver) = oneshot::channel();
        let head = Head {
            window: window.clone(),
            sender,
        };
        let load = self.load_streamed(ino, object, index, Some(head));
        // The rest of the block loads even if this reader goes away (interrupted).
        glommio::spawn_local(load.clone()).detach();
        let head = receiver.await;
        if self.disk_cache.is_some() {
            self.complete_in_background(ino, object);
        }
        let Ok(head) = head else {
            // The first window failed: the load's error.
            load.await?;
            return Ok(None);
        };
        if self.policy.served_corrupt(object.hash) {
            return Err(FsError::Corrupt);
        }
        let head = Servable::Streamed(head);
        self.note_served(object.hash, &head);
        let from = start - window.start as usize;
        Ok(Some(ReadData::slice(head, from..from + wanted)))
    }

    fn start_stream(&self, object: ObjectRef) {
        let mut streams = self.streams.objects.borrow_mut();
        if streams.contains_key(&object.hash) {
            return;
        }
        let blocks = object.len.div_ceil(self.block_size) as u32;
        let writer = self.disk_cache.as_ref().and_then(|cache| {
            cache
                .begin(object.hash)
                .map_err(|e| self.warn_cache_write(&cache.location(object.hash), e))
                .ok()
        });
        streams.insert(
            object.hash,
            Streaming {
                hasher: ObjectHasher::new(object.hash, blocks as usize),
                next: 0,
                blocks,
                writer,
                completing: false,
                served: false,
            },
        );
    }

    fn range(&self, object: ObjectRef, index: u32) -> ObjectRange {
        let offset = index as u64 * self.block_size;
        ObjectRange {
            hash: object.hash,
            object_len: object.len,
            offset,
            len: (object.len - offset).min(self.block_size) as usize,
        }
    }

    /// One block from the store, as it arrives. A store error is the read's (the store already
    /// retried what can be retried).
    async fn fetch_streamed(
        &self,
        ino: Ino,
        object: ObjectRef,
        index: u32,
    ) -> Result<StreamedBlock, FsError> {
        let range = self.range(object, index);
        let fetched = async {
            let memory = self.grant(object.hash, range.len as u64).await?;
            self.fetch(memory, range, Source::Store).await
        };
        match fetched.await {
            Ok(block) => Ok(StreamedBlock::ahead_of_verification(block)),
            Err(error) => {
                self.quarantine(ino, object.hash, &error);
                Err(FsError::from(&error))
            }
        }
    }

    /// Block `index` of `object` fetched as `head.window` of it first (sent to `head.sender` as
    /// soon as it arrives), then the rest of the block in windows that double (all in flight
    /// at once), copied together into one block. A store error is the read's, as in
    /// [`FileService::fetch_streamed`].
    async fn fetch_in_windows(
        &self,
        ino: Ino,
        object: ObjectRef,
        index: u32,
        head: Head,
    ) -> Result<StreamedBlock, FsError> {
        let block = self.range(object, index);
        let fetch_window = |window: Range<u64>| async move {
            let len = (window.end - window.start) as usize;
            let range = ObjectRange {
                offset: block.offset + window.start,
                len,
                ..block
            };
            let memory = self.grant(object.hash, len as u64).await?;
            let bytes = self.fetch(memory, range, Source::Store).await?;
            Ok::<_, StoreError>((window, bytes))
        };
        let fetched = async {
            let (_, first) = fetch_window(head.window.clone()).await?;
            let first = StreamedBlock::ahead_of_verification(first);
            // The reader may be gone: the block is still loaded for the next one.
            if head.sender.send(first.clone()).is_ok() {
                // Let the reader answer before the rest of the block is asked for: woken,
                // it would otherwise wait while this task receives, assembles and hashes it
                // (about 2 ms of a first byte that takes 1 ms to fetch).
                glommio::executor().yield_now().await;
            }
            let rest = rest_of_block(&head.window, block.len as u64);
            let windows = futures::future::try_join_all(rest.map(fetch_window)).await?;
            let memory = self.grant(object.hash, block.len as u64).await?;
            let mut whole = self.pool.alloc_reserved(block.len, memory).await;
            let place = |window: &Range<u64>| window.start as usize..window.end as usize;
            whole[place(&head.window)].copy_from_slice(&first);
            for (window, bytes) in &windows {
                whole[place(window)].copy_from_slice(bytes);
            }
            Ok::<_, StoreError>(Block::from_pool(whole, block.len))
        };
        let fetched = fetched.await;
        let first_windows = &self.streams.first_windows;
        first_windows.set(first_windows.get() - 1);
        match fetched {
            Ok(block) => Ok(StreamedBlock::ahead_of_verification(block)),
            Err(error) => {
                self.quarantine(ino, object.hash, &error);
                Err(FsError::from(&error))
            }
        }
    }

    /// How many blocks may be fetched in windows at once: together they hold at most a quarter
    /// of the pool in windows (at least one; a pool holds at least 8 blocks), so however many
    /// wait for their whole block's memory, evicting the cache can always give it to them.
    fn max_first_windows(&self) -> usize {
        (self.pool.capacity() / (4 * self.block_size as usize)).max(1)
    }

    /// Hashes block `index` of `object` if it continues the hashed prefix, then every block
    /// after it that the cache holds; checks the object when the prefix reaches its end. A
    /// block past the prefix waits in the cache for the ones before it.
    fn feed(&self, ino: Ino, object: ObjectRef, index: u32, block: &[u8]) {
        let hash = object.hash;
        let mut streams = self.streams.objects.borrow_mut();
        let Some(stream) = streams.get_mut(&hash) else {
            return;
        };
        if index != stream.next {
            return;
        }
        self.hash_next(hash, stream, block);
        while stream.next < stream.blocks {
            match self.cache.peek((hash, stream.next)) {
                Some(Servable::Streamed(next)) => self.hash_next(hash, stream, &next),
                _ => break,
            }
        }
        if stream.next == stream.blocks {
            let done = streams.remove(&hash).expect("the stream fed above");
            drop(streams);
            self.finish_stream(ino, object, done);
        }
    }

    fn hash_next(&self, hash: Hash, stream: &mut Streaming, block: &[u8]) {
        stream.hasher.update(block);
        if let Some(file) = &stream.writer {
            if let Err(e) = file.write_at(stream.next as u64 * self.block_size, block) {
                self.warn_cache_write(&self.cache_location(hash), e);
                // Dropping the writer deletes its temporary file: no cache copy this time.
                stream.writer = None;
            }
        }
        stream.next += 1;
    }

    /// The whole object was hashed: verified (its cache file committed), or quarantined.
    fn finish_stream(&self, ino: Ino, object: ObjectRef, stream: Streaming) {
        let hash = object.hash;
        match stream.hasher.finish() {
            Ok(verified) => {
                if let (Some(writer), Some(cache)) = (stream.writer, &self.disk_cache) {
                    match writer.commit(hash) {
                        Ok(()) => {
                            cache.added(object.len);
                            let c = &self.counters;
                            c.add(&c.objects_cached, 1);
                            self.keep_in_disk_cache(hash, &verified.digests, true);
                        }
                        Err(e) => self.warn_cache_write(&self.cache_location(hash), e),
                    }
                }
                self.accept(hash, verified);
            }
            Err(digest) => {
                // Dropping the writer deletes the temporary file: nothing was committed.
                drop(stream.writer);
                let c = &self.counters;
                c.add(&c.verify_failures, 1);
                if stream.served {
                    c.add(&c.verify_failures_after_serve, 1);
                }
                self.policy.served_corrupt.insert(hash);
                // Served pages the kernel keeps would still answer reads of open descriptors.
                self.policy.drop_cached_pages(ino);
                self.verification.quarantine_silently(hash);
                self.verification.not_in_disk_cache(hash);
                if let Some(cache) = &self.disk_cache {
                    cache.discard(hash);
                }
                let served = if stream.served {
                    "bytes of it were already served (--verify stream)"
                } else {
                    "none of its bytes were served"
                };
                tracing::error!(
                    shard = self.shard,
                    file = %self.namespace.path(ino).display(),
                    %hash,
                    "object {} has content hash {digest}: corrupt; {served}; every later open \
                     and read of it fails with EIO",
                    self.store.location(hash).display()
                );
            }
        }
    }

    /// Completes `object` in the background, in order, so the disk cache gets a verified copy
    /// of every object a reader touched: blocks the cache holds are taken from it, the others
    /// loaded as a reader would load them (joining a load in flight, published to the cache),
    /// so a reader that gets there later takes them from the cache instead of fetching them a
    /// second time. One completion per object at a time.
    fn complete_in_background(self: &Rc<Self>, ino: Ino, object: ObjectRef) {
        {
            let mut streams = self.streams.objects.borrow_mut();
            let Some(stream) = streams.get_mut(&object.hash) else {
                return;
            };
            if stream.completing {
                return;
            }
            stream.completing = true;
        }
        let service = self.clone();
        glommio::spawn_local(async move {
            let start = service
                .streams
                .objects
                .borrow()
                .get(&object.hash)
                .map_or(0, |s| s.next);
            let blocks = object.len.div_ceil(service.block_size) as u32;
            let service = &service;
            let mut reads = futures::stream::iter(start..blocks)
                .map(|index| async move {
                    let block = match service.cache.peek((object.hash, index)) {
                        Some(block) => Ok(block),
                        None => service.load_streamed(ino, object, index, None).await,
                    };
                    (index, block)
                })
                .buffered(COMPLETION_READS_IN_FLIGHT);
            while let Some((index, block)) = reads.next().await {
                match block {
                    Ok(block) => service.feed(ino, object, index, &block),
                    // Quarantined, verified by another path, or the store failed (logged):
                    // a later read starts over.
                    Err(_) => break,
                }
                if !service.is_streaming(object.hash) {
                    break;
                }
            }
            if let Some(stream) = service.streams.objects.borrow_mut().get_mut(&object.hash) {
                stream.completing = false;
            }
        })
        .detach();
    }
}

/// The first GET of a block streamed for the first read of an object: the [`FIRST_WINDOW`]-aligned
/// window holding `read`, if the read fits in it and the block is larger.
fn first_window(read: Range<u64>, block_len: u64) -> Option<Range<u64>> {
    let start = read.start / FIRST_WINDOW * FIRST_WINDOW;
    let end = (start + FIRST_WINDOW).min(block_len);
    (block_len > FIRST_WINDOW && read.end <= end).then_some(start..end)
}

/// The GETs for the rest of a block after its first window `head`: windows that double from
/// the head's length, after the head, then before it. For a head at the block's start each
/// window is as long as everything before it: 1 MiB, then 1, 2, 4 MiB ... up to the block.
fn rest_of_block(head: &Range<u64>, block_len: u64) -> impl Iterator<Item = Range<u64>> {
    doubling_windows(head.end..block_len, head.end - head.start)
        .into_iter()
        .chain(doubling_windows(0..head.start, FIRST_WINDOW))
}

/// `span` cut into consecutive windows of `first` bytes, then twice as many each time (the last
/// one what remains).
fn doubling_windows(span: Range<u64>, first: u64) -> Vec<Range<u64>> {
    let mut windows = Vec::new();
    let (mut at, mut size) = (span.start, first);
    while at < span.end {
        let end = (at + size).min(span.end);
        windows.push(at..end);
        at = end;
        size *= 2;
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::{doubling_windows, first_window, rest_of_block, FIRST_WINDOW};

    const MIB: u64 = 1 << 20;

    #[test]
    fn windows_double_and_cover_the_span_exactly() {
        assert_eq!(doubling_windows(1..12, 2), vec![1..3, 3..7, 7..12]);
        assert_eq!(doubling_windows(0..2, 2), vec![0..2]);
        assert!(doubling_windows(5..5, 2).is_empty());
    }

    #[test]
    fn a_block_read_from_its_start_is_fetched_in_1_1_2_4_mib_windows() {
        assert_eq!(FIRST_WINDOW, MIB);
        let head = first_window(0..4096, 8 * MIB).unwrap();
        assert_eq!(head, 0..MIB);
        let rest: Vec<_> = rest_of_block(&head, 8 * MIB).collect();
        assert_eq!(rest, vec![MIB..2 * MIB, 2 * MIB..4 * MIB, 4 * MIB..8 * MIB]);
    }

    #[test]
    fn the_first_window_holds_the_read_or_there_is_none() {
        assert_eq!(
            first_window(5 * MIB + 7..5 * MIB + 100, 8 * MIB),
            Some(5 * MIB..6 * MIB)
        );
        let head = 5 * MIB..6 * MIB;
        let rest: Vec<_> = rest_of_block(&head, 8 * MIB).collect();
        assert_eq!(
            rest,
            vec![
                6 * MIB..7 * MIB,
                7 * MIB..8 * MIB,
                0..MIB,
                MIB..3 * MIB,
                3 * MIB..5 * MIB
            ]
        );
        // Straddling a window boundary, or a block no larger than one window.
        assert_eq!(first_window(MIB - 1..MIB + 1, 8 * MIB), None);
        assert_eq!(first_window(0..10, MIB), None);
    }
}
