//! The S3 control thread: the only place that runs the AWS SDK (which needs tokio). At start-up
//! it resolves the region and credentials with the standard chain (`aws-config`) and the
//! endpoint's addresses; then it refreshes credentials before they expire and re-resolves the
//! endpoint's DNS name now and then. Shards read both through [`ArcSwap`] snapshots (one atomic
//! load per request) and never block on this thread, so nothing on the data path crosses a
//! thread.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_smithy_runtime_api::client::identity::Identity;

use super::config::{CredentialSource, Endpoint, S3Config, S3ConfigError};

/// Refresh this long before the credentials expire (the SDKs use 5 minutes too).
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Never refresh more often than this, whatever the expiry says.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// After a failed refresh, keep the old credentials and try again this much later.
const REFRESH_RETRY: Duration = Duration::from_secs(15);
/// How often the endpoint's host name is resolved again (S3 spreads load over many addresses).
const DNS_REFRESH: Duration = Duration::from_secs(30);
/// The whole start-up resolution (profile files, SSO, metadata services) must answer within this.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why region, endpoint, addresses or credentials could not be resolved at start-up; each
/// message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot start the S3 control thread: {0}")]
    ControlThread(#[source] std::io::Error),
    #[error("cannot start the S3 control runtime: {0}")]
    ControlRuntime(#[source] std::io::Error),
    #[error("the AWS credential chain did not answer within {}s (SSO login, metadata service?); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or pass --profile", .0.as_secs())]
    Timeout(Duration),
    #[error("no AWS credential provider is configured; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or pass --profile")]
    NoProvider,
    /// No region given, configured or implied by a custom endpoint; holds the bucket.
    #[error(
        "no AWS region for bucket {0}: pass --region (or set AWS_REGION, or region in the profile)"
    )]
    NoRegion(String),
    #[error(transparent)]
    Endpoint(#[from] S3ConfigError),
    /// The chain found no credentials; the message spells out the provider's causes.
    #[error("no usable AWS credentials: {}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, pass --profile, or log in (`aws sso login`)", error_chain(.0))]
    NoCredentials(#[source] CredentialsError),
    #[error("cannot resolve S3 endpoint host {host}: {source}; check --endpoint-url / AWS_ENDPOINT_URL_S3 and --region")]
    UnknownHost {
        host: String,
        source: std::io::Error,
    },
    #[error("S3 endpoint host {0} has no addresses; check --endpoint-url / AWS_ENDPOINT_URL_S3")]
    NoAddresses(String),
}

/// State the control thread publishes for the shards.
pub(crate) struct Shared {
    /// The signing identity (credentials), replaced on refresh.
    pub identity: ArcSwap<Identity>,
    /// The endpoint's socket addresses, replaced on DNS refresh; never empty.
    pub addrs: ArcSwap<Vec<SocketAddr>>,
}

/// What start-up resolved.
pub(crate) struct Resolved {
    pub region: String,
    pub endpoint: Endpoint,
    pub shared: Arc<Shared>,
    pub control: ControlThread,
}

/// The running control thread; dropping it stops the thread.
pub(crate) struct ControlThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the control thread and waits until it has resolved region, endpoint, addresses and
/// credentials; the error says which of them failed and how to fix it.
pub(crate) fn start(config: &S3Config) -> Result<Resolved, ResolveError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let config = config.clone();
    let thread = std::thread::Builder::new()
        .name("mount_vfs-s3-control".into())
        .spawn(move || control_thread(config, ready_tx, stop_rx))
        .map_err(ResolveError::ControlThread)?;
    let control = ControlThread {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok((region, endpoint, shared))) => Ok(Resolved {
            region,
            endpoint,
            shared,
            control,
        }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ResolveError::Timeout(START_TIMEOUT)),
    }
}

type Ready = Result<(String, Endpoint, Arc<Shared>), ResolveError>;

