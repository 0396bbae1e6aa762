//! `mount_vfs snapshot DIR --cas CAS_DIR`: hash a tree into a CAS directory and write its manifest.
//!
//! The v2023-03-03 output is byte-identical to `deadline manifest snapshot` (checked by
//! `tests/deadline_client.rs`), so it walks the tree the way the client's `glob("**/*")` does:
//! names starting with `.` are skipped at every level, symlinks are **followed** (to files and to
//! directories, inside or outside the root), dangling links and non-regular files are skipped,
//! no directory entries and no exec bit are recorded. One deliberate difference: the client
//! recurses through a symlink loop until the OS says ELOOP; we skip a directory already on the
//! current path, with a warning.
//!
//! v2025-12-04-beta keeps what v2023 cannot say: symlinks are **not** followed but recorded with
//! root-relative targets (links that leave the root are skipped with a warning), every directory
//! is listed (empty ones too), the exec bit (any of `0o111`) becomes `runnable`, and files over
//! 256 MiB are stored as 256 MiB chunks, each its own CAS object.
//!
//! Hashing runs on every core: std threads pull files from a shared index and stream each file
//! in 4 MiB blocks through XXH3-128 while writing it to a temp file in `CAS_DIR/Data/`, then
//! rename it to `{hash}.xxh128` (atomic; an object already present is left alone).

use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::SnapshotArgs;
use crate::ingest::{self, Cas, ObjectStream, Progress};
use crate::manifest::{
    from_fs_name, FileEntry, Format, Hash, Manifest, ManifestBuilder, ManifestError, CHUNK_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a snapshot did, besides the manifest.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotStats {
    pub files: usize,
    pub bytes: u64,
    /// CAS objects written by this run (the rest were already present).
    pub objects_written: u64,
    pub objects_present: u64,
    pub skipped: usize,
    /// Symlinks followed (v2023 cannot record them) and files whose exec bit was dropped (nor
    /// that): what the Deadline client does too, but worth saying.
    pub symlinks_followed: usize,
    pub exec_bits_dropped: usize,
}

struct Job {
    name: Vec<u8>,
    path: PathBuf,
    executable: bool,
}

struct Walker {
    follow: bool,
    root: PathBuf,
    jobs: Vec<Job>,
    builder: ManifestBuilder,
    skipped: usize,
    symlinks_followed: usize,
    exec_bits_dropped: usize,
    total_bytes: u64,
    /// (dev, ino) of the directories on the current path, for loop detection.
    stack: Vec<(u64, u64)>,
}

fn join(parent: &[u8], comp: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + comp.len());
    if !parent.is_empty() {
        v.extend_from_slice(parent);
        v.push(b'/');
    }
    v.extend_from_slice(comp);
    v
}

impl Walker {
    fn walk(&mut self, dir: &Path, rel: &[u8]) -> Result<(), SnapshotError> {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let fname = e.file_name();
            let raw = fname.as_bytes();
            if raw.starts_with(b".") {
                continue; // glob("**/*") skips hidden names; so does the client
            }
            let path = e.path();
            let name = join(rel, &from_fs_name(raw));
            let meta = if self.follow {
                fs::metadata(&path)
            } else {
                fs::symlink_metadata(&path)
            };
            if self.follow && e.file_type().is_ok_and(|t| t.is_symlink()) {
                self.symlinks_followed += 1;
            }
            let Ok(meta) = meta else {
                // Dangling link or vanished entry: the client's isfile() is false, it skips.
                self.skipped += 1;
                continue;
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                let id = (meta.dev(), meta.ino());
                if self.stack.contains(&id) {
                    tracing::warn!(path = %path.display(), "symlink loop: directory already on this path, skipped");
                    self.skipped += 1;
                    continue;
                }
                if !self.follow {
                    self.builder.add_dir(&name);
                }
                self.stack.push(id);
                match self.walk(&path, &name) {
                    // Like the client's glob: an unreadable subdirectory is left out, not fatal.
                    Err(SnapshotError::Io { path, source }) => {
                        tracing::warn!(path = %path.display(), error = %source, "cannot read directory; skipped");
                        self.skipped += 1;
                    }
                    other => other?,
                }
                self.stack.pop();
            } else if ft.is_file() {
                self.total_bytes += meta.len();
                let has_exec_bit = meta.permissions().mode() & 0o111 != 0;
                let executable = !self.follow && has_exec_bit;
                if self.follow && has_exec_bit {
                    self.exec_bits_dropped += 1;
                }
                self.jobs.push(Job {
                    name,
                    path,
                    executable,
                });
            } else if ft.is_symlink() {
                self.add_symlink(&path, rel, name)?;
            } else {
                self.skipped += 1; // fifo, socket, device: not content
            }
        }
        Ok(())
    }

    /// Records a symlink with its target rewritten relative to the root (v2025 only).
    fn add_symlink(&mut self, path: &Path, rel: &[u8], name: Vec<u8>) -> Result<(), SnapshotError> {
        let target = fs::read_link(path).map_err(io_err(path))?;
        let resolved = if target.is_absolute() {
            match target.strip_prefix(&self.root) {
                Ok(inside) => resolve_target(Vec::new(), inside.as_os_str().as_bytes()),
                Err(_) => Err("points outside the root"),
            }
        } else {
            root_relative_target(rel, target.as_os_str().as_bytes())
        };
        match resolved {
            Ok(target) => {
                self.builder.add_symlink(&name, &target);
                Ok(())
            }
            Err(why) => self.skip_link(path, why),
        }
    }

    fn skip_link(&mut self, path: &Path, why: &str) -> Result<(), SnapshotError> {
        tracing::warn!(path = %path.display(), "symlink {why}; skipped (manifest symlinks must stay inside the root)");
        self.skipped += 1;
        Ok(())
    }
}

