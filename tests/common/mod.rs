//! Shared harness for tests that mount real FUSE filesystems.
//!
//! [`Mount`] runs the real `mount_vfs` binary and unmounts in `Drop`, also when a test panics:
//! SIGTERM first (the clean path), then SIGKILL and a lazy unmount if the process hangs, so no
//! test leaves a mount behind.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod model;
pub mod s3_servers;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mount_vfs");

/// Whether this run's mounts are served over FUSE over io_uring: `MOUNT_VFS_TRANSPORT=uring`,
/// as scripts/test.sh's second pass sets it for every mount that names no `--transport`.
pub fn over_ring() -> bool {
    std::env::var("MOUNT_VFS_TRANSPORT").is_ok_and(|t| t == "uring")
}

/// The errnos a request ends with once the daemon serving it is gone: ENOTCONN, or ECONNABORTED
/// while the abort races the request. Over the ring, a request the kernel was handing to the dead
/// daemon's ring ends with ECANCELED instead (fuse's ring send sees the task dead); CI saw it once
/// for a read of a held file right after the daemon exited.
pub fn dead_connection_errnos() -> &'static [i32] {
    if over_ring() {
        &[libc::ENOTCONN, libc::ECONNABORTED, libc::ECANCELED]
    } else {
        &[libc::ENOTCONN, libc::ECONNABORTED]
    }
}

/// Deterministic pseudo-random bytes (xorshift), so big files need no fixtures on disk.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `mount_vfs snapshot` on `tree`, filling `cas`; returns the manifest path.
pub fn snapshot(tree: &Path, cas: &Path, format: &str, manifest: &Path) {
    let output = Command::new(BIN)
        .args(["snapshot"])
        .arg(tree)
        .arg("--cas")
        .arg(cas)
        .arg("--format")
        .arg(format)
        .arg("--output")
        .arg(manifest)
        .output()
        .expect("run mount_vfs snapshot");
    assert!(
        output.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes `files` (relative path, bytes) under `root/tree` and snapshots them into `root/cas`;
/// returns (manifest, cas).
pub fn job(root: &Path, files: &[(&str, &[u8])], format: &str) -> (PathBuf, PathBuf) {
    let tree = root.join("tree");
    for (path, bytes) in files {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::create_dir_all(&tree).unwrap();
    let cas = root.join("cas");
    let manifest = root.join("job.manifest");
    snapshot(&tree, &cas, format, &manifest);
    (manifest, cas)
}

/// A running mount. Dropping it unmounts and stops the process.
pub struct Mount {
    pub dir: PathBuf,
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    stderr_lines: Vec<String>,
}

pub struct MountOptions<'a> {
    pub shards: usize,
    pub extra: &'a [&'a str],
}

impl<'a> MountOptions<'a> {
    /// One shard and these extra flags.
    pub fn with(extra: &'a [&'a str]) -> MountOptions<'a> {
        MountOptions { shards: 1, extra }
    }
}

impl Default for MountOptions<'_> {
    fn default() -> Self {
        MountOptions {
            shards: 1,
            extra: &[],
        }
    }
}

impl Mount {
    /// Mounts `manifest` from `cas` on `dir`, waiting for the ready line.
    pub fn start(manifest: &Path, cas: &Path, dir: &Path, options: MountOptions<'_>) -> Mount {
        let cas = cas.to_str().expect("UTF-8 CAS path");
        Mount::start_with_store(manifest, &["--cas", cas], &[], dir, options)
    }

    /// Mounts `manifest` writable (`--writable`, overlay state in `cache_dir`) with 1 MiB
    /// blocks (`--part-size 1M`) and `shards` shards.
    pub fn writable(
        manifest: &Path,
        cas: &Path,
        cache_dir: &Path,
        dir: &Path,
        shards: usize,
    ) -> Mount {
        let cache = cache_dir.to_str().expect("UTF-8 cache path");
        let extra = ["--writable", "--cache-dir", cache, "--part-size", "1M"];
        Mount::start(
            manifest,
            cas,
            dir,
            MountOptions {
                shards,
                extra: &extra,
            },
        )
    }

