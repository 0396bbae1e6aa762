//! Time to a ready mount and daemon memory per entry for a 1,000,000-entry manifest.
//!
//! Runs the real binary twice: on an empty manifest (baseline RSS of the process, shards and
//! pools) and on a generated 1M-entry v2023 manifest; reports the "ready in" time the daemon
//! prints and (RSS - baseline RSS) / entries. Targets (issue 3): ready <= 3 s, <= 300 B/entry.
//!
//! Run: `cargo bench --bench mount_ready` (root; needs /dev/fuse). `BENCH_ENTRIES` overrides the
//! entry count.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use common::chart::BarChart;

/// A render-farm-shaped v2023 manifest: shots/sequences/frames, ~50-byte paths.
fn manifest(entries: usize) -> String {
    let mut paths: Vec<String> = (0..entries)
        .map(|i| {
            format!(
                "shots/sq{:03}/sh{:04}/render/v{:03}/beauty.{:04}.exr",
                i / 100_000,
                (i / 1000) % 100,
                (i / 100) % 10,
                1000 + i % 100
            )
        })
        .collect();
    paths.sort(); // ASCII: UTF-8 order equals UTF-16 order.
    let mut out = String::from(r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":["#);
    for (i, path) in paths.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"hash":"{:032x}","mtime":1700000000000000,"path":"{path}","size":{}}}"#,
            (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1,
            1000 + i
        ));
    }
    let total: usize = (0..entries).map(|i| 1000 + i).sum();
    out.push_str(&format!(r#"],"totalSize":{total}}}"#));
    out
}

/// Mounts, returns (seconds to ready as printed by the daemon, daemon RSS in bytes).
fn mount_once(manifest: &Path, cas: &Path, mnt: &Path) -> (f64, u64) {
    fs::create_dir_all(mnt).unwrap();
    let mut child = Command::new(common::bin())
        .arg(manifest)
        .arg(mnt)
        .arg("--cas")
        .arg(cas)
        .args(["--shards", "2", "--memory-limit", "64M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: f64 = line
        .rsplit_once("ready in ")
        .and_then(|(_, rest)| {
            rest.trim_end()
                .trim_end_matches(")")
                .trim_end_matches('s')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("unexpected ready line: {line}"));
    let status = fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
    (ready, rss_kib * 1024)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let entries: usize = std::env::var("BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mount_ready_bench");
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(base.join("cas/Data")).unwrap();
    let empty = base.join("empty.manifest");
    fs::write(
        &empty,
        r#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[],"totalSize":0}"#,
    )
    .unwrap();
    let big = base.join("big.manifest");
    let text = manifest(entries);
    fs::write(&big, &text).unwrap();
    println!(
        "# mount_ready: {entries} entries, manifest {:.1} MiB",
        text.len() as f64 / (1 << 20) as f64
    );
    drop(text);
    let cas = base.join("cas");
    let mnt = base.join("mnt");
    let (_, baseline) = mount_once(&empty, &cas, &mnt);
    let mut readies = Vec::new();
    let mut per_entry = Vec::new();
    for _ in 0..3 {
        let (ready, rss) = mount_once(&big, &cas, &mnt);
        readies.push(ready);
        per_entry.push(rss.saturating_sub(baseline) as f64 / entries as f64);
    }
    readies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    per_entry.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "baseline daemon RSS (empty manifest): {:.1} MiB",
        baseline as f64 / (1 << 20) as f64
    );
    println!(
        "ready in: best {:.2} s, median {:.2} s",
        readies[0], readies[1]
    );
    println!(
        "RSS per entry: best {:.0} B, median {:.0} B",
        per_entry[0], per_entry[1]
    );
    let mut chart = BarChart::new(
        "mount_ready",
        &format!("mount_ready: time to mount a {entries}-entry v2023 manifest, 3 runs"),
        "s",
    );
    chart.lower_is_better = true;
    chart.bar(
        "ready in (read, decode, namespace, shards, FUSE mount)",
        &readies,
    );
    chart.write();
    let mut memory = BarChart::new(
        "mount_ready_memory",
        &format!("mount_ready: daemon RSS per entry over an empty mount, {entries} entries"),
        "bytes per entry",
    );
    memory.lower_is_better = true;
    memory.bar("RSS per entry", &per_entry);
    memory.write();
    let _ = fs::remove_dir_all(&base);
}
