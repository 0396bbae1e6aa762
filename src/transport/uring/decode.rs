//! A kernel request (its header, fixed arguments `op_in` and variable `payload`) turned into an
//! `fs::Request`: the same for a request read from `/dev/fuse` and one taken from a ring entry,
//! which differ only in where the kernel put `op_in` and the payload.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::abi::{self, u32_at, u64_at, InHeader};
use super::reply::Answer;
use crate::fs::request::{Caller, Create, Fallocate, Open, Read, Release, Request, SetAttr, Write};
use crate::namespace::NodeKind;

/// What became of a request.
pub(super) enum Decoded<'a> {
    /// For the filesystem.
    Request(Request<'a>),
    /// Answered (a malformed request, `ENOSYS` for what the filesystem does not serve) or, as
    /// FORGET and INTERRUPT, needing no answer.
    Done,
}

/// The name at the start of `payload`, without its NUL.
fn name(payload: &[u8]) -> Option<&[u8]> {
    let end = payload.iter().position(|&c| c == 0)?;
    Some(&payload[..end])
}

/// Two names one after the other (RENAME's old and new name, SYMLINK's name and target), each
/// without its NUL.
fn two_names(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = name(payload)?;
    let second = name(&payload[first.len() + 1..])?;
    Some((first, second))
}

/// A `fuse_setattr_in` time: seconds (signed, as `st_mtime`) and nanoseconds since the epoch.
fn time_at(op_in: &[u8], secs_at: usize, nanos_at: usize) -> SystemTime {
    let secs = u64_at(op_in, secs_at) as i64;
    let nanos = Duration::from_nanos(u32_at(op_in, nanos_at) as u64);
    let whole = Duration::from_secs(secs.unsigned_abs());
    let secs = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)
    } else {
        UNIX_EPOCH.checked_sub(whole)
    };
    // The kernel checked the time (utimensat); nothing here can overflow but a forged request.
    secs.and_then(|t| t.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

/// What a SETATTR changes: a field is set when its `valid` bit is; `*_NOW` means the time of
/// arrival.
fn set_attr(op_in: &[u8]) -> SetAttr {
    let valid = u32_at(op_in, 0);
    let given = |bit: u32| valid & bit != 0;
    let time = |bit: u32, now_bit: u32, secs_at: usize, nanos_at: usize| {
        given(bit).then(|| {
            if given(now_bit) {
                SystemTime::now()
            } else {
                time_at(op_in, secs_at, nanos_at)
            }
        })
    };
    SetAttr {
        mode: given(abi::FATTR_MODE).then(|| u32_at(op_in, 68)),
        uid: given(abi::FATTR_UID).then(|| u32_at(op_in, 76)),
        gid: given(abi::FATTR_GID).then(|| u32_at(op_in, 80)),
        size: given(abi::FATTR_SIZE).then(|| u64_at(op_in, 16)),
        atime: time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, 32, 56),
        mtime: time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, 40, 60),
    }
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
        abi::SETATTR => Request::SetAttr {
            ino,
            change: set_attr(op_in),
            reply: Box::new(answer),
        },
        abi::WRITE => {
            let size = u32_at(op_in, 16) as usize;
            let Some(data) = payload.get(..size) else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            Request::Write(Write {
                ino,
                fh: u64_at(op_in, 0),
                offset: u64_at(op_in, 8),
                data: data.to_vec(),
                received: Instant::now(),
                reply: Box::new(answer),
            })
        }
        abi::FALLOCATE => Request::Fallocate(Fallocate {
            ino,
            offset: u64_at(op_in, 8),
            length: u64_at(op_in, 16),
            mode: u32_at(op_in, 24) as i32,
            reply: Box::new(answer),
        }),
        abi::FSYNC | abi::FSYNCDIR => Request::Fsync {
            ino,
            dir: h.opcode == abi::FSYNCDIR,
            reply: Box::new(answer),
        },
        abi::SETXATTR => {
            let size = u32_at(op_in, 0) as usize;
            let value = name(payload).and_then(|name| {
                let value = payload.get(name.len() + 1..name.len() + 1 + size)?;
                Some((name, value))
            });
            let Some((name, value)) = value else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            Request::SetXattr {
                ino,
                name,
                value,
                flags: u32_at(op_in, 4) as i32,
                reply: Box::new(answer),
            }
        }
        abi::RENAME | abi::RENAME2 => {
            let Some((name, new_name)) = two_names(payload) else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            Request::Rename {
                parent: ino,
                name,
                new_parent: u64_at(op_in, 0),
                new_name,
                // RENAME has no flags; RENAME2's follow the new parent.
                flags: if h.opcode == abi::RENAME2 {
                    u32_at(op_in, 8)
                } else {
                    0
                },
                reply: Box::new(answer),
            }
        }
        abi::SYMLINK => {
            let Some((name, target)) = two_names(payload) else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            Request::MakeNode {
                parent: ino,
                name,
                kind: NodeKind::Symlink,
                mode: 0o777,
                target: Some(target),
                caller: caller(h),
                reply: Box::new(answer),
            }
        }
        abi::CREATE
        | abi::MKNOD
        | abi::MKDIR
        | abi::LINK
        | abi::UNLINK
        | abi::RMDIR
        | abi::REMOVEXATTR => {
            let Some(name) = name(payload) else {
                answer.send(libc::EINVAL, &[]);
                return Decoded::Done;
            };
            match named(h, op_in, name, answer) {
                Some(request) => request,
                None => return Decoded::Done,
            }
        }
        _ => {
            answer.send(libc::ENOSYS, &[]);
            return Decoded::Done;
        }
    };
    Decoded::Request(request)
}

