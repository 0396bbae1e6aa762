//! Format detection and the streaming top-level decoder.
//!
//! One pass with serde_json's `Deserializer` and hand-written visitors: entries go straight into
//! the builder's arena, never through `serde_json::Value`. The version key may come after the
//! entry lists (sorted keys put `dirs`/`files`/`hashAlg` before `manifestVersion`), so every list
//! is accepted while reading and checked against the format at the end.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::builder::ManifestBuilder;
use super::error::{ManifestError, Problems, Rule};
use super::json::{HashStr, Int, IntSeed, KeySeed, MalformedHash, Text};
use super::model::{Format, Hash};
use super::v2025_beta::{EntriesSeed, List, Staged};
use super::{spec2025, v2023, Manifest};

const TOP_KEYS: &[&str] = &[
    "hashAlg",
    "manifestVersion",
    "specificationVersion",
    "paths",
    "dirs",
    "files",
    "totalSize",
    "parentManifestHash",
];

#[derive(Default)]
struct Doc {
    b: Option<ManifestBuilder>,
    staged: Staged,
    hash_alg: Option<String>,
    manifest_version: Option<String>,
    spec_version: Option<String>,
    total: Option<Int>,
    parent: Option<Result<Hash, MalformedHash>>,
    seen: [bool; 8],
}

impl Doc {
    fn builder(&mut self) -> &mut ManifestBuilder {
        self.b
            .get_or_insert_with(|| ManifestBuilder::new(Format::V2023_03_03))
    }
}

struct DocVisitor<'d>(&'d mut Doc);

impl<'de> Visitor<'de> for DocVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a manifest object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let doc = self.0;
        while let Some(key) = map.next_key_seed(KeySeed(TOP_KEYS))? {
            let k = match key {
                Ok(k) => k,
                Err(unknown) => {
                    map.next_value::<IgnoredAny>()?;
                    doc.builder()
                        .problems
                        .push(None, Rule::Schema, unknown.to_string());
                    continue;
                }
            };
            if std::mem::replace(&mut doc.seen[k], true) {
                let name = TOP_KEYS.get(k).copied().unwrap_or("?");
                doc.builder()
                    .problems
                    .push(None, Rule::Schema, format!("duplicate key {name:?}"));
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match k {
                0 => doc.hash_alg = Some(map.next_value_seed(Text)?),
                1 => doc.manifest_version = Some(map.next_value_seed(Text)?),
                2 => doc.spec_version = Some(map.next_value_seed(Text)?),
                3 => map.next_value_seed(v2023::PathsSeed(doc.builder()))?,
                4 | 5 => {
                    let mut b = doc
                        .b
                        .take()
                        .unwrap_or_else(|| ManifestBuilder::new(Format::V2023_03_03));
                    let list = if k == 4 { List::Dirs } else { List::Files };
                    let r = map.next_value_seed(EntriesSeed(list, &mut doc.staged, &mut b));
                    doc.b = Some(b);
                    r?;
                }
                6 => doc.total = Some(map.next_value_seed(IntSeed)?),
                _ => doc.parent = Some(map.next_value_seed(HashStr)?),
            }
        }
        Ok(())
    }
}

fn fatal(e: serde_json::Error, b: Option<ManifestBuilder>, source: &str) -> ManifestError {
    let entry = b
        .as_ref()
        .and_then(|b| b.cursor)
        .map(|(list, i)| format!("{list}[{i}]"));
    let mut problems = b.map(|b| b.problems).unwrap_or_default();
    let rule = match e.classify() {
        serde_json::error::Category::Data => Rule::Schema,
        _ => Rule::Syntax,
    };
    let hint = if e.is_eof() {
        " (is the file truncated?)"
    } else {
        ""
    };
    // The fatal error goes first: it is why decoding stopped.
    let mut first = Problems::default();
    first.push(entry, rule, format!("{e}{hint}"));
    first.list.append(&mut problems.list);
    first.truncated |= problems.truncated;
    first.list.truncate(super::error::MAX_PROBLEMS);
    first.into_error(source)
}

