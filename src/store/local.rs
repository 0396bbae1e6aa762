//! The local CAS directory store: `DIR/Data/{hash}.xxh128`, read with glommio `DmaFile`
//! (O_DIRECT, io_uring; glommio turns O_DIRECT off by itself on tmpfs) straight into buffers of
//! the shard's registered arena. This is also the layout of the disk cache.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures::future::{FutureExt, LocalBoxFuture};
use glommio::io::DmaFile;
use mount_vfs_executors::{rounded_size, BufferPool, Reservation, TooLarge};

use super::{object_key, Block, ObjectRange, ObjectStore, OpenFiles, StoreError};
use crate::manifest::Hash;

/// A CAS directory. One instance per shard (`!Send`: it holds that shard's open files).
pub struct LocalCas {
    root: PathBuf,
    files: OpenFiles<DmaFile>,
}

impl LocalCas {
    pub fn new(root: &Path) -> LocalCas {
        LocalCas {
            root: root.to_path_buf(),
            files: OpenFiles::new(),
        }
    }

    /// Where object `hash` lives.
    pub fn location(&self, hash: Hash) -> PathBuf {
        self.root.join(object_key(hash))
    }

    async fn open(&self, hash: Hash, expected_len: u64) -> Result<Rc<DmaFile>, StoreError> {
        if let Some(file) = self.files.get(hash) {
            return Ok(file);
        }
        let location = self.location(hash);
        let failed = |e: glommio::GlommioError<()>| StoreError::file(&location, e.into());
        let file = DmaFile::open(&location).await.map_err(failed)?;
        let actual = file.file_size().await.map_err(failed)?;
        if let Err(wrong) = StoreError::check_size(&location, expected_len, actual) {
            let _ = file.close().await;
            return Err(wrong);
        }
        Ok(self.files.insert(hash, file))
    }

    fn too_large(&self, hash: Hash, error: TooLarge) -> StoreError {
        StoreError::Io {
            location: self.location(hash),
            source: std::io::Error::other(error),
        }
    }

    async fn read_range(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> Result<Block, StoreError> {
        let ObjectRange {
            hash,
            object_len,
            offset,
            len,
        } = range;
        if len == 0 {
            return Ok(Block::empty());
        }
        let file = self.open(hash, object_len).await?;
        let io_error = |e: glommio::GlommioError<()>| StoreError::Io {
            location: self.location(hash),
            source: e.into(),
        };
        // glommio widens the read to the file's O_DIRECT alignment; block-aligned reads fit the
        // caller's grant, anything else takes its own (rare: unaligned offsets only).
        let aligned = (file.align_up(offset + len as u64) - file.align_down(offset)) as usize;
        let reservation = if memory.bytes() >= rounded_size(aligned) {
            memory
        } else {
            drop(memory);
            pool.reserve_read(&file, offset, len)
                .await
                .map_err(|e| self.too_large(hash, e))?
        };
        let first = file.read_at(offset, len).await.map_err(io_error)?;
        if first.len() == len {
            return Ok(Block::from_read(first, reservation));
        }
        // A short read: assemble the rest into one buffer (rare; costs one copy). The copy
        // needs its own memory while `first` still holds the grant.
        let mut buffer = pool.alloc(len).await.map_err(|e| self.too_large(hash, e))?;
        buffer[..first.len()].copy_from_slice(&first);
        let mut filled = first.len();
        drop(first);
        drop(reservation);
        while filled < len {
            let more = file
                .read_at(offset + filled as u64, len - filled)
                .await
                .map_err(io_error)?;
            if more.is_empty() {
                return Err(StoreError::Io {
                    location: self.location(hash),
                    source: std::io::Error::new(ErrorKind::UnexpectedEof, "object ended early"),
                });
            }
            buffer[filled..filled + more.len()].copy_from_slice(&more);
            filled += more.len();
        }
        Ok(Block::from_pool(buffer, len))
    }
}

impl ObjectStore for LocalCas {
    fn read<'a>(
        &'a self,
        pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>> {
        self.read_range(pool, memory, range).boxed_local()
    }

    fn location(&self, hash: Hash) -> PathBuf {
        LocalCas::location(self, hash)
    }
}