    /// Stops this writable mount, which must exit cleanly, and mounts the same overlay again on
    /// the same mountpoint.
    pub fn remount_writable(
        &mut self,
        manifest: &Path,
        cas: &Path,
        cache_dir: &Path,
        shards: usize,
    ) {
        let status = self.stop();
        assert!(
            status.is_some_and(|s| s.success()),
            "the writable mount did not stop cleanly ({status:?}):\n{}",
            self.stderr()
        );
        *self = Mount::writable(manifest, cas, cache_dir, &self.dir.clone(), shards);
    }

    /// Mounts `manifest` with the given store flags (e.g. `--s3 ...`) and extra environment.
    pub fn start_with_store(
        manifest: &Path,
        store: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
        options: MountOptions<'_>,
    ) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(BIN)
            .arg(manifest)
            .arg(dir)
            .args(store)
            .envs(env.iter().copied())
            .args(["--shards", &options.shards.to_string()])
            .args(
                (!options.extra.contains(&"--memory-limit"))
                    .then_some(["--memory-limit", "256M"])
                    .into_iter()
                    .flatten(),
            )
            .args(options.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mount_vfs");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = ready_tx.send(line);
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let mut mount = Mount {
            dir: dir.to_path_buf(),
            child: Some(child),
            stderr: err_rx,
            stderr_lines: Vec::new(),
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("mounted") => mount,
            other => {
                let status = mount.stop();
                panic!(
                    "mount did not become ready ({other:?}, exit {status:?}); stderr:\n{}",
                    mount.stderr_lines.join("\n")
                );
            }
        }
    }

    fn drain_stderr(&mut self) {
        while let Ok(line) = self.stderr.try_recv() {
            self.stderr_lines.push(line);
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&mut self) -> String {
        self.drain_stderr();
        self.stderr_lines.join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, wait for a clean exit (then SIGKILL + lazy unmount as a last resort).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Collect the remaining stderr (the reader thread ends at EOF).
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = self
            .stderr
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            self.stderr_lines.push(line);
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        status
    }

    /// The daemon process, which the mount no longer stops or cleans up after (for tests of
    /// what a crash leaves behind).
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// The last `--stats` JSON line the daemon printed with this label (`final` after stop).
    pub fn stats(&mut self, label: &str) -> Option<serde_json::Value> {
        self.drain_stderr();
        self.stderr_lines
            .iter()
            .rev()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|v| v["stats"] == label)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `dir` is a mount point right now (per /proc/self/mounts).
pub fn is_mounted(dir: &Path) -> bool {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| Path::new(m) == canonical)
}

/// The whole answer (status line, headers, body) to `GET /metrics` on 127.0.0.1:`port`.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The sum of the samples of metric `name` whose line contains `filter`.
pub fn metric_total(body: &str, name: &str, filter: &str) -> u64 {
    body.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(filter))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Reads a whole file through the mount.
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

/// Reads `path` 1 MiB at a time until an error, checking every chunk a read returned against
/// `expected` (so a test of "never served" cannot pass by discarding what came before the
/// error); returns how many bytes were served, and the error. Panics on a wrong byte, or if the
/// whole file reads without error.
pub fn read_until_error(path: &Path, expected: &[u8]) -> (usize, std::io::Error) {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => return (0, e),
    };
    let mut buffer = vec![0u8; 1 << 20];
    let mut offset = 0;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => panic!("{} read to the end without an error", path.display()),
            Ok(n) => {
                assert!(
                    buffer[..n] == expected[offset..offset + n],
                    "wrong bytes served at offset {offset} of {}",
                    path.display()
                );
                offset += n;
            }
            Err(e) => return (offset, e),
        }
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A 4 KiB-aligned buffer for O_DIRECT reads.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size (callers ask for whole pages).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes until drop.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Reads a whole file through the mount with O_DIRECT, 1 MiB at a time.
pub fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut buffer = AlignedBuf::new(1 << 20);
    let mut out = Vec::new();
    loop {
        match file.read(buffer.as_mut())? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buffer.as_mut()[..n]),
        }
    }
}
