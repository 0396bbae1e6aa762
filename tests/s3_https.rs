//! The S3 store over HTTPS: moto serving TLS (werkzeug over OpenSSL) with a certificate from a
//! fresh test CA, trusted through `AWS_CA_BUNDLE`; and refused, before mounting, without it.
//! One test in its own binary: it sets `AWS_CA_BUNDLE` for this process.

mod common;

use std::process::Command;

use common::s3_servers::{config, upload_job, Moto, MOUNT_ENV as ENV};
use common::{is_mounted, pattern, read_all, Mount, MountOptions, BIN};

#[test]
fn https_endpoints_are_read_with_a_trusted_ca_and_refused_without() {
    let work = tempfile::tempdir().unwrap();
    let moto = Moto::start_tls(work.path());
    moto.create_bucket("cas");
    let cert = moto.certificate().unwrap().to_str().unwrap().to_string();
    // SAFETY: this binary holds this one test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("AWS_CA_BUNDLE", &cert) };

    let big = pattern(21, (9 << 20) + 5);
    let small = b"over TLS".to_vec();
    let files: Vec<(&str, &[u8])> = vec![("big.bin", &big), ("small.txt", &small)];
    let s3_config = config(&moto.endpoint(), "cas", "root", "k", "s");
    let manifest = work.path().join("m.manifest");
    std::fs::write(&manifest, upload_job(&s3_config, &files)).unwrap();

    let endpoint = moto.endpoint();
    assert!(endpoint.starts_with("https://"));
    let store = ["--s3", "s3://cas/root", "--endpoint-url", &endpoint];
    let env: Vec<(&str, &str)> = ENV
        .iter()
        .copied()
        .chain([("AWS_CA_BUNDLE", cert.as_str())])
        .collect();
    let mount = Mount::start_with_store(
        &manifest,
        &store,
        &env,
        &work.path().join("mnt"),
        MountOptions {
            shards: 2,
            ..Default::default()
        },
    );
    assert!(read_all(&mount.dir.join("big.bin")).unwrap() == big);
    assert_eq!(read_all(&mount.dir.join("small.txt")).unwrap(), small);
    drop(mount);

    // The same server without the CA: refused before mounting, saying why.
    let mnt = work.path().join("mnt2");
    std::fs::create_dir(&mnt).unwrap();
    let output = Command::new(BIN)
        .arg(&manifest)
        .arg(&mnt)
        .args(store)
        .envs(ENV)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mounted without trusting the CA");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(!is_mounted(&mnt));
}
