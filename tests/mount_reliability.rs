//! Reliability of the mount's life cycle (issue 8): small pools that must still make progress,
//! stopping with files open, stale and racing mounts, mountpoint checks, and what `--daemon`
//! does with the caller's stdio. Every test mounts the real binary and unmounts in `Drop`.

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    is_mounted, job, pattern, read_all, read_direct, signal, AlignedBuf, Mount, MountOptions, BIN,
};

/// Runs `f` on a thread and fails the test if it has not finished within `limit` (a hung read
/// would otherwise hang the whole suite).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}: hung"))
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// Mount lines for `dir` in /proc/self/mounts (two means stacked mounts).
fn mount_count(dir: &Path) -> usize {
    let canonical = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| Path::new(m) == canonical)
        .count()
}

/// A one-file job (`a.txt` = "hello") under `root`, and an empty mountpoint for it:
/// (manifest, cas, mountpoint).
fn hello_job(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (manifest, cas) = job(root, &[("a.txt", b"hello")], "2023-03-03");
    let mnt = root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (manifest, cas, mnt)
}

fn mount_args(manifest: &Path, cas: &Path, dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.arg(manifest).arg(dir).arg("--cas").arg(cas);
    command
}

/// What a command printed, or `None` for a stream still held open by a process it left behind.
struct Bounded {
    status: Option<std::process::ExitStatus>,
    stdout: Option<String>,
    stderr: Option<String>,
}

/// Runs `command` for at most `limit` (killed past it), collecting its output; a stream still
/// open `limit` after the start (held by a background child) is `None`.
// The child is reaped by `try_wait` in the loop, or by `wait` after `kill`.
#[allow(clippy::zombie_processes)]
fn run_bounded(mut command: Command, limit: Duration) -> Bounded {
    let deadline = Instant::now() + limit;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut stream: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        rx
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        // Killed for running too long: reaped, and reported as no status.
        let _ = child.kill();
        let _ = child.wait();
    }
    let left = || deadline.saturating_duration_since(Instant::now());
    Bounded {
        status,
        stdout: stdout.recv_timeout(left()).ok(),
        stderr: stderr.recv_timeout(left()).ok(),
    }
}

/// Stops the given daemons and detaches `dir` on drop, so a failing test leaves nothing behind.
struct Cleanup {
    dir: PathBuf,
    pids: Vec<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in &self.pids {
            signal(pid, libc::SIGTERM);
        }
        wait_until(Duration::from_secs(10), || !is_mounted(&self.dir));
        for &pid in &self.pids {
            signal(pid, libc::SIGKILL);
        }
        while is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Pids of mount_vfs processes serving `dir` (from their command lines).
fn daemons_of(dir: &Path) -> Vec<u32> {
    let wanted = dir.as_os_str().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"mount_vfs"))
                && args.contains(&wanted.as_bytes())
        })
        .collect()
}

