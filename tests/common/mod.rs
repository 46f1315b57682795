//! Test harness, shared by every test binary: an axum app behind the layer on a real TCP socket,
//! an SSE client over hyper with the tests' own event-stream reader, and the waits with a
//! deadline that tests use instead of fixed sleeps.
#![allow(dead_code)]

pub mod chaos_proxy;
pub mod faulty;
pub mod redis;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing;
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use resumable_sse::store::{SessionInfo, Store};
use resumable_sse::{MemoryStore, ResumableSseLayer, SessionKey};
use tokio::sync::mpsc;

/// The longest any wait of the tests takes before it fails the test: for a response head, a
/// frame, a condition.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Calls counted per route, and the test-controlled event sources of `/gated`.
#[derive(Clone, Default)]
pub struct Inner {
    pub calls: Arc<AtomicUsize>,
    gates: Arc<Mutex<HashMap<String, mpsc::UnboundedReceiver<GateMsg>>>>,
    senders: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<GateMsg>>>>,
    pub generators_dropped: Arc<AtomicUsize>,
}

pub enum GateMsg {
    Data(String),
    Fail,
}

impl Inner {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Prepares `/gated?session_id=key`: events are released by [`Inner::send`].
    pub fn gate(&self, key: &str) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.gates.lock().unwrap().insert(key.to_owned(), rx);
        self.senders.lock().unwrap().insert(key.to_owned(), tx);
    }

    pub fn send(&self, key: &str, data: impl Into<String>) {
        let _ = self.senders.lock().unwrap()[key].send(GateMsg::Data(data.into()));
    }

    pub fn fail(&self, key: &str) {
        let _ = self.senders.lock().unwrap()[key].send(GateMsg::Fail);
    }

    /// Ends the gated stream.
    pub fn end(&self, key: &str) {
        self.senders.lock().unwrap().remove(key);
    }

    pub fn generators_dropped(&self) -> usize {
        self.generators_dropped.load(Ordering::SeqCst)
    }
}

struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// `GET /tokens?n=N&interval_ms=MS`: N events `token 0`..`token N-1`, with inner ids the layer
/// must replace.
async fn tokens(
    State(inner): State<Inner>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    inner.calls.fetch_add(1, Ordering::SeqCst);
    let n: usize = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(10);
    let interval = q
        .get("interval_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    Sse::new(stream::iter(0..n).then(move |i| async move {
        if interval > 0 {
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
        Ok(Event::default()
            .id(format!("inner-{i}"))
            .data(format!("token {i}")))
    }))
}

/// `GET /gated?session_id=K`: events as the test releases them.
async fn gated(
    State(inner): State<Inner>,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    inner.calls.fetch_add(1, Ordering::SeqCst);
    let key = q.get("session_id").cloned().unwrap_or_default();
    let Some(rx) = inner.gates.lock().unwrap().remove(&key) else {
        return (axum::http::StatusCode::NOT_FOUND, "no gate").into_response();
    };
    let guard = DropCounter(inner.generators_dropped.clone());
    let s = stream::unfold((rx, guard), |(mut rx, guard)| async move {
        match rx.recv().await? {
            GateMsg::Data(d) => Some((Ok(Event::default().data(d)), (rx, guard))),
            GateMsg::Fail => Some((Err(std::io::Error::other("generator failed")), (rx, guard))),
        }
    });
    Sse::new(s).into_response()
}

/// The data of event `i` of `/sized?bytes=B`: `"<i>:"` padded with `x` so that the layer's
/// encoding of the event (`id: <epoch>-<i + 1>`, the data line, the blank line) is exactly
/// `bytes` long. The overhead is measured with the crate's own encoder, not assumed.
pub fn sized_data(i: usize, bytes: usize) -> String {
    use resumable_sse::sse::{encode_event, EventRef};
    use resumable_sse::{Epoch, EventId};
    let id = EventId {
        epoch: Epoch::from_raw(1),
        seq: i as u64 + 1,
    }
    .to_string();
    let empty = EventRef {
        event: b"",
        data: Some(b""),
        retry: None,
    };
    let overhead = encode_event(id.as_bytes(), &empty).len();
    let prefix = format!("{i}:");
    let len = bytes
        .checked_sub(overhead)
        .filter(|&len| len >= prefix.len())
        .unwrap_or_else(|| panic!("{bytes} bytes cannot hold event {i}"));
    let pad = len - prefix.len();
    prefix + &"x".repeat(pad)
}

