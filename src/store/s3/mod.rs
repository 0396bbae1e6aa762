//! The S3 store: `{rootPrefix}/Data/{hash}.xxh128` objects read with ranged GETs.
//!
//! - [`S3Target`] (one per mount, `Send + Sync`): the resolved bucket, region and endpoint, the
//!   TLS configuration, and the control thread that keeps credentials fresh
//!   (see [`credentials`](self::credentials)).
//! - [`S3Store`] (one per shard, `!Send`): its own HTTP/1.1 connection pool on glommio sockets;
//!   signs each request with SigV4 on the shard and reads bodies straight into the shard's
//!   buffers. Only credential and address snapshots cross threads.
//!
//! See `docs/s3.md` for the configuration, the request path and the retry policy.

mod config;
mod credentials;
mod http;
mod retry;
mod sign;

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use mount_vfs_executors::{BufferPool, Reservation};
use rustls::pki_types::ServerName;

pub use config::{
    parse_endpoint_url, parse_s3_uri, CredentialSource, Endpoint, S3Config, S3ConfigError, S3Tuning,
};
pub use credentials::ResolveError;
pub use http::{HttpError, HEAD_READ};

use self::config::encode_key;
use self::credentials::{ControlThread, Shared};
use self::http::{HttpClient, Request, Response};
use self::retry::{backoff, retryable_status, status_cause};
use self::sign::{sign_request, Payload, SignError};
use super::{Block, ObjectRange, ObjectStore, RetryCause, RetryCounts, StoreError};
use crate::manifest::Hash;

/// Objects read without the `.xxh128` suffix, remembered per shard so old uploads cost one
/// request, not two; past this many the set is cleared.
const MAX_UNSUFFIXED: usize = 4096;

/// Why the S3 store cannot be used, found at start-up ([`S3Target::start`],
/// [`S3Target::probe`], [`S3Target::check_objects`]) before anything is mounted.
#[derive(Debug, thiserror::Error)]
pub enum S3StartError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("S3 endpoint host {host}: {source}")]
    InvalidHostName {
        host: String,
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// `AWS_CA_BUNDLE` names a file that cannot be read as PEM certificates.
    #[error("AWS_CA_BUNDLE={bundle}: {source}")]
    CaBundle {
        bundle: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no trusted root certificates for HTTPS: install the system CA certificates or set SSL_CERT_FILE / AWS_CA_BUNDLE")]
    NoTrustedRoots,
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot start the S3 probe executor: {0}")]
    ProbeExecutor(String),
    #[error("cannot start the S3 probe thread: {0}")]
    ProbeThread(#[source] std::io::Error),
    #[error("the S3 probe thread panicked")]
    ProbePanicked,
    /// The start-up request ([`S3Target::probe`]) was answered with, or ended in, a failure.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// None of the sampled manifest objects is in the store: most likely a wrong root prefix.
    #[error("{target}: none of the {checked} manifest objects checked exists (e.g. {}): check the bucket and root prefix (--s3 s3://BUCKET/ROOT_PREFIX, or --root-prefix)", .example.display())]
    ObjectsMissing {
        target: String,
        checked: usize,
        example: PathBuf,
    },
}

/// Why the start-up request ([`S3Target::probe`]) says the store cannot be used. Each variant
/// carries what its message names; the messages tell the user what to check or pass, and tests
/// match on their text. `target` is [`S3Target::describe`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection to the endpoint at all: wrong endpoint or region, server down, network.
    #[error(
        "cannot connect to the S3 endpoint {origin} ({addr}): {source}; check {}",
        if *.custom_endpoint {
            "--endpoint-url / AWS_ENDPOINT_URL_S3 and that the server is running"
        } else {
            "--region, --endpoint-url / AWS_ENDPOINT_URL_S3 and the network"
        }
    )]
    Connect {
        origin: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
        /// A path-style endpoint outside `amazonaws.com` (MinIO, SeaweedFS, ...): the hint
        /// points at the endpoint flag and the server rather than the region.
        custom_endpoint: bool,
    },
    #[error(
        "{target}: the access key id is not known to the server: the credentials are wrong \
         (check AWS_ACCESS_KEY_ID / --profile)"
    )]
    UnknownAccessKey { target: String },
    #[error(
        "{target}: the request signature does not match: the secret access key is wrong for \
         this access key id (check AWS_SECRET_ACCESS_KEY / --profile)"
    )]
    SignatureMismatch { target: String },
    /// `ExpiredToken`, `InvalidToken` or `TokenRefreshRequired` (`code`).
    #[error(
        "{target}: the session token is expired or invalid ({code}): refresh the credentials \
         (e.g. `aws sso login`)"
    )]
    BadSessionToken { target: String, code: String },
    #[error("{target}: bucket {bucket} does not exist: check --s3 / --bucket")]
    NoSuchBucket { target: String, bucket: String },
    /// The server named the bucket's region, and it is not the one used.
    #[error("{target}: bucket {bucket} is in region {region}: pass --region {region}")]
    BucketInRegion {
        target: String,
        bucket: String,
        region: String,
    },
    /// A redirect or region error without a usable hint.
    #[error(
        "{target}: wrong region for bucket {bucket} ({status} {code}: {message}): pass the \
         bucket's --region"
    )]
    WrongRegion {
        target: String,
        bucket: String,
        status: u16,
        code: String,
        message: String,
    },
    /// A 403 other than the credential errors above.
    #[error(
        "{target}: access denied ({code}: {message}): check the credentials and their \
         permissions on the bucket"
    )]
    AccessDenied {
        target: String,
        code: String,
        message: String,
    },
    /// Any other answer that retrying will not change.
    #[error("{target}: the server answered {status} {code} {message}")]
    Unexpected {
        target: String,
        status: u16,
        code: String,
        message: String,
    },
    /// Transient failures until the attempts or the deadline ran out (or the request could
    /// not be signed).
    #[error("{target}: {source}")]
    Unavailable { target: String, source: StoreError },
}

