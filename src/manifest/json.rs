//! JSON pieces shared by the formats: Python-compatible string writing (`json.dumps` with
//! `ensure_ascii=True`) and small serde visitors for the streaming decoders.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};

use super::model::Hash;
use super::name::decode_one;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u_escape(out: &mut Vec<u8>, unit: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((unit >> shift) & 0xF) as usize]);
    }
}

/// Writes `s` (WTF-8) as a JSON string exactly as Python's `json.dumps(ensure_ascii=True)`:
/// printable ASCII 0x20..0x7E as is (except `"` and `\`), the short escapes `\" \\ \n \r \t \b \f`,
/// everything else `\uXXXX` in lowercase hex, astral characters as surrogate pairs and lone
/// surrogates as themselves.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut i = 0;
    while let Some(rest) = s.get(i..).filter(|r| !r.is_empty()) {
        let (cp, n) = decode_one(rest).unwrap_or((0xFFFD, 1));
        i += n;
        match cp {
            0x22 => out.extend_from_slice(b"\\\""),
            0x5C => out.extend_from_slice(b"\\\\"),
            0x0A => out.extend_from_slice(b"\\n"),
            0x0D => out.extend_from_slice(b"\\r"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0C => out.extend_from_slice(b"\\f"),
            0x20..=0x7E => out.push(cp as u8),
            0x10000.. => {
                let v = cp - 0x10000;
                push_u_escape(out, 0xD800 | (v >> 10));
                push_u_escape(out, 0xDC00 | (v & 0x3FF));
            }
            _ => push_u_escape(out, cp),
        }
    }
    out.push(b'"');
}

/// `"key":` for keys we know are plain ASCII.
pub(crate) fn write_key(out: &mut Vec<u8>, key: &str) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

pub(crate) fn write_hash(out: &mut Vec<u8>, h: Hash) {
    out.push(b'"');
    for shift in (0..32).rev() {
        out.push(HEX[((h.0 >> (shift * 4)) & 0xF) as usize]);
    }
    out.push(b'"');
}

pub(crate) fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

pub(crate) fn write_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

/// Appends a JSON string's decoded bytes (WTF-8: lone surrogates kept) to a buffer. serde_json's
/// `deserialize_bytes` on a string skips UTF-8 validation and encodes lone `\uD8xx` escapes as
/// WTF-8, which is exactly what Python names need.
pub(crate) struct BytesInto<'a>(pub &'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for BytesInto<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for BytesInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.0.extend_from_slice(v);
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.extend_from_slice(v.as_bytes());
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<(), A::Error> {
        Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
    }
}

/// A JSON string that must be a hash: `Ok(Err(..))` when it is a string but not 32 hex digits
/// (a collected validation problem, not a parse failure).
pub(crate) struct HashStr;

/// A string where a hash belongs that is not 32 hex digits; holds its first 40 characters.
#[derive(Debug, thiserror::Error)]
#[error("hash {0:?} is not 32 hex digits")]
pub(crate) struct MalformedHash(String);

impl<'de> DeserializeSeed<'de> for HashStr {
    type Value = Result<Hash, MalformedHash>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for HashStr {
    type Value = Result<Hash, MalformedHash>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a hash string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Hash::from_hex(v).ok_or_else(|| MalformedHash(v.chars().take(40).collect())))
    }
}

/// A JSON string value, borrowed when possible (version strings, hashAlg).
pub(crate) struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.chars().take(200).collect())
    }
}

/// A JSON number that must be an integer: `Ok(Err(..))` for fractions (collected, not fatal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Int {
    U(u64),
    I(i64),
    Fraction,
}

pub(crate) struct IntSeed;

impl<'de> DeserializeSeed<'de> for IntSeed {
    type Value = Int;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Int, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IntSeed {
    type Value = Int;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
        Ok(Int::U(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
        Ok(if v >= 0 { Int::U(v as u64) } else { Int::I(v) })
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Int, E> {
        Ok(Int::Fraction)
    }
}

/// A JSON boolean.
pub(crate) struct BoolSeed;

impl<'de> DeserializeSeed<'de> for BoolSeed {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_bool(self)
    }
}

impl<'de> Visitor<'de> for BoolSeed {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("true or false")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

/// An object key: its index among the keys we know, or (rare) [`UnknownKey`].
pub(crate) struct KeySeed<'k>(pub &'k [&'static str]);

/// A key the format does not define; holds its first 60 characters.
#[derive(Debug, thiserror::Error)]
#[error("unknown key {0:?}")]
pub(crate) struct UnknownKey(String);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Result<usize, UnknownKey>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Result<usize, UnknownKey>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self
            .0
            .iter()
            .position(|k| *k == v)
            .ok_or_else(|| UnknownKey(v.chars().take(60).collect())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &[u8]) -> String {
        let mut out = Vec::new();
        write_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_like_python_ensure_ascii() {
        // json.dumps('a"\\\n\r\t\b\f\x00\x1f\x7f é～😀', ensure_ascii=True)
        assert_eq!(
            enc("a\"\\\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f} é～😀/".as_bytes()),
            r#""a\"\\\n\r\t\b\f\u0000\u001f\u007f \u00e9\uff5e\ud83d\ude00/""#
        );
        assert_eq!(enc(b"bad\xed\xb3\xbf"), r#""bad\udcff""#);
    }

    #[test]
    fn serde_json_bytes_keep_lone_surrogates_as_wtf8() {
        let mut buf = Vec::new();
        let mut de = serde_json::Deserializer::from_slice(br#""a\udcff\ud83d\ude00\ud800""#);
        BytesInto(&mut buf).deserialize(&mut de).unwrap();
        assert_eq!(buf, b"a\xed\xb3\xbf\xf0\x9f\x98\x80\xed\xa0\x80");
    }
}
