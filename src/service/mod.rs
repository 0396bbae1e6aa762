//! The shard file service: everything a shard does for the inodes it owns.
//!
//! Ownership rules (the one place they are written down):
//! - `owner(ino) = namespace::owner(ino, shards)`; the FUSE front sends every open, read and
//!   release of `ino` to that shard, together with its fuser reply object.
//! - Only the owner touches an inode's open handles, read-ahead state, cached blocks and loads.
//!   All of it lives in this shard's [`FileService`], which is `!Send` and needs no locks.
//! - Bytes live in the shard's registered buffer pool and never leave the shard: the shard
//!   replies itself, and fuser writes the reply straight from the block (one `writev`).
//! - What crosses threads: [`ShardRequest`] messages (metadata plus a reply object) in, and
//!   relaxed counter loads out. Nothing else.
//!
//! Verification policy: the unit of verification is a CAS object — the whole file for v2023
//! manifests, one 256 MiB chunk for chunked v2025 files — because that is what its xxh128 covers.
//! The first read of an object streams the whole object from the store through the hasher
//! (`--part-size` blocks, several in flight), keeping the first blocks (up to the cache budget
//! less a headroom) as they pass. Only when the digest matches are those blocks published to the cache and the object
//! marked verified on this shard; on a mismatch nothing is published and the read fails with EIO.
//! After that, blocks that were not kept are read again (from the disk cache or the store) and
//! served only if they hash to the xxh3-64 digest the same block had during verification, so a
//! store that changed or a flip in transit after verification is caught too. A
//! very large v2023 object therefore costs one full read before its first byte is served; the
//! chunked v2025 format bounds that to 256 MiB, and a sequential reader of a chunked file gets
//! the next chunk verified while it reads the current one (`FileService::verify_next_chunk`).
//! Bytes from the store that fail verification are fetched once more (a flipped bit in
//! transit), then the read fails with EIO.
//!
//! With a disk cache (`--cache-dir`, [`DiskCache`]) the verification stream also writes the
//! object into it, and is committed there only when it matched; later passes read the cache
//! file instead of the store, and a cache file is itself re-verified once per mount before it is
//! trusted (a mismatch deletes it and the object comes from the store again).
//!
//! Passthrough: when the kernel supports it and the disk cache holds a verified copy, a
//! buffered open of a single-object file is answered with the cache file as its backing file,
//! and the kernel reads it without calling us at all. The open of such a file waits for the
//! object's verification (the first read would wait for it anyway). O_DIRECT opens, files of
//! several v2025 chunks (one backing file per inode) and opens while shard-served handles of the
//! inode are open stay on the shard: the kernel refuses to mix the two modes on one inode, so
//! `IoMode` follows whichever mode the inode's open handles already use.

mod cache;
mod counters;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fuser::{BackingId, Errno, FileHandle, FopenFlags, ReplyData, ReplyEmpty, ReplyOpen};
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use futures::StreamExt;
use mount_vfs_executors::{rounded_size, BufferPool, Mailbox, Reservation, ShardContext};
use xxhash_rust::xxh3::xxh3_64;

use crate::manifest::{Hash, CHUNK_SIZE};
use crate::namespace::{owner, Ino, Namespace};
use crate::store::{
    Block, CacheWriter, DiskCache, DiskCacheConfig, Store, StoreConfig, StoreError,
};

pub use cache::BlockKey;
pub use counters::{CounterSnapshot, ShardCounters};

use cache::BlockCache;

/// Store reads kept in flight while one object is streamed for verification.
/// 8 x 4 MiB keeps a 25-200 Gbps link busy at S3's first-byte latencies; the S3 benchmark
/// (docs/benchmarks.md) saw verification pull only ~0.55x of the raw client with 4.
const VERIFY_READS_IN_FLIGHT: usize = 8;

/// Read-ahead window for sequential readers: starts at one block and doubles per sequential
/// read up to this many bytes (less in small pools, see `FileService::max_readahead_blocks`).
const MAX_READAHEAD: u64 = 64 << 20;

