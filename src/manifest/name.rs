//! Manifest names: WTF-8 byte strings, their UTF-16 ordering and their mapping to Linux file names.
//!
//! # Why WTF-8
//! The Python client builds manifest paths with `os.fsdecode`, so a file name that is not valid
//! UTF-8 reaches the manifest as a string holding **lone surrogates** (PEP 383 "surrogateescape":
//! byte `0xFF` becomes U+DCFF) and is written as `"\udcff"`. Rust strings cannot hold those, so
//! every manifest name is kept as WTF-8: UTF-8 that may also encode U+D800..U+DFFF on their own
//! (never as a pair: a pair is the astral character it stands for).
//!
//! # Names on the Linux side (the decision)
//! * manifest -> Linux ([`to_fs_name`]): Python's `os.fsencode`. A lone surrogate U+DC80..U+DCFF
//!   becomes the single raw byte 0x80..0xFF, so a tree snapshotted by Python with undecodable names
//!   comes back with the very same bytes. Every other lone surrogate (Python cannot encode those and
//!   would fail) keeps its 3 WTF-8 bytes: the file stays reachable under a stable, if odd, name.
//! * Linux -> manifest ([`from_fs_name`]): exactly Python's `os.fsdecode`: strict UTF-8, and each
//!   byte of an invalid sequence becomes U+DC00+byte.
//!
//! `from_fs_name(to_fs_name(x)) == x` for every name Python itself can produce, and
//! `to_fs_name(from_fs_name(b)) == b` for every Linux name `b`.

use std::cmp::Ordering;

/// Decodes one WTF-8 (or generalized UTF-8) code point at the start of `bytes`.
/// Returns `None` for an invalid or truncated sequence: callers treat names as untrusted.
pub(crate) fn decode_one(bytes: &[u8]) -> Option<(u32, usize)> {
    let b0 = *bytes.first()?;
    let cont = |i: usize| -> Option<u32> {
        let b = *bytes.get(i)?;
        (b & 0xC0 == 0x80).then_some(u32::from(b & 0x3F))
    };
    match b0 {
        0x00..=0x7F => Some((u32::from(b0), 1)),
        0xC2..=0xDF => Some(((u32::from(b0 & 0x1F) << 6) | cont(1)?, 2)),
        0xE0..=0xEF => {
            let cp = (u32::from(b0 & 0x0F) << 12) | (cont(1)? << 6) | cont(2)?;
            (cp >= 0x800).then_some((cp, 3))
        }
        0xF0..=0xF4 => {
            let cp = (u32::from(b0 & 0x07) << 18) | (cont(1)? << 12) | (cont(2)? << 6) | cont(3)?;
            (0x10000..=0x10FFFF).contains(&cp).then_some((cp, 4))
        }
        _ => None,
    }
}

/// True when `bytes` is well-formed WTF-8: valid UTF-8 except that lone surrogates are allowed,
/// but not a high surrogate directly followed by a low one (that pair must be one 4-byte char).
pub fn is_wtf8(bytes: &[u8]) -> bool {
    if std::str::from_utf8(bytes).is_ok() {
        return true;
    }
    let mut i = 0;
    let mut prev_high = false;
    while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
        let Some((cp, n)) = decode_one(rest) else {
            return false;
        };
        if prev_high && (0xDC00..=0xDFFF).contains(&cp) {
            return false;
        }
        prev_high = (0xD800..=0xDBFF).contains(&cp);
        i += n;
    }
    true
}

/// Appends the WTF-8 encoding of `cp` (which may be a surrogate).
pub(crate) fn push_wtf8(out: &mut Vec<u8>, cp: u32) {
    // Truncating casts below are intended: each takes 6 bits or fewer.
    match cp {
        0..=0x7F => out.push(cp as u8),
        0x80..=0x7FF => out.extend_from_slice(&[0xC0 | (cp >> 6) as u8, 0x80 | (cp & 0x3F) as u8]),
        0x800..=0xFFFF => out.extend_from_slice(&[
            0xE0 | (cp >> 12) as u8,
            0x80 | ((cp >> 6) & 0x3F) as u8,
            0x80 | (cp & 0x3F) as u8,
        ]),
        _ => out.extend_from_slice(&[
            0xF0 | (cp >> 18) as u8,
            0x80 | ((cp >> 12) & 0x3F) as u8,
            0x80 | ((cp >> 6) & 0x3F) as u8,
            0x80 | (cp & 0x3F) as u8,
        ]),
    }
}

