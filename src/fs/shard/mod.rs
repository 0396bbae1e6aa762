//! The shard file service: everything a shard does for the inodes it owns.
//!
//! Ownership rules (the one place they are written down):
//! - `owner(ino) = namespace::owner(ino, shards)`; the dispatcher ([`super::Dispatcher`]) sends
//!   every open, read and release of `ino` (and on a `--writable` mount every write, fallocate
//!   and truncate) to that shard, together with its reply object.
//! - Only the owner touches an inode's open handles, read-ahead state, cached blocks and loads.
//!   All of it lives in this shard's [`FileService`], which is `!Send` and needs no locks.
//! - Bytes live in the shard's registered buffer pool and never leave the shard: the shard
//!   replies itself, and the transport writes the reply straight from the block (fuser: one
//!   `writev`).
//! - What crosses threads: [`ShardRequest`] messages (metadata plus a reply object) in, and
//!   relaxed counter loads out; under `--verify stream`, the set of objects found corrupt after
//!   serving ([`VerifyPolicy`]); and a replica: the owner copies a verified block into a buffer
//!   of the shard a READ arrived on, which then serves that block's READs itself (`replica`,
//!   io_uring transport, read-only mounts). Nothing else.
//!
//! Concerns, one file each: open handles and I/O mode (`handles`), reads and the block cache
//! (`read`, `cache`), read-ahead (`readahead`), verification and re-reads (`verify`), serving
//! ahead of verification under `--verify stream` (`stream`), pool memory and store fetches
//! (`fetch`), counters (`counters`), and for `--writable` mounts writes, copy-up and merged
//! reads of files with upper bytes (`write`).
//!
//! Verification policy (`--verify object`, the default; `docs/semantics.md` states what each
//! mode promises): the unit of verification is a CAS object — the whole file for v2023
//! manifests, one 256 MiB chunk for chunked v2025 files — because that is what its xxh128 covers.
//! The first read of an object streams the whole object from the store through the hasher
//! (`--part-size` blocks, several in flight), keeping the first blocks (up to the cache budget
//! less a headroom) as they pass. Only when the digest matches are those blocks published to the cache and the object
//! marked verified on this shard; on a mismatch nothing is published and the read fails with EIO.
//! After that, blocks that were not kept are read again (from the disk cache, a spill file or
//! the store: `store::Spill`) and
//! served only if they hash to the xxh3-64 digest the same block had during verification, so a
//! store that changed or a flip in transit after verification is caught too. A
//! very large v2023 object therefore costs one full read before its first byte is served; the
//! chunked v2025 format bounds that to 256 MiB, and a sequential reader of a chunked file gets
//! the next chunk verified while it reads the current one (`verify_next_chunk`).
//! Bytes from the store that fail verification are fetched once more (a flipped bit in
//! transit), then the read fails with EIO.
//!
//! `--verify stream` trades that promise for reads that cost what they read: an object not
//! verified yet is served block by block as its ranged GETs arrive (`stream`), its blocks are
//! hashed in order as the in-order prefix grows, and the object is checked when the prefix
//! reaches its end; with a disk cache a background pass completes it first, and only a matching
//! object becomes a cache file. A mismatch found after bytes were served quarantines the object
//! on every shard (the one set shared across threads besides counters: EIO on every later open
//! and read). Once verified, the object follows the object-mode rules (its re-read blocks,
//! including blocks streamed before, are served only with their verified digests).
//!
//! With a disk cache (`--cache-dir`, [`DiskCache`]) the verification stream also writes the
//! object into it, and is committed there only when it matched; later passes read the cache
//! file instead of the store. A cache file is trusted once this mount hashed it, or when an
//! earlier mount's record (`store::VerificationLog`) vouches for it and its identity is unchanged
//! since; its recorded block digests then check every block read again, and digests that match
//! neither the cache file nor the store cost a fresh verification (a mismatch deletes the cache
//! file and the object comes from the store again).
//!
//! Passthrough: when the kernel supports it and the disk cache holds a verified copy, a
//! buffered open of a single-object file is answered with the cache file as its backing file,
//! and the kernel reads it without calling us at all. The open of such a file waits for the
//! object's verification (the first read would wait for it anyway); under `--verify stream` it
//! does not wait: the open is shard-served until the object is verified. An O_DIRECT open passes
//! through only to a cache file that was there before this mount (a file this mount wrote may
//! have dirty pages that an O_DIRECT read would first write out). Other O_DIRECT opens,
//! files of several v2025 chunks (one backing file per inode) and opens while shard-served
//! handles of the inode are open stay on the shard: the kernel refuses to mix the two modes on
//! one inode, so `IoMode` follows whichever mode the inode's open handles already use.

mod cache;
mod counters;
mod fetch;
mod handles;
mod prefetch;
mod read;
mod readahead;
mod replica;
mod stream;
#[cfg(test)]
mod tests;
mod unread;
mod verify;
mod write;