/// A relative symlink target as a manifest says it: relative to the manifest root. `link_dir`
/// is the manifest path (WTF-8) of the link's directory, `target` the target as the filesystem
/// has it. Errs, saying why, when the target climbs out of the root or is the root itself.
pub(crate) fn root_relative_target(
    link_dir: &[u8],
    target: &[u8],
) -> Result<Vec<u8>, &'static str> {
    let parts = link_dir
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    resolve_target(parts, target)
}

/// Applies the components of `rest` to the root-relative directory `parts`.
fn resolve_target(mut parts: Vec<Vec<u8>>, rest: &[u8]) -> Result<Vec<u8>, &'static str> {
    for comp in rest.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("climbs out of the root");
                }
            }
            c => parts.push(from_fs_name(c)),
        }
    }
    if parts.is_empty() {
        return Err("points at the root itself");
    }
    Ok(parts.join(&b'/'))
}

/// Streams one file into the CAS; returns (size, mtime_us, content).
struct Hashed {
    size: u64,
    mtime_us: i64,
    pieces: Vec<Hash>,
}

/// Python's `trunc(st_mtime_ns // 1000)`: floor division of integer nanoseconds.
pub fn mtime_us(meta: &fs::Metadata) -> i64 {
    let ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    i64::try_from(ns.div_euclid(1000)).unwrap_or(i64::MAX)
}

fn hash_file(
    job: &Job,
    cas: &Cas,
    chunk_limit: u64,
    buf: &mut [u8],
    progress: &Progress,
) -> io::Result<Hashed> {
    let mut file = File::open(&job.path)?;
    let meta = file.metadata()?;
    let mtime_us = mtime_us(&meta);
    let mut stream = ObjectStream::new(cas, chunk_limit);
    let mut size = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.feed(buf.get(..n).unwrap_or_default())?;
        progress.inc(n as u64);
        size += n as u64;
    }
    Ok(Hashed {
        size,
        mtime_us,
        pieces: stream.finish()?,
    })
}

