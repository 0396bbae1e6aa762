//! Scaling over cores (issue 12): for each `--shards N` (default 1 2 4 8 16), N readers each read
//! their own file with 1 MiB O_DIRECT reads, through
//! - a do-nothing FUSE server with N threads (the transport ceiling, in this process),
//! - mount_vfs on a local CAS (`--cas`), cold (page cache dropped, fresh mount) then warm (the
//!   same reads again, from the shards' pools),
//! - mount_vfs on S3 (`--s3`, an in-process s3s server on 127.0.0.1 holding the objects in
//!   memory), cold then warm.
//!
//! Every file is owned by a different shard (the files are named so that the inode each gets
//! maps to a shard no other reader's file maps to; checked after mounting). Every reader's bytes
//! are hashed after the clock stops and checked. Also measured once: xxh3-128 and memcpy on one
//! core (the per-GiB costs docs/scaling.md models with).
//!
//! Prints one table and writes `scaling.json` / `scaling.svg` (and `scaling_costs.*`) under
//! `BENCH_RESULTS_DIR`. Run it from a built executable alone with benches/scaling.sh; options
//! via environment: `BENCH_SHARDS` (default "1 2 4 8 16"), `BENCH_SIZE_MIB` per reader (default
//! 512), `BENCH_RUNS` (default 3), `BENCH_DIR` (the local CAS; default
//! /var/tmp/mount_vfs_scaling), `BENCH_SERVER_THREADS` (the S3 server's threads; default half
//! the CPUs, at least 2), `MOUNT_VFS_BIN`, `BENCH_RESULTS_DIR`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Instant;

mod common;

#[allow(dead_code)]
#[path = "s3_read/clients.rs"]
mod clients;
#[allow(dead_code)]
#[path = "s3_read/mounts.rs"]
mod mounts;
#[allow(dead_code)]
#[path = "s3_read/readers.rs"]
mod readers;
#[allow(dead_code)]
#[path = "s3_read/server.rs"]
mod server;

use common::chart::{BarChart, LineChart};
use common::{drop_caches, env_usize, fill, Daemon};
use server::Server;

const MIB: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

/// The readers' files: names, contents' digests, and one tree and manifest per shard count.
struct Data {
    digests: Vec<u128>,
    /// By shard count: the manifest, and the names (in reader order) of the files it serves.
    manifests: BTreeMap<usize, (PathBuf, Vec<String>)>,
    cas: PathBuf,
}

/// File `i`'s bytes.
fn content(i: usize, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    fill(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1), &mut data);
    data
}

impl Data {
    /// Writes the readers' files once under `base/data`, and for each shard count a tree of
    /// hard links to them, padded with empty files so that each reader's file gets an inode
    /// (2 + its index in the sorted flat directory) that a different shard owns; snapshots each
    /// tree into one CAS (objects are shared).
    fn create(base: &Path, counts: &[usize], size: usize) -> Data {
        let max = *counts.iter().max().unwrap();
        let data_dir = base.join("data");
        fs::create_dir_all(&data_dir).unwrap();
        let mut digests = Vec::new();
        for i in 0..max {
            let bytes = content(i, size);
            digests.push(xxhash_rust::xxh3::xxh3_128(&bytes));
            fs::write(data_dir.join(format!("{i:02}")), &bytes).unwrap();
        }
        let cas = base.join("cas");
        let mut manifests = BTreeMap::new();
        for &n in counts {
            let tree = base.join(format!("tree{n}"));
            let _ = fs::remove_dir_all(&tree);
            fs::create_dir_all(&tree).unwrap();
            let mut taken = vec![false; n];
            let mut names = Vec::new();
            let mut index = 0usize;
            while names.len() < n {
                let shard = mount_vfs::namespace::owner(2 + index as u64, n);
                // Names sort in creation order: "e00000" for entry 0, and so on.
                if taken[shard] {
                    fs::write(tree.join(format!("e{index:05}.pad")), b"").unwrap();
                } else {
                    taken[shard] = true;
                    let name = format!("e{index:05}.bin");
                    fs::hard_link(
                        data_dir.join(format!("{:02}", names.len())),
                        tree.join(&name),
                    )
                    .unwrap();
                    names.push(name);
                }
                index += 1;
            }
            let manifest = base.join(format!("shards{n}.manifest"));
            common::snapshot(&tree, &cas, &manifest, "2023-03-03");
            fs::remove_dir_all(&tree).unwrap();
            manifests.insert(n, (manifest, names));
        }
        fs::remove_dir_all(&data_dir).unwrap();
        Data {
            digests,
            manifests,
            cas,
        }
    }
}

