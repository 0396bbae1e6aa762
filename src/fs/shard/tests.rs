//! The shard file service without a kernel or a server: requests with capturing replies, served
//! from an in-memory store, with faults injected on a fixed schedule.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mount_vfs_executors::BufferPool;

use super::cache::Asker;
use super::{
    FileService, PrefetchItem, ServiceParts, ShardCounters, ShardRequest, VerifyMode, VerifyPolicy,
};
use crate::fs::request::{Open, Read, Release};
use crate::fs::testing::{capture, namespace, on_shard, pattern};
use crate::fs::FsError;
use crate::manifest::Hash;
use crate::namespace::{Ino, Namespace, ROOT_INO};
use crate::store::{
    Fault, FaultStore, MemoryObjects, MemoryStore, ObjectStore, Spill, SpillConfig, When,
};

const MIB: usize = 1 << 20;
/// Test blocks are 1 MiB (`--part-size` minimum).
const BLOCK: u64 = MIB as u64;

fn service(
    pool: BufferPool,
    namespace: Arc<Namespace>,
    store: Rc<dyn ObjectStore>,
) -> Rc<FileService> {
    service_verifying(pool, namespace, store, VerifyMode::Object)
}

fn service_verifying(
    pool: BufferPool,
    namespace: Arc<Namespace>,
    store: Rc<dyn ObjectStore>,
    mode: VerifyMode,
) -> Rc<FileService> {
    service_with(pool, namespace, store, mode, BLOCK, None)
}

fn service_with(
    pool: BufferPool,
    namespace: Arc<Namespace>,
    store: Rc<dyn ObjectStore>,
    mode: VerifyMode,
    block_size: u64,
    spill: Option<Spill>,
) -> Rc<FileService> {
    FileService::new(ServiceParts {
        shard: 0,
        shards: 1,
        block_size,
        namespace,
        pool,
        store,
        disk_cache: None,
        spill,
        passthrough: Arc::new(AtomicBool::new(false)),
        counters: Arc::new(ShardCounters::default()),
        ops: Arc::default(),
        overlay: None,
        verify: VerifyPolicy::new(mode),
        trace: None,
    })
}

fn ino(namespace: &Namespace, name: &str) -> Ino {
    namespace.lookup(ROOT_INO, name.as_bytes()).expect(name)
}

async fn open(service: &Rc<FileService>, ino: Ino, flags: i32) -> u64 {
    try_open(service, ino, flags).await.unwrap()
}

async fn try_open(service: &Rc<FileService>, ino: Ino, flags: i32) -> Result<u64, FsError> {
    let (reply, answer) = capture::<(u64, bool)>();
    service
        .clone()
        .handle(ShardRequest::Open(Open {
            ino,
            flags,
            received: Instant::now(),
            reply,
        }))
        .await;
    let (fh, passthrough) = answer.try_recv().unwrap()?;
    assert!(!passthrough, "no disk cache: nothing to pass through");
    Ok(fh)
}

async fn read(
    service: &Rc<FileService>,
    ino: Ino,
    fh: u64,
    offset: u64,
    size: usize,
) -> Result<Vec<u8>, FsError> {
    let (reply, answer) = capture::<Vec<u8>>();
    let request = Read {
        ino,
        fh,
        offset,
        size: size as u32,
        received: Instant::now(),
        reply,
    };
    service
        .clone()
        .handle(ShardRequest::Read(request, None))
        .await;
    answer.try_recv().expect("every read is answered")
}

/// Lets detached tasks (read-ahead) run to completion.
async fn settle() {
    glommio::timer::sleep(Duration::from_millis(50)).await;
}

