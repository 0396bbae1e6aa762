//! `mount_vfs export`: the tree of a `--writable` mount (its overlay over the manifest) as a
//! new manifest, with the new content hashed into the local CAS; `--export-on-unmount` runs the
//! same at a clean unmount.
//!
//! What is read, and what is not:
//! - a file without upper bytes keeps its manifest hashes, unread, whenever the output says its
//!   content the way the manifest did (one object, or the same 256 MiB chunks);
//! - a changed or new file is hashed from its merged bytes, block by block: the upper file, or
//!   the base object where [`Upper::from_base`] says so. In a chunked (v2025) file, a chunk whose
//!   bytes all come from the base and whose extent is unchanged keeps its chunk hash, unread;
//! - a base object is read from `CAS/Data/` (else from the cache directory's `Data/`) and its
//!   xxh128 is checked once, before any of its bytes are used: bytes that fail their hash are
//!   never exported;
//! - new objects go into the CAS ([`crate::ingest`], as `snapshot` writes them; an object
//!   already present is kept).
//!
//! The output is a full manifest of the merged tree (v2023 by default: files only; symlinks,
//! empty directories and FIFOs are left out with one warning naming them; v2025 keeps symlinks,
//! directories and the exec bit) and, on request, a v2025 diff against the mounted manifest:
//! new and changed entries, and deletions of what the base had and the tree no longer has (a
//! whole directory as one directory deletion).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, IsTerminal};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use crate::cli::ExportArgs;
use crate::ingest::{self, Cas, ObjectStream, Progress};
use crate::manifest::{
    from_fs_name, Content, EntryKind, FileEntry, Format, Hash, HashStream, Manifest,
    ManifestBuilder, CHUNK_SIZE,
};
use crate::namespace::{FileContent, Ino, Namespace, NodeKind};
use crate::overlay::{overlay_dir, Overlay, OverlayError, Owner, Time, Upper};
use crate::snapshot::{output_problem, root_relative_target, write_output};
use crate::store::object_key;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A usage mistake (exit status 2): the message says what to fix.
    #[error("{0}")]
    Usage(String),
    /// The mounted manifest is invalid, or the tree cannot be said as a manifest.
    #[error("{0}")]
    Manifest(String),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A base object whose bytes are not those of its hash.
    #[error(
        "base object {hash} ({}) fails its hash (its bytes hash to {actual}): nothing was \
         exported; put the right object back in the CAS",
        .path.display()
    )]
    BadObject {
        hash: Hash,
        path: PathBuf,
        actual: Hash,
    },
    /// A base object that neither the CAS nor the cache directory holds.
    #[error("base object {hash} (of {}) is in neither {}", .file.display(), .places)]
    MissingObject {
        hash: Hash,
        file: PathBuf,
        places: String,
    },
    /// A file whose bytes changed while they were read (export beside a live mount).
    #[error("{}: changed while it was exported (it is shorter than {size} bytes now); export again", .path.display())]
    Changed { path: PathBuf, size: u64 },
}

impl ExportError {
    /// 2 for usage mistakes, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExportError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to export, and where the bytes go.
pub struct ExportRequest<'a> {
    /// The local CAS: base objects are read from it, new objects written into it.
    pub cas: &'a Path,
    /// The mount's cache directory, whose `Data/` may hold base objects the CAS lacks.
    pub cache_dir: Option<&'a Path>,
    /// Format of the full manifest.
    pub format: Format,
    /// Also a v2025 diff against this manifest (the one mounted).
    pub diff_parent: Option<&'a Manifest>,
    /// A progress bar on stderr.
    pub progress: bool,
}

/// The result of an export.
pub struct Exported {
    pub manifest: Manifest,
    pub diff: Option<Manifest>,
    pub stats: ExportStats,
}

/// What an export did.
#[derive(Debug, Default, Clone)]
pub struct ExportStats {
    /// File entries in the manifest (a hard-linked file counts once per name).
    pub files: usize,
    /// Files whose bytes were read and hashed (once per inode).
    pub files_hashed: usize,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    pub objects_written: u64,
    pub objects_present: u64,
    /// Objects (whole files or chunks) named by their manifest hash, unread.
    pub objects_kept: u64,
    /// Entries the format cannot say: (path, what it is), in path order.
    pub left_out: Vec<(String, &'static str)>,
    /// Files with an exec bit, which v2023 cannot say.
    pub exec_bits_dropped: usize,
}

/// One entry of the merged tree, in manifest terms.
enum Entry {
    File {
        ino: Ino,
        size: u64,
        mtime_us: i64,
        executable: bool,
    },
    Dir,
    Symlink(Vec<u8>),
}

/// A file's content in the layouts the outputs need.
#[derive(Default, Clone)]
struct Hashed {
    /// One hash per 256 MiB chunk (a single hash for files up to 256 MiB): v2025, and v2023
    /// files up to 256 MiB.
    chunks: Vec<Hash>,
    /// The whole-file hash of a v2023 file over 256 MiB.
    whole: Option<Hash>,
}

impl Hashed {
    fn content(&self, format: Format) -> Content<'_> {
        match (format, self.whole) {
            (Format::V2023_03_03, Some(whole)) => Content::Whole(whole),
            _ => ingest::content(&self.chunks),
        }
    }
}

