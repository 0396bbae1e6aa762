//! The v2025-12 `specificationVersion` family: same `dirs`/`files`/`$N/` layout as
//! v2025-12-04-beta (see `v2025_beta.rs`), versioned by kind (relative/absolute, snapshot/diff).
//! Two key spellings exist: Python's (`name`, `delete`, `symlink.name`) and the Rust port's
//! (`path`, `deleted`, `symlink.target`). Both are read; Python's is written.

use super::model::Format;

/// `specificationVersion` value -> (format, is diff).
pub(crate) fn parse_version(v: &str) -> Option<(Format, bool)> {
    Some(match v {
        "relative-manifest-snapshot-beta-2025-12" => (Format::RelativeBeta2025_12, false),
        "relative-manifest-diff-beta-2025-12" => (Format::RelativeBeta2025_12, true),
        "absolute-manifest-snapshot-beta-2025-12" => (Format::AbsoluteBeta2025_12, false),
        "absolute-manifest-diff-beta-2025-12" => (Format::AbsoluteBeta2025_12, true),
        _ => return None,
    })
}

/// Dir entry keys, both spellings: indices 0|1 = name, 2|3 = delete (read by `v2025_beta`).
pub(crate) const DIR_KEYS: &[&str] = &["name", "path", "delete", "deleted"];
/// File entry keys, both spellings: 0|1 name, 2|3 delete, then hash, chunkhashes, size, mtime,
/// runnable, symlink.
pub(crate) const FILE_KEYS: &[&str] = &[
    "name",
    "path",
    "delete",
    "deleted",
    "hash",
    "chunkhashes",
    "size",
    "mtime",
    "runnable",
    "symlink",
];
/// Keys of the `symlink` object: Python's `name`, the Rust port's `target`.
pub(crate) const TARGET_KEYS: &[&str] = &["name", "target"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_and_round_trips_its_name() {
        for f in [Format::RelativeBeta2025_12, Format::AbsoluteBeta2025_12] {
            for diff in [false, true] {
                assert_eq!(parse_version(f.version_string(diff)), Some((f, diff)));
            }
        }
        assert_eq!(
            parse_version("relative-manifest-snapshot-beta-2025-11"),
            None
        );
    }
}