/// A bucket and root prefix, resolved and reachable: shared by every shard of a mount.
pub struct S3Target {
    bucket: String,
    root_prefix: String,
    region: String,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    tuning: S3Tuning,
    _control: ControlThread,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket)
            .field("root_prefix", &self.root_prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Target {
    /// Resolves region, endpoint, addresses and credentials (starting the control thread that
    /// refreshes them) and builds the TLS configuration. Talks to no S3 server: see
    /// [`probe`](Self::probe).
    pub fn start(config: &S3Config) -> Result<Arc<S3Target>, S3StartError> {
        let resolved = credentials::start(config)?;
        let tls = if resolved.endpoint.tls {
            let name = ServerName::try_from(resolved.endpoint.host.clone()).map_err(|source| {
                S3StartError::InvalidHostName {
                    host: resolved.endpoint.host.clone(),
                    source,
                }
            })?;
            Some((tls_config()?, name))
        } else {
            None
        };
        Ok(Arc::new(S3Target {
            bucket: config.bucket.clone(),
            root_prefix: config.root_prefix.clone(),
            region: resolved.region,
            endpoint: resolved.endpoint,
            shared: resolved.shared,
            tls,
            tuning: config.tuning,
            _control: resolved.control,
        }))
    }

    /// `s3://bucket/prefix (region R, endpoint E)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "s3://{}/{} (region {}, endpoint {})",
            self.bucket,
            self.root_prefix,
            self.region,
            self.endpoint.origin()
        )
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// One cheap request (ListObjectsV2, max-keys=1, under `{rootPrefix}/Data/`) that proves
    /// endpoint, region, bucket and credentials before mounting. Runs on a short-lived glommio
    /// thread with the same client the shards use. `Ok(Some(warning))`: usable, with a caveat
    /// to log. Fails with [`S3StartError::Probe`] when the answer rules the store out.
    pub fn probe(self: &Arc<Self>) -> Result<Option<String>, S3StartError> {
        Ok(self.on_own_thread(|store| async move { store.probe().await })??)
    }

    /// Checks that the manifest's objects are where the mount will look (`hashes`: a few of
    /// them): a wrong root prefix would otherwise mount fine and fail every read with EIO.
    /// Fails when none of them exists; warns when some are missing.
    pub fn check_objects(
        self: &Arc<Self>,
        hashes: Vec<Hash>,
    ) -> Result<Option<String>, S3StartError> {
        let where_ = self.describe();
        self.on_own_thread(move |store| async move {
            let mut missing = Vec::new();
            for &hash in &hashes {
                if store.exists(hash).await == Some(false) {
                    missing.push(hash);
                }
            }
            match missing.first() {
                None => Ok(None),
                Some(first) if missing.len() == hashes.len() => Err(S3StartError::ObjectsMissing {
                    target: where_,
                    checked: hashes.len(),
                    example: store.location(*first),
                }),
                Some(first) => Ok(Some(format!(
                    "{where_}: {} of {} manifest objects checked are missing (e.g. {}); reads of \
                     those files will fail with EIO",
                    missing.len(),
                    hashes.len(),
                    store.location(*first).display()
                ))),
            }
        })?
    }

    /// Runs `job` with a store of its own on a short-lived glommio thread, for requests made
    /// outside the shards (start-up checks, shared traces); fails only if that thread cannot
    /// run it.
    pub fn on_own_thread<T, F, Fut>(self: &Arc<Self>, job: F) -> Result<T, S3StartError>
    where
        T: Send + 'static,
        F: FnOnce(S3Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let target = self.clone();
        std::thread::Builder::new()
            .name("mount_vfs-s3-probe".into())
            .spawn(move || {
                let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .io_memory(2 << 20)
                    .make()
                    .map_err(|e| S3StartError::ProbeExecutor(e.to_string()))?;
                Ok(executor.run(async move {
                    mount_vfs_executors::spawn_park_guard();
                    job(S3Store::new(target)).await
                }))
            })
            .map_err(S3StartError::ProbeThread)?
            .join()
            .map_err(|_| S3StartError::ProbePanicked)?
    }
}