#[test]
fn objects_larger_than_a_small_pool_are_read_to_the_end() {
    // Issue 8.1: with a 32 MiB pool, read-ahead windows larger than the cache evicted their
    // own blocks before the reader got there: a cold 192 MiB O_DIRECT read fetched 10.9 GB
    // from the store (54 bytes per byte) in 6.6 s, a 512 MiB one 63 bytes per byte at 22 MB/s.
    let work = tempfile::tempdir().unwrap();
    let big = pattern(81, 192 << 20);
    let small = pattern(82, 3 << 20);
    let (manifest, cas) = job(
        work.path(),
        &[("big.bin", &big), ("small.bin", &small)],
        "2023-03-03",
    );
    let options = || MountOptions::with(&["--memory-limit", "32M", "--stats"]);
    let mut mount = Mount::start(&manifest, &cas, &work.path().join("mnt"), options());
    let path = mount.dir.join("big.bin");
    let read = within(
        Duration::from_secs(120),
        "a cold O_DIRECT reader",
        move || read_direct(&path).unwrap(),
    );
    assert!(read == big, "big.bin differs");
    mount.stop();
    let fetched = mount.stats("final").unwrap()["total"]["bytes_fetched"]
        .as_u64()
        .unwrap();
    assert!(
        fetched <= 3 * big.len() as u64,
        "{fetched} bytes fetched to read {} once",
        big.len()
    );
    drop(mount);

    // Several readers of the big object at once, and a reader of another file of the shard.
    let mount = Mount::start(&manifest, &cas, &work.path().join("mnt2"), options());
    let dir = mount.dir.clone();
    let big = std::sync::Arc::new(big);
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let path = dir.join("big.bin");
            let big = big.clone();
            std::thread::spawn(move || {
                let read = if i == 0 {
                    read_direct(&path)
                } else {
                    read_all(&path)
                };
                read.unwrap() == *big
            })
        })
        .collect();
    let small_path = dir.join("small.bin");
    let small_read = within(
        Duration::from_secs(120),
        "a read of another file",
        move || read_all(&small_path).unwrap(),
    );
    assert!(small_read == small, "small.bin differs");
    within(
        Duration::from_secs(180),
        "three cold readers of big.bin",
        move || {
            for reader in readers {
                assert!(reader.join().unwrap(), "big.bin differs");
            }
        },
    );
}

#[test]
fn a_memory_limit_below_the_minimum_is_refused_with_the_fix() {
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(work.path(), &[("a", b"a")], "2023-03-03");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _cleanup = Cleanup {
        dir: mnt.clone(),
        pids: Vec::new(),
    };
    let mut command = mount_args(&manifest, &cas, &mnt);
    command.args(["--shards", "2", "--memory-limit", "32M"]);
    let output = run_bounded(command, Duration::from_secs(20));
    let stderr = output.stderr.unwrap_or_default();
    assert_eq!(output.status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(
        stderr.contains("below the 32 MiB a shard needs") && stderr.contains("--memory-limit 64M"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt));
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn the_default_pool_follows_the_manifest() {
    // Issue 8.1: a one-file mount pinned ~1 GiB whatever the manifest.
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas, mnt) = hello_job(work.path());
    let mut child = mount_args(&manifest, &cas, &mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = [0u8; 9];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    let resident = rss(child.id());
    assert_eq!(read_all(&mnt.join("a.txt")).unwrap(), b"hello");
    signal(child.id(), libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
    assert!(
        resident < 160 << 20,
        "a one-file mount is {} MiB resident",
        resident >> 20
    );
}

#[test]
fn stopping_with_files_open_detaches_and_serves_them_to_the_end() {
    // Issue 8.2: SIGTERM with files open left a stale mount and readers got EIO.
    let work = tempfile::tempdir().unwrap();
    let big = pattern(83, 48 << 20);
    let (manifest, cas) = job(
        work.path(),
        &[("big.bin", &big), ("d/x", b"x")],
        "2023-03-03",
    );
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions {
            shards: 2,
            extra: &[],
        },
    );
    let dir = mount.dir.clone();
    // A process whose working directory is in the mount.
    let mut resident = Command::new("sleep")
        .arg("30")
        .current_dir(dir.join("d"))
        .spawn()
        .unwrap();
    // Four readers: each verifies its first MiB, reports, waits for the signal, reads on.
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let path = dir.join("big.bin");
            let expected = big.clone();
            let started_tx = started_tx.clone();
            let go = go_rx.clone();
            std::thread::spawn(move || {
                let mut file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(if i % 2 == 0 { libc::O_DIRECT } else { 0 })
                    .open(&path)?;
                let mut buffer = AlignedBuf::new(1 << 20);
                let mut got = Vec::new();
                let n = file.read(buffer.as_mut())?;
                got.extend_from_slice(&buffer.as_mut()[..n]);
                assert!(got[..] == expected[..n], "reader {i}: first bytes differ");
                started_tx.send(()).unwrap();
                let _ = go.lock().unwrap().recv();
                loop {
                    match file.read(buffer.as_mut())? {
                        0 => break,
                        n => got.extend_from_slice(&buffer.as_mut()[..n]),
                    }
                }
                Ok::<bool, std::io::Error>(got == expected)
            })
        })
        .collect();
    for _ in 0..4 {
        started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a reader started");
    }
    let pid = mount.pid().unwrap();
    signal(pid, libc::SIGTERM);
    // The path is free at once: no stale mount, and a new mount could take it.
    assert!(
        wait_until(Duration::from_secs(5), || !is_mounted(&dir)),
        "still mounted after SIGTERM: {}",
        mount.stderr()
    );
    assert!(std::fs::read_dir(&dir).is_ok(), "mountpoint unusable");
    // The open files are still served, to the last byte.
    drop(go_tx);
    for reader in readers {
        assert!(reader.join().unwrap().unwrap(), "a reader got wrong bytes");
    }
    let alive = || Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid);
    assert!(
        alive(),
        "exited while the working directory was still in use"
    );
    resident.kill().unwrap();
    resident.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !alive()),
        "did not exit once the last user was gone"
    );
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = mount.stderr();
    assert!(log.contains("detached it"), "{log}");
    assert!(!log.contains("Unmount failed"), "{log}");
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
        .unwrap_or(true)
}

