//! `mount_vfs stats MOUNTPOINT`: a live table of a running mount for a person at the node, read
//! from the daemon through the root's `user.mount_vfs.stats` extended attribute (a JSON snapshot
//! of the shards' counters, `metrics::snapshot_json`), so it works without `--metrics-addr`.
//! Rates are the difference of two samples one second apart.

use std::ffi::CString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::StatsArgs;
use crate::fs::STATS_XATTR;

/// Why no snapshot could be read; the exit status follows `mount_vfs --help`.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The path is not the root of a mount_vfs mount (or does not exist): a usage mistake.
    #[error("{0}")]
    NotAMount(String),
    /// The mount is there but did not answer (its daemon died, or the answer is garbage).
    #[error("{0}")]
    Failed(String),
}

impl StatsError {
    fn exit_code(&self) -> u8 {
        match self {
            StatsError::NotAMount(_) => 2,
            StatsError::Failed(_) => 1,
        }
    }
}

/// Runs the subcommand: one table (`--once`) or one per second until interrupted.
pub fn run(args: &StatsArgs) -> ExitCode {
    match watch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount_vfs stats: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn watch(args: &StatsArgs) -> Result<(), StatsError> {
    let mut before = (Instant::now(), read_snapshot(&args.mountpoint)?);
    let terminal = std::io::stdout().is_terminal() && !args.once && !args.json;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = (Instant::now(), read_snapshot(&args.mountpoint)?);
        let out = if args.json {
            format!("{}\n", now.1)
        } else {
            let table = table(&before.1, &now.1, (now.0 - before.0).as_secs_f64());
            // Redraw in place on a terminal; one table after another into a pipe.
            if terminal {
                format!("\x1b[H\x1b[2J{}\n{table}", args.mountpoint.display())
            } else if args.once {
                table
            } else {
                format!("{table}\n")
            }
        };
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader went away (`| head`): nothing more to say.
            return Ok(());
        }
        if args.once {
            return Ok(());
        }
        before = now;
    }
}

/// The daemon's JSON snapshot, read with getxattr(2) on `mountpoint`.
pub fn read_snapshot(mountpoint: &Path) -> Result<Value, StatsError> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| StatsError::NotAMount(format!("{}: not a path", mountpoint.display())))?;
    let name = CString::new(STATS_XATTR).expect("no NUL in the name");
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        // SAFETY: both strings are NUL-terminated and `buffer` is writable for its length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if n >= 0 {
            buffer.truncate(n as usize);
            break;
        }
        let error = std::io::Error::last_os_error();
        let shown = mountpoint.display();
        return Err(match error.raw_os_error() {
            // Many shards: ask for the size and try again.
            Some(libc::ERANGE) if buffer.len() < 16 << 20 => {
                buffer.resize(buffer.len() * 4, 0);
                continue;
            }
            Some(libc::ENODATA | libc::ENOTSUP) => StatsError::NotAMount(format!(
                "{shown} is not the mountpoint of a running mount_vfs (no {STATS_XATTR} there)"
            )),
            Some(libc::ENOENT | libc::ENOTDIR | libc::EACCES) => {
                StatsError::NotAMount(format!("{shown}: {error}"))
            }
            Some(libc::E2BIG) => StatsError::Failed(format!(
                "{shown}: the counters of this many shards do not fit an extended attribute"
            )),
            Some(libc::ENOTCONN) => StatsError::Failed(format!(
                "{shown}: the mount's daemon is gone ({error}); unmount it with `umount {shown}`"
            )),
            _ => StatsError::Failed(format!("{shown}: {error}")),
        });
    }
    let garbage = |why: String| {
        StatsError::Failed(format!(
            "{}: the mount answered {STATS_XATTR} with something else than its counters: {why}",
            mountpoint.display()
        ))
    };
    let columns: Value = serde_json::from_slice(&buffer).map_err(|e| garbage(e.to_string()))?;
    expand(&columns).ok_or_else(|| garbage("no fields and shards".into()))
}

/// The daemon's columnar form (`metrics::snapshot_json`) as one object per shard:
/// `{"pid":..,"shards":[{"opens":..,..},..]}`.
fn expand(columns: &Value) -> Option<Value> {
    let names = columns.get("fields")?.as_array()?;
    let shards = columns.get("shards")?.as_array()?;
    let shards: Option<Vec<Value>> = shards
        .iter()
        .map(|row| {
            let row = row.as_array()?;
            let object: serde_json::Map<String, Value> = names
                .iter()
                .zip(row)
                .map(|(name, value)| Some((name.as_str()?.to_owned(), value.clone())))
                .collect::<Option<_>>()?;
            Some(Value::Object(object))
        })
        .collect();
    Some(serde_json::json!({ "pid": columns.get("pid"), "shards": shards? }))
}

