//! Byte-for-byte comparison with the real Deadline Cloud client (`pip install deadline`).
//!
//! The client runs offline and isolated (HOME in a temp dir, telemetry off, no EC2 metadata).
//! Its venv is cached in `target/test-venvs/deadline` (made in a temp dir, then renamed, so an
//! interrupted install never leaves a half venv behind). The version is pinned: a newer client
//! may write other bytes. When pip cannot reach its registry the test fails, unless
//! `MOUNT_VFS_ALLOW_SKIP` names it (see `tests/support/skip.rs`); every other failure fails.
//!
//! Also: the client reads a manifest that `mount_vfs export` made of a `--writable` mount, and
//! downloads it (from moto, loaded with our CAS) byte for byte.

mod common;
#[path = "support/job_changes.rs"]
mod job_changes;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/skip.rs"]
mod skip;

use mount_vfs::manifest::{to_fs_name, Content, EntryKind, Hash, Manifest};
#[path = "support/deadline_venv.rs"]
mod deadline_venv;

use deadline_venv::deadline_venv;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(root: &Path, rel: &[u8], data: &[u8]) {
    let p = root.join(std::ffi::OsStr::from_bytes(rel));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn build_tree(root: &Path) {
    write(root, "café/naïve résumé.txt".as_bytes(), b"accents");
    write(root, "日本語/ファイル.txt".as_bytes(), b"cjk");
    write(root, "😀 emoji/🎬 shot 010.exr".as_bytes(), &[7u8; 1000]);
    write(
        root,
        "～ fullwidth tilde.txt".as_bytes(),
        b"sorts after emoji in UTF-16",
    );
    write(root, "\u{1f600}.txt".as_bytes(), b"astral");
    write(root, b"with spaces/a file.txt", b"spaces");
    write(root, b"empty.txt", b"");
    write(root, b"sub/empty too", b"");
    write(root, b"bad\xff name.bin", b"undecodable byte in the name");
    write(root, b".hidden", b"the client's glob skips this");
    let deep: Vec<String> = (0..20).map(|i| format!("level{i:02}")).collect();
    write(
        root,
        format!("{}/deep.txt", deep.join("/")).as_bytes(),
        b"deep",
    );
    // Bigger than one 4 MiB read block, with a pattern so block boundaries matter.
    let big: Vec<u8> = (0..9_000_001u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write(
        root,
        b"shots/sq010/sh0420/render/v003/beauty.1001.exr",
        &big,
    );
    fs::create_dir_all(root.join("empty dir")).unwrap();
    std::os::unix::fs::symlink("empty.txt", root.join("link to empty")).unwrap();
}

#[test]
fn snapshot_is_byte_identical_to_the_deadline_client() {
    let Some(venv) = deadline_venv("snapshot_is_byte_identical_to_the_deadline_client") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let home = tmp.path().join("home");
    let out = tmp.path().join("out");
    for d in [&root, &home, &out] {
        fs::create_dir_all(d).unwrap();
    }
    build_tree(&root);

    let o = Command::new(venv.join("bin/python"))
        .args(["-m", "deadline", "manifest", "snapshot", "--root"])
        .arg(&root)
        .arg("--destination")
        .arg(&out)
        .args(["--name", "N", "--json"])
        .env("HOME", &home)
        .env("DEADLINE_CLOUD_TELEMETRY_OPT_OUT", "true")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "deadline manifest snapshot failed: {}",
        text(&o)
    );
    let produced: Vec<PathBuf> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(produced.len(), 1, "{produced:?}");
    let theirs = fs::read(&produced[0]).unwrap();

    let bin = env!("CARGO_BIN_EXE_mount_vfs");
    let cas = tmp.path().join("cas");
    let ours_path = tmp.path().join("ours.manifest");
    let o = Command::new(bin)
        .arg("snapshot")
        .arg(&root)
        .arg("--cas")
        .arg(&cas)
        .arg("--output")
        .arg(&ours_path)
        .args(["--format", "2023-03-03"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mount_vfs snapshot failed: {}",
        text(&o)
    );
    let ours = fs::read(&ours_path).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs),
        "manifests differ"
    );
    assert_eq!(ours, theirs);
    assert_eq!(Hash::of(&ours), Hash::of(&theirs));

    // validate accepts the client's manifest and reports its hash.
    let o = Command::new(bin)
        .arg("validate")
        .arg(&produced[0])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains(&format!("hash: {}", Hash::of(&theirs))),
        "{report}"
    );

    // Every CAS object exists, holds the file's bytes and has the right hash.
    let m = Manifest::decode(&theirs, "client").unwrap();
    assert_eq!(m.len(), 12, "expected the whole tree but .hidden");
    assert!(
        m.find(b"bad\xed\xb3\xbf name.bin").is_some(),
        "undecodable name is \\udcff"
    );
    assert!(
        m.find(b"link to empty").is_some(),
        "symlinks to files are followed"
    );
    assert!(m.find(b".hidden").is_none());
    for e in m.entries() {
        let EntryKind::File(f) = e.kind else {
            panic!("v2023 holds files only: {e:?}")
        };
        let Content::Whole(h) = f.content else {
            panic!("v2023 is not chunked")
        };
        let object = fs::read(cas.join("Data").join(format!("{h}.xxh128"))).unwrap();
        assert_eq!(Hash::of(&object), h);
        let original =
            fs::read(root.join(std::ffi::OsStr::from_bytes(&to_fs_name(e.path)))).unwrap();
        assert_eq!(object, original);
        assert_eq!(object.len() as u64, f.size);
    }
}

