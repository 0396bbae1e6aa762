//! Per-shard counters and latency histograms: cheap relaxed atomics written by the owning shard,
//! read by `--stats`, `--metrics-addr`, benchmarks and tests from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::store::RetryCause;

macro_rules! counters {
    ($($name:ident => $help:literal),* $(,)?) => {
        /// Live counters of one shard.
        #[derive(Debug, Default)]
        pub struct ShardCounters {
            $(#[doc = $help] pub $name: AtomicU64,)*
            /// From the dispatcher routing a READ to the shard's reply.
            pub read_latency: Histogram,
            /// From the dispatcher routing an OPEN to the shard's reply (includes waiting for
            /// the object's verification when the open becomes passthrough).
            pub open_latency: Histogram,
            /// One store or disk-cache read, from its start to its last byte.
            pub fetch_latency: Histogram,
            /// Store reads (S3 GETs, local CAS reads; not disk-cache reads) started and not
            /// finished: a gauge, for `mount_vfs stats` and the metrics endpoint.
            pub store_reads_in_flight: AtomicU64,
            /// `store_retries` by cause, indexed by `RetryCause as usize`.
            pub store_retries_by_cause: [AtomicU64; RetryCause::ALL.len()],
        }

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
    objects_verified => "Objects verified on this shard: xxh128 checked and matched, or trusted from an earlier mount's record.",
    verify_failures => "Fetches whose bytes did not match: an object's hash, or a re-read block's digest.",
    verify_failures_after_serve => "Objects that did not match their hash after some of their bytes were served (`--verify stream`); each is quarantined.",
    objects_from_disk_cache => "Objects verified from a disk-cache file (no store read).",
    objects_trusted => "Of those, objects an earlier mount's record vouched for: the cache file was unchanged since it was verified, so it was not hashed again.",
    objects_cached => "Objects written into the disk cache after they verified.",
    disk_cache_bytes => "Bytes read from disk-cache files.",
    spill_bytes_written => "Bytes of verified objects too large for memory written to spill files (no `--cache-dir`).",
    spill_bytes_read => "Bytes read back from spill files instead of fetched from the store again.",
    disk_cache_write_errors => "Failed writes to the disk cache (the reads still succeed, from memory or the store).",
    passthrough_opens => "Opens answered with a passthrough backing file (their READs never reach us).",
    prefetched_bytes => "Bytes of objects prefetch verified ahead of any reader (`--prefetch`).",
    prefetch_hit_bytes => "Bytes served from objects prefetch brought (for a passthrough open, the object's size, once).",
    prefetch_wasted_bytes => "Bytes prefetch brought that no reader used (counted when the mount stops).",
    replica_reads => "READs of another shard's inode served here from this shard's replica of the block (io_uring transport, read-only mounts).",
    replicas_made => "Blocks of another shard's inodes copied in from their owner as replicas.",
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
    /// Counts a store read in flight until the guard is dropped (finished, failed or
    /// abandoned).
    pub fn store_read(&self) -> InFlight<'_> {
        self.store_reads_in_flight.fetch_add(1, Relaxed);
        InFlight(&self.store_reads_in_flight)
    }

    pub fn add(&self, counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Relaxed);
    }
}

/// One store read in flight (see [`ShardCounters::store_read`]).
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A latency histogram with power-of-two buckets from 1 us to about 17 s (bucket `i` counts
/// samples of at most 2^i us; the last also counts everything longer). Recording is three
/// relaxed adds on the recording shard's own cache lines.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; Histogram::BUCKETS],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub const BUCKETS: usize = 25;

    pub fn record(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().min(u64::MAX as u128) as u64;
        // The smallest i with micros <= 2^i.
        let bucket = (u64::BITS - micros.saturating_sub(1).leading_zeros()) as usize;
        self.buckets[bucket.min(Self::BUCKETS - 1)].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (sum of samples in seconds, count, (upper bound in seconds, samples in that bucket) per
    /// bucket), the form Prometheus encoders take. The last bound is +Inf.
    pub fn buckets(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, bucket)| {
                let bound = if i == Self::BUCKETS - 1 {
                    f64::INFINITY
                } else {
                    (1u64 << i) as f64 / 1e6
                };
                (bound, bucket.load(Relaxed))
            })
            .collect();
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        (sum, self.count.load(Relaxed), buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_smallest_bucket_that_holds_them() {
        let h = Histogram::default();
        for micros in [0, 1, 2, 3, 4, 1000, 1 << 30] {
            h.record(Duration::from_micros(micros));
        }
        let (sum, count, buckets) = h.buckets();
        assert_eq!(count, 7);
        assert!((sum - (1010.0 + (1u64 << 30) as f64) / 1e6).abs() < 1e-9);
        // <= 1 us: 0 and 1; <= 2: 2; <= 4: 3 and 4; <= 1024: 1000; +Inf: 2^30.
        assert_eq!(buckets[0], (1e-6, 2));
        assert_eq!(buckets[1], (2e-6, 1));
        assert_eq!(buckets[2], (4e-6, 2));
        assert_eq!(buckets[10], (1024e-6, 1));
        assert_eq!(buckets[24], (f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 7);
    }
}
