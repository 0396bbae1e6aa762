//! Question: how fast does each FUSE contender read a cold file, against the raw clients and
//! the peers? A fresh mount and a dropped page cache for every measurement; one reader reads
//! `a` whole, four read the halves of `a` and `b`; O_DIRECT and buffered.

use std::collections::BTreeMap;

use crate::common::chart::BarChart;
use crate::mounts::{Contender, Env, Mount};
use crate::raw_read::RawRead;
use crate::readers::measure;
use crate::report::{median, print_mount_rows, Modes};
use crate::server::Server;

/// Every contender's cold reads.
pub struct ColdRead {
    size: u64,
    rows: BTreeMap<Contender, Modes>,
}

impl ColdRead {
    /// For files of `size` bytes.
    pub fn new(size: u64) -> ColdRead {
        ColdRead {
            size,
            rows: BTreeMap::new(),
        }
    }

    /// One cold read of `contender` with `readers` readers on a fresh mount. False when it
    /// could not mount: then it left no disk cache for a second mount to read.
    pub fn measure(
        &mut self,
        contender: Contender,
        direct: bool,
        readers: usize,
        server: &Server,
        env: &Env,
    ) -> bool {
        let samples = self
            .rows
            .entry(contender)
            .or_default()
            .entry((direct, readers))
            .or_default();
        match Mount::start(contender, server, env) {
            Ok(mount) => {
                measure(&mount, server, readers, self.size, direct, samples);
                true
            }
            Err(e) => {
                samples.errors.push(e);
                false
            }
        }
    }

    /// The best peer's median rate in this mode: the `/peer` reference.
    fn best_peer(&self, direct: bool, readers: usize) -> f64 {
        self.rows
            .iter()
            .filter(|(c, _)| c.is_peer())
            .filter_map(|(_, modes)| modes.get(&(direct, readers)))
            .filter_map(|s| median(s.rates.clone()))
            .fold(0.0f64, f64::max)
    }

    /// `contender`'s rows; a mount_vfs row of this build is also compared with the baseline's.
    pub fn print(&self, contender: Contender, raw: &RawRead) {
        let Some(modes) = self.rows.get(&contender) else {
            return;
        };
        print_mount_rows(
            &contender.name(),
            contender.is_peer(),
            modes,
            |readers| raw.best(readers),
            |direct, readers| self.best_peer(direct, readers),
            contender.baseline().and_then(|b| self.rows.get(&b)),
            None,
        );
    }

    /// `contender`'s bar in the chart of one mode, over the best raw client (`reference`).
    pub fn add_to(
        &self,
        chart: &mut BarChart,
        contender: Contender,
        direct: bool,
        readers: usize,
        reference: Option<&str>,
    ) {
        add_bar(
            chart,
            &contender.name(),
            self.rows.get(&contender),
            direct,
            readers,
            reference,
        );
    }
}

/// A bar of the samples of `modes` in one mode, if any, over `reference` when there is one.
pub fn add_bar(
    chart: &mut BarChart,
    label: &str,
    modes: Option<&Modes>,
    direct: bool,
    readers: usize,
    reference: Option<&str>,
) {
    let Some(samples) = modes.and_then(|m| m.get(&(direct, readers))) else {
        return;
    };
    let gbps: Vec<f64> = samples.rates.iter().map(|r| r / 1e9).collect();
    match reference {
        Some(reference) => chart.bar_vs(label, &gbps, reference),
        None => chart.bar(label, &gbps),
    }
}