/// A data request for an inode, sent by the FUSE front to the inode's owner shard.
pub enum ShardRequest {
    Open {
        ino: Ino,
        /// The open asked for O_DIRECT: such readers bypass caches, so they stay shard-served.
        direct: bool,
        reply: ReplyOpen,
    },
    Read {
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    },
    Release {
        ino: Ino,
        fh: u64,
        reply: ReplyEmpty,
    },
}

impl ShardRequest {
    fn ino(&self) -> Ino {
        match self {
            ShardRequest::Open { ino, .. }
            | ShardRequest::Read { ino, .. }
            | ShardRequest::Release { ino, .. } => *ino,
        }
    }
}

/// One open file: sequential-access detection for read-ahead.
struct Handle {
    next_offset: u64,
    window: u64,
}

/// How an inode's open handles are served. The kernel keeps one mode per inode while any handle
/// is open (a passthrough open next to a cached one fails with ETXTBSY, the reverse with
/// EINVAL), so a new open joins the mode already in use.
enum IoMode {
    /// READs come to this shard.
    Shard { handles: usize },
    /// The kernel reads the cache file itself; every handle shares one backing id.
    Passthrough {
        backing: Rc<BackingId>,
        handles: usize,
    },
}

/// Where a verification stream reads an object from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Store,
    DiskCache,
}

/// What a verification stream that matched leaves behind.
struct Verified {
    /// Blocks kept for publication, by index.
    kept: Vec<(u32, Rc<Block>)>,
    /// xxh3-64 of every block of the object, in order.
    digests: Rc<[u64]>,
}

/// Why a verification stream ended without a verified object.
enum StreamError {
    /// The bytes arrived but hash to this digest instead.
    Mismatch(Hash),
    Failed(StoreError),
}

/// What every shard is started with (built on the main thread, cloned into each shard).
#[derive(Clone)]
pub struct ServiceConfig {
    pub namespace: Arc<Namespace>,
    pub store: StoreConfig,
    /// `--part-size`: bytes per store read and per cached block (a power of two >= 1 MiB).
    pub block_size: u64,
    /// `--cache-dir`, already prepared ([`DiskCache::prepare`]), with its janitor running.
    pub disk_cache: Option<DiskCacheConfig>,
    /// Set by the FUSE front once the kernel agreed to passthrough at INIT.
    pub passthrough: Arc<AtomicBool>,
}

type Verify = Shared<LocalBoxFuture<'static, Result<(), Errno>>>;

/// Everything one shard owns. See the module docs for the rules.
pub struct FileService {
    shard: usize,
    /// Bytes per block: the unit of store reads, of the cache and of per-block digests.
    block_size: u64,
    shards: usize,
    namespace: Arc<Namespace>,
    store: Store,
    pool: BufferPool,
    cache: BlockCache,
    counters: Arc<ShardCounters>,
    handles: RefCell<HashMap<u64, Handle>>,
    next_fh: Cell<u64>,
    /// Objects verified on this shard, with the xxh3-64 digest of each of their blocks taken
    /// during verification: a block read again later is checked against it before it is served.
    verified: RefCell<HashMap<Hash, Rc<[u64]>>>,
    verifying: RefCell<HashMap<Hash, Verify>>,
    disk_cache: Option<DiskCache>,
    /// Verified objects whose disk-cache file is known good.
    cached: RefCell<HashSet<Hash>>,
    io_modes: RefCell<HashMap<Ino, IoMode>>,
    /// The kernel agreed to passthrough and no backing file was refused yet.
    passthrough: Arc<AtomicBool>,
    /// Bytes of the objects being verified now (whether or not their blocks are kept).
    verifying_bytes: Cell<u64>,
    /// The store's retry count already added to the counters.
    retries_counted: Cell<u64>,
    /// Bytes held by verification streams for publication once their object verifies.
    retained: Cell<usize>,
    /// Objects whose failure was already logged, so a failing object logs once, not per read.
    reported: RefCell<HashSet<Hash>>,
}