/// Trusted roots: the system store (honours `SSL_CERT_FILE`) plus `AWS_CA_BUNDLE` when set.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, S3StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(bundle) = std::env::var_os("AWS_CA_BUNDLE").filter(|v| !v.is_empty()) {
        let unreadable = |source| S3StartError::CaBundle {
            bundle: bundle.to_string_lossy().into_owned(),
            source,
        };
        for cert in CertificateDer::pem_file_iter(&bundle).map_err(unreadable)? {
            let _ = roots.add(cert.map_err(unreadable)?);
        }
    }
    if roots.is_empty() {
        return Err(S3StartError::NoTrustedRoots);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(S3StartError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What one attempt came to.
enum Outcome<T, E> {
    Done(T),
    Retry(RetryCause, String),
    Fail(E),
}

impl<T> Outcome<T, StoreError> {
    /// What an answer that is not the awaited success means: a failed response is retried or
    /// fails as [`classify_failure`] says; a transport error is retried.
    fn unexpected(response: Result<Response, HttpError>, location: &std::path::Path) -> Self {
        match response {
            Ok(r) => match classify_failure(&r, location) {
                Ok((cause, why)) => Outcome::Retry(cause, why),
                Err(e) => Outcome::Fail(e),
            },
            Err(e) => Outcome::Retry(e.retry_cause(), e.to_string()),
        }
    }
}

impl ObjectStore for S3Store {
    fn read<'a>(
        &'a self,
        pool: &'a BufferPool,
        memory: Reservation,
        range: ObjectRange,
    ) -> futures::future::LocalBoxFuture<'a, Result<Block, StoreError>> {
        let ObjectRange {
            hash,
            object_len,
            offset,
            len,
        } = range;
        Box::pin(self.read_reserved(pool, memory, hash, object_len, offset, len))
    }

    fn location(&self, hash: Hash) -> PathBuf {
        S3Store::location(self, hash)
    }

    fn retries(&self) -> RetryCounts {
        S3Store::retries(self)
    }
}

/// A GET that found no object (the caller may try the key without suffix).
enum GetError {
    Missing,
    Store(StoreError),
}

/// One shard's S3 client. `!Send`: it owns that shard's connections.
pub struct S3Store {
    target: Arc<S3Target>,
    http: HttpClient,
    /// `scheme://host[:port]`, what the signer sees before the path.
    origin: String,
    host_header: String,
    /// Encoded request path of the root prefix, ending in `/` (`/bucket/root/` path-style).
    root_path: String,
    unsuffixed: RefCell<HashSet<Hash>>,
    /// Requests sent again after a transient failure, by cause, for `--stats`.
    retries: std::cell::Cell<RetryCounts>,
}

impl S3Store {
    /// The shard's store for `target` (no I/O until the first request).
    pub fn new(target: Arc<S3Target>) -> S3Store {
        let endpoint = target.endpoint.clone();
        let mut root_path = String::from("/");
        if endpoint.path_style {
            root_path.push_str(&encode_key(&target.bucket));
            root_path.push('/');
        }
        if !target.root_prefix.is_empty() {
            root_path.push_str(&encode_key(&target.root_prefix));
            root_path.push('/');
        }
        S3Store {
            origin: endpoint.origin(),
            host_header: endpoint.host_header(),
            http: HttpClient::new(target.shared.clone(), target.tls.clone(), target.tuning),
            root_path,
            target,
            unsuffixed: RefCell::new(HashSet::new()),
            retries: std::cell::Cell::default(),
        }
    }

    /// `s3://bucket/{rootPrefix}/Data/{hash}.xxh128`, for messages.
    pub fn location(&self, hash: Hash) -> PathBuf {
        PathBuf::from(self.url_of(&super::object_key(hash)))
    }

    fn url_of(&self, key: &str) -> String {
        if self.target.root_prefix.is_empty() {
            format!("s3://{}/{key}", self.target.bucket)
        } else {
            format!(
                "s3://{}/{}/{key}",
                self.target.bucket, self.target.root_prefix
            )
        }
    }

    /// Bytes `[offset, offset + len)` of object `hash` (`object_len` bytes long) in a buffer of
    /// the shard's pool: one ranged GET, retried on transient failures; on 404 the key without
    /// the `.xxh128` suffix is tried once (very old uploads).
    pub async fn read(
        &self,
        pool: &BufferPool,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: usize,
    ) -> Result<Block, StoreError> {
        let memory = pool.reserve(len).await.map_err(|e| StoreError::Io {
            location: self.location(hash),
            source: std::io::Error::other(e),
        })?;
        self.read_reserved(pool, memory, hash, object_len, offset, len)
            .await
    }

