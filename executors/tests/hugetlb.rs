//! Explicit hugetlb backing. Reserves pages through /proc/sys/vm/nr_hugepages (root) and puts
//! the old value back afterwards, even on panic. Tests here change a system-wide setting, so
//! they serialise on `SYSTEM`; no other test binary reserves hugepages.

mod common;
#[path = "../../tests/support/skip.rs"]
mod skip;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{config, run_on, start_jobs, MIB};
use mount_vfs_executors::{smaps_entry, ArenaAllocator, HugepageMode, MemoryKind, HUGE_PAGE};
use skip::skip_or_fail;

#[global_allocator]
static ALLOC: ArenaAllocator = ArenaAllocator;

static SYSTEM: Mutex<()> = Mutex::new(());

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_u64(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Waits (up to 5 s) until `HugePages_Free` is back to `free`.
fn wait_for_free_hugepages(free: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while meminfo("HugePages_Free:") < free && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restores nr_hugepages on drop.
struct Reserved {
    old: u64,
}

impl Reserved {
    /// Reserves `extra` more 2 MiB pages, or `None` (with a loud message) if the kernel refuses.
    fn extra(test: &str, extra: u64) -> Option<Reserved> {
        let old = read_u64(NR_HUGEPAGES);
        let guard = Reserved { old };
        if let Err(e) = std::fs::write(NR_HUGEPAGES, (old + extra).to_string()) {
            skip_or_fail(
                test,
                &format!("cannot write {NR_HUGEPAGES} ({e}); run as root to test hugetlb"),
            );
            return None;
        }
        let now = read_u64(NR_HUGEPAGES);
        if now < old + extra {
            skip_or_fail(
                test,
                &format!(
                    "the kernel reserved only {now} of {} hugepages (memory fragmented?)",
                    old + extra
                ),
            );
            return None;
        }
        Some(guard)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, self.old.to_string()) {
            eprintln!("FAILED to restore {NR_HUGEPAGES} to {}: {e}", self.old);
        }
    }
}

#[test]
fn require_gets_hugetlb_arenas_and_gives_the_pages_back() {
    let _serial = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let shards_n = glommio::CpuSet::online().unwrap().len().min(2);
    let arena = 16 * MIB;
    let Some(_reserved) = Reserved::extra(
        "require_gets_hugetlb_arenas_and_gives_the_pages_back",
        (shards_n * arena / HUGE_PAGE) as u64,
    ) else {
        return;
    };
    let free_before = meminfo("HugePages_Free:");
    for mode in [HugepageMode::Require, HugepageMode::Auto] {
        let shards = start_jobs(&config(shards_n, arena, mode)).unwrap();
        assert!(meminfo("HugePages_Free:") <= free_before - (shards_n * arena / HUGE_PAGE) as u64);
        for s in 0..shards_n {
            let (kind, smaps, registered) = run_on(&shards, s, |ctx| async move {
                let b = ctx.pool.try_alloc(ctx.pool.max_alloc()).unwrap();
                let smaps = smaps_entry(b.as_ptr() as usize).unwrap();
                (ctx.pool.memory_kind(), smaps, b.is_registered())
            });
            assert_eq!(kind, MemoryKind::Hugetlb, "{mode:?}");
            assert_eq!(smaps.kernel_page_size, 2048 * 1024, "{smaps:?}");
            assert_eq!(smaps.private_hugetlb, arena, "not pre-faulted: {smaps:?}");
            assert!(registered);
        }
        shards.shutdown().unwrap();
        // dealloc recognised the mapping and unmapped it. The pages come back a little later:
        // io_uring tears rings down in a kernel worker, and registration pins them until then.
        wait_for_free_hugepages(free_before);
        assert_eq!(meminfo("HugePages_Free:"), free_before, "{mode:?}");
    }
}

/// Start-up cost of a 1 GiB arena per backing. Run with
/// `cargo test -p mount_vfs_executors --test hugetlb -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; reserves 1 GiB of hugepages"]
fn measure_prefault_1gib() {
    let _serial = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let arena = 1 << 30;
    for mode in [HugepageMode::Require, HugepageMode::Auto, HugepageMode::Off] {
        let reserved = match mode {
            HugepageMode::Require => {
                match Reserved::extra("measure_prefault_1gib", (arena / HUGE_PAGE) as u64) {
                    Some(r) => Some(r),
                    None => continue,
                }
            }
            _ => None,
        };
        for round in 0..3 {
            wait_for_free_hugepages(meminfo("HugePages_Total:"));
            let t = Instant::now();
            let shards = start_jobs(&config(1, arena, mode)).unwrap();
            let start = t.elapsed();
            let (kind, prefault, registered) = run_on(&shards, 0, |ctx| async move {
                (
                    ctx.pool.memory_kind(),
                    ctx.pool.prefault_time(),
                    ctx.pool.registered(),
                )
            });
            let t = Instant::now();
            shards.shutdown().unwrap();
            eprintln!(
                "1 GiB {mode:?} round {round}: {kind}, registered {registered}, pre-fault {:.1} ms, \
                 start {:.1} ms, shutdown {:.1} ms",
                prefault.as_secs_f64() * 1e3,
                start.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        drop(reserved);
    }
}
