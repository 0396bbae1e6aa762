//! Starting, addressing and stopping the shards.

use std::cell::Cell;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use glommio::{CpuLocation, CpuSet, LocalExecutorBuilder, Placement, PoolPlacement};
use tracing::{error, info, warn};

use crate::alloc::{self, ArenaOutcome, Backing, HugepageMode, MemoryKind, HUGE_PAGE, PAGE};
use crate::pool::{ArenaInfo, BufferPool, PoolStats};
use crate::probe;
use crate::topology::shard_cpu_order;

/// Smallest arena we accept: one huge page (smaller arenas cannot be hugepage-backed).
pub const MIN_IO_MEMORY: usize = HUGE_PAGE;
/// Largest arena: the kernel registers at most 1 GiB per io_uring fixed buffer (verified on
/// 6.18), and glommio registers the whole arena as one buffer.
pub const MAX_IO_MEMORY: usize = 1 << 30;

/// How to start the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardConfig {
    /// Number of shards, at most the number of CPUs this process may run on.
    pub shards: usize,
    /// Bytes of registered I/O arena per shard, `MIN_IO_MEMORY..=MAX_IO_MEMORY`. A power of two
    /// wastes nothing: the largest single buffer is then half of it.
    pub io_memory_per_shard: usize,
    /// How the arenas are backed.
    pub hugepages: HugepageMode,
    /// How long an idle shard keeps polling before it sleeps. Requests arrive from other threads;
    /// a shard that is asleep must be woken through an eventfd, which costs a context switch
    /// per request at the start of every burst.
    pub spin_before_park: std::time::Duration,
}

impl ShardConfig {
    /// `shards` shards of `io_memory_per_shard` each, on normal pages, sleeping as soon as they
    /// are idle: for tools and tests that want neither hugepage set-up nor idle spinning.
    pub fn plain(shards: usize, io_memory_per_shard: usize) -> ShardConfig {
        ShardConfig {
            shards,
            io_memory_per_shard,
            hugepages: HugepageMode::Off,
            spin_before_park: Duration::ZERO,
        }
    }
}

/// Why [`Shards::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A [`ShardConfig`] field is out of range.
    #[error("invalid shard configuration: {0}")]
    Config(String),
    /// More shards than usable CPUs (see `topology` for why this is refused).
    #[error("{requested} shards requested but this process may run on only {usable} CPUs")]
    TooManyShards {
        /// `ShardConfig::shards`.
        requested: usize,
        /// Online CPUs in this process's affinity mask.
        usable: usize,
    },
    /// The CPU topology could not be read.
    #[error("cannot read the CPU topology: {0}")]
    Topology(String),
    /// One or more shards failed; every other shard has been stopped.
    #[error("{} shard(s) failed to start: {}", .0.len(), list(.0))]
    Shards(Vec<ShardFailure>),
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One shard's start-up failure.
#[derive(Debug, thiserror::Error)]
#[error("shard {shard} (cpu {cpu}): {cause}")]
pub struct ShardFailure {
    /// Shard index.
    pub shard: usize,
    /// CPU it was to be pinned to.
    pub cpu: usize,
    /// What went wrong.
    pub cause: ShardFailureCause,
}

/// What went wrong for one shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardFailureCause {
    /// The OS thread could not be created.
    #[error("cannot spawn its thread: {0}")]
    Spawn(std::io::Error),
    /// glommio could not build the executor (pinning, io_uring set-up, memlock).
    #[error("cannot build its executor: {0}")]
    Executor(String),
    /// `HugepageMode::Require` and the arena is not on explicit hugepages.
    #[error("hugepages required but the arena is {kind}: {detail}")]
    HugepagesUnavailable {
        /// What backs the arena instead.
        kind: MemoryKind,
        /// Why (errno, missing hook).
        detail: String,
    },
    /// The thread panicked during start-up.
    #[error("panicked during start-up: {0}")]
    Panicked(String),
}

