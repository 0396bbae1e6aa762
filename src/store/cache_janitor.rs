//! Keeps the disk cache (`--cache-dir`) within bounds: at most `--cache-size` bytes of cache
//! files, and at least [`MIN_FREE`] of its filesystem free. One background thread per mount;
//! it only lists and deletes files, no object byte passes through it.
//!
//! Shards report each file they add ([`CacheUsage::added`]) and touch the files they use, so a
//! file's mtime is its last use. When a bound is crossed the janitor deletes the least recently
//! used files until the cache is back under [`LOW_WATER`] of its size limit. Deleting a file a
//! shard still has open is safe: open files stay readable, and a shard that finds a cache file
//! gone reads the store instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::OBJECT_SUFFIX;

/// Fraction of the cache's filesystem always left free, whatever `--cache-size` says.
const MIN_FREE: f64 = 0.05;
/// After a sweep the cache holds at most this fraction of `--cache-size` (so one new object
/// does not start the next sweep at once).
const LOW_WATER: f64 = 0.90;
/// The free-space bound is checked this often even when no shard reports anything.
const CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// What shards hold to report new cache files; cheap to clone, `Send`.
#[derive(Clone, Debug)]
pub struct CacheUsage {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes of cache files, as of the last sweep plus what shards added since.
    used: AtomicU64,
    /// Files and bytes the sweeps removed since the mount started (for the metrics).
    evicted_files: AtomicU64,
    evicted_bytes: AtomicU64,
    max_bytes: Option<u64>,
    /// The cache's `Data/` directory, whose filesystem's free space is checked on every commit.
    data: PathBuf,
    wake: flume::Sender<()>,
    stopping: AtomicBool,
}

impl CacheUsage {
    /// A cache file of `bytes` was committed; wakes the janitor when that crosses the limit or
    /// leaves the filesystem short (one statvfs per committed object: objects are large).
    pub fn added(&self, bytes: u64) {
        let used = self.shared.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let over_limit = self.shared.max_bytes.is_some_and(|max| used > max);
        if over_limit || running_short(&self.shared.data) {
            let _ = self.shared.wake.try_send(());
        }
    }

