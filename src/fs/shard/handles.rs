//! Open handles and how each inode is served: by this shard, or by the kernel from a verified
//! cache file (passthrough). See the module docs of `shard` for when passthrough applies.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::readahead::Sequential;
use super::FileService;
use crate::fs::request::{fail, BackingFile, Open, OpenReply, Opened, Release};
use crate::fs::{FsError, Op};
use crate::namespace::Ino;
use crate::overlay::AttrChange;

/// How long a writer waits for RELEASEs in flight before a read-only passthrough open makes it
/// fail with ETXTBSY (see [`FileService::still_reads_cache_file`]); they take microseconds.
const RELEASE_GRACE: Duration = Duration::from_millis(100);

/// How an inode's open handles are served. The kernel keeps one mode per inode while any handle
/// is open (a passthrough open next to a cached one fails with ETXTBSY, the reverse with
/// EINVAL), so a new open joins the mode already in use.
enum IoMode {
    /// READs come to this shard.
    Shard { handles: usize },
    /// The kernel reads (and, for an upper file, writes) the backing file itself; every handle
    /// shares one backing file.
    Passthrough {
        backing: Rc<BackingFile>,
        handles: usize,
        /// The backing file is the inode's upper file, not a verified cache file.
        upper: bool,
    },
}

/// The shard's open handles, with each one's read-ahead state, and each open inode's mode.
pub(super) struct Handles {
    open: RefCell<HashMap<u64, Sequential>>,
    next_fh: Cell<u64>,
    modes: RefCell<HashMap<Ino, IoMode>>,
    /// The kernel agreed to passthrough and no backing file was refused yet (shared by shards).
    passthrough: Arc<AtomicBool>,
}

impl Handles {
    pub fn new(passthrough: Arc<AtomicBool>) -> Handles {
        Handles {
            open: RefCell::new(HashMap::new()),
            next_fh: Cell::new(1),
            modes: RefCell::new(HashMap::new()),
            passthrough,
        }
    }

    /// The read-ahead state of handle `fh`, if it is open here.
    pub fn with_sequential<T>(&self, fh: u64, f: impl FnOnce(&mut Sequential) -> T) -> Option<T> {
        self.open.borrow_mut().get_mut(&fh).map(f)
    }

    fn insert(&self) -> u64 {
        let fh = self.next_fh.get();
        self.next_fh.set(fh + 1);
        self.open.borrow_mut().insert(fh, Sequential::new());
        fh
    }

    /// Registers a new open of `ino` in the inode's [`IoMode`], given the backing file this open
    /// could use, and returns the backing file when the mode is passthrough.
    fn join(
        &self,
        ino: Ino,
        backing: Option<Rc<BackingFile>>,
        upper: bool,
    ) -> Option<Rc<BackingFile>> {
        let mut modes = self.modes.borrow_mut();
        match modes.get_mut(&ino) {
            Some(IoMode::Passthrough {
                backing, handles, ..
            }) => {
                *handles += 1;
                Some(backing.clone())
            }
            Some(IoMode::Shard { handles }) => {
                *handles += 1;
                None
            }
            None => {
                let mode = match &backing {
                    Some(backing) => IoMode::Passthrough {
                        backing: backing.clone(),
                        handles: 1,
                        upper,
                    },
                    None => IoMode::Shard { handles: 1 },
                };
                modes.insert(ino, mode);
                backing
            }
        }
    }

    /// Forgets handle `fh` of `ino`; the last handle of an inode ends its mode. False if `fh`
    /// was not open.
    fn remove(&self, ino: Ino, fh: u64) -> bool {
        if self.open.borrow_mut().remove(&fh).is_none() {
            return false;
        }
        let mut modes = self.modes.borrow_mut();
        if let Some(IoMode::Shard { handles } | IoMode::Passthrough { handles, .. }) =
            modes.get_mut(&ino)
        {
            *handles -= 1;
            if *handles == 0 {
                // Dropping the last Rc<BackingFile> closes the backing file.
                modes.remove(&ino);
            }
        }
        true
    }
}