/// This thread's CPU seconds so far.
fn thread_cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One reader's timed read of `path` whole, 1 MiB O_DIRECT reads into a pre-faulted buffer:
/// when its first read started and its last ended, its bytes, its thread's CPU seconds in
/// between (the syscalls: what a reader's core spends), and the bytes' xxh3-128 (hashed after).
fn timed_read(path: &Path) -> (Instant, Instant, u64, f64, u128) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = file.metadata().unwrap().len() as usize;
    let capacity = len.next_multiple_of(MIB).max(MIB);
    let layout = std::alloc::Layout::from_size_align(capacity, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null(), "out of memory for a {capacity}-byte buffer");
    // SAFETY: ptr points to `capacity` zeroed bytes that this thread owns.
    let buffer = unsafe { std::slice::from_raw_parts_mut(ptr, capacity) };
    for page in buffer.chunks_mut(4096) {
        page[0] = 1;
    }
    let (cpu0, started) = (thread_cpu_now(), Instant::now());
    let mut total = 0usize;
    while total < len {
        let n = file
            .read_at(&mut buffer[total..total + MIB], total as u64)
            .unwrap_or_else(|e| panic!("read {} at {total}: {e}", path.display()));
        assert!(n > 0, "{}: EOF at {total} of {len}", path.display());
        total += n;
    }
    let (done, cpu) = (Instant::now(), thread_cpu_now() - cpu0);
    let digest = xxhash_rust::xxh3::xxh3_128(&buffer[..total]);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    (started, done, total as u64, cpu, digest)
}

/// N readers in parallel, reader `i` reading `dir/names[i]` whole ([`timed_read`]); the
/// aggregate bytes per second from the first reader's first read to the last reader's last,
/// and the readers' CPU seconds. With `digests`, reader `i`'s bytes must hash to `digests[i]`;
/// the do-nothing server's bytes are one static buffer and are not checked.
fn read_all(dir: &Path, names: &[String], digests: Option<&[u128]>) -> (f64, f64) {
    let barrier = Arc::new(Barrier::new(names.len()));
    let threads: Vec<_> = names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                timed_read(&path)
            })
        })
        .collect();
    let (mut bytes, mut cpu) = (0, 0.0);
    let mut span: Option<(Instant, Instant)> = None;
    for (i, t) in threads.into_iter().enumerate() {
        let (started, done, len, secs, digest) = t.join().expect("reader panicked");
        if let Some(digests) = digests {
            assert_eq!(digest, digests[i], "{} returned wrong bytes", names[i]);
        }
        bytes += len;
        cpu += secs;
        span = Some(span.map_or((started, done), |(s, d)| (s.min(started), d.max(done))));
    }
    let (started, done) = span.expect("at least one reader");
    (bytes as f64 / (done - started).as_secs_f64(), cpu)
}

/// Each reader's file on a different shard? (its inode, as the mount reports it, mapped
/// through the daemon's owner function). The number of distinct shards.
fn shards_owning(dir: &Path, names: &[String], shards: usize) -> usize {
    use std::os::unix::fs::MetadataExt;
    let owners: std::collections::BTreeSet<usize> = names
        .iter()
        .map(|n| mount_vfs::namespace::owner(fs::metadata(dir.join(n)).unwrap().ino(), shards))
        .collect();
    owners.len()
}

