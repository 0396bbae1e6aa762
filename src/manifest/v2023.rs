//! Format v2023-03-03: `paths[]` of `{hash, mtime, path, size}`; files only, directories implied.
//! What every released Deadline client reads and writes.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::builder::ManifestBuilder;
use super::error::Rule;
use super::json::{self, BytesInto, HashStr, Int, IntSeed, KeySeed};
use super::name::display_name;
use super::{Manifest, Slot, SlotKind};

/// Canonical bytes, exactly `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`.
pub(crate) fn encode(m: &Manifest) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + m.len() * 120);
    out.extend_from_slice(br#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":["#);
    for (i, s) in m.slots().iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        json::write_key(&mut out, "hash");
        json::write_hash(&mut out, s.whole_hash());
        out.push(b',');
        json::write_key(&mut out, "mtime");
        json::write_i64(&mut out, s.mtime_us);
        out.push(b',');
        json::write_key(&mut out, "path");
        json::write_str(&mut out, m.path_of(s));
        out.push(b',');
        json::write_key(&mut out, "size");
        json::write_u64(&mut out, s.size);
        out.push(b'}');
    }
    out.extend_from_slice(b"],");
    json::write_key(&mut out, "totalSize");
    json::write_u64(&mut out, m.total_size());
    out.push(b'}');
    out
}

/// Reads `paths[]` straight into the builder's arena and slots: no per-entry allocation.
pub(crate) struct PathsSeed<'b>(pub &'b mut ManifestBuilder);

impl<'de> DeserializeSeed<'de> for PathsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PathsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of path entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(n) = seq.size_hint() {
            self.0.reserve(n, n * 48);
        }
        let mut i = 0usize;
        loop {
            self.0.cursor = Some(("paths", i));
            let item = PathItem {
                b: &mut *self.0,
                index: i,
            };
            if seq.next_element_seed(item)?.is_none() {
                self.0.cursor = None;
                return Ok(());
            }
            i += 1;
        }
    }
}

const KEYS: &[&str] = &["hash", "mtime", "path", "size"];

struct PathItem<'b> {
    b: &'b mut ManifestBuilder,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for PathItem<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PathItem<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a path entry object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let b = self.b;
        let mut hash = None;
        let mut mtime = None;
        let mut size = None;
        let mut path: Option<(usize, usize)> = None;
        let mut errs: Vec<(Rule, String)> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed(KEYS))? {
            let dup = match key {
                Ok(0) => hash.replace(map.next_value_seed(HashStr)?).is_some(),
                Ok(1) => mtime.replace(map.next_value_seed(IntSeed)?).is_some(),
                Ok(2) => {
                    let start = b.arena.len();
                    map.next_value_seed(BytesInto(&mut b.arena))?;
                    path.replace((start, b.arena.len())).is_some()
                }
                Ok(_) => size.replace(map.next_value_seed(IntSeed)?).is_some(),
                Err(unknown) => {
                    map.next_value::<IgnoredAny>()?;
                    errs.push((Rule::Schema, unknown.to_string()));
                    false
                }
            };
            if dup {
                errs.push((Rule::Schema, "duplicate key".into()));
            }
        }
        let name = path.and_then(|(s, e)| b.arena.get(s..e)).map(display_name);
        let label = match &name {
            Some(n) => format!("paths[{}] {n:?}", self.index),
            None => format!("paths[{}]", self.index),
        };
        let mut slot = Slot::new(SlotKind::Whole);
        match hash {
            Some(Ok(h)) => slot.set_whole_hash(h),
            Some(Err(msg)) => errs.push((Rule::MalformedHash, msg.to_string())),
            None => errs.push((Rule::Schema, "missing key \"hash\"".into())),
        }
        match size.map(size_bytes) {
            Some(Ok(v)) => slot.size = v,
            Some(Err(e)) => errs.push(e),
            None => errs.push((Rule::Schema, "missing key \"size\"".into())),
        }
        match mtime.map(mtime_us) {
            Some(Ok(v)) => slot.mtime_us = v,
            Some(Err(e)) => errs.push(e),
            None => errs.push((Rule::Schema, "missing key \"mtime\"".into())),
        }
        if path.is_none() {
            errs.push((Rule::Schema, "missing key \"path\"".into()));
        }
        match path {
            Some((s, e)) if errs.is_empty() => match (u32::try_from(s), u32::try_from(e - s)) {
                (Ok(off), Ok(len)) if e <= u32::MAX as usize => b.push_slot(off, len, slot),
                _ => b
                    .problems
                    .push(None, Rule::TooLarge, "more than 4 GiB of names"),
            },
            _ => {
                for (rule, detail) in errs {
                    b.problems.push(Some(label.clone()), rule, detail);
                }
            }
        }
        Ok(())
    }
}

/// A `size` value: a non-negative integer number of bytes.
pub(crate) fn size_bytes(v: Int) -> Result<u64, (Rule, String)> {
    match v {
        Int::U(v) => Ok(v),
        Int::I(v) => Err((Rule::NegativeSize, format!("size {v} is negative"))),
        Int::Fraction => Err((Rule::NotInteger, "size must be an integer".into())),
    }
}

/// An `mtime` value: integer microseconds, which may be negative (before 1970).
pub(crate) fn mtime_us(v: Int) -> Result<i64, (Rule, String)> {
    match v {
        Int::I(v) => Ok(v),
        Int::U(v) => {
            i64::try_from(v).map_err(|_| (Rule::NotInteger, format!("mtime {v} is too large")))
        }
        Int::Fraction => Err((
            Rule::NotInteger,
            "mtime must be an integer (microseconds)".into(),
        )),
    }
}
