//! Per-shard accounting over glommio's registered arena, so that glommio never silently falls
//! back to heap buffers. See `docs/buffer-pool.md` for the rules.
//!
//! Everything here is `!Send` on purpose: a [`BufferPool`], its [`PoolBuffer`]s and
//! [`Reservation`]s live and die on the shard that created them (they hold `Rc`s, and glommio's
//! `DmaBuffer` points into that shard's arena). Only [`PoolStats`] crosses threads.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use glommio::io::{DmaBuffer, DmaFile};
use tracing::warn;

use crate::alloc::{MemoryKind, PAGE};

/// Bytes glommio's buddy allocator takes for a request of `len` bytes: the next power of two,
/// at least one 4 KiB leaf (glommio passes its 4096 alignment as the buddy leaf size).
pub fn rounded_size(len: usize) -> usize {
    len.max(1).next_power_of_two().max(PAGE)
}

/// Usable bytes and largest single block of glommio's buddy allocator (buddy-alloc 0.4.2, leaf
/// 4096) over an arena of `len` bytes at a 4 KiB-aligned address. It keeps its metadata at the
/// start of the arena, then carves the rest greedily into power-of-two blocks, so for a
/// power-of-two arena the largest block is half of it.
pub fn buddy_geometry(len: usize) -> (usize, usize) {
    const LEAF_SHIFT: u32 = PAGE.trailing_zeros();
    let ptr = std::mem::size_of::<usize>();
    let (entry, node) = (3 * ptr, 2 * ptr); // buddy-alloc `Entry` and `Node`
    let leaves = len >> LEAF_SHIFT;
    if leaves < 2 {
        return (0, 0);
    }
    let entries = leaves.ilog2() as usize + 2;
    let nblock = |k: usize| 1usize << (entries - k - 1);
    let bitmap = |k: usize| nblock(k).div_ceil(8);
    let meta = entries * (entry + node)
        + (0..entries).map(bitmap).sum::<usize>()
        + (1..entries).map(bitmap).sum::<usize>();
    let mut base = meta.next_multiple_of(PAGE);
    let (mut capacity, mut max_block) = (0, 0);
    for k in (0..entries - 1).rev() {
        let block = PAGE << k;
        while base + block <= len {
            capacity += block;
            max_block = max_block.max(block);
            base += block;
        }
    }
    (capacity, max_block)
}

/// Why an allocation can never be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{len} bytes ({rounded} after buddy rounding) exceed the largest pool buffer of {max} bytes"
)]
pub struct TooLarge {
    /// Requested length.
    pub len: usize,
    /// What glommio would take for it.
    pub rounded: usize,
    /// [`BufferPool::max_alloc`].
    pub max: usize,
}

/// Per-shard pool counters, readable from any thread.
#[derive(Debug, Default)]
pub struct PoolStats {
    capacity: AtomicUsize,
    in_use: AtomicUsize,
    high_water: AtomicUsize,
    allocs: AtomicU64,
    waits: AtomicU64,
    heap_fallbacks: AtomicU64,
    memory_kind: AtomicU8,
    registered: AtomicBool,
}

/// A copy of [`PoolStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatsSnapshot {
    /// Bytes the pool may hand out (arena minus buddy metadata).
    pub capacity: usize,
    /// Bytes held by live buffers and reservations (rounded sizes).
    pub in_use: usize,
    /// Highest `in_use` seen.
    pub high_water: usize,
    /// Buffers handed out and reservations taken.
    pub allocs: u64,
    /// Requests that had to wait for memory.
    pub waits: u64,
    /// Times glommio returned heap memory although our accounting had room (fragmentation, or
    /// glommio-internal buffers we were not told about).
    pub heap_fallbacks: u64,
    /// What backs the arena; `None` until the shard has started.
    pub memory_kind: Option<MemoryKind>,
    /// Whether the arena is registered with io_uring (fixed-buffer I/O).
    pub registered: bool,
}

impl PoolStats {
    /// Reads every counter (each atomically, not all together).
    pub fn snapshot(&self) -> PoolStatsSnapshot {
        PoolStatsSnapshot {
            capacity: self.capacity.load(Ordering::Relaxed),
            in_use: self.in_use.load(Ordering::Relaxed),
            high_water: self.high_water.load(Ordering::Relaxed),
            allocs: self.allocs.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            heap_fallbacks: self.heap_fallbacks.load(Ordering::Relaxed),
            memory_kind: MemoryKind::from_u8(self.memory_kind.load(Ordering::Relaxed)),
            registered: self.registered.load(Ordering::Relaxed),
        }
    }
}

