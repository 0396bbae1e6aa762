//! Replicas: a shard's own copy of a verified block of an inode another shard owns, so that a
//! READ arriving on it is served where it arrived.
//!
//! Over the io_uring transport a request arrives on the ring of the caller's CPU, which is
//! served by that CPU's shard. A READ of an inode another shard owns used to cross to the owner
//! and back (two cross-thread wake-ups, 14-18 µs on a 2-vCPU VM against 5 µs in place), and a
//! reader the scheduler keeps off its file's owner CPU paid that on every read
//! (docs/transport-uring.md). Now, once a few READs of a block crossed, the next one goes to
//! the owner carrying a [`Replica`]: a buffer of the receiving shard's own pool, which the owner fills
//! from its verified block after it replied. The receiving shard then holds that block as a
//! [`VerifiedBlock`] of its own, in its block cache under the same key, and serves later READs
//! of it in place, from its own buffers.
//!
//! Only verified blocks are copied (never ones streamed ahead of verification), and only on
//! read-only mounts: a block is named by its object hash and index, so it can never go stale,
//! while on a `--writable` mount a file may have upper bytes that only its owner knows of. A
//! replica costs one copy of the block on the owner's thread, once per block and shard while it
//! stays cached; it takes free pool memory only, and is then cached and evicted like any block.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;

use super::cache::{Asker, BlockKey};
use super::read::{locate, object_len};
use super::FileService;
use crate::fs::request::Read;
use crate::fs::{ReadData, ReplicaSlot, Servable};
use crate::store::Block;

/// What a READ forwarded to its owner carries when the receiving shard wants the block: the
/// owner fills `slot` ([`FileService::fill_replica`]); dropping this wakes the receiver.
pub struct Replica {
    key: BlockKey,
    slot: Arc<ReplicaSlot>,
    _done: oneshot::Sender<()>,
}

/// READs of a block that must have crossed from this shard to its owner before this shard asks
/// for a replica. A replica costs a copy of the whole block on the owner's thread (4 MiB: about
/// 25 crossings' worth on a 2-vCPU VM); a sequential reader of 1 MiB reads crosses only 4 times
/// per block and would not gain from it, while a random reader of small reads repays it soon.
const CROSSINGS_BEFORE_REPLICA: u32 = 8;

/// Blocks of [`Replicating::crossings`] tracked at most; the counts start over past it.
const CROSSINGS_TRACKED: usize = 4096;

/// What this shard knows of other shards' blocks it has no replica of.
#[derive(Default)]
pub(super) struct Replicating {
    /// READs that crossed to the owner, per block.
    crossings: RefCell<HashMap<BlockKey, u32>>,
    /// Blocks whose replica is under way (one request per block at a time).
    pending: RefCell<HashSet<BlockKey>>,
}

impl Replicating {
    /// Counts a READ of `key` crossing to its owner; true when this shard should now ask for
    /// its replica.
    fn crossed(&self, key: BlockKey) -> bool {
        if self.pending.borrow().contains(&key) {
            return false;
        }
        let mut crossings = self.crossings.borrow_mut();
        if crossings.len() >= CROSSINGS_TRACKED {
            crossings.clear();
        }
        let count = crossings.entry(key).or_default();
        *count += 1;
        if *count < CROSSINGS_BEFORE_REPLICA {
            return false;
        }
        crossings.remove(&key);
        true
    }
}

/// A shard's file service as a task running on that shard sees it: what a transport that
/// receives requests on the shards themselves (io_uring) serves in place.
#[derive(Clone)]
pub struct LocalShard(pub(super) Rc<FileService>);

impl LocalShard {
    /// The shard's index.
    pub fn id(&self) -> usize {
        self.0.shard
    }

