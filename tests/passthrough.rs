//! Traffic that is not an event stream goes through the layer untouched, over real TCP: the same
//! status, headers and bytes as without the layer, trailers included, with or without a session
//! key.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use resumable_sse::{MemoryStore, ResumableSseLayer};

mod common;

use common::TIMEOUT;

const BLOB_LEN: usize = 5 << 20;

const JSON: &str = r#"{"id":7,"items":["a","b"],"text":"data: not an event\n\n"}"#;

/// 5 MiB of bytes that do not repeat in any short period.
fn blob() -> &'static Bytes {
    static BLOB: OnceLock<Bytes> = OnceLock::new();
    BLOB.get_or_init(|| {
        let mut x: u32 = 0x9e37_79b9;
        (0..BLOB_LEN)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect::<Vec<u8>>()
            .into()
    })
}

#[derive(Clone, Default)]
struct Calls(Arc<AtomicUsize>);

impl Calls {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

async fn json(State(calls): State<Calls>) -> impl IntoResponse {
    calls.0.fetch_add(1, Ordering::SeqCst);
    (
        [
            (http::header::CONTENT_TYPE, "application/json"),
            (
                http::header::HeaderName::from_static("x-app"),
                "passthrough",
            ),
        ],
        JSON,
    )
}

/// The blob in chunks of uneven sizes, some of them a millisecond apart.
async fn blob_stream(State(calls): State<Calls>) -> impl IntoResponse {
    calls.0.fetch_add(1, Ordering::SeqCst);
    const SIZES: [usize; 5] = [1, 1000, 65_536, 12_345, 300_000];
    let chunks = stream::unfold((0usize, 0usize), |(pos, n)| async move {
        if pos >= BLOB_LEN {
            return None;
        }
        if n % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let end = (pos + SIZES[n % SIZES.len()]).min(BLOB_LEN);
        Some((Ok::<_, Infallible>(blob().slice(pos..end)), (end, n + 1)))
    });
    (
        [(http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
}

/// Answers as a gRPC server does: a length-prefixed message, then the status in trailers.
async fn grpc(State(calls): State<Calls>, request: Bytes) -> Response {
    calls.0.fetch_add(1, Ordering::SeqCst);
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(request.len()).unwrap().to_be_bytes());
    message.extend_from_slice(&request);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("all%20good"));
    let frames = stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from(message))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(StreamBody::new(frames)))
        .unwrap()
}

fn routes(calls: Calls) -> Router {
    Router::new()
        .route("/json", get(json))
        .route("/blob", get(blob_stream))
        .route("/grpc", post(grpc))
        .with_state(calls)
}

/// Serves `app` over HTTP/1.1 and HTTP/2 (prior knowledge) on a free port.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Servers {
    plain: SocketAddr,
    layered: SocketAddr,
    calls: Calls,
    store: MemoryStore,
}

/// The same routes twice: bare, and behind the layer.
async fn servers() -> Servers {
    let calls = Calls::default();
    let store = MemoryStore::new();
    let plain = serve(routes(calls.clone())).await;
    let layered = serve(routes(calls.clone()).layer(ResumableSseLayer::new(store.clone()))).await;
    Servers {
        plain,
        layered,
        calls,
        store,
    }
}

/// What a client received: everything but the `date` header, which differs by the second.
#[derive(Debug, PartialEq)]
struct Received {
    version: Version,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

async fn fetch(addr: SocketAddr, req: Request<Full<Bytes>>, http2: bool) -> Received {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("http://{addr}{}", parts.uri).parse().unwrap();
    let req = Request::from_parts(parts, body);
    tokio::time::timeout(TIMEOUT, async move {
        let res = client.request(req).await.expect("request succeeds");
        let (mut parts, body) = res.into_parts();
        parts.headers.remove(http::header::DATE);
        let collected = body.collect().await.expect("body received");
        Received {
            version: parts.version,
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    })
    .await
    .expect("response in time")
}

fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::default()).unwrap()
}

