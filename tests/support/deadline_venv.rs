//! The released Deadline Cloud client (`pip install deadline`) in a cached venv, shared by the
//! tests that run it (`#[path]`). Its venv is cached in `target/test-venvs/deadline` (made in a
//! temp dir, then renamed, so an interrupted install never leaves a half venv behind). The version
//! is pinned: a newer client may write other bytes. When pip cannot reach its registry the test
//! fails, unless `MOUNT_VFS_ALLOW_SKIP` names it (see `tests/support/skip.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::skip::skip_or_fail;

const NETWORK_SIGNS: &[&str] = &[
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ProxyError",
    "Connection refused",
];

/// The released client whose output we match byte for byte (its `.ready` marker holds it, so
/// changing it rebuilds the venv). "No matching distribution ... (from versions: none)" then
/// means this Python is too old for it, not that the network is down.
pub const DEADLINE_VERSION: &str = "0.60.10";

fn venv_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .unwrap_or(tmp)
        .join("test-venvs")
        .join("deadline")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Returns the venv, or None when the package registry is unreachable and skipping `test` is
/// allowed.
pub fn deadline_venv(test: &str) -> Option<PathBuf> {
    let venv = venv_dir();
    let parent = venv.parent().unwrap();
    fs::create_dir_all(parent).unwrap();
    // One installer at a time, whether the others are tests of this binary (threads) or of
    // another one (processes): flock excludes every other open of the lock file.
    let lock = fs::File::create(parent.join("deadline.lock")).unwrap();
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    match fs::read_to_string(venv.join(".ready")) {
        Ok(version) if version == DEADLINE_VERSION => return Some(venv),
        Ok(_) => fs::remove_dir_all(&venv).unwrap(),
        Err(_) => {}
    }
    let staging = parent.join(format!("deadline.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let o = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&staging)
        .output()
        .expect("python3 must be installed");
    assert!(o.status.success(), "python3 -m venv failed: {}", text(&o));
    let o = Command::new(staging.join("bin/pip"))
        .args(["install", "--disable-pip-version-check"])
        .arg(format!("deadline=={DEADLINE_VERSION}"))
        .output()
        .unwrap();
    if !o.status.success() {
        let out = text(&o);
        let _ = fs::remove_dir_all(&staging);
        if NETWORK_SIGNS.iter().any(|s| out.contains(s)) {
            let why = format!(
                "pip cannot reach its package registry: {}",
                out.lines().last().unwrap_or_default()
            );
            skip_or_fail(test, &why);
            return None;
        }
        panic!("pip install deadline failed (not a network problem):\n{out}");
    }
    fs::write(staging.join(".ready"), DEADLINE_VERSION).unwrap();
    // Venvs hard-code their path in scripts: a renamed venv must be run as `python -m`.
    fs::rename(&staging, &venv).unwrap();
    assert!(venv.join(".ready").exists());
    drop(lock);
    Some(venv)
}