    /// [`read`](Self::read) into `memory`, granted beforehand by the caller (see
    /// [`BufferPool::alloc_reserved`]).
    async fn read_reserved(
        &self,
        pool: &BufferPool,
        memory: Reservation,
        hash: Hash,
        object_len: u64,
        offset: u64,
        len: usize,
    ) -> Result<Block, StoreError> {
        // The empty object is never requested: S3 cannot serve an empty range.
        if len == 0 {
            return Ok(Block::empty());
        }
        let mut buffer = pool.alloc_reserved(len, memory).await;
        let dest = &mut buffer[..len];
        let [suffixed, bare] = object_keys(hash);
        let known_bare = self.unsuffixed.borrow().contains(&hash);
        let (first, second) = if known_bare {
            (&bare, &suffixed)
        } else {
            (&suffixed, &bare)
        };
        match self.get_range(first, offset, len, object_len, dest).await {
            Ok(()) => return Ok(Block::from_pool(buffer, len)),
            Err(GetError::Store(e)) => return Err(e),
            Err(GetError::Missing) => {}
        }
        match self.get_range(second, offset, len, object_len, dest).await {
            Ok(()) => {
                let mut unsuffixed = self.unsuffixed.borrow_mut();
                if known_bare {
                    unsuffixed.remove(&hash);
                } else {
                    if unsuffixed.len() >= MAX_UNSUFFIXED {
                        unsuffixed.clear();
                    }
                    unsuffixed.insert(hash);
                }
                Ok(Block::from_pool(buffer, len))
            }
            Err(GetError::Store(e)) => Err(e),
            Err(GetError::Missing) => Err(StoreError::NotFound {
                location: self.location(hash),
            }),
        }
    }

    /// Uploads `body` as `{rootPrefix}/{key}` with one signed PUT (small objects: tests, and the
    /// overlay's export later).
    pub async fn put_object(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let location = PathBuf::from(self.url_of(key));
        let path = format!("{}{}", self.root_path, encode_key(key));
        let length = body.len().to_string();
        self.with_retries(
            &location,
            "PUT",
            &path,
            &[("content-length", &length)],
            Payload::Bytes(body),
            None,
            |response| match response {
                Ok(r) if (200..300).contains(&r.head.status) => Outcome::Done(()),
                other => Outcome::unexpected(other, &location),
            },
        )
        .await
        .map_err(|e| match e {
            RetryError::Fail(e) | RetryError::Exhausted(e) => e,
        })
    }

    /// Up to `max_keys` objects under `{rootPrefix}/{prefix}`: one ListObjectsV2 page, keys in
    /// the store's (lexicographic) order, relative to the root prefix.
    pub async fn list_objects(
        &self,
        prefix: &str,
        max_keys: usize,
    ) -> Result<Vec<ListedObject>, StoreError> {
        let full_prefix = format!("{}{prefix}", self.target_prefix());
        let path = format!(
            "{}/?list-type=2&max-keys={max_keys}&prefix={}",
            self.bucket_path(),
            encode_query(&full_prefix)
        );
        let location = PathBuf::from(self.url_of(prefix));
        let body = self
            .with_retries(
                &location,
                "GET",
                &path,
                &[],
                Payload::Empty,
                None,
                |response| match response {
                    // A listing too large to hold arrives without its body.
                    Ok(r) if (200..300).contains(&r.head.status) && r.body.is_empty() => {
                        match r.head.content_length {
                            Some(0) => Outcome::Done(Vec::new()),
                            _ => Outcome::Fail(StoreError::Io {
                                location: location.clone(),
                                source: std::io::Error::other(
                                    "the listing is over 1 MiB; not read",
                                ),
                            }),
                        }
                    }
                    Ok(r) if (200..300).contains(&r.head.status) => Outcome::Done(r.body),
                    other => Outcome::unexpected(other, &location),
                },
            )
            .await
            .map_err(|e| match e {
                RetryError::Fail(e) | RetryError::Exhausted(e) => e,
            })?;
        let root = self.target_prefix();
        Ok(parse_listing(&body)
            .into_iter()
            .filter_map(|mut object| {
                object.key = object.key.strip_prefix(&root)?.to_string();
                Some(object)
            })
            .collect())
    }

    /// The whole object `{rootPrefix}/{key}`, which a listing said is `len` bytes long (one GET
    /// into a buffer of that size; an object of another size now is an error).
    pub async fn get_object(&self, key: &str, len: u64) -> Result<Vec<u8>, StoreError> {
        let location = PathBuf::from(self.url_of(key));
        if len == 0 {
            return Ok(Vec::new());
        }
        let path = format!("{}{}", self.root_path, encode_key(key));
        let mut body = vec![0; len as usize];
        self.with_retries(
            &location,
            "GET",
            &path,
            &[],
            Payload::Empty,
            Some(&mut body[..]),
            |response| match response {
                Ok(r) if r.filled => Outcome::Done(()),
                Ok(r) if (200..300).contains(&r.head.status) => {
                    Outcome::Fail(StoreError::WrongSize {
                        location: location.clone(),
                        expected: len,
                        actual: r.head.content_length.unwrap_or(0),
                    })
                }
                other => Outcome::unexpected(other, &location),
            },
        )
        .await
        .map_err(|e| match e {
            RetryError::Fail(e) | RetryError::Exhausted(e) => e,
        })?;
        Ok(body)
    }