/// What the shard learned about its arena at start-up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArenaInfo {
    /// Address range of glommio's arena, when known (from our hook or from fdinfo).
    pub range: Option<(usize, usize)>,
    /// Size glommio allocated.
    pub size: usize,
    pub kind: MemoryKind,
    pub registered: bool,
    /// Time the hook spent touching every page of the arena.
    pub prefault: std::time::Duration,
}

struct Waiter {
    bytes: usize,
    granted: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

struct PoolInner {
    capacity: usize,
    max_alloc: usize,
    arena: ArenaInfo,
    /// Invariant: the sum of live [`Permit`]s, never above `capacity`.
    in_use: Cell<usize>,
    /// FIFO of requests waiting for memory. Invariant: non-empty only while the head does not
    /// fit, so a new request that finds waiters queues behind them (fairness).
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    /// Bumped on every release; wakes requests that fit by accounting but hit buddy
    /// fragmentation.
    release_gen: Cell<u64>,
    release_wakers: RefCell<Vec<Waker>>,
    fallback_warned: Cell<bool>,
    stats: Arc<PoolStats>,
}

impl PoolInner {
    fn take(&self, bytes: usize) {
        let now = self.in_use.get() + bytes;
        debug_assert!(now <= self.capacity);
        self.in_use.set(now);
        self.stats.in_use.store(now, Ordering::Relaxed);
        self.stats.high_water.fetch_max(now, Ordering::Relaxed);
        self.stats.allocs.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        let now = self.in_use.get() - bytes;
        self.in_use.set(now);
        self.stats.in_use.store(now, Ordering::Relaxed);
        self.release_gen.set(self.release_gen.get() + 1);
        for w in self.release_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        self.grant_waiters();
    }

    /// Grants memory to waiters in FIFO order while the head fits.
    fn grant_waiters(&self) {
        loop {
            let head = {
                let waiters = self.waiters.borrow();
                match waiters.front() {
                    Some(w) if self.in_use.get() + w.bytes <= self.capacity => w.clone(),
                    _ => return,
                }
            };
            self.waiters.borrow_mut().pop_front();
            self.take(head.bytes);
            head.granted.set(true);
            if let Some(w) = head.waker.take() {
                w.wake();
            }
        }
    }

    fn in_arena(&self, p: *const u8) -> bool {
        match self.arena.range {
            Some((start, len)) => (start..start + len).contains(&(p as usize)),
            // Unknown arena (no hook and no registration): we cannot tell, say yes.
            None => true,
        }
    }

    fn note_fallback(&self, len: usize) {
        self.stats.heap_fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.fallback_warned.replace(true) {
            warn!(
                len,
                in_use = self.in_use.get(),
                capacity = self.capacity,
                "glommio returned a heap (unregistered) buffer although pool accounting had room: \
                 arena fragmented or used by unaccounted glommio buffers; counting further \
                 fallbacks silently in PoolStats::heap_fallbacks"
            );
        }
    }
}

/// Accounting for `bytes` of the arena, returned on drop.
struct Permit {
    pool: Rc<PoolInner>,
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pool.release(self.bytes);
    }
}

