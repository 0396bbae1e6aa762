//! `mount_vfs stats MOUNTPOINT`: reads the running daemon's counters through the root's
//! `user.mount_vfs.stats` attribute (no --metrics-addr), and they agree with what was read.

mod common;

use std::process::Command;

use common::{job, pattern, read_all, Mount, MountOptions, BIN};

fn stats(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(BIN).arg("stats").args(args).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn stats_shows_what_the_mount_served() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(41, (3 << 20) + 77);
    let small = pattern(42, 5000);
    let (manifest, cas) = job(
        tmp.path(),
        &[("a.bin", &data), ("b.bin", &small)],
        "2023-03-03",
    );
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 2,
            extra: &[],
        },
    );
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    assert!(read_all(&mount.dir.join("b.bin")).unwrap() == small);
    let dir = mount.dir.to_str().unwrap().to_owned();

    let (code, out, err) = stats(&[&dir, "--once", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let snapshot: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let shards = snapshot["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{out}");
    let sum = |name: &str| -> u64 { shards.iter().map(|s| s[name].as_u64().unwrap()).sum() };
    // A cold buffered read through FUSE reaches the daemon for every byte once.
    assert_eq!(sum("bytes_served"), (data.len() + small.len()) as u64);
    assert_eq!(sum("objects_verified"), 2);
    assert_eq!(sum("store_reads_in_flight"), 0);
    assert_eq!(snapshot["pid"].as_u64(), mount.pid().map(u64::from));

    let (code, out, err) = stats(&[&dir, "--once"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "header, 2 shards, total:\n{out}");
    assert!(
        lines[0].contains("served") && lines[0].contains("hit rate"),
        "{out}"
    );
    assert!(lines[3].trim_start().starts_with("total"), "{out}");
    assert!(
        lines[3].contains("3.0 MiB"),
        "all bytes served so far: {out}"
    );
    println!("{out}");

    // A directory that is no mount, a file inside the mount, a path that does not exist.
    for path in [
        tmp.path().to_str().unwrap().to_owned(),
        format!("{dir}/a.bin"),
        tmp.path().join("nowhere").to_str().unwrap().to_owned(),
    ] {
        let (code, _, err) = stats(&[&path, "--once"]);
        assert_eq!(code, Some(2), "{path}: {err}");
        assert!(err.starts_with("mount_vfs stats: "), "{err}");
    }
    let (_, _, err) = stats(&[tmp.path().to_str().unwrap(), "--once"]);
    assert!(
        err.contains("is not the mountpoint of a running mount_vfs"),
        "{err}"
    );
    mount.stop();
}
