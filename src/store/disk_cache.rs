//! The disk cache (`--cache-dir DIR`): verified objects kept on local storage in the CAS layout,
//! `DIR/Data/{hash}.xxh128`, so a second pass over an object, a later mount or a kernel
//! passthrough open never fetches it from the store again.
//!
//! Rules:
//! - Only verified bytes become a cache file. A verification stream writes each block it pulls
//!   from the store into a private temporary file (`.{hash}.partial-{pid}-{shard}`) and renames
//!   it into place only when the whole object matched its hash; a failed or abandoned stream
//!   deletes its temporary file. Two shards caching the same object race harmlessly: both
//!   rename identical bytes.
//! - A cache file is trusted once this mount hashed it (the service streams it through the
//!   hasher like any store), or when `verified.log` records an earlier verification and the
//!   file's identity is unchanged since ([`VerificationLog`]); a mismatch deletes it and the
//!   object is fetched again. So a corrupt or truncated cache file costs a re-fetch, never
//!   wrong bytes through the shards. Passthrough hands the kernel a file trusted by either rule:
//!   bit rot in an unchanged file is caught only by `--recheck-cache` (a scrub).
//! - Writes are plain `pwrite`s into the page cache: the bytes are then already in memory for
//!   the passthrough reader that is usually waiting for them. A verification stream runs them
//!   on the shard's blocking thread, a few blocks at a time, so the copy does not hold up the
//!   shard (`CasWriter::write_block_off_executor`); under `--verify stream` the in-order hasher
//!   still writes on the shard. The shard never fsyncs; the record of a new file is written only after a background `fdatasync`
//!   ([`Recorder`]), so after a power loss a torn file has no record and fails its hash.
//! - Reads are io_uring *buffered* reads (glommio `BufferedFile`) into the shard's arena: a
//!   freshly written file is served from the page cache, where an O_DIRECT read would first
//!   force the dirty pages out to the disk. For the same reason an O_DIRECT open passes through
//!   only to a cache file this mount found there, not to one it wrote.
//! - Size: [`CacheJanitor`](super::CacheJanitor) deletes the least recently used files past
//!   `--cache-size` or when the filesystem runs short of space; shards report what they add and
//!   touch what they use.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use futures::future::{FutureExt, LocalBoxFuture};
use glommio::io::BufferedFile;
use mount_vfs_executors::{BufferPool, Reservation};

use super::verified_log::{FileIdentity, Recorder, VerificationLog};
use super::{
    object_key, partial_owner, Block, CacheUsage, CasWriter, ObjectRange, ObjectStore, OpenFiles,
    StoreError,
};
use crate::manifest::Hash;

/// A mount's disk cache as shards are given it: where it is and the janitor's usage account.
#[derive(Clone, Debug)]
pub struct DiskCacheConfig {
    pub root: PathBuf,
    pub usage: CacheUsage,
    /// What earlier mounts verified ([`VerificationLog::load`], read once at start-up).
    pub records: Arc<VerificationLog>,
    /// Where this mount's verifications go ([`VerificationLog::start_recording`]).
    pub recorder: Recorder,
    /// `--recheck-cache`: hash every cache file once even when a record vouches for it.
    pub recheck: bool,
    /// Whether the cache's filesystem takes O_DIRECT reads ([`DiskCache::prepare`]).
    pub direct_io: bool,
}

/// Why `--cache-dir` cannot hold a disk cache (found by [`DiskCache::prepare`]).
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    #[error("--cache-dir {}: cannot create {}: {source}", .root.display(), .data.display())]
    CannotCreate {
        root: PathBuf,
        data: PathBuf,
        source: io::Error,
    },
    #[error("--cache-dir {}: not writable ({source}); pick a directory on local storage", .root.display())]
    NotWritable { root: PathBuf, source: io::Error },
}

/// One shard's view of the cache directory. `!Send`: it holds that shard's open files.
pub struct DiskCache {
    root: PathBuf,
    shard: usize,
    files: OpenFiles<BufferedFile>,
    usage: CacheUsage,
    records: Arc<VerificationLog>,
    recheck: bool,
    direct_io: bool,
    recorder: Recorder,
}

