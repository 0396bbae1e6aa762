//! Verified blocks that leave the block cache before any reader asked for them go to their
//! object's spill file (one is opened for the object if it has none), so that their reader finds
//! them there rather than fetching them from the store a second time. With several readers on a
//! shard, one object's reloads evict the blocks another object's verification kept for its
//! reader; blocks that were read, or that a spill file or the disk cache already holds, just go.
//! Without a disk cache only (a cache file already holds every block); see `store::Spill`.
//!
//! While its write runs, a block stays in memory: a reload takes it from here, and its bytes
//! count as leaving the pool, so that making room does not evict more blocks than it needs.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use mount_vfs_executors::rounded_size;

use super::cache::{BlockKey, Evicted};
use super::FileService;
use crate::fs::{Servable, VerifiedBlock};

/// Evicted blocks on their way into spill files.
#[derive(Default)]
pub(super) struct Leaving {
    blocks: RefCell<HashMap<BlockKey, VerifiedBlock>>,
    /// Pool bytes they hold.
    bytes: Cell<usize>,
}

impl FileService {
    /// Pool bytes held by evicted blocks until their spill write ends.
    pub(super) fn leaving_bytes(&self) -> usize {
        self.leaving.bytes.get()
    }

    /// Block `key` if it is on its way into its spill file.
    pub(super) fn leaving(&self, key: BlockKey) -> Option<VerifiedBlock> {
        self.leaving.blocks.borrow().get(&key).cloned()
    }

    /// Writes `evicted` to its object's spill file if no reader asked for it and no local copy
    /// holds it (see the module docs).
    pub(super) fn spill_unread(&self, evicted: Evicted) {
        let Evicted {
            key,
            block: Servable::Verified(block),
            read: false,
        } = evicted
        else {
            return;
        };
        let (hash, index) = key;
        let (Some(spill), Some(service)) = (&self.spill, self.this.upgrade()) else {
            return;
        };
        let v = &self.verification;
        if spill.has(hash, index) || v.in_disk_cache(hash) || self.leaving(key).is_some() {
            return;
        }
        if !spill.has_file(hash) {
            // As long as its blocks, at most: what a spill file of the object is charged.
            let Some(len) = v
                .digests(hash)
                .map(|d| d.as_slice().len() as u64 * self.block_size)
            else {
                return;
            };
            match spill.begin(hash, len) {
                Some(writer) => spill.keep(hash, writer),
                None => return,
            }
        }
        let held = rounded_size(block.len());
        let leaving = &self.leaving;
        leaving.bytes.set(leaving.bytes.get() + held);
        leaving.blocks.borrow_mut().insert(key, block.clone());
        let write = async move {
            let Some(spill) = &service.spill else { return };
            let offset = index as u64 * service.block_size;
            let written = spill.add_block(hash, index, offset, block.shared()).await;
            let c = &service.counters;
            c.add(&c.spill_bytes_written, written);
            let leaving = &service.leaving;
            leaving.blocks.borrow_mut().remove(&key);
            leaving.bytes.set(leaving.bytes.get() - held);
            // Its memory may not have returned (a reload took the block back meanwhile), and
            // grants may be waiting for it.
            service.make_room(service.headroom());
        };
        glommio::spawn_local(write).detach();
    }
}
