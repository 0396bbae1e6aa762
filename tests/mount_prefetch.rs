//! Traces and `--prefetch` over S3 (moto on 127.0.0.1): a mount with `--cache-dir` records the
//! order its readers read objects in `DIR/Traces/{manifest-id}`; a later mount that finds that
//! trace (a fresh cache with only the trace copied in, as another node of the job would have it)
//! fetches those objects before they are read, and serves them byte-exact as prefetch hits.
//! Broken traces cost one log line, never an error storm or a failed mount. With
//! `--share-traces` the trace travels through the bucket (`{rootPrefix}/Traces/{manifest-id}/`)
//! instead, and S3 refusing it (SeaweedFS with read-only credentials) costs log lines only.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::s3_servers::{
    config, create_bucket_signed, raw_request, upload, upload_job, Moto, Seaweed, MOUNT_ENV as ENV,
    SEAWEED_KEY, SEAWEED_READ_KEY, SEAWEED_READ_SECRET, SEAWEED_SECRET,
};
use common::{pattern, read_all, Mount, MountOptions, BIN};
use mount_vfs::manifest::Hash;
use mount_vfs::store::S3Target;
use mount_vfs::trace::{manifest_id, trace_path, Trace};

/// A moto server holding the job's files, and the manifest listing them.
struct Job {
    moto: Moto,
    work: tempfile::TempDir,
    manifest: PathBuf,
    endpoint: String,
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Job {
    /// `a.bin` 3 MiB, `b.bin` 9 MiB + 123, `c.txt` 11 bytes, `d.bin` 2 MiB (never read).
    fn start() -> Job {
        let files = vec![
            ("a.bin", pattern(1, 3 << 20)),
            ("b.bin", pattern(2, (9 << 20) + 123)),
            ("c.txt", b"hello world".to_vec()),
            ("d.bin", pattern(4, 2 << 20)),
        ];
        let moto = Moto::start();
        moto.create_bucket("cas");
        let work = tempfile::tempdir().unwrap();
        let manifest = work.path().join("m.manifest");
        let s3 = config(&moto.endpoint(), "cas", "root", "k", "s");
        let listed: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, &d[..])).collect();
        std::fs::write(&manifest, upload_job(&s3, &listed)).unwrap();
        Job {
            endpoint: moto.endpoint(),
            moto,
            work,
            manifest,
            files,
        }
    }

    fn content(&self, name: &str) -> &[u8] {
        &self.files.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn size(&self, name: &str) -> u64 {
        self.content(name).len() as u64
    }

    /// `Traces/{manifest-id}/`: where `--share-traces` keeps this manifest's traces.
    fn shared_prefix(&self) -> String {
        format!(
            "Traces/{}/",
            manifest_id(&std::fs::read(&self.manifest).unwrap())
        )
    }

    /// The keys under `root/{shared_prefix}`, listed by an unsigned request (moto takes any).
    fn shared_keys(&self) -> Vec<String> {
        let path = format!(
            "/cas?list-type=2&prefix=root/{}",
            self.shared_prefix().replace('/', "%2F")
        );
        let (status, body) = raw_request(self.moto.port, "GET", &path, b"").unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let body = String::from_utf8(body).unwrap();
        body.split("<Key>")
            .skip(1)
            .map(|rest| rest.split("</Key>").next().unwrap().to_string())
            .collect()
    }

    /// The bytes of object `key` (a full key, as listed), read with a signed GET (moto keeps
    /// objects private to anonymous requests).
    fn shared_object(&self, key: &str) -> Vec<u8> {
        let key = key.strip_prefix("root/").unwrap().to_string();
        let target = S3Target::start(&config(&self.endpoint, "cas", "root", "k", "s")).unwrap();
        let listed = (target.on_own_thread(|store| async move {
            let prefix = key.rsplit_once('/').unwrap().0.to_string() + "/";
            let objects = store.list_objects(&prefix, 1000).await.unwrap();
            let size = objects.iter().find(|o| o.key == key).unwrap().size;
            store.get_object(&key, size).await
        }))
        .unwrap();
        listed.unwrap()
    }

    fn trace_path(&self, cache: &Path) -> PathBuf {
        trace_path(cache, &std::fs::read(&self.manifest).unwrap())
    }

    /// A fresh cache directory with nothing in it.
    fn cache(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Mounts the job with `--cache-dir cache --stats --part-size 1M` and `extra` flags.
    fn mount(&self, cache: &Path, extra: &[&str]) -> Mount {
        let mut flags = vec![
            "--cache-dir",
            cache.to_str().unwrap(),
            "--stats",
            "--part-size",
            "1M",
        ];
        flags.extend_from_slice(extra);
        let store = ["--s3", "s3://cas/root", "--endpoint-url", &self.endpoint];
        let mnt = self.work.path().join(format!(
            "mnt-{}",
            cache.file_name().unwrap().to_str().unwrap()
        ));
        Mount::start_with_store(
            &self.manifest,
            &store,
            &ENV,
            &mnt,
            MountOptions::with(&flags),
        )
    }

    /// Reads `names` through `mount` in that order, checking every byte.
    fn read(&self, mount: &Mount, names: &[&str]) {
        for name in names {
            let bytes = read_all(&mount.dir.join(name)).unwrap();
            assert!(bytes == self.content(name), "{name}: wrong bytes");
        }
    }

    /// Records a trace: a mount with an empty cache reads `names` in order and unmounts.
    /// Returns the trace file's bytes.
    fn record(&self, names: &[&str]) -> Vec<u8> {
        let cache = self.cache("recorder");
        let mut mount = self.mount(&cache, &[]);
        self.read(&mount, names);
        let status = mount.stop();
        assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
        let trace = std::fs::read(self.trace_path(&cache)).unwrap_or_else(|e| {
            panic!("no trace written ({e}):\n{}", mount.stderr());
        });
        std::fs::remove_dir_all(&cache).unwrap();
        trace
    }

    /// A fresh cache directory holding only `trace` as this manifest's trace.
    fn cache_with_trace(&self, name: &str, trace: &[u8]) -> PathBuf {
        let cache = self.cache(name);
        let path = self.trace_path(&cache);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, trace).unwrap();
        cache
    }
}

