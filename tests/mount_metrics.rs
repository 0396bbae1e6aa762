//! `--metrics-addr`: the Prometheus endpoint is scraped while the mount serves reads, and its
//! counters agree with what was read.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::s3_servers::free_port;
use common::{job, metric_total as total, pattern, read_all, Mount, MountOptions};

/// `GET path` on `port`; the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[test]
fn metrics_count_what_the_mount_served() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(31, (3 << 20) + 77);
    let (manifest, cas) = job(tmp.path(), &[("a.bin", &data)], "2023-03-03");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let extra = ["--metrics-addr", addr.as_str()];
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 2,
            extra: &extra,
        },
    );
    assert!(read_all(&mount.dir.join("a.bin")).unwrap() == data);
    assert!(std::fs::metadata(mount.dir.join("missing")).is_err());

    let (status, body) = get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF: {body}"
    );
    // Page-cache reads may serve some bytes twice or not at all, but a cold buffered read of the
    // whole file through FUSE reaches the daemon for every byte once.
    assert_eq!(
        total(&body, "mount_vfs_bytes_served_total", ""),
        data.len() as u64
    );
    assert_eq!(total(&body, "mount_vfs_objects_verified_total", ""), 1);
    assert!(total(&body, "mount_vfs_requests_total", "op=\"read\"") >= 1);
    assert!(total(&body, "mount_vfs_requests_total", "op=\"lookup\"") >= 2);
    assert!(
        total(
            &body,
            "mount_vfs_request_failures_total",
            "errno=\"ENOENT\""
        ) >= 1,
        "the failed lookup is counted: {body}"
    );
    assert!(total(&body, "mount_vfs_pool_capacity_bytes", "") > 0);
    assert!(
        body.contains("mount_vfs_store_reads_in_flight{shard=\"1\"} 0\n"),
        "the in-flight gauge is exported, and 0 when idle: {body}"
    );

    let (status, _) = get(port, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    mount.stop();
}

/// The value of unlabelled metric `name` (a sample line `name value`), if exported.
fn single(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .map(|value| value.parse().unwrap())
}

#[test]
fn disk_cache_size_and_evictions_are_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..3).map(|i| pattern(60 + i, 5 << 20)).collect();
    let (manifest, cas) = job(
        tmp.path(),
        &[("a", &files[0]), ("b", &files[1]), ("c", &files[2])],
        "2023-03-03",
    );
    let cache = tmp.path().join("cache");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let extra = [
        "--metrics-addr",
        addr.as_str(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-size",
        "12M",
    ];
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards: 1,
            extra: &extra,
        },
    );
    let (_, body) = get(port, "/metrics");
    assert_eq!(
        single(&body, "mount_vfs_disk_cache_bytes"),
        Some(0),
        "{body}"
    );
    assert_eq!(
        single(&body, "mount_vfs_disk_cache_limit_bytes"),
        Some(12 << 20)
    );
    assert_eq!(
        single(&body, "mount_vfs_disk_cache_evicted_files_total"),
        Some(0)
    );
    for (name, content) in ["a", "b", "c"].iter().zip(&files) {
        assert!(read_all(&mount.dir.join(name)).unwrap() == *content);
    }
    // 15 MiB committed against 12 MiB: the janitor removes the oldest file, down to 90%.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let (_, body) = get(port, "/metrics");
        if single(&body, "mount_vfs_disk_cache_evicted_files_total") == Some(1) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no eviction counted: {body}\n{}",
            mount.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        single(&body, "mount_vfs_disk_cache_evicted_bytes_total"),
        Some(5 << 20)
    );
    assert_eq!(single(&body, "mount_vfs_disk_cache_bytes"), Some(10 << 20));
    mount.stop();
}

#[test]
fn an_address_in_use_is_refused_before_mounting() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(tmp.path(), &[("a.bin", b"x")], "2023-03-03");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mount_vfs"))
        .arg(&manifest)
        .arg(&mnt)
        .arg("--cas")
        .arg(&cas)
        .args(["--metrics-addr", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics-addr {addr}: cannot listen")),
        "{stderr}"
    );
    assert!(!common::is_mounted(&mnt), "nothing left mounted");
}
