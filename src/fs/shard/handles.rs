//! Open handles and how each inode is served: by this shard, or by the kernel from a verified
//! cache file (passthrough). See the module docs of `shard` for when passthrough applies.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::readahead::Sequential;
use super::FileService;
use crate::fs::request::{BackingFile, Open, OpenReply, Opened, Release};
use crate::namespace::Ino;

/// How an inode's open handles are served. The kernel keeps one mode per inode while any handle
/// is open (a passthrough open next to a cached one fails with ETXTBSY, the reverse with
/// EINVAL), so a new open joins the mode already in use.
enum IoMode {
    /// READs come to this shard.
    Shard { handles: usize },
    /// The kernel reads the cache file itself; every handle shares one backing file.
    Passthrough {
        backing: Rc<BackingFile>,
        handles: usize,
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
    fn join(&self, ino: Ino, backing: Option<Rc<BackingFile>>) -> Option<Rc<BackingFile>> {
        let mut modes = self.modes.borrow_mut();
        match modes.get_mut(&ino) {
            Some(IoMode::Passthrough { backing, handles }) => {
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
                    },
                    None => IoMode::Shard { handles: 1 },
                };
                modes.insert(ino, mode);
                backing
            }
        }
    }

    /// Forgets handle `fh` of `ino`; the last handle of an inode ends its mode.
    fn remove(&self, ino: Ino, fh: u64) {
        if self.open.borrow_mut().remove(&fh).is_none() {
            return;
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
    }
}

impl FileService {
    pub(super) async fn open(self: &Rc<Self>, open: Open) {
        let c = &self.counters;
        c.add(&c.opens, 1);
        let direct = open.flags & libc::O_DIRECT != 0;
        let mut backing = None;
        if !direct && !self.handles.modes.borrow().contains_key(&open.ino) {
            backing = self.open_backing(open.ino, &*open.reply).await;
        }
        // No await from here on: the mode checked is the mode joined.
        let backing = self.handles.join(open.ino, backing);
        let fh = self.handles.insert();
        match backing {
            Some(backing) => {
                c.add(&c.passthrough_opens, 1);
                open.reply.opened(fh, Opened::Passthrough(&backing));
            }
            // Content is immutable: the page cache may keep it across opens.
            None => open.reply.opened(fh, Opened::KeepCache),
        }
        c.open_latency.record(open.received.elapsed());
    }

    pub(super) fn release(&self, release: Release) {
        let c = &self.counters;
        c.add(&c.releases, 1);
        self.handles.remove(release.ino, release.fh);
        release.reply.ok();
    }

    /// The cache file of single-object file `ino` registered as a passthrough backing file, or
    /// `None` where passthrough does not apply or fails (the open is then shard-served). Starts
    /// passthrough only for a single-object file whose object is (after waiting for its
    /// verification) in the disk cache.
    async fn open_backing(
        self: &Rc<Self>,
        ino: Ino,
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
        // A failure here is the first read's failure too; the read reports it.
        self.verify(ino, hash, content.size).await.ok()?;
        if !self.verification.in_disk_cache(hash) {
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
        match reply.backing_file(&file) {
            Ok(backing) => Some(Rc::new(backing)),
            Err(e) => {
                // The kernel refuses backing files without CAP_SYS_ADMIN, and on a stacked
                // filesystem (overlayfs, another FUSE mount): that will not change, so stop
                // asking, on every shard.
                if self.handles.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough of cache file {} refused: {e}; serving every read \
                         through the shards (passthrough needs root and --cache-dir on a local \
                         filesystem)",
                        cache.location(hash).display()
                    );
                }
                None
            }
        }
    }
}
