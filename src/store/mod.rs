//! Stores: where object bytes come from. Every store shares one key space, the content hash, and
//! answers "bytes [offset, offset + len) of object H" into the calling shard's buffers
//! ([`ObjectStore`]).
//!
//! Store types are `!Send` on purpose: one instance lives on each shard, and its buffers never
//! leave that shard. What crosses threads is a [`StoreConfig`], opened once per shard.
//!
//! Implementations: the local CAS directory ([`LocalCas`]), S3 ([`S3Store`]), the disk cache in
//! front of either ([`DiskCache`]), spill files for a mount without one ([`Spill`]), and for
//! tests an in-memory store ([`MemoryStore`]) and a store that injects faults on a deterministic
//! schedule ([`FaultStore`]).

mod cache_janitor;
mod disk_cache;
mod fault;
mod local;
mod memory;
mod object;
pub mod s3;
mod spill;
mod verified_log;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use futures::future::LocalBoxFuture;
use mount_vfs_executors::{BufferPool, Reservation};

pub use cache_janitor::{
    cache_room, CacheJanitor, CacheUsage, CacheUsageSnapshot, JanitorStartError,
};
pub use disk_cache::{CacheDirError, DiskCache, DiskCacheConfig};
pub use fault::{Fault, FaultStore, When};
pub use local::LocalCas;
pub use memory::{MemoryObjects, MemoryStore};
pub(crate) use object::OpenFiles;
pub use object::{object_key, partial_owner, Block, CasWriter, ObjectRange, OBJECT_SUFFIX};
pub use s3::{S3Store, S3Target};
pub use spill::{Spill, SpillConfig, SpillWriter};
pub use verified_log::{FileIdentity, Recorder, Recording, VerificationLog};

use crate::manifest::Hash;

/// A source of object bytes, one instance per shard.
pub trait ObjectStore {
    /// Bytes `range` of an object, in a buffer of the shard's `pool`. The memory for them
    /// (`rounded_size(range.len)` of the pool) is granted by the caller beforehand, so a caller
    /// can take memory in the order its reads must complete.
    fn read<'a>(
        &'a self,
        pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>>;

    /// Where object `hash` lives, for messages.
    fn location(&self, hash: Hash) -> PathBuf;

    /// Requests sent again after transient failures so far, by cause (for `--stats` and the
    /// metrics).
    fn retries(&self) -> RetryCounts {
        RetryCounts::default()
    }
}

/// Why a store request was sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCause {
    /// 429, 503, `SlowDown`, `Throttling`: the service asked for less.
    Throttled,
    /// Other 5xx and `InternalError`.
    ServerError,
    /// `RequestTimeout` from the service, or no data from it in time.
    Timeout,
    /// The connection failed: refused, reset, TLS; or no data in time (`--read-timeout`)
    /// counts as `Timeout`.
    Connection,
    /// An answer that did not fit the request: a 206 for another range, a body shorter than
    /// its Content-Length, invalid HTTP.
    BadAnswer,
}

impl RetryCause {
    pub const ALL: [RetryCause; 5] = [
        RetryCause::Throttled,
        RetryCause::ServerError,
        RetryCause::Timeout,
        RetryCause::Connection,
        RetryCause::BadAnswer,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            RetryCause::Throttled => "throttled",
            RetryCause::ServerError => "server_error",
            RetryCause::Timeout => "timeout",
            RetryCause::Connection => "connection",
            RetryCause::BadAnswer => "bad_answer",
        }
    }
}

/// Retries so far, indexed by [`RetryCause`] (`as usize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryCounts(pub [u64; RetryCause::ALL.len()]);

impl RetryCounts {
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Which store a mount reads from: chosen on the main thread, `Send`, opened once per shard.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// A CAS directory holding `Data/{hash}.xxh128`.
    Local { root: PathBuf },
    /// An S3 bucket and root prefix, resolved and probed at start-up.
    S3(Arc<S3Target>),
}

impl StoreConfig {
    /// The shard-local store instance (called on the shard's own thread).
    pub fn open_for_shard(&self) -> Rc<dyn ObjectStore> {
        match self {
            StoreConfig::Local { root } => Rc::new(LocalCas::new(root)),
            StoreConfig::S3(target) => Rc::new(S3Store::new(target.clone())),
        }
    }
}

/// Why a store could not produce an object's bytes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {location} is missing")]
    NotFound { location: PathBuf },
    #[error("object {location} is {actual} bytes, the manifest says {expected}")]
    WrongSize {
        location: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("reading object {location}: {source}")]
    Io {
        location: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store refused the credentials or the permission (S3 403).
    #[error("access to object {location} denied: {reason}")]
    Denied { location: PathBuf, reason: String },
    /// The store kept failing transiently (5xx, throttling, resets, timeouts) until the retry
    /// budget ran out.
    #[error("object {location} unavailable after {attempts} attempts: {last}")]
    Unavailable {
        location: PathBuf,
        attempts: u32,
        last: String,
    },
}

impl StoreError {
    /// Opening or reading object file `location` failed with `source`.
    pub fn file(location: &Path, source: std::io::Error) -> StoreError {
        if source.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound {
                location: location.to_path_buf(),
            }
        } else {
            StoreError::Io {
                location: location.to_path_buf(),
                source,
            }
        }
    }

    /// An object file of `actual` bytes where the manifest says `expected`.
    pub fn check_size(location: &Path, expected: u64, actual: u64) -> Result<(), StoreError> {
        if actual == expected {
            return Ok(());
        }
        Err(StoreError::WrongSize {
            location: location.to_path_buf(),
            expected,
            actual,
        })
    }
}
