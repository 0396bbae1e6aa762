//! The seed system's write workload through `--writable`, beside its baselines in the same run.
//!
//! Each contender does, in order, what it supports of:
//! - base reads: page cache dropped, the 3 unmodified files of the manifest read the same way as
//!   dirty reads below: cold (through a mount: from the CAS, into a fresh disk cache), then warm.
//!   First, so that every contender reads them on a fresh mount and a quiet disk (after the
//!   write phase the disk was still busy on this VM, which made cold reads erratic).
//! - write: 3 new files of `BENCH_FILE_MIB` MiB, one after the other, each opened (O_CREAT),
//!   written with 1 MiB write() calls and closed; timed from the first open to the last close
//!   returned. "+ fsync": then each file is reopened and fsync'd, timed and added.
//! - dirty reads: page cache dropped (sync, then `echo 3 > /proc/sys/vm/drop_caches`, checked),
//!   the 3 files read back one after the other with 1 MiB buffered reads (cold), then again
//!   (warm, from the page cache), then once more after another drop ("cold again").
//!
//! Contenders: "direct", a plain directory beside the mounts' cache directories (same
//! filesystem), whose base files are the tree that was snapshotted; "read-only",
//! `mount_vfs M MP --cas CAS --cache-dir DIR2` (base reads only); "writable", the same with
//! `--writable --cache-dir DIR` (everything). Every run mounts afresh on emptied cache
//! directories; the contenders' order rotates from run to run. Every read's bytes are hashed
//! after the clock stops and checked. The writable daemon's page faults (minor + major) and CPU
//! seconds (utime + stime) per GiB written come from /proc/PID/stat around the write phase.
//!
//! Run: `cargo bench --bench writable` (root; needs /dev/fuse). Environment: `BENCH_DIR` (default
//! a directory under target/), `BENCH_RUNS` (3), `BENCH_FILE_MIB` (300), `BENCH_SHARDS` (2).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::chart::BarChart;

use common::{checked_read, drop_caches, env_usize, fill, median, proc_counters, Clock, Daemon};