/// Waits in FIFO order until `bytes` fit the accounting.
struct Acquire {
    pool: Rc<PoolInner>,
    bytes: usize,
    waiter: Option<Rc<Waiter>>,
    done: bool,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        let ready = match &this.waiter {
            None => {
                let fits = this.pool.in_use.get() + this.bytes <= this.pool.capacity;
                if fits && this.pool.waiters.borrow().is_empty() {
                    this.pool.take(this.bytes);
                    true
                } else {
                    let w = Rc::new(Waiter {
                        bytes: this.bytes,
                        granted: Cell::new(false),
                        waker: Cell::new(Some(cx.waker().clone())),
                    });
                    this.pool.waiters.borrow_mut().push_back(w.clone());
                    this.pool.stats.waits.fetch_add(1, Ordering::Relaxed);
                    this.waiter = Some(w);
                    false
                }
            }
            Some(w) if w.granted.get() => true,
            Some(w) => {
                w.waker.set(Some(cx.waker().clone()));
                false
            }
        };
        if !ready {
            return Poll::Pending;
        }
        this.done = true;
        Poll::Ready(Permit {
            pool: this.pool.clone(),
            bytes: this.bytes,
        })
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(w) = self.waiter.take() else {
            return;
        };
        if self.done {
            return;
        }
        if w.granted.get() {
            // Granted but never observed: give the memory back.
            self.pool.release(w.bytes);
        } else {
            self.pool
                .waiters
                .borrow_mut()
                .retain(|x| !Rc::ptr_eq(x, &w));
            // We may have been the head that blocked smaller requests behind us.
            self.pool.grant_waiters();
        }
    }
}

/// Resolves at the next release of pool memory.
struct NextRelease {
    pool: Rc<PoolInner>,
    gen: u64,
}

impl Future for NextRelease {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.pool.release_gen.get() != self.gen {
            return Poll::Ready(());
        }
        self.pool
            .release_wakers
            .borrow_mut()
            .push(cx.waker().clone());
        Poll::Pending
    }
}

/// The shard's view of its registered arena: hands out [`PoolBuffer`]s and [`Reservation`]s
/// without ever exceeding what glommio's buddy allocator can serve. Cheap to clone (an `Rc`);
/// `!Send`.
#[derive(Clone)]
pub struct BufferPool {
    inner: Rc<PoolInner>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("capacity", &self.inner.capacity)
            .field("in_use", &self.inner.in_use.get())
            .field("memory_kind", &self.inner.arena.kind)
            .field("registered", &self.inner.arena.registered)
            .finish()
    }
}

impl BufferPool {
    pub(crate) fn new(arena: ArenaInfo, stats: Arc<PoolStats>) -> BufferPool {
        let (capacity, max_alloc) = buddy_geometry(arena.size);
        stats.capacity.store(capacity, Ordering::Relaxed);
        stats.memory_kind.store(arena.kind as u8, Ordering::Relaxed);
        stats.registered.store(arena.registered, Ordering::Relaxed);
        BufferPool {
            inner: Rc::new(PoolInner {
                capacity,
                max_alloc,
                arena,
                in_use: Cell::new(0),
                waiters: RefCell::new(VecDeque::new()),
                release_gen: Cell::new(0),
                release_wakers: RefCell::new(Vec::new()),
                fallback_warned: Cell::new(false),
                stats,
            }),
        }
    }

