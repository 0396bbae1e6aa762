//! Pool memory and store reads: every byte a shard fetches is granted pool memory first (in the
//! order the caller needs its reads to complete), then read from the store or the disk cache.

use std::time::Instant;

use mount_vfs_executors::{rounded_size, Reservation};

use super::FileService;
use crate::manifest::Hash;
use crate::store::{Block, ObjectRange, ObjectStore, RetryCause, StoreError};

/// Store reads kept in flight while one object is streamed for verification.
/// 8 x 4 MiB keeps a 25-200 Gbps link busy at S3's first-byte latencies; the S3 benchmark
/// (docs/benchmarks.md) saw verification pull only ~0.55x of the raw client with 4.
pub(super) const VERIFY_READS_IN_FLIGHT: usize = 8;

/// Where a read takes an object's bytes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Store,
    DiskCache,
    /// This shard's spill file of the object (see `store::Spill`).
    Spill,
}

impl FileService {
    /// Pool memory kept free for loads: a full verification window, at most a quarter of the
    /// pool. Retained blocks never reach into it, so a verification can always progress.
    pub(super) fn headroom(&self) -> usize {
        (VERIFY_READS_IN_FLIGHT * self.block_size as usize).min(self.pool.capacity() / 4)
    }

    /// Bytes all verification streams of this shard together may keep for publication.
    pub(super) fn retention_budget(&self) -> usize {
        self.cache.budget().saturating_sub(self.headroom())
    }

    /// Evicts cached blocks until `len` more bytes fit in the pool. Without this, loads waiting
    /// for pool memory could wait forever on memory that only the cache holds.
    /// Blocks on their way into a spill file count as gone: their memory returns when written.
    pub(super) fn make_room(&self, len: usize) {
        let needed = rounded_size(len);
        while self.pool.in_use().saturating_sub(self.leaving_bytes()) + needed
            > self.pool.capacity()
        {
            let Some(evicted) = self.cache.evict_one() else {
                break;
            };
            self.spill_unread(evicted);
        }
    }

    /// Pool memory for a read of `len` bytes, after evicting cached blocks to make room. Waits
    /// in FIFO order behind earlier requests: a caller that needs its reads to complete in order
    /// takes their memory in that order (see [`FileService::stream`]).
    pub(super) async fn grant(&self, hash: Hash, len: u64) -> Result<Reservation, StoreError> {
        self.make_room(len as usize);
        self.pool
            .reserve(len as usize)
            .await
            .map_err(|e| StoreError::Io {
                location: self.store.location(hash),
                source: std::io::Error::other(e),
            })
    }

    /// Reads `range` from `source` into `memory` (from [`FileService::grant`]), counting what
    /// it costs. A store that returns fewer bytes than asked fails the read.
    pub(super) async fn fetch(
        &self,
        memory: Reservation,
        range: ObjectRange,
        source: Source,
    ) -> Result<Block, StoreError> {
        let started = Instant::now();
        let c = &self.counters;
        let (store, counter, in_flight): (&dyn ObjectStore, _, _) =
            match (source, &self.disk_cache, &self.spill) {
                (Source::DiskCache, Some(cache), _) => (cache, &c.disk_cache_bytes, None),
                (Source::Spill, _, Some(spill)) => (spill, &c.spill_bytes_read, None),
                _ => (&*self.store, &c.bytes_fetched, Some(c.store_read())),
            };
        let result = store.read(&self.pool, memory, range).await;
        drop(in_flight);
        let result = result.and_then(|block| {
            if block.len() == range.len {
                Ok(block)
            } else {
                Err(StoreError::Io {
                    location: store.location(range.hash),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("short read: {} of {} bytes", block.len(), range.len),
                    ),
                })
            }
        });
        if let Ok(block) = &result {
            c.add(counter, block.len() as u64);
        }
        let elapsed = started.elapsed();
        c.add(&c.fetch_micros, elapsed.as_micros() as u64);
        c.fetch_latency.record(elapsed);
        let retries = self.store.retries();
        let counted = self.retries_counted.replace(retries);
        for cause in RetryCause::ALL {
            let new = retries.0[cause as usize] - counted.0[cause as usize];
            c.add(&c.store_retries, new);
            c.add(&c.store_retries_by_cause[cause as usize], new);
        }
        result
    }
}
