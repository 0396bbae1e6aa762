//! Reads: a file range becomes blocks of its objects, each from the block cache or loaded once
//! (single-flight) through verification or a digest-checked re-read.

use std::rc::Rc;

use futures::future::FutureExt;

use super::cache::{Asker, BlockKey};
use super::FileService;
use crate::fs::{FsError, Gather, ReadData, Servable, VerifiedBlock};
use crate::manifest::{Hash, CHUNK_SIZE};
use crate::namespace::Ino;

/// One CAS object of a file: its hash and length.
#[derive(Clone, Copy, Debug)]
pub(super) struct ObjectRef {
    pub hash: Hash,
    pub len: u64,
}

/// Length of object `index` of a file: chunked files have 256 MiB objects and a shorter last one.
pub(super) fn object_len(size: u64, chunked: bool, index: usize) -> u64 {
    if chunked {
        (size - index as u64 * CHUNK_SIZE).min(CHUNK_SIZE)
    } else {
        size
    }
}

/// Where file position `pos` is: (object index, block within the object, offset in the block).
pub(super) fn locate(chunked: bool, block_size: u64, pos: u64) -> (usize, u32, usize) {
    let (object, within) = if chunked {
        ((pos / CHUNK_SIZE) as usize, pos % CHUNK_SIZE)
    } else {
        (0, pos)
    };
    (
        object,
        (within / block_size) as u32,
        (within % block_size) as usize,
    )
}

impl FileService {
    /// Bytes `[offset, offset + size)` of file `ino` (open as `fh`): merged with its upper
    /// bytes if it has any (a `--writable` mount), else the base's, verified.
    pub(super) async fn read(
        self: &Rc<Self>,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        if let Some(upper) = self.overlay.as_ref().and_then(|o| o.upper(ino)) {
            return self.read_merged(ino, fh, offset, size, upper).await;
        }
        self.read_base(ino, fh, offset, size).await
    }

    /// Bytes `[offset, offset + size)` of file `ino`'s base content, verified. `fh` 0 (no
    /// handle: a copy-up) plans no read-ahead.
    pub(super) async fn read_base(
        self: &Rc<Self>,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        // The one lookup of the file's content for this request; everything below gets it.
        let content = self.namespace.file_content(ino).ok_or(FsError::NotFound)?;
        let end = offset.saturating_add(size as u64).min(content.size);
        if offset >= end {
            return Ok(ReadData::empty());
        }
        let block_at = |pos: u64| {
            let (index, block, start) = locate(content.chunked, self.block_size, pos);
            let hash = *content.objects.get(index).ok_or(FsError::Corrupt)?;
            let object = ObjectRef {
                hash,
                len: object_len(content.size, content.chunked, index),
            };
            Ok::<_, FsError>((object, block, start))
        };
        let (object, block, start) = block_at(offset)?;
        let wanted = (end - offset) as usize;
        // Returns at once unless this is the first read of a streamed object, which waits for
        // one small GET: read-ahead is planned after it, so its part-size GETs do not compete
        // with that one (and after its answer, as glommio runs a spawned load in place up to
        // its first wait: two part-size loads delayed that first byte by about 2 ms), and
        // before every other read, so its loads overlap this one's.
        let first_read = self
            .stream_first_read(ino, object, block, start, wanted)
            .await?;
        if let Some(reply) = first_read {
            let service = self.clone();
            glommio::spawn_local(async move {
                glommio::executor().yield_now().await;
                if let Some(content) = service.namespace.file_content(ino) {
                    service.plan_readahead(ino, fh, &content, offset, end);
                }
            })
            .detach();
            return Ok(reply);
        }
        self.plan_readahead(ino, fh, &content, offset, end);
        let first = self.block(ino, object, block, Asker::Reader).await?;
        self.note_served(object.hash, &first);
        if start + wanted <= first.len() {
            return Ok(ReadData::slice(first, start..start + wanted));
        }
        // The read straddles blocks (an unaligned reader): gather into one reply buffer.
        let mut gathered = Gather::with_capacity(wanted);
        gathered.push(&first, start..first.len());
        // Holding a block while waiting for the next could pin the pool with many readers.
        drop(first);
        while gathered.len() < wanted {
            let (object, block, start) = block_at(offset + gathered.len() as u64)?;
            let next = self.block(ino, object, block, Asker::Reader).await?;
            self.note_served(object.hash, &next);
            let take = (wanted - gathered.len()).min(next.len() - start);
            gathered.push(&next, start..start + take);
        }
        Ok(gathered.finish())
    }

    /// Block `block` of `object` (of file `ino`), verified: from the cache, else brought by the
    /// object's verification or, for an object verified earlier, by one re-read per block no
    /// matter how many readers ask at once. Under `--verify stream` an object not verified yet
    /// is streamed instead (`stream`): its blocks are served as they arrive.
    pub(super) async fn block(
        self: &Rc<Self>,
        ino: Ino,
        object: ObjectRef,
        block: u32,
        asker: Asker,
    ) -> Result<Servable, FsError> {
        if object.len == 0 {
            return Ok(VerifiedBlock::empty().into());
        }
        let hash = object.hash;
        if self.policy.served_corrupt(hash) {
            return Err(FsError::Corrupt);
        }
        let c = &self.counters;
        if let Some(cached) = self.cached((hash, block), asker) {
            c.add(&c.cache_hits, 1);
            return Ok(cached);
        }
        // A miss, whether the verification stream or a reload brings the block.
        c.add(&c.cache_misses, 1);
        if self.streams(object) {
            return self.stream_block(ino, object, block).await;
        }
        self.verify(ino, hash, object.len).await?;
        if let Some(cached) = self.cached((hash, block), asker) {
            return Ok(cached);
        }
        let service = self.clone();
        let load = self.cache.load_or_join((hash, block), move || {
            async move {
                let result = service.reload(ino, object, block).await.map(Servable::from);
                if let Ok(loaded) = &result {
                    service.publish((hash, block), loaded.clone());
                }
                service.cache.finish_load((hash, block));
                result
            }
            .boxed_local()
        });
        let loaded = load.await;
        if asker == Asker::Reader {
            self.cache.mark_read((hash, block));
        }
        loaded
    }

    /// Cached block `key`: a verified one, or one streamed while its object is not verified
    /// yet. A streamed block of an object verified since is served only if it has the digest
    /// the block had when the object verified (else it is dropped and read again).
    pub(super) fn cached(&self, key: BlockKey, asker: Asker) -> Option<Servable> {
        let block = self.cache.get(key, asker)?;
        let Servable::Streamed(streamed) = &block else {
            return Some(block);
        };
        let Some(digests) = self.verification.digests(key.0) else {
            return Some(block);
        };
        match digests.confirm(key.1, streamed) {
            Some(verified) => {
                for evicted in self.cache.insert(key, verified.clone().into()) {
                    self.spill_unread(evicted);
                }
                Some(verified.into())
            }
            None => {
                self.cache.remove(key);
                None
            }
        }
    }

    /// Puts a block in the cache, then evicts until a full verification window would
    /// fit in the pool again. Loads already waiting for pool memory are woken by that eviction;
    /// without it they could wait on memory only the cache holds while nothing new arrives.
    pub(super) fn publish(&self, key: BlockKey, block: Servable) {
        for evicted in self.cache.insert(key, block) {
            self.spill_unread(evicted);
        }
        self.make_room(self.headroom());
    }
}
