//! Read-ahead: a sequential reader gets the next blocks loaded before it asks, in a window that
//! doubles per sequential read; a chunked file's next chunk is verified while the reader is still
//! in the current one.

use std::rc::Rc;

use super::cache::Asker;
use super::read::{locate, object_len, ObjectRef};
use super::FileService;
use crate::manifest::{Hash, CHUNK_SIZE};
use crate::namespace::{FileContent, Ino};

/// Largest read-ahead window: the window starts at one block and doubles per sequential read up
/// to this many bytes (less in small pools, see [`FileService::max_readahead_blocks`]).
const MAX_READAHEAD: u64 = 64 << 20;

/// One open handle's sequential-access detection.
pub(super) struct Sequential {
    next_offset: u64,
    /// Blocks to load ahead of the reader.
    window: u64,
}

impl Sequential {
    pub fn new() -> Sequential {
        Sequential {
            next_offset: 0,
            window: 1,
        }
    }

    /// Records a read of `[offset, end)`: the window doubles (up to `max` blocks) when it
    /// continues the previous read and falls back to one block when it does not. Returns the
    /// window to load ahead, or `None` for a read that was not sequential.
    fn advance(&mut self, offset: u64, end: u64, max: u64) -> Option<u64> {
        let sequential = offset == self.next_offset;
        self.next_offset = end;
        if sequential {
            self.window = (self.window * 2).min(max);
            Some(self.window)
        } else {
            self.window = 1;
            None
        }
    }

    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }
}

impl FileService {
    /// Loads the blocks after `[offset, end)` of file `ino` (open as `fh`) ahead of a sequential
    /// reader.
    pub(super) fn plan_readahead(
        self: &Rc<Self>,
        ino: Ino,
        fh: u64,
        content: &FileContent<'_>,
        offset: u64,
        end: u64,
    ) {
        let max = self.max_readahead_blocks();
        let Some(window) = self
            .handles
            .with_sequential(fh, |handle| handle.advance(offset, end, max))
            .flatten()
        else {
            return;
        };
        let block_size = self.block_size;
        let first = end.div_ceil(block_size) * block_size;
        for i in 0..window {
            let pos = first + i * block_size;
            if pos >= content.size {
                break;
            }
            let (object, block, _) = locate(content.chunked, block_size, pos);
            let Some(&hash) = content.objects.get(object) else {
                break;
            };
            // Blocks of an object not verified yet join its verification: for chunked files
            // that starts the next chunk's verification before the reader gets there. Objects
            // in quarantine (they failed) are retried on demand only, not by every read-ahead.
            if self.cache.contains((hash, block))
                || self.verification.quarantined(hash)
                || self.policy.served_corrupt(hash)
            {
                continue;
            }
            // All readers of the shard together load ahead at most half the cache: blocks
            // loaded past that would evict each other before they are read.
            let loading = self.cache.loading() as u64 * block_size;
            if loading + block_size > self.cache.budget() as u64 / 2 {
                break;
            }
            let object = ObjectRef {
                hash,
                len: object_len(content.size, content.chunked, object),
            };
            let service = self.clone();
            glommio::spawn_local(async move {
                // The object may have failed since this load was planned.
                if !service.verification.quarantined(object.hash) {
                    let _ = service.block(ino, object, block, Asker::ReadAhead).await;
                }
            })
            .detach();
        }
        // Under --verify stream the next chunk is streamed by read-ahead like any block.
        if content.chunked && self.policy.mode == super::VerifyMode::Object {
            self.verify_next_chunk(ino, end, content.size, content.objects);
        }
    }

    /// A sequential reader of a chunked file whose current chunk is verified gets the next
    /// chunk verified ahead, so that chunk's full pass overlaps serving this one instead of
    /// stalling the reader at the boundary. One chunk ahead at most, and only while every
    /// verification in progress fits the retention budget: blocks a stream cannot keep are
    /// fetched twice, so running ahead past the budget costs more than the stall it saves.
    fn verify_next_chunk(self: &Rc<Self>, ino: Ino, position: u64, size: u64, objects: &[Hash]) {
        let current = (position / CHUNK_SIZE) as usize;
        let (Some(&hash), Some(&next)) = (objects.get(current), objects.get(current + 1)) else {
            return;
        };
        let v = &self.verification;
        if !v.is_verified(hash) || v.is_verified(next) || v.is_verifying(next) {
            return;
        }
        let len = object_len(size, true, current + 1);
        if v.verifying_bytes() + len > self.retention_budget() as u64 {
            return;
        }
        let service = self.clone();
        glommio::spawn_local(async move {
            let _ = service.verify(ino, next, len).await;
        })
        .detach();
    }

    /// Largest read-ahead window, in blocks: [`MAX_READAHEAD`], but at most a quarter of the
    /// cache, so blocks loaded ahead are still cached when the reader gets there (a window as
    /// large as a small pool evicted its own blocks and every block was fetched again).
    pub(super) fn max_readahead_blocks(&self) -> u64 {
        let bytes = MAX_READAHEAD.min(self.cache.budget() as u64 / 4);
        (bytes / self.block_size).max(1)
    }

    /// The read-ahead window of handle `fh`, in blocks (tests).
    #[cfg(test)]
    pub(super) fn readahead_window(&self, fh: u64) -> Option<u64> {
        self.handles.with_sequential(fh, |handle| handle.window())
    }
}
