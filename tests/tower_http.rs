//! The layer composed with tower-http's trace, compression and timeout layers, in the order the
//! crate docs recommend and with the timeout inside, over real TCP.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, Stream};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use resumable_sse::{EventId, MemoryStore, ResumableSseLayer};
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceBuilder};
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

mod common;

use common::{datas, Ev, SseConn, TIMEOUT};

/// Events of the slow handler are this far apart.
const INTERVAL: Duration = Duration::from_millis(20);

/// The slow event source: the last event of a stream waits for a gate the test opens.
#[derive(Clone, Default)]
struct Feed {
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    emitted: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    stuck: Arc<AtomicUsize>,
}

impl Feed {
    /// A feed whose next stream holds its last event until the returned sender is used.
    fn gated() -> (Self, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let feed = Self::default();
        *feed.gate.lock().unwrap() = Some(rx);
        (feed, tx)
    }

    fn emitted(&self) -> usize {
        self.emitted.load(Ordering::SeqCst)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn stuck(&self) -> usize {
        self.stuck.load(Ordering::SeqCst)
    }
}

/// `GET /events?n=N`: `event 0` .. `event N-1`, [`INTERVAL`] apart; the last one waits for the
/// gate.
async fn events(
    State(feed): State<Feed>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    feed.calls.fetch_add(1, Ordering::SeqCst);
    let n: usize = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(5);
    let gate = feed.gate.lock().unwrap().take();
    let emitted = feed.emitted.clone();
    Sse::new(stream::unfold((0, gate), move |(i, mut gate)| {
        let emitted = emitted.clone();
        async move {
            if i == n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(INTERVAL).await;
            }
            if i + 1 == n {
                if let Some(gate) = gate.take() {
                    let _ = gate.await;
                }
            }
            emitted.fetch_add(1, Ordering::SeqCst);
            let event = Event::default()
                .id(format!("inner-{i}"))
                .data(format!("event {i}"));
            Some((Ok(event), (i + 1, gate)))
        }
    }))
}

fn report() -> &'static str {
    static REPORT: OnceLock<String> = OnceLock::new();
    REPORT.get_or_init(|| {
        let items: Vec<String> = (0..2000)
            .map(|i| format!(r#"{{"id":{i},"name":"item {i}","done":false}}"#))
            .collect();
        format!("[{}]", items.join(","))
    })
}

async fn report_json() -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "application/json")], report())
}

/// `GET /stuck`: never answers.
async fn stuck(State(feed): State<Feed>) -> &'static str {
    feed.stuck.fetch_add(1, Ordering::SeqCst);
    std::future::pending::<()>().await;
    "never"
}

fn app(feed: Feed) -> Router {
    Router::new()
        .route("/events", get(events))
        .route("/stuck", get(stuck))
        .route("/report.json", get(report_json))
        .with_state(feed)
}

/// Serves `service` on a free port.
async fn serve<S, B>(service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn timeout_layer(after: Duration) -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, after)
}

/// The order the crate docs recommend: trace, compression, timeout, then the layer.
async fn serve_documented_order(feed: Feed, store: MemoryStore, timeout: Duration) -> SocketAddr {
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(CompressionLayer::new())
        .layer(timeout_layer(timeout))
        .layer(ResumableSseLayer::new(store))
        .service(app(feed));
    serve(service).await
}

/// The other order: the timeout inside the layer, right around the application.
async fn serve_timeout_inside(feed: Feed, store: MemoryStore, timeout: Duration) -> SocketAddr {
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(CompressionLayer::new())
        .layer(ResumableSseLayer::new(store))
        .layer(timeout_layer(timeout))
        .service(app(feed));
    serve(service).await
}

/// Requests `path` as a client that accepts gzip (if `gzip`) reads it.
async fn request(addr: SocketAddr, path: &str, last_event_id: Option<&str>, gzip: bool) -> SseConn {
    let headers: &[(&str, &str)] = if gzip {
        &[("accept-encoding", "gzip")]
    } else {
        &[]
    };
    common::request(addr, path, last_event_id, headers)
        .await
        .expect("request succeeds")
}

