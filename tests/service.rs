//! The layer as a tower service around a mock inner service: which requests reach the inner
//! service, what the layer answers by itself, and how it re-frames the event streams it takes
//! over.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use resumable_sse::store::{SessionInfo, Status, Store};
use resumable_sse::{
    BoxError, EventId, MemoryStore, Outcome, ResumableBody, ResumableSse, ResumableSseLayer,
    REASON_HEADER,
};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

mod common;

use common::faulty::FaultyStore;
use common::{datas, eventually, parse_events, scoped, session_when, TIMEOUT};

// ---------------------------------------------------------------------------------------------
// Allocation counting: only allocations made on the measuring thread, inside a window.

struct CountingAllocator;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn record_allocation() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_allocation();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns how many allocations it made on this thread.
fn allocations_in(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// The store: a `MemoryStore` behind the wrapper of `tests/common`, which counts every call.

type CountingStore = FaultyStore;

// ---------------------------------------------------------------------------------------------
// The mock inner service and its bodies.

type TestBody = UnsyncBoxBody<Bytes, BoxError>;
type Req = Request<String>;
type Res = Response<TestBody>;
type Svc = ResumableSse<mock::Mock<Req, Res>, CountingStore>;
type Handle = mock::Handle<Req, Res>;
type Reply = mock::SendResponse<Res>;
type Sender = mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

fn layered(store: CountingStore) -> (Svc, Handle) {
    let (inner, handle) = mock::pair();
    let svc = ResumableSseLayer::new(store)
        .keep_alive(resumable_sse::KeepAlive::disabled())
        .layer(inner);
    (svc, handle)
}

fn full(bytes: &'static [u8]) -> TestBody {
    Full::new(Bytes::from_static(bytes))
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body whose frames the test sends one by one; dropping the sender ends it.
fn channel() -> (Sender, TestBody) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    (tx, body.boxed_unsync())
}

fn send(tx: &Sender, chunk: &'static [u8]) {
    tx.send(Ok(Frame::data(Bytes::from_static(chunk))))
        .expect("the inner body is still read");
}

fn sse(body: TestBody) -> Res {
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(String::new()).unwrap()
}

fn resume(uri: &str, last_event_id: &str) -> Req {
    Request::get(uri)
        .header("last-event-id", last_event_id)
        .body(String::new())
        .unwrap()
}

type Answer = Result<Response<ResumableBody<TestBody>>, BoxError>;

/// Calls the layered service on a task of its own, so the test can answer as the inner service.
fn call(svc: &Svc, req: Req) -> tokio::task::JoinHandle<Answer> {
    tokio::spawn(svc.clone().oneshot(req))
}

async fn answer(call: tokio::task::JoinHandle<Answer>) -> Answer {
    tokio::time::timeout(TIMEOUT, call)
        .await
        .expect("answer in time")
        .expect("the call does not panic")
}

/// The next request the inner service receives.
async fn inner_request(handle: &mut Handle) -> (Req, Reply) {
    tokio::time::timeout(TIMEOUT, handle.next_request())
        .await
        .expect("the inner service is called")
        .expect("the mock is open")
}

fn assert_inner_not_called(handle: &mut Handle) {
    assert!(
        handle.poll_request().is_pending(),
        "the inner service was called"
    );
}

/// Once every service clone is dropped, proves that no request reached the inner service that
/// the test did not take.
async fn assert_no_more_inner_calls(svc: Svc, mut handle: Handle) {
    drop(svc);
    let next = tokio::time::timeout(TIMEOUT, handle.next_request())
        .await
        .expect("every clone of the inner service is dropped");
    assert!(next.is_none(), "the inner service was called again");
}

async fn frames(res: Response<ResumableBody<TestBody>>) -> Vec<Bytes> {
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("a frame or the end in time")
    {
        if let Ok(data) = frame.expect("the body does not fail").into_data() {
            out.push(data);
        }
    }
    out
}

/// The body's bytes up to its end, and the error it ended with, if it failed.
async fn body_and_error(res: Response<ResumableBody<TestBody>>) -> (Bytes, Option<String>) {
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("a frame or the end in time")
    {
        match frame {
            Ok(frame) => out.extend(frame.into_data().unwrap_or_default()),
            Err(e) => return (out.into(), Some(e.to_string())),
        }
    }
    (out.into(), None)
}

async fn body_bytes(res: Response<ResumableBody<TestBody>>) -> Bytes {
    frames(res).await.concat().into()
}

/// The next frame of a live session body. Frames, not events: the tests below check what each
/// frame of an in-process body holds (one event, or the eviction comment alone), which a reader
/// of a socket (`common::SseConn`) cannot tell apart.
async fn next_frame(body: &mut ResumableBody<TestBody>) -> Option<Bytes> {
    let frame = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("an event or the end in time")?;
    Some(frame.expect("the body does not fail").into_data().unwrap())
}

/// The data of every event of an encoded stream (read by the tests' one parser).
fn datas_in(bytes: &[u8]) -> Vec<String> {
    datas(&parse_events(bytes))
}

/// The id of every event of an encoded stream.
fn ids_in(bytes: &[u8]) -> Vec<String> {
    parse_events(bytes)
        .into_iter()
        .map(|ev| ev.id.expect("every event has an id"))
        .collect()
}

fn event_id(bytes: &[u8]) -> EventId {
    let ids = ids_in(bytes);
    EventId::parse(ids[0].as_bytes()).expect("an id of the layer")
}

fn reason(res: &Response<ResumableBody<TestBody>>) -> Option<&str> {
    res.headers()
        .get(REASON_HEADER)
        .map(|v| v.to_str().unwrap())
}

async fn lookup(store: &CountingStore, key: &str) -> Option<SessionInfo> {
    store.inner.lookup(&scoped("/chat", key)).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Requests without a key.

#[tokio::test]
async fn requests_without_a_key_reach_the_inner_service_untouched_without_store_access() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let req = Request::post("/chat?model=small&session=other&lastEventId=garbage")
        .header("accept", "text/event-stream")
        .header("last-event-id", "not-one-of-ours")
        .header("x-request-id", "42")
        .body("the prompt".to_owned())
        .unwrap();
    let (uri, headers) = (req.uri().clone(), req.headers().clone());
    let pending = call(&svc, req);

    let (got, reply) = inner_request(&mut handle).await;
    assert_eq!(got.method(), Method::POST);
    assert_eq!(got.uri(), &uri);
    assert_eq!(got.headers(), &headers);
    assert_eq!(got.body(), "the prompt");

    // Even an event stream is left alone: same chunks, inner ids kept, no id of the layer.
    let chunks: [&'static [u8]; 3] = [b"id: inner-1\ndata: a\n\n", b": ping\n\n", b"data: b"];
    let (tx, body) = channel();
    let mut res = sse(body);
    res.headers_mut()
        .insert("content-length", "48".parse().unwrap());
    let sent_headers = res.headers().clone();
    reply.send_response(res);
    for chunk in chunks {
        send(&tx, chunk);
    }
    drop(tx);
    let res = answer(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers(), &sent_headers);
    assert_eq!(frames(res).await, chunks);
    assert_eq!(store.total_calls(), 0, "no store access without a key");
    assert_no_more_inner_calls(svc, handle).await;
}

/// Polls one call through `svc` to its response, with the readiness check.
fn call_to_completion<S, B>(svc: &mut S, req: Request<()>)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => drop(res),
        Poll::Ready(Err(e)) => panic!("the call failed: {e:?}"),
        Poll::Pending => panic!("a ready inner service answers at once"),
    }
}

