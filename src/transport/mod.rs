//! Transports: how requests reach the filesystem core (`crate::fs`) and replies leave it. Each
//! converts its wire types into `fs::request` types and nothing else; fuser is the first, FUSE
//! over io_uring the next.

pub mod fuser;