/// Who asked (the owner of what the request creates).
fn caller(h: &InHeader) -> Caller {
    Caller {
        uid: h.uid,
        gid: h.gid,
    }
}

/// The change requests whose payload is one `name`; `None` when answered here (a node kind a
/// job's outputs have no place for).
///
/// Modes arrive with the caller's umask already applied: the kernel applies it unless INIT
/// negotiated `FUSE_DONT_MASK`, which neither transport does.
fn named<'a>(
    h: &InHeader,
    op_in: &[u8],
    name: &'a [u8],
    mut answer: Answer,
) -> Option<Request<'a>> {
    let ino = h.nodeid;
    Some(match h.opcode {
        abi::CREATE => Request::Create(Create {
            parent: ino,
            name: name.to_vec(),
            mode: u32_at(op_in, 4),
            flags: u32_at(op_in, 0) as i32,
            caller: caller(h),
            received: Instant::now(),
            reply: Box::new(answer),
        }),
        abi::MKNOD | abi::MKDIR => {
            let mode = u32_at(op_in, 0);
            let kind = match (h.opcode, mode & libc::S_IFMT) {
                (abi::MKDIR, _) => NodeKind::Dir,
                (_, libc::S_IFREG) => NodeKind::File,
                (_, libc::S_IFIFO) => NodeKind::Fifo,
                // Devices and sockets have no place in a job's outputs.
                _ => {
                    answer.send(libc::EPERM, &[]);
                    return None;
                }
            };
            Request::MakeNode {
                parent: ino,
                name,
                kind,
                mode,
                target: None,
                caller: caller(h),
                reply: Box::new(answer),
            }
        }
        abi::LINK => Request::Link {
            ino: u64_at(op_in, 0),
            new_parent: ino,
            new_name: name,
            reply: Box::new(answer),
        },
        abi::UNLINK | abi::RMDIR => Request::Remove {
            parent: ino,
            name,
            dir: h.opcode == abi::RMDIR,
            reply: Box::new(answer),
        },
        abi::REMOVEXATTR => Request::RemoveXattr {
            ino,
            name,
            reply: Box::new(answer),
        },
        _ => {
            answer.send(libc::ENOSYS, &[]);
            return None;
        }
    })
}
