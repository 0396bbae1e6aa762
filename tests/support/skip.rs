//! Skipping a test whose prerequisite is missing, without letting the skip pass for a success.
//!
//! `cargo test` reports a test that returns early as ok, so a missing prerequisite fails the
//! test unless `MOUNT_VFS_ALLOW_SKIP` names it (a comma-separated list of test names, or `all`).
//! Every allowed skip is printed and appended to the file named by `MOUNT_VFS_SKIP_LOG`, which
//! `scripts/test.sh` counts and prints at the end of the run. Shared by the root crate's and the
//! executors crate's tests (`#[path]`).

use std::io::Write;

/// Fails `test` because `why`, unless the environment allows skipping it; returns when the skip
/// is allowed (the caller then returns).
pub fn skip_or_fail(test: &str, why: &str) {
    let allowed = std::env::var("MOUNT_VFS_ALLOW_SKIP").unwrap_or_default();
    let allowed = allowed
        .split(',')
        .map(str::trim)
        .any(|t| t == "all" || t == test);
    if !allowed {
        panic!(
            "{test} cannot run: {why}. Fix that, or set MOUNT_VFS_ALLOW_SKIP={test} to skip it \
             on purpose (it is then counted as skipped, not passed)"
        );
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os("MOUNT_VFS_SKIP_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(file, "{test}: {why}");
        }
    }
}
