//! Each operation of `--writable` on a real mount, with the errno a local Linux filesystem
//! (ext4, tmpfs) gives, over a base tree from a manifest: what is written, renamed, linked or
//! deleted on top of base files and directories, and what a clean remount of the same
//! `--cache-dir` gives back. With 1 MiB blocks (`--part-size 1M`); shards 1 and 2 where
//! entries of different shards meet (renames, links, re-created names).

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, job, pattern, read_all, read_direct, Mount, BIN};

const MIB: usize = 1 << 20;

fn big() -> Vec<u8> {
    pattern(1, 8 * MIB)
}

/// The base tree of every test here.
fn base_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.txt", b"hello base\n".to_vec()),
        ("big.bin", big()),
        ("small.bin", pattern(2, 5000)),
        ("dir/x.txt", b"x in dir\n".to_vec()),
        ("dir/sub/y.txt", b"y\n".to_vec()),
        ("dir/sub/deep/z.bin", pattern(3, 300_000)),
        ("tree/a/1.txt", b"one".to_vec()),
        ("tree/a/2.txt", b"two".to_vec()),
        ("tree/b/c/3.bin", pattern(4, 2 * MIB + 3)),
        ("tree/b/4.txt", b"four".to_vec()),
        ("tree/top.txt", b"top".to_vec()),
        ("only/child.txt", b"child".to_vec()),
    ]
}

/// A writable mount of [`base_files`] and what it takes to mount it again. The mount drops
/// (unmounts) before the temp dir.
struct Fixture {
    mount: Mount,
    manifest: PathBuf,
    cas: PathBuf,
    cache: PathBuf,
    shards: usize,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new(shards: usize) -> Fixture {
        let work = tempfile::tempdir().unwrap();
        let files = base_files();
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        let (manifest, cas) = job(work.path(), &refs, "2023-03-03");
        let cache = work.path().join("cache");
        let mount = Mount::writable(&manifest, &cas, &cache, &work.path().join("mnt"), shards);
        Fixture {
            mount,
            manifest,
            cas,
            cache,
            shards,
            work,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mount.dir.join(rel)
    }

    /// Stops the mount (it must exit cleanly) and mounts the same overlay again.
    fn remount(&mut self) {
        self.mount
            .remount_writable(&self.manifest, &self.cas, &self.cache, self.shards);
    }
}

/// The errno of an operation that must fail.
#[track_caller]
fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    match result {
        Ok(v) => panic!("succeeded ({v:?}) where it must fail"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("no errno: {e}")),
    }
}

