//! Mounts backed by the S3 store (moto on 127.0.0.1, started and stopped here).

mod common;

use std::process::Command;

use common::fault_proxy::{Fault, FaultProxy};
use common::s3_servers::{config, upload_job, v2023_manifest, Moto, MOUNT_ENV as ENV};
use common::{is_mounted, pattern, read_all, Mount, MountOptions, BIN};

/// A moto server with bucket `cas` holding `files` under `root/Data/` (uploaded with boto3), and
/// a work directory with their v2023 manifest: (server, work dir, manifest path).
fn moto_job(files: &[(&str, &[u8])]) -> (Moto, tempfile::TempDir, std::path::PathBuf) {
    let moto = Moto::start();
    moto.create_bucket("cas");
    let work = tempfile::tempdir().unwrap();
    let manifest_path = work.path().join("m.manifest");
    let s3_config = config(&moto.endpoint(), "cas", "root", "k", "s");
    std::fs::write(&manifest_path, upload_job(&s3_config, files)).unwrap();
    (moto, work, manifest_path)
}

#[test]
fn mount_refuses_a_wrong_bucket_before_mounting() {
    let moto = Moto::start();
    moto.create_bucket("real-bucket");
    let work = tempfile::tempdir().unwrap();
    let manifest_path = work.path().join("m.manifest");
    std::fs::write(&manifest_path, v2023_manifest(&[("a.txt", b"hello world")])).unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let output = Command::new(BIN)
        .arg(&manifest_path)
        .arg(&mnt)
        .args([
            "--s3",
            "s3://wrong-bucket/root",
            "--endpoint-url",
            &moto.endpoint(),
        ])
        .envs(ENV)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mounted a wrong bucket: {stderr}");
    assert!(
        stderr.contains("bucket wrong-bucket does not exist"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt));
}

#[test]
fn mount_serves_s3_files_and_never_serves_flipped_bytes() {
    let big = pattern(3, (9 << 20) + 123);
    let small = b"hello world".to_vec();
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big), ("dir/small.txt", &small)];
    let (moto, work, manifest_path) = moto_job(&files);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let mut mount = Mount::start_with_store(
        &manifest_path,
        &store,
        &ENV,
        &work.path().join("mnt"),
        MountOptions::default(),
    );
    assert_eq!(read_all(&mount.dir.join("dir/small.txt")).unwrap(), small);
    // Every GET of the big file gets a flipped byte: verification must refuse it (EIO), and
    // whatever a read returned before the error must be the file's own bytes.
    proxy.inject(&[Fault::Flip; 64]);
    let (served, error) = common::read_until_error(&mount.dir.join("big.bin"), &big);
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{}", mount.stderr());
    assert_eq!(
        served, 0,
        "bytes of an object that failed verification were served"
    );
    // Resets, 503s and truncation are retried by the store: the bytes are exact (a fresh mount,
    // so nothing is cached or marked corrupt).
    drop(mount);
    proxy.clear();
    let port = common::s3_servers::free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut mount = Mount::start_with_store(
        &manifest_path,
        &store,
        &ENV,
        &work.path().join("mnt2"),
        MountOptions::with(&["--stats", "--metrics-addr", metrics_addr.as_str()]),
    );
    proxy.inject(&[Fault::Reset, Fault::SlowDown, Fault::Truncate]);
    assert!(
        read_all(&mount.dir.join("big.bin")).unwrap() == big,
        "{}",
        mount.stderr()
    );
    // The metrics split the retries by cause: the 503 SlowDown is throttling, the reset and the
    // truncated body are the connection's or a bad answer; the causes add up to the total.
    let metrics = common::scrape_metrics(port);
    let by_cause = |cause: &str| {
        common::metric_total(
            &metrics,
            "mount_vfs_store_retries_by_cause_total",
            &format!("cause=\"{cause}\""),
        )
    };
    assert_eq!(by_cause("throttled"), 1, "{metrics}");
    assert!(
        by_cause("connection") + by_cause("bad_answer") >= 2,
        "{metrics}"
    );
    assert_eq!(
        common::metric_total(&metrics, "mount_vfs_store_retries_by_cause_total", ""),
        common::metric_total(&metrics, "mount_vfs_store_retries_total", ""),
        "{metrics}"
    );
    mount.stop();
    // Each fault cost at least one retry (a reset can also fail a request queued on that
    // connection), and --stats shows them.
    let retries = mount.stats("final").unwrap()["total"]["store_retries"].clone();
    assert!((3..=8).contains(&retries.as_u64().unwrap()), "{retries}");
    drop(mount);

    // One GET with a flipped byte: the object fails verification once and is fetched again.
    proxy.clear();
    let mut mount = Mount::start_with_store(
        &manifest_path,
        &store,
        &ENV,
        &work.path().join("mnt3"),
        MountOptions::with(&["--stats"]),
    );
    proxy.inject(&[Fault::Flip]);
    assert!(read_all(&mount.dir.join("big.bin")).unwrap() == big);
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["verify_failures"], 1);
    assert_eq!(total["bytes_fetched"], 2 * big.len() as u64);
}

