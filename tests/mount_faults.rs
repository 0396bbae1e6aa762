//! What users see when things go wrong: missing and corrupt CAS objects, bad manifests, bad
//! mountpoints, and SIGTERM while readers are busy.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{job, pattern, read_all, AlignedBuf, Mount, MountOptions, BIN};

fn object_path(cas: &Path, content: &[u8]) -> std::path::PathBuf {
    cas.join(format!(
        "Data/{:032x}.xxh128",
        xxhash_rust::xxh3::xxh3_128(content)
    ))
}

#[test]
fn missing_and_corrupt_objects_give_eio_while_the_rest_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let good = pattern(1, 5 << 20);
    let missing = pattern(2, 100_000);
    let corrupt = pattern(3, 6 << 20);
    let (manifest, cas) = job(
        tmp.path(),
        &[
            ("good.bin", &good),
            ("missing.bin", &missing),
            ("corrupt.bin", &corrupt),
        ],
        "2023-03-03",
    );
    fs::remove_file(object_path(&cas, &missing)).unwrap();
    // Same size, one flipped byte in the last block: only the hash can tell.
    let mut damaged = corrupt.clone();
    damaged[(6 << 20) - 10] ^= 0xff;
    fs::write(object_path(&cas, &corrupt), &damaged).unwrap();

    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 2,
            ..Default::default()
        },
    );
    for _ in 0..3 {
        let err = read_all(&mount.dir.join("missing.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let err = read_all(&mount.dir.join("corrupt.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(read_all(&mount.dir.join("good.bin")).unwrap() == good);
    }
    // Not even the first bytes of the corrupt file, which are intact on disk, are served.
    let mut file = fs::File::open(mount.dir.join("corrupt.bin")).unwrap();
    let mut first = [0u8; 4096];
    let err = std::io::Read::read(&mut file, &mut first).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Metadata keeps working.
    assert_eq!(
        fs::metadata(mount.dir.join("corrupt.bin")).unwrap().len(),
        6 << 20
    );
    // Closed before stopping: an open file would keep the detached mount serving it.
    drop(file);
    mount.stop();
    let log = mount.stderr();
    assert!(
        log.contains("corrupt.bin") && log.contains("corrupt"),
        "log names the corrupt file: {log}"
    );
    assert!(
        log.contains("missing.bin") && log.contains("missing"),
        "log names the missing file: {log}"
    );
    // One line per failing object per shard, not one per read.
    assert!(log.matches("missing.bin").count() <= 2, "{log}");
}

/// An object that changes in the store after it was verified: the blocks the verification pass
/// could not keep are read again later, and a changed one is refused (EIO), never served.
#[test]
fn an_object_changed_after_verification_is_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    // 200 MiB: more than a 256 MiB pool keeps during verification (its cache budget less the
    // headroom), so the tail is read from the store a second time.
    let big = pattern(7, 200 << 20);
    let (manifest, cas) = job(tmp.path(), &[("big.bin", &big)], "2023-03-03");
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 1,
            extra: &["--stats"],
        },
    );
    let path = mount.dir.join("big.bin");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut buf = AlignedBuf::new(1 << 20);
    file.read_exact(buf.as_mut()).unwrap();
    assert!(buf.as_mut()[..] == big[..1 << 20]);
    // Verified; now one byte near the end changes in the CAS.
    let changed_at = (199 << 20) + 12345;
    let mut changed = big.clone();
    changed[changed_at] ^= 0x40;
    fs::write(object_path(&cas, &big), &changed).unwrap();

    let mut offset = 1usize << 20;
    let error = loop {
        match file.read(buf.as_mut()) {
            Ok(0) => panic!("read the whole file although its tail changed in the store"),
            Ok(n) => {
                assert!(
                    buf.as_mut()[..n] == big[offset..offset + n],
                    "wrong bytes at {offset}"
                );
                offset += n;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    assert!(
        offset <= changed_at,
        "the changed block was reached at {offset}"
    );
    drop(file);
    mount.stop();
    let log = mount.stderr();
    assert!(log.contains("differs from the verified object"), "{log}");
    let total = &mount.stats("final").unwrap()["total"];
    // Fetched twice and refused twice, by the read-ahead and then by the read itself at most:
    // a failed object is retried on demand, not by every read-ahead.
    let failures = total["verify_failures"].as_u64().unwrap();
    assert!(
        (2..=4).contains(&failures),
        "{failures} verification failures"
    );
}

#[test]
fn bad_manifest_exits_non_zero_before_mounting_and_names_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let cas = tmp.path().join("cas");
    fs::create_dir_all(&mnt).unwrap();
    fs::create_dir_all(cas.join("Data")).unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "truncated",
            r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{"hash":"#,
        ),
        (
            "escape",
            r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{"hash":"df8d09e93f874900a99b8775cc15b6c7","mtime":1,"path":"../etc/passwd","size":11}],"totalSize":11}"#,
        ),
        (
            "version",
            r#"{"hashAlg":"xxh128","manifestVersion":"1999-01-01","paths":[],"totalSize":0}"#,
        ),
    ];
    for (name, text) in cases {
        let manifest = tmp.path().join(format!("{name}.json"));
        fs::write(&manifest, text).unwrap();
        let output = Command::new(BIN)
            .arg(&manifest)
            .arg(&mnt)
            .arg("--cas")
            .arg(&cas)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: must fail");
        assert!(
            stderr.contains(&format!("{name}.json")),
            "{name}: names the manifest: {stderr}"
        );
        assert!(!common::is_mounted(&mnt), "{name}: nothing mounted");
    }
}

