//! The global-allocator hook that places glommio's registered I/O arena on hugepages.
//!
//! glommio has no API to hand it our own memory: `Reactor::new` calls
//! `UringBufferAllocator::new(io_memory)`, which does
//! `alloc::alloc::alloc(Layout::from_size_align(size, 4096))` with
//! `size = max(align_up(io_memory, 4096), 65536)` (glommio 0.9 `sys/uring.rs`). [`ArenaAllocator`]
//! recognises exactly that request while a thread-local request is armed around
//! `LocalExecutorBuilder::make()` on the shard thread, and serves it from an `mmap` of our choosing.
//! Every other allocation goes to [`System`] untouched.
//!
//! `make()` pins the thread before the reactor allocates, so the pre-fault below (first touch)
//! makes the arena NUMA-local to the shard's CPU.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Size of one huge page (PMD size on x86-64 and arm64 with 4 KiB base pages). An arena smaller
/// than one huge page gains nothing from hugepages, so the hook only serves requests of at least
/// this size, and every mapping is rounded up to it.
pub const HUGE_PAGE: usize = 2 << 20;

/// Base page size; also the alignment glommio asks for (`Layout::from_size_align(size, 4096)`).
pub(crate) const PAGE: usize = 4096;

/// How many hook mappings may be alive at once (one per shard). Fixed so that the allocator never
/// allocates; 1024 shards is far beyond any machine we run on.
const REGISTRY_SLOTS: usize = 1024;

/// Slot value meaning "claimed, mapping in progress".
const SLOT_CLAIMED: usize = 1;

/// How the shard arenas should be backed. See `docs/buffer-pool.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugepageMode {
    /// Explicit hugetlb pages if reserved, else transparent hugepages (`madvise`), else 4 KiB
    /// pages. Each fallback is logged with `warn!`.
    Auto,
    /// Explicit hugetlb pages or fail start-up.
    Require,
    /// 4 KiB pages (`MADV_NOHUGEPAGE`), for comparisons.
    Off,
}

/// What actually backs a shard's arena, as verified after start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MemoryKind {
    /// Explicit hugetlb 2 MiB pages (`MAP_HUGETLB`), checked in `/proc/self/smaps`.
    Hugetlb = 1,
    /// Transparent hugepages (`MADV_HUGEPAGE`); at least part of the arena is huge in smaps.
    Thp = 2,
    /// Anonymous 4 KiB pages, pre-faulted.
    Normal = 3,
    /// glommio's own heap allocation: every `mmap` failed.
    Heap = 4,
    /// glommio's own heap allocation: the program did not declare [`ArenaAllocator`] as its
    /// `#[global_allocator]`, so the request was never seen. Not pre-faulted, not hugepages.
    HeapNoHook = 5,
}

impl MemoryKind {
    pub(crate) fn from_u8(v: u8) -> Option<MemoryKind> {
        Some(match v {
            1 => MemoryKind::Hugetlb,
            2 => MemoryKind::Thp,
            3 => MemoryKind::Normal,
            4 => MemoryKind::Heap,
            5 => MemoryKind::HeapNoHook,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryKind::Hugetlb => "hugetlb",
            MemoryKind::Thp => "THP",
            MemoryKind::Normal => "normal",
            MemoryKind::Heap => "Heap (mmap failed)",
            MemoryKind::HeapNoHook => "Heap (allocator hook not installed)",
        })
    }
}

/// The mapping strategy the hook used (before verification in smaps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    Hugetlb,
    ThpAdvised,
    Plain,
    Heap,
}

#[derive(Clone, Copy, Debug)]
struct ArenaRequest {
    size: usize,
    mode: HugepageMode,
}

/// What the hook did with the armed request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ArenaGrant {
    /// Start of the arena (what glommio got).
    pub addr: usize,
    /// Bytes glommio asked for.
    pub size: usize,
    pub backing: Backing,
    /// Time spent touching every page.
    pub prefault: Duration,
    /// errno of the failed `MAP_HUGETLB` mmap, 0 if not tried or it worked.
    pub hugetlb_errno: i32,
    /// errno of a failed `madvise(MADV_HUGEPAGE)` or THP mmap, 0 if not tried or it worked.
    pub thp_errno: i32,
}

/// Outcome of [`with_arena_request`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum ArenaOutcome {
    Granted(ArenaGrant),
    /// The request was never consumed: the hook is not the global allocator.
    NotConsumed,
}

thread_local! {
    // Const-initialised `Cell`s of `Copy` types: no lazy init, no destructor, so they are safe to
    // touch from inside the global allocator.
    static REQUEST: Cell<Option<ArenaRequest>> = const { Cell::new(None) };
    static GRANT: Cell<Option<ArenaGrant>> = const { Cell::new(None) };
}

