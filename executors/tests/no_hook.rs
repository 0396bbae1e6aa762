//! Without `ArenaAllocator` as the global allocator shards still work; the arena is reported as
//! heap memory and registration is still verified through fdinfo.

mod common;

use common::{config, run_on, start_jobs, MIB};
use mount_vfs_executors::{HugepageMode, MemoryKind, ShardFailureCause, StartError};

#[test]
fn without_the_hook_the_arena_is_heap_but_registered() {
    let shards = start_jobs(&config(1, 4 * MIB, HugepageMode::Auto)).unwrap();
    let (kind, registered, buf_registered) = run_on(&shards, 0, |ctx| async move {
        let b = ctx.pool.try_alloc(MIB).unwrap();
        (
            ctx.pool.memory_kind(),
            ctx.pool.registered(),
            b.is_registered(),
        )
    });
    assert_eq!(kind, MemoryKind::HeapNoHook);
    assert_eq!(kind.to_string(), "Heap (allocator hook not installed)");
    assert!(registered);
    // The arena's range came from /proc/self/fdinfo, so buffers can still be checked.
    assert!(buf_registered);
    shards.shutdown().unwrap();

    let err = start_jobs(&config(1, 4 * MIB, HugepageMode::Require)).unwrap_err();
    let StartError::Shards(f) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(&f[0].cause, ShardFailureCause::HugepagesUnavailable { detail, .. } if detail.contains("global_allocator")),
        "{err}"
    );
}