#[test]
fn requests_without_a_key_pass_through_without_allocating() {
    // The counter sees allocations at all.
    assert!(allocations_in(|| drop(std::hint::black_box(Box::new(7u64)))) >= 1);

    let inner = tower::service_fn(|_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
    });
    let store = CountingStore::default();
    let mut bare = inner;
    let mut layered = ResumableSseLayer::new(store.clone()).layer(inner);
    let request = || {
        Request::get("/chat?model=small&stream=1")
            .header("accept", "text/event-stream")
            .header("last-event-id", "5f3a9b2c1d0e-4")
            .body(())
            .unwrap()
    };
    // One call each first, so that nothing initialised once is counted.
    call_to_completion(&mut bare, request());
    call_to_completion(&mut layered, request());

    let (for_bare, for_layered) = (request(), request());
    let bare_allocations = allocations_in(|| call_to_completion(&mut bare, for_bare));
    let layered_allocations = allocations_in(|| call_to_completion(&mut layered, for_layered));
    assert_eq!(
        layered_allocations, bare_allocations,
        "the layer allocated on a request without a key"
    );
    assert_eq!(store.total_calls(), 0);
}

// ---------------------------------------------------------------------------------------------
// Which responses become sessions.

#[tokio::test]
async fn responses_that_are_not_ok_event_streams_pass_through_and_create_no_session() {
    let cases: [(u16, &[(&str, &str)]); 3] = [
        (201, &[("content-type", "text/event-stream")]),
        (200, &[("content-type", "application/json")]),
        (
            200,
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "gzip"),
            ],
        ),
    ];
    let chunks: [&'static [u8]; 3] = [
        b"id: inner-1\n",
        b"data: {\"a\":1}\n\n",
        b"\x1f\x8b\x08\x00",
    ];
    for (i, (status, headers)) in cases.into_iter().enumerate() {
        let store = CountingStore::default();
        let (svc, mut handle) = layered(store.clone());
        let key = format!("plain-{i}");
        let uri = format!("/chat?session_id={key}");
        // The same key twice: each time the inner service answers, because no session was made.
        for _ in 0..2 {
            let pending = call(&svc, get(&uri));
            let (_, reply) = inner_request(&mut handle).await;
            let mut res = Response::builder().status(status);
            for (name, value) in headers {
                res = res.header(*name, *value);
            }
            let (tx, body) = channel();
            let res = res.body(body).unwrap();
            let sent_headers = res.headers().clone();
            reply.send_response(res);
            for chunk in chunks {
                send(&tx, chunk);
            }
            drop(tx);
            let res = answer(pending).await.unwrap();
            assert_eq!(res.status(), status, "case {i}");
            assert_eq!(res.headers(), &sent_headers, "case {i}");
            assert_eq!(frames(res).await, chunks, "case {i}");
            assert!(lookup(&store, &key).await.is_none(), "case {i}: no session");
        }
        assert_eq!(store.calls("start"), 0, "case {i}");
        assert_no_more_inner_calls(svc, handle).await;
    }
}