/// Live hook mappings: (address, mapped length). Invariant: an address is in here exactly while
/// its mapping is alive; `SLOT_CLAIMED` marks a slot being filled.
static REGISTRY: [(AtomicUsize, AtomicUsize); REGISTRY_SLOTS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; REGISTRY_SLOTS];
/// Number of live mappings, so ordinary deallocations skip the registry scan.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` (which calls `LocalExecutorBuilder::make()`) with the arena request armed on this
/// thread, and reports what the hook did with it.
pub(crate) fn with_arena_request<R>(
    arena_size: usize,
    mode: HugepageMode,
    f: impl FnOnce() -> R,
) -> (R, ArenaOutcome) {
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            REQUEST.with(|r| r.set(None));
        }
    }
    // glommio's exact request size; see the module docs.
    let size = std::cmp::max(arena_size.next_multiple_of(PAGE), 65536);
    GRANT.with(|g| g.set(None));
    REQUEST.with(|r| r.set(Some(ArenaRequest { size, mode })));
    let guard = Disarm;
    let out = f();
    let unconsumed = REQUEST.with(|r| r.take()).is_some();
    drop(guard);
    let grant = GRANT.with(|g| g.take());
    let outcome = match grant {
        Some(g) if !unconsumed => ArenaOutcome::Granted(g),
        _ => ArenaOutcome::NotConsumed,
    };
    (out, outcome)
}

/// `#[global_allocator]` wrapper around [`System`] that serves glommio's I/O arena from
/// hugepages. Declare it in the binary (and in each test binary that starts shards):
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: mount_vfs_executors::ArenaAllocator = mount_vfs_executors::ArenaAllocator;
/// ```
///
/// Without it shards still start; their arenas are reported as
/// [`MemoryKind::HeapNoHook`].
pub struct ArenaAllocator;

impl ArenaAllocator {
    /// Takes the armed request if `layout` is exactly glommio's arena request.
    #[inline]
    fn take_request(layout: Layout) -> Option<ArenaRequest> {
        if layout.align() != PAGE || layout.size() < HUGE_PAGE {
            return None;
        }
        REQUEST
            .try_with(|r| match r.get() {
                Some(req) if req.size == layout.size() => r.take(),
                _ => None,
            })
            .ok()
            .flatten()
    }