/// Shards whose body panicked, found by [`Shards::shutdown`].
#[derive(Debug, thiserror::Error)]
#[error("shard(s) panicked: {}", list_panics(.panicked))]
pub struct ShutdownError {
    /// (shard, panic message)
    pub panicked: Vec<(usize, String)>,
}

fn list_panics(p: &[(usize, String)]) -> String {
    p.iter()
        .map(|(s, m)| format!("shard {s}: {m}"))
        .collect::<Vec<_>>()
        .join("; ")
}

enum Envelope<M> {
    Msg(M),
    Close,
}

/// Sends messages to one shard's [`Mailbox`] from any thread (fuser workers, other shards).
/// Never blocks: the mailbox is unbounded (see the crate docs for why).
pub struct ShardSender<M> {
    tx: flume::Sender<Envelope<M>>,
    /// Set by shutdown, so late senders get their message back instead of losing it.
    closed: Arc<AtomicBool>,
    shard: usize,
}

impl<M> Clone for ShardSender<M> {
    fn clone(&self) -> Self {
        ShardSender {
            tx: self.tx.clone(),
            closed: self.closed.clone(),
            shard: self.shard,
        }
    }
}

impl<M> std::fmt::Debug for ShardSender<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSender")
            .field("shard", &self.shard)
            .finish()
    }
}

/// The message could not be delivered: the shard is shut down or its thread has died.
#[derive(thiserror::Error)]
#[error("shard {shard} is not accepting messages")]
pub struct SendError<M> {
    /// Destination shard.
    pub shard: usize,
    /// The undelivered message.
    pub msg: M,
}

impl<M> std::fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendError")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl<M> ShardSender<M> {
    /// Queues `msg` for the shard. A message that races shutdown may still be dropped unread
    /// (its destructor runs on the shard thread or at the end of shutdown).
    pub fn send(&self, msg: M) -> Result<(), SendError<M>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError {
                shard: self.shard,
                msg,
            });
        }
        self.tx.send(Envelope::Msg(msg)).map_err(|e| match e.0 {
            Envelope::Msg(msg) => SendError {
                shard: self.shard,
                msg,
            },
            Envelope::Close => unreachable!("we sent a message"),
        })
    }

    /// The destination shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }
}

/// A shard's incoming messages, in the order each sender sent them.
pub struct Mailbox<M> {
    rx: flume::Receiver<Envelope<M>>,
    closed: Cell<bool>,
}

impl<M> Mailbox<M> {
    /// The next message, or `None` once the shards are shutting down (messages queued before
    /// shutdown are delivered first).
    pub async fn recv(&self) -> Option<M> {
        if self.closed.get() {
            return None;
        }
        match self.rx.recv_async().await {
            Ok(Envelope::Msg(m)) => Some(m),
            Ok(Envelope::Close) | Err(_) => {
                self.closed.set(true);
                None
            }
        }
    }
}

/// What a shard body gets: who it is, its buffer pool and senders to every shard.
pub struct ShardContext<M> {
    /// Shard index, `0..len`.
    pub id: usize,
    /// CPU the shard is pinned to.
    pub cpu: usize,
    /// NUMA node of that CPU (and of the arena).
    pub numa_node: usize,
    /// This shard's pool over its registered arena (`!Send`).
    pub pool: BufferPool,
    /// `peers[i]` sends to shard `i` (including this one).
    pub peers: Vec<ShardSender<M>>,
}

/// Running shards: one pinned glommio `LocalExecutor` per thread.
pub struct Shards<M: Send + 'static> {
    senders: Vec<ShardSender<M>>,
    stats: Vec<Arc<PoolStats>>,
    cpus: Vec<CpuLocation>,
    threads: Vec<(usize, JoinHandle<()>)>,
}

impl<M: Send + 'static> std::fmt::Debug for Shards<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("cpus", &self.cpus.iter().map(|c| c.cpu).collect::<Vec<_>>())
            .finish()
    }
}

/// Start-up report from a shard thread.
type Ready = Result<(), ShardFailureCause>;

