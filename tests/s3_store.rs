//! The S3 store against real servers on 127.0.0.1, run on a real glommio shard: moto for the
//! API (ranged reads, the suffix-less fallback, errors, the start-up probe) and SeaweedFS for
//! SigV4 credential checks. Each test starts and stops its own server.

mod common;

use std::rc::Rc;
use std::time::Instant;

use common::pattern;
use common::s3_servers::{
    config, create_bucket_signed, free_port, on_shard, upload, Moto, Seaweed, SEAWEED_KEY,
    SEAWEED_SECRET,
};
use mount_vfs::fs::FsError;
use mount_vfs::manifest::Hash;
use mount_vfs::store::{S3Store, S3Target, StoreError};

const ROOT: &str = "Deadline Root/farm";

fn key(hash: Hash) -> String {
    format!("Data/{hash}.xxh128")
}

#[test]
fn moto_ranged_reads_return_exact_bytes_and_fall_back_without_suffix() {
    let moto = Moto::start();
    moto.create_bucket("cas-bucket");
    let target_config = config(&moto.endpoint(), "cas-bucket", ROOT, "k", "s");
    let target = S3Target::start(&target_config).unwrap();
    assert_eq!(target.probe().unwrap(), None);

    let sizes = [1usize, 4096, (1 << 20) + 17, (5 << 20) + 3];
    let objects: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64 + 1, n))
        .collect();
    let mut uploads: Vec<(String, Vec<u8>)> = objects
        .iter()
        .map(|o| (key(Hash::of(o)), o.clone()))
        .collect();
    let old = pattern(99, 300_000);
    let old_hash = Hash::of(&old);
    uploads.push((format!("Data/{old_hash}"), old.clone()));
    upload(&target_config, uploads);

    let store_target = target.clone();
    let (mismatches, missing, wrong_size) = on_shard(move |pool| async move {
        let store = Rc::new(S3Store::new(store_target));
        let mut mismatches = Vec::new();
        let mut check = |what: String, got: &[u8], want: &[u8]| {
            if got != want {
                mismatches.push(what);
            }
        };
        for object in objects.iter().chain([&old]) {
            let hash = Hash::of(object);
            let n = object.len() as u64;
            let mut ranges = vec![(0, n), (0, 1), (n - 1, 1), (n / 3, n / 3 + 1)];
            ranges.extend((0..n).step_by(4 << 20).map(|s| (s, (n - s).min(4 << 20))));
            for (offset, len) in ranges.into_iter().filter(|&(_, l)| l > 0) {
                let block = store
                    .read(&pool, hash, n, offset, len as usize)
                    .await
                    .unwrap();
                check(
                    format!("{hash} [{offset}+{len}]"),
                    &block,
                    &object[offset as usize..(offset + len) as usize],
                );
                assert_eq!(
                    Hash(xxhash_rust::xxh3::xxh3_128(&block)),
                    Hash::of(&object[offset as usize..(offset + len) as usize])
                );
            }
        }
        // Several reads in flight on one shard share its connection pool.
        let big = &objects[3];
        let hash = Hash::of(big);
        let reads = (0..8u64).map(|i| {
            let store = store.clone();
            let pool = pool.clone();
            async move {
                store
                    .read(&pool, hash, big.len() as u64, i * 600_000, 600_000)
                    .await
            }
        });
        for (i, block) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            let start = i * 600_000;
            check(
                format!("concurrent {i}"),
                &block.unwrap(),
                &big[start..start + 600_000],
            );
        }
        let absent = Hash::of(b"not uploaded");
        let missing = store.read(&pool, absent, 10, 0, 10).await.err();
        let wrong_size = store
            .read(&pool, Hash::of(&objects[1]), 5000, 0, 5000)
            .await
            .err();
        // The empty object is never requested.
        assert!(store
            .read(&pool, Hash::of(b""), 0, 0, 0)
            .await
            .unwrap()
            .is_empty());
        (
            mismatches,
            missing.map(|e| e.to_string()),
            wrong_size.map(|e| e.to_string()),
        )
    });
    assert!(mismatches.is_empty(), "wrong bytes for {mismatches:?}");
    let missing = missing.expect("a missing object must fail");
    assert!(
        missing.contains("is missing") && missing.contains("cas-bucket/Deadline Root/farm/Data/"),
        "{missing}"
    );
    let wrong_size = wrong_size.expect("a short object must fail");
    assert!(
        wrong_size.contains("is 4096 bytes, the manifest says 5000"),
        "{wrong_size}"
    );
}

