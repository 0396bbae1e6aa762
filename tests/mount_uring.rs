//! `--transport uring|auto`: a real mount served over FUSE over io_uring (Linux 6.14+,
//! `CONFIG_FUSE_IO_URING`) reads exactly what the tree holds, its requests really come over the
//! ring, it unmounts cleanly with reads in flight, a `--writable` one takes every kind of change
//! over the ring; `auto` takes the ring when every CPU has a shard and says why not when one has
//! none; and with the kernel's ring switched off, `auto` falls back to `/dev/fuse` with one line
//! saying how to switch it on, and `uring` fails with that line.
//!
//! The test sets `/sys/module/fuse/parameters/enable_uring` (root) and restores it, also when it
//! fails. Everything that changes the parameter is in one test function, so nothing here runs
//! concurrently with another setting of it; the other test files mount with the transport
//! `MOUNT_VFS_TRANSPORT` names (scripts/test.sh runs them under both), and cargo runs test
//! files one at a time.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{job, pattern, read_all, read_direct, AlignedBuf, Mount, MountOptions, BIN};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
const HOW_TO_ENABLE: &str = "echo Y > /sys/module/fuse/parameters/enable_uring";

/// Held by each test for its whole run: the module parameter is one for the machine, and one
/// test switches it off on purpose.
static PARAMETER_USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets `enable_uring` and puts the earlier value back when dropped (also on panic).
struct UringParameter(String);

impl UringParameter {
    fn set(value: &str) -> UringParameter {
        let earlier = fs::read_to_string(ENABLE_URING).expect("read enable_uring");
        fs::write(ENABLE_URING, value).expect("set enable_uring (root?)");
        UringParameter(earlier.trim().to_string())
    }
}

impl Drop for UringParameter {
    fn drop(&mut self) {
        fs::write(ENABLE_URING, &self.0).ok();
    }
}

const BIG: usize = (12 << 20) + 4097;

fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello ring".to_vec()),
        ("empty.bin", Vec::new()),
        ("scene/shot/big.exr", pattern(1, BIG)),
        ("scene/tex/ü.tif", pattern(2, 1 << 20)),
        ("deep/a/b/c/leaf.txt", pattern(3, 100)),
    ]
}

/// Stat, listings, whole reads (buffered and O_DIRECT) and random reads, all byte-exact.
/// Returns the number of READ requests the random O_DIRECT reads alone made.
fn check_content(dir: &Path, files: &[(&str, Vec<u8>)]) -> u64 {
    for (path, bytes) in files {
        let path = dir.join(path);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            bytes.len() as u64,
            "{path:?}"
        );
        assert!(
            read_all(&path).unwrap() == *bytes,
            "buffered read of {path:?}"
        );
    }
    let mut top: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["deep", "empty.bin", "hello.txt", "scene"]);
    let tex: Vec<_> = fs::read_dir(dir.join("scene/tex")).unwrap().collect();
    assert_eq!(tex.len(), 1);
    let big = &files[2].1;
    let big_path = dir.join(files[2].0);
    assert!(read_direct(&big_path).unwrap() == *big, "O_DIRECT read");
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&big_path)
        .unwrap();
    let mut buf = AlignedBuf::new(4096);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let reads = 300;
    for _ in 0..reads {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let offset = (rng % (BIG as u64 / 4096)) * 4096;
        let n = file.read_at(buf.as_mut(), offset).unwrap();
        let end = (offset as usize + n).min(BIG);
        assert_eq!(n, end - offset as usize);
        assert!(
            buf.as_mut()[..n] == big[offset as usize..end],
            "4 KiB at {offset}"
        );
    }
    reads
}

