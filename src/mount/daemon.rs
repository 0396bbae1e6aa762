//! `--daemon`: the parent re-runs the same command as a detached child and waits on a pipe
//! until the child reports the mount ready, or its error, so that the parent's exit status
//! and message are the mount's.

use std::path::Path;

use super::MountError;

/// Environment variable through which a `--daemon` parent learns that its child is mounted.
const READY_FD_ENV: &str = "MOUNT_VFS_READY_FD";

/// Whether this process is the background child of a `--daemon` parent.
pub fn is_child() -> bool {
    std::env::var_os(READY_FD_ENV).is_some()
}

/// Re-runs this command in the background and returns once the child reports the mount ready,
/// or with the child's own error if it could not mount. The child keeps none of the caller's
/// stdio (a pipe reading our output would never close): it logs to `--log-file`, else nowhere.
pub fn daemonize(log_file: Option<&Path>) -> Result<(), MountError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;

    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(MountError::Runtime(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pipe2 just returned these two descriptors; each is owned once, here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: a valid descriptor we own; clearing CLOEXEC lets the child inherit it.
    unsafe { libc::fcntl(fds[1], libc::F_SETFD, 0) };
    let exe =
        std::env::current_exe().map_err(|e| MountError::Runtime(format!("current_exe: {e}")))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, fds[1].to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| MountError::Runtime(format!("cannot start the background process: {e}")))?;
    // The child holds its own copy; closing ours makes EOF mean "child gone".
    drop(write_end);
    let mut report = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut report);
    match report.split_first() {
        Some((b'R', _)) => {
            let log = log_file.map_or(String::new(), |f| format!(", log in {}", f.display()));
            println!(
                "mount_vfs: mounted in the background (pid {}{log})",
                child.id()
            );
            Ok(())
        }
        Some((_, failure)) => {
            let _ = child.wait();
            let (code, message) = failure.split_first().unwrap_or((&b'1', b""));
            let message = String::from_utf8_lossy(message).into_owned();
            Err(if *code == b'2' {
                MountError::Usage(message)
            } else {
                MountError::Runtime(message)
            })
        }
        None => {
            let status = child
                .wait()
                .map_err(|e| MountError::Runtime(e.to_string()))?;
            Err(MountError::Runtime(format!(
                "the background mount failed ({status}){}",
                log_file.map_or(String::new(), |f| format!("; see {}", f.display()))
            )))
        }
    }
}

/// Tells a waiting `--daemon` parent how mounting went: `R` ready, or `E`, the exit code's
/// digit and the error message. Only the first report counts; without a parent, nothing.
pub fn report_to_parent(outcome: Result<(), &MountError>) {
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let message = match outcome {
        Ok(()) => b"R".to_vec(),
        Err(e) => format!("E{}{e}", e.exit_code()).into_bytes(),
    };
    // SAFETY: the parent passed us this pipe's write end and nothing else uses it; we write
    // the message and close it, once (`REPORTED`).
    unsafe {
        libc::write(fd, message.as_ptr().cast(), message.len());
        libc::close(fd);
    }
}