#[test]
fn a_matching_object_is_served_and_a_mismatch_is_eio_with_nothing_published() {
    let good = pattern(1, 3 * MIB + 5);
    let claimed = pattern(2, 2 * MIB);
    // `bad` is listed under the hash of `claimed`, but the store holds other bytes of that size.
    let ns = namespace(&[("good", &good), ("bad", &claimed)]);
    let objects: MemoryObjects = [
        (Hash::of(&good), Bytes::from(good.clone())),
        (Hash::of(&claimed), Bytes::from(pattern(3, 2 * MIB))),
    ]
    .into_iter()
    .collect();
    let (good_ino, bad_ino) = (ino(&ns, "good"), ino(&ns, "bad"));
    let bad_hash = Hash::of(&claimed);
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        let s = service(pool, ns, store.clone());
        let fh = open(&s, good_ino, libc::O_RDONLY).await;
        assert_eq!(read(&s, good_ino, fh, 0, 4 * MIB).await.unwrap(), good);
        assert_eq!(
            read(&s, good_ino, fh, 3 * BLOCK - 7, 100).await.unwrap(),
            good[3 * MIB - 7..3 * MIB + 5],
            "a read straddling blocks and the end of the file"
        );

        let fh = open(&s, bad_ino, libc::O_RDONLY).await;
        // Not at offset 0: a first read there counts as sequential and starts read-ahead.
        let error = read(&s, bad_ino, fh, 10, MIB).await.unwrap_err();
        assert_eq!(error, FsError::Corrupt);
        assert_eq!(error.errno(), libc::EIO);
        // Fetched twice (a flip in transit is told apart from corruption at rest), both refused.
        assert_eq!(store.reads_of(bad_hash), 4);
        assert_eq!(s.counters.snapshot().verify_failures, 2);
        assert!(!s.verification.is_verified(bad_hash));
        assert!((0..2).all(|block| s.cache.peek((bad_hash, block)).is_none()));
        assert!(s.verification.quarantined(bad_hash));
        // Quarantine does not stop a reader from trying again: fetched again, refused again.
        assert_eq!(read(&s, bad_ino, fh, 0, 10).await, Err(FsError::Corrupt));
        assert_eq!(store.reads_of(bad_hash), 8);
    });
}

#[test]
fn one_flip_in_transit_costs_one_more_fetch_not_the_read() {
    let data = pattern(4, 2 * MIB);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(FaultStore::new(Rc::new(MemoryStore::new(objects))));
        store.inject(When::Read(1), Fault::Flip(12345));
        let s = service(pool, ns, store.clone());
        let fh = open(&s, a, libc::O_RDONLY).await;
        assert_eq!(read(&s, a, fh, 0, 2 * MIB).await.unwrap(), data);
        assert_eq!(store.reads(), 4, "two blocks, streamed twice");
        assert_eq!(s.counters.snapshot().verify_failures, 1);
    });
}

#[test]
fn concurrent_readers_of_a_cold_object_share_one_fetch_per_block() {
    let data = pattern(5, 4 * MIB);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        let s = service(pool, ns, store.clone());
        let fh = open(&s, a, libc::O_RDONLY).await;
        let reads = (0..8u64).map(|i| read(&s, a, fh, (i % 4) * BLOCK + i, 1000));
        let results = futures::future::join_all(reads).await;
        for (i, result) in results.into_iter().enumerate() {
            let at = (i % 4) * MIB + i;
            assert_eq!(result.unwrap(), data[at..at + 1000], "reader {i}");
        }
        assert_eq!(store.reads_of(Hash::of(&data)), 4, "one fetch per block");
        assert_eq!(s.counters.snapshot().objects_verified, 1);
    });
}

#[test]
fn readahead_window_doubles_for_sequential_reads_and_resets_on_a_seek() {
    let data = pattern(6, 40 * MIB);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(64 << 20, move |pool| async move {
        let s = service(pool, ns, Rc::new(MemoryStore::new(objects)));
        // A 64 MiB pool caches about 48 MiB; read-ahead is capped at a quarter of that.
        let max = s.max_readahead_blocks();
        assert!((8..=12).contains(&max), "{max}");
        let fh = open(&s, a, libc::O_RDONLY).await;
        let mut windows = Vec::new();
        for i in 0..5u64 {
            let bytes = read(&s, a, fh, i * BLOCK, MIB).await.unwrap();
            assert_eq!(bytes, data[i as usize * MIB..(i as usize + 1) * MIB]);
            windows.push(s.readahead_window(fh).unwrap());
        }
        // The first read is sequential too (a reader starting at 0).
        assert_eq!(windows, [2, 4, 8, max, max]);
        read(&s, a, fh, 30 * BLOCK, MIB).await.unwrap();
        assert_eq!(s.readahead_window(fh), Some(1), "a seek starts over");
        settle().await;
    });
}