/// One file's hashing job: which pieces are known and which must be read.
struct FileJob<'a> {
    ino: Ino,
    path: PathBuf,
    size: u64,
    upper: Option<Upper>,
    base: Option<FileContent<'a>>,
    /// 256 MiB spans of the file (at least one).
    spans: usize,
    /// Per span, `Some` for a chunk hash kept from the manifest; `None` (the whole list) when
    /// no output needs chunk hashes (a v2023 file over 256 MiB, without a diff).
    chunks: Option<Vec<Option<Hash>>>,
    /// `None`: no whole-file hash needed; `Some(None)`: hash it; `Some(Some(h))`: kept.
    whole: Option<Option<Hash>>,
}

impl FileJob<'_> {
    /// The chunk kept for span `i`, if any.
    fn kept_chunk(&self, i: usize) -> Option<Hash> {
        self.chunks
            .as_ref()
            .and_then(|c| c.get(i).copied().flatten())
    }

    /// Whether span `i` must be hashed into a new chunk.
    fn hashes_chunk(&self, i: usize) -> bool {
        self.chunks.is_some() && self.kept_chunk(i).is_none()
    }

    /// Whether span `i`'s bytes must be read: for its chunk, or for the whole-file hash.
    fn reads(&self, i: usize) -> bool {
        self.whole == Some(None) || self.hashes_chunk(i)
    }

    fn reads_any(&self) -> bool {
        (0..self.spans).any(|i| self.reads(i))
    }

    /// Objects named without reading them.
    fn kept(&self) -> usize {
        self.chunks.iter().flatten().flatten().count()
            + usize::from(matches!(self.whole, Some(Some(_))))
    }

    /// The hashes of a file that reads nothing.
    fn all_kept(&self) -> Hashed {
        Hashed {
            chunks: self.chunks.iter().flatten().flatten().copied().collect(),
            whole: self.whole.flatten(),
        }
    }
}

fn span(size: u64, i: usize) -> (u64, u64) {
    let start = i as u64 * CHUNK_SIZE;
    (start, size.min(start + CHUNK_SIZE))
}

/// The base object holding exactly bytes `[start, end)` of base file `base`, if there is one.
fn base_piece(base: &FileContent, start: u64, end: u64) -> Option<Hash> {
    if base.chunked {
        let same = start.is_multiple_of(CHUNK_SIZE) && end == base.size.min(start + CHUNK_SIZE);
        same.then(|| base.objects.get((start / CHUNK_SIZE) as usize).copied())?
    } else {
        (start == 0 && end == base.size).then(|| base.objects.first().copied())?
    }
}

/// Whether every byte of `[start, end)` still comes from the base.
fn all_from_base(upper: Option<&Upper>, start: u64, end: u64, block_size: u64) -> bool {
    match upper {
        None => true,
        Some(_) if end == start => true,
        Some(u) => {
            end <= u.base_len
                && u.present
                    .range(start / block_size..=(end - 1) / block_size)
                    .next()
                    .is_none()
        }
    }
}

/// Where base objects are read from, and which ones were checked already.
struct BaseObjects<'a> {
    cas: &'a Path,
    cache_dir: Option<&'a Path>,
    verified: Mutex<HashSet<Hash>>,
}