#[test]
fn files_held_past_the_grace_period_do_not_keep_the_process() {
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(work.path(), &[("a.txt", b"hello")], "2023-03-03");
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--stop-grace", "1"]),
    );
    let held = std::fs::File::open(mount.dir.join("a.txt")).unwrap();
    let pid = mount.pid().unwrap();
    let started = Instant::now();
    signal(pid, libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(10), || zombie(pid)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(!is_mounted(&mount.dir));
    let mut byte = [0u8; 1];
    let error = std::os::unix::fs::FileExt::read_at(&held, &mut byte, 0).unwrap_err();
    assert!(
        common::dead_connection_errnos().contains(&error.raw_os_error().unwrap_or(0)),
        "{error}"
    );
    let log = mount.stderr();
    assert!(log.contains("were not closed in time"), "{log}");
}

#[test]
fn a_stale_mount_of_a_killed_process_is_cleaned_by_the_next_mount() {
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(work.path(), &[("a.txt", b"hello")], "2023-03-03");
    let mnt = work.path().join("mnt");
    let mut killed = Mount::start(&manifest, &cas, &mnt, MountOptions::default());
    signal(killed.pid().unwrap(), libc::SIGKILL);
    if let Some(mut child) = killed.take_child() {
        child.wait().unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_dir(&mnt).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
    }));
    let mut second = Mount::start(&manifest, &cas, &mnt, MountOptions::default());
    assert_eq!(read_all(&mnt.join("a.txt")).unwrap(), b"hello");
    assert_eq!(
        mount_count(&mnt),
        1,
        "the stale mount is still under the new one"
    );
    let log = second.stderr();
    assert!(log.contains("was a stale FUSE mount"), "{log}");
}

#[test]
fn racing_mounts_on_one_mountpoint_leave_exactly_one() {
    // Issue 8.3: four `--daemon` mounts started together all succeeded, stacked on MNT.
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas, mnt) = hello_job(work.path());
    let mut cleanup = Cleanup {
        dir: mnt.clone(),
        pids: Vec::new(),
    };
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let mut command = mount_args(&manifest, &cas, &mnt);
            command.args(["--daemon", "--shards", "1"]);
            std::thread::spawn(move || run_bounded(command, Duration::from_secs(30)))
        })
        .collect();
    let outcomes: Vec<Bounded> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let mounts = mount_count(&mnt);
    cleanup.pids = daemons_of(&mnt);
    let winners = outcomes
        .iter()
        .filter(|o| o.status.is_some_and(|s| s.success()))
        .count();
    assert_eq!(mounts, 1, "stacked mounts");
    assert_eq!(winners, 1, "{} mounts reported success", winners);
    assert_eq!(cleanup.pids.len(), 1, "daemons left: {:?}", cleanup.pids);
    for loser in outcomes
        .iter()
        .filter(|o| o.status.is_some_and(|s| !s.success()))
    {
        let err = loser.stderr.clone().unwrap_or_default();
        assert!(
            err.contains(&format!("mount_vfs pid {}", cleanup.pids[0]))
                || err.contains("is already a mount point"),
            "{err}"
        );
    }
}

