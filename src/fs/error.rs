//! Why a request failed, and the one place each reason becomes an errno and a log level.

use crate::store::StoreError;

/// Every way a filesystem request can fail. `Copy`: one failure (a verification shared by many
/// readers) is answered to every waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    /// Opening a symbolic link itself (the kernel follows links before it opens).
    #[error("is a symbolic link")]
    SymbolicLink,
    /// `readlink` of something that is not a link.
    #[error("not a symbolic link")]
    NotSymbolicLink,
    /// A request that would change the tree.
    #[error("read-only file system")]
    ReadOnly,
    /// No extended attribute of that name (there are none).
    #[error("no such attribute")]
    NoAttribute,
    /// The store could not produce the bytes: missing, wrong size, I/O error, unavailable after
    /// its retries, or no pool memory for the read.
    #[error("the store failed")]
    Store,
    /// The store refused the mount's credentials.
    #[error("access to the store denied")]
    StoreDenied,
    /// The bytes did not match their manifest hash (twice): never served.
    #[error("content does not match its hash")]
    Corrupt,
    /// The shard that owns the inode has stopped (the mount is shutting down).
    #[error("shutting down")]
    ShuttingDown,
    /// The name is taken (create, mkdir, link, symlink, `RENAME_NOREPLACE`).
    #[error("file exists")]
    Exists,
    /// `rmdir`, or a rename over a directory, that still has entries (base entries included).
    #[error("directory not empty")]
    NotEmpty,
    /// A request the filesystem cannot make sense of (an unknown rename flag, a bad offset).
    #[error("invalid argument")]
    Invalid,
    /// The cache directory's filesystem is full; nothing written before is lost.
    #[error("no space left in the cache directory")]
    NoSpace,
    /// Opening for writing a file the kernel reads from a verified cache file right now.
    #[error("text file busy")]
    Busy,
    /// An operation this filesystem does not do (e.g. a `fallocate` mode the upper filesystem lacks).
    #[error("operation not supported")]
    NotSupported,
    /// Only `user.*` extended attributes are kept.
    #[error("operation not permitted")]
    NotPermitted,
    /// An extended attribute (or list) larger than the caller's buffer.
    #[error("result too large for the buffer")]
    Range,
    /// The overlay's upper file or journal could not be read or written (logged with the cause).
    #[error("overlay I/O error")]
    Overlay,
    /// A name over 255 bytes.
    #[error("file name too long")]
    NameTooLong,
}

impl FsError {
    /// Every variant, in declaration order (`error as usize` indexes it).
    pub const ALL: [FsError; 21] = [
        FsError::NotFound,
        FsError::NotDirectory,
        FsError::IsDirectory,
        FsError::SymbolicLink,
        FsError::NotSymbolicLink,
        FsError::ReadOnly,
        FsError::NoAttribute,
        FsError::Store,
        FsError::StoreDenied,
        FsError::Corrupt,
        FsError::ShuttingDown,
        FsError::Exists,
        FsError::NotEmpty,
        FsError::Invalid,
        FsError::NoSpace,
        FsError::Busy,
        FsError::NotSupported,
        FsError::NotPermitted,
        FsError::Range,
        FsError::Overlay,
        FsError::NameTooLong,
    ];