#[track_caller]
fn assert_errno<T: std::fmt::Debug>(result: std::io::Result<T>, want: i32, what: &str) {
    let got = errno(result);
    assert_eq!(
        got,
        want,
        "{what}: {} instead of {}",
        std::io::Error::from_raw_os_error(got),
        std::io::Error::from_raw_os_error(want)
    );
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn cvt(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn rename2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

fn set_xattr(path: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of the length passed.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length passed.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

fn list_xattrs(path: &Path) -> std::io::Result<Vec<String>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of the length passed.
    let len = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut names: Vec<String> = buf[..len as usize]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn remove_xattr(path: &Path, name: &str) -> std::io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn open_with(path: &Path, flags: i32) -> std::io::Result<fs::File> {
    let access = flags & libc::O_ACCMODE;
    fs::OpenOptions::new()
        .read(access != libc::O_WRONLY)
        .write(access != libc::O_RDONLY)
        .custom_flags(flags & !libc::O_ACCMODE)
        .open(path)
}

fn create_excl(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[test]
fn creates_and_opens_with_their_errnos() {
    let f = Fixture::new(1);
    let mut file = create_excl(&f.p("new.txt")).unwrap();
    file.write_all(b"new content").unwrap();
    drop(file);
    assert_eq!(read_all(&f.p("new.txt")).unwrap(), b"new content");
    assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\n");

    for existing in ["new.txt", "a.txt", "dir", "dir/sub/y.txt"] {
        assert_errno(create_excl(&f.p(existing)), libc::EEXIST, existing);
    }
    assert_errno(
        fs::File::open(f.p("missing.txt")),
        libc::ENOENT,
        "open missing",
    );
    assert_errno(
        create_excl(&f.p("nodir/x")),
        libc::ENOENT,
        "create in missing dir",
    );
    assert_errno(
        create_excl(&f.p("a.txt/x")),
        libc::ENOTDIR,
        "create under a file",
    );
    assert_errno(
        fs::metadata(f.p("a.txt/x")),
        libc::ENOTDIR,
        "stat under a file",
    );
    assert_errno(
        open_with(&f.p("dir"), libc::O_WRONLY),
        libc::EISDIR,
        "open a dir for write",
    );
    assert_errno(
        open_with(&f.p("dir"), libc::O_WRONLY | libc::O_CREAT),
        libc::EISDIR,
        "O_CREAT of a dir",
    );
    assert_errno(fs::read(f.p("dir")), libc::EISDIR, "read a dir");

    assert_errno(
        fs::create_dir(f.p("a.txt")),
        libc::EEXIST,
        "mkdir on a file",
    );
    assert_errno(
        fs::create_dir(f.p("dir")),
        libc::EEXIST,
        "mkdir on a base dir",
    );
    assert_errno(
        fs::create_dir(f.p("nodir/x")),
        libc::ENOENT,
        "mkdir in missing",
    );
    assert_errno(
        fs::create_dir(f.p("a.txt/x")),
        libc::ENOTDIR,
        "mkdir under a file",
    );
    assert_errno(fs::remove_file(f.p("dir")), libc::EISDIR, "unlink a dir");
    assert_errno(
        fs::remove_file(f.p("missing")),
        libc::ENOENT,
        "unlink missing",
    );
    assert_errno(fs::remove_dir(f.p("a.txt")), libc::ENOTDIR, "rmdir a file");
    assert_errno(
        fs::remove_dir(f.p("missing")),
        libc::ENOENT,
        "rmdir missing",
    );
    assert_errno(
        std::os::unix::fs::symlink("x", f.p("a.txt")),
        libc::EEXIST,
        "symlink onto a file",
    );
    assert_errno(
        std::os::unix::fs::symlink("x", f.p("dir")),
        libc::EEXIST,
        "symlink onto a dir",
    );
    assert_errno(
        fs::hard_link(f.p("a.txt"), f.p("small.bin")),
        libc::EEXIST,
        "link onto a file",
    );
    assert_errno(
        fs::hard_link(f.p("dir"), f.p("dir-link")),
        libc::EPERM,
        "link a dir",
    );
    assert_errno(
        fs::hard_link(f.p("missing"), f.p("l")),
        libc::ENOENT,
        "link missing",
    );
    // Nothing failed above changed anything.
    assert_eq!(
        listing(&f.mount.dir),
        [
            "a.txt",
            "big.bin",
            "dir",
            "new.txt",
            "only",
            "small.bin",
            "tree"
        ]
    );
}

#[test]
fn rmdir_is_refused_while_base_or_new_entries_remain() {
    for shards in [1, 2] {
        let mut f = Fixture::new(shards);
        assert_errno(
            fs::remove_dir(f.p("dir")),
            libc::ENOTEMPTY,
            "rmdir base dir",
        );
        assert_errno(fs::remove_dir(f.p("only")), libc::ENOTEMPTY, "rmdir only");
        fs::remove_file(f.p("only/child.txt")).unwrap();
        fs::remove_dir(f.p("only")).unwrap();
        assert_errno(fs::metadata(f.p("only")), libc::ENOENT, "stat removed dir");
        assert!(!listing(&f.mount.dir).contains(&"only".to_string()));

        fs::create_dir(f.p("fresh")).unwrap();
        fs::write(f.p("fresh/f"), b"f").unwrap();
        assert_errno(
            fs::remove_dir(f.p("fresh")),
            libc::ENOTEMPTY,
            "rmdir with new file",
        );
        fs::remove_file(f.p("fresh/f")).unwrap();
        fs::remove_dir(f.p("fresh")).unwrap();

        // A base dir whose base children were all deleted, but with a new one.
        fs::remove_file(f.p("dir/sub/deep/z.bin")).unwrap();
        fs::write(f.p("dir/sub/deep/new"), b"n").unwrap();
        assert_errno(fs::remove_dir(f.p("dir/sub/deep")), libc::ENOTEMPTY, "deep");
        fs::remove_file(f.p("dir/sub/deep/new")).unwrap();
        fs::remove_dir(f.p("dir/sub/deep")).unwrap();
        assert_errno(
            fs::remove_dir(f.p("dir/sub")),
            libc::ENOTEMPTY,
            "sub with y.txt",
        );
        assert_eq!(listing(&f.p("dir/sub")), ["y.txt"]);

        // The removed base dir comes back empty when made again.
        fs::create_dir(f.p("only")).unwrap();
        assert!(listing(&f.p("only")).is_empty(), "base children came back");
        f.remount();
        assert!(listing(&f.p("only")).is_empty(), "after remount");
        assert_eq!(listing(&f.p("dir/sub")), ["y.txt"]);
        assert_errno(
            fs::metadata(f.p("fresh")),
            libc::ENOENT,
            "fresh after remount",
        );
    }
}

#[test]
fn renames_of_files_and_base_directories() {
    for shards in [1, 2] {
        let mut f = Fixture::new(shards);
        let z = pattern(3, 300_000);
        // A base directory with its subtree.
        fs::rename(f.p("dir"), f.p("moved")).unwrap();
        assert_errno(fs::metadata(f.p("dir")), libc::ENOENT, "old name");
        assert_eq!(listing(&f.p("moved")), ["sub", "x.txt"]);
        assert!(read_all(&f.p("moved/sub/deep/z.bin")).unwrap() == z);
        assert_eq!(read_all(&f.p("moved/x.txt")).unwrap(), b"x in dir\n");
        // Files across directories (and shards): never EXDEV.
        fs::rename(f.p("a.txt"), f.p("moved/sub/a2.txt")).unwrap();
        assert_eq!(read_all(&f.p("moved/sub/a2.txt")).unwrap(), b"hello base\n");
        for name in ["1.txt", "2.txt"] {
            fs::rename(f.p(&format!("tree/a/{name}")), f.p(name)).unwrap();
        }
        fs::rename(f.p("tree/b/c/3.bin"), f.p("only/3.bin")).unwrap();
        assert!(read_all(&f.p("only/3.bin")).unwrap() == pattern(4, 2 * MIB + 3));
        // A directory into a new directory.
        fs::create_dir(f.p("newdir")).unwrap();
        fs::rename(f.p("moved/sub"), f.p("newdir/sub2")).unwrap();
        assert!(read_all(&f.p("newdir/sub2/deep/z.bin")).unwrap() == z);
        assert_eq!(listing(&f.p("moved")), ["x.txt"]);
        // Over an existing base file.
        fs::rename(f.p("small.bin"), f.p("tree/top.txt")).unwrap();
        assert!(read_all(&f.p("tree/top.txt")).unwrap() == pattern(2, 5000));
        assert_errno(fs::metadata(f.p("small.bin")), libc::ENOENT, "renamed away");

        // renameat2 flags.
        assert_errno(
            rename2(&f.p("1.txt"), &f.p("2.txt"), libc::RENAME_NOREPLACE),
            libc::EEXIST,
            "RENAME_NOREPLACE onto a file",
        );
        assert_eq!(read_all(&f.p("1.txt")).unwrap(), b"one");
        rename2(&f.p("1.txt"), &f.p("one.txt"), libc::RENAME_NOREPLACE).unwrap();
        assert_eq!(read_all(&f.p("one.txt")).unwrap(), b"one");
        // Exchange a file and a directory.
        rename2(&f.p("tree/b/4.txt"), &f.p("tree/a"), libc::RENAME_EXCHANGE).unwrap();
        assert!(fs::metadata(f.p("tree/b/4.txt")).unwrap().is_dir());
        assert!(listing(&f.p("tree/b/4.txt")).is_empty());
        assert_eq!(read_all(&f.p("tree/a")).unwrap(), b"four");
        rename2(&f.p("tree/b/4.txt"), &f.p("moved"), libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(listing(&f.p("tree/b/4.txt")), ["x.txt"]);
        assert_errno(
            rename2(&f.p("tree/a"), &f.p("nothing"), libc::RENAME_EXCHANGE),
            libc::ENOENT,
            "RENAME_EXCHANGE with a missing name",
        );

        // What a local filesystem refuses.
        assert_errno(
            fs::rename(f.p("newdir"), f.p("tree")),
            libc::ENOTEMPTY,
            "dir over a non-empty dir",
        );
        assert_errno(
            fs::rename(f.p("newdir"), f.p("one.txt")),
            libc::ENOTDIR,
            "dir over file",
        );
        assert_errno(
            fs::rename(f.p("one.txt"), f.p("newdir")),
            libc::EISDIR,
            "file over dir",
        );
        assert_errno(
            fs::rename(f.p("newdir"), f.p("newdir/sub2/inside")),
            libc::EINVAL,
            "dir into itself",
        );
        assert_errno(
            fs::rename(f.p("missing"), f.p("x")),
            libc::ENOENT,
            "missing source",
        );
        // A directory over an empty one.
        fs::create_dir(f.p("empty")).unwrap();
        fs::rename(f.p("newdir"), f.p("empty")).unwrap();
        assert!(read_all(&f.p("empty/sub2/deep/z.bin")).unwrap() == z);

        let check = |f: &Fixture| {
            assert_eq!(
                listing(&f.mount.dir),
                ["2.txt", "big.bin", "empty", "moved", "one.txt", "only", "tree"]
            );
            assert!(read_all(&f.p("empty/sub2/deep/z.bin")).unwrap() == z);
            assert_eq!(
                read_all(&f.p("empty/sub2/a2.txt")).unwrap(),
                b"hello base\n"
            );
            assert_eq!(read_all(&f.p("tree/a")).unwrap(), b"four");
            assert_eq!(listing(&f.p("tree/b/4.txt")), ["x.txt"]);
            assert_eq!(listing(&f.p("tree")), ["a", "b", "top.txt"]);
            assert_eq!(listing(&f.p("tree/b")), ["4.txt", "c"]);
            assert!(listing(&f.p("moved")).is_empty());
            assert!(read_all(&f.p("tree/top.txt")).unwrap() == pattern(2, 5000));
        };
        check(&f);
        f.remount();
        check(&f);
    }
}

#[test]
fn hard_links_to_base_and_new_files() {
    for shards in [1, 2] {
        let mut f = Fixture::new(shards);
        fs::hard_link(f.p("a.txt"), f.p("dir/a-link")).unwrap();
        let (m1, m2) = (
            fs::metadata(f.p("a.txt")).unwrap(),
            fs::metadata(f.p("dir/a-link")).unwrap(),
        );
        assert_eq!((m1.nlink(), m2.nlink()), (2, 2));
        assert_eq!(m1.ino(), m2.ino(), "two names, one inode");
        let mut file = open_with(&f.p("dir/a-link"), libc::O_WRONLY | libc::O_APPEND).unwrap();
        file.write_all(b"more\n").unwrap();
        drop(file);
        assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\nmore\n");
        let file = open_with(&f.p("a.txt"), libc::O_WRONLY).unwrap();
        file.write_at(b"J", 0).unwrap();
        drop(file);
        assert_eq!(read_all(&f.p("dir/a-link")).unwrap(), b"Jello base\nmore\n");
        fs::remove_file(f.p("a.txt")).unwrap();
        assert_eq!(fs::metadata(f.p("dir/a-link")).unwrap().nlink(), 1);
        assert_eq!(read_all(&f.p("dir/a-link")).unwrap(), b"Jello base\nmore\n");

        // A new file, three names.
        fs::write(f.p("n1"), b"new").unwrap();
        fs::hard_link(f.p("n1"), f.p("n2")).unwrap();
        fs::hard_link(f.p("n2"), f.p("tree/n3")).unwrap();
        fs::write(f.p("tree/n3"), b"rewritten").unwrap();
        assert_eq!(read_all(&f.p("n1")).unwrap(), b"rewritten");
        assert_eq!(fs::metadata(f.p("n2")).unwrap().nlink(), 3);

        // A big base file: a write through the link lands in the one file.
        fs::hard_link(f.p("big.bin"), f.p("only/big-link")).unwrap();
        let file = open_with(&f.p("only/big-link"), libc::O_WRONLY).unwrap();
        file.write_at(b"through the link", (5 * MIB + 3) as u64)
            .unwrap();
        drop(file);
        let mut want = big();
        want[5 * MIB + 3..5 * MIB + 19].copy_from_slice(b"through the link");
        assert!(read_all(&f.p("big.bin")).unwrap() == want);
        // Renaming one name onto another of the same file changes nothing.
        fs::rename(f.p("n1"), f.p("n2")).unwrap();
        assert_eq!(read_all(&f.p("n1")).unwrap(), b"rewritten");

        let check = |f: &Fixture| {
            assert_eq!(fs::metadata(f.p("dir/a-link")).unwrap().nlink(), 1);
            assert_eq!(read_all(&f.p("dir/a-link")).unwrap(), b"Jello base\nmore\n");
            assert_eq!(fs::metadata(f.p("tree/n3")).unwrap().nlink(), 3);
            assert_eq!(read_all(&f.p("n2")).unwrap(), b"rewritten");
            assert_eq!(fs::metadata(f.p("big.bin")).unwrap().nlink(), 2);
            assert!(read_all(&f.p("only/big-link")).unwrap() == want);
            assert_eq!(
                fs::metadata(f.p("big.bin")).unwrap().ino(),
                fs::metadata(f.p("only/big-link")).unwrap().ino()
            );
        };
        check(&f);
        f.remount();
        check(&f);
    }
}

#[test]
fn writes_into_a_large_base_file_merge_with_its_base_bytes() {
    for shards in [1, 2] {
        let mut f = Fixture::new(shards);
        let mut want = big();
        let file = open_with(&f.p("big.bin"), libc::O_WRONLY).unwrap();
        // Across the 3 MiB block boundary, inside block 5, and the last byte.
        for (offset, bytes) in [
            (3 * MIB - 50, pattern(9, 100)),
            (5 * MIB + 7, pattern(10, 4096)),
            (8 * MIB - 1, vec![0xAA]),
        ] {
            file.write_at(&bytes, offset as u64).unwrap();
            want[offset..offset + bytes.len()].copy_from_slice(&bytes);
        }
        drop(file);
        assert_eq!(fs::metadata(f.p("big.bin")).unwrap().len(), 8 * MIB as u64);
        assert!(read_all(&f.p("big.bin")).unwrap() == want, "buffered read");
        assert!(
            read_direct(&f.p("big.bin")).unwrap() == want,
            "O_DIRECT read"
        );
        // A read of just the patched range and its neighbours.
        let file = fs::File::open(f.p("big.bin")).unwrap();
        let mut buf = vec![0u8; 300];
        file.read_exact_at(&mut buf, (3 * MIB - 150) as u64)
            .unwrap();
        assert!(buf == want[3 * MIB - 150..3 * MIB + 150]);
        drop(file);
        f.remount();
        assert!(read_all(&f.p("big.bin")).unwrap() == want, "after remount");
    }
}

#[test]
fn appends_to_base_files() {
    let mut f = Fixture::new(1);
    let tail = pattern(11, MIB + 3);
    let mut file = open_with(&f.p("a.txt"), libc::O_WRONLY | libc::O_APPEND).unwrap();
    file.write_all(b"appended\n").unwrap();
    drop(file);
    let mut file = open_with(&f.p("big.bin"), libc::O_WRONLY | libc::O_APPEND).unwrap();
    // O_APPEND ignores the offset of a pwrite on Linux.
    file.write_all(&tail[..10]).unwrap();
    file.write_at(&tail[10..], 0).unwrap();
    drop(file);
    let check = |f: &Fixture| {
        assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\nappended\n");
        let mut want = big();
        want.extend_from_slice(&tail);
        assert_eq!(
            fs::metadata(f.p("big.bin")).unwrap().len(),
            want.len() as u64
        );
        assert!(read_all(&f.p("big.bin")).unwrap() == want);
    };
    check(&f);
    f.remount();
    check(&f);
}

#[test]
fn truncate_fallocate_and_sparse_writes_read_zeros_where_nothing_was_written() {
    let mut f = Fixture::new(1);
    let keep = 3 * MIB / 2 + 3;
    // Shrink a base file, then grow it: past the shrink point it reads zeros.
    fs::OpenOptions::new()
        .write(true)
        .open(f.p("big.bin"))
        .unwrap()
        .set_len(keep as u64)
        .unwrap();
    assert_eq!(fs::metadata(f.p("big.bin")).unwrap().len(), keep as u64);
    let path = cpath(&f.p("big.bin"));
    // SAFETY: a valid C string.
    cvt(unsafe { libc::truncate(path.as_ptr(), 4 * MIB as i64) }).unwrap();
    let mut big_want = big()[..keep].to_vec();
    big_want.resize(4 * MIB, 0);
    // ftruncate through an open file.
    let file = open_with(&f.p("small.bin"), libc::O_RDWR).unwrap();
    file.set_len(100).unwrap();
    file.set_len(10_000).unwrap();
    drop(file);
    let mut small_want = pattern(2, 100);
    small_want.resize(10_000, 0);
    // A write far past the end of a new file.
    let file = create_excl(&f.p("sparse")).unwrap();
    file.write_at(b"end", (3 * MIB + 5) as u64).unwrap();
    drop(file);
    let mut sparse_want = vec![0u8; 3 * MIB + 5];
    sparse_want.extend_from_slice(b"end");
    // fallocate (mode 0) past the end of a base file grows it with zeros; inside, changes
    // nothing.
    let file = open_with(&f.p("a.txt"), libc::O_WRONLY).unwrap();
    // SAFETY: fallocate on a descriptor we own.
    use std::os::fd::AsRawFd;
    cvt(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 2 * MIB as i64) }).unwrap();
    cvt(unsafe { libc::fallocate(file.as_raw_fd(), 0, 5, 10) }).unwrap();
    drop(file);
    let mut a_want = b"hello base\n".to_vec();
    a_want.resize(2 * MIB, 0);

    let check = |f: &Fixture| {
        assert!(read_all(&f.p("big.bin")).unwrap() == big_want, "big.bin");
        assert!(
            read_all(&f.p("small.bin")).unwrap() == small_want,
            "small.bin"
        );
        assert!(read_all(&f.p("sparse")).unwrap() == sparse_want, "sparse");
        assert!(read_all(&f.p("a.txt")).unwrap() == a_want, "a.txt");
    };
    check(&f);
    f.remount();
    check(&f);
}

#[test]
fn o_trunc_of_a_base_file_empties_it() {
    let mut f = Fixture::new(1);
    let mut file = open_with(&f.p("big.bin"), libc::O_WRONLY | libc::O_TRUNC).unwrap();
    assert_eq!(fs::metadata(f.p("big.bin")).unwrap().len(), 0);
    file.write_all(b"new").unwrap();
    drop(file);
    assert_eq!(read_all(&f.p("big.bin")).unwrap(), b"new");
    // O_TRUNC with O_CREAT of an existing base file, as shells do for `>`.
    fs::write(f.p("dir/x.txt"), b"replaced").unwrap();
    f.remount();
    assert_eq!(read_all(&f.p("big.bin")).unwrap(), b"new");
    assert_eq!(read_all(&f.p("dir/x.txt")).unwrap(), b"replaced");
}

#[test]
fn deleted_base_files_and_dirs_can_be_made_again() {
    for shards in [1, 2] {
        let mut f = Fixture::new(shards);
        fs::remove_file(f.p("a.txt")).unwrap();
        assert_errno(fs::metadata(f.p("a.txt")), libc::ENOENT, "deleted");
        assert_errno(fs::File::open(f.p("a.txt")), libc::ENOENT, "deleted");
        assert!(!listing(&f.mount.dir).contains(&"a.txt".to_string()));
        fs::write(f.p("a.txt"), b"fresh").unwrap();
        assert_eq!(fs::metadata(f.p("a.txt")).unwrap().len(), 5);
        assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"fresh");
        // Deleted, then replaced by a rename of another base file.
        fs::remove_file(f.p("big.bin")).unwrap();
        fs::rename(f.p("small.bin"), f.p("big.bin")).unwrap();
        // A base dir, deleted with its children, made again: empty.
        fs::remove_file(f.p("only/child.txt")).unwrap();
        fs::remove_dir(f.p("only")).unwrap();
        fs::create_dir(f.p("only")).unwrap();
        assert!(listing(&f.p("only")).is_empty());
        assert_errno(
            fs::metadata(f.p("only/child.txt")),
            libc::ENOENT,
            "old child",
        );
        fs::write(f.p("only/child.txt"), b"new child").unwrap();
        // A base file deleted and made again as a directory.
        fs::remove_file(f.p("tree/top.txt")).unwrap();
        fs::create_dir(f.p("tree/top.txt")).unwrap();

        let check = |f: &Fixture| {
            assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"fresh");
            assert!(read_all(&f.p("big.bin")).unwrap() == pattern(2, 5000));
            assert_errno(fs::metadata(f.p("small.bin")), libc::ENOENT, "renamed");
            assert_eq!(listing(&f.p("only")), ["child.txt"]);
            assert_eq!(read_all(&f.p("only/child.txt")).unwrap(), b"new child");
            assert!(fs::metadata(f.p("tree/top.txt")).unwrap().is_dir());
            assert!(listing(&f.p("tree/top.txt")).is_empty());
        };
        check(&f);
        f.remount();
        check(&f);
    }
}

#[test]
fn rm_rf_of_a_base_tree() {
    let mut f = Fixture::new(2);
    let status = Command::new("rm")
        .arg("-rf")
        .arg(f.p("tree"))
        .status()
        .unwrap();
    assert!(status.success(), "rm -rf failed: {status}");
    assert_errno(fs::metadata(f.p("tree")), libc::ENOENT, "removed tree");
    assert_eq!(
        listing(&f.mount.dir),
        ["a.txt", "big.bin", "dir", "only", "small.bin"]
    );
    fs::create_dir(f.p("tree")).unwrap();
    assert!(listing(&f.p("tree")).is_empty());
    // A tree of base and new entries.
    fs::write(f.p("dir/sub/new.txt"), b"new").unwrap();
    fs::create_dir(f.p("dir/sub/newdir")).unwrap();
    fs::write(f.p("dir/sub/newdir/f"), b"f").unwrap();
    let status = Command::new("rm")
        .arg("-rf")
        .arg(f.p("dir"))
        .status()
        .unwrap();
    assert!(status.success(), "rm -rf failed: {status}");
    assert_errno(fs::metadata(f.p("dir")), libc::ENOENT, "removed dir");
    f.remount();
    assert_eq!(
        listing(&f.mount.dir),
        ["a.txt", "big.bin", "only", "small.bin", "tree"]
    );
    assert!(listing(&f.p("tree")).is_empty());
}

#[test]
fn mkfifo_makes_a_fifo() {
    let mut f = Fixture::new(1);
    let path = cpath(&f.p("dir/fifo"));
    // SAFETY: a valid C string.
    cvt(unsafe { libc::mkfifo(path.as_ptr(), 0o640) }).unwrap();
    assert_errno(
        // SAFETY: a valid C string.
        cvt(unsafe { libc::mkfifo(path.as_ptr(), 0o640) }),
        libc::EEXIST,
        "mkfifo twice",
    );
    let check = |f: &Fixture| {
        let meta = fs::symlink_metadata(f.p("dir/fifo")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
        assert_eq!(meta.mode() & 0o7777, 0o640 & !umask());
        // A reader that does not wait for a writer, and a writer with the reader there.
        let reader = open_with(&f.p("dir/fifo"), libc::O_RDONLY | libc::O_NONBLOCK).unwrap();
        let mut writer = open_with(&f.p("dir/fifo"), libc::O_WRONLY | libc::O_NONBLOCK).unwrap();
        writer.write_all(b"through the pipe").unwrap();
        let mut got = [0u8; 16];
        (&reader).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through the pipe");
        assert!(listing(&f.p("dir")).contains(&"fifo".to_string()));
    };
    check(&f);
    f.remount();
    check(&f);
}

/// The process umask (which the kernel applies to modes of new files, mount or not), read
/// without changing it (tests run on several threads).
fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

#[test]
fn user_xattrs_on_base_and_new_entries() {
    let mut f = Fixture::new(1);
    fs::write(f.p("new.txt"), b"n").unwrap();
    for rel in ["a.txt", "dir", "new.txt", "dir/sub/deep/z.bin"] {
        let p = f.p(rel);
        assert_errno(get_xattr(&p, "user.k"), libc::ENODATA, "get unset");
        assert_errno(remove_xattr(&p, "user.k"), libc::ENODATA, "remove unset");
        assert_errno(
            set_xattr(&p, "user.k", b"v", libc::XATTR_REPLACE),
            libc::ENODATA,
            "XATTR_REPLACE of unset",
        );
        set_xattr(&p, "user.k", b"value of k", libc::XATTR_CREATE).unwrap();
        assert_errno(
            set_xattr(&p, "user.k", b"v", libc::XATTR_CREATE),
            libc::EEXIST,
            "XATTR_CREATE of set",
        );
        set_xattr(&p, "user.other", b"", 0).unwrap();
        set_xattr(&p, "user.gone", b"x", 0).unwrap();
        set_xattr(&p, "user.k", b"new value of k", libc::XATTR_REPLACE).unwrap();
        remove_xattr(&p, "user.gone").unwrap();
        assert_eq!(get_xattr(&p, "user.k").unwrap(), b"new value of k");
        assert_eq!(get_xattr(&p, "user.other").unwrap(), b"");
        assert_eq!(list_xattrs(&p).unwrap(), ["user.k", "user.other"]);
    }
    // A base file's xattrs do not change its content.
    assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\n");
    f.remount();
    for rel in ["a.txt", "dir", "new.txt", "dir/sub/deep/z.bin"] {
        let p = f.p(rel);
        assert_eq!(get_xattr(&p, "user.k").unwrap(), b"new value of k", "{rel}");
        assert_eq!(list_xattrs(&p).unwrap(), ["user.k", "user.other"], "{rel}");
        assert_errno(get_xattr(&p, "user.gone"), libc::ENODATA, "removed");
    }
    assert_errno(
        get_xattr(&f.p("missing"), "user.k"),
        libc::ENOENT,
        "missing",
    );
}

fn utimens(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    let p = cpath(path);
    let times = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: a valid C string and two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })
}