#[tokio::test]
async fn content_type_matching_ignores_case_and_parameters() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=cased";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let res = Response::builder()
        .header("content-type", "Text/Event-Stream; charset=utf-8")
        .body(full(b"data: hi\n\n"))
        .unwrap();
    reply.send_response(res);
    let res = answer(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "Text/Event-Stream; charset=utf-8"
    );
    let first = body_bytes(res).await;
    let id = event_id(&first);
    assert_eq!(first, format!("id: {id}\ndata: hi\n\n"));

    let info = lookup(&store, "cased").await.expect("a session");
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    assert_eq!(info.epoch, id.epoch);
    // The session answers the next request itself.
    let again = call(&svc, get(uri));
    let again = answer(again).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(body_bytes(again).await, first);
    assert_no_more_inner_calls(svc, handle).await;
}

#[tokio::test]
async fn concurrent_first_calls_of_the_service_share_one_inner_call_and_identical_bytes() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let clients: Vec<_> = (0..5)
        .map(|_| call(&svc, get("/chat?session_id=crowd")))
        .collect();
    // All five have asked for the session before the inner service answers.
    eventually("five claims", || store.calls("claim") >= 5).await;
    let (_, reply) = inner_request(&mut handle).await;
    assert_inner_not_called(&mut handle);

    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: one\n\n");
    send(&tx, b"data: two\n\n");
    send(&tx, b"data: three\n\n");
    drop(tx);
    let mut results = Vec::new();
    for client in clients {
        let res = answer(client).await.unwrap();
        results.push((res.status(), body_bytes(res).await));
    }
    let (status, first) = &results[0];
    assert_eq!(*status, StatusCode::OK);
    assert_eq!(datas_in(first), ["one", "two", "three"]);
    for (status, bytes) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(bytes, first, "every client gets identical bytes");
    }
    assert_no_more_inner_calls(svc, handle).await;
}