/// An 8 MiB pool caches 6 MiB and lets a verification keep 4 MiB: the other blocks of a 12 MiB
/// object are read again later, and checked against their digests from verification.
#[test]
fn blocks_read_again_must_match_their_verified_digest() {
    let data = pattern(7, 12 * MIB);
    let hash = Hash::of(&data);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(8 << 20, move |pool| async move {
        let store = Rc::new(FaultStore::new(Rc::new(MemoryStore::new(objects))));
        let s = service(pool, ns, store.clone());
        let fh = open(&s, a, libc::O_RDONLY).await;
        assert_eq!(read(&s, a, fh, 0, MIB).await.unwrap(), data[..MIB]);
        assert_eq!(
            store.reads(),
            12,
            "verification streamed the whole object once"
        );
        assert!(s.cache.peek((hash, 8)).is_none(), "block 8 was not kept");

        // The store now returns a changed byte: block 8 is fetched twice, then refused.
        store.inject(When::Always, Fault::Flip(77));
        let error = read(&s, a, fh, 8 * BLOCK, MIB).await.unwrap_err();
        assert_eq!(error, FsError::Corrupt);
        assert_eq!(store.reads(), 14);
        assert_eq!(s.counters.snapshot().verify_failures, 2);
        assert!(
            s.cache.peek((hash, 8)).is_none(),
            "nothing unverified is cached"
        );

        store.heal();
        let bytes = read(&s, a, fh, 8 * BLOCK + 3, MIB - 3).await.unwrap();
        assert_eq!(bytes, data[8 * MIB + 3..9 * MIB]);
    });
}

/// Without a disk cache, an object larger than the pool is fetched once: blocks read again come
/// from its spill file, and only while they keep their verified digests.
#[test]
fn a_spill_file_saves_the_second_fetch_and_is_checked_like_the_store() {
    let data = pattern(8, 12 * MIB);
    let hash = Hash::of(&data);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    let scratch = tempfile::tempdir().unwrap();
    let config = SpillConfig::at(scratch.path().to_path_buf(), 64 << 20).unwrap();
    on_shard(8 << 20, move |pool| async move {
        let store = Rc::new(FaultStore::new(Rc::new(MemoryStore::new(objects))));
        let spill = Some(Spill::new(&config));
        let s = service_with(pool, ns, store.clone(), VerifyMode::Object, BLOCK, spill);
        let fh = open(&s, a, libc::O_RDONLY).await;
        assert_eq!(read(&s, a, fh, 0, MIB).await.unwrap(), data[..MIB]);
        assert_eq!(store.reads(), 12, "verification streamed the object once");
        assert!(s.cache.peek((hash, 8)).is_none(), "block 8 was not kept");
        let kept = (0..12)
            .filter(|&i| s.cache.peek((hash, i)).is_some())
            .count();
        assert!(kept > 0, "the head was kept in memory");
        assert!(
            (3..8).contains(&kept),
            "blocks 0 to 2 kept, 8 and after spilled"
        );
        let spilled = (12 - kept) * MIB;
        assert_eq!(s.counters.snapshot().spill_bytes_written, spilled as u64);

        // Every block leaves memory (as other objects' loads would make it): the kept blocks
        // nobody read go to the spill file, and are not fetched again.
        s.make_room(s.pool.capacity());
        assert_eq!(
            read(&s, a, fh, BLOCK, MIB).await.unwrap(),
            data[MIB..2 * MIB]
        );
        assert_eq!(
            store.reads(),
            12,
            "block 1 came from memory on its way, or the file"
        );
        settle().await;
        let written = s.counters.snapshot().spill_bytes_written;
        assert_eq!(written, spilled as u64 + (kept as u64 - 1) * MIB as u64);
        // Read-ahead may have taken block 2 back on its way: out again, it is in the file.
        s.make_room(s.pool.capacity());
        let spill_read = s.counters.snapshot().spill_bytes_read;
        assert_eq!(
            read(&s, a, fh, 2 * BLOCK, MIB).await.unwrap(),
            data[2 * MIB..3 * MIB]
        );
        assert_eq!(store.reads(), 12, "unread block 2 came from the spill file");
        assert!(s.counters.snapshot().spill_bytes_read > spill_read);
        assert_eq!(read(&s, a, fh, 0, MIB).await.unwrap(), data[..MIB]);
        assert_eq!(
            store.reads(),
            13,
            "block 0 had been read: it left without a copy"
        );

        assert_eq!(
            read(&s, a, fh, 8 * BLOCK, MIB).await.unwrap(),
            data[8 * MIB..9 * MIB]
        );
        assert_eq!(store.reads(), 13, "block 8 came from the spill file");

        // A spill file whose bytes changed is dropped; the store serves the block.
        let fd = s.spill.as_ref().unwrap().raw_fd(hash);
        // Through a buffered descriptor of the same file: the spill file's own may be O_DIRECT.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", fd.expect("a spill file")))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"x", 9 * BLOCK).unwrap();
        assert_eq!(
            read(&s, a, fh, 9 * BLOCK, MIB).await.unwrap(),
            data[9 * MIB..10 * MIB]
        );
        assert_eq!(store.reads(), 14, "the changed block came from the store");
        let spill = s.spill.as_ref().unwrap();
        assert!(!spill.has(hash, 10), "the spill file was dropped");
        assert_eq!(s.counters.snapshot().verify_failures, 0);
    });
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "spill files have no name"
    );
}

