//! Question: is the READ path slower with `--metrics-addr` on? Warm reads through one shard
//! with the endpoint off and on (and scraped every second, as Prometheus would, but 15x more
//! often than its default), interleaved run by run so both see the same machine.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, checked_read, Clock, Daemon};

/// Warm rates (bytes/s) with the endpoint off and on, and the scrapes that succeeded during the
/// "on" samples.
pub struct MetricsCost {
    pub off: Vec<f64>,
    pub on: Vec<f64>,
    pub scrapes: usize,
}

/// The sum of `mount_vfs_bytes_served_total` over the shards in a scrape.
fn bytes_served(body: &str) -> u64 {
    common::metric_sum(body, "mount_vfs_bytes_served_total") as u64
}

/// `runs` pairs of samples; in each, `file` (xxh3-128 `digest`, fits one shard's pool) is read
/// once to warm the pool, then again and again for at least `secs`.
pub fn measure(
    manifest: &Path,
    cas: &Path,
    mnt: &Path,
    file: &str,
    digest: u128,
    runs: usize,
    secs: f64,
) -> MetricsCost {
    let mut cost = MetricsCost {
        off: vec![],
        on: vec![],
        scrapes: 0,
    };
    for run in 0..runs {
        // Alternate which goes first, so neither always follows the other.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for metrics in order {
            let mut command = Command::new(common::bin());
            command.arg(manifest).arg(mnt).arg("--cas").arg(cas).args([
                "--shards",
                "1",
                "--memory-limit",
                "1G",
            ]);
            let port = common::free_port();
            if metrics {
                command.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
            }
            let daemon = Daemon::start(command, mnt, &mnt.with_extension("log"))
                .unwrap_or_else(|e| panic!("{e}"));
            let path = daemon.mnt.join(file);
            checked_read(&path, true, Clock::AfterOpen, digest);
            let stop = Arc::new(AtomicBool::new(false));
            let scraper = metrics.then(|| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let body =
                            common::scrape_metrics(port).unwrap_or_else(|e| panic!("scrape: {e}"));
                        assert!(bytes_served(&body) > 0, "no bytes_served in a scrape");
                        ok += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    ok
                })
            });
            let size = std::fs::metadata(&path).unwrap().len() as f64;
            let started = Instant::now();
            let (mut bytes, mut timed) = (0.0, 0.0);
            while started.elapsed().as_secs_f64() < secs {
                let rate = checked_read(&path, true, Clock::AfterOpen, digest);
                bytes += size;
                timed += size / rate;
            }
            stop.store(true, Ordering::Relaxed);
            if let Some(scraper) = scraper {
                cost.scrapes += scraper.join().unwrap();
                let served =
                    bytes_served(&common::scrape_metrics(port).unwrap_or_else(|e| panic!("{e}")));
                assert!(
                    served as f64 >= bytes + size,
                    "the endpoint counted {served} bytes served, the bench read {}",
                    bytes + size
                );
            }
            let rate = bytes / timed;
            if metrics {
                cost.on.push(rate);
            } else {
                cost.off.push(rate);
            }
        }
    }
    cost
}
