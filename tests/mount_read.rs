//! Real mounts of manifests made by `mount_vfs snapshot`, served from a local CAS: every byte,
//! listing, size, mtime, mode and symlink equals the source tree.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{pattern, read_all, snapshot, AlignedBuf, Mount, MountOptions};

/// A source tree with the shapes that matter: nesting, empty files, non-ASCII names, sizes around
/// the 4 MiB block and 1 MiB READ boundaries, an executable, a symlink and an empty directory.
fn build_tree(root: &Path) {
    let files: &[(&str, usize)] = &[
        ("hello.txt", 11),
        ("empty.bin", 0),
        ("scene/shot 01/beauty.0001.exr", 3 << 20),
        ("scene/shot 01/beauty.0002.exr", (4 << 20) + 1),
        ("scene/tex/diffuse_ü.tif", 1 << 20),
        ("scene/tex/🎬.png", 12_345),
        ("deep/a/b/c/d/e/f/g/h/leaf.txt", 100),
        ("big/ten_mib.bin", 10 << 20),
    ];
    for (i, (path, len)) in files.iter().enumerate() {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let bytes = if *path == *root.join("hello.txt") {
            b"hello world".to_vec()
        } else {
            pattern(i as u64, *len)
        };
        fs::write(&path, bytes).unwrap();
    }
    let tool = root.join("bin/render.sh");
    fs::create_dir_all(tool.parent().unwrap()).unwrap();
    fs::write(&tool, b"#!/bin/sh\necho render\n").unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
}

fn add_v2025_extras(root: &Path) {
    fs::create_dir_all(root.join("empty_dir")).unwrap();
    std::os::unix::fs::symlink("diffuse_ü.tif", root.join("scene/tex/latest.tif")).unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("bin/hello")).unwrap();
}

/// Everything a tree shows through stat/readdir/readlink/read, keyed by relative path.
#[derive(Debug, PartialEq)]
enum Node {
    Dir(Vec<String>),
    File {
        size: u64,
        mtime_us: i64,
        exec: bool,
        hash: u128,
    },
    Link(PathBuf),
}

fn describe(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        out.insert(
            dir.strip_prefix(root).unwrap().to_path_buf(),
            Node::Dir(names.clone()),
        );
        for name in names {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, Node::Link(fs::read_link(&path).unwrap()));
            } else {
                let bytes = read_all(&path).unwrap();
                assert_eq!(
                    bytes.len() as u64,
                    meta.len(),
                    "{rel:?}: read length != st_size"
                );
                out.insert(
                    rel,
                    Node::File {
                        size: meta.len(),
                        mtime_us: meta.mtime() * 1_000_000 + meta.mtime_nsec() / 1000,
                        exec: meta.permissions().mode() & 0o111 != 0,
                        hash: xxhash_rust::xxh3::xxh3_128(&bytes),
                    },
                );
            }
        }
    }
    out
}

struct Fixture {
    _tmp: tempfile::TempDir,
    tree: PathBuf,
    cas: PathBuf,
    manifest: PathBuf,
    mnt: PathBuf,
}

fn fixture(format: &str) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    if format != "2023-03-03" {
        add_v2025_extras(&tree);
    }
    let cas = tmp.path().join("cas");
    let manifest = tmp.path().join("job.manifest");
    snapshot(&tree, &cas, format, &manifest);
    let mnt = tmp.path().join("mnt");
    Fixture {
        tree,
        cas,
        manifest,
        mnt,
        _tmp: tmp,
    }
}

/// v2023 has no exec bit: every file is 0644 through the mount.
fn without_exec(mut nodes: BTreeMap<PathBuf, Node>) -> BTreeMap<PathBuf, Node> {
    for node in nodes.values_mut() {
        if let Node::File { exec, .. } = node {
            *exec = false;
        }
    }
    nodes
}

#[test]
fn v2023_mount_equals_source_tree_with_one_and_two_shards() {
    let f = fixture("2023-03-03");
    let expected = without_exec(describe(&f.tree));
    for shards in [1, 2] {
        let mount = Mount::start(
            &f.manifest,
            &f.cas,
            &f.mnt,
            MountOptions {
                shards,
                ..Default::default()
            },
        );
        assert_eq!(describe(&mount.dir), expected, "shards={shards}");
    }
}

