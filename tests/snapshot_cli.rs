//! `mount_vfs snapshot --format 2025-12-04-beta` and `mount_vfs validate` through the binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use mount_vfs::manifest::{Content, EntryKind, Format, Hash, Manifest, CHUNK_SIZE};

const BIN: &str = env!("CARGO_BIN_EXE_mount_vfs");

fn snapshot(root: &Path, cas: &Path, format: &str) -> Vec<u8> {
    let o = Command::new(BIN)
        .arg("snapshot")
        .arg(root)
        .arg("--cas")
        .arg(cas)
        .args(["--format", format])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

#[test]
fn v2025_snapshot_keeps_symlinks_dirs_exec_and_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("scene/tex")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("scene/a.txt"), b"hello world").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("scene/latest.txt")).unwrap();
    std::os::unix::fs::symlink("../../scene/a.txt", root.join("scene/tex/up.txt")).unwrap();
    std::os::unix::fs::symlink("../../outside", root.join("scene/escape")).unwrap();
    // A sparse file one byte over the chunk size: two chunks, the second of one byte.
    let big = fs::File::create(root.join("scene/tex/big.bin")).unwrap();
    big.set_len(CHUNK_SIZE + 1).unwrap();
    drop(big);

    let cas = tmp.path().join("cas");
    let bytes = snapshot(&root, &cas, "2025-12-04-beta");
    let m = Manifest::decode(&bytes, "snap").unwrap();
    assert_eq!(m.format(), Format::V2025_12_04Beta);
    let kind = |p: &[u8]| {
        m.get(
            m.find(p)
                .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(p))),
        )
        .unwrap()
        .kind
    };
    assert_eq!(kind(b"empty"), EntryKind::Dir);
    assert_eq!(
        kind(b"scene/latest.txt"),
        EntryKind::Symlink {
            target: b"scene/a.txt"
        }
    );
    assert_eq!(
        kind(b"scene/tex/up.txt"),
        EntryKind::Symlink {
            target: b"scene/a.txt"
        }
    );
    assert!(
        m.find(b"scene/escape").is_none(),
        "a link leaving the root is skipped"
    );
    match kind(b"run.sh") {
        EntryKind::File(f) => assert!(f.executable),
        k => panic!("{k:?}"),
    }
    match kind(b"scene/a.txt") {
        EntryKind::File(f) => {
            assert!(!f.executable && f.content == Content::Whole(Hash::of(b"hello world")))
        }
        k => panic!("{k:?}"),
    }
    match kind(b"scene/tex/big.bin") {
        EntryKind::File(f) => {
            let Content::Chunked(chunks) = f.content else {
                panic!("not chunked: {f:?}")
            };
            assert_eq!(chunks.len(), 2);
            assert_eq!(chunks[1], Hash::of(&[0]));
            let first = fs::read(cas.join(format!("Data/{}.xxh128", chunks[0]))).unwrap();
            assert_eq!(first.len() as u64, CHUNK_SIZE);
            assert_eq!(Hash::of(&first), chunks[0]);
        }
        k => panic!("{k:?}"),
    }
    // Re-running stores nothing new and gives the same manifest.
    assert_eq!(snapshot(&root, &cas, "2025-12-04-beta"), bytes);
    let leftovers: Vec<_> = fs::read_dir(cas.join("Data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".xxh128"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn validate_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.manifest");
    let text = r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{"hash":"df8d09e93f874900a99b8775cc15b6c7","mtime":1,"path":"a","size":11}],"totalSize":11}"#;
    fs::write(&good, text).unwrap();
    let o = Command::new(BIN)
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("hash: {}", Hash::of(text.as_bytes()))),
        "{out}"
    );
    assert!(
        out.contains("files: 1") && out.contains("total size: 11"),
        "{out}"
    );

    let bad = tmp.path().join("bad.manifest");
    fs::write(
        &bad,
        text.replace("\"a\"", "\"/a\"")
            .replace("\"size\":11}", "\"size\":-1}"),
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("negative-size") && err.contains("bad.manifest"),
        "{err}"
    );

    let o = Command::new(BIN)
        .arg("validate")
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn v2023_snapshot_says_what_it_cannot_record_and_checks_output_first() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("a.txt"), b"hello").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link.txt")).unwrap();
    let cas = tmp.path().join("cas");
    let run = |output: &Path| {
        Command::new(BIN)
            .arg("snapshot")
            .arg(&root)
            .arg("--cas")
            .arg(&cas)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    // An output directory that does not exist is refused before anything is hashed.
    let o = run(&tmp.path().join("nodir/x.manifest"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nodir") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !cas.exists(),
        "hashed into the CAS before checking --output"
    );

    let o = run(&tmp.path().join("job.manifest"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("followed 1 symlinks and dropped the exec bit of 1 files")
            && err.contains("--format 2025-12-04-beta"),
        "{err}"
    );
}

#[test]
fn a_cas_data_directory_suggests_its_parent_and_bare_usage_lists_subcommands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cas/Data");
    fs::create_dir_all(&data).unwrap();
    fs::write(tmp.path().join("m.manifest"), b"{}").unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let o = Command::new(BIN)
        .arg(tmp.path().join("m.manifest"))
        .arg(&mnt)
        .arg("--cas")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let parent = tmp.path().join("cas");
    assert!(
        err.contains(&format!("--cas {}", parent.display())) && !err.contains("snapshot"),
        "{err}"
    );

    let o = Command::new(BIN).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("mount_vfs snapshot") && err.contains("mount_vfs validate"),
        "{err}"
    );
}