/// One configuration's samples: rates (bytes/s), and per GiB read: CPU seconds of the daemon's
/// shard threads (`shard-N`), its FUSE threads (`fuser-N`: the front) and its other threads, of
/// this process's S3 server threads, of the readers (their syscalls), and the READ requests the
/// daemon received. In the do-nothing server's rows, "front" is its FUSE threads (this process's
/// live threads less the S3 server's).
#[derive(Default)]
struct Samples {
    rates: Vec<f64>,
    shard_cpu: Vec<f64>,
    front_cpu: Vec<f64>,
    other_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
    reader_cpu: Vec<f64>,
    reads: Vec<f64>,
}

/// CPU seconds so far, by who spends them: [daemon shards, daemon FUSE threads, daemon other
/// threads, this process's S3 server, the rest of this process]. The daemon's are zero without
/// one.
fn cpu_split(daemon: Option<u32>) -> [f64; 5] {
    let mut split = [0.0; 5];
    for (name, secs) in daemon.map(common::thread_cpu).unwrap_or_default() {
        let at = if name.starts_with("shard-") {
            0
        } else if name.starts_with("fuser") {
            1
        } else {
            2
        };
        split[at] += secs;
    }
    for (name, secs) in common::thread_cpu(std::process::id()) {
        split[if name.starts_with("s3bench-server") {
            3
        } else {
            4
        }] += secs;
    }
    split
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    common::median(v.to_vec())
}

/// Where the data comes from for a mount_vfs row.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Store {
    Cas,
    S3,
}

/// What every mount_vfs mount of the run shares.
struct Target<'a> {
    cas: &'a Path,
    mnt: &'a Path,
    /// `--memory-limit` is this times the shards.
    per_shard_mib: usize,
    /// The S3 server's URL.
    endpoint: &'a str,
}

