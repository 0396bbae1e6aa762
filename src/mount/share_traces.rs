//! `--share-traces`: traces kept next to the data in the S3 bucket, so that a mount on one node
//! prefetches what mounts of the same manifest on other nodes read (`crate::trace`).
//!
//! Each mount uploads its own trace (not the union with what it found) as one object,
//! `{rootPrefix}/Traces/{manifest-id}/{newest-first}-{host}-{pid}.json`, rewritten while it
//! changes and at unmount; the name makes nodes never overwrite each other and, with the start
//! time inverted, lists newest first. At start-up a mount lists that prefix once (one page),
//! reads the [`MAX_READ`] newest objects of at most [`MAX_OBJECT_BYTES`] each and unions them
//! behind its local trace. Nothing here fails a mount or an unmount: every S3 or format problem
//! is one log line and the mount carries on with what it has.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::s3::ListedObject;
use crate::store::S3Target;
use crate::trace::{PublishTrace, Trace};

/// Most trace objects a mount reads at start-up: the newest ones.
pub const MAX_READ: usize = 8;
/// Largest trace object read or written (about 100 000 objects); a larger one is skipped, and a
/// longer trace is cut to its first-read part when uploaded.
pub const MAX_OBJECT_BYTES: u64 = 8 << 20;
/// Most keys one listing asks for (one page).
const MAX_LISTED: usize = 1000;

/// The bucket side of one manifest's traces.
pub(super) struct SharedTraces {
    target: Arc<S3Target>,
    /// `Traces/{manifest-id}/`, relative to the root prefix.
    prefix: String,
    /// This mount's object, relative to the root prefix.
    key: String,
}

impl SharedTraces {
    pub fn new(target: Arc<S3Target>, manifest_id: &str) -> SharedTraces {
        let prefix = format!("Traces/{manifest_id}/");
        let key = format!("{prefix}{}.json", unique_name(SystemTime::now()));
        SharedTraces {
            target,
            prefix,
            key,
        }
    }

    /// The union of the newest traces in the bucket (newest first), and how many objects it
    /// came from. Failures are logged and leave what could be read.
    pub fn fetch(&self) -> (Trace, usize) {
        let prefix = self.prefix.clone();
        let answer = self.target.on_own_thread(move |store| async move {
            let listed = store.list_objects(&prefix, MAX_LISTED).await?;
            let (chosen, too_large) = choose(listed);
            let mut read = Vec::with_capacity(chosen.len());
            for object in chosen {
                let bytes = store.get_object(&object.key, object.size).await;
                read.push((object.key, bytes));
            }
            Ok::<_, crate::store::StoreError>((read, too_large))
        });
        let answer = match answer {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let (read, too_large) = match answer {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(
                    "shared traces not read: {e}; prefetching from the local trace only"
                );
                return (Trace::default(), 0);
            }
        };
        if too_large > 0 {
            tracing::warn!(
                "shared traces under {}: {too_large} objects over {} MiB skipped",
                self.prefix,
                MAX_OBJECT_BYTES >> 20
            );
        }
        let mut union = Trace::default();
        let mut used = 0;
        for (key, bytes) in read {
            match bytes
                .map_err(|e| e.to_string())
                .and_then(|bytes| Trace::decode(&bytes).map_err(|e| e.to_string()))
            {
                Ok(trace) => {
                    union = union.union(&trace);
                    used += 1;
                }
                Err(e) => tracing::warn!("shared trace {key} ignored: {e}"),
            }
        }
        (union, used)
    }
}

/// The newest [`MAX_READ`] objects of a listing that are not over [`MAX_OBJECT_BYTES`], newest
/// first, and how many were skipped as too large.
fn choose(mut listed: Vec<ListedObject>) -> (Vec<ListedObject>, usize) {
    let before = listed.len();
    listed.retain(|object| object.size <= MAX_OBJECT_BYTES);
    let too_large = before - listed.len();
    // Newest first by time; at equal (or missing) times, by key, which lists newest first too.
    listed.sort_by(|a, b| {
        b.last_modified
            .cmp(&a.last_modified)
            .then(a.key.cmp(&b.key))
    });
    listed.truncate(MAX_READ);
    (listed, too_large)
}

/// `{newest-first}-{host}-{pid}`: the start time in milliseconds subtracted from 10^13 (so
/// later mounts sort first), then host name and process id, so that no two mounts share it.
fn unique_name(now: SystemTime) -> String {
    let millis = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let newest_first = 10_000_000_000_000u64.saturating_sub(millis);
    let host: String = host_name()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' => c,
            _ => '-',
        })
        .collect();
    format!("{newest_first:013}-{host}-{}", std::process::id())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Uploads a mount's trace from the trace writer's thread; one log line per run of failures.
pub(super) struct Publisher {
    shared: SharedTraces,
    failing: bool,
}

impl Publisher {
    pub fn new(shared: SharedTraces) -> Publisher {
        Publisher {
            shared,
            failing: false,
        }
    }
}

impl PublishTrace for Publisher {
    fn publish(&mut self, mine: &Trace) -> bool {
        let body = mine.encode_within(MAX_OBJECT_BYTES as usize);
        let key = self.shared.key.clone();
        let answer = self
            .shared
            .target
            .on_own_thread(move |store| async move { store.put_object(&key, &body).await });
        let error = match answer {
            Ok(Ok(())) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("shared trace {} uploaded again", self.shared.key);
                }
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(
                "shared trace {} not uploaded: {error}; other nodes will not prefetch what this \
                 mount read",
                self.shared.key
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64, last_modified: &str) -> ListedObject {
        ListedObject {
            key: key.into(),
            size,
            last_modified: last_modified.into(),
        }
    }

    #[test]
    fn the_newest_small_enough_objects_are_chosen() {
        let mut objects = vec![listed(
            "big",
            MAX_OBJECT_BYTES + 1,
            "2026-12-02T10:00:00.000Z",
        )];
        for i in 0..MAX_READ + 2 {
            objects.push(listed(
                &format!("k{i}"),
                10,
                &format!("2026-12-02T09:{i:02}:00.000Z"),
            ));
        }
        let (chosen, too_large) = choose(objects);
        assert_eq!(too_large, 1);
        let keys: Vec<&str> = chosen.iter().map(|o| o.key.as_str()).collect();
        let expected: Vec<String> = (2..MAX_READ + 2).rev().map(|i| format!("k{i}")).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn later_mounts_sort_first_and_names_are_safe() {
        let earlier = unique_name(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        let later = unique_name(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_001));
        assert!(later < earlier, "{later} !< {earlier}");
        assert!(later
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)));
    }
}
