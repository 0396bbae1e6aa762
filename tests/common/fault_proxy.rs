//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 (std threads) between the S3 client and a real
//! server. It relays each request to the upstream, then applies the next queued [`Fault`] to
//! the response of a GET before passing it on, and logs every GET it answered
//! ([`FaultProxy::gets_log`]). When [`FaultProxy::set_down`] is on it resets every connection,
//! old and new, like a server that went away.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to one GET response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Reset the connection instead of answering.
    Reset,
    /// Send the head and half the body, then go silent for `Duration`, then close.
    Stall(Duration),
    /// Answer `503 SlowDown` (the connection stays usable).
    SlowDown,
    /// Send the head and half the body, then close.
    Truncate,
    /// Pass the response with one body byte inverted.
    Flip,
}

/// One GET the proxy answered: what it asked for and how many body bytes went back.
#[derive(Clone, Debug)]
pub struct LoggedGet {
    /// The request target (path and query).
    pub target: String,
    /// The `Range` header's value (`bytes=0-1048575`), if any.
    pub range: Option<String>,
    pub body_bytes: usize,
}

impl LoggedGet {
    /// The requested byte range as `start..end` (end exclusive), if it had one.
    pub fn byte_range(&self) -> Option<std::ops::Range<u64>> {
        let (start, last) = self
            .range
            .as_ref()?
            .strip_prefix("bytes=")?
            .split_once('-')?;
        Some(start.parse().ok()?..last.parse::<u64>().ok()? + 1)
    }
}

#[derive(Default)]
struct State {
    faults: Mutex<VecDeque<Fault>>,
    down: AtomicBool,
    stop: AtomicBool,
    gets: AtomicU64,
    gets_received: AtomicU64,
    log: Mutex<Vec<LoggedGet>>,
}

/// The proxy; stops accepting on drop.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if accept_state.down.load(Ordering::SeqCst) {
                    reset(client);
                    continue;
                }
                let state = accept_state.clone();
                std::thread::spawn(move || serve(client, upstream_port, state));
            }
        });
        FaultProxy { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Queues faults for the next GET responses, in order.
    pub fn inject(&self, faults: &[Fault]) {
        self.state
            .faults
            .lock()
            .unwrap()
            .extend(faults.iter().copied());
    }

    /// Drops the faults not yet applied.
    pub fn clear(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Faults queued but not yet applied.
    pub fn pending(&self) -> usize {
        self.state.faults.lock().unwrap().len()
    }

    /// GET requests seen so far.
    pub fn gets(&self) -> u64 {
        self.state.gets.load(Ordering::SeqCst)
    }

    /// GET requests received so far, answered or not.
    pub fn gets_received(&self) -> u64 {
        self.state.gets_received.load(Ordering::SeqCst)
    }

    /// Every GET answered so far, in the order the proxy had their responses from upstream
    /// (a GET sent only after another one's response was received comes after it).
    pub fn gets_log(&self) -> Vec<LoggedGet> {
        self.state.log.lock().unwrap().clone()
    }

    /// Down: every connection is reset, including idle keep-alive ones at their next request.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Closes with RST (SO_LINGER 0).
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized, initialised linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// Reads one HTTP message head (through `\r\n\r\n`) and, by Content-Length, its body.
/// `None` at a clean EOF before any byte.
fn read_message(stream: &mut TcpStream, head_only_body: bool) -> Option<(Vec<u8>, Vec<u8>, bool)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = Vec::new();
    let mut delimited = true;
    match length {
        _ if head_only_body => {}
        Some(n) => {
            body.resize(n, 0);
            stream.read_exact(&mut body).ok()?;
        }
        None if text.starts_with("http/") => {
            // A response delimited by close.
            stream.read_to_end(&mut body).ok()?;
            delimited = false;
        }
        None => {}
    }
    Some((head, body, delimited))
}

fn serve(mut client: TcpStream, upstream_port: u16, state: Arc<State>) {
    let mut upstream: Option<TcpStream> = None;
    loop {
        let Some((head, body, _)) = read_message(&mut client, false) else {
            return;
        };
        if state.down.load(Ordering::SeqCst) {
            reset(client);
            return;
        }
        let is_get = head.starts_with(b"GET ");
        if is_get {
            state.gets_received.fetch_add(1, Ordering::SeqCst);
        }
        let is_head = head.starts_with(b"HEAD ");
        // Relay to the upstream (reconnecting once if a kept connection died).
        let mut response = None;
        for _ in 0..2 {
            if upstream.is_none() {
                upstream = TcpStream::connect(("127.0.0.1", upstream_port)).ok();
            }
            let Some(up) = upstream.as_mut() else { break };
            if up.write_all(&head).is_ok() && up.write_all(&body).is_ok() {
                if let Some(r) = read_message(up, is_head) {
                    response = Some(r);
                    break;
                }
            }
            upstream = None;
        }
        let Some((rhead, mut rbody, delimited)) = response else {
            reset(client);
            return;
        };
        if !delimited {
            upstream = None;
        }
        let fault = if is_get {
            state.gets.fetch_add(1, Ordering::SeqCst);
            state
                .log
                .lock()
                .unwrap()
                .push(logged_get(&head, rbody.len()));
            state.faults.lock().unwrap().pop_front()
        } else {
            None
        };
        let half = rbody.len() / 2;
        match fault {
            None => {
                if client.write_all(&rhead).is_err() || client.write_all(&rbody).is_err() {
                    return;
                }
                if !delimited {
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
            }
            Some(Fault::Reset) => {
                reset(client);
                return;
            }
            Some(Fault::Stall(duration)) => {
                let _ = client.write_all(&rhead);
                let _ = client.write_all(&rbody[..half]);
                std::thread::sleep(duration);
                return;
            }
            Some(Fault::Truncate) => {
                let _ = client.write_all(&rhead);
                let _ = client.write_all(&rbody[..half]);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::SlowDown) => {
                let error = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                let head = format!(
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
                    error.len()
                );
                if client.write_all(head.as_bytes()).is_err() || client.write_all(error).is_err() {
                    return;
                }
            }
            Some(Fault::Flip) => {
                if let Some(byte) = rbody.get_mut(half) {
                    *byte ^= 0xFF;
                }
                if client.write_all(&rhead).is_err() || client.write_all(&rbody).is_err() {
                    return;
                }
            }
        }
    }
}

fn logged_get(head: &[u8], body_bytes: usize) -> LoggedGet {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines();
    let target = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let range = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    LoggedGet {
        target,
        range,
        body_bytes,
    }
}