/// Every change a `--writable` mount serves, checked through what the tree then shows.
fn check_changes(dir: &Path, files: &[(&str, Vec<u8>)]) {
    let written = pattern(9, 3 << 20);
    let made = dir.join("out/made.bin");
    fs::create_dir(dir.join("out")).unwrap();
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&made)
        .unwrap();
    let mut buf = AlignedBuf::new(1 << 20);
    for (i, chunk) in written.chunks(1 << 20).enumerate() {
        buf.as_mut().copy_from_slice(chunk);
        assert_eq!(
            file.write_at(buf.as_mut(), (i as u64) << 20).unwrap(),
            1 << 20
        );
    }
    file.sync_all().unwrap();
    drop(file);
    assert!(
        read_direct(&made).unwrap() == written,
        "O_DIRECT write, read back"
    );
    assert!(
        read_all(&made).unwrap() == written,
        "O_DIRECT write, buffered read"
    );

    // Buffered writes into a base file, merged with its base bytes.
    let hello = dir.join(files[0].0);
    fs::OpenOptions::new()
        .write(true)
        .open(&hello)
        .unwrap()
        .write_at(b"HELLO", 0)
        .unwrap();
    assert_eq!(fs::read(&hello).unwrap(), b"HELLO ring");

    // Names: symlink, hard link, rename, unlink, rmdir, mkfifo.
    std::os::unix::fs::symlink("made.bin", dir.join("out/link")).unwrap();
    assert_eq!(
        fs::read_link(dir.join("out/link")).unwrap(),
        Path::new("made.bin")
    );
    fs::hard_link(&hello, dir.join("out/hello2")).unwrap();
    assert_eq!(fs::metadata(&hello).unwrap().nlink(), 2);
    fs::rename(dir.join("out/hello2"), dir.join("out/hello3")).unwrap();
    fs::remove_file(dir.join("out/hello3")).unwrap();
    fs::create_dir(dir.join("out/empty")).unwrap();
    fs::remove_dir(dir.join("out/empty")).unwrap();
    let fifo = std::ffi::CString::new(dir.join("out/fifo").into_os_string().into_vec()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(fs::metadata(dir.join("out/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    // Attributes: chmod, truncate, fallocate, utimes; an xattr set and removed.
    fs::set_permissions(&made, fs::Permissions::from_mode(0o640)).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&made).unwrap();
    file.set_len(5).unwrap();
    // SAFETY: a valid descriptor.
    assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 8192) }, 0);
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    file.set_modified(when).unwrap();
    drop(file);
    let meta = fs::metadata(&made).unwrap();
    assert_eq!((meta.len(), meta.mode() & 0o7777), (8192, 0o640));
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(
        &fs::read(&made).unwrap()[..8],
        &[written[0], written[1], written[2], written[3], written[4], 0, 0, 0]
    );
    let path = std::ffi::CString::new(made.into_os_string().into_vec()).unwrap();
    // SAFETY: valid C strings and a live buffer of the given length.
    unsafe {
        assert_eq!(
            libc::setxattr(
                path.as_ptr(),
                c"user.k".as_ptr(),
                b"v".as_ptr().cast(),
                1,
                0
            ),
            0
        );
        assert_eq!(libc::removexattr(path.as_ptr(), c"user.k".as_ptr()), 0);
    }

    let mut out: Vec<String> = fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    out.sort();
    assert_eq!(out, ["fifo", "link", "made.bin"]);
}

/// What the session's last line counts: "N requests served over the ring (C READs and WRITEs
/// crossed to their inode's owner shard, R READs of other shards' inodes were served from
/// replicas where they arrived), D over /dev/fuse".
#[derive(Debug)]
struct RingCounts {
    ring: u64,
    crossed: u64,
    replicated: u64,
    dev: u64,
}

fn ring_counts(stderr: &str) -> Option<RingCounts> {
    let line = stderr
        .lines()
        .find(|l| l.contains("requests served over the ring"))?;
    let number_before = |marker: &str| -> Option<u64> {
        let head = &line[..line.find(marker)?];
        head.trim_end().rsplit([' ', '(']).next()?.parse().ok()
    };
    Some(RingCounts {
        ring: number_before(" requests served over the ring")?,
        crossed: number_before(" READs and WRITEs crossed")?,
        replicated: number_before(" READs of other shards' inodes")?,
        dev: number_before(" over /dev/fuse")?,
    })
}

