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

/// Who looks a block up: a reader's request marks it read (see `unread`); read-ahead does not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    Reader,
    ReadAhead,
}

/// A block the cache let go of, to stay within its budget or to make room in the pool.
pub struct Evicted {
    pub key: BlockKey,
    pub block: Servable,
    /// Whether a reader asked for it while it was cached.
    pub read: bool,
}

struct Entry {
    block: Servable,
    stamp: u64,
    read: bool,
}

pub struct BlockCache {
    inner: RefCell<Inner>,
}

struct Inner {
    budget: usize,
    used: usize,
    clock: u64,
    blocks: HashMap<BlockKey, Entry>,
    by_age: BTreeMap<u64, BlockKey>,
    loading: HashMap<BlockKey, Load>,
}

impl Inner {
    fn evict_oldest(&mut self) -> Option<Evicted> {
        while let Some((_, key)) = self.by_age.pop_first() {
            if let Some(entry) = self.blocks.remove(&key) {
                self.used -= entry.block.len();
                return Some(Evicted {
                    key,
                    block: entry.block,
                    read: entry.read,
                });
            }
        }
        None
    }
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

    /// The cached block, marked most recently used (and read, for a reader).
    pub fn get(&self, key: BlockKey, asker: Asker) -> Option<Servable> {
        let mut inner = self.inner.borrow_mut();
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner.blocks.get_mut(&key)?;
        entry.read |= asker == Asker::Reader;
        let block = entry.block.clone();
        let old = std::mem::replace(&mut entry.stamp, now);
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
            .map(|entry| entry.block.clone())
    }

    /// Notes that a reader has block `key` (it came from the load it waited for).
    pub fn mark_read(&self, key: BlockKey) {
        if let Some(entry) = self.inner.borrow_mut().blocks.get_mut(&key) {
            entry.read = true;
        }
    }

    /// Drops `key` (a streamed block that turned out to differ from its verified object).
    pub fn remove(&self, key: BlockKey) {
        let mut inner = self.inner.borrow_mut();
        if let Some(entry) = inner.blocks.remove(&key) {
            inner.used -= entry.block.len();
            inner.by_age.remove(&entry.stamp);
        }
    }

    pub fn contains(&self, key: BlockKey) -> bool {
        let inner = self.inner.borrow();
        inner.blocks.contains_key(&key) || inner.loading.contains_key(&key)
    }

    /// Inserts a block (replacing one under the same key keeps whether it was read), evicting
    /// least recently used blocks to stay within budget; returns those.
    pub fn insert(&self, key: BlockKey, block: Servable) -> Vec<Evicted> {
        let mut inner = self.inner.borrow_mut();
        let len = block.len();
        if len > inner.budget {
            return Vec::new();
        }
        inner.clock += 1;
        let stamp = inner.clock;
        let entry = Entry {
            block,
            stamp,
            read: false,
        };
        if let Some(old) = inner.blocks.insert(key, entry) {
            inner.used -= old.block.len();
            inner.by_age.remove(&old.stamp);
            if let Some(new) = inner.blocks.get_mut(&key) {
                new.read = old.read;
            }
        }
        inner.by_age.insert(stamp, key);
        inner.used += len;
        let mut evicted = Vec::new();
        while inner.used > inner.budget {
            match inner.evict_oldest() {
                Some(victim) => evicted.push(victim),
                None => break,
            }
        }
        evicted
    }

    /// Drops the least recently used block, if any. Its memory returns to the pool once
    /// nothing holds it any more (a reply, or the caller).
    pub fn evict_one(&self) -> Option<Evicted> {
        self.inner.borrow_mut().evict_oldest()
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
