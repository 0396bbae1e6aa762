//! The S3 server every contender reads from: a minimal `s3s` implementation over in-memory
//! `Bytes` in this process, so the network and the server cost next to nothing and the rows
//! compare the clients. It counts the GetObject body bytes it hands out: what each contender
//! really fetched.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

/// The one bucket, and the fixed key every request is signed with.
pub const BUCKET: &str = "bench";
pub const KEY: &str = "benchkey";
pub const SECRET: &str = "benchsecret";
pub const REGION: &str = "us-east-1";

#[derive(Clone)]
struct Stored {
    data: Bytes,
    etag: String,
    modified: SystemTime,
}

/// A listing page: objects, common prefixes, truncated, last key or prefix returned.
type Listing = (Vec<Object>, Vec<CommonPrefix>, bool, Option<String>);

/// Buckets and objects in memory. Reads clone `Bytes` (a refcount), never the data.
#[derive(Clone, Default)]
struct MemS3 {
    buckets: Arc<RwLock<BTreeMap<String, BTreeMap<String, Stored>>>>,
    /// Body bytes handed out by GetObject: what each contender really fetched.
    served: Arc<AtomicU64>,
}

impl MemS3 {
    fn object(&self, bucket: &str, key: &str) -> S3Result<Stored> {
        let buckets = self.buckets.read().unwrap();
        let objects = buckets.get(bucket).ok_or_else(|| s3_error!(NoSuchBucket))?;
        objects
            .get(key)
            .cloned()
            .ok_or_else(|| s3_error!(NoSuchKey))
    }

    /// Keys under `prefix` after `after`, folded at `delimiter`: (objects, common prefixes,
    /// truncated, last key or prefix returned).
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max_keys: usize,
    ) -> S3Result<Listing> {
        let buckets = self.buckets.read().unwrap();
        let objects = buckets.get(bucket).ok_or_else(|| s3_error!(NoSuchBucket))?;
        let mut contents = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut last = None;
        let mut truncated = false;
        for (key, stored) in objects.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|a| key.as_str() <= a) {
                continue;
            }
            let folded = delimiter.and_then(|d| {
                key[prefix.len()..]
                    .find(d)
                    .map(|at| key[..prefix.len() + at + d.len()].to_string())
            });
            if let Some(p) = &folded {
                if prefixes.last() == Some(p) || after.is_some_and(|a| p.as_str() <= a) {
                    continue;
                }
            }
            if contents.len() + prefixes.len() >= max_keys {
                truncated = true;
                break;
            }
            match folded {
                Some(p) => {
                    last = Some(p.clone());
                    prefixes.push(p);
                }
                None => {
                    last = Some(key.clone());
                    contents.push(Object {
                        key: Some(key.clone()),
                        size: Some(stored.data.len() as i64),
                        e_tag: Some(ETag::Strong(stored.etag.clone())),
                        last_modified: Some(Timestamp::from(stored.modified)),
                        storage_class: Some(ObjectStorageClass::from_static(
                            ObjectStorageClass::STANDARD,
                        )),
                        ..Default::default()
                    });
                }
            }
        }
        let prefixes = prefixes
            .into_iter()
            .map(|p| CommonPrefix { prefix: Some(p) })
            .collect();
        Ok((contents, prefixes, truncated, last))
    }
}

#[async_trait::async_trait]
impl S3 for MemS3 {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.buckets
            .write()
            .unwrap()
            .entry(req.input.bucket)
            .or_default();
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        if !self.buckets.read().unwrap().contains_key(&req.input.bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        _req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let stored = self.object(&input.bucket, &input.key)?;
        let total = stored.data.len() as u64;
        let (body, content_range) = match input.range {
            None => (stored.data.clone(), None),
            Some(range) => {
                let r = range
                    .check(total)
                    .map_err(|_| s3_error!(InvalidRange, "bytes */{total}"))?;
                (
                    stored.data.slice(r.start as usize..r.end as usize),
                    Some(format!("bytes {}-{}/{total}", r.start, r.end - 1)),
                )
            }
        };
        self.served.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(S3Response::new(GetObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(body.len() as i64),
            content_range,
            e_tag: Some(ETag::Strong(stored.etag)),
            last_modified: Some(Timestamp::from(stored.modified)),
            content_type: Some("application/octet-stream".parse().unwrap()),
            body: Some(StreamingBlob::from(s3s::Body::from(body))),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let stored = self.object(&req.input.bucket, &req.input.key)?;
        Ok(S3Response::new(HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(stored.data.len() as i64),
            e_tag: Some(ETag::Strong(stored.etag)),
            last_modified: Some(Timestamp::from(stored.modified)),
            content_type: Some("application/octet-stream".parse().unwrap()),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let input = req.input;
        if !self.buckets.read().unwrap().contains_key(&input.bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        let mut data = BytesMut::with_capacity(input.content_length.unwrap_or(0).max(0) as usize);
        if let Some(mut body) = input.body {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
                data.extend_from_slice(&chunk);
            }
        }
        let data = data.freeze();
        let etag = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&data));
        self.buckets
            .write()
            .unwrap()
            .get_mut(&input.bucket)
            .ok_or_else(|| s3_error!(NoSuchBucket))?
            .insert(
                input.key,
                Stored {
                    data,
                    etag: etag.clone(),
                    modified: SystemTime::now(),
                },
            );
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let after = input
            .continuation_token
            .clone()
            .or(input.start_after.clone());
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let (contents, prefixes, truncated, last) = self.list(
            &input.bucket,
            &prefix,
            input.delimiter.as_deref(),
            after.as_deref(),
            max_keys,
        )?;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            max_keys: Some(max_keys as i32),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            continuation_token: input.continuation_token,
            is_truncated: Some(truncated),
            next_continuation_token: if truncated { last } else { None },
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            delimiter: input.delimiter,
            start_after: input.start_after,
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let (contents, prefixes, truncated, last) = self.list(
            &input.bucket,
            &prefix,
            input.delimiter.as_deref(),
            input.marker.as_deref(),
            max_keys,
        )?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            marker: input.marker,
            max_keys: Some(max_keys as i32),
            is_truncated: Some(truncated),
            next_marker: if truncated { last } else { None },
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            delimiter: input.delimiter,
            ..Default::default()
        }))
    }
}

/// The server: its own multi-threaded tokio runtime; shut down on drop.
pub struct Server {
    pub port: u16,
    s3: MemS3,
    served: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with_threads(2)
    }

    /// A server on `threads` tokio worker threads (a many-core scaling run needs more than 2).
    pub fn start_with_threads(threads: usize) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("s3bench-server")
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let s3 = MemS3::default();
        let served = s3.served.clone();
        let mut builder = s3s::service::S3ServiceBuilder::new(s3.clone());
        builder.set_auth(s3s::auth::SimpleAuth::from_single(KEY, SECRET));
        let service = builder.build();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Server {
            port,
            s3,
            served,
            runtime: Some(runtime),
        }
    }

    /// Stores `data` as `key` in the bench bucket (created if missing) without a PUT, so that
    /// objects of a generated scene share one buffer under several keys; returns the ETag the
    /// server will send, quotes included. Only benches/job.rs generates its data in memory.
    #[allow(dead_code)]
    pub fn insert(&self, key: &str, data: Bytes) -> String {
        let etag = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&data));
        self.s3
            .buckets
            .write()
            .unwrap()
            .entry(BUCKET.to_string())
            .or_default()
            .insert(
                key.to_string(),
                Stored {
                    data,
                    etag: etag.clone(),
                    modified: SystemTime::now(),
                },
            );
        format!("\"{etag}\"")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GetObject body bytes served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
