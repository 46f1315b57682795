//! The layer in a tonic gRPC server's stack (`Server::builder().layer(..)`, as in
//! `examples/tonic.rs`), over real TCP: gRPC calls made by a real tonic client go through it
//! with their messages, trailers and errors, byte for byte what the same server answers without
//! the layer; an SSE route served beside them is resumable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::routing::get as get_route;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{self, Stream, StreamExt};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use resumable_sse::testing::client::{datas, get, SseConn};
use resumable_sse::testing::wait::{eventually, TIMEOUT};
use resumable_sse::{MemoryStore, ResumableSseLayer};
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Events of the SSE route.
const EVENTS: usize = 10;
/// The SSE route emits this many events at once, then waits for the test to open its gate.
const BEFORE_GATE: usize = 5;

/// The SSE route's event source: counts its calls and the events it emitted.
#[derive(Clone)]
struct Feed {
    calls: Arc<AtomicUsize>,
    emitted: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

impl Feed {
    fn new() -> Self {
        Self {
            calls: Arc::default(),
            emitted: Arc::default(),
            gate: watch::channel(false).0,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn emitted(&self) -> usize {
        self.emitted.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

fn tick(i: usize) -> String {
    format!("tick {i}")
}

/// `GET /events`: `tick 0` .. `tick 9`, the last five once the gate is open.
async fn events(State(feed): State<Feed>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    feed.calls.fetch_add(1, Ordering::SeqCst);
    Sse::new(stream::iter(0..EVENTS).then(move |i| {
        let feed = feed.clone();
        async move {
            if i == BEFORE_GATE {
                let mut gate = feed.gate.subscribe();
                let _ = gate.wait_for(|open| *open).await;
            }
            feed.emitted.fetch_add(1, Ordering::SeqCst);
            Ok(Event::default().data(tick(i)))
        }
    }))
}

/// Whether the server has the layer.
#[derive(Clone, Copy, Debug)]
enum Stack {
    Layered,
    Bare,
}

struct TestServer {
    addr: SocketAddr,
    reporter: HealthReporter,
    feed: Feed,
}

/// Serves the health service and `GET /events` on a free port, with or without the layer.
async fn serve(stack: Stack) -> TestServer {
    let (reporter, health) = tonic_health::server::health_reporter();
    let feed = Feed::new();
    let routes: Routes = Routes::new(health)
        .into_axum_router()
        .route("/events", get_route(events).with_state(feed.clone()))
        .into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Server::builder().accept_http1(true);
    match stack {
        Stack::Layered => tokio::spawn(
            server
                .layer(ResumableSseLayer::new(MemoryStore::new()))
                .add_routes(routes)
                .serve_with_incoming(incoming),
        ),
        Stack::Bare => tokio::spawn(server.add_routes(routes).serve_with_incoming(incoming)),
    };
    TestServer {
        addr,
        reporter,
        feed,
    }
}

async fn health_client(addr: SocketAddr) -> HealthClient<Channel> {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let channel = tokio::time::timeout(TIMEOUT, endpoint.connect())
        .await
        .expect("connected in time")
        .expect("connected");
    HealthClient::new(channel)
}

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

#[tokio::test]
async fn unary_grpc_calls_pass_through_the_layer_with_their_trailers_and_errors() {
    let server = serve(Stack::Layered).await;
    let mut client = health_client(server.addr).await;

    let ok = tokio::time::timeout(TIMEOUT, client.check(request("")))
        .await
        .expect("answered in time")
        .expect("the server is serving");
    // The status of a successful call comes in the trailers, which tonic's client merges into
    // the response's metadata: no trailers, no `grpc-status`.
    assert_eq!(
        ok.metadata()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("0"),
        "the trailers of a unary call: {:?}",
        ok.metadata()
    );
    assert_eq!(ok.get_ref().status, Wire::Serving as i32);

    let not_found = tokio::time::timeout(TIMEOUT, client.check(request("no.such.Service")))
        .await
        .expect("answered in time")
        .expect_err("an unknown service is an error");
    assert_eq!(not_found.code(), Code::NotFound, "{not_found:?}");
    assert_eq!(not_found.message(), "service not registered");
}

#[tokio::test]
async fn a_server_streaming_grpc_call_gets_every_message_and_its_final_status_through_the_layer() {
    let mut server = serve(Stack::Layered).await;
    let mut client = health_client(server.addr).await;
    server
        .reporter
        .set_service_status("feed", ServingStatus::Serving)
        .await;

    let mut watch = tokio::time::timeout(TIMEOUT, client.watch(request("feed")))
        .await
        .expect("answered in time")
        .expect("a known service can be watched")
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(TIMEOUT, watch.message())
            .await
            .expect("a message in time")
            .expect("no error")
    };
    // Each change is made once the previous one arrived: the health service sends the latest
    // status only.
    let mut got = vec![next().await];
    for status in [ServingStatus::NotServing, ServingStatus::Serving] {
        server.reporter.set_service_status("feed", status).await;
        got.push(next().await);
    }
    // Forgetting the service ends its watches: the end of the stream, then its status.
    server.reporter.clear_service_status("feed").await;
    got.push(next().await);
    let statuses: Vec<_> = got.iter().map(|m| m.map(|m| m.status)).collect();
    let expected = [Wire::Serving, Wire::NotServing, Wire::Serving];
    let expected: Vec<_> = expected.iter().map(|s| Some(*s as i32)).collect();
    assert_eq!(statuses, [expected, vec![None]].concat());
    let trailers = tokio::time::timeout(TIMEOUT, watch.trailers())
        .await
        .expect("trailers in time")
        .expect("no error")
        .expect("a streaming call ends with trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{trailers:?}"
    );

    // A streaming call that fails before its first message.
    let not_found = tokio::time::timeout(TIMEOUT, client.watch(request("no.such.Service")))
        .await
        .expect("answered in time")
        .expect_err("an unknown service cannot be watched");
    assert_eq!(not_found.code(), Code::NotFound, "{not_found:?}");
}

/// One gRPC exchange as it came over the wire.
#[derive(Debug, PartialEq)]
struct Exchange {
    status: StatusCode,
    /// Less `date`.
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

/// A `HealthCheckRequest { service }` framed for gRPC, encoded by hand (protobuf field 1, a
/// string; the default, empty, is not encoded).
fn grpc_frame(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(0x0a);
        message.put_u8(u8::try_from(service.len()).unwrap());
        message.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::new();
    frame.put_u8(0); // not compressed
    frame.put_u32(u32::try_from(message.len()).unwrap());
    frame.put_slice(&message);
    frame.freeze()
}

/// Calls `path` with `HealthCheckRequest { service }` over HTTP/2 and reads the whole answer;
/// with `forget`, forgets the service after the first frame of the answer (which ends a
/// `Watch`).
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    service: &str,
    mut forget: Option<&mut HealthReporter>,
) -> Exchange {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(service)))
        .unwrap();
    let res = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .expect("a response head in time")
        .unwrap();
    let (mut parts, mut body): (_, Incoming) = res.into_parts();
    parts.headers.remove("date");
    let (mut data, mut trailers) = (BytesMut::new(), None);
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("a frame in time")
    {
        let frame = frame.expect("no error");
        if let Some(chunk) = frame.data_ref() {
            data.extend_from_slice(chunk);
            if let Some(reporter) = forget.take() {
                reporter.clear_service_status(service).await;
            }
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    Exchange {
        status: parts.status,
        headers: parts.headers,
        data: data.freeze(),
        trailers,
    }
}

/// Every kind of answer: a message and `OK`, a `NotFound` (a trailers-only answer), the
/// messages of a stream and its `OK`, a streaming call that fails at once, and the
/// `Unimplemented` of an unknown method.
async fn every_kind_of_answer(server: &mut TestServer) -> HashMap<&'static str, Exchange> {
    const CHECK: &str = "/grpc.health.v1.Health/Check";
    const WATCH: &str = "/grpc.health.v1.Health/Watch";
    let addr = server.addr;
    server
        .reporter
        .set_service_status("feed", ServingStatus::NotServing)
        .await;
    HashMap::from([
        ("check", raw_call(addr, CHECK, "", None).await),
        ("check unknown", raw_call(addr, CHECK, "nope", None).await),
        (
            "watch",
            raw_call(addr, WATCH, "feed", Some(&mut server.reporter)).await,
        ),
        ("watch unknown", raw_call(addr, WATCH, "nope", None).await),
        (
            "unknown method",
            raw_call(addr, "/no.such.Service/Method", "", None).await,
        ),
    ])
}

#[tokio::test]
async fn grpc_answers_through_the_layer_are_byte_for_byte_those_of_the_server_without_it() {
    let mut layered = serve(Stack::Layered).await;
    let mut bare = serve(Stack::Bare).await;
    let through_the_layer = every_kind_of_answer(&mut layered).await;
    let without = every_kind_of_answer(&mut bare).await;
    for (what, expected) in &without {
        let got = &through_the_layer[what];
        assert_eq!(got, expected, "{what}: through the layer, then without it");
        assert!(
            expected.trailers.is_some() || expected.headers.contains_key("grpc-status"),
            "{what}: a gRPC answer has a status: {expected:?}"
        );
    }
    // The calls said what they should (so the comparison is of the answers meant).
    let status = |what: &str| {
        let e = &without[what];
        let map = e.trailers.as_ref().unwrap_or(&e.headers);
        map.get("grpc-status").unwrap().to_str().unwrap().to_owned()
    };
    assert_eq!(status("check"), "0");
    assert_eq!(status("check unknown"), (Code::NotFound as i32).to_string());
    assert_eq!(status("watch"), "0");
    assert_eq!(status("watch unknown"), (Code::NotFound as i32).to_string());
    assert_eq!(
        status("unknown method"),
        (Code::Unimplemented as i32).to_string()
    );
    // One length-prefixed message `{status: NOT_SERVING}` (field 1, varint 2).
    assert_eq!(without["watch"].data.as_ref(), [0, 0, 0, 0, 2, 0x08, 2]);
}

#[tokio::test]
async fn the_sse_route_beside_the_grpc_services_is_resumable() {
    let server = serve(Stack::Layered).await;
    let path = "/events?session_id=beside-grpc";

    let mut first: SseConn = get(server.addr, path, None).await;
    assert_eq!(first.status, StatusCode::OK);
    let seen = first.take(3).await;
    assert_eq!(datas(&seen), [tick(0), tick(1), tick(2)]);
    let last_seen = seen[2].id.clone().expect("every event has an id");
    drop(first);
    // The events before the gate come out without a client to read them.
    eventually("the events before the gate are produced", || {
        server.feed.emitted() == BEFORE_GATE
    })
    .await;

    let mut again = get(server.addr, path, Some(&last_seen)).await;
    assert_eq!(again.status, StatusCode::OK);
    let replayed = again.take(BEFORE_GATE - 3).await;
    assert_eq!(datas(&replayed), [tick(3), tick(4)], "the replay");
    server.feed.open();
    let live = again.collect().await;
    let expected: Vec<_> = (BEFORE_GATE..EVENTS).map(tick).collect();
    assert_eq!(datas(&live), expected, "the rest, live");
    assert!(!again.errored, "the stream ends cleanly");
    assert_eq!(
        server.feed.calls(),
        1,
        "a reconnect does not call the handler"
    );

    // Once: a client that holds the last event is told there is nothing more.
    let last = live.last().unwrap().id.clone().unwrap();
    let done = get(server.addr, path, Some(&last)).await;
    assert_eq!(done.status, StatusCode::NO_CONTENT);
    assert_eq!(done.reason(), Some("completed"));
}