#[test]
fn unsupported_flags_and_missing_store_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let manifest = tmp.path().join("m.json");
    fs::write(
        &manifest,
        r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[],"totalSize":0}"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg(&manifest)
            .arg(&mnt)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--writable"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("give --cache-dir DIR too"), "{err}");
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--cas"), "{err}");
    let (code, err) = run(&["--cas", "/nonexistent/cas"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no Data/ directory"), "{err}");
    let (code, err) = run(&["--part-size", "3M"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a power of two"), "{err}");
    let cas = tmp.path().join("cas");
    fs::create_dir_all(cas.join("Data")).unwrap();
    let cas = cas.to_str().unwrap();
    let too_large = ["--cas", cas, "--shards", "1", "--memory-limit", "256M"];
    let (code, err) = run(&[&too_large[..], &["--part-size", "64M"]].concat());
    assert_eq!(code, Some(2));
    assert!(
        err.contains("below the 512 MiB a shard needs (8 reads of --part-size 64 MiB"),
        "{err}"
    );
}

#[test]
fn sigterm_under_load_unmounts_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("f{i}.bin")).collect();
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 8 << 20)).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .map(String::as_str)
        .zip(contents.iter().map(Vec::as_slice))
        .collect();
    let (manifest, cas) = job(tmp.path(), &files, "2023-03-03");
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 2,
            ..Default::default()
        },
    );
    // Each reader reads its whole file over and over and checks every read; the signal waits
    // until each has read and verified its file at least once.
    let (verified_tx, verified_rx) = std::sync::mpsc::channel();
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let path = mount.dir.join(format!("f{i}.bin"));
            let expected = contents[i].clone();
            let verified_tx = verified_tx.clone();
            std::thread::spawn(move || {
                let mut whole_reads = 0;
                // Until the mount goes away (an open of the freed path fails then).
                while let Ok(bytes) = read_all(&path) {
                    assert!(bytes == expected, "reader {i} got wrong bytes");
                    whole_reads += 1;
                    if whole_reads == 1 {
                        verified_tx.send(()).unwrap();
                    }
                    if whole_reads == 1000 {
                        break;
                    }
                }
                whole_reads
            })
        })
        .collect();
    for _ in 0..4 {
        verified_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every reader verified its file before the signal");
    }
    let status = mount.stop().expect("exits by itself after SIGTERM");
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        mount.stderr()
    );
    assert!(!common::is_mounted(&mount.dir));
    for r in readers {
        assert!(r.join().unwrap() >= 1);
    }
    assert!(mount.stderr().contains("SIGTERM"));
}

/// Removes a mount left by a test, whatever state it is in.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn small_job(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    job(tmp, &[("a.txt", b"daemon bytes")], "2023-03-03")
}

#[test]
fn daemon_returns_once_mounted_and_exits_on_external_unmount() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, cas) = small_job(tmp.path());
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let _guard = Unmount(&mnt);
    let output = Command::new(BIN)
        .arg(&manifest)
        .arg(&mnt)
        .args(["--cas"])
        .arg(&cas)
        .args(["--shards", "1", "--memory-limit", "64M", "--daemon"])
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pid: i32 = stdout
        .rsplit_once("pid ")
        .and_then(|(_, rest)| rest.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("pid in {stdout}"));
    // Mounted when the command returned: no polling needed.
    assert!(common::is_mounted(&mnt));
    assert_eq!(fs::read(mnt.join("a.txt")).unwrap(), b"daemon bytes");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // SAFETY: kill with signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon {pid} still running after unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stale mount (the daemon killed hard) is cleaned by the next mount: see
/// `mount_reliability.rs`.
#[test]
fn a_busy_mountpoint_names_the_process_serving_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, cas) = small_job(tmp.path());
    let mnt = tmp.path().join("mnt");
    let _guard = Unmount(&mnt);
    let mount = Mount::start(&manifest, &cas, &mnt, MountOptions::default());
    let second = |mnt: &Path| {
        let out = Command::new(BIN)
            .arg(&manifest)
            .arg(mnt)
            .arg("--cas")
            .arg(&cas)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = second(&mnt);
    assert!(!ok);
    let holder = format!("served by mount_vfs pid {}", mount.pid().unwrap());
    assert!(err.contains(&holder), "{err}");
    drop(mount);
}

/// Other users are kept out unless `--allow-other` lets them in (then file modes apply).
#[test]
fn allow_other_lets_other_users_read() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (manifest, cas) = job(tmp.path(), &[("a.txt", b"for everyone")], "2023-03-03");
    let cat_as_nobody = |mnt: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(mnt.join("a.txt"))
            .output()
            .unwrap()
    };
    let mnt = tmp.path().join("mnt");
    {
        let _mount = Mount::start(&manifest, &cas, &mnt, MountOptions::default());
        let out = cat_as_nobody(&mnt);
        assert!(
            !out.status.success(),
            "another user must be refused without --allow-other"
        );
    }
    let _mount = Mount::start(
        &manifest,
        &cas,
        &mnt,
        MountOptions {
            extra: &["--allow-other"],
            ..Default::default()
        },
    );
    let out = cat_as_nobody(&mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"for everyone");
}