/// Mounts `manifest` with `shards` shards, from the CAS or the S3 server, with its metrics on
/// `metrics_port` (READ requests are counted from them; on or off costs the same, see
/// mount_read's metrics rows).
fn mount(
    target: &Target,
    store: Store,
    manifest: &Path,
    shards: usize,
    metrics_port: u16,
) -> Daemon {
    let Target {
        cas,
        mnt,
        per_shard_mib,
        endpoint,
    } = *target;
    let mut command = Command::new(common::bin());
    command.arg(manifest).arg(mnt).args([
        "--shards",
        &shards.to_string(),
        "--memory-limit",
        &format!("{}M", shards * per_shard_mib),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    match store {
        Store::Cas => {
            command.arg("--cas").arg(cas);
        }
        Store::S3 => mounts::bench_s3_store(&mut command, endpoint),
    }
    Daemon::start(command, mnt, &mnt.with_extension("log")).unwrap_or_else(|e| panic!("{e}"))
}

/// Single-core rates (bytes/s) of xxh3-128 (the implementation mount_vfs verifies with) and of
/// memcpy over a 256 MiB buffer, best of 5: what verifying and copying a GiB cost one core.
fn one_core_costs() -> (f64, f64) {
    let len = 256 * MIB;
    let mut src = vec![0u8; len];
    fill(7, &mut src);
    let mut dst = vec![1u8; len];
    let mut hash = 0.0f64;
    let mut copy = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(mount_vfs::manifest::Hash::of(std::hint::black_box(&src)));
        hash = hash.max(len as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        copy = copy.max(len as f64 / t.elapsed().as_secs_f64());
    }
    (hash, copy)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let counts: Vec<usize> = std::env::var("BENCH_SHARDS")
        .unwrap_or_else(|_| "1 2 4 8 16".into())
        .split_whitespace()
        .map(|v| {
            v.parse()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("BENCH_SHARDS: {v:?} is not a shard count"))
        })
        .collect();
    assert!(!counts.is_empty(), "BENCH_SHARDS names no shard count");
    let size_mib = env_usize("BENCH_SIZE_MIB", 512);
    let size = size_mib * MIB;
    let runs = env_usize("BENCH_RUNS", 3);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server_threads = env_usize("BENCH_SERVER_THREADS", (cpus / 2).max(2));
    // A pool that keeps a reader's whole file warm (3/4 of a pool is cache), within the 1 GiB a
    // shard's registered pool may have.
    let per_shard_mib = (size_mib * 2).clamp(256, 1024);
    if size_mib * 4 > per_shard_mib * 3 {
        println!(
            "# note: {size_mib} MiB files do not fit a shard's cache: warm rows re-read the store"
        );
    }
    let base = std::env::var_os("BENCH_DIR").map_or_else(
        || PathBuf::from("/var/tmp/mount_vfs_scaling"),
        PathBuf::from,
    );
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();

    let setup = Instant::now();
    let data = Data::create(&base, &counts, size);
    let server = Server::start_with_threads(server_threads);
    let endpoint = server.endpoint();
    clients::create_bucket(&endpoint);
    clients::upload(&endpoint, "root", clients::cas_objects(&data.cas));
    let (hash_rate, copy_rate) = one_core_costs();
    println!(
        "# scaling: N readers x {size_mib} MiB, 1 MiB O_DIRECT reads, --shards N --memory-limit N x {per_shard_mib}M, {runs} runs, setup {:.1}s",
        setup.elapsed().as_secs_f64()
    );
    println!("# machine: {}", common::machine());
    println!(
        "# one core: xxh3-128 {:.2} GB/s, memcpy {:.2} GB/s; S3 server: in-process s3s on {server_threads} tokio threads",
        hash_rate / 1e9,
        copy_rate / 1e9
    );

    let mnt = base.join("mnt");
    let target = Target {
        cas: &data.cas,
        mnt: &mnt,
        per_shard_mib,
        endpoint: &endpoint,
    };
    // (row, shards) -> samples; rows: "null FUSE", "local CAS cold", ..., "S3 warm".
    let mut rows: BTreeMap<(&'static str, usize), Samples> = BTreeMap::new();
    let mut owning: BTreeMap<usize, usize> = BTreeMap::new();
    for run in 0..runs {
        for &n in &counts {
            eprintln!("# run {}/{runs}, --shards {n}", run + 1);
            let (manifest, names) = &data.manifests[&n];
            let names_static: Vec<&'static str> = names
                .iter()
                .map(|n| &*Box::leak(n.clone().into_boxed_str()))
                .collect();
            let null_mnt = base.join("null_mnt");
            let null = common::mount_null_threads(&null_mnt, size as u64, &names_static, n);
            let gib = (n * size) as f64 / GIB;
            let before = cpu_split(None);
            let (rate, readers_cpu) = read_all(&null_mnt, names, None);
            let after = cpu_split(None);
            drop(null);
            let samples = rows.entry(("null FUSE (ceiling)", n)).or_default();
            samples.rates.push(rate);
            samples.front_cpu.push((after[4] - before[4]) / gib);
            samples.reader_cpu.push(readers_cpu / gib);
            for store in [Store::Cas, Store::S3] {
                drop_caches();
                let port = common::free_port();
                let daemon = mount(&target, store, manifest, n, port);
                owning.insert(n, shards_owning(&mnt, names, n));
                let label = |warm: bool| match (store, warm) {
                    (Store::Cas, false) => "local CAS cold",
                    (Store::Cas, true) => "local CAS warm",
                    (Store::S3, false) => "S3 cold",
                    (Store::S3, true) => "S3 warm",
                };
                let reads = || {
                    let body = common::scrape_metrics(port).unwrap_or_else(|e| panic!("{e}"));
                    common::metric_sum(&body, "mount_vfs_requests_total{op=\"read\"")
                };
                for warm in [false, true] {
                    let pid = daemon.child.id();
                    let (r0, c0) = (reads(), cpu_split(Some(pid)));
                    let (rate, readers_cpu) = read_all(&mnt, names, Some(&data.digests));
                    let (r1, c1) = (reads(), cpu_split(Some(pid)));
                    let samples = rows.entry((label(warm), n)).or_default();
                    samples.rates.push(rate);
                    samples.shard_cpu.push((c1[0] - c0[0]) / gib);
                    samples.front_cpu.push((c1[1] - c0[1]) / gib);
                    samples.other_cpu.push((c1[2] - c0[2]) / gib);
                    samples.server_cpu.push((c1[3] - c0[3]) / gib);
                    samples.reader_cpu.push(readers_cpu / gib);
                    samples.reads.push((r1 - r0) / gib);
                }
                drop(daemon);
            }
        }
    }
    drop(server);

    let kinds = [
        "null FUSE (ceiling)",
        "local CAS cold",
        "local CAS warm",
        "S3 cold",
        "S3 warm",
    ];
    println!();
    print!("{:<7} {:<8} {:<13}", "shards", "readers", "files' shards");
    for kind in kinds {
        print!(" {kind:>20}");
    }
    println!();
    let mut chart = LineChart::new(
        "scaling",
        &format!("Scaling: --shards N, N readers x {size_mib} MiB, 1 MiB O_DIRECT reads"),
        "shards = readers",
        "GB/s (median)",
    );
    for &n in &counts {
        print!("{n:<7} {n:<8} {:<13}", format!("{}/{n}", owning[&n]));
        for kind in kinds {
            let m = median(&rows[&(kind, n)].rates);
            chart.point(kind, n as f64, m / 1e9);
            let one = median(&rows[&(kind, counts[0])].rates);
            print!(" {:>20}", format!("{:.2} GB/s {:.2}x", m / 1e9, m / one));
        }
        println!();
    }
    println!("# ratios: over the same row at --shards {}", counts[0]);
    println!();
    println!(
        "# per GiB read (medians), CPU seconds: the daemon's shard threads, its FUSE threads \
         (front; for the do-nothing server, its own FUSE threads), its other threads, the S3 \
         server, the readers (their threads, from the first read to the last); READ requests"
    );
    println!(
        "{:<20} {:<6} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
        "row", "shards", "shard", "front", "other", "server", "readers", "READs/GiB"
    );
    // "-" where a row has no such part (the do-nothing server has no daemon).
    let cell = |v: &[f64], width: usize, digits: usize| {
        if v.is_empty() {
            format!("{:>width$}", "-")
        } else {
            format!("{:>width$.digits$}", median(v))
        }
    };
    let json = |v: &[f64]| {
        if v.is_empty() {
            "null".to_string()
        } else {
            format!("{:.4}", median(v))
        }
    };
    for (&(kind, n), samples) in &rows {
        println!(
            "{kind:<20} {n:<6} {} {} {} {} {} {}",
            cell(&samples.shard_cpu, 8, 3),
            cell(&samples.front_cpu, 8, 3),
            cell(&samples.other_cpu, 8, 3),
            cell(&samples.server_cpu, 9, 3),
            cell(&samples.reader_cpu, 9, 3),
            cell(&samples.reads, 10, 0),
        );
    }
    for (&(kind, n), samples) in &rows {
        let runs_gbps: Vec<String> = samples
            .rates
            .iter()
            .map(|r| format!("{:.4}", r / 1e9))
            .collect();
        println!(
            "json: {{\"row\":\"{kind}\",\"shards\":{n},\"gbps\":{:.4},\"runs_gbps\":[{}],\"shard_cpu_s_per_gib\":{},\"front_cpu_s_per_gib\":{},\"other_cpu_s_per_gib\":{},\"server_cpu_s_per_gib\":{},\"reader_cpu_s_per_gib\":{},\"reads_per_gib\":{}}}",
            median(&samples.rates) / 1e9,
            runs_gbps.join(","),
            json(&samples.shard_cpu),
            json(&samples.front_cpu),
            json(&samples.other_cpu),
            json(&samples.server_cpu),
            json(&samples.reader_cpu),
            json(&samples.reads),
        );
    }
    chart.write();
    let mut costs = BarChart::new(
        "scaling_costs",
        "One core: hashing (xxh3-128) and copying (memcpy) 256 MiB, best of 5",
        "GB/s",
    );
    costs.bar("memcpy", &[copy_rate / 1e9]);
    costs.bar_vs("xxh3-128", &[hash_rate / 1e9], "memcpy");
    costs.write();
    let _ = fs::remove_dir_all(&base);
}
