//! A job-shaped cold read (issue 11): one render task's reads of a generated scene, timed on a
//! fresh mount with an empty cache, against a raw S3 client that fetches exactly the bytes the
//! task reads with the same parallelism, and against the peer FUSE clients.
//!
//! - Scene (seeded, the same every run): `BENCH_JOB_FILES` files (default 300) in 5 asset
//!   directories, log-normal sizes (sigma 2.5), scaled so they add up to about `BENCH_JOB_MIB`
//!   (default 2560) and clamped to 4 KiB..1 GiB; xorshift bytes; a v2023 manifest. Held once in
//!   the in-process s3s server (benches/s3_read/server.rs), as `root/Data/{hash}.xxh128` for
//!   mount_vfs and `plain/{path}` for the raw client and the peers (the same buffer).
//! - Task: the files in a seeded shuffled order; 70% read whole, 20% only their first 64 KiB
//!   (headers), 10% not opened; `JOB_READERS` (4) threads take the next file of that order, read
//!   it in 1 MiB reads and hash what they read (checked against the scene, after each file: a
//!   contender that returns wrong bytes fails its run). Wall time from the first open to the
//!   last byte; the mount is started (and the page cache dropped) before the clock starts.
//! - Contenders, each on a fresh mount with an empty cache, page cache dropped first:
//!   - raw client: hyper + aws-sigv4, the same 4 workers over the same order, each file's
//!     bytes as 8 MiB ranged GETs, 4 in flight (benches/s3_read/clients.rs), hashed the same way;
//!   - mount_vfs (a): a fresh `--cache-dir` (no trace: the first task of the job on this node);
//!   - mount_vfs (b): a fresh `--cache-dir` holding only the `Traces/` the (a) mount of the same
//!     run recorded (the trace of an earlier task on another node; data cache empty);
//!   - the same two with `--verify stream`;
//!   - s3fs, rclone (caches off, settings as in s3_read), mountpoint-s3 (`mount_from_config`,
//!     CSV manifest of the `plain/` keys; "absent" when not built, see
//!     benches/common/mountpoint_s3.rs).
//!
//!   mount_vfs runs with its defaults otherwise (shards, memory limit, prefetch `trace`).
//! - Reported per contender: median and range of the task's wall time over `BENCH_RUNS`
//!   (default 3) runs of this invocation, the ratio to the raw client's median, and S3 bytes
//!   fetched (the server's count over the mount's life) per byte the task read. Chart: `job`.
//!
//! Run: `cargo bench --bench job` (root, /dev/fuse). Environment: `BENCH_RUNS`,
//! `BENCH_JOB_FILES`, `BENCH_JOB_MIB`, `BENCH_ONLY=TEXT` (contenders whose name contains TEXT),
//! `BENCH_CACHE_DIR` (default /var/tmp/mount_vfs_jobbench_cache), `MOUNTPOINT_S3_BIN`,
//! `BENCH_RESULTS_DIR`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use mount_vfs::manifest::{Content, FileEntry, Format, Hash, ManifestBuilder};

mod common;

#[path = "s3_read/clients.rs"]
#[allow(dead_code)]
mod clients;
#[path = "s3_read/mounts.rs"]
#[allow(dead_code)]
mod mounts;
#[path = "s3_read/readers.rs"]
#[allow(dead_code)]
mod readers;
#[path = "s3_read/server.rs"]
#[allow(dead_code)]
mod server;

use clients::{RAW_GET, RAW_IN_FLIGHT};
use common::chart::BarChart;
use common::{drop_caches, env_usize, fill, mountpoint_s3};
use mounts::{
    mount_vfs_command, rclone_command, s3fs_command, start_watchdog, step_deadline, steps_done,
    Mount,
};
use server::{Server, BUCKET, KEY, REGION, SECRET};

/// Reader threads of the task (and workers of the raw client).
const JOB_READERS: usize = 4;
/// What a header read reads.
const HEADER: u64 = 64 << 10;
/// Every read through a mount asks for this much.
const READ_SIZE: usize = 1 << 20;
const MIB: u64 = 1 << 20;
const SEED: u64 = 0x5EED_0011_2026_1202;
/// Spread of the log-normal sizes: at the default total, 4 KiB to about 300 MiB, median about
/// 560 KiB (`BENCH_JOB_MIB=8704` puts the largest file at 1 GiB).
const SIGMA: f64 = 2.5;
const DIRS: [&str; 5] = ["textures", "geometry", "caches", "shaders", "scenes"];

