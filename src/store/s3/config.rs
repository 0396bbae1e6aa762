//! What the user asked for (`--s3`, `--bucket`, `--endpoint-url`, ...) and the endpoint it
//! resolves to. Parsed on the main thread; nothing here touches the network.

use std::time::Duration;

/// Flags that cannot name a bucket or an endpoint: a usage mistake, found before any request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ConfigError {
    #[error("--s3 {0}: expected s3://BUCKET/ROOT_PREFIX (e.g. s3://my-bucket/DeadlineCloud)")]
    NotAnS3Uri(String),
    #[error("--s3 {0}: the bucket name is empty")]
    EmptyBucket(String),
    #[error("--s3 already names the bucket and root prefix; drop --bucket/--root-prefix")]
    BucketNamedTwice,
    #[error("no bucket: pass --s3 s3://BUCKET/ROOT_PREFIX")]
    NoBucket,
    #[error("bucket name `{0}` is not a valid S3 bucket name")]
    InvalidBucket(String),
    /// `why` says which part of the URL is wrong.
    #[error("endpoint URL `{url}`: {why}; expected e.g. http://127.0.0.1:9000")]
    BadEndpointUrl { url: String, why: &'static str },
}

/// How to find the bucket, and with which credentials. Built from the command line by
/// [`S3Config::from_cli`], or directly by tests and embedders.
#[derive(Clone, Debug)]
pub struct S3Config {
    pub bucket: String,
    /// Root prefix of the CAS, without leading or trailing `/` (may be empty).
    pub root_prefix: String,
    /// `None`: the standard region chain (`AWS_REGION`, the profile), else us-east-1 for custom
    /// endpoints.
    pub region: Option<String>,
    /// A custom endpoint (`http://127.0.0.1:9000`), addressed path-style. `None`: real AWS,
    /// virtual-host style.
    pub endpoint_url: Option<String>,
    pub credentials: CredentialSource,
    pub tuning: S3Tuning,
}

/// Where request-signing credentials come from.
#[derive(Clone)]
pub enum CredentialSource {
    /// The standard AWS chain (environment, shared files, SSO, web identity, container and
    /// instance metadata), optionally with a named profile; refreshed before expiry.
    Chain { profile: Option<String> },
    /// Fixed keys (tests, embedders that manage credentials themselves).
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
}

/// Names the key id only: a configuration printed into a log or an error must never carry the
/// secret key or the session token.
impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::Chain { profile } => {
                f.debug_struct("Chain").field("profile", profile).finish()
            }
            CredentialSource::Static {
                access_key_id,
                session_token,
                ..
            } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"** redacted **")
                .field(
                    "session_token",
                    &session_token.as_ref().map(|_| "** redacted **"),
                )
                .finish(),
        }
    }
}

/// Timeouts and retry budget of the data path. The defaults suit S3; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct S3Tuning {
    /// TCP (and TLS) connection set-up.
    pub connect_timeout: Duration,
    /// Longest wait for any read from the socket: the first response byte, and every later
    /// read of the body (a stalled body).
    pub read_timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Longest time one request may take, all attempts and backoff included (`--read-timeout`):
    /// a server that accepts but never answers costs a read this long, then EIO.
    pub request_deadline: Duration,
    /// Backoff before retry `n` is uniform in `[0, min(backoff_cap, backoff_base * 2^n)]`
    /// ("full jitter").
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Idle keep-alive connections kept per shard.
    pub max_idle_connections: usize,
}

impl Default for S3Tuning {
    fn default() -> Self {
        S3Tuning {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(20),
            max_attempts: 5,
            request_deadline: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            max_idle_connections: 32,
        }
    }
}

/// The environment variables that name a custom endpoint, most specific first (the AWS SDKs'
/// names).
pub const ENDPOINT_ENV: [&str; 2] = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"];

impl S3Config {
    /// Builds the configuration from the mount flags: either `s3_uri` (`s3://BUCKET/PREFIX`) or
    /// `bucket` plus `root_prefix`. The endpoint comes from `endpoint_url`, else the
    /// environment ([`ENDPOINT_ENV`]).
    pub fn from_cli(
        s3_uri: Option<&str>,
        bucket: Option<&str>,
        root_prefix: Option<&str>,
        region: Option<&str>,
        endpoint_url: Option<&str>,
        profile: Option<&str>,
    ) -> Result<S3Config, S3ConfigError> {
        let (bucket, root_prefix) = match (s3_uri, bucket) {
            (Some(uri), None) if root_prefix.is_none() => parse_s3_uri(uri)?,
            (Some(_), _) => return Err(S3ConfigError::BucketNamedTwice),
            (None, Some(bucket)) => (bucket.to_string(), clean_prefix(root_prefix.unwrap_or(""))),
            (None, None) => return Err(S3ConfigError::NoBucket),
        };
        check_bucket(&bucket)?;
        let endpoint_url = endpoint_url.map(str::to_string).or_else(|| {
            ENDPOINT_ENV
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        });
        if let Some(url) = &endpoint_url {
            parse_endpoint_url(url)?;
        }
        Ok(S3Config {
            bucket,
            root_prefix,
            region: region.map(str::to_string),
            endpoint_url,
            credentials: CredentialSource::Chain {
                profile: profile.map(str::to_string),
            },
            tuning: S3Tuning::default(),
        })
    }
}

