//! Verify before serve, in the type system: a [`VerifiedBlock`] can only be made here, by
//! [`ObjectHasher::finish`] (the object's xxh128 matched its manifest hash) or by
//! [`BlockDigests::check`] (a block read again has the digest it had when its object was
//! verified: in this mount, or in an earlier one whose record of an unchanged cache file vouches
//! for it, [`BlockDigests::recorded`]), and [`ReadData`], the only thing a read reply can send, is
//! built from verified blocks only, with one opt-in exception: under `--verify stream` a
//! [`StreamedBlock`] is served as it arrives and its object is checked afterwards (see
//! `fs::shard::stream`). Both travel as a [`Servable`]. A store hands out plain [`Block`]s;
//! nothing else turns them into replies. A shard's replica of another shard's verified block
//! (`fs::shard::replica`) is verified because its bytes were copied from one
//! ([`VerifiedBlock::copy_into`], [`ReplicaSlot::take`]).

use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::manifest::{block_digest, Hash, HashStream};
use crate::store::Block;

/// Bytes of an object block that passed verification.
#[derive(Clone)]
pub struct VerifiedBlock(Rc<Block>);

impl VerifiedBlock {
    /// The empty object's only block: zero bytes cannot be wrong.
    pub fn empty() -> VerifiedBlock {
        VerifiedBlock(Rc::new(Block::empty()))
    }

    /// The block, shared: to write it somewhere (its bytes cannot be changed through it).
    pub fn shared(&self) -> Rc<Block> {
        self.0.clone()
    }
}

impl std::ops::Deref for VerifiedBlock {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A buffer of one shard that the owner of a verified block fills with a copy of it, so that
/// the first shard can serve that block's reads itself (`fs::shard::replica`). The owner writes
/// only while the slot is open; the receiving shard closes it before its buffer may go.
pub struct ReplicaSlot {
    /// The receiving shard's buffer (address, length) while it still waits for the copy.
    target: Mutex<Option<(usize, usize)>>,
    filled: AtomicBool,
}

impl ReplicaSlot {
    /// A slot for the `len` bytes at `buffer`.
    ///
    /// # Safety
    /// The `len` bytes at `buffer` must stay valid for writes, and untouched by anyone else,
    /// until [`ReplicaSlot::close`] or [`ReplicaSlot::take`] returns.
    pub unsafe fn new(buffer: *mut u8, len: usize) -> ReplicaSlot {
        ReplicaSlot {
            target: Mutex::new(Some((buffer as usize, len))),
            filled: AtomicBool::new(false),
        }
    }

    /// Stops any later copy into the buffer (it is about to be freed); waits for one under way.
    pub fn close(&self) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// `block`, the slot's own buffer, as a verified block once the owner filled it; `None` if
    /// it did not (the block was evicted there, or the owner stopped).
    pub fn take(&self, block: Block) -> Option<VerifiedBlock> {
        let target = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let ours = target == Some((block.as_ptr() as usize, block.len()));
        (ours && self.filled.load(Ordering::Acquire)).then(|| VerifiedBlock(Rc::new(block)))
    }
}

impl VerifiedBlock {
    /// Copies this block into another shard's `slot`; false when the slot was closed or has
    /// another length.
    pub fn copy_into(&self, slot: &ReplicaSlot) -> bool {
        let target = slot.target.lock().unwrap_or_else(PoisonError::into_inner);
        match *target {
            Some((buffer, len)) if len == self.len() => {
                // SAFETY: the slot is open (its buffer is valid for `len` bytes and nobody else
                // touches it, `ReplicaSlot::new`), and stays open while we hold its lock.
                unsafe { std::ptr::copy_nonoverlapping(self.as_ptr(), buffer as *mut u8, len) };
                slot.filled.store(true, Ordering::Release);
                true
            }
            _ => false,
        }
    }
}

/// Bytes of an object block served before their object was verified: only `--verify stream`
/// makes them (`fs::shard::stream`), and it checks the object once it was read through.
#[derive(Clone)]
pub struct StreamedBlock(Rc<Block>);

impl StreamedBlock {
    /// Block bytes as a ranged GET returned them, to be served under `--verify stream`.
    pub fn ahead_of_verification(block: Block) -> StreamedBlock {
        StreamedBlock(Rc::new(block))
    }
}

impl std::ops::Deref for StreamedBlock {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A block a read may serve: verified, or streamed ahead of verification (`--verify stream`).
#[derive(Clone)]
pub enum Servable {
    Verified(VerifiedBlock),
    Streamed(StreamedBlock),
}

impl Servable {
    fn shared(&self) -> &Rc<Block> {
        match self {
            Servable::Verified(VerifiedBlock(block)) | Servable::Streamed(StreamedBlock(block)) => {
                block
            }
        }
    }
}

impl From<VerifiedBlock> for Servable {
    fn from(block: VerifiedBlock) -> Servable {
        Servable::Verified(block)
    }
}

impl std::ops::Deref for Servable {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.shared()
    }
}

/// Hashes one object's blocks in order as a stream delivers them, keeping some of them for
/// publication once the whole object matched.
pub struct ObjectHasher {
    expected: Hash,
    hasher: HashStream,
    digests: Vec<u64>,
    kept: Vec<(u32, Block)>,
}

/// What an object that matched its hash leaves behind.
pub struct VerifiedObject {
    /// The blocks the stream kept, by index.
    pub kept: Vec<(u32, VerifiedBlock)>,
    pub digests: BlockDigests,
}

impl ObjectHasher {
    pub fn new(expected: Hash, blocks: usize) -> ObjectHasher {
        ObjectHasher {
            expected,
            hasher: HashStream::default(),
            digests: Vec::with_capacity(blocks),
            kept: Vec::new(),
        }
    }

