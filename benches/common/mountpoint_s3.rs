//! mountpoint-s3, the strongest peer, as a contender: its `mount_from_config` example of
//! `mountpoint-s3-fs` 0.11.0 (the `mount-s3` CLI is not on the cargo registry; see
//! /work/shared/testbed.md for the build), which mounts a CSV manifest of keys rather than a
//! listing. This module finds the binary and writes the manifest and the JSON config; the
//! bench starts the command like any other FUSE daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the binary is looked for, after `$MOUNTPOINT_S3_BIN`.
const INSTALLED: &str = "/opt/mountpoint-s3/bin/mount_from_config";

/// The `mount_from_config` binary: `$MOUNTPOINT_S3_BIN`, else [`INSTALLED`]; `Err` says where it
/// was looked for, for the bench's "absent" line.
pub fn binary() -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = std::env::var_os("MOUNTPOINT_S3_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(INSTALLED)])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "absent (no mount_from_config at {}; build: cargo install mountpoint-s3-fs@0.11.0 \
             --example mount_from_config --features manifest,event_log --root /opt/mountpoint-s3)",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// One object of the manifest: its key under the channel's prefix, its ETag as the server
/// sends it (quotes included), its size.
pub struct Object {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: manifests are a few KiB.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The bytes a row's checksum covers: key, ETag, size as 8 bytes big-endian.
fn row_bytes(o: &Object) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(o.key.len() + o.etag.len() + 8);
    bytes.extend_from_slice(o.key.as_bytes());
    bytes.extend_from_slice(o.etag.as_bytes());
    bytes.extend_from_slice(&o.size.to_be_bytes());
    bytes
}

/// A CRC32C as mountpoint writes it: base64 of its 4 bytes, big-endian.
fn base64_crc(crc: u32) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = crc.to_be_bytes();
    let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
    let mut out: String = [18, 12, 6, 0]
        .iter()
        .map(|s| ALPHABET[(n >> s) as usize & 63] as char)
        .collect();
    out.push(ALPHABET[(b[3] >> 2) as usize] as char);
    out.push(ALPHABET[((b[3] & 3) << 4) as usize] as char);
    out.push_str("==");
    out
}

/// A CSV field, quoted with inner quotes doubled.
fn quoted(field: &str) -> String {
    format!("\"{}\"", field.replace('"', "\"\""))
}

/// Writes the CSV manifest of `objects` to `path` and returns its checksum (base64): the
/// CRC32C-combine of the rows' checksums, which is the CRC32C of all rows' bytes in order.
pub fn write_manifest(path: &Path, objects: &[Object]) -> String {
    // mountpoint-s3-fs's own vector (manifest/csv_reader.rs): a wrong CRC here would only
    // show up as a refused mount, so check it before writing anything.
    let vector = Object {
        key: "key1".into(),
        etag: "\"etag1\"".into(),
        size: 1024,
    };
    assert_eq!(crc32c(&row_bytes(&vector)), 2462020494);
    assert_eq!(base64_crc(2462020494), "kr9zjg==");
    let mut csv = String::new();
    let mut all = Vec::new();
    for o in objects {
        let row = row_bytes(o);
        csv += &format!(
            "{},{},{},{}\n",
            quoted(&o.key),
            quoted(&o.etag),
            o.size,
            base64_crc(crc32c(&row))
        );
        all.extend_from_slice(&row);
    }
    fs::write(path, csv).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    base64_crc(crc32c(&all))
}

/// The command that mounts `objects` (keys under `prefix` in `bucket`) on `mnt`, under
/// `mnt/{directory}/`: config, manifest, metadata store and event log in `work`. Throughput
/// target explicit (10 Gb/s: no instance metadata here), `memory_limit` bytes, no disk cache,
/// credentials from the environment.
#[allow(clippy::too_many_arguments)]
pub fn command(
    bin: &Path,
    work: &Path,
    mnt: &Path,
    endpoint: &str,
    region: &str,
    bucket: &str,
    prefix: &str,
    directory: &str,
    objects: &[Object],
    memory_limit: u64,
) -> Command {
    let _ = fs::remove_dir_all(work);
    for dir in ["metadata", "events"] {
        fs::create_dir_all(work.join(dir)).unwrap();
    }
    let manifest = work.join("manifest.csv");
    let checksum = write_manifest(&manifest, objects);
    let config = serde_json::json!({
        "config_version": "0.0.1",
        "mountpoint": mnt,
        "metadata_store_dir": work.join("metadata"),
        "event_log_dir": work.join("events"),
        "region": region,
        "endpoint_url": endpoint,
        "auto_unmount": false,
        "loglevel": "warn,awscrt=off",
        "channels": [{
            "directory_name": directory,
            "bucket_name": bucket,
            "prefix": prefix,
            "manifest_path": manifest,
            "manifest_checksum": checksum,
        }],
        "throughput_config": {"type": "Explicit", "throughput": 10.0},
        "memory_limit_bytes": memory_limit,
    });
    let config_path = work.join("config.json");
    fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut c = Command::new(bin);
    c.arg("--config").arg(config_path);
    c
}
