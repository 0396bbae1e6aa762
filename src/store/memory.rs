//! An in-memory store: objects held as `Bytes`, copied into the shard's buffers on read. For
//! tests of everything above the store (no files, no server) and for benchmarks that want the
//! store out of the picture.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{FutureExt, LocalBoxFuture};
use mount_vfs_executors::{BufferPool, Reservation};

use super::{Block, ObjectRange, ObjectStore, StoreError};
use crate::manifest::Hash;

/// The objects, shared by every shard's [`MemoryStore`]. Keys need not be the content's hash:
/// a test stores wrong bytes under a hash on purpose.
#[derive(Clone, Debug, Default)]
pub struct MemoryObjects(Arc<HashMap<Hash, Bytes>>);

impl MemoryObjects {
    /// Each object under the hash of its content.
    pub fn of<I: IntoIterator<Item = Vec<u8>>>(objects: I) -> MemoryObjects {
        objects
            .into_iter()
            .map(|bytes| (Hash::of(&bytes), Bytes::from(bytes)))
            .collect()
    }
}

impl FromIterator<(Hash, Bytes)> for MemoryObjects {
    fn from_iter<I: IntoIterator<Item = (Hash, Bytes)>>(entries: I) -> MemoryObjects {
        MemoryObjects(Arc::new(entries.into_iter().collect()))
    }
}

/// One shard's view of [`MemoryObjects`], counting the reads of each object.
pub struct MemoryStore {
    objects: MemoryObjects,
    reads: RefCell<HashMap<Hash, u64>>,
}

impl MemoryStore {
    pub fn new(objects: MemoryObjects) -> MemoryStore {
        MemoryStore {
            objects,
            reads: RefCell::new(HashMap::new()),
        }
    }

    /// Reads of object `hash` so far (every call, whether it succeeded or not).
    pub fn reads_of(&self, hash: Hash) -> u64 {
        self.reads.borrow().get(&hash).copied().unwrap_or(0)
    }

    async fn read_range(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> Result<Block, StoreError> {
        *self.reads.borrow_mut().entry(range.hash).or_default() += 1;
        let location = self.location(range.hash);
        let object = self
            .objects
            .0
            .get(&range.hash)
            .ok_or_else(|| StoreError::NotFound {
                location: location.clone(),
            })?;
        StoreError::check_size(&location, range.object_len, object.len() as u64)?;
        if range.len == 0 {
            return Ok(Block::empty());
        }
        let start = range.offset as usize;
        let mut buffer = pool.alloc_reserved(range.len, memory).await;
        buffer[..range.len].copy_from_slice(&object[start..start + range.len]);
        Ok(Block::from_pool(buffer, range.len))
    }
}

impl ObjectStore for MemoryStore {
    fn read<'a>(
        &'a self,
        pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>> {
        self.read_range(pool, memory, range).boxed_local()
    }

    fn location(&self, hash: Hash) -> PathBuf {
        PathBuf::from(format!("memory:{hash}"))
    }
}
