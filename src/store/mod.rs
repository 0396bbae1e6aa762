//! Stores: where object bytes come from. Every store shares one key space, the content hash, and
//! answers "bytes [offset, offset + len) of object H" into the calling shard's buffers.
//!
//! Store types are `!Send` on purpose: one instance lives on each shard, and its buffers never
//! leave that shard.

mod local;

use std::path::PathBuf;

pub use local::{Block, LocalCas};

use crate::manifest::Hash;

/// Object key suffix used by the Deadline client for xxh128-named objects.
pub const OBJECT_SUFFIX: &str = ".xxh128";

/// `Data/{hash}.xxh128`: an object's key relative to the CAS root (directory or S3 root prefix).
pub fn object_key(hash: Hash) -> String {
    format!("Data/{hash}{OBJECT_SUFFIX}")
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
}

impl StoreError {
    /// The errno a FUSE read gets for this failure.
    pub fn errno(&self) -> fuser::Errno {
        match self {
            // A missing or damaged object is an I/O error of the file, not "no such file": the
            // file exists in the namespace.
            StoreError::NotFound { .. } | StoreError::WrongSize { .. } | StoreError::Io { .. } => {
                fuser::Errno::EIO
            }
        }
    }
}