/// The events to the end of the body, which must end cleanly.
async fn collect_events(conn: &mut SseConn) -> Vec<Ev> {
    let evs = conn.collect().await;
    assert!(!conn.errored, "the body does not fail");
    evs
}

fn events_named(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("event {i}")).collect()
}

fn assert_own_ids(evs: &[Ev], first_seq: u64) {
    for (i, ev) in evs.iter().enumerate() {
        let id = EventId::parse(ev.id.as_deref().unwrap_or_default().as_bytes())
            .expect("an id of the layer");
        assert_eq!(id.seq, first_seq + i as u64);
    }
}

/// Checks an event stream response as the stack serves it: identity encoding, plain events.
fn assert_uncompressed_event_stream(conn: &SseConn) {
    assert_eq!(conn.status, StatusCode::OK);
    assert_eq!(conn.headers["content-type"], "text/event-stream");
    assert!(
        conn.headers.get("content-encoding").is_none(),
        "an event stream must not be compressed"
    );
}

#[tokio::test]
async fn events_arrive_one_by_one_and_uncompressed_through_the_documented_stack() {
    let (feed, gate) = Feed::gated();
    let addr = serve_documented_order(feed.clone(), MemoryStore::new(), TIMEOUT).await;
    let mut conn = request(addr, "/events?session_id=live&n=5", None, true).await;
    assert_uncompressed_event_stream(&conn);

    // Four events arrive while the handler has not emitted the fifth: it waits for the gate.
    let first = conn.take(1).await;
    assert_eq!(datas(&first), ["event 0"]);
    assert!(feed.emitted() < 5);
    assert!(
        conn.first_bytes.starts_with(b"id: "),
        "plain text on the wire"
    );
    let more = conn.take(3).await;
    assert_eq!(datas(&more), ["event 1", "event 2", "event 3"]);
    assert_eq!(feed.emitted(), 4, "the last event is not emitted yet");

    gate.send(()).unwrap();
    let last = collect_events(&mut conn).await;
    assert_eq!(datas(&last), ["event 4"]);
    let all: Vec<Ev> = first.into_iter().chain(more).chain(last).collect();
    assert_own_ids(&all, 1);
    assert_eq!(feed.calls(), 1);
}

#[tokio::test]
async fn json_is_gzip_compressed_through_the_documented_stack() {
    let (feed, _gate) = Feed::gated();
    let addr = serve_documented_order(feed, MemoryStore::new(), TIMEOUT).await;
    for path in ["/report.json", "/report.json?session_id=json"] {
        let conn = request(addr, path, None, true).await;
        assert_eq!(conn.status, StatusCode::OK, "{path}");
        assert_eq!(conn.headers["content-encoding"], "gzip", "{path}");
        assert_eq!(conn.headers["content-type"], "application/json", "{path}");
        let body = conn.bytes().await;
        assert_eq!(&body[..2], &[0x1f, 0x8b], "{path}: a gzip stream");
        assert!(body.len() < report().len() / 4, "{path}: compressed");

        // Without accept-encoding the same route gives the document itself.
        let identity = request(addr, path, None, false).await;
        assert!(identity.headers.get("content-encoding").is_none());
        assert_eq!(identity.bytes().await, report(), "{path}");
    }
}

#[tokio::test]
async fn resume_with_last_event_id_works_through_the_documented_stack() {
    let (feed, gate) = Feed::gated();
    let addr = serve_documented_order(feed.clone(), MemoryStore::new(), TIMEOUT).await;
    let path = "/events?session_id=resume&n=5";
    let mut conn = request(addr, path, None, true).await;
    let before = conn.take(2).await;
    drop(conn);

    let mut resumed = request(addr, path, before[1].id.as_deref(), true).await;
    assert_uncompressed_event_stream(&resumed);
    let live = resumed.take(2).await;
    assert_eq!(datas(&live), ["event 2", "event 3"]);
    gate.send(()).unwrap();
    let rest = collect_events(&mut resumed).await;
    let all: Vec<Ev> = before.into_iter().chain(live).chain(rest).collect();
    assert_eq!(datas(&all), events_named(0..5));
    assert_own_ids(&all, 1);

    let done = request(addr, path, all[4].id.as_deref(), true).await;
    assert_eq!(done.status, StatusCode::NO_CONTENT);
    assert_eq!(done.headers["resumable-sse-reason"], "completed");
    assert_eq!(feed.calls(), 1);
}

