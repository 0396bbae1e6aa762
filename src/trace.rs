//! Access traces: the order in which a mount's readers first read each object of the manifest,
//! and which byte ranges of it, kept in `--cache-dir` as `DIR/Traces/{manifest-id}` (the xxh128
//! of the manifest's bytes, as for the overlay) so that a later mount of the same manifest — the
//! next task of the job, maybe on another node — can prefetch those objects before its readers
//! ask (`--prefetch trace`, `fs::shard::prefetch`).
//!
//! Recording costs the read path one set lookup: each shard notes the first read of each
//! (object, block) in its own slot of a [`TraceRecorder`] with a process-wide sequence number,
//! and only the control side ([`TraceWriter`], its own thread) merges the slots in sequence
//! order, every [`WRITE_INTERVAL`] and at unmount, into a file written atomically (temporary
//! file, then rename). The file is the union of this mount's trace (first) and the trace the
//! mount found (its entries this mount did not read), at most [`MAX_ENTRIES`] objects. Without
//! `--cache-dir` nothing is recorded: there is nowhere to write.
//!
//! Format (JSON, one object per line after the header, so it stays readable and diffable):
//! `{"format":"mount_vfs-trace","version":1,"objects":[["{hash}",LEN,[[START,END],...]],...]}`,
//! objects in first-read order, byte ranges read of each (block-aligned, merged). A file that
//! does not parse is ignored (one log line) and replaced at the next write.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::manifest::Hash;

const FORMAT: &str = "mount_vfs-trace";
const VERSION: u32 = 1;
/// How often a mount rewrites its trace while it runs (only when it changed).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(10);
/// How often a mount publishes its trace while it runs (only when it changed): each time is
/// one request to a remote store.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(60);
/// Most objects one trace keeps (about 80 bytes each on disk).
pub const MAX_ENTRIES: usize = 1_000_000;
/// Larger files are not read: no trace of [`MAX_ENTRIES`] objects comes near it.
const MAX_FILE_BYTES: u64 = 512 << 20;
/// A block number that stands for the whole object (an open the kernel serves itself, whose
/// reads the mount never sees).
pub const WHOLE_OBJECT: u32 = u32::MAX;

/// The name traces of the manifest whose bytes are `manifest_bytes` go by: the xxh128 of
/// those bytes, in hex.
pub fn manifest_id(manifest_bytes: &[u8]) -> String {
    crate::manifest::Hash::of(manifest_bytes).to_string()
}

/// Where the trace of the manifest whose bytes are `manifest_bytes` lives in `cache_dir`.
pub fn trace_path(cache_dir: &Path, manifest_bytes: &[u8]) -> PathBuf {
    cache_dir.join("Traces").join(manifest_id(manifest_bytes))
}

/// One object of a trace: its hash, length, and the byte ranges readers read (sorted, merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    pub hash: Hash,
    pub len: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl TraceEntry {
    /// Adds `[start, end)` to the ranges, keeping them sorted and merged.
    fn add_range(&mut self, start: u64, end: u64) {
        let at = self.ranges.partition_point(|&(_, e)| e < start);
        let mut merged = (start, end);
        while at < self.ranges.len() && self.ranges[at].0 <= merged.1 {
            let (s, e) = self.ranges.remove(at);
            merged = (merged.0.min(s), merged.1.max(e));
        }
        self.ranges.insert(at, merged);
    }
}

/// Objects in first-read order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trace {
    entries: Vec<TraceEntry>,
    index: HashMap<Hash, usize>,
}

/// Why a trace file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    #[error("larger than {} MiB", MAX_FILE_BYTES >> 20)]
    TooLarge,
    #[error("not a mount_vfs trace ({0})")]
    Garbage(String),
}

/// The file form: objects as `[hash, len, ranges]` arrays.
#[derive(serde::Serialize, serde::Deserialize)]
struct TraceFile {
    format: String,
    version: u32,
    objects: Vec<TracedObject>,
}

/// `[hash, len, [[start, end], ...]]`: one object and the byte ranges read of it.
type TracedObject = (String, u64, Vec<(u64, u64)>);