/// Four readers of four 16 MiB objects through a 4 MiB pool: every verification and read waits
/// for memory instead of failing or deadlocking, and every byte arrives right.
#[test]
fn a_pool_far_smaller_than_the_objects_applies_backpressure() {
    let files: Vec<Vec<u8>> = (0..4).map(|i| pattern(10 + i, 16 * MIB)).collect();
    let names = ["a", "b", "c", "d"];
    let ns = namespace(
        &names
            .iter()
            .zip(&files)
            .map(|(n, f)| (*n, f.as_slice()))
            .collect::<Vec<_>>(),
    );
    let inos: Vec<Ino> = names.iter().map(|n| ino(&ns, n)).collect();
    let objects = MemoryObjects::of(files.clone());
    on_shard(4 << 20, move |pool| async move {
        let s = service(pool.clone(), ns, Rc::new(MemoryStore::new(objects)));
        let readers = inos.iter().zip(&files).map(|(&ino, file)| {
            let s = s.clone();
            async move {
                let fh = open(&s, ino, libc::O_RDONLY).await;
                for i in 0..16 {
                    let bytes = read(&s, ino, fh, i * BLOCK, MIB).await.unwrap();
                    assert!(bytes == file[i as usize * MIB..(i as usize + 1) * MIB]);
                }
            }
        });
        let all = futures::future::join_all(readers);
        glommio::timer::timeout(Duration::from_secs(120), async {
            all.await;
            Ok(())
        })
        .await
        .expect("readers finished (no deadlock on pool memory)");
        assert!(pool.in_use() <= pool.capacity());
        assert_eq!(s.counters.snapshot().objects_verified, 4);
        settle().await;
    });
}