/// `GET /sized?n=N&bytes=B`: N events, all at once, each encoded by the layer in exactly B bytes
/// (see [`sized_data`]).
async fn sized(
    State(inner): State<Inner>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    inner.calls.fetch_add(1, Ordering::SeqCst);
    let n: usize = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(10);
    let bytes: usize = q.get("bytes").and_then(|v| v.parse().ok()).unwrap_or(64);
    Sse::new(stream::iter(0..n).map(move |i| Ok(Event::default().data(sized_data(i, bytes)))))
}

async fn json(State(inner): State<Inner>) -> impl IntoResponse {
    inner.calls.fetch_add(1, Ordering::SeqCst);
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        r#"{"plain":"json"}"#,
    )
}

pub fn routes(inner: Inner) -> Router {
    Router::new()
        .route("/tokens", routing::get(tokens))
        .route("/gated", routing::get(gated))
        .route("/sized", routing::get(sized))
        .route("/json", routing::get(json))
        .with_state(inner)
}

pub struct App<St = MemoryStore> {
    pub addr: SocketAddr,
    pub inner: Inner,
    pub store: St,
}

/// Serves the test routes behind `layer` on a free port.
pub async fn serve_with<St: Store>(
    store: St,
    layer: impl FnOnce(ResumableSseLayer<St>) -> ResumableSseLayer<St>,
) -> App<St> {
    let inner = Inner::default();
    let app = routes(inner.clone()).layer(layer(ResumableSseLayer::new(store.clone())));
    let addr = serve_router(app).await;
    App { addr, inner, store }
}

pub async fn serve() -> App {
    serve_with(MemoryStore::new(), |l| l).await
}

pub async fn serve_router(app: Router) -> SocketAddr {
    serve_router_with_send_buffer(app, None).await
}

/// Serves `app` on a free port with `TCP_NODELAY` on every connection (Nagle plus delayed ACKs
/// would hold every multi-part write ~40 ms) and, if given, a small send buffer (so that a
/// client that stops reading stops the server's writes early).
pub async fn serve_router_with_send_buffer(app: Router, send_buffer: Option<u32>) -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = send_buffer {
        // Accepted connections inherit it.
        socket.set_send_buffer_size(size).unwrap();
    }
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Serves `GET /raw?session_id=..` behind the layer: a `200 text/event-stream` whose body is
/// `body()`'s chunks, as they are; counts the calls.
pub async fn serve_raw<F, S>(
    store: MemoryStore,
    send_buffer: Option<u32>,
    layer: impl FnOnce(ResumableSseLayer<MemoryStore>) -> ResumableSseLayer<MemoryStore>,
    body: F,
) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn() -> S + Clone + Send + Sync + 'static,
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = move |State(calls): State<Arc<AtomicUsize>>| {
        let body = body.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(body()))
                .unwrap()
        }
    };
    let app = Router::new()
        .route("/raw", routing::get(handler))
        .with_state(calls.clone())
        .layer(layer(ResumableSseLayer::new(store)));
    (serve_router_with_send_buffer(app, send_buffer).await, calls)
}

// ---------------------------------------------------------------------------------------------
// Waits with a deadline

/// How often [`within`] and [`eventually`] check their condition.
const POLL: Duration = Duration::from_millis(1);
/// How often [`eventually_async`] checks its condition (a store call, say).
const POLL_ASYNC: Duration = Duration::from_millis(5);

/// Waits until `cond` holds; fails the test, naming `what`, once `limit` has passed on the
/// runtime's clock (the real one, or the paused one of `start_paused` tests, where the wait
/// measures virtual time).
pub async fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `cond` holds, for at most [`TIMEOUT`]; fails the test naming `what`.
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    within(TIMEOUT, what, cond).await;
}

/// Waits until the asynchronous `cond` holds, for at most [`TIMEOUT`]; fails the test naming
/// `what`.
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_ASYNC).await;
    }
}

/// The key the layer stores the session of `id` under for requests to `path` (the default key
/// scope).
pub fn scoped(path: &str, id: &str) -> SessionKey {
    SessionKey::scoped(path, &SessionKey::new(id).unwrap()).unwrap()
}

/// Waits until the session under `key` exists and satisfies `cond`, for at most [`TIMEOUT`],
/// and returns its state; fails the test naming `what` and the last state seen.
pub async fn session_when<St: Store>(
    store: &St,
    key: &SessionKey,
    what: &str,
    cond: impl Fn(&SessionInfo) -> bool,
) -> SessionInfo {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let info = store.lookup(key).await.expect("lookup");
        if let Some(info) = info.as_ref().filter(|i| cond(i)) {
            return info.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {key:?}: {what}: not within {TIMEOUT:?}; last seen {info:?}"
        );
        tokio::time::sleep(POLL_ASYNC).await;
    }
}