#[test]
fn chmod_and_utimens_show_in_stat() {
    let mut f = Fixture::new(1);
    fs::write(f.p("new.txt"), b"n").unwrap();
    let modes = [
        ("a.txt", 0o600),
        ("dir", 0o700),
        ("new.txt", 0o751),
        ("big.bin", 0o444),
    ];
    for (rel, mode) in modes {
        fs::set_permissions(f.p(rel), fs::Permissions::from_mode(mode)).unwrap();
    }
    let times = [
        ("a.txt", (1_000_000_000, 123), (1_100_000_000, 456_789)),
        ("dir", (1_000_000_001, 0), (1_000_000_002, 999_999_999)),
        ("new.txt", (1_200_000_000, 5), (1_200_000_001, 6)),
    ];
    for (rel, atime, mtime) in times {
        utimens(&f.p(rel), atime, mtime).unwrap();
    }
    assert_errno(
        utimens(&f.p("missing"), (1, 0), (1, 0)),
        libc::ENOENT,
        "utimens missing",
    );
    assert_errno(
        fs::set_permissions(f.p("missing"), fs::Permissions::from_mode(0o600)),
        libc::ENOENT,
        "chmod missing",
    );
    let check = |f: &Fixture| {
        for (rel, mode) in modes {
            let meta = fs::metadata(f.p(rel)).unwrap();
            assert_eq!(meta.mode() & 0o7777, mode, "mode of {rel}");
        }
        for (rel, atime, mtime) in times {
            let meta = fs::metadata(f.p(rel)).unwrap();
            assert_eq!((meta.mtime(), meta.mtime_nsec()), mtime, "mtime of {rel}");
            assert_eq!((meta.atime(), meta.atime_nsec()), atime, "atime of {rel}");
        }
        // The content is the base content still.
        assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\n");
    };
    check(&f);
    f.remount();
    check(&f);
    // A write moves the mtime on from what utimens set.
    fs::OpenOptions::new()
        .append(true)
        .open(f.p("a.txt"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert!(fs::metadata(f.p("a.txt")).unwrap().mtime() > 1_100_000_000);
}

#[test]
fn statfs_fsync_and_fdatasync_succeed() {
    let f = Fixture::new(1);
    let p = cpath(&f.mount.dir);
    // SAFETY: a valid C string and a statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statfs(p.as_ptr(), &mut st) }).unwrap();
    assert!(
        st.f_bsize > 0 && st.f_blocks > 0,
        "statfs: {} {}",
        st.f_bsize,
        st.f_blocks
    );
    let mut file = open_with(&f.p("big.bin"), libc::O_WRONLY).unwrap();
    file.write_all(b"synced").unwrap();
    file.sync_all().unwrap();
    file.sync_data().unwrap();
    drop(file);
    let mut file = create_excl(&f.p("new")).unwrap();
    file.write_all(&pattern(5, 3 * MIB)).unwrap();
    file.sync_data().unwrap();
    file.sync_all().unwrap();
    drop(file);
    let untouched = fs::File::open(f.p("dir/x.txt")).unwrap();
    untouched.sync_all().unwrap();
    for dir in ["", "dir", "dir/sub"] {
        fs::File::open(f.p(dir)).unwrap().sync_all().unwrap();
    }
}

#[test]
fn symlinks_and_readlink() {
    let mut f = Fixture::new(2);
    std::os::unix::fs::symlink("a.txt", f.p("to-a")).unwrap();
    std::os::unix::fs::symlink("../big.bin", f.p("dir/to-big")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", f.p("dangling")).unwrap();
    let check = |f: &Fixture| {
        assert_eq!(fs::read_link(f.p("to-a")).unwrap(), Path::new("a.txt"));
        assert_eq!(read_all(&f.p("to-a")).unwrap(), b"hello base\n");
        assert!(read_all(&f.p("dir/to-big")).unwrap() == big());
        assert!(fs::symlink_metadata(f.p("dangling")).unwrap().is_symlink());
        assert_errno(
            fs::metadata(f.p("dangling")),
            libc::ENOENT,
            "follow dangling",
        );
        assert_errno(fs::read_link(f.p("a.txt")), libc::EINVAL, "readlink a file");
    };
    check(&f);
    // A write through a symlink changes the target.
    fs::OpenOptions::new()
        .append(true)
        .open(f.p("to-a"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\n+");
    fs::write(f.p("to-a"), b"hello base\n").unwrap();
    f.remount();
    check(&f);
}

#[test]
fn the_overlay_survives_a_clean_remount() {
    let mut f = Fixture::new(2);
    let mut big_want = big();
    let file = open_with(&f.p("big.bin"), libc::O_WRONLY).unwrap();
    file.write_at(b"patched", (2 * MIB - 3) as u64).unwrap();
    drop(file);
    big_want[2 * MIB - 3..2 * MIB + 4].copy_from_slice(b"patched");
    fs::write(f.p("new.bin"), pattern(6, 3 * MIB + 1)).unwrap();
    fs::create_dir_all(f.p("made/deep/er")).unwrap();
    fs::write(f.p("made/deep/er/f"), b"deep").unwrap();
    fs::remove_file(f.p("dir/x.txt")).unwrap();
    fs::rename(f.p("tree/b"), f.p("made/b")).unwrap();
    fs::hard_link(f.p("new.bin"), f.p("made/new-link")).unwrap();
    std::os::unix::fs::symlink("f", f.p("made/deep/er/l")).unwrap();
    set_xattr(&f.p("made"), "user.x", b"1", 0).unwrap();
    fs::set_permissions(f.p("small.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    let check = |f: &Fixture| {
        assert!(read_all(&f.p("big.bin")).unwrap() == big_want);
        assert!(read_all(&f.p("made/new-link")).unwrap() == pattern(6, 3 * MIB + 1));
        assert_eq!(fs::metadata(f.p("new.bin")).unwrap().nlink(), 2);
        assert_eq!(read_all(&f.p("made/deep/er/l")).unwrap(), b"deep");
        assert_eq!(listing(&f.p("dir")), ["sub"]);
        assert_eq!(listing(&f.p("made/b")), ["4.txt", "c"]);
        assert!(read_all(&f.p("made/b/c/3.bin")).unwrap() == pattern(4, 2 * MIB + 3));
        assert_eq!(listing(&f.p("tree")), ["a", "top.txt"]);
        assert_eq!(get_xattr(&f.p("made"), "user.x").unwrap(), b"1");
        assert_eq!(
            fs::metadata(f.p("small.bin")).unwrap().mode() & 0o7777,
            0o600
        );
    };
    check(&f);
    for _ in 0..2 {
        f.remount();
        check(&f);
    }
}

/// Runs `command` for at most `limit` (then kills it): (exit status, stderr).
fn run_bounded(
    mut command: Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

#[test]
fn a_second_writable_mount_of_the_same_overlay_is_refused() {
    let f = Fixture::new(1);
    let pid = f.mount.pid().unwrap();
    let second = f.work.path().join("mnt2");
    fs::create_dir(&second).unwrap();
    let mut command = Command::new(BIN);
    command
        .arg(&f.manifest)
        .arg(&second)
        .arg("--cas")
        .arg(&f.cas)
        .args(["--writable", "--part-size", "1M", "--cache-dir"])
        .arg(&f.cache);
    let (status, stderr) = run_bounded(command, Duration::from_secs(20));
    let mounted = is_mounted(&second);
    if mounted {
        let _ = Command::new("umount").arg("-l").arg(&second).status();
    }
    assert!(!mounted, "a second writable mount of the overlay was made");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second mount did not fail ({status:?}): {stderr}"
    );
    assert!(
        stderr.contains(&pid.to_string()),
        "the refusal does not name pid {pid}: {stderr}"
    );
    // The first mount still works.
    assert_eq!(read_all(&f.p("a.txt")).unwrap(), b"hello base\n");
    fs::write(f.p("still"), b"ok").unwrap();
}

#[test]
fn writable_needs_a_cache_dir() {
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(work.path(), &[("a.txt", b"a")], "2023-03-03");
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut command = Command::new(BIN);
    command
        .arg(&manifest)
        .arg(&mnt)
        .arg("--cas")
        .arg(&cas)
        .arg("--writable");
    let (status, stderr) = run_bounded(command, Duration::from_secs(20));
    let mounted = is_mounted(&mnt);
    if mounted {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    assert!(!mounted, "mounted writable without a cache dir");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "exit code; stderr: {stderr}"
    );
    assert!(
        stderr.contains("--cache-dir"),
        "does not say what is missing: {stderr}"
    );
}

#[test]
fn a_base_file_open_for_reading_is_busy_for_writers_until_the_reader_closes() {
    // docs/semantics.md: a reader of a clean base file is served by the kernel from the
    // verified cache file (passthrough); the kernel keeps that one backing file while the file
    // is open, so an open for writing is refused with ETXTBSY instead of writing into the
    // cache (or being served stale bytes). Once the reader closes, the write works and every
    // open sees it. Without passthrough (an unprivileged mount) both opens succeed at once.
    for shards in [1, 2] {
        let f = Fixture::new(shards);
        for (rel, len) in [("small.bin", 5000), ("dir/sub/deep/z.bin", 300_000)] {
            let reader = fs::File::open(f.p(rel)).unwrap();
            let mut first = vec![0u8; 100];
            reader.read_exact_at(&mut first, 0).unwrap();
            match open_with(&f.p(rel), libc::O_WRONLY) {
                Err(e) => assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ETXTBSY),
                    "{shards} shard(s): open {rel} for writing while open for reading: {e}"
                ),
                Ok(writer) => {
                    // No passthrough: the reader is served by the shard and sees the write.
                    writer.write_at(b"WRITTEN", 10).unwrap();
                    let mut again = vec![0u8; 100];
                    reader.read_exact_at(&mut again, 0).unwrap();
                    assert_eq!(&again[10..17], b"WRITTEN", "{shards} shard(s): {rel}");
                }
            }
            // SAFETY: a valid C string.
            let truncated = cvt(unsafe { libc::truncate(cpath(&f.p(rel)).as_ptr(), 1) });
            if let Err(e) = truncated {
                assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "truncate {rel}: {e}");
                assert_eq!(fs::metadata(f.p(rel)).unwrap().len(), len as u64);
            } else {
                // Only where the write open succeeded above.
                fs::File::open(f.p(rel)).unwrap();
            }
            drop(reader);
            let writer = open_with(&f.p(rel), libc::O_WRONLY).unwrap();
            writer.write_at(b"WRITTEN", 10).unwrap();
            drop(writer);
            let fresh = read_all(&f.p(rel)).unwrap();
            assert!(
                fresh.len() == len || fresh.len() == 17,
                "{rel}: {} bytes",
                fresh.len()
            );
            assert_eq!(&fresh[10..17], b"WRITTEN");
        }
    }
}

#[test]
fn a_writer_right_after_the_last_reader_closes_is_not_busy() {
    // The kernel sends a closed descriptor's RELEASE after close() has returned, so an open
    // for writing (or a truncate) issued at once can reach the daemon first, while the
    // reader's passthrough of the cache file still looks open: the daemon waits for the
    // RELEASE instead of failing with ETXTBSY (the model test met that as a flake).
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    for shards in [1, 2] {
        let f = Fixture::new(shards);
        let path = f.p("dir/sub/deep/z.bin");
        let mut byte = [0u8; 1];
        let reader = fs::File::open(&path).unwrap();
        reader.read_exact_at(&mut byte, 0).unwrap();
        // The reader is served by passthrough (root, a local cache dir): a writer is busy.
        assert_errno(
            open_with(&path, libc::O_WRONLY),
            libc::ETXTBSY,
            "writer next to a reader",
        );
        drop(reader);
        // Other threads open and close other files meanwhile: their RELEASEs fill the
        // kernel's background queue, where this reader's RELEASE then waits its turn.
        let stop = AtomicBool::new(false);
        let others = [f.p("small.bin"), f.p("big.bin")];
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    while !stop.load(Relaxed) {
                        for other in &others {
                            drop(fs::File::open(other).unwrap());
                        }
                    }
                });
            }
            for round in 0..300 {
                let reader = fs::File::open(&path).unwrap();
                reader.read_exact_at(&mut byte, 0).unwrap();
                drop(reader);
                if let Err(e) = open_with(&path, libc::O_WRONLY) {
                    stop.store(true, Relaxed);
                    panic!("{shards} shard(s), round {round}: open for writing after close: {e}");
                }
            }
            stop.store(true, Relaxed);
        });
        let reader = fs::File::open(&path).unwrap();
        reader.read_exact_at(&mut byte, 0).unwrap();
        drop(reader);
        // SAFETY: a valid C string.
        let truncated = cvt(unsafe { libc::truncate(cpath(&path).as_ptr(), 1) });
        assert!(
            truncated.is_ok(),
            "{shards} shard(s): truncate after close: {truncated:?}"
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), 1);
    }
}