/// A failed object is quarantined: read-ahead leaves it alone, readers still retry it.
#[test]
fn failed_objects_are_quarantined_from_readahead_but_retried_on_demand() {
    let data = pattern(8, 12 * MIB);
    let other = pattern(9, 12 * MIB);
    let hash = Hash::of(&data);
    let ns = namespace(&[("a", &data), ("b", &other)]);
    let objects = MemoryObjects::of([data.clone(), other.clone()]);
    let (a, b) = (ino(&ns, "a"), ino(&ns, "b"));
    on_shard(8 << 20, move |pool| async move {
        let store = Rc::new(FaultStore::new(Rc::new(MemoryStore::new(objects))));
        let s = service(pool, ns, store.clone());
        // Both verified; 4 MiB of each kept at most, so later blocks are read again.
        for ino in [a, b] {
            let fh = open(&s, ino, libc::O_RDONLY).await;
            read(&s, ino, fh, 0, 10).await.unwrap();
        }
        store.inject(When::Object(hash), Fault::Unavailable);
        let fh = open(&s, a, libc::O_RDONLY).await;
        let error = read(&s, a, fh, 10 * BLOCK, 10).await.unwrap_err();
        assert_eq!((error, error.errno()), (FsError::Store, libc::EIO));
        assert!(s.verification.quarantined(hash));
        store.heal();

        // From a fresh handle: a seek to block 6 (no read-ahead), then a sequential read of
        // block 7, whose read-ahead would load block 8.
        let fetches_for = |ino| {
            let s = s.clone();
            let store = store.clone();
            async move {
                let fh = open(&s, ino, libc::O_RDONLY).await;
                let before = store.reads();
                read(&s, ino, fh, 6 * BLOCK, MIB).await.unwrap();
                read(&s, ino, fh, 7 * BLOCK, MIB).await.unwrap();
                settle().await;
                store.reads() - before
            }
        };
        assert_eq!(fetches_for(a).await, 2, "quarantined: on-demand reads only");
        // The pool caps read-ahead at one block (a quarter of the cache).
        assert_eq!(s.max_readahead_blocks(), 1);
        assert_eq!(fetches_for(b).await, 3, "healthy: block 8 loaded ahead too");
    });
}

/// Every errno the service answers with, and a slow store that is only slow.
#[test]
fn store_failures_map_to_their_errnos() {
    let data = pattern(11, MIB + 1);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    let cases = [
        (Fault::NotFound, Err(libc::EIO)),
        (Fault::Denied, Err(libc::EACCES)),
        (Fault::Unavailable, Err(libc::EIO)),
        (Fault::Short(1), Err(libc::EIO)),
        (Fault::Delay(Duration::from_millis(20)), Ok(())),
    ];
    for (fault, expected) in cases {
        let ns = ns.clone();
        let objects = objects.clone();
        let data = data.clone();
        let got = on_shard(16 << 20, move |pool| async move {
            let store = Rc::new(FaultStore::new(Rc::new(MemoryStore::new(objects))));
            store.inject(When::Always, fault);
            let s = service(pool, ns, store);
            let fh = open(&s, a, libc::O_RDONLY).await;
            let result = read(&s, a, fh, 0, 2 * MIB).await;
            result
                .map(|bytes| assert_eq!(bytes, data))
                .map_err(|e| e.errno())
        });
        assert_eq!(got, expected, "{fault:?}");
    }
}

#[test]
fn opens_and_releases_keep_count_and_reads_past_the_end_are_empty() {
    let data = pattern(12, 1000);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(16 << 20, move |pool| async move {
        let s = service(pool, ns, Rc::new(MemoryStore::new(objects)));
        let first = open(&s, a, libc::O_RDONLY).await;
        let second = open(&s, a, libc::O_RDONLY | libc::O_DIRECT).await;
        assert_ne!(first, second);
        assert_eq!(read(&s, a, second, 1000, 10).await.unwrap(), b"");
        assert_eq!(read(&s, a, first, 990, 4096).await.unwrap(), data[990..]);
        for fh in [first, second] {
            let (reply, answer) = capture::<()>();
            s.clone()
                .handle(ShardRequest::Release(Release { ino: a, fh, reply }))
                .await;
            answer.try_recv().unwrap().unwrap();
        }
        let counters = s.counters.snapshot();
        assert_eq!((counters.opens, counters.open_handles()), (2, 0));
        assert_eq!(counters.misrouted, 0);
    });
}