impl FileService {
    /// Whether `ino` is open with a verified cache file as its passthrough backing file.
    fn reads_cache_file(&self, ino: Ino) -> bool {
        matches!(
            self.handles.modes.borrow().get(&ino),
            Some(IoMode::Passthrough { upper: false, .. })
        )
    }

    /// Whether `ino` is (still) open with its cache file as backing file once the kernel has
    /// had [`RELEASE_GRACE`] to send the RELEASEs of descriptors already closed. The kernel
    /// sends RELEASE after `close()` has returned, so an open for writing (or a truncate) that
    /// follows a close at once can arrive first; without this grace it would fail with ETXTBSY
    /// although no reader is left.
    pub(super) async fn still_reads_cache_file(&self, ino: Ino) -> bool {
        let deadline = Instant::now() + RELEASE_GRACE;
        while self.reads_cache_file(ino) {
            if Instant::now() >= deadline {
                return true;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        false
    }

    pub(super) async fn open(self: &Rc<Self>, open: Open) {
        let c = &self.counters;
        c.add(&c.opens, 1);
        if self.holds_served_corrupt(open.ino) {
            fail(&self.ops, open.reply, Op::Open, open.ino, FsError::Corrupt);
            return;
        }
        if let Some(overlay) = &self.overlay {
            let writes = open.flags & libc::O_ACCMODE != libc::O_RDONLY;
            if writes || overlay.upper(open.ino).is_some() {
                return self.open_upper(open, writes).await;
            }
            // Counted like every open of a writable mount: see `open_upper`.
            overlay.opened(open.ino);
        }
        let direct = open.flags & libc::O_DIRECT != 0;
        let mut backing = None;
        if !self.handles.modes.borrow().contains_key(&open.ino) {
            backing = self.open_backing(open.ino, direct, &*open.reply).await;
        }
        // No await from here on: the mode checked is the mode joined.
        let backing = self.handles.join(open.ino, backing, false);
        let fh = self.handles.insert();
        match backing {
            Some(backing) => {
                c.add(&c.passthrough_opens, 1);
                self.note_passthrough_open(open.ino);
                open.reply.opened(fh, Opened::Passthrough(&backing));
            }
            // Content is immutable: the page cache may keep it across opens.
            None => open.reply.opened(fh, Opened::KeepCache),
        }
        c.open_latency.record(open.received.elapsed());
    }

    /// An open of a file that has (or, opened for writing, may get) upper bytes: served through
    /// the upper file, by the kernel (passthrough) when nothing of it is left in the base, else
    /// by this shard, never from a cache page of the base.
    async fn open_upper(self: &Rc<Self>, open: Open, writes: bool) {
        let c = &self.counters;
        let overlay = self
            .overlay
            .clone()
            .expect("only writable mounts have upper files");
        if self.still_reads_cache_file(open.ino).await {
            // The kernel would send these writes into the verified cache file (and a file that
            // has upper bytes is no longer the cache file's).
            fail(&self.ops, open.reply, Op::Open, open.ino, FsError::Busy);
            return;
        }
        if writes && open.flags & libc::O_TRUNC != 0 {
            // The kernel normally truncates with a setattr before the open; with atomic O_TRUNC
            // it is ours.
            let _writing = self.writers.lock(open.ino).await;
            if let Err(error) = overlay.set_attr(open.ino, AttrChange::default(), Some(0)) {
                fail(&self.ops, open.reply, Op::Open, open.ino, error);
                return;
            }
        }
        let mut backing = None;
        let complete = overlay
            .upper(open.ino)
            .is_some_and(|upper| upper.complete(overlay.block_size()));
        // O_DIRECT too: the kernel hands the flag to the upper file.
        if complete
            && self.handles.passthrough.load(Ordering::Relaxed)
            && !self.handles.modes.borrow().contains_key(&open.ino)
        {
            backing = match overlay.upper_file(open.ino) {
                Ok(file) => {
                    let what = format!("upper file {}", overlay.upper_path(open.ino).display());
                    self.register_backing(&file, &*open.reply, &what)
                }
                Err(error) => {
                    fail(&self.ops, open.reply, Op::Open, open.ino, error);
                    return;
                }
            };
        }
        // No await from here on: the mode checked is the mode joined.
        let backing = self.handles.join(open.ino, backing, true);
        let fh = self.handles.insert();
        // Every handle is counted: an unlinked file keeps its upper file until its last close.
        overlay.opened(open.ino);
        match backing {
            Some(backing) => {
                c.add(&c.passthrough_opens, 1);
                open.reply.opened(fh, Opened::Passthrough(&backing));
            }
            None => open.reply.opened(fh, Opened::Uncached),
        }
        c.open_latency.record(open.received.elapsed());
    }

    pub(super) fn release(&self, release: Release) {
        let c = &self.counters;
        c.add(&c.releases, 1);
        if self.handles.remove(release.ino, release.fh) {
            if let Some(overlay) = &self.overlay {
                overlay.released(release.ino);
            }
        }
        release.reply.ok();
    }

    /// Whether file `ino` holds an object found corrupt after bytes of it were served
    /// (`--verify stream`): its opens fail from then on.
    fn holds_served_corrupt(&self, ino: Ino) -> bool {
        self.namespace.file_content(ino).is_some_and(|content| {
            content
                .objects
                .iter()
                .any(|&hash| self.policy.served_corrupt(hash))
        })
    }

    /// Registers `file` with the kernel as a passthrough backing file; `None` (and passthrough
    /// off on every shard) if the kernel refuses.
    fn register_backing(
        &self,
        file: &std::fs::File,
        reply: &dyn OpenReply,
        what: &str,
    ) -> Option<Rc<BackingFile>> {
        match reply.backing_file(file) {
            Ok(backing) => Some(Rc::new(backing)),
            Err(e) => {
                // The kernel refuses backing files without CAP_SYS_ADMIN, and on a stacked
                // filesystem (overlayfs, another FUSE mount): that will not change, so stop
                // asking, on every shard.
                if self.handles.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough of {what} refused: {e}; serving every read through \
                         the shards (passthrough needs root and --cache-dir on a local \
                         filesystem)"
                    );
                }
                None
            }
        }
    }

