//! The reader rules of `manifest-formats.md` ("Validation every reader must do"), applied to a
//! builder's entries, plus canonical sorting. Every problem is collected, none panics.

use std::cmp::Ordering;
use std::collections::HashSet;

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use super::error::{ManifestError, Problems, Rule};
use super::model::{Format, CHUNK_SIZE};
use super::name::{cmp_utf16, display_name, is_wtf8};
use super::{append, aux_range, range, Hash, Manifest, Slot, SlotKind, NAMES_TOO_LARGE};

fn label(path: &[u8]) -> Option<String> {
    Some(format!("{:?}", display_name(path)))
}

/// Checks one entry path. Absolute manifests need a leading `/`, relative ones must not have it.
fn check_path(path: &[u8], absolute: bool) -> Option<(Rule, String)> {
    if path.contains(&0) {
        return Some((Rule::NulByte, "path contains a NUL byte".into()));
    }
    if !is_wtf8(path) {
        return Some((Rule::InvalidName, "path is not valid UTF-8/WTF-8".into()));
    }
    let rest = match (path.strip_prefix(b"/"), absolute) {
        (Some(_), false) => {
            return Some((
                Rule::AbsolutePath,
                "absolute path in a relative manifest".into(),
            ))
        }
        (None, true) => {
            return Some((
                Rule::RelativePath,
                "relative path in an absolute manifest".into(),
            ))
        }
        (Some(rest), true) => rest,
        (None, false) => path,
    };
    for comp in rest.split(|&b| b == b'/') {
        match comp {
            b"" => {
                return Some((
                    Rule::EmptyComponent,
                    "empty path component (`//`, leading or trailing `/`)".into(),
                ))
            }
            b"." | b".." => {
                return Some((Rule::DotComponent, "`.` or `..` component".into()));
            }
            _ => {}
        }
    }
    None
}

/// Checks a symlink target: relative to the manifest root, never climbing out of it.
fn check_target(target: &[u8], absolute: bool) -> Option<(Rule, String)> {
    if target.is_empty() {
        return Some((Rule::SymlinkEscapes, "empty symlink target".into()));
    }
    if target.contains(&0) {
        return Some((Rule::NulByte, "symlink target contains a NUL byte".into()));
    }
    if !is_wtf8(target) {
        return Some((
            Rule::InvalidName,
            "symlink target is not valid UTF-8/WTF-8".into(),
        ));
    }
    let rest = match target.strip_prefix(b"/") {
        Some(_) if !absolute => {
            return Some((
                Rule::SymlinkAbsolute,
                "absolute symlink target in a relative manifest; targets are relative to the manifest root".into(),
            ))
        }
        Some(rest) => rest,
        None => target,
    };
    let mut depth = 0usize;
    for comp in rest.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if depth == 0 {
                    return Some((
                        Rule::SymlinkEscapes,
                        format!(
                            "symlink target {:?} climbs out of the manifest root",
                            display_name(target)
                        ),
                    ));
                }
                depth -= 1;
            }
            _ => depth += 1,
        }
    }
    None
}

fn kind_rank(k: SlotKind) -> u8 {
    // Deletions first, so a diff that replaces a file by a dir reads "delete, then add".
    match k {
        SlotKind::DeletedFile | SlotKind::DeletedDir => 0,
        _ => 1,
    }
}

/// True when a directory entry (live or deleted) has exactly this path; `slots` must be sorted.
fn has_dir_slot(slots: &[Slot], arena: &[u8], path: &[u8]) -> bool {
    let first = slots
        .binary_search_by(|s| cmp_utf16(range(arena, s.off, s.len), path).then(Ordering::Greater))
        .unwrap_or_else(|i| i);
    slots
        .get(first..)
        .unwrap_or_default()
        .iter()
        .take_while(|s| range(arena, s.off, s.len) == path)
        .any(Slot::is_dir_like)
}

/// `$<digits>/...`: the form of a compressed v2025 name.
fn looks_like_dir_ref(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(b"$") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.get(digits) == Some(&b'/')
}

fn parent(path: &[u8]) -> Option<&[u8]> {
    let i = path.iter().rposition(|&b| b == b'/')?;
    path.get(..i).filter(|p| !p.is_empty())
}

/// Everything a [`ManifestBuilder`](super::ManifestBuilder) collected, handed over for
/// [`finish`]: entries in the order they were added, and the problems found while adding them.
pub(crate) struct Draft {
    pub format: Format,
    pub diff: bool,
    pub parent: Option<Hash>,
    pub declared_total: Option<u64>,
    pub arena: Vec<u8>,
    pub slots: Vec<Slot>,
    pub chunks: Vec<Hash>,
    pub problems: Problems,
    /// Directories that must turn out to be implied by other entries (v2025 -> v2023).
    pub required_dirs: Vec<(u32, u32)>,
}

