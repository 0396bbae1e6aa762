//! `--verify object|stream` on real mounts over real S3 servers (moto and SeaweedFS, started and
//! stopped here): stream mode serves exact bytes on sequential and random reads and fetches
//! about what is read; a corrupt object is quarantined under stream mode once read through
//! (EIO from then on, never cached, counted and logged once) and never served under object
//! mode. Through a logging proxy: the first GET of a streamed object is a small one, and a
//! sequential read with a disk cache fetches each byte from S3 once, in both modes.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fault_proxy::{FaultProxy, LoggedGet};
use common::s3_servers::{
    config, create_bucket_signed, free_port, upload, upload_job, Moto, Seaweed, MOUNT_ENV,
    SEAWEED_KEY, SEAWEED_SECRET,
};
use common::{pattern, read_all, read_until_error, Mount, MountOptions};
use mount_vfs::manifest::Hash;

const MIB: usize = 1 << 20;

/// A job uploaded to `endpoint` (bucket `cas`, root `root`) and its manifest in `work`.
fn job_on(
    endpoint: &str,
    key: &str,
    secret: &str,
    files: &[(&str, &[u8])],
    work: &Path,
) -> PathBuf {
    let manifest = work.join("m.manifest");
    let s3 = config(endpoint, "cas", "root", key, secret);
    std::fs::write(&manifest, upload_job(&s3, files)).unwrap();
    manifest
}

fn moto_job(files: &[(&str, &[u8])]) -> (Moto, tempfile::TempDir, PathBuf) {
    let moto = Moto::start();
    moto.create_bucket("cas");
    let work = tempfile::tempdir().unwrap();
    let manifest = job_on(&moto.endpoint(), "testing", "testing", files, work.path());
    (moto, work, manifest)
}

/// Offsets and lengths of `n` reads spread over a file of `len` bytes (xorshift, fixed seed):
/// unaligned, some straddling blocks, some at the very end.
fn random_reads(len: usize, n: usize) -> Vec<(usize, usize)> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    (0..n)
        .map(|i| {
            let size = 1 + next() % (3 * MIB);
            let offset = if i % 10 == 9 {
                len - size.min(len)
            } else {
                next() % len
            };
            (offset, size.min(len - offset))
        })
        .collect()
}

/// A one-shard mount of `manifest` from the S3 `store` on `mnt`, with the `extra` flags.
fn mount_s3(manifest: &Path, store: &[&str], mnt: &Path, extra: &[&str]) -> Mount {
    Mount::start_with_store(manifest, store, &MOUNT_ENV, mnt, MountOptions::with(extra))
}

fn stream_reads_are_exact(
    endpoint: &str,
    env: &[(&str, &str)],
    work: &Path,
    manifest: &Path,
    big: &[u8],
) {
    let store = ["--s3", "s3://cas/root", "--endpoint-url", endpoint];
    let extra = ["--verify", "stream", "--part-size", "1M", "--stats"];
    let mut mount = Mount::start_with_store(
        manifest,
        &store,
        env,
        &work.join("mnt"),
        MountOptions::with(&extra),
    );
    let path = mount.dir.join("big.bin");
    let file = std::fs::File::open(&path).unwrap();
    for (offset, len) in random_reads(big.len(), 200) {
        let mut buffer = vec![0u8; len];
        file.read_exact_at(&mut buffer, offset as u64).unwrap();
        assert!(
            buffer == big[offset..offset + len],
            "wrong bytes at {offset}+{len}"
        );
    }
    drop(file);
    assert!(read_all(&path).unwrap() == big, "a sequential read");
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    // Read through in order once: the streamed object was checked at its end.
    assert_eq!(total["objects_verified"], 1, "{total}");
    assert_eq!(total["verify_failures"], 0, "{total}");
    assert_eq!(total["verify_failures_after_serve"], 0, "{total}");
    // Each block was fetched about once (random reads of a 1 MiB-block object whose blocks all
    // fit in the block cache).
    let fetched = total["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched <= 2 * big.len() as u64,
        "{fetched} bytes fetched for {}",
        big.len()
    );
}

#[test]
fn stream_mode_serves_exact_bytes_on_sequential_and_random_reads_from_moto() {
    let big = pattern(21, 24 * MIB + 123);
    let (moto, work, manifest) = moto_job(&[("big.bin", &big)]);
    stream_reads_are_exact(&moto.endpoint(), &MOUNT_ENV, work.path(), &manifest, &big);
}

