//! Format v2025-12-04-beta (and the shared layout of the `specificationVersion` family):
//! `dirs[]` and `files[]` with `$N/` parent compression, symlinks, exec bit, 256 MiB chunks and
//! diffs (`delete: true`, `parentManifestHash`).
//!
//! Decoding is two-step because keys may come in any order: names are staged raw while
//! streaming, then `$N/` references are resolved once every dir is known.

use std::collections::HashMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use super::builder::ManifestBuilder;
use super::error::Rule;
use super::json::{self, BoolSeed, BytesInto, HashStr, IntSeed, KeySeed};
use super::model::{Format, Hash};
use super::name::display_name;
use super::spec2025::{DIR_KEYS, FILE_KEYS, TARGET_KEYS};
use super::{aux_range, range, Manifest, Slot, SlotKind};

/// Entries read but not yet resolved: names still hold `$N/`.
#[derive(Default, Debug)]
pub(crate) struct Staged {
    raw: Vec<u8>,
    /// `None` for an entry that already failed: keeps `$N` indices aligned.
    dirs: Vec<Option<(u32, u32, bool)>>,
    /// Slot with `off/len` pointing into `raw`; symlinks have `aux` = target range in `raw`.
    files: Vec<Slot>,
}

fn raw_range((start, end): (usize, usize)) -> Option<(u32, u32)> {
    let off = u32::try_from(start).ok()?;
    let len = u32::try_from(end.checked_sub(start)?).ok()?;
    off.checked_add(len)?;
    Some((off, len))
}

/// Splits `$N/rest` into (N, rest).
fn dir_ref(name: &[u8]) -> Option<(usize, &[u8])> {
    let digits = name.strip_prefix(b"$")?;
    let n_len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    let (num, rest) = digits.split_at(n_len);
    let rest = rest.strip_prefix(b"/")?;
    if num.is_empty() || num.len() > 9 {
        return None;
    }
    let n = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some((n, rest))
}

