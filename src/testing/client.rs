//! The suite's HTTP client: one connection per request, and a reader of `text/event-stream`
//! written here rather than taken from the crate, so that it checks the crate's output
//! independently.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::harness::TIMEOUT;

/// One parsed event as a client sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ev {
    pub(crate) id: Option<String>,
    pub(crate) data: String,
}

/// One block of an event stream, as [`SseParser`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Block {
    /// A block with at least one field line (whatever the fields).
    Event(Ev),
    /// A block of comment lines only: the text of each after its `:`.
    Comment(Vec<String>),
}

impl Block {
    /// Whether this is the layer's eviction comment ([`crate::sse::EVICTED_COMMENT`]), alone in
    /// its block.
    fn is_evicted_comment(&self) -> bool {
        match self {
            Block::Comment(lines) => {
                lines.len() == 1
                    && format!(":{}\n\n", lines[0]).as_bytes() == crate::sse::EVICTED_COMMENT
            }
            Block::Event(_) => false,
        }
    }
}

/// A reader of `text/event-stream` bytes in any chunks: line ends are LF, CR LF or CR (a CR LF
/// may be split across chunks); `id` and `data` are kept (data lines joined with LF, one space
/// after the colon removed), other fields are ignored; a blank line ends a block. Invalid UTF-8
/// is replaced, not refused.
#[derive(Debug, Default)]
struct SseParser {
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
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete block, if the bytes pushed so far hold one.
    fn next_block(&mut self) -> Option<Block> {
        use bytes::Buf;
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

/// An open SSE response, read event by event.
pub(crate) struct SseConn {
    pub(crate) status: http::StatusCode,
    pub(crate) headers: http::HeaderMap,
    body: Incoming,
    parser: SseParser,
    /// Blocks of comments only received (keep-alives, the eviction comment).
    pub(crate) comments: usize,
    /// Data frames received: the chunks the server wrote.
    pub(crate) frames: usize,
    /// Whether the layer's eviction comment ([`crate::sse::EVICTED_COMMENT`]) came.
    pub(crate) evicted: bool,
    /// Whether the body ended with an error (a connection cut before the body's end) rather
    /// than cleanly.
    pub(crate) errored: bool,
}

/// Sends `GET path` with the given `Last-Event-ID` on a connection of its own, and waits (for
/// at most [`TIMEOUT`]) for the response head; fails the test when there is none.
pub(crate) async fn get(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseConn {
    let send = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::get(path).header(http::header::HOST, addr.to_string());
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("a valid request");
        Ok::<_, crate::BoxError>(sender.send_request(req).await?)
    };
    let res = tokio::time::timeout(TIMEOUT, send)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response head within {TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    SseConn::new(res)
}

impl SseConn {
    fn new(res: http::Response<Incoming>) -> Self {
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
        }
    }

    /// The `resumable-sse-reason` header.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.headers
            .get(crate::REASON_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    /// `Ok` when the answer is `status` with `reason`; otherwise what came, for a report that
    /// lists every failing case rather than stop at the first.
    pub(crate) fn check_answer(
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
    async fn next_block(&mut self) -> Option<Block> {
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
                        self.parser.push(&data);
                    }
                }
            }
        }
    }

    /// The next event, or `None` at the end of the body. Comments are counted, not returned.
    pub(crate) async fn next(&mut self) -> Option<Ev> {
        loop {
            match self.next_block().await? {
                Block::Event(ev) => return Some(ev),
                Block::Comment(_) => {}
            }
        }
    }

    /// Reads until `n` comment blocks have come on this connection in all; fails if an event
    /// or the end comes first.
    pub(crate) async fn comments_before_any_event(&mut self, n: usize) {
        while self.comments < n {
            match self.next_block().await {
                Some(Block::Comment(_)) => {}
                Some(Block::Event(ev)) => panic!("an event before {n} comments: {ev:?}"),
                None => panic!("the end before {n} comments"),
            }
        }
    }

    /// Reads `n` events.
    pub(crate) async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.expect("stream ended early"));
        }
        out
    }

    /// Reads to the end of the body.
    pub(crate) async fn collect(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev);
        }
        out
    }
}

/// The data of each event.
pub(crate) fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

/// The data of the `/tokens` events `range`.
pub(crate) fn expected_tokens(range: std::ops::Range<usize>) -> Vec<String> {
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