#[test]
fn stream_mode_serves_exact_bytes_on_sequential_and_random_reads_from_seaweedfs() {
    let big = pattern(22, 24 * MIB + 321);
    let seaweed = Seaweed::start();
    create_bucket_signed(&seaweed.endpoint(), "cas", SEAWEED_KEY, SEAWEED_SECRET);
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big)];
    let manifest = job_on(
        &seaweed.endpoint(),
        SEAWEED_KEY,
        SEAWEED_SECRET,
        &files,
        work.path(),
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", SEAWEED_KEY),
        ("AWS_SECRET_ACCESS_KEY", SEAWEED_SECRET),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_REGION", "us-east-1"),
    ];
    stream_reads_are_exact(&seaweed.endpoint(), &env, work.path(), &manifest, &big);
}

/// 1 MiB read from the middle of a 64 MiB object: stream mode fetches a few blocks (the kernel
/// and the shard read a little ahead), object mode the whole object first.
#[test]
fn a_partial_read_under_stream_fetches_a_fraction_of_the_object() {
    let huge = pattern(23, 64 * MIB);
    let (moto, work, manifest) = moto_job(&[("huge.bin", &huge)]);
    let endpoint = moto.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let fetched_for_one_read = |mode: &str, dir: &str| {
        let extra = ["--verify", mode, "--part-size", "1M", "--stats"];
        let mut mount = mount_s3(&manifest, &store, &work.path().join(dir), &extra);
        let file = std::fs::File::open(mount.dir.join("huge.bin")).unwrap();
        let mut buffer = vec![0u8; MIB];
        let at = 40 * MIB + 4096;
        file.read_exact_at(&mut buffer, at as u64).unwrap();
        assert!(buffer == huge[at..at + MIB]);
        drop(file);
        mount.stop();
        let total = mount.stats("final").unwrap()["total"].clone();
        total["bytes_fetched"].as_u64().unwrap()
    };
    let streamed = fetched_for_one_read("stream", "mnt-stream");
    let verified = fetched_for_one_read("object", "mnt-object");
    eprintln!("1 MiB read of 64 MiB: stream fetched {streamed} bytes, object {verified}");
    assert!(
        streamed <= 8 * MIB as u64,
        "stream mode fetched {streamed} bytes for a 1 MiB read"
    );
    assert!(
        verified >= huge.len() as u64,
        "object mode fetched {verified}"
    );
}

