//! Traces and `--prefetch` over S3 (moto on 127.0.0.1): a mount with `--cache-dir` records the
//! order its readers read objects in `DIR/Traces/{manifest-id}`; a later mount that finds that
//! trace (a fresh cache with only the trace copied in, as another node of the job would have it)
//! fetches those objects before they are read, and serves them byte-exact as prefetch hits.
//! Broken traces cost one log line, never an error storm or a failed mount.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::s3_servers::{config, upload_job, Moto, MOUNT_ENV as ENV};
use common::{pattern, read_all, Mount, MountOptions};
use mount_vfs::manifest::Hash;
use mount_vfs::trace::trace_path;

/// A moto server holding the job's files, and the manifest listing them.
struct Job {
    _moto: Moto,
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
            _moto: moto,
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
