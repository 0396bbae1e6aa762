//! `--cache-dir`: verified objects land in a disk cache in the CAS layout, later mounts read
//! them from there (trusted while unchanged since their verification, re-verified otherwise, so a
//! damaged cache file is replaced, never served), and buffered opens of cached files are served
//! by the kernel through FUSE passthrough.

mod common;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use common::{job, pattern, read_all, read_direct, Mount, MountOptions};

fn object_name(content: &[u8]) -> String {
    format!("Data/{:032x}.xxh128", xxhash_rust::xxh3::xxh3_128(content))
}

fn counter(mount: &mut Mount, name: &str) -> u64 {
    let stats = mount.stats("final").expect("final stats line");
    stats["total"][name].as_u64().unwrap()
}

/// Waits (up to 10 s) until a `--stats` line counts at least `opens` opens, all released.
fn wait_until_all_released(mount: &mut Mount, opens: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The stats lines are periodic: one from before the last opens shows them all
        // released too, so it must count them.
        if let Some(stats) = mount.stats("interval") {
            let total = &stats["total"];
            if total["opens"].as_u64() >= Some(opens) && total["opens"] == total["releases"] {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "opens not released: {:?}",
            mount.stats("interval")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

struct Job {
    _tmp: tempfile::TempDir,
    manifest: PathBuf,
    cas: PathBuf,
    cache: PathBuf,
    mnt: PathBuf,
    big: Vec<u8>,
    small: Vec<u8>,
}

fn setup() -> Job {
    let tmp = tempfile::tempdir().unwrap();
    let big = pattern(11, (9 << 20) + 123);
    let small = pattern(12, 5000);
    let (manifest, cas) = job(
        tmp.path(),
        &[("big.bin", &big), ("dir/small.bin", &small), ("empty", b"")],
        "2023-03-03",
    );
    Job {
        cache: tmp.path().join("cache"),
        mnt: tmp.path().join("mnt"),
        _tmp: tmp,
        manifest,
        cas,
        big,
        small,
    }
}

fn mount(job: &Job) -> Mount {
    mount_with(job, &[])
}

fn mount_with(job: &Job, more: &[&str]) -> Mount {
    let cache = job.cache.to_str().unwrap();
    let mut extra = vec!["--cache-dir", cache, "--stats"];
    extra.extend_from_slice(more);
    Mount::start(
        &job.manifest,
        &job.cas,
        &job.mnt,
        MountOptions {
            shards: 2,
            extra: &extra,
        },
    )
}

/// Reads both files of the job through `mount` (buffered and O_DIRECT) and stops it.
fn read_job(job: &Job, mut mount: Mount) -> Mount {
    assert!(read_all(&mount.dir.join("big.bin")).unwrap() == job.big);
    assert!(read_direct(&mount.dir.join("big.bin")).unwrap() == job.big);
    assert!(read_all(&mount.dir.join("dir/small.bin")).unwrap() == job.small);
    mount.stop();
    assert_eq!(counter(&mut mount, "errors"), 0);
    mount
}

#[test]
fn later_mounts_trust_verified_cache_files_until_they_change() {
    let job = setup();
    let mut first = read_job(&job, mount(&job));
    assert_eq!(counter(&mut first, "objects_cached"), 2);
    assert_eq!(counter(&mut first, "objects_trusted"), 0);

    // Unchanged since: trusted without hashing (and passed through, O_DIRECT opens too).
    let mut second = read_job(&job, mount(&job));
    assert_eq!(counter(&mut second, "objects_trusted"), 2);
    assert_eq!(counter(&mut second, "objects_from_disk_cache"), 2);
    assert_eq!(counter(&mut second, "bytes_fetched"), 0);
    assert_eq!(counter(&mut second, "verify_failures"), 0);
    assert_eq!(counter(&mut second, "passthrough_opens"), 3);

    // --recheck-cache hashes them anyway.
    let mut third = read_job(&job, mount_with(&job, &["--recheck-cache"]));
    assert_eq!(counter(&mut third, "objects_trusted"), 0);
    assert_eq!(counter(&mut third, "objects_from_disk_cache"), 2);

    // A cache file written since (even with the same bytes) is hashed again; the other is not.
    let small = job.cache.join(object_name(&job.small));
    fs::write(&small, fs::read(&small).unwrap()).unwrap();
    let mut fourth = read_job(&job, mount(&job));
    assert_eq!(counter(&mut fourth, "objects_trusted"), 1);
    assert_eq!(counter(&mut fourth, "objects_from_disk_cache"), 2);

    // A damaged log costs re-hashing, not the mount.
    fs::write(job.cache.join("verified.log"), b"\0garbage\nmore garbage").unwrap();
    let mut fifth = read_job(&job, mount(&job));
    assert_eq!(counter(&mut fifth, "objects_trusted"), 0);
    assert_eq!(counter(&mut fifth, "objects_from_disk_cache"), 2);
    let mut sixth = read_job(&job, mount(&job));
    assert_eq!(counter(&mut sixth, "objects_trusted"), 2);
    // Records with wrong digests: tests/mount_front.rs (they matter where the shards read).
}

#[test]
fn verified_objects_are_cached_and_later_mounts_need_no_store() {
    let job = setup();
    let mut first = mount(&job);
    assert!(read_all(&first.dir.join("big.bin")).unwrap() == job.big);
    assert!(read_all(&first.dir.join("dir/small.bin")).unwrap() == job.small);
    assert!(read_all(&first.dir.join("empty")).unwrap().is_empty());
    first.stop();
    assert_eq!(counter(&mut first, "objects_cached"), 2);
    // Buffered opens of cached single-object files went to the kernel: READs never came.
    assert_eq!(counter(&mut first, "passthrough_opens"), 2);
    assert_eq!(counter(&mut first, "errors"), 0);
    for content in [&job.big, &job.small] {
        let cached = fs::read(job.cache.join(object_name(content))).unwrap();
        assert!(&cached == content, "cache file holds the object");
    }
    // Nothing else was left in the cache directory (no temporary files).
    assert_eq!(fs::read_dir(job.cache.join("Data")).unwrap().count(), 2);

    // The store is gone: a new mount serves everything from the cache.
    fs::remove_dir_all(job.cas.join("Data")).unwrap();
    fs::create_dir(job.cas.join("Data")).unwrap();
    let mut second = mount(&job);
    assert!(read_all(&second.dir.join("big.bin")).unwrap() == job.big);
    assert!(read_direct(&second.dir.join("big.bin")).unwrap() == job.big);
    assert!(read_all(&second.dir.join("dir/small.bin")).unwrap() == job.small);
    second.stop();
    assert_eq!(counter(&mut second, "objects_from_disk_cache"), 2);
    assert_eq!(counter(&mut second, "bytes_fetched"), 0);
    assert_eq!(counter(&mut second, "errors"), 0);
}

#[test]
fn a_corrupt_cache_file_is_replaced_from_the_store_and_never_served() {
    let job = setup();
    let mut first = mount(&job);
    assert!(read_all(&first.dir.join("big.bin")).unwrap() == job.big);
    first.stop();
    let cached = job.cache.join(object_name(&job.big));
    let mut damaged = fs::read(&cached).unwrap();
    damaged[7 << 20] ^= 0x01;
    fs::write(&cached, &damaged).unwrap();

    // The store still has the object: the read is right and the cache file is repaired.
    let mut second = mount(&job);
    assert!(read_all(&second.dir.join("big.bin")).unwrap() == job.big);
    second.stop();
    let log = second.stderr();
    assert!(
        log.contains("is corrupt") && log.contains(&cached.display().to_string()),
        "log names the corrupt cache file: {log}"
    );
    assert!(fs::read(&cached).unwrap() == job.big, "cache file repaired");

    // Damaged again and the store lost it too: EIO, for buffered and O_DIRECT readers alike.
    fs::write(&cached, &damaged).unwrap();
    fs::remove_file(job.cas.join(object_name(&job.big))).unwrap();
    let third = mount(&job);
    let err = read_all(&third.dir.join("big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let err = read_direct(&third.dir.join("big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(read_all(&third.dir.join("dir/small.bin")).unwrap() == job.small);
    assert!(!cached.exists(), "the damaged cache file was removed");
}

#[test]
fn direct_and_buffered_opens_of_one_file_mix_in_either_order() {
    let job = setup();
    let mut mount = mount(&job);
    let big = mount.dir.join("big.bin");
    // O_DIRECT first (shard-served), a buffered open while it is held joins that mode.
    {
        let _held = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&big)
            .unwrap();
        assert!(read_all(&big).unwrap() == job.big);
    }
    // Buffered first (passthrough), an O_DIRECT open while it is held joins passthrough; once
    // the shard-served handles above are released (the kernel sends RELEASE after close, and
    // until it arrives a new open joins their mode).
    wait_until_all_released(&mut mount, 2);
    {
        let _held = fs::File::open(&big).unwrap();
        assert!(read_direct(&big).unwrap() == job.big);
        assert!(read_all(&big).unwrap() == job.big);
    }
    // All closed: a new O_DIRECT open is shard-served again, once the kernel's RELEASEs (sent
    // asynchronously after close) have reached the shard.
    wait_until_all_released(&mut mount, 5);
    assert!(read_direct(&big).unwrap() == job.big);
    mount.stop();
    assert_eq!(counter(&mut mount, "errors"), 0);
    assert_eq!(counter(&mut mount, "passthrough_opens"), 3);
}

#[test]
fn o_direct_opens_pass_through_only_to_cache_files_an_earlier_mount_wrote() {
    let job = setup();
    // Cold: the O_DIRECT reader is served by the shard (a file this mount writes may still
    // have dirty pages, which an O_DIRECT read through passthrough would first write out).
    let mut first = mount(&job);
    assert!(read_direct(&first.dir.join("big.bin")).unwrap() == job.big);
    first.stop();
    assert_eq!(counter(&mut first, "objects_cached"), 1);
    assert_eq!(counter(&mut first, "passthrough_opens"), 0);

    // Written by the first mount: the kernel reads the cache file, no READ reaches a shard.
    let mut second = mount(&job);
    assert!(read_direct(&second.dir.join("big.bin")).unwrap() == job.big);
    second.stop();
    assert_eq!(counter(&mut second, "passthrough_opens"), 1);
    assert_eq!(counter(&mut second, "reads"), 0);
    assert_eq!(counter(&mut second, "bytes_fetched"), 0);
    assert_eq!(counter(&mut second, "errors"), 0);

    // --recheck-cache hashes the file at the open first, then passes it through.
    let mut third = mount_with(&job, &["--recheck-cache"]);
    assert!(read_direct(&third.dir.join("big.bin")).unwrap() == job.big);
    third.stop();
    assert_eq!(counter(&mut third, "objects_trusted"), 0);
    assert_eq!(counter(&mut third, "objects_from_disk_cache"), 1);
    assert_eq!(counter(&mut third, "passthrough_opens"), 1);
    assert_eq!(counter(&mut third, "reads"), 0);
}

#[test]
fn an_unusable_cache_dir_is_refused_before_mounting() {
    let job = setup();
    // A regular file where the cache directory should be.
    let not_a_dir = job.cas.join(object_name(&job.small));
    fs::create_dir_all(&job.mnt).unwrap();
    let output = std::process::Command::new(common::BIN)
        .arg(&job.manifest)
        .arg(&job.mnt)
        .args(["--cas", job.cas.to_str().unwrap(), "--cache-dir"])
        .arg(&not_a_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cache-dir") && stderr.contains(&not_a_dir.display().to_string()),
        "{stderr}"
    );
    assert!(!common::is_mounted(&job.mnt));
}

#[test]
fn cache_size_evicts_the_least_recently_used_files() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..3).map(|i| pattern(40 + i, 5 << 20)).collect();
    let (manifest, cas) = job(
        tmp.path(),
        &[
            ("a.bin", &files[0]),
            ("b.bin", &files[1]),
            ("c.bin", &files[2]),
        ],
        "2023-03-03",
    );
    let cache = tmp.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 1,
            extra: &["--cache-dir", cache_arg, "--cache-size", "12M"],
        },
    );
    for (name, content) in ["a.bin", "b.bin", "c.bin"].iter().zip(&files) {
        assert!(read_all(&mount.dir.join(name)).unwrap() == *content);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // 15 MiB > 12 MiB: the oldest file goes, down to at most 90% of the limit.
    let cached = |content: &[u8]| cache.join(object_name(content)).exists();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cached(&files[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing evicted: {}",
            mount.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(cached(&files[1]) && cached(&files[2]));
    // The evicted file still reads right (from memory or the store).
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == files[0]);
    drop(mount);

    // A smaller limit on the next mount shrinks the cache before anything is read. Prefetch
    // is off: the first mount's trace would otherwise bring a.bin back (it fits 6 MiB).
    let mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 1,
            extra: &[
                "--cache-dir",
                cache_arg,
                "--cache-size",
                "6M",
                "--prefetch",
                "off",
            ],
        },
    );
    let left: Vec<_> = fs::read_dir(cache.join("Data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "one 5 MiB file fits 90% of 6 MiB: {left:?}");
    assert!(read_all(&mount.dir.join("b.bin")).unwrap() == files[1]);
}
