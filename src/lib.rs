//! mount_vfs: mounts AWS Deadline Cloud job-attachments manifests as a FUSE filesystem, with bytes
//! served from a content-addressed store through shard-per-core glommio executors.
//!
//! Data flows one way: `manifest` (decode, validate) -> `namespace` (immutable inode table) ->
//! `fuse` (front: metadata inline, data ops routed to the owner shard) -> `service` (per-shard open
//! handles, chunk cache, verification) -> `store` (where bytes come from).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod fuse_front;
pub mod manifest;
pub mod mount;
pub mod namespace;
pub mod service;
pub mod signals;
pub mod snapshot;
pub mod store;
pub mod validate;
