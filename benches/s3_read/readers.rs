//! How every contender is read and timed: the same reader layout, the same 1 MiB reads into
//! pre-faulted buffers, the bytes checked after the clock stops, the page cache dropped before
//! every cold read, and the counters that go with each measurement.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::common::{drop_caches, faults_and_cpu};
use crate::mounts::Mount;
use crate::server::Server;

pub const MIB: usize = 1 << 20;
/// Every read through a mount asks for this much.
const READ_SIZE: usize = MIB;

/// A zeroed, 4 KiB-aligned buffer, as O_DIRECT reads need.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes that we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Opens `path` for reading, with O_DIRECT when `direct`.
fn open(path: &Path, direct: bool) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Reads `[start, end)` of `path` in 1 MiB reads into `dest` (at least `end - start` bytes,
/// pre-faulted by the caller); returns the bytes read.
fn read_range(
    path: &Path,
    start: u64,
    end: u64,
    direct: bool,
    dest: &mut [u8],
) -> Result<u64, String> {
    let file = open(path, direct).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut offset = start;
    while offset < end {
        let want = ((end - offset) as usize).min(READ_SIZE);
        let at = (offset - start) as usize;
        let n = file
            .read_at(&mut dest[at..at + want], offset)
            .map_err(|e| format!("read {} at {offset}: {e}", path.display()))?;
        if n == 0 {
            return Err(format!(
                "{}: EOF at {offset}, expected {end}",
                path.display()
            ));
        }
        offset += n as u64;
    }
    Ok(offset - start)
}

/// xxh3-128 of every reader's range of the source files, to check what each contender returned
/// (after its clock stopped): a contender that returns wrong bytes gets a failed run, not a
/// fast one. Filled once by [`Data::create`](crate::data::Data::create).
pub static EXPECTED: std::sync::OnceLock<BTreeMap<(&'static str, u64, u64), u128>> =
    std::sync::OnceLock::new();

/// A buffer for `len` bytes with every page already faulted in, so the timed reads of every
/// contender pay the same (no) page-fault cost.
fn prefaulted(len: usize) -> AlignedBuf {
    let mut buffer = AlignedBuf::new(len.next_multiple_of(4096).max(4096));
    for page in buffer.as_mut().chunks_mut(4096) {
        page[0] = 1;
    }
    buffer
}

/// The reader layout shared by every contender: one reader takes `a` whole; four take the two
/// halves of `a` and of `b`. `(file, start, end)`.
pub fn layout(readers: usize, size: u64) -> Vec<(&'static str, u64, u64)> {
    match readers {
        1 => vec![("a.bin", 0, size)],
        4 => vec![
            ("a.bin", 0, size / 2),
            ("a.bin", size / 2, size),
            ("b.bin", 0, size / 2),
            ("b.bin", size / 2, size),
        ],
        _ => unreachable!(),
    }
}

/// Runs the readers in parallel; returns aggregate bytes per second. With `check`, each reader's
/// bytes are hashed after the clock stopped and compared with the source (the do-nothing FUSE
/// server serves no real content and is not checked).
pub fn read_files(
    dir: &Path,
    readers: usize,
    size: u64,
    direct: bool,
    check: bool,
) -> Result<f64, String> {
    let ranges = layout(readers, size);
    let buffers: Vec<AlignedBuf> = ranges
        .iter()
        .map(|(_, start, end)| prefaulted((end - start) as usize))
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = ranges
        .iter()
        .zip(buffers)
        .map(|(&(name, start, end), buffer)| {
            let path = dir.join(name);
            let mut buffer = SendBuf(buffer);
            std::thread::spawn(move || {
                let read = read_range(&path, start, end, direct, buffer.0.as_mut());
                read.map(|n| (n, buffer))
            })
        })
        .collect();
    let mut total = 0;
    let mut results = Vec::new();
    for t in threads {
        let (n, buffer) = t.join().map_err(|_| "reader panicked".to_string())??;
        total += n;
        results.push(buffer);
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    if check {
        let expected = EXPECTED.get().expect("expected digests");
        for ((name, start, end), mut buffer) in ranges.into_iter().zip(results) {
            let got = xxhash_rust::xxh3::xxh3_128(&buffer.0.as_mut()[..(end - start) as usize]);
            if expected.get(&(name, start, end)) != Some(&got) {
                return Err(format!(
                    "{name} [{start}, {end}) through {}: wrong bytes",
                    dir.display()
                ));
            }
        }
    }
    Ok(rate)
}

/// An [`AlignedBuf`] moved to a reader thread and back; only one thread touches it at a time.
struct SendBuf(AlignedBuf);

// SAFETY: the buffer is owned (no aliasing); ownership moves to the reader thread and back.
unsafe impl Send for SendBuf {}

/// Open + first 1 MiB (O_DIRECT) of `a.bin`: seconds.
pub fn first_byte(dir: &Path) -> Result<f64, String> {
    let mut buffer = prefaulted(READ_SIZE);
    let started = Instant::now();
    read_range(
        &dir.join("a.bin"),
        0,
        READ_SIZE as u64,
        true,
        buffer.as_mut(),
    )?;
    Ok(started.elapsed().as_secs_f64())
}

/// One measured configuration: all its runs.
#[derive(Default)]
pub struct Samples {
    pub rates: Vec<f64>,
    pub faults_per_gib: Vec<f64>,
    pub cpu_per_gib: Vec<f64>,
    /// Bytes fetched from S3 per byte read through the mount.
    pub fetched_per_read: Vec<f64>,
    pub errors: Vec<String>,
}

/// One cold read of the reader layout through `mount`, added to `samples`.
pub fn measure(
    mount: &Mount,
    server: &Server,
    readers: usize,
    size: u64,
    direct: bool,
    samples: &mut Samples,
) {
    let gib = (1u64 << 30) as f64;
    let (f0, c0) = faults_and_cpu(mount.pid());
    drop_caches();
    let s0 = server.served();
    match read_files(&mount.files, readers, size, direct, true) {
        Ok(rate) => {
            let (f1, c1) = faults_and_cpu(mount.pid());
            let read_gib = (size * if readers == 1 { 1 } else { 2 }) as f64 / gib;
            samples.rates.push(rate);
            samples.faults_per_gib.push((f1 - f0) as f64 / read_gib);
            samples.cpu_per_gib.push((c1 - c0) / read_gib);
            samples
                .fetched_per_read
                .push((server.served() - s0) as f64 / (read_gib * gib));
        }
        Err(e) => samples.errors.push(e),
    }
}
