//! The point of the pre-faulted pool: filling its buffers costs no page faults.

mod common;

use common::{config, run_on, start_jobs, MIB};
use mount_vfs_executors::{minor_faults_and_cpu_time, ArenaAllocator, HugepageMode};

#[global_allocator]
static ALLOC: ArenaAllocator = ArenaAllocator;

#[test]
fn filling_pool_buffers_takes_no_page_faults() {
    const TOTAL: usize = 32 * MIB;
    for mode in [HugepageMode::Auto, HugepageMode::Off] {
        let shards = start_jobs(&config(1, 64 * MIB, mode)).unwrap();
        let (pool_faults, kind) = run_on(&shards, 0, |ctx| async move {
            let (f0, _) = minor_faults_and_cpu_time();
            let mut bufs = Vec::with_capacity(TOTAL / MIB);
            for i in 0..TOTAL / MIB {
                let mut b = ctx.pool.alloc(MIB).await.unwrap();
                b.fill(i as u8);
                bufs.push(b);
            }
            let (f1, _) = minor_faults_and_cpu_time();
            (f1 - f0, ctx.pool.memory_kind())
        });
        shards.shutdown().unwrap();

        let (f0, _) = minor_faults_and_cpu_time();
        let mut v = vec![0u8; TOTAL];
        v.fill(1);
        std::hint::black_box(&v);
        let (f1, _) = minor_faults_and_cpu_time();
        let heap_faults = f1 - f0;
        eprintln!(
            "{mode:?} ({kind}): {pool_faults} faults filling {} MiB of pool buffers; \
             {heap_faults} filling a fresh Vec",
            TOTAL >> 20
        );
        // Process-wide counter: leave room for the test harness's own faults.
        assert!(pool_faults < 64, "{pool_faults} faults");
        assert!(heap_faults > 4 * pool_faults);
    }
}
