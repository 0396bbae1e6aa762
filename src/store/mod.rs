//! Stores: where object bytes come from. Every store shares one key space, the content hash, and
//! answers "bytes [offset, offset + len) of object H" into the calling shard's buffers.
//!
//! Store types are `!Send` on purpose: one instance lives on each shard, and its buffers never
//! leave that shard.

mod cache_janitor;
mod disk_cache;
mod local;
pub mod s3;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

pub use cache_janitor::{CacheJanitor, CacheUsage};
pub use disk_cache::{CacheWriter, DiskCache, DiskCacheConfig};
pub use local::{Block, LocalCas};
pub use s3::{S3Store, S3Target};

use mount_vfs_executors::{BufferPool, Reservation};

use crate::manifest::Hash;

/// Which store a mount reads from: chosen on the main thread, `Send`, turned into one
/// [`Store`] per shard.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// A CAS directory holding `Data/{hash}.xxh128`.
    Local { root: PathBuf },
    /// An S3 bucket and root prefix, resolved and probed at start-up.
    S3(Arc<S3Target>),
}

impl StoreConfig {
    /// The shard-local store instance (called on the shard's own thread).
    pub fn open_for_shard(&self) -> Store {
        match self {
            StoreConfig::Local { root } => Store::Local(LocalCas::new(root)),
            StoreConfig::S3(target) => Store::S3(S3Store::new(target.clone())),
        }
    }
}

/// One shard's store. `!Send`: it owns that shard's files and connections.
// One instance per shard, never moved on the data path: boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    Local(LocalCas),
    S3(S3Store),
}

impl Store {
    /// Bytes `[offset, offset + len)` of object `hash` (whose full length is `object_len`), in
    /// a buffer of the shard's pool. The caller keeps the range inside the object.
    /// The memory for the bytes (`rounded_size(len)` of the pool) is granted by the caller
    /// beforehand, so a caller can take memory in the order its reads must complete.
    pub async fn read(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: usize,
    ) -> Result<Block, StoreError> {
        match self {
            Store::Local(cas) => cas.read(pool, memory, hash, object_len, offset, len).await,
            Store::S3(s3) => {
                s3.read_reserved(pool, memory, hash, object_len, offset, len)
                    .await
            }
        }
    }

    /// Requests this shard's store sent again after transient failures, so far.
    pub fn retries(&self) -> u64 {
        match self {
            Store::Local(_) => 0,
            Store::S3(s3) => s3.retries(),
        }
    }

    /// Where object `hash` lives, for log lines.
    pub fn location(&self, hash: Hash) -> String {
        match self {
            Store::Local(cas) => cas.location(hash).display().to_string(),
            Store::S3(s3) => s3.location(hash).display().to_string(),
        }
    }
}

/// Object key suffix used by the Deadline client for xxh128-named objects.
pub const OBJECT_SUFFIX: &str = ".xxh128";

/// `Data/{hash}.xxh128`: an object's key relative to the CAS root (directory or S3 root prefix).
pub fn object_key(hash: Hash) -> String {
    format!("Data/{hash}{OBJECT_SUFFIX}")
}

/// Object files a shard keeps open, by hash. Past [`OpenFiles::LIMIT`] the table is cleared:
/// objects are large and read sequentially, so reopening is rare and cheap next to the reads.
pub(crate) struct OpenFiles<F> {
    files: RefCell<HashMap<Hash, Rc<F>>>,
}

impl<F> OpenFiles<F> {
    const LIMIT: usize = 256;

    pub fn new() -> OpenFiles<F> {
        OpenFiles {
            files: RefCell::new(HashMap::new()),
        }
    }

    pub fn get(&self, hash: Hash) -> Option<Rc<F>> {
        self.files.borrow().get(&hash).cloned()
    }

    pub fn insert(&self, hash: Hash, file: F) -> Rc<F> {
        let file = Rc::new(file);
        let mut files = self.files.borrow_mut();
        if files.len() >= Self::LIMIT {
            files.clear();
        }
        files.insert(hash, file.clone());
        file
    }

    /// Closes object `hash` (its file is about to be deleted or replaced).
    pub fn forget(&self, hash: Hash) {
        self.files.borrow_mut().remove(&hash);
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

    /// The errno a FUSE read gets for this failure.
    pub fn errno(&self) -> fuser::Errno {
        match self {
            // A missing or damaged object is an I/O error of the file, not "no such file": the
            // file exists in the namespace.
            StoreError::NotFound { .. } | StoreError::WrongSize { .. } | StoreError::Io { .. } => {
                fuser::Errno::EIO
            }
            // The reader cannot fix the mount's credentials, but EACCES tells them it is a
            // permission problem rather than damaged data.
            StoreError::Denied { .. } => fuser::Errno::EACCES,
            // A judgement call: EIO, not EAGAIN/ETIMEDOUT, because most readers do not retry
            // those either and the store already retried with backoff.
            StoreError::Unavailable { .. } => fuser::Errno::EIO,
        }
    }
}
