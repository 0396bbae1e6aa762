//! The throughput table that the ceiling, raw and mount questions all print into: one text line
//! per row and mode, each followed by a `json:` line with the same numbers for scripts.

use std::collections::BTreeMap;

use crate::common::vs_baseline;
use crate::mounts::{peer_defaults, RCLONE_THROUGHPUT};
use crate::readers::Samples;

/// One mount row's measurements, by mode: (O_DIRECT, readers).
pub type Modes = BTreeMap<(bool, usize), Samples>;

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// `x / of` as `1.23x`, `-` without a reference.
pub fn ratio(x: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.2}x", x / of)
    } else {
        "-".into()
    }
}

/// `x / of` for JSON, `null` without a reference.
pub fn json_ratio(x: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.4}", x / of)
    } else {
        "null".into()
    }
}

/// Every run's rate in GB/s, for the last column.
pub fn fmt_runs(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{:.2}", r / 1e9))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn mode_name(direct: bool) -> &'static str {
    if direct {
        "O_DIRECT"
    } else {
        "buffered"
    }
}

/// The contenders' settings and the table's column header.
pub fn print_header() {
    let peers = if peer_defaults() {
        "s3fs and rclone with their defaults (BENCH_PEER_DEFAULTS=1)".to_string()
    } else {
        format!(
            "s3fs with its defaults (its tuning read slower here), rclone {} (its documented \
             throughput settings)",
            RCLONE_THROUGHPUT.join(" ")
        )
    };
    println!(
        "# settings: mount_vfs --memory-limit 4G (--shards as named); {peers}, caches off \
         (rclone --vfs-cache-mode off), so a '2nd mount' row (a warm disk cache) has no peer \
         ratio: the peers have no cache to be warm; its /direct is over the same readers on \
         the cache files themselves"
    );
    println!(
        "{:<34} {:<9} {:>7} {:>8} {:>8} {:>9}  ok/tried  runs (GB/s)",
        "contender", "mode", "readers", "GB/s", "/raw", "/peer"
    );
}

/// The rows of one mount, one per mode: its median rate over `best_raw(readers)` and over
/// `best_peer(direct, readers)` (0: no ratio), and, when `baseline` holds the same mount run by
/// the baseline binary, over that; when `direct_ref` holds the same readers on the files under
/// the mount read directly (a 2nd mount's disk-cache files), over that too (`/direct`).
pub fn print_mount_rows(
    name: &str,
    is_peer: bool,
    modes: &Modes,
    best_raw: impl Fn(usize) -> f64,
    best_peer: impl Fn(bool, usize) -> f64,
    baseline: Option<&Modes>,
    direct_ref: Option<&Modes>,
) {
    for direct in [true, false] {
        for readers in [1, 4] {
            let Some(s) = modes.get(&(direct, readers)) else {
                continue;
            };
            let mode = mode_name(direct);
            let Some(m) = median(s.rates.clone()) else {
                println!(
                    "{:<34} {:<9} {:>7} failed: {}",
                    name,
                    mode,
                    readers,
                    s.errors.first().cloned().unwrap_or_default()
                );
                continue;
            };
            let fetched = median(s.fetched_per_read.clone()).unwrap_or(0.0);
            let tried = s.rates.len() + s.errors.len();
            let ok = format!("{}/{tried}", s.rates.len());
            let peer = best_peer(direct, readers);
            let extra = if is_peer {
                format!("  S3 bytes/byte read {fetched:.2}")
            } else {
                format!(
                    "  S3 bytes/byte read {fetched:.2}, faults/GiB {:.0}, CPU s/GiB {:.2}",
                    median(s.faults_per_gib.clone()).unwrap_or(0.0),
                    median(s.cpu_per_gib.clone()).unwrap_or(0.0)
                )
            };
            let old = baseline
                .and_then(|b| b.get(&(direct, readers)))
                .and_then(|b| median(b.rates.clone()));
            let limit = direct_ref
                .and_then(|d| d.get(&(direct, readers)))
                .and_then(|d| median(d.rates.clone()));
            println!(
                "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {ok:>8}  {}{extra}{}{}",
                name,
                mode,
                readers,
                m / 1e9,
                ratio(m, best_raw(readers)),
                ratio(m, peer),
                fmt_runs(&s.rates),
                old.map_or(String::new(), |old| format!("  {}", vs_baseline(m, old))),
                limit.map_or(String::new(), |d| format!("  {} /direct", ratio(m, d)))
            );
            println!(
                "json: {{\"contender\":\"{}\",\"mode\":\"{mode}\",\"readers\":{readers},\"gbps\":{:.4},\"ratio_raw\":{},\"ratio_peer\":{},\"s3_bytes_per_byte\":{fetched:.3},\"faults_per_gib\":{:.0},\"cpu_s_per_gib\":{:.3},\"errors\":{}{}{}}}",
                name,
                m / 1e9,
                json_ratio(m, best_raw(readers)),
                json_ratio(m, peer),
                median(s.faults_per_gib.clone()).unwrap_or(0.0),
                median(s.cpu_per_gib.clone()).unwrap_or(0.0),
                s.errors.len(),
                old.map_or(String::new(), |old| format!(
                    ",\"ratio_baseline\":{}",
                    json_ratio(m, old)
                )),
                limit.map_or(String::new(), |d| format!(
                    ",\"ratio_direct\":{}",
                    json_ratio(m, d)
                ))
            );
        }
    }
}