/// Runs one shard: takes requests from the mailbox and serves each as its own task.
pub async fn run_shard(
    ctx: ShardContext<ShardRequest>,
    mailbox: Mailbox<ShardRequest>,
    config: ServiceConfig,
    counters: Arc<ShardCounters>,
) {
    let pool = ctx.pool.clone();
    // Leave a quarter of the pool for reads in flight and verification streams.
    let cache_budget = pool.capacity() / 4 * 3;
    let service = Rc::new(FileService {
        shard: ctx.id,
        shards: ctx.peers.len(),
        block_size: config.block_size,
        namespace: config.namespace,
        store: config.store.open_for_shard(),
        disk_cache: config
            .disk_cache
            .as_ref()
            .map(|cache| DiskCache::new(cache, ctx.id)),
        cached: RefCell::new(HashSet::new()),
        io_modes: RefCell::new(HashMap::new()),
        passthrough: config.passthrough,
        pool,
        cache: BlockCache::new(cache_budget),
        counters,
        handles: RefCell::new(HashMap::new()),
        next_fh: Cell::new(1),
        verified: RefCell::new(HashMap::new()),
        verifying: RefCell::new(HashMap::new()),
        reported: RefCell::new(HashSet::new()),
        retained: Cell::new(0),
        retries_counted: Cell::new(0),
        verifying_bytes: Cell::new(0),
    });
    while let Some(request) = mailbox.recv().await {
        let service = service.clone();
        glommio::spawn_local(async move { service.handle(request).await }).detach();
    }
}

/// Length of object `index` of a file: chunked files have 256 MiB objects and a shorter last one.
fn object_len(size: u64, chunked: bool, index: usize) -> u64 {
    if chunked {
        (size - index as u64 * CHUNK_SIZE).min(CHUNK_SIZE)
    } else {
        size
    }
}

/// Where file position `pos` is: (object index, block within the object, offset in the block).
fn locate(chunked: bool, block_size: u64, pos: u64) -> (usize, u32, usize) {
    let (object, within) = if chunked {
        ((pos / CHUNK_SIZE) as usize, pos % CHUNK_SIZE)
    } else {
        (0, pos)
    };
    (
        object,
        (within / block_size) as u32,
        (within % block_size) as usize,
    )
}

impl FileService {
    async fn handle(self: Rc<Self>, request: ShardRequest) {
        let c = &self.counters;
        if owner(request.ino(), self.shards) != self.shard {
            c.add(&c.misrouted, 1);
        }
        match request {
            ShardRequest::Open { ino, direct, reply } => {
                c.add(&c.opens, 1);
                let backing = self.join_io_mode(ino, direct, &reply).await;
                let fh = self.next_fh.get();
                self.next_fh.set(fh + 1);
                self.handles.borrow_mut().insert(
                    fh,
                    Handle {
                        next_offset: 0,
                        window: 1,
                    },
                );
                match backing {
                    Some(backing) => {
                        c.add(&c.passthrough_opens, 1);
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                    }
                    // Content is immutable: the page cache may keep it across opens.
                    None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                }
            }
            ShardRequest::Release { ino, fh, reply } => {
                c.add(&c.releases, 1);
                let handle = self.handles.borrow_mut().remove(&fh);
                if handle.is_some() {
                    let mut modes = self.io_modes.borrow_mut();
                    if let Some(IoMode::Shard { handles } | IoMode::Passthrough { handles, .. }) =
                        modes.get_mut(&ino)
                    {
                        *handles -= 1;
                        if *handles == 0 {
                            // Dropping the last Rc<BackingId> closes the backing id.
                            modes.remove(&ino);
                        }
                    }
                }
                reply.ok();
            }
            ShardRequest::Read {
                ino,
                fh,
                offset,
                size,
                reply,
            } => {
                c.add(&c.reads, 1);
                match self.read(ino, fh, offset, size as u64).await {
                    Ok(Served::One(block, range)) => {
                        c.add(&c.bytes_served, range.len() as u64);
                        reply.data(&block[range]);
                    }
                    Ok(Served::Gathered(bytes)) => {
                        c.add(&c.bytes_served, bytes.len() as u64);
                        reply.data(&bytes);
                    }
                    Err(errno) => {
                        c.add(&c.errors, 1);
                        reply.error(errno);
                    }
                }
            }
        }
    }