#[test]
fn moto_not_found_is_not_retried_and_maps_to_eio() {
    let moto = Moto::start();
    moto.create_bucket("cas-bucket");
    let target_config = config(&moto.endpoint(), "cas-bucket", "", "k", "s");
    let target = S3Target::start(&target_config).unwrap();
    let (error, elapsed) = on_shard(move |pool| async move {
        let store = S3Store::new(target);
        let started = Instant::now();
        let error = store
            .read(&pool, Hash::of(b"nope"), 4, 0, 4)
            .await
            .err()
            .expect("must fail");
        (error, started.elapsed())
    });
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");
    assert_eq!(FsError::from(&error).errno(), libc::EIO);
    // Two requests (with and without suffix), no backoff.
    assert!(elapsed.as_millis() < 1000, "{elapsed:?}");
}

#[test]
fn probe_names_the_wrong_bucket_and_the_dead_endpoint() {
    let moto = Moto::start();
    moto.create_bucket("cas-bucket");
    let target_config = config(&moto.endpoint(), "no-such-bucket", "root", "k", "s");
    let target = S3Target::start(&target_config).unwrap();
    let message = target.probe().unwrap_err().to_string();
    assert!(
        message.contains("bucket no-such-bucket does not exist"),
        "{message}"
    );

    let dead = format!("http://127.0.0.1:{}", free_port());
    let target_config = config(&dead, "cas-bucket", "root", "k", "s");
    let target = S3Target::start(&target_config).unwrap();
    let message = target.probe().unwrap_err().to_string();
    assert!(
        message.contains("cannot connect to the S3 endpoint") && message.contains("--endpoint-url"),
        "{message}"
    );
}

#[test]
fn seaweedfs_checks_credentials() {
    let seaweed = Seaweed::start();
    create_bucket_signed(
        &seaweed.endpoint(),
        "sigv4-bucket",
        SEAWEED_KEY,
        SEAWEED_SECRET,
    );
    let good_config = config(
        &seaweed.endpoint(),
        "sigv4-bucket",
        ROOT,
        SEAWEED_KEY,
        SEAWEED_SECRET,
    );
    let good = S3Target::start(&good_config).unwrap();
    assert_eq!(good.probe().unwrap(), None);
    let data = pattern(7, 3 << 20);
    let hash = Hash::of(&data);
    upload(&good_config, vec![(key(hash), data.clone())]);
    let expected = data.clone();
    let ok = on_shard(move |pool| async move {
        let store = S3Store::new(good);
        let block = store
            .read(&pool, hash, expected.len() as u64, 1000, 2 << 20)
            .await
            .unwrap();
        *block == expected[1000..1000 + (2 << 20)]
    });
    assert!(ok, "SeaweedFS returned wrong bytes");

    let wrong_secret_config = config(
        &seaweed.endpoint(),
        "sigv4-bucket",
        ROOT,
        SEAWEED_KEY,
        "not-the-secret",
    );
    let wrong_secret = S3Target::start(&wrong_secret_config).unwrap();
    let message = wrong_secret.probe().unwrap_err().to_string();
    assert!(message.contains("secret access key is wrong"), "{message}");
    let error = on_shard(move |pool| async move {
        S3Store::new(wrong_secret)
            .read(&pool, hash, data.len() as u64, 0, 10)
            .await
            .err()
            .expect("must fail")
    });
    assert!(matches!(error, StoreError::Denied { .. }), "{error}");
    assert_eq!(FsError::from(&error).errno(), libc::EACCES);

    let wrong_key_config = config(
        &seaweed.endpoint(),
        "sigv4-bucket",
        ROOT,
        "nobody",
        SEAWEED_SECRET,
    );
    let wrong_key = S3Target::start(&wrong_key_config).unwrap();
    let message = wrong_key.probe().unwrap_err().to_string();
    assert!(message.contains("access key id is not known"), "{message}");
}

/// Raw single-shard throughput of 4 MiB ranged GETs (4 in flight) against moto. Ignored by
/// default (a measurement, not a check): `cargo test --release --test s3_store -- --ignored --nocapture`.
#[test]
#[ignore]
fn moto_single_shard_throughput() {
    let moto = Moto::start();
    moto.create_bucket("bench");
    let target_config = config(&moto.endpoint(), "bench", "root", "k", "s");
    let target = S3Target::start(&target_config).unwrap();
    let data = pattern(5, 16 << 20);
    let hash = Hash::of(&data);
    upload(&target_config, vec![(key(hash), data)]);
    let (bytes, elapsed) = on_shard(move |pool| async move {
        use futures::StreamExt;
        let store = S3Store::new(target);
        let started = Instant::now();
        let blocks = (0..64u64).map(|i| (i % 4) * (4 << 20));
        let bytes: usize = futures::stream::iter(blocks)
            .map(|offset| store.read(&pool, hash, 16 << 20, offset, 4 << 20))
            .buffered(4)
            .map(|b| b.unwrap().len())
            .fold(0, |a, b| async move { a + b })
            .await;
        (bytes, started.elapsed())
    });
    eprintln!(
        "moto, 1 shard, 4 MiB ranged GETs x4 in flight: {} MiB in {elapsed:?} = {:.0} MiB/s",
        bytes >> 20,
        (bytes >> 20) as f64 / elapsed.as_secs_f64()
    );
}