/// Waits until the session under `key` is finished, and returns its state.
pub async fn session_finished<St: Store>(store: &St, key: &SessionKey) -> SessionInfo {
    session_when(store, key, "finished", |i| i.status.is_finished()).await
}

// ---------------------------------------------------------------------------------------------
// Reading event streams

/// One parsed event as a client sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ev {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// One block of an event stream, as [`SseParser`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// A block with at least one field line (whatever the fields).
    Event(Ev),
    /// A block of comment lines only: the text of each after its `:`.
    Comment(Vec<String>),
}

impl Block {
    /// Whether this is the layer's eviction comment (`resumable_sse::sse::EVICTED_COMMENT`),
    /// alone in its block.
    pub fn is_evicted_comment(&self) -> bool {
        match self {
            Block::Comment(lines) => {
                lines.len() == 1
                    && format!(":{}\n\n", lines[0]).as_bytes()
                        == resumable_sse::sse::EVICTED_COMMENT
            }
            Block::Event(_) => false,
        }
    }
}

/// The tests' one reader of `text/event-stream` bytes, written here rather than taken from the
/// crate so that it checks the crate's output independently. It takes the bytes in any chunks;
/// line ends are LF, CR LF or CR (a CR LF may be split across chunks); `id`, `event` and `data`
/// are kept (data lines joined with LF, one space after the colon removed), other fields are
/// ignored; a blank line ends a block. Invalid UTF-8 is replaced, not refused.
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
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete block, if the bytes pushed so far hold one.
    pub fn next_block(&mut self) -> Option<Block> {
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

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An open SSE response, read event by event.
pub struct SseConn {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    body: Incoming,
    parser: SseParser,
    /// Blocks of comments only received (keep-alives, the eviction comment).
    pub comments: usize,
    /// Data frames received: the chunks the server wrote.
    pub frames: usize,
    /// Whether the layer's eviction comment (`resumable_sse::sse::EVICTED_COMMENT`) came.
    pub evicted: bool,
    /// Whether the body ended with an error (a connection cut before the body's end) rather
    /// than cleanly.
    pub errored: bool,
    /// The first bytes of the body (up to 64), as they came over the wire.
    pub first_bytes: Vec<u8>,
}

/// Sends `GET path` with the given `Last-Event-ID` and headers, and waits for the response
/// head; an error is a connection that closed before any answer.
pub async fn request(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<SseConn, hyper_util::client::legacy::Error> {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = tokio::time::timeout(TIMEOUT, client().request(req.body(Empty::new()).unwrap()))
        .await
        .expect("response head in time")?;
    Ok(SseConn::new(res))
}

pub async fn get(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseConn {
    request(addr, path, last_event_id, &[])
        .await
        .expect("request succeeds")
}

impl SseConn {
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

    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get("resumable-sse-reason")
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
                        let room = 64usize.saturating_sub(self.first_bytes.len());
                        self.first_bytes
                            .extend_from_slice(&data[..room.min(data.len())]);
                        self.parser.push(&data);
                    }
                }
            }
        }
    }

    /// The next event, or `None` at the end of the body. Comments are counted, not returned.
    pub async fn next(&mut self) -> Option<Ev> {
        loop {
            match self.next_block().await? {
                Block::Event(ev) => return Some(ev),
                Block::Comment(_) => {}
            }
        }
    }

    /// Reads until `n` comment blocks have come on this connection in all; fails if an event
    /// or the end comes first.
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
    pub async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.expect("stream ended early"));
        }
        out
    }

    /// Reads to the end of the body.
    pub async fn collect(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev);
        }
        out
    }

    /// The rest of the body, as bytes (what was received and not read as events, then what
    /// follows).
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

pub fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

pub fn expected_tokens(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("token {i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Whole answers

/// A whole response: status, reason, body.
pub struct Answer {
    pub status: http::StatusCode,
    pub reason: Option<String>,
    pub body: Bytes,
}

/// Sends a GET with the given `Last-Event-ID` header and reads the whole response.
pub async fn answer(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> Answer {
    let conn = get(addr, path, last_event_id).await;
    let (status, reason) = (conn.status, conn.reason().map(str::to_owned));
    Answer {
        status,
        reason,
        body: conn.bytes().await,
    }
}