fn total(mount: &mut Mount, label: &str, name: &str) -> u64 {
    let stats = mount
        .stats(label)
        .unwrap_or_else(|| panic!("no {label} stats line:\n{}", mount.stderr()));
    stats["total"][name].as_u64().unwrap()
}

/// Waits (up to 30 s) until the `--stats` lines show `prefetched_bytes` at `want`, and the
/// counters at rest (two equal lines: nothing in flight).
fn wait_for_prefetch(mount: &mut Mount, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if mount.stats("interval").is_some() && total(mount, "interval", "prefetched_bytes") == want
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "prefetched_bytes never reached {want}: {:?}\n{}",
            mount.stats("interval"),
            mount.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Log lines at WARN or ERROR.
fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        // fuser's line for a late reply to a request the kernel dropped while unmounting (a
        // RELEASE racing the stop): ENOENT from /dev/fuse, nothing lost, not this test's subject.
        .filter(|line| !line.contains("Failed to send FUSE reply: No such file or directory"))
        .collect()
}

#[test]
fn a_trace_from_one_mount_makes_another_prefetch_what_it_read() {
    let job = Job::start();
    let order = ["b.bin", "c.txt", "a.bin"];
    let trace = job.record(&order);
    // The trace names the objects in the order they were first read.
    let text = String::from_utf8(trace.clone()).unwrap();
    let at = |name: &str| text.find(&Hash::of(job.content(name)).to_string()).unwrap();
    assert!(
        at("b.bin") < at("c.txt") && at("c.txt") < at("a.bin"),
        "{text}"
    );
    assert!(!text.contains(&Hash::of(job.content("d.bin")).to_string()));

    // Another node: the same trace, an empty data cache.
    let cache = job.cache_with_trace("node2", &trace);
    let mut mount = job.mount(&cache, &[]);
    let traced: u64 = order.iter().map(|n| job.size(n)).sum();
    wait_for_prefetch(&mut mount, traced);
    // The objects were fetched from S3 before anything read them.
    let fetched_before = total(&mut mount, "interval", "bytes_fetched");
    assert!(fetched_before >= traced, "{fetched_before} < {traced}");
    assert_eq!(total(&mut mount, "interval", "reads"), 0);
    job.read(&mount, &order);
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
    assert_eq!(
        total(&mut mount, "final", "bytes_fetched"),
        fetched_before,
        "reads of prefetched files went to S3"
    );
    assert_eq!(total(&mut mount, "final", "prefetch_hit_bytes"), traced);
    assert_eq!(total(&mut mount, "final", "prefetch_wasted_bytes"), 0);
    let log = mount.stderr();
    assert!(complaints(&log).is_empty(), "{log}");
    assert!(
        log.contains("prefetch: 3 objects"),
        "no prefetch plan line: {log}"
    );
}