impl DiskCache {
    /// Prepares `root/Data` and removes temporary files left by processes that are gone. Called
    /// once at start-up, before any shard runs; the error names what to fix. Returns whether
    /// the directory's filesystem takes O_DIRECT opens (tmpfs before Linux 6.6 and some FUSE
    /// filesystems refuse them with `EINVAL`), for [`DiskCacheConfig::direct_io`].
    pub fn prepare(root: &Path) -> Result<bool, CacheDirError> {
        let data = root.join("Data");
        std::fs::create_dir_all(&data).map_err(|source| CacheDirError::CannotCreate {
            root: root.to_path_buf(),
            data: data.clone(),
            source,
        })?;
        let probe = data.join(format!(".write-test-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|source| CacheDirError::NotWritable {
            root: root.to_path_buf(),
            source,
        })?;
        let direct_io = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        let mut removed = 0usize;
        for entry in std::fs::read_dir(&data).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(partial_owner) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists()
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                "--cache-dir {}: removed {removed} partial files left by earlier runs",
                root.display()
            );
        }
        Ok(direct_io)
    }

    pub fn new(config: &DiskCacheConfig, shard: usize) -> DiskCache {
        DiskCache {
            root: config.root.clone(),
            shard,
            files: OpenFiles::new(),
            usage: config.usage.clone(),
            records: config.records.clone(),
            recheck: config.recheck,
            direct_io: config.direct_io,
            recorder: config.recorder.clone(),
        }
    }

    /// The block digests an earlier verification recorded for cache file `hash` (`len` bytes,
    /// read in blocks of `block_size`), when the file is unchanged since and `--recheck-cache`
    /// is off: the object may be trusted without hashing it again.
    pub fn recorded_digests(&self, hash: Hash, len: u64, block_size: u64) -> Option<&[u64]> {
        if self.recheck {
            return None;
        }
        let record = self.records.get(hash)?;
        let unchanged = FileIdentity::of(&self.location(hash)).ok()? == record.identity;
        (unchanged && record.block_size == block_size && record.identity.size() == len)
            .then_some(&record.digests[..])
    }

    /// Whether the cache's filesystem takes O_DIRECT reads, so that an O_DIRECT open may pass
    /// through to a cache file.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// What identifies cache file `hash` now (`None`: no such file).
    pub fn identity(&self, hash: Hash) -> Option<FileIdentity> {
        FileIdentity::of(&self.location(hash)).ok()
    }

    /// Records, for later mounts, that cache file `hash` holds the verified object (with the
    /// digest of each of its `block_size` blocks) as long as it keeps the identity it has now.
    pub fn record_verified(&self, hash: Hash, block_size: u64, digests: &[u64]) {
        if let Some(identity) = self.identity(hash) {
            let path = self.location(hash);
            self.recorder
                .record(hash, path, identity, block_size, digests);
        }
    }

    /// Object `hash` (`len` bytes) was committed to the cache.
    pub fn added(&self, len: u64) {
        self.usage.added(len);
    }

    /// Object `hash` was just used: it is the last to be evicted.
    pub fn touch(&self, hash: Hash) {
        self.usage.touch(&self.location(hash));
    }

    /// The cache file of object `hash`, whether or not it exists.
    pub fn location(&self, hash: Hash) -> PathBuf {
        self.root.join(object_key(hash))
    }

    /// Whether a cache file of the right length exists (not yet whether its bytes are right).
    pub fn has(&self, hash: Hash, len: u64) -> bool {
        std::fs::metadata(self.location(hash)).is_ok_and(|m| m.is_file() && m.len() == len)
    }

    async fn read_range(
        &self,
        memory: Reservation,
        range: ObjectRange,
    ) -> Result<Block, StoreError> {
        let ObjectRange {
            hash,
            object_len,
            offset,
            len,
        } = range;
        let location = || self.location(hash);
        let io = |source: io::Error| StoreError::Io {
            location: location(),
            source,
        };
        let file = self.open(hash, object_len).await?;
        // Buffered reads allocate exactly `len` from the arena: the caller's grant covers it.
        let data = file.read_at(offset, len).await.map_err(|e| io(e.into()))?;
        if data.len() != len {
            // Truncated under us: the caller discards the file or falls back to the store.
            return Err(io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "cache file ended early",
            )));
        }
        Ok(Block::from_read(data, memory))
    }

    async fn open(&self, hash: Hash, object_len: u64) -> Result<Rc<BufferedFile>, StoreError> {
        if let Some(file) = self.files.get(hash) {
            return Ok(file);
        }
        let location = self.location(hash);
        let failed = |e: glommio::GlommioError<()>| StoreError::file(&location, e.into());
        let file = BufferedFile::open(&location).await.map_err(failed)?;
        let actual = file.file_size().await.map_err(failed)?;
        if let Err(wrong) = StoreError::check_size(&location, object_len, actual) {
            let _ = file.close().await;
            return Err(wrong);
        }
        Ok(self.files.insert(hash, file))
    }

    /// Opens the cache file for the kernel to read it itself (FUSE passthrough).
    pub fn open_for_passthrough(&self, hash: Hash) -> io::Result<File> {
        File::open(self.location(hash))
    }

    /// Deletes a cache file that failed verification, so the object is fetched again.
    pub fn discard(&self, hash: Hash) {
        self.files.forget(hash);
        let location = self.location(hash);
        if let Err(e) = std::fs::remove_file(&location) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove corrupt cache file {}: {e}",
                    location.display()
                );
            }
        }
    }

    /// Starts writing object `hash` into the cache; it becomes a cache file only when committed.
    pub fn begin(&self, hash: Hash) -> io::Result<CasWriter> {
        CasWriter::create(&self.root, &hash.to_string(), self.shard)
    }
}

/// A file shorter than the manifest says is an error, as in every store.
impl ObjectStore for DiskCache {
    fn read<'a>(
        &'a self,
        _pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>> {
        self.read_range(memory, range).boxed_local()
    }

    fn location(&self, hash: Hash) -> PathBuf {
        DiskCache::location(self, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_objects_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let direct_io = DiskCache::prepare(dir.path()).unwrap();
        let (_janitor, usage) = super::super::CacheJanitor::start(dir.path(), None).unwrap();
        let records = Arc::new(VerificationLog::load(dir.path()));
        let (_recording, recorder) = records.start_recording().unwrap();
        let config = DiskCacheConfig {
            root: dir.path().to_path_buf(),
            usage,
            records,
            recorder,
            recheck: false,
            direct_io,
        };
        let cache = DiskCache::new(&config, 0);
        let hash = Hash(7);
        let writer = cache.begin(hash).unwrap();
        writer.write_at(0, b"abc").unwrap();
        drop(writer);
        assert_eq!(
            std::fs::read_dir(dir.path().join("Data")).unwrap().count(),
            0
        );
        let writer = cache.begin(hash).unwrap();
        writer.write_at(0, b"abc").unwrap();
        writer.commit(hash).unwrap();
        assert!(cache.has(hash, 3));
        assert!(!cache.has(hash, 4));
    }
}
