//! `--metrics-addr HOST:PORT`: the Prometheus/OpenMetrics text endpoint (`GET /metrics`).
//!
//! It runs on its own control thread, never on a shard: a scrape reads the shards' relaxed
//! atomic counters and pool statistics and the dispatch point's per-operation counts, encodes
//! them with `prometheus-client`, and answers. Nothing on the request path knows it exists.
//! `docs/metrics.md` lists every metric.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use mount_vfs_executors::{PoolStats, PoolStatsSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::fs::shard::{Histogram, ShardCounters};
use crate::fs::{Op, OpCounters};
use crate::store::{CacheUsage, RetryCause};

/// What a scrape reads.
#[derive(Debug, Clone)]
pub struct MetricSources {
    pub shards: Vec<Arc<ShardCounters>>,
    pub pools: Vec<Arc<PoolStats>>,
    pub ops: Arc<OpCounters>,
    /// The disk cache's janitor counts, with `--cache-dir`.
    pub disk_cache: Option<CacheUsage>,
}

/// The counters of every shard as one compact JSON object, built on request from relaxed
/// loads, one row of numbers per shard under one list of names (so that even hundreds of shards
/// fit the 64 KiB an extended attribute may hold): `{"pid":..,"fields":["opens",..,
/// "store_reads_in_flight","pool_in_use_bytes","pool_capacity_bytes"],"shards":[[..],..]}`.
/// `mount_vfs stats` reads it through an extended attribute of the mount's root
/// (`fs::STATS_XATTR`), so it needs no `--metrics-addr`.
pub fn snapshot_json(sources: &MetricSources) -> String {
    let mut fields: Vec<&str> = Vec::new();
    let shards: Vec<Vec<u64>> = sources
        .shards
        .iter()
        .enumerate()
        .map(|(shard, counters)| {
            let snapshot = counters.snapshot();
            let pool = sources.pools.get(shard).map(|p| p.snapshot());
            let row: Vec<(&'static str, u64)> = snapshot
                .fields()
                .map(|(name, _, value)| (name, value))
                .chain([
                    (
                        "store_reads_in_flight",
                        counters.store_reads_in_flight.load(Relaxed),
                    ),
                    (
                        "pool_in_use_bytes",
                        pool.as_ref().map_or(0, |p| p.in_use as u64),
                    ),
                    (
                        "pool_capacity_bytes",
                        pool.as_ref().map_or(0, |p| p.capacity as u64),
                    ),
                ])
                .collect();
            if fields.is_empty() {
                fields = row.iter().map(|&(name, _)| name).collect();
            }
            row.into_iter().map(|(_, value)| value).collect()
        })
        .collect();
    serde_json::json!({ "pid": std::process::id(), "fields": fields, "shards": shards }).to_string()
}

/// The endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Serves `/metrics` on `addr` until the process exits; returns the address it listens on (the
/// port the kernel chose when `addr` asked for port 0).
pub fn serve(addr: SocketAddr, sources: MetricSources) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let mut registry = Registry::with_prefix("mount_vfs");
    registry.register_collector(Box::new(Scrape(sources)));
    std::thread::Builder::new()
        .name("mount_vfs-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &registry) {
                            tracing::debug!("metrics request: {e}");
                        }
                    }
                    // Out of file descriptors, for example: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .map_err(MetricsError::Thread)?;
    tracing::info!("metrics at http://{local}/metrics");
    Ok(local)
}

