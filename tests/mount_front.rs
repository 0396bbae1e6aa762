//! Branches that matter and had no test (issue 15.6): the FUSE front's metadata calls and their
//! errnos, concurrent first readers sharing one verification, and the disk cache's start-up
//! clean-up and full-filesystem path.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::{job, pattern, read_all, Mount, MountOptions};

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn metadata_calls_answer_with_the_right_values_and_errnos() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(151, 10_000);
    let (manifest, cas) = job(
        work.path(),
        &[("dir/a.bin", &data), ("dir/sub/b.txt", b"b")],
        "2025-12-04-beta",
    );
    let mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::default(),
    );
    let dir = &mount.dir;

    // statfs: the manifest's size in 4 KiB blocks, nothing free (read-only), its node count.
    // SAFETY: an all-zero statvfs is a valid value for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out-pointer.
    assert_eq!(unsafe { libc::statvfs(c_path(dir).as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_bsize, 4096);
    assert_eq!(st.f_blocks, 3, "10,001 bytes in 4 KiB blocks");
    assert_eq!(st.f_bfree, 0);
    assert_eq!(
        st.f_files, 5,
        "root, dir, dir/a.bin, dir/sub, dir/sub/b.txt"
    );

    // access: reading is allowed, writing is EROFS, a missing name ENOENT.
    let access = |path: &Path, mode| {
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::access(c_path(path).as_ptr(), mode) };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap()
        }
    };
    assert_eq!(access(&dir.join("dir/a.bin"), libc::R_OK), 0);
    assert_eq!(access(&dir.join("dir/a.bin"), libc::W_OK), libc::EROFS);
    assert_eq!(access(&dir.join("dir/none"), libc::R_OK), libc::ENOENT);

    // xattrs: none, and saying so properly.
    let file = c_path(&dir.join("dir/a.bin"));
    let name = CString::new("user.x").unwrap();
    let mut buffer = [0u8; 64];
    // SAFETY: valid path, name and buffer of the given length.
    let got =
        unsafe { libc::getxattr(file.as_ptr(), name.as_ptr(), buffer.as_mut_ptr().cast(), 64) };
    assert_eq!(got, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    // SAFETY: as above.
    let listed = unsafe { libc::listxattr(file.as_ptr(), buffer.as_mut_ptr().cast(), 64) };
    assert_eq!(listed, 0, "no attribute names");
    // SAFETY: as above; setting is refused on a read-only mount.
    let set = unsafe { libc::setxattr(file.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(set, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EROFS)
    );

    // Errnos of the front: a directory opened as a file, a file used as a directory.
    assert_eq!(
        errno_of(
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("dir"))
        ),
        Some(libc::EISDIR)
    );
    assert_eq!(
        errno_of(std::fs::read_dir(dir.join("dir/a.bin"))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno_of(std::fs::metadata(dir.join("dir/a.bin/x"))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno_of(std::fs::File::create(dir.join("dir/new"))),
        Some(libc::EROFS)
    );
    assert!(read_all(&dir.join("dir/a.bin")).unwrap() == data);
}

#[test]
fn concurrent_first_readers_share_one_verification() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(152, 24 << 20);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--stats"]),
    );
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
    let readers: Vec<_> = (0..6)
        .map(|_| {
            let path = mount.dir.join("a.bin");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                common::read_direct(&path).unwrap()
            })
        })
        .collect();
    for reader in readers {
        assert!(reader.join().unwrap() == data);
    }
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    // One pass over the object for all six: the pool (256 MiB) keeps every block.
    assert_eq!(total["bytes_fetched"], data.len() as u64, "{total}");
    assert_eq!(total["objects_verified"], 1, "{total}");
}

#[test]
fn partial_cache_files_of_dead_processes_are_removed_at_start() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(153, 100_000);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(cache.join("Data")).unwrap();
    // A pid that cannot be alive (above pid_max), and ours (a live process: kept).
    let dead = cache.join("Data/.0123456789abcdef0123456789abcdef.partial-99999999-0");
    std::fs::write(&dead, b"half an object").unwrap();
    let live = cache.join(format!(
        "Data/.0123456789abcdef0123456789abcdef.partial-{}-0",
        std::process::id()
    ));
    std::fs::write(&live, b"being written").unwrap();
    let cache_arg = cache.to_str().unwrap().to_string();
    let mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg]),
    );
    assert!(!dead.exists(), "a dead process's partial file was kept");
    assert!(live.exists(), "a live process's partial file was removed");
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
}

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct SmallFs;

impl SmallFs {
    fn mount<'a>(dir: &'a Path, size: &str) -> SmallFsGuard<'a> {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (needs root)");
        SmallFsGuard(dir)
    }
}