/// Why a name or symlink target cannot be expanded: the detail of a [`Rule::BadDirRef`] problem.
/// `what` says which field ("name", "symlink target").
#[derive(Debug, thiserror::Error)]
enum DirRefError {
    /// `$N/a/b` in a name: a name under `$N/` is one component.
    #[error("{what} `$N/...` must be followed by one name, without `/`")]
    NestedName { what: &'static str },
    /// `$N/` names no directory listed before this entry.
    #[error("{what} refers to ${n}/, but there is no such directory before it")]
    NoSuchDir { what: &'static str, n: usize },
    /// `a/b/c` written out in full instead of `$N/c`.
    #[error("{what} has more than one `/` but is not written `$N/name` (N = index of its parent in dirs)")]
    NotCompressed { what: &'static str },
}

/// Resolves staged entries into the builder (full paths), reporting bad `$N/` references.
pub(crate) fn resolve(st: Staged, b: &mut ManifestBuilder) {
    let mut dir_paths: Vec<Option<(u32, u32)>> = Vec::with_capacity(st.dirs.len());
    let mut scratch = Vec::new();
    let mut expand = |b: &mut ManifestBuilder,
                      raw: &[u8],
                      limit: usize,
                      dir_paths: &[Option<(u32, u32)>],
                      what: &'static str,
                      literal_ok: bool|
     -> Result<Option<(u32, u32)>, DirRefError> {
        if let Some((n, rest)) = dir_ref(raw) {
            if !literal_ok && rest.contains(&b'/') {
                return Err(DirRefError::NestedName { what });
            }
            let Some(Some((off, len))) = dir_paths.get(n).filter(|_| n < limit) else {
                return Err(DirRefError::NoSuchDir { what, n });
            };
            scratch.clear();
            scratch.extend_from_slice(range(&b.arena, *off, *len));
            scratch.push(b'/');
            scratch.extend_from_slice(rest);
            Ok(b.push_bytes(&scratch))
        } else if !literal_ok && raw.iter().filter(|&&c| c == b'/').count() > 1 {
            Err(DirRefError::NotCompressed { what })
        } else {
            Ok(b.push_bytes(raw))
        }
    };
    for (i, d) in st.dirs.iter().enumerate() {
        let Some((off, len, deleted)) = *d else {
            dir_paths.push(None);
            continue;
        };
        let raw = range(&st.raw, off, len);
        match expand(b, raw, i, &dir_paths, "name", false) {
            Ok(r) => {
                dir_paths.push(r);
                if let Some((o, l)) = r {
                    let kind = if deleted {
                        SlotKind::DeletedDir
                    } else {
                        SlotKind::Dir
                    };
                    b.push_slot(o, l, Slot::new(kind));
                }
            }
            Err(bad) => {
                dir_paths.push(None);
                let label = format!("dirs[{i}] {:?}", display_name(raw));
                b.problems
                    .push(Some(label), Rule::BadDirRef, bad.to_string());
            }
        }
    }
    let ndirs = dir_paths.len();
    for (i, slot) in st.files.iter().enumerate() {
        let raw = range(&st.raw, slot.off, slot.len);
        let label = || Some(format!("files[{i}] {:?}", display_name(raw)));
        let mut slot = *slot;
        if slot.kind == SlotKind::Symlink {
            let target = aux_range(&st.raw, slot.aux);
            match expand(b, target, ndirs, &dir_paths, "symlink target", true) {
                Ok(Some((o, l))) => slot.aux = [u64::from(o), u64::from(l)],
                Ok(None) => continue,
                Err(bad) => {
                    b.problems.push(label(), Rule::BadDirRef, bad.to_string());
                    continue;
                }
            }
        }
        match expand(b, raw, ndirs, &dir_paths, "name", false) {
            Ok(Some((o, l))) => b.push_slot(o, l, slot),
            Ok(None) => {}
            Err(bad) => b.problems.push(label(), Rule::BadDirRef, bad.to_string()),
        }
    }
}

/// Which list of entries a seed reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum List {
    Dirs,
    Files,
}

/// Reads `dirs[]` or `files[]` into the staging area (chunk hashes go straight to the builder),
/// keeping the builder's cursor on the entry being read.
pub(crate) struct EntriesSeed<'s>(pub List, pub &'s mut Staged, pub &'s mut ManifestBuilder);

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self.0 {
            List::Dirs => "a list of directory entries",
            List::Files => "a list of file entries",
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let EntriesSeed(list, st, b) = self;
        let list_name = match list {
            List::Dirs => "dirs",
            List::Files => "files",
        };
        let mut i = 0;
        loop {
            b.cursor = Some((list_name, i));
            let item = Entry {
                list,
                st: &mut *st,
                b: &mut *b,
                index: i,
            };
            if seq.next_element_seed(item)?.is_none() {
                b.cursor = None;
                return Ok(());
            }
            i += 1;
        }
    }
}

/// One entry of `dirs[]` or `files[]`.
struct Entry<'s> {
    list: List,
    st: &'s mut Staged,
    b: &'s mut ManifestBuilder,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for Entry<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entry<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self.list {
            List::Dirs => "a directory entry object",
            List::Files => "a file entry object",
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        match self.list {
            List::Dirs => self.visit_dir(map),
            List::Files => self.visit_file(map),
        }
    }
}

