//! An HTTP client of event streams for tests: one connection per request, and a reader of
//! `text/event-stream` written here rather than taken from the crate, so that it checks the
//! crate's output independently.
//!
//! The suite reads the layer's answers with it, and so do the crate's own integration tests;
//! tests of a store or of an application can too:
//!
//! ```no_run
//! use resumable_sse::testing::client::{datas, expected_tokens, get};
//!
//! # async fn run(addr: std::net::SocketAddr) {
//! let mut conn = get(addr, "/tokens?session_id=s&n=5", None).await;
//! assert_eq!(conn.status, 200);
//! let first = conn.take(2).await;
//! drop(conn); // the connection closes mid-stream
//! let last = first[1].id.as_deref();
//! let rest = get(addr, "/tokens?session_id=s&n=5", last).await.collect().await;
//! assert_eq!(datas(&rest), expected_tokens(2..5));
//! # }
//! ```
//!
//! Every wait is bounded by [`TIMEOUT`]: a response head or a frame that does not come in time
//! fails the test (a panic) rather than hang it.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::wait::TIMEOUT;
use crate::BoxError;

/// How many bytes of a body [`SseConn::first_bytes`] keeps.
const FIRST_BYTES: usize = 64;

/// One parsed event as a client sees it: the fields the tests look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ev {
    /// The value of its last `id` field, if it had one.
    pub id: Option<String>,
    /// The value of its last `event` field (its type), if it had one.
    pub event: Option<String>,
    /// Its `data` lines, joined with LF (empty without any).
    pub data: String,
}

/// One block of an event stream (what comes before a blank line), as [`SseParser`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// A block with at least one field line (whatever the fields).
    Event(Ev),
    /// A block of comment lines only: the text of each after its `:`.
    Comment(Vec<String>),
}

impl Block {
    /// Whether this is the layer's eviction comment ([`EVICTED_COMMENT`]), alone in its block.
    ///
    /// [`EVICTED_COMMENT`]: crate::sse::EVICTED_COMMENT
    pub fn is_evicted_comment(&self) -> bool {
        match self {
            Block::Comment(lines) => {
                lines.len() == 1
                    && format!(":{}\n\n", lines[0]).as_bytes() == crate::sse::EVICTED_COMMENT
            }
            Block::Event(_) => false,
        }
    }
}

/// A reader of `text/event-stream` bytes, pushed in any chunks.
///
/// Line ends are LF, CR LF or CR (a CR LF may be split across chunks); `id`, `event` and `data`
/// are kept (data lines joined with LF, one space after the colon removed), other fields are
/// ignored; a blank line ends a block. Invalid UTF-8 is replaced, not refused.
///
/// ```
/// use resumable_sse::testing::client::{Block, SseParser};
///
/// let mut parser = SseParser::default();
/// parser.push(b"id: 1\ndata: a\r");
/// assert_eq!(parser.next_block(), None);
/// parser.push(b"\ndata: b\n\n: keep-alive\n\n");
/// let Some(Block::Event(ev)) = parser.next_block() else { panic!() };
/// assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some("1"), "a\nb"));
/// assert_eq!(parser.next_block(), Some(Block::Comment(vec![" keep-alive".to_owned()])));
/// assert!(parser.holds_nothing());
/// ```
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes not yet split into lines.
    buf: BytesMut,
    /// The last line ended with CR: an LF that follows belongs to it.
    after_cr: bool,
    ev: Ev,
    has_field: bool,
    has_data: bool,
    comment_lines: Vec<String>,
}