/// How the task reads a file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    Whole,
    Header,
    Untouched,
}

struct SceneFile {
    path: String,
    size: u64,
    access: Access,
    /// xxh3-128 of the bytes the task reads of it.
    expected: u128,
}

impl SceneFile {
    /// The bytes the task reads of this file.
    fn read_len(&self) -> u64 {
        match self.access {
            Access::Whole => self.size,
            Access::Header => self.size.min(HEADER),
            Access::Untouched => 0,
        }
    }
}

/// The generated scene and the task over it.
struct Scene {
    files: Vec<SceneFile>,
    /// Indices into `files` in the order the task opens them (untouched files left out).
    order: Vec<usize>,
    manifest: PathBuf,
    /// `plain/` objects for mountpoint-s3's manifest.
    plain_objects: Vec<mountpoint_s3::Object>,
}

/// splitmix64: a small seeded generator, so the scene is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

impl Scene {
    /// Generates the scene, stores its objects in `server` and writes its manifest under `base`.
    fn create(base: &Path, server: &Server, files: usize, total_mib: usize) -> Scene {
        let mut rng = Rng(SEED);
        // Log-normal around 1 MiB, then scaled to the total: the shape stays log-normal.
        let raw: Vec<f64> = (0..files)
            .map(|_| (MIB as f64) * (SIGMA * rng.normal()).exp())
            .collect();
        let scale = (total_mib as f64 * MIB as f64) / raw.iter().sum::<f64>();
        let sizes: Vec<u64> = raw
            .iter()
            .map(|s| ((s * scale) as u64).clamp(4 << 10, 1 << 30))
            .collect();
        let mut builder = ManifestBuilder::new(Format::V2023_03_03);
        let mut scene_files = Vec::new();
        let mut plain_objects = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let path = format!("{}/f{i:03}.bin", DIRS[i % DIRS.len()]);
            let access = match rng.next() % 10 {
                0..=6 => Access::Whole,
                7 | 8 => Access::Header,
                _ => Access::Untouched,
            };
            let mut data = vec![0u8; size as usize];
            fill(SEED ^ (i as u64 + 1), &mut data);
            let hash = Hash::of(&data);
            let file = SceneFile {
                path: path.clone(),
                size,
                access,
                expected: 0,
            };
            let expected = xxhash_rust::xxh3::xxh3_128(&data[..file.read_len() as usize]);
            builder.add_file(
                path.as_bytes(),
                FileEntry {
                    size,
                    mtime_us: 1_700_000_000_000_000,
                    executable: false,
                    content: Content::Whole(hash),
                },
            );
            let data = Bytes::from(data);
            server.insert(&format!("root/Data/{hash}.xxh128"), data.clone());
            let etag = server.insert(&format!("plain/{path}"), data);
            plain_objects.push(mountpoint_s3::Object {
                key: path.clone(),
                etag,
                size,
            });
            scene_files.push(SceneFile { expected, ..file });
        }
        let manifest = base.join("job.manifest");
        fs::write(&manifest, builder.build().expect("scene manifest").encode()).unwrap();
        // Fisher-Yates with the same generator: the task's fixed order.
        let mut order: Vec<usize> = (0..files).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        order.retain(|&i| scene_files[i].access != Access::Untouched);
        Scene {
            files: scene_files,
            order,
            manifest,
            plain_objects,
        }
    }

    fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn task_bytes(&self) -> u64 {
        self.files.iter().map(SceneFile::read_len).sum()
    }

    /// The scene's shape, for the report.
    fn describe(&self) -> String {
        let mut sizes: Vec<u64> = self.files.iter().map(|f| f.size).collect();
        sizes.sort();
        let q = |p: f64| human(sizes[((sizes.len() - 1) as f64 * p).round() as usize]);
        let count = |a| self.files.iter().filter(|f| f.access == a).count();
        format!(
            "{} files in {} directories, {} in all; sizes min {} p10 {} p50 {} p90 {} p99 {} \
             max {}; task: {} read whole, {} headers only (first {} KiB), {} untouched, {} read \
             ({:.0}% of the scene), {JOB_READERS} readers",
            self.files.len(),
            DIRS.len(),
            human(self.total()),
            q(0.0),
            q(0.1),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0),
            count(Access::Whole),
            count(Access::Header),
            HEADER >> 10,
            count(Access::Untouched),
            human(self.task_bytes()),
            100.0 * self.task_bytes() as f64 / self.total() as f64
        )
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / MIB as f64),
        b => format!("{:.0} KiB", b as f64 / 1024.0),
    }
}

