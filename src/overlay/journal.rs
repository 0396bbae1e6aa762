//! The overlay's journal and checkpoint: how [`Delta`] survives a crash.
//!
//! `journal` holds one line per record: `{xxh3-64 of the rest, hex} {json}\n`, the JSON being
//! `{"seq": N, "record": ...}`. A record is appended with one `write` before the operation is
//! answered, so a `kill -9` loses nothing answered (the page cache survives the process); power
//! loss keeps what `sync` (an `fsync` or `fsyncdir`) made durable. Replay stops at the first torn
//! or damaged line and cuts the journal there: a crash leaves every operation whole or absent.
//!
//! `checkpoint` is the whole delta with the sequence number of its last record, replaced
//! atomically (write, fsync, rename, fsync the directory); records at or below that number
//! are skipped at replay, so a crash between writing a checkpoint and emptying the journal
//! applies nothing twice.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::delta::{Delta, Owner, Record};
use crate::namespace::Namespace;

/// A journal line's JSON, as written.
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    record: &'a Record,
}

/// A journal line's JSON, as read back.
#[derive(Deserialize)]
struct Line {
    seq: u64,
    record: Record,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    seq: u64,
    delta: Delta,
}

/// The open journal: appends and syncs.
pub struct Journal {
    file: File,
    path: PathBuf,
    /// Sequence number of the last record written.
    seq: u64,
    /// Bytes of whole records in the file (a failed append is cut back to this).
    len: u64,
    /// Records appended since the last sync.
    unsynced: bool,
}

/// What [`Journal::open`] found.
pub struct Replayed {
    pub journal: Journal,
    pub delta: Delta,
    /// Records replayed from the journal (after the checkpoint).
    pub records: u64,
    /// Bytes of a torn or damaged tail that were cut off.
    pub cut: u64,
}

impl Journal {
    /// Loads `dir/checkpoint` and replays `dir/journal` onto it (onto an empty delta when
    /// there is no checkpoint yet). `writable`: the caller holds the overlay's lock, and a torn
    /// tail is cut off; otherwise (an export beside a live mount) nothing is changed on disk.
    pub fn open(
        dir: &Path,
        base: &Namespace,
        owner: Owner,
        writable: bool,
    ) -> std::io::Result<Replayed> {
        let (mut seq, mut delta) = match std::fs::read(dir.join("checkpoint")) {
            Ok(bytes) => {
                let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::other(format!(
                        "{}: damaged checkpoint ({e}); the overlay cannot be trusted",
                        dir.join("checkpoint").display()
                    ))
                })?;
                (checkpoint.seq, checkpoint.delta)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Delta::new(base)),
            Err(e) => return Err(e),
        };
        let path = dir.join("journal");
        let mut file = if writable {
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)?
        } else {
            match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::open("/dev/null")?,
                Err(e) => return Err(e),
            }
        };
        let total = file.metadata()?.len();
        let mut good = 0u64;
        let mut records = 0u64;
        let mut reader = BufReader::new(&mut file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let Some(parsed) = parse(&line[..n - 1]) else {
                break;
            };
            if parsed.seq > seq {
                delta.apply(base, owner, &parsed.record);
                seq = parsed.seq;
                records += 1;
            }
            good += n as u64;
        }
        drop(reader);
        if good < total && writable {
            tracing::warn!(
                "{}: cut {} bytes of a torn or damaged last record (an operation that was \
                 never answered)",
                path.display(),
                total - good
            );
            file.set_len(good)?;
        }
        Ok(Replayed {
            journal: Journal {
                file,
                path,
                seq,
                len: good,
                unsynced: false,
            },
            delta,
            records,
            cut: total - good,
        })
    }

    /// Appends `record` with one `write`. On failure (ENOSPC) the file is cut back to its last
    /// whole record and nothing was journaled.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let seq = self.seq + 1;
        let json = serde_json::to_vec(&LineOut { seq, record }).map_err(std::io::Error::other)?;
        let mut line = Vec::with_capacity(json.len() + 18);
        write!(line, "{:016x} ", xxh3_64(&json))?;
        line.extend_from_slice(&json);
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.seq = seq;
        self.len += line.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes `delta` (the state after every record so far) as the checkpoint, then empties the
    /// journal.
    pub fn checkpoint(&mut self, delta: &Delta) -> std::io::Result<()> {
        let dir = self.path.parent().expect("journal lives in a directory");
        let tmp = dir.join("checkpoint.tmp");
        let bytes = serde_json::to_vec(&Checkpoint {
            seq: self.seq,
            delta: delta.clone(),
        })
        .map_err(std::io::Error::other)?;
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join("checkpoint"))?;
        File::open(dir)?.sync_all()?;
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        self.unsynced = false;
        Ok(())
    }
}

/// One journal line without its newline, if whole and undamaged.
fn parse(line: &[u8]) -> Option<Line> {
    let (digest, json) = (line.get(..16)?, line.get(17..)?);
    let digest = u64::from_str_radix(std::str::from_utf8(digest).ok()?, 16).ok()?;
    if line.get(16) != Some(&b' ') || xxh3_64(json) != digest {
        return None;
    }
    serde_json::from_slice(json).ok()
}
