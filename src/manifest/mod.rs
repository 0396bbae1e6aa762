//! Job-attachments manifests: one model for every format, decoders, validation and canonical
//! encoders that reproduce the Deadline Cloud Python client byte for byte.
//!
//! Layout: `model.rs` (public contract types), `name.rs` (WTF-8 names, UTF-16 order, fs mapping),
//! `builder.rs` (the only way to make a [`Manifest`]), `validate.rs` (the spec's reader rules),
//! `decode.rs` (format detection, streaming JSON), one file per format (`v2023.rs`,
//! `v2025_beta.rs`, `spec2025.rs`), `json.rs` (Python-compatible string escaping), `error.rs`.

mod builder;
mod decode;
mod error;
mod json;
mod model;
pub mod name;
mod spec2025;
mod v2023;
mod v2025_beta;
mod validate;

pub use builder::ManifestBuilder;
pub use error::{ManifestError, Problem, Rule, MAX_PROBLEMS};
pub use model::{
    block_digest, Content, EntryKind, EntryRef, FileEntry, Format, Hash, HashStream, CHUNK_SIZE,
};
pub use name::{from_fs_name, to_fs_name};

/// Entry kinds as stored in a [`Slot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SlotKind {
    Whole,
    Chunked,
    Dir,
    Symlink,
    DeletedFile,
    DeletedDir,
}

/// One entry, 48 bytes, no heap allocation of its own: names live in the manifest's arena and
/// chunk hashes in its chunk vector. This is what keeps a 1M-entry manifest near 100 bytes/entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    /// Path in the arena.
    pub off: u32,
    pub len: u32,
    pub size: u64,
    pub mtime_us: i64,
    /// Whole: the hash (lo, hi). Chunked: (first chunk index, count). Symlink: (target off, len).
    pub aux: [u64; 2],
    pub kind: SlotKind,
    pub executable: bool,
}

impl Slot {
    pub(crate) fn new(kind: SlotKind) -> Slot {
        Slot {
            off: 0,
            len: 0,
            size: 0,
            mtime_us: 0,
            aux: [0, 0],
            kind,
            executable: false,
        }
    }
    pub(crate) fn whole_hash(&self) -> Hash {
        Hash(u128::from(self.aux[0]) | (u128::from(self.aux[1]) << 64))
    }
    pub(crate) fn set_whole_hash(&mut self, h: Hash) {
        // Splitting a u128 into two halves: truncation is the point.
        self.aux = [h.0 as u64, (h.0 >> 64) as u64];
    }
    pub(crate) fn is_dir_like(&self) -> bool {
        matches!(self.kind, SlotKind::Dir | SlotKind::DeletedDir)
    }
}

/// A decoded, validated manifest of any format, entries sorted by the UTF-16 order of their paths.
///
/// **Invariant**: every slot's ranges lie inside `arena` / `chunks` (checked by the builder), and
/// `slots` is strictly increasing in [`name::cmp_utf16`] order.
#[derive(Clone, Debug)]
pub struct Manifest {
    format: Format,
    diff: bool,
    parent: Option<Hash>,
    total_size: u64,
    arena: Vec<u8>,
    slots: Vec<Slot>,
    chunks: Vec<Hash>,
}

impl Manifest {
    /// Decodes any supported format (detected from `manifestVersion` / `specificationVersion`)
    /// and validates it. `source` names the manifest in error messages.
    pub fn decode(bytes: &[u8], source: &str) -> Result<Manifest, ManifestError> {
        decode::decode(bytes, source)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The manifest this one is a diff against (`parentManifestHash`).
    pub fn parent_manifest_hash(&self) -> Option<Hash> {
        self.parent
    }

    /// True for diff manifests (v2025 beta with a parent, or a `*-diff-*` specification version).
    pub fn is_diff(&self) -> bool {
        self.diff
    }

    /// `totalSize` as written in the manifest (a mismatch with the entries was logged at decode).
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The `i`-th entry in canonical order.
    pub fn get(&self, i: usize) -> Option<EntryRef<'_>> {
        self.slots.get(i).map(|s| self.entry(s))
    }

