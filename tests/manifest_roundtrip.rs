//! Decode every example format, re-encode, and compare with exact expected bytes and hashes.

use mount_vfs::manifest::{
    Content, EntryKind, FileEntry, Format, Hash, Manifest, ManifestBuilder, CHUNK_SIZE,
};

const H11: &str = "df8d09e93f874900a99b8775cc15b6c7";
const H0: &str = "99aa06d3014798d86001c324468d497f";

fn roundtrip(text: &str) -> Manifest {
    let m = Manifest::decode(text.as_bytes(), "test").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(String::from_utf8(m.encode()).unwrap(), text);
    assert_eq!(m.hash(), Hash::of(text.as_bytes()));
    m
}

#[test]
fn hash_check_values() {
    assert_eq!(Hash::of(b"").to_string(), H0);
    assert_eq!(Hash::of(b"hello world").to_string(), H11);
}

#[test]
fn v2023_spec_example() {
    let text = format!(
        r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{{"hash":"{H11}","mtime":1700000000000000,"path":"scene/hello.txt","size":11}}],"totalSize":11}}"#
    );
    let m = roundtrip(&text);
    assert_eq!(m.format(), Format::V2023_03_03);
    assert_eq!(m.len(), 1);
    assert_eq!(m.total_size(), 11);
    let e = m.get(0).unwrap();
    assert_eq!(e.path, b"scene/hello.txt");
    assert_eq!(
        e.kind,
        EntryKind::File(FileEntry {
            size: 11,
            mtime_us: 1_700_000_000_000_000,
            executable: false,
            content: Content::Whole(Hash::from_hex(H11).unwrap()),
        })
    );
}

/// Expected bytes and hash produced by Python's `json.dumps(..., sort_keys=True,
/// separators=(",", ":"), ensure_ascii=True)` with paths sorted by UTF-16 (the client's code),
/// hashed with `xxhash.xxh3_128_hexdigest`.
const GOLDEN_2023: &str = r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{"hash":"0000000000000000777777777777777e","mtime":1700000000000007,"path":"A","size":21},{"hash":"0000000000000000666666666666666d","mtime":1700000000000006,"path":"a b/c","size":18},{"hash":"0000000000000000888888888888888f","mtime":1700000000000008,"path":"a-b","size":24},{"hash":"000000000000000099999999999999a0","mtime":1700000000000009,"path":"a/b","size":27},{"hash":"00000000000000002222222222222229","mtime":1700000000000002,"path":"bad\udcff","size":6},{"hash":"0000000000000000555555555555555c","mtime":1700000000000005,"path":"caf\u00e9/sub/x","size":15},{"hash":"0000000000000000444444444444444b","mtime":1700000000000004,"path":"ctl\u0001\u007f\t\n\"\\/q","size":12},{"hash":"00000000000000001111111111111118","mtime":1700000000000001,"path":"\ud83d\ude00.txt","size":3},{"hash":"0000000000000000333333333333333a","mtime":1700000000000003,"path":"\udc80lone\ud800","size":9},{"hash":"00000000000000000000000000000007","mtime":1700000000000000,"path":"\uff5e.txt","size":0}],"totalSize":135}"#;
const GOLDEN_2023_HASH: &str = "8264e70a0fadf4151ff158fd2b80bf62";

#[test]
fn golden_v2023_from_builder_matches_python_bytes() {
    // Names as WTF-8, added in an order that is neither UTF-8 nor UTF-16 sorted.
    let names: [&[u8]; 10] = [
        "\u{ff5e}.txt".as_bytes(),
        "\u{1f600}.txt".as_bytes(),
        b"bad\xed\xb3\xbf",
        b"\xed\xb2\x80lone\xed\xa0\x80",
        b"ctl\x01\x7f\t\n\"\\/q",
        "caf\u{e9}/sub/x".as_bytes(),
        b"a b/c",
        b"A",
        b"a-b",
        b"a/b",
    ];
    let mut b = ManifestBuilder::new(Format::V2023_03_03);
    for (i, n) in names.iter().enumerate() {
        let i = i as u64;
        b.add_file(
            n,
            FileEntry {
                size: i * 3,
                mtime_us: 1_700_000_000_000_000 + i as i64,
                executable: false,
                content: Content::Whole(Hash(u128::from(i * 0x1111111111111111 + 7))),
            },
        );
    }
    let m = b.build().unwrap();
    assert_eq!(String::from_utf8(m.encode()).unwrap(), GOLDEN_2023);
    assert_eq!(m.hash().to_string(), GOLDEN_2023_HASH);
    // U+1F600 sorts before U+FF5E in UTF-16 although its UTF-8 bytes are larger.
    let order: Vec<&[u8]> = m.entries().map(|e| e.path).collect();
    let emoji = order
        .iter()
        .position(|p| p.starts_with("\u{1f600}".as_bytes()))
        .unwrap();
    let tilde = order
        .iter()
        .position(|p| p.starts_with("\u{ff5e}".as_bytes()))
        .unwrap();
    assert!(emoji < tilde);
    assert!("\u{1f600}".as_bytes() > "\u{ff5e}".as_bytes());
    // And decoding the golden bytes gives the same model back.
    let d = roundtrip(GOLDEN_2023);
    assert_eq!(
        d.entries().collect::<Vec<_>>(),
        m.entries().collect::<Vec<_>>()
    );
    assert_eq!(d.get(4).unwrap().path, b"bad\xed\xb3\xbf");
}