impl BaseObjects<'_> {
    /// Opens object `hash` and checks its hash (once per export) before anything uses it.
    fn open(&self, hash: Hash, file: &Path) -> Result<File, ExportError> {
        let key = object_key(hash);
        let mut places = vec![self.cas.join(&key)];
        places.extend(self.cache_dir.map(|d| d.join(&key)));
        let Some(path) = places.iter().find(|p| p.is_file()) else {
            return Err(ExportError::MissingObject {
                hash,
                file: file.to_owned(),
                places: places
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" nor "),
            });
        };
        let object = File::open(path).map_err(io_err(path))?;
        let checked = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&hash);
        if !checked {
            // Checked through the handle that is then read: a replaced file is not re-read.
            let mut hasher = HashStream::default();
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0;
            loop {
                let n = object.read_at(&mut buf, offset).map_err(io_err(path))?;
                if n == 0 {
                    break;
                }
                hasher.update(buf.get(..n).unwrap_or_default());
                offset += n as u64;
            }
            let actual = hasher.finish();
            if actual != hash {
                return Err(ExportError::BadObject {
                    hash,
                    path: path.clone(),
                    actual,
                });
            }
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hash);
        }
        Ok(object)
    }
}

/// The merged bytes of one file: upper file and checked base objects, per block.
struct Merged<'j, 'a> {
    job: &'j FileJob<'a>,
    overlay: &'j Overlay,
    objects: &'j BaseObjects<'j>,
    upper_file: Option<File>,
    /// Open, checked base objects, by piece index.
    base_files: HashMap<usize, File>,
}

impl Merged<'_, '_> {
    /// Fills the start of `buf` with bytes from `pos` on (as many as one source holds
    /// contiguously); returns how many (at least one, for `pos` below the size).
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> Result<usize, ExportError> {
        let size = self.job.size;
        let block_size = self.overlay.block_size();
        let block_end = (pos / block_size + 1) * block_size;
        let (from_base, run_end) = match &self.job.upper {
            None => (true, size),
            Some(u) if u.from_base(pos, block_size) => (true, block_end.min(u.base_len)),
            Some(u) if pos < u.base_len => (false, block_end),
            Some(_) => (false, size),
        };
        let want = (run_end.min(size) - pos).min(buf.len() as u64) as usize;
        let buf = buf.get_mut(..want).unwrap_or_default();
        if from_base {
            let Some(base) = self.job.base else {
                return Err(ExportError::Manifest(format!(
                    "{}: the overlay takes bytes from a base file it does not have",
                    self.job.path.display()
                )));
            };
            let (index, offset) = if base.chunked {
                ((pos / CHUNK_SIZE) as usize, pos % CHUNK_SIZE)
            } else {
                (0, pos)
            };
            let hash = base.objects.get(index).copied().unwrap_or(Hash(0));
            let buf = match base.chunked {
                // Stay inside the chunk's object.
                true => {
                    let left = CHUNK_SIZE - offset;
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    buf.get_mut(..n).unwrap_or_default()
                }
                false => buf,
            };
            let object = match self.base_files.entry(index) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.objects.open(hash, &self.job.path)?)
                }
            };
            object.read_exact_at(buf, offset).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    // A checked object shorter than its manifest size: the manifest is wrong.
                    ExportError::Manifest(format!(
                        "{}: base object {hash} is shorter than the manifest says",
                        self.job.path.display()
                    ))
                } else {
                    ExportError::Io {
                        path: self.job.path.clone(),
                        source: e,
                    }
                }
            })?;
            Ok(buf.len())
        } else {
            let upper_path = self.overlay.upper_path(self.job.ino);
            let file = match &mut self.upper_file {
                Some(file) => file,
                empty => empty.insert(File::open(&upper_path).map_err(io_err(&upper_path))?),
            };
            file.read_exact_at(buf, pos).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    ExportError::Changed {
                        path: self.job.path.clone(),
                        size,
                    }
                } else {
                    ExportError::Io {
                        path: upper_path.clone(),
                        source: e,
                    }
                }
            })?;
            Ok(buf.len())
        }
    }
}

/// Reads and hashes what `job` does not keep; returns its hashes in every layout it needs.
fn hash_file(
    job: &FileJob,
    overlay: &Overlay,
    objects: &BaseObjects,
    cas: &Cas,
    buf: &mut [u8],
    progress: &Progress,
) -> Result<Hashed, ExportError> {
    let mut merged = Merged {
        job,
        overlay,
        objects,
        upper_file: None,
        base_files: HashMap::new(),
    };
    let mut chunks = ObjectStream::new(cas, CHUNK_SIZE);
    let mut whole = (job.whole == Some(None)).then(|| ObjectStream::new(cas, u64::MAX));
    let cas_err = |e| ExportError::Io {
        path: cas.root().to_owned(),
        source: e,
    };
    for i in 0..job.spans {
        if let Some(hash) = job.kept_chunk(i) {
            chunks.keep(hash);
        }
        if !job.reads(i) {
            continue;
        }
        let (start, end) = span(job.size, i);
        let mut pos = start;
        while pos < end {
            let room = buf
                .len()
                .min(usize::try_from(end - pos).unwrap_or(usize::MAX));
            let block = buf.get_mut(..room).unwrap_or_default();
            let n = merged.read_at(pos, block)?;
            let data = block.get(..n).unwrap_or_default();
            if job.hashes_chunk(i) {
                chunks.feed(data).map_err(cas_err)?;
            }
            if let Some(whole) = &mut whole {
                whole.feed(data).map_err(cas_err)?;
            }
            progress.inc(n as u64);
            pos += n as u64;
        }
    }
    let chunks = match job.chunks {
        Some(_) => chunks.finish().map_err(cas_err)?,
        None => Vec::new(),
    };
    let whole = match whole {
        Some(stream) => stream.finish().map_err(cas_err)?.first().copied(),
        None => job.whole.flatten(),
    };
    Ok(Hashed { chunks, whole })
}

