//! Shards on real pinned `LocalExecutor`s, with the allocator hook installed.

mod common;
#[path = "../../tests/support/skip.rs"]
mod skip;

use std::collections::HashSet;
use std::time::Duration;

use common::{config, current_cpu, run_on, start_jobs, MIB};
use glommio::io::OpenOptions;
use mount_vfs_executors::{
    smaps_entry, ArenaAllocator, HugepageMode, MemoryKind, ShardFailureCause, Shards, StartError,
    HUGE_PAGE,
};
use skip::skip_or_fail;

#[global_allocator]
static ALLOC: ArenaAllocator = ArenaAllocator;

fn online_cpus() -> usize {
    glommio::CpuSet::online().unwrap().len()
}

fn nr_hugepages() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map(|s| s.trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

fn thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| !s.contains("[never]"))
        .unwrap_or(false)
}

enum Msg {
    WhereAreYou(flume::Sender<(usize, usize, usize)>),
    Relay {
        to: usize,
        reply: flume::Sender<(usize, usize, usize)>,
    },
    Panic,
}

fn start_routing(n: usize) -> Shards<Msg> {
    common::init_logging();
    Shards::start(
        &config(n, 4 * MIB, HugepageMode::Auto),
        |ctx, mailbox| async move {
            while let Some(msg) = mailbox.recv().await {
                match msg {
                    Msg::WhereAreYou(reply) => {
                        let _ = reply.send((ctx.id, ctx.cpu, current_cpu()));
                    }
                    Msg::Relay { to, reply } => {
                        ctx.peers[to].send(Msg::WhereAreYou(reply)).unwrap();
                    }
                    Msg::Panic => panic!("shard {} was told to panic", ctx.id),
                }
            }
        },
    )
    .unwrap()
}

