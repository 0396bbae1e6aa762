//! A small HTTP/1.1 client for one endpoint, owned by one shard: keep-alive connections on
//! glommio sockets (io_uring), plain or TLS (`futures-rustls`), request heads written by the
//! caller, response heads parsed with `httparse`, and bodies read straight into the caller's
//! buffer.
//!
//! Copies per body byte: the kernel copies it from the socket buffer into the caller's slice
//! (glommio's `poll_read` recv()s into it); TLS adds one decrypt copy. The only other copy is
//! the few body bytes that arrive in the same read as the response head (at most
//! [`HEAD_READ`]), moved once from the head buffer.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;

use super::config::S3Tuning;
use super::credentials::Shared;
use crate::store::RetryCause;

/// Bytes asked for per read while the response head is incomplete. S3 heads are under 1 KiB,
/// so the body bytes that share the head's read (and get copied once) stay few.
pub const HEAD_READ: usize = 2048;
/// Longest response head accepted (S3 sends under 1 KiB); also the head buffer per connection.
const MAX_HEAD: usize = 16 << 10;
/// Longest body read into memory (error documents, listings); larger ones are not read and the
/// connection is dropped.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// Most response headers parsed.
const MAX_HEADERS: usize = 64;

/// Why one exchange failed before a complete response was in hand. All of these are worth a
/// retry on a fresh connection.
#[derive(Debug)]
pub enum HttpError {
    /// No connection could be made (refused, unreachable, TLS handshake failed).
    Connect(SocketAddr, io::Error),
    /// The connection broke (reset, closed mid-response, a timeout while reading or writing).
    Io(io::Error),
    /// The body ended before its Content-Length.
    Truncated { expected: u64, got: u64 },
    /// The server sent something that is not valid HTTP/1.1 for this request.
    Protocol(String),
}

impl HttpError {
    /// Which retry cause this failure counts under.
    pub fn retry_cause(&self) -> RetryCause {
        match self {
            HttpError::Io(e) if e.kind() == io::ErrorKind::TimedOut => RetryCause::Timeout,
            HttpError::Connect(..) | HttpError::Io(_) => RetryCause::Connection,
            HttpError::Truncated { .. } | HttpError::Protocol(_) => RetryCause::BadAnswer,
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(addr, e) => write!(f, "cannot connect to {addr}: {e}"),
            HttpError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                write!(f, "no data from the server in time: {e}")
            }
            HttpError::Io(e) => write!(f, "connection failed: {e}"),
            HttpError::Truncated { expected, got } => {
                write!(f, "body ended after {got} of {expected} bytes")
            }
            HttpError::Protocol(what) => write!(f, "bad response: {what}"),
        }
    }
}

/// `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL `None` for `*`); `bytes */TOTAL` on 416.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    pub range: Option<(u64, u64)>,
    pub total: Option<u64>,
}

/// The parts of a response head the S3 store looks at.
#[derive(Debug, Default)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub content_range: Option<ContentRange>,
    /// `x-amz-bucket-region`: where the bucket really is (sent with redirects and some errors).
    pub bucket_region: Option<String>,
    chunked: bool,
    close: bool,
}

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub head: Head,
    /// The body, when it was not read into the caller's buffer (error documents, listings).
    pub body: Vec<u8>,
    /// True when a 2xx body of exactly the caller's buffer length was read into that buffer.
    pub filled: bool,
}

/// What one request writes: the head (written by the caller) and an optional small body.
pub struct Request<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    /// A HEAD request: the response has no body whatever its Content-Length says.
    pub head_only: bool,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// One keep-alive connection and its head buffer.
struct Conn {
    stream: Stream,
    head: Vec<u8>,
}

/// How an exchange failed, and whether a fresh connection may simply be tried at once.
struct Failure {
    error: HttpError,
    /// The connection died before any response byte (typically an idle keep-alive connection the
    /// server had closed): safe and cheap to retry immediately on a new connection.
    stale: bool,
}

