//! `mount_vfs export` and `--export-on-unmount` through real mounts: a `--writable` mount is
//! changed, exported, and the export is mounted read-only and compared byte for byte with the
//! same changes made to a plain copy of the tree.

mod common;
#[path = "support/job_changes.rs"]
mod job_changes;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{job, pattern, snapshot, Mount, MountOptions, BIN};
use job_changes::{base_files, change, write_base, MIB};
use mount_vfs::manifest::{Content, EntryKind, Format, Hash, Manifest};

/// What a tree holds: files with their bytes, symlinks with their targets, directories.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Symlink(PathBuf),
    Dir,
}

fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let t = e.file_type().unwrap();
            if t.is_symlink() {
                out.insert(rel, Node::Symlink(fs::read_link(&path).unwrap()));
            } else if t.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &path, out);
            } else {
                out.insert(rel, Node::File(fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// What a v2023 manifest can say of a tree: its files (and the directories they imply).
fn files_only(tree: &BTreeMap<PathBuf, Node>) -> BTreeMap<PathBuf, Node> {
    let files: Vec<&PathBuf> = tree
        .iter()
        .filter(|(_, n)| matches!(n, Node::File(_)))
        .map(|(p, _)| p)
        .collect();
    tree.iter()
        .filter(|(p, n)| match n {
            Node::File(_) => true,
            Node::Dir => files.iter().any(|f| f.starts_with(p)),
            Node::Symlink(_) => false,
        })
        .map(|(p, n)| {
            let n = match n {
                Node::File(b) => Node::File(b.clone()),
                _ => Node::Dir,
            };
            (p.clone(), n)
        })
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `mount_vfs export`; returns its output (status unchecked).
fn export(cache: &Path, manifest: &Path, cas: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("export")
        .arg("--cache-dir")
        .arg(cache)
        .arg("--manifest")
        .arg(manifest)
        .arg("--cas")
        .arg(cas)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `export` that must succeed; returns its `export done` log line.
fn export_ok(cache: &Path, manifest: &Path, cas: &Path, out: &Path, extra: &[&str]) -> String {
    let o = export(cache, manifest, cas, out, extra);
    assert!(o.status.success(), "export failed: {}", text(&o));
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    log.lines()
        .find(|l| l.contains("export done"))
        .unwrap_or_else(|| panic!("no summary line: {log}"))
        .to_string()
}

/// The value of `key=` in a log line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn validate(path: &Path) {
    let o = Command::new(BIN)
        .arg("validate")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}: {}", path.display(), text(&o));
}

fn decode(path: &Path) -> Manifest {
    Manifest::decode(&fs::read(path).unwrap(), &path.display().to_string()).unwrap()
}

fn whole_hash(m: &Manifest, path: &str) -> Hash {
    let i = m
        .find(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"));
    match m.get(i).unwrap().kind {
        EntryKind::File(f) => match f.content {
            Content::Whole(h) => h,
            Content::Chunked(_) => panic!("{path} chunked"),
        },
        k => panic!("{path}: {k:?}"),
    }
}

/// Mounts `manifest` from `cas` on `root/mnt`, `--writable` with 2 shards and 1 MiB blocks.
fn mount_writable(manifest: &Path, cas: &Path, root: &Path, cache: &Path, extra: &[&str]) -> Mount {
    let mut flags = vec![
        "--writable",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--part-size",
        "1M",
    ];
    flags.extend_from_slice(extra);
    let options = MountOptions {
        shards: 2,
        extra: &flags,
    };
    Mount::start(manifest, cas, &root.join("mnt"), options)
}

/// Mounts `manifest` read-only from `cas` and returns its tree.
fn mounted_tree(manifest: &Path, cas: &Path, dir: &Path) -> BTreeMap<PathBuf, Node> {
    let mount = Mount::start(manifest, cas, dir, MountOptions::default());
    let t = tree(&mount.dir);
    drop(mount);
    t
}

fn objects(cas: &Path) -> usize {
    fs::read_dir(cas.join("Data")).unwrap().count()
}

/// Base tree + the job's changes, on a plain directory: what every export must show.
fn expected(tmp: &Path) -> BTreeMap<PathBuf, Node> {
    let plain = tmp.join("plain");
    write_base(&plain);
    change(&plain);
    tree(&plain)
}

/// The base tree snapshot (v2023) into `root/cas`: (manifest, cas).
fn base_job(root: &Path) -> (PathBuf, PathBuf) {
    let files = base_files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    job(root, &refs, "2023-03-03")
}

#[test]
fn export_captures_every_change_beside_a_live_mount_and_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (manifest, cas) = base_job(root);
    let base = decode(&manifest);
    let cache = root.join("cache");
    let objects_before = objects(&cas);

    let mut mount = mount_writable(&manifest, &cas, root, &cache, &[]);
    change(&mount.dir);
    // Beside the live mount (everything fsynced above).
    let live = root.join("live.manifest");
    let line = export_ok(&cache, &manifest, &cas, &live, &[]);
    // The new file, big.bin and small.txt are new objects; the rest keep their hashes, unread.
    assert_eq!(field(&line, "objects_written"), 3, "{line}");
    assert_eq!(field(&line, "files_hashed"), 3, "{line}");
    assert_eq!(field(&line, "objects_kept"), 4, "{line}");
    assert_eq!(objects(&cas), objects_before + 3);
    assert!(
        mount.stop().is_some_and(|s| s.success()),
        "{}",
        mount.stderr()
    );

    let v2023 = root.join("new-2023.manifest");
    let diff = root.join("new.diff");
    let line = export_ok(
        &cache,
        &manifest,
        &cas,
        &v2023,
        &["--diff", diff.to_str().unwrap()],
    );
    assert_eq!(field(&line, "objects_written"), 0, "{line}");
    assert_eq!(field(&line, "objects_present"), 3, "{line}");
    assert_eq!(
        fs::read(&live).unwrap(),
        fs::read(&v2023).unwrap(),
        "the live export saw everything fsynced"
    );
    let v2025 = root.join("new-2025.manifest");
    let o = export(
        &cache,
        &manifest,
        &cas,
        &v2025,
        &["--format", "2025-12-04-beta"],
    );
    assert!(o.status.success(), "{}", text(&o));
    for m in [&v2023, &v2025, &diff] {
        validate(m);
    }

    // v2023 cannot say the symlink and the empty directory: one warning names both.
    let o = export(&cache, &manifest, &cas, &root.join("again.manifest"), &[]);
    let warning = String::from_utf8_lossy(&o.stderr);
    assert!(
        warning.contains("left out: data2/link, empty") && warning.contains("2025-12-04-beta"),
        "{warning}"
    );

    // Unchanged files keep their hashes (a renamed directory's files too); changed ones are
    // the hashes of their new bytes.
    let expected = expected(root);
    let new = decode(&v2023);
    assert_eq!(new.format(), Format::V2023_03_03);
    assert_eq!(whole_hash(&new, "keep.txt"), whole_hash(&base, "keep.txt"));
    assert_eq!(
        whole_hash(&new, "data2/a.txt"),
        whole_hash(&base, "data/a.txt")
    );
    let Node::File(big) = &expected[Path::new("big.bin")] else {
        panic!()
    };
    assert_eq!(whole_hash(&new, "big.bin"), Hash::of(big));
    assert!(new.find(b"gone.txt").is_none() && new.find(b"data/a.txt").is_none());

    // Mounted from the CAS, each export is the expected tree, byte for byte.
    assert_eq!(
        mounted_tree(&v2023, &cas, &root.join("m2023")),
        files_only(&expected)
    );
    assert_eq!(mounted_tree(&v2025, &cas, &root.join("m2025")), expected);

    // The diff: additions and changes, the deleted file and the renamed directory.
    let d = decode(&diff);
    assert!(d.is_diff());
    assert_eq!(
        d.parent_manifest_hash(),
        Some(Hash::of(&fs::read(&manifest).unwrap()))
    );
    let listed: BTreeMap<String, String> = d
        .entries()
        .map(|e| {
            let kind = match e.kind {
                EntryKind::File(_) => "file".to_string(),
                EntryKind::Dir => "dir".to_string(),
                EntryKind::Symlink { target } => {
                    format!("-> {}", String::from_utf8_lossy(target))
                }
                EntryKind::Deleted { dir: true } => "deleted dir".to_string(),
                EntryKind::Deleted { dir: false } => "deleted file".to_string(),
            };
            (String::from_utf8_lossy(e.path).into_owned(), kind)
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("big.bin", "file"),
        ("data", "deleted dir"),
        ("data2", "dir"),
        ("data2/a.txt", "file"),
        ("data2/link", "-> keep.txt"),
        ("data2/sub", "dir"),
        ("data2/sub/b.bin", "file"),
        ("empty", "dir"),
        ("gone.txt", "deleted file"),
        ("new 😀.txt", "file"),
        ("small.txt", "file"),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_string(), k.to_string()))
    .collect();
    assert_eq!(listed, want);
}

#[test]
fn export_of_an_untouched_overlay_is_the_mounted_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // v2025 with what v2023 cannot say: an exec bit, a symlink, an empty directory.
    let tree_dir = root.join("tree");
    fs::create_dir_all(tree_dir.join("scene/tex")).unwrap();
    fs::create_dir_all(tree_dir.join("empty")).unwrap();
    fs::write(tree_dir.join("scene/a.txt"), b"hello world").unwrap();
    fs::write(tree_dir.join("scene/tex/big.bin"), pattern(3, 5 * MIB)).unwrap();
    fs::write(tree_dir.join("run.sh"), b"#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tree_dir.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../a.txt", tree_dir.join("scene/tex/up.txt")).unwrap();
    let cas = root.join("cas");
    let cache = root.join("cache");
    for format in ["2025-12-04-beta", "2023-03-03"] {
        let manifest = root.join(format!("{format}.manifest"));
        snapshot(&tree_dir, &cas, format, &manifest);
        let objects_before = objects(&cas);
        let mut mount = mount_writable(&manifest, &cas, root, &cache, &[]);
        // Reading and opening for writing without writing change nothing.
        assert_eq!(
            fs::read(mount.dir.join("scene/a.txt")).unwrap(),
            b"hello world"
        );
        drop(
            fs::OpenOptions::new()
                .write(true)
                .open(mount.dir.join("scene/tex/big.bin"))
                .unwrap(),
        );
        assert!(mount.stop().is_some_and(|s| s.success()));
        let out = root.join(format!("{format}.export"));
        let line = export_ok(&cache, &manifest, &cas, &out, &["--format", format]);
        assert_eq!(field(&line, "objects_written"), 0, "{line}");
        assert_eq!(field(&line, "files_hashed"), 0, "{line}");
        assert_eq!(objects(&cas), objects_before);
        assert_eq!(
            String::from_utf8_lossy(&fs::read(&out).unwrap()),
            String::from_utf8_lossy(&fs::read(&manifest).unwrap()),
            "{format}: an untouched tree exports as the manifest it mounted"
        );
    }
}

#[test]
fn export_on_unmount_writes_what_an_explicit_export_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (manifest, cas) = base_job(root);
    let cache = root.join("cache");
    let on_unmount = root.join("on-unmount.manifest");

    // Refused without --writable, before anything is mounted.
    let o = Command::new(BIN)
        .arg(&manifest)
        .arg(root.join("nowhere"))
        .arg("--cas")
        .arg(&cas)
        .arg("--export-on-unmount")
        .arg(&on_unmount)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--writable"), "{}", text(&o));

    let mut mount = mount_writable(
        &manifest,
        &cas,
        root,
        &cache,
        &[
            "--export-on-unmount",
            on_unmount.to_str().unwrap(),
            "--export-format",
            "2025-12-04-beta",
        ],
    );
    change(&mount.dir);
    assert!(!on_unmount.exists());
    let status = mount.stop();
    let log = mount.stderr();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains("exported the overlay to"), "{log}");
    let explicit = root.join("explicit.manifest");
    export_ok(
        &cache,
        &manifest,
        &cas,
        &explicit,
        &["--format", "2025-12-04-beta"],
    );
    assert_eq!(fs::read(&on_unmount).unwrap(), fs::read(&explicit).unwrap());
    assert_eq!(
        mounted_tree(&on_unmount, &cas, &root.join("check")),
        expected(root)
    );
}

