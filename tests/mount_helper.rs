//! mount(8) and /etc/fstab: `mount_vfs install-mount-helper --prefix /sbin` puts
//! /sbin/mount.fuse.mount_vfs where mount(8) looks (it searches /sbin only), then the real
//! `mount -t fuse.mount_vfs` and `mount --fstab FILE` mount a local CAS, a file reads
//! byte-exact and `umount` ends the daemon. Guards remove the helper and unmount and kill
//! whatever is left, also when a test fails. Needs root.

mod common;
#[path = "support/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{is_mounted, job, pattern, read_all, BIN};

/// The tests share /sbin/mount.fuse.mount_vfs.
static SBIN: Mutex<()> = Mutex::new(());

const HELPER: &str = "/sbin/mount.fuse.mount_vfs";

/// The installed helper; on drop, removed (or the link that was there before put back).
struct Helper {
    previous: Option<PathBuf>,
    _lock: MutexGuard<'static, ()>,
}

impl Helper {
    /// Installs the helper, or `None` (skip or fail) without root.
    fn install(test: &str) -> Option<Helper> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            skip::skip_or_fail(test, "mount(8) runs helpers from /sbin only: needs root");
            return None;
        }
        let lock = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        let helper = Helper {
            previous: std::fs::read_link(HELPER).ok(),
            _lock: lock,
        };
        let out = Command::new(BIN)
            .args(["install-mount-helper", "--prefix", "/sbin"])
            .output()
            .unwrap();
        assert!(out.status.success(), "install: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(HELPER));
        assert_eq!(
            std::fs::read_link(HELPER).unwrap(),
            std::fs::canonicalize(BIN).unwrap()
        );
        Some(helper)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER);
        if let Some(previous) = &self.previous {
            let _ = std::os::unix::fs::symlink(previous, HELPER);
        }
    }
}

/// A mount made through mount(8). On drop: unmounted (lazily if need be) and its daemon killed.
struct Mounted {
    dir: PathBuf,
    pid: Option<i32>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if let Some(pid) = self.pid.filter(|&pid| alive(pid)) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The daemon's pid from `mount_vfs: mounted in the background (pid N, ...)`.
fn daemon_pid(out: &Output) -> Option<i32> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail = stdout.split("(pid ").nth(1)?;
    tail.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie waiting for its reaper has exited).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

fn wait_until_exited(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// A two-file job in `root`: (manifest, cas, the 3 MiB file's bytes).
fn sample_job(root: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let data = pattern(12, (3 << 20) + 123);
    let (manifest, cas) = job(
        root,
        &[("scene/plate.exr", &data), ("notes.txt", b"farm\n")],
        "2023-03-03",
    );
    (manifest, cas, data)
}

/// Reads through the mount, unmounts with umount(8), and checks the daemon is gone.
fn check_then_umount(mounted: &Mounted, data: &[u8], log: &Path) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        is_mounted(&mounted.dir),
        "not mounted; log:\n{}",
        log_text()
    );
    let pid = mounted.pid.expect("the daemon's pid");
    assert!(alive(pid));
    assert_eq!(
        read_all(&mounted.dir.join("scene/plate.exr")).unwrap(),
        data
    );
    assert_eq!(read_all(&mounted.dir.join("notes.txt")).unwrap(), b"farm\n");
    let out = Command::new("umount").arg(&mounted.dir).output().unwrap();
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&mounted.dir));
    assert!(
        wait_until_exited(pid),
        "the daemon {pid} outlived umount; log:\n{}",
        log_text()
    );
    assert!(
        log_text().contains("was unmounted externally"),
        "{}",
        log_text()
    );
}

#[test]
fn mount_t_fuse_mount_vfs_mounts_and_umount_stops_it() {
    let Some(_helper) = Helper::install("mount_t_fuse_mount_vfs_mounts_and_umount_stops_it") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (manifest, cas, data) = sample_job(root.path());
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let log = root.path().join("vfs.log");
    let out = Command::new("mount")
        .args(["-t", "fuse.mount_vfs"])
        .arg(&manifest)
        .arg(&dir)
        .arg("-o")
        .arg(format!(
            "cas={},shards=2,log_file={}",
            cas.display(),
            log.display()
        ))
        .output()
        .unwrap();
    let mounted = Mounted {
        dir: dir.clone(),
        pid: daemon_pid(&out),
    };
    assert!(
        out.status.success(),
        "mount: {}\nlog:\n{}",
        text(&out),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // mount(8) returned: the mount must already be live.
    check_then_umount(&mounted, &data, &log);
    // shards=2 reached the daemon: the second shard logged its pool.
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("shard=1"), "{log_text}");
}

#[test]
fn fstab_line_mounts_with_netdev_nofail() {
    let Some(_helper) = Helper::install("fstab_line_mounts_with_netdev_nofail") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (manifest, cas, data) = sample_job(root.path());
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let log = root.path().join("vfs.log");
    // A private fstab (mount --fstab), so the real /etc/fstab is never edited.
    let fstab = root.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# a farm node's line\n{} {} fuse.mount_vfs \
             defaults,_netdev,nofail,x-systemd.after=network-online.target,cas={},shards=2,\
             log_file={},frobnicate=1 0 0\n",
            manifest.display(),
            dir.display(),
            cas.display(),
            log.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("--fstab")
        .arg(&fstab)
        .arg(&dir)
        .output()
        .unwrap();
    let mounted = Mounted {
        dir: dir.clone(),
        pid: daemon_pid(&out),
    };
    assert!(out.status.success(), "mount --fstab: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ignoring mount option `frobnicate=1`: mount_vfs has no such flag"),
        "{}",
        text(&out)
    );
    check_then_umount(&mounted, &data, &log);
}

#[test]
fn helper_refuses_a_bad_invocation_and_fake_mounts_nothing() {
    let Some(_helper) = Helper::install("helper_refuses_a_bad_invocation_and_fake_mounts_nothing")
    else {
        return;
    };
    let out = Command::new(HELPER).arg("only-one").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected SOURCE TARGET"));
    // -f (mount -f): print the command, mount nothing.
    let out = Command::new(HELPER)
        .args(["m.json", "/nowhere", "-f", "-o", "rw,cas=/c,shards=3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("m.json /nowhere --cas=/c --shards=3 --daemon"),
        "{stderr}"
    );
}
