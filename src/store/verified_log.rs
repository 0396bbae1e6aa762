//! Verification records of the disk cache (`DIR/verified.log`): which cache files a mount has
//! verified, with their per-block digests, so that a later mount trusts an unchanged file
//! without hashing it again (a job's tasks mount the same inputs one after another).
//!
//! Rules:
//! - A record names the cache file's identity when it was verified: device, inode, size, mtime
//!   and ctime. Any write to a file changes its ctime, and replacing it changes its inode, so a
//!   file whose identity still matches holds the bytes that were verified. (Linux 6.13+ gives
//!   ext4, xfs, btrfs and tmpfs fine-grained ctimes once a ctime was read; on older kernels a
//!   change within one timer tick of the record could go unseen: `--recheck-cache` hashes every
//!   file once regardless.)
//! - A trusted object keeps the same guarantee as one verified in this mount: its block digests
//!   come from the record, and every block read again is checked against them.
//! - The log is append-only: each shard appends one line per verification, opening the log for
//!   each append (so a log another mount compacted meanwhile is not written into a renamed-away
//!   file). A line is complete only with its newline: a torn or garbage line, or lines of two
//!   writers interleaved, fail to parse and are skipped. Start-up keeps the last record of each
//!   object and rewrites the log when stale lines dominate or the last line is torn.
//! - Whoever can write the cache directory can change cache files anyway: the log adds no trust
//!   that the directory did not already have.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::manifest::Hash;

/// What identifies a file's bytes without reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One verification of a cache file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub identity: FileIdentity,
    /// The block size the digests were taken at (`--part-size` of that mount).
    pub block_size: u64,
    /// xxh3-64 of every block of the object, in order.
    pub digests: Vec<u64>,
}

impl Record {
    fn line(&self, hash: Hash) -> String {
        let i = &self.identity;
        let mut line = format!(
            "{hash} {} {} {} {} {} {} {} {}",
            i.dev, i.ino, i.size, i.mtime.0, i.mtime.1, i.ctime.0, i.ctime.1, self.block_size
        );
        for (n, digest) in self.digests.iter().enumerate() {
            line.push(if n == 0 { ' ' } else { ',' });
            line.push_str(&format!("{digest:016x}"));
        }
        line.push('\n');
        line
    }

    fn parse(line: &str) -> Option<(Hash, Record)> {
        let mut fields = line.split(' ');
        let hash = Hash::from_hex(fields.next()?)?;
        let mut unsigned = || fields.next()?.parse::<u64>().ok();
        let (dev, ino, size) = (unsigned()?, unsigned()?, unsigned()?);
        let mut signed = || fields.next()?.parse::<i64>().ok();
        let mtime = (signed()?, signed()?);
        let ctime = (signed()?, signed()?);
        let block_size = fields.next()?.parse::<u64>().ok().filter(|&b| b > 0)?;
        let digests = match fields.next() {
            // The empty object has no blocks.
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|d| u64::from_str_radix(d, 16).ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        if fields.next().is_some() || digests.len() as u64 != size.div_ceil(block_size) {
            return None;
        }
        let identity = FileIdentity {
            dev,
            ino,
            size,
            mtime,
            ctime,
        };
        Some((
            hash,
            Record {
                identity,
                block_size,
                digests,
            },
        ))
    }
}

/// The records of one cache directory as this mount found them at start-up (read-only
/// afterwards, shared by every shard).
#[derive(Debug, Default)]
pub struct VerificationLog {
    path: PathBuf,
    records: HashMap<Hash, Record>,
}

impl VerificationLog {
    /// Name of the log in the cache directory.
    pub const FILE: &'static str = "verified.log";