/// Without a disk cache, an object larger than the memory limit still comes from S3 once: the
/// blocks that did not stay in memory are read back from an unnamed spill file, which leaves
/// nothing in TMPDIR.
#[test]
fn an_object_larger_than_memory_is_fetched_once_without_a_disk_cache() {
    // A whole number of 4 KiB pages: an O_DIRECT spill file cannot take a short last block,
    // which is fetched again when read again.
    let big = pattern(6, (48 << 20) + (8 << 10));
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big)];
    let (moto, work, manifest_path) = moto_job(&files);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let mut env = ENV.to_vec();
    env.push(("TMPDIR", scratch.to_str().unwrap()));
    let options = MountOptions {
        shards: 1,
        extra: &["--memory-limit", "32M", "--stats"],
    };
    let mnt = work.path().join("mnt");
    let mut mount = Mount::start_with_store(&manifest_path, &store, &env, &mnt, options);
    assert!(read_all(&mount.dir.join("big.bin")).unwrap() == big);
    let left = std::fs::read_dir(&scratch).unwrap().count();
    assert_eq!(left, 0, "spill files have no name");
    mount.stop();
    let total = &mount.stats("final").unwrap()["total"];
    assert_eq!(total["bytes_fetched"], big.len() as u64, "{total}");
    // The blocks that did not stay in memory (all but a 32 MiB pool's share) came back from it.
    let read_back = total["spill_bytes_read"].as_u64().unwrap();
    assert!(read_back >= 16 << 20, "{total}");
    assert!(
        total["spill_bytes_written"].as_u64().unwrap() >= read_back,
        "{total}"
    );
}

#[test]
fn a_disk_cache_spares_the_store_on_the_next_mount() {
    let big = pattern(5, (6 << 20) + 7);
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big)];
    let (moto, work, manifest_path) = moto_job(&files);
    let proxy = FaultProxy::start(moto.port);
    let cache = work.path().join("cache");
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let extra = ["--cache-dir", cache.to_str().unwrap(), "--stats"];
    let options = || MountOptions {
        shards: 2,
        extra: &extra,
    };
    let mnt = work.path().join("mnt");
    let mut first = Mount::start_with_store(&manifest_path, &store, &ENV, &mnt, options());
    assert!(read_all(&first.dir.join("big.bin")).unwrap() == big);
    first.stop();
    assert_eq!(first.stats("final").unwrap()["total"]["objects_cached"], 1);

    // Every GET would now return flipped bytes: the second mount never makes one.
    let gets = proxy.gets();
    proxy.inject(&[Fault::Flip; 16]);
    let mut second = Mount::start_with_store(&manifest_path, &store, &ENV, &mnt, options());
    assert!(read_all(&second.dir.join("big.bin")).unwrap() == big);
    second.stop();
    let total = &second.stats("final").unwrap()["total"];
    assert_eq!(total["objects_from_disk_cache"], 1);
    assert_eq!(total["bytes_fetched"], 0);
    // One GET: the start-up probe (ListObjectsV2); none for the object.
    assert_eq!(proxy.gets(), gets + 1, "only the probe reached the server");
}

#[test]
fn a_server_that_stops_answering_costs_a_read_the_read_timeout_then_eio() {
    // Issue 8.5: an S3 server that accepts but never answers blocked a read for 100-160 s.
    let data = pattern(85, (2 << 20) + 5);
    let files: Vec<(&str, &[u8])> = vec![("a.bin", &data)];
    let (moto, work, manifest_path) = moto_job(&files);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let mut mount = Mount::start_with_store(
        &manifest_path,
        &store,
        &ENV,
        &work.path().join("mnt"),
        MountOptions::with(&["--read-timeout", "3"]),
    );
    // Every GET now sends half a body, then nothing for ten minutes.
    proxy.inject(&[Fault::Stall(std::time::Duration::from_secs(600)); 16]);
    let started = std::time::Instant::now();
    let error = read_all(&mount.dir.join("a.bin")).unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    assert!(
        took >= std::time::Duration::from_secs(3) && took < std::time::Duration::from_secs(10),
        "the read failed after {took:?}"
    );
    mount.stop();
    let log = mount.stderr();
    let lines = log
        .lines()
        .filter(|l| l.contains("no complete answer within 3s"))
        .count();
    assert_eq!(lines, 1, "{log}");
}