fn beta_example() -> String {
    let c1 = Hash::of(b"chunk one");
    let c2 = Hash::of(b"chunk two");
    format!(
        r#"{{"dirs":[{{"name":"scene"}},{{"name":"$0/tex"}}],"files":[{{"hash":"{H0}","mtime":1700000000000000,"name":"run.sh","runnable":true,"size":0}},{{"hash":"{H11}","mtime":1700000000000000,"name":"$0/a.txt","size":11}},{{"name":"$0/latest.txt","symlink":{{"name":"$0/a.txt"}}}},{{"chunkhashes":["{c1}","{c2}"],"mtime":1700000000000000,"name":"$1/big.exr","size":300000000}}],"hashAlg":"xxh128","manifestVersion":"2025-12-04-beta","totalSize":300000011}}"#
    )
}

#[test]
fn v2025_beta_spec_example() {
    let m = roundtrip(&beta_example());
    assert_eq!(m.format(), Format::V2025_12_04Beta);
    assert!(!m.is_diff());
    let paths: Vec<&[u8]> = m.entries().map(|e| e.path).collect();
    assert_eq!(
        paths,
        [
            &b"run.sh"[..],
            b"scene",
            b"scene/a.txt",
            b"scene/latest.txt",
            b"scene/tex",
            b"scene/tex/big.exr"
        ]
    );
    let link = m.get(m.find(b"scene/latest.txt").unwrap()).unwrap();
    assert_eq!(
        link.kind,
        EntryKind::Symlink {
            target: b"scene/a.txt"
        }
    );
    let big = m.get(m.find(b"scene/tex/big.exr").unwrap()).unwrap();
    match big.kind {
        EntryKind::File(f) => {
            assert_eq!(
                f.content,
                Content::Chunked(&[Hash::of(b"chunk one"), Hash::of(b"chunk two")])
            );
            assert!(f.size > CHUNK_SIZE);
        }
        other => panic!("{other:?}"),
    }
    match m.get(0).unwrap().kind {
        EntryKind::File(f) => assert!(f.executable),
        other => panic!("{other:?}"),
    }
}

/// (specificationVersion, Python-spelling body, Rust-spelling body) for the four kinds.
fn spec_examples() -> Vec<(String, String)> {
    let parent = Hash::of(b"parent manifest");
    let rel_snap_py = format!(
        r#"{{"dirs":[{{"name":"a"}},{{"name":"$0/b"}}],"files":[{{"hash":"{H11}","mtime":5,"name":"$1/f.txt","size":11}},{{"name":"$0/l","symlink":{{"name":"$1/f.txt"}}}},{{"hash":"{H0}","mtime":-3,"name":"top","runnable":true,"size":0}}],"hashAlg":"xxh128","specificationVersion":"relative-manifest-snapshot-beta-2025-12","totalSize":11}}"#
    );
    let rel_snap_rs = format!(
        r#"{{"dirs":[{{"path":"a"}},{{"path":"$0/b"}}],"files":[{{"hash":"{H11}","mtime":5,"path":"$1/f.txt","size":11}},{{"path":"$0/l","symlink":{{"target":"$1/f.txt"}}}},{{"hash":"{H0}","mtime":-3,"path":"top","runnable":true,"size":0}}],"hashAlg":"xxh128","specificationVersion":"relative-manifest-snapshot-beta-2025-12","totalSize":11}}"#
    );
    let rel_diff_py = format!(
        r#"{{"dirs":[{{"name":"a"}},{{"delete":true,"name":"gone"}}],"files":[{{"hash":"{H11}","mtime":5,"name":"$0/new.txt","size":11}},{{"delete":true,"name":"$0/old.txt"}}],"hashAlg":"xxh128","parentManifestHash":"{parent}","specificationVersion":"relative-manifest-diff-beta-2025-12","totalSize":11}}"#
    );
    let rel_diff_rs = format!(
        r#"{{"dirs":[{{"path":"a"}},{{"deleted":true,"path":"gone"}}],"files":[{{"hash":"{H11}","mtime":5,"path":"$0/new.txt","size":11}},{{"deleted":true,"path":"$0/old.txt"}}],"hashAlg":"xxh128","parentManifestHash":"{parent}","specificationVersion":"relative-manifest-diff-beta-2025-12","totalSize":11}}"#
    );
    let abs_snap_py = format!(
        r#"{{"dirs":[{{"name":"/mnt"}},{{"name":"$0/proj"}}],"files":[{{"hash":"{H11}","mtime":5,"name":"$1/f.txt","size":11}},{{"name":"$1/l","symlink":{{"name":"$1/f.txt"}}}}],"hashAlg":"xxh128","specificationVersion":"absolute-manifest-snapshot-beta-2025-12","totalSize":11}}"#
    );
    let abs_snap_rs = abs_snap_py
        .replace("\"name\":\"", "\"path\":\"")
        .replace("\"symlink\":{\"path\"", "\"symlink\":{\"target\"");
    let abs_diff_py = format!(
        r#"{{"dirs":[{{"name":"/mnt"}}],"files":[{{"delete":true,"name":"$0/old"}},{{"hash":"{H0}","mtime":1,"name":"$0/x","size":0}}],"hashAlg":"xxh128","parentManifestHash":"{parent}","specificationVersion":"absolute-manifest-diff-beta-2025-12","totalSize":0}}"#
    );
    let abs_diff_rs = abs_diff_py
        .replace("\"name\"", "\"path\"")
        .replace("\"delete\"", "\"deleted\"");
    vec![
        (rel_snap_py, rel_snap_rs),
        (rel_diff_py, rel_diff_rs),
        (abs_snap_py, abs_snap_rs),
        (abs_diff_py, abs_diff_rs),
    ]
}

