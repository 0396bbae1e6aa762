//! A job that writes more files than the daemon may have descriptors open: upper files are held
//! open only while the job has them open. Its own test binary, because it lowers this process's
//! descriptor limit, which the daemon inherits.

mod common;

use common::{job, read_all, Mount};

#[test]
fn more_files_than_descriptors_are_written_and_read_back() {
    const LIMIT: u64 = 400;
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: LIMIT,
    };
    // SAFETY: setrlimit with a valid rlimit struct; lowering is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let work = tempfile::tempdir().unwrap();
    let (manifest, cas) = job(work.path(), &[("in.txt", b"input")], "2023-03-03");
    let mount = Mount::writable(
        &manifest,
        &cas,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        2,
    );
    let out = mount.dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let files = 3 * LIMIT as usize;
    for i in 0..files {
        std::fs::write(out.join(format!("f{i}")), format!("frame {i}"))
            .unwrap_or_else(|e| panic!("writing output {i} of {files}: {e}"));
    }
    for i in 0..files {
        assert_eq!(
            read_all(&out.join(format!("f{i}"))).unwrap(),
            format!("frame {i}").into_bytes()
        );
    }
}