// ---------------------------------------------------------------------------------------------
// Framing of the inner event stream.

#[tokio::test]
async fn awkwardly_chunked_inner_events_are_stored_with_the_layers_own_ids() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=framing";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    let chunks: [&'static [u8]; 11] = [
        // A byte order mark split over two chunks.
        b"\xEF\xBB",
        // CRLF split: CR at the end of one chunk, LF at the start of the next; an inner id.
        b"\xBFid: inner-7\r",
        b"\ndata: fir",
        // A lone CR at the end of a chunk ends the block ...
        b"st\r\n\r",
        // ... and the LF that follows belongs to it; then a keep-alive comment block.
        b"\n: keep-alive\n\n",
        // CR-only line ends.
        b"event: update\rdata: second\rdata: line two\r\r",
        b":\r\n\r\n",
        // An id-only block, a retry with data given without a colon, data without a space.
        b"id: inner-8\n\nretry: 2500\ndata\n\nid: inner-9\ndata:third\n",
        b"\n",
        b": another comment\n\n",
        b": and another\n\n",
    ];
    for chunk in chunks {
        send(&tx, chunk);
    }
    drop(tx);
    let res = answer(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let received = body_bytes(res).await;

    let first =
        EventId::parse(ids_in(&received)[0].as_bytes()).expect("the first id is the layer's");
    let epoch = first.to_string()[..12].to_owned();
    assert!(epoch
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let expected = format!(
        "id: {epoch}-1\ndata: first\n\n\
         id: {epoch}-2\nevent: update\ndata: second\ndata: line two\n\n\
         id: {epoch}-3\nretry: 2500\ndata: \n\n\
         id: {epoch}-4\ndata: third\n\n"
    );
    assert_eq!(String::from_utf8(received.to_vec()).unwrap(), expected);

    // A reconnect from the start replays exactly the stored events: no comment block.
    let replay = answer(call(&svc, get(uri))).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(body_bytes(replay).await, received);
    // A reconnect after the second event gets the third and the fourth.
    let rest = answer(call(&svc, resume(uri, &format!("{epoch}-2"))))
        .await
        .unwrap();
    assert_eq!(
        body_bytes(rest).await,
        expected[expected.find(&format!("id: {epoch}-3")).unwrap()..]
    );
    assert_eq!(lookup(&store, "framing").await.unwrap().last_seq, 4);
    assert_no_more_inner_calls(svc, handle).await;
}

// ---------------------------------------------------------------------------------------------
// Requests the layer answers by itself.

#[tokio::test]
async fn bad_positions_and_keys_are_answered_without_calling_the_inner_service() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    // A running session with two events.
    let uri = "/chat?session_id=live";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: 1\n\ndata: 2\n\n");
    let live = answer(pending).await.unwrap();
    session_when(
        &store.inner,
        &scoped("/chat", "live"),
        "2 events stored",
        |i| i.last_seq == 2,
    )
    .await;
    let epoch = lookup(&store, "live").await.unwrap().epoch;
    let id = |seq| EventId { epoch, seq }.to_string();
    let long_key = format!("/chat?session_id={}", "k".repeat(10 * 1024));

    let cases: Vec<(String, Option<String>, StatusCode, &str)> = vec![
        (
            uri.into(),
            Some("garbage".into()),
            StatusCode::BAD_REQUEST,
            "malformed-last-event-id",
        ),
        (
            uri.into(),
            Some(id(1).to_uppercase()),
            StatusCode::BAD_REQUEST,
            "malformed-last-event-id",
        ),
        (
            uri.into(),
            Some(format!("{}-99999999999999999999", &id(1)[..12])),
            StatusCode::BAD_REQUEST,
            "malformed-last-event-id",
        ),
        (
            "/chat?session_id=live&lastEventId=nonsense".into(),
            None,
            StatusCode::BAD_REQUEST,
            "malformed-last-event-id",
        ),
        (
            "/chat?session_id=never".into(),
            Some(id(1)),
            StatusCode::GONE,
            "unknown-session",
        ),
        (
            "/chat?session_id=never".into(),
            Some("000000000001-0".into()),
            StatusCode::GONE,
            "unknown-session",
        ),
        (
            uri.into(),
            Some(id(3)),
            StatusCode::BAD_REQUEST,
            "beyond-head",
        ),
        (
            long_key.clone(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid-session-key",
        ),
        (
            long_key,
            Some(id(1)),
            StatusCode::BAD_REQUEST,
            "invalid-session-key",
        ),
        (
            "/chat?session_id=%ff".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid-session-key",
        ),
        (
            "/chat?session_id=%ff".into(),
            Some(id(1)),
            StatusCode::BAD_REQUEST,
            "invalid-session-key",
        ),
    ];
    for (uri, last, status, why) in cases {
        let req = match &last {
            Some(last) => resume(&uri, last),
            None => get(&uri),
        };
        let res = answer(call(&svc, req)).await.unwrap();
        let case = format!("{} {last:?}", &uri[..uri.len().min(40)]);
        assert_eq!(res.status(), status, "{case}");
        assert_eq!(reason(&res), Some(why), "{case}");
        assert_eq!(res.headers()["cache-control"], "no-store", "{case}");
        assert!(body_bytes(res).await.is_empty(), "{case}");
        assert_inner_not_called(&mut handle);
    }
    assert!(lookup(&store, "never").await.is_none());

    drop(tx);
    assert_eq!(datas_in(&body_bytes(live).await), ["1", "2"]);
    assert_no_more_inner_calls(svc, handle).await;
}

// ---------------------------------------------------------------------------------------------
// Claims that do not become sessions.

#[tokio::test]
async fn an_inner_service_error_reaches_the_caller_and_releases_the_claim() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=flaky";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    reply.send_error("model overloaded");
    let err = answer(pending)
        .await
        .expect_err("the inner error is returned");
    assert_eq!(err.to_string(), "model overloaded");

    // No session is stuck in its start: the next request calls the inner service again.
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    reply.send_response(sse(full(b"data: second try\n\n")));
    let res = answer(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(datas_in(&body_bytes(res).await), ["second try"]);
    assert_no_more_inner_calls(svc, handle).await;
}

#[tokio::test]
async fn a_caller_that_goes_away_while_the_inner_service_answers_releases_the_claim() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=impatient";
    let pending = call(&svc, get(uri));
    // The claim is held and the inner service is still answering when the caller goes away.
    let (_, first_reply) = inner_request(&mut handle).await;
    assert_eq!(
        lookup(&store, "impatient").await.unwrap().status,
        Status::Starting
    );
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());

    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    reply.send_response(sse(full(b"data: fresh\n\n")));
    let res = answer(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(datas_in(&body_bytes(res).await), ["fresh"]);
    // The abandoned answer arrives too late to matter.
    first_reply.send_response(sse(full(b"data: stale\n\n")));
    let replay = answer(call(&svc, get(uri))).await.unwrap();
    assert_eq!(datas_in(&body_bytes(replay).await), ["fresh"]);
    assert_no_more_inner_calls(svc, handle).await;
}