fn mtime_us(t: Time) -> i64 {
    let us = i128::from(t.secs) * 1_000_000 + i128::from(t.nanos / 1000);
    i64::try_from(us).unwrap_or(if us < 0 { i64::MIN } else { i64::MAX })
}

/// Exports `overlay`'s merged tree: hashes what changed into `request.cas` and returns the full
/// manifest (and the diff, when asked for).
pub fn export(overlay: &Overlay, request: &ExportRequest) -> Result<Exported, ExportError> {
    let format = request.format;
    let v2023 = format == Format::V2023_03_03;
    let block_size = overlay.block_size();
    if block_size == 0 {
        return Err(ExportError::Manifest(format!(
            "overlay {} names no block size: it was never mounted",
            overlay.dir().display()
        )));
    }
    if request
        .diff_parent
        .is_some_and(|p| p.format() == Format::AbsoluteBeta2025_12)
    {
        return Err(ExportError::Usage(
            "--diff: the mounted manifest has absolute paths, which a diff of the (re-rooted, \
             relative) tree cannot name; export the full manifest alone"
                .into(),
        ));
    }
    let base = overlay.base();
    let base_files = base.len() as Ino;
    let mut stats = ExportStats::default();

    // The merged tree, in manifest terms, sorted by path.
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    let mut jobs: Vec<FileJob> = Vec::new();
    let mut job_of: HashMap<Ino, usize> = HashMap::new();
    for (path, ino, node) in overlay.walk() {
        let name = from_fs_name(path.as_os_str().as_bytes());
        let entry = match node.kind {
            NodeKind::Dir => Entry::Dir,
            NodeKind::Fifo => {
                stats.left_out.push((display(&name), "FIFO"));
                continue;
            }
            NodeKind::Symlink => {
                let target = overlay.readlink(ino).unwrap_or_default();
                let link_dir = name
                    .iter()
                    .rposition(|&b| b == b'/')
                    .map_or(&[][..], |i| name.get(..i).unwrap_or_default());
                let resolved = if target.starts_with(b"/") {
                    Err("has an absolute target")
                } else {
                    root_relative_target(link_dir, &target)
                };
                match resolved {
                    Ok(target) => Entry::Symlink(target),
                    Err(why) => {
                        tracing::warn!(
                            "export: symlink {} {why}; left out (manifest symlinks stay inside the root)",
                            path.display()
                        );
                        stats
                            .left_out
                            .push((display(&name), "symlink leaving the root"));
                        continue;
                    }
                }
            }
            NodeKind::File => {
                if let std::collections::hash_map::Entry::Vacant(e) = job_of.entry(ino) {
                    e.insert(jobs.len());
                    let upper = overlay.upper(ino);
                    let base_content = (ino <= base_files)
                        .then(|| base.file_content(ino))
                        .flatten();
                    jobs.push(plan(
                        ino,
                        path.clone(),
                        node.size,
                        upper,
                        base_content,
                        format,
                        request.diff_parent.is_some(),
                        block_size,
                    ));
                }
                Entry::File {
                    ino,
                    size: node.size,
                    mtime_us: mtime_us(node.mtime),
                    executable: node.perm & 0o111 != 0,
                }
            }
        };
        entries.insert(name, entry);
    }

    // Hash what is not kept.
    let data = request.cas.join("Data");
    std::fs::create_dir_all(&data).map_err(io_err(&data))?;
    let cas = Cas::new(request.cas, "export");
    let objects = BaseObjects {
        cas: request.cas,
        cache_dir: request.cache_dir,
        verified: Mutex::new(HashSet::new()),
    };
    let to_read: u64 = jobs
        .iter()
        .flat_map(|j| {
            (0..j.spans)
                .filter(|&i| j.reads(i))
                .map(|i| span(j.size, i))
        })
        .map(|(start, end)| end - start)
        .sum();
    let bar = Progress::new(to_read, request.progress);
    let reading: Vec<&FileJob> = jobs.iter().filter(|j| j.reads_any()).collect();
    let results = ingest::run_parallel(&reading, |job, buf| {
        hash_file(job, overlay, &objects, &cas, buf, &bar)
    });
    bar.finish();
    let mut hashed: HashMap<Ino, Hashed> = HashMap::new();
    for (job, result) in reading.iter().zip(results) {
        match result {
            Some(Ok(h)) => {
                stats.files_hashed += 1;
                stats.bytes_hashed += job.size;
                hashed.insert(job.ino, h);
            }
            Some(Err(e)) => return Err(e),
            None => {} // only after another file failed, which returned above
        }
    }
    for job in &jobs {
        stats.objects_kept += job.kept() as u64;
        hashed.entry(job.ino).or_insert_with(|| job.all_kept());
    }
    stats.objects_written = cas.written();
    stats.objects_present = cas.present();

    // The full manifest.
    let mut builder = ManifestBuilder::new(format);
    let mut with_files: HashSet<&[u8]> = HashSet::new();
    for (path, entry) in &entries {
        if let Entry::File { .. } = entry {
            let mut p: &[u8] = path;
            while let Some(i) = p.iter().rposition(|&b| b == b'/') {
                p = p.get(..i).unwrap_or_default();
                if !with_files.insert(p) {
                    break;
                }
            }
        }
    }
    for (path, entry) in &entries {
        match entry {
            Entry::File {
                ino,
                size,
                mtime_us,
                executable,
            } => {
                let content = hashed.get(ino).cloned().unwrap_or_default();
                if v2023 && *executable {
                    stats.exec_bits_dropped += 1;
                }
                stats.files += 1;
                builder.add_file(
                    path,
                    FileEntry {
                        size: *size,
                        mtime_us: *mtime_us,
                        executable: *executable && !v2023,
                        content: content.content(format),
                    },
                );
            }
            Entry::Dir if !v2023 => builder.add_dir(path),
            Entry::Dir if !with_files.contains(path.as_slice()) => {
                stats.left_out.push((display(path), "empty directory"));
            }
            Entry::Dir => {}
            Entry::Symlink(target) if !v2023 => builder.add_symlink(path, target),
            Entry::Symlink(_) => stats.left_out.push((display(path), "symlink")),
        }
    }
    stats.left_out.sort();
    let manifest = builder
        .build_named("exported manifest")
        .map_err(|e| ExportError::Manifest(e.to_string()))?;
    let diff = match request.diff_parent {
        Some(parent) => Some(diff(parent, &entries, &hashed)?),
        None => None,
    };
    Ok(Exported {
        manifest,
        diff,
        stats,
    })
}

