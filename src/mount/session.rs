//! The kernel side of a mount: the FUSE session that carries the front's requests. The only
//! module of the mount that knows `fuser`; everything else sees [`start`] and a [`FuseSession`].

use std::path::{Path, PathBuf};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::fuse_front::FuseFront;

/// How the session is mounted and served.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// Let users other than the mounting one in (`allow_other`, and no owner-only ACL).
    pub allow_other: bool,
    /// Worker threads, each reading its own clone of the /dev/fuse descriptor.
    pub threads: usize,
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
}

/// A mounted, running session. Dropping it would unmount by path; see [`let_go`](Self::let_go).
pub struct FuseSession {
    session: BackgroundSession,
}

/// Mounts `front` read-only on `mountpoint` and serves it on background threads.
pub fn start(
    front: FuseFront,
    mountpoint: &Path,
    options: SessionOptions,
) -> Result<FuseSession, SessionError> {
    let mut mount_options = vec![
        MountOption::RO,
        MountOption::FSName("mount_vfs".into()),
        MountOption::Subtype("mount_vfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if options.allow_other {
        mount_options.push(MountOption::CUSTOM("allow_other".into()));
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
    let session =
        fuser::Session::new(front, mountpoint, &config).map_err(|source| SessionError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    let session = session.spawn().map_err(SessionError::Spawn)?;
    Ok(FuseSession { session })
}

impl FuseSession {
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