impl SseParser {
    /// Adds the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete block, if the bytes pushed so far hold one.
    pub fn next_block(&mut self) -> Option<Block> {
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.after_cr = false;
            }
            let end = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
            let line = self.buf.split_to(end + 1);
            self.after_cr = line[end] == b'\r';
            if let Some(block) = self.line(&String::from_utf8_lossy(&line[..end])) {
                return Some(block);
            }
        }
    }

    /// The bytes pushed and not yet split into lines.
    pub fn unparsed(&self) -> &[u8] {
        &self.buf
    }

    /// Whether every byte pushed so far was part of a complete block.
    pub fn holds_nothing(&self) -> bool {
        self.buf.is_empty() && !self.has_field && self.comment_lines.is_empty()
    }

    fn line(&mut self, line: &str) -> Option<Block> {
        if line.is_empty() {
            if std::mem::take(&mut self.has_field) {
                self.has_data = false;
                self.comment_lines.clear();
                return Some(Block::Event(std::mem::take(&mut self.ev)));
            }
            if !self.comment_lines.is_empty() {
                return Some(Block::Comment(std::mem::take(&mut self.comment_lines)));
            }
            return None;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comment_lines.push(comment.to_owned());
            return None;
        }
        self.has_field = true;
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.ev.id = Some(value.to_owned()),
            "event" => self.ev.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.ev.data.push('\n');
                }
                self.ev.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// Every complete block of a whole stream (an unterminated last block is dropped).
pub fn parse_blocks(bytes: &[u8]) -> Vec<Block> {
    let mut parser = SseParser::default();
    parser.push(bytes);
    std::iter::from_fn(|| parser.next_block()).collect()
}

/// Every event of a whole stream; comments are skipped.
pub fn parse_events(bytes: &[u8]) -> Vec<Ev> {
    parse_blocks(bytes)
        .into_iter()
        .filter_map(|block| match block {
            Block::Event(ev) => Some(ev),
            Block::Comment(_) => None,
        })
        .collect()
}

/// An open response, read event by event: its head, and what came of its body so far.
pub struct SseConn {
    /// The response's status.
    pub status: http::StatusCode,
    /// The response's headers.
    pub headers: http::HeaderMap,
    body: Incoming,
    parser: SseParser,
    /// Blocks of comments only received (keep-alives, the eviction comment).
    pub comments: usize,
    /// Data frames received: the chunks the server wrote.
    pub frames: usize,
    /// Whether the layer's eviction comment ([`EVICTED_COMMENT`](crate::sse::EVICTED_COMMENT))
    /// came.
    pub evicted: bool,
    /// Whether the body ended with an error (a connection cut before the body's end) rather
    /// than cleanly.
    pub errored: bool,
    /// The first bytes of the body (up to 64), as they came over the wire.
    pub first_bytes: Vec<u8>,
}

impl std::fmt::Debug for SseConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseConn")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("comments", &self.comments)
            .field("frames", &self.frames)
            .field("evicted", &self.evicted)
            .field("errored", &self.errored)
            .finish_non_exhaustive()
    }
}

/// Sends `GET path` with the given `Last-Event-ID` and extra `headers` on a connection of its
/// own, and waits for the response head.
///
/// An error is a request that could not be made or sent: no connection, one that closed before
/// any answer, an invalid path or header.
///
/// # Panics
///
/// When no response head (nor error) came within [`TIMEOUT`].
pub async fn request(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<SseConn, BoxError> {
    let mut req = http::Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let send = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok::<_, BoxError>(sender.send_request(req).await?)
    };
    let res = tokio::time::timeout(TIMEOUT, send)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response head within {TIMEOUT:?}"))?;
    Ok(SseConn::new(res))
}

