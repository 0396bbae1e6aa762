//! Cold sequential reads from S3 (issue 4): mount_vfs against the raw S3 clients and the peer
//! FUSE clients (s3fs, rclone), all in one run against one fast in-process S3 server.
//!
//! - Server: a minimal `s3s` implementation (GetObject with Range, HeadObject, PutObject,
//!   ListObjects v1/v2, buckets) over in-memory `Bytes` — a ranged GET is one zero-copy slice —
//!   on a multi-threaded tokio runtime, 127.0.0.1 only, SigV4 checked against a fixed key.
//! - Data: two 1 GiB files of xorshift bytes, snapshotted with `mount_vfs snapshot` (manifest
//!   v2023) and uploaded with signed PUTs as `root/Data/{hash}.xxh128`, and again as
//!   `plain/a.bin`, `plain/b.bin` for the peers, which mount the bucket rather than a manifest.
//! - Raw clients (no FUSE): our `S3Store` on glommio shards, and an independent hyper client
//!   signing with `aws-sigv4`; both issue 8 MiB ranged GETs, 4 in flight per reader.
//! - Mounts: mount_vfs (`--shards 1` and `2`, `--memory-limit 4G`, without and with a
//!   `--cache-dir` on local storage, `BENCH_CACHE_DIR`, default /var/tmp; and through a
//!   v2025 manifest of the same files, whose 256 MiB chunks are verified one by one), s3fs,
//!   rclone. Every
//!   measurement is cold: page cache dropped and a fresh mount. One reader reads `a` whole;
//!   four readers read the two halves of `a` and of `b`. 1 MiB reads, O_DIRECT (aligned) and
//!   buffered. Time to first byte: open + first 1 MiB O_DIRECT read on a fresh mount.
//! - Baseline in the same run: a do-nothing FUSE server answering every READ from one buffer.
//!
//! Run: `cargo bench --bench s3_read` (root; /dev/fuse; s3fs and rclone on PATH or they are
//! skipped). Environment: `BENCH_RUNS` (default 3), `BENCH_SIZE_MIB` (default 1024),
//! `BENCH_PEERS=0` to skip the peers, `BENCH_ONLY=TEXT` to keep only the mounts whose name
//! contains TEXT. Writes under /dev/shm/mount_vfs_s3bench and the cache dir.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
mod common;

use common::faults_and_cpu;
use futures::StreamExt;
use mount_vfs::manifest::Hash;
use mount_vfs::store::s3::{CredentialSource, S3Config, S3Tuning};
use mount_vfs::store::{S3Store, S3Target};
use mount_vfs_executors::{HugepageMode, ShardConfig, Shards};
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

const MIB: usize = 1 << 20;
const READ_SIZE: usize = MIB;
const RAW_GET: usize = 8 * MIB;
const RAW_IN_FLIGHT: usize = 4;
const BIN: &str = env!("CARGO_BIN_EXE_mount_vfs");
const BUCKET: &str = "bench";
const KEY: &str = "benchkey";
const SECRET: &str = "benchsecret";
const REGION: &str = "us-east-1";
const BASE: &str = "/dev/shm/mount_vfs_s3bench";
/// Longest any one measurement (mount + read) may take before its mounts are lazily unmounted,
/// which makes a hung read fail instead of hanging the bench.
const STEP_LIMIT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// The S3 server
// ---------------------------------------------------------------------------------------------

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
struct Server {
    port: u16,
    served: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    fn start() -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
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
        let mut builder = s3s::service::S3ServiceBuilder::new(s3);
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
            served,
            runtime: Some(runtime),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GetObject body bytes served so far.
    fn served(&self) -> u64 {
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

// ---------------------------------------------------------------------------------------------
// Mounts, and the guard that bounds them in time
// ---------------------------------------------------------------------------------------------

/// Mountpoints currently mounted by this process, and the deadline of the current step; a
/// watchdog thread lazily unmounts them all when a step overruns.
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static DEADLINE: Mutex<Option<Instant>> = Mutex::new(None);

fn step_deadline() {
    *DEADLINE.lock().unwrap() = Some(Instant::now() + STEP_LIMIT);
}

fn start_watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(1));
        let overrun = DEADLINE.lock().unwrap().is_some_and(|d| Instant::now() > d);
        if overrun {
            eprintln!("# watchdog: a step ran past {STEP_LIMIT:?}; unmounting everything");
            for mnt in ACTIVE.lock().unwrap().iter() {
                lazy_umount(mnt);
            }
            *DEADLINE.lock().unwrap() = None;
        }
    });
}