// ---------------------------------------------------------------------------------------------
// Session life.

#[tokio::test]
async fn a_call_holding_the_last_event_gets_204_completed_and_one_holding_less_gets_the_rest() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=done";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    reply.send_response(sse(full(b"data: a\n\ndata: b\n\n")));
    let all = body_bytes(answer(pending).await.unwrap()).await;
    let ids = ids_in(&all);
    assert_eq!(ids.len(), 2);

    let end = answer(call(&svc, resume(uri, &ids[1]))).await.unwrap();
    assert_eq!(end.status(), StatusCode::NO_CONTENT);
    assert_eq!(reason(&end), Some("completed"));
    assert_eq!(end.headers()["cache-control"], "no-store");
    // Holding the first event only, the client still gets the second.
    let rest = answer(call(&svc, resume(uri, &ids[0]))).await.unwrap();
    assert_eq!(datas_in(&body_bytes(rest).await), ["b"]);
    assert_no_more_inner_calls(svc, handle).await;
}

/// Captures what `tracing` writes on this thread.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn an_inner_body_error_keeps_the_stored_events_fails_the_session_and_logs_a_warning() {
    use tracing_subscriber::util::SubscriberInitExt;
    let log = Log::default();
    let writer = log.clone();
    // The test runtime runs every task on this thread, the producer included.
    let _guard = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .finish()
        .set_default();

    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=broken";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: kept\n\n");
    tx.send(Err("generator crashed".into())).unwrap();
    let res = answer(pending).await.unwrap();
    // The client gets what was stored, then the body fails (the connection is aborted), as a
    // plain handler's would.
    let (received, error) = body_and_error(res).await;
    assert_eq!(datas_in(&received), ["kept"]);
    assert_eq!(error.as_deref(), Some("the session failed"));
    let info = lookup(&store, "broken").await.unwrap();
    assert_eq!(info.status, Status::Finished(Outcome::Failed));

    let last = &ids_in(&received)[0];
    let end = answer(call(&svc, resume(uri, last))).await.unwrap();
    assert_eq!(end.status(), StatusCode::NO_CONTENT);
    assert_eq!(reason(&end), Some("failed"));
    let text = log.text();
    assert!(
        text.contains("WARN") && text.contains("generator crashed"),
        "a warning records the failure: {text:?}"
    );
    assert_no_more_inner_calls(svc, handle).await;
}

