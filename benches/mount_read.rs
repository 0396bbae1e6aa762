//! Sequential read throughput through a real mount, beside its baselines in the same run.
//!
//! Baselines: the same bytes from tmpfs, and a do-nothing FUSE server (in this process) that
//! answers every READ from one static buffer: the transport ceiling no FUSE filesystem can beat.
//! mount_vfs is measured cold (pool empty, objects read from the CAS directory with O_DIRECT and
//! verified) and warm (served from the shard's buffer pool), and with one vs two shards for two
//! readers. Also the daemon's minor page faults and CPU seconds per GiB served.
//!
//! A/B: with `BENCH_BASELINE_BIN=/path/to/older/mount_vfs`, every mount_vfs row is measured
//! again with that binary, right after this build's in every run (two readers: in every shard
//! count), as its own "(baseline)" row; this build's row then ends with `new/baseline` (median
//! over median).
//!
//! Metrics cost: warm reads with `--metrics-addr` off and on (the endpoint scraped every second
//! meanwhile), interleaved run by run, each sample at least `BENCH_METRICS_SECS` (default 3) of
//! back-to-back reads.
//!
//! Run: `cargo bench --bench mount_read` (root; needs /dev/fuse). Options via environment:
//! `BENCH_DIR` (where the CAS lives; default a directory under target/), `BENCH_SIZE_MIB`
//! (default 1024), `BENCH_RUNS` (default 3), `BENCH_METRICS_SECS`, `BENCH_BASELINE_BIN`,
//! `BENCH_RESULTS_DIR` (where `mount_read.json` and `.svg` go; default target/bench-results).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;
#[path = "mount_read/metrics_cost.rs"]
mod metrics_cost;

use common::chart::BarChart;
use common::{
    checked_read, faults_and_cpu, gbs, median, sequential_read, spread, vs_baseline, Build, Clock,
    Daemon,
};

const MIB: usize = 1 << 20;