#[test]
fn spec2025_all_kinds_both_spellings() {
    let kinds = [
        (Format::RelativeBeta2025_12, false),
        (Format::RelativeBeta2025_12, true),
        (Format::AbsoluteBeta2025_12, false),
        (Format::AbsoluteBeta2025_12, true),
    ];
    for ((py, rs), (format, diff)) in spec_examples().into_iter().zip(kinds) {
        assert_ne!(py, rs, "the Rust spelling must really differ");
        let m = roundtrip(&py);
        assert_eq!((m.format(), m.is_diff()), (format, diff));
        assert_eq!(m.parent_manifest_hash().is_some(), diff);
        let r = Manifest::decode(rs.as_bytes(), "rust-spelling").unwrap_or_else(|e| panic!("{e}"));
        // Rust-port spelling in, Python spelling out.
        let out = String::from_utf8(r.encode()).unwrap();
        assert_eq!(out, py);
        assert!(
            !out.contains("\"path\"")
                && !out.contains("\"deleted\"")
                && !out.contains("\"target\"")
        );
        assert_eq!(r.hash(), Hash::of(py.as_bytes()));
    }
}

#[test]
fn spec2025_diff_entries_decode_as_deletions() {
    let (py, _) = spec_examples().swap_remove(1);
    let m = Manifest::decode(py.as_bytes(), "diff").unwrap();
    let kinds: Vec<(&[u8], EntryKind)> = m.entries().map(|e| (e.path, e.kind)).collect();
    assert!(kinds.contains(&(&b"gone"[..], EntryKind::Deleted { dir: true })));
    assert!(kinds.contains(&(&b"a/old.txt"[..], EntryKind::Deleted { dir: false })));
    assert_eq!(m.counts().deletions, 2);
}

#[test]
fn v2023_converts_to_v2025_and_back() {
    let m = Manifest::decode(GOLDEN_2023.as_bytes(), "golden").unwrap();
    let beta = m.convert(Format::V2025_12_04Beta).unwrap();
    assert!(beta.counts().dirs >= 3, "implied dirs become explicit");
    let text = beta.encode();
    let again = Manifest::decode(&text, "beta").unwrap();
    assert_eq!(again.encode(), text);
    let back = again.convert(Format::V2023_03_03).unwrap();
    assert_eq!(String::from_utf8(back.encode()).unwrap(), GOLDEN_2023);
    // Things v2023 cannot say are refused, not dropped.
    let ex = Manifest::decode(beta_example().as_bytes(), "ex").unwrap();
    let err = ex.convert(Format::V2023_03_03).unwrap_err();
    assert!(err.to_string().contains("unsupported-in-format"), "{err}");
}

#[test]
fn builder_adds_missing_ancestor_dirs_for_v2025() {
    let mut b = ManifestBuilder::new(Format::V2025_12_04Beta);
    b.add_file(
        b"x/y/z.txt",
        FileEntry {
            size: 11,
            mtime_us: 1,
            executable: false,
            content: Content::Whole(Hash::of(b"hello world")),
        },
    );
    b.add_dir(b"empty");
    let m = b.build().unwrap();
    let text = String::from_utf8(m.encode()).unwrap();
    assert_eq!(
        text,
        format!(
            r#"{{"dirs":[{{"name":"empty"}},{{"name":"x"}},{{"name":"$1/y"}}],"files":[{{"hash":"{H11}","mtime":1,"name":"$2/z.txt","size":11}}],"hashAlg":"xxh128","manifestVersion":"2025-12-04-beta","totalSize":11}}"#
        )
    );
}
