//! Putting content into a local CAS directory: what `snapshot` and `export` share.
//!
//! - [`ObjectStream`]: bytes in, CAS objects out. Each piece (the whole content, or each
//!   256 MiB chunk of a v2025 file) is hashed with XXH3-128 while it is written to a temporary
//!   file in `CAS/Data/` ([`CasWriter`]), then renamed to `{hash}.xxh128` unless an object of
//!   that hash is already there. A piece whose hash is known without reading is [kept](ObjectStream::keep).
//! - [`Cas`]: the CAS directory and its counters (objects written, objects already present).
//! - [`run_parallel`]: a list of jobs worked through by one thread per core, stopping early at
//!   the first failure.
//! - [`Progress`]: the progress bar on stderr (only when it is a terminal).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::manifest::{Content, Hash, HashStream};
use crate::store::{object_key, CasWriter};

/// Read size while hashing: large enough for sequential disk throughput, small enough that N
/// workers hold only N blocks.
pub const BLOCK: usize = 4 << 20;

/// A CAS directory receiving objects, with what this run did to it.
pub struct Cas<'a> {
    root: &'a Path,
    /// Names the temporary files (`.{name}.partial-{pid}-{n}`).
    name: &'static str,
    seq: AtomicU64,
    written: AtomicU64,
    present: AtomicU64,
}

impl<'a> Cas<'a> {
    pub fn new(root: &'a Path, name: &'static str) -> Cas<'a> {
        Cas {
            root,
            name,
            seq: AtomicU64::new(0),
            written: AtomicU64::new(0),
            present: AtomicU64::new(0),
        }
    }

    pub fn root(&self) -> &Path {
        self.root
    }

    /// Objects this run put into the CAS.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Objects this run hashed that the CAS already held.
    pub fn present(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    fn begin(&self) -> io::Result<CasWriter> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        CasWriter::create(self.root, self.name, n as usize)
    }

    /// Puts the object in place unless an object of that hash already exists.
    fn commit(&self, writer: CasWriter, hash: Hash) -> io::Result<()> {
        if self.root.join(object_key(hash)).exists() {
            self.present.fetch_add(1, Ordering::Relaxed);
            return Ok(()); // dropping the writer deletes its temporary file
        }
        self.written.fetch_add(1, Ordering::Relaxed);
        writer.commit(hash)
    }
}

/// One file's content on its way into the CAS, cut into pieces of `limit` bytes (`u64::MAX`:
/// one piece). An error drops the open writer, which deletes its temporary file.
pub struct ObjectStream<'c, 'a> {
    cas: &'c Cas<'a>,
    limit: u64,
    writer: Option<CasWriter>,
    hasher: HashStream,
    in_piece: u64,
    pieces: Vec<Hash>,
}

impl<'c, 'a> ObjectStream<'c, 'a> {
    pub fn new(cas: &'c Cas<'a>, limit: u64) -> ObjectStream<'c, 'a> {
        ObjectStream {
            cas,
            limit,
            writer: None,
            hasher: HashStream::default(),
            in_piece: 0,
            pieces: Vec::new(),
        }
    }

    /// Appends `data`, committing each piece as it fills.
    pub fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = usize::try_from(self.limit - self.in_piece).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(room.min(data.len()));
            let writer = match &mut self.writer {
                Some(writer) => writer,
                empty => empty.insert(self.cas.begin()?),
            };
            writer.write_at(self.in_piece, now)?;
            self.hasher.update(now);
            self.in_piece += now.len() as u64;
            data = rest;
            if self.in_piece == self.limit {
                self.end_piece()?;
            }
        }
        Ok(())
    }

    /// A whole piece whose object is known without reading it; call it at a piece boundary.
    pub fn keep(&mut self, hash: Hash) {
        debug_assert_eq!(self.in_piece, 0, "a kept piece starts at a piece boundary");
        self.pieces.push(hash);
    }

    /// Commits the last piece (the empty content is one 0-byte object) and returns every
    /// piece's hash, in order.
    pub fn finish(mut self) -> io::Result<Vec<Hash>> {
        if self.in_piece > 0 || self.pieces.is_empty() {
            self.end_piece()?;
        }
        Ok(self.pieces)
    }

    fn end_piece(&mut self) -> io::Result<()> {
        let hash = self.hasher.finish();
        let writer = match self.writer.take() {
            Some(writer) => writer,
            None => self.cas.begin()?,
        };
        self.cas.commit(writer, hash)?;
        self.pieces.push(hash);
        self.hasher = HashStream::default();
        self.in_piece = 0;
        Ok(())
    }
}