    /// Bytes the cache holds now, and the files and bytes evicted since the mount started.
    pub fn snapshot(&self) -> CacheUsageSnapshot {
        let shared = &self.shared;
        CacheUsageSnapshot {
            used_bytes: shared.used.load(Ordering::Relaxed),
            limit_bytes: shared.max_bytes,
            evicted_files: shared.evicted_files.load(Ordering::Relaxed),
            evicted_bytes: shared.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Marks a cache file as just used (its mtime orders eviction).
    pub fn touch(&self, path: &Path) {
        if let Ok(file) = std::fs::File::open(path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }
}

/// What [`CacheUsage::snapshot`] reads.
#[derive(Clone, Copy, Debug)]
pub struct CacheUsageSnapshot {
    pub used_bytes: u64,
    /// `--cache-size`, if given.
    pub limit_bytes: Option<u64>,
    pub evicted_files: u64,
    pub evicted_bytes: u64,
}

/// The janitor's thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the cache janitor thread: {0}")]
pub struct JanitorStartError(#[source] std::io::Error);

/// The running janitor thread; dropping it stops the thread.
pub struct CacheJanitor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl CacheJanitor {
    /// Sweeps `root` once now (a cache left over the limit by an earlier mount shrinks before
    /// this one starts) and then whenever a bound is crossed.
    pub fn start(
        root: &Path,
        max_bytes: Option<u64>,
    ) -> Result<(CacheJanitor, CacheUsage), JanitorStartError> {
        let (wake, woken) = flume::bounded(1);
        let usage = CacheUsage {
            shared: Arc::new(Shared {
                used: AtomicU64::new(0),
                evicted_files: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                max_bytes,
                data: root.join("Data"),
                wake,
                stopping: AtomicBool::new(false),
            }),
        };
        let data = root.join("Data");
        sweep(&data, &usage.shared);
        let shared = usage.shared.clone();
        let thread = std::thread::Builder::new()
            .name("mount_vfs-cache-janitor".into())
            .spawn(move || loop {
                let _ = woken.recv_timeout(CHECK_INTERVAL);
                if shared.stopping.load(Ordering::Relaxed) {
                    return;
                }
                sweep(&data, &shared);
            })
            .map_err(JanitorStartError)?;
        let janitor = CacheJanitor {
            shared: usage.shared.clone(),
            thread: Some(thread),
        };
        Ok((janitor, usage))
    }
}

impl Drop for CacheJanitor {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // A full channel already holds a wake-up.
        let _ = self.shared.wake.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Lists the cache files, and deletes the least recently used while a bound is crossed.
fn sweep(data: &Path, shared: &Shared) {
    let mut files: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(data)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && name.ends_with(OBJECT_SUFFIX)
        })
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), entry.path()))
        })
        .collect();
    let mut used: u64 = files.iter().map(|(_, len, _)| len).sum();
    let (mut free, total) = filesystem_space(data).unwrap_or((u64::MAX, u64::MAX));
    let min_free = min_free(total);
    let over =
        |used: u64, free: u64| shared.max_bytes.is_some_and(|max| used > max) || free < min_free;
    if over(used, free) {
        let low = |used: u64, free: u64| {
            shared
                .max_bytes
                .is_none_or(|max| used <= (max as f64 * LOW_WATER) as u64)
                && free >= min_free
        };
        files.sort();
        let (mut removed, mut removed_bytes) = (0usize, 0u64);
        for (_, len, path) in &files {
            if low(used, free) {
                break;
            }
            if std::fs::remove_file(path).is_ok() {
                used -= len;
                free = free.saturating_add(*len);
                removed += 1;
                removed_bytes += len;
            }
        }
        shared
            .evicted_files
            .fetch_add(removed as u64, Ordering::Relaxed);
        shared
            .evicted_bytes
            .fetch_add(removed_bytes, Ordering::Relaxed);
        tracing::info!(
            "disk cache {}: removed {removed} least recently used files ({} MiB), {} MiB left",
            data.display(),
            removed_bytes >> 20,
            used >> 20
        );
    }
    shared.used.store(used, Ordering::Relaxed);
}

/// Bytes the disk cache in `root` can take: `--cache-size` when given, else what its
/// filesystem has free beyond the share the janitor keeps free.
pub fn cache_room(root: &Path, cache_size: Option<u64>) -> u64 {
    cache_size.unwrap_or_else(|| {
        filesystem_space(root).map_or(u64::MAX, |(free, total)| {
            free.saturating_sub(min_free(total))
        })
    })
}

/// Free bytes a filesystem of `total` bytes must keep.
fn min_free(total: u64) -> u64 {
    (total as f64 * MIN_FREE) as u64
}

/// Whether the filesystem holding `path` has less free than it must keep.
fn running_short(path: &Path) -> bool {
    filesystem_space(path).is_some_and(|(free, total)| free < min_free(total))
}

/// (free, total) bytes of the filesystem holding `path`.
fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated; statvfs fills `stat` on success.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so `stat` is initialised.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize;
    Some((stat.f_bavail * block, stat.f_blocks * block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_oldest_first_down_to_the_low_water_mark() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("Data");
        std::fs::create_dir(&data).unwrap();
        let now = SystemTime::now();
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let path = data.join(format!("{name}{OBJECT_SUFFIX}"));
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(now - Duration::from_secs(100 - i as u64))
                .unwrap();
        }
        std::fs::write(data.join(".x.partial-1-0"), vec![0u8; 5000]).unwrap();
        let (_janitor, usage) = CacheJanitor::start(dir.path(), Some(2500)).unwrap();
        // 4000 > 2500: the two oldest go (2000 <= 2250); partial files are not the janitor's.
        let left: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(&data)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(left, [".x.partial-1-0", "c.xxh128", "d.xxh128"]);
        assert_eq!(usage.shared.used.load(Ordering::Relaxed), 2000);
    }
}