const MIB: usize = 1 << 20;
const FILES: usize = 3;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Write,
    WriteFsync,
    DirtyCold,
    DirtyWarm,
    DirtyColdAgain,
    BaseCold,
    BaseWarm,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Write,
        Op::WriteFsync,
        Op::DirtyCold,
        Op::DirtyWarm,
        Op::DirtyColdAgain,
        Op::BaseCold,
        Op::BaseWarm,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Write => "write, to the last close",
            Op::WriteFsync => "write + fsync",
            Op::DirtyCold => "dirty read, cold",
            Op::DirtyWarm => "dirty read, warm",
            Op::DirtyColdAgain => "dirty read, cold again",
            Op::BaseCold => "base read, cold (CAS)",
            Op::BaseWarm => "base read, warm",
        }
    }

    /// What the writable mount's rate is read against, and the lowest ratio that meets the
    /// target (None: no target, the ratio is shown for information).
    fn reference(self) -> (Who, Option<f64>) {
        match self {
            Op::Write => (Who::Direct, Some(0.8)),
            Op::DirtyCold => (Who::Direct, Some(0.9)),
            Op::WriteFsync | Op::DirtyWarm | Op::DirtyColdAgain => (Who::Direct, None),
            Op::BaseCold | Op::BaseWarm => (Who::ReadOnly, Some(0.95)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Who {
    Direct,
    ReadOnly,
    Writable,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Direct => "direct",
            Who::ReadOnly => "read-only",
            Who::Writable => "writable",
        }
    }
}

/// Bytes per second by (operation, contender), and by run.
type Rates = BTreeMap<(Op, Who), BTreeMap<usize, f64>>;

struct Bench {
    base: PathBuf,
    manifest: PathBuf,
    cas: PathBuf,
    shards: usize,
    /// Names and xxh3-128 of the manifest's files.
    base_files: Vec<(String, u128)>,
    /// What the write phase writes: names, bytes, xxh3-128.
    new_files: Vec<(String, Vec<u8>, u128)>,
}

impl Bench {
    fn bytes(&self) -> f64 {
        self.new_files
            .iter()
            .map(|(_, d, _)| d.len())
            .sum::<usize>() as f64
    }

    /// Mounts the manifest on `mnt` with a fresh (emptied) disk cache in `cache`.
    fn mount(&self, mnt: &Path, cache: &Path, writable: bool) -> Result<Daemon, String> {
        let _ = fs::remove_dir_all(cache);
        let mut command = Command::new(common::bin());
        command
            .arg(&self.manifest)
            .arg(mnt)
            .arg("--cas")
            .arg(&self.cas)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--shards", &self.shards.to_string()]);
        if writable {
            command.arg("--writable");
        }
        Daemon::start(command, mnt, &mnt.with_extension("log"))
    }

    /// Writes the new files into `dir`; returns (seconds to the last close, seconds of the
    /// fsyncs after it).
    fn write_phase(&self, dir: &Path) -> (f64, f64) {
        let started = Instant::now();
        for (name, data, _) in &self.new_files {
            let path = dir.join(name);
            let mut file = fs::File::create(&path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            for chunk in data.chunks(MIB) {
                file.write_all(chunk)
                    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            }
            drop(file);
        }
        let written = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for (name, _, _) in &self.new_files {
            let path = dir.join(name);
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
        }
        (written, started.elapsed().as_secs_f64())
    }

    /// Reads `files` under `dir` one after the other (1 MiB buffered reads, each file's bytes
    /// checked); bytes per second over the summed time from each open to its last read.
    fn read_phase<'a>(dir: &Path, files: impl Iterator<Item = (&'a str, u128)>) -> f64 {
        let (mut bytes, mut secs) = (0.0, 0.0);
        for (name, digest) in files {
            let path = dir.join(name);
            let size = fs::metadata(&path).unwrap().len() as f64;
            secs += size / checked_read(&path, false, Clock::AtOpen, digest);
            bytes += size;
        }
        bytes / secs
    }

    fn dirty_read(&self, dir: &Path) -> f64 {
        Bench::read_phase(dir, self.new_files.iter().map(|(n, _, d)| (n.as_str(), *d)))
    }

    fn base_read(&self, dir: &Path) -> f64 {
        Bench::read_phase(dir, self.base_files.iter().map(|(n, d)| (n.as_str(), *d)))
    }

    /// Write, fsync, dirty reads (cold, warm) in `dir`, into `rates` as `who`; the writable
    /// daemon's counters around the phases when `daemon` is its pid.
    fn write_and_read_back(
        &self,
        dir: &Path,
        who: Who,
        run: usize,
        rates: &mut Rates,
        daemon: Option<u32>,
    ) -> Option<DaemonCost> {
        let bytes = self.bytes();
        drop_caches();
        let c0 = daemon.map(proc_counters);
        let (written, synced) = self.write_phase(dir);
        let c1 = daemon.map(proc_counters);
        record(rates, Op::Write, who, run, bytes / written);
        record(rates, Op::WriteFsync, who, run, bytes / (written + synced));
        drop_caches();
        let c2 = daemon.map(proc_counters);
        record(rates, Op::DirtyCold, who, run, self.dirty_read(dir));
        let c3 = daemon.map(proc_counters);
        record(rates, Op::DirtyWarm, who, run, self.dirty_read(dir));
        // The first cold read follows the writes by a second or two, while the VM's disk may
        // still be busy with them; a second one, seconds later, shows the read path alone.
        drop_caches();
        record(rates, Op::DirtyColdAgain, who, run, self.dirty_read(dir));
        let gib = bytes / GIB;
        match (c0, c1, c2, c3) {
            (Some(c0), Some(c1), Some(c2), Some(c3)) => Some(DaemonCost {
                faults_per_gib: ((c1.0 + c1.1) - (c0.0 + c0.1)) as f64 / gib,
                major_faults: c1.1 - c0.1,
                write_cpu_per_gib: (c1.2 - c0.2) / gib,
                read_cpu_per_gib: (c3.2 - c2.2) / gib,
            }),
            _ => None,
        }
    }

    /// Base reads (cold, then warm) in `dir`, into `rates` as `who`.
    fn base_reads(&self, dir: &Path, who: Who, run: usize, rates: &mut Rates) {
        drop_caches();
        record(rates, Op::BaseCold, who, run, self.base_read(dir));
        record(rates, Op::BaseWarm, who, run, self.base_read(dir));
    }
}

/// The writable daemon's work in one run's write phase and cold dirty read.
struct DaemonCost {
    faults_per_gib: f64,
    major_faults: u64,
    write_cpu_per_gib: f64,
    read_cpu_per_gib: f64,
}

fn record(rates: &mut Rates, op: Op, who: Who, run: usize, rate: f64) {
    rates.entry((op, who)).or_default().insert(run, rate);
}

/// "1.10-1.30": the range of `v` (not empty) over `scale`.
fn range(v: &[f64], scale: f64, digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min) / scale;
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) / scale;
    format!("{lo:.digits$}-{hi:.digits$}")
}