/// Why [`run_on_one_shard`] produced no result.
#[derive(Debug, thiserror::Error)]
pub enum RunOneError {
    /// The shard did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The body panicked (the panic is in `source`).
    #[error("the shard's body did not finish: {0}")]
    Body(#[source] ShutdownError),
}

/// Runs `body` on one fresh shard made from `config` (its `shards` is taken as 1) and returns
/// the body's output once the shard has shut down: an executor and a pool for one job, as tools
/// and tests need them.
pub fn run_on_one_shard<T, F, Fut>(config: &ShardConfig, body: F) -> Result<T, RunOneError>
where
    T: Send + 'static,
    F: FnOnce(BufferPool) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = flume::bounded(1);
    // `start` takes a body it may call per shard (`Fn`); this one runs once, on the one shard.
    let slot = std::sync::Mutex::new(Some((body, tx)));
    let config = ShardConfig {
        shards: 1,
        ..*config
    };
    let shards = Shards::<()>::start(&config, move |ctx, _mailbox| {
        let taken = slot.lock().ok().and_then(|mut slot| slot.take());
        async move {
            if let Some((body, tx)) = taken {
                let _ = tx.send(body(ctx.pool.clone()).await);
            }
        }
    })?;
    let output = rx.recv();
    shards.shutdown().map_err(RunOneError::Body)?;
    Ok(output.expect("a body that did not panic sent its output"))
}

impl<M: Send + 'static> Shards<M> {
    /// Starts `config.shards` pinned executors, builds each one's arena and pool, and runs
    /// `body(ctx, mailbox)` on each. Returns once every shard is ready (bodies have not
    /// necessarily been polled yet), or the failures of every shard that could not start.
    pub fn start<F, Fut>(config: &ShardConfig, body: F) -> Result<Shards<M>, StartError>
    where
        F: Fn(ShardContext<M>, Mailbox<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        validate(config)?;
        let cpus = placement(config.shards)?;

        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for shard in 0..config.shards {
            let (tx, rx) = flume::unbounded();
            senders.push(ShardSender {
                tx,
                closed: Arc::new(AtomicBool::new(false)),
                shard,
            });
            receivers.push(rx);
        }
        let stats: Vec<Arc<PoolStats>> = (0..config.shards).map(|_| Arc::default()).collect();
        let body = Arc::new(body);

        let mut threads = Vec::new();
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        for (shard, rx) in receivers.into_iter().enumerate() {
            let (ready_tx, ready_rx) = flume::bounded::<Ready>(1);
            let (go_tx, go_rx) = flume::bounded::<bool>(1);
            let setup = ShardSetup {
                id: shard,
                loc: cpus[shard].clone(),
                config: *config,
                peers: senders.clone(),
                stats: stats[shard].clone(),
                ready: ready_tx,
                go: go_rx,
            };
            let body = body.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("shard-{shard}"))
                .spawn(move || shard_main(setup, rx, body));
            match spawned {
                Ok(handle) => {
                    threads.push((shard, handle));
                    pending.push((shard, ready_rx, go_tx));
                }
                Err(e) => failures.push(ShardFailure {
                    shard,
                    cpu: cpus[shard].cpu,
                    cause: ShardFailureCause::Spawn(e),
                }),
            }
        }

        let mut go = Vec::new();
        for (shard, ready_rx, go_tx) in pending {
            match ready_rx.recv() {
                Ok(Ok(())) => go.push(go_tx),
                Ok(Err(cause)) => failures.push(ShardFailure {
                    shard,
                    cpu: cpus[shard].cpu,
                    cause,
                }),
                // The thread died before reporting: it panicked; join below gives the message.
                Err(_) => failures.push(ShardFailure {
                    shard,
                    cpu: cpus[shard].cpu,
                    cause: ShardFailureCause::Panicked(String::new()),
                }),
            }
        }

        if failures.is_empty() {
            for g in go {
                let _ = g.send(true);
            }
            return Ok(Shards {
                senders,
                stats,
                cpus,
                threads,
            });
        }
        for g in go {
            let _ = g.send(false);
        }
        for (shard, handle) in threads {
            if let Err(payload) = handle.join() {
                let msg = panic_message(&*payload);
                match failures.iter_mut().find(|f| f.shard == shard) {
                    Some(f) => f.cause = ShardFailureCause::Panicked(msg),
                    None => failures.push(ShardFailure {
                        shard,
                        cpu: cpus[shard].cpu,
                        cause: ShardFailureCause::Panicked(msg),
                    }),
                }
            }
        }
        failures.sort_by_key(|f| f.shard);
        for f in &failures {
            error!("{f}");
        }
        Err(StartError::Shards(failures))
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Always false: `start` refuses zero shards.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Sender to shard `shard`; clone it freely, use it from any thread.
    ///
    /// # Panics
    /// If `shard >= self.len()`.
    pub fn sender(&self, shard: usize) -> &ShardSender<M> {
        &self.senders[shard]
    }

    /// Per-shard pool counters, indexed by shard.
    pub fn stats(&self) -> &[Arc<PoolStats>] {
        &self.stats
    }

    /// CPU that shard `shard` is pinned to.
    pub fn cpu(&self, shard: usize) -> &CpuLocation {
        &self.cpus[shard]
    }

    /// Closes every mailbox (each `recv` returns `None` after the messages already queued),
    /// waits for the bodies to return and joins the threads. Reports shards that panicked.
    pub fn shutdown(mut self) -> Result<(), ShutdownError> {
        self.close_and_join()
    }

    fn close_and_join(&mut self) -> Result<(), ShutdownError> {
        for s in &self.senders {
            s.closed.store(true, Ordering::Release);
            let _ = s.tx.send(Envelope::Close);
        }
        let mut panicked = Vec::new();
        for (shard, handle) in self.threads.drain(..) {
            if let Err(payload) = handle.join() {
                panicked.push((shard, panic_message(&*payload)));
            }
        }
        if panicked.is_empty() {
            Ok(())
        } else {
            Err(ShutdownError { panicked })
        }
    }
}