/// Answers one HTTP/1.x request on `stream` and closes it.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    // A scraper that connects and says nothing, trickles, or never reads must not hold the only
    // metrics thread for long.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let path = loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break (request.method, request.path.map(str::to_owned));
            }
            Ok(httparse::Status::Partial)
                if head.len() < 16 * 1024 && std::time::Instant::now() < deadline =>
            {
                continue
            }
            _ => break (None, None),
        }
    };
    let (status, content_type, body) = match path {
        (Some("GET"), Some(path)) if path == "/metrics" || path.starts_with("/metrics?") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => ("500 Internal Server Error", "text/plain", String::new()),
            }
        }
        (Some(_), Some(_)) => (
            "404 Not Found",
            "text/plain",
            "mount_vfs serves /metrics only\n".into(),
        ),
        _ => ("400 Bad Request", "text/plain", String::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// A pool gauge: name, help, and how to read it from a snapshot.
type PoolGauge = (&'static str, &'static str, fn(&PoolStatsSnapshot) -> i64);

/// A shard latency histogram: name, help, and which one.
type LatencyHistogram = (&'static str, &'static str, fn(&ShardCounters) -> &Histogram);

/// Reads every source at scrape time.
#[derive(Debug)]
struct Scrape(MetricSources);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = &self.0;
        // One row per shard, one column per counter, in the same order for every shard.
        let shards: Vec<Vec<_>> = sources
            .shards
            .iter()
            .map(|c| c.snapshot().fields().collect())
            .collect();
        if let Some(first) = shards.first() {
            for (column, &(name, help, _)) in first.iter().enumerate() {
                let mut metric =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (shard, fields) in shards.iter().enumerate() {
                    let labels = [("shard", shard.to_string())];
                    ConstCounter::new(fields[column].2).encode(metric.encode_family(&labels)?)?;
                }
            }
        }

        let pools: Vec<_> = sources.pools.iter().map(|p| p.snapshot()).collect();
        let gauges: [PoolGauge; 3] = [
            (
                "pool_capacity_bytes",
                "Bytes the shard's buffer pool may hand out.",
                |p| p.capacity as i64,
            ),
            (
                "pool_in_use_bytes",
                "Bytes of the pool held by buffers and reservations.",
                |p| p.in_use as i64,
            ),
            ("pool_high_water_bytes", "Highest pool use seen.", |p| {
                p.high_water as i64
            }),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (shard, pool) in pools.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                ConstGauge::new(value(pool)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "store_reads_in_flight",
            "Store reads (S3 GETs, local CAS reads) started and not finished.",
            None,
            MetricType::Gauge,
        )?;
        for (shard, counters) in sources.shards.iter().enumerate() {
            let labels = [("shard", shard.to_string())];
            ConstGauge::new(counters.store_reads_in_flight.load(Relaxed) as i64)
                .encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "store_retries_by_cause",
            "Store requests sent again after a transient failure, by cause (throttled, \
             server_error, timeout, connection, bad_answer).",
            None,
            MetricType::Counter,
        )?;
        for (shard, counters) in sources.shards.iter().enumerate() {
            for cause in RetryCause::ALL {
                let count = counters.store_retries_by_cause[cause as usize].load(Relaxed);
                let labels = [("shard", shard.to_string()), ("cause", cause.name().into())];
                ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "pool_waits",
            "Pool requests that had to wait for memory.",
            None,
            MetricType::Counter,
        )?;
        for (shard, pool) in pools.iter().enumerate() {
            let labels = [("shard", shard.to_string())];
            ConstCounter::new(pool.waits).encode(metric.encode_family(&labels)?)?;
        }

        if let Some(usage) = &sources.disk_cache {
            let usage = usage.snapshot();
            let mut gauges = vec![(
                "disk_cache_bytes",
                "Bytes of verified files in the disk cache (as of the last sweep, plus commits since).",
                usage.used_bytes,
            )];
            if let Some(limit) = usage.limit_bytes {
                gauges.push(("disk_cache_limit_bytes", "--cache-size.", limit));
            }
            for (name, help, value) in gauges {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value as i64).encode(metric)?;
            }
            for (name, help, value) in [
                (
                    "disk_cache_evicted_files",
                    "Cache files the janitor removed (least recently used first) since the mount started.",
                    usage.evicted_files,
                ),
                (
                    "disk_cache_evicted_bytes",
                    "Bytes of the cache files the janitor removed since the mount started.",
                    usage.evicted_bytes,
                ),
            ] {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(metric)?;
            }
        }

        let histograms: [LatencyHistogram; 3] = [
            (
                "read_latency_seconds",
                "READ requests, from the transport to the shard's reply.",
                |c| &c.read_latency,
            ),
            (
                "open_latency_seconds",
                "OPEN requests, from the transport to the shard's reply.",
                |c| &c.open_latency,
            ),
            (
                "fetch_latency_seconds",
                "Store and disk-cache reads of one block, start to last byte.",
                |c| &c.fetch_latency,
            ),
        ];
        for (name, help, histogram) in histograms {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (shard, counters) in sources.shards.iter().enumerate() {
                let (sum, count, buckets) = histogram(counters).buckets();
                let labels = [("shard", shard.to_string())];
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "requests",
            "Requests received, by operation.",
            None,
            MetricType::Counter,
        )?;
        for op in Op::ALL {
            let labels = [("op", op.name())];
            let requests = ConstCounter::new(sources.ops.requests(op));
            requests.encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "request_failures",
            "Requests answered with an error, by operation and errno.",
            None,
            MetricType::Counter,
        )?;
        for op in Op::ALL {
            for (error, count) in sources.ops.failures(op) {
                // Several reasons share an errno (EIO): the reason keeps the series apart.
                let labels = [
                    ("op", op.name()),
                    ("errno", error.errno_name()),
                    ("reason", error.reason()),
                ];
                ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