/// Decides what a file needs: per 256 MiB span, a kept chunk hash or a read; and, for a v2023
/// file over 256 MiB, its whole-file hash (kept or read).
#[allow(clippy::too_many_arguments)]
fn plan<'a>(
    ino: Ino,
    path: PathBuf,
    size: u64,
    upper: Option<Upper>,
    base: Option<FileContent<'a>>,
    format: Format,
    diff: bool,
    block_size: u64,
) -> FileJob<'a> {
    let unchanged = |start, end| all_from_base(upper.as_ref(), start, end, block_size);
    let keep = |start, end| {
        base.as_ref()
            .filter(|_| unchanged(start, end))
            .and_then(|b| base_piece(b, start, end))
    };
    let large = size > CHUNK_SIZE;
    let spans = size.div_ceil(CHUNK_SIZE).max(1) as usize;
    // Chunks: for v2025 outputs (the diff is v2025 too), and as the one object of a v2023 file
    // up to 256 MiB. A v2023 file over that needs its whole-file hash instead.
    let chunks = (!large || format != Format::V2023_03_03 || diff).then(|| {
        (0..spans)
            .map(|i| {
                let (start, end) = span(size, i);
                keep(start, end)
            })
            .collect()
    });
    let whole = (large && format == Format::V2023_03_03).then(|| keep(0, size));
    FileJob {
        ino,
        path,
        size,
        upper,
        base,
        spans,
        chunks,
        whole,
    }
}

