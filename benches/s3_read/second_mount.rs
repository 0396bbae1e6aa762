//! Question: what does mount_vfs's disk cache give a later task that reads the same inputs?
//! Right after each cold read with `--cache-dir`, the same objects again on a fresh mount that
//! keeps the cache, page cache dropped: the "(2nd mount)" rows.

use std::collections::BTreeMap;

use crate::mounts::{Contender, Env, Mount};
use crate::raw_read::RawRead;
use crate::readers::measure;
use crate::report::{print_mount_rows, Modes};
use crate::server::Server;

/// The second-mount reads of every `--cache-dir` contender.
pub struct SecondMount {
    size: u64,
    rows: BTreeMap<Contender, Modes>,
}

impl SecondMount {
    /// For files of `size` bytes.
    pub fn new(size: u64) -> SecondMount {
        SecondMount {
            size,
            rows: BTreeMap::new(),
        }
    }

    /// Reads through a fresh mount of `contender` on the disk cache its cold read just filled.
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
            Err(e) => samples.errors.push(e),
        }
    }

    /// `contender`'s second-mount rows, if it has any. No `/peer` ratio: a second mount reads
    /// a warm disk cache, the peers (caches off) read S3; that would not be like with like.
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
        );
    }
}