/// `--verify stream`: a seek reads one block and nothing else; reading the object through in
/// order verifies it (the block read earlier is picked up from the cache, not fetched again),
/// and from then on its blocks are verified ones.
#[test]
fn stream_mode_fetches_what_is_read_and_verifies_an_object_read_through() {
    let data = pattern(13, 12 * MIB + 3);
    let hash = Hash::of(&data);
    let ns = namespace(&[("a", &data)]);
    let objects = MemoryObjects::of([data.clone()]);
    let a = ino(&ns, "a");
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        let s = service_verifying(pool, ns, store.clone(), VerifyMode::Stream);
        let fh = open(&s, a, libc::O_RDONLY).await;
        let bytes = read(&s, a, fh, 8 * BLOCK, MIB).await.unwrap();
        assert_eq!(bytes, data[8 * MIB..9 * MIB]);
        settle().await;
        assert_eq!(store.reads_of(hash), 1, "a seek fetches the block it reads");
        assert_eq!(s.counters.snapshot().objects_verified, 0);
        assert!(!s.verification.is_verified(hash));

        let fh = open(&s, a, libc::O_RDONLY).await;
        let mut through = Vec::new();
        while through.len() < data.len() {
            let bytes = read(&s, a, fh, through.len() as u64, MIB).await.unwrap();
            through.extend_from_slice(&bytes);
        }
        assert!(through == data);
        settle().await;
        assert!(s.verification.is_verified(hash));
        let counters = s.counters.snapshot();
        assert_eq!(counters.objects_verified, 1);
        assert_eq!(counters.verify_failures, 0);
        assert_eq!(store.reads_of(hash), 13, "every block fetched once");
        assert!(
            matches!(
                s.cached((hash, 8), Asker::Reader),
                Some(crate::fs::Servable::Verified(_))
            ),
            "a streamed block of a verified object is confirmed against its digest"
        );
    });
}

/// Under `--verify stream` an object a reader is streaming is its stream's to fetch (and, with a
/// disk cache, its background completion's): prefetch reaching it later must not verify it
/// from the store a second time.
#[test]
fn prefetch_leaves_an_object_being_streamed_to_its_stream() {
    let data = pattern(9, 8 * MIB);
    let hash = Hash::of(&data);
    let ns = namespace(&[("big", &data)]);
    let objects: MemoryObjects = [(hash, Bytes::from(data.clone()))].into_iter().collect();
    let big = ino(&ns, "big");
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        let s = service_verifying(pool, ns, store.clone(), VerifyMode::Stream);
        let fh = open(&s, big, libc::O_RDONLY).await;
        // Not at offset 0: no read-ahead, one block fetched.
        assert_eq!(read(&s, big, fh, 10, 100).await.unwrap(), data[10..110]);
        settle().await;
        assert_eq!(store.reads_of(hash), 1);
        s.start_prefetch(vec![PrefetchItem {
            ino: big,
            hash,
            len: data.len() as u64,
        }]);
        settle().await;
        assert_eq!(
            store.reads_of(hash),
            1,
            "prefetch fetched an object being streamed"
        );
        s.stop_prefetch();
    });
}

/// `--verify stream`: many first reads at once of different objects, each of whose first block
/// would be fetched in windows, on a pool of only 8 blocks. Windowed loads hold their windows
/// while they wait for the memory of the whole block; bounded in number, they all finish (12 of
/// them unbounded hold more than the pool). Every read gets its bytes, each block is fetched
/// once, and at least one object's first block came in windows.
#[test]
fn concurrent_first_reads_of_many_objects_finish_on_a_small_pool() {
    const PART: u64 = 4 << 20;
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| (format!("f{i}"), pattern(40 + i, 2 * PART as usize)))
        .collect();
    let listed: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    let ns = namespace(&listed);
    let objects = MemoryObjects::of(files.iter().map(|(_, d)| d.clone()));
    let inos: Vec<Ino> = files.iter().map(|(n, _)| ino(&ns, n)).collect();
    on_shard(8 * PART as usize, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        // Reads that take a while, as S3's do, so the loads interleave.
        let slow = Rc::new(FaultStore::new(store.clone()));
        slow.inject(When::Always, Fault::Delay(Duration::from_millis(20)));
        let s = service_with(pool, ns, slow, VerifyMode::Stream, PART, None);
        let reads = inos.iter().zip(&files).map(|(&ino, (_, data))| {
            let (s, data) = (s.clone(), data.clone());
            async move {
                let fh = open(&s, ino, libc::O_RDONLY).await;
                let head = read(&s, ino, fh, 0, 4096).await.unwrap();
                assert!(head == data[..4096]);
                let rest = read(&s, ino, fh, 4096, MIB).await.unwrap();
                assert!(rest == data[4096..4096 + MIB]);
            }
        });
        let all = futures::future::join_all(reads.map(glommio::spawn_local));
        let limit = glommio::timer::sleep(Duration::from_secs(20));
        futures::pin_mut!(all, limit);
        match futures::future::select(all, limit).await {
            futures::future::Either::Left(_) => {}
            futures::future::Either::Right(_) => panic!("first reads stuck waiting for memory"),
        }
        settle().await;
        // Per object: block 0 in three windows (1, 1, 2 MiB) or one GET, and block 1 once if
        // read-ahead had room for it.
        let reads: Vec<u64> = files
            .iter()
            .map(|(_, data)| store.reads_of(Hash::of(data)))
            .collect();
        assert!(reads.iter().all(|&n| (1..=4).contains(&n)), "{reads:?}");
        assert!(
            reads.iter().any(|&n| n >= 3),
            "no first block was fetched in windows: {reads:?}"
        );
    });
}

