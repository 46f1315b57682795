//! The suite's server: a test-controlled SSE service behind the layer on a real TCP socket, and
//! the waits with a deadline that the tests use instead of fixed sleeps.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tower_layer::Layer;
use tower_service::Service;

use crate::sse::{encode_event, EventRef};
use crate::store::{SessionInfo, Store};
use crate::{BoxError, Epoch, EventId, ResumableSseLayer, SessionKey};

/// The longest any wait of the suite takes before it fails the test: for a response head, a
/// frame, a condition.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

/// How often the waits check their condition.
const POLL: Duration = Duration::from_millis(1);
/// How often the waits on a store check their condition.
const POLL_STORE: Duration = Duration::from_millis(5);

type Body = UnsyncBoxBody<Bytes, BoxError>;

enum GateMsg {
    Data(String),
    Fail,
}

/// The service behind the layer, and what the tests see of it: calls counted, and the
/// test-controlled event sources of `/gated`.
///
/// - `GET /tokens?n=N&interval_ms=MS`: N events `token 0`..`token N-1` (default 10, at full
///   speed), with inner ids the layer must replace;
/// - `GET /gated?session_id=K`: the events the test releases with [`Inner::send`], until
///   [`Inner::end`] or [`Inner::fail`];
/// - `GET /sized?n=N&bytes=B`: N events, all at once, each encoded by the layer in exactly B
///   bytes (see [`sized_data`]).
#[derive(Clone, Default)]
pub(crate) struct Inner {
    calls: Arc<AtomicUsize>,
    gates: Arc<Mutex<HashMap<String, mpsc::UnboundedReceiver<GateMsg>>>>,
    senders: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<GateMsg>>>>,
    generators_dropped: Arc<AtomicUsize>,
}

impl Inner {
    /// How many times the service was called.
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Prepares `/gated?session_id=key`: events are released by [`Inner::send`].
    pub(crate) fn gate(&self, key: &str) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.gates.lock().unwrap().insert(key.to_owned(), rx);
        self.senders.lock().unwrap().insert(key.to_owned(), tx);
    }

    /// Releases one event of the gated stream `key`.
    pub(crate) fn send(&self, key: &str, data: impl Into<String>) {
        let _ = self.senders.lock().unwrap()[key].send(GateMsg::Data(data.into()));
    }

    /// Makes the gated stream `key` fail.
    pub(crate) fn fail(&self, key: &str) {
        let _ = self.senders.lock().unwrap()[key].send(GateMsg::Fail);
    }

    /// Ends the gated stream `key`.
    pub(crate) fn end(&self, key: &str) {
        self.senders.lock().unwrap().remove(key);
    }

    /// How many gated streams were dropped (by their end, or by the layer).
    pub(crate) fn generators_dropped(&self) -> usize {
        self.generators_dropped.load(Ordering::SeqCst)
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let query: HashMap<&str, &str> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let number = |name: &str, default: usize| {
            query
                .get(name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        match req.uri().path() {
            "/tokens" => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let n = number("n", 10);
                let interval = Duration::from_millis(number("interval_ms", 0) as u64);
                let events = stream::iter(0..n).then(move |i| async move {
                    if !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    Ok(event(Some(&format!("inner-{i}")), &format!("token {i}")))
                });
                sse(events)
            }
            "/gated" => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let key = query.get("session_id").copied().unwrap_or_default();
                let Some(rx) = self.gates.lock().unwrap().remove(key) else {
                    return not_found();
                };
                let guard = DropCounter(self.generators_dropped.clone());
                let events = stream::unfold((rx, guard), |(mut rx, guard)| async move {
                    match rx.recv().await? {
                        GateMsg::Data(d) => Some((Ok(event(None, &d)), (rx, guard))),
                        GateMsg::Fail => {
                            let e = std::io::Error::other("generator failed");
                            Some((Err(e.into()), (rx, guard)))
                        }
                    }
                });
                sse(events)
            }
            "/sized" => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let bytes = number("bytes", 64);
                let events = stream::iter(0..number("n", 10))
                    .map(move |i| Ok(event(None, &sized_data(i, bytes))));
                sse(events)
            }
            _ => not_found(),
        }
    }
}