impl Entry<'_> {
    fn visit_dir<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let st = self.st;
        let mut name = None;
        let mut deleted = None;
        let mut errs: Vec<(Rule, String)> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed(DIR_KEYS))? {
            let dup = match key {
                Ok(0 | 1) => {
                    let start = st.raw.len();
                    map.next_value_seed(BytesInto(&mut st.raw))?;
                    name.replace((start, st.raw.len())).is_some()
                }
                Ok(_) => deleted.replace(map.next_value_seed(BoolSeed)?).is_some(),
                Err(unknown) => {
                    map.next_value::<IgnoredAny>()?;
                    errs.push((Rule::Schema, unknown.to_string()));
                    false
                }
            };
            if dup {
                errs.push((
                    Rule::Schema,
                    "duplicate key (or both spellings of one key)".into(),
                ));
            }
        }
        let label = format!("dirs[{}]", self.index);
        let r = name.and_then(raw_range);
        if name.is_none() {
            errs.push((Rule::Schema, "missing key \"name\"".into()));
        } else if r.is_none() {
            errs.push((Rule::TooLarge, "more than 4 GiB of names".into()));
        }
        match r {
            Some((off, len)) if errs.is_empty() => {
                st.dirs.push(Some((off, len, deleted.unwrap_or(false))));
            }
            _ => {
                // Keep the index space intact so later `$N/` references still line up.
                st.dirs.push(None);
                for (rule, detail) in errs {
                    self.b.problems.push(Some(label.clone()), rule, detail);
                }
            }
        }
        Ok(())
    }

    fn visit_file<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (st, b) = (self.st, self.b);
        let mut name = None;
        let mut deleted = None;
        let mut hash = None;
        let mut chunks: Option<(usize, Vec<String>)> = None;
        let mut size = None;
        let mut mtime = None;
        let mut runnable = None;
        let mut target: Option<Option<(usize, usize)>> = None;
        let mut errs: Vec<(Rule, String)> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed(FILE_KEYS))? {
            let dup = match key {
                Ok(0 | 1) => {
                    let start = st.raw.len();
                    map.next_value_seed(BytesInto(&mut st.raw))?;
                    name.replace((start, st.raw.len())).is_some()
                }
                Ok(2 | 3) => deleted.replace(map.next_value_seed(BoolSeed)?).is_some(),
                Ok(4) => hash.replace(map.next_value_seed(HashStr)?).is_some(),
                Ok(5) => {
                    let start = b.chunks.len();
                    let bad = map.next_value_seed(ChunksSeed(&mut b.chunks))?;
                    chunks.replace((start, bad)).is_some()
                }
                Ok(6) => size.replace(map.next_value_seed(IntSeed)?).is_some(),
                Ok(7) => mtime.replace(map.next_value_seed(IntSeed)?).is_some(),
                Ok(8) => runnable.replace(map.next_value_seed(BoolSeed)?).is_some(),
                Ok(_) => target
                    .replace(map.next_value_seed(TargetSeed(&mut st.raw))?)
                    .is_some(),
                Err(unknown) => {
                    map.next_value::<IgnoredAny>()?;
                    errs.push((Rule::Schema, unknown.to_string()));
                    false
                }
            };
            if dup {
                errs.push((
                    Rule::Schema,
                    "duplicate key (or both spellings of one key)".into(),
                ));
            }
        }
        let r = name.and_then(raw_range);
        let label = match r {
            Some((o, l)) => format!(
                "files[{}] {:?}",
                self.index,
                display_name(range(&st.raw, o, l))
            ),
            None => format!("files[{}]", self.index),
        };
        if name.is_none() {
            errs.push((Rule::Schema, "missing key \"name\"".into()));
        }
        let contents = usize::from(hash.is_some())
            + usize::from(chunks.is_some())
            + usize::from(target.is_some());
        let mut slot;
        if deleted == Some(true) {
            slot = Slot::new(SlotKind::DeletedFile);
            if contents > 0 || size.is_some() || mtime.is_some() || runnable.is_some() {
                errs.push((
                    Rule::Schema,
                    "a deleted entry carries nothing but name and delete".into(),
                ));
            }
        } else if contents != 1 {
            errs.push((
                Rule::Schema,
                "needs exactly one of hash, chunkhashes or symlink".into(),
            ));
            slot = Slot::new(SlotKind::Whole);
        } else if let Some(t) = target {
            slot = Slot::new(SlotKind::Symlink);
            match t.and_then(raw_range) {
                Some((o, l)) => slot.aux = [u64::from(o), u64::from(l)],
                None => errs.push((Rule::Schema, "symlink needs {\"name\": target}".into())),
            }
            if runnable.is_some() {
                errs.push((Rule::Schema, "a symlink has no runnable flag".into()));
            }
            // size/mtime on a symlink are meaningless; tolerated, not kept.
        } else {
            if let Some((start, bad)) = chunks {
                slot = Slot::new(SlotKind::Chunked);
                slot.aux = [start as u64, b.chunks.len().saturating_sub(start) as u64];
                for msg in bad {
                    errs.push((Rule::MalformedHash, msg));
                }
            } else {
                slot = Slot::new(SlotKind::Whole);
                match hash {
                    Some(Ok(h)) => slot.set_whole_hash(h),
                    Some(Err(msg)) => errs.push((Rule::MalformedHash, msg.to_string())),
                    None => {}
                }
            }
            slot.executable = runnable.unwrap_or(false);
            match size.map(super::v2023::size_bytes) {
                Some(Ok(v)) => slot.size = v,
                Some(Err(e)) => errs.push(e),
                None => errs.push((Rule::Schema, "missing key \"size\"".into())),
            }
            match mtime.map(super::v2023::mtime_us) {
                Some(Ok(v)) => slot.mtime_us = v,
                Some(Err(e)) => errs.push(e),
                None => errs.push((Rule::Schema, "missing key \"mtime\"".into())),
            }
        }
        match r {
            Some((off, len)) if errs.is_empty() => {
                slot.off = off;
                slot.len = len;
                st.files.push(slot);
            }
            _ => {
                for (rule, detail) in errs {
                    b.problems.push(Some(label.clone()), rule, detail);
                }
            }
        }
        Ok(())
    }
}