/// A file's content as a manifest names it: one object, or its chunks.
pub fn content(pieces: &[Hash]) -> Content<'_> {
    match pieces {
        [one] => Content::Whole(*one),
        many => Content::Chunked(many),
    }
}

/// Runs `work` on every job, on one thread per core (each with its own [`BLOCK`] buffer), and
/// returns the results in job order. After a failure no new job starts; those left are `None`.
pub fn run_parallel<J, R, E, F>(jobs: &[J], work: F) -> Vec<Option<Result<R, E>>>
where
    J: Sync,
    R: Send,
    E: Send,
    F: Fn(&J, &mut [u8]) -> Result<R, E> + Sync,
{
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R, E>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = vec![0u8; BLOCK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = work(job, &mut buf);
                    let failed = r.is_err();
                    if let Ok(mut all) = results.lock() {
                        if let Some(slot) = all.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                    if failed {
                        next.store(usize::MAX / 2, Ordering::Relaxed); // stop the others early
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// An optional progress bar (only when stderr is a terminal).
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    pub fn new(total: u64, enabled: bool) -> Progress {
        Progress(enabled.then(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "hashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        }))
    }

    pub fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(cas: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cas.join("Data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn streams_cut_pieces_keep_known_ones_and_skip_present_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("Data")).unwrap();
        let cas = Cas::new(dir.path(), "test");
        let mut stream = ObjectStream::new(&cas, 4);
        stream.feed(b"ab").unwrap();
        stream.feed(b"cdef").unwrap(); // fills "abcd", starts "ef"
        stream.feed(b"gh").unwrap(); // fills "efgh"
        stream.keep(Hash(7));
        stream.feed(b"i").unwrap();
        let pieces = stream.finish().unwrap();
        assert_eq!(
            pieces,
            [
                Hash::of(b"abcd"),
                Hash::of(b"efgh"),
                Hash(7),
                Hash::of(b"i")
            ]
        );
        assert_eq!((cas.written(), cas.present()), (3, 0));
        let data = dir.path().join("Data");
        assert_eq!(
            std::fs::read(data.join(format!("{}.xxh128", Hash::of(b"efgh")))).unwrap(),
            b"efgh"
        );
        // The same bytes again: nothing new, no temporary file left behind.
        let mut again = ObjectStream::new(&cas, u64::MAX);
        again.feed(b"abcd").unwrap();
        assert_eq!(again.finish().unwrap(), [Hash::of(b"abcd")]);
        assert_eq!((cas.written(), cas.present()), (3, 1));
        // The empty content is one 0-byte object.
        assert_eq!(
            ObjectStream::new(&cas, 4).finish().unwrap(),
            [Hash::of(b"")]
        );
        assert_eq!(objects(dir.path()).len(), 4);
    }

    #[test]
    fn parallel_results_keep_job_order_and_stop_after_a_failure() {
        let jobs: Vec<u32> = (0..50).collect();
        let results = run_parallel(&jobs, |j, buf| {
            assert_eq!(buf.len(), BLOCK);
            Ok::<_, ()>(j * 2)
        });
        let doubled: Vec<u32> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(doubled, (0..50).map(|j| j * 2).collect::<Vec<_>>());
        let results = run_parallel(&jobs, |&j, _| if j == 0 { Err(j) } else { Ok(j) });
        assert_eq!(results[0], Some(Err(0)));
    }
}
