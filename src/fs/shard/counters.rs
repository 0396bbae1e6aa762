//! Per-shard counters: cheap relaxed atomics written by the owning shard, read by `--stats` and
//! by benchmarks and tests from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one shard.
        #[derive(Debug, Default)]
        pub struct ShardCounters { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`ShardCounters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct CounterSnapshot { $(pub $name: u64,)* }

        impl ShardCounters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl std::ops::Add for CounterSnapshot {
            type Output = CounterSnapshot;
            fn add(self, other: CounterSnapshot) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name + other.$name,)* }
            }
        }
    };
}

counters! {
    /// OPEN requests handled.
    opens,
    /// RELEASE requests handled (`opens - releases` files are open).
    releases,
    /// READ requests handled.
    reads,
    /// Bytes sent in READ replies.
    bytes_served,
    /// Blocks found in the in-memory cache.
    cache_hits,
    /// Blocks that had to be loaded from the store.
    cache_misses,
    /// Bytes read from the store (verification and reloads).
    bytes_fetched,
    /// Store requests sent again after a transient failure (S3 5xx, throttling, resets,
    /// timeouts, short bodies).
    store_retries,
    /// Microseconds spent waiting on store reads, summed.
    fetch_micros,
    /// Objects whose xxh128 was checked and matched.
    objects_verified,
    /// Objects whose bytes did not match their hash.
    verify_failures,
    /// Objects verified from a disk-cache file (no store read).
    objects_from_disk_cache,
    /// Of those, objects an earlier mount's record vouched for: the cache file was unchanged
    /// since it was verified, so it was not hashed again.
    objects_trusted,
    /// Objects written into the disk cache after they verified.
    objects_cached,
    /// Bytes read from disk-cache files.
    disk_cache_bytes,
    /// Failed writes to the disk cache (the reads still succeed, from memory or the store).
    disk_cache_write_errors,
    /// Opens answered with a passthrough backing file (their READs never reach us).
    passthrough_opens,
    /// Requests answered with an error.
    errors,
    /// Requests that arrived at a shard that does not own the inode (must stay 0).
    misrouted,
}

impl CounterSnapshot {
    /// Files open in the mount now (opens not yet released).
    pub fn open_handles(&self) -> u64 {
        self.opens.saturating_sub(self.releases)
    }
}

impl ShardCounters {
    pub fn add(&self, counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Relaxed);
    }
}
