//! A kernel request (its header, fixed arguments `op_in` and variable `payload`) turned into an
//! `fs::Request`: the same for a request read from `/dev/fuse` and one taken from a ring entry,
//! which differ only in where the kernel put `op_in` and the payload.

use std::time::Instant;

use super::abi::{self, u32_at, u64_at, InHeader};
use super::reply::Answer;
use crate::fs::request::{Open, Read, Release, Request};

/// What became of a request.
pub(super) enum Decoded<'a> {
    /// For the filesystem.
    Request(Request<'a>),
    /// Answered (an error, `ENOSYS` for what a read-only mount does not serve) or, as FORGET
    /// and INTERRUPT, needing no answer.
    Done,
}

/// The name at the start of `payload`, without its NUL.
fn name(payload: &[u8]) -> Option<&[u8]> {
    let end = payload.iter().position(|&c| c == 0)?;
    Some(&payload[..end])
}

/// Decodes one request; `answer` is its reply. `op_in` must hold at least
/// [`abi::op_in_size`] bytes (the callers check).
pub(super) fn decode<'a>(
    h: &InHeader,
    op_in: &[u8],
    payload: &'a [u8],
    mut answer: Answer,
) -> Decoded<'a> {
    let ino = h.nodeid;
    let request = match h.opcode {
        abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT => {
            // The namespace is immutable: nothing to forget. An interrupted request is
            // answered when it completes, as fuser does.
            answer.none();
            return Decoded::Done;
        }
        abi::LOOKUP | abi::GETXATTR => {
            let Some(name) = name(payload) else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            if h.opcode == abi::LOOKUP {
                Request::Lookup {
                    parent: ino,
                    name,
                    reply: Box::new(answer),
                }
            } else {
                Request::GetXattr {
                    ino,
                    name,
                    size: u32_at(op_in, 0),
                    reply: Box::new(answer),
                }
            }
        }
        abi::GETATTR => Request::GetAttr {
            ino,
            reply: Box::new(answer),
        },
        abi::READLINK => Request::ReadLink {
            ino,
            reply: Box::new(answer),
        },
        abi::OPEN => Request::Open(Open {
            ino,
            flags: u32_at(op_in, 0) as i32,
            received: Instant::now(),
            reply: Box::new(answer),
        }),
        abi::READ => Request::Read(Read {
            ino,
            fh: u64_at(op_in, 0),
            offset: u64_at(op_in, 8),
            size: u32_at(op_in, 16),
            received: Instant::now(),
            reply: Box::new(answer),
        }),
        abi::RELEASE => Request::Release(Release {
            ino,
            fh: u64_at(op_in, 0),
            reply: Box::new(answer),
        }),
        abi::FLUSH => Request::Flush {
            ino,
            reply: Box::new(answer),
        },
        abi::OPENDIR => Request::OpenDir {
            ino,
            reply: Box::new(answer),
        },
        abi::READDIR | abi::READDIRPLUS => {
            answer.limit(u32_at(op_in, 16));
            let (fh, offset) = (u64_at(op_in, 0), u64_at(op_in, 8));
            if h.opcode == abi::READDIR {
                Request::ReadDir {
                    ino,
                    fh,
                    offset,
                    reply: Box::new(answer),
                }
            } else {
                Request::ReadDirPlus {
                    ino,
                    fh,
                    offset,
                    reply: Box::new(answer),
                }
            }
        }
        abi::RELEASEDIR => Request::ReleaseDir {
            ino,
            fh: u64_at(op_in, 0),
            reply: Box::new(answer),
        },
        abi::STATFS => Request::StatFs {
            reply: Box::new(answer),
        },
        abi::ACCESS => Request::Access {
            ino,
            mask: u32_at(op_in, 0) as i32,
            reply: Box::new(answer),
        },
        abi::LISTXATTR => Request::ListXattr {
            ino,
            size: u32_at(op_in, 0),
            reply: Box::new(answer),
        },
        abi::DESTROY => {
            answer.send(0, &[]);
            return Decoded::Done;
        }
        // No ioctls: what a plain file answers (as the fuser transport does).
        abi::IOCTL => {
            answer.send(libc::ENOTTY, &[]);
            return Decoded::Done;
        }
        _ => {
            answer.send(libc::ENOSYS, &[]);
            return Decoded::Done;
        }
    };
    Decoded::Request(request)
}