    /// `/bucket` for path-style endpoints, empty for virtual-hosted ones: where bucket-level
    /// requests (listings) go.
    fn bucket_path(&self) -> String {
        if self.target.endpoint.path_style {
            format!("/{}", encode_key(&self.target.bucket))
        } else {
            String::new()
        }
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
        object_len: u64,
        dest: &mut [u8],
    ) -> Result<(), GetError> {
        let location = PathBuf::from(self.url_of(key));
        let path = format!("{}{}", self.root_path, encode_key(key));
        let last = offset + len as u64 - 1;
        let range = format!("bytes={offset}-{last}");
        let result = self
            .with_retries(
                &location,
                "GET",
                &path,
                &[("range", &range)],
                Payload::Empty,
                Some(dest),
                |response| {
                    let r = match response {
                        Ok(r) => r,
                        Err(e) => return Outcome::Retry(e.retry_cause(), e.to_string()),
                    };
                    if r.head.status == 404 {
                        return Outcome::Fail(GetError::Missing);
                    }
                    let wrong_size = |actual| {
                        Outcome::Fail(GetError::Store(StoreError::WrongSize {
                            location: location.clone(),
                            expected: object_len,
                            actual,
                        }))
                    };
                    match r.head.status {
                        206 => {
                            let range = r.head.content_range;
                            if let Some(total) = range.and_then(|r| r.total) {
                                if total != object_len {
                                    return wrong_size(total);
                                }
                            }
                            if range.and_then(|r| r.range) != Some((offset, last)) || !r.filled {
                                return Outcome::Retry(RetryCause::BadAnswer, format!(
                                    "206 for a different range ({range:?}, Content-Length {:?}; asked {offset}-{last})",
                                    r.head.content_length
                                ));
                            }
                            Outcome::Done(())
                        }
                        200 => match r.head.content_length {
                            Some(length) if length != object_len => wrong_size(length),
                            // A server without Range support: usable only for a whole-object read.
                            _ if r.filled && offset == 0 => Outcome::Done(()),
                            _ => Outcome::Fail(GetError::Store(StoreError::Io {
                                location: location.clone(),
                                source: std::io::Error::other(
                                    "the S3 server ignored the Range header (200 instead of 206)",
                                ),
                            })),
                        },
                        416 => match r.head.content_range.and_then(|r| r.total) {
                            Some(total) => wrong_size(total),
                            None => wrong_size(0),
                        },
                        _ => match classify_failure(&r, &location) {
                            Ok((cause, why)) => Outcome::Retry(cause, why),
                            Err(e) => Outcome::Fail(GetError::Store(e)),
                        },
                    }
                },
            )
            .await;
        result.map_err(|e| match e {
            RetryError::Fail(e) => e,
            RetryError::Exhausted(e) => GetError::Store(e),
        })
    }

    /// ListObjectsV2 with max-keys=1 under `{rootPrefix}/Data/`; see [`S3Target::probe`].
    /// `Ok(Some(warning))`: usable, but the credentials may not list the bucket.
    async fn probe(&self) -> Result<Option<String>, ProbeError> {
        let prefix = format!("{}Data/", self.target_prefix());
        let path = format!(
            "{}/?list-type=2&max-keys=1&prefix={}",
            self.bucket_path(),
            encode_query(&prefix)
        );
        let location = PathBuf::from(format!("s3://{}/{prefix}", self.target.bucket));
        let t = &self.target;
        let where_ = t.describe();
        let custom = self.target.endpoint.path_style
            && !self.target.endpoint.host.ends_with("amazonaws.com");
        let result = self
            .with_retries(
                &location,
                "GET",
                &path,
                &[],
                Payload::Empty,
                None,
                |response| {
                    let r = match response {
                        Ok(r) => r,
                        Err(HttpError::Connect(addr, source)) => {
                            return Outcome::Fail(ProbeError::Connect {
                                origin: t.endpoint.origin(),
                                addr,
                                source,
                                custom_endpoint: custom,
                            })
                        }
                        Err(e) => return Outcome::Retry(e.retry_cause(), e.to_string()),
                    };
                    let (code, message) = error_code(&r.body);
                    let status = r.head.status;
                    if (200..300).contains(&status) {
                        return Outcome::Done(None);
                    }
                    let region_hint = r
                        .head
                        .bucket_region
                        .clone()
                        .or_else(|| xml_field(&r.body, "Region"));
                    let target = where_.clone();
                    let bucket = t.bucket.clone();
                    match (status, code.as_str()) {
                        (403, "InvalidAccessKeyId") => {
                            Outcome::Fail(ProbeError::UnknownAccessKey { target })
                        }
                        (403, "SignatureDoesNotMatch") => {
                            Outcome::Fail(ProbeError::SignatureMismatch { target })
                        }
                        (400 | 403, "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => {
                            Outcome::Fail(ProbeError::BadSessionToken { target, code })
                        }
                        (403, "AccessDenied") => Outcome::Done(Some(format!(
                            "{where_}: the credentials may not list the bucket (s3:ListBucket); \
                             reads will still work, but a missing object will read as \
                             'access denied' rather than 'not found'"
                        ))),
                        (404, "NoSuchBucket") | (404, "") => {
                            Outcome::Fail(ProbeError::NoSuchBucket { target, bucket })
                        }
                        (301 | 307 | 400, _)
                            if region_hint.is_some()
                                || matches!(
                                    code.as_str(),
                                    "PermanentRedirect"
                                        | "AuthorizationHeaderMalformed"
                                        | "IllegalLocationConstraintException"
                                ) =>
                        {
                            Outcome::Fail(match region_hint {
                                Some(region) if region != t.region => ProbeError::BucketInRegion {
                                    target,
                                    bucket,
                                    region,
                                },
                                _ => ProbeError::WrongRegion {
                                    target,
                                    bucket,
                                    status,
                                    code,
                                    message,
                                },
                            })
                        }
                        (403, _) => Outcome::Fail(ProbeError::AccessDenied {
                            target,
                            code,
                            message,
                        }),
                        _ if retryable_status(status, &code) => {
                            Outcome::Retry(status_cause(status, &code), format!("{status} {code}"))
                        }
                        _ => Outcome::Fail(ProbeError::Unexpected {
                            target,
                            status,
                            code,
                            message,
                        }),
                    }
                },
            )
            .await;
        result.map_err(|e| match e {
            RetryError::Fail(refused) => refused,
            RetryError::Exhausted(source) => ProbeError::Unavailable {
                target: where_,
                source,
            },
        })
    }