#[tokio::test]
async fn json_responses_pass_through_byte_for_byte_with_and_without_a_key() {
    let s = servers().await;
    let expected = fetch(s.plain, get_request("/json"), false).await;
    assert_eq!(expected.status, StatusCode::OK);
    assert_eq!(expected.body, JSON);
    // The same key twice: the second request is served by the handler again.
    for path in ["/json", "/json?session_id=j", "/json?session_id=j"] {
        let got = fetch(s.layered, get_request(path), false).await;
        assert_eq!(got, expected, "{path}");
        assert!(got.headers.get("resumable-sse-reason").is_none());
    }
    assert_eq!(s.calls.get(), 4);
    assert!(s.store.is_empty(), "no session for a JSON response");
}

#[tokio::test]
async fn streamed_bodies_pass_through_byte_for_byte_with_and_without_a_key() {
    let s = servers().await;
    let expected = fetch(s.plain, get_request("/blob"), false).await;
    assert_eq!(expected.body.len(), BLOB_LEN);
    assert!(expected.body == blob());
    for path in ["/blob", "/blob?session_id=b"] {
        let got = fetch(s.layered, get_request(path), false).await;
        assert_eq!(got.status, expected.status, "{path}");
        assert_eq!(got.headers, expected.headers, "{path}");
        assert_eq!(got.body.len(), BLOB_LEN, "{path}");
        assert!(got.body == blob(), "{path}: the bytes differ");
    }
    assert_eq!(s.calls.get(), 3);
    assert!(s.store.is_empty());
}

#[tokio::test]
async fn trailers_pass_through_over_http2_with_and_without_a_key() {
    let s = servers().await;
    let request = |path: &str| {
        Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Full::new(Bytes::from_static(b"ping")))
            .unwrap()
    };
    let expected = fetch(s.plain, request("/grpc"), true).await;
    assert_eq!(expected.version, Version::HTTP_2);
    assert_eq!(expected.body, &b"\0\0\0\0\x04ping"[..]);
    let trailers = expected
        .trailers
        .as_ref()
        .expect("the plain server sends trailers");
    assert_eq!(trailers["grpc-status"], "0");

    for path in ["/grpc", "/grpc?session_id=g", "/grpc?session_id=g"] {
        let got = fetch(s.layered, request(path), true).await;
        assert_eq!(got, expected, "{path}");
        assert_eq!(got.trailers.as_ref().unwrap()["grpc-status"], "0", "{path}");
        assert_eq!(
            got.trailers.as_ref().unwrap()["grpc-message"],
            "all%20good",
            "{path}"
        );
    }
    assert_eq!(s.calls.get(), 4);
    assert!(s.store.is_empty());
}

#[tokio::test]
async fn json_over_http2_passes_through_with_a_key() {
    let s = servers().await;
    let expected = fetch(s.plain, get_request("/json"), true).await;
    assert_eq!(expected.version, Version::HTTP_2);
    let got = fetch(s.layered, get_request("/json?session_id=h2"), true).await;
    assert_eq!(got, expected);
    assert!(s.store.is_empty());
}

#[tokio::test]
async fn streamed_bodies_arrive_while_the_handler_still_produces_them() {
    // The layer does not buffer a pass-through body: the first bytes arrive before the last
    // chunk exists.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let app = Router::new()
        .route(
            "/live",
            get(move || {
                let rx = rx.lock().unwrap().take().expect("called once");
                let chunks = tokio_stream_from(rx).map(Ok::<_, Infallible>);
                async move { Body::from_stream(chunks) }
            }),
        )
        .layer(ResumableSseLayer::new(MemoryStore::new()));
    let addr = serve(app).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    tx.send(Bytes::from_static(b"first")).unwrap();
    let res = tokio::time::timeout(
        TIMEOUT,
        client.request(get_request_to(addr, "/live?session_id=l")),
    )
    .await
    .unwrap()
    .unwrap();
    let mut body = res.into_body();
    let first = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("the first chunk arrives while the stream is open")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "first");
    tx.send(Bytes::from_static(b"second")).unwrap();
    drop(tx);
    let rest = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second");
}

fn get_request_to(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> {
    stream::poll_fn(move |cx| rx.poll_recv(cx))
}