    /// Serves the arena: maps it, pre-faults it and records the grant. Never allocates.
    fn serve(req: ArenaRequest, layout: Layout) -> *mut u8 {
        let mut grant = ArenaGrant {
            addr: 0,
            size: req.size,
            backing: Backing::Heap,
            prefault: Duration::ZERO,
            hugetlb_errno: 0,
            thp_errno: 0,
        };
        let map_len = req.size.next_multiple_of(HUGE_PAGE);
        let mapped = claim_slot().and_then(|slot| {
            let m = map_arena(req.mode, map_len, &mut grant);
            match m {
                Some(addr) => {
                    REGISTRY[slot].1.store(map_len, Ordering::Release);
                    REGISTRY[slot].0.store(addr as usize, Ordering::Release);
                    LIVE.fetch_add(1, Ordering::AcqRel);
                }
                None => REGISTRY[slot].0.store(0, Ordering::Release),
            }
            m
        });
        let p = match mapped {
            Some(addr) => {
                let step = if grant.backing == Backing::Hugetlb {
                    HUGE_PAGE
                } else {
                    PAGE
                };
                let start = Instant::now();
                for off in (0..map_len).step_by(step) {
                    // SAFETY: `addr..addr + map_len` is a fresh private writable mapping we own;
                    // it is zero-filled, so writing 0 changes nothing but faults the page in.
                    unsafe { addr.add(off).write_volatile(0) };
                }
                grant.prefault = start.elapsed();
                addr
            }
            None => {
                grant.backing = Backing::Heap;
                // SAFETY: `layout` has non-zero size (>= HUGE_PAGE), as `GlobalAlloc::alloc`
                // requires.
                unsafe { System.alloc(layout) }
            }
        };
        grant.addr = p as usize;
        let _ = GRANT.try_with(|g| g.set(Some(grant)));
        p
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Claims a registry slot, or `None` if all are taken (the arena then stays on the heap).
fn claim_slot() -> Option<usize> {
    REGISTRY.iter().position(|(addr, _)| {
        addr.compare_exchange(0, SLOT_CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// Anonymous private mmap; `None` on failure.
fn mmap_anon(len: usize, extra_flags: i32) -> Option<*mut u8> {
    // SAFETY: anonymous mapping at a kernel-chosen address; touches no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

/// Maps `len` bytes (a multiple of `HUGE_PAGE`) following `mode`'s fallback chain.
fn map_arena(mode: HugepageMode, len: usize, grant: &mut ArenaGrant) -> Option<*mut u8> {
    if mode != HugepageMode::Off {
        // MAP_HUGE_2MB: ask for 2 MiB pages even where the default hugepage size is 1 GiB.
        // Private hugetlb mappings reserve their pages at mmap time, so a short pool fails here
        // (ENOMEM) instead of SIGBUS at first touch.
        match mmap_anon(len, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB) {
            Some(p) => {
                grant.backing = Backing::Hugetlb;
                return Some(p);
            }
            None => grant.hugetlb_errno = errno(),
        }
        if mode == HugepageMode::Require {
            return None;
        }
        // THP: over-map by one huge page, trim to a 2 MiB-aligned window so every PMD of the
        // arena can be a huge page.
        if let Some(raw) = mmap_anon(len + HUGE_PAGE, 0) {
            let raw_addr = raw as usize;
            let aligned = raw_addr.next_multiple_of(HUGE_PAGE);
            let head = aligned - raw_addr;
            let tail = HUGE_PAGE - head;
            // SAFETY: head and tail lie inside the mapping we just created and nothing uses
            // them; the remaining window `aligned..aligned + len` stays mapped.
            unsafe {
                if head > 0 {
                    libc::munmap(raw.cast(), head);
                }
                if tail > 0 {
                    libc::munmap((aligned + len) as *mut libc::c_void, tail);
                }
            }
            // SAFETY: advice on our own fresh mapping.
            let rc =
                unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
            if rc == 0 {
                grant.backing = Backing::ThpAdvised;
            } else {
                grant.thp_errno = errno();
                grant.backing = Backing::Plain;
            }
            return Some(aligned as *mut u8);
        }
        grant.thp_errno = errno();
    }
    let p = mmap_anon(len, 0)?;
    if mode == HugepageMode::Off {
        // Keep `Off` honest when THP is "always": 4 KiB pages only.
        // SAFETY: advice on our own fresh mapping.
        unsafe { libc::madvise(p.cast(), len, libc::MADV_NOHUGEPAGE) };
    }
    grant.backing = Backing::Plain;
    Some(p)
}

/// Unmaps `ptr` if it is a live hook mapping; returns whether it was.
fn release_mapping(ptr: *mut u8) -> bool {
    if LIVE.load(Ordering::Acquire) == 0 {
        return false;
    }
    let addr = ptr as usize;
    for (a, len) in REGISTRY.iter() {
        if a.load(Ordering::Acquire) == addr {
            let len = len.load(Ordering::Acquire);
            // SAFETY: the registry holds exactly the live mappings we created with this length;
            // the caller (dealloc) owns the allocation and gives it up.
            unsafe { libc::munmap(ptr.cast(), len) };
            a.store(0, Ordering::Release);
            LIVE.fetch_sub(1, Ordering::AcqRel);
            return true;
        }
    }
    false
}

// SAFETY: every allocation is either delegated to `System` unchanged or is a fresh mapping of at
// least `layout.size()` bytes aligned to 2 MiB (or 4 KiB for the plain fallback), which satisfies
// `layout.align() == 4096`. Mappings are only released by `dealloc`/`realloc` for the pointer
// they were returned for, and the registry tells them apart from `System` pointers.
unsafe impl GlobalAlloc for ArenaAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::take_request(layout) {
            Some(req) => Self::serve(req, layout),
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::take_request(layout) {
            // Fresh anonymous mappings are zero-filled; the heap fallback in `serve` is not, so
            // only hand out a mapping here.
            Some(req) => {
                let p = Self::serve(req, layout);
                if !p.is_null() && !is_mapping(p) {
                    // SAFETY: `p` is valid for `layout.size()` bytes (System allocation).
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() == PAGE && layout.size() >= HUGE_PAGE && release_mapping(ptr) {
            return;
        }
        // SAFETY: not ours, so it came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() == PAGE && layout.size() >= HUGE_PAGE && is_mapping(ptr) {
            // SAFETY: caller guarantees `new_size` and alignment form a valid layout.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // SAFETY: `new_layout` has non-zero size (GlobalAlloc::realloc contract).
            let new = unsafe { System.alloc(new_layout) };
            if !new.is_null() {
                // SAFETY: both regions are valid for the copied length and do not overlap.
                unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                release_mapping(ptr);
            }
            return new;
        }
        // SAFETY: not ours, forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn is_mapping(ptr: *mut u8) -> bool {
    LIVE.load(Ordering::Acquire) != 0
        && REGISTRY
            .iter()
            .any(|(a, _)| a.load(Ordering::Acquire) == ptr as usize)
}