/// `chunkhashes: [..]`: pushes parsed hashes, returns messages for malformed ones.
struct ChunksSeed<'c>(&'c mut Vec<Hash>);

impl<'de> DeserializeSeed<'de> for ChunksSeed<'_> {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ChunksSeed<'_> {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of chunk hashes")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut bad = Vec::new();
        while let Some(h) = seq.next_element_seed(HashStr)? {
            match h {
                Ok(h) => self.0.push(h),
                Err(msg) => bad.push(format!("chunkhashes: {msg}")),
            }
        }
        Ok(bad)
    }
}

/// `symlink: {"name": target}` (or `{"target": ..}`): target bytes into the staging arena.
struct TargetSeed<'r>(&'r mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for TargetSeed<'_> {
    type Value = Option<(usize, usize)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TargetSeed<'_> {
    type Value = Option<(usize, usize)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a symlink object {\"name\": target}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut start = None;
        let mut ok = true;
        while let Some(key) = map.next_key_seed(KeySeed(TARGET_KEYS))? {
            match key {
                Ok(_) if start.is_none() => {
                    let begin = self.0.len();
                    map.next_value_seed(BytesInto(&mut *self.0))?;
                    start = Some((begin, self.0.len()));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    ok = false;
                }
            }
        }
        Ok(start.filter(|_| ok))
    }
}

