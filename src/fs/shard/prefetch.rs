//! The shard's half of access traces and prefetch (`crate::trace`, `--prefetch`).
//!
//! Recording: every READ reply notes, per (object, block), whether this shard saw it read before
//! (one set lookup); a first read goes to the shard's slot of the [`TraceRecorder`]. An open the
//! kernel serves itself (passthrough) is noted as a read of the whole object.
//!
//! Prefetch: the mount hands each shard the objects of the inodes it owns, in the order to fetch
//! them ([`PrefetchPlan`]). The shard verifies them one after another exactly as a first read
//! would (store -> hasher -> disk cache; nothing unverified is ever kept), but behind demand:
//! - at most [`PREFETCH_STREAMS`] prefetch verifications at a time, and only one while a reader's
//!   verification or block load is in progress on the shard;
//! - in a task queue with a tenth of the default CPU shares, so readers' requests run first;
//! - a prefetch stream keeps no blocks in the pool (its object lands in the disk cache, where a
//!   later open finds it); once a reader asks for an object being prefetched, its stream keeps
//!   blocks for that reader as a demand stream would.
//!
//! Counters: `prefetched_bytes` (objects prefetch verified), `prefetch_hit_bytes` (bytes served
//! from them: READ replies, and for a passthrough open the object's size once, since the kernel
//! reads it without us) and `prefetch_wasted_bytes` (prefetched objects no reader used, counted
//! when the shard stops).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{Latency, Shares, TaskQueueHandle};

use super::read::{locate, object_len};
use super::FileService;
use crate::manifest::Hash;
use crate::namespace::Ino;
use crate::trace::{TraceRecorder, WHOLE_OBJECT};

/// Prefetch verifications one shard runs at a time while no reader is waiting on it.
const PREFETCH_STREAMS: usize = 2;
/// CPU shares of the prefetch task queue (glommio's default queue has 1000).
const PREFETCH_SHARES: usize = 100;
/// How often a prefetch that is held back by demand looks again.
const YIELD_POLL: Duration = Duration::from_millis(5);

/// One object to prefetch: the inode it was found under (for log lines), its hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchItem {
    pub ino: Ino,
    pub hash: Hash,
    pub len: u64,
}

/// What each shard prefetches, in order (index: shard).
#[derive(Debug, Default)]
pub struct PrefetchPlan {
    pub shards: Vec<Vec<PrefetchItem>>,
}

/// A shard's recording and prefetch state.
#[derive(Default)]
pub(super) struct Prefetch {
    recorder: Option<Arc<TraceRecorder>>,
    /// (object, block) first reads already given to the recorder.
    seen: RefCell<HashSet<(Hash, u32)>>,
    /// A plan was started: reads look up whether prefetch brought their object.
    active: Cell<bool>,
    /// Prefetch verifications in progress that no reader asked for yet.
    background: RefCell<HashSet<Hash>>,
    in_flight: Cell<usize>,
    /// Prefetched objects no reader used yet, with their lengths.
    unused: RefCell<HashMap<Hash, u64>>,
    /// Objects prefetch brought (or was bringing) when a reader first used them.
    used: RefCell<HashSet<Hash>>,
    stopping: Cell<bool>,
}

impl Prefetch {
    pub fn new(recorder: Option<Arc<TraceRecorder>>) -> Prefetch {
        Prefetch {
            recorder,
            ..Prefetch::default()
        }
    }
}

impl FileService {
    /// Notes a READ of `len` bytes at `offset` of `ino` that was served: first reads go to the
    /// trace, and bytes of prefetched objects count as prefetch hits.
    pub(super) fn note_read(&self, ino: Ino, offset: u64, len: u64) {
        let p = &self.prefetch;
        if p.recorder.is_none() && !p.active.get() {
            return;
        }
        let Some(content) = self.namespace.file_content(ino) else {
            return;
        };
        let end = offset.saturating_add(len).min(content.size);
        let mut pos = offset;
        while pos < end {
            let (index, block, start) = locate(content.chunked, self.block_size, pos);
            let Some(&hash) = content.objects.get(index) else {
                return;
            };
            let take = (end - pos).min(self.block_size - start as u64);
            if let Some(recorder) = &p.recorder {
                if p.seen.borrow_mut().insert((hash, block)) {
                    let len = object_len(content.size, content.chunked, index);
                    recorder.record(self.shard, hash, len, block);
                }
            }
            if p.active.get() && self.used_prefetched(hash) {
                self.counters.add(&self.counters.prefetch_hit_bytes, take);
            }
            pos += take;
        }
    }