/// Validates `draft`, sorts it into canonical order and returns the manifest, or every problem
/// found.
pub(crate) fn finish(draft: Draft, source: &str) -> Result<Manifest, ManifestError> {
    let Draft {
        format,
        diff,
        parent: parent_hash,
        declared_total,
        mut arena,
        mut slots,
        chunks,
        mut problems,
        required_dirs,
    } = draft;
    let absolute = format == Format::AbsoluteBeta2025_12;
    let v2023 = format == Format::V2023_03_03;

    if u32::try_from(slots.len()).is_err() {
        problems.push(None, Rule::TooLarge, "more than 4 Gi entries");
    }
    if format == Format::V2023_03_03 && diff {
        problems.push(
            None,
            Rule::UnsupportedInFormat,
            "v2023-03-03 has no diff manifests",
        );
    }
    let spec = matches!(
        format,
        Format::RelativeBeta2025_12 | Format::AbsoluteBeta2025_12
    );
    if spec && diff && parent_hash.is_none() {
        problems.push(
            None,
            Rule::Schema,
            "a diff manifest needs parentManifestHash",
        );
    }
    if spec && !diff && parent_hash.is_some() {
        problems.push(
            None,
            Rule::Schema,
            "parentManifestHash in a snapshot manifest; use a *-diff-* specificationVersion",
        );
    }

    let mut sum: u128 = 0;
    for s in &slots {
        let path = range(&arena, s.off, s.len);
        if let Some((rule, detail)) = check_path(path, absolute) {
            problems.push(label(path), rule, detail);
        }
        let unsupported = |what: &str| format!("{what} cannot be written in format {format:?}");
        if matches!(s.kind, SlotKind::Whole | SlotKind::Chunked) && s.size > i64::MAX as u64 {
            problems.push(
                label(path),
                Rule::SizeTooLarge,
                format!(
                    "size {} is over 2^63 - 1 bytes, more than any file can hold",
                    s.size
                ),
            );
        }
        match s.kind {
            SlotKind::Whole => {
                sum += u128::from(s.size);
                if s.size > CHUNK_SIZE && !v2023 {
                    problems.push(
                        label(path),
                        Rule::ChunkCount,
                        format!(
                            "{} bytes is over 256 MiB: needs chunkhashes, not hash",
                            s.size
                        ),
                    );
                }
                if s.executable && v2023 {
                    problems.push(
                        label(path),
                        Rule::UnsupportedInFormat,
                        unsupported("the exec bit"),
                    );
                }
            }
            SlotKind::Chunked => {
                sum += u128::from(s.size);
                let want = s.size.div_ceil(CHUNK_SIZE);
                if v2023 {
                    problems.push(
                        label(path),
                        Rule::UnsupportedInFormat,
                        unsupported("a chunked file"),
                    );
                } else if s.size <= CHUNK_SIZE || s.aux[1] != want {
                    problems.push(
                        label(path),
                        Rule::ChunkCount,
                        format!(
                            "{} chunk hashes for {} bytes; expected {} (one per 256 MiB, and only for files over 256 MiB)",
                            s.aux[1], s.size, want.max(1)
                        ),
                    );
                }
            }
            SlotKind::Dir | SlotKind::DeletedDir if v2023 => {
                problems.push(
                    label(path),
                    Rule::UnsupportedInFormat,
                    "v2023-03-03 has no directory entries; directories are implied by file paths",
                );
            }
            SlotKind::Dir => {}
            SlotKind::Symlink => {
                if v2023 {
                    problems.push(
                        label(path),
                        Rule::UnsupportedInFormat,
                        unsupported("a symlink"),
                    );
                } else if let Some((rule, detail)) =
                    check_target(aux_range(&arena, s.aux), absolute)
                {
                    problems.push(label(path), rule, detail);
                }
            }
            SlotKind::DeletedFile | SlotKind::DeletedDir => {
                if !diff {
                    problems.push(
                        label(path),
                        Rule::DeleteInSnapshot,
                        "`delete` entry in a snapshot manifest (only diffs may delete)",
                    );
                }
            }
        }
        if !problems.is_empty() && problems.truncated {
            break;
        }
    }

    let order = |a: &Slot, b: &Slot| {
        cmp_utf16(range(&arena, a.off, a.len), range(&arena, b.off, b.len))
            .then(kind_rank(a.kind).cmp(&kind_rank(b.kind)))
    };
    if !slots
        .windows(2)
        .all(|w| order(&w[0], &w[1]) != Ordering::Greater)
    {
        slots.sort_by(order);
    }
    for w in slots.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let path = range(&arena, a.off, a.len);
        if path != range(&arena, b.off, b.len) {
            continue;
        }
        let deleted = |s: &Slot| matches!(s.kind, SlotKind::DeletedFile | SlotKind::DeletedDir);
        if diff && deleted(a) != deleted(b) && a.is_dir_like() != b.is_dir_like() {
            continue; // a diff replacing a file by a directory or back
        }
        if a.is_dir_like() != b.is_dir_like() {
            problems.push(
                label(path),
                Rule::FileDirConflict,
                "both a directory and a file",
            );
        } else {
            problems.push(label(path), Rule::DuplicatePath, "path listed twice");
        }
    }

    // Every directory implied by a path; no file or symlink may be one of them.
    let mut missing_dirs: Vec<Vec<u8>> = Vec::new();
    {
        let mut dirs: HashSet<&[u8], Xxh3DefaultBuilder> = HashSet::default();
        let mut last_parent: &[u8] = &[];
        for s in &slots {
            let path = range(&arena, s.off, s.len);
            let Some(mut p) = parent(path) else { continue };
            if p == last_parent {
                continue;
            }
            last_parent = p;
            while dirs.insert(p) {
                match parent(p) {
                    Some(pp) => p = pp,
                    None => break,
                }
            }
        }
        for s in &slots {
            if matches!(
                s.kind,
                SlotKind::Whole | SlotKind::Chunked | SlotKind::Symlink
            ) {
                let path = range(&arena, s.off, s.len);
                if dirs.contains(path) {
                    problems.push(
                        label(path),
                        Rule::FileDirConflict,
                        "is a file or symlink, but other entries are inside it",
                    );
                }
            }
        }
        // A literal target `$N/x` would read back as a reference; it is only safe when the
        // encoder compresses it, i.e. when its parent is a listed directory.
        if format.has_explicit_dirs() {
            for s in slots.iter().filter(|s| s.kind == SlotKind::Symlink) {
                let target = aux_range(&arena, s.aux);
                if !looks_like_dir_ref(target) {
                    continue;
                }
                let listed = parent(target)
                    .is_some_and(|p| dirs.contains(p) || has_dir_slot(&slots, &arena, p));
                if !listed {
                    let path = range(&arena, s.off, s.len);
                    problems.push(
                        label(path),
                        Rule::BadDirRef,
                        "symlink target starts with `$N/` but its directory is not in the manifest: it cannot be written unambiguously",
                    );
                }
            }
        }
        for &(off, len) in &required_dirs {
            let path = range(&arena, off, len);
            if !dirs.contains(path) {
                problems.push(
                    label(path),
                    Rule::UnsupportedInFormat,
                    "an empty directory cannot be written in v2023-03-03",
                );
            }
        }
        if format.has_explicit_dirs() && problems.is_empty() {
            // `$N/` compression needs every ancestor listed: add the ones the caller left implied.
            for d in &dirs {
                let has = has_dir_slot(&slots, &arena, d);
                if !has {
                    missing_dirs.push(d.to_vec());
                }
            }
        }
    }

    if !problems.is_empty() {
        return Err(problems.into_error(source));
    }
    if !missing_dirs.is_empty() {
        for d in &missing_dirs {
            let Some((off, len)) = append(&mut arena, d) else {
                problems.push(None, Rule::TooLarge, NAMES_TOO_LARGE);
                continue;
            };
            let mut dir = Slot::new(SlotKind::Dir);
            dir.off = off;
            dir.len = len;
            slots.push(dir);
        }
        if !problems.is_empty() {
            return Err(problems.into_error(source));
        }
        slots.sort_by(|a, b| {
            cmp_utf16(range(&arena, a.off, a.len), range(&arena, b.off, b.len))
                .then(kind_rank(a.kind).cmp(&kind_rank(b.kind)))
        });
    }

    let computed = u64::try_from(sum).unwrap_or(u64::MAX);
    let total_size = match declared_total {
        Some(t) if t != computed => {
            tracing::warn!(
                manifest = source,
                declared = t,
                computed,
                "totalSize disagrees with the sum of the file sizes; keeping the declared value"
            );
            t
        }
        Some(t) => t,
        None => computed,
    };
    arena.shrink_to_fit();
    slots.shrink_to_fit();
    let mut chunks = chunks;
    chunks.shrink_to_fit();
    Ok(Manifest {
        format,
        diff,
        parent: parent_hash,
        total_size,
        arena,
        slots,
        chunks,
    })
}
