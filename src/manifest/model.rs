//! The one in-memory model shared by every manifest format.
//!
//! A [`Manifest`] is a sorted list of entries (files, directories, symlinks and, in diffs, deletions).
//! Paths are **WTF-8** byte strings: UTF-8 that may also hold lone UTF-16 surrogates, so that every
//! string a Python client can write (surrogate-escaped file names included) round-trips byte-exact.
//! See `name.rs` for how those names map to Linux file names.
//!
//! This file is the contract between the manifest module and its users (snapshot, namespace,
//! export). The representation behind it is kept compact: a 1,000,000-entry manifest must fit in
//! 200 bytes per entry.

use std::fmt;

/// XXH3-128 (seed 0) of some bytes: a CAS object key, a chunk key or a manifest hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub u128);

impl Hash {
    /// Hashes `bytes` with XXH3-128, seed 0, as the Deadline client does.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(twox_hash::XxHash3_128::oneshot(bytes))
    }

    /// Parses exactly 32 lowercase or uppercase hex digits.
    pub fn from_hex(text: &str) -> Option<Hash> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(Hash)
    }
}

/// The XXH3-128 of bytes that arrive in pieces: equal to [`Hash::of`] their concatenation.
///
/// Content hashing goes through this, [`Hash::of`] and [`block_digest`], so one place picks the
/// implementation: twox-hash, which uses AVX2 where the CPU has it, chosen at run time
/// (xxhash-rust fixes SSE2 at build time).
#[derive(Clone, Default)]
pub struct HashStream(twox_hash::XxHash3_128);

impl HashStream {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn finish(&self) -> Hash {
        Hash(self.0.finish_128())
    }
}

/// A block's XXH3-64: what a block of a verified object read again must match. Earlier mounts
/// recorded these values on disk (`store::VerificationLog`), so it must stay XXH3-64.
pub fn block_digest(block: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(block)
}

impl fmt::Display for Hash {
    /// 32 lowercase hex digits: the spelling used in manifests and CAS keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Which format a manifest was read from, and will be written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `manifestVersion: 2023-03-03`: files only, one hash each. What released clients write.
    V2023_03_03,
    /// `manifestVersion: 2025-12-04-beta`: dirs, symlinks, exec bit, 256 MiB chunks, diffs.
    V2025_12_04Beta,
    /// `specificationVersion: relative-manifest-{snapshot,diff}-beta-2025-12`.
    RelativeBeta2025_12,
    /// `specificationVersion: absolute-manifest-{snapshot,diff}-beta-2025-12`.
    AbsoluteBeta2025_12,
}

/// Files larger than this are split into chunks in the v2025 formats; each chunk is its own CAS
/// object. A file of exactly this size still has a single hash.
pub const CHUNK_SIZE: u64 = 256 * 1024 * 1024;

/// Where a file's bytes live in the CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content<'a> {
    /// One object, `Data/{hash}.xxh128`, holding the whole file.
    Whole(Hash),
    /// One object per [`CHUNK_SIZE`] chunk, in order (v2025 formats only).
    Chunked(&'a [Hash]),
}

/// A regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEntry<'a> {
    pub size: u64,
    /// Microseconds since the Unix epoch.
    pub mtime_us: i64,
    /// `runnable: true` in v2025 (mode 0755 instead of 0644). Always false in v2023.
    pub executable: bool,
    pub content: Content<'a>,
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind<'a> {
    File(FileEntry<'a>),
    /// An explicit directory (v2025; may be empty). v2023 directories are only implied by paths.
    Dir,
    /// A symlink whose target is a path relative to the **manifest root** (WTF-8).
    Symlink {
        target: &'a [u8],
    },
    /// A deletion in a diff manifest (`delete: true`): of a directory or of a file/symlink.
    Deleted {
        dir: bool,
    },
}

/// One entry, borrowed from a [`super::Manifest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Path relative to the root (absolute for absolute manifests), `/`-separated, WTF-8.
    pub path: &'a [u8],
    pub kind: EntryKind<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime-dispatched XXH3 must give the values every other XXH3 gives: object keys
    /// come from the Deadline client, and block digests are recorded on disk by earlier mounts.
    #[test]
    fn content_hashes_match_the_reference_xxh3_whatever_the_pieces() {
        let bytes: Vec<u8> = (0..3_000_017u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [
            0,
            1,
            3,
            16,
            17,
            128,
            129,
            240,
            241,
            1024,
            65_537,
            bytes.len(),
        ] {
            let input = &bytes[..len];
            let reference = xxhash_rust::xxh3::xxh3_128(input);
            assert_eq!(Hash::of(input).0, reference, "one-shot, {len} bytes");
            for piece in [1, 63, 64, 4096, 1 << 20] {
                let mut stream = HashStream::default();
                input.chunks(piece).for_each(|p| stream.update(p));
                assert_eq!(
                    stream.finish().0,
                    reference,
                    "{len} bytes in {piece}-byte pieces"
                );
            }
            assert_eq!(
                block_digest(input),
                xxhash_rust::xxh3::xxh3_64(input),
                "xxh3-64 of {len} bytes"
            );
        }
    }
}