    /// Registers a new open of `ino` in the inode's [`IoMode`] and returns the backing file
    /// when that mode is passthrough. Starts passthrough only for a buffered open of a
    /// single-object file whose object is (after waiting for its verification) in the disk
    /// cache; see the module docs.
    async fn join_io_mode(
        self: &Rc<Self>,
        ino: Ino,
        direct: bool,
        reply: &ReplyOpen,
    ) -> Option<Rc<BackingId>> {
        let mut backing = None;
        if !self.io_modes.borrow().contains_key(&ino) && !direct {
            backing = self.open_backing(ino, reply).await;
        }
        // No await from here on: the mode checked is the mode joined.
        let mut modes = self.io_modes.borrow_mut();
        match modes.get_mut(&ino) {
            Some(IoMode::Passthrough { backing, handles }) => {
                *handles += 1;
                Some(backing.clone())
            }
            Some(IoMode::Shard { handles }) => {
                *handles += 1;
                None
            }
            None => {
                let mode = match &backing {
                    Some(backing) => IoMode::Passthrough {
                        backing: backing.clone(),
                        handles: 1,
                    },
                    None => IoMode::Shard { handles: 1 },
                };
                modes.insert(ino, mode);
                backing
            }
        }
    }

    /// The cache file of single-object file `ino` registered as a passthrough backing file, or
    /// `None` where passthrough does not apply or fails (the open is then shard-served).
    async fn open_backing(self: &Rc<Self>, ino: Ino, reply: &ReplyOpen) -> Option<Rc<BackingId>> {
        let cache = self.disk_cache.as_ref()?;
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let content = self.namespace.file_content(ino)?;
        let [hash] = content.objects[..] else {
            return None;
        };
        if content.size == 0 {
            return None;
        }
        // A failure here is the first read's failure too; the read reports it.
        self.verify(ino, hash, content.size).await.ok()?;
        if !self.cached.borrow().contains(&hash) {
            return None;
        }
        let file = match cache.open_for_passthrough(hash) {
            Ok(file) => file,
            Err(e) => {
                // Removed or replaced under us: this open is shard-served, and the next
                // verification finds out what is there.
                tracing::warn!(
                    shard = self.shard,
                    "cannot open cache file {}: {e}",
                    cache.location(hash).display()
                );
                self.cached.borrow_mut().remove(&hash);
                return None;
            }
        };
        match reply.open_backing(&file) {
            Ok(backing) => Some(Rc::new(backing)),
            Err(e) => {
                // The kernel refuses backing files without CAP_SYS_ADMIN, and on a stacked
                // filesystem (overlayfs, another FUSE mount): that will not change, so stop
                // asking, on every shard.
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough of cache file {} refused: {e}; serving every read \
                         through the shards (passthrough needs root and --cache-dir on a local \
                         filesystem)",
                        cache.location(hash).display()
                    );
                }
                None
            }
        }
    }

    async fn read(
        self: &Rc<Self>,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u64,
    ) -> Result<Served, Errno> {
        let content = self.namespace.file_content(ino).ok_or(Errno::EIO)?;
        let end = offset.saturating_add(size).min(content.size);
        if offset >= end {
            return Ok(Served::Gathered(Vec::new()));
        }
        self.plan_readahead(ino, fh, offset, end);
        let locate = |pos: u64| locate(content.chunked, self.block_size, pos);
        let (object, block, start) = locate(offset);
        let first = self.block(ino, object, block).await?;
        let wanted = (end - offset) as usize;
        if start + wanted <= first.len() {
            return Ok(Served::One(first, start..start + wanted));
        }
        // The read straddles blocks (an unaligned reader): gather into one reply buffer.
        let mut bytes = Vec::with_capacity(wanted);
        bytes.extend_from_slice(&first[start..]);
        // Holding a block while waiting for the next could pin the pool with many readers.
        drop(first);
        while bytes.len() < wanted {
            let (object, block, start) = locate(offset + bytes.len() as u64);
            let next = self.block(ino, object, block).await?;
            let take = (wanted - bytes.len()).min(next.len() - start);
            bytes.extend_from_slice(&next[start..start + take]);
        }
        Ok(Served::Gathered(bytes))
    }

    /// Sequential readers get the next blocks loaded ahead, in a window that doubles.
    fn plan_readahead(self: &Rc<Self>, ino: Ino, fh: u64, offset: u64, end: u64) {
        let window = {
            let mut handles = self.handles.borrow_mut();
            let Some(handle) = handles.get_mut(&fh) else {
                return;
            };
            let sequential = offset == handle.next_offset;
            handle.window = if sequential {
                (handle.window * 2).min(self.max_readahead_blocks())
            } else {
                1
            };
            handle.next_offset = end;
            if !sequential {
                return;
            }
            handle.window
        };
        let Some(content) = self.namespace.file_content(ino) else {
            return;
        };
        let block_size = self.block_size;
        let first = end.div_ceil(block_size) * block_size;
        for i in 0..window {
            let pos = first + i * block_size;
            if pos >= content.size {
                break;
            }
            let (object, block, _) = locate(content.chunked, block_size, pos);
            let Some(&hash) = content.objects.get(object) else {
                break;
            };
            // Blocks of an object not verified yet join its verification: for chunked files
            // that starts the next chunk's verification before the reader gets there. Objects
            // that already failed are retried on demand only, not by every read-ahead.
            if self.cache.contains((hash, block)) || self.reported.borrow().contains(&hash) {
                continue;
            }
            // All readers of the shard together load ahead at most half the cache: blocks
            // loaded past that would evict each other before they are read.
            let loading = self.cache.loading() as u64 * block_size;
            if loading + block_size > self.cache.budget() as u64 / 2 {
                break;
            }
            let service = self.clone();
            glommio::spawn_local(async move {
                let _ = service.block(ino, object, block).await;
            })
            .detach();
        }
        if content.chunked {
            self.verify_next_chunk(ino, end, content.size, content.objects);
        }
    }

    /// A sequential reader of a chunked file whose current chunk is verified gets the next
    /// chunk verified ahead, so that chunk's full pass overlaps serving this one instead of
    /// stalling the reader at the boundary. One chunk ahead at most, and only while every
    /// verification in progress fits the retention budget: blocks a stream cannot keep are
    /// fetched twice, so running ahead past the budget costs more than the stall it saves.
    fn verify_next_chunk(self: &Rc<Self>, ino: Ino, position: u64, size: u64, objects: &[Hash]) {
        let current = (position / CHUNK_SIZE) as usize;
        let (Some(hash), Some(&next)) = (objects.get(current), objects.get(current + 1)) else {
            return;
        };
        let ready = |h: &Hash| self.verified.borrow().contains_key(h);
        if !ready(hash) || ready(&next) || self.verifying.borrow().contains_key(&next) {
            return;
        }
        let len = object_len(size, true, current + 1);
        if self.verifying_bytes.get() + len > self.retention_budget() as u64 {
            return;
        }
        let service = self.clone();
        glommio::spawn_local(async move {
            let _ = service.verify(ino, next, len).await;
        })
        .detach();
    }

    /// Block `block` of object `object` of file `ino`, verified, from the cache or the store.
    async fn block(
        self: &Rc<Self>,
        ino: Ino,
        object: usize,
        block: u32,
    ) -> Result<Rc<Block>, Errno> {
        let content = self.namespace.file_content(ino).ok_or(Errno::EIO)?;
        let hash = *content.objects.get(object).ok_or(Errno::EIO)?;
        let len = object_len(content.size, content.chunked, object);
        if len == 0 {
            return Ok(Rc::new(Block::empty()));
        }
        let c = &self.counters;
        if let Some(cached) = self.cache.get((hash, block)) {
            c.add(&c.cache_hits, 1);
            return Ok(cached);
        }
        // A miss, whether the verification stream or a reload brings the block.
        c.add(&c.cache_misses, 1);
        self.verify(ino, hash, len).await?;
        if let Some(cached) = self.cache.get((hash, block)) {
            return Ok(cached);
        }
        let service = self.clone();
        let load = self.cache.load_or_join((hash, block), move || {
            async move {
                let start = block as u64 * service.block_size;
                let result = service
                    .reload(ino, hash, len, start, (len - start).min(service.block_size))
                    .await;
                let result = result.map(Rc::new);
                if let Ok(loaded) = &result {
                    service.publish((hash, block), loaded.clone());
                }
                service.cache.finish_load((hash, block));
                result
            }
            .boxed_local()
        });
        load.await
    }

    /// Puts a verified block in the cache, then evicts until a full verification window would
    /// fit in the pool again. Loads already waiting for pool memory are woken by that eviction;
    /// without it they could wait on memory only the cache holds while nothing new arrives.
    fn publish(&self, key: BlockKey, block: Rc<Block>) {
        self.cache.insert(key, block);
        self.make_room(self.headroom());
    }

    /// Largest read-ahead window, in blocks: [`MAX_READAHEAD`], but at most a quarter of the
    /// cache, so blocks loaded ahead are still cached when the reader gets there (a window as
    /// large as a small pool evicted its own blocks and every block was fetched again).
    fn max_readahead_blocks(&self) -> u64 {
        let bytes = MAX_READAHEAD.min(self.cache.budget() as u64 / 4);
        (bytes / self.block_size).max(1)
    }

    /// Pool memory kept free for loads: a full verification window, at most a quarter of the
    /// pool. Retained blocks never reach into it, so a verification can always progress.
    fn headroom(&self) -> usize {
        (VERIFY_READS_IN_FLIGHT * self.block_size as usize).min(self.pool.capacity() / 4)
    }

    /// Bytes all verification streams of this shard together may keep for publication.
    fn retention_budget(&self) -> usize {
        self.cache.budget().saturating_sub(self.headroom())
    }

    /// Evicts cached blocks until `len` more bytes fit in the pool. Without this, loads waiting
    /// for pool memory could wait forever on memory that only the cache holds.
    fn make_room(&self, len: usize) {
        let needed = rounded_size(len);
        while self.pool.in_use() + needed > self.pool.capacity() {
            if !self.cache.evict_one() {
                break;
            }
        }
    }

    /// Pool memory for a read of `len` bytes, after evicting cached blocks to make room. Waits
    /// in FIFO order behind earlier requests: a caller that needs its reads to complete in order
    /// takes their memory in that order (see [`FileService::stream`]).
    async fn grant(&self, hash: Hash, len: u64) -> Result<Reservation, StoreError> {
        self.make_room(len as usize);
        self.pool
            .reserve(len as usize)
            .await
            .map_err(|e| StoreError::Io {
                location: self.store.location(hash).into(),
                source: std::io::Error::other(e),
            })
    }

    /// Reads a range of object `hash` from `source` into `memory` (from [`FileService::grant`]),
    /// counting what it costs.
    async fn fetch(
        &self,
        memory: Reservation,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: u64,
        source: Source,
    ) -> Result<Block, StoreError> {
        let started = Instant::now();
        let len = len as usize;
        let c = &self.counters;
        let result = match (source, &self.disk_cache) {
            (Source::DiskCache, Some(cache)) => {
                let read = cache.read(memory, hash, object_len, offset, len);
                let result = read.await;
                if let Ok(block) = &result {
                    c.add(&c.disk_cache_bytes, block.len() as u64);
                }
                result
            }
            _ => {
                let read = self
                    .store
                    .read(&self.pool, memory, hash, object_len, offset, len);
                let result = read.await;
                if let Ok(block) = &result {
                    c.add(&c.bytes_fetched, block.len() as u64);
                }
                result
            }
        };
        c.add(&c.fetch_micros, started.elapsed().as_micros() as u64);
        let retries = self.store.retries();
        c.add(
            &c.store_retries,
            retries - self.retries_counted.replace(retries),
        );
        result
    }

    /// A block of a verified object that was not kept: from its cache file when there is one,
    /// else from the store, and served only if it still has the digest it had when the object
    /// was verified (a store that changed its mind or a flip in transit gives one more fetch,
    /// then EIO; a cache file that changed is discarded).
    async fn reload(
        &self,
        ino: Ino,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: u64,
    ) -> Result<Block, Errno> {
        let index = (offset / self.block_size) as usize;
        let expected = self
            .verified
            .borrow()
            .get(&hash)
            .and_then(|d| d.get(index).copied());
        let Some(expected) = expected else {
            return Err(Errno::EIO);
        };
        let intact = |block: &Block| xxh3_64(block) == expected;
        let read_from = |source| async move {
            let memory = self.grant(hash, len).await?;
            self.fetch(memory, hash, object_len, offset, len, source)
                .await
        };
        if self.cached.borrow().contains(&hash) {
            match read_from(Source::DiskCache).await {
                Ok(block) if intact(&block) => return Ok(block),
                Ok(_) => {
                    if let Some(cache) = &self.disk_cache {
                        tracing::warn!(
                            shard = self.shard,
                            "cache file {} changed since it was verified; removed",
                            cache.location(hash).display()
                        );
                        cache.discard(hash);
                    }
                }
                Err(error) => {
                    tracing::warn!(shard = self.shard, "{error}; reading the store instead")
                }
            }
            self.cached.borrow_mut().remove(&hash);
        }
        let c = &self.counters;
        for _attempt in 0..2 {
            match read_from(Source::Store).await {
                Ok(block) if intact(&block) => return Ok(block),
                Ok(_) => c.add(&c.verify_failures, 1),
                Err(error) => {
                    self.report(ino, hash, &error);
                    return Err(error.errno());
                }
            }
        }
        self.report(
            ino,
            hash,
            &format_args!(
                "block {index} of object {} differs from the verified object (twice): not served",
                self.store.location(hash)
            ),
        );
        Err(Errno::EIO)
    }

    fn report(&self, ino: Ino, hash: Hash, error: &dyn std::fmt::Display) {
        if self.reported.borrow_mut().insert(hash) {
            tracing::error!(
                shard = self.shard,
                file = %self.namespace.path(ino).display(),
                %hash,
                "cannot serve file: {error}"
            );
        }
    }

    /// Makes sure object `hash` (of `len` bytes) was verified on this shard; see the module docs.
    async fn verify(self: &Rc<Self>, ino: Ino, hash: Hash, len: u64) -> Result<(), Errno> {
        if self.verified.borrow().contains_key(&hash) {
            return Ok(());
        }
        let existing = self.verifying.borrow().get(&hash).cloned();
        let run = match existing {
            Some(run) => run,
            None => {
                let service = self.clone();
                let run = async move {
                    let result = service.stream_and_verify(ino, hash, len).await;
                    service.verifying.borrow_mut().remove(&hash);
                    service
                        .verifying_bytes
                        .set(service.verifying_bytes.get() - len);
                    result
                }
                .boxed_local()
                .shared();
                self.verifying.borrow_mut().insert(hash, run.clone());
                self.verifying_bytes.set(self.verifying_bytes.get() + len);
                run
            }
        };
        run.await
    }

    /// Streams object `hash` through the hasher: from the disk cache when it holds a copy,
    /// else from the store (writing it into the disk cache as it passes); see the module docs.
    async fn stream_and_verify(
        self: &Rc<Self>,
        ino: Ino,
        hash: Hash,
        len: u64,
    ) -> Result<(), Errno> {
        let c = &self.counters;
        if let Some(cache) = self.disk_cache.as_ref().filter(|d| d.has(hash, len)) {
            match self.stream(hash, len, Source::DiskCache, None).await {
                Ok(verified) => {
                    c.add(&c.objects_from_disk_cache, 1);
                    cache.touch(hash);
                    self.cached.borrow_mut().insert(hash);
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
            let writer = self.disk_cache.as_ref().and_then(|cache| {
                cache
                    .begin(hash)
                    .map_err(|e| self.warn_cache_write(cache.location(hash), e))
                    .ok()
            });
            let mut writer = writer;
            match self
                .stream(hash, len, Source::Store, Some(&mut writer))
                .await
            {
                Ok(verified) => {
                    if let (Some(writer), Some(cache)) = (writer, &self.disk_cache) {
                        let target = writer.target().to_path_buf();
                        match writer.commit() {
                            Ok(()) => {
                                cache.added(len);
                                c.add(&c.objects_cached, 1);
                                self.cached.borrow_mut().insert(hash);
                            }
                            Err(e) => self.warn_cache_write(target, e),
                        }
                    }
                    self.accept(hash, verified);
                    return Ok(());
                }
                Err(StreamError::Failed(error)) => {
                    self.report(ino, hash, &error);
                    return Err(error.errno());
                }
                Err(StreamError::Mismatch(digest)) => {
                    // Corrupted in transit or at rest: one more fetch tells the two apart.
                    c.add(&c.verify_failures, 1);
                    last_digest = digest;
                }
            }
        }
        self.report(
            ino,
            hash,
            &format_args!(
                "object {} has content hash {last_digest} (twice): corrupt, not served",
                self.store.location(hash)
            ),
        );
        Err(Errno::EIO)
    }

    /// Marks a verified object and publishes the blocks its stream kept.
    fn accept(&self, hash: Hash, verified: Verified) {
        let c = &self.counters;
        c.add(&c.objects_verified, 1);
        self.verified.borrow_mut().insert(hash, verified.digests);
        for (index, block) in verified.kept {
            self.publish((hash, index), block);
        }
    }

    /// A failed cache write costs the cache copy, not the read: one warning per shard.
    fn warn_cache_write(&self, location: PathBuf, error: std::io::Error) {
        let c = &self.counters;
        if c.disk_cache_write_errors.load(Ordering::Relaxed) == 0 {
            tracing::warn!(
                shard = self.shard,
                "cannot write cache file {}: {error}; serving without the disk cache",
                location.display()
            );
        }
        c.add(&c.disk_cache_write_errors, 1);
    }

    /// One pass over object `hash` from `source`, one block at a time with several in flight,
    /// hashing in order; blocks go to `writer` (a cache file) when given, and the head of the
    /// object is kept for publication within a shard-wide budget.
    async fn stream(
        self: &Rc<Self>,
        hash: Hash,
        len: u64,
        source: Source,
        mut writer: Option<&mut Option<CacheWriter>>,
    ) -> Result<Verified, StreamError> {
        let block_size = self.block_size;
        let blocks = len.div_ceil(block_size);
        let mut kept: Vec<(u32, Rc<Block>)> = Vec::new();
        let mut digests = Vec::with_capacity(blocks as usize);
        let mut kept_bytes = 0usize;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        // Memory is granted one block at a time, in block order, and only then is the read
        // started: the block the hasher waits for always holds its memory before any later one
        // asks, so later blocks cannot take the last of a small pool while the head waits
        // behind them (that deadlocked 32 MiB pools).
        let mut reads = Box::pin(
            futures::stream::iter(0..blocks)
                .then(|index| async move {
                    let start = index * block_size;
                    let part = (len - start).min(block_size);
                    (start, part, self.grant(hash, part).await)
                })
                .map(|(start, part, memory)| async move {
                    self.fetch(memory?, hash, len, start, part, source).await
                })
                .buffered(VERIFY_READS_IN_FLIGHT),
        );
        let mut index = 0u32;
        let result = loop {
            let Some(block) = reads.next().await else {
                break Ok(());
            };
            let block: Block = match block {
                Ok(block) => block,
                Err(error) => break Err(StreamError::Failed(error)),
            };
            hasher.update(&block);
            digests.push(xxh3_64(&block));
            if let Some(slot) = writer.as_deref_mut() {
                if let Some(file) = slot {
                    let offset = index as u64 * block_size;
                    if let Err(e) = file.write_at(offset, &block) {
                        self.warn_cache_write(file.target().to_path_buf(), e);
                        *slot = None;
                    }
                }
            }
            // Keep the head of the object for the reader that is waiting, within a shard-wide
            // budget that leaves room for the reads in flight, so concurrent verifications
            // cannot fill the pool with unpublished blocks. Every block not kept is read
            // again after verification, so keep as much as the cache could hold.
            if self.retained.get() + block.len() <= self.retention_budget() {
                self.retained.set(self.retained.get() + block.len());
                kept_bytes += block.len();
                kept.push((index, Rc::new(block)));
            }
            index += 1;
        };
        drop(reads);
        self.retained.set(self.retained.get() - kept_bytes);
        result?;
        let digest = Hash(hasher.digest128());
        if digest != hash {
            return Err(StreamError::Mismatch(digest));
        }
        Ok(Verified {
            kept,
            digests: digests.into(),
        })
    }
}

/// What a read replies with: a range of one cached block (the common, zero-copy case) or bytes
/// gathered from several blocks.
enum Served {
    One(Rc<Block>, std::ops::Range<usize>),
    Gathered(Vec<u8>),
}