impl Trace {
    pub fn entries(&self) -> &[TraceEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Notes a first read of bytes `[start, end)` of object `hash` (of `len` bytes).
    pub fn add(&mut self, hash: Hash, len: u64, start: u64, end: u64) {
        let at = match self.index.get(&hash) {
            Some(&at) => at,
            None => {
                if self.entries.len() >= MAX_ENTRIES {
                    return;
                }
                self.entries.push(TraceEntry {
                    hash,
                    len,
                    ranges: Vec::new(),
                });
                self.index.insert(hash, self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[at];
        let end = end.min(entry.len);
        if start < end {
            entry.add_range(start, end);
        }
    }

    /// Keeps only the entries `keep` accepts (e.g. objects of the manifest), in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&TraceEntry) -> bool) {
        self.entries.retain(|entry| keep(entry));
        self.reindex();
    }

    fn reindex(&mut self) {
        self.index = (self.entries.iter().enumerate())
            .map(|(i, entry)| (entry.hash, i))
            .collect();
    }

    /// This trace followed by the entries of `older` it does not have (their ranges merged
    /// into ours where both have the object), at most [`MAX_ENTRIES`].
    pub fn union(&self, older: &Trace) -> Trace {
        let mut merged = self.clone();
        for entry in &older.entries {
            for &(start, end) in &entry.ranges {
                merged.add(entry.hash, entry.len, start, end);
            }
        }
        merged
    }

    /// Reads the trace at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Trace>, TraceError> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if file.metadata()?.len() > MAX_FILE_BYTES {
            return Err(TraceError::TooLarge);
        }
        let bytes = std::fs::read(path)?;
        Trace::decode(&bytes).map(Some)
    }

    /// Parses a trace file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Trace, TraceError> {
        let file: TraceFile =
            serde_json::from_slice(bytes).map_err(|e| TraceError::Garbage(e.to_string()))?;
        if file.format != FORMAT || file.version != VERSION {
            return Err(TraceError::Garbage(format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                file.format, file.version
            )));
        }
        let mut trace = Trace::default();
        for (hash, len, ranges) in file.objects {
            let hash = Hash::from_hex(&hash)
                .ok_or_else(|| TraceError::Garbage(format!("{hash:?} is not an object hash")))?;
            if ranges.is_empty() {
                // An object named without ranges still says it was read.
                trace.add(hash, len, 0, len);
            }
            for (start, end) in ranges {
                trace.add(hash, len, start, end);
            }
        }
        Ok(trace)
    }

    fn encode(&self) -> Vec<u8> {
        self.encode_within(usize::MAX)
    }

    /// The file form of the longest prefix of this trace that takes at most `limit` bytes (the
    /// first-read objects matter most); at least the header.
    pub fn encode_within(&self, limit: usize) -> Vec<u8> {
        const END: &[u8] = b"\n]}\n";
        let mut out = Vec::with_capacity((64 + self.entries.len() * 80).min(limit));
        let _ = write!(
            out,
            "{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"objects\":["
        );
        let mut line = Vec::with_capacity(128);
        for (i, entry) in self.entries.iter().enumerate() {
            line.clear();
            let ranges = serde_json::to_string(&entry.ranges).unwrap_or_else(|_| "[]".into());
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(line, "{comma}\n[\"{}\",{},{ranges}]", entry.hash, entry.len);
            if out.len() + line.len() + END.len() > limit {
                break;
            }
            out.extend_from_slice(&line);
        }
        out.extend_from_slice(END);
        out
    }

    /// Writes the trace to `path` atomically: a temporary file in the same directory, renamed
    /// over the old one, so a reader sees the old trace or the new one, never half of one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let temporary = path.with_file_name(name);
        let result = std::fs::write(&temporary, self.encode())
            .and_then(|()| std::fs::rename(&temporary, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }
}

/// A first read a shard noted: `block` of object `hash` (or [`WHOLE_OBJECT`]).
#[derive(Debug, Clone, Copy)]
struct FirstRead {
    seq: u64,
    hash: Hash,
    len: u64,
    block: u32,
}

/// Where the shards note first reads: one slot per shard (only its shard and the writer, every
/// few seconds, ever lock it) and one sequence number for their order across shards.
#[derive(Debug)]
pub struct TraceRecorder {
    block_size: u64,
    seq: AtomicU64,
    slots: Vec<Mutex<Vec<FirstRead>>>,
}

