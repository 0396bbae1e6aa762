//! A store that wraps another and injects faults on a deterministic schedule: errors, short
//! reads, flipped bytes and delays, chosen by read number or by object. Tests use it to drive
//! every failure path of the layers above without a flaky server.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use futures::future::{FutureExt, LocalBoxFuture};
use mount_vfs_executors::{BufferPool, Reservation};

use super::{Block, ObjectRange, ObjectStore, RetryCounts, StoreError};
use crate::manifest::Hash;

/// What goes wrong with a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The store reports the object missing.
    NotFound,
    /// The store refuses access (an S3 403).
    Denied,
    /// The store kept failing transiently until its retries ran out.
    Unavailable,
    /// The read returns this many bytes fewer than asked (at least one byte short).
    Short(usize),
    /// The byte at this offset within the returned range is inverted.
    Flip(usize),
    /// The read completes correctly, after this long.
    Delay(Duration),
}

/// Which reads a fault applies to. Reads are numbered from 0 in the order they are issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// Read number `n` only.
    Read(u64),
    /// Every read numbered `from` or later.
    From(u64),
    /// Every read of this object.
    Object(Hash),
    /// Every read.
    Always,
}

impl When {
    fn applies(&self, read: u64, hash: Hash) -> bool {
        match *self {
            When::Read(n) => read == n,
            When::From(n) => read >= n,
            When::Object(h) => hash == h,
            When::Always => true,
        }
    }
}

/// `inner` with faults. The first rule that applies to a read decides its fault.
pub struct FaultStore {
    inner: Rc<dyn ObjectStore>,
    rules: RefCell<Vec<(When, Fault)>>,
    issued: Cell<u64>,
}

impl FaultStore {
    pub fn new(inner: Rc<dyn ObjectStore>) -> FaultStore {
        FaultStore {
            inner,
            rules: RefCell::new(Vec::new()),
            issued: Cell::new(0),
        }
    }

    /// Adds a rule (also while reads are running: later reads see it).
    pub fn inject(&self, when: When, fault: Fault) {
        self.rules.borrow_mut().push((when, fault));
    }

    /// Removes every rule: the store behaves again.
    pub fn heal(&self) {
        self.rules.borrow_mut().clear();
    }

    /// Reads issued so far.
    pub fn reads(&self) -> u64 {
        self.issued.get()
    }

    async fn read_range(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> Result<Block, StoreError> {
        let read = self.issued.replace(self.issued.get() + 1);
        let fault = self
            .rules
            .borrow()
            .iter()
            .find(|(when, _)| when.applies(read, range.hash))
            .map(|(_, fault)| *fault);
        let location = self.location(range.hash);
        let Some(fault) = fault else {
            return self.inner.read(pool, memory, range).await;
        };
        match fault {
            Fault::NotFound => Err(StoreError::NotFound { location }),
            Fault::Denied => Err(StoreError::Denied {
                location,
                reason: "injected".into(),
            }),
            Fault::Unavailable => Err(StoreError::Unavailable {
                location,
                attempts: 1,
                last: "injected".into(),
            }),
            Fault::Delay(pause) => {
                glommio::timer::sleep(pause).await;
                self.inner.read(pool, memory, range).await
            }
            Fault::Short(missing) => {
                let block = self.inner.read(pool, memory, range).await?;
                let keep = block.len().saturating_sub(missing.max(1));
                copy(pool, &block[..keep], None).await
            }
            Fault::Flip(at) => {
                let block = self.inner.read(pool, memory, range).await?;
                copy(pool, &block, Some(at)).await
            }
        }
    }
}

/// `bytes` in a new buffer of the pool, with the byte at `flip` inverted.
async fn copy(pool: &BufferPool, bytes: &[u8], flip: Option<usize>) -> Result<Block, StoreError> {
    if bytes.is_empty() {
        return Ok(Block::empty());
    }
    let mut buffer = pool.alloc(bytes.len()).await.map_err(|e| StoreError::Io {
        location: PathBuf::from("fault store"),
        source: std::io::Error::other(e),
    })?;
    buffer[..bytes.len()].copy_from_slice(bytes);
    if let Some(at) = flip.filter(|&at| at < bytes.len()) {
        buffer[at] = !buffer[at];
    }
    Ok(Block::from_pool(buffer, bytes.len()))
}

impl ObjectStore for FaultStore {
    fn read<'a>(
        &'a self,
        pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> LocalBoxFuture<'a, Result<Block, StoreError>> {
        self.read_range(pool, memory, range).boxed_local()
    }

    fn location(&self, hash: Hash) -> PathBuf {
        self.inner.location(hash)
    }

    fn retries(&self) -> RetryCounts {
        self.inner.retries()
    }
}