#[test]
fn shards_are_pinned_on_distinct_cpus_and_messages_route() {
    let n = online_cpus();
    let shards = start_routing(n);
    assert_eq!(shards.len(), n);
    let (tx, rx) = flume::unbounded();
    // From a plain thread to each shard.
    let mut cpus = HashSet::new();
    for s in 0..n {
        shards.sender(s).send(Msg::WhereAreYou(tx.clone())).unwrap();
        let (id, cpu, running_on) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(id, s);
        assert_eq!(cpu, running_on, "shard {s} not running on its pinned CPU");
        assert_eq!(cpu, shards.cpu(s).cpu);
        cpus.insert(cpu);
    }
    assert_eq!(cpus.len(), n, "shards share CPUs");
    // Shard to shard: ask shard 0 to forward to the last shard.
    let sender = shards.sender(0).clone();
    std::thread::spawn(move || {
        sender
            .send(Msg::Relay {
                to: n - 1,
                reply: tx,
            })
            .unwrap()
    })
    .join()
    .unwrap();
    let (id, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(id, n - 1);
    shards.shutdown().unwrap();
}

#[test]
fn panicking_body_is_reported_and_shutdown_does_not_hang() {
    let shards = start_routing(1);
    let sender = shards.sender(0).clone();
    sender.send(Msg::Panic).unwrap();
    // The thread dies; later sends fail instead of queueing forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sender.send(Msg::Panic).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "shard still accepting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = shards.shutdown().unwrap_err();
    assert_eq!(err.panicked.len(), 1);
    assert_eq!(err.panicked[0].0, 0);
    assert!(err.panicked[0].1.contains("told to panic"), "{err}");
}

#[test]
fn shutdown_drains_queued_messages_then_joins() {
    common::init_logging();
    let (tx, rx) = flume::unbounded();
    let shards: Shards<u32> = Shards::start(
        &config(1, 4 * MIB, HugepageMode::Auto),
        move |_, mailbox| {
            let tx = tx.clone();
            async move {
                let mut sum = 0;
                while let Some(v) = mailbox.recv().await {
                    sum += v;
                }
                tx.send(sum).unwrap();
            }
        },
    )
    .unwrap();
    let sender = shards.sender(0).clone();
    for v in 1..=100 {
        sender.send(v).unwrap();
    }
    shards.shutdown().unwrap();
    assert_eq!(rx.recv().unwrap(), 5050);
    assert!(sender.send(1).is_err(), "send after shutdown must fail");
}

#[test]
fn config_errors_are_clear() {
    let too_many = start_jobs(&config(online_cpus() + 1, 4 * MIB, HugepageMode::Auto));
    assert!(matches!(too_many, Err(StartError::TooManyShards { .. })));
    let zero = start_jobs(&config(0, 4 * MIB, HugepageMode::Auto));
    assert!(matches!(zero, Err(StartError::Config(_))));
    let huge = start_jobs(&config(1, 2 << 30, HugepageMode::Auto));
    assert!(matches!(huge, Err(StartError::Config(_))));
}

#[test]
fn require_without_reserved_hugepages_fails_naming_the_shard() {
    if nr_hugepages() != 0 {
        let test = "require_without_reserved_hugepages_fails_naming_the_shard";
        return skip_or_fail(test, "hugepages are reserved on this machine");
    }
    let err = start_jobs(&config(
        2.min(online_cpus()),
        4 * MIB,
        HugepageMode::Require,
    ))
    .unwrap_err();
    let StartError::Shards(failures) = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(failures[0].shard, 0);
    assert!(matches!(
        failures[0].cause,
        ShardFailureCause::HugepagesUnavailable { .. }
    ));
    eprintln!("{err}");
}

#[test]
fn off_gives_normal_pages() {
    let shards = start_jobs(&config(1, 8 * MIB, HugepageMode::Off)).unwrap();
    let (kind, smaps) = run_on(&shards, 0, |ctx| async move {
        let buf = ctx.pool.try_alloc(4096).unwrap();
        (
            ctx.pool.memory_kind(),
            smaps_entry(buf.as_ptr() as usize).unwrap(),
        )
    });
    assert_eq!(kind, MemoryKind::Normal);
    assert_eq!(smaps.kernel_page_size, 4096);
    assert_eq!(smaps.anon_huge, 0);
    assert!(smaps.rss >= 8 * MIB, "not pre-faulted: {smaps:?}");
    assert_eq!(
        shards.stats()[0].snapshot().memory_kind,
        Some(MemoryKind::Normal)
    );
    shards.shutdown().unwrap();
}

#[test]
fn auto_falls_back_to_thp_when_no_hugetlb_pages() {
    if nr_hugepages() != 0 || !thp_enabled() {
        let test = "auto_falls_back_to_thp_when_no_hugetlb_pages";
        return skip_or_fail(test, "needs nr_hugepages = 0 and THP not 'never'");
    }
    let shards = start_jobs(&config(1, 16 * MIB, HugepageMode::Auto)).unwrap();
    let (kind, smaps) = run_on(&shards, 0, |ctx| async move {
        let buf = ctx.pool.try_alloc(4096).unwrap();
        (
            ctx.pool.memory_kind(),
            smaps_entry(buf.as_ptr() as usize).unwrap(),
        )
    });
    assert_eq!(kind, MemoryKind::Thp);
    assert_eq!(smaps.start % HUGE_PAGE, 0);
    assert!(smaps.anon_huge >= 8 * MIB, "{smaps:?}");
    shards.shutdown().unwrap();
}

#[test]
fn pool_fills_to_capacity_registered_then_refuses() {
    let shards = start_jobs(&config(1, 16 * MIB, HugepageMode::Auto)).unwrap();
    run_on(&shards, 0, |ctx| async move {
        let pool = &ctx.pool;
        assert!(pool.registered());
        assert_eq!(pool.capacity(), 16 * MIB - 4096);
        assert_eq!(pool.max_alloc(), 8 * MIB);
        // The buddy's free blocks are 8M, 4M, ..., 4K: take each once.
        let mut bufs = Vec::new();
        let mut size = pool.max_alloc();
        while size >= 4096 {
            let buf = pool.try_alloc(size).expect("within capacity");
            assert!(buf.is_registered(), "{buf:?} not in the registered arena");
            assert_eq!(buf.len(), size);
            bufs.push(buf);
            size /= 2;
        }
        assert_eq!(pool.in_use(), pool.capacity());
        assert!(pool.try_alloc(1).is_none());
        // glommio itself would now fall back to the heap: the accounting is exact.
        let heap = glommio::allocate_dma_buffer(4096);
        assert!(!pool.is_registered(heap.as_bytes()));
        drop(heap);
        // Odd sizes are counted in glommio's rounded size.
        drop(bufs.pop());
        let odd = pool.try_alloc(100).unwrap();
        assert_eq!(pool.in_use(), pool.capacity());
        drop(odd);
        assert!(pool.alloc(pool.max_alloc() + 1).await.is_err());
        let stats = pool.stats().snapshot();
        assert_eq!(stats.high_water, pool.capacity());
        assert_eq!(stats.heap_fallbacks, 0);
        assert!(stats.registered);
    });
    assert_eq!(shards.stats()[0].snapshot().in_use, 0);
    shards.shutdown().unwrap();
}

#[test]
fn alloc_waits_fifo_and_resumes_when_a_buffer_is_dropped() {
    let shards = start_jobs(&config(1, 16 * MIB, HugepageMode::Auto)).unwrap();
    run_on(&shards, 0, |ctx| async move {
        let pool = ctx.pool.clone();
        let big = pool.try_alloc(8 * MIB).unwrap();
        let mid = pool.try_alloc(4 * MIB).unwrap();
        let small = pool.try_alloc(2 * MIB).unwrap();
        // 2 MiB left minus a leaf: a 4 MiB request must wait.
        let p = pool.clone();
        let waiter = glommio::spawn_local(async move {
            let b = p.alloc(4 * MIB).await.unwrap();
            (b.is_registered(), b.len())
        });
        glommio::timer::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.stats().snapshot().waits, 1);
        // Fairness: while a request waits, nobody overtakes it, even if they would fit.
        assert!(pool.try_alloc(4096).is_none());
        drop(small); // 2 MiB back: still not enough for 4 MiB.
        glommio::timer::sleep(Duration::from_millis(20)).await;
        assert!(pool.in_use() < 14 * MIB);
        drop(mid); // now it fits.
        let (registered, len) = waiter.await;
        assert!(registered);
        assert_eq!(len, 4 * MIB);
        drop(big);
        // A cancelled waiter gives its place back.
        let all = pool.try_alloc(8 * MIB).unwrap();
        let p = pool.clone();
        let cancelled = glommio::spawn_local(async move { p.alloc(8 * MIB).await.map(|_| ()) });
        glommio::timer::sleep(Duration::from_millis(10)).await;
        drop(cancelled); // dropping a glommio Task cancels it
        glommio::timer::sleep(Duration::from_millis(10)).await;
        drop(all);
        assert!(pool.try_alloc(8 * MIB).is_some());
    });
    assert_eq!(shards.stats()[0].snapshot().in_use, 0);
    shards.shutdown().unwrap();
}