#[tokio::test]
async fn ids_from_an_earlier_incarnation_are_foreign() {
    // Finished sessions expire at once.
    let store = CountingStore::new(MemoryStore::builder().retention(Duration::ZERO).build());
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=again";

    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: old\n\n");
    let mut old_body = answer(pending).await.unwrap().into_body();
    let old_id = event_id(&next_frame(&mut old_body).await.unwrap());
    drop(tx);
    assert_eq!(next_frame(&mut old_body).await, None);
    assert!(
        lookup(&store, "again").await.is_none(),
        "the first session expired"
    );

    // A new incarnation of the key, still running.
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: new\n\n");
    let mut new_body = answer(pending).await.unwrap().into_body();
    let new_id = event_id(&next_frame(&mut new_body).await.unwrap());
    assert_ne!(new_id.epoch, old_id.epoch);
    assert_eq!(new_id.seq, 1);

    let foreign = answer(call(&svc, resume(uri, &old_id.to_string())))
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::GONE);
    assert_eq!(reason(&foreign), Some("foreign-epoch"));
    // An id of the current incarnation resumes.
    let current = answer(call(
        &svc,
        resume(uri, &format!("{}-0", &new_id.to_string()[..12])),
    ))
    .await
    .unwrap();
    assert_eq!(current.status(), StatusCode::OK);
    drop(tx);
    assert_eq!(datas_in(&body_bytes(current).await), ["new"]);
    assert_no_more_inner_calls(svc, handle).await;
}

/// The encoded size of the one-digit events `data: N` of the tests below, with the layer's id.
const SMALL_EVENT_LEN: usize = "id: 0123456789ab-1\ndata: 1\n\n".len();

/// A session `key` on `store` whose connected client has read its first event: the service,
/// the mock's handle, the inner body's sender, the client's body and the first event's id.
async fn one_event_read(
    store: &CountingStore,
    key: &str,
) -> (Svc, Handle, Sender, ResumableBody<TestBody>, EventId) {
    let (svc, mut handle) = layered(store.clone());
    let pending = call(&svc, get(&format!("/chat?session_id={key}")));
    let (_, reply) = inner_request(&mut handle).await;
    let (tx, body) = channel();
    reply.send_response(sse(body));
    send(&tx, b"data: 1\n\n");
    let mut connected = answer(pending).await.unwrap().into_body();
    let first = event_id(&next_frame(&mut connected).await.unwrap());
    (svc, handle, tx, connected, first)
}