#[test]
fn prefetch_off_fetches_nothing_ahead_and_unread_prefetches_count_as_wasted() {
    let job = Job::start();
    let trace = job.record(&["c.txt", "a.bin"]);

    let cache = job.cache_with_trace("off", &trace);
    let mut mount = job.mount(&cache, &["--prefetch", "off"]);
    // Give a prefetch time to show, if there were one.
    std::thread::sleep(Duration::from_secs(2));
    job.read(&mount, &["c.txt"]);
    mount.stop();
    assert_eq!(total(&mut mount, "final", "prefetched_bytes"), 0);
    assert_eq!(
        total(&mut mount, "final", "bytes_fetched"),
        job.size("c.txt")
    );

    // Prefetched and never read: wasted.
    let cache = job.cache_with_trace("unread", &trace);
    let mut mount = job.mount(&cache, &[]);
    let traced = job.size("c.txt") + job.size("a.bin");
    wait_for_prefetch(&mut mount, traced);
    mount.stop();
    assert_eq!(total(&mut mount, "final", "prefetch_hit_bytes"), 0);
    assert_eq!(total(&mut mount, "final", "prefetch_wasted_bytes"), traced);
}

#[test]
fn a_trace_larger_than_the_cache_prefetches_the_part_that_fits() {
    let job = Job::start();
    let trace = job.record(&["c.txt", "a.bin", "b.bin"]);
    // 5 MiB holds c.txt and a.bin, not b.bin after them.
    let cache = job.cache_with_trace("small", &trace);
    let mut mount = job.mount(&cache, &["--cache-size", "5M"]);
    let fits = job.size("c.txt") + job.size("a.bin");
    wait_for_prefetch(&mut mount, fits);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(total(&mut mount, "interval", "prefetched_bytes"), fits);
    job.read(&mount, &["c.txt", "a.bin", "b.bin"]);
    mount.stop();
    assert_eq!(total(&mut mount, "final", "prefetch_hit_bytes"), fits);
    let log = mount.stderr();
    assert!(log.contains("1 more objects do not fit"), "{log}");
    assert!(complaints(&log).is_empty(), "{log}");
}

