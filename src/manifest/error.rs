//! The one error type of the manifest module: which manifest, which entries, which rules.

use std::fmt;

/// Decoding stops collecting after this many problems: enough to fix a file, bounded on garbage.
pub const MAX_PROBLEMS: usize = 100;

/// A rule of `manifest-formats.md` ("Validation every reader must do") or of JSON itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Not JSON, truncated, or trailing garbage.
    Syntax,
    /// Missing, duplicated, unknown or wrongly typed key.
    Schema,
    UnknownVersion,
    HashAlg,
    MalformedHash,
    NegativeSize,
    /// A size over 2^63 - 1 bytes, which no file offset (`off_t`) can reach.
    SizeTooLarge,
    /// A number that must be an integer is not one, or does not fit.
    NotInteger,
    /// Chunk list length disagrees with the size, or a large file is not chunked.
    ChunkCount,
    DuplicatePath,
    /// A file or symlink is also used as a directory.
    FileDirConflict,
    EmptyComponent,
    DotComponent,
    AbsolutePath,
    /// A relative path in an absolute manifest.
    RelativePath,
    NulByte,
    /// A name is not well-formed WTF-8 (raw invalid UTF-8 in the JSON text).
    InvalidName,
    DeleteInSnapshot,
    /// `$N/` refers to a directory that does not exist (yet), or a nested name is not compressed.
    BadDirRef,
    SymlinkAbsolute,
    SymlinkEscapes,
    /// The entry kind cannot be written in this format (e.g. a symlink in v2023).
    UnsupportedInFormat,
    /// More than 4 GiB of names, or more than 4 Gi entries.
    TooLarge,
}

impl Rule {
    /// A stable kebab-case name, printed in messages and usable by tests and scripts.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Syntax => "json-syntax",
            Rule::Schema => "schema",
            Rule::UnknownVersion => "unknown-version",
            Rule::HashAlg => "hash-alg",
            Rule::MalformedHash => "malformed-hash",
            Rule::NegativeSize => "negative-size",
            Rule::SizeTooLarge => "size-too-large",
            Rule::NotInteger => "not-integer",
            Rule::ChunkCount => "chunk-count",
            Rule::DuplicatePath => "duplicate-path",
            Rule::FileDirConflict => "file-dir-conflict",
            Rule::EmptyComponent => "empty-component",
            Rule::DotComponent => "dot-component",
            Rule::AbsolutePath => "absolute-path",
            Rule::RelativePath => "relative-path",
            Rule::NulByte => "nul-byte",
            Rule::InvalidName => "invalid-name",
            Rule::DeleteInSnapshot => "delete-in-snapshot",
            Rule::BadDirRef => "bad-dir-ref",
            Rule::SymlinkAbsolute => "symlink-absolute",
            Rule::SymlinkEscapes => "symlink-escapes-root",
            Rule::UnsupportedInFormat => "unsupported-in-format",
            Rule::TooLarge => "too-large",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing wrong with one entry (or with the whole manifest when `entry` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `paths[3] "a/b.txt"`, `files[0]`, or a path: enough to find the entry in the file.
    pub entry: Option<String>,
    pub rule: Rule,
    /// What is wrong and, where it helps, what to do about it.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(e) => write!(f, "{e}: {}: {}", self.rule, self.detail),
            None => write!(f, "{}: {}", self.rule, self.detail),
        }
    }
}

/// A manifest could not be used. Holds every problem found (up to [`MAX_PROBLEMS`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("manifest {manifest}: {}", summary(.problems, *.truncated))]
pub struct ManifestError {
    /// Names the manifest (file name or other source), as given to the decoder.
    pub manifest: String,
    /// Never empty.
    pub problems: Vec<Problem>,
    /// More problems existed than were kept.
    pub truncated: bool,
}

fn summary(problems: &[Problem], truncated: bool) -> String {
    match problems {
        [one] => one.to_string(),
        [first, ..] => format!(
            "{first} (and {}{} more)",
            problems.len() - 1,
            if truncated { "+" } else { "" }
        ),
        [] => "invalid".to_owned(),
    }
}

impl ManifestError {
    /// True when some problem broke `rule`: for callers and tests that react to one rule.
    pub fn has_rule(&self, rule: Rule) -> bool {
        self.problems.iter().any(|p| p.rule == rule)
    }
}

/// Collects problems up to the cap.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    pub list: Vec<Problem>,
    pub truncated: bool,
}

impl Problems {
    pub fn push(&mut self, entry: Option<String>, rule: Rule, detail: impl Into<String>) {
        if self.list.len() >= MAX_PROBLEMS {
            self.truncated = true;
            return;
        }
        self.list.push(Problem {
            entry,
            rule,
            detail: detail.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_error(self, manifest: &str) -> ManifestError {
        ManifestError {
            manifest: manifest.to_owned(),
            problems: self.list,
            truncated: self.truncated,
        }
    }
}
