//! SigV4 request signing with `aws-sigv4`: synchronous and local (tens of microseconds), so it
//! runs on the shard right before the request head is written.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningError,
    SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_sigv4::sign::v4::signing_params::BuildError;
use aws_smithy_runtime_api::client::identity::Identity;

/// SHA-256 of the empty payload: GET and HEAD bodies, so they need no hashing per request.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The payload as the signature covers it.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    Empty,
    /// Hashed into `x-amz-content-sha256` (small uploads).
    Bytes(&'a [u8]),
}

/// Why a request could not be signed: a local failure (nothing was sent), never worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The identity, region or time cannot make SigV4 parameters.
    #[error("signing parameters: {0}")]
    Params(#[source] BuildError),
    /// `aws-sigv4` refused the request itself (URL, headers, identity type).
    #[error("cannot sign {method} {url}: {source}")]
    Request {
        method: String,
        url: String,
        source: SigningError,
    },
}

/// Signs one request and returns the headers to add (`authorization`, `x-amz-date`,
/// `x-amz-content-sha256`, and `x-amz-security-token` for temporary credentials).
///
/// `url` is `scheme://host[:port]/encoded-path[?query]`, exactly as sent; `headers` are the
/// other headers to cover (`host` is taken from the URL).
pub fn sign_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    payload: Payload<'_>,
    identity: &Identity,
    region: &str,
    time: SystemTime,
) -> Result<Vec<(&'static str, String)>, SignError> {
    let mut settings = SigningSettings::default();
    // S3 signs the path as sent (no double encoding, no dot-segment normalisation) and wants the
    // payload hash as a header.
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(SignError::Params)?
        .into();
    let body = match payload {
        Payload::Empty => SignableBody::Precomputed(EMPTY_PAYLOAD_SHA256.to_string()),
        Payload::Bytes(bytes) => SignableBody::Bytes(bytes),
    };
    let refused = |source| SignError::Request {
        method: method.to_owned(),
        url: url.to_owned(),
        source,
    };
    let request =
        SignableRequest::new(method, url, headers.iter().copied(), body).map_err(refused)?;
    let (instructions, _signature) = sign(request, &params).map_err(refused)?.into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| (h.name(), h.value().to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;

    /// The published example of AWS's S3 SigV4 documentation ("Example: GET Object"): a ranged
    /// GET of /test.txt in examplebucket on 24 May 2013. Any change to what we sign, or how,
    /// changes this signature.
    #[test]
    fn matches_the_published_s3_get_object_vector() {
        let identity: Identity = Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        )
        .into();
        let headers = sign_request(
            "GET",
            "https://examplebucket.s3.amazonaws.com/test.txt",
            &[("range", "bytes=0-9")],
            Payload::Empty,
            &identity,
            "us-east-1",
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600),
        )
        .unwrap();
        let header = |name: &str| &headers.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(header("x-amz-date"), "20130524T000000Z");
        assert_eq!(header("x-amz-content-sha256"), EMPTY_PAYLOAD_SHA256);
        assert_eq!(
            header("authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn signs_get_with_required_headers() {
        let identity: Identity =
            Credentials::new("AKIDEXAMPLE", "secret", Some("token".into()), None, "test").into();
        let headers = sign_request(
            "GET",
            "http://127.0.0.1:9000/bucket/Data/abc.xxh128",
            &[("range", "bytes=0-9")],
            Payload::Empty,
            &identity,
            "us-east-1",
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        )
        .unwrap();
        let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        for expected in [
            "authorization",
            "x-amz-date",
            "x-amz-content-sha256",
            "x-amz-security-token",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        let auth = &headers
            .iter()
            .find(|(n, _)| *n == "authorization")
            .unwrap()
            .1;
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/s3/aws4_request"
        ));
        assert!(
            auth.contains(
                "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;x-amz-security-token"
            ),
            "{auth}"
        );
    }
}
