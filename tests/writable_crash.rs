//! Crash consistency of `--writable`: the model workload (tests/common/model.rs) runs on a
//! writable mount, the daemon is killed with SIGKILL at a random operation, and a new mount of
//! the same manifest with the same `--cache-dir` must give back what was acknowledged.
//!
//! Two checks after each kill, the weak one first (its failures are the precise ones):
//! - POSIX durability: every file fsynced and not changed or renamed since has exactly the
//!   content it had at the fsync; of each rename onto a free name (neither name touched since),
//!   exactly one name exists (never both, never neither: nothing half-applied).
//! - Every acknowledged operation: the whole tree equals the reference at the moment of the
//!   kill. SIGKILL of the daemon loses no page cache (the kernel keeps the cache dir's dirty
//!   pages, and without FUSE writeback caching an acknowledged write has reached the daemon, or
//!   through passthrough the upper file), so a mount that journals each operation before
//!   answering it loses nothing, fsynced or not. A failure of only this check would be a loss
//!   POSIX allows after a power cut, but not after a process crash.
//!
//! Environment: `MODEL_SEED` replays a run, `CRASH_ROUNDS` sets the number of kills (default
//! 8), `CRASH_MAX_OPS` the most operations between two kills (default 1500). A second test
//! kills the daemon while operations are in flight.

mod common;

use std::time::{Duration, Instant};

use common::model::{
    self, base_files, compare_trees, copy_tree, env_u64, errno_name, with_watchdog, Durability,
    Model,
};
use common::{job, signal, Mount};

/// An operation in flight this long counts as hung.
const STALL: Duration = Duration::from_secs(60);

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn kill_9_at_random_points_loses_no_acknowledged_operation() {
    let seed = model::seed();
    let rounds = env_u64("CRASH_ROUNDS", 8);
    let max_ops = env_u64("CRASH_MAX_OPS", 1500).max(2);
    let shards = 2;
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = base_job(work.path(), &[""]);
    let reference = tempfile::Builder::new()
        .prefix("crash-ref")
        .tempdir_in("/dev/shm")
        .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    copy_tree(&work.path().join("tree"), reference.path());
    let cache = work.path().join("cache");
    let mut mount = Mount::writable(&manifest, &cas, &cache, &work.path().join("mnt0"), shards);
    let mut model = Model::new(&mount.dir, reference.path(), seed);
    // Compared in full after each kill instead.
    model.full_every = 0;
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5EED_C0DE);
    let mut ops_total = 0;
    for round in 0..rounds {
        model.durability = Some(Durability::default());
        let ops = rng.u64(1..=max_ops);
        let trace = model.trace.clone();
        let (back, result) = with_watchdog(STALL, "the model run", vec![trace], move || {
            let mut result = Ok(());
            for _ in 0..ops {
                result = model.step();
                if result.is_err() {
                    break;
                }
            }
            (model, result)
        });
        model = back;
        if let Err(e) = result {
            panic!(
                "round {round}, before the kill: {e}\ndaemon log:\n{}",
                tail(&mount.stderr())
            );
        }
        ops_total += ops;
        // SIGKILL right after the last acknowledged operation, or (every other round) while
        // the daemon stops after a SIGTERM, its descriptors closed (saving the overlay may be
        // under way); stop() reaps the process and detaches the dead mount.
        let pid = mount.pid().unwrap();
        let during_stop = round % 2 == 1;
        if during_stop {
            if let Err(e) = model.close_fds() {
                panic!("round {round}: {e}");
            }
            signal(pid, libc::SIGTERM);
            std::thread::sleep(Duration::from_micros(rng.u64(0..20_000)));
        }
        signal(pid, libc::SIGKILL);
        mount.stop();
        let log = mount.stderr();
        mount = Mount::writable(
            &manifest,
            &cas,
            &cache,
            &work.path().join(format!("mnt{}", round + 1)),
            shards,
        );
        model.mount = mount.dir.clone();
        // The kept descriptors died with the daemon; the reference's close too (an unlinked
        // file open there goes, as the new mount must have dropped it).
        model.forget_fds();
        let what = format!(
            "MODEL_SEED={seed}, round {round}: SIGKILL{} after op #{} ({ops} ops this round)",
            if during_stop {
                " during a SIGTERM stop"
            } else {
                ""
            },
            model.ops_done
        );
        let durability = model.durability.take().unwrap();
        let violations = durability.check(&mount.dir);
        assert!(
            violations.is_empty(),
            "{what}: after the remount, what POSIX promises is lost:\n  {}\nlast ops:\n{}\n\
             log of the killed daemon:\n{}\nlog of the new one:\n{}",
            violations.join("\n  "),
            model.history(),
            tail(&log),
            tail(&mount.stderr())
        );
        if let Err(e) = compare_trees(&mount.dir, reference.path()) {
            panic!(
                "{what}: after the remount, acknowledged operations are lost (the POSIX checks \
                 of {} fsynced files and {} renames passed): {e}\nlast ops:\n{}\n\
                 log of the killed daemon:\n{}\nlog of the new one:\n{}",
                durability.synced.len(),
                durability.renames.len(),
                model.history(),
                tail(&log),
                tail(&mount.stderr())
            );
        }
        eprintln!(
            "round {round}: killed after {ops} ops; {} fsynced files and {} renames checked",
            durability.synced.len(),
            durability.renames.len()
        );
    }
    // And a clean stop after all that.
    model.close_fds().unwrap();
    let status = mount.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "MODEL_SEED={seed}: no clean stop ({status:?}):\n{}",
        tail(&mount.stderr())
    );
    let mount = Mount::writable(
        &manifest,
        &cas,
        &cache,
        &work.path().join("mnt-final"),
        shards,
    );
    if let Err(e) = compare_trees(&mount.dir, reference.path()) {
        panic!("MODEL_SEED={seed}: after the last clean remount: {e}");
    }
    eprintln!(
        "{rounds} kills, {ops_total} ops in {:?}: {}",
        started.elapsed(),
        model.summary()
    );
}