    /// Whether object `hash` exists (HEAD, then the key without `.xxh128`, as reads do);
    /// `None` when the server's answers do not tell.
    async fn exists(&self, hash: Hash) -> Option<bool> {
        for key in object_keys(hash) {
            let location = PathBuf::from(self.url_of(&key));
            let path = format!("{}{}", self.root_path, encode_key(&key));
            let answer = self
                .with_retries(
                    &location,
                    "HEAD",
                    &path,
                    &[],
                    Payload::Empty,
                    None,
                    |response| match response {
                        Ok(r) if (200..300).contains(&r.head.status) => Outcome::Done(true),
                        Ok(r) if r.head.status == 404 => Outcome::Done(false),
                        other => Outcome::unexpected(other, &location),
                    },
                )
                .await;
            match answer {
                Ok(true) => return Some(true),
                Ok(false) => continue,
                Err(_) => return None,
            }
        }
        Some(false)
    }

    fn target_prefix(&self) -> String {
        if self.target.root_prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.target.root_prefix)
        }
    }

    /// Requests retried so far (every attempt after a transient failure counts once).
    pub fn retries(&self) -> RetryCounts {
        self.retries.get()
    }

    /// Signs and sends one request up to `max_attempts` times, sleeping a jittered backoff
    /// between attempts, until `classify` says done or failed. Attempts are logged at debug
    /// level only: the service logs a failing object once.
    #[allow(clippy::too_many_arguments)]
    async fn with_retries<T, E>(
        &self,
        location: &std::path::Path,
        method: &'static str,
        path: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
        mut direct: Option<&mut [u8]>,
        classify: impl Fn(Result<Response, HttpError>) -> Outcome<T, E>,
    ) -> Result<T, RetryError<E>> {
        let tuning = &self.target.tuning;
        let deadline = std::time::Instant::now() + tuning.request_deadline;
        let past_deadline = |attempts: u32, last: &str| {
            RetryError::Exhausted(StoreError::Unavailable {
                location: location.to_path_buf(),
                attempts,
                last: format!(
                    "no complete answer within {}s (--read-timeout){}",
                    tuning.request_deadline.as_secs_f64(),
                    if last.is_empty() {
                        String::new()
                    } else {
                        format!("; before that: {last}")
                    }
                ),
            })
        };
        let mut last = String::new();
        for attempt in 1..=tuning.max_attempts {
            let head = match self.request_head(method, path, headers, &payload) {
                Ok(head) => head,
                Err(unsigned) => {
                    return Err(RetryError::Exhausted(StoreError::Io {
                        location: location.to_path_buf(),
                        source: std::io::Error::other(unsigned),
                    }))
                }
            };
            let body = match &payload {
                Payload::Bytes(bytes) => bytes,
                Payload::Empty => &[][..],
            };
            let request = Request {
                head: head.as_bytes(),
                body,
                head_only: method == "HEAD",
            };
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            let send = self.http.send(&request, direct.as_deref_mut());
            let response = match futures::future::select(
                std::pin::pin!(send),
                std::pin::pin!(glommio::timer::sleep(remaining)),
            )
            .await
            {
                futures::future::Either::Left((response, _)) => response,
                futures::future::Either::Right(_) => {
                    // The connection is dropped with the request: it is in an unknown state.
                    return Err(past_deadline(attempt, &last));
                }
            };
            let failed_transport = response.is_err();
            match classify(response) {
                Outcome::Done(value) => return Ok(value),
                Outcome::Fail(error) => return Err(RetryError::Fail(error)),
                Outcome::Retry(cause, why) => {
                    crate::limited!(
                        tracing::Level::DEBUG,
                        "S3 retries",
                        location = %location.display(),
                        attempt,
                        "S3 {method} failed, will retry: {why}"
                    );
                    last = why;
                    if failed_transport {
                        // The server may have gone away: none of its old connections are trusted.
                        self.http.drop_idle();
                    }
                    if attempt < tuning.max_attempts {
                        let pause = backoff(tuning, attempt);
                        if std::time::Instant::now() + pause >= deadline {
                            return Err(past_deadline(attempt, &last));
                        }
                        let mut retries = self.retries.get();
                        retries.0[cause as usize] += 1;
                        self.retries.set(retries);
                        glommio::timer::sleep(pause).await;
                    }
                }
            }
        }
        Err(RetryError::Exhausted(StoreError::Unavailable {
            location: location.to_path_buf(),
            attempts: tuning.max_attempts,
            last,
        }))
    }

    /// The request head, signed now with the current credentials snapshot.
    fn request_head(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        payload: &Payload<'_>,
    ) -> Result<String, SignError> {
        let identity = self.target.shared.identity.load();
        let url = format!("{}{path}", self.origin);
        let signed = sign_request(
            method,
            &url,
            headers,
            *payload,
            &identity,
            &self.target.region,
            SystemTime::now(),
        )?;
        let mut head = String::with_capacity(1024);
        head.push_str(method);
        head.push(' ');
        head.push_str(path);
        head.push_str(" HTTP/1.1\r\nhost: ");
        head.push_str(&self.host_header);
        head.push_str("\r\nuser-agent: mount_vfs/");
        head.push_str(env!("CARGO_PKG_VERSION"));
        head.push_str("\r\n");
        for (name, value) in headers
            .iter()
            .copied()
            .chain(signed.iter().map(|(n, v)| (*n, v.as_str())))
        {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        Ok(head)
    }
}