/// A stream that outlives `timeout` by far still completes, and can be resumed meanwhile.
async fn assert_long_stream_survives(
    addr: SocketAddr,
    feed: &Feed,
    gate: oneshot::Sender<()>,
    timeout: Duration,
) {
    let started = Instant::now();
    let path = "/events?session_id=long&n=4";
    let mut conn = request(addr, path, None, true).await;
    assert_uncompressed_event_stream(&conn);
    let first = conn.take(3).await;
    // Keep the stream open well past the timeout before letting it finish (a fixed wait: the
    // scenario itself).
    tokio::time::sleep(timeout * 3).await;
    let mut resumed = request(addr, path, first[0].id.as_deref(), true).await;
    assert_uncompressed_event_stream(&resumed);
    gate.send(()).unwrap();
    let rest = collect_events(&mut conn).await;
    assert!(
        started.elapsed() > timeout * 3,
        "the stream outlived the timeout"
    );
    let all: Vec<Ev> = first.into_iter().chain(rest).collect();
    assert_eq!(datas(&all), events_named(0..4));
    assert_own_ids(&all, 1);
    assert_eq!(
        datas(&collect_events(&mut resumed).await),
        events_named(1..4)
    );
    assert_eq!(feed.calls(), 1);
}

/// A handler that does not answer in time gets the timeout's answer, and its claim on the
/// session is released: the next request calls the handler again.
async fn assert_slow_heads_time_out_and_release_the_claim(addr: SocketAddr, feed: &Feed) {
    for attempt in 1..=2 {
        let conn = request(addr, "/stuck?session_id=stuck", None, true).await;
        assert_eq!(conn.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(feed.stuck(), attempt);
    }
}

#[tokio::test]
async fn a_timeout_outside_the_layer_bounds_the_head_not_the_stream() {
    let (feed, gate) = Feed::gated();
    let timeout = Duration::from_millis(400);
    let addr = serve_documented_order(feed.clone(), MemoryStore::new(), timeout).await;
    assert_long_stream_survives(addr, &feed, gate, timeout).await;
    assert_slow_heads_time_out_and_release_the_claim(addr, &feed).await;
}

#[tokio::test]
async fn a_timeout_inside_the_layer_bounds_the_head_not_the_stream() {
    let (feed, gate) = Feed::gated();
    let timeout = Duration::from_millis(400);
    let addr = serve_timeout_inside(feed.clone(), MemoryStore::new(), timeout).await;
    assert_long_stream_survives(addr, &feed, gate, timeout).await;
    assert_slow_heads_time_out_and_release_the_claim(addr, &feed).await;

    let json = request(addr, "/report.json?session_id=j", None, true).await;
    assert_eq!(json.headers["content-encoding"], "gzip");
}

fn assert_service_bounds<S, B>(_: &S)
where
    S: Service<Request<axum::body::Body>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

fn assert_hyper_bounds<S, B>(_: &S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

#[test]
fn the_service_made_on_a_router_is_clone_send_sync_static_with_a_sendable_body() {
    let layer = ResumableSseLayer::new(MemoryStore::new());
    let service = layer.layer(app(Feed::default()));
    assert_service_bounds(&service);
    assert_hyper_bounds(&service);
    // The stacks served above meet the same bounds.
    let documented = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(CompressionLayer::new())
        .layer(timeout_layer(TIMEOUT))
        .layer(layer.clone())
        .service(app(Feed::default()));
    assert_hyper_bounds(&documented);
    // And a router layered with it is still a router.
    let _: Router = app(Feed::default()).layer(layer);
}