/// The per-shard client for one endpoint.
pub struct HttpClient {
    shared: Arc<Shared>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    tuning: S3Tuning,
    idle: RefCell<Vec<Conn>>,
    next_addr: Cell<usize>,
}

impl HttpClient {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
        tuning: S3Tuning,
    ) -> HttpClient {
        HttpClient {
            shared,
            tls: tls.map(|(config, name)| (TlsConnector::from(config), name)),
            tuning,
            idle: RefCell::new(Vec::new()),
            next_addr: Cell::new(0),
        }
    }

    /// Sends `request` and reads the response. A 2xx body whose length equals `direct.len()` is
    /// read straight into `direct` (`Response::filled`); other bodies up to 1 MiB come back in
    /// `Response::body`. Idle connections that turn out dead are replaced transparently.
    pub async fn send(
        &self,
        request: &Request<'_>,
        mut direct: Option<&mut [u8]>,
    ) -> Result<Response, HttpError> {
        loop {
            let pooled = self.idle.borrow_mut().pop();
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            match exchange(&mut conn, request, direct.as_deref_mut()).await {
                Ok((response, reusable)) => {
                    if reusable {
                        let mut idle = self.idle.borrow_mut();
                        if idle.len() < self.tuning.max_idle_connections {
                            idle.push(conn);
                        }
                    }
                    return Ok(response);
                }
                Err(failure) if reused && failure.stale => {
                    tracing::trace!("idle connection was closed by the server; reconnecting");
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    /// Drops every idle connection (after the server was seen failing).
    pub fn drop_idle(&self) {
        self.idle.borrow_mut().clear();
    }

    async fn connect(&self) -> Result<Conn, HttpError> {
        let addrs = self.shared.addrs.load();
        let index = self.next_addr.get();
        self.next_addr.set(index.wrapping_add(1));
        let addr = addrs[index % addrs.len()];
        let tcp = TcpStream::connect_timeout(addr, self.tuning.connect_timeout)
            .await
            .map_err(|e| HttpError::Connect(addr, e.into()))?;
        let setup = |r: glommio::Result<(), ()>| r.map_err(|e| HttpError::Connect(addr, e.into()));
        setup(tcp.set_nodelay(true))?;
        setup(tcp.set_read_timeout(Some(self.tuning.read_timeout)))?;
        setup(tcp.set_write_timeout(Some(self.tuning.read_timeout)))?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| HttpError::Connect(addr, e))?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            stream,
            head: vec![0; MAX_HEAD],
        })
    }
}

fn broken(error: io::Error, stale: bool) -> Failure {
    let stale = stale
        && matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        );
    Failure {
        error: HttpError::Io(error),
        stale,
    }
}

fn protocol(what: impl Into<String>) -> Failure {
    Failure {
        error: HttpError::Protocol(what.into()),
        stale: false,
    }
}

