//! systemd readiness for `Type=notify` units: when systemd started us it names a datagram socket
//! in `NOTIFY_SOCKET`; we send `READY=1` once the mount is live (so units ordered after ours
//! see the files) and `STOPPING=1` when unmounting starts. The protocol is one datagram of
//! `KEY=VALUE` lines (sd_notify(3)); a path, or `@name` for an abstract socket. Without
//! `NOTIFY_SOCKET` nothing is sent; a failed send is logged and never fails the mount.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The mount is live: `READY=1`, our pid (a `--daemon` child is not the process systemd
/// started, so the unit needs `NotifyAccess=all` then) and a status line.
pub fn ready(status: &str) {
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={status}",
        std::process::id()
    ));
}

/// Unmounting has started.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={status}"));
}

fn notify(message: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, message) {
        tracing::warn!(
            "cannot notify systemd through NOTIFY_SOCKET={}: {e}",
            socket.to_string_lossy()
        );
    }
}

/// Sends `message` as one datagram to `socket` (a path, or `@name` for an abstract socket).
fn send(socket: &OsStr, message: &str) -> std::io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let sent = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(message.as_bytes(), &address)?
        }
        None => sender.send_to(message.as_bytes(), socket)?,
    };
    if sent != message.len() {
        return Err(std::io::Error::other("short datagram"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(receiver: &UnixDatagram) -> String {
        let mut buffer = [0u8; 512];
        let n = receiver.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(received(&receiver), "READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("mount_vfs-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(received(&receiver), "STOPPING=1");
    }
}