    /// The variant as a metrics label (several share an errno).
    pub const fn reason(self) -> &'static str {
        match self {
            FsError::NotFound => "not_found",
            FsError::NotDirectory => "not_directory",
            FsError::IsDirectory => "is_directory",
            FsError::SymbolicLink => "symbolic_link",
            FsError::NotSymbolicLink => "not_symbolic_link",
            FsError::ReadOnly => "read_only",
            FsError::NoAttribute => "no_attribute",
            FsError::Store => "store",
            FsError::StoreDenied => "store_denied",
            FsError::Corrupt => "corrupt",
            FsError::ShuttingDown => "shutting_down",
            FsError::Exists => "exists",
            FsError::NotEmpty => "not_empty",
            FsError::Invalid => "invalid",
            FsError::NoSpace => "no_space",
            FsError::Busy => "busy",
            FsError::NotSupported => "not_supported",
            FsError::NotPermitted => "not_permitted",
            FsError::Range => "range",
            FsError::Overlay => "overlay",
            FsError::NameTooLong => "name_too_long",
        }
    }

    /// The errno's symbolic name, for metrics labels.
    pub fn errno_name(self) -> &'static str {
        match self.errno() {
            libc::ENOENT => "ENOENT",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::ELOOP => "ELOOP",
            libc::EINVAL => "EINVAL",
            libc::EROFS => "EROFS",
            libc::ENODATA => "ENODATA",
            libc::EACCES => "EACCES",
            libc::EIO => "EIO",
            libc::EEXIST => "EEXIST",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::ENOSPC => "ENOSPC",
            libc::ETXTBSY => "ETXTBSY",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EPERM => "EPERM",
            libc::ERANGE => "ERANGE",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            _ => "unknown",
        }
    }

    /// The errno a reader sees.
    pub fn errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::SymbolicLink => libc::ELOOP,
            FsError::NotSymbolicLink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttribute => libc::ENODATA,
            // A missing or damaged object is an I/O error of the file, not "no such file": the
            // file exists in the namespace. Unavailable is EIO too, not EAGAIN/ETIMEDOUT: most
            // readers retry neither, and the store already retried with backoff.
            FsError::Store | FsError::Corrupt | FsError::ShuttingDown => libc::EIO,
            // The reader cannot fix the mount's credentials, but EACCES tells them it is a
            // permission problem rather than damaged data.
            FsError::StoreDenied => libc::EACCES,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Busy => libc::ETXTBSY,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::NotPermitted => libc::EPERM,
            FsError::Range => libc::ERANGE,
            FsError::Overlay => libc::EIO,
            FsError::NameTooLong => libc::ENAMETOOLONG,
        }
    }

    /// How loudly the dispatch point logs a request that failed this way. Answers about the
    /// namespace are routine (every `stat` of a missing file); data failures are logged with
    /// their cause once per object, at error level, by the shard that saw them, so the per-request
    /// line only needs to be there when debugging.
    pub fn log_level(self) -> tracing::Level {
        match self {
            FsError::NotFound
            | FsError::NotDirectory
            | FsError::IsDirectory
            | FsError::SymbolicLink
            | FsError::NotSymbolicLink
            | FsError::ReadOnly
            | FsError::NoAttribute
            | FsError::Exists
            | FsError::NotEmpty
            | FsError::Invalid
            | FsError::Busy
            | FsError::NotSupported
            | FsError::NotPermitted
            | FsError::Range
            | FsError::NameTooLong => tracing::Level::TRACE,
            FsError::Store
            | FsError::StoreDenied
            | FsError::Corrupt
            | FsError::ShuttingDown
            | FsError::NoSpace
            | FsError::Overlay => tracing::Level::DEBUG,
        }
    }
}

impl FsError {
    /// An I/O error of the overlay's upper files or journal: ENOSPC (and quota) as itself, the
    /// rest as EIO after one log line naming what failed.
    pub fn overlay(what: &str, error: &std::io::Error) -> FsError {
        match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => FsError::NoSpace,
            _ => {
                tracing::error!("overlay: {what}: {error}");
                FsError::Overlay
            }
        }
    }
}

impl From<&StoreError> for FsError {
    fn from(error: &StoreError) -> FsError {
        match error {
            StoreError::Denied { .. } => FsError::StoreDenied,
            StoreError::NotFound { .. }
            | StoreError::WrongSize { .. }
            | StoreError::Io { .. }
            | StoreError::Unavailable { .. } => FsError::Store,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_variant_in_order_with_a_named_errno() {
        for (index, error) in FsError::ALL.into_iter().enumerate() {
            assert_eq!(error as usize, index);
            assert_ne!(error.errno_name(), "unknown", "{error:?}");
        }
    }
}
