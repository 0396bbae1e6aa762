//! Per-shard counters: cheap relaxed atomics written by the owning shard, read by `--stats` and
//! by benchmarks and tests from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident => $help:literal),* $(,)?) => {
        /// Live counters of one shard.
        #[derive(Debug, Default)]
        pub struct ShardCounters { $(#[doc = $help] pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`ShardCounters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct CounterSnapshot { $(pub $name: u64,)* }

        impl ShardCounters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl CounterSnapshot {
            /// Every counter as (name, help, value), for exporters.
            pub fn fields(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> {
                [$((stringify!($name), $help, self.$name),)*].into_iter()
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
    opens => "OPEN requests handled.",
    releases => "RELEASE requests handled (`opens - releases` files are open).",
    reads => "READ requests handled.",
    bytes_served => "Bytes sent in READ replies.",
    cache_hits => "Blocks found in the in-memory cache.",
    cache_misses => "Blocks that had to be loaded from the store.",
    bytes_fetched => "Bytes read from the store (verification and reloads).",
    store_retries => "Store requests sent again after a transient failure (S3 5xx, throttling, resets, timeouts, short bodies).",
    fetch_micros => "Microseconds spent waiting on store reads, summed.",
    objects_verified => "Objects whose xxh128 was checked and matched.",
    verify_failures => "Fetches whose bytes did not match: an object's hash, or a re-read block's digest.",
    objects_from_disk_cache => "Objects verified from a disk-cache file (no store read).",
    objects_trusted => "Of those, objects an earlier mount's record vouched for: the cache file was unchanged since it was verified, so it was not hashed again.",
    objects_cached => "Objects written into the disk cache after they verified.",
    disk_cache_bytes => "Bytes read from disk-cache files.",
    disk_cache_write_errors => "Failed writes to the disk cache (the reads still succeed, from memory or the store).",
    passthrough_opens => "Opens answered with a passthrough backing file (their READs never reach us).",
    errors => "Requests answered with an error.",
    misrouted => "Requests that arrived at a shard that does not own the inode (must stay 0).",
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