#[test]
fn export_says_what_to_fix_and_never_exports_a_bad_base_object() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let big = pattern(4, 3 * MIB);
    let (manifest, cas) = job(
        root,
        &[("big.bin", &big), ("other.txt", b"x")],
        "2023-03-03",
    );
    let cache = root.join("cache");
    let out = root.join("out.manifest");

    // No overlay: a usage mistake naming --cache-dir.
    let o = export(&cache, &manifest, &cas, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--cache-dir"), "{}", text(&o));
    let o = export(&cache, &manifest, &root.join("no-cas"), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Patch one block of big.bin: the export needs the other blocks from its base object.
    let mut mount = mount_writable(&manifest, &cas, root, &cache, &[]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mount.dir.join("big.bin"))
        .unwrap();
    f.write_all_at(b"patch", 10).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(mount.stop().is_some_and(|s| s.success()));
    let hash = Hash::of(&big);
    let object = cas.join("Data").join(format!("{hash}.xxh128"));
    let mut bad = big.clone();
    bad[2 * MIB] ^= 1;
    fs::write(&object, &bad).unwrap();
    let o = export(&cache, &manifest, &cas, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("base object {hash}")),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "nothing is written after a bad object");
    // Put right, the export works and holds the patched bytes.
    fs::write(&object, &big).unwrap();
    export_ok(&cache, &manifest, &cas, &out, &[]);
    let mut patched = big.clone();
    patched[10..15].copy_from_slice(b"patch");
    assert_eq!(whole_hash(&decode(&out), "big.bin"), Hash::of(&patched));
}