#[test]
fn broken_traces_cost_one_log_line_and_foreign_entries_are_skipped() {
    let job = Job::start();
    let trace = job.record(&["c.txt", "a.bin"]);

    // Truncated (a copy cut short) and garbage: ignored with one warning, reads still work,
    // and the mount writes a good trace in their place.
    for (name, bytes) in [
        ("truncated", trace[..trace.len() / 2].to_vec()),
        ("garbage", pattern(9, 4096)),
    ] {
        let cache = job.cache_with_trace(name, &bytes);
        let mut mount = job.mount(&cache, &[]);
        job.read(&mount, &["c.txt"]);
        let status = mount.stop();
        assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
        assert_eq!(total(&mut mount, "final", "prefetched_bytes"), 0);
        let log = mount.stderr();
        let complaints = complaints(&log);
        assert_eq!(complaints.len(), 1, "{name}: {log}");
        assert!(complaints[0].contains("ignored"), "{name}: {log}");
        let rewritten = std::fs::read_to_string(job.trace_path(&cache)).unwrap();
        assert!(rewritten.contains(&Hash::of(job.content("c.txt")).to_string()));
    }

    // Entries naming objects this manifest does not have are skipped, the rest prefetched.
    let text = String::from_utf8(trace).unwrap();
    let foreign = format!(
        "\n[\"{}\",4096,[[0,4096]]],",
        Hash::of(b"not in the manifest")
    );
    let with_foreign = text.replacen('\n', &foreign, 1);
    let cache = job.cache_with_trace("foreign", with_foreign.as_bytes());
    let mut mount = job.mount(&cache, &[]);
    let traced = job.size("c.txt") + job.size("a.bin");
    wait_for_prefetch(&mut mount, traced);
    job.read(&mount, &["a.bin"]);
    mount.stop();
    let log = mount.stderr();
    assert!(log.contains("1 trace entries name no object"), "{log}");
    assert!(complaints(&log).is_empty(), "{log}");
    assert_eq!(
        total(&mut mount, "final", "prefetch_hit_bytes"),
        job.size("a.bin")
    );
}

/// The order of `names`' objects in `trace`.
fn order_in(job: &Job, trace: &Trace, names: &[&str]) -> Vec<usize> {
    names
        .iter()
        .map(|name| {
            let hash = Hash::of(job.content(name));
            (trace.entries().iter())
                .position(|entry| entry.hash == hash)
                .unwrap_or_else(|| panic!("{name} not in the trace"))
        })
        .collect()
}

#[test]
fn a_trace_shared_through_the_bucket_makes_another_node_prefetch_and_garbage_is_skipped() {
    let job = Job::start();
    let order = ["b.bin", "c.txt", "a.bin"];
    let cache = job.cache("node1");
    let mut mount = job.mount(&cache, &["--share-traces"]);
    job.read(&mount, &order);
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
    let log = mount.stderr();
    assert!(complaints(&log).is_empty(), "{log}");

    // One object under the prefix, holding what node1 read, in order, and nothing else.
    let keys = job.shared_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(".json"), "{keys:?}");
    let shared = Trace::decode(&job.shared_object(&keys[0])).unwrap();
    assert_eq!(shared.len(), 3);
    assert_eq!(order_in(&job, &shared, &order), vec![0, 1, 2]);

    // A garbage object that sorts first (newest) under the same prefix.
    let s3 = config(&job.endpoint, "cas", "root", "k", "s");
    let garbage = format!("{}0000000000000-garbage.json", job.shared_prefix());
    upload(&s3, vec![(garbage, pattern(7, 3000))]);

    // Node 2: an empty cache, no local trace; the bucket's trace drives prefetch.
    let cache = job.cache("node2");
    let mut mount = job.mount(&cache, &["--share-traces"]);
    let traced: u64 = order.iter().map(|n| job.size(n)).sum();
    wait_for_prefetch(&mut mount, traced);
    assert_eq!(total(&mut mount, "interval", "reads"), 0);
    let fetched_before = total(&mut mount, "interval", "bytes_fetched");
    job.read(&mount, &order);
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{}", mount.stderr());
    assert_eq!(total(&mut mount, "final", "bytes_fetched"), fetched_before);
    assert_eq!(total(&mut mount, "final", "prefetch_hit_bytes"), traced);
    let log = mount.stderr();
    assert!(log.contains("prefetch: 3 objects"), "{log}");
    assert!(log.contains("and 1 shared traces"), "{log}");
    let complaints = complaints(&log);
    assert_eq!(complaints.len(), 1, "{log}");
    assert!(
        complaints[0].contains("garbage.json ignored"),
        "{complaints:?}"
    );
    // Node 2 added its own object next to node 1's (and the garbage).
    assert_eq!(job.shared_keys().len(), 3, "{:?}", job.shared_keys());
}

