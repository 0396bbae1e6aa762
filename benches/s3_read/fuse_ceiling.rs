//! Question: how fast could any FUSE filesystem read here? A do-nothing FUSE server in this
//! process answers every READ from one buffer; measured before the mounts, in the same
//! invocation, it is the ceiling the mount rows are read against.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::chart::BarChart;
use crate::common::{drop_caches, mount_null};
use crate::mounts::step_deadline;
use crate::readers::read_files;
use crate::report::{fmt_runs, median, mode_name};

/// The do-nothing server's rates by (O_DIRECT, readers), every run.
pub struct FuseCeiling {
    rates: BTreeMap<(bool, usize), Vec<f64>>,
}

impl FuseCeiling {
    /// All `runs` at once: it has no S3 behind it, so nothing to interleave with.
    pub fn measure(base: &Path, size: u64, runs: usize) -> FuseCeiling {
        let null_mnt = base.join("null_mnt");
        let null = mount_null(&null_mnt, size, &["a.bin", "b.bin"]);
        let mut rates: BTreeMap<(bool, usize), Vec<f64>> = BTreeMap::new();
        for _ in 0..runs {
            for direct in [true, false] {
                for readers in [1, 4] {
                    step_deadline();
                    if let Ok(rate) = read_files(&null_mnt, readers, size, direct, false) {
                        rates.entry((direct, readers)).or_default().push(rate);
                    }
                    drop_caches();
                }
            }
        }
        drop(null);
        FuseCeiling { rates }
    }

    pub fn print(&self) {
        for ((direct, readers), v) in &self.rates {
            let m = median(v.clone()).unwrap_or(0.0);
            let mode = mode_name(*direct);
            println!(
                "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {}",
                "null FUSE (ceiling, no I/O)",
                mode,
                readers,
                m / 1e9,
                "",
                "",
                fmt_runs(v)
            );
            println!(
                "json: {{\"contender\":\"null FUSE\",\"mode\":\"{mode}\",\"readers\":{readers},\"gbps\":{:.4}}}",
                m / 1e9
            );
        }
    }

    /// Its bar in the chart of one mode.
    pub fn add_to(&self, chart: &mut BarChart, direct: bool, readers: usize) {
        if let Some(v) = self.rates.get(&(direct, readers)) {
            let gbps: Vec<f64> = v.iter().map(|r| r / 1e9).collect();
            chart.bar("null FUSE (ceiling, no I/O)", &gbps);
        }
    }
}
