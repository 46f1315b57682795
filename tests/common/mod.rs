//! Test harness: an axum app behind the layer on a real TCP socket, and an SSE client over hyper.
#![allow(dead_code)]

pub mod chaos_proxy;
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
use resumable_sse::store::Store;
use resumable_sse::{MemoryStore, ResumableSseLayer};
use tokio::sync::mpsc;

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Nagle plus delayed ACKs would hold every multi-part write ~40 ms.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// One parsed event as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ev {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An open SSE response, read event by event.
pub struct SseConn {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    body: Incoming,
    buf: BytesMut,
    pub comments: usize,
    /// Data frames received: the chunks the server wrote.
    pub frames: usize,
    /// Whether the layer's eviction comment (`resumable_sse::sse::EVICTED_COMMENT`) came.
    pub evicted: bool,
    /// Whether the body ended with an error (a connection cut before the body's end) rather
    /// than cleanly.
    pub errored: bool,
}

pub async fn get(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseConn {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = tokio::time::timeout(TIMEOUT, client().request(req.body(Empty::new()).unwrap()))
        .await
        .expect("response head in time")
        .expect("request succeeds");
    let (parts, body) = res.into_parts();
    SseConn {
        status: parts.status,
        headers: parts.headers,
        body,
        buf: BytesMut::new(),
        comments: 0,
        frames: 0,
        evicted: false,
        errored: false,
    }
}

impl SseConn {
    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get("resumable-sse-reason")
            .and_then(|v| v.to_str().ok())
    }

    /// The next event, or `None` at the end of the body. Comments are counted, not returned.
    pub async fn next(&mut self) -> Option<Ev> {
        loop {
            if let Some(pos) = find(&self.buf, b"\n\n") {
                let block = self.buf.split_to(pos + 2);
                let text = String::from_utf8_lossy(&block[..pos]).into_owned();
                let mut ev = Ev {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut has_data = false;
                let mut only_comments = true;
                for line in text.split('\n') {
                    if line.starts_with(':') {
                        continue;
                    }
                    only_comments = false;
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => ev.id = Some(value.to_owned()),
                        "event" => ev.event = Some(value.to_owned()),
                        "data" => {
                            if has_data {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if only_comments {
                    if block[..] == *resumable_sse::sse::EVICTED_COMMENT {
                        self.evicted = true;
                    }
                    self.comments += 1;
                    continue;
                }
                return Some(ev);
            }
            match tokio::time::timeout(TIMEOUT, self.body.frame()).await {
                Err(_) => panic!("no event within {TIMEOUT:?}"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => {
                    self.errored = true;
                    return None;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.frames += 1;
                        self.buf.extend_from_slice(&data);
                    }
                }
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
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

pub fn expected_tokens(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("token {i}")).collect()
}

/// Polls `cond` until it holds, or fails the test after [`TIMEOUT`].
pub async fn eventually(mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