#[test]
fn a_large_base_directory_lists_every_entry_after_changes() {
    // More names than one getdents call returns, base and new ones mixed.
    let work = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..1500)
        .map(|i| format!("many/base-file-{i:05}"))
        .collect();
    let contents: Vec<Vec<u8>> = (0..1500).map(|i| format!("{i}").into_bytes()).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&contents)
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let (manifest, cas) = job(work.path(), &files, "2023-03-03");
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    let mut mount = Mount::writable(&manifest, &cas, &cache, &mnt, 2);
    let dir = mnt.join("many");
    let mut want: std::collections::BTreeSet<String> =
        (0..1500).map(|i| format!("base-file-{i:05}")).collect();
    for i in (0..1500).step_by(3) {
        let name = format!("base-file-{i:05}");
        fs::remove_file(dir.join(&name)).unwrap();
        want.remove(&name);
    }
    for i in (1..1500).step_by(15) {
        let (from, to) = (format!("base-file-{i:05}"), format!("renamed-{i:05}"));
        fs::rename(dir.join(&from), dir.join(&to)).unwrap();
        want.remove(&from);
        want.insert(to);
    }
    for i in 0..400 {
        let name = format!("new-file-with-a-longer-name-{i:05}");
        fs::write(dir.join(&name), b"n").unwrap();
        want.insert(name);
    }
    for i in 0..50 {
        let name = format!("subdir-{i:03}");
        fs::create_dir(dir.join(&name)).unwrap();
        want.insert(name);
    }
    let want: Vec<String> = want.into_iter().collect();
    assert_eq!(listing(&dir), want);
    // Entries' contents through the new names and the old.
    assert_eq!(read_all(&dir.join("renamed-00001")).unwrap(), b"1");
    assert_eq!(read_all(&dir.join("base-file-01499")).unwrap(), b"1499");
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
    drop(mount);
    let _mount = Mount::writable(&manifest, &cas, &cache, &mnt, 1);
    assert_eq!(listing(&dir), want, "after a remount");
}