    /// Feeds the object's next block.
    pub fn update(&mut self, block: &[u8]) {
        self.hasher.update(block);
        self.digests.push(block_digest(block));
    }

    /// Keeps block `index` (already fed) to be published if the object matches.
    pub fn keep(&mut self, index: u32, block: Block) {
        self.kept.push((index, block));
    }

    /// The verified object, or the digest the bytes had instead of the expected one.
    pub fn finish(self) -> Result<VerifiedObject, Hash> {
        let digest = self.hasher.finish();
        if digest != self.expected {
            return Err(digest);
        }
        Ok(VerifiedObject {
            kept: self
                .kept
                .into_iter()
                .map(|(index, block)| (index, VerifiedBlock(Rc::new(block))))
                .collect(),
            digests: BlockDigests(self.digests.into()),
        })
    }
}

/// The xxh3-64 of every block of a verified object, taken while it was verified: a block read
/// again later is served only if it still has its digest.
#[derive(Clone)]
pub struct BlockDigests(Rc<[u64]>);

impl BlockDigests {
    /// The digests an earlier mount recorded when it verified the object, for a cache file that
    /// is unchanged since (`store::VerificationLog`).
    pub fn recorded(digests: &[u64]) -> BlockDigests {
        BlockDigests(digests.into())
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.0
    }

    /// Whether both are the digests of the same verification (not merely equal values).
    pub fn same(&self, other: &BlockDigests) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }

    /// A block streamed before its object was verified, confirmed as the bytes block `index`
    /// had when the object verified; `None` if it differs (the caller reads it again).
    pub fn confirm(&self, index: u32, block: &StreamedBlock) -> Option<VerifiedBlock> {
        let digest = *self.0.get(index as usize)?;
        (block_digest(&block.0) == digest).then(|| VerifiedBlock(block.0.clone()))
    }

    /// Block `index`, verified; or the block back when it differs from the verified object (or
    /// the object has no such block).
    pub fn check(&self, index: u32, block: Block) -> Result<VerifiedBlock, Block> {
        match self.0.get(index as usize) {
            Some(&digest) if block_digest(&block) == digest => Ok(VerifiedBlock(Rc::new(block))),
            _ => Err(block),
        }
    }
}

/// What a read reply sends: a range of one verified block (the common, zero-copy case), or
/// bytes gathered from several.
pub struct ReadData(Data);

enum Data {
    Slice(Rc<Block>, Range<usize>),
    Gathered(Vec<u8>),
}

impl ReadData {
    /// No bytes (a read at or past the end of the file).
    pub fn empty() -> ReadData {
        ReadData(Data::Gathered(Vec::new()))
    }

    /// `range` of `block`.
    pub fn slice(block: Servable, range: Range<usize>) -> ReadData {
        debug_assert!(range.end <= block.len());
        ReadData(Data::Slice(block.shared().clone(), range))
    }

    /// Bytes of a file with upper bytes (a `--writable` mount): what this mount's writers wrote,
    /// merged with base bytes that came through the verified path. The manifest's hash no
    /// longer describes such a file, so there is nothing else to verify them against.
    pub fn written(bytes: Vec<u8>) -> ReadData {
        ReadData(Data::Gathered(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Data::Slice(block, range) => &block[range.clone()],
            Data::Gathered(bytes) => bytes,
        }
    }
}

/// Builds a [`ReadData`] from ranges of several verified blocks (a read that straddles blocks).
pub struct Gather(Vec<u8>);

impl Gather {
    pub fn with_capacity(len: usize) -> Gather {
        Gather(Vec::with_capacity(len))
    }

    pub fn push(&mut self, block: &Servable, range: Range<usize>) {
        self.0.extend_from_slice(&block[range]);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn finish(self) -> ReadData {
        ReadData(Data::Gathered(self.0))
    }
}
