//! Writes, `fallocate` and reads of files with upper bytes (a `--writable` mount), on the
//! inode's owner shard.
//!
//! A file's upper file holds its length and every byte at or above `base_len`, and below it
//! every block marked present; other blocks below `base_len` are still the base object's,
//! read through the verified path. A write copies up only the blocks it touches partially
//! (the bytes come through the verified read path), writes its bytes, then journals the blocks
//! it made present: data before the record that points at it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use std::sync::Arc;

use futures::lock::{Mutex, OwnedMutexGuard};

use super::FileService;
use crate::fs::request::{Attributes, Fallocate, Truncate, Write};
use crate::fs::writable::{attributes, change_of};
use crate::fs::{FsError, ReadData};
use crate::namespace::Ino;
use crate::overlay::{Overlay, Upper};

/// One lock per inode being written: a copy-up waits for base bytes, and a second write of
/// the same block must not land before the copy it would then overwrite.
#[derive(Default)]
pub(super) struct Writers(RefCell<HashMap<Ino, Arc<Mutex<()>>>>);

impl Writers {
    pub(super) async fn lock(&self, ino: Ino) -> OwnedMutexGuard<()> {
        let mutex = self.0.borrow_mut().entry(ino).or_default().clone();
        let guard = mutex.lock_owned().await;
        // Forget inodes nobody else is waiting for (the map holds one reference, the guard one).
        self.0
            .borrow_mut()
            .retain(|_, m| Arc::strong_count(m) > 1 || m.try_lock().is_none());
        guard
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> FsError {
    move |e| FsError::overlay(what, &e)
}

impl FileService {
    fn overlay(&self) -> Result<&Overlay, FsError> {
        self.overlay.as_deref().ok_or(FsError::ReadOnly)
    }

    pub(super) async fn write(self: &Rc<Self>, write: &Write) -> Result<u32, FsError> {
        let overlay = self.overlay()?;
        let _writing = self.writers.lock(write.ino).await;
        let upper = overlay.start_upper(write.ino)?;
        let file = overlay.upper_file(write.ino)?;
        let end = write.offset + write.data.len() as u64;
        let copied = self
            .copy_up(write.ino, &upper, write.offset..end, true)
            .await?;
        file.write_all_at(&write.data, write.offset)
            .map_err(io("write upper file"))?;
        if !copied.is_empty() {
            overlay.mark_present(write.ino, copied)?;
        }
        Ok(write.data.len() as u32)
    }

    /// `truncate`/`ftruncate` (with whatever else the same `setattr` changes).
    pub(super) async fn truncate(self: &Rc<Self>, t: &Truncate) -> Result<Attributes, FsError> {
        let overlay = self.overlay()?;
        if self.still_reads_cache_file(t.ino).await {
            // Open readers get the cache file's bytes from the kernel, which cannot be told.
            return Err(FsError::Busy);
        }
        let _writing = self.writers.lock(t.ino).await;
        let node = overlay.set_attr(t.ino, change_of(&t.change), t.change.size)?;
        Ok(attributes(&node))
    }

    pub(super) async fn fallocate(self: &Rc<Self>, f: &Fallocate) -> Result<(), FsError> {
        let overlay = self.overlay()?;
        let _writing = self.writers.lock(f.ino).await;
        let upper = overlay.start_upper(f.ino)?;
        let file = overlay.upper_file(f.ino)?;
        let end = f.offset.saturating_add(f.length);
        // Preallocation keeps every byte; any other mode changes bytes in the range (punch,
        // zero) or moves them (collapse, insert): those blocks must be upper first.
        let range = match f.mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => None,
            m if m & !(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 => {
                Some(f.offset..end)
            }
            _ => Some(0..u64::MAX),
        };
        if let Some(range) = range {
            let copied = self.copy_up(f.ino, &upper, range, false).await?;
            if !copied.is_empty() {
                overlay.mark_present(f.ino, copied)?;
            }
        }
        // SAFETY: a valid descriptor; the kernel checks the arguments.
        let done = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                f.mode,
                f.offset as libc::off_t,
                f.length as libc::off_t,
            )
        };
        if done != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => FsError::NotSupported,
                Some(libc::EINVAL) => FsError::Invalid,
                _ => FsError::overlay("fallocate upper file", &e),
            });
        }
        Ok(())
    }

    /// Copies into the upper file the base bytes of every block in `range` that is still the
    /// base's; with `skip_covered`, blocks the range covers whole are left to the caller (it
    /// is about to write all of them). Returns the blocks to mark present.
    async fn copy_up(
        self: &Rc<Self>,
        ino: Ino,
        upper: &Upper,
        range: std::ops::Range<u64>,
        skip_covered: bool,
    ) -> Result<Vec<u64>, FsError> {
        let overlay = self.overlay()?;
        let block_size = overlay.block_size();
        let end = range.end.min(upper.base_len);
        if range.start >= end {
            return Ok(Vec::new());
        }
        let file = overlay.upper_file(ino)?;
        let mut copied = Vec::new();
        for block in range.start / block_size..end.div_ceil(block_size) {
            if upper.present.contains(&block) {
                continue;
            }
            let start = block * block_size;
            let block_end = (start + block_size).min(upper.base_len);
            let covered = range.start <= start && range.end >= block_end;
            if !(skip_covered && covered) {
                let base = self
                    .read_base(ino, 0, start, (block_end - start) as u32)
                    .await?;
                file.write_all_at(base.bytes(), start)
                    .map_err(io("copy up to upper file"))?;
            }
            copied.push(block);
        }
        Ok(copied)
    }

    /// Bytes `[offset, offset + size)` of a file with upper bytes: runs of upper bytes read
    /// from the upper file, the rest from the base through the verified path.
    pub(super) async fn read_merged(
        self: &Rc<Self>,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
        upper: Upper,
    ) -> Result<ReadData, FsError> {
        let overlay = self.overlay()?;
        let block_size = overlay.block_size();
        let file = overlay.upper_file(ino)?;
        let len = file.metadata().map_err(io("stat upper file"))?.len();
        let end = offset.saturating_add(size as u64).min(len);
        if offset >= end {
            return Ok(ReadData::empty());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let mut run_end = ((pos / block_size + 1) * block_size).min(end);
            if upper.from_base(pos, block_size) {
                run_end = run_end.min(upper.base_len);
                let base = self.read_base(ino, fh, pos, (run_end - pos) as u32).await?;
                let at = (pos - offset) as usize;
                out[at..at + base.bytes().len()].copy_from_slice(base.bytes());
            } else {
                while run_end < end && !upper.from_base(run_end, block_size) {
                    run_end = (run_end + block_size).min(end);
                }
                let slice = &mut out[(pos - offset) as usize..(run_end - offset) as usize];
                read_at_most(&file, slice, pos).map_err(io("read upper file"))?;
            }
            pos = run_end;
        }
        Ok(ReadData::written(out))
    }
}

/// Fills `buf` from `file` at `offset`; bytes past the file's end (a concurrent truncate)
/// stay zero.
fn read_at_most(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
