//! mount_vfs: mounts AWS Deadline Cloud job-attachments manifests as a FUSE filesystem, with bytes
//! served from a content-addressed store through shard-per-core glommio executors.
//!
//! Data flows one way: `manifest` (decode, validate) -> `namespace` (immutable inode table) ->
//! `transport` (fuser: kernel requests in, replies out) -> `fs` (the filesystem core: one
//! dispatch point answering metadata inline and routing data requests to the owner shard, whose
//! file service keeps open handles, the block cache and verification) -> `store` (where bytes
//! come from). See docs/architecture.md for the module map.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod deadline_vfs;
pub mod export;
pub mod fs;
pub mod ingest;
pub mod log_limit;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod mount;
pub mod namespace;
pub mod overlay;
pub mod signals;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod trace;
pub mod transport;
pub mod validate;