/// Regular files under `root` by relative path (symlinks are not followed: v2023 cannot say
/// them, so an export leaves them out).
fn files(root: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_symlink() {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Uploads the CAS to moto, then has the client decode the manifest (it must re-encode to the
/// same bytes) and download it into the output directory.
const DOWNLOAD: &str = r#"
import pathlib, sys, boto3
from deadline.job_attachments.asset_manifests.decode import decode_manifest
from deadline.job_attachments.download import download_files_from_manifests
manifest_path, cas, out = sys.argv[1:4]
text = pathlib.Path(manifest_path).read_text()
manifest = decode_manifest(text)
assert manifest.encode() == text, "the client encodes the exported manifest differently"
s3 = boto3.client("s3")
s3.create_bucket(Bucket="attachments")
for f in sorted(pathlib.Path(cas, "Data").iterdir()):
    s3.upload_file(str(f), "attachments", "root/Data/" + f.name)
download_files_from_manifests(
    "attachments", {out: manifest}, cas_prefix="root/Data", session=boto3.Session()
)
print("downloaded", len(manifest.paths))
"#;

#[test]
fn deadline_client_downloads_an_exported_manifest() {
    let test = "deadline_client_downloads_an_exported_manifest";
    let Some(venv) = deadline_venv(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = job_changes::base_files();
    let refs: Vec<(&str, &[u8])> = base.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    let (manifest, cas) = common::job(tmp.path(), &refs, "2023-03-03");
    let plain = tmp.path().join("plain");
    job_changes::write_base(&plain);
    job_changes::change(&plain);
    let cache = tmp.path().join("cache");
    let mut mount = common::Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        common::MountOptions {
            shards: 2,
            extra: &[
                "--writable",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--part-size",
                "1M",
            ],
        },
    );
    job_changes::change(&mount.dir);
    assert!(
        mount.stop().is_some_and(|s| s.success()),
        "{}",
        mount.stderr()
    );
    let exported = tmp.path().join("exported.manifest");
    let o = Command::new(common::BIN)
        .arg("export")
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--manifest")
        .arg(&manifest)
        .arg("--cas")
        .arg(&cas)
        .arg("--output")
        .arg(&exported)
        .output()
        .unwrap();
    assert!(o.status.success(), "export failed: {}", text(&o));

    let moto = common::s3_servers::Moto::start();
    let home = tmp.path().join("home");
    let out = tmp.path().join("downloaded");
    fs::create_dir_all(&home).unwrap();
    let o = Command::new(venv.join("bin/python"))
        .args(["-c", DOWNLOAD])
        .arg(&exported)
        .arg(&cas)
        .arg(&out)
        .env("HOME", &home)
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("DEADLINE_CLOUD_TELEMETRY_OPT_OUT", "true")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "client download failed: {}", text(&o));
    assert!(text(&o).contains("downloaded 7"), "{}", text(&o));
    assert_eq!(files(&out), files(&plain));
}