#[test]
fn v2025_mount_keeps_symlinks_empty_dirs_and_exec_bit() {
    let f = fixture("2025-12-04-beta");
    let expected = describe(&f.tree);
    assert!(matches!(expected.get(Path::new("empty_dir")), Some(Node::Dir(v)) if v.is_empty()));
    for shards in [1, 2] {
        let mount = Mount::start(
            &f.manifest,
            &f.cas,
            &f.mnt,
            MountOptions {
                shards,
                ..Default::default()
            },
        );
        assert_eq!(describe(&mount.dir), expected, "shards={shards}");
        // Links resolve through the mount too.
        assert_eq!(
            fs::read(mount.dir.join("bin/hello")).unwrap(),
            b"hello world"
        );
        let mode = fs::metadata(mount.dir.join("bin/render.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}

#[test]
fn many_threads_read_same_and_different_files_at_once() {
    let f = fixture("2023-03-03");
    let mount = Mount::start(
        &f.manifest,
        &f.cas,
        &f.mnt,
        MountOptions {
            shards: 2,
            ..Default::default()
        },
    );
    let expected = Arc::new(describe(&f.tree));
    let files: Vec<PathBuf> = expected
        .iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(p, _)| p.clone())
        .collect();
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let files = files.clone();
            let expected = expected.clone();
            let mnt = mount.dir.clone();
            std::thread::spawn(move || {
                for round in 0..4 {
                    // Half the threads all hit the biggest file; the rest walk the list.
                    let path = if t % 2 == 0 {
                        PathBuf::from("big/ten_mib.bin")
                    } else {
                        files[(t + round) % files.len()].clone()
                    };
                    let bytes = read_all(&mnt.join(&path)).unwrap();
                    let Some(Node::File { hash, .. }) = expected.get(&path) else {
                        panic!()
                    };
                    assert_eq!(xxhash_rust::xxh3::xxh3_128(&bytes), *hash, "{path:?}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// 200 random ranges, with the default part size and the smallest and a large `--part-size`.
#[test]
fn random_offsets_match_source() {
    let f = fixture("2023-03-03");
    let source = fs::read(f.tree.join("big/ten_mib.bin")).unwrap();
    for part_size in [None, Some("1M"), Some("16M")] {
        let extra: Vec<&str> = part_size.iter().flat_map(|p| ["--part-size", p]).collect();
        let mount = Mount::start(
            &f.manifest,
            &f.cas,
            &f.mnt,
            MountOptions {
                shards: 1,
                extra: &extra,
            },
        );
        read_random_ranges(&mount.dir.join("big/ten_mib.bin"), &source);
    }
}

fn read_random_ranges(path: &Path, source: &[u8]) {
    let mut file = fs::File::open(path).unwrap();
    let mut state = 12345u64;
    for _ in 0..200 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 20) as usize % source.len();
        let len = ((state >> 8) as usize % (3 << 20)).min(source.len() - offset);
        file.seek(SeekFrom::Start(offset as u64)).unwrap();
        let mut buf = vec![0; len];
        file.read_exact(&mut buf).unwrap();
        assert!(
            buf == source[offset..offset + len],
            "mismatch at {offset}+{len}"
        );
    }
}

#[test]
fn writes_are_refused_with_erofs() {
    let f = fixture("2023-03-03");
    let mount = Mount::start(&f.manifest, &f.cas, &f.mnt, MountOptions::default());
    let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
    assert!(erofs(fs::write(mount.dir.join("new.txt"), b"x")));
    assert!(erofs(
        fs::OpenOptions::new()
            .write(true)
            .open(mount.dir.join("hello.txt"))
            .map(|_| ())
    ));
    assert!(erofs(fs::create_dir(mount.dir.join("newdir"))));
    assert!(erofs(fs::remove_file(mount.dir.join("hello.txt"))));
    assert_eq!(
        fs::read(mount.dir.join("hello.txt")).unwrap(),
        b"hello world"
    );
}

/// A 600 MiB v2025 file is three CAS objects (256 + 256 + 88 MiB); reads across the chunk
/// boundaries and a full sequential read return the source bytes.
#[test]
fn chunked_600_mib_file_reads_across_chunk_boundaries() {
    const CHUNK: u64 = 256 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let source = pattern(600, 600 << 20);
    fs::write(tree.join("big.exr"), &source).unwrap();
    let cas = tmp.path().join("cas");
    let manifest = tmp.path().join("m.json");
    snapshot(&tree, &cas, "2025-12-04-beta", &manifest);
    let text = fs::read_to_string(&manifest).unwrap();
    assert!(
        text.contains("chunkhashes"),
        "the snapshot chunks the file: {}",
        &text[..text.len().min(400)]
    );

    let mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 2,
            ..Default::default()
        },
    );
    let mut file = fs::File::open(mount.dir.join("big.exr")).unwrap();
    for boundary in [CHUNK, 2 * CHUNK] {
        for (before, len) in [
            (1u64, 2usize),
            (4096, 8192),
            (1 << 20, 3 << 20),
            (100, 1 << 20),
        ] {
            let offset = boundary - before;
            file.seek(SeekFrom::Start(offset)).unwrap();
            let mut buf = vec![0; len];
            file.read_exact(&mut buf).unwrap();
            assert!(
                buf == source[offset as usize..offset as usize + len],
                "at {offset}+{len}"
            );
        }
    }
    let whole = read_all(&mount.dir.join("big.exr")).unwrap();
    assert_eq!(whole.len(), source.len());
    assert!(whole == source);
}

/// A sequential reader of a chunked file gets the next chunk verified ahead of it: after the
/// first 8 MiB of a 300 MiB file (chunks of 256 + 44 MiB), with read-ahead reaching 72 MiB at
/// most, the second chunk is verified before anyone reads it.
#[test]
fn sequential_readers_get_the_next_chunk_verified_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let source = pattern(300, 300 << 20);
    fs::write(tree.join("plate.exr"), &source).unwrap();
    let cas = tmp.path().join("cas");
    let manifest = tmp.path().join("m.json");
    snapshot(&tree, &cas, "2025-12-04-beta", &manifest);
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 1,
            extra: &["--stats"],
        },
    );
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(mount.dir.join("plate.exr"))
        .unwrap();
    let mut buf = AlignedBuf::new(1 << 20);
    for i in 0..8usize {
        let n = file.read(buf.as_mut()).unwrap();
        assert!(buf.as_mut()[..n] == source[i << 20..(i << 20) + n]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let verified = mount
            .stats("interval")
            .map_or(0, |s| s["total"]["objects_verified"].as_u64().unwrap());
        if verified == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second chunk was not verified ahead ({verified} objects verified)"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(file);
    assert!(read_all(&mount.dir.join("plate.exr")).unwrap() == source);
}

/// A directory far larger than one READDIR reply: every name comes back once, in both the plain
/// and the "plus" listing paths (the kernel uses readdirplus for `ls -l`-style walks).
#[test]
fn large_directory_lists_every_entry_once() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("frames")).unwrap();
    let mut expected: Vec<String> = (0..3000).map(|i| format!("beauty.{i:05}.exr")).collect();
    for (i, name) in expected.iter().enumerate() {
        fs::write(tree.join("frames").join(name), i.to_string()).unwrap();
    }
    let cas = tmp.path().join("cas");
    let manifest = tmp.path().join("m.json");
    snapshot(&tree, &cas, "2023-03-03", &manifest);
    let mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions::default(),
    );
    expected.sort();
    for _ in 0..2 {
        let mut names: Vec<String> = fs::read_dir(mount.dir.join("frames"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, expected);
    }
    let sizes: u64 = fs::read_dir(mount.dir.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(
        sizes,
        (0..3000)
            .map(|i: usize| i.to_string().len() as u64)
            .sum::<u64>()
    );
}
