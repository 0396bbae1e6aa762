//! One job for the export tests: a base tree and the changes a job makes to it, applied the
//! same way through a `--writable` mount and to a plain copy (the expected result). Shared by
//! `tests/writable_export.rs` and `tests/deadline_client.rs` (`#[path]`); needs `mod common`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::pattern;

pub const MIB: usize = 1 << 20;

/// The base tree: an 8 MiB file, small files (one with a non-ASCII name), a directory to
/// rename and a file to delete.
pub fn base_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("big.bin", pattern(1, 8 * MIB)),
        ("small.txt", b"small base file\n".to_vec()),
        ("keep.txt", b"never touched\n".to_vec()),
        ("gone.txt", b"deleted by the job\n".to_vec()),
        ("data/a.txt", b"in a directory the job renames\n".to_vec()),
        ("data/sub/b.bin", pattern(2, 3000)),
        ("café/naïve.txt", b"accents".to_vec()),
    ]
}

/// Writes [`base_files`] under `root`.
pub fn write_base(root: &Path) {
    for (path, bytes) in base_files() {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
}

/// The job's changes: a new file, a patch across a 1 MiB block boundary in the middle of the
/// 8 MiB file, an append, a deletion, a directory rename, an empty directory and a symlink.
/// Written files are fsynced.
pub fn change(root: &Path) {
    fs::write(root.join("new 😀.txt"), b"written by the job\n").unwrap();
    fs::File::open(root.join("new 😀.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    let big = fs::OpenOptions::new()
        .write(true)
        .open(root.join("big.bin"))
        .unwrap();
    big.write_all_at(&[0xAB; 100_000], (4 * MIB - 50_000) as u64)
        .unwrap();
    big.sync_all().unwrap();
    let mut small = fs::OpenOptions::new()
        .append(true)
        .open(root.join("small.txt"))
        .unwrap();
    small.write_all(b"appended\n").unwrap();
    small.sync_all().unwrap();
    fs::remove_file(root.join("gone.txt")).unwrap();
    fs::rename(root.join("data"), root.join("data2")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("../keep.txt", root.join("data2/link")).unwrap();
}