/// Reads `path` with O_DIRECT, `depth` reads of `chunk` bytes in flight (one thread each, chunk
/// `i` on thread `i % depth`); returns bytes per second.
fn deep_read(path: &Path, depth: usize, chunk: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = file.metadata().unwrap().len() as usize;
    let file = std::sync::Arc::new(file);
    let started = Instant::now();
    let threads: Vec<_> = (0..depth)
        .map(|t| {
            let file = file.clone();
            std::thread::spawn(move || {
                let layout = std::alloc::Layout::from_size_align(chunk, 4096).unwrap();
                // SAFETY: non-zero size; freed below with the same layout.
                let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
                // SAFETY: ptr points to `chunk` zeroed bytes that this thread owns.
                let buffer = unsafe { std::slice::from_raw_parts_mut(ptr, chunk) };
                let mut total = 0usize;
                let mut offset = t * chunk;
                while offset < len {
                    total += file.read_at(buffer, offset as u64).expect("pread");
                    offset += depth * chunk;
                }
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(ptr, layout) };
                total
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, len, "short read of {}", path.display());
    total as f64 / started.elapsed().as_secs_f64()
}

/// Two readers in parallel over two files; returns aggregate bytes per second.
fn parallel_read(paths: &[PathBuf], direct: bool) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = paths
        .iter()
        .cloned()
        .map(|p| {
            std::thread::spawn(move || {
                let size = fs::metadata(&p).unwrap().len();
                (size, sequential_read(&p, direct, Clock::AfterOpen).digest)
            })
        })
        .collect();
    let results: Vec<(u64, u128)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let secs = started.elapsed().as_secs_f64();
    for ((_, digest), path) in results.iter().zip(paths) {
        let expected = xxhash_rust::xxh3::xxh3_128(&fs::read(source_of(path)).unwrap());
        assert_eq!(*digest, expected, "{} returned wrong bytes", path.display());
    }
    results.iter().map(|(size, _)| size).sum::<u64>() as f64 / secs
}

/// The tree file a mounted path serves (`.../mnt/x` -> `.../tree/x`).
fn source_of(mounted: &Path) -> PathBuf {
    let base = mounted.parent().unwrap().parent().unwrap();
    base.join("tree").join(mounted.file_name().unwrap())
}

/// Mounts the manifest with `build` (log: `mnt.log` beside the mountpoint); panics when it
/// does not mount.
fn start(
    build: Build,
    manifest: &Path,
    cas: &Path,
    mnt: &Path,
    shards: usize,
    memory: &str,
) -> Daemon {
    let mut command = Command::new(build.bin());
    command.arg(manifest).arg(mnt).arg("--cas").arg(cas).args([
        "--shards",
        &shards.to_string(),
        "--memory-limit",
        memory,
    ]);
    Daemon::start(command, mnt, &mnt.with_extension("log")).unwrap_or_else(|e| panic!("{e}"))
}

/// One build's single-reader runs through one shard: cold and warm rates, daemon faults/GiB
/// (cold, warm) and CPU s/GiB (cold, warm, the warm-up read between them).
#[derive(Default)]
struct SingleReader {
    cold: Vec<f64>,
    warm: Vec<f64>,
    faults_per_gib: Vec<(f64, f64)>,
    cpu_per_gib: Vec<(f64, f64, f64)>,
}

/// `  new/baseline 1.02x` after a row of this build when `baseline` was measured too; nothing
/// otherwise.
fn vs(build: Build, new: f64, baseline: Option<f64>) -> String {
    match (build, baseline) {
        (Build::New, Some(old)) => format!("  {}", vs_baseline(new, old)),
        _ => String::new(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let size_mib = common::env_usize("BENCH_SIZE_MIB", 1024);
    let runs = common::env_usize("BENCH_RUNS", 3);
    let builds = Build::all();
    let base = common::bench_dir("mount_read_bench");
    let size = size_mib * MIB;

    // Source tree: one big file, two half-size files for the two-reader runs, and a warm file
    // that fits one shard's pool.
    let tree = base.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    fs::write(tree.join("big.bin"), &data).unwrap();
    fs::write(tree.join("half_a.bin"), &data[..size / 2]).unwrap();
    fs::write(tree.join("half_b.bin"), &data[size / 2..]).unwrap();
    let warm_size = (size / 2).min(512 * MIB);
    fs::write(tree.join("warm.bin"), &data[..warm_size]).unwrap();
    let shm = Path::new("/dev/shm/mount_vfs_bench.bin");
    fs::write(shm, &data).unwrap();
    let whole = xxhash_rust::xxh3::xxh3_128(&data);
    let warm_digest = xxhash_rust::xxh3::xxh3_128(&data[..warm_size]);
    drop(data);
    let cas = base.join("cas");
    let manifest = base.join("bench.manifest");
    common::snapshot(&tree, &cas, &manifest, "2023-03-03");

    println!("# mount_read: {size_mib} MiB, 1 MiB reads, {runs} runs each; every read's bytes are hashed after the clock stops and checked");
    println!("# machine: {}", common::machine());

    let tmpfs: Vec<f64> = (0..runs)
        .map(|_| checked_read(shm, true, Clock::AfterOpen, whole))
        .collect();
    println!("tmpfs O_DIRECT                 {}", spread(&tmpfs));

    let null_mnt = base.join("null_mnt");
    let null = common::mount_null(&null_mnt, size as u64, &["file"]);
    // Its bytes are one static buffer: a transport ceiling, not checked content.
    let ceiling: Vec<f64> = (0..runs)
        .map(|_| sequential_read(&null_mnt.join("file"), true, Clock::AfterOpen).bytes_per_sec)
        .collect();
    println!("null FUSE O_DIRECT (ceiling)   {}", spread(&ceiling));
    let ceiling_runs = ceiling.clone();
    let ceiling = median(ceiling);
    drop(null);

    // The cold path's own ceiling: the CAS object read directly with O_DIRECT.
    let big_object = fs::read_dir(cas.join("Data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let disk: Vec<f64> = (0..runs)
        .map(|_| checked_read(&big_object, true, Clock::AfterOpen, whole))
        .collect();
    println!(
        "CAS object O_DIRECT (disk)     {}  queue depth 1",
        spread(&disk)
    );
    // At the depth the daemon reads a cold object with: 8 reads of 4 MiB (--part-size) in
    // flight. This is the cold path's ceiling; depth 1 understates the disk.
    let disk_deep: Vec<f64> = (0..runs)
        .map(|_| deep_read(&big_object, 8, 4 * MIB))
        .collect();
    println!(
        "CAS object O_DIRECT (disk)     {}  queue depth 8 x 4 MiB: the cold ceiling",
        spread(&disk_deep)
    );

    let mnt = base.join("mnt");
    let mut single: BTreeMap<Build, SingleReader> = BTreeMap::new();
    for _ in 0..runs {
        for &build in &builds {
            let samples = single.entry(build).or_default();
            let daemon = start(build, &manifest, &cas, &mnt, 1, "1G");
            let pid = daemon.child.id();
            let (f0, c0) = faults_and_cpu(pid);
            samples.cold.push(checked_read(
                &mnt.join("big.bin"),
                true,
                Clock::AfterOpen,
                whole,
            ));
            let (f1, c1) = faults_and_cpu(pid);
            checked_read(&mnt.join("warm.bin"), true, Clock::AfterOpen, warm_digest);
            let (f2, c2) = faults_and_cpu(pid);
            samples.warm.push(checked_read(
                &mnt.join("warm.bin"),
                true,
                Clock::AfterOpen,
                warm_digest,
            ));
            let (f3, c3) = faults_and_cpu(pid);
            let gib = size as f64 / (1u64 << 30) as f64;
            let warm_gib = warm_size as f64 / (1u64 << 30) as f64;
            samples
                .faults_per_gib
                .push(((f1 - f0) as f64 / gib, (f3 - f2) as f64 / warm_gib));
            samples
                .cpu_per_gib
                .push(((c1 - c0) / gib, (c3 - c2) / warm_gib, c2 - c1));
        }
    }
    let baseline = single.get(&Build::Baseline);
    for (&build, samples) in &single {
        println!(
            "{:<30} {}  whole object verified before the first byte{}",
            format!("mount_vfs cold O_DIRECT{}", build.label()),
            spread(&samples.cold),
            vs(
                build,
                median(samples.cold.clone()),
                baseline.map(|b| median(b.cold.clone()))
            )
        );
    }
    for (&build, samples) in &single {
        println!(
            "{:<30} {}  {:.2}x ceiling (medians), {} MiB file{}",
            format!("mount_vfs warm O_DIRECT{}", build.label()),
            spread(&samples.warm),
            median(samples.warm.clone()) / ceiling,
            warm_size / MIB,
            vs(
                build,
                median(samples.warm.clone()),
                baseline.map(|b| median(b.warm.clone()))
            )
        );
    }
    for (&build, samples) in &single {
        for (i, ((fc, fw), (cc, cw, _))) in samples
            .faults_per_gib
            .iter()
            .zip(&samples.cpu_per_gib)
            .enumerate()
        {
            println!(
                "run {i}{}: daemon minor faults/GiB cold {fc:.0} warm {fw:.0}; CPU s/GiB cold {cc:.2} warm {cw:.2}",
                build.label()
            );
        }
    }

    // Two readers, one vs two shards (cold, then warm).
    let mut two_readers: Vec<(String, f64)> = Vec::new();
    for shards in [1, 2] {
        let rates: BTreeMap<Build, (f64, f64)> = builds
            .iter()
            .map(|&build| {
                let daemon = start(build, &manifest, &cas, &mnt, shards, "2G");
                let files = [daemon.mnt.join("half_a.bin"), daemon.mnt.join("half_b.bin")];
                let cold = parallel_read(&files, true);
                let warm = parallel_read(&files, true);
                (build, (cold, warm))
            })
            .collect();
        let baseline = rates.get(&Build::Baseline);
        for (&build, &(cold, warm)) in &rates {
            let vs = match (build, baseline) {
                (Build::New, Some(&(old_cold, old_warm))) => format!(
                    "  cold {}, warm {}",
                    vs_baseline(cold, old_cold),
                    vs_baseline(warm, old_warm)
                ),
                _ => String::new(),
            };
            println!(
                "two readers, --shards {shards}{}: cold {} warm {} (single samples){vs}",
                build.label(),
                gbs(cold),
                gbs(warm),
            );
            for (state, rate) in [("cold", cold), ("warm", warm)] {
                two_readers.push((
                    format!("2 readers, --shards {shards} {state}{}", build.label()),
                    rate,
                ));
            }
        }
    }

    let metrics_secs = std::env::var("BENCH_METRICS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let metrics = metrics_cost::measure(
        &manifest,
        &cas,
        &mnt,
        "warm.bin",
        warm_digest,
        runs,
        metrics_secs,
    );
    println!("warm O_DIRECT, --metrics-addr off {}", spread(&metrics.off));
    println!(
        "warm O_DIRECT, --metrics-addr on  {}  on/off {:.3}x (medians), {} scrapes (1 per s) during the reads, interleaved",
        spread(&metrics.on),
        median(metrics.on.clone()) / median(metrics.off.clone()),
        metrics.scrapes
    );

    let gbps = |v: &[f64]| v.iter().map(|r| r / 1e9).collect::<Vec<f64>>();
    let mut chart = BarChart::new(
        "mount_read",
        &format!("mount_read: {size_mib} MiB, 1 MiB O_DIRECT reads, local CAS, {runs} runs"),
        "GB/s",
    );
    chart.bar("tmpfs", &gbps(&tmpfs));
    chart.bar("null FUSE (ceiling)", &gbps(&ceiling_runs));
    chart.bar("CAS object, depth 1", &gbps(&disk));
    chart.bar("CAS object, depth 8 (cold ceiling)", &gbps(&disk_deep));
    for (&build, samples) in &single {
        chart.bar_vs(
            &format!("mount_vfs cold{}", build.label()),
            &gbps(&samples.cold),
            "CAS object, depth 8 (cold ceiling)",
        );
        chart.bar_vs(
            &format!("mount_vfs warm{}", build.label()),
            &gbps(&samples.warm),
            "null FUSE (ceiling)",
        );
    }
    for (label, rate) in &two_readers {
        chart.bar(label, &[rate / 1e9]);
    }
    chart.bar("warm, --metrics-addr off", &gbps(&metrics.off));
    chart.bar_vs(
        "warm, --metrics-addr on, scraped 1/s",
        &gbps(&metrics.on),
        "warm, --metrics-addr off",
    );
    chart.write();

    let _ = fs::remove_file(shm);
    let _ = fs::remove_dir_all(&base);
}