/// `s3://BUCKET[/PREFIX]` -> (bucket, prefix without surrounding slashes).
pub fn parse_s3_uri(uri: &str) -> Result<(String, String), S3ConfigError> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| S3ConfigError::NotAnS3Uri(uri.to_string()))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(S3ConfigError::EmptyBucket(uri.to_string()));
    }
    Ok((bucket.to_string(), clean_prefix(prefix)))
}

fn clean_prefix(prefix: &str) -> String {
    prefix.trim_matches('/').to_string()
}

/// Rejects names that can never address a bucket, so the user hears it before any request.
/// Legacy buckets may hold capitals and underscores, so only the impossible is refused.
fn check_bucket(bucket: &str) -> Result<(), S3ConfigError> {
    if bucket.len() < 3
        || bucket.len() > 255
        || !bucket.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(S3ConfigError::InvalidBucket(bucket.to_string()));
    }
    Ok(())
}

/// Where requests go, and how the bucket is addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `/{bucket}/{key}` (custom endpoints, buckets with dots) instead of `{bucket}.host/{key}`.
    pub path_style: bool,
}

impl Endpoint {
    /// The endpoint for `bucket` in `region`: the custom URL (path-style) or AWS's
    /// virtual-host endpoint.
    pub fn resolve(
        endpoint_url: Option<&str>,
        bucket: &str,
        region: &str,
    ) -> Result<Endpoint, S3ConfigError> {
        if let Some(url) = endpoint_url {
            return parse_endpoint_url(url);
        }
        let suffix = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        // Dotted bucket names break the *.s3 wildcard certificate: address them path-style.
        let path_style = bucket.contains('.');
        let host = if path_style {
            format!("s3.{region}.{suffix}")
        } else {
            format!("{bucket}.s3.{region}.{suffix}")
        };
        Ok(Endpoint {
            tls: true,
            host,
            port: 443,
            path_style,
        })
    }

    /// The `Host` header value (the port only when it is not the scheme's default).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `scheme://host[:port]`, the base the signer sees.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host_header()
        )
    }
}

/// `http(s)://host[:port][/]`: anything else (a path, a query, user info) is refused.
pub fn parse_endpoint_url(url: &str) -> Result<Endpoint, S3ConfigError> {
    let bad = |why| S3ConfigError::BadEndpointUrl {
        url: url.to_string(),
        why,
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("the scheme must be http or https"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(bad("only scheme, host and port are supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
        None if tls => 443,
        None => 80,
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    Ok(Endpoint {
        tls,
        host: host.to_string(),
        port,
        path_style: true,
    })
}

/// Percent-encodes an object key for the request path (S3's rules: unreserved characters and
/// `/` stay, everything else is `%XX`). The signer sees the same encoded path.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let source = CredentialSource::Static {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI-secret".into(),
            session_token: Some("FwoGZXIvYXdz-token".into()),
        };
        let shown = format!("{source:?} {source:#?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(
            !shown.contains("wJalr") && !shown.contains("FwoG"),
            "{shown}"
        );
    }

    #[test]
    fn s3_uri_splits_bucket_and_prefix() {
        assert_eq!(
            parse_s3_uri("s3://bucket/Root/Prefix/").unwrap(),
            ("bucket".into(), "Root/Prefix".into())
        );
        assert_eq!(
            parse_s3_uri("s3://bucket").unwrap(),
            ("bucket".into(), "".into())
        );
        assert!(parse_s3_uri("bucket/prefix").is_err());
        assert!(parse_s3_uri("s3:///prefix").is_err());
    }

    #[test]
    fn endpoints_parse_and_address() {
        let e = parse_endpoint_url("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.path_style),
            (false, "127.0.0.1", 9000, true)
        );
        assert_eq!(e.host_header(), "127.0.0.1:9000");
        let e = parse_endpoint_url("https://[::1]").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 443));
        assert_eq!(e.origin(), "https://[::1]");
        assert!(parse_endpoint_url("ftp://x").is_err());
        assert!(parse_endpoint_url("http://x:9000/path").is_err());
        let aws = Endpoint::resolve(None, "my-bucket", "eu-west-1").unwrap();
        assert_eq!(aws.host, "my-bucket.s3.eu-west-1.amazonaws.com");
        assert!(!aws.path_style);
        assert!(
            Endpoint::resolve(None, "my.bucket", "us-east-1")
                .unwrap()
                .path_style
        );
    }

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(encode_key("a b/Data/x+y.xxh128"), "a%20b/Data/x%2By.xxh128");
        assert_eq!(encode_key("é"), "%C3%A9");
    }

    #[test]
    fn cli_forms_are_exclusive() {
        let c = S3Config::from_cli(
            Some("s3://bkt/root"),
            None,
            None,
            None,
            Some("http://h:1"),
            None,
        )
        .unwrap();
        assert_eq!((c.bucket.as_str(), c.root_prefix.as_str()), ("bkt", "root"));
        assert!(
            S3Config::from_cli(Some("s3://bkt/root"), Some("b"), None, None, None, None).is_err()
        );
        let c = S3Config::from_cli(
            None,
            Some("bkt"),
            Some("/r/"),
            Some("eu-west-1"),
            Some("http://h:1"),
            None,
        )
        .unwrap();
        assert_eq!(c.root_prefix, "r");
        assert!(S3Config::from_cli(None, None, None, None, None, None).is_err());
    }
}