    /// Bytes the pool can hand out at once (the arena minus glommio's buddy metadata).
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Bytes held now, in glommio's rounded sizes.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.get()
    }

    /// Largest single buffer: the biggest buddy block (half a power-of-two arena).
    pub fn max_alloc(&self) -> usize {
        self.inner.max_alloc
    }

    /// What backs the arena.
    pub fn memory_kind(&self) -> MemoryKind {
        self.inner.arena.kind
    }

    /// Whether the arena is registered with io_uring, so glommio uses fixed-buffer I/O.
    pub fn registered(&self) -> bool {
        self.inner.arena.registered
    }

    /// Time spent pre-faulting the arena at start-up (zero without the allocator hook).
    pub fn prefault_time(&self) -> std::time::Duration {
        self.inner.arena.prefault
    }

    /// This shard's counters (the same `Arc` as `Shards::stats()[id]`).
    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.inner.stats
    }

    /// Whether `bytes` lie in this shard's registered arena (so glommio will use fixed I/O for
    /// them). Stands in for glommio's crate-private `DmaBuffer::uring_buffer_id().is_some()`.
    pub fn is_registered(&self, bytes: &[u8]) -> bool {
        self.inner.arena.registered
            && self.inner.arena.range.is_some()
            && self.inner.in_arena(bytes.as_ptr())
    }

    fn check_len(&self, len: usize) -> Result<usize, TooLarge> {
        let rounded = rounded_size(len);
        if rounded > self.inner.max_alloc {
            return Err(TooLarge {
                len,
                rounded,
                max: self.inner.max_alloc,
            });
        }
        Ok(rounded)
    }

    /// Carves a glommio buffer under `permit`; `Err` gives back glommio's heap fallback.
    fn carve(&self, len: usize, permit: Permit) -> Result<PoolBuffer, Permit> {
        let buf = glommio::allocate_dma_buffer(len);
        if self.inner.in_arena(buf.as_ptr()) {
            return Ok(PoolBuffer {
                buf,
                permit: Reservation { permit },
            });
        }
        drop(buf);
        self.inner.note_fallback(len);
        Err(permit)
    }

    /// A buffer of `len` bytes now, or `None` if the pool is full, requests are already
    /// waiting, or `len` exceeds [`max_alloc`](Self::max_alloc).
    pub fn try_alloc(&self, len: usize) -> Option<PoolBuffer> {
        let rounded = self.check_len(len).ok()?;
        let inner = &self.inner;
        if inner.in_use.get() + rounded > inner.capacity || !inner.waiters.borrow().is_empty() {
            return None;
        }
        inner.take(rounded);
        let permit = Permit {
            pool: inner.clone(),
            bytes: rounded,
        };
        self.carve(len, permit).ok()
    }

    /// A buffer of `len` bytes, waiting in FIFO order until memory is free (backpressure).
    /// Fails only if `len` can never fit.
    pub async fn alloc(&self, len: usize) -> Result<PoolBuffer, TooLarge> {
        let rounded = self.check_len(len)?;
        let permit = self.acquire(rounded).await;
        Ok(self.carve_under(len, permit).await)
    }

    /// A buffer of `len` bytes carved under memory already granted by [`reserve`](Self::reserve):
    /// callers that must take memory in a fixed order (a stream whose head must never wait
    /// behind its own tail) reserve in that order, then fill the buffers in any order.
    /// Panics if `memory` is smaller than the buffer needs.
    pub async fn alloc_reserved(&self, len: usize, memory: Reservation) -> PoolBuffer {
        assert!(
            memory.bytes() >= rounded_size(len),
            "{len} bytes do not fit a reservation of {}",
            memory.bytes()
        );
        self.carve_under(len, memory.permit).await
    }

    async fn carve_under(&self, len: usize, mut permit: Permit) -> PoolBuffer {
        loop {
            match self.carve(len, permit) {
                Ok(buf) => return buf,
                Err(p) if self.inner.in_use.get() > p.bytes => {
                    // Fragmented: hold our accounting and retry when someone gives memory back.
                    let gen = self.inner.release_gen.get();
                    NextRelease {
                        pool: self.inner.clone(),
                        gen,
                    }
                    .await;
                    permit = p;
                }
                Err(p) => {
                    // Nothing else is accounted, yet the buddy is full: glommio itself holds
                    // buffers we were not told about. Serve from the heap rather than hang.
                    return PoolBuffer {
                        buf: glommio::allocate_dma_buffer(len),
                        permit: Reservation { permit: p },
                    };
                }
            }
        }
    }

    fn acquire(&self, bytes: usize) -> Acquire {
        Acquire {
            pool: self.inner.clone(),
            bytes,
            waiter: None,
            done: false,
        }
    }

    /// Accounting for `len` bytes that glommio will allocate itself (for example the buffer of
    /// `DmaFile::read_at`), held until the [`Reservation`] is dropped.
    pub async fn reserve(&self, len: usize) -> Result<Reservation, TooLarge> {
        let rounded = self.check_len(len)?;
        Ok(Reservation {
            permit: self.acquire(rounded).await,
        })
    }

    /// [`reserve`](Self::reserve) for exactly what `file.read_at(pos, len)` allocates: the read
    /// widened to the file's O_DIRECT alignment (glommio `DmaFile::read_at`).
    pub async fn reserve_read(
        &self,
        file: &DmaFile,
        pos: u64,
        len: usize,
    ) -> Result<Reservation, TooLarge> {
        let start = file.align_down(pos);
        let end = file.align_up(pos + len as u64);
        self.reserve((end - start) as usize).await
    }
}

/// Accounting for part of the arena, returned when dropped. Keep it alive as long as the
/// glommio buffer it stands for (a `ReadResult`, or a `DmaBuffer` passed to `DmaFile::write_at`).
pub struct Reservation {
    permit: Permit,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("bytes", &self.permit.bytes)
            .finish()
    }
}

