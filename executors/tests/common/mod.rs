//! Test harness: shards whose mailbox carries closures, so a test can run async code on a real
//! pinned shard and get the result back on the test thread (a `test_executor!`-style helper).
#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use mount_vfs_executors::{HugepageMode, ShardConfig, ShardContext, Shards, StartError};

type LocalFut = Pin<Box<dyn Future<Output = ()>>>;

/// A closure to run on a shard.
pub struct Job(Box<dyn FnOnce(Rc<ShardContext<Job>>) -> LocalFut + Send>);

pub const MIB: usize = 1 << 20;

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mount_vfs_executors=info".into()),
        )
        .try_init();
}

pub fn config(shards: usize, io_memory: usize, hugepages: HugepageMode) -> ShardConfig {
    ShardConfig {
        shards,
        io_memory_per_shard: io_memory,
        hugepages,
        spin_before_park: std::time::Duration::ZERO,
    }
}

/// Starts shards that run every received [`Job`] as a task.
pub fn start_jobs(config: &ShardConfig) -> Result<Shards<Job>, StartError> {
    init_logging();
    Shards::start(config, |ctx, mailbox| async move {
        let ctx = Rc::new(ctx);
        while let Some(Job(f)) = mailbox.recv().await {
            glommio::spawn_local(f(ctx.clone())).detach();
        }
    })
}

/// Runs `f` on shard `shard` and returns its result.
pub fn run_on<T, F, Fut>(shards: &Shards<Job>, shard: usize, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Rc<ShardContext<Job>>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = flume::bounded(1);
    let job = Job(Box::new(move |ctx| {
        Box::pin(async move {
            let _ = tx.send(f(ctx).await);
        })
    }));
    shards.sender(shard).send(job).expect("shard is gone");
    rx.recv_timeout(Duration::from_secs(60))
        .expect("job did not finish (panicked or hung)")
}

/// The CPU this thread runs on now.
pub fn current_cpu() -> usize {
    // SAFETY: no arguments, no memory; returns -1 on error.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu failed");
    cpu as usize
}