/// The names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Mounts `manifest` from `cas` on `dir` with two shards and the `extra` flags.
fn mount_with(manifest: &Path, cas: &Path, dir: &Path, extra: &[&str]) -> Mount {
    Mount::start(manifest, cas, dir, MountOptions { shards: 2, extra })
}

/// Stops `mount`, checks that it exited cleanly, and returns its log.
fn stop_cleanly(mut mount: Mount) -> String {
    let status = mount.stop();
    let stderr = mount.stderr();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    stderr
}

/// Stops `mount` (see [`stop_cleanly`]) and checks that the ring carried at least `at_least`
/// requests and `/dev/fuse` less than a tenth as many.
fn stop_and_check_ring(mount: Mount, at_least: u64) -> String {
    let stderr = stop_cleanly(mount);
    let counts = ring_counts(&stderr).unwrap_or_else(|| panic!("no counts:\n{stderr}"));
    assert!(
        counts.ring >= at_least && counts.dev < counts.ring / 10,
        "{counts:?}"
    );
    stderr
}

/// What each test here starts from: the job's files in a CAS, a mountpoint, and the machine's
/// `enable_uring` to itself. `None` (logged) on a kernel without FUSE over io_uring.
struct Fixture {
    _serial: std::sync::MutexGuard<'static, ()>,
    tmp: tempfile::TempDir,
    files: Vec<(&'static str, Vec<u8>)>,
    manifest: std::path::PathBuf,
    cas: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        if fs::metadata(ENABLE_URING).is_err() {
            eprintln!("skipped: this kernel has no {ENABLE_URING} (CONFIG_FUSE_IO_URING)");
            return None;
        }
        let _serial = PARAMETER_USERS.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let files = files();
        let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        let (manifest, cas) = job(tmp.path(), &borrowed, "2023-03-03");
        let dir = tmp.path().join("mnt");
        Some(Fixture {
            _serial,
            tmp,
            files,
            manifest,
            cas,
            dir,
        })
    }
}