pub(crate) fn decode(bytes: &[u8], source: &str) -> Result<Manifest, ManifestError> {
    let mut doc = Doc::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = (&mut de)
        .deserialize_map(DocVisitor(&mut doc))
        .and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(fatal(e, doc.b.take(), source));
    }
    let mut b = doc
        .b
        .take()
        .unwrap_or_else(|| ManifestBuilder::new(Format::V2023_03_03));
    let [_, _, _, has_paths, has_dirs, has_files, _, _] = doc.seen;

    let format = match (&doc.manifest_version, &doc.spec_version) {
        (Some(_), Some(_)) => {
            b.problems.push(
                None,
                Rule::Schema,
                "both manifestVersion and specificationVersion",
            );
            None
        }
        (Some(v), None) if v == "2023-03-03" => Some((Format::V2023_03_03, false)),
        (Some(v), None) if v == "2025-12-04-beta" => {
            Some((Format::V2025_12_04Beta, doc.parent.is_some()))
        }
        (None, Some(v)) => match spec2025::parse_version(v) {
            Some(f) => Some(f),
            None => {
                b.problems.push(
                    None,
                    Rule::UnknownVersion,
                    format!("unknown specificationVersion {v:?}"),
                );
                None
            }
        },
        (Some(v), None) => {
            b.problems.push(
                None,
                Rule::UnknownVersion,
                format!("unknown manifestVersion {v:?}; supported: 2023-03-03, 2025-12-04-beta"),
            );
            None
        }
        (None, None) => {
            b.problems.push(
                None,
                Rule::UnknownVersion,
                "no manifestVersion or specificationVersion",
            );
            None
        }
    };
    match doc.hash_alg.as_deref() {
        Some("xxh128") => {}
        Some(other) => b.problems.push(
            None,
            Rule::HashAlg,
            format!("hashAlg {other:?} is not supported; only \"xxh128\""),
        ),
        None => b
            .problems
            .push(None, Rule::Schema, "missing key \"hashAlg\""),
    }
    match doc.total {
        Some(Int::U(t)) => b.set_declared_total(t),
        Some(Int::I(t)) => b.problems.push(
            None,
            Rule::NegativeSize,
            format!("totalSize {t} is negative"),
        ),
        Some(Int::Fraction) => {
            b.problems
                .push(None, Rule::NotInteger, "totalSize must be an integer")
        }
        None => b
            .problems
            .push(None, Rule::Schema, "missing key \"totalSize\""),
    }
    match doc.parent.take() {
        Some(Ok(h)) => b.set_parent(h),
        Some(Err(msg)) => b.problems.push(
            None,
            Rule::MalformedHash,
            format!("parentManifestHash: {msg}"),
        ),
        None => {}
    }
    let Some((format, diff)) = format else {
        return Err(b.problems.into_error(source));
    };
    b.format = format;
    b.set_diff(diff);
    if format == Format::V2023_03_03 {
        if !has_paths {
            b.problems.push(None, Rule::Schema, "missing key \"paths\"");
        }
        if has_dirs || has_files {
            b.problems.push(
                None,
                Rule::Schema,
                "\"dirs\"/\"files\" are not part of v2023-03-03 (it uses \"paths\")",
            );
        }
        if doc.seen[7] {
            b.problems
                .push(None, Rule::Schema, "v2023-03-03 has no parentManifestHash");
        }
    } else {
        if has_paths {
            b.problems.push(
                None,
                Rule::Schema,
                "\"paths\" is v2023-03-03; this format uses \"dirs\" and \"files\"",
            );
        }
        if !has_files {
            b.problems.push(None, Rule::Schema, "missing key \"files\"");
        }
        super::v2025_beta::resolve(std::mem::take(&mut doc.staged), &mut b);
    }
    b.build_named(source)
}