fn lazy_umount(mnt: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
}

fn is_mounted(mnt: &Path) -> bool {
    let target = mnt.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&target)))
        .unwrap_or(false)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    /// `cache`: with `--cache-dir` (emptied before every mount, so still cold). `chunked`: the
    /// same files through the v2025 manifest (256 MiB chunk objects) instead of v2023.
    MountVfs {
        shards: usize,
        cache: bool,
        chunked: bool,
    },
    S3fs,
    Rclone,
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
            } => format!(
                "mount_vfs --shards {shards}{}{}",
                if cache { " --cache-dir" } else { "" },
                if chunked { " v2025" } else { "" }
            ),
            Contender::S3fs => "s3fs".into(),
            Contender::Rclone => "rclone".into(),
        }
    }

    fn is_peer(self) -> bool {
        !matches!(self, Contender::MountVfs { .. })
    }
}

/// One mounted filesystem: the daemon (a child in the foreground), stopped and unmounted on
/// drop, also when the bench panics.
struct Mount {
    child: Child,
    mnt: PathBuf,
    /// Where `a.bin` and `b.bin` appear.
    files: PathBuf,
}

impl Mount {
    fn start(contender: Contender, server: &Server, env: &Env) -> Result<Mount, String> {
        if let Contender::MountVfs { cache: true, .. } = contender {
            let _ = fs::remove_dir_all(&env.cache_dir);
        }
        Mount::start_keeping_cache(contender, server, env)
    }