#[test]
fn concurrent_writers_to_one_base_file_interleave_within_blocks() {
    // Two writers on alternate 4 KiB pages of the same 1 MiB blocks (both copy the blocks up
    // at once), and a reader, on 2 shards.
    let mut f = Fixture::new(2);
    let path = f.p("big.bin");
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let file = open_with(&path, libc::O_WRONLY).unwrap();
                for page in (w as usize..2048).step_by(2) {
                    file.write_all_at(&pattern(1000 + page as u64, 4096), (page * 4096) as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || {
            for _ in 0..5 {
                assert_eq!(read_all(&path).unwrap().len(), 8 * MIB);
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    let mut want = big();
    for page in 0..2048 {
        want[page * 4096..(page + 1) * 4096].copy_from_slice(&pattern(1000 + page as u64, 4096));
    }
    let check = |f: &Fixture| {
        let got = read_all(&f.p("big.bin")).unwrap();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(first.is_none(), "big.bin differs first at byte {first:?}");
        assert_eq!(got.len(), want.len());
    };
    check(&f);
    f.remount();
    check(&f);
}

#[test]
fn the_overlay_mounts_again_with_other_shard_counts() {
    let mut f = Fixture::new(2);
    let mut want_big = big();
    let file = open_with(&f.p("big.bin"), libc::O_WRONLY).unwrap();
    for block in 0..8 {
        file.write_all_at(b"patch", (block * MIB + 100) as u64)
            .unwrap();
        want_big[block * MIB + 100..block * MIB + 105].copy_from_slice(b"patch");
    }
    drop(file);
    fs::write(f.p("dir/sub/new"), b"new").unwrap();
    fs::rename(f.p("tree"), f.p("dir/tree")).unwrap();
    fs::hard_link(f.p("small.bin"), f.p("dir/small-link")).unwrap();
    fs::remove_file(f.p("a.txt")).unwrap();
    let check = |f: &Fixture, want_big: &[u8]| {
        assert!(
            read_all(&f.p("big.bin")).unwrap() == want_big,
            "{} shards",
            f.shards
        );
        assert_eq!(read_all(&f.p("dir/sub/new")).unwrap(), b"new");
        assert!(read_all(&f.p("dir/tree/b/c/3.bin")).unwrap() == pattern(4, 2 * MIB + 3));
        assert_eq!(fs::metadata(f.p("dir/small-link")).unwrap().nlink(), 2);
        assert_errno(fs::metadata(f.p("a.txt")), libc::ENOENT, "deleted");
        assert_eq!(
            listing(&f.mount.dir),
            ["big.bin", "dir", "only", "small.bin"]
        );
    };
    check(&f, &want_big);
    for shards in [1, 2, 1] {
        f.shards = shards;
        f.remount();
        check(&f, &want_big);
        // And a change on this shard count.
        let file = open_with(&f.p("big.bin"), libc::O_WRONLY).unwrap();
        let at = shards * MIB + 7;
        file.write_all_at(b"again", at as u64).unwrap();
        want_big[at..at + 5].copy_from_slice(b"again");
    }
    check(&f, &want_big);
}

#[test]
fn shared_mmap_writes_reach_the_file() {
    let mut f = Fixture::new(1);
    let mut want_small = pattern(2, 5000);
    fs::write(f.p("new.bin"), vec![0u8; 3 * 4096]).unwrap();
    let mut want_new = vec![0u8; 3 * 4096];
    for (rel, want, at) in [
        ("small.bin", &mut want_small, 4000usize),
        ("new.bin", &mut want_new, 5000usize),
    ] {
        let file = open_with(&f.p(rel), libc::O_RDWR).unwrap();
        let len = want.len();
        use std::os::fd::AsRawFd;
        // SAFETY: a shared mapping of `len` bytes of a file we keep open until after munmap.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(
                map,
                libc::MAP_FAILED,
                "mmap {rel}: {}",
                std::io::Error::last_os_error()
            );
            let bytes = std::slice::from_raw_parts_mut(map.cast::<u8>(), len);
            assert!(bytes[..] == want[..], "{rel} mapped before the write");
            bytes[at..at + 6].copy_from_slice(b"mapped");
            assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0, "msync {rel}");
            libc::munmap(map, len);
        }
        want[at..at + 6].copy_from_slice(b"mapped");
        drop(file);
        assert!(
            read_all(&f.p(rel)).unwrap() == *want,
            "{rel} after the mapped write"
        );
    }
    f.remount();
    assert!(read_all(&f.p("small.bin")).unwrap() == want_small);
    assert!(read_all(&f.p("new.bin")).unwrap() == want_new);
}

#[test]
fn names_of_255_bytes_and_no_longer() {
    let mut f = Fixture::new(1);
    let long = "n".repeat(255);
    fs::write(f.p(&long), b"long").unwrap();
    fs::create_dir(f.p(&format!("dir/{long}"))).unwrap();
    fs::rename(f.p("a.txt"), f.p(&format!("dir/{long}/{long}"))).unwrap();
    let too_long = f.p(&"n".repeat(256));
    let got = [
        ("stat", errno(fs::metadata(&too_long))),
        ("create", errno(fs::write(&too_long, b"x"))),
        ("mkdir", errno(fs::create_dir(&too_long))),
        ("rename", errno(fs::rename(f.p("small.bin"), &too_long))),
        ("symlink", errno(std::os::unix::fs::symlink("x", &too_long))),
    ];
    let wrong: Vec<String> = got
        .iter()
        .filter(|(_, e)| *e != libc::ENAMETOOLONG)
        .map(|(op, e)| format!("{op}: {}", std::io::Error::from_raw_os_error(*e)))
        .collect();
    assert!(
        wrong.is_empty(),
        "a 256-byte name must give ENAMETOOLONG: {}",
        wrong.join(", ")
    );
    f.remount();
    assert_eq!(read_all(&f.p(&long)).unwrap(), b"long");
    assert_eq!(
        read_all(&f.p(&format!("dir/{long}/{long}"))).unwrap(),
        b"hello base\n"
    );
}

#[test]
fn truncating_a_base_file_changes_what_is_read_by_new_and_open_descriptors() {
    // truncate(2) by path, with a reader that opened the file after its first change (so it is
    // served through the overlay, not the cache file): every read follows the new size.
    let f = Fixture::new(1);
    let files = base_files();
    for (rel, size) in [
        ("small.bin", 0usize),
        ("dir/sub/deep/z.bin", 100),
        ("dir/x.txt", 20_000),
    ] {
        let base = &files.iter().find(|(p, _)| *p == rel).unwrap().1;
        // SAFETY: a valid C string.
        cvt(unsafe { libc::truncate(cpath(&f.p(rel)).as_ptr(), base.len() as i64) }).unwrap();
        let reader = fs::File::open(f.p(rel)).unwrap();
        let mut first = [0u8; 5];
        reader.read_exact_at(&mut first, 0).unwrap();
        let path = cpath(&f.p(rel));
        // SAFETY: a valid C string.
        cvt(unsafe { libc::truncate(path.as_ptr(), size as i64) })
            .unwrap_or_else(|e| panic!("truncate {rel} to {size} while open for reading: {e}"));
        let mut want = base[..size.min(base.len())].to_vec();
        want.resize(size, 0);
        assert_eq!(fs::metadata(f.p(rel)).unwrap().len(), size as u64);
        let got = read_all(&f.p(rel)).unwrap();
        assert!(
            got == want,
            "{rel} ({} bytes) truncated to {size}, as stat says, but a new open reads {} bytes",
            base.len(),
            got.len()
        );
        let mut through_reader = vec![0u8; base.len() + size + 10];
        let n = reader.read_at(&mut through_reader, 0).unwrap();
        assert!(
            through_reader[..n] == want[..],
            "{rel} ({} bytes) truncated to {size}, but the descriptor opened before reads {n} \
             bytes",
            base.len()
        );
    }
}