/// A counter of shard `row` of a snapshot (0 if absent: an older or newer daemon).
fn field(row: &Value, name: &str) -> u64 {
    row.get(name).and_then(Value::as_u64).unwrap_or(0)
}

fn shards(snapshot: &Value) -> &[Value] {
    snapshot
        .get("shards")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// One row of figures: over the interval (rates, hit rate) or as of now (in flight, totals).
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    served: u64,
    fetched: u64,
    hits: u64,
    misses: u64,
    in_flight: u64,
    errors: u64,
    served_total: u64,
}

impl Row {
    fn between(before: &Value, now: &Value) -> Row {
        let delta = |name: &str| field(now, name).saturating_sub(field(before, name));
        Row {
            served: delta("bytes_served"),
            fetched: delta("bytes_fetched"),
            hits: delta("cache_hits"),
            misses: delta("cache_misses"),
            in_flight: field(now, "store_reads_in_flight"),
            errors: field(now, "errors"),
            served_total: field(now, "bytes_served"),
        }
    }

    fn plus(self, o: Row) -> Row {
        Row {
            served: self.served + o.served,
            fetched: self.fetched + o.fetched,
            hits: self.hits + o.hits,
            misses: self.misses + o.misses,
            in_flight: self.in_flight + o.in_flight,
            errors: self.errors + o.errors,
            served_total: self.served_total + o.served_total,
        }
    }

    fn line(&self, label: &str, seconds: f64) -> String {
        let rate = |bytes: u64| format!("{}/s", human(bytes as f64 / seconds.max(1e-3)));
        let blocks = self.hits + self.misses;
        let hit_rate = if blocks == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", 100.0 * self.hits as f64 / blocks as f64)
        };
        format!(
            "{label:>6} {:>12} {:>12} {:>8} {:>9} {:>8} {:>11}",
            rate(self.served),
            rate(self.fetched),
            hit_rate,
            self.in_flight,
            self.errors,
            human(self.served_total as f64)
        )
    }
}

/// The table for the interval from `before` to `now` (`seconds` long): one row per shard and a
/// total.
pub fn table(before: &Value, now: &Value, seconds: f64) -> String {
    let mut out = format!(
        "{:>6} {:>12} {:>12} {:>8} {:>9} {:>8} {:>11}\n",
        "shard", "served", "fetched", "hit rate", "GETs now", "errors", "served all"
    );
    let mut total = Row::default();
    let earlier = shards(before);
    for (i, row) in shards(now).iter().enumerate() {
        let row = Row::between(earlier.get(i).unwrap_or(&Value::Null), row);
        out.push_str(&row.line(&i.to_string(), seconds));
        out.push('\n');
        total = total.plus(row);
    }
    out.push_str(&total.line("total", seconds));
    out.push('\n');
    out
}

/// `bytes` in binary units with one decimal (`3.0 MiB`).
fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_columnar_snapshot_expands_to_one_object_per_shard() {
        let columns =
            serde_json::json!({"pid": 7, "fields": ["a", "b"], "shards": [[1, 2], [3, 4]]});
        assert_eq!(
            expand(&columns),
            Some(serde_json::json!({"pid": 7, "shards": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]}))
        );
        assert_eq!(expand(&serde_json::json!({"shards": []})), None);
    }

    #[test]
    fn the_table_shows_rates_per_shard_and_in_total() {
        let before = serde_json::json!({"shards": [
            {"bytes_served": 0, "bytes_fetched": 0, "cache_hits": 0, "cache_misses": 0},
            {"bytes_served": 1024, "cache_hits": 1, "cache_misses": 1}
        ]});
        let now = serde_json::json!({"shards": [
            {"bytes_served": 2 << 20, "bytes_fetched": 4 << 20, "cache_hits": 3,
             "cache_misses": 1, "store_reads_in_flight": 2, "errors": 5},
            {"bytes_served": 1024, "cache_hits": 1, "cache_misses": 1}
        ]});
        let table = table(&before, &now, 2.0);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].contains("1.0 MiB/s") && lines[1].contains("2.0 MiB/s"));
        assert!(lines[1].contains("75.0%"), "{table}");
        assert!(lines[2].contains('-'), "no blocks in the interval: {table}");
        assert!(lines[3].starts_with(" total") && lines[3].contains("2.0 MiB"));
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
    }
}
