//! Which CPU each shard is pinned to.
//!
//! Order: round-robin over NUMA nodes; within a node, one hyper-thread of every physical core
//! before any second sibling. Why:
//! - With fewer shards than CPUs (a small `--shards`), round-robin uses the memory bandwidth,
//!   local hugepage pools and PCIe/NIC paths of every node instead of saturating node 0.
//! - A shard on a core's second hyper-thread shares that core's execution units with the
//!   first, so siblings are used only once every core has a shard.
//! - Explicit hugepages are reserved per node; round-robin needs an even reservation per node,
//!   which is what `nr_hugepages` gives by default.
//!
//! More shards than online CPUs is refused: two pinned, busy-polling executors on one CPU would
//! take turns on it and add latency to both, which defeats shard-per-core.

use std::collections::BTreeMap;

use glommio::CpuLocation;

/// Orders `cpus` as described in the module docs. Deterministic for a given topology.
pub fn shard_cpu_order(cpus: &[CpuLocation]) -> Vec<CpuLocation> {
    // node -> (core key -> its CPUs in id order); BTreeMaps keep everything sorted.
    let mut nodes: BTreeMap<usize, BTreeMap<(usize, usize), Vec<CpuLocation>>> = BTreeMap::new();
    for c in cpus {
        nodes
            .entry(c.numa_node)
            .or_default()
            .entry((c.package, c.core))
            .or_default()
            .push(c.clone());
    }
    // Per node: first siblings of all cores, then second siblings, ...
    let mut per_node: Vec<std::vec::IntoIter<CpuLocation>> = nodes
        .into_values()
        .map(|cores| {
            let mut cores: Vec<Vec<CpuLocation>> = cores.into_values().collect();
            for siblings in &mut cores {
                siblings.sort_by_key(|c| c.cpu);
            }
            let depth = cores.iter().map(Vec::len).max().unwrap_or(0);
            let mut order = Vec::new();
            for level in 0..depth {
                order.extend(cores.iter().filter_map(|s| s.get(level).cloned()));
            }
            order.into_iter()
        })
        .collect();
    let mut out = Vec::with_capacity(cpus.len());
    while out.len() < cpus.len() {
        for node in &mut per_node {
            if let Some(c) = node.next() {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(cpu: usize, core: usize, numa_node: usize) -> CpuLocation {
        CpuLocation {
            cpu,
            core,
            package: numa_node,
            numa_node,
        }
    }

    #[test]
    fn round_robin_nodes_cores_before_siblings() {
        // 2 nodes x 2 cores x 2 threads; Linux numbers siblings cpu and cpu + 4.
        let cpus = vec![
            loc(0, 0, 0),
            loc(1, 1, 0),
            loc(2, 0, 1),
            loc(3, 1, 1),
            loc(4, 0, 0),
            loc(5, 1, 0),
            loc(6, 0, 1),
            loc(7, 1, 1),
        ];
        let order: Vec<usize> = shard_cpu_order(&cpus).iter().map(|c| c.cpu).collect();
        assert_eq!(order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn uneven_nodes() {
        let cpus = vec![loc(0, 0, 0), loc(1, 1, 0), loc(2, 2, 0), loc(3, 0, 1)];
        let order: Vec<usize> = shard_cpu_order(&cpus).iter().map(|c| c.cpu).collect();
        assert_eq!(order, vec![0, 3, 1, 2]);
    }
}
