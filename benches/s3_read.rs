//! Cold sequential reads from S3 (issue 4): mount_vfs against the raw S3 clients and the peer
//! FUSE clients (s3fs, rclone), all in one run against one fast in-process S3 server.
//!
//! - Server: a minimal `s3s` implementation (GetObject with Range, HeadObject, PutObject,
//!   ListObjects v1/v2, buckets) over in-memory `Bytes` — a ranged GET is one zero-copy slice —
//!   on a multi-threaded tokio runtime, 127.0.0.1 only, SigV4 checked against a fixed key.
//! - Data: two 1 GiB files of xorshift bytes, snapshotted with `mount_vfs snapshot` (manifest
//!   v2023) and uploaded with signed PUTs as `root/Data/{hash}.xxh128`, and again as
//!   `plain/a.bin`, `plain/b.bin` for the peers, which mount the bucket rather than a manifest.
//! - Raw clients (no FUSE): our `S3Store` on glommio shards, and an independent hyper client
//!   signing with `aws-sigv4`; both issue 8 MiB ranged GETs, 4 in flight per reader.
//! - Mounts: mount_vfs (`--shards 1` and `2`, `--memory-limit 4G`, without and with a
//!   `--cache-dir` on local storage, `BENCH_CACHE_DIR`, default /var/tmp; and through a
//!   v2025 manifest of the same files, whose 256 MiB chunks are verified one by one; and
//!   `--shards 1 --verify stream`, which serves bytes as they arrive), s3fs,
//!   rclone, each with its documented throughput settings for large sequential reads and its
//!   cache off (`BENCH_PEER_DEFAULTS=1`: their defaults). Every measurement is cold: page cache
//!   dropped and a fresh mount. One reader reads `a` whole; four readers read the two halves of
//!   `a` and of `b`. 1 MiB reads, O_DIRECT (aligned) and buffered. Time to first byte: open + first 1 MiB O_DIRECT read on a fresh mount,
//!   against one signed 1 MiB ranged GET on a fresh connection (hyper, no FUSE).
//! - Disk cache: after each `--cache-dir` cold read, the same readers on a 2nd mount of that
//!   cache, then on the cache files themselves (no FUSE: the 2nd mount's limit, `/direct`), and
//!   the 2nd mount's time to first byte; page cache dropped before each.
//! - Ceiling in the same run: a do-nothing FUSE server answering every READ from one buffer.
//! - A/B: with `BENCH_BASELINE_BIN=/path/to/older/mount_vfs`, every mount_vfs row is measured
//!   again with that binary, right after this build's in every run, as its own "(baseline)"
//!   row; this build's row then ends with `new/baseline` (median over median).
//!
//! Run: `cargo bench --bench s3_read` (root; /dev/fuse; s3fs and rclone on PATH or they are
//! skipped). Environment: `BENCH_RUNS` (default 3), `BENCH_SIZE_MIB` (default 1024),
//! `BENCH_PEERS=0` to skip the peers, `BENCH_COLD=0` to ask only the first-byte question,
//! `BENCH_PEER_DEFAULTS=1` to run them with their defaults,
//! `BENCH_ONLY=TEXT` to keep only the mounts whose name contains TEXT (`TEXT$`: ends with it),
//! `BENCH_CACHE_DIR`,
//! `BENCH_BASELINE_BIN`, `BENCH_RESULTS_DIR` (one chart per mode, `s3_read_MODE_READERS.svg`,
//! default target/bench-results). Writes under /dev/shm/mount_vfs_s3bench and the cache dir.
//!
//! This file sets up and runs the questions in order; the harness (server, clients, data,
//! mounts, readers, table) and one file per question live in `benches/s3_read/`.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

mod common;

// The harness: what every question measures with.
#[path = "s3_read/clients.rs"]
mod clients;
#[path = "s3_read/data.rs"]
mod data;
#[path = "s3_read/mounts.rs"]
mod mounts;
#[path = "s3_read/readers.rs"]
mod readers;
#[path = "s3_read/report.rs"]
mod report;
#[path = "s3_read/server.rs"]
mod server;

// The questions, one file each; `main` runs them in this order: the FUSE ceiling, the raw
// clients, then per contender the first byte, cold reads and second mounts.
#[path = "s3_read/cold_read.rs"]
mod cold_read;
#[path = "s3_read/first_byte.rs"]
mod first_byte;
#[path = "s3_read/fuse_ceiling.rs"]
mod fuse_ceiling;
#[path = "s3_read/raw_read.rs"]
mod raw_read;
#[path = "s3_read/second_mount.rs"]
mod second_mount;

use cold_read::ColdRead;
use common::chart::BarChart;
use common::{env_usize, Build};
use data::Data;
use first_byte::FirstByte;
use fuse_ceiling::FuseCeiling;
use mounts::{start_watchdog, step_deadline, steps_done, Contender, Env};
use raw_read::RawRead;
use readers::MIB;
use second_mount::SecondMount;
use server::{Server, KEY, SECRET};

const BASE: &str = "/dev/shm/mount_vfs_s3bench";