/// Sends `GET path` with the given `Last-Event-ID` on a connection of its own, and waits for
/// the response head.
///
/// # Panics
///
/// When there is no response head within [`TIMEOUT`], or no response at all (see
/// [`request`]).
pub async fn get(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseConn {
    request(addr, path, last_event_id, &[])
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

impl SseConn {
    /// Reads `res` (a response whose head came) as an event stream.
    pub fn new(res: http::Response<Incoming>) -> Self {
        let (parts, body) = res.into_parts();
        SseConn {
            status: parts.status,
            headers: parts.headers,
            body,
            parser: SseParser::default(),
            comments: 0,
            frames: 0,
            evicted: false,
            errored: false,
            first_bytes: Vec::new(),
        }
    }

    /// The [`REASON_HEADER`](crate::REASON_HEADER) (`resumable-sse-reason`) of the answer.
    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get(crate::REASON_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    /// `Ok` when the answer is `status` with `reason` (in `resumable-sse-reason`); otherwise
    /// what came, for a report that lists every failing case rather than stop at the first.
    pub fn check_answer(
        &self,
        what: &str,
        status: u16,
        reason: Option<&str>,
    ) -> Result<(), String> {
        if self.status != status || self.reason() != reason {
            return Err(format!(
                "{what}: answered {} with reason {:?}, expected {status} with {reason:?}",
                self.status,
                self.reason()
            ));
        }
        Ok(())
    }

    /// The next block, or `None` at the end of the body (an unterminated last block is
    /// dropped). Comments are counted here.
    ///
    /// # Panics
    ///
    /// When nothing comes within [`TIMEOUT`].
    pub async fn next_block(&mut self) -> Option<Block> {
        loop {
            if let Some(block) = self.parser.next_block() {
                if let Block::Comment(_) = block {
                    self.comments += 1;
                    self.evicted |= block.is_evicted_comment();
                }
                return Some(block);
            }
            match tokio::time::timeout(TIMEOUT, self.body.frame()).await {
                Err(_) => panic!("nothing received within {TIMEOUT:?}"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => {
                    self.errored = true;
                    return None;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.frames += 1;
                        let room = FIRST_BYTES.saturating_sub(self.first_bytes.len());
                        self.first_bytes
                            .extend_from_slice(&data[..room.min(data.len())]);
                        self.parser.push(&data);
                    }
                }
            }
        }
    }

    /// The next event, or `None` at the end of the body. Comments are counted, not returned.
    ///
    /// # Panics
    ///
    /// When nothing comes within [`TIMEOUT`].
    pub async fn next(&mut self) -> Option<Ev> {
        loop {
            match self.next_block().await? {
                Block::Event(ev) => return Some(ev),
                Block::Comment(_) => {}
            }
        }
    }

    /// Reads until `n` comment blocks have come on this connection in all.
    ///
    /// # Panics
    ///
    /// When an event or the end comes first, or nothing comes within [`TIMEOUT`].
    pub async fn comments_before_any_event(&mut self, n: usize) {
        while self.comments < n {
            match self.next_block().await {
                Some(Block::Comment(_)) => {}
                Some(Block::Event(ev)) => panic!("an event before {n} comments: {ev:?}"),
                None => panic!("the end before {n} comments"),
            }
        }
    }

    /// Reads `n` events.
    ///
    /// # Panics
    ///
    /// When the body ends first, or nothing comes within [`TIMEOUT`].
    pub async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.expect("stream ended early"));
        }
        out
    }

    /// Reads to the end of the body.
    ///
    /// # Panics
    ///
    /// When nothing comes within [`TIMEOUT`].
    pub async fn collect(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev);
        }
        out
    }

    /// The rest of the body, as bytes: what was received and not read as events, then what
    /// follows.
    ///
    /// # Panics
    ///
    /// When the body does not end within [`TIMEOUT`], or ends with an error.
    pub async fn bytes(self) -> Bytes {
        let rest = tokio::time::timeout(TIMEOUT, self.body.collect())
            .await
            .expect("body in time")
            .expect("body received")
            .to_bytes();
        let mut all = BytesMut::from(self.parser.unparsed());
        all.extend_from_slice(&rest);
        all.freeze()
    }
}

/// The data of each event.
pub fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

/// The data of the token events `range`: `token <i>` for each `i` (the suite's `/tokens`
/// route, and the `chat` example's `/chat?tokens=N`).
pub fn expected_tokens(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("token {i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(chunks: &[&[u8]]) -> Vec<Block> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.push(chunk);
            out.extend(std::iter::from_fn(|| parser.next_block()));
        }
        out
    }

    #[test]
    fn the_reader_takes_any_chunking_and_any_line_end() {
        let ev = |id: &str, data: &str| {
            Block::Event(Ev {
                id: Some(id.to_owned()),
                data: data.to_owned(),
                ..Ev::default()
            })
        };
        assert_eq!(
            blocks(&[
                b"id: a\r",
                b"\ndata: x\rdata:y\n\n: ping\n\nid: b\ndata: z\n",
                b"\n"
            ]),
            [
                ev("a", "x\ny"),
                Block::Comment(vec![" ping".to_owned()]),
                ev("b", "z")
            ]
        );
        assert!(blocks(&[crate::sse::EVICTED_COMMENT])[0].is_evicted_comment());
    }
}
