//! Question: how long until a fresh mount returns the first byte? Open + the first 1 MiB
//! O_DIRECT read of `a.bin` on a fresh mount, page cache dropped, and how much the contender
//! had fetched from S3 by then.

use std::collections::BTreeMap;

use crate::clients::raw_get_seconds;
use crate::common::{drop_caches, vs_baseline};
use crate::mounts::{Contender, Env, Mount};
use crate::readers::{first_byte, MIB};
use crate::report::{json_ratio, median};
use crate::server::Server;

/// The first-byte question: a fresh mount of each contender, once per run, and the reference
/// without FUSE: one signed 1 MiB ranged GET of `plain/a.bin` on a fresh connection.
#[derive(Default)]
pub struct FirstByte {
    mounts: Ttfb,
    raw: Vec<f64>,
}

impl FirstByte {
    pub fn measure(&mut self, contender: Contender, server: &Server, env: &Env) {
        match Mount::start(contender, server, env) {
            Ok(mount) => self.mounts.record(contender, &mount, server),
            Err(e) => eprintln!("# {e}"),
        }
    }

    /// One raw 1 MiB GET, timed from sending to the last body byte.
    pub fn measure_raw(&mut self, server: &Server) {
        match raw_get_seconds(&server.endpoint(), "plain/a.bin", 0, MIB as u64) {
            Ok(t) => self.raw.push(t),
            Err(e) => eprintln!("# raw 1 MiB GET: {e}"),
        }
    }

    pub fn print(&self, contender: Contender) {
        self.mounts.print(contender, &contender.name());
    }

    pub fn print_raw(&self) {
        print_ttfb("raw 1 MiB GET (hyper)", &self.raw, MIB as f64, None);
    }
}

/// Times to first byte (seconds) and bytes fetched from S3 by then, every run, per contender.
#[derive(Default)]
pub struct Ttfb {
    seconds: BTreeMap<Contender, Vec<f64>>,
    fetched: BTreeMap<Contender, Vec<f64>>,
}

impl Ttfb {
    /// Open + first 1 MiB O_DIRECT read of `a.bin` on `mount` (a fresh one), page cache dropped.
    pub fn record(&mut self, contender: Contender, mount: &Mount, server: &Server) {
        drop_caches();
        let s0 = server.served();
        match first_byte(&mount.files) {
            Ok(t) => {
                self.seconds.entry(contender).or_default().push(t);
                self.fetched
                    .entry(contender)
                    .or_default()
                    .push((server.served() - s0) as f64);
            }
            Err(e) => eprintln!("# {} TTFB: {e}", contender.name()),
        }
    }

    /// `contender`'s line as `name`, if any run succeeded; a mount_vfs line of this build is
    /// also compared with the baseline's.
    pub fn print(&self, contender: Contender, name: &str) {
        let Some(v) = self.seconds.get(&contender) else {
            return;
        };
        let fetched =
            median(self.fetched.get(&contender).cloned().unwrap_or_default()).unwrap_or(0.0);
        let old = contender
            .baseline()
            .and_then(|b| self.seconds.get(&b))
            .and_then(|b| median(b.clone()));
        print_ttfb(name, v, fetched, old);
    }
}

/// One time-to-first-byte line and its `json:` line: the median of `v` (seconds), the median
/// bytes `fetched` from S3 by then, and the baseline's median `old` if any. Nothing without a
/// successful run.
fn print_ttfb(name: &str, v: &[f64], fetched: f64, old: Option<f64>) {
    let Some(m) = median(v.to_vec()) else {
        return;
    };
    println!(
        "TTFB {:<29} {:>8.1} ms  ({:.0} MiB fetched from S3 by then)  runs: {}{}",
        name,
        m * 1e3,
        fetched / MIB as f64,
        v.iter()
            .map(|t| format!("{:.1}", t * 1e3))
            .collect::<Vec<_>>()
            .join(" "),
        old.map_or(String::new(), |old| format!("  {}", vs_baseline(m, old)))
    );
    println!(
        "json: {{\"contender\":\"{}\",\"ttfb_ms\":{:.2},\"ttfb_fetched_mib\":{:.1}{}}}",
        name,
        m * 1e3,
        fetched / MIB as f64,
        old.map_or(String::new(), |old| format!(
            ",\"ratio_baseline\":{}",
            json_ratio(m, old)
        ))
    );
}
