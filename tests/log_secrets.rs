//! Credentials never reach a log: a mount over moto with distinctive keys in the environment and
//! trace logging serves a file through retried 503s and fails a missing object, and neither its
//! log file, its stderr nor its command line carries the secret key, the session token or a
//! request signature.

mod common;

use common::fault_proxy::{Fault, FaultProxy};
use common::s3_servers::{config, upload_job, v2023_manifest, Moto};
use common::{pattern, read_all, Mount, MountOptions};

const KEY_ID: &str = "AKIAMOUNTVFSLOGTEST7";
const SECRET: &str = "q8SeCrEtMountVfsLogTest/0123456789abcdefXY";
const TOKEN: &str = "IQoJb3JpZ2luSeSsIoNtOkEnMountVfsLogTest0123456789";

#[test]
fn credentials_and_signatures_never_reach_the_log() {
    let good = pattern(5, (2 << 20) + 99);
    let missing = pattern(6, 1000);
    let moto = Moto::start();
    moto.create_bucket("cas");
    let work = tempfile::tempdir().unwrap();
    // Only `good` is uploaded (moto takes any keys; these are not the mount's).
    upload_job(
        &config(&moto.endpoint(), "cas", "root", "k", "s"),
        &[("good.bin", &good)],
    );
    let manifest = work.path().join("m.manifest");
    std::fs::write(
        &manifest,
        v2023_manifest(&[("good.bin", &good), ("missing.bin", &missing)]),
    )
    .unwrap();
    let proxy = FaultProxy::start(moto.port);
    let endpoint = proxy.endpoint();
    let log = work.path().join("mount.log");
    let log_arg = log.to_str().unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", TOKEN),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_REGION", "us-east-1"),
        ("RUST_LOG", "trace"),
    ];
    let mut mount = Mount::start_with_store(
        &manifest,
        &["--s3", "s3://cas/root", "--endpoint-url", &endpoint],
        &env,
        &work.path().join("mnt"),
        MountOptions::with(&["--log-file", log_arg]),
    );
    let pid = mount.pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");

    proxy.inject(&[Fault::SlowDown, Fault::SlowDown]);
    assert!(read_all(&mount.dir.join("good.bin")).unwrap() == good);
    let error = read_all(&mount.dir.join("missing.bin")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    let status = mount.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let stderr = mount.stderr();
    let log = std::fs::read_to_string(&log).unwrap();

    // The log is really at trace level and saw the retries and the failure.
    assert!(log.contains("TRACE"), "no trace lines in the log");
    assert!(log.contains("will retry"), "the 503s were not logged");
    assert!(
        log.contains("cannot serve file"),
        "the missing object was not logged"
    );
    assert!(cmdline.contains("--endpoint-url"), "{cmdline}");
    for (what, text) in [
        ("log file", &log),
        ("stderr", &stderr),
        ("cmdline", &cmdline),
    ] {
        for secret in [SECRET, TOKEN, "Signature="] {
            let at = text
                .find(secret)
                .map(|at| &text[at.saturating_sub(300)..at + 100]);
            assert!(at.is_none(), "{what} shows {secret}: ...{}...", at.unwrap());
        }
    }
    println!(
        "log: {} lines, {} bytes; key id shown {} times",
        log.lines().count(),
        log.len(),
        log.matches(KEY_ID).count()
    );
}
