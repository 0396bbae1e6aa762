//! Bad input: one case per validation rule, error collection, and proptests that mutate valid
//! manifests (no panic, ever) and round-trip random valid models.

use mount_vfs::manifest::{
    Content, FileEntry, Format, Hash, Manifest, ManifestBuilder, ManifestError, Rule, CHUNK_SIZE,
    MAX_PROBLEMS,
};
use proptest::prelude::*;

const H: &str = "df8d09e93f874900a99b8775cc15b6c7";

fn v2023(paths: &str, total: &str) -> String {
    format!(
        r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{paths}],"totalSize":{total}}}"#
    )
}

fn entry(path: &str) -> String {
    format!(r#"{{"hash":"{H}","mtime":1,"path":"{path}","size":11}}"#)
}

fn beta(dirs: &str, files: &str, extra: &str) -> String {
    format!(
        r#"{{"dirs":[{dirs}],"files":[{files}],"hashAlg":"xxh128","manifestVersion":"2025-12-04-beta",{extra}"totalSize":0}}"#
    )
}

fn spec(kind: &str, dirs: &str, files: &str, extra: &str) -> String {
    format!(
        r#"{{"dirs":[{dirs}],"files":[{files}],"hashAlg":"xxh128",{extra}"specificationVersion":"{kind}-beta-2025-12","totalSize":0}}"#
    )
}

fn err(text: &str) -> ManifestError {
    match Manifest::decode(text.as_bytes(), "bad.manifest") {
        Ok(m) => panic!("accepted invalid manifest ({} entries):\n{text}", m.len()),
        Err(e) => e,
    }
}

/// Decoding fails with `rule`, and the message names the manifest (and `entry` when given).
fn expect(text: &str, rule: Rule, entry: Option<&str>) {
    let e = err(text);
    assert!(e.has_rule(rule), "wanted {rule}, got {e}\n{text}");
    let msg = e.to_string();
    assert!(msg.contains("bad.manifest"), "{msg}");
    assert!(msg.contains(rule.name()), "{msg}");
    if let Some(entry) = entry {
        let p = e.problems.iter().find(|p| p.rule == rule).unwrap();
        let named = p.entry.clone().unwrap_or_default();
        assert!(named.contains(entry), "entry {entry:?} not named in {p}");
    }
}

#[test]
fn syntax_truncated_and_trailing() {
    let good = v2023(&entry("a"), "11");
    assert!(Manifest::decode(good.as_bytes(), "ok").is_ok());
    for cut in [1, 10, good.len() / 2, good.len() - 1] {
        let e = err(&good[..cut]);
        assert!(e.has_rule(Rule::Syntax), "{e}");
        if cut > 60 && cut < good.find("}]").unwrap() {
            assert_eq!(e.problems[0].entry.as_deref(), Some("paths[0]"), "{e}");
        }
    }
    assert!(err(&good[..good.len() - 1])
        .to_string()
        .contains("truncated"));
    expect(&format!("{good} x"), Rule::Syntax, None);
    expect("", Rule::Syntax, None);
    expect("[]", Rule::Schema, None);
}

#[test]
fn schema_rules() {
    expect(
        &format!(
            r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{}]}}"#,
            entry("a")
        ),
        Rule::Schema,
        None,
    );
    expect(
        &v2023(
            r#"{"hash":"df8d09e93f874900a99b8775cc15b6c7","mtime":1,"path":"a"}"#,
            "11",
        ),
        Rule::Schema,
        Some("paths[0]"),
    );
    expect(
        &v2023(
            &entry("a").replace("\"size\"", "\"bogus\":1,\"size\""),
            "11",
        ),
        Rule::Schema,
        Some("paths[0]"),
    );
    expect(
        &v2023(
            &entry("a").replace("\"size\":11", "\"size\":11,\"size\":11"),
            "11",
        ),
        Rule::Schema,
        Some("paths[0]"),
    );
    expect(
        &v2023(&entry("a").replace("\"size\":11", "\"size\":\"11\""), "11"),
        Rule::Schema,
        None,
    );
    expect(
        &beta("", &entry("a").replace("\"path\"", "\"file\""), ""),
        Rule::Schema,
        Some("files[0]"),
    );
    expect(
        &beta(
            "",
            &format!(r#"{{"hash":"{H}","mtime":1,"name":"a","path":"b","size":11}}"#),
            "",
        ),
        Rule::Schema,
        Some("files[0]"),
    );
}