/// Canonical v2025 bytes (Python key spelling, `$N/` compression, UTF-16 order).
pub(crate) fn encode(m: &Manifest) -> Vec<u8> {
    let slots = m.slots();
    let mut dir_index: HashMap<&[u8], usize, Xxh3DefaultBuilder> = HashMap::default();
    for s in slots.iter().filter(|s| s.is_dir_like()) {
        let n = dir_index.len();
        dir_index.entry(m.path_of(s)).or_insert(n);
    }
    let write_name = |out: &mut Vec<u8>, path: &[u8]| {
        let split = path.iter().rposition(|&c| c == b'/');
        let parent = split
            .and_then(|i| path.get(..i))
            .and_then(|p| dir_index.get(p));
        match (parent, split) {
            (Some(n), Some(i)) => {
                let mut name = format!("${n}/").into_bytes();
                name.extend_from_slice(path.get(i + 1..).unwrap_or_default());
                json::write_str(out, &name);
            }
            _ => json::write_str(out, path),
        }
    };
    let mut out = Vec::with_capacity(120 + slots.len() * 110);
    out.extend_from_slice(b"{\"dirs\":[");
    let mut first = true;
    for s in slots.iter().filter(|s| s.is_dir_like()) {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.push(b'{');
        if s.kind == SlotKind::DeletedDir {
            out.extend_from_slice(b"\"delete\":true,");
        }
        json::write_key(&mut out, "name");
        write_name(&mut out, m.path_of(s));
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"files\":[");
    let mut first = true;
    for s in slots.iter().filter(|s| !s.is_dir_like()) {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.push(b'{');
        let path = m.path_of(s);
        match s.kind {
            SlotKind::DeletedFile => {
                out.extend_from_slice(b"\"delete\":true,");
                json::write_key(&mut out, "name");
                write_name(&mut out, path);
            }
            SlotKind::Symlink => {
                json::write_key(&mut out, "name");
                write_name(&mut out, path);
                out.extend_from_slice(b",\"symlink\":{\"name\":");
                write_name(&mut out, aux_range(&m.arena, s.aux));
                out.push(b'}');
            }
            _ => {
                if let super::EntryKind::File(f) = m.entry(s).kind {
                    match f.content {
                        super::Content::Chunked(hashes) => {
                            out.extend_from_slice(b"\"chunkhashes\":[");
                            for (i, h) in hashes.iter().enumerate() {
                                if i > 0 {
                                    out.push(b',');
                                }
                                json::write_hash(&mut out, *h);
                            }
                            out.extend_from_slice(b"],");
                        }
                        super::Content::Whole(h) => {
                            json::write_key(&mut out, "hash");
                            json::write_hash(&mut out, h);
                            out.push(b',');
                        }
                    }
                }
                json::write_key(&mut out, "mtime");
                json::write_i64(&mut out, s.mtime_us);
                out.push(b',');
                json::write_key(&mut out, "name");
                write_name(&mut out, path);
                if s.executable {
                    out.extend_from_slice(b",\"runnable\":true");
                }
                out.push(b',');
                json::write_key(&mut out, "size");
                json::write_u64(&mut out, s.size);
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"hashAlg\":\"xxh128\",");
    let version = m.format().version_string(m.is_diff());
    let parent = |out: &mut Vec<u8>| {
        if let Some(p) = m.parent_manifest_hash() {
            json::write_key(out, "parentManifestHash");
            json::write_hash(out, p);
            out.push(b',');
        }
    };
    if m.format() == Format::V2025_12_04Beta {
        out.extend_from_slice(b"\"manifestVersion\":");
        json::write_str(&mut out, version.as_bytes());
        out.push(b',');
        parent(&mut out);
    } else {
        parent(&mut out);
        out.extend_from_slice(b"\"specificationVersion\":");
        json::write_str(&mut out, version.as_bytes());
        out.push(b',');
    }
    json::write_key(&mut out, "totalSize");
    json::write_u64(&mut out, m.total_size());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_refs_parse_strictly() {
        assert_eq!(dir_ref(b"$0/a"), Some((0, &b"a"[..])));
        assert_eq!(dir_ref(b"$12/a/b"), Some((12, &b"a/b"[..])));
        assert_eq!(dir_ref(b"$/a"), None);
        assert_eq!(dir_ref(b"$x/a"), None);
        assert_eq!(dir_ref(b"a/b"), None);
        assert_eq!(dir_ref(b"$99999999999/a"), None);
    }

    /// The problem details users see, word for word.
    #[test]
    fn dir_ref_errors_keep_their_wording() {
        assert_eq!(
            DirRefError::NestedName { what: "name" }.to_string(),
            "name `$N/...` must be followed by one name, without `/`"
        );
        assert_eq!(
            DirRefError::NoSuchDir {
                what: "symlink target",
                n: 5
            }
            .to_string(),
            "symlink target refers to $5/, but there is no such directory before it"
        );
        assert_eq!(
            DirRefError::NotCompressed { what: "name" }.to_string(),
            "name has more than one `/` but is not written `$N/name` (N = index of its parent in dirs)"
        );
    }
}
