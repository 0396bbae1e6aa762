//! What the S3 start-up check says for answers that no local S3 server gives (issue 15.6): a
//! bucket in another region, an expired session token, credentials that may not list, and a
//! `credential_process` that fails. moto accepts any region and any token and SeaweedFS has no
//! STS, so the first three come from a canned HTTP server on 127.0.0.1 that answers every request
//! with one fixed response, exactly as AWS S3 words it.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use common::s3_servers::{config, v2023_manifest};
use common::BIN;
use mount_vfs::store::S3Target;

/// Answers every request on a fresh 127.0.0.1 port with `response`; returns the endpoint.
fn canned(response: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}")
}

fn probe(response: &'static str) -> Result<Option<String>, String> {
    let endpoint = canned(response);
    let target = S3Target::start(&config(&endpoint, "cas-bucket", "root", "k", "s")).unwrap();
    target.probe().map_err(|e| e.to_string())
}

#[test]
fn a_bucket_in_another_region_names_the_region_to_pass() {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PermanentRedirect</Code>\
                <Message>The bucket you are attempting to access must be addressed using the \
                specified endpoint.</Message><Region>eu-west-1</Region></Error>";
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 301 Moved Permanently\r\nx-amz-bucket-region: eu-west-1\r\n\
             Content-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let message = probe(response).unwrap_err();
    assert!(
        message.contains("is in region eu-west-1: pass --region eu-west-1"),
        "{message}"
    );
}

#[test]
fn an_expired_session_token_says_to_refresh_the_credentials() {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>ExpiredToken</Code>\
                <Message>The provided token has expired.</Message></Error>";
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let message = probe(response).unwrap_err();
    assert!(
        message.contains("session token is expired or invalid (ExpiredToken)")
            && message.contains("refresh the credentials"),
        "{message}"
    );
}

#[test]
fn credentials_that_may_not_list_are_a_warning_not_a_failure() {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
                <Message>Access Denied</Message></Error>";
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let warning = probe(response).unwrap().expect("a warning");
    assert!(
        warning.contains("may not list the bucket (s3:ListBucket)"),
        "{warning}"
    );
}

#[test]
fn a_failing_credential_process_is_refused_before_mounting_with_its_error() {
    let work = tempfile::tempdir().unwrap();
    let config_file = work.path().join("config");
    std::fs::write(
        &config_file,
        "[profile broken]\nregion = us-east-1\n\
         credential_process = sh -c \"echo 'token service unreachable' >&2; exit 3\"\n",
    )
    .unwrap();
    let manifest = v2023_manifest(&[("a.txt", b"hello")]);
    std::fs::write(work.path().join("m.manifest"), manifest).unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let output = Command::new(BIN)
        .arg(work.path().join("m.manifest"))
        .arg(&mnt)
        .args(["--s3", "s3://cas-bucket/root", "--profile", "broken"])
        .args(["--endpoint-url", "http://127.0.0.1:9"])
        .env("AWS_CONFIG_FILE", &config_file)
        .env("AWS_SHARED_CREDENTIALS_FILE", work.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no usable AWS credentials")
            && stderr.contains("exit status: 3")
            && stderr.contains("token service unreachable"),
        "{stderr}"
    );
    assert!(!common::is_mounted(&mnt));
}