    /// Notes an open of `ino` that the kernel serves from the cache file itself: the whole
    /// object is read as far as the trace knows, and a prefetched object counts as a hit once.
    pub(super) fn note_passthrough_open(&self, ino: Ino) {
        let p = &self.prefetch;
        let Some(content) = self.namespace.file_content(ino) else {
            return;
        };
        let [hash] = content.objects[..] else {
            return;
        };
        if let Some(recorder) = &p.recorder {
            if p.seen.borrow_mut().insert((hash, WHOLE_OBJECT)) {
                recorder.record(self.shard, hash, content.size, WHOLE_OBJECT);
            }
        }
        if p.active.get() && !p.used.borrow().contains(&hash) && self.used_prefetched(hash) {
            self.counters
                .add(&self.counters.prefetch_hit_bytes, content.size);
        }
    }

    /// Whether `hash` is an object prefetch brought (or is bringing); marks it used.
    fn used_prefetched(&self, hash: Hash) -> bool {
        let p = &self.prefetch;
        if p.background.borrow_mut().remove(&hash) || p.unused.borrow_mut().remove(&hash).is_some()
        {
            p.used.borrow_mut().insert(hash);
            return true;
        }
        p.used.borrow().contains(&hash)
    }

    /// Whether a verification stream of `hash` may keep blocks for publication: not while
    /// only prefetch wants the object (the disk cache gets it, the pool stays for readers).
    pub(super) fn may_keep(&self, hash: Hash) -> bool {
        !self.prefetch.background.borrow().contains(&hash)
    }

    /// Starts prefetching `items` in order, behind demand (see the module docs).
    pub(super) fn start_prefetch(self: &Rc<Self>, items: Vec<PrefetchItem>) {
        if items.is_empty() {
            return;
        }
        self.prefetch.active.set(true);
        let queue = glommio::executor().create_task_queue(
            Shares::Static(PREFETCH_SHARES),
            Latency::NotImportant,
            "prefetch",
        );
        let run = self.clone().prefetch_in_order(items, queue);
        match glommio::spawn_local_into(run, queue) {
            Ok(task) => {
                task.detach();
            }
            Err(e) => tracing::warn!(shard = self.shard, "cannot start prefetch: {e}"),
        }
    }

    /// Stops starting prefetches and counts what prefetch brought that nobody read.
    pub(super) fn stop_prefetch(&self) {
        let p = &self.prefetch;
        p.stopping.set(true);
        let wasted: u64 = p.unused.borrow_mut().drain().map(|(_, len)| len).sum();
        self.counters
            .add(&self.counters.prefetch_wasted_bytes, wasted);
    }

    async fn prefetch_in_order(self: Rc<Self>, items: Vec<PrefetchItem>, queue: TaskQueueHandle) {
        for item in items {
            while !self.prefetch_slot_free() {
                if self.prefetch.stopping.get() {
                    return;
                }
                glommio::timer::sleep(YIELD_POLL).await;
            }
            if self.prefetch.stopping.get() {
                return;
            }
            let v = &self.verification;
            if v.is_verified(item.hash)
                || v.is_verifying(item.hash)
                || v.quarantined(item.hash)
                || self.is_streaming(item.hash)
            {
                continue;
            }
            let p = &self.prefetch;
            p.in_flight.set(p.in_flight.get() + 1);
            p.background.borrow_mut().insert(item.hash);
            let service = self.clone();
            match glommio::spawn_local_into(service.prefetch_one(item), queue) {
                Ok(task) => {
                    task.detach();
                }
                Err(_) => {
                    p.in_flight.set(p.in_flight.get() - 1);
                    p.background.borrow_mut().remove(&item.hash);
                    return;
                }
            }
        }
    }

    /// Whether another prefetch may start: fewer than [`PREFETCH_STREAMS`] running, and none
    /// at all besides one while readers are waiting on verifications or loads here.
    fn prefetch_slot_free(&self) -> bool {
        let p = &self.prefetch;
        let background = p.background.borrow().len();
        let demand = self
            .verification
            .verifying_count()
            .saturating_sub(background)
            + self.cache.loading();
        let limit = if demand > 0 { 1 } else { PREFETCH_STREAMS };
        p.in_flight.get() < limit
    }

    async fn prefetch_one(self: Rc<Self>, item: PrefetchItem) {
        let result = self.verify(item.ino, item.hash, item.len).await;
        let p = &self.prefetch;
        p.in_flight.set(p.in_flight.get() - 1);
        let untouched = p.background.borrow_mut().remove(&item.hash);
        if result.is_ok() {
            self.counters.add(&self.counters.prefetched_bytes, item.len);
            if untouched {
                p.unused.borrow_mut().insert(item.hash, item.len);
            }
        }
    }
}