/// Builds the job of the model's base tree under each prefix ("" or e.g. "t0/") in `root`:
/// (manifest, cas); the tree is `root/tree`.
fn base_job(root: &std::path::Path, prefixes: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let files: Vec<(String, Vec<u8>)> = prefixes.iter().flat_map(|p| base_files(p)).collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    job(root, &refs, "2023-03-03")
}

/// SIGKILL while operations are in flight (at a random time, from another thread), then a
/// remount of the same cache dir: everything the interrupted operation cannot have touched
/// equals the reference, and what it touched is all as before it or all as after it (for the
/// operations that are one request: renames, links, unlinks, mkdir, rmdir, truncate, fallocate,
/// chmod, utimens, xattrs; creates and writes are open + write + close, so any state of their
/// file is allowed). Each round on a fresh overlay; odd rounds with two writers (each in its
/// own directory, each with an operation in flight) on 2 shards. `CRASH_INFLIGHT_ROUNDS` sets
/// the rounds (default 6).
#[test]
fn kill_9_during_operations_leaves_nothing_half_applied() {
    let seed = model::seed();
    let rounds = env_u64("CRASH_INFLIGHT_ROUNDS", 6);
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let one = base_job(&work.path().join("one"), &[""]);
    let two = base_job(&work.path().join("two"), &["t0/", "t1/"]);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xDEAD_F00D);
    for round in 0..rounds {
        let (shards, subdirs, (manifest, cas), tree) = if round % 2 == 0 {
            (1, &[""][..], &one, work.path().join("one/tree"))
        } else {
            (2, &["t0", "t1"][..], &two, work.path().join("two/tree"))
        };
        let reference = tempfile::Builder::new()
            .prefix("crash-ref")
            .tempdir_in("/dev/shm")
            .unwrap_or_else(|_| tempfile::tempdir().unwrap());
        copy_tree(&tree, reference.path());
        let cache = work.path().join(format!("cache{round}"));
        let mut mount = Mount::writable(
            manifest,
            cas,
            &cache,
            &work.path().join(format!("mnt{round}")),
            shards,
        );
        let round_seed = seed.wrapping_add(round * 10);
        let models: Vec<Model> = subdirs
            .iter()
            .enumerate()
            .map(|(i, sub)| {
                let mut m = Model::new(
                    &mount.dir.join(sub),
                    &reference.path().join(sub),
                    round_seed + i as u64,
                );
                m.full_every = 0;
                m.capture = true;
                m
            })
            .collect();
        let delay = Duration::from_millis(rng.u64(5..=400));
        let pid = mount.pid().unwrap();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            signal(pid, libc::SIGKILL);
        });
        let traces = models.iter().map(|m| m.trace.clone()).collect();
        let results = with_watchdog(STALL, "the model run", traces, move || {
            let threads: Vec<_> = models
                .into_iter()
                .map(|mut model| {
                    std::thread::spawn(move || loop {
                        if let Err(e) = model.step() {
                            return (model, Some(e));
                        }
                        if model.ops_done >= 200_000 {
                            return (model, None);
                        }
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("model thread panicked"))
                .collect::<Vec<_>>()
        });
        killer.join().unwrap();
        let what = |m: &Model| {
            format!(
                "MODEL_SEED={} (round {round} of MODEL_SEED={seed}, {shards} shard(s), {} \
                 writer(s)): SIGKILL after {delay:?}, during op #{} of {}",
                m.seed,
                subdirs.len(),
                m.ops_done,
                m.mount.display()
            )
        };
        let mut models = Vec::new();
        for (model, error) in results {
            let error =
                error.unwrap_or_else(|| panic!("{}: the kill interrupted nothing", what(&model)));
            // The first failure must be the kill's (a dead FUSE connection), not a mismatch.
            assert!(
                common::dead_connection_errnos()
                    .iter()
                    .any(|&e| error.contains(&errno_name(e))),
                "{}: a mismatch before the kill: {error}\ndaemon log:\n{}",
                what(&model),
                tail(&mount.stderr())
            );
            models.push(model);
        }
        mount.stop();
        let log = mount.stderr();
        mount = Mount::writable(
            manifest,
            cas,
            &cache,
            &work.path().join(format!("mnt{round}-after")),
            shards,
        );
        for (model, sub) in models.iter_mut().zip(subdirs) {
            model.mount = mount.dir.join(sub);
            model.forget_fds();
            let problems = model.check_interrupted();
            assert!(
                problems.is_empty(),
                "{}: after the remount:\n  {}\nlast ops:\n{}\nlog of the killed daemon:\n{}\n\
                 log of the new one:\n{}",
                what(model),
                problems.join("\n  "),
                model.history(),
                tail(&log),
                tail(&mount.stderr())
            );
            eprintln!(
                "round {round}: killed after {delay:?}, during op #{} of {}: {:?}",
                model.ops_done,
                model.mount.display(),
                model.in_flight.as_ref().map(|f| &f.op)
            );
        }
    }
    eprintln!("{rounds} rounds in {:?}", started.elapsed());
}