/// Iterates the UTF-16 code units of a WTF-8 string (invalid bytes yield U+FFFD: never panics).
struct Utf16Units<'a> {
    bytes: &'a [u8],
    pending: Option<u16>,
}

impl Iterator for Utf16Units<'_> {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        if let Some(low) = self.pending.take() {
            return Some(low);
        }
        if self.bytes.is_empty() {
            return None;
        }
        let (cp, n) = decode_one(self.bytes).unwrap_or((0xFFFD, 1));
        self.bytes = self.bytes.get(n..).unwrap_or_default();
        if cp >= 0x10000 {
            let v = cp - 0x10000;
            self.pending = Some(0xDC00 | (v & 0x3FF) as u16);
            Some(0xD800 | (v >> 10) as u16)
        } else {
            Some(cp as u16)
        }
    }
}

/// Orders two WTF-8 names by their UTF-16 code units, as Python's
/// `path.encode("utf-16_be", "surrogatepass")` does. This differs from byte order only in that
/// astral characters (surrogate pairs, 0xD800..) sort *before* U+E000..U+FFFF.
pub fn cmp_utf16(a: &[u8], b: &[u8]) -> Ordering {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (Some(&x), Some(&y)) = (a.get(common), b.get(common)) else {
        return a.len().cmp(&b.len());
    };
    if x < 0x80 && y < 0x80 {
        return x.cmp(&y);
    }
    // Back up to the start of the character that differs; the prefix is shared.
    let mut start = common;
    let is_cont = |s: &[u8], i: usize| s.get(i).is_some_and(|c| c & 0xC0 == 0x80);
    while start > 0 && (is_cont(a, start) || is_cont(b, start)) {
        start -= 1;
    }
    let ua = Utf16Units {
        bytes: a.get(start..).unwrap_or_default(),
        pending: None,
    };
    let ub = Utf16Units {
        bytes: b.get(start..).unwrap_or_default(),
        pending: None,
    };
    ua.cmp(ub)
}

/// Manifest name (WTF-8) -> Linux file name bytes, like Python's `os.fsencode` (see module doc).
pub fn to_fs_name(name: &[u8]) -> Vec<u8> {
    if !name.contains(&0xED) {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while let Some(rest) = name.get(i..).filter(|r| !r.is_empty()) {
        match decode_one(rest) {
            Some((cp @ 0xDC80..=0xDCFF, n)) => {
                out.push((cp - 0xDC00) as u8);
                i += n;
            }
            Some((_, n)) => {
                out.extend_from_slice(rest.get(..n).unwrap_or(rest));
                i += n;
            }
            None => {
                out.push(rest[0]);
                i += 1;
            }
        }
    }
    out
}

/// Linux file name bytes -> manifest name (WTF-8), exactly like Python's `os.fsdecode`: strict
/// UTF-8, every byte of an invalid sequence becomes the lone surrogate U+DC00+byte.
pub fn from_fs_name(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.extend_from_slice(s.as_bytes());
                return out;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.extend_from_slice(good);
                let n = e.error_len().unwrap_or(bad.len()).max(1);
                for &b in bad.iter().take(n) {
                    push_wtf8(&mut out, 0xDC00 + u32::from(b));
                }
                rest = bad.get(n..).unwrap_or_default();
            }
        }
    }
}