/// The v2025 diff from `parent` to the exported tree.
fn diff(
    parent: &Manifest,
    entries: &BTreeMap<Vec<u8>, Entry>,
    hashed: &HashMap<Ino, Hashed>,
) -> Result<Manifest, ExportError> {
    /// An entry of the parent, as the diff compares it.
    #[derive(PartialEq)]
    enum Old<'m> {
        Dir,
        File {
            size: u64,
            mtime_us: i64,
            executable: bool,
            pieces: Vec<Hash>,
        },
        Symlink(&'m [u8]),
    }
    let mut old: BTreeMap<&[u8], Old> = BTreeMap::new();
    for e in parent.entries() {
        let kind = match e.kind {
            EntryKind::Dir => Old::Dir,
            EntryKind::File(f) => Old::File {
                size: f.size,
                mtime_us: f.mtime_us,
                executable: f.executable,
                pieces: match f.content {
                    Content::Whole(h) => vec![h],
                    Content::Chunked(hs) => hs.to_vec(),
                },
            },
            EntryKind::Symlink { target } => Old::Symlink(target),
            EntryKind::Deleted { .. } => continue,
        };
        // v2023 directories are implied by the paths in them.
        let mut p = e.path;
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = p.get(..i).unwrap_or_default();
            old.entry(p).or_insert(Old::Dir);
        }
        old.insert(e.path, kind);
    }
    let mut builder = ManifestBuilder::new(Format::V2025_12_04Beta);
    builder.set_parent(parent.hash());
    for (path, entry) in entries {
        let now = match entry {
            Entry::Dir => Old::Dir,
            Entry::File {
                ino,
                size,
                mtime_us,
                executable,
            } => Old::File {
                size: *size,
                mtime_us: *mtime_us,
                executable: *executable,
                pieces: hashed
                    .get(ino)
                    .map(|h| h.chunks.clone())
                    .unwrap_or_default(),
            },
            Entry::Symlink(target) => Old::Symlink(target),
        };
        if old.get(path.as_slice()) == Some(&now) {
            continue;
        }
        match now {
            Old::Dir => builder.add_dir(path),
            Old::File {
                size,
                mtime_us,
                executable,
                pieces,
            } => builder.add_file(
                path,
                FileEntry {
                    size,
                    mtime_us,
                    executable,
                    content: ingest::content(&pieces),
                },
            ),
            Old::Symlink(target) => builder.add_symlink(path, target),
        }
    }
    // Deletions: what the parent has and the tree does not (a file that became a symlink or
    // back is a change, listed above). Parents sort before their children, so a deleted
    // directory is found before anything in it, which it covers.
    let mut deleted_dirs: HashSet<&[u8]> = HashSet::new();
    for (path, kind) in &old {
        let covered = path
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .any(|(i, _)| deleted_dirs.contains(path.get(..i).unwrap_or_default()));
        if covered {
            continue;
        }
        let was_dir = *kind == Old::Dir;
        let still = entries
            .get(*path)
            .is_some_and(|e| matches!(e, Entry::Dir) == was_dir);
        if !still {
            builder.add_deleted(path, was_dir);
            if was_dir {
                deleted_dirs.insert(path);
            }
        }
    }
    builder
        .build_named("exported diff")
        .map_err(|e| ExportError::Manifest(e.to_string()))
}

