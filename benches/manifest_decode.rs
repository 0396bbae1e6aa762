//! Decode+validate, encode and memory per entry for 1,000,000-entry manifests.
//! Run: `cargo bench --bench manifest_decode` (numbers go to docs/benchmarks.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mount_vfs::manifest::{Content, FileEntry, Format, Hash, Manifest, ManifestBuilder};

mod common;

use common::chart::BarChart;

/// Counts live and peak heap bytes so "bytes per entry" is exact, not an RSS estimate.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's layout unchanged, so System's
// guarantees hold; the counters are plain atomics and never touch the returned memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as our caller's: a non-zero-size layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; `ptr` was allocated by us with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const N: usize = 1_000_000;

/// 10 sequences x 40 shots x 5 versions x 500 frames of `beauty.####.exr`.
fn realistic() -> Manifest {
    let mut b = ManifestBuilder::new(Format::V2023_03_03);
    let mut i = 0u64;
    for sq in 0..10 {
        for sh in 0..40 {
            for v in 1..=5 {
                for frame in 1001..1501 {
                    let path = format!(
                        "shots/sq{:03}/sh{:04}/render/v{v:03}/beauty.{frame}.exr",
                        sq * 10 + 10,
                        sh * 10 + 10
                    );
                    i += 1;
                    b.add_file(
                        path.as_bytes(),
                        FileEntry {
                            size: 10_000_000 + i * 7919 % 5_000_000,
                            mtime_us: 1_700_000_000_000_000 + (i as i64) * 1_000_003,
                            executable: false,
                            content: Content::Whole(Hash::of(&i.to_le_bytes())),
                        },
                    );
                }
            }
        }
    }
    b.build().expect("valid")
}

fn stats(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    (times[0].as_secs_f64(), times[times.len() / 2].as_secs_f64())
}

struct Row {
    name: &'static str,
    /// Every decode's and encode's seconds.
    decodes: Vec<f64>,
    encodes: Vec<f64>,
    bytes: usize,
    best: f64,
    median: f64,
    enc: f64,
    live_per_entry: f64,
    peak_per_entry: f64,
}

fn measure(name: &'static str, text: &[u8], runs: usize) -> Row {
    let mut times = Vec::new();
    let mut live_per_entry = 0.0;
    let mut peak_per_entry = 0.0;
    for _ in 0..runs {
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let t = Instant::now();
        let m = Manifest::decode(text, name).expect("decodes");
        times.push(t.elapsed());
        assert!(m.len() >= N);
        live_per_entry = (LIVE.load(Ordering::Relaxed) - before) as f64 / m.len() as f64;
        peak_per_entry = (PEAK.load(Ordering::Relaxed) - before) as f64 / m.len() as f64;
        drop(m);
    }
    let m = Manifest::decode(text, name).expect("decodes");
    let mut enc = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = m.encode();
        enc.push(t.elapsed());
        assert_eq!(out, text, "canonical round trip");
    }
    let decodes = times.iter().map(Duration::as_secs_f64).collect();
    let encodes = enc.iter().map(Duration::as_secs_f64).collect();
    let (best, median) = stats(times);
    Row {
        name,
        decodes,
        encodes,
        bytes: text.len(),
        best,
        median,
        enc: stats(enc).0,
        live_per_entry,
        peak_per_entry,
    }
}

fn main() {
    let t = Instant::now();
    let m = realistic();
    let build = t.elapsed();
    let v2023 = m.encode();
    let beta = m
        .convert(Format::V2025_12_04Beta)
        .expect("converts")
        .encode();
    drop(m);
    let runs = 7;
    let rows = [
        measure("v2023-03-03", &v2023, runs),
        measure("v2025-12-04-beta", &beta, runs),
    ];
    println!(
        "1,000,000 files (plus dirs in v2025), builder+sort of the v2023 model: {:.3} s",
        build.as_secs_f64()
    );
    println!("| format | JSON size | decode+validate best | median ({runs} runs) | encode best | retained heap/entry | peak heap/entry during decode |");
    println!("|---|---|---|---|---|---|---|");
    let mut chart = BarChart::new(
        "manifest_decode",
        &format!("manifest_decode: 1,000,000 files, decode+validate ({runs} runs) and encode (3)"),
        "s",
    );
    chart.lower_is_better = true;
    for r in &rows {
        let decode = format!("decode+validate {}", r.name);
        match chart.bars.first().map(|b| b.label.clone()) {
            Some(first) => chart.bar_vs(&decode, &r.decodes, &first),
            None => chart.bar(&decode, &r.decodes),
        }
    }
    for r in &rows {
        let encode = format!("encode {}", r.name);
        match chart.bars.get(rows.len()).map(|b| b.label.clone()) {
            Some(first) => chart.bar_vs(&encode, &r.encodes, &first),
            None => chart.bar(&encode, &r.encodes),
        }
    }
    chart.write();
    for r in rows {
        println!(
            "| {} | {:.1} MB | {:.3} s | {:.3} s | {:.3} s | {:.1} B | {:.1} B |",
            r.name,
            r.bytes as f64 / 1e6,
            r.best,
            r.median,
            r.enc,
            r.live_per_entry,
            r.peak_per_entry
        );
    }
}
