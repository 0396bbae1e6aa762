//! [`ManifestBuilder`]: the one way to make a [`Manifest`], used by the decoders, by `snapshot`
//! and by the overlay's diff export. Adding never fails; [`ManifestBuilder::build`] validates
//! everything at once, sorts into canonical order and reports every problem.

use super::error::{ManifestError, Problems, Rule};
use super::model::{Content, FileEntry, Format, Hash};
use super::validate::{self, Draft};
use super::{append, Manifest, Slot, SlotKind, NAMES_TOO_LARGE};

/// Collects entries (paths are WTF-8, `/`-separated) and turns them into a validated [`Manifest`].
#[derive(Debug)]
pub struct ManifestBuilder {
    pub(crate) format: Format,
    pub(crate) diff: bool,
    pub(crate) parent: Option<Hash>,
    pub(crate) declared_total: Option<u64>,
    pub(crate) arena: Vec<u8>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) chunks: Vec<Hash>,
    pub(crate) problems: Problems,
    /// Directories that must turn out to be implied by other entries (v2025 -> v2023 conversion).
    pub(crate) required_dirs: Vec<(u32, u32)>,
    /// The list and index being decoded, so a fatal JSON error can name its entry.
    pub(crate) cursor: Option<(&'static str, usize)>,
}

impl ManifestBuilder {
    pub fn new(format: Format) -> ManifestBuilder {
        ManifestBuilder {
            format,
            diff: false,
            parent: None,
            declared_total: None,
            arena: Vec::new(),
            slots: Vec::new(),
            chunks: Vec::new(),
            problems: Problems::default(),
            required_dirs: Vec::new(),
            cursor: None,
        }
    }

    /// Room for `entries` entries with names of about `name_bytes` bytes in total.
    pub fn reserve(&mut self, entries: usize, name_bytes: usize) {
        self.slots.reserve(entries);
        self.arena.reserve(name_bytes);
    }

    /// Makes this a diff against `parent` (`parentManifestHash`).
    pub fn set_parent(&mut self, parent: Hash) {
        self.parent = Some(parent);
        self.diff = true;
    }

    /// Marks a diff (needed for the specificationVersion `*-diff-*` kinds).
    pub fn set_diff(&mut self, diff: bool) {
        self.diff = diff;
    }

    pub fn add_file(&mut self, path: &[u8], file: FileEntry<'_>) {
        let mut slot = match file.content {
            Content::Whole(h) => {
                let mut s = Slot::new(SlotKind::Whole);
                s.set_whole_hash(h);
                s
            }
            Content::Chunked(hashes) => {
                let mut s = Slot::new(SlotKind::Chunked);
                s.aux = [self.chunks.len() as u64, hashes.len() as u64];
                self.chunks.extend_from_slice(hashes);
                s
            }
        };
        slot.size = file.size;
        slot.mtime_us = file.mtime_us;
        slot.executable = file.executable;
        self.push(path, slot);
    }

    pub fn add_dir(&mut self, path: &[u8]) {
        self.push(path, Slot::new(SlotKind::Dir));
    }

    /// A symlink; `target` is relative to the manifest root (WTF-8).
    pub fn add_symlink(&mut self, path: &[u8], target: &[u8]) {
        let mut slot = Slot::new(SlotKind::Symlink);
        if let Some((off, len)) = self.push_bytes(target) {
            slot.aux = [u64::from(off), u64::from(len)];
        }
        self.push(path, slot);
    }

    /// A deletion in a diff (`delete: true`), of a directory when `dir`.
    pub fn add_deleted(&mut self, path: &[u8], dir: bool) {
        let kind = if dir {
            SlotKind::DeletedDir
        } else {
            SlotKind::DeletedFile
        };
        self.push(path, Slot::new(kind));
    }

    /// Validates, sorts and returns the manifest, or every problem found.
    pub fn build(self) -> Result<Manifest, ManifestError> {
        self.build_named("built manifest")
    }

    /// [`ManifestBuilder::build`], naming the manifest `source` in errors.
    pub fn build_named(self, source: &str) -> Result<Manifest, ManifestError> {
        let ManifestBuilder {
            format,
            diff,
            parent,
            declared_total,
            arena,
            slots,
            chunks,
            problems,
            required_dirs,
            cursor: _,
        } = self;
        let draft = Draft {
            format,
            diff,
            parent,
            declared_total,
            arena,
            slots,
            chunks,
            problems,
            required_dirs,
        };
        validate::finish(draft, source)
    }

    pub(crate) fn require_implied_dir(&mut self, path: &[u8]) {
        if let Some(r) = self.push_bytes(path) {
            self.required_dirs.push(r);
        }
    }

    pub(crate) fn set_declared_total(&mut self, total: u64) {
        self.declared_total = Some(total);
    }

    /// Appends bytes to the name arena; records a problem if the arena would pass 4 GiB.
    pub(crate) fn push_bytes(&mut self, bytes: &[u8]) -> Option<(u32, u32)> {
        let range = append(&mut self.arena, bytes);
        if range.is_none() {
            self.problems.push(None, Rule::TooLarge, NAMES_TOO_LARGE);
        }
        range
    }

    /// Adds a slot whose path is already in the arena.
    pub(crate) fn push_slot(&mut self, off: u32, len: u32, mut slot: Slot) {
        slot.off = off;
        slot.len = len;
        self.slots.push(slot);
    }

    fn push(&mut self, path: &[u8], slot: Slot) {
        if let Some((off, len)) = self.push_bytes(path) {
            self.push_slot(off, len, slot);
        }
    }
}