/// Snapshots `dir` into `cas` (`cas/Data/{hash}.xxh128`) and returns its manifest.
pub fn snapshot(
    dir: &Path,
    cas: &Path,
    format: Format,
    progress: bool,
) -> Result<(Manifest, SnapshotStats), SnapshotError> {
    let root = fs::canonicalize(dir).map_err(io_err(dir))?;
    let data = cas.join("Data");
    fs::create_dir_all(&data).map_err(io_err(&data))?;
    let follow = format == Format::V2023_03_03;
    let root_meta = fs::metadata(&root).map_err(io_err(&root))?;
    let mut w = Walker {
        follow,
        root: root.clone(),
        jobs: Vec::new(),
        builder: ManifestBuilder::new(format),
        skipped: 0,
        symlinks_followed: 0,
        exec_bits_dropped: 0,
        total_bytes: 0,
        stack: vec![(root_meta.dev(), root_meta.ino())],
    };
    w.walk(&root, b"")?;
    let Walker {
        jobs,
        mut builder,
        skipped,
        total_bytes,
        symlinks_followed,
        exec_bits_dropped,
        ..
    } = w;

    let chunk_limit = if follow { u64::MAX } else { CHUNK_SIZE };
    let store = Cas::new(cas, "snapshot");
    let bar = Progress::new(total_bytes, progress);
    let results = ingest::run_parallel(&jobs, |job, buf| {
        hash_file(job, &store, chunk_limit, buf, &bar)
    });
    bar.finish();
    let mut stats = SnapshotStats {
        skipped,
        symlinks_followed,
        exec_bits_dropped,
        ..SnapshotStats::default()
    };
    for (job, r) in jobs.iter().zip(results) {
        let h = match r {
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                return Err(SnapshotError::Io {
                    path: job.path.clone(),
                    source: e,
                })
            }
            None => continue, // not reached: only after another file failed
        };
        stats.files += 1;
        stats.bytes += h.size;
        builder.add_file(
            &job.name,
            FileEntry {
                size: h.size,
                mtime_us: h.mtime_us,
                executable: job.executable,
                content: ingest::content(&h.pieces),
            },
        );
    }
    stats.objects_written = store.written();
    stats.objects_present = store.present();
    let manifest = builder.build_named(&dir.display().to_string())?;
    Ok((manifest, stats))
}

/// Why a manifest cannot be written to `path` (its directory is missing, or it is a
/// directory), for commands that check before they spend a while hashing.
pub(crate) fn output_problem(path: &Path) -> Option<String> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let why = if path.is_dir() {
        "it is a directory; name a file".to_string()
    } else if !parent.is_dir() {
        format!("directory {} does not exist", parent.display())
    } else {
        return None;
    };
    Some(format!(
        "cannot write the manifest to {}: {why}",
        path.display()
    ))
}

/// Writes a manifest to `path`, or to standard output.
pub(crate) fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<(), SnapshotError> {
    match path {
        Some(path) => fs::write(path, bytes).map_err(io_err(path)),
        None => io::stdout()
            .lock()
            .write_all(bytes)
            .map_err(io_err(Path::new("<stdout>"))),
    }
}

/// The `snapshot` subcommand.
pub fn run(args: &SnapshotArgs) -> ExitCode {
    let format = args.format.format();
    // Hashing a large tree into the CAS takes a while: refuse an output path that cannot be
    // written before, not after.
    if let Some(problem) = args.output.as_deref().and_then(output_problem) {
        eprintln!("mount_vfs snapshot: {problem}");
        return ExitCode::from(2);
    }
    let progress = io::stderr().is_terminal();
    let (manifest, stats) = match snapshot(&args.dir, &args.cas, format, progress) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mount_vfs snapshot: {e}");
            return ExitCode::from(1);
        }
    };
    let bytes = manifest.encode();
    if let Err(e) = write_output(args.output.as_deref(), &bytes) {
        eprintln!("mount_vfs snapshot: {e}");
        return ExitCode::from(1);
    }
    if stats.symlinks_followed + stats.exec_bits_dropped > 0 {
        eprintln!(
            "mount_vfs snapshot: format 2023-03-03 followed {} symlinks and dropped the exec bit \
             of {} files, as the Deadline client does; --format 2025-12-04-beta keeps both",
            stats.symlinks_followed, stats.exec_bits_dropped
        );
    }
    tracing::info!(
        files = stats.files,
        bytes = stats.bytes,
        objects_written = stats.objects_written,
        objects_present = stats.objects_present,
        skipped = stats.skipped,
        manifest_hash = %Hash::of(&bytes),
        "snapshot done"
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtime_floors_nanoseconds_like_python() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"x").unwrap();
        let set_modified = |t| {
            File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        set_modified(
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::new(1_700_000_000, 123_456_789),
        );
        assert_eq!(mtime_us(&fs::metadata(&f).unwrap()), 1_700_000_000_123_456);
        // Before 1970: Python's // floors towards minus infinity.
        set_modified(std::time::SystemTime::UNIX_EPOCH - std::time::Duration::new(1, 500));
        assert_eq!(mtime_us(&fs::metadata(&f).unwrap()), -1_000_001);
    }
}