impl TraceRecorder {
    pub fn new(shards: usize, block_size: u64) -> Arc<TraceRecorder> {
        Arc::new(TraceRecorder {
            block_size,
            seq: AtomicU64::new(0),
            slots: (0..shards).map(|_| Mutex::default()).collect(),
        })
    }

    /// Shard `shard` saw the first read of `block` of object `hash` (`len` bytes). The caller
    /// makes sure each (object, block) is noted once.
    pub fn record(&self, shard: usize, hash: Hash, len: u64, block: u32) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slots.get(shard) {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.push(FirstRead {
                seq,
                hash,
                len,
                block,
            });
        }
    }

    /// Moves everything noted since the last call into `trace`, in read order; false if there
    /// was nothing new.
    fn drain_into(&self, trace: &mut Trace) -> bool {
        let mut reads: Vec<FirstRead> = Vec::new();
        for slot in &self.slots {
            reads.append(&mut slot.lock().unwrap_or_else(|e| e.into_inner()));
        }
        reads.sort_unstable_by_key(|read| read.seq);
        for read in &reads {
            let (start, end) = if read.block == WHOLE_OBJECT {
                (0, read.len)
            } else {
                let start = read.block as u64 * self.block_size;
                (start, start + self.block_size)
            };
            trace.add(read.hash, read.len, start, end);
        }
        !reads.is_empty()
    }
}

/// Somewhere besides the file that this mount's own trace goes (`--share-traces`: the S3
/// bucket), from the writer's thread.
pub trait PublishTrace: Send {
    /// Publishes `mine`, this mount's trace so far (not the union with what it found, which
    /// others already published); false when it failed and should be tried again later.
    fn publish(&mut self, mine: &Trace) -> bool;
}