/// `--verify stream`: a corrupt object is served until its hash is complete (here, when the
/// block that completes the in-order prefix arrives), then quarantined: that read, every later
/// read (cached blocks too) and every later open fail with EIO; counted once.
#[test]
fn stream_mode_quarantines_an_object_found_corrupt_after_serving() {
    let claimed = pattern(14, 3 * MIB);
    let stored = pattern(15, 3 * MIB);
    let ns = namespace(&[("bad", &claimed)]);
    let hash = Hash::of(&claimed);
    let objects: MemoryObjects = [(hash, Bytes::from(stored.clone()))].into_iter().collect();
    let bad = ino(&ns, "bad");
    on_shard(64 << 20, move |pool| async move {
        let store = Rc::new(MemoryStore::new(objects));
        let s = service_verifying(pool, ns, store.clone(), VerifyMode::Stream);
        let fh = open(&s, bad, libc::O_RDONLY).await;
        // Backwards, so no read is sequential (no read-ahead): blocks 2 and 1 wait in the
        // cache for block 0, whose arrival completes the hash.
        for block in [2, 1] {
            let at = block * MIB;
            let bytes = read(&s, bad, fh, at as u64, MIB).await.unwrap();
            assert!(bytes == stored[at..at + MIB], "served as it arrived");
        }
        assert_eq!(s.counters.snapshot().verify_failures_after_serve, 0);
        assert_eq!(read(&s, bad, fh, 0, MIB).await, Err(FsError::Corrupt));
        let counters = s.counters.snapshot();
        assert_eq!(counters.verify_failures_after_serve, 1);
        assert_eq!(counters.verify_failures, 1);
        assert_eq!(store.reads_of(hash), 3, "each block fetched once");
        assert!(s.policy.served_corrupt(hash));
        assert_eq!(
            read(&s, bad, fh, 2 * BLOCK, 10).await,
            Err(FsError::Corrupt)
        );
        assert_eq!(
            try_open(&s, bad, libc::O_RDONLY).await,
            Err(FsError::Corrupt)
        );
        assert_eq!(
            store.reads_of(hash),
            3,
            "nothing fetched after the quarantine"
        );
        assert_eq!(s.counters.snapshot().verify_failures_after_serve, 1);
    });
}

/// `--verify object` (the default) on the same corrupt object: nothing is served.
#[test]
fn object_mode_serves_nothing_of_a_corrupt_object() {
    let claimed = pattern(14, 3 * MIB);
    let ns = namespace(&[("bad", &claimed)]);
    let hash = Hash::of(&claimed);
    let objects: MemoryObjects = [(hash, Bytes::from(pattern(15, 3 * MIB)))]
        .into_iter()
        .collect();
    let bad = ino(&ns, "bad");
    on_shard(64 << 20, move |pool| async move {
        let s = service(pool, ns, Rc::new(MemoryStore::new(objects)));
        let fh = open(&s, bad, libc::O_RDONLY).await;
        for block in [2u64, 1, 0] {
            let result = read(&s, bad, fh, block * BLOCK, MIB).await;
            assert_eq!(result, Err(FsError::Corrupt));
        }
        assert_eq!(s.counters.snapshot().verify_failures_after_serve, 0);
    });
}