/// One request/response on `conn`. Returns the response and whether the connection may be
/// reused.
async fn exchange(
    conn: &mut Conn,
    request: &Request<'_>,
    direct: Option<&mut [u8]>,
) -> Result<(Response, bool), Failure> {
    let stream = &mut conn.stream;
    stream
        .write_all(request.head)
        .await
        .map_err(|e| broken(e, true))?;
    if !request.body.is_empty() {
        stream
            .write_all(request.body)
            .await
            .map_err(|e| broken(e, true))?;
    }
    stream.flush().await.map_err(|e| broken(e, true))?;

    // Read until the head is complete.
    let mut filled = 0;
    let (head, head_len) = loop {
        if filled > 0 {
            if let Some(parsed) = parse_head(&conn.head[..filled])? {
                break parsed;
            }
        }
        if filled == conn.head.len() {
            return Err(protocol(format!("response head over {MAX_HEAD} bytes")));
        }
        let end = (filled + HEAD_READ).min(conn.head.len());
        let n = stream
            .read(&mut conn.head[filled..end])
            .await
            .map_err(|e| broken(e, filled == 0))?;
        if n == 0 {
            return Err(broken(
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection before answering",
                ),
                filled == 0,
            ));
        }
        filled += n;
    };
    let early = &conn.head[head_len..filled];
    let mut reusable = !head.close;

    let no_body = request.head_only || head.status == 204 || head.status == 304;
    if no_body {
        if !early.is_empty() {
            reusable = false;
        }
        return Ok((
            Response {
                head,
                body: Vec::new(),
                filled: false,
            },
            reusable,
        ));
    }
    let success = (200..300).contains(&head.status);
    if head.chunked {
        // S3 never chunks object bodies; listings and error documents may come chunked (AWS
        // sends ListObjectsV2 answers so): read those when small, else skip the connection.
        if success && direct.is_some() {
            return Err(protocol(
                "chunked body where a sized object body was expected",
            ));
        }
        let body = read_chunked(stream, early, MAX_SMALL_BODY as usize).await?;
        let reusable = reusable && body.is_some();
        return Ok((
            Response {
                head,
                body: body.unwrap_or_default(),
                filled: false,
            },
            reusable,
        ));
    }
    match (direct, head.content_length) {
        (Some(dest), Some(length)) if success && length == dest.len() as u64 => {
            read_body(stream, early, dest).await?;
            Ok((
                Response {
                    head,
                    body: Vec::new(),
                    filled: true,
                },
                reusable,
            ))
        }
        (_, Some(length)) if length <= MAX_SMALL_BODY => {
            let mut body = vec![0; length as usize];
            read_body(stream, early, &mut body).await?;
            Ok((
                Response {
                    head,
                    body,
                    filled: false,
                },
                reusable,
            ))
        }
        // Too large to hold, of the wrong size for `direct`, or delimited by close: leave it
        // unread and drop the connection.
        _ => Ok((
            Response {
                head,
                body: Vec::new(),
                filled: false,
            },
            false,
        )),
    }
}

/// Fills `dest`, a body of exactly `dest.len()` bytes (its Content-Length): first with `early`,
/// the body bytes that came in with the head, then from `stream`.
async fn read_body(stream: &mut Stream, early: &[u8], dest: &mut [u8]) -> Result<(), Failure> {
    if early.len() > dest.len() {
        return Err(protocol("more body bytes than Content-Length"));
    }
    dest[..early.len()].copy_from_slice(early);
    let mut got = early.len();
    while got < dest.len() {
        let n = stream
            .read(&mut dest[got..])
            .await
            .map_err(|e| broken(e, false))?;
        if n == 0 {
            return Err(Failure {
                error: HttpError::Truncated {
                    expected: dest.len() as u64,
                    got: got as u64,
                },
                stale: false,
            });
        }
        got += n;
    }
    Ok(())
}

/// Reads a chunked body (`early`: its bytes that came in with the head), trailers included;
/// `None` once it passes `limit` bytes (the rest is left unread: drop the connection).
async fn read_chunked<S: AsyncRead + Unpin>(
    stream: &mut S,
    early: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, Failure> {
    let mut raw = Chunked {
        stream,
        buffer: early.to_vec(),
        at: 0,
    };
    let mut body = Vec::new();
    loop {
        let line = raw.line().await?;
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|size| usize::from_str_radix(size.trim(), 16).ok())
            .ok_or_else(|| protocol("bad chunk size line"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !raw.line().await?.is_empty() {}
            return Ok(Some(body));
        }
        if body.len() + size > limit {
            return Ok(None);
        }
        raw.fill(size + 2).await?;
        body.extend_from_slice(&raw.buffer[raw.at..raw.at + size]);
        if &raw.buffer[raw.at + size..raw.at + size + 2] != b"\r\n" {
            return Err(protocol("chunk not followed by CRLF"));
        }
        raw.at += size + 2;
    }
}

/// The raw bytes of a chunked body being read: what has arrived, and how far it is parsed.
struct Chunked<'a, S> {
    stream: &'a mut S,
    buffer: Vec<u8>,
    at: usize,
}