/// The control side of recording: a thread that writes the mount's trace every
/// [`WRITE_INTERVAL`] while it changed, and once more when dropped (after the shards stopped);
/// and publishes it, when asked to, every [`PUBLISH_INTERVAL`] while it changed and at the end.
pub struct TraceWriter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TraceWriter {
    /// Starts writing what `recorder` gathers to `path`, as the union with `found` (the trace
    /// this mount found, already limited to the manifest's objects), and publishing this
    /// mount's own part of it to `publisher`.
    pub fn start(
        recorder: Arc<TraceRecorder>,
        path: PathBuf,
        found: Trace,
        mut publisher: Option<Box<dyn PublishTrace>>,
    ) -> std::io::Result<TraceWriter> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mount_vfs-trace".into())
            .spawn(move || {
                let mut mine = Trace::default();
                let mut failed = false;
                let mut unpublished = false;
                let mut published_at = std::time::Instant::now();
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(WRITE_INTERVAL),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    );
                    let changed = recorder.drain_into(&mut mine);
                    unpublished |= changed;
                    if changed {
                        match mine.union(&found).write(&path) {
                            Ok(()) => failed = false,
                            // One line per run of failures, not one per interval.
                            Err(e) if !failed => {
                                failed = true;
                                tracing::warn!(
                                    "cannot write trace {}: {e}; the next mount of this \
                                     manifest cannot prefetch what this one read",
                                    path.display()
                                );
                            }
                            Err(_) => {}
                        }
                    }
                    // After the local write: that one is cheap, this one a remote request.
                    if let Some(publisher) = publisher.as_mut() {
                        if unpublished && (last || published_at.elapsed() >= PUBLISH_INTERVAL) {
                            published_at = std::time::Instant::now();
                            unpublished = !publisher.publish(&mine);
                        }
                    }
                    if last {
                        if !mine.is_empty() {
                            tracing::info!(
                                "trace {}: {} objects read, in order",
                                path.display(),
                                mine.len()
                            );
                        }
                        return;
                    }
                }
            })?;
        Ok(TraceWriter {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u128) -> Hash {
        Hash(n)
    }

    #[test]
    fn ranges_merge_and_order_is_first_read() {
        let mut trace = Trace::default();
        trace.add(h(2), 100, 0, 10);
        trace.add(h(1), 50, 40, 60);
        trace.add(h(2), 100, 20, 30);
        trace.add(h(2), 100, 10, 20);
        let entries = trace.entries();
        assert_eq!(entries[0].hash, h(2));
        assert_eq!(entries[0].ranges, vec![(0, 30)]);
        // Clamped to the object's length.
        assert_eq!(entries[1].ranges, vec![(40, 50)]);
    }

    #[test]
    fn encode_decode_round_trips_and_garbage_is_an_error() {
        let mut trace = Trace::default();
        trace.add(h(7), 9 << 20, 0, 4 << 20);
        trace.add(h(7), 9 << 20, 8 << 20, 12 << 20);
        trace.add(h(3), 11, 0, 11);
        let bytes = trace.encode();
        assert_eq!(Trace::decode(&bytes).unwrap(), trace);
        assert!(Trace::decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(Trace::decode(b"\x00\x01garbage").is_err());
        assert!(Trace::decode(br#"{"format":"other","version":1,"objects":[]}"#).is_err());
    }

    #[test]
    fn a_bounded_encoding_keeps_the_first_read_objects() {
        let mut trace = Trace::default();
        for n in 0..1000 {
            trace.add(h(n), 4096, 0, 4096);
        }
        let whole = trace.encode();
        let cut = trace.encode_within(whole.len() / 3);
        assert!(cut.len() <= whole.len() / 3);
        let decoded = Trace::decode(&cut).unwrap();
        assert!(
            decoded.len() > 200 && decoded.len() < 1000,
            "{}",
            decoded.len()
        );
        assert_eq!(decoded.entries(), &trace.entries()[..decoded.len()]);
        assert!(Trace::decode(&trace.encode_within(0)).unwrap().is_empty());
    }

    /// Hands every published trace to the test.
    struct Collect(mpsc::Sender<Trace>);

    impl PublishTrace for Collect {
        fn publish(&mut self, mine: &Trace) -> bool {
            self.0.send(mine.clone()).is_ok()
        }
    }

    #[test]
    fn the_writer_publishes_its_own_trace_at_the_end_and_nothing_when_nothing_was_read() {
        let dir = std::env::temp_dir().join(format!("trace-publish-{}", std::process::id()));
        let mut found = Trace::default();
        found.add(h(1), 10, 0, 10);
        for read in [false, true] {
            let recorder = TraceRecorder::new(1, 4);
            let (sent, published) = mpsc::channel();
            let writer = TraceWriter::start(
                recorder.clone(),
                dir.join("t"),
                found.clone(),
                Some(Box::new(Collect(sent))),
            )
            .unwrap();
            if read {
                recorder.record(0, h(2), 8, 0);
            }
            drop(writer);
            let published: Vec<Trace> = published.try_iter().collect();
            if read {
                // Only this mount's part: not the trace it found.
                assert_eq!(published.len(), 1);
                let order: Vec<Hash> = published[0].entries().iter().map(|e| e.hash).collect();
                assert_eq!(order, vec![h(2)]);
            } else {
                assert!(published.is_empty());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn union_puts_the_newer_order_first() {
        let mut older = Trace::default();
        older.add(h(1), 10, 0, 10);
        older.add(h(2), 10, 0, 5);
        let mut newer = Trace::default();
        newer.add(h(2), 10, 5, 10);
        newer.add(h(3), 10, 0, 10);
        let merged = newer.union(&older);
        let order: Vec<Hash> = merged.entries().iter().map(|e| e.hash).collect();
        assert_eq!(order, vec![h(2), h(3), h(1)]);
        assert_eq!(merged.entries()[0].ranges, vec![(0, 10)]);
    }

    #[test]
    fn recorder_orders_reads_across_shards() {
        let recorder = TraceRecorder::new(2, 4);
        recorder.record(1, h(9), 10, 0);
        recorder.record(0, h(8), 10, 1);
        recorder.record(1, h(9), 10, 2);
        recorder.record(0, h(7), 3, WHOLE_OBJECT);
        let mut trace = Trace::default();
        assert!(recorder.drain_into(&mut trace));
        let order: Vec<Hash> = trace.entries().iter().map(|e| e.hash).collect();
        assert_eq!(order, vec![h(9), h(8), h(7)]);
        assert_eq!(trace.entries()[0].ranges, vec![(0, 4), (8, 10)]);
        assert_eq!(trace.entries()[2].ranges, vec![(0, 3)]);
        assert!(!recorder.drain_into(&mut trace));
    }
}
