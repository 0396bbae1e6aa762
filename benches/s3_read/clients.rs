//! The raw clients, no FUSE: our `S3Store` on glommio shards and an independent hyper client
//! signing with `aws-sigv4`. They measure what reading S3 costs without a filesystem in the way
//! (the `/raw` reference), and they put the test data into the bucket.

use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use mount_vfs::manifest::Hash;
use mount_vfs::store::s3::{CredentialSource, S3Config, S3Tuning};
use mount_vfs::store::{S3Store, S3Target};
use mount_vfs_executors::{ShardConfig, Shards};

use crate::mounts::STEP_LIMIT;
use crate::readers::{layout, MIB};
use crate::server::{BUCKET, KEY, REGION, SECRET};

/// Each raw stream reads in ranged GETs of this size, [`RAW_IN_FLIGHT`] of them in flight.
pub const RAW_GET: usize = 8 * MIB;
pub const RAW_IN_FLIGHT: usize = 4;

/// Our store's settings for the bench bucket, objects under `root`: the fixed key, and a
/// read timeout long enough for a loaded 2-CPU machine.
pub fn s3_config(endpoint: &str, root: &str) -> S3Config {
    S3Config {
        bucket: BUCKET.into(),
        root_prefix: root.into(),
        region: Some(REGION.into()),
        endpoint_url: Some(endpoint.into()),
        credentials: CredentialSource::Static {
            access_key_id: KEY.into(),
            secret_access_key: SECRET.into(),
            session_token: None,
        },
        tuning: S3Tuning {
            read_timeout: Duration::from_secs(60),
            ..S3Tuning::default()
        },
    }
}

/// Runs `body(shard_id, pool)` on each of `shards` glommio shards; returns the results.
fn on_shards<T, F, Fut>(shards: usize, io_memory: usize, body: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, mount_vfs_executors::BufferPool) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let running = Shards::<()>::start(
        &ShardConfig::plain(shards, io_memory),
        move |ctx, _mailbox| {
            let tx = tx.lock().unwrap().clone();
            let fut = body(ctx.id, ctx.pool.clone());
            async move {
                let _ = tx.send(fut.await);
            }
        },
    )
    .expect("start shards");
    let results = (0..shards)
        .map(|_| {
            rx.recv_timeout(STEP_LIMIT)
                .expect("a shard body panicked or timed out")
        })
        .collect();
    running.shutdown().expect("shard shutdown");
    results
}

/// Every object of a local CAS as `(Data/NAME, path)`, for [`upload`].
pub fn cas_objects(cas: &Path) -> Vec<(String, PathBuf)> {
    fs::read_dir(cas.join("Data"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                format!("Data/{}", e.file_name().to_string_lossy()),
                e.path(),
            )
        })
        .collect()
}

/// Uploads `(key under root, bytes)` with our store's signed PUT.
pub fn upload(endpoint: &str, root: &str, objects: Vec<(String, PathBuf)>) {
    let target = S3Target::start(&s3_config(endpoint, root)).unwrap();
    let objects = Mutex::new(Some(objects));
    on_shards(1, 16 << 20, move |_, _pool| {
        let target = target.clone();
        let objects = objects.lock().unwrap().take().unwrap_or_default();
        async move {
            let store = S3Store::new(target);
            for (key, path) in objects {
                let data = fs::read(&path).unwrap();
                store.put_object(&key, &data).await.expect("upload");
            }
        }
    });
}

/// The streams of a raw read: `(object index, start, end)`, as [`layout`] for the mounts.
fn raw_streams(readers: usize, size: u64) -> Vec<(usize, u64, u64)> {
    layout(readers, size)
        .into_iter()
        .map(|(name, s, e)| (usize::from(name == "b.bin"), s, e))
        .collect()
}

/// Our `S3Store` on `shards` glommio shards: streams spread round-robin over shards, each with
/// `RAW_IN_FLIGHT` 8 MiB GETs in flight. Bytes per second.
pub fn raw_s3store(
    target: &Arc<S3Target>,
    hashes: [Hash; 2],
    readers: usize,
    size: u64,
    shards: usize,
) -> f64 {
    let target = target.clone();
    let streams = raw_streams(readers, size);
    let results = on_shards(shards, 256 << 20, move |id, pool| {
        let store = Rc::new(S3Store::new(target.clone()));
        let mine: Vec<_> = streams
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == id)
            .map(|(_, s)| *s)
            .collect();
        async move {
            let started = Instant::now();
            let work = mine.into_iter().map(|(object, start, end)| {
                let store = store.clone();
                let pool = pool.clone();
                async move {
                    let chunks = (start..end)
                        .step_by(RAW_GET)
                        .map(|o| (o, ((end - o) as usize).min(RAW_GET)));
                    let mut stream = futures::stream::iter(chunks)
                        .map(|(o, len)| {
                            let store = store.clone();
                            let pool = pool.clone();
                            async move {
                                store
                                    .read(&pool, hashes[object], size, o, len)
                                    .await
                                    .map(|b| b.len() as u64)
                            }
                        })
                        .buffered(RAW_IN_FLIGHT);
                    let mut total = 0;
                    while let Some(n) = stream.next().await {
                        total += n.expect("raw S3Store read");
                    }
                    total
                }
            });
            let total: u64 = futures::future::join_all(work).await.into_iter().sum();
            (started, Instant::now(), total)
        }
    });
    span_rate(&results)
}

fn span_rate(results: &[(Instant, Instant, u64)]) -> f64 {
    let start = results.iter().map(|r| r.0).min().unwrap();
    let end = results.iter().map(|r| r.1).max().unwrap();
    let total: u64 = results.iter().map(|r| r.2).sum();
    total as f64 / (end - start).as_secs_f64()
}