/// Events 2 to 6, once stored.
async fn send_five_more(store: &CountingStore, tx: &Sender, key: &str) {
    send(
        tx,
        b"data: 2\n\ndata: 3\n\ndata: 4\n\ndata: 5\n\ndata: 6\n\n",
    );
    session_when(
        &store.inner,
        &scoped("/chat", key),
        "6 events stored",
        |i| i.last_seq == 6,
    )
    .await;
}

#[tokio::test]
async fn a_body_behind_the_hard_limit_ends_with_the_evicted_comment_and_older_positions_get_410() {
    // Three events of history, and no room to keep more for a connected reader either.
    let store = CountingStore::new(
        MemoryStore::builder()
            .max_events_per_session(3)
            .max_bytes_per_session(3 * SMALL_EVENT_LEN)
            .hard_max_bytes_per_session(3 * SMALL_EVENT_LEN)
            .build(),
    );
    let (svc, handle, tx, mut connected, first) = one_event_read(&store, "long").await;
    let uri = "/chat?session_id=long";
    // The connected client stops reading while five more events arrive; only 4, 5 and 6 are
    // retained.
    send_five_more(&store, &tx, "long").await;
    assert_eq!(lookup(&store, "long").await.unwrap().first_seq, 4);
    // It is disconnected, with a comment saying why, rather than given event 4 after event 1.
    assert_eq!(
        next_frame(&mut connected).await.as_deref(),
        Some(resumable_sse::sse::EVICTED_COMMENT)
    );
    assert_eq!(next_frame(&mut connected).await, None);

    let id = |seq| {
        EventId {
            epoch: first.epoch,
            seq,
        }
        .to_string()
    };
    for req in [resume(uri, &id(1)), resume(uri, &id(2)), get(uri)] {
        let res = answer(call(&svc, req)).await.unwrap();
        assert_eq!(res.status(), StatusCode::GONE);
        assert_eq!(reason(&res), Some("evicted"));
    }
    let rest = answer(call(&svc, resume(uri, &id(3)))).await.unwrap();
    assert_eq!(rest.status(), StatusCode::OK);
    drop(tx);
    assert_eq!(datas_in(&body_bytes(rest).await), ["4", "5", "6"]);
    assert_no_more_inner_calls(svc, handle).await;
}

#[tokio::test]
async fn a_connected_reader_keeps_the_events_it_needs_past_the_soft_limit() {
    let store = CountingStore::new(MemoryStore::builder().max_events_per_session(3).build());
    let (svc, handle, tx, mut connected, first) = one_event_read(&store, "held").await;
    // Five more events while the connected client reads nothing: past the limit of three, but
    // it still needs them, so they stay.
    send_five_more(&store, &tx, "held").await;
    assert_eq!(lookup(&store, "held").await.unwrap().first_seq, 2);
    drop(tx);
    let mut rest = Vec::new();
    while let Some(frame) = next_frame(&mut connected).await {
        rest.extend_from_slice(&frame);
    }
    assert_eq!(datas_in(&rest), ["2", "3", "4", "5", "6"]);
    assert_eq!(first.seq, 1);
    assert_no_more_inner_calls(svc, handle).await;
}

#[tokio::test]
async fn response_heads_of_a_session_are_replayed_without_framing_headers() {
    let store = CountingStore::default();
    let (svc, mut handle) = layered(store.clone());
    let uri = "/chat?session_id=head";
    let pending = call(&svc, get(uri));
    let (_, reply) = inner_request(&mut handle).await;
    let res = Response::builder()
        .header("content-type", "text/event-stream")
        .header("content-length", "10")
        .header("x-model", "small")
        .body(full(b"data: hi\n\n"))
        .unwrap();
    reply.send_response(res);
    let first = answer(pending).await.unwrap();
    let replay = answer(call(&svc, get(uri))).await.unwrap();
    for res in [&first, &replay] {
        let headers: &HeaderMap = res.headers();
        assert_eq!(headers["x-model"], "small");
        assert_eq!(headers["content-type"], "text/event-stream");
        assert!(
            headers.get("content-length").is_none(),
            "the length changes"
        );
    }
    assert_eq!(body_bytes(first).await, body_bytes(replay).await);
    assert_no_more_inner_calls(svc, handle).await;
}
