//! Question: what does mount_vfs's disk cache give a later task that reads the same inputs?
//! Right after each cold read with `--cache-dir`, the same objects again on a fresh mount that
//! keeps the cache, page cache dropped: the "(2nd mount)" rows. Their limit, measured right
//! after each of them: the same readers on the cache files themselves (`DIR/Data/{hash}.xxh128`,
//! page cache dropped the same way), the "(cache files, no FUSE)" rows and the 2nd mount's
//! `/direct`. And the 2nd mount's time to first byte: open + first 1 MiB O_DIRECT read of the
//! cached `a.bin` on another fresh mount, page cache dropped.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use mount_vfs::manifest::Hash;

use crate::cold_read::add_bar;
use crate::common::chart::BarChart;
use crate::common::drop_caches;
use crate::first_byte::Ttfb;
use crate::mounts::{Contender, Env, Mount};
use crate::raw_read::RawRead;
use crate::readers::{measure, read_files};
use crate::report::{print_mount_rows, Modes};
use crate::server::Server;

/// The second-mount reads of every `--cache-dir` contender, and their references.
pub struct SecondMount {
    size: u64,
    /// The objects of `a.bin` and `b.bin`: their cache files' names.
    hashes: [Hash; 2],
    rows: BTreeMap<Contender, Modes>,
    /// The same readers on the cache files the 2nd mount just read, without FUSE.
    direct: BTreeMap<Contender, Modes>,
    /// Time to first byte of a 2nd mount (seconds), and bytes fetched from S3 by then.
    ttfb: Ttfb,
}

impl SecondMount {
    /// For files of `size` bytes whose objects are `hashes` (`a.bin`, `b.bin`).
    pub fn new(size: u64, hashes: [Hash; 2]) -> SecondMount {
        SecondMount {
            size,
            hashes,
            rows: BTreeMap::new(),
            direct: BTreeMap::new(),
            ttfb: Ttfb::default(),
        }
    }

    /// Reads through a fresh mount of `contender` on the disk cache its cold read just filled;
    /// then the same readers on the cache files directly; then a time to first byte on another
    /// fresh mount of the same cache (after the reads, so the rows see the cache as before).
    pub fn measure(
        &mut self,
        contender: Contender,
        direct: bool,
        readers: usize,
        server: &Server,
        env: &Env,
    ) {
        let samples = self
            .rows
            .entry(contender)
            .or_default()
            .entry((direct, readers))
            .or_default();
        match Mount::start_keeping_cache(contender, server, env) {
            Ok(mount) => measure(&mount, server, readers, self.size, direct, samples),
            Err(e) => {
                samples.errors.push(e);
                return;
            }
        }
        self.measure_direct(contender, direct, readers, server, env);
        match Mount::start_keeping_cache(contender, server, env) {
            Ok(mount) => self.ttfb.record(contender, &mount, server),
            Err(e) => eprintln!("# {e}"),
        }
    }

    /// The readers of [`measure`](Self::measure) on the cache files (no mount running), through
    /// links named like the files under the mount, so the readers and their byte checks are
    /// the mounts' own.
    fn measure_direct(
        &mut self,
        contender: Contender,
        direct: bool,
        readers: usize,
        server: &Server,
        env: &Env,
    ) {
        let samples = self
            .direct
            .entry(contender)
            .or_default()
            .entry((direct, readers))
            .or_default();
        let links = env.base.join("cache-files");
        let _ = fs::remove_dir_all(&links);
        fs::create_dir_all(&links).unwrap();
        for (name, hash) in ["a.bin", "b.bin"].into_iter().zip(self.hashes) {
            let target: PathBuf = env.cache_dir.join("Data").join(format!("{hash}.xxh128"));
            std::os::unix::fs::symlink(target, links.join(name)).unwrap();
        }
        drop_caches();
        let s0 = server.served();
        match read_files(&links, readers, self.size, direct, true) {
            Ok(rate) => {
                samples.rates.push(rate);
                samples.fetched_per_read.push(
                    (server.served() - s0) as f64
                        / (self.size * if readers == 1 { 1 } else { 2 }) as f64,
                );
            }
            Err(e) => samples.errors.push(e),
        }
    }

    /// `contender`'s second-mount rows, if it has any, each ending with its ratio to the cache
    /// files read directly (`/direct`), then those direct rows. No `/peer` ratio: a second mount
    /// reads a warm disk cache, the peers (caches off) read S3; that would not be like with like.
    pub fn print(&self, contender: Contender, raw: &RawRead) {
        let Some(modes) = self.rows.get(&contender) else {
            return;
        };
        print_mount_rows(
            &format!("{} (2nd mount)", contender.name()),
            contender.is_peer(),
            modes,
            |readers| raw.best(readers),
            |_, _| 0.0,
            contender.baseline().and_then(|b| self.rows.get(&b)),
            self.direct.get(&contender),
        );
        if let Some(direct) = self.direct.get(&contender) {
            print_mount_rows(
                &format!("{} (cache files, no FUSE)", contender.name()),
                true,
                direct,
                |readers| raw.best(readers),
                |_, _| 0.0,
                None,
                None,
            );
        }
    }

    /// `contender`'s 2nd-mount time to first byte, if it has any; this build's is also compared
    /// with the baseline's.
    pub fn print_ttfb(&self, contender: Contender) {
        let name = format!("{} (2nd mount)", contender.name());
        self.ttfb.print(contender, &name);
    }

    /// `contender`'s 2nd-mount bar in the chart of one mode, over its cache files read
    /// directly (the bar before it).
    pub fn add_to(&self, chart: &mut BarChart, contender: Contender, direct: bool, readers: usize) {
        let files = format!("{} (cache files, no FUSE)", contender.name());
        add_bar(
            chart,
            &files,
            self.direct.get(&contender),
            direct,
            readers,
            None,
        );
        let reference = chart
            .bars
            .iter()
            .any(|b| b.label == files)
            .then_some(files.as_str());
        add_bar(
            chart,
            &format!("{} (2nd mount)", contender.name()),
            self.rows.get(&contender),
            direct,
            readers,
            reference,
        );
    }
}
