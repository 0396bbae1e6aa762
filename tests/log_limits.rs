//! `--log-level` and per-cause rate limits: thousands of failing reads of one bad object at
//! debug level write a few lines and then one "suppressed" count, not thousands of lines.

mod common;

use common::{job, pattern, read_all, Mount, MountOptions};

#[test]
fn a_storm_of_failures_writes_a_few_lines_and_a_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(9, 100_000);
    let (manifest, cas) = job(tmp.path(), &[("bad.bin", &data)], "2023-03-03");
    // The object disappears from the CAS: every read of the file fails.
    for entry in std::fs::read_dir(cas.join("Data")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let log = tmp.path().join("mount.log");
    let log_arg = log.to_str().unwrap();
    let cas_arg = cas.to_str().unwrap();
    // RUST_LOG empty counts as unset: --log-level decides.
    let mut mount = Mount::start_with_store(
        &manifest,
        &["--cas", cas_arg],
        &[("RUST_LOG", "")],
        &tmp.path().join("mnt"),
        MountOptions::with(&["--log-file", log_arg, "--log-level", "debug"]),
    );
    let path = mount.dir.join("bad.bin");
    let failures = 2000;
    for _ in 0..failures {
        assert!(read_all(&path).is_err());
    }
    // The next window: one more failure brings the count of what was dropped.
    std::thread::sleep(std::time::Duration::from_secs(
        mount_vfs::log_limit::WINDOW_SECS,
    ));
    assert!(read_all(&path).is_err());
    mount.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    let failure_lines = log.lines().filter(|l| l.contains("errno=")).count();
    let limit = mount_vfs::log_limit::LINES_PER_WINDOW as usize;
    assert!(failure_lines >= 1, "debug lines are written: {log}");
    assert!(
        failure_lines <= 5 * limit,
        "{failure_lines} lines for {failures} failures:\n{log}"
    );
    // Nothing else writes a line per request at --log-level debug either.
    assert!(
        log.lines().count() < 200,
        "{} lines for {failures} failures",
        log.lines().count()
    );
    let suppressed = log
        .lines()
        .find(|l| l.contains("suppressed"))
        .unwrap_or_else(|| panic!("no suppression count:\n{log}"));
    assert!(suppressed.contains("similar messages"), "{suppressed}");
    println!(
        "{failures} failed reads: {failure_lines} failure lines, {} lines in all; {suppressed}",
        log.lines().count()
    );
}