/// Counts the drops of the gated streams.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// One event as an SSE handler writes it.
fn event(id: Option<&str>, data: &str) -> Bytes {
    let mut out = String::new();
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

fn not_found() -> Response<Body> {
    let mut res = Response::new(Body::default());
    *res.status_mut() = StatusCode::NOT_FOUND;
    res
}

/// A `200 text/event-stream` response of `events`.
fn sse(
    events: impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
) -> Response<Body> {
    let body = StreamBody::new(events.map(|e| e.map(Frame::data)));
    Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(body.boxed_unsync())
        .expect("a valid response")
}

/// [`Inner`] as a service.
#[derive(Clone)]
struct InnerService(Inner);

impl Service<Request<hyper::body::Incoming>> for InnerService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        std::future::ready(Ok(self.0.answer(&req)))
    }
}

/// The data of event `i` of `/sized?bytes=B`: `"<i>:"` padded with `x` so that the layer's
/// encoding of the event (`id: <epoch>-<i + 1>`, the data line, the blank line) is exactly
/// `bytes` long. The overhead is measured with the crate's own encoder, not assumed.
pub(crate) fn sized_data(i: usize, bytes: usize) -> String {
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

/// A tower service as a hyper one.
struct Hyper<S>(S);

impl<S, B> hyper::service::Service<Request<hyper::body::Incoming>> for Hyper<S>
where
    S: Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let mut service = self.0.clone();
        Box::pin(async move {
            poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(req).await
        })
    }
}

/// A server of the suite: where it listens, its inner service and its store.
pub(crate) struct App<St> {
    pub(crate) addr: SocketAddr,
    pub(crate) inner: Inner,
    pub(crate) store: St,
}

/// Serves [`Inner`] behind `layer` on a free port, with `TCP_NODELAY` on every connection
/// (Nagle plus delayed ACKs would hold every multi-part write ~40 ms).
pub(crate) async fn serve_with<St: Store>(
    store: St,
    layer: impl FnOnce(ResumableSseLayer<St>) -> ResumableSseLayer<St>,
) -> App<St> {
    let inner = Inner::default();
    let service = layer(ResumableSseLayer::new(store.clone())).layer(InnerService(inner.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), Hyper(service.clone()));
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
    App { addr, inner, store }
}

// ---------------------------------------------------------------------------------------------
// Waits with a deadline

/// Waits until `cond` holds, for at most [`TIMEOUT`]; fails the test naming `what`.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The key the layer stores the session of `id` under for requests to `route` (the default
/// key scope).
pub(crate) fn scoped(route: &str, id: &str) -> SessionKey {
    SessionKey::scoped(route, &SessionKey::new(id).expect("a valid key")).expect("a valid path")
}

/// Waits until the session under `key` exists and satisfies `cond`, for at most [`TIMEOUT`],
/// and returns its state; fails the test naming `what` and the last state seen.
pub(crate) async fn session_when<St: Store>(
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
        tokio::time::sleep(POLL_STORE).await;
    }
}

/// Waits until the session under `key` is finished, and returns its state.
pub(crate) async fn session_finished<St: Store>(store: &St, key: &SessionKey) -> SessionInfo {
    session_when(store, key, "finished", |i| i.status.is_finished()).await
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Collects the messages and fields of the `tracing` events of the thread it is set on (with
/// [`tracing::subscriber::set_default`]), to check that failures are recorded.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<String>>);

impl Logs {
    /// Everything recorded so far, one event a line.
    pub(crate) fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Logs {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = self.0.lock().unwrap();
        text.push_str(event.metadata().level().as_str());
        text.push(' ');
        event.record(&mut Fields(&mut text));
        text.push('\n');
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