#[test]
fn a_non_empty_mountpoint_is_refused_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas, mnt) = hello_job(work.path());
    std::fs::write(mnt.join("precious.txt"), b"mine").unwrap();
    let cleanup = Cleanup {
        dir: mnt.clone(),
        pids: Vec::new(),
    };
    let output = run_bounded(mount_args(&manifest, &cas, &mnt), Duration::from_secs(20));
    let stderr = output.stderr.unwrap_or_default();
    assert!(output.status.is_some_and(|s| !s.success()), "{stderr}");
    drop(cleanup);
    assert!(
        stderr.contains("not empty") && stderr.contains("precious.txt"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt));
    let mount = Mount::start(
        &manifest,
        &cas,
        &mnt,
        MountOptions::with(&["--allow-non-empty"]),
    );
    assert_eq!(read_all(&mount.dir.join("a.txt")).unwrap(), b"hello");
    drop(mount);
    assert_eq!(std::fs::read(mnt.join("precious.txt")).unwrap(), b"mine");
}

#[test]
fn daemon_mode_lets_go_of_the_callers_stdio_and_reports_its_errors() {
    // Issue 8: the background process kept the caller's stderr, so a pipe never closed.
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas, mnt) = hello_job(work.path());
    let mut cleanup = Cleanup {
        dir: mnt.clone(),
        pids: Vec::new(),
    };
    let log = work.path().join("vfs.log");
    let mut command = mount_args(&manifest, &cas, &mnt);
    command
        .args(["--daemon", "--shards", "1", "--log-file"])
        .arg(&log);
    let output = run_bounded(command, Duration::from_secs(20));
    cleanup.pids = daemons_of(&mnt);
    assert!(output.status.is_some_and(|s| s.success()));
    assert!(
        output.stderr.is_some(),
        "the daemon holds the caller's stderr open"
    );
    let out = output
        .stdout
        .expect("the daemon holds the caller's stdout open");
    assert!(out.contains(&format!("(pid {}", cleanup.pids[0])), "{out}");
    assert_eq!(read_all(&mnt.join("a.txt")).unwrap(), b"hello");
    // A second daemon on the same mountpoint fails, and its parent says why.
    let mut command = mount_args(&manifest, &cas, &mnt);
    command.args(["--daemon", "--shards", "1"]);
    let second = run_bounded(command, Duration::from_secs(20));
    let err = second.stderr.unwrap_or_default();
    assert!(second.status.is_some_and(|s| !s.success()), "{err}");
    assert!(err.contains("already"), "{err}");
    let pid = cleanup.pids[0];
    signal(pid, libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(20), || !is_mounted(&mnt)));
    assert!(wait_until(Duration::from_secs(5), || zombie(pid)));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("received SIGTERM; unmounted"), "{logged}");
}

#[test]
fn stats_are_quiet_while_idle_and_count_first_read_misses() {
    let work = tempfile::tempdir().unwrap();
    let data = pattern(84, 5 << 20);
    let (manifest, cas) = job(work.path(), &[("a.bin", &data)], "2023-03-03");
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &work.path().join("mnt"),
        MountOptions::with(&["--stats"]),
    );
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    std::thread::sleep(Duration::from_millis(3500));
    mount.stop();
    let intervals = mount
        .stderr()
        .lines()
        .filter(|l| l.contains("\"interval\""))
        .count();
    assert!(intervals <= 2, "{intervals} interval lines for one read");
    let total = &mount.stats("final").unwrap()["total"];
    assert!(total["cache_misses"].as_u64().unwrap() >= 2, "{total}");
    assert_eq!(total["opens"], total["releases"]);
}