/// "1.23 (1.10-1.30)": the median and range of `v` over `scale`, "-" when empty.
fn cell(v: &[f64], scale: f64, digits: usize) -> String {
    match v.len() {
        0 => "-".into(),
        1 => format!("{:.digits$} (1 run)", v[0] / scale),
        _ => format!(
            "{:.digits$} ({})",
            median(v.to_vec()) / scale,
            range(v, scale, digits)
        ),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_usize("BENCH_RUNS", 3);
    let file_mib = env_usize("BENCH_FILE_MIB", 300);
    let shards = env_usize("BENCH_SHARDS", 2);
    let base = common::bench_dir("writable_bench");
    let size = file_mib * MIB;

    // The manifest's files, and the (different) bytes the write phase writes.
    let tree = base.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let mut data = vec![0u8; size];
    let base_files: Vec<(String, u128)> = (0..FILES)
        .map(|i| {
            let name = format!("base_{i}.bin");
            fill(0x9E37_79B9_7F4A_7C15 ^ i as u64, &mut data);
            fs::write(tree.join(&name), &data).unwrap();
            (name, xxhash_rust::xxh3::xxh3_128(&data))
        })
        .collect();
    drop(data);
    let new_files: Vec<(String, Vec<u8>, u128)> = (0..FILES)
        .map(|i| {
            let mut data = vec![0u8; size];
            fill(0xD1B5_4A32_D192_ED03 ^ i as u64, &mut data);
            let digest = xxhash_rust::xxh3::xxh3_128(&data);
            (format!("new_{i}.bin"), data, digest)
        })
        .collect();
    let cas = base.join("cas");
    let manifest = base.join("base.manifest");
    common::snapshot(&tree, &cas, &manifest, "2023-03-03");
    let bench = Bench {
        base: base.clone(),
        manifest,
        cas,
        shards,
        base_files,
        new_files,
    };

    let load = common::load_average;
    println!(
        "# writable: {FILES} x {file_mib} MiB, 1 MiB write()/read() calls, buffered, {runs} runs, \
         --shards {shards}; page cache dropped before every write phase and every cold read \
         (sync + echo 3 > /proc/sys/vm/drop_caches, checked); every read's bytes checked"
    );
    println!("# machine: {}", common::machine());
    println!("# load average at start: {}", load());

    let mut rates = Rates::new();
    let mut costs: Vec<DaemonCost> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut writable_refused: Option<String> = None;
    for run in 0..runs {
        // The order rotates from run to run, so that a machine that gets busier (or quieter)
        // during a run does not always favour the same contender.
        let mut order = [Who::Direct, Who::ReadOnly, Who::Writable];
        let n = order.len();
        order.rotate_left(run % n);
        for who in order {
            if who == Who::Writable && writable_refused.is_some() {
                continue;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
                match who {
                    Who::Direct => {
                        let dir = bench.base.join("direct");
                        let _ = fs::remove_dir_all(&dir);
                        fs::create_dir_all(&dir).unwrap();
                        // Base reads first, on a quiet disk, as on the read-only mount.
                        bench.base_reads(&tree, who, run, &mut rates);
                        bench.write_and_read_back(&dir, who, run, &mut rates, None);
                        let _ = fs::remove_dir_all(&dir);
                    }
                    Who::ReadOnly => {
                        let mnt = bench.base.join("mnt_ro");
                        let _daemon = bench.mount(&mnt, &bench.base.join("cache_ro"), false)?;
                        bench.base_reads(&mnt, who, run, &mut rates);
                    }
                    Who::Writable => {
                        let mnt = bench.base.join("mnt_rw");
                        let daemon = bench.mount(&mnt, &bench.base.join("cache_rw"), true)?;
                        let pid = daemon.child.id();
                        bench.base_reads(&mnt, who, run, &mut rates);
                        let cost = bench.write_and_read_back(&mnt, who, run, &mut rates, Some(pid));
                        costs.extend(cost);
                    }
                }
                Ok(())
            }));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(refused)) => {
                    println!(
                        "# {} mount refused, its rows skipped: {refused}",
                        who.name()
                    );
                    if who == Who::Writable {
                        writable_refused = Some(refused);
                    } else {
                        failures.push(format!("run {run} {}: {refused}", who.name()));
                    }
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("run {run} {}: {message}", who.name()));
                }
            }
        }
    }
    println!("# load average at end: {}", load());

    let runs_of = |op: Op, who: Who| -> Vec<f64> {
        rates
            .get(&(op, who))
            .map(|r| r.values().copied().collect())
            .unwrap_or_default()
    };
    println!();
    println!(
        "| {FILES} x {file_mib} MiB | direct GB/s | read-only mount GB/s | writable mount GB/s | \
         writable ratio (per-run range) | target |"
    );
    println!("|---|---|---|---|---|---|");
    for op in Op::ALL {
        let (against, target) = op.reference();
        let writes = matches!(
            op,
            Op::Write | Op::WriteFsync | Op::DirtyCold | Op::DirtyWarm | Op::DirtyColdAgain
        );
        let read_only = if writes {
            "n/a".to_string()
        } else {
            cell(&runs_of(op, Who::ReadOnly), 1e9, 2)
        };
        // Per run: the writable rate over the reference's rate in the same run.
        let writable = rates.get(&(op, Who::Writable));
        let reference = rates.get(&(op, against));
        let ratios: Vec<f64> = match (writable, reference) {
            (Some(w), Some(r)) => w
                .iter()
                .filter_map(|(run, w)| r.get(run).map(|r| w / r))
                .collect(),
            _ => Vec::new(),
        };
        let of_medians = (!ratios.is_empty())
            .then(|| median(runs_of(op, Who::Writable)) / median(runs_of(op, against)));
        let ratio = match of_medians {
            Some(m) if ratios.len() == 1 => format!("/{} {m:.2}x (1 run)", against.name()),
            Some(m) => format!("/{} {m:.2}x ({})", against.name(), range(&ratios, 1.0, 2)),
            None => "-".into(),
        };
        let target = match (target, of_medians) {
            (Some(t), Some(m)) => format!(">= {t} {}", if m >= t { "met" } else { "MISSED" }),
            (Some(t), None) => format!(">= {t}"),
            (None, _) => "-".into(),
        };
        println!(
            "| {} | {} | {read_only} | {} | {ratio} | {target} |",
            op.name(),
            cell(&runs_of(op, Who::Direct), 1e9, 2),
            cell(&runs_of(op, Who::Writable), 1e9, 2),
        );
    }
    println!();
    for ((op, who), by_run) in &rates {
        let gbs: Vec<String> = by_run
            .iter()
            .map(|(run, rate)| format!("{run}:{:.2}", rate / 1e9))
            .collect();
        println!(
            "# runs, GB/s: {} / {}: {}",
            op.name(),
            who.name(),
            gbs.join(" ")
        );
    }
    if !costs.is_empty() {
        let faults: Vec<f64> = costs.iter().map(|c| c.faults_per_gib).collect();
        let write_cpu: Vec<f64> = costs.iter().map(|c| c.write_cpu_per_gib).collect();
        let read_cpu: Vec<f64> = costs.iter().map(|c| c.read_cpu_per_gib).collect();
        let major: u64 = costs.iter().map(|c| c.major_faults).sum();
        let met = if median(faults.clone()) <= 64.0 {
            "met"
        } else {
            "MISSED"
        };
        println!();
        println!("| writable daemon, per GiB written | median (range) | target |");
        println!("|---|---|---|");
        println!(
            "| page faults (minor + major), write phase | {} | <= 64 {met} |",
            cell(&faults, 1.0, 0)
        );
        println!(
            "| CPU s (utime + stime), write phase | {} | - |",
            cell(&write_cpu, 1.0, 2)
        );
        println!(
            "| CPU s, cold dirty read | {} | - |",
            cell(&read_cpu, 1.0, 2)
        );
        println!("# major faults in all write phases together: {major}");
    }
    if let Some(refused) = writable_refused {
        println!("# writable mount not measured: {refused}");
    }
    for failure in &failures {
        println!("# FAILED {failure}");
    }
    let mut chart = BarChart::new(
        "writable",
        &format!(
            "writable: {FILES} x {file_mib} MiB, 1 MiB writes and buffered reads, {runs} runs"
        ),
        "GB/s",
    );
    for op in Op::ALL {
        let (against, _) = op.reference();
        let gbps = |who: Who| -> Vec<f64> { runs_of(op, who).iter().map(|r| r / 1e9).collect() };
        let label = |who: Who| format!("{}: {}", op.name(), who.name());
        chart.bar(&label(against), &gbps(against));
        if chart.bars.iter().any(|b| b.label == label(against)) {
            chart.bar_vs(&label(Who::Writable), &gbps(Who::Writable), &label(against));
        } else {
            chart.bar(&label(Who::Writable), &gbps(Who::Writable));
        }
    }
    chart.write();
    let _ = fs::remove_dir_all(&base);
}