fn display(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// The warning for entries the format cannot say, if any.
pub fn left_out_warning(stats: &ExportStats, format: Format) -> Option<String> {
    if stats.left_out.is_empty() && stats.exec_bits_dropped == 0 {
        return None;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, what) in &stats.left_out {
        *counts.entry(what).or_default() += 1;
    }
    let mut parts: Vec<String> = counts
        .iter()
        .map(|(what, n)| format!("{n} {what}{}", if *n == 1 { "" } else { "(s)" }))
        .collect();
    if stats.exec_bits_dropped > 0 {
        parts.push(format!(
            "the exec bit of {} file(s)",
            stats.exec_bits_dropped
        ));
    }
    const NAMED: usize = 10;
    let mut names: Vec<&str> = stats
        .left_out
        .iter()
        .take(NAMED)
        .map(|(p, _)| p.as_str())
        .collect();
    if stats.left_out.len() > NAMED {
        names.push("...");
    }
    let hint = if format == Format::V2023_03_03 {
        "; --format 2025-12-04-beta keeps symlinks, empty directories and exec bits"
    } else {
        ""
    };
    Some(format!(
        "format {} cannot say {}; left out{}{}{hint}",
        format.version_string(false),
        parts.join(", "),
        if names.is_empty() { "" } else { ": " },
        names.join(", ")
    ))
}

/// Writes the manifest (and diff) and logs what the export did.
pub fn save(
    exported: &Exported,
    output: Option<&Path>,
    diff: Option<&Path>,
) -> Result<(), ExportError> {
    let bytes = exported.manifest.encode();
    let written = |r: Result<(), crate::snapshot::SnapshotError>| {
        r.map_err(|e| match e {
            crate::snapshot::SnapshotError::Io { path, source } => ExportError::Io { path, source },
            other => ExportError::Manifest(other.to_string()),
        })
    };
    if let (Some(d), Some(path)) = (&exported.diff, diff) {
        written(write_output(Some(path), &d.encode()))?;
    }
    written(write_output(output, &bytes))?;
    let s = &exported.stats;
    tracing::info!(
        files = s.files,
        files_hashed = s.files_hashed,
        bytes_hashed = s.bytes_hashed,
        objects_written = s.objects_written,
        objects_present = s.objects_present,
        objects_kept = s.objects_kept,
        left_out = s.left_out.len(),
        manifest_hash = %Hash::of(&bytes),
        diff_hash = %exported.diff.as_ref().map(|d| d.hash().to_string()).unwrap_or_default(),
        "export done"
    );
    Ok(())
}

/// The mounting user, as the overlay reports base inodes.
fn owner() -> Owner {
    // SAFETY: getuid/getgid cannot fail and have no preconditions.
    unsafe {
        Owner {
            uid: libc::getuid(),
            gid: libc::getgid(),
        }
    }
}

/// The `export` subcommand.
pub fn run(args: &ExportArgs) -> ExitCode {
    match run_export(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount_vfs export: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run_export(args: &ExportArgs) -> Result<(), ExportError> {
    for path in args.output.iter().chain(&args.diff) {
        if let Some(problem) = output_problem(path) {
            return Err(ExportError::Usage(problem));
        }
    }
    if args.output.is_some() && args.output == args.diff {
        return Err(ExportError::Usage(
            "--output and --diff name the same file; give each its own".into(),
        ));
    }
    crate::mount::check_cas(&args.cas).map_err(|e| ExportError::Usage(e.to_string()))?;
    let bytes = std::fs::read(&args.manifest).map_err(|e| {
        ExportError::Usage(format!(
            "cannot read manifest {}: {e}",
            args.manifest.display()
        ))
    })?;
    let source = args.manifest.display().to_string();
    let manifest =
        Manifest::decode(&bytes, &source).map_err(|e| ExportError::Manifest(e.to_string()))?;
    let namespace = Namespace::build(manifest.entries())
        .map_err(|e| ExportError::Manifest(format!("{source}: {e}")))?;
    let dir = overlay_dir(&args.cache_dir, &bytes);
    if !dir.join("files").is_dir() {
        return Err(ExportError::Usage(format!(
            "no overlay of {source} in --cache-dir {} (looked for {}): export needs the \
             manifest file and the --cache-dir of a `--writable` mount, byte for byte the same \
             manifest",
            args.cache_dir.display(),
            dir.display()
        )));
    }
    if args.diff.is_some() && Hash::of(&bytes) != manifest.hash() {
        tracing::warn!(
            "{source} is not in canonical form: the diff names the hash of its canonical \
             encoding, {}, as its parent (the xxh128 of the file's bytes is {})",
            manifest.hash(),
            Hash::of(&bytes)
        );
    }
    let overlay = Overlay::view(&dir, Arc::new(namespace), owner())?;
    let format = args.format.format();
    let request = ExportRequest {
        cas: &args.cas,
        cache_dir: Some(&args.cache_dir),
        format,
        diff_parent: args.diff.is_some().then_some(&manifest),
        progress: io::stderr().is_terminal(),
    };
    let exported = export(&overlay, &request)?;
    save(&exported, args.output.as_deref(), args.diff.as_deref())?;
    if let Some(warning) = left_out_warning(&exported.stats, format) {
        eprintln!("mount_vfs export: {warning}");
    }
    Ok(())
}

/// `--export-on-unmount`: exports the mount's own overlay (closed) to `output`.
pub fn on_unmount(
    overlay: &Overlay,
    cas: &Path,
    cache_dir: Option<&Path>,
    format: Format,
    output: &Path,
) -> Result<(), ExportError> {
    let request = ExportRequest {
        cas,
        cache_dir,
        format,
        diff_parent: None,
        progress: false,
    };
    let exported = export(overlay, &request)?;
    save(&exported, Some(output), None)?;
    if let Some(warning) = left_out_warning(&exported.stats, format) {
        tracing::warn!("--export-on-unmount: {warning}");
    }
    tracing::info!(
        "exported the overlay to {} (hash {})",
        output.display(),
        exported.manifest.hash()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn upper(base_len: u64, present: &[u64]) -> Option<Upper> {
        Some(Upper {
            base_len,
            present: present.iter().copied().collect(),
        })
    }

    fn job<'a>(
        size: u64,
        upper: Option<Upper>,
        base: &'a FileContent<'a>,
        format: Format,
        diff: bool,
    ) -> FileJob<'a> {
        plan(
            2,
            PathBuf::from("f"),
            size,
            upper,
            Some(*base),
            format,
            diff,
            MIB,
        )
    }

    #[test]
    fn chunks_all_from_the_base_keep_their_hashes() {
        let hashes = [Hash(1), Hash(2), Hash(3)];
        let size = 2 * CHUNK_SIZE + 5 * MIB;
        let base = FileContent {
            size,
            objects: &hashes,
            chunked: true,
        };
        let v2025 = Format::V2025_12_04Beta;
        // Untouched: nothing read.
        let j = job(size, None, &base, v2025, false);
        assert_eq!(
            j.chunks,
            Some(vec![Some(Hash(1)), Some(Hash(2)), Some(Hash(3))])
        );
        assert!(!j.reads_any());
        // One block of the middle chunk copied up: only that chunk is read.
        let block = (CHUNK_SIZE + 7 * MIB) / MIB;
        let j = job(size, upper(size, &[block]), &base, v2025, false);
        assert_eq!(j.chunks, Some(vec![Some(Hash(1)), None, Some(Hash(3))]));
        assert_eq!(
            (0..3).map(|i| j.reads(i)).collect::<Vec<_>>(),
            [false, true, false]
        );
        // Appended: the last chunk's extent changed, the first two are kept.
        let j = job(size + 10, upper(size, &[]), &base, v2025, false);
        assert_eq!(j.chunks, Some(vec![Some(Hash(1)), Some(Hash(2)), None]));
        // Truncated into the second chunk: the first is kept, the second read.
        let j = job(
            CHUNK_SIZE + MIB,
            upper(CHUNK_SIZE + MIB, &[]),
            &base,
            v2025,
            false,
        );
        assert_eq!(j.chunks, Some(vec![Some(Hash(1)), None]));
        // v2023 needs the whole-file hash, which the chunked manifest does not have: read all,
        // and without a diff no chunks are hashed.
        let j = job(size, None, &base, Format::V2023_03_03, false);
        assert_eq!((j.chunks.clone(), j.whole), (None, Some(None)));
        assert!((0..3).all(|i| j.reads(i) && !j.hashes_chunk(i)));
        // With a (v2025) diff the chunks are kept, the whole file still read.
        let j = job(size, None, &base, Format::V2023_03_03, true);
        assert_eq!(j.kept(), 3);
        assert_eq!(j.whole, Some(None));
    }

    #[test]
    fn whole_objects_are_kept_only_when_every_byte_is_from_the_base() {
        let hashes = [Hash(9)];
        let size = 8 * MIB;
        let base = FileContent {
            size,
            objects: &hashes,
            chunked: false,
        };
        let v2023 = Format::V2023_03_03;
        assert_eq!(
            job(size, None, &base, v2023, false).chunks,
            Some(vec![Some(Hash(9))])
        );
        // An upper file that holds nothing yet (opened for writing, nothing written).
        assert_eq!(
            job(size, upper(size, &[]), &base, v2023, false).chunks,
            Some(vec![Some(Hash(9))])
        );
        for (len, present) in [(size, &[3][..]), (size - 1, &[]), (0, &[])] {
            let j = job(len, upper(len, present), &base, v2023, false);
            assert_eq!(j.chunks, Some(vec![None]), "{len} {present:?}");
            assert!(j.reads(0));
        }
        // A new file (no base) is read, even when empty (its 0-byte object).
        let j = plan(9, "n".into(), 0, upper(0, &[]), None, v2023, false, MIB);
        assert!(j.reads_any());
    }

    #[test]
    fn mtimes_are_microseconds_floored() {
        assert_eq!(
            mtime_us(Time {
                secs: 1,
                nanos: 999
            }),
            1_000_000
        );
        assert_eq!(mtime_us(Time::from_micros(-1_000_001)), -1_000_001);
        assert_eq!(
            mtime_us(Time::from_micros(1_700_000_000_123_456)),
            1_700_000_000_123_456
        );
    }
}
