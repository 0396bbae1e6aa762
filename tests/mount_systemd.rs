//! systemd: the example unit (contrib/systemd/mount-vfs.service) passes `systemd-analyze
//! verify`, and a mount started with NOTIFY_SOCKET sends READY=1 only once the files are there
//! and STOPPING=1 at SIGTERM, as systemd's notify protocol expects. Needs root and /dev/fuse.

mod common;
#[path = "support/skip.rs"]
mod skip;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{is_mounted, job, pattern, read_all, signal, BIN};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/mount-vfs.service"
);

#[test]
fn example_unit_passes_systemd_analyze_verify() {
    let test = "example_unit_passes_systemd_analyze_verify";
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip::skip_or_fail(test, "systemd-analyze is not installed (package systemd)");
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/mount_vfs "));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("mount-vfs.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/mount_vfs", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on mere warnings (an unknown Type=, say): a clean unit prints nothing.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{}: {stderr}",
        out.status
    );
}

/// The mount process; on drop, killed and its mountpoint lazily unmounted.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let n = socket
        .recv(&mut buffer)
        .expect("a notification within 30 s");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[test]
fn ready_is_sent_once_the_mount_is_live_and_stopping_at_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let data = pattern(21, (1 << 20) + 5);
    let (manifest, cas) = job(root.path(), &[("in/a.bin", &data)], "2023-03-03");
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let socket_path = root.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = root.path().join("vfs.log");
    let child = Command::new(BIN)
        .arg(&manifest)
        .arg(&dir)
        .arg("--cas")
        .arg(&cas)
        .args(["--shards", "1", "--log-file"])
        .arg(&log)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child,
        dir: dir.clone(),
    };
    let ready = receive(&socket);
    // Right at receipt, before anything else: the files must already be served.
    let stat = std::fs::metadata(dir.join("in/a.bin"));
    assert!(
        stat.as_ref().is_ok_and(|m| m.len() == data.len() as u64),
        "READY=1 before the mount was live: {stat:?}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", daemon.child.id())),
        "{ready}"
    );
    assert!(ready.contains("STATUS=mounted"), "{ready}");
    assert_eq!(read_all(&dir.join("in/a.bin")).unwrap(), data);

    signal(daemon.child.id(), libc::SIGTERM);
    let stopping = receive(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = wait(&mut daemon.child);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!is_mounted(&dir));
    assert_no_more(&socket);
}

fn wait(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Nothing but the two notifications was sent.
fn assert_no_more(socket: &UnixDatagram) {
    socket.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 4096];
    assert!(
        socket.recv(&mut buffer).is_err(),
        "an unexpected notification"
    );
}

#[test]
fn daemon_child_notifies_with_its_own_pid_and_stopping_at_umount() {
    let root = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(root.path(), &[("b.txt", b"daemon\n")], "2023-03-03");
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let socket_path = root.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let out = Command::new(BIN)
        .arg(&manifest)
        .arg(&dir)
        .arg("--cas")
        .arg(&cas)
        .args(["--shards", "1", "--daemon"])
        .env("NOTIFY_SOCKET", &socket_path)
        .output()
        .unwrap();
    // Whatever happens below, the mount goes (the daemon ends with it).
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if is_mounted(&self.0) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
    let _unmount = Unmount(dir.clone());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let pid: u32 = stdout
        .split("(pid ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout}"));
    // The parent returned after the mount was ready; the child (not the process systemd
    // started) sent READY=1 naming itself.
    let ready = receive(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={pid}")),
        "{ready}"
    );
    assert_eq!(read_all(&dir.join("b.txt")).unwrap(), b"daemon\n");
    let status = Command::new("umount").arg(&dir).status().unwrap();
    assert!(status.success());
    let stopping = receive(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}
