//! Credentials from the standard chain (a profile's `credential_process`) are refreshed by the
//! control thread before they expire, and the shards sign with the new ones. SeaweedFS checks
//! every signature, so which keys the shards use is visible in whether it answers.

mod common;

use std::time::{Duration, Instant};

use common::s3_servers::{
    config, create_bucket_signed, upload_job, Seaweed, SEAWEED_KEY, SEAWEED_SECRET,
};
use common::{pattern, read_all, Mount, MountOptions};

/// Credentials that expire in this many seconds: the control thread refreshes at half-life.
const LIFETIME_S: u64 = 14;

#[test]
fn refreshed_credentials_reach_the_shards_before_they_expire() {
    let seaweed = Seaweed::start();
    create_bucket_signed(&seaweed.endpoint(), "cas", SEAWEED_KEY, SEAWEED_SECRET);
    let a = pattern(31, 300_000);
    let b = pattern(32, 200_000);
    let files: Vec<(&str, &[u8])> = vec![("a.bin", &a), ("b.bin", &b)];
    let s3_config = config(
        &seaweed.endpoint(),
        "cas",
        "root",
        SEAWEED_KEY,
        SEAWEED_SECRET,
    );
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("m.manifest");
    std::fs::write(&manifest, upload_job(&s3_config, &files)).unwrap();

    // The first call hands out the right keys, expiring soon; every later call a key id
    // SeaweedFS does not know. Each call leaves a line in `calls`.
    let calls = work.path().join("calls");
    let script = work.path().join("creds.py");
    std::fs::write(
        &script,
        format!(
            r#"import datetime, json, os
calls = {calls:?}
n = len(open(calls).readlines()) if os.path.exists(calls) else 0
open(calls, "a").write("call\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds={LIFETIME_S})
key, secret = ({SEAWEED_KEY:?}, {SEAWEED_SECRET:?}) if n == 0 else ("AKIDROTATEDAWAY", "x")
print(json.dumps({{"Version": 1, "AccessKeyId": key, "SecretAccessKey": secret,
                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"#
        ),
    )
    .unwrap();
    let aws_config = work.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile rotating]\nregion = us-east-1\ncredential_process = python3 {}\n",
            script.display()
        ),
    )
    .unwrap();
    let missing = work.path().join("no-credentials-file");
    let env = [
        ("AWS_CONFIG_FILE", aws_config.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", missing.to_str().unwrap()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let endpoint = seaweed.endpoint();
    let store = [
        "--s3",
        "s3://cas/root",
        "--endpoint-url",
        &endpoint,
        "--profile",
        "rotating",
    ];
    let started = Instant::now();
    let mut mount = Mount::start_with_store(
        &manifest,
        &store,
        &env,
        &work.path().join("mnt"),
        MountOptions::default(),
    );
    assert_eq!(read_all(&mount.dir.join("a.bin")).unwrap(), a);

    // The control thread asks again at half-life, well before the first keys expire.
    let call_count = || {
        std::fs::read_to_string(&calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    while call_count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(LIFETIME_S),
            "no refresh before expiry; stderr:\n{}",
            mount.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Shards pick the new keys up for their next request: SeaweedFS refuses them.
    std::thread::sleep(Duration::from_millis(200));
    let error = read_all(&mount.dir.join("b.bin")).unwrap_err();
    assert_eq!(
        error.raw_os_error(),
        Some(libc::EACCES),
        "{}",
        mount.stderr()
    );
    // The a.bin bytes were verified and cached before the rotation: still served.
    assert_eq!(read_all(&mount.dir.join("a.bin")).unwrap(), a);
}