    /// Reads `root/verified.log`, keeping each object's last record; a missing or unreadable log
    /// is an empty one (every cache file is then hashed once, as on a first mount).
    pub fn load(root: &Path) -> VerificationLog {
        let path = root.join(Self::FILE);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        "cannot read {}: {e}; re-hashing cache files",
                        path.display()
                    );
                }
                String::new()
            }
        };
        let mut records = HashMap::new();
        let mut lines = 0usize;
        let mut skipped = 0usize;
        for line in text.split_inclusive('\n') {
            lines += 1;
            // An unterminated last line is a torn append: even if it parses, its last digest
            // may be cut short.
            match line.strip_suffix('\n').and_then(Record::parse) {
                Some((hash, record)) => {
                    records.insert(hash, record);
                }
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::info!(
                "{}: skipped {skipped} unreadable lines (a torn write after a crash is harmless)",
                path.display()
            );
        }
        let log = VerificationLog { path, records };
        // Rewritten when stale lines dominate, and when it ends in a torn line: a record
        // appended after that would join it and be lost.
        let torn = !text.is_empty() && !text.ends_with('\n');
        if torn || lines > 2 * log.records.len() + 64 {
            log.compact();
        }
        log
    }

    /// The record of object `hash`, if any.
    pub fn get(&self, hash: Hash) -> Option<&Record> {
        self.records.get(&hash)
    }

    /// Rewrites the log with one line per object. A record another mount appends meanwhile may
    /// be lost; that costs one re-hash of its file later, nothing else.
    fn compact(&self) {
        let temporary = self
            .path
            .with_extension(format!("compact-{}", std::process::id()));
        let text: String = self
            .records
            .iter()
            .map(|(hash, record)| record.line(*hash))
            .collect();
        let result =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&temporary);
            tracing::warn!("cannot compact {}: {e}", self.path.display());
        }
    }

    /// Starts the thread that appends this mount's records (see [`Recorder`]).
    pub fn start_recording(&self) -> std::io::Result<(Recording, Recorder)> {
        let (sender, receiver) = std::sync::mpsc::channel::<Pending>();
        let mut writer = LogWriter {
            path: self.path.clone(),
            failed: false,
        };
        let thread = std::thread::Builder::new()
            .name("mount_vfs-verified-log".into())
            .spawn(move || {
                for pending in receiver {
                    pending.write_if_durable(&mut writer);
                }
            })?;
        Ok((Recording(Some(thread)), Recorder(sender)))
    }
}

/// Where shards send what they verified; cheap to clone, one per shard.
#[derive(Debug, Clone)]
pub struct Recorder(std::sync::mpsc::Sender<Pending>);

impl Recorder {
    /// Records, once the file's bytes are on disk, that cache file `path` of object `hash` had
    /// `identity` when its bytes were last known to be the verified ones.
    pub fn record(
        &self,
        hash: Hash,
        path: PathBuf,
        identity: FileIdentity,
        block_size: u64,
        digests: &[u64],
    ) {
        let record = Record {
            identity,
            block_size,
            digests: digests.to_vec(),
        };
        let _ = self.0.send(Pending { hash, path, record });
    }
}

/// The recording thread; dropping it waits until every record sent so far is written (after
/// every [`Recorder`] is gone).
#[derive(Debug)]
pub struct Recording(Option<std::thread::JoinHandle<()>>);

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// A record waiting for its file to be durable.
#[derive(Debug)]
struct Pending {
    hash: Hash,
    path: PathBuf,
    record: Record,
}

impl Pending {
    /// Off the shards: `fdatasync` the cache file, so that a record never outlives the bytes it
    /// vouches for (after a power loss the file would fail its hash instead of being trusted),
    /// and append the record only if the file still has the identity the shard saw.
    fn write_if_durable(self, writer: &mut LogWriter) {
        let durable = std::fs::File::open(&self.path).and_then(|file| file.sync_data());
        let unchanged = FileIdentity::of(&self.path).is_ok_and(|now| now == self.record.identity);
        if durable.is_ok() && unchanged {
            writer.append(self.hash, &self.record);
        }
    }
}

/// Appends records to the log, opening it for each append. A failure to write costs later
/// mounts a re-hash, not this one a read: it is logged once and records stop.
struct LogWriter {
    path: PathBuf,
    failed: bool,
}

