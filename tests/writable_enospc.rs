//! `--writable` with its cache dir on a small tmpfs: writing until the filesystem is full gives
//! ENOSPC (from write, fsync or close, never another errno), loses nothing written before (also
//! after a remount), and deleting files makes room to write again. Needs root (mount -t tmpfs).

mod common;
#[path = "support/skip.rs"]
mod skip;

use std::fs;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{is_mounted, job, pattern, read_all, Mount};
use skip::skip_or_fail;

const MIB: usize = 1 << 20;

/// A tmpfs mounted on a directory, unmounted on drop (after whatever uses it: declare it first).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() || !is_mounted(dir) {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if Command::new("umount")
            .arg(&self.dir)
            .status()
            .map_or(true, |s| !s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Writes `bytes` to a new file in 256 KiB writes, fsyncs and closes it, checking each step;
/// the errno of the first that fails.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(errno)?;
    for chunk in bytes.chunks(256 << 10) {
        file.write_all(chunk).map_err(errno)?;
    }
    file.sync_all().map_err(errno)?;
    let fd = file.into_raw_fd();
    // SAFETY: we own fd (taken from the File).
    if unsafe { libc::close(fd) } != 0 {
        return Err(errno(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn content(i: usize) -> Vec<u8> {
    pattern(100 + i as u64, MIB)
}

/// A job, a writable mount of it with the cache dir on a 48 MiB tmpfs, filled with 1 MiB files
/// until one fails; with what it takes to check and remount it. Fields drop in order: the mount
/// before the tmpfs before the temp dir.
struct Full {
    mount: Mount,
    _tmpfs: Tmpfs,
    /// Kept for its lifetime: dropping it deletes the job.
    _work: tempfile::TempDir,
    manifest: PathBuf,
    cas: PathBuf,
    cache: PathBuf,
    base: Vec<u8>,
    /// Files f0.. f{complete - 1} were written, fsynced and closed without error.
    complete: usize,
}

impl Full {
    fn new(test: &str) -> Option<Full> {
        let work = tempfile::tempdir().unwrap();
        let base = pattern(7, 2 * MIB + 5);
        let (manifest, cas) = job(
            work.path(),
            &[("base.bin", &base), ("dir/a.txt", b"a")],
            "2023-03-03",
        );
        let cache = work.path().join("cache");
        let tmpfs = match Tmpfs::mount(&cache, "48m") {
            Ok(t) => t,
            Err(why) => {
                skip_or_fail(test, &why);
                return None;
            }
        };
        let mount = Mount::writable(&manifest, &cas, &cache, &work.path().join("mnt"), 2);
        assert!(read_all(&mount.dir.join("base.bin")).unwrap() == base);
        let mut complete = 0;
        let failure = loop {
            assert!(complete < 200, "200 MiB written to a 48 MiB cache dir");
            match write_file(&mount.dir.join(format!("f{complete}")), &content(complete)) {
                Ok(()) => complete += 1,
                Err(errno) => break errno,
            }
        };
        assert_eq!(
            failure,
            libc::ENOSPC,
            "file {complete} failed with {} instead of ENOSPC",
            std::io::Error::from_raw_os_error(failure)
        );
        assert!(
            complete >= 10,
            "only {complete} MiB fit in a 48 MiB cache dir"
        );
        let full = Full {
            mount,
            _tmpfs: tmpfs,
            _work: work,
            manifest,
            cas,
            cache,
            base,
            complete,
        };
        full.check(&(0..complete).collect::<Vec<_>>());
        Some(full)
    }

    /// Files `files` have their content, and the base files theirs.
    fn check(&self, files: &[usize]) {
        let mnt = &self.mount.dir;
        for &i in files {
            let got = read_all(&mnt.join(format!("f{i}")))
                .unwrap_or_else(|e| panic!("f{i}, written before the cache dir filled: {e}"));
            assert!(got == content(i), "f{i} changed ({} bytes)", got.len());
        }
        assert!(
            read_all(&mnt.join("base.bin")).unwrap() == self.base,
            "base.bin"
        );
        assert_eq!(read_all(&mnt.join("dir/a.txt")).unwrap(), b"a");
    }

    fn remount(&mut self) {
        self.mount
            .remount_writable(&self.manifest, &self.cas, &self.cache, 2);
    }

    /// Deletes the failed file and f0, f1, then writes a new 1 MiB file, which must work.
    fn make_room_and_write(&self) -> Vec<usize> {
        let mnt = &self.mount.dir;
        // (The failed file may not exist, if its create was what failed.)
        let _ = fs::remove_file(mnt.join(format!("f{}", self.complete)));
        fs::remove_file(mnt.join("f0")).unwrap();
        fs::remove_file(mnt.join("f1")).unwrap();
        let again = self.complete + 1;
        write_file(&mnt.join(format!("f{again}")), &content(again)).unwrap_or_else(|e| {
            panic!(
                "no room after deleting 3 MiB: {}",
                std::io::Error::from_raw_os_error(e)
            )
        });
        let mut left: Vec<usize> = (2..self.complete).collect();
        left.push(again);
        self.check(&left);
        for gone in ["f0", "f1"] {
            assert!(fs::metadata(mnt.join(gone)).is_err(), "{gone} came back");
        }
        left
    }
}

#[test]
fn a_full_cache_dir_gives_enospc_and_deleting_makes_room() {
    let Some(mut full) = Full::new("a_full_cache_dir_gives_enospc_and_deleting_makes_room") else {
        return;
    };
    // A base file can no longer be changed either (its blocks must be copied up), but fails
    // cleanly and stays as it was.
    let patch = fs::OpenOptions::new()
        .write(true)
        .open(full.mount.dir.join("base.bin"))
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).map(|()| f))
        .and_then(|f| f.sync_all());
    match patch {
        Ok(()) => full.base[..4096].fill(0),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "patching base.bin: {e}"
        ),
    }
    full.check(&(0..full.complete).collect::<Vec<_>>());
    let left = full.make_room_and_write();
    full.remount();
    full.check(&left);
}

#[test]
fn a_full_cache_dir_mounts_again_with_everything_written() {
    let Some(mut full) = Full::new("a_full_cache_dir_mounts_again_with_everything_written") else {
        return;
    };
    full.remount();
    full.check(&(0..full.complete).collect::<Vec<_>>());
    let left = full.make_room_and_write();
    full.remount();
    full.check(&left);
}