impl<M: Send + 'static> Drop for Shards<M> {
    /// Dropping without [`Shards::shutdown`] still stops and joins the shards; panics are logged.
    fn drop(&mut self) {
        if let Err(e) = self.close_and_join() {
            error!("{e}");
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

fn validate(c: &ShardConfig) -> Result<(), StartError> {
    if c.shards == 0 {
        return Err(StartError::Config("at least one shard is needed".into()));
    }
    if !(MIN_IO_MEMORY..=MAX_IO_MEMORY).contains(&c.io_memory_per_shard) {
        return Err(StartError::Config(format!(
            "io_memory_per_shard is {} bytes; it must be between {MIN_IO_MEMORY} (one huge page) \
             and {MAX_IO_MEMORY} (the kernel's largest registered buffer)",
            c.io_memory_per_shard
        )));
    }
    Ok(())
}

/// Online CPUs that this process's affinity mask allows (containers, `taskset`).
/// The CPU each of `shards` shards is pinned to, in shard order (see [`shard_cpu_order`]).
fn placement(shards: usize) -> Result<Vec<CpuLocation>, StartError> {
    let cpus = usable_cpus()?;
    if shards > cpus.len() {
        return Err(StartError::TooManyShards {
            requested: shards,
            usable: cpus.len(),
        });
    }
    Ok(shard_cpu_order(&cpus).into_iter().take(shards).collect())
}

/// The NUMA node each of `shards` shards will run on, as [`Shards::start`] places them (for
/// sizing per-node hugepage reservations before the shards start).
pub fn shard_numa_nodes(shards: usize) -> Result<Vec<usize>, StartError> {
    Ok(placement(shards)?.iter().map(|c| c.numa_node).collect())
}

fn usable_cpus() -> Result<Vec<CpuLocation>, StartError> {
    let online = CpuSet::online().map_err(|e| StartError::Topology(e.to_string()))?;
    let allowed = affinity();
    Ok(online
        .iter()
        .filter(|c| allowed.as_ref().is_none_or(|a| a.contains(&c.cpu)))
        .cloned()
        .collect())
}

fn affinity() -> Option<HashSet<usize>> {
    // SAFETY: `cpu_set_t` is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable `cpu_set_t` of the size we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is initialised and every index is below its bit size.
    Some(
        (0..bits)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect(),
    )
}

struct ShardSetup<M> {
    id: usize,
    loc: CpuLocation,
    config: ShardConfig,
    peers: Vec<ShardSender<M>>,
    stats: Arc<PoolStats>,
    ready: flume::Sender<Ready>,
    go: flume::Receiver<bool>,
}

/// Longest a shard sleeps with no timer of its own due: see [`spawn_park_guard`].
pub const PARK_GUARD_TICK: Duration = Duration::from_millis(20);

/// Keeps a timer due every [`PARK_GUARD_TICK`] on the current executor, so that it never sleeps
/// without a deadline.
///
/// Why: glommio 0.9's run loop parks whenever `run_task_queues` returns false, and it also
/// returns false when the preemption timer has already fired before it ran anything: a thread
/// descheduled for longer than the timer (100 ms) between installing it and running its queues,
/// which happens on a loaded node. Parked like that with runnable tasks and no I/O or timer
/// pending, the shard sleeps until some other thread happens to wake it; a FUSE request waiting
/// on it hangs until then (seen as 60 s stalls of tests/writable_model.rs on a loaded machine;
/// reproduced with a 20 µs preemption timer, where cross-thread wake-ups hang at the first one
/// without the guard and 2000 complete in 0.3 s with it). Fixed upstream in glommio/glommio#53,
/// not in a release; with a timer pending the park ends within a tick and the loop runs the
/// queues. Cost: one timer wake-up per tick on an idle shard.
pub fn spawn_park_guard() {
    glommio::spawn_local(async {
        loop {
            glommio::timer::sleep(PARK_GUARD_TICK).await;
        }
    })
    .detach();
}

fn shard_main<M, F, Fut>(setup: ShardSetup<M>, rx: flume::Receiver<Envelope<M>>, body: Arc<F>)
where
    M: Send + 'static,
    F: Fn(ShardContext<M>, Mailbox<M>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let ShardConfig {
        io_memory_per_shard: io_memory,
        hugepages,
        ..
    } = setup.config;
    let (made, outcome) = alloc::with_arena_request(io_memory, hugepages, || {
        LocalExecutorBuilder::new(Placement::Fixed(setup.loc.cpu))
            .io_memory(io_memory)
            .name(&format!("shard-{}", setup.id))
            .spin_before_park(setup.config.spin_before_park)
            // The blocking thread (disk-cache writes, a writable mount's overlay calls under
            // the io_uring transport) runs wherever the scheduler finds room, not on the
            // shard's own CPU, where it would only take turns with the shard.
            .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
            .make()
    });
    let ex = match made {
        Ok(ex) => ex,
        Err(e) => {
            let _ = setup
                .ready
                .send(Err(ShardFailureCause::Executor(e.to_string())));
            return;
        }
    };
    ex.run(async move {
        spawn_park_guard();
        let arena = inspect_arena(&setup, outcome);
        if hugepages == HugepageMode::Require && arena.kind != MemoryKind::Hugetlb {
            let detail = match outcome {
                ArenaOutcome::NotConsumed => "ArenaAllocator is not the #[global_allocator]".into(),
                ArenaOutcome::Granted(g) => format!(
                    "MAP_HUGETLB failed with {} (reserve pages in /proc/sys/vm/nr_hugepages)",
                    std::io::Error::from_raw_os_error(g.hugetlb_errno)
                ),
            };
            let _ = setup
                .ready
                .send(Err(ShardFailureCause::HugepagesUnavailable {
                    kind: arena.kind,
                    detail,
                }));
            return;
        }
        let pool = BufferPool::new(arena, setup.stats.clone());
        if setup.ready.send(Ok(())).is_err() || setup.go.recv_async().await != Ok(true) {
            return;
        }
        let ctx = ShardContext {
            id: setup.id,
            cpu: setup.loc.cpu,
            numa_node: setup.loc.numa_node,
            pool,
            peers: setup.peers,
        };
        let mailbox = Mailbox {
            rx,
            closed: Cell::new(false),
        };
        body(ctx, mailbox).await;
    });
}

/// Finds out what backs the arena and whether it is registered, and logs it (one `info!` line
/// per shard, `warn!` for every fallback). Runs inside the executor: the probe buffer needs it.
fn inspect_arena<M>(setup: &ShardSetup<M>, outcome: ArenaOutcome) -> ArenaInfo {
    let shard = setup.id;
    // A fresh arena always serves a 4 KiB buffer, so the probe lies inside it.
    let probe_buf = glommio::allocate_dma_buffer(PAGE);
    let probe_addr = probe_buf.as_ptr() as usize;
    // glommio decides fixed vs. plain I/O by `DmaBuffer::uring_buffer_id()`, which is
    // crate-private; its Debug output shows it. Start-up only.
    let glommio_fixed = format!("{probe_buf:?}").contains("uring_buffer_id: Some(");
    drop(probe_buf);
    let (rings, user_buf) = probe::rings_registering(probe_addr);

    let (range, size, kind, prefault, huge_bytes) = match outcome {
        ArenaOutcome::NotConsumed => {
            warn!(
                shard,
                "ArenaAllocator is not the #[global_allocator]: the I/O arena is ordinary heap \
                 memory (not pre-faulted, no hugepages)"
            );
            let range = user_buf.map(|b| (b.addr, b.len));
            let size = user_buf.map_or(setup.config.io_memory_per_shard, |b| b.len);
            (range, size, MemoryKind::HeapNoHook, Duration::ZERO, 0)
        }
        ArenaOutcome::Granted(g) => {
            let smaps = probe::smaps_entry(g.addr).unwrap_or_default();
            // Expected on most machines: said once per process, plainly, not once per shard.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if g.hugetlb_errno != 0
                && setup.config.hugepages == HugepageMode::Auto
                && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                let why = if g.hugetlb_errno == libc::ENOMEM {
                    "none are reserved, or too few (/proc/sys/vm/nr_hugepages)".to_string()
                } else {
                    std::io::Error::from_raw_os_error(g.hugetlb_errno).to_string()
                };
                tracing::info!(
                    "buffer pools use transparent hugepages: explicit 2 MiB hugepages are not \
                     available ({why}); this is fine, reserving them only saves page-table work"
                );
            }
            let (kind, huge) = match g.backing {
                Backing::Hugetlb if smaps.kernel_page_size == HUGE_PAGE => {
                    (MemoryKind::Hugetlb, smaps.private_hugetlb)
                }
                Backing::Hugetlb => {
                    warn!(
                        shard,
                        page = smaps.kernel_page_size,
                        "MAP_HUGETLB mapping is not on 2 MiB pages"
                    );
                    (MemoryKind::Normal, 0)
                }
                Backing::ThpAdvised if smaps.anon_huge > 0 => (MemoryKind::Thp, smaps.anon_huge),
                Backing::ThpAdvised => {
                    warn!(
                        shard,
                        "madvise(MADV_HUGEPAGE) accepted but no huge pages were faulted in \
                         (check /sys/kernel/mm/transparent_hugepage/enabled and memory \
                         fragmentation); the arena is on 4 KiB pages"
                    );
                    (MemoryKind::Normal, 0)
                }
                Backing::Plain => {
                    if setup.config.hugepages == HugepageMode::Auto {
                        warn!(
                            shard,
                            error = %std::io::Error::from_raw_os_error(g.thp_errno),
                            "transparent hugepages unavailable; the arena is on 4 KiB pages"
                        );
                    }
                    (MemoryKind::Normal, 0)
                }
                Backing::Heap => {
                    // Under `Require` this is reported as a start error instead.
                    if setup.config.hugepages != HugepageMode::Require {
                        warn!(
                            shard,
                            "every mmap for the arena failed; it is ordinary heap memory"
                        );
                    }
                    (MemoryKind::Heap, 0)
                }
            };
            if let Some(b) = user_buf {
                if b.addr != g.addr {
                    warn!(
                        shard,
                        registered = b.addr,
                        arena = g.addr,
                        "registered buffer is not our arena"
                    );
                }
            }
            (Some((g.addr, g.size)), g.size, kind, g.prefault, huge)
        }
    };
    if !glommio_fixed {
        // Registered buffers count against the user's RLIMIT_MEMLOCK, all shards together.
        let needed_kib = (setup.config.shards * setup.config.io_memory_per_shard) >> 10;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass and keeps no pointer.
        let memlock = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
            "unknown".to_string()
        } else if limit.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", limit.rlim_cur >> 10)
        };
        warn!(
            shard,
            rings,
            "io_uring buffer registration failed: glommio uses non-fixed I/O for this shard \
             (slower, still correct). RLIMIT_MEMLOCK is {memlock}; registering all shards' \
             arenas needs {needed_kib} KiB (`ulimit -l {needed_kib}`, LimitMEMLOCK= in a \
             systemd unit, or memlock in /etc/security/limits.conf), and no arena may exceed \
             1 GiB"
        );
    } else if rings == 0 {
        warn!(
            shard,
            "glommio reports a registered arena but no io_uring fdinfo lists it"
        );
    }
    if setup.config.hugepages == HugepageMode::Require && kind != MemoryKind::Hugetlb {
        // Start fails for this shard; the caller logs the failure, not a "ready" line.
        return ArenaInfo {
            range,
            size,
            kind,
            registered: glommio_fixed,
            prefault,
        };
    }
    info!(
        shard,
        cpu = setup.loc.cpu,
        numa_node = setup.loc.numa_node,
        arena_mib = size >> 20,
        memory = %kind,
        huge_mib = huge_bytes >> 20,
        registered = glommio_fixed,
        rings_registered = rings,
        prefault_ms = prefault.as_secs_f64() * 1e3,
        "shard ready"
    );
    ArenaInfo {
        range,
        size,
        kind,
        registered: glommio_fixed,
        prefault,
    }
}

