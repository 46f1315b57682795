//! Test harness, shared by every test binary: axum apps behind the layer on a real TCP socket.
//! The SSE client with its own event-stream reader, the waits with a deadline that tests use
//! instead of fixed sleeps, and the inner service's bookkeeping ([`Inner`]) are the library's
//! published test helpers (`resumable_sse::testing`, feature `test-util`), re-exported here:
//! one implementation, for these tests and the behaviour suite alike.
#![allow(dead_code)]

pub mod chaos_proxy;
pub mod child;
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
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use resumable_sse::store::Store;
use resumable_sse::{MemoryStore, ResumableSseLayer};

// The library's test helpers, under the names the tests use; each test binary uses some.
#[allow(unused_imports)]
pub use resumable_sse::testing::client::{
    datas, expected_tokens, get, parse_blocks, parse_events, request, Block, Ev, SseConn, SseParser,
};
#[allow(unused_imports)]
pub use resumable_sse::testing::service::{sized_data, Inner};
#[allow(unused_imports)]
pub use resumable_sse::testing::wait::{
    eventually, eventually_async, scoped, session_finished, session_when, within, TIMEOUT,
};

/// `GET /tokens?n=N&interval_ms=MS`: N events `token 0`..`token N-1`, with inner ids the layer
/// must replace.
async fn tokens(
    State(inner): State<Inner>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    inner.count_call();
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
    inner.count_call();
    let key = q.get("session_id").cloned().unwrap_or_default();
    let Some(events) = inner.gated(&key) else {
        return (axum::http::StatusCode::NOT_FOUND, "no gate").into_response();
    };
    Sse::new(events.map(|e| e.map(|d| Event::default().data(d)))).into_response()
}

/// `GET /sized?n=N&bytes=B`: N events, all at once, each encoded by the layer in exactly B bytes
/// (see [`sized_data`]).
async fn sized(
    State(inner): State<Inner>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    inner.count_call();
    let n: usize = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(10);
    let bytes: usize = q.get("bytes").and_then(|v| v.parse().ok()).unwrap_or(64);
    Sse::new(stream::iter(0..n).map(move |i| Ok(Event::default().data(sized_data(i, bytes)))))
}

async fn json(State(inner): State<Inner>) -> impl IntoResponse {
    inner.count_call();
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
// Clients

/// A pooled client (the SSE client, [`get`] and [`request`], opens a connection per request).
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
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

/// A `tracing` writer that keeps every line it is given, for tests that read what was logged.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The head of a `200 text/event-stream` response, as a session's start records it.
#[allow(dead_code)]
pub fn event_stream_head() -> resumable_sse::store::ResponseHead {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resumable_sse::store::ResponseHead {
        status: http::StatusCode::OK,
        headers,
    }
}

/// A block of the one event numbered `seq` (`id: x-<seq>`, `data: <seq>`), for a store's append.
#[allow(dead_code)]
pub fn one_event(seq: u64) -> resumable_sse::store::EventBlock {
    let mut b = resumable_sse::store::EventBlockBuilder::new(seq);
    b.push_with(|buf| buf.extend_from_slice(format!("id: x-{seq}\ndata: {seq}\n\n").as_bytes()));
    b.finish().expect("one event")
}