/// A printable form of a WTF-8 name for messages: lone surrogates shown as `\u{dcff}`.
pub fn display_name(name: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(name) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(name.len() + 8);
    let mut i = 0;
    while let Some(rest) = name.get(i..).filter(|r| !r.is_empty()) {
        match decode_one(rest) {
            Some((cp, n)) => {
                match char::from_u32(cp) {
                    Some(c) => out.push(c),
                    None => out.push_str(&format!("\\u{{{cp:x}}}")),
                }
                i += n;
            }
            None => {
                out.push_str(&format!("\\x{:02x}", rest[0]));
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn utf16_order_puts_astral_before_high_bmp() {
        // U+FF5E (EF BD 9E) > U+1F600 (F0 9F 98 80) in UTF-16, the reverse of byte order.
        assert_eq!(
            cmp_utf16(&py("\u{ff5e}"), &py("\u{1f600}")),
            Ordering::Greater
        );
        assert_eq!(py("\u{ff5e}").cmp(&py("\u{1f600}")), Ordering::Less);
        assert_eq!(cmp_utf16(b"a", b"a/b"), Ordering::Less);
        assert_eq!(cmp_utf16(b"a-b", b"a/b"), Ordering::Less);
        assert_eq!(cmp_utf16(b"ab", b"ab"), Ordering::Equal);
        // A lone high surrogate U+D83D vs U+1F600 (D83D DE00): prefix, so shorter first.
        let mut lone = Vec::new();
        push_wtf8(&mut lone, 0xD83D);
        assert_eq!(cmp_utf16(&lone, &py("\u{1f600}")), Ordering::Less);
        assert_eq!(cmp_utf16(&py("\u{e000}"), &lone), Ordering::Greater);
    }

    #[test]
    fn fs_names_follow_python_surrogateescape() {
        assert_eq!(from_fs_name(b"bad\xff"), b"bad\xed\xb3\xbf");
        assert_eq!(to_fs_name(b"bad\xed\xb3\xbf"), b"bad\xff");
        // Encoded surrogates on disk are invalid UTF-8 for Python too: escaped byte by byte.
        assert_eq!(to_fs_name(&from_fs_name(b"\xed\xa0\x80")), b"\xed\xa0\x80");
        // A lone surrogate Python cannot encode keeps its WTF-8 bytes.
        assert_eq!(to_fs_name(b"\xed\xa0\xbd"), b"\xed\xa0\xbd");
        assert_eq!(from_fs_name("é😀".as_bytes()), "é😀".as_bytes());
    }

    #[test]
    fn wtf8_rejects_pairs_and_garbage() {
        assert!(is_wtf8(b"\xed\xb3\xbf"));
        assert!(!is_wtf8(b"\xed\xa0\xbd\xed\xb8\x80"));
        assert!(!is_wtf8(b"\xff"));
        assert!(!is_wtf8(b"\xc0\x80"));
    }

    /// Reference UTF-16 units: decode with `decode_one`-independent std paths where possible.
    fn units(wtf8: &[u8]) -> Vec<u16> {
        Utf16Units {
            bytes: wtf8,
            pending: None,
        }
        .collect()
    }

    proptest::proptest! {
        #[test]
        fn fs_names_round_trip(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let name = from_fs_name(&bytes);
            proptest::prop_assert!(is_wtf8(&name));
            proptest::prop_assert_eq!(to_fs_name(&name), bytes.clone());
            if let Ok(s) = std::str::from_utf8(&bytes) {
                proptest::prop_assert_eq!(name, s.as_bytes().to_vec());
            }
        }

        #[test]
        fn utf16_order_matches_std_encode_utf16(a in "[a\\u{e9}\\u{ff5e}\\u{1f600}\\u{e000}/]{0,6}", b in "[a\\u{e9}\\u{ff5e}\\u{1f600}\\u{e000}/]{0,6}") {
            let want = a.encode_utf16().cmp(b.encode_utf16());
            proptest::prop_assert_eq!(cmp_utf16(a.as_bytes(), b.as_bytes()), want);
            proptest::prop_assert_eq!(units(a.as_bytes()), a.encode_utf16().collect::<Vec<_>>());
        }
    }
}
