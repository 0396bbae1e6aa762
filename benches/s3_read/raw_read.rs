//! Question: how fast do plain S3 clients read this server, without FUSE? Our `S3Store` on one
//! and two glommio shards, and an independent hyper client; the best of them is every mount
//! row's `/raw` reference.

use std::collections::BTreeMap;
use std::sync::Arc;

use mount_vfs::manifest::Hash;
use mount_vfs::store::S3Target;

use crate::clients::{raw_hyper, raw_s3store, s3_config, RAW_IN_FLIGHT};
use crate::common::chart::BarChart;
use crate::mounts::step_deadline;
use crate::report::{fmt_runs, median, ratio};

/// The raw clients and their rates by (client, readers), every run.
pub struct RawRead {
    target: Arc<S3Target>,
    endpoint: String,
    hashes: [Hash; 2],
    size: u64,
    rates: BTreeMap<(String, usize), Vec<f64>>,
}

impl RawRead {
    /// Our store's target on `endpoint`, checked to answer, for objects `hashes` of `size`
    /// bytes (and their plain copies for hyper).
    pub fn new(endpoint: &str, hashes: [Hash; 2], size: u64) -> RawRead {
        let target = S3Target::start(&s3_config(endpoint, "root")).unwrap();
        assert_eq!(target.probe().unwrap(), None);
        RawRead {
            target,
            endpoint: endpoint.into(),
            hashes,
            size,
            rates: BTreeMap::new(),
        }
    }

    /// One run of every client, one reader then four.
    pub fn measure_run(&mut self) {
        let plain_keys = ["plain/a.bin".to_string(), "plain/b.bin".to_string()];
        for readers in [1, 4] {
            step_deadline();
            for shards in [1, 2] {
                let rate = raw_s3store(&self.target, self.hashes, readers, self.size, shards);
                self.rates
                    .entry((format!("S3Store glommio, {shards} shard(s)"), readers))
                    .or_default()
                    .push(rate);
            }
            let rate = raw_hyper(&self.endpoint, plain_keys.clone(), readers, self.size);
            self.rates
                .entry(("hyper + aws-sigv4".into(), readers))
                .or_default()
                .push(rate);
        }
    }

    /// The best client's median rate with `readers` readers.
    pub fn best(&self, readers: usize) -> f64 {
        self.rates
            .iter()
            .filter(|((_, r), _)| *r == readers)
            .filter_map(|(_, v)| median(v.clone()))
            .fold(0.0f64, f64::max)
    }

    pub fn print(&self) {
        for ((client, readers), v) in &self.rates {
            let m = median(v.clone()).unwrap_or(0.0);
            println!(
                "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {}",
                format!("raw {client}"),
                "8M GETs",
                readers,
                m / 1e9,
                ratio(m, self.best(*readers)),
                "",
                fmt_runs(v)
            );
            println!(
                "json: {{\"contender\":\"raw {client}\",\"mode\":\"8MiB x{RAW_IN_FLIGHT}\",\"readers\":{readers},\"gbps\":{:.4}}}",
                m / 1e9
            );
        }
    }

    /// The raw clients' bars for `readers` readers; returns the best one's label, the
    /// reference every mount bar's ratio is over.
    pub fn add_to(&self, chart: &mut BarChart, readers: usize) -> Option<String> {
        let mut best: Option<(String, f64)> = None;
        for ((client, r), v) in &self.rates {
            if *r != readers {
                continue;
            }
            let label = format!("raw {client}");
            let gbps: Vec<f64> = v.iter().map(|r| r / 1e9).collect();
            chart.bar(&label, &gbps);
            let m = median(v.clone()).unwrap_or(0.0);
            if best.as_ref().is_none_or(|(_, b)| m > *b) {
                best = Some((label, m));
            }
        }
        best.map(|(label, _)| label)
    }
}
