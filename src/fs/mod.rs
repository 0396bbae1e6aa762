//! The filesystem core: what mount_vfs does with each request, whatever transport brought it.
//!
//! Layers, imports running down only:
//! - [`dispatch`]: the one entry point every request passes ([`Dispatcher::dispatch`]). Answers
//!   namespace requests inline from the immutable [`Namespace`](crate::namespace::Namespace) and
//!   routes data requests (open, read, write, release) to the inode's owner shard.
//! - `writable`: the same for a `--writable` mount, answering namespace requests and changes
//!   through the [`Overlay`](crate::overlay::Overlay).
//! - [`shard`]: the shard file service, run on each shard, answering data requests from the
//!   shard's own buffers.
//! - [`request`]: typed requests and the reply traits a transport implements.
//! - [`verified`]: [`VerifiedBlock`], the only bytes a read reply can carry (and, under
//!   `--verify stream` only, a [`StreamedBlock`] checked after it was served).
//! - [`error`]: [`FsError`], its errno and log level.
//! - [`op_counters`]: requests and failures per operation ([`OpCounters`]), for metrics.
//!
//! Nothing here knows fuser; `crate::transport::fuser` converts its requests and replies.

pub mod dispatch;
pub mod error;
pub mod op_counters;
pub mod request;
pub mod shard;
pub mod verified;
pub(crate) mod writable;

#[cfg(test)]
pub(crate) mod testing;

pub use dispatch::{Dispatcher, StatsSnapshot, PREFERRED_IO_SIZE, STATS_XATTR};
pub use error::FsError;
pub use op_counters::{Op, OpCounters};
pub use shard::{LocalShard, ShardRequest};
pub use verified::{
    BlockDigests, Gather, ObjectHasher, ReadData, ReplicaSlot, Servable, StreamedBlock,
    VerifiedBlock, VerifiedObject,
};
