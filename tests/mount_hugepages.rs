//! `--hugepages reserve`: as root, the mount adds the 2 MiB pages its pools need to
//! nr_hugepages, says how many the kernel granted in one line, and takes them back at exit. The
//! test reports what it observed: where the kernel grants none it checks the line says so and
//! nothing changed. It changes a system-wide setting; no other test in this binary does, and the
//! guard puts the old value back if the mount did not.

mod common;
#[path = "support/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::{job, pattern, read_all, signal, Mount, MountOptions, BIN};

/// The tests here compare nr_hugepages before and after: one at a time.
static SYSTEM: Mutex<()> = Mutex::new(());

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Puts nr_hugepages back to what it was on drop, whatever the mount did.
struct Restore(u64);

impl Drop for Restore {
    fn drop(&mut self) {
        if nr_hugepages() != self.0 {
            let _ = std::fs::write(NR_HUGEPAGES, self.0.to_string());
        }
    }
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let tail = text.split(prefix).nth(1)?;
    tail.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn reserve_adds_the_pools_pages_and_gives_them_back() {
    let test = "reserve_adds_the_pools_pages_and_gives_them_back";
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip::skip_or_fail(test, "reserving hugepages needs root");
        return;
    }
    let single_node = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
                .count()
                <= 1
        })
        .unwrap_or(true);
    let _system = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let before = nr_hugepages();
    let _restore = Restore(before);
    let root = tempfile::tempdir().unwrap();
    let data = pattern(5, (2 << 20) + 77);
    let (manifest, cas) = job(root.path(), &[("a.bin", &data)], "2023-03-03");
    // Two shards of 32 MiB: 32 pages.
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &root.path().join("mnt"),
        MountOptions {
            shards: 2,
            extra: &["--hugepages", "reserve", "--memory-limit", "64M"],
        },
    );
    assert_eq!(read_all(&mount.dir.join("a.bin")).unwrap(), data);
    let during = nr_hugepages();
    let log = mount.stderr();
    let granted = number_after(&log, "--hugepages reserve: reserved ")
        .unwrap_or_else(|| panic!("no reservation line:\n{log}"));
    assert!(
        log.contains(&format!(
            "reserved {granted} of the 32 2 MiB hugepages the 2 shards"
        )),
        "{log}"
    );
    eprintln!("observed: nr_hugepages {before} before, {during} while mounted; granted {granted}");
    if single_node {
        assert_eq!(during, before + granted, "{log}");
    } else {
        assert!(during >= before + granted, "{log}");
    }
    if granted == 32 {
        // Every pool on explicit hugepages.
        assert_eq!(log.matches("memory=hugetlb").count(), 2, "{log}");
    }
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = mount.stderr();
    assert_eq!(nr_hugepages(), before, "not given back:\n{log}");
    if granted > 0 {
        assert!(
            log.contains(&format!("gave back {granted} hugepages")),
            "{log}"
        );
    }
}

/// The process and its private mount namespace; killed on drop (the namespace, and the FUSE
/// mount in it, go with it).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn refused_reservation_is_one_line_and_mounts_like_auto() {
    let test = "refused_reservation_is_one_line_and_mounts_like_auto";
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip::skip_or_fail(test, "unshare -m needs root");
        return;
    }
    let _system = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let before = nr_hugepages();
    let root = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(root.path(), &[("a.bin", b"abc")], "2023-03-03");
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    // Root, but in a mount namespace where /proc/sys is read-only: the write is refused as it
    // is for a plain user, and the mount, private to the namespace, needs no cleanup outside.
    let script = format!(
        "mount --bind -o ro /proc/sys /proc/sys && exec {BIN} {} {} --cas {} --shards 1 \
         --hugepages reserve",
        manifest.display(),
        dir.display(),
        cas.display()
    );
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut child = Killed(child);
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("mounted"));
    assert!(ready.is_some(), "the mount did not become ready");
    signal(child.0.id(), libc::SIGTERM);
    let status = child.0.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert_eq!(
        log.matches("--hugepages reserve: cannot reserve hugepages")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("as with --hugepages auto"), "{log}");
    assert!(!log.contains("gave back"), "{log}");
    assert_eq!(nr_hugepages(), before);
}
