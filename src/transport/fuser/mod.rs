//! The fuser transport: the only module that knows `fuser`. [`start`] mounts a FUSE session
//! whose requests `filesystem` turns into [`Request`](crate::fs::request::Request)s for the
//! [`Dispatcher`]; the mount sees [`start`] and a [`FuseSession`], nothing of fuser.

mod filesystem;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fuser::{BackgroundSession, Config, INodeNo, MountOption, SessionACL};

use self::filesystem::FuserFilesystem;
use crate::fs::Dispatcher;
use crate::transport::{SessionError, SessionOptions};

/// A mounted, running session. Dropping it would unmount by path; see [`let_go`](Self::let_go).
pub struct FuseSession {
    session: BackgroundSession,
}

/// Mounts `dispatcher` (read-only unless `options.writable`) on `mountpoint` and serves it on background threads.
/// `passthrough`: where to record whether the kernel agreed to FUSE passthrough at INIT; `None`
/// when there is nothing to pass through to (no disk cache), so it is not asked for.
pub fn start(
    dispatcher: Dispatcher,
    passthrough: Option<Arc<AtomicBool>>,
    mountpoint: &Path,
    options: SessionOptions,
) -> Result<FuseSession, SessionError> {
    let filesystem = FuserFilesystem::new(dispatcher, passthrough);
    let mut mount_options = vec![
        if options.writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::FSName("mount_vfs".into()),
        MountOption::Subtype("mount_vfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if options.allow_other {
        mount_options.push(MountOption::CUSTOM("allow_other".into()));
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // A non-root mount goes through the setuid fusermount3 anyway (mount(2) is refused);
            // auto_unmount keeps it waiting to unmount should this process die, so a crashed
            // mount never leaves a stale mountpoint in the job's session directory.
            mount_options.push(MountOption::AutoUnmount);
        }
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads);
    config.clone_fd = true;
    let session = fuser::Session::new(filesystem, mountpoint, &config).map_err(|source| {
        SessionError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        }
    })?;
    let session = session.spawn().map_err(SessionError::Spawn)?;
    Ok(FuseSession { session })
}

impl FuseSession {
    /// A function that makes the kernel drop its cached pages of an inode, callable from any
    /// thread. The notification goes out from a thread of its own: the kernel may wait for a
    /// page locked by a READ that the calling shard has yet to answer.
    pub fn page_cache_dropper(&self) -> Box<dyn Fn(u64) + Send + Sync> {
        let notifier = self.session.notifier();
        Box::new(move |ino| {
            let notifier = notifier.clone();
            let _ = std::thread::Builder::new()
                .name("mount_vfs-inval".into())
                .spawn(move || {
                    if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                        tracing::warn!("cannot drop the kernel's cached pages of inode {ino}: {e}");
                    }
                });
        })
    }

    /// Whether the kernel has ended the session: someone unmounted it, or the last user of a
    /// detached mount is gone.
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Lets go of the session without dropping it: its drop would unmount the mountpoint by
    /// path again, and by now that path is unmounted already or belongs to a new mount. A
    /// session still running ends when the process exits.
    pub fn let_go(self) {
        std::mem::forget(self.session);
    }
}
