//! `--hugepages reserve`: a farm node need not keep hugepages reserved between jobs. At start
//! (as root) we add the 2 MiB pages the shards' pools need to the kernel's pool, on the NUMA
//! node each shard will run on (asked of the executors, which place them), then allocate like
//! `auto`; [`Reservation`]'s drop takes back what we added.
//! Without root, or if the kernel refuses, one line and plain `auto`. Two mounts reserving at
//! the same moment may race on the read-modify-write of the counter; a `kill -9` leaves the
//! pages reserved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mount_vfs_executors::{shard_numa_nodes, HUGE_PAGE};

/// The global counter, used on single-node machines.
const GLOBAL: &str = "/proc/sys/vm/nr_hugepages";
const NODES: &str = "/sys/devices/system/node";

/// Pages we added to each counter; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    added: Vec<(PathBuf, u64)>,
}

fn read(path: &Path) -> std::io::Result<u64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(std::io::Error::other)
}

/// Node `node`'s own counter of 2 MiB pages.
fn node_counter(node: usize) -> PathBuf {
    Path::new(NODES).join(format!(
        "node{node}/hugepages/hugepages-2048kB/nr_hugepages"
    ))
}

/// Whether the machine has more than one NUMA node (else the global counter is the one).
fn several_nodes() -> bool {
    let nodes = std::fs::read_dir(NODES).into_iter().flatten().flatten();
    nodes
        .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
        .count()
        > 1
}

/// Reserves the pages for `shards` pools of `pool_per_shard` bytes and logs one line; `None`
/// (also logged) when nothing could be reserved.
pub fn reserve(shards: usize, pool_per_shard: u64) -> Option<Reservation> {
    let per_shard = pool_per_shard.div_ceil(HUGE_PAGE as u64);
    let placed = several_nodes()
        .then(|| shard_numa_nodes(shards).ok())
        .flatten();
    let wanted: Vec<(PathBuf, u64)> = match placed {
        Some(nodes) => {
            let mut per_node: BTreeMap<usize, u64> = BTreeMap::new();
            for node in nodes {
                *per_node.entry(node).or_default() += per_shard;
            }
            (per_node.into_iter())
                .map(|(node, pages)| (node_counter(node), pages))
                .collect()
        }
        None => vec![(PathBuf::from(GLOBAL), per_shard * shards as u64)],
    };
    let asked: u64 = wanted.iter().map(|(_, pages)| pages).sum();
    let mut reservation = Reservation { added: Vec::new() };
    for (counter, pages) in wanted {
        let before = match read(&counter) {
            Ok(before) => before,
            Err(e) => return refused(&counter, e, reservation),
        };
        if let Err(e) = std::fs::write(&counter, (before + pages).to_string()) {
            return refused(&counter, e, reservation);
        }
        // The kernel grants what it can find free (memory may be fragmented).
        let granted = read(&counter).map_or(0, |now| now.saturating_sub(before));
        reservation.added.push((counter, granted));
    }
    let granted: u64 = reservation.added.iter().map(|(_, pages)| pages).sum();
    tracing::info!(
        "--hugepages reserve: reserved {granted} of the {asked} 2 MiB hugepages the {shards} \
         shards' pools need ({} MiB){}; given back at exit",
        asked * 2,
        if reservation.added.len() > 1 {
            format!(" over {} NUMA nodes", reservation.added.len())
        } else {
            String::new()
        }
    );
    Some(reservation)
}

/// One plain line, and what was already added is given back (by dropping `partial`).
fn refused(counter: &Path, e: std::io::Error, partial: Reservation) -> Option<Reservation> {
    tracing::info!(
        "--hugepages reserve: cannot reserve hugepages ({}: {e}; reserving needs root): the \
         pools use what is already reserved, else transparent hugepages, as with --hugepages auto",
        counter.display()
    );
    drop(partial);
    None
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for (counter, added) in &self.added {
            if *added == 0 {
                continue;
            }
            let given_back = read(counter)
                .and_then(|now| std::fs::write(counter, now.saturating_sub(*added).to_string()));
            match given_back {
                Ok(()) => tracing::info!(
                    "--hugepages reserve: gave back {added} hugepages ({})",
                    counter.display()
                ),
                Err(e) => tracing::warn!(
                    "--hugepages reserve: cannot give back {added} hugepages ({}): {e}",
                    counter.display()
                ),
            }
        }
    }
}