fn control_thread(
    config: S3Config,
    ready: mpsc::Sender<Ready>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    // I/O as well as timers: the credential providers make HTTP calls (IMDS, ECS, SSO, STS)
    // and spawn processes (`credential_process`), which need tokio's I/O and signal drivers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(ResolveError::ControlRuntime(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let (region, endpoint, provider, credentials) = match resolve(&config).await {
            Ok(resolved) => resolved,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let addrs = match lookup(&endpoint) {
            Ok(addrs) => addrs,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let mut next_credentials = refresh_at(&credentials);
        let shared = Arc::new(Shared {
            identity: ArcSwap::from_pointee(credentials.into()),
            addrs: ArcSwap::from_pointee(addrs),
        });
        if ready
            .send(Ok((region, endpoint.clone(), shared.clone())))
            .is_err()
        {
            return;
        }
        let dns_refresh = endpoint.host.parse::<std::net::IpAddr>().is_err();
        let mut next_dns = Instant::now() + DNS_REFRESH;
        let mut stop = stop;
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let due = next_credentials
                .unwrap_or(far)
                .min(if dns_refresh { next_dns } else { far });
            let sleep = std::pin::pin!(tokio::time::sleep_until(due.into()));
            if let futures::future::Either::Left(_) =
                futures::future::select(&mut stop, sleep).await
            {
                return;
            }
            let now = Instant::now();
            if dns_refresh && now >= next_dns {
                match lookup(&endpoint) {
                    Ok(addrs) => shared.addrs.store(Arc::new(addrs)),
                    Err(error) => tracing::warn!("{error}; keeping the known addresses"),
                }
                next_dns = now + DNS_REFRESH;
            }
            if next_credentials.is_some_and(|at| now >= at) {
                match provider.provide_credentials().await {
                    Ok(credentials) => {
                        tracing::debug!("S3 credentials refreshed");
                        next_credentials = refresh_at(&credentials);
                        shared.identity.store(Arc::new(credentials.into()));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot refresh S3 credentials: {}; retrying in {}s",
                            error_chain(&e),
                            REFRESH_RETRY.as_secs()
                        );
                        next_credentials = Some(now + REFRESH_RETRY);
                    }
                }
            }
        }
    });
}

/// Region, endpoint, provider and the first credentials.
async fn resolve(
    config: &S3Config,
) -> Result<(String, Endpoint, SharedCredentialsProvider, Credentials), ResolveError> {
    let (region, provider) = match &config.credentials {
        CredentialSource::Static {
            access_key_id,
            secret_access_key,
            session_token,
        } => (
            config.region.clone(),
            SharedCredentialsProvider::new(Credentials::new(
                access_key_id,
                secret_access_key,
                session_token.clone(),
                None,
                "mount_vfs-static",
            )),
        ),
        CredentialSource::Chain { profile } => {
            let mut loader = aws_config::defaults(BehaviorVersion::latest());
            if let Some(profile) = profile {
                loader = loader.profile_name(profile);
            }
            if let Some(region) = &config.region {
                loader = loader.region(Region::new(region.clone()));
            } else if config.endpoint_url.is_some() {
                // A custom endpoint: the instance metadata service cannot know its region, and
                // asking it logs a warning per provider. Environment, then profile, then the
                // us-east-1 that local servers ignore.
                let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
                if let Some(name) = profile_name_of(config) {
                    profile = profile.profile_name(name);
                }
                loader = loader.region(
                    aws_config::meta::region::RegionProviderChain::first_try(
                        aws_config::environment::EnvironmentVariableRegionProvider::new(),
                    )
                    .or_else(profile.build())
                    .or_else(Region::new("us-east-1")),
                );
            }
            let sdk = loader.load().await;
            let provider = sdk.credentials_provider().ok_or(ResolveError::NoProvider)?;
            (sdk.region().map(|r| r.to_string()), provider)
        }
    };
    let region = match (region, &config.endpoint_url) {
        (Some(region), _) => region,
        // Local servers ignore the region but SigV4 needs one.
        (None, Some(_)) => "us-east-1".to_string(),
        (None, None) => return Err(ResolveError::NoRegion(config.bucket.clone())),
    };
    let endpoint = Endpoint::resolve(config.endpoint_url.as_deref(), &config.bucket, &region)?;
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(ResolveError::NoCredentials)?;
    Ok((region, endpoint, provider, credentials))
}

/// The profile named by `--profile`, if any.
fn profile_name_of(config: &S3Config) -> Option<&str> {
    match &config.credentials {
        CredentialSource::Chain { profile } => profile.as_deref(),
        CredentialSource::Static { .. } => None,
    }
}

/// The error and its causes on one line (the SDK's top-level messages are terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// When to refresh credentials that expire at `expiry` (`None`: they never do).
fn refresh_at(credentials: &Credentials) -> Option<Instant> {
    let expiry = credentials.expiry()?;
    let left = expiry
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    // Short-lived credentials (under 10 minutes) refresh at half-life instead.
    let wait = left
        .saturating_sub(REFRESH_BEFORE_EXPIRY)
        .max(left / 2)
        .max(MIN_REFRESH_INTERVAL);
    Some(Instant::now() + wait)
}

/// The endpoint's socket addresses (a blocking lookup: only ever on the control thread).
fn lookup(endpoint: &Endpoint) -> Result<Vec<SocketAddr>, ResolveError> {
    let addrs: Vec<SocketAddr> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|source| ResolveError::UnknownHost {
            host: endpoint.host.clone(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ResolveError::NoAddresses(endpoint.host.clone()));
    }
    Ok(addrs)
}