#[test]
fn a_full_cache_filesystem_costs_the_cache_copy_not_the_read() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(154, 6 << 20);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let cache = work.path().join("cache");
    let _fs = SmallFs::mount(&cache, "2m");
    let cache_arg = cache.to_str().unwrap().to_string();
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg, "--stats"]),
    );
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    assert!(common::read_direct(&mount.dir.join("a.bin")).unwrap() == data);
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert!(
        total["disk_cache_write_errors"].as_u64().unwrap() >= 1,
        "{total}"
    );
    assert_eq!(total["objects_cached"], 0, "{total}");
    let log = mount.stderr();
    assert!(log.contains("cannot write cache file"), "{log}");
    // Nothing half-written is left to be trusted later.
    let left: Vec<_> = std::fs::read_dir(cache.join("Data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_cache_filesystem_running_short_evicts_the_least_recently_used() {
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("f{i}.bin"),
                pattern(160 + i, (5 << 20) + (100 << 10)),
            )
        })
        .collect();
    let listed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let (manifest, cas) = job(work.path(), &listed, "2023-03-03");
    // 16 MiB: 5% (0.8 MiB) must stay free, and three 5.1 MiB objects leave 0.7 MiB.
    let cache = work.path().join("cache");
    let _fs = SmallFs::mount(&cache, "16m");
    let cache_arg = cache.to_str().unwrap().to_string();
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg]),
    );
    let cached = |data: &[u8]| {
        cache
            .join("Data")
            .join(format!("{}.xxh128", mount_vfs::manifest::Hash::of(data)))
            .exists()
    };
    for (name, data) in &files {
        assert!(read_all(&mount.dir.join(name)).unwrap() == *data);
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct mtimes
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cached(&files[0].1) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !cached(&files[0].1),
        "the least recently used object was kept"
    );
    assert!(cached(&files[2].1), "the newest object was evicted");
    // Still readable: from the store.
    assert!(common::read_direct(&mount.dir.join("f0.bin")).unwrap() == files[0].1);
    let log = mount.stderr();
    assert!(log.contains("least recently used files"), "{log}");
}

#[test]
fn a_cache_file_changed_while_mounted_is_never_served() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(170, 48 << 20);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let cache = work.path().join("cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    // A 32 MiB pool cannot keep 48 MiB: the second read goes back to the cache file.
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg, "--memory-limit", "32M"]),
    );
    assert!(common::read_direct(&mount.dir.join("a.bin")).unwrap() == data);
    let cache_file = cache
        .join("Data")
        .join(format!("{}.xxh128", mount_vfs::manifest::Hash::of(&data)));
    assert!(cache_file.exists());
    // Overwritten in place (same inode, so the shard's open file sees it): same size.
    std::fs::write(&cache_file, pattern(171, data.len())).unwrap();
    assert!(common::read_direct(&mount.dir.join("a.bin")).unwrap() == data);
    let log = mount.stderr();
    assert!(log.contains("changed since it was verified"), "{log}");
}

#[test]
fn a_corrupt_chunk_of_a_v2025_file_fails_there_and_not_before() {
    let work = tempfile::tempdir().unwrap();
    let chunk = 256usize << 20;
    let data = pattern(180, chunk + (1 << 20));
    let (manifest, cas) = job(work.path(), &[("big.bin", &data)], "2025-12-04-beta");
    // Corrupt the second chunk's object (1 MiB): same size, one byte changed.
    let second = cas.join("Data").join(format!(
        "{}.xxh128",
        mount_vfs::manifest::Hash::of(&data[chunk..])
    ));
    let mut damaged = data[chunk..].to_vec();
    damaged[12345] ^= 0x20;
    std::fs::write(&second, damaged).unwrap();
    let mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::default(),
    );
    let (served, error) = common::read_until_error(&mount.dir.join("big.bin"), &data);
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    assert_eq!(
        served, chunk,
        "the first chunk is served whole, nothing of the second"
    );
}

#[test]
fn a_refused_passthrough_falls_back_to_shard_reads() {
    // The kernel refuses a backing file on a stacked filesystem: put the cache on overlayfs.
    let work = tempfile::tempdir().unwrap();
    let data = pattern(190, 3 << 20);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let layers = work.path().join("layers");
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(layers.join(d)).unwrap();
    }
    let merged = layers.join("merged");
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            layers.join("lower").display(),
            layers.join("upper").display(),
            layers.join("work").display()
        ))
        .arg(&merged)
        .status()
        .unwrap();
    assert!(status.success(), "mount overlayfs (needs root)");
    let _overlay = SmallFsGuard(&merged);
    let cache_arg = merged.join("cache").to_str().unwrap().to_string();
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg, "--stats"]),
    );
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    // Opened again now that the object is cached: passthrough is asked for, and refused.
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["passthrough_opens"], 0, "{total}");
    let log = mount.stderr();
    assert!(
        log.contains("passthrough of cache file") && log.contains("refused"),
        "{log}"
    );

    // So the shards read the cache file, and check each block against the digests an earlier
    // mount recorded: records whose digests are wrong (well-formed, for an unchanged file) cost
    // a fresh verification, never an error or wrong bytes.
    let log = merged.join("cache/verified.log");
    let wrong: String = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| {
            let (head, digests) = line.rsplit_once(' ').unwrap();
            let zeros = vec!["0000000000000000"; digests.split(',').count()].join(",");
            format!("{head} {zeros}\n")
        })
        .collect();
    assert!(
        !wrong.is_empty(),
        "the first mount recorded its verification"
    );
    std::fs::write(&log, wrong).unwrap();
    let mut again = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--cache-dir", &cache_arg, "--stats"]),
    );
    assert!(read_all(&again.dir.join("a.bin")).unwrap() == data);
    again.stop();
    let total = &again.stats("final").unwrap()["total"];
    assert_eq!(total["objects_trusted"], 1, "{total}");
    assert!(total["objects_verified"].as_u64() >= Some(1), "{total}");
    assert_eq!(total["errors"], 0, "{total}");
    assert!(again.stderr().contains("verifying it again"));
}

/// Unmounts a filesystem mounted by a test, on drop.
struct SmallFsGuard<'a>(&'a Path);

impl Drop for SmallFsGuard<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}