/// The FUSE contenders to measure: every mount_vfs configuration (this build; the baseline's
/// versions are added run by run), then the peers that are installed, unless `BENCH_PEERS=0`;
/// all filtered by `BENCH_ONLY`.
fn contenders() -> Vec<Contender> {
    let with_peers = std::env::var("BENCH_PEERS").map_or(true, |v| v != "0");
    let mut contenders = vec![];
    for (cache, chunked) in [(false, false), (true, false), (false, true)] {
        for shards in [1, 2] {
            contenders.push(Contender::MountVfs {
                shards,
                cache,
                chunked,
                stream: false,
                build: Build::New,
            });
        }
    }
    // `--verify stream` (issue 11): what serving before the whole object is checked gains.
    contenders.push(Contender::MountVfs {
        shards: 1,
        cache: false,
        chunked: false,
        stream: true,
        build: Build::New,
    });
    for (peer, bin) in [(Contender::S3fs, "s3fs"), (Contender::Rclone, "rclone")] {
        let present = common::on_path(bin);
        if !with_peers {
            continue;
        }
        if present {
            contenders.push(peer);
        } else {
            println!("# {bin} not installed: skipped (apt-get install -y s3fs rclone)");
        }
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        // A trailing `$` anchors TEXT at the end of the name.
        match only.strip_suffix('$') {
            Some(end) => contenders.retain(|c| c.name().ends_with(end)),
            None => contenders.retain(|c| c.name().contains(&only)),
        }
    }
    contenders
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_usize("BENCH_RUNS", 3);
    let size_mib = env_usize("BENCH_SIZE_MIB", 1024);
    let size = (size_mib * MIB) as u64;
    let cold_reads = env_usize("BENCH_COLD", 1) != 0;
    let builds = Build::all();
    let base = PathBuf::from(BASE);
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    start_watchdog();

    let setup = Instant::now();
    let data = Data::create(&base, size);
    let passwd = base.join("s3fs.passwd");
    fs::write(&passwd, format!("{KEY}:{SECRET}\n")).unwrap();
    fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let env = Env {
        base: base.clone(),
        cache_dir: std::env::var_os("BENCH_CACHE_DIR").map_or_else(
            || PathBuf::from("/var/tmp/mount_vfs_s3bench_cache"),
            PathBuf::from,
        ),
        manifest: data.manifest.clone(),
        manifest_v2025: data.manifest_v2025.clone(),
        passwd,
    };
    let server = Server::start();
    let endpoint = server.endpoint();
    data.upload(&endpoint);
    println!(
        "# s3_read: 2 x {size_mib} MiB objects, in-memory s3s server on 127.0.0.1:{} (SigV4), setup {:.1}s, median of {runs} cold runs",
        server.port,
        setup.elapsed().as_secs_f64()
    );
    println!("# machine: {}", common::machine());
    let contenders = contenders();

    let ceiling = FuseCeiling::measure(&base, size, runs);
    let mut raw = RawRead::new(&endpoint, data.hashes, size);
    let mut first_byte = FirstByte::default();
    let mut cold = ColdRead::new(size);
    let mut second = SecondMount::new(size, data.hashes);
    // Every run measures everything once, so all rows see the same drift of the machine; each
    // mount_vfs measurement is taken with every build back to back.
    for run in 0..runs {
        eprintln!("# run {}/{runs}", run + 1);
        raw.measure_run();
        first_byte.measure_raw(&server);
        for &contender in &contenders {
            let versions = contender.versions(&builds);
            for &c in &versions {
                step_deadline();
                first_byte.measure(c, &server, &env);
            }
            if !cold_reads {
                continue;
            }
            for direct in [true, false] {
                for readers in [1, 4] {
                    for &c in &versions {
                        step_deadline();
                        if cold.measure(c, direct, readers, &server, &env) && c.has_cache() {
                            second.measure(c, direct, readers, &server, &env);
                        }
                    }
                }
            }
        }
    }
    steps_done();
    drop(server);
    let _ = fs::remove_dir_all(&env.cache_dir);

    println!();
    report::print_header();
    ceiling.print();
    raw.print();
    for &contender in &contenders {
        let versions = contender.versions(&builds);
        for &c in &versions {
            cold.print(c, &raw);
        }
        for &c in &versions {
            second.print(c, &raw);
        }
    }
    println!();
    first_byte.print_raw();
    for &contender in &contenders {
        for c in contender.versions(&builds) {
            first_byte.print(c);
        }
        for c in contender.versions(&builds) {
            second.print_ttfb(c);
        }
    }
    for direct in [true, false] {
        for readers in [1, 4] {
            let mode = report::mode_name(direct);
            let mut chart = BarChart::new(
                &format!("s3_read_{mode}_{readers}"),
                &format!("s3_read: cold reads from S3, {mode}, {readers} reader(s), 2 x {size_mib} MiB, {runs} runs"),
                "GB/s",
            );
            ceiling.add_to(&mut chart, direct, readers);
            let best_raw = raw.add_to(&mut chart, readers);
            for &contender in &contenders {
                for c in contender.versions(&builds) {
                    cold.add_to(&mut chart, c, direct, readers, best_raw.as_deref());
                }
            }
            for &contender in &contenders {
                for c in contender.versions(&builds) {
                    second.add_to(&mut chart, c, direct, readers);
                }
            }
            chart.write();
        }
    }
    let _ = fs::remove_dir_all(&base);
}