enum RetryError<E> {
    Fail(E),
    Exhausted(StoreError),
}

/// A non-2xx answer to an object request: `Ok(reason)` for transient ones (retry), else the
/// error that names it.
/// The keys object `hash` may have: `Data/{hash}.xxh128` (what the Deadline client writes), then
/// `Data/{hash}` (very old uploads).
fn object_keys(hash: Hash) -> [String; 2] {
    [super::object_key(hash), format!("Data/{hash}")]
}

/// A failed answer: transient (its retry cause and a line for the log), or the error to return.
fn classify_failure(
    r: &Response,
    location: &std::path::Path,
) -> Result<(RetryCause, String), StoreError> {
    let (code, message) = error_code(&r.body);
    let status = r.head.status;
    if retryable_status(status, &code) {
        return Ok((status_cause(status, &code), format!("{status} {code}")));
    }
    let location = location.to_path_buf();
    Err(match status {
        403 => StoreError::Denied {
            location,
            reason: format!("{code}: {message}"),
        },
        404 => StoreError::NotFound { location },
        _ => StoreError::Io {
            location,
            source: std::io::Error::other(format!("S3 answered {status} {code}: {message}")),
        },
    })
}

/// `<Code>` and `<Message>` of an S3 error document (empty when absent).
fn error_code(body: &[u8]) -> (String, String) {
    (
        xml_field(body, "Code").unwrap_or_default(),
        xml_field(body, "Message").unwrap_or_default(),
    )
}

/// The text of the first `<name>…</name>` in `body` (S3 error documents are flat).
fn xml_field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(text[start..end].trim().to_string())
}

/// One object of a listing ([`S3Store::list_objects`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Relative to the root prefix.
    pub key: String,
    pub size: u64,
    /// ISO 8601 as the server wrote it (`2026-12-02T13:30:14.000Z`): sorts by time as text.
    pub last_modified: String,
}