    /// Serves `read`, of an inode another shard owns, from this shard's replica of its block;
    /// without one, hands it back for its owner, with a [`Replica`] to fill when this shard
    /// has room for the block. Reads that span blocks always go to the owner.
    pub fn read_replicated(&self, read: Read) -> Result<(), (Read, Option<Replica>)> {
        let service = &self.0;
        let Some((key, range, len)) = service.single_block(&read) else {
            return Err((read, None));
        };
        match service.cache.get(key, Asker::Reader) {
            Some(block @ Servable::Verified(_)) if block.len() == len => {
                let c = &service.counters;
                c.add(&c.reads, 1);
                c.add(&c.cache_hits, 1);
                c.add(&c.replica_reads, 1);
                c.add(&c.bytes_served, range.len() as u64);
                read.reply.data(ReadData::slice(block, range));
                c.read_latency.record(read.received.elapsed());
                Ok(())
            }
            _ => Err((read, service.ask_replica(key, len))),
        }
    }
}

impl FileService {
    /// The block `read` lies in (key, range within it, block length), if it lies in one.
    fn single_block(&self, read: &Read) -> Option<(BlockKey, Range<usize>, usize)> {
        let content = self.namespace.file_content(read.ino)?;
        let end = read
            .offset
            .saturating_add(read.size as u64)
            .min(content.size);
        if read.offset >= end {
            return None;
        }
        let (index, block, start) = locate(content.chunked, self.block_size, read.offset);
        let hash = *content.objects.get(index)?;
        let object = object_len(content.size, content.chunked, index);
        let len = (object - block as u64 * self.block_size).min(self.block_size) as usize;
        let wanted = (end - read.offset) as usize;
        (start + wanted <= len).then_some(((hash, block), start..start + wanted, len))
    }

    /// A replica request for block `key` (`len` bytes), once enough READs of it crossed
    /// ([`CROSSINGS_BEFORE_REPLICA`]) and unless one is under way or the pool has no free
    /// memory for it (a replica never evicts blocks to get in; once in, it is cached as any).
    fn ask_replica(self: &Rc<Self>, key: BlockKey, len: usize) -> Option<Replica> {
        if !self.replicating.crossed(key) {
            return None;
        }
        let mut buffer = self.pool.try_alloc(len)?;
        // SAFETY: the buffer moves into the task below (its bytes stay where they are), which
        // closes the slot before it lets go of the buffer, also when it is dropped unfinished.
        let slot = Arc::new(unsafe { ReplicaSlot::new(buffer.dma_mut().as_mut_ptr(), len) });
        let (done, filled) = oneshot::channel();
        self.replicating.pending.borrow_mut().insert(key);
        let service = self.clone();
        let waiting = slot.clone();
        glommio::spawn_local(async move {
            let block = Block::from_pool(buffer, len);
            let closing = CloseOnDrop(&waiting);
            // Ends when the owner is done with the request, whether it filled the slot or not.
            let _ = filled.await;
            if let Some(verified) = closing.0.take(block) {
                let c = &service.counters;
                c.add(&c.replicas_made, 1);
                service.publish(key, verified.into());
            }
            service.replicating.pending.borrow_mut().remove(&key);
        })
        .detach();
        Some(Replica {
            key,
            slot,
            _done: done,
        })
    }

    /// Copies the owner's verified block into the slot of a receiving shard that asked for a
    /// replica (after this shard replied to the READ that carried it).
    pub(super) fn fill_replica(&self, replica: Replica) {
        if let Some(Servable::Verified(block)) = self.cache.peek(replica.key) {
            block.copy_into(&replica.slot);
        }
    }
}

/// Closes a replica slot when its buffer's task ends, so a late owner never writes into it.
struct CloseOnDrop<'a>(&'a ReplicaSlot);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Hash;

    #[test]
    fn a_replica_is_asked_for_once_after_enough_crossings() {
        let replicating = Replicating::default();
        let key = (Hash(7), 3);
        for _ in 1..CROSSINGS_BEFORE_REPLICA {
            assert!(!replicating.crossed(key));
        }
        assert!(replicating.crossed(key));
        // While that replica is under way, no second request for it.
        replicating.pending.borrow_mut().insert(key);
        for _ in 0..2 * CROSSINGS_BEFORE_REPLICA {
            assert!(!replicating.crossed(key));
        }
        // Another block counts on its own.
        assert!(!replicating.crossed((Hash(7), 4)));
    }
}
