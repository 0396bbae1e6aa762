//! The local CAS directory store: `DIR/Data/{hash}.xxh128`, read with glommio `DmaFile`
//! (O_DIRECT, io_uring; glommio turns O_DIRECT off by itself on tmpfs) straight into buffers of
//! the shard's registered arena. This is also the layout of the disk cache.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, ReadResult};
use mount_vfs_executors::{rounded_size, BufferPool, PoolBuffer, Reservation, TooLarge};

use super::{object_key, OpenFiles, StoreError};
use crate::manifest::Hash;

/// Bytes of one object, in the shard's registered memory.
pub struct Block {
    data: BlockData,
}

enum BlockData {
    /// Filled by one `read_at`: glommio allocated it from the arena; we hold its accounting.
    Read {
        data: ReadResult,
        /// Held only for its `Drop`: returns the bytes to the pool's accounting.
        _accounting: Reservation,
    },
    /// Assembled from several reads (short reads), or filled by a socket.
    Owned(PoolBuffer, usize),
    /// The empty object.
    Empty,
}

impl Block {
    pub fn empty() -> Block {
        Block {
            data: BlockData::Empty,
        }
    }

    /// A buffer glommio filled and allocated from the arena, under `accounting`.
    pub fn from_read(data: ReadResult, accounting: Reservation) -> Block {
        Block {
            data: BlockData::Read {
                data,
                _accounting: accounting,
            },
        }
    }

    /// The first `len` bytes of `buffer` (filled by a socket read, for example).
    pub fn from_pool(buffer: PoolBuffer, len: usize) -> Block {
        debug_assert!(len <= buffer.len());
        Block {
            data: BlockData::Owned(buffer, len),
        }
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.data {
            BlockData::Read { data, .. } => data,
            BlockData::Owned(buffer, len) => &buffer[..*len],
            BlockData::Empty => &[],
        }
    }
}

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

    /// Reads bytes `[offset, offset + len)` of object `hash`, whose full length is `object_len`,
    /// into `memory` granted beforehand by the caller (see [`BufferPool::alloc_reserved`]).
    /// The caller guarantees the range lies inside the object.
    pub async fn read(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: usize,
    ) -> Result<Block, StoreError> {
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
            return Ok(Block {
                data: BlockData::Read {
                    data: first,
                    _accounting: reservation,
                },
            });
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
        Ok(Block {
            data: BlockData::Owned(buffer, len),
        })
    }
}
