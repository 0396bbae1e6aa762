//! The per-shard block cache: an LRU of [`Servable`] blocks (verified ones, and under
//! `--verify stream` blocks streamed ahead of their object's verification), keyed by (object
//! hash, block index), with single-flight loads.
//!
//! Single-flight contract: the first task that misses a key becomes its loader and registers a
//! shared future under the key; every later task for that key awaits the same future. The loader
//! removes the key when the load ends, on success (after inserting the block) and on failure
//! (so the next reader retries); a cancelled loader cannot leave the key stuck because the
//! shared future is driven by whoever awaits it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use futures::future::{FutureExt, LocalBoxFuture, Shared};

use crate::fs::{FsError, Servable};
use crate::manifest::Hash;

/// (object, block index within the object).
pub type BlockKey = (Hash, u32);

pub type Load = Shared<LocalBoxFuture<'static, Result<Servable, FsError>>>;

pub struct BlockCache {
    inner: RefCell<Inner>,
}

struct Inner {
    budget: usize,
    used: usize,
    clock: u64,
    blocks: HashMap<BlockKey, (Servable, u64)>,
    by_age: BTreeMap<u64, BlockKey>,
    loading: HashMap<BlockKey, Load>,
}

impl BlockCache {
    /// A cache holding at most `budget` bytes of blocks.
    pub fn new(budget: usize) -> BlockCache {
        BlockCache {
            inner: RefCell::new(Inner {
                budget,
                used: 0,
                clock: 0,
                blocks: HashMap::new(),
                by_age: BTreeMap::new(),
                loading: HashMap::new(),
            }),
        }
    }

    pub fn budget(&self) -> usize {
        self.inner.borrow().budget
    }

    /// The cached block, marked most recently used.
    pub fn get(&self, key: BlockKey) -> Option<Servable> {
        let mut inner = self.inner.borrow_mut();
        inner.clock += 1;
        let now = inner.clock;
        let (block, stamp) = inner.blocks.get_mut(&key)?;
        let block = block.clone();
        let old = std::mem::replace(stamp, now);
        inner.by_age.remove(&old);
        inner.by_age.insert(now, key);
        Some(block)
    }

    /// The cached block, without marking it used (the stream hasher looking for the next
    /// block in order).
    pub fn peek(&self, key: BlockKey) -> Option<Servable> {
        self.inner
            .borrow()
            .blocks
            .get(&key)
            .map(|(block, _)| block.clone())
    }

    /// Drops `key` (a streamed block that turned out to differ from its verified object).
    pub fn remove(&self, key: BlockKey) {
        let mut inner = self.inner.borrow_mut();
        if let Some((block, stamp)) = inner.blocks.remove(&key) {
            inner.used -= block.len();
            inner.by_age.remove(&stamp);
        }
    }

    pub fn contains(&self, key: BlockKey) -> bool {
        let inner = self.inner.borrow();
        inner.blocks.contains_key(&key) || inner.loading.contains_key(&key)
    }

    /// Inserts a block, evicting least recently used blocks to stay within budget.
    pub fn insert(&self, key: BlockKey, block: Servable) {
        let mut inner = self.inner.borrow_mut();
        let len = block.len();
        if len > inner.budget {
            return;
        }
        inner.clock += 1;
        let now = inner.clock;
        if let Some((old, stamp)) = inner.blocks.insert(key, (block, now)) {
            inner.used -= old.len();
            inner.by_age.remove(&stamp);
        }
        inner.by_age.insert(now, key);
        inner.used += len;
        while inner.used > inner.budget {
            let Some((_, victim)) = inner.by_age.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = inner.blocks.remove(&victim) {
                inner.used -= evicted.len();
            }
        }
    }

    /// Drops the least recently used block; false when the cache is empty. The memory returns
    /// to the pool once no reply still holds the block.
    pub fn evict_one(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        let Some((_, victim)) = inner.by_age.pop_first() else {
            return false;
        };
        if let Some((evicted, _)) = inner.blocks.remove(&victim) {
            inner.used -= evicted.len();
        }
        true
    }

    /// Loads in flight.
    pub fn loading(&self) -> usize {
        self.inner.borrow().loading.len()
    }

    /// The load in flight for `key`, or registers `start()` as the one.
    pub fn load_or_join(
        &self,
        key: BlockKey,
        start: impl FnOnce() -> LocalBoxFuture<'static, Result<Servable, FsError>>,
    ) -> Load {
        let mut inner = self.inner.borrow_mut();
        inner
            .loading
            .entry(key)
            .or_insert_with(|| start().shared())
            .clone()
    }

    /// Ends the single-flight registration of `key` (the loader calls this once, in any outcome).
    pub fn finish_load(&self, key: BlockKey) {
        self.inner.borrow_mut().loading.remove(&key);
    }
}