    /// All entries in canonical (UTF-16 path) order; in v2025 formats dirs and files interleave.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = EntryRef<'_>> + '_ {
        self.slots.iter().map(|s| self.entry(s))
    }

    /// Index of the entry with exactly this path (binary search in canonical order).
    pub fn find(&self, path: &[u8]) -> Option<usize> {
        self.slots
            .binary_search_by(|s| name::cmp_utf16(self.path_of(s), path))
            .ok()
    }

    /// The canonical bytes of this manifest in its own format: what the Python client writes.
    pub fn encode(&self) -> Vec<u8> {
        match self.format {
            Format::V2023_03_03 => v2023::encode(self),
            Format::V2025_12_04Beta | Format::RelativeBeta2025_12 | Format::AbsoluteBeta2025_12 => {
                v2025_beta::encode(self)
            }
        }
    }

    /// The manifest hash: xxh128 of [`Manifest::encode`] (`inputManifestHash`, `parentManifestHash`).
    pub fn hash(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// Re-expresses this manifest in another format, where nothing is lost: v2023 <-> v2025 for
    /// plain files (v2023 directories become explicit, v2025 directories that hold something
    /// become implicit). Empty dirs, symlinks, chunks, exec bits and diffs have no v2023 form.
    pub fn convert(&self, format: Format) -> Result<Manifest, ManifestError> {
        let mut b = ManifestBuilder::new(format);
        if let Some(p) = self.parent {
            b.set_parent(p);
        }
        if self.diff {
            b.set_diff(true);
        }
        let to_2023 = format == Format::V2023_03_03;
        for e in self.entries() {
            match e.kind {
                EntryKind::Dir if to_2023 => {
                    // Implied by its children; an empty one is reported by `build` below.
                    b.require_implied_dir(e.path);
                }
                EntryKind::Dir => b.add_dir(e.path),
                EntryKind::File(f) => b.add_file(e.path, f),
                EntryKind::Symlink { target } => b.add_symlink(e.path, target),
                EntryKind::Deleted { dir } => b.add_deleted(e.path, dir),
            }
        }
        b.build_named("converted manifest")
    }

    pub(crate) fn path_of(&self, s: &Slot) -> &[u8] {
        range(&self.arena, s.off, s.len)
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub(crate) fn entry(&self, s: &Slot) -> EntryRef<'_> {
        let path = self.path_of(s);
        let file = |content| {
            EntryKind::File(FileEntry {
                size: s.size,
                mtime_us: s.mtime_us,
                executable: s.executable,
                content,
            })
        };
        let kind = match s.kind {
            SlotKind::Whole => file(Content::Whole(s.whole_hash())),
            SlotKind::Chunked => {
                let start = usize::try_from(s.aux[0]).unwrap_or(usize::MAX);
                let n = usize::try_from(s.aux[1]).unwrap_or(0);
                let chunks = start
                    .checked_add(n)
                    .and_then(|end| self.chunks.get(start..end))
                    .unwrap_or_default();
                file(Content::Chunked(chunks))
            }
            SlotKind::Dir => EntryKind::Dir,
            SlotKind::Symlink => EntryKind::Symlink {
                target: aux_range(&self.arena, s.aux),
            },
            SlotKind::DeletedFile => EntryKind::Deleted { dir: false },
            SlotKind::DeletedDir => EntryKind::Deleted { dir: true },
        };
        EntryRef { path, kind }
    }

    /// Heap bytes held by this manifest (capacity, not length): for the memory benchmark.
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.chunks.capacity() * std::mem::size_of::<Hash>()
    }

    /// Counts of (files, dirs, symlinks, deletions).
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.slots {
            match s.kind {
                SlotKind::Whole | SlotKind::Chunked => c.files += 1,
                SlotKind::Dir => c.dirs += 1,
                SlotKind::Symlink => c.symlinks += 1,
                SlotKind::DeletedFile | SlotKind::DeletedDir => c.deletions += 1,
            }
        }
        c
    }
}

/// Entry counts by kind, for `validate` and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub deletions: usize,
}

/// The bytes of an arena range; empty when out of bounds (cannot happen by the invariant).
pub(crate) fn range(arena: &[u8], off: u32, len: u32) -> &[u8] {
    let start = off as usize;
    arena
        .get(start..start.saturating_add(len as usize))
        .unwrap_or_default()
}

/// Appends `bytes` to a name arena and returns their range, or `None` (nothing appended) when
/// the arena would pass 4 GiB, the most a `u32` offset addresses.
pub(crate) fn append(arena: &mut Vec<u8>, bytes: &[u8]) -> Option<(u32, u32)> {
    let off = u32::try_from(arena.len()).ok()?;
    let len = u32::try_from(bytes.len()).ok()?;
    off.checked_add(len)?;
    arena.extend_from_slice(bytes);
    Some((off, len))
}

/// The problem recorded when [`append`] refuses a name.
pub(crate) const NAMES_TOO_LARGE: &str = "more than 4 GiB of names";

pub(crate) fn aux_range(arena: &[u8], aux: [u64; 2]) -> &[u8] {
    match (u32::try_from(aux[0]), u32::try_from(aux[1])) {
        (Ok(off), Ok(len)) => range(arena, off, len),
        _ => &[],
    }
}

impl Format {
    /// The version string written in the manifest (`manifestVersion` or `specificationVersion`).
    pub fn version_string(self, diff: bool) -> &'static str {
        match (self, diff) {
            (Format::V2023_03_03, _) => "2023-03-03",
            (Format::V2025_12_04Beta, _) => "2025-12-04-beta",
            (Format::RelativeBeta2025_12, false) => "relative-manifest-snapshot-beta-2025-12",
            (Format::RelativeBeta2025_12, true) => "relative-manifest-diff-beta-2025-12",
            (Format::AbsoluteBeta2025_12, false) => "absolute-manifest-snapshot-beta-2025-12",
            (Format::AbsoluteBeta2025_12, true) => "absolute-manifest-diff-beta-2025-12",
        }
    }

    /// v2025 formats list directories explicitly; v2023 implies them.
    pub fn has_explicit_dirs(self) -> bool {
        self != Format::V2023_03_03
    }
}