/// On a real disk (ext4 here: O_DIRECT) and on tmpfs (glommio turns O_DIRECT off).
#[test]
fn buffers_are_zero_copy_writable_and_dma_reads_run_under_a_reservation() {
    dma_roundtrip(std::env::temp_dir());
    if std::path::Path::new("/dev/shm").is_dir() {
        dma_roundtrip("/dev/shm".into());
    } else {
        let test = "buffers_are_zero_copy_writable_and_dma_reads_run_under_a_reservation";
        skip_or_fail(test, "no /dev/shm for the tmpfs case");
    }
}

fn dma_roundtrip(root: std::path::PathBuf) {
    let dir = root.join(format!("mount_vfs_exec_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data");
    // Not empty at the first DmaFile open: glommio probes IOPOLL support (once per device and
    // shard thread) with a 4 KiB read at offset 0; on an empty file that read hits EOF, the
    // probe wrongly reports "pollable", and every later read on the device fails with
    // EOPNOTSUPP (seen on this virtio disk).
    std::fs::write(&path, vec![0u8; MIB]).unwrap();
    let shards = start_jobs(&config(1, 16 * MIB, HugepageMode::Auto)).unwrap();
    let p = path.clone();
    run_on(&shards, 0, |ctx| async move {
        let pool = &ctx.pool;
        let mut buf = pool.alloc(MIB).await.unwrap();
        let addr = buf.as_ptr();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // The DmaBuffer is the same memory we wrote: no copy in between.
        assert_eq!(buf.dma().as_ptr(), addr);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&p)
            .await
            .unwrap();
        let (dma, held) = buf.into_parts();
        assert_eq!(file.write_at(dma, 0).await.unwrap(), MIB);
        drop(held);
        assert_eq!(pool.in_use(), 0);
        // An unaligned read: glommio widens it to the O_DIRECT alignment; reserve exactly that.
        let (pos, len) = (4096 + 100, 64 * 1024);
        let reservation = pool.reserve_read(&file, pos, len).await.unwrap();
        assert!(reservation.bytes() >= len);
        assert_eq!(pool.in_use(), reservation.bytes());
        let data = file.read_at(pos, len).await.unwrap();
        assert!(
            reservation.check(&data),
            "read buffer fell back to the heap"
        );
        assert!(pool.is_registered(&data));
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((pos as usize + i) % 251) as u8));
        drop(data);
        drop(reservation);
        file.close().await.unwrap();
    });
    shards.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stats_are_readable_from_other_threads() {
    let shards = start_jobs(&config(1, 4 * MIB, HugepageMode::Auto)).unwrap();
    let stats = shards.stats()[0].clone();
    let before = std::thread::spawn(move || stats.snapshot()).join().unwrap();
    assert_eq!(before.capacity, 4 * MIB - 4096);
    assert!(before.registered);
    let held = run_on(&shards, 0, |ctx| async move {
        let b = ctx.pool.try_alloc(MIB).unwrap();
        let s = ctx.pool.stats().snapshot();
        drop(b);
        s
    });
    assert_eq!(held.in_use, MIB);
    assert_eq!(held.allocs, before.allocs + 1);
    shards.shutdown().unwrap();
}