    /// The cache file of single-object file `ino` registered as a passthrough backing file, or
    /// `None` where passthrough does not apply or fails (the open is then shard-served). Starts
    /// passthrough only for a single-object file whose object is (after waiting for its
    /// verification) in the disk cache; for an O_DIRECT open (`direct`), only when that cache
    /// file was found there, not written by this mount.
    async fn open_backing(
        self: &Rc<Self>,
        ino: Ino,
        direct: bool,
        reply: &dyn OpenReply,
    ) -> Option<Rc<BackingFile>> {
        let cache = self.disk_cache.as_ref()?;
        if !self.handles.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let content = self.namespace.file_content(ino)?;
        let [hash] = content.objects[..] else {
            return None;
        };
        if content.size == 0 {
            return None;
        }
        // An O_DIRECT reader reads the disk through passthrough only from a cache file that
        // was there before this mount (one it writes may have dirty pages, which the read would
        // first write out); a cold object is left to the first read, not verified by the open.
        if direct && !(cache.direct_io() && cache.has(hash, content.size)) {
            return None;
        }
        // Under --verify stream an object not verified yet is streamed, not verified on open:
        // its cache file appears (and is passed through) only once it was completed.
        let object = super::read::ObjectRef {
            hash,
            len: content.size,
        };
        if self.streams(object) {
            return None;
        }
        // A failure here is the first read's failure too; the read reports it.
        self.verify(ino, hash, content.size).await.ok()?;
        if !self.verification.in_disk_cache(hash)
            || (direct && !self.verification.found_in_disk_cache(hash))
        {
            return None;
        }
        let file = match cache.open_for_passthrough(hash) {
            Ok(file) => file,
            Err(e) => {
                // Removed or replaced under us: this open is shard-served, and the next
                // verification finds out what is there.
                tracing::warn!(
                    shard = self.shard,
                    "cannot open cache file {}: {e}",
                    cache.location(hash).display()
                );
                self.verification.not_in_disk_cache(hash);
                return None;
            }
        };
        let what = format!("cache file {}", cache.location(hash).display());
        self.register_backing(&file, reply, &what)
    }
}