    /// [`start`](Self::start), leaving mount_vfs's disk cache as the last mount left it.
    fn start_keeping_cache(
        contender: Contender,
        server: &Server,
        env: &Env,
    ) -> Result<Mount, String> {
        let mnt = env.base.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        if is_mounted(&mnt) {
            lazy_umount(&mnt);
        }
        let endpoint = server.endpoint();
        let mut command = match contender {
            Contender::MountVfs {
                shards,
                cache,
                chunked,
            } => {
                let mut c = Command::new(BIN);
                if cache {
                    c.arg("--cache-dir").arg(&env.cache_dir);
                }
                c.arg(if chunked {
                    &env.manifest_v2025
                } else {
                    &env.manifest
                })
                .arg(&mnt)
                .args(["--s3", &format!("s3://{BUCKET}/root")])
                .args(["--endpoint-url", &endpoint])
                .args(["--shards", &shards.to_string(), "--memory-limit", "4G"])
                .env("AWS_ACCESS_KEY_ID", KEY)
                .env("AWS_SECRET_ACCESS_KEY", SECRET)
                .env("AWS_REGION", REGION)
                .env_remove("AWS_PROFILE")
                .env_remove("AWS_ENDPOINT_URL_S3")
                .env_remove("AWS_ENDPOINT_URL");
                c
            }
            Contender::S3fs => {
                let mut c = Command::new("s3fs");
                c.arg(BUCKET).arg(&mnt).arg("-f").arg("-o").arg(format!(
                    "passwd_file={},url={endpoint},use_path_request_style,endpoint={REGION},ro",
                    env.passwd.display()
                ));
                c
            }
            Contender::Rclone => {
                let mut c = Command::new("rclone");
                c.args(["mount", &format!("bench:{BUCKET}")])
                    .arg(&mnt)
                    .args(["--read-only", "--vfs-cache-mode", "off"])
                    .env_remove("AWS_CA_BUNDLE")
                    .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
                    .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
                    .env("RCLONE_CONFIG_BENCH_ENDPOINT", &endpoint)
                    .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", KEY)
                    .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET)
                    .env("RCLONE_CONFIG_BENCH_REGION", REGION)
                    .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
                    .env("RCLONE_CONFIG", env.base.join("rclone.conf"));
                c
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", contender.name()))?;
        ACTIVE.lock().unwrap().push(mnt.clone());
        let mut mount = Mount {
            child,
            files: if contender.is_peer() {
                mnt.join("plain")
            } else {
                mnt.clone()
            },
            mnt,
        };
        // Drain the daemon's output so it never blocks on a full pipe; keep the last lines.
        let tail = Arc::new(Mutex::new(Vec::<String>::new()));
        for pipe in [
            mount
                .child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            mount
                .child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut tail = tail.lock().unwrap();
                    if tail.len() > 20 {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if is_mounted(&mount.mnt) && mount.files.join("a.bin").exists() {
                return Ok(mount);
            }
            if let Ok(Some(status)) = mount.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before mounting: {}",
                    contender.name(),
                    tail.lock().unwrap().join(" | ")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not mount in 60 s: {}",
                    contender.name(),
                    tail.lock().unwrap().join(" | ")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
        ACTIVE.lock().unwrap().retain(|m| m != &self.mnt);
    }
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes that we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn open(path: &Path, direct: bool) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Reads `[start, end)` of `path` in 1 MiB reads into `dest` (at least `end - start` bytes,
/// pre-faulted by the caller); returns the bytes read.
fn read_range(
    path: &Path,
    start: u64,
    end: u64,
    direct: bool,
    dest: &mut [u8],
) -> Result<u64, String> {
    let file = open(path, direct).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut offset = start;
    while offset < end {
        let want = ((end - offset) as usize).min(READ_SIZE);
        let at = (offset - start) as usize;
        let n = file
            .read_at(&mut dest[at..at + want], offset)
            .map_err(|e| format!("read {} at {offset}: {e}", path.display()))?;
        if n == 0 {
            return Err(format!(
                "{}: EOF at {offset}, expected {end}",
                path.display()
            ));
        }
        offset += n as u64;
    }
    Ok(offset - start)
}

/// xxh3-128 of every reader's range of the source files, to check what each contender returned
/// (after its clock stopped): a contender that returns wrong bytes gets a failed run, not a
/// fast one. Filled once in `main`.
static EXPECTED: std::sync::OnceLock<BTreeMap<(&'static str, u64, u64), u128>> =
    std::sync::OnceLock::new();

/// A buffer for `len` bytes with every page already faulted in, so the timed reads of every
/// contender pay the same (no) page-fault cost.
fn prefaulted(len: usize) -> AlignedBuf {
    let mut buffer = AlignedBuf::new(len.next_multiple_of(4096).max(4096));
    for page in buffer.as_mut().chunks_mut(4096) {
        page[0] = 1;
    }
    buffer
}

/// The reader layout shared by every contender: one reader takes `a` whole; four take the two
/// halves of `a` and of `b`. `(file, start, end)`.
fn layout(readers: usize, size: u64) -> Vec<(&'static str, u64, u64)> {
    match readers {
        1 => vec![("a.bin", 0, size)],
        4 => vec![
            ("a.bin", 0, size / 2),
            ("a.bin", size / 2, size),
            ("b.bin", 0, size / 2),
            ("b.bin", size / 2, size),
        ],
        _ => unreachable!(),
    }
}

/// Runs the readers in parallel; returns aggregate bytes per second. With `check`, each reader's
/// bytes are hashed after the clock stopped and compared with the source (the do-nothing FUSE
/// server serves no real content and is not checked).
fn read_files(
    dir: &Path,
    readers: usize,
    size: u64,
    direct: bool,
    check: bool,
) -> Result<f64, String> {
    let ranges = layout(readers, size);
    let buffers: Vec<AlignedBuf> = ranges
        .iter()
        .map(|(_, start, end)| prefaulted((end - start) as usize))
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = ranges
        .iter()
        .zip(buffers)
        .map(|(&(name, start, end), buffer)| {
            let path = dir.join(name);
            let mut buffer = SendBuf(buffer);
            std::thread::spawn(move || {
                let read = read_range(&path, start, end, direct, buffer.0.as_mut());
                read.map(|n| (n, buffer))
            })
        })
        .collect();
    let mut total = 0;
    let mut results = Vec::new();
    for t in threads {
        let (n, buffer) = t.join().map_err(|_| "reader panicked".to_string())??;
        total += n;
        results.push(buffer);
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    if check {
        let expected = EXPECTED.get().expect("expected digests");
        for ((name, start, end), mut buffer) in ranges.into_iter().zip(results) {
            let got = xxhash_rust::xxh3::xxh3_128(&buffer.0.as_mut()[..(end - start) as usize]);
            if expected.get(&(name, start, end)) != Some(&got) {
                return Err(format!(
                    "{name} [{start}, {end}) through {}: wrong bytes",
                    dir.display()
                ));
            }
        }
    }
    Ok(rate)
}

/// An [`AlignedBuf`] moved to a reader thread and back; only one thread touches it at a time.
struct SendBuf(AlignedBuf);

// SAFETY: the buffer is owned (no aliasing); ownership moves to the reader thread and back.
unsafe impl Send for SendBuf {}

/// Open + first 1 MiB (O_DIRECT) of `a.bin`: seconds.
fn first_byte(dir: &Path) -> Result<f64, String> {
    let mut buffer = prefaulted(READ_SIZE);
    let started = Instant::now();
    read_range(
        &dir.join("a.bin"),
        0,
        READ_SIZE as u64,
        true,
        buffer.as_mut(),
    )?;
    Ok(started.elapsed().as_secs_f64())
}

/// Writes dirty pages back first (a disk-cache file written by the previous mount would stay
/// in memory otherwise), then drops the page cache, and checks that it worked: a "cold" row
/// measured on a warm cache would flatter whoever reads from disk. Aborts the run otherwise.
fn drop_caches() {
    let cached = || -> u64 {
        fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Cached:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .map_or(u64::MAX, |kib: u64| kib << 10)
    };
    let before = cached();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "3") {
        panic!("cannot drop the page cache ({e}): cold rows would be warm; run as root");
    }
    let after = cached();
    // What stays cached after a drop is what cannot be dropped (tmpfs, /dev/shm, mapped pages):
    // it must not have grown, and the drop must have freed what it could.
    assert!(
        after < before || after < 512 << 20,
        "the page cache did not shrink ({} MiB before, {} MiB after drop_caches): cold rows \
         would be warm",
        before >> 20,
        after >> 20
    );
}

// ---------------------------------------------------------------------------------------------
// Raw clients
// ---------------------------------------------------------------------------------------------

fn s3_config(endpoint: &str, root: &str) -> S3Config {
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
        &ShardConfig {
            shards,
            io_memory_per_shard: io_memory,
            hugepages: HugepageMode::Off,
            spin_before_park: std::time::Duration::ZERO,
        },
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

/// Uploads `(key under root, bytes)` with our store's signed PUT.
fn upload(endpoint: &str, root: &str, objects: Vec<(String, PathBuf)>) {
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
fn raw_s3store(
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

/// Signs a GET with `aws-sigv4` for the hyper client.
fn sign_get(url: &str, range: &str) -> Vec<(&'static str, String)> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
        SigningSettings, UriPathNormalizationMode,
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
    let request = SignableRequest::new(
        "GET",
        url,
        [("range", range)].into_iter(),
        SignableBody::UnsignedPayload,
    )
    .unwrap();
    let (instructions, _) = sign(request, &params).unwrap().into_parts();
    instructions
        .into_parts()
        .0
        .into_iter()
        .map(|h| (h.name(), h.value().to_string()))
        .collect()
}

/// An independent baseline: hyper's pooled HTTP/1.1 client on a 2-thread tokio runtime,
/// `RAW_IN_FLIGHT` 8 MiB ranged GETs in flight per stream, bodies counted as they arrive.
fn raw_hyper(endpoint: &str, keys: [String; 2], readers: usize, size: u64) -> f64 {
    use http_body_util::BodyExt;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(32)
            .build_http();
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
                                let range = format!("bytes={o}-{}", o + len - 1);
                                let mut request = http::Request::get(&url).header("range", &range);
                                for (name, value) in sign_get(&url, &range) {
                                    request = request.header(name, value);
                                }
                                let response = client
                                    .request(request.body(http_body_util::Empty::new()).unwrap())
                                    .await
                                    .expect("hyper GET");
                                assert_eq!(response.status(), 206, "hyper GET {url} {range}");
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

// ---------------------------------------------------------------------------------------------
// The do-nothing FUSE baseline
// ---------------------------------------------------------------------------------------------

// (NullFs lives in benches/common.)

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

struct Env {
    base: PathBuf,
    /// mount_vfs's `--cache-dir`: local storage, not /dev/shm, as on a render node.
    cache_dir: PathBuf,
    manifest: PathBuf,
    /// The same files as a v2025-12-04-beta manifest: 256 MiB chunk objects.
    manifest_v2025: PathBuf,
    passwd: PathBuf,
}

/// One cold read of the reader layout through `mount`, added to `samples`.
fn measure(
    mount: &Mount,
    server: &Server,
    readers: usize,
    size: u64,
    direct: bool,
    samples: &mut Samples,
) {
    let gib = (1u64 << 30) as f64;
    let (f0, c0) = faults_and_cpu(mount.pid());
    drop_caches();
    let s0 = server.served();
    match read_files(&mount.files, readers, size, direct, true) {
        Ok(rate) => {
            let (f1, c1) = faults_and_cpu(mount.pid());
            let read_gib = (size * if readers == 1 { 1 } else { 2 }) as f64 / gib;
            samples.rates.push(rate);
            samples.faults_per_gib.push((f1 - f0) as f64 / read_gib);
            samples.cpu_per_gib.push((c1 - c0) / read_gib);
            samples
                .fetched_per_read
                .push((server.served() - s0) as f64 / (read_gib * gib));
        }
        Err(e) => samples.errors.push(e),
    }
}

/// One measured configuration: all its runs.
#[derive(Default)]
struct Samples {
    rates: Vec<f64>,
    faults_per_gib: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    /// Bytes fetched from S3 per byte read through the mount.
    fetched_per_read: Vec<f64>,
    errors: Vec<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64* bytes: incompressible enough, generated at memory speed.
fn fill(seed: u64, data: &mut [u8]) {
    let mut x = seed;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_usize("BENCH_RUNS", 3);
    let size_mib = env_usize("BENCH_SIZE_MIB", 1024);
    let size = (size_mib * MIB) as u64;
    let with_peers = std::env::var("BENCH_PEERS").map_or(true, |v| v != "0");
    let base = PathBuf::from(BASE);
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    start_watchdog();

    // Data: two files, a manifest and its CAS (all in /dev/shm).
    let setup = Instant::now();
    let tree = base.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let mut hashes = Vec::new();
    let mut expected = BTreeMap::new();
    {
        let mut data = vec![0u8; size as usize];
        for (seed, name) in [
            (0x9E37_79B9_7F4A_7C15u64, "a.bin"),
            (0xD1B5_4A32_D192_ED03, "b.bin"),
        ] {
            fill(seed, &mut data);
            hashes.push(Hash::of(&data));
            fs::write(tree.join(name), &data).unwrap();
            for readers in [1, 4] {
                for (file, start, end) in layout(readers, size) {
                    if file == name {
                        let digest =
                            xxhash_rust::xxh3::xxh3_128(&data[start as usize..end as usize]);
                        expected.insert((file, start, end), digest);
                    }
                }
            }
        }
    }
    EXPECTED.set(expected).expect("set once");
    let hashes = [hashes[0], hashes[1]];
    // An empty file between them gives b.bin inode 4: with --shards 2 the two big files are
    // then owned by different shards (inodes 2 and 3 would share shard 0), as most files of a
    // real job would be spread over the shards.
    fs::write(tree.join("a.pad"), b"").unwrap();
    let cas = base.join("cas");
    let manifest = base.join("bench.manifest");
    let manifest_v2025 = base.join("bench-v2025.manifest");
    for (output, format) in [
        (&manifest, "2023-03-03"),
        (&manifest_v2025, "2025-12-04-beta"),
    ] {
        let status = Command::new(BIN)
            .arg("snapshot")
            .arg(&tree)
            .arg("--cas")
            .arg(&cas)
            .arg("--output")
            .arg(output)
            .args(["--format", format])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount_vfs snapshot --format {format} failed"
        );
    }
    let passwd = base.join("s3fs.passwd");
    fs::write(&passwd, format!("{KEY}:{SECRET}\n")).unwrap();
    fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let env = Env {
        base: base.clone(),
        cache_dir: std::env::var_os("BENCH_CACHE_DIR").map_or_else(
            || PathBuf::from("/var/tmp/mount_vfs_s3bench_cache"),
            PathBuf::from,
        ),
        manifest,
        manifest_v2025,
        passwd,
    };

    let server = Server::start();
    let endpoint = server.endpoint();
    {
        // Create the bucket with an (unsigned-payload) signed request through hyper.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let url = format!("{endpoint}/{BUCKET}");
            let mut request = http::Request::put(&url);
            for (name, value) in sign_put_empty(&url) {
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
    let cas_objects: Vec<(String, PathBuf)> = fs::read_dir(cas.join("Data"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                format!("Data/{}", e.file_name().to_string_lossy()),
                e.path(),
            )
        })
        .collect();
    // Two whole-file objects (v2023), the 256 MiB chunks of the v2025 manifest, the empty object.
    let chunks = 2 * size.div_ceil(256 << 20) as usize;
    assert_eq!(cas_objects.len(), 3 + chunks, "unexpected CAS objects");
    upload(&endpoint, "root", cas_objects);
    upload(
        &endpoint,
        "plain",
        vec![
            ("a.bin".into(), tree.join("a.bin")),
            ("b.bin".into(), tree.join("b.bin")),
        ],
    );
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_dir_all(&cas);
    println!(
        "# s3_read: 2 x {size_mib} MiB objects, in-memory s3s server on 127.0.0.1:{} (SigV4), setup {:.1}s, median of {runs} cold runs",
        server.port,
        setup.elapsed().as_secs_f64()
    );
    let host = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# machine: {} CPUs, {host}, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );

    let mut contenders = vec![];
    for (cache, chunked) in [(false, false), (true, false), (false, true)] {
        for shards in [1, 2] {
            contenders.push(Contender::MountVfs {
                shards,
                cache,
                chunked,
            });
        }
    }
    for (peer, bin) in [(Contender::S3fs, "s3fs"), (Contender::Rclone, "rclone")] {
        let present = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !with_peers {
            continue;
        }
        if present {
            contenders.push(peer);
        } else {
            println!("# {bin} not installed: skipped (apt-get install -y s3fs rclone)");
        }
    }

    if let Ok(only) = std::env::var("BENCH_ONLY") {
        contenders.retain(|c| c.name().contains(&only));
    }

    // The do-nothing FUSE ceiling, in this run.
    let null_mnt = base.join("null_mnt");
    let null = common::mount_null(&null_mnt, size, &["a.bin", "b.bin"]);
    let mut null_rates: BTreeMap<(bool, usize), Vec<f64>> = BTreeMap::new();
    for _ in 0..runs {
        for direct in [true, false] {
            for readers in [1, 4] {
                step_deadline();
                if let Ok(rate) = read_files(&null_mnt, readers, size, direct, false) {
                    null_rates.entry((direct, readers)).or_default().push(rate);
                }
                drop_caches();
            }
        }
    }
    drop(null);

    let target = S3Target::start(&s3_config(&endpoint, "root")).unwrap();
    assert_eq!(target.probe().unwrap(), None);
    let plain_keys = ["plain/a.bin".to_string(), "plain/b.bin".to_string()];

    // Raw: (client, readers) -> rates. Mounts: (contender, direct, readers) -> samples.
    let mut raw: BTreeMap<(String, usize), Vec<f64>> = BTreeMap::new();
    let mut mounts: BTreeMap<(String, bool, usize), Samples> = BTreeMap::new();
    let mut ttfb: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ttfb_fetched: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in 0..runs {
        eprintln!("# run {}/{runs}", run + 1);
        for readers in [1, 4] {
            step_deadline();
            for shards in [1, 2] {
                let rate = raw_s3store(&target, hashes, readers, size, shards);
                raw.entry((format!("S3Store glommio, {shards} shard(s)"), readers))
                    .or_default()
                    .push(rate);
            }
            let rate = raw_hyper(&endpoint, plain_keys.clone(), readers, size);
            raw.entry(("hyper + aws-sigv4".into(), readers))
                .or_default()
                .push(rate);
        }
        for &contender in &contenders {
            step_deadline();
            match Mount::start(contender, &server, &env) {
                Ok(mount) => {
                    drop_caches();
                    let s0 = server.served();
                    match first_byte(&mount.files) {
                        Ok(t) => {
                            ttfb.entry(contender.name()).or_default().push(t);
                            ttfb_fetched
                                .entry(contender.name())
                                .or_default()
                                .push((server.served() - s0) as f64);
                        }
                        Err(e) => eprintln!("# {} TTFB: {e}", contender.name()),
                    }
                }
                Err(e) => eprintln!("# {e}"),
            }
            for direct in [true, false] {
                for readers in [1, 4] {
                    step_deadline();
                    let samples = mounts
                        .entry((contender.name(), direct, readers))
                        .or_default();
                    let mount = match Mount::start(contender, &server, &env) {
                        Ok(m) => m,
                        Err(e) => {
                            samples.errors.push(e);
                            continue;
                        }
                    };
                    measure(&mount, &server, readers, size, direct, samples);
                    drop(mount);
                    if let Contender::MountVfs { cache: true, .. } = contender {
                        // The same objects again on a fresh mount, page cache dropped: what
                        // the disk cache is for (a later task reading the same inputs).
                        let name = format!("{} (2nd mount)", contender.name());
                        let samples = mounts.entry((name, direct, readers)).or_default();
                        match Mount::start_keeping_cache(contender, &server, &env) {
                            Ok(mount) => {
                                measure(&mount, &server, readers, size, direct, samples);
                            }
                            Err(e) => samples.errors.push(e),
                        }
                    }
                }
            }
        }
    }
    *DEADLINE.lock().unwrap() = None;
    drop(server);
    let _ = fs::remove_dir_all(&env.cache_dir);

    // Report.
    let best_raw = |readers: usize| {
        raw.iter()
            .filter(|((_, r), _)| *r == readers)
            .filter_map(|(_, v)| median(v.clone()))
            .fold(0.0f64, f64::max)
    };
    let best_peer = |direct: bool, readers: usize| {
        mounts
            .iter()
            .filter(|((c, d, r), _)| {
                (c == "s3fs" || c == "rclone") && *d == direct && *r == readers
            })
            .filter_map(|(_, s)| median(s.rates.clone()))
            .fold(0.0f64, f64::max)
    };
    let ratio = |x: f64, of: f64| {
        if of > 0.0 {
            format!("{:.2}x", x / of)
        } else {
            "-".into()
        }
    };
    println!();
    println!(
        "# settings: mount_vfs --memory-limit 4G (--shards as named); s3fs and rclone with \
         their defaults and caches off (rclone --vfs-cache-mode off), so a '2nd mount' row (a \
         warm disk cache) has no peer ratio: the peers have no cache to be warm"
    );
    println!(
        "{:<34} {:<9} {:>7} {:>8} {:>8} {:>9}  ok/tried  runs (GB/s)",
        "contender", "mode", "readers", "GB/s", "/raw", "/peer"
    );
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{:.2}", r / 1e9))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for ((direct, readers), v) in &null_rates {
        let m = median(v.clone()).unwrap_or(0.0);
        let mode = if *direct { "O_DIRECT" } else { "buffered" };
        println!(
            "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {}",
            "null FUSE (ceiling, no I/O)",
            mode,
            readers,
            m / 1e9,
            "",
            "",
            fmt_runs(v)
        );
        println!(
            "json: {{\"contender\":\"null FUSE\",\"mode\":\"{mode}\",\"readers\":{readers},\"gbps\":{:.4}}}",
            m / 1e9
        );
    }
    for ((client, readers), v) in &raw {
        let m = median(v.clone()).unwrap_or(0.0);
        println!(
            "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {}",
            format!("raw {client}"),
            "8M GETs",
            readers,
            m / 1e9,
            ratio(m, best_raw(*readers)),
            "",
            fmt_runs(v)
        );
        println!(
            "json: {{\"contender\":\"raw {client}\",\"mode\":\"8MiB x{RAW_IN_FLIGHT}\",\"readers\":{readers},\"gbps\":{:.4}}}",
            m / 1e9
        );
    }
    let rows = contenders.iter().flat_map(|&c| {
        let second = matches!(c, Contender::MountVfs { cache: true, .. })
            .then(|| (format!("{} (2nd mount)", c.name()), false));
        std::iter::once((c.name(), c.is_peer())).chain(second)
    });
    for (name, is_peer) in rows {
        for direct in [true, false] {
            for readers in [1, 4] {
                let Some(s) = mounts.get(&(name.clone(), direct, readers)) else {
                    continue;
                };
                let mode = if direct { "O_DIRECT" } else { "buffered" };
                let Some(m) = median(s.rates.clone()) else {
                    println!(
                        "{:<34} {:<9} {:>7} failed: {}",
                        name,
                        mode,
                        readers,
                        s.errors.first().cloned().unwrap_or_default()
                    );
                    continue;
                };
                let fetched = median(s.fetched_per_read.clone()).unwrap_or(0.0);
                let tried = s.rates.len() + s.errors.len();
                let ok = format!("{}/{tried}", s.rates.len());
                // Like with like: a second mount reads a warm disk cache, the peers read S3.
                let second_mount = name.ends_with("(2nd mount)");
                let peer = if second_mount {
                    0.0
                } else {
                    best_peer(direct, readers)
                };
                let extra = if is_peer {
                    format!("  S3 bytes/byte read {fetched:.2}")
                } else {
                    format!(
                        "  S3 bytes/byte read {fetched:.2}, faults/GiB {:.0}, CPU s/GiB {:.2}",
                        median(s.faults_per_gib.clone()).unwrap_or(0.0),
                        median(s.cpu_per_gib.clone()).unwrap_or(0.0)
                    )
                };
                println!(
                    "{:<34} {:<9} {:>7} {:>8.2} {:>8} {:>9}  {ok:>8}  {}{extra}",
                    name,
                    mode,
                    readers,
                    m / 1e9,
                    ratio(m, best_raw(readers)),
                    ratio(m, peer),
                    fmt_runs(&s.rates)
                );
                println!(
                    "json: {{\"contender\":\"{}\",\"mode\":\"{mode}\",\"readers\":{readers},\"gbps\":{:.4},\"ratio_raw\":{},\"ratio_peer\":{},\"s3_bytes_per_byte\":{fetched:.3},\"faults_per_gib\":{:.0},\"cpu_s_per_gib\":{:.3},\"errors\":{}}}",
                    name,
                    m / 1e9,
                    json_ratio(m, best_raw(readers)),
                    json_ratio(m, peer),
                    median(s.faults_per_gib.clone()).unwrap_or(0.0),
                    median(s.cpu_per_gib.clone()).unwrap_or(0.0),
                    s.errors.len()
                );
            }
        }
    }
    println!();
    for &contender in &contenders {
        let v = ttfb.get(&contender.name()).cloned().unwrap_or_default();
        if let Some(m) = median(v.clone()) {
            let fetched = median(
                ttfb_fetched
                    .get(&contender.name())
                    .cloned()
                    .unwrap_or_default(),
            )
            .unwrap_or(0.0);
            println!(
                "TTFB {:<29} {:>8.1} ms  ({:.0} MiB fetched from S3 by then)  runs: {}",
                contender.name(),
                m * 1e3,
                fetched / MIB as f64,
                v.iter()
                    .map(|t| format!("{:.1}", t * 1e3))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            println!(
                "json: {{\"contender\":\"{}\",\"ttfb_ms\":{:.2},\"ttfb_fetched_mib\":{:.1}}}",
                contender.name(),
                m * 1e3,
                fetched / MIB as f64
            );
        }
    }
    let _ = fs::remove_dir_all(&base);
}

/// `x / of` for JSON, `null` without a reference.
fn json_ratio(x: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.4}", x / of)
    } else {
        "null".into()
    }
}

/// Signs `PUT url` with an empty payload (CreateBucket).
fn sign_put_empty(url: &str) -> Vec<(&'static str, String)> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
    };
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(KEY, SECRET, None, None, "bench").into();
    let mut settings = SigningSettings::default();
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
    let request =
        SignableRequest::new("PUT", url, std::iter::empty(), SignableBody::Bytes(b"")).unwrap();
    let (instructions, _) = sign(request, &params).unwrap().into_parts();
    instructions
        .into_parts()
        .0
        .into_iter()
        .map(|h| (h.name(), h.value().to_string()))
        .collect()
}