impl LogWriter {
    fn append(&mut self, hash: Hash, record: &Record) {
        if self.failed {
            return;
        }
        let line = record.line(hash);
        let result = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = result {
            self.failed = true;
            tracing::warn!(
                "cannot append to {}: {e}; later mounts will re-hash cache files",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(size: u64, block_size: u64) -> Record {
        Record {
            identity: FileIdentity {
                dev: 1,
                ino: 2,
                size,
                mtime: (3, 4),
                ctime: (-5, 6),
            },
            block_size,
            digests: (0..size.div_ceil(block_size))
                .map(|i| u64::MAX - i)
                .collect(),
        }
    }

    fn writer(dir: &Path) -> LogWriter {
        LogWriter {
            path: dir.join(VerificationLog::FILE),
            failed: false,
        }
    }

    #[test]
    fn records_round_trip_and_the_last_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let log = VerificationLog::load(dir.path());
        assert!(log.get(Hash(1)).is_none());
        let mut writer = writer(dir.path());
        writer.append(Hash(1), &record(10, 4));
        writer.append(Hash(2), &record(0, 4));
        writer.append(Hash(1), &record(9, 4));
        let log = VerificationLog::load(dir.path());
        assert_eq!(log.get(Hash(1)), Some(&record(9, 4)));
        assert_eq!(log.get(Hash(2)), Some(&record(0, 4)));
    }

    #[test]
    fn torn_and_garbage_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = record(10, 4).line(Hash(7));
        // Cut inside its last digest: still the right number of fields and digests.
        let full = record(10, 4).line(Hash(8));
        let torn = &full[..full.len() - 3];
        let wrong_count = good.replace(",fffffffffffffffd", "");
        let text = format!("garbage\n{wrong_count}\n\n{good}{torn}");
        std::fs::write(dir.path().join(VerificationLog::FILE), text).unwrap();
        let log = VerificationLog::load(dir.path());
        assert_eq!(log.get(Hash(7)), Some(&record(10, 4)));
        assert!(log.get(Hash(8)).is_none());
        assert_eq!(log.records.len(), 1);
        // The torn tail was cut off: a record appended now is read back.
        writer(dir.path()).append(Hash(9), &record(4, 4));
        let log = VerificationLog::load(dir.path());
        assert_eq!(log.get(Hash(9)), Some(&record(4, 4)));
        assert_eq!(log.records.len(), 2);
    }

    #[test]
    fn a_log_of_mostly_stale_lines_is_compacted_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path());
        for _ in 0..100 {
            writer.append(Hash(3), &record(8, 4));
        }
        let path = dir.path().join(VerificationLog::FILE);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 100);
        let log = VerificationLog::load(dir.path());
        assert_eq!(log.get(Hash(3)), Some(&record(8, 4)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }
}

#[cfg(test)]
mod recording_tests {
    use super::*;

    #[test]
    fn a_record_is_written_only_while_the_file_keeps_the_identity_the_shard_saw() {
        let dir = tempfile::tempdir().unwrap();
        let (same, changed) = (dir.path().join("same"), dir.path().join("changed"));
        std::fs::write(&same, b"abcd").unwrap();
        std::fs::write(&changed, b"abcd").unwrap();
        let log = VerificationLog::load(dir.path());
        let (recording, recorder) = log.start_recording().unwrap();
        let seen = |path: &Path| FileIdentity::of(path).unwrap();
        recorder.record(Hash(1), same.clone(), seen(&same), 4, &[7]);
        let before = seen(&changed);
        std::fs::write(&changed, b"abce").unwrap();
        recorder.record(Hash(2), changed, before, 4, &[7]);
        drop(recorder);
        drop(recording);
        let log = VerificationLog::load(dir.path());
        assert!(log.get(Hash(1)).is_some());
        assert!(
            log.get(Hash(2)).is_none(),
            "written after the shard saw it: no record"
        );
    }
}
