//! Transports: how requests reach the filesystem core (`crate::fs`) and replies leave it. Each
//! converts its wire types into `fs::request` types and nothing else: fuser over `/dev/fuse`,
//! and FUSE over io_uring (`uring`). [`start`] picks one (`--transport`).

pub mod fuser;
pub mod uring;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::fs::Dispatcher;

/// `--transport`: how FUSE requests reach the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// FUSE over io_uring when the kernel offers it and every CPU has a shard to serve its
    /// queue, else /dev/fuse (with one line saying why).
    Auto,
    /// FUSE over io_uring (Linux 6.14+, enable_uring=Y, root); fail otherwise.
    Uring,
    /// fuser's read/writev on /dev/fuse.
    Dev,
}

/// How the session is mounted and served.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Let users other than the mounting one in (`allow_other`, and no owner-only ACL).
    pub allow_other: bool,
    /// Worker threads, each reading its own clone of the /dev/fuse descriptor (fuser).
    pub threads: usize,
    /// Mount read-write (the dispatcher has an overlay).
    pub writable: bool,
    /// The CPU each shard is pinned to, `[i]` for shard `i` (the ring queue of a CPU is served
    /// by the shard running there).
    pub shard_cpus: Vec<usize>,
}

/// Why the session did not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot mount on {}: {source}", .mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the FUSE session: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("--transport uring: {0}")]
    Uring(#[source] uring::UringError),
}

/// A mounted, running session of either transport.
pub enum Session {
    Dev(fuser::FuseSession),
    Uring(uring::UringSession),
}

/// Mounts `dispatcher` on `mountpoint` over the chosen transport. `passthrough`: where the
/// transport records whether the kernel agreed to FUSE passthrough at INIT (see
/// [`fuser::start`]); both transports register backing files.
pub fn start(
    choice: TransportChoice,
    dispatcher: Dispatcher,
    passthrough: Option<Arc<AtomicBool>>,
    mountpoint: &Path,
    options: SessionOptions,
) -> Result<Session, SessionError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dispatcher = match choice {
        TransportChoice::Dev => dispatcher,
        TransportChoice::Auto if uring::available().is_ok() && options.shard_cpus.len() < cpus => {
            tracing::info!(
                "serving through /dev/fuse: {} shards for {cpus} CPUs, and over io_uring the \
                 requests of a CPU without a shard would wake a shard on another CPU, which \
                 costs more than /dev/fuse (docs/transport-uring.md); --shards {cpus} or \
                 --transport uring serves them over the ring",
                options.shard_cpus.len()
            );
            dispatcher
        }
        TransportChoice::Uring | TransportChoice::Auto => {
            match uring::start(dispatcher, passthrough.as_deref(), mountpoint, &options) {
                Ok(session) => return Ok(Session::Uring(session)),
                Err((e, _)) if choice == TransportChoice::Uring => {
                    return Err(SessionError::Uring(e))
                }
                Err((e, Some(dispatcher))) => {
                    tracing::info!("serving through /dev/fuse: {e}");
                    *dispatcher
                }
                Err((e, None)) => return Err(SessionError::Uring(e)),
            }
        }
    };
    fuser::start(dispatcher, passthrough, mountpoint, options).map(Session::Dev)
}

impl Session {
    /// A function that makes the kernel drop its cached pages of an inode, callable from any
    /// thread.
    pub fn page_cache_dropper(&self) -> Box<dyn Fn(u64) + Send + Sync> {
        match self {
            Session::Dev(s) => s.page_cache_dropper(),
            Session::Uring(s) => s.page_cache_dropper(),
        }
    }

    /// Whether the kernel has ended the session.
    pub fn is_finished(&self) -> bool {
        match self {
            Session::Dev(s) => s.is_finished(),
            Session::Uring(s) => s.is_finished(),
        }
    }

    /// Lets go of the session without unmounting by path again (see `FuseSession::let_go`).
    pub fn let_go(self) {
        match self {
            Session::Dev(s) => s.let_go(),
            // Its threads end with the connection; nothing unmounts by path.
            Session::Uring(s) => std::mem::forget(s),
        }
    }
}
