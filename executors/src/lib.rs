//! The shard runtime of mount_vfs: pinned glommio executors, one per CPU, each with a
//! pre-faulted, hugepage-backed, io_uring-registered buffer pool. It knows nothing of FUSE or
//! manifests.
//!
//! # Ownership rules
//!
//! - A shard is one OS thread running one glommio `LocalExecutor` pinned to one CPU
//!   ([`Shards::start`]). Everything created on it stays on it.
//! - `!Send`, on purpose: [`BufferPool`], [`PoolBuffer`], [`Reservation`], and the
//!   `glommio::io::DmaBuffer`s inside them. They hold `Rc`s and point into the shard's arena,
//!   which is registered with that shard's io_uring rings only. **`DmaBuffer`s never leave their
//!   shard**; bytes leave a shard only by the kernel copying them out (a FUSE reply `writev`,
//!   a socket send).
//! - What crosses threads is only **mailbox messages**: a [`ShardSender`] (`Clone + Send + Sync`
//!   when the message type is `Send`) is used by plain threads (fuser workers) and by other shards
//!   (`ShardContext::peers`); the shard reads its [`Mailbox`]. A message should carry requests
//!   and reply handles, not data.
//! - [`PoolStats`] are atomics, readable from any thread.
//! - Which shard owns what (for example `owner(ino) = hash(ino) % N`) is decided by the caller;
//!   this crate only guarantees that a message sent to shard `i` runs on shard `i`.
//!
//! # Mailboxes are unbounded
//!
//! Outstanding requests are already bounded upstream: the kernel limits FUSE requests in flight
//! (synchronous ones by the blocked application threads, background ones by `max_background`).
//! A bound here would add no protection but would add a deadlock: shard A blocked sending to a
//! full shard B while B sends to a full A. Memory pressure is governed by the buffer pool, whose
//! waits are asynchronous.
//!
//! # The allocator hook
//!
//! The binary must declare `#[global_allocator] static ALLOC: ArenaAllocator = ArenaAllocator;`
//! for the arenas to be hugepage-backed and pre-faulted; without it shards still run and report
//! [`MemoryKind::HeapNoHook`]. See `docs/buffer-pool.md`.

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod alloc;
mod pool;
mod probe;
mod procstat;
mod shards;
mod topology;

pub use alloc::{ArenaAllocator, HugepageMode, MemoryKind, HUGE_PAGE};
pub use pool::{
    buddy_geometry, rounded_size, BufferPool, PoolBuffer, PoolStats, PoolStatsSnapshot,
    Reservation, TooLarge,
};
pub use probe::{smaps_entry, SmapsEntry};
pub use procstat::minor_faults_and_cpu_time;
pub use shards::{
    run_on_one_shard, shard_numa_nodes, spawn_park_guard, Mailbox, RunOneError, SendError,
    ShardConfig, ShardContext, ShardFailure, ShardFailureCause, ShardSender, Shards, ShutdownError,
    StartError, MAX_IO_MEMORY, MIN_IO_MEMORY,
};
pub use topology::shard_cpu_order;