use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mount_vfs_executors::{BufferPool, Mailbox, ShardContext};

use super::request::{fail, Fallocate, Open, Read, Release, Truncate, Write};
use super::{FsError, Op, OpCounters};
use crate::namespace::{owner, Ino, Namespace};
use crate::overlay::Overlay;
use crate::store::{
    DiskCache, DiskCacheConfig, ObjectStore, RetryCounts, Spill, SpillConfig, StoreConfig,
};
use crate::trace::TraceRecorder;

pub use cache::BlockKey;
pub use counters::{CounterSnapshot, Histogram, InFlight, ShardCounters};
pub use prefetch::{PrefetchItem, PrefetchPlan};
pub use replica::{LocalShard, Replica};
pub use stream::{VerifyMode, VerifyPolicy};

use cache::BlockCache;
use handles::Handles;
use prefetch::Prefetch;
use verify::Verification;

/// A data request for an inode, sent by the dispatcher to the inode's owner shard; or work a
/// transport runs on the shard's thread ([`ShardRequest::Run`]).
pub enum ShardRequest {
    Open(Open),
    /// A READ, and when it arrived on another shard that wants its block, that shard's request
    /// for a copy (`replica`).
    Read(Read, Option<Replica>),
    Release(Release),
    Write(Write),
    Fallocate(Fallocate),
    Truncate(Truncate),
    /// Called on the shard's thread, inside its executor, with the shard's own file service
    /// (the io_uring transport starts the shard's ring task with it).
    Run(Box<dyn FnOnce(LocalShard) + Send>),
}

impl ShardRequest {
    fn ino(&self) -> Option<Ino> {
        match self {
            ShardRequest::Open(Open { ino, .. })
            | ShardRequest::Read(Read { ino, .. }, _)
            | ShardRequest::Release(Release { ino, .. })
            | ShardRequest::Write(Write { ino, .. })
            | ShardRequest::Fallocate(Fallocate { ino, .. })
            | ShardRequest::Truncate(Truncate { ino, .. }) => Some(*ino),
            ShardRequest::Run(_) => None,
        }
    }

    /// Answers the request with `error` (the shard is gone).
    pub fn fail(self, ops: &OpCounters, error: FsError) {
        match self {
            ShardRequest::Open(open) => fail(ops, open.reply, Op::Open, open.ino, error),
            ShardRequest::Read(read, _) => fail(ops, read.reply, Op::Read, read.ino, error),
            ShardRequest::Release(release) => {
                fail(ops, release.reply, Op::Release, release.ino, error)
            }
            ShardRequest::Write(write) => fail(ops, write.reply, Op::Write, write.ino, error),
            ShardRequest::Fallocate(f) => fail(ops, f.reply, Op::Fallocate, f.ino, error),
            ShardRequest::Truncate(t) => fail(ops, t.reply, Op::SetAttr, t.ino, error),
            ShardRequest::Run(_) => {}
        }
    }
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
    /// Where objects too large for the pool spill without a disk cache ([`Spill`]).
    pub spill: Option<SpillConfig>,
    /// Set by the transport once the kernel agreed to passthrough at INIT.
    pub passthrough: Arc<AtomicBool>,
    /// Requests and failures per operation, shared with the dispatcher.
    pub ops: Arc<OpCounters>,
    /// The copy-on-write overlay of a `--writable` mount.
    pub overlay: Option<Arc<Overlay>>,
    /// `--verify`, with what its shards share.
    pub verify: VerifyPolicy,
    /// Where first reads are noted for the manifest's trace (`None`: no `--cache-dir`).
    pub trace: Option<Arc<TraceRecorder>>,
    /// What each shard prefetches (`--prefetch`).
    pub prefetch: Option<Arc<PrefetchPlan>>,
}

/// Everything one shard owns. See the module docs for the rules.
pub struct FileService {
    shard: usize,
    shards: usize,
    /// Bytes per block: the unit of store reads, of the cache and of per-block digests.
    block_size: u64,
    namespace: Arc<Namespace>,
    counters: Arc<ShardCounters>,
    ops: Arc<OpCounters>,
    pool: BufferPool,
    store: Rc<dyn ObjectStore>,
    disk_cache: Option<DiskCache>,
    spill: Option<Spill>,
    cache: BlockCache,
    handles: Handles,
    verification: Verification,
    policy: VerifyPolicy,
    /// Objects served ahead of verification (`--verify stream`) and how far each was hashed.
    streams: stream::Streams,
    /// The store's retry count already added to the counters.
    retries_counted: Cell<RetryCounts>,
    overlay: Option<Arc<Overlay>>,
    /// Writes and copy-ups of an inode, one at a time.
    writers: write::Writers,
    prefetch: Prefetch,
    /// Replicas of other shards' blocks this shard is waiting for.
    replicating: replica::Replicating,
    /// Evicted blocks on their way into spill files.
    leaving: unread::Leaving,
    /// This service, for the tasks its `&self` methods start.
    this: Weak<FileService>,
}