/// Signs a ranged GET with `aws-sigv4` for the hyper client.
pub fn sign_get(url: &str, range: &str) -> Vec<(&'static str, String)> {
    sign_request(
        "GET",
        url,
        &[("range", range)],
        aws_sigv4::http_request::SignableBody::UnsignedPayload,
    )
}

/// The SigV4 headers of `method url` with `headers` and `body`, S3's way (single percent
/// encoding, no path normalization, `x-amz-content-sha256`).
fn sign_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: aws_sigv4::http_request::SignableBody<'_>,
) -> Vec<(&'static str, String)> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableRequest, SigningSettings,
        UriPathNormalizationMode,
    };
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(KEY, SECRET, None, None, "bench").into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("s3")
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let request = SignableRequest::new(method, url, headers.iter().copied(), body).unwrap();
    let (instructions, _) = sign(request, &params).unwrap().into_parts();
    instructions
        .into_parts()
        .0
        .into_iter()
        .map(|h| (h.name(), h.value().to_string()))
        .collect()
}

/// hyper's HTTP/1.1 client, as the raw baselines use it.
pub type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<Bytes>,
>;

/// The raw baselines' HTTP client: hyper's pooled HTTP/1.1 client on a 2-thread tokio runtime.
pub fn hyper_client() -> (tokio::runtime::Runtime, HyperClient) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(32)
        .build_http();
    (runtime, client)
}

/// A client with no connection yet, on a current-thread runtime: one request as a fresh mount
/// makes it.
fn fresh_client() -> (tokio::runtime::Runtime, HyperClient) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    (runtime, client)
}

/// One signed GET of bytes `[offset, offset + len)` of `url`; the response once it is known to
/// be the 206 that range asks for.
pub async fn signed_range_get(
    client: &HyperClient,
    url: &str,
    offset: u64,
    len: u64,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let range = format!("bytes={offset}-{}", offset + len - 1);
    let mut request = http::Request::get(url).header("range", &range);
    for (name, value) in sign_get(url, &range) {
        request = request.header(name, value);
    }
    let response = client
        .request(request.body(http_body_util::Empty::new()).unwrap())
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if response.status() != 206 {
        return Err(format!("GET {url} {range}: {}", response.status()));
    }
    Ok(response)
}

/// The whole body of `response` to a GET of `url`.
pub async fn body_bytes(
    response: http::Response<hyper::body::Incoming>,
    url: &str,
) -> Result<Bytes, String> {
    use http_body_util::BodyExt;
    Ok(response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .to_bytes())
}

/// An independent baseline: hyper's pooled HTTP/1.1 client on a 2-thread tokio runtime,
/// `RAW_IN_FLIGHT` 8 MiB ranged GETs in flight per stream, bodies counted as they arrive.
pub fn raw_hyper(endpoint: &str, keys: [String; 2], readers: usize, size: u64) -> f64 {
    use http_body_util::BodyExt;
    let (runtime, client) = hyper_client();
    let streams = raw_streams(readers, size);
    let endpoint = endpoint.to_string();
    runtime.block_on(async move {
        let started = Instant::now();
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|(object, start, end)| {
                let client = client.clone();
                let url = format!("{endpoint}/{BUCKET}/{}", keys[object]);
                tokio::spawn(async move {
                    let chunks = (start..end)
                        .step_by(RAW_GET)
                        .map(|o| (o, ((end - o) as usize).min(RAW_GET) as u64));
                    let mut stream = futures::stream::iter(chunks)
                        .map(|(o, len)| {
                            let client = client.clone();
                            let url = url.clone();
                            async move {
                                let response = signed_range_get(&client, &url, o, len)
                                    .await
                                    .expect("hyper GET");
                                let mut body = response.into_body();
                                let mut n = 0u64;
                                while let Some(frame) = body.frame().await {
                                    if let Ok(data) = frame.expect("hyper body").into_data() {
                                        n += data.len() as u64;
                                    }
                                }
                                assert_eq!(n, len);
                                n
                            }
                        })
                        .buffered(RAW_IN_FLIGHT);
                    let mut total = 0;
                    while let Some(n) = stream.next().await {
                        total += n;
                    }
                    total
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("hyper stream");
        }
        total as f64 / started.elapsed().as_secs_f64()
    })
}

/// One signed GET of `len` bytes at `offset` of `key` on a fresh hyper client (a new
/// connection, as a fresh mount has): seconds from sending it to its last body byte.
pub fn raw_get_seconds(endpoint: &str, key: &str, offset: u64, len: u64) -> Result<f64, String> {
    let (runtime, client) = fresh_client();
    runtime.block_on(async {
        let url = format!("{endpoint}/{BUCKET}/{key}");
        let started = Instant::now();
        let response = signed_range_get(&client, &url, offset, len).await?;
        let body = body_bytes(response, &url).await?;
        if body.len() as u64 != len {
            return Err(format!("GET {url} at {offset}: {} bytes", body.len()));
        }
        Ok(started.elapsed().as_secs_f64())
    })
}

/// Creates the bucket with an (unsigned-payload) signed request through hyper.
pub fn create_bucket(endpoint: &str) {
    let (runtime, client) = fresh_client();
    runtime.block_on(async {
        let url = format!("{endpoint}/{BUCKET}");
        let mut request = http::Request::put(&url);
        for (name, value) in sign_request(
            "PUT",
            &url,
            &[],
            aws_sigv4::http_request::SignableBody::Bytes(b""),
        ) {
            request = request.header(name, value);
        }
        let response = client
            .request(request.body(http_body_util::Empty::new()).unwrap())
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "CreateBucket: {}",
            response.status()
        );
    });
}