/// The task through a filesystem: `JOB_READERS` threads over the fixed order, 1 MiB reads,
/// each file's bytes hashed and checked. Seconds from the first open to the last check.
fn task_on_files(dir: &Path, scene: &Scene) -> Result<f64, String> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..JOB_READERS)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    let mut buffer = vec![0u8; READ_SIZE];
                    loop {
                        let Some(&i) = scene.order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        let file = &scene.files[i];
                        let path = dir.join(&file.path);
                        let mut f = fs::File::open(&path)
                            .map_err(|e| format!("open {}: {e}", path.display()))?;
                        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                        let mut left = file.read_len() as usize;
                        while left > 0 {
                            let want = left.min(READ_SIZE);
                            let n = f
                                .read(&mut buffer[..want])
                                .map_err(|e| format!("read {}: {e}", path.display()))?;
                            if n == 0 {
                                return Err(format!("{}: early end of file", path.display()));
                            }
                            hasher.update(&buffer[..n]);
                            left -= n;
                        }
                        if hasher.digest128() != file.expected {
                            return Err(format!("{}: wrong bytes", path.display()));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err("reader panicked".into())))
    })?;
    Ok(started.elapsed().as_secs_f64())
}

/// The task through no filesystem: `JOB_READERS` workers over the fixed order, each file's
/// bytes as ranged GETs of `RAW_GET`, `RAW_IN_FLIGHT` in flight, hashed in order and checked.
fn task_raw(endpoint: &str, scene: &Scene) -> Result<f64, String> {
    let (runtime, client) = clients::hyper_client();
    let jobs: Arc<Vec<(String, u64, u128)>> = Arc::new(
        scene
            .order
            .iter()
            .map(|&i| {
                let f = &scene.files[i];
                (
                    format!("{endpoint}/{BUCKET}/plain/{}", f.path),
                    f.read_len(),
                    f.expected,
                )
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async move {
        let started = Instant::now();
        let workers: Vec<_> = (0..JOB_READERS)
            .map(|_| {
                let (client, jobs, next) = (client.clone(), jobs.clone(), next.clone());
                tokio::spawn(async move {
                    while let Some((url, len, expected)) =
                        jobs.get(next.fetch_add(1, Ordering::Relaxed)).cloned()
                    {
                        let chunks = (0..len)
                            .step_by(RAW_GET)
                            .map(|o| (o, (len - o).min(RAW_GET as u64)));
                        let mut bodies = futures::stream::iter(chunks)
                            .map(|(o, n)| {
                                let (client, url) = (client.clone(), url.clone());
                                async move {
                                    let response =
                                        clients::signed_range_get(&client, &url, o, n).await?;
                                    clients::body_bytes(response, &url).await
                                }
                            })
                            .buffered(RAW_IN_FLIGHT);
                        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                        while let Some(body) = bodies.next().await {
                            hasher.update(&body?);
                        }
                        if hasher.digest128() != expected {
                            return Err(format!("{url}: wrong bytes"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.await.map_err(|e| format!("raw worker: {e}"))??;
        }
        Ok(started.elapsed().as_secs_f64())
    })
}

/// What a row measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    Raw,
    /// `trace`: (b), the earlier task's trace in the otherwise empty cache; else (a).
    /// `stream`: `--verify stream`.
    MountVfs {
        trace: bool,
        stream: bool,
    },
    S3fs,
    Rclone,
    MountpointS3,
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::Raw => "raw client".into(),
            Contender::MountVfs { trace, stream } => format!(
                "mount_vfs ({}{}",
                if trace {
                    "b) with trace"
                } else {
                    "a) no trace"
                },
                if stream { " --verify stream" } else { "" }
            ),
            Contender::S3fs => "s3fs".into(),
            Contender::Rclone => "rclone".into(),
            Contender::MountpointS3 => "mountpoint-s3".into(),
        }
    }
}

/// The contenders, in the order every run measures them: each (b) right after its (a), whose
/// trace it uses.
fn contenders() -> Vec<Contender> {
    let mut all = vec![Contender::Raw];
    for stream in [false, true] {
        for trace in [false, true] {
            all.push(Contender::MountVfs { trace, stream });
        }
    }
    for (peer, bin) in [(Contender::S3fs, "s3fs"), (Contender::Rclone, "rclone")] {
        let present = common::on_path(bin);
        if present {
            all.push(peer);
        } else {
            println!("# {bin}: absent (apt-get install -y {bin})");
        }
    }
    match mountpoint_s3::binary() {
        Ok(_) => all.push(Contender::MountpointS3),
        Err(why) => println!("# mountpoint-s3: {why}"),
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        all.retain(|c| c.name().contains(&only) || (*c == Contender::Raw));
    }
    all
}

/// One contender's runs.
#[derive(Default)]
struct Samples {
    secs: Vec<f64>,
    fetched_per_read: Vec<f64>,
    errors: Vec<String>,
}

struct Bench {
    base: PathBuf,
    cache_root: PathBuf,
    passwd: PathBuf,
    server: Server,
    scene: Scene,
}

impl Bench {
    fn cache_dir(&self, trace: bool) -> PathBuf {
        self.cache_root.join(if trace { "b" } else { "a" })
    }

    /// Mounts `contender` fresh, with an empty cache (for (b): only the trace (a) left).
    fn mount(&self, contender: Contender) -> Result<Mount, String> {
        let mnt = self.base.join("mnt");
        let endpoint = self.server.endpoint();
        let ready = Path::new(&self.scene.files[0].path);
        let plain = mnt.join("plain");
        let (command, files) = match contender {
            Contender::Raw => unreachable!("the raw client mounts nothing"),
            Contender::MountVfs { trace, stream } => {
                let cache = self.cache_dir(trace);
                if trace {
                    let traces = self.cache_dir(false).join("Traces");
                    let _ = fs::remove_dir_all(&cache);
                    fs::create_dir_all(cache.join("Traces")).unwrap();
                    let mut copied = 0;
                    for entry in fs::read_dir(&traces)
                        .map_err(|e| format!("no trace from (a): {}: {e}", traces.display()))?
                    {
                        let entry = entry.unwrap();
                        fs::copy(entry.path(), cache.join("Traces").join(entry.file_name()))
                            .unwrap();
                        copied += 1;
                    }
                    if copied == 0 {
                        return Err("(a) recorded no trace".into());
                    }
                } else {
                    let _ = fs::remove_dir_all(&cache);
                }
                let mut c =
                    mount_vfs_command(&common::bin(), &self.scene.manifest, &mnt, &endpoint);
                c.arg("--cache-dir").arg(&cache);
                if stream {
                    c.args(["--verify", "stream"]);
                }
                (c, mnt.clone())
            }
            Contender::S3fs => (s3fs_command(&mnt, &endpoint, &self.passwd), plain),
            Contender::Rclone => (rclone_command(&mnt, &endpoint, &self.base), plain),
            Contender::MountpointS3 => {
                let mut c = mountpoint_s3::command(
                    &mountpoint_s3::binary()?,
                    &self.base.join("mountpoint-s3"),
                    &mnt,
                    &endpoint,
                    REGION,
                    BUCKET,
                    "plain/",
                    "plain",
                    &self.scene.plain_objects,
                    4 << 30,
                );
                c.env("AWS_ACCESS_KEY_ID", KEY)
                    .env("AWS_SECRET_ACCESS_KEY", SECRET)
                    .env("AWS_REGION", REGION)
                    .env_remove("AWS_PROFILE")
                    .env_remove("AWS_CA_BUNDLE");
                (c, plain)
            }
        };
        Mount::spawn(&contender.name(), command, mnt, files, ready)
    }

    /// One cold task of `contender`: (seconds, S3 bytes fetched per byte read).
    fn measure(&self, contender: Contender) -> Result<(f64, f64), String> {
        drop_caches();
        let served = self.server.served();
        let secs = if contender == Contender::Raw {
            task_raw(&self.server.endpoint(), &self.scene)?
        } else {
            let mount = self.mount(contender)?;
            let secs = task_on_files(&mount.files, &self.scene);
            drop(mount);
            secs?
        };
        let fetched = (self.server.served() - served) as f64 / self.scene.task_bytes() as f64;
        Ok((secs, fetched))
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_usize("BENCH_RUNS", 3);
    let base = PathBuf::from("/dev/shm/mount_vfs_jobbench");
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let cache_root = std::env::var_os("BENCH_CACHE_DIR").map_or_else(
        || PathBuf::from("/var/tmp/mount_vfs_jobbench_cache"),
        PathBuf::from,
    );
    let passwd = base.join("s3fs.passwd");
    fs::write(&passwd, format!("{KEY}:{SECRET}\n")).unwrap();
    fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    start_watchdog();

    let setup = Instant::now();
    let server = Server::start();
    let scene = Scene::create(
        &base,
        &server,
        env_usize("BENCH_JOB_FILES", 300),
        env_usize("BENCH_JOB_MIB", 2560),
    );
    println!(
        "# job: in-memory s3s server on 127.0.0.1:{} (SigV4), setup {:.1}s, {runs} cold runs",
        server.port,
        setup.elapsed().as_secs_f64()
    );
    println!("# machine: {}", common::machine());
    println!("# scene: {}", scene.describe());
    let bench = Bench {
        base: base.clone(),
        cache_root: cache_root.clone(),
        passwd,
        server,
        scene,
    };
    let contenders = contenders();
    let mut samples: Vec<Samples> = contenders.iter().map(|_| Samples::default()).collect();
    println!("# load average before: {}", common::load_average());
    for run in 0..runs {
        eprintln!("# run {}/{runs} (load {})", run + 1, common::load_average());
        for (c, s) in contenders.iter().zip(&mut samples) {
            step_deadline();
            match bench.measure(*c) {
                Ok((secs, fetched)) => {
                    eprintln!("#   {}: {secs:.2} s, fetched/read {fetched:.2}", c.name());
                    s.secs.push(secs);
                    s.fetched_per_read.push(fetched);
                }
                Err(e) => {
                    eprintln!("#   {}: FAILED: {e}", c.name());
                    s.errors.push(e);
                }
            }
        }
    }
    steps_done();
    println!("# load average after: {}", common::load_average());

    assert!(
        !samples[0].secs.is_empty(),
        "the raw client failed every run, so no row has a reference: {}",
        samples[0].errors.join(" | ")
    );
    let raw_median = common::median(samples[0].secs.clone());
    let task_bytes = bench.scene.task_bytes() as f64;
    println!();
    println!(
        "{:<44} {:>30} {:>9} {:>9} {:>14}",
        "contender", "task wall time", "GB/s", "/raw", "S3 bytes/read"
    );
    let mut chart = BarChart::new(
        "job",
        &format!(
            "job: one task's cold reads ({} of {} files), {runs} runs",
            human(bench.scene.task_bytes()),
            bench.scene.files.len()
        ),
        "s",
    );
    chart.lower_is_better = true;
    for (c, s) in contenders.iter().zip(&samples) {
        if s.secs.is_empty() {
            println!("{:<44} failed: {}", c.name(), s.errors.join(" | "));
            continue;
        }
        let mut sorted = s.secs.clone();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[sorted.len() / 2];
        println!(
            "{:<44} {:>30} {:>9.2} {:>8.2}x {:>14.2}{}",
            c.name(),
            format!(
                "{med:.2} s (range {:.2}-{:.2}, {}/{runs})",
                sorted[0],
                sorted[sorted.len() - 1],
                sorted.len()
            ),
            task_bytes / med / 1e9,
            med / raw_median,
            common::median(s.fetched_per_read.clone()),
            if s.errors.is_empty() {
                String::new()
            } else {
                format!("  ({} failed: {})", s.errors.len(), s.errors.join(" | "))
            }
        );
        if *c == Contender::Raw {
            chart.bar(&c.name(), &s.secs);
        } else {
            chart.bar_vs(&c.name(), &s.secs, &Contender::Raw.name());
        }
    }
    chart.write();
    drop(bench);
    let _ = fs::remove_dir_all(&cache_root);
    let _ = fs::remove_dir_all(&base);
}