#[test]
fn share_traces_is_refused_without_an_s3_store_or_a_cache_dir() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let manifest = work.path().join("m.manifest");
    std::fs::write(&manifest, "{}").unwrap();
    let cases: [(&[&str], &str); 2] = [
        (
            &["--cas", "/nonexistent", "--cache-dir", "/tmp"],
            "needs an S3 store",
        ),
        (&["--s3", "s3://cas/root"], "needs --cache-dir"),
    ];
    for (flags, expected) in cases {
        let output = std::process::Command::new(BIN)
            .arg(&manifest)
            .arg(&mnt)
            .args(flags)
            .arg("--share-traces")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

/// On SeaweedFS (a Go server checking signatures): a trace shared by one mount makes another
/// prefetch; and credentials that may read objects but not list or write still mount, serve
/// and unmount cleanly, each refused request costing one warning.
#[test]
fn shared_traces_on_seaweedfs_and_credentials_that_cannot_list_or_write_them() {
    let seaweed = Seaweed::start();
    let endpoint = seaweed.endpoint();
    create_bucket_signed(&endpoint, "cas", SEAWEED_KEY, SEAWEED_SECRET);
    let work = tempfile::tempdir().unwrap();
    let content = pattern(5, (1 << 20) + 17);
    let s3 = config(&endpoint, "cas", "root", SEAWEED_KEY, SEAWEED_SECRET);
    let manifest = work.path().join("m.manifest");
    std::fs::write(&manifest, upload_job(&s3, &[("x.bin", &content)])).unwrap();
    let env = |key, secret| {
        [
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_REGION", "us-east-1"),
        ]
    };
    let mount = |name: &str, env: &[(&str, &str)]| {
        let cache = work.path().join(name);
        std::fs::create_dir_all(&cache).unwrap();
        let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
        let flags = [
            "--cache-dir",
            cache.to_str().unwrap(),
            "--share-traces",
            "--stats",
            "--part-size",
            "1M",
        ];
        let mount = Mount::start_with_store(
            &manifest,
            &store,
            env,
            &work.path().join(format!("mnt-{name}")),
            MountOptions::with(&flags),
        );
        (mount, cache)
    };

    // Writes its trace to the bucket.
    let (mut first, _) = mount("first", &env(SEAWEED_KEY, SEAWEED_SECRET));
    assert!(read_all(&first.dir.join("x.bin")).unwrap() == content);
    let status = first.stop();
    let log = first.stderr();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(complaints(&log).is_empty(), "{log}");

    // May neither list nor write: serves all the same.
    let (mut reader, cache) = mount("reader", &env(SEAWEED_READ_KEY, SEAWEED_READ_SECRET));
    assert!(read_all(&reader.dir.join("x.bin")).unwrap() == content);
    let status = reader.stop();
    let log = reader.stderr();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains("shared traces not read"), "{log}");
    assert!(log.contains("not uploaded"), "{log}");
    // The probe's listing warning, the trace listing, the upload: nothing more.
    assert_eq!(complaints(&log).len(), 3, "{log}");
    assert_eq!(total(&mut reader, "final", "prefetched_bytes"), 0);
    // The local trace is written all the same.
    let local = trace_path(&cache, &std::fs::read(&manifest).unwrap());
    assert!(local.exists(), "{log}");

    // Another node with full rights and an empty cache prefetches what the first one read.
    let (mut third, _) = mount("third", &env(SEAWEED_KEY, SEAWEED_SECRET));
    wait_for_prefetch(&mut third, content.len() as u64);
    assert!(read_all(&third.dir.join("x.bin")).unwrap() == content);
    let status = third.stop();
    let log = third.stderr();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(complaints(&log).is_empty(), "{log}");
    assert_eq!(
        total(&mut third, "final", "prefetch_hit_bytes"),
        content.len() as u64
    );
}
