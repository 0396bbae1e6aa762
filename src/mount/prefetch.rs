//! A mount's traces and prefetch plan (`crate::trace`, `--prefetch`), set up on the main thread
//! before the shards start: the trace found for the manifest is read once, limited to the
//! manifest's objects, cut to what fits the disk cache, and split by owner shard; this mount's
//! own trace is written by a [`TraceWriter`] until [`Traces`] is dropped (after the shards).
//! With `--share-traces` the traces in the bucket are read too (behind the local one) and this
//! mount's trace is uploaded by the same writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::PrefetchMode;
use crate::fs::shard::{PrefetchItem, PrefetchPlan};
use crate::manifest::{Hash, CHUNK_SIZE};
use crate::namespace::{owner, Ino, Namespace};
use crate::store::{cache_room, object_key};
use crate::trace::{PublishTrace, Trace, TraceRecorder, TraceWriter};

use super::share_traces::{Publisher, SharedTraces};
use super::MountError;

/// What the shards record into and prefetch, and the writer of this mount's trace.
#[derive(Default)]
pub(super) struct Traces {
    pub recorder: Option<Arc<TraceRecorder>>,
    pub plan: Option<Arc<PrefetchPlan>>,
    /// Dropping it writes the trace one last time: drop it after the shards stopped.
    pub writer: Option<TraceWriter>,
}

/// Sets up recording to `trace_path` (in `cache_dir`; none without one) and to `shared`, and
/// the prefetch plan for `mode`.
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    mode: PrefetchMode,
    cache_dir: Option<&Path>,
    cache_size: Option<u64>,
    trace_path: Option<PathBuf>,
    shared: Option<SharedTraces>,
    namespace: &Namespace,
    shards: usize,
    block_size: u64,
) -> Result<Traces, MountError> {
    let (Some(cache_dir), Some(path)) = (cache_dir, trace_path) else {
        return Ok(Traces::default());
    };
    let objects = manifest_objects(namespace);
    // Only `--prefetch trace` uses what others read; the local file keeps it for later mounts.
    let (remote, remote_count) = match &shared {
        Some(shared) if mode == PrefetchMode::Trace => shared.fetch(),
        _ => (Trace::default(), 0),
    };
    let local = match Trace::load(&path) {
        Ok(Some(trace)) => trace,
        Ok(None) => {
            if mode == PrefetchMode::Trace && remote_count == 0 {
                tracing::info!(
                    "no trace of this manifest in {} yet: nothing to prefetch; this mount \
                     records one",
                    path.display()
                );
            }
            Trace::default()
        }
        Err(e) => {
            tracing::warn!(
                "trace {} ignored: {e}; this mount writes a new one",
                path.display()
            );
            Trace::default()
        }
    };
    let mut found = local.union(&remote);
    let named = found.len();
    found.retain(|entry| objects.contains_key(&entry.hash));
    let foreign = named - found.len();

    let room = cache_room(cache_dir, cache_size);
    let candidates: Vec<(Hash, Ino, u64)> = match mode {
        PrefetchMode::Off => Vec::new(),
        PrefetchMode::Trace => (found.entries().iter())
            .map(|entry| {
                let (ino, len) = objects[&entry.hash];
                (entry.hash, ino, len)
            })
            .collect(),
        PrefetchMode::All => {
            let mut all: Vec<_> = (objects.iter())
                .map(|(&hash, &(ino, len))| (hash, ino, len))
                .collect();
            all.sort_unstable_by_key(|&(hash, _, len)| (len, hash.0));
            all
        }
    };
    let mut plan = PrefetchPlan {
        shards: vec![Vec::new(); shards],
    };
    // Without --cache-size the room is the filesystem's free space, which objects already in
    // the cache do not take again; with it, every object of the plan occupies the cache.
    let is_cached = |hash: Hash, len: u64| {
        cache_size.is_none()
            && std::fs::metadata(cache_dir.join(object_key(hash)))
                .is_ok_and(|m| m.is_file() && m.len() == len)
    };
    let (planned, planned_bytes) = fitting_prefix(&candidates, room, is_cached);
    for &(hash, ino, len) in &candidates[..planned] {
        plan.shards[owner(ino, shards)].push(PrefetchItem { ino, hash, len });
    }
    if mode != PrefetchMode::Off && !candidates.is_empty() {
        let source = match mode {
            PrefetchMode::All => "the manifest".to_string(),
            _ if remote_count > 0 => {
                format!("trace {} and {remote_count} shared traces", path.display())
            }
            _ => format!("trace {}", path.display()),
        };
        let mut line = format!(
            "prefetch: {planned} objects of {source}, {planned_bytes} bytes not yet cached"
        );
        if foreign > 0 {
            line += &format!("; {foreign} trace entries name no object of this manifest (ignored)");
        }
        if planned < candidates.len() {
            line += &format!(
                "; {} more objects do not fit the cache's {room} bytes (left out)",
                candidates.len() - planned
            );
        }
        tracing::info!("{line}");
    }

    let recorder = TraceRecorder::new(shards, block_size);
    let publisher = shared.map(|shared| Box::new(Publisher::new(shared)) as Box<dyn PublishTrace>);
    let writer = TraceWriter::start(recorder.clone(), path, found, publisher)
        .map_err(|e| MountError::Runtime(format!("cannot start the trace thread: {e}")))?;
    Ok(Traces {
        recorder: Some(recorder),
        plan: (planned > 0).then(|| Arc::new(plan)),
        writer: Some(writer),
    })
}

/// How many candidates, from the first, fit in `room` bytes (later objects are needed later,
/// so the plan is a prefix), and the bytes they add; `free` objects (already on disk) cost
/// nothing.
fn fitting_prefix(
    candidates: &[(Hash, Ino, u64)],
    room: u64,
    free: impl Fn(Hash, u64) -> bool,
) -> (usize, u64) {
    let mut added = 0u64;
    for (planned, &(hash, _, len)) in candidates.iter().enumerate() {
        let cost = if free(hash, len) { 0 } else { len };
        if added + cost > room {
            return (planned, added);
        }
        added += cost;
    }
    (candidates.len(), added)
}

/// Every object of the manifest's files, with the first inode holding it and its length.
fn manifest_objects(namespace: &Namespace) -> HashMap<Hash, (Ino, u64)> {
    let mut objects = HashMap::new();
    for ino in 1..=namespace.len() as Ino {
        let Some(content) = namespace.file_content(ino) else {
            continue;
        };
        for (index, &hash) in content.objects.iter().enumerate() {
            let len = if content.chunked {
                (content.size - index as u64 * CHUNK_SIZE).min(CHUNK_SIZE)
            } else {
                content.size
            };
            if len > 0 {
                objects.entry(hash).or_insert((ino, len));
            }
        }
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_on_disk_do_not_use_up_the_room() {
        let candidates: Vec<(Hash, Ino, u64)> =
            (1..=4).map(|i| (Hash(i as u128), i + 1, 100)).collect();
        assert_eq!(fitting_prefix(&candidates, 250, |_, _| false), (2, 200));
        // The first two are cached: all four fit in the room of two.
        let cached = |hash: Hash, _| hash.0 <= 2;
        assert_eq!(fitting_prefix(&candidates, 250, cached), (4, 200));
        // A prefix: once one does not fit, later ones are left out even if they would.
        let big_second = [candidates[0], (Hash(9), 3, 1000), candidates[2]];
        assert_eq!(fitting_prefix(&big_second, 250, |_, _| false), (1, 100));
    }
}