#[test]
fn a_wrong_root_prefix_is_refused_before_mounting() {
    // Issue 8.6: a wrong prefix mounted, and every read was EIO.
    let files: Vec<(&str, &[u8])> = vec![("a.txt", b"hello"), ("b.txt", b"world")];
    let (moto, work, manifest_path) = moto_job(&files);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // No region anywhere, and the instance metadata service (were it asked) at a closed
    // loopback port: any IMDS lookup would show as a warning.
    let mount = |prefix: &str, log: &str| {
        Command::new(BIN)
            .arg(&manifest_path)
            .arg(&mnt)
            .args(["--s3", prefix, "--endpoint-url", &moto.endpoint()])
            .args(["--stop-grace", "1"])
            .envs(ENV)
            .env_remove("AWS_REGION")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let output = mount("s3://cas/wrong-root", "info")
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("none of the 2 manifest objects checked exists")
            && stderr.contains("s3://cas/wrong-root/Data/"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt));
    assert!(!stderr.to_lowercase().contains("imds"), "{stderr}");

    // The right prefix mounts. Even at trace level the log names no access key.
    let mut child = mount("s3://cas/root", "trace");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut ready).unwrap();
    assert!(ready.contains("mounted"), "{ready}");
    assert_eq!(read_all(&mnt.join("a.txt")).unwrap(), b"hello");
    common::signal(child.id(), libc::SIGTERM);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(!is_mounted(&mnt));
    let log = String::from_utf8_lossy(&output.stderr);
    let key = ENV
        .iter()
        .find(|(k, _)| *k == "AWS_ACCESS_KEY_ID")
        .unwrap()
        .1;
    assert!(!log.contains(&format!("\"{key}\"")) && !log.contains(&format!("{key}/")));
    assert!(!log.to_lowercase().contains("imds"), "{log}");
}

/// The seed invocation over S3: `--writable --cache-dir` with the S3 store. A patch into the
/// middle of a base file copies up only its blocks (the rest still comes from S3, verified), a
/// new file and an append are kept, and a second mount gives everything back.
#[test]
fn writable_mount_over_s3_patches_inputs_and_keeps_outputs() {
    let big = pattern(5, (6 << 20) + 77);
    let small = b"hello world".to_vec();
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big), ("dir/small.txt", &small)];
    let (_moto, work, manifest_path) = moto_job(&files);
    let endpoint = _moto.endpoint();
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let cache = work.path().join("vfs-cache");
    let cache = cache.to_str().unwrap();
    let extra = ["--writable", "--cache-dir", cache, "--part-size", "1M"];
    let options = || MountOptions {
        shards: 2,
        extra: &extra,
    };
    let mnt = work.path().join("mnt");
    let mut expected_big = big.clone();
    let patch = pattern(6, 1000);
    expected_big[(3 << 20) - 500..(3 << 20) + 500].copy_from_slice(&patch);
    {
        let mount = Mount::start_with_store(&manifest_path, &store, &ENV, &mnt, options());
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(mount.dir.join("big.bin"))
            .unwrap();
        file.write_all_at(&patch, (3 << 20) - 500).unwrap();
        drop(file);
        std::fs::OpenOptions::new()
            .append(true)
            .open(mount.dir.join("dir/small.txt"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        std::fs::write(mount.dir.join("out.exr"), b"rendered").unwrap();
        assert_eq!(read_all(&mount.dir.join("big.bin")).unwrap(), expected_big);
    }
    let mount = Mount::start_with_store(&manifest_path, &store, &ENV, &mnt, options());
    assert_eq!(read_all(&mount.dir.join("big.bin")).unwrap(), expected_big);
    assert_eq!(
        read_all(&mount.dir.join("dir/small.txt")).unwrap(),
        b"hello world!"
    );
    assert_eq!(read_all(&mount.dir.join("out.exr")).unwrap(), b"rendered");
    // Two blocks were copied up (the patch straddles a block boundary); the other five are
    // not in the upper file at all.
    let upper = std::fs::read_dir(
        std::fs::read_dir(work.path().join("vfs-cache/Overlay"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("files"),
    )
    .unwrap()
    .map(|e| {
        use std::os::unix::fs::MetadataExt;
        e.unwrap().metadata().unwrap().blocks() * 512
    })
    .max()
    .unwrap();
    assert!(
        upper <= (2 << 20) + 2 * 4096,
        "the patched file's upper file holds {upper} bytes, more than the 2 blocks it touched"
    );
}