#[cfg(test)]
mod park_guard_tests {
    use super::*;

    fn voluntary_switches(tid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// How often an executor thread that waits for a message from another thread (as an idle
    /// shard does) wakes in 300 ms: each wake-up is one voluntary context switch.
    fn wakeups_while_idle(guard: bool) -> u64 {
        let (message, mailbox) = flume::bounded::<()>(1);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let executor = std::thread::spawn(move || {
            let ex = LocalExecutorBuilder::new(Placement::Unbound)
                .spin_before_park(Duration::ZERO)
                .make()
                .unwrap();
            ex.run(async move {
                if guard {
                    spawn_park_guard();
                }
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                mailbox.recv_async().await.ok();
            });
        });
        let tid = tid_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let before = voluntary_switches(tid);
        std::thread::sleep(Duration::from_millis(300));
        let after = voluntary_switches(tid);
        message.send(()).unwrap();
        executor.join().unwrap();
        after - before
    }

    /// glommio 0.9 can park with runnable tasks (see [`spawn_park_guard`]); the guard bounds
    /// such a park by waking the shard every tick. Without it an idle executor sleeps until
    /// another thread wakes it, which is what made a lost wake-up a hang.
    #[test]
    fn the_park_guard_wakes_an_idle_shard_every_tick() {
        let guarded = wakeups_while_idle(true);
        let expected = (300 / PARK_GUARD_TICK.as_millis()) as u64;
        assert!(
            guarded >= expected / 2,
            "{guarded} wake-ups in 300 ms, expected about {expected}"
        );
        let unguarded = wakeups_while_idle(false);
        assert!(
            unguarded <= 2,
            "{unguarded} wake-ups in 300 ms without the guard"
        );
    }
}
