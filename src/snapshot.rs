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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use xxhash_rust::xxh3::Xxh3;

use crate::cli::{SnapshotArgs, SnapshotFormat};
use crate::manifest::{
    from_fs_name, Content, FileEntry, Format, Hash, Manifest, ManifestBuilder, ManifestError,
    CHUNK_SIZE,
};
use crate::store::{object_key, CasWriter};

/// Read size while hashing: large enough for sequential disk throughput, small enough that N
/// workers hold only N blocks.
const BLOCK: usize = 4 << 20;

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
        let tbytes = target.as_os_str().as_bytes();
        let (mut parts, rest): (Vec<Vec<u8>>, &[u8]) = if target.is_absolute() {
            match target.strip_prefix(&self.root) {
                Ok(inside) => (Vec::new(), inside.as_os_str().as_bytes()),
                Err(_) => return self.skip_link(path, "points outside the root"),
            }
        } else {
            let parent = rel
                .split(|&b| b == b'/')
                .filter(|c| !c.is_empty())
                .map(<[u8]>::to_vec);
            (parent.collect(), tbytes)
        };
        for comp in rest.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    if parts.pop().is_none() {
                        return self.skip_link(path, "climbs out of the root");
                    }
                }
                c => parts.push(from_fs_name(c)),
            }
        }
        if parts.is_empty() {
            return self.skip_link(path, "points at the root itself");
        }
        self.builder.add_symlink(&name, &parts.join(&b'/'));
        Ok(())
    }

    fn skip_link(&mut self, path: &Path, why: &str) -> Result<(), SnapshotError> {
        tracing::warn!(path = %path.display(), "symlink {why}; skipped (manifest symlinks must stay inside the root)");
        self.skipped += 1;
        Ok(())
    }
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

/// Where hashed files become objects: each worker writes through a [`CasWriter`], committed
/// under the content's hash unless that object is already there.
struct Cas<'a> {
    root: &'a Path,
    seq: &'a AtomicU64,
    written: &'a AtomicU64,
    present: &'a AtomicU64,
}

impl Cas<'_> {
    fn begin(&self) -> io::Result<CasWriter> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        CasWriter::create(self.root, "snapshot", n as usize)
    }

    /// Puts the object in place unless an object of that hash already exists.
    fn commit(&self, writer: CasWriter, hash: Hash) -> io::Result<()> {
        if self.root.join(object_key(hash)).exists() {
            self.present.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.written.fetch_add(1, Ordering::Relaxed);
        writer.commit(hash)
    }
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
    let mut pieces = Vec::new();
    let mut size = 0u64;
    let mut writer = cas.begin()?;
    let mut hasher = Xxh3::new();
    let mut in_chunk = 0u64;
    loop {
        let room = usize::try_from(chunk_limit - in_chunk)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(block) = buf.get_mut(..room) else {
            break;
        };
        let n = match file.read(block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let data = block.get(..n).unwrap_or_default();
        hasher.update(data);
        writer.write_at(in_chunk, data)?;
        progress.inc(n as u64);
        size += n as u64;
        in_chunk += n as u64;
        if in_chunk == chunk_limit {
            // A full chunk: commit it and start the next chunk's object.
            let h = Hash(hasher.digest128());
            let full = std::mem::replace(&mut writer, cas.begin()?);
            cas.commit(full, h)?;
            pieces.push(h);
            hasher = Xxh3::new();
            in_chunk = 0;
        }
    }
    // An error above drops the writer, which deletes its temporary file.
    if in_chunk > 0 || pieces.is_empty() {
        let h = Hash(hasher.digest128());
        cas.commit(writer, h)?;
        pieces.push(h);
    }
    Ok(Hashed {
        size,
        mtime_us,
        pieces,
    })
}

/// An optional progress bar (only when stderr is a terminal).
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(total: u64, enabled: bool) -> Progress {
        Progress(enabled.then(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "hashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        }))
    }
    fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
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
    let next = AtomicUsize::new(0);
    let (seq, written, present) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let results: Mutex<Vec<Option<io::Result<Hashed>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let bar = Progress::new(total_bytes, progress);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let cas = Cas {
                    root: cas,
                    seq: &seq,
                    written: &written,
                    present: &present,
                };
                let mut buf = vec![0u8; BLOCK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = hash_file(job, &cas, chunk_limit, &mut buf, &bar);
                    let failed = r.is_err();
                    if let Ok(mut all) = results.lock() {
                        if let Some(slot) = all.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                    if failed {
                        next.store(usize::MAX / 2, Ordering::Relaxed); // stop the others early
                    }
                }
            });
        }
    });
    bar.finish();
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
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
        let content = match h.pieces.as_slice() {
            [one] => Content::Whole(*one),
            many => Content::Chunked(many),
        };
        stats.files += 1;
        stats.bytes += h.size;
        builder.add_file(
            &job.name,
            FileEntry {
                size: h.size,
                mtime_us: h.mtime_us,
                executable: job.executable,
                content,
            },
        );
    }
    stats.objects_written = written.into_inner();
    stats.objects_present = present.into_inner();
    let manifest = builder.build_named(&dir.display().to_string())?;
    Ok((manifest, stats))
}

/// The `snapshot` subcommand.
pub fn run(args: &SnapshotArgs) -> ExitCode {
    let format = match args.format {
        SnapshotFormat::V2023_03_03 => Format::V2023_03_03,
        SnapshotFormat::V2025_12_04Beta => Format::V2025_12_04Beta,
    };
    // Hashing a large tree into the CAS takes a while: refuse an output path that cannot be
    // written before, not after.
    if let Some(path) = &args.output {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() || path.is_dir() {
            eprintln!(
                "mount_vfs snapshot: cannot write the manifest to {}: {}",
                path.display(),
                if path.is_dir() {
                    "it is a directory; name a file".to_string()
                } else {
                    format!("directory {} does not exist", parent.display())
                }
            );
            return ExitCode::from(2);
        }
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
    let written = match &args.output {
        Some(path) => fs::write(path, &bytes).map_err(io_err(path)),
        None => io::stdout()
            .lock()
            .write_all(&bytes)
            .map_err(io_err(Path::new("<stdout>"))),
    };
    if let Err(e) = written {
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