impl Reservation {
    /// Bytes held (glommio's rounded size).
    pub fn bytes(&self) -> usize {
        self.permit.bytes
    }

    /// Checks that glommio served `data` (a buffer it allocated under this reservation) from the
    /// arena; counts and warns (once) if it fell back to the heap. Returns whether it was in the
    /// arena.
    pub fn check(&self, data: &[u8]) -> bool {
        let ok = self.permit.pool.in_arena(data.as_ptr());
        if !ok {
            self.permit.pool.note_fallback(data.len());
        }
        ok
    }
}

/// A buffer in the shard's registered arena. Derefs to its bytes (zero-copy: socket reads and
/// FUSE replies use this memory directly); gives its accounting back on drop. `!Send`.
pub struct PoolBuffer {
    // Field order matters: the buddy block is freed before the accounting is returned, so a
    // woken waiter always finds the block free.
    buf: DmaBuffer,
    permit: Reservation,
}

impl std::fmt::Debug for PoolBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuffer")
            .field("ptr", &self.buf.as_ptr())
            .field("len", &self.buf.len())
            .field("bytes", &self.permit.bytes())
            .finish()
    }
}

impl PoolBuffer {
    /// Requested length (glommio holds [`rounded_size`] of it).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The glommio buffer, for APIs that borrow one.
    pub fn dma(&self) -> &DmaBuffer {
        &self.buf
    }

    /// The glommio buffer, mutably.
    pub fn dma_mut(&mut self) -> &mut DmaBuffer {
        &mut self.buf
    }

    /// Whether this buffer is in the registered arena (fixed-buffer I/O).
    pub fn is_registered(&self) -> bool {
        let pool = &self.permit.permit.pool;
        pool.arena.registered && pool.arena.range.is_some() && pool.in_arena(self.buf.as_ptr())
    }

    /// Splits off the `DmaBuffer` for APIs that take it by value (`DmaFile::write_at`). Keep the
    /// [`Reservation`] until that I/O has completed.
    pub fn into_parts(self) -> (DmaBuffer, Reservation) {
        (self.buf, self.permit)
    }
}

impl Deref for PoolBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.buf.as_bytes()
    }
}

impl DerefMut for PoolBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_bytes_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_buddy() {
        assert_eq!(rounded_size(0), 4096);
        assert_eq!(rounded_size(1), 4096);
        assert_eq!(rounded_size(4097), 8192);
        assert_eq!(rounded_size(1 << 20), 1 << 20);
        assert_eq!(rounded_size(3 << 20), 4 << 20);
    }

    #[test]
    fn geometry_of_power_of_two_arenas() {
        // Metadata fits one 4 KiB leaf up to at least 64 MiB; the biggest block is half.
        assert_eq!(buddy_geometry(16 << 20), ((16 << 20) - 4096, 8 << 20));
        let (cap, max) = buddy_geometry(1 << 30);
        assert_eq!(max, 512 << 20);
        assert!(cap < 1 << 30 && cap > (1 << 30) - (256 << 10), "{cap}");
        assert_eq!(buddy_geometry(4096), (0, 0));
    }

    /// Runs the real buddy allocator over a heap arena and checks our geometry against it.
    #[test]
    fn geometry_matches_buddy_alloc() {
        for len in [64 << 10, 2 << 20, 6 << 20, 16 << 20, 24 << 20] {
            let layout = std::alloc::Layout::from_size_align(len, PAGE).unwrap();
            // SAFETY: non-zero size.
            let base = unsafe { std::alloc::alloc(layout) };
            assert!(!base.is_null());
            // SAFETY: `base..base+len` is ours and used by nothing else while `buddy` lives.
            let mut buddy = unsafe {
                buddy_alloc::buddy_alloc::BuddyAlloc::new(
                    buddy_alloc::buddy_alloc::BuddyAllocParam::new(base, len, PAGE),
                )
            };
            let (cap, max) = buddy_geometry(len);
            assert_eq!(buddy.available_bytes(), cap, "len {len}");
            assert!(!buddy.malloc(max).is_null());
            assert!(buddy.malloc(max * 2).is_null());
            // `buddy` is not used past this point; its memory is freed below.
            // SAFETY: allocated above with `layout`.
            unsafe { std::alloc::dealloc(base, layout) };
        }
    }
}