/// The same corrupt object (other bytes under its key on the server) under both modes. Stream:
/// served while read, EIO once its hash is complete, then EIO on every read and open, no cache
/// file, no record, counted once, one log line; a good object read only partly is completed in
/// the background and cached. Object: EIO at the first read, not one byte served.
#[test]
fn a_corrupt_object_is_quarantined_under_stream_and_never_served_under_object() {
    let claimed = pattern(24, 8 * MIB + 5);
    let stored = pattern(25, claimed.len());
    let good = pattern(26, 6 * MIB + 7);
    let (moto, work, manifest) = moto_job(&[("bad.bin", &claimed), ("good.bin", &good)]);
    let (bad_hash, good_hash) = (Hash::of(&claimed), Hash::of(&good));
    let s3 = config(&moto.endpoint(), "cas", "root", "testing", "testing");
    upload(
        &s3,
        vec![(format!("Data/{bad_hash}.xxh128"), stored.clone())],
    );
    let endpoint = moto.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let cache = work.path().join("cache");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let extra = [
        "--verify",
        "stream",
        "--part-size",
        "1M",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--stats",
        "--metrics-addr",
        &metrics_addr,
    ];
    let mut mount = mount_s3(&manifest, &store, &work.path().join("mnt"), &extra);
    let bad = mount.dir.join("bad.bin");
    let kept_open = std::fs::File::open(&bad).unwrap();
    // What the server holds is served until the hash is complete; then EIO.
    let (served, error) = read_until_error(&bad, &stored);
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{}", mount.stderr());
    assert!(
        served > 0,
        "stream mode serves before the end of the object"
    );
    // Also a page the kernel cached: the mount has it dropped (a notification sent from a
    // thread of its own, so allow it a moment).
    let mut buffer = [0u8; 10];
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match kept_open.read_at(&mut buffer, 0) {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => panic!("a served page is still read from the kernel's cache"),
        }
    };
    assert_eq!(
        again.raw_os_error(),
        Some(libc::EIO),
        "a read of an open descriptor"
    );
    let reopened = std::fs::File::open(&bad).unwrap_err();
    assert_eq!(reopened.raw_os_error(), Some(libc::EIO), "a later open");
    drop(kept_open);

    // A good object read only partly is completed in the background and then cached.
    let file = std::fs::File::open(mount.dir.join("good.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, MIB as u64).unwrap();
    assert!(head == good[MIB..MIB + 4096]);
    drop(file);
    let good_file = cache.join(format!("Data/{good_hash}.xxh128"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !good_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read(&good_file).unwrap() == good,
        "completed and cached"
    );
    let metrics = common::scrape_metrics(metrics_port);
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("mount_vfs_verify_failures_after_serve_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 1, "{metrics}");

    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["verify_failures_after_serve"], 1, "{total}");
    assert_eq!(total["objects_cached"], 1, "{total}");
    let log = mount.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("already served"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("bad.bin") && lines[0].contains(&bad_hash.to_string()));
    let cached: Vec<String> = std::fs::read_dir(cache.join("Data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !cached
            .iter()
            .any(|name| name.contains(&bad_hash.to_string())),
        "the corrupt object left a cache file: {cached:?}"
    );
    let records = std::fs::read_to_string(cache.join("verified.log")).unwrap_or_default();
    assert!(!records.contains(&bad_hash.to_string()), "{records}");
    assert!(records.contains(&good_hash.to_string()), "{records}");
    drop(mount);

    // Object mode, a fresh mount and cache: EIO at the first read, nothing served.
    let mut mount = mount_s3(
        &manifest,
        &store,
        &work.path().join("mnt-object"),
        &["--verify", "object", "--stats"],
    );
    let (served, error) = read_until_error(&mount.dir.join("bad.bin"), &stored);
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{}", mount.stderr());
    assert_eq!(served, 0, "object mode served bytes of a corrupt object");
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["verify_failures_after_serve"], 0, "{total}");
    assert!(total["verify_failures"].as_u64().unwrap() >= 2, "{total}");
}

/// Waits until `proxy` has had no GET in flight and none new for 2 s (at most 60 s): the
/// background work of a mount (stream mode's completion) is done. Not for cache files: the
/// janitor may evict them at once when the cache filesystem is nearly full.
fn wait_until_quiet(proxy: &FaultProxy) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut received, mut since) = (proxy.gets_received(), Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = proxy.gets_received();
        if now != received || proxy.gets() != now {
            (received, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(2) {
            return;
        }
    }
}

/// The GETs of object `hash` in `log`, as byte ranges.
fn ranges_of(log: &[LoggedGet], hash: Hash) -> Vec<std::ops::Range<u64>> {
    let key = format!("Data/{hash}.xxh128");
    log.iter()
        .filter(|get| get.target.contains(&key))
        .map(|get| {
            get.byte_range()
                .unwrap_or_else(|| panic!("a GET without a range: {get:?}"))
        })
        .collect()
}

/// The first read of a streamed 8 MiB-part object asks S3 for 1 MiB first, then for the rest of
/// its block in windows that double (1, 2, 4 MiB), then part-size GETs; every byte of the
/// object is fetched exactly once and served exactly.
#[test]
fn stream_mode_starts_an_object_with_a_1_mib_get_that_doubles_to_the_part_size() {
    const PART: u64 = 8 << 20;
    let big = pattern(27, 5 * PART as usize + 4321);
    let (moto, work, manifest) = moto_job(&[("big.bin", &big)]);
    let hash = Hash::of(&big);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let extra = ["--verify", "stream", "--part-size", "8M", "--stats"];
    let mut mount = mount_s3(&manifest, &store, &work.path().join("mnt"), &extra);
    let path = mount.dir.join("big.bin");
    let file = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(head == big[..4096], "the first bytes");
    let first = ranges_of(&proxy.gets_log(), hash);
    assert_eq!(
        first.first(),
        Some(&(0..MIB as u64)),
        "GETs so far: {first:?}"
    );
    drop(file);
    assert!(read_all(&path).unwrap() == big, "a sequential read");
    mount.stop();

    let mut ranges = ranges_of(&proxy.gets_log(), hash);
    ranges.sort_by_key(|range| range.start);
    let m = MIB as u64;
    let mut expected = vec![0..m, m..2 * m, 2 * m..4 * m, 4 * m..PART];
    let len = big.len() as u64;
    expected.extend(
        (PART..len)
            .step_by(PART as usize)
            .map(|at| at..(at + PART).min(len)),
    );
    assert_eq!(ranges, expected, "the object's GETs, by offset");
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["bytes_fetched"].as_u64(), Some(len), "{total}");
    assert_eq!(total["verify_failures"], 0, "{total}");
}

/// A sequential whole read of a multi-part object with `--cache-dir` fetches each byte from S3
/// about once (at most 1.05x the object, counted by the proxy and by the mount): under
/// `--verify stream` the background completion and the reader share their block loads, and
/// under the default `--verify object` the verification pass and the reads share theirs. Each
/// mount committed the verified object to its cache.
#[test]
fn a_sequential_read_with_a_disk_cache_fetches_each_byte_once_in_both_modes() {
    let big = pattern(28, 48 * MIB + 99);
    let (moto, work, manifest) = moto_job(&[("big.bin", &big)]);
    let hash = Hash::of(&big);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    for mode in ["stream", "object"] {
        let cache = work.path().join(format!("cache-{mode}"));
        let extra = [
            "--verify",
            mode,
            "--part-size",
            "4M",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--prefetch",
            "off",
            "--stats",
        ];
        let before = proxy.gets_log().len();
        let mut mount = mount_s3(
            &manifest,
            &store,
            &work.path().join(format!("mnt-{mode}")),
            &extra,
        );
        assert!(
            read_all(&mount.dir.join("big.bin")).unwrap() == big,
            "{mode}: a sequential read"
        );
        wait_until_quiet(&proxy);
        mount.stop();
        let gets = &proxy.gets_log()[before..];
        let proxied: u64 = gets
            .iter()
            .filter(|get| get.target.contains(&hash.to_string()))
            .map(|get| get.body_bytes as u64)
            .sum();
        let total = &mount.stats("final").unwrap()["total"];
        assert_eq!(total["objects_cached"], 1, "{mode}: {total}");
        let fetched = total["bytes_fetched"].as_u64().unwrap();
        let limit = big.len() as u64 * 105 / 100;
        eprintln!(
            "{mode}: {proxied} bytes through the proxy, {fetched} counted, for {} ({} GETs)",
            big.len(),
            gets.len()
        );
        assert!(
            proxied <= limit && fetched <= limit,
            "{mode}: {proxied} bytes through the proxy ({fetched} counted) for a {}-byte object: \
             {:?}",
            big.len(),
            ranges_of(gets, hash)
        );
    }
}

/// A job-shaped read (as benches/job.rs, smaller): 36 files of 4 KiB to 48 MiB, four reader
/// threads over two shards, most files read whole in 1 MiB reads, some only their first 64 KiB,
/// some never opened. With `--cache-dir` both modes fetch every opened object whole (object mode
/// to verify it, stream mode to complete it into the cache) and nothing twice: S3 bytes are
/// 1.00-1.05x the opened objects' sizes, in stream mode as in object mode.
#[test]
fn a_job_shaped_read_fetches_each_opened_object_once_in_both_modes() {
    const HEADER: usize = 64 << 10;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    // (name, bytes, bytes the task reads of it: all, a header, or none)
    let files: Vec<(String, Vec<u8>, usize)> = (0..36u64)
        .map(|i| {
            let size = match i % 6 {
                0..=2 => 4096 + next() % (512 << 10),
                3 | 4 => MIB + next() % (8 * MIB),
                _ => 12 * MIB + next() % (36 * MIB),
            };
            let read = match next() % 10 {
                0..=6 => size,
                7 | 8 => size.min(HEADER),
                _ => 0,
            };
            (format!("f{i:02}.bin"), pattern(100 + i, size), read)
        })
        .collect();
    let listed: Vec<(&str, &[u8])> = files.iter().map(|(n, d, _)| (n.as_str(), &d[..])).collect();
    let (moto, work, manifest) = moto_job(&listed);
    let opened: usize = files
        .iter()
        .filter(|(_, _, read)| *read > 0)
        .map(|(_, data, _)| data.len())
        .sum();
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let files = std::sync::Arc::new(files);
    for mode in ["stream", "object"] {
        let cache = work.path().join(format!("cache-{mode}"));
        let extra = ["--verify", mode, "--cache-dir", cache.to_str().unwrap()];
        let before = proxy.gets_log().len();
        let mut mount = Mount::start_with_store(
            &manifest,
            &store,
            &MOUNT_ENV,
            &work.path().join(format!("mnt-{mode}")),
            MountOptions {
                shards: 2,
                extra: &extra,
            },
        );
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (files, taken, dir) = (files.clone(), taken.clone(), mount.dir.clone());
                std::thread::spawn(move || loop {
                    let i = taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((name, data, read)) = files.get(i) else {
                        return;
                    };
                    if *read == 0 {
                        continue;
                    }
                    let file = std::fs::File::open(dir.join(name)).unwrap();
                    let mut got = vec![0u8; *read];
                    for (n, chunk) in got.chunks_mut(MIB).enumerate() {
                        file.read_exact_at(chunk, (n * MIB) as u64).unwrap();
                    }
                    assert!(got[..] == data[..*read], "{mode}: {name}");
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        // Stream mode completes what was opened in the background.
        wait_until_quiet(&proxy);
        mount.stop();
        let fetched: usize = proxy.gets_log()[before..]
            .iter()
            .filter(|get| get.target.contains("/Data/"))
            .map(|get| get.body_bytes)
            .sum();
        eprintln!(
            "{mode}: {fetched} bytes from S3 for {opened} bytes of opened objects ({:.3}x)",
            fetched as f64 / opened as f64
        );
        assert!(
            fetched >= opened && fetched <= opened * 105 / 100,
            "{mode}: {fetched} bytes from S3 for {opened} bytes of opened objects"
        );
    }
}