#[test]
fn unknown_version_and_hash_alg() {
    expect(
        &v2023(&entry("a"), "11").replace("2023-03-03", "2023-03-04"),
        Rule::UnknownVersion,
        None,
    );
    expect(
        &spec("relative-manifest-merge", "", "", ""),
        Rule::UnknownVersion,
        None,
    );
    expect(
        &v2023(&entry("a"), "11").replace("\"xxh128\"", "\"sha256\""),
        Rule::HashAlg,
        None,
    );
}

#[test]
fn malformed_hash() {
    expect(
        &v2023(
            &entry("a").replace(H, "df8d09e93f874900a99b8775cc15b6c"),
            "11",
        ),
        Rule::MalformedHash,
        Some("\"a\""),
    );
    expect(
        &v2023(
            &entry("a").replace(H, "zf8d09e93f874900a99b8775cc15b6c7"),
            "11",
        ),
        Rule::MalformedHash,
        None,
    );
    expect(
        &beta(
            "",
            &format!(r#"{{"chunkhashes":["{H}","nope"],"mtime":1,"name":"big","size":300000000}}"#),
            "",
        ),
        Rule::MalformedHash,
        Some("big"),
    );
    expect(
        &beta("", "", r#""parentManifestHash":"123","#),
        Rule::MalformedHash,
        None,
    );
}

#[test]
fn negative_or_inconsistent_sizes() {
    expect(
        &v2023(&entry("a").replace("\"size\":11", "\"size\":-1"), "11"),
        Rule::NegativeSize,
        Some("paths[0]"),
    );
    expect(&v2023(&entry("a"), "-5"), Rule::NegativeSize, None);
    // Fits u64 but no off_t: `stat` could not report it (issue 8: validate passed, stat EIO).
    expect(
        &v2023(
            &entry("a").replace("\"size\":11", "\"size\":18446744073709551615"),
            "18446744073709551615",
        ),
        Rule::SizeTooLarge,
        Some("\"a\""),
    );
    expect(
        &v2023(
            &entry("a").replace("\"size\":11", "\"size\":9223372036854775808"),
            "9223372036854775808",
        ),
        Rule::SizeTooLarge,
        None,
    );
    expect(
        &v2023(&entry("a").replace("\"size\":11", "\"size\":1.5"), "11"),
        Rule::NotInteger,
        None,
    );
    expect(
        &v2023(&entry("a").replace("\"mtime\":1", "\"mtime\":1e3"), "11"),
        Rule::NotInteger,
        None,
    );
    // totalSize that disagrees is only a warning.
    assert!(Manifest::decode(v2023(&entry("a"), "12").as_bytes(), "t").is_ok());
}

#[test]
fn chunk_count() {
    let f = |hashes: &str, size: u64| {
        beta(
            "",
            &format!(r#"{{"chunkhashes":[{hashes}],"mtime":1,"name":"big","size":{size}}}"#),
            "",
        )
    };
    let two = format!("\"{H}\",\"{H}\"");
    assert!(Manifest::decode(f(&two, CHUNK_SIZE + 1).as_bytes(), "ok").is_ok());
    expect(&f(&two, 3 * CHUNK_SIZE), Rule::ChunkCount, Some("big"));
    expect(
        &f(&format!("\"{H}\""), CHUNK_SIZE),
        Rule::ChunkCount,
        Some("big"),
    );
    // A file over 256 MiB must be chunked in v2025 (v2023 has no chunks, so it is fine there).
    let whole = format!(
        r#"{{"hash":"{H}","mtime":1,"name":"big","size":{}}}"#,
        CHUNK_SIZE + 1
    );
    expect(&beta("", &whole, ""), Rule::ChunkCount, Some("big"));
    assert!(Manifest::decode(
        v2023(
            &entry("big").replace(":11}", &format!(":{}}}", CHUNK_SIZE + 1)),
            &(CHUNK_SIZE + 1).to_string()
        )
        .as_bytes(),
        "ok"
    )
    .is_ok());
}

#[test]
fn duplicate_paths_and_file_dir_conflicts() {
    expect(
        &v2023(&format!("{},{}", entry("a/b"), entry("a/b")), "22"),
        Rule::DuplicatePath,
        Some("a/b"),
    );
    expect(
        &v2023(&format!("{},{}", entry("a"), entry("a/b")), "22"),
        Rule::FileDirConflict,
        Some("\"a\""),
    );
    let file_a = format!(r#"{{"hash":"{H}","mtime":1,"name":"a","size":11}}"#);
    expect(
        &beta(r#"{"name":"a"}"#, &file_a, ""),
        Rule::FileDirConflict,
        Some("\"a\""),
    );
    let link = r#"{"name":"l","symlink":{"name":"x"}}"#;
    let inside = format!(r#"{{"hash":"{H}","mtime":1,"name":"$0/f","size":11}}"#);
    expect(
        &beta(r#"{"name":"l"}"#, &format!("{inside},{link}"), ""),
        Rule::FileDirConflict,
        Some("\"l\""),
    );
}

#[test]
fn path_component_rules() {
    expect(
        &v2023(&entry("a//b"), "11"),
        Rule::EmptyComponent,
        Some("a//b"),
    );
    expect(&v2023(&entry("a/"), "11"), Rule::EmptyComponent, None);
    expect(&v2023(&entry(""), "11"), Rule::EmptyComponent, None);
    expect(
        &v2023(&entry("a/../b"), "11"),
        Rule::DotComponent,
        Some("a/../b"),
    );
    expect(&v2023(&entry("./b"), "11"), Rule::DotComponent, None);
    expect(
        &v2023(&entry("/etc/passwd"), "11"),
        Rule::AbsolutePath,
        Some("/etc/passwd"),
    );
    let abs = |name: &str| {
        spec(
            "absolute-manifest-snapshot",
            "",
            &format!(r#"{{"hash":"{H}","mtime":1,"name":"{name}","size":0}}"#),
            "",
        )
    };
    assert!(Manifest::decode(abs("/x").as_bytes(), "ok").is_ok());
    expect(&abs("x"), Rule::RelativePath, Some("x"));
    expect(&v2023(&entry("a\\u0000b"), "11"), Rule::NulByte, None);
    let raw = v2023(&entry("bad\u{1}"), "11").replace('\u{1}', "\u{ff}");
    let raw = raw
        .into_bytes()
        .iter()
        .map(|&b| if b == 0xC3 { b'x' } else { b })
        .collect::<Vec<u8>>();
    let e = Manifest::decode(&raw, "bad.manifest").unwrap_err();
    assert!(e.has_rule(Rule::InvalidName), "{e}");
}

#[test]
fn deletes_only_in_diffs() {
    let del = r#"{"delete":true,"name":"gone"}"#;
    expect(&beta("", del, ""), Rule::DeleteInSnapshot, Some("gone"));
    expect(
        &spec("relative-manifest-snapshot", "", del, ""),
        Rule::DeleteInSnapshot,
        Some("gone"),
    );
    let parent = format!(r#""parentManifestHash":"{H}","#);
    assert!(Manifest::decode(beta("", del, &parent).as_bytes(), "ok").is_ok());
    assert!(Manifest::decode(
        spec("relative-manifest-diff", "", del, &parent).as_bytes(),
        "ok"
    )
    .is_ok());
    expect(
        &spec("relative-manifest-diff", "", del, ""),
        Rule::Schema,
        None,
    );
}

#[test]
fn dir_references() {
    let f = |name: &str| format!(r#"{{"hash":"{H}","mtime":1,"name":"{name}","size":0}}"#);
    expect(
        &beta(r#"{"name":"a"}"#, &f("$5/x"), ""),
        Rule::BadDirRef,
        Some("$5/x"),
    );
    expect(
        &beta(r#"{"name":"$0/a"}"#, "", ""),
        Rule::BadDirRef,
        Some("dirs[0]"),
    );
    expect(
        &beta(r#"{"name":"a"}"#, &f("a/b/c"), ""),
        Rule::BadDirRef,
        Some("a/b/c"),
    );
    expect(
        &beta(r#"{"name":"a"}"#, &f("$0/b/c"), ""),
        Rule::BadDirRef,
        None,
    );
}

#[test]
fn symlink_targets() {
    let link = |t: &str| {
        beta(
            r#"{"name":"d"}"#,
            &format!(r#"{{"name":"$0/l","symlink":{{"name":"{t}"}}}}"#),
            "",
        )
    };
    assert!(Manifest::decode(link("d/../x").as_bytes(), "ok").is_ok());
    expect(&link("/etc/passwd"), Rule::SymlinkAbsolute, Some("d/l"));
    expect(&link("../x"), Rule::SymlinkEscapes, Some("d/l"));
    expect(&link("d/../../x"), Rule::SymlinkEscapes, None);
    expect(&link(""), Rule::SymlinkEscapes, None);
}

#[test]
fn unsupported_in_format_from_builder() {
    let mut b = ManifestBuilder::new(Format::V2023_03_03);
    b.add_symlink(b"l", b"x");
    let e = b.build().unwrap_err();
    assert!(e.has_rule(Rule::UnsupportedInFormat), "{e}");
}

#[test]
fn every_problem_is_collected_up_to_the_cap() {
    let three = format!(
        "{},{},{}",
        entry("a//b"),
        entry("/abs"),
        entry("c").replace(H, "xyz")
    );
    let e = err(&v2023(&three, "33"));
    assert_eq!(e.problems.len(), 3, "{e:#?}");
    assert!(!e.truncated);
    let many: Vec<String> = (0..500).map(|i| entry(&format!("x{i}//y"))).collect();
    let e = err(&v2023(&many.join(","), "0"));
    assert_eq!(e.problems.len(), MAX_PROBLEMS);
    assert!(e.truncated);
}

// ---------- proptests ----------

fn seeds() -> Vec<String> {
    let c = Hash::of(b"c");
    vec![
        v2023(
            &format!("{},{}", entry("a/b\\u00e9"), entry("\\ud83d\\ude00\\udcff")),
            "22",
        ),
        format!(
            r#"{{"dirs":[{{"name":"scene"}},{{"name":"$0/tex"}}],"files":[{{"hash":"{H}","mtime":1,"name":"run.sh","runnable":true,"size":0}},{{"name":"$0/latest.txt","symlink":{{"name":"$0/a.txt"}}}},{{"chunkhashes":["{c}","{c}"],"mtime":1,"name":"$1/big.exr","size":300000000}}],"hashAlg":"xxh128","manifestVersion":"2025-12-04-beta","totalSize":300000000}}"#
        ),
        spec(
            "relative-manifest-diff",
            r#"{"path":"a"},{"deleted":true,"path":"g"}"#,
            r#"{"deleted":true,"path":"$0/o"}"#,
            &format!(r#""parentManifestHash":"{H}","#),
        ),
    ]
}

const JUNK: &[&str] = &[
    "null",
    "true",
    "-1",
    "1.5",
    "1e400",
    "\"\"",
    "\"$9/x\"",
    "[]",
    "{}",
    "[[[[[]]]]]",
    "\"\\ud800\"",
    "18446744073709551616",
    "\"../..\"",
    "{\"name\":1}",
    "\"/\"",
];
const KEYS: &[&str] = &[
    "hash",
    "mtime",
    "path",
    "size",
    "name",
    "dirs",
    "files",
    "paths",
    "symlink",
    "chunkhashes",
    "delete",
    "runnable",
    "totalSize",
    "hashAlg",
    "manifestVersion",
    "specificationVersion",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    SwapKeys(usize, usize),
    Junk(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (0..KEYS.len(), 0..KEYS.len()).prop_map(|(a, b)| Mutation::SwapKeys(a, b)),
        (any::<usize>(), 0..JUNK.len()).prop_map(|(i, j)| Mutation::Junk(i, j)),
    ]
}

fn apply(mut doc: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = doc.len().max(1);
    match m {
        Mutation::Flip(i, b) => {
            let i = i % n;
            if let Some(x) = doc.get_mut(i) {
                *x ^= b | 1;
            }
        }
        Mutation::Truncate(i) => doc.truncate(i % n),
        Mutation::Insert(i, v) => {
            let i = i % n;
            doc.splice(i..i, v.iter().copied());
        }
        Mutation::SwapKeys(a, b) => {
            let s = String::from_utf8_lossy(&doc).replacen(
                &format!("\"{}\"", KEYS[*a]),
                &format!("\"{}\"", KEYS[*b]),
                1,
            );
            doc = s.into_bytes();
        }
        Mutation::Junk(i, j) => {
            // Replace the value after the i-th ':' with a junk JSON value.
            let colons: Vec<usize> = doc
                .iter()
                .enumerate()
                .filter(|(_, &c)| c == b':')
                .map(|(k, _)| k)
                .collect();
            if let Some(&at) = colons.get(i % colons.len().max(1)) {
                let end = doc[at + 1..]
                    .iter()
                    .position(|&c| c == b',' || c == b'}' || c == b']')
                    .map_or(doc.len(), |p| at + 1 + p);
                doc.splice(at + 1..end, JUNK[*j].bytes());
            }
        }
    }
    doc
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_manifests_never_panic(seed in 0..3usize, muts in proptest::collection::vec(mutation(), 1..4)) {
        let mut doc = seeds()[seed].clone().into_bytes();
        for m in &muts {
            doc = apply(doc, m);
        }
        if let Ok(m) = Manifest::decode(&doc, "mutant") {
            // Whatever is accepted must encode canonically and stably.
            let once = m.encode();
            let again = Manifest::decode(&once, "re").expect("canonical bytes decode");
            prop_assert_eq!(again.encode(), once);
        }
    }
}

fn name_atom() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"B".to_vec()),
        Just(b" ".to_vec()),
        Just(b"-".to_vec()),
        Just(b"\"\\\n\x01\x7f".to_vec()),
        Just("é".as_bytes().to_vec()),
        Just("～".as_bytes().to_vec()),
        Just("😀".as_bytes().to_vec()),
        Just("\u{e000}".as_bytes().to_vec()),
        Just(b"\xed\xb3\xbf".to_vec()), // lone U+DCFF (surrogateescape of 0xFF)
        Just(b"\xed\xb2\x80".to_vec()), // lone U+DC80
        Just(b"$1".to_vec()),
    ]
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::collection::vec(name_atom(), 1..4), 1..4).prop_map(
        |comps| {
            let comps: Vec<Vec<u8>> = comps.into_iter().map(|c| c.concat()).collect();
            comps.join(&b'/')
        },
    )
}

#[derive(Debug, Clone)]
enum Kind {
    File(u64, i64, bool, u128),
    Chunked(u64),
    Dir,
    Link(Vec<u8>),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (0..1u64 << 40, any::<i64>(), any::<bool>(), any::<u128>()).prop_map(|(s, m, x, h)| Kind::File(s % (CHUNK_SIZE + 1), m, x, h)),
        1 => (CHUNK_SIZE + 1..CHUNK_SIZE * 5).prop_map(Kind::Chunked),
        1 => Just(Kind::Dir),
        1 => path().prop_map(Kind::Link),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_valid_models_round_trip(entries in proptest::collection::vec((path(), kind()), 0..25), fmt in 0..4usize) {
        let format = [Format::V2023_03_03, Format::V2025_12_04Beta, Format::RelativeBeta2025_12, Format::V2025_12_04Beta][fmt];
        let mut b = ManifestBuilder::new(format);
        let mut chunk_store = Vec::new();
        for (p, k) in &entries {
            match k {
                Kind::File(size, mtime, x, h) => b.add_file(p, FileEntry {
                    size: *size, mtime_us: *mtime, executable: *x && format != Format::V2023_03_03,
                    content: Content::Whole(Hash(*h)),
                }),
                Kind::Chunked(size) if format != Format::V2023_03_03 => {
                    chunk_store.clear();
                    chunk_store.extend((0..size.div_ceil(CHUNK_SIZE)).map(|i| Hash(u128::from(i) * 77)));
                    b.add_file(p, FileEntry { size: *size, mtime_us: 0, executable: false, content: Content::Chunked(&chunk_store) });
                }
                Kind::Dir if format != Format::V2023_03_03 => b.add_dir(p),
                Kind::Link(t) if format != Format::V2023_03_03 => b.add_symlink(p, t),
                _ => {}
            }
        }
        // Random paths may collide (duplicates, file-under-file) and a literal `$1/..` target is
        // ambiguous: those must be refused cleanly, nothing else.
        let m = match b.build() {
            Ok(m) => m,
            Err(e) => {
                let expected = [Rule::DuplicatePath, Rule::FileDirConflict, Rule::BadDirRef];
                prop_assert!(e.problems.iter().all(|p| expected.contains(&p.rule)), "{}", e);
                return Ok(());
            }
        };
        let bytes = m.encode();
        let d = Manifest::decode(&bytes, "roundtrip").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(d.entries().collect::<Vec<_>>(), m.entries().collect::<Vec<_>>());
        prop_assert_eq!(d.encode(), bytes.clone());
        prop_assert_eq!(d.hash(), Hash::of(&bytes));
        // Canonical order is strictly increasing UTF-16 order.
        let paths: Vec<Vec<u16>> = d.entries().map(|e| utf16(e.path)).collect();
        prop_assert!(paths.windows(2).all(|w| w[0] < w[1]));
    }
}

/// Independent UTF-16 conversion of WTF-8 (via char decoding, surrogates by hand).
fn utf16(wtf8: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < wtf8.len() {
        if wtf8[i] == 0xED && wtf8.get(i + 1).is_some_and(|&b| b >= 0xA0) {
            let cp = ((u32::from(wtf8[i]) & 0x0F) << 12)
                | ((u32::from(wtf8[i + 1]) & 0x3F) << 6)
                | (u32::from(wtf8[i + 2]) & 0x3F);
            out.push(cp as u16);
            i += 3;
            continue;
        }
        let len = match wtf8[i] {
            0..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        let s = std::str::from_utf8(&wtf8[i..i + len]).unwrap();
        out.extend(s.encode_utf16());
        i += len;
    }
    out
}