/// The `<Contents>` of a ListObjectsV2 answer, with full keys; entries without a key or a size
/// are skipped.
fn parse_listing(body: &[u8]) -> Vec<ListedObject> {
    let text = String::from_utf8_lossy(body);
    text.split("<Contents>")
        .skip(1)
        .filter_map(|contents| {
            let contents = contents.split("</Contents>").next()?.as_bytes();
            Some(ListedObject {
                key: xml_unescape(&xml_field(contents, "Key")?),
                size: xml_field(contents, "Size")?.parse().ok()?,
                last_modified: xml_field(contents, "LastModified").unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes XML's five predefined entities (keys may hold `&`, `<`, `>`, quotes).
fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Percent-encodes a query value (also `/`).
fn encode_query(value: &str) -> String {
    encode_key(value).replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_parse() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            error_code(body),
            (
                "NoSuchBucket".into(),
                "The specified bucket does not exist".into()
            )
        );
        assert_eq!(error_code(b"garbage"), (String::new(), String::new()));
        assert_eq!(
            xml_field(b"<Region>eu-west-1</Region>", "Region").as_deref(),
            Some("eu-west-1")
        );
    }

    #[test]
    fn listings_parse() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult><Name>b</Name><Prefix>r/Traces/x/</Prefix><KeyCount>2</KeyCount>
<Contents><Key>r/Traces/x/a&amp;b.json</Key><LastModified>2026-12-02T13:30:14.000Z</LastModified><ETag>"e"</ETag><Size>120</Size></Contents>
<Contents><Key>r/Traces/x/c.json</Key><Size>7</Size></Contents><Contents><Key>no-size</Key></Contents>
</ListBucketResult>"#;
        let listed = parse_listing(body);
        assert_eq!(
            listed,
            vec![
                ListedObject {
                    key: "r/Traces/x/a&b.json".into(),
                    size: 120,
                    last_modified: "2026-12-02T13:30:14.000Z".into(),
                },
                ListedObject {
                    key: "r/Traces/x/c.json".into(),
                    size: 7,
                    last_modified: String::new(),
                },
            ]
        );
        assert!(parse_listing(b"<Error><Code>AccessDenied</Code></Error>").is_empty());
    }

    /// The start-up messages, word for word as before they were typed (tests elsewhere and
    /// users' scripts match on them).
    #[test]
    fn probe_errors_keep_their_wording() {
        let target = || "s3://b/r (region us-east-1, endpoint http://h:9000)".to_string();
        let t = "s3://b/r (region us-east-1, endpoint http://h:9000)";
        let cases = [
            (
                ProbeError::Connect {
                    origin: "http://h:9000".into(),
                    addr: "127.0.0.1:9000".parse().unwrap(),
                    source: std::io::Error::other("refused"),
                    custom_endpoint: true,
                },
                "cannot connect to the S3 endpoint http://h:9000 (127.0.0.1:9000): refused; check \
                 --endpoint-url / AWS_ENDPOINT_URL_S3 and that the server is running"
                    .to_string(),
            ),
            (
                ProbeError::Connect {
                    origin: "https://s3.us-east-1.amazonaws.com".into(),
                    addr: "127.0.0.1:443".parse().unwrap(),
                    source: std::io::Error::other("refused"),
                    custom_endpoint: false,
                },
                "cannot connect to the S3 endpoint https://s3.us-east-1.amazonaws.com \
                 (127.0.0.1:443): refused; check --region, --endpoint-url / AWS_ENDPOINT_URL_S3 \
                 and the network"
                    .to_string(),
            ),
            (
                ProbeError::UnknownAccessKey { target: target() },
                format!(
                    "{t}: the access key id is not known to the server: the credentials are \
                     wrong (check AWS_ACCESS_KEY_ID / --profile)"
                ),
            ),
            (
                ProbeError::SignatureMismatch { target: target() },
                format!(
                    "{t}: the request signature does not match: the secret access key is wrong \
                     for this access key id (check AWS_SECRET_ACCESS_KEY / --profile)"
                ),
            ),
            (
                ProbeError::BadSessionToken {
                    target: target(),
                    code: "ExpiredToken".into(),
                },
                format!(
                    "{t}: the session token is expired or invalid (ExpiredToken): refresh the \
                     credentials (e.g. `aws sso login`)"
                ),
            ),
            (
                ProbeError::NoSuchBucket {
                    target: target(),
                    bucket: "b".into(),
                },
                format!("{t}: bucket b does not exist: check --s3 / --bucket"),
            ),
            (
                ProbeError::BucketInRegion {
                    target: target(),
                    bucket: "b".into(),
                    region: "eu-west-1".into(),
                },
                format!("{t}: bucket b is in region eu-west-1: pass --region eu-west-1"),
            ),
            (
                ProbeError::WrongRegion {
                    target: target(),
                    bucket: "b".into(),
                    status: 301,
                    code: "PermanentRedirect".into(),
                    message: "Use the right endpoint.".into(),
                },
                format!(
                    "{t}: wrong region for bucket b (301 PermanentRedirect: Use the right \
                     endpoint.): pass the bucket's --region"
                ),
            ),
            (
                ProbeError::AccessDenied {
                    target: target(),
                    code: "AllAccessDisabled".into(),
                    message: "All access disabled".into(),
                },
                format!(
                    "{t}: access denied (AllAccessDisabled: All access disabled): check the \
                     credentials and their permissions on the bucket"
                ),
            ),
            (
                ProbeError::Unexpected {
                    target: target(),
                    status: 501,
                    code: "NotImplemented".into(),
                    message: "nope".into(),
                },
                format!("{t}: the server answered 501 NotImplemented nope"),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.to_string(), expected);
        }
        let exhausted = StoreError::Unavailable {
            location: PathBuf::from("s3://b/r/Data/"),
            attempts: 3,
            last: "503 SlowDown".into(),
        };
        let expected = format!("{t}: {exhausted}");
        let unavailable = ProbeError::Unavailable {
            target: target(),
            source: exhausted,
        };
        assert_eq!(unavailable.to_string(), expected);
    }
}