impl<S: AsyncRead + Unpin> Chunked<'_, S> {
    /// Reads until `need` unparsed bytes are there.
    async fn fill(&mut self, need: usize) -> Result<(), Failure> {
        if self.at > 0 {
            self.buffer.drain(..self.at);
            self.at = 0;
        }
        let mut read = [0u8; 8192];
        while self.buffer.len() < need {
            let n = self
                .stream
                .read(&mut read)
                .await
                .map_err(|e| broken(e, false))?;
            if n == 0 {
                return Err(protocol("the connection closed inside a chunked body"));
            }
            self.buffer.extend_from_slice(&read[..n]);
        }
        Ok(())
    }

    /// The next line, without its CRLF (a chunk size or a trailer).
    async fn line(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            let unparsed = &self.buffer[self.at..];
            if let Some(end) = unparsed.windows(2).position(|w| w == b"\r\n") {
                let line = unparsed[..end].to_vec();
                self.at += end + 2;
                return Ok(line);
            }
            if unparsed.len() > 4096 {
                return Err(protocol("chunk size line over 4 KiB"));
            }
            let have = unparsed.len();
            self.fill(have + 1).await?;
        }
    }
}

/// Parses a complete head, or `None` while it is incomplete.
fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(protocol(format!("unparsable response head: {e}"))),
    };
    let mut head = Head {
        status: response.code.unwrap_or(0),
        close: response.version == Some(0),
        ..Head::default()
    };
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| protocol(format!("header {} is not UTF-8", header.name)))?
            .trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse()
                .map_err(|_| protocol(format!("bad Content-Length `{value}`")))?;
            if head.content_length.is_some_and(|l| l != length) {
                return Err(protocol("conflicting Content-Length headers"));
            }
            head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case("content-range") {
            head.content_range = Some(
                parse_content_range(value)
                    .ok_or_else(|| protocol(format!("bad Content-Range `{value}`")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked |= value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                head.close = true;
            } else if value.contains("keep-alive") {
                head.close = false;
            }
        } else if name.eq_ignore_ascii_case("x-amz-bucket-region") {
            head.bucket_region = Some(value.to_string());
        }
    }
    Ok(Some((head, head_len)))
}

/// `bytes 0-99/1000`, `bytes 0-99/*`, `bytes */1000`.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (first, last) = r.split_once('-')?;
            let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
            if last < first {
                return None;
            }
            Some((first, last))
        }
    };
    Some(ContentRange { range, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_read_whole_or_not_at_all() {
        let read = |early: &[u8], rest: &[u8], limit: usize| {
            let mut stream = futures::io::Cursor::new(rest.to_vec());
            futures::executor::block_on(read_chunked(&mut stream, early, limit))
                .map_err(|f| f.error.to_string())
        };
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in [0, 1, 4, 9, 20, wire.len()] {
            let (early, rest) = wire.split_at(split);
            assert_eq!(
                read(early, rest, 1 << 20).unwrap().as_deref(),
                Some(&b"hello, world"[..])
            );
        }
        assert_eq!(read(b"", wire, 8).unwrap(), None);
        assert!(read(b"", b"zz\r\nhello\r\n0\r\n\r\n", 100).is_err());
        assert!(read(b"", b"5\r\nhel", 100).is_err());
        assert!(read(b"", b"5\r\nhelloXX0\r\n\r\n", 100).is_err());
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some(ContentRange {
                range: Some((0, 99)),
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes */1000"),
            Some(ContentRange {
                range: None,
                total: Some(1000)
            })
        );
        assert_eq!(parse_content_range("bytes 5-1/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn heads_parse_and_reject_garbage() {
        let raw = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nContent-Range: bytes 0-9/20\r\n\r\nabc";
        let (head, len) = parse_head(raw).ok().unwrap().unwrap();
        assert_eq!(
            (head.status, head.content_length, len),
            (206, Some(10), raw.len() - 3)
        );
        assert!(!head.close);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .ok()
            .unwrap()
            .is_none());
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
    }
}