/// The parts a [`FileService`] is made of, opened on its shard.
pub struct ServiceParts {
    pub shard: usize,
    pub shards: usize,
    pub block_size: u64,
    pub namespace: Arc<Namespace>,
    pub pool: BufferPool,
    pub store: Rc<dyn ObjectStore>,
    pub disk_cache: Option<DiskCache>,
    pub spill: Option<Spill>,
    pub passthrough: Arc<AtomicBool>,
    pub counters: Arc<ShardCounters>,
    pub ops: Arc<OpCounters>,
    pub overlay: Option<Arc<Overlay>>,
    pub verify: VerifyPolicy,
    pub trace: Option<Arc<TraceRecorder>>,
}

impl FileService {
    pub fn new(parts: ServiceParts) -> Rc<FileService> {
        // Leave a quarter of the pool for reads in flight and verification streams.
        let cache_budget = parts.pool.capacity() / 4 * 3;
        Rc::new_cyclic(|this| FileService {
            shard: parts.shard,
            shards: parts.shards,
            block_size: parts.block_size,
            namespace: parts.namespace,
            counters: parts.counters,
            ops: parts.ops,
            pool: parts.pool,
            store: parts.store,
            disk_cache: parts.disk_cache,
            spill: parts.spill,
            cache: BlockCache::new(cache_budget),
            handles: Handles::new(parts.passthrough),
            verification: Verification::default(),
            policy: parts.verify,
            streams: stream::Streams::default(),
            retries_counted: Cell::default(),
            overlay: parts.overlay,
            writers: write::Writers::default(),
            prefetch: Prefetch::new(parts.trace),
            replicating: replica::Replicating::default(),
            leaving: unread::Leaving::default(),
            this: this.clone(),
        })
    }

    /// Serves one request to the end, replying through its reply object.
    pub async fn handle(self: Rc<Self>, request: ShardRequest) {
        let c = &self.counters;
        if request
            .ino()
            .is_some_and(|ino| owner(ino, self.shards) != self.shard)
        {
            c.add(&c.misrouted, 1);
        }
        match request {
            ShardRequest::Open(open) => self.open(open).await,
            ShardRequest::Release(release) => self.release(release),
            ShardRequest::Read(read, replica) => {
                c.add(&c.reads, 1);
                let result = self.read(read.ino, read.fh, read.offset, read.size).await;
                match result {
                    Ok(data) => {
                        c.add(&c.bytes_served, data.bytes().len() as u64);
                        self.note_read(read.ino, read.offset, data.bytes().len() as u64);
                        read.reply.data(data);
                    }
                    Err(error) => {
                        c.add(&c.errors, 1);
                        fail(&self.ops, read.reply, Op::Read, read.ino, error);
                    }
                }
                c.read_latency.record(read.received.elapsed());
                if let Some(replica) = replica {
                    self.fill_replica(replica);
                }
            }
            ShardRequest::Write(write) => match self.write(&write).await {
                Ok(written) => write.reply.written(written),
                Err(error) => fail(&self.ops, write.reply, Op::Write, write.ino, error),
            },
            ShardRequest::Fallocate(f) => match self.fallocate(&f).await {
                Ok(()) => f.reply.ok(),
                Err(error) => fail(&self.ops, f.reply, Op::Fallocate, f.ino, error),
            },
            ShardRequest::Truncate(t) => match self.truncate(&t).await {
                Ok(attributes) => t.reply.attr(&attributes),
                Err(error) => fail(&self.ops, t.reply, Op::SetAttr, t.ino, error),
            },
            ShardRequest::Run(job) => job(LocalShard(self.clone())),
        }
    }
}

/// Runs one shard: takes requests from the mailbox and serves each as its own task.
pub async fn run_shard(
    ctx: ShardContext<ShardRequest>,
    mailbox: Mailbox<ShardRequest>,
    config: ServiceConfig,
    counters: Arc<ShardCounters>,
) {
    let service = FileService::new(ServiceParts {
        shard: ctx.id,
        shards: ctx.peers.len(),
        block_size: config.block_size,
        namespace: config.namespace,
        pool: ctx.pool.clone(),
        store: config.store.open_for_shard(),
        disk_cache: config
            .disk_cache
            .as_ref()
            .map(|cache| DiskCache::new(cache, ctx.id)),
        spill: config.spill.as_ref().map(Spill::new),
        passthrough: config.passthrough,
        counters,
        ops: config.ops,
        overlay: config.overlay,
        verify: config.verify,
        trace: config.trace,
    });
    if let Some(plan) = config.prefetch.as_ref().and_then(|p| p.shards.get(ctx.id)) {
        service.start_prefetch(plan.clone());
    }
    while let Some(request) = mailbox.recv().await {
        glommio::spawn_local(service.clone().handle(request)).detach();
    }
    service.stop_prefetch();
}