#[test]
fn uring_transport_serves_and_auto_falls_back() {
    let Some(Fixture {
        _serial,
        tmp,
        files,
        manifest,
        cas,
        dir,
    }) = Fixture::new()
    else {
        return;
    };

    {
        let _on = UringParameter::set("Y");
        let transport = ["--transport", "uring"];
        let mount = mount_with(&manifest, &cas, &dir, &transport);
        let random_reads = check_content(&dir, &files);
        // The shards serve the ring queues themselves: besides the shards and glommio's own
        // threads there is one `/dev/fuse` reader (FORGET, INTERRUPT) and no thread per queue.
        let threads = thread_names(mount.pid().expect("running"));
        assert!(
            !threads
                .iter()
                .any(|name| name.starts_with("mount_vfs-ring")),
            "{threads:?}"
        );
        let readers = threads.iter().filter(|n| *n == "mount_vfs-fuse").count();
        assert_eq!(readers, 1, "{threads:?}");
        let link = fs::read_link(dir.join("hello.txt"));
        assert!(link.is_err(), "a file is no symlink");
        // GETXATTR over the ring: the stats snapshot.
        let stats = Command::new(BIN)
            .args(["stats", "--once"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(stats.status.success(), "{stats:?}");
        stop_and_check_ring(mount, random_reads);
        assert!(!common::is_mounted(&dir));

        // Unmount with reads in flight: the process exits cleanly, the readers get errors.
        let extra = ["--transport", "uring", "--stop-grace", "1"];
        let mut mount = mount_with(&manifest, &cas, &dir, &extra);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|i| {
                let (path, stop) = (dir.join(files[2].0), stop.clone());
                let expected = files[2].1.clone();
                std::thread::spawn(move || {
                    let file = fs::File::open(path).unwrap();
                    let mut buf = vec![0u8; 1 << 20];
                    let mut offset = (i as u64) << 20;
                    while !stop.load(Ordering::Relaxed) {
                        match file.read_at(&mut buf, offset % BIG as u64) {
                            Ok(n) => {
                                let at = (offset % BIG as u64) as usize;
                                assert!(buf[..n] == expected[at..at + n], "bytes at {at}");
                                offset += 1 << 20;
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let status = mount.stop();
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().expect("reader saw wrong bytes");
        }
        let stderr = mount.stderr();
        assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!common::is_mounted(&dir));

        // A --writable mount: every kind of change comes over the ring, 1 MiB O_DIRECT writes
        // (the largest WRITE, a whole ring payload) included.
        let cache = tmp.path().join("cache");
        let cache_arg = cache.to_str().unwrap();
        let extra = [
            "--transport",
            "uring",
            "--writable",
            "--cache-dir",
            cache_arg,
        ];
        let mount = mount_with(&manifest, &cas, &dir, &extra);
        check_changes(&dir, &files);
        stop_and_check_ring(mount, 40);
        assert!(!common::is_mounted(&dir));

        // `auto` takes the ring when every CPU has a shard to serve its queue...
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = ["--transport", "auto"];
        let every_cpu = MountOptions {
            shards: cpus,
            extra: &auto,
        };
        let mount = Mount::start(&manifest, &cas, &dir, every_cpu);
        let random_reads = check_content(&dir, &files);
        stop_and_check_ring(mount, random_reads);
        // ... and /dev/fuse, saying why, when some CPU has none.
        if cpus > 1 {
            let one_shard = MountOptions {
                shards: 1,
                extra: &auto,
            };
            let mount = Mount::start(&manifest, &cas, &dir, one_shard);
            check_content(&dir, &files);
            let stderr = stop_cleanly(mount);
            let why = format!("1 shards for {cpus} CPUs");
            assert_eq!(stderr.matches(&why).count(), 1, "{stderr}");
            assert!(ring_counts(&stderr).is_none(), "{stderr}");
        }
    }

    let _off = UringParameter::set("N");
    // `uring` refuses, saying how to switch the kernel's ring on.
    let refused = Command::new(BIN)
        .arg(&manifest)
        .arg(&dir)
        .args(["--cas", cas.to_str().unwrap(), "--transport", "uring"])
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{message}");
    assert!(message.contains(HOW_TO_ENABLE), "{message}");
    assert!(!common::is_mounted(&dir));

    // `auto` falls back to /dev/fuse with one line, and serves the same bytes.
    let transport = ["--transport", "auto"];
    let mount = mount_with(&manifest, &cas, &dir, &transport);
    check_content(&dir, &files);
    let stderr = stop_cleanly(mount);
    assert_eq!(stderr.matches(HOW_TO_ENABLE).count(), 1, "{stderr}");
    assert!(ring_counts(&stderr).is_none(), "{stderr}");
}

/// Passthrough opens work over the ring: with `--cache-dir`, a buffered open of a verified
/// cached file hands the kernel the cache file (a backing id registered on the session's
/// `/dev/fuse` descriptor, the open answered through a ring entry) and its reads never reach
/// the daemon; the bytes are the file's.
#[test]
fn uring_transport_passes_cached_files_through() {
    let Some(Fixture {
        _serial,
        tmp,
        files,
        manifest,
        cas,
        dir,
    }) = Fixture::new()
    else {
        return;
    };
    let cache = tmp.path().join("cache");
    let _on = UringParameter::set("Y");
    let extra = [
        "--transport",
        "uring",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--stats",
    ];
    let mut mount = mount_with(&manifest, &cas, &dir, &extra);
    let (name, bytes) = &files[2];
    // The first open verifies the object into the cache; later buffered opens pass through.
    for _ in 0..3 {
        assert!(
            read_all(&dir.join(name)).unwrap() == *bytes,
            "bytes of {name}"
        );
    }
    mount.stop();
    let stderr = mount.stderr();
    assert!(stderr.contains("FUSE passthrough on"), "{stderr}");
    let total = &mount.stats("final").expect("final stats line")["total"];
    let passthrough_opens = total["passthrough_opens"].as_u64().unwrap();
    assert!(passthrough_opens >= 2, "passthrough opens: {total}");
    assert_eq!(total["errors"].as_u64(), Some(0), "{total}");
    // Reads of passed-through opens went to the kernel: the daemon served at most the first.
    let served = total["bytes_served"].as_u64().unwrap();
    assert!(
        served <= bytes.len() as u64,
        "served {served} bytes of {}",
        bytes.len()
    );
    assert!(!common::is_mounted(&dir));
}

/// Runs `work` on a thread pinned to `cpu`.
fn on_cpu<T: Send>(cpu: usize, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a CPU set on the stack, for this thread only.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    let size = std::mem::size_of::<libc::cpu_set_t>();
                    assert_eq!(libc::sched_setaffinity(0, size, &set), 0, "pin to {cpu}");
                }
                work()
            })
            .join()
            .unwrap()
    })
}

/// A READ that arrives on a shard other than its file's owner (a reader on another CPU) is
/// served there from that shard's replica of the block once the owner has copied it over: with
/// a reader on every CPU in turn, most reads of the other CPUs never cross, and every byte is
/// the file's, also for reads that span two blocks (which always go to the owner).
#[test]
fn uring_reads_on_other_shards_are_served_from_replicas() {
    let Some(Fixture {
        _serial,
        tmp: _tmp,
        files,
        manifest,
        cas,
        dir,
    }) = Fixture::new()
    else {
        return;
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: one CPU, so every read arrives on its owner shard");
        return;
    }
    let _on = UringParameter::set("Y");
    let transport = ["--transport", "uring"];
    let every_cpu = MountOptions {
        shards: cpus,
        extra: &transport,
    };
    let mount = Mount::start(&manifest, &cas, &dir, every_cpu);
    let (path, big) = (dir.join(files[2].0), &files[2].1);
    let reads_per_cpu = 400u64;
    for cpu in 0..cpus {
        on_cpu(cpu, || {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            let mut buf = AlignedBuf::new(8192);
            // Block boundaries at 4 MiB: a read across the first one, then 4 KiB reads.
            let across = (4 << 20) - 4096;
            assert_eq!(file.read_at(buf.as_mut(), across).unwrap(), 8192);
            assert!(buf.as_mut()[..] == big[across as usize..across as usize + 8192]);
            for i in 0..reads_per_cpu {
                let offset = (i * 7919 % (BIG as u64 / 4096)) * 4096;
                let n = file.read_at(&mut buf.as_mut()[..4096], offset).unwrap();
                let end = (offset as usize + n).min(BIG);
                assert_eq!(n, end - offset as usize);
                assert!(
                    buf.as_mut()[..n] == big[offset as usize..end],
                    "4 KiB at {offset} on CPU {cpu}"
                );
            }
        });
    }
    let stderr = stop_cleanly(mount);
    let counts = ring_counts(&stderr).unwrap_or_else(|| panic!("no counts:\n{stderr}"));
    // The other CPUs' reads: the first few of each of the file's 4 blocks cross (the shard asks
    // for a replica after 8), as may the few that come before the copy is in.
    eprintln!("{counts:?}");
    let others = (cpus as u64 - 1) * reads_per_cpu;
    assert!(counts.replicated >= others / 2, "{counts:?}");
    assert!(counts.replicated > 4 * counts.crossed, "{counts:?}");
}
