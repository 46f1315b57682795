//! Bad input, one row per test, over real TCP: what a client can send (`Last-Event-ID`,
//! `session_id`), what an inner service can produce (huge events, arbitrary bytes, CR line ends),
//! and load a single client can put on the limits. Each row checks the exact status and
//! `resumable-sse-reason`, and that the inner service is not called when it must not be.
//!
//! The rows that measure the process's memory (VmRSS) run alone: every other test here holds
//! [`LOCK`] shared, those hold it exclusively.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use resumable_sse::store::{Status, Store};
use resumable_sse::{Epoch, EventId, MemoryStore, Outcome, ResumableSseLayer, SessionKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

use common::*;

/// Shared by every test; taken exclusively by the tests that measure the process's memory.
static LOCK: RwLock<()> = RwLock::const_new(());

/// A whole response: status, reason, body.
struct Answer {
    status: StatusCode,
    reason: Option<String>,
    body: Bytes,
}

/// Sends a GET with the given `Last-Event-ID` header and reads the whole response.
async fn answer(addr: std::net::SocketAddr, path: &str, last_event_id: Option<&str>) -> Answer {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = tokio::time::timeout(TIMEOUT, client().request(req.body(Empty::new()).unwrap()))
        .await
        .expect("response in time")
        .expect("request succeeds");
    let status = res.status();
    let reason = res
        .headers()
        .get("resumable-sse-reason")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = tokio::time::timeout(TIMEOUT, res.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Answer {
        status,
        reason,
        body,
    }
}

/// Asserts that the layer answered by itself with `status` and `reason`, and an empty body.
#[track_caller]
fn assert_rejected(a: &Answer, status: StatusCode, reason: &str, case: &str) {
    assert_eq!(a.status, status, "{case}");
    assert_eq!(a.reason.as_deref(), Some(reason), "{case}");
    assert!(a.body.is_empty(), "{case}");
}

/// Serves `app` on a free port with `TCP_NODELAY` on every connection (so that a response
/// written in several pieces is not held back by Nagle's algorithm) and, if given, a small send
/// buffer (so that a client that stops reading stops the server's writes early).
async fn serve_nodelay(app: Router, send_buffer: Option<u32>) -> std::net::SocketAddr {
    use axum::serve::ListenerExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = send_buffer {
        // Accepted connections inherit it.
        socket.set_send_buffer_size(size).unwrap();
    }
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The harness's routes behind `layer`, served by [`serve_nodelay`].
async fn serve_fast<St: Store>(
    store: St,
    layer: impl FnOnce(ResumableSseLayer<St>) -> ResumableSseLayer<St>,
) -> App<St> {
    let inner = Inner::default();
    let app = routes(inner.clone()).layer(layer(ResumableSseLayer::new(store.clone())));
    let addr = serve_nodelay(app, None).await;
    App { addr, inner, store }
}

/// An app on a fresh memory store with one finished session `key` of three events.
async fn app_with_session(key: &str) -> (App, Vec<Ev>) {
    let app = serve_fast(MemoryStore::new(), |l| l).await;
    let evs = get(app.addr, &format!("/tokens?session_id={key}&n=3"), None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    assert_eq!(app.inner.calls(), 1);
    (app, evs)
}

fn epoch_of(ev: &Ev) -> Epoch {
    EventId::parse(ev.id.as_deref().unwrap().as_bytes())
        .unwrap()
        .epoch
}

/// The 12 hex digits of an epoch, as they start every id.
fn epoch_hex(epoch: Epoch) -> String {
    EventId { epoch, seq: 0 }.to_string()[..12].to_owned()
}

// ---------------------------------------------------------------------------------------------
// Last-Event-ID

/// Sends each `Last-Event-ID` to the existing session `s` and to a key with no session: every one
/// is `400 malformed-last-event-id`, and neither the inner service nor the store is touched.
async fn assert_malformed_everywhere(ids: &[String]) {
    let (app, _) = app_with_session("s").await;
    for id in ids {
        for key in ["s", "fresh"] {
            let a = answer(app.addr, &format!("/tokens?session_id={key}&n=3"), Some(id)).await;
            let case = format!("{key}: {}", &id[..id.len().min(40)]);
            assert_rejected(
                &a,
                StatusCode::BAD_REQUEST,
                "malformed-last-event-id",
                &case,
            );
        }
    }
    assert_eq!(app.inner.calls(), 1, "the inner service was called again");
    assert!(app
        .store
        .lookup(&SessionKey::new("fresh").unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn garbage_last_event_ids_are_400_malformed_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let ids = [
        "garbage",
        "inner-2",
        "{}",
        "5f3a9b2c1d0e",
        "5f3a9b2c1d0e-",
        "5F3A9B2C1D0E-1",
        "5f3a9b2c1d0e-+1",
        "5f3a9b2c1d0e-01",
        "5f3a9b2c1d0e-1.0",
        "5f3a9b2c1d0e-1\t2",
    ];
    assert_malformed_everywhere(&ids.map(String::from)).await;
}

#[tokio::test]
async fn a_10_kb_last_event_id_is_400_malformed_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (_, evs) = app_with_session("probe").await;
    let valid = evs[0].id.clone().unwrap();
    assert_malformed_everywhere(&[
        "1".repeat(10 * 1024),
        format!("{valid}{}", "0".repeat(10 * 1024)),
        format!("{}-{}", &valid[..12], "9".repeat(10 * 1024)),
    ])
    .await;
}

#[tokio::test]
async fn negative_last_event_ids_are_400_malformed_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (_, evs) = app_with_session("probe").await;
    let epoch = epoch_hex(epoch_of(&evs[0]));
    assert_malformed_everywhere(&[
        "-1".to_owned(),
        format!("{epoch}--1"),
        format!("-{epoch}-1"),
    ])
    .await;
}

#[tokio::test]
async fn last_event_ids_overflowing_u64_are_400_malformed_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (_, evs) = app_with_session("probe").await;
    let epoch = epoch_hex(epoch_of(&evs[0]));
    assert_malformed_everywhere(&[
        format!("{epoch}-18446744073709551616"),
        format!("{epoch}-99999999999999999999"),
        format!("1{epoch}-1"),
    ])
    .await;
}

#[tokio::test]
async fn a_nul_in_the_last_event_id_query_parameter_is_400_malformed() {
    let _shared = LOCK.read().await;
    let (app, evs) = app_with_session("s").await;
    let id = evs[0].id.clone().unwrap();
    for query in [
        format!("lastEventId={id}%00"),
        format!("lastEventId=%00{id}"),
        "lastEventId=%00".to_owned(),
    ] {
        let a = answer(app.addr, &format!("/tokens?session_id=s&n=3&{query}"), None).await;
        assert_rejected(
            &a,
            StatusCode::BAD_REQUEST,
            "malformed-last-event-id",
            &query,
        );
    }
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_nul_in_the_last_event_id_header_is_refused_by_the_http_server_before_the_layer() {
    let _shared = LOCK.read().await;
    let (app, evs) = app_with_session("s").await;
    let id = evs[0].id.clone().unwrap();
    // Header values cannot carry NUL: an HTTP client refuses to send one, so write it by hand.
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let req = format!(
        "GET /tokens?session_id=s&n=3 HTTP/1.1\r\nhost: x\r\nlast-event-id: {id}\0\r\nconnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut res = Vec::new();
    tokio::time::timeout(TIMEOUT, conn.read_to_end(&mut res))
        .await
        .expect("answer in time")
        .unwrap();
    let res = String::from_utf8_lossy(&res);
    assert!(res.starts_with("HTTP/1.1 400 "), "{res}");
    assert!(!res.contains("resumable-sse-reason"), "{res}");
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn an_id_of_another_session_is_410_foreign_epoch_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (app, a_evs) = app_with_session("a").await;
    let b_evs = get(app.addr, "/tokens?session_id=b&n=3", None)
        .await
        .collect()
        .await;
    assert_ne!(epoch_of(&a_evs[0]), epoch_of(&b_evs[0]));
    // A valid id of session `a`, sent to `b`: `b` has another epoch.
    for ev in &a_evs {
        let id = ev.id.as_deref().unwrap();
        let r = answer(app.addr, "/tokens?session_id=b&n=3", Some(id)).await;
        assert_rejected(&r, StatusCode::GONE, "foreign-epoch", id);
        // ... and to a key that has no session at all.
        let r = answer(app.addr, "/tokens?session_id=c&n=3", Some(id)).await;
        assert_rejected(&r, StatusCode::GONE, "unknown-session", id);
    }
    assert_eq!(app.inner.calls(), 2);
}

#[tokio::test]
async fn an_id_with_another_epoch_is_410_foreign_epoch_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (app, evs) = app_with_session("s").await;
    let epoch = epoch_of(&evs[0]);
    for other in [
        Epoch::from_raw(epoch.raw() ^ 1),
        Epoch::from_raw(epoch.raw() ^ (1 << 47)),
        Epoch::from_raw(0),
    ] {
        for seq in [0, 1, 3] {
            let id = EventId { epoch: other, seq }.to_string();
            let r = answer(app.addr, "/tokens?session_id=s&n=3", Some(&id)).await;
            assert_rejected(&r, StatusCode::GONE, "foreign-epoch", &id);
        }
    }
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn an_id_beyond_the_head_is_400_beyond_head_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let (app, evs) = app_with_session("s").await;
    let epoch = epoch_of(&evs[0]);
    for seq in [4, 5, 1_000_000, u64::MAX] {
        let id = EventId { epoch, seq }.to_string();
        let r = answer(app.addr, "/tokens?session_id=s&n=3", Some(&id)).await;
        assert_rejected(&r, StatusCode::BAD_REQUEST, "beyond-head", &id);
    }
    // The same on a running session.
    app.inner.gate("live");
    let mut live = get(app.addr, "/gated?session_id=live", None).await;
    app.inner.send("live", "one");
    let first = live.take(1).await;
    let id = EventId {
        epoch: epoch_of(&first[0]),
        seq: 2,
    }
    .to_string();
    let r = answer(app.addr, "/gated?session_id=live", Some(&id)).await;
    assert_rejected(&r, StatusCode::BAD_REQUEST, "beyond-head", &id);
    assert_eq!(app.inner.calls(), 2);
    app.inner.end("live");
}

// ---------------------------------------------------------------------------------------------
// session_id

#[tokio::test]
async fn an_empty_session_id_passes_through_to_the_inner_service_untouched() {
    let _shared = LOCK.read().await;
    let app = serve_fast(MemoryStore::new(), |l| l).await;
    for _ in 0..2 {
        let evs = get(app.addr, "/tokens?session_id=&n=3", None)
            .await
            .collect()
            .await;
        assert_eq!(datas(&evs), expected_tokens(0..3));
        // The inner ids, untouched: no session was made.
        assert_eq!(evs[0].id.as_deref(), Some("inner-0"));
    }
    assert_eq!(app.inner.calls(), 2, "no key, no resumption");
    assert!(app.store.is_empty());
}

#[tokio::test]
async fn a_10_kb_session_id_is_400_invalid_session_key_without_calling_the_inner_service() {
    let _shared = LOCK.read().await;
    let app = serve_fast(MemoryStore::new(), |l| l).await;
    let long = "k".repeat(10 * 1024);
    for last in [None, Some("000000000001-1")] {
        let r = answer(app.addr, &format!("/tokens?session_id={long}&n=3"), last).await;
        assert_rejected(&r, StatusCode::BAD_REQUEST, "invalid-session-key", "10 KB");
    }
    // The limit is 256 bytes.
    let r = answer(
        app.addr,
        &format!("/tokens?session_id={}&n=3", "k".repeat(257)),
        None,
    )
    .await;
    assert_rejected(&r, StatusCode::BAD_REQUEST, "invalid-session-key", "257 B");
    assert_eq!(app.inner.calls(), 0);
    assert!(app.store.is_empty());
    let r = get(
        app.addr,
        &format!("/tokens?session_id={}&n=3", "k".repeat(256)),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "256 bytes is a valid key");
}

#[tokio::test]
async fn bad_percent_encoding_in_a_session_id_is_taken_literally() {
    let _shared = LOCK.read().await;
    let app = serve_fast(MemoryStore::new(), |l| l).await;
    let evs = get(app.addr, "/tokens?session_id=%zz&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    // The key is the three characters `%zz`: `%25zz` names the same session.
    let info = app.store.lookup(&SessionKey::new("%zz").unwrap()).await;
    assert_eq!(info.unwrap().unwrap().last_seq, 3);
    let r = answer(
        app.addr,
        "/tokens?session_id=%25zz&n=3",
        evs[2].id.as_deref(),
    )
    .await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (StatusCode::NO_CONTENT, Some("completed"))
    );
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_session_id_that_is_not_utf8_is_400_invalid_session_key_without_calling_the_inner_service(
) {
    let _shared = LOCK.read().await;
    let app = serve_fast(MemoryStore::new(), |l| l).await;
    for key in ["%ff", "a%c3", "%ed%a0%80", "%c0%80"] {
        let r = answer(app.addr, &format!("/tokens?session_id={key}&n=3"), None).await;
        assert_rejected(&r, StatusCode::BAD_REQUEST, "invalid-session-key", key);
    }
    assert_eq!(app.inner.calls(), 0);
    assert!(app.store.is_empty());
}

/// Each key gets a session of its own with `i + 1` events, and a second request for the key
/// replays that session, not another one.
async fn assert_keys_are_ordinary<St: Store>(store: St, keys: &[&str]) {
    let app = serve_fast(store, |l| l).await;
    let path = |i: usize, key: &str| {
        format!(
            "/tokens?session_id={}&n={}",
            utf8_percent_encode(key, NON_ALPHANUMERIC),
            i + 1
        )
    };
    for (i, key) in keys.iter().enumerate() {
        let evs = get(app.addr, &path(i, key), None).await.collect().await;
        assert_eq!(datas(&evs), expected_tokens(0..i + 1), "{key:?}");
    }
    for (i, key) in keys.iter().enumerate() {
        let evs = get(app.addr, &path(i, key), None).await.collect().await;
        assert_eq!(datas(&evs), expected_tokens(0..i + 1), "{key:?} replayed");
        let last = evs.last().unwrap().id.clone();
        let r = answer(app.addr, &path(i, key), last.as_deref()).await;
        assert_eq!(r.reason.as_deref(), Some("completed"), "{key:?}");
        let info = app.store.lookup(&SessionKey::new(key).unwrap()).await;
        assert_eq!(info.unwrap().unwrap().last_seq, i as u64 + 1, "{key:?}");
    }
    assert_eq!(app.inner.calls(), keys.len());
}

/// Redis glob, hash-tag and escaping characters, next to the plain keys they would match.
const GLOB_KEYS: &[&str] = &[
    "ab", "a", "a*", "*", "a?", "?", "[ab]", "a[b]", "[^a]b", "a\\*", "\\", "{a}", "{", "}", "a:b",
    "%", "a%2A",
];

/// Newlines and other control characters, next to the keys they would collapse into.
const NEWLINE_KEYS: &[&str] = &[
    "ab", "a\nb", "a\r\nb", "a\rb", "a b", "a\tb", "\n", "\r\n", "a\n", "a\u{0}b",
];

#[tokio::test]
async fn redis_glob_characters_in_session_ids_are_ordinary_keys_in_memory() {
    let _shared = LOCK.read().await;
    assert_keys_are_ordinary(MemoryStore::new(), GLOB_KEYS).await;
}

#[tokio::test]
async fn newlines_in_session_ids_are_ordinary_keys_in_memory() {
    let _shared = LOCK.read().await;
    assert_keys_are_ordinary(MemoryStore::new(), NEWLINE_KEYS).await;
}

#[cfg(feature = "redis")]
async fn redis_store() -> Option<resumable_sse::RedisStore> {
    let url = common::redis::shared_url()?;
    Some(
        resumable_sse::RedisStore::builder(url)
            .prefix(common::redis::unique_prefix())
            .connect()
            .await
            .expect("connect to redis"),
    )
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_glob_characters_in_session_ids_are_ordinary_keys_on_redis() {
    let _shared = LOCK.read().await;
    let Some(store) = redis_store().await else {
        return;
    };
    assert_keys_are_ordinary(store, GLOB_KEYS).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn newlines_in_session_ids_are_ordinary_keys_on_redis() {
    let _shared = LOCK.read().await;
    let Some(store) = redis_store().await else {
        return;
    };
    assert_keys_are_ordinary(store, NEWLINE_KEYS).await;
}

// ---------------------------------------------------------------------------------------------
// What the inner service produces

/// Serves `GET /raw?session_id=..` behind the layer: a `200 text/event-stream` whose body is
/// `body()`'s chunks; counts the calls.
async fn serve_raw<F, S>(
    store: MemoryStore,
    send_buffer: Option<u32>,
    layer: impl FnOnce(ResumableSseLayer<MemoryStore>) -> ResumableSseLayer<MemoryStore>,
    body: F,
) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn() -> S + Clone + Send + Sync + 'static,
    S: futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = move |State(calls): State<Arc<AtomicUsize>>| {
        let body = body.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(body()))
                .unwrap()
        }
    };
    let app = Router::new()
        .route("/raw", routing::get(handler))
        .with_state(calls.clone())
        .layer(layer(ResumableSseLayer::new(store)));
    (serve_nodelay(app, send_buffer).await, calls)
}

fn chunks(
    parts: &'static [&'static [u8]],
) -> impl Fn() -> stream::Iter<std::vec::IntoIter<Result<Bytes, Infallible>>> + Clone {
    move || {
        stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }
}

/// The bytes the layer writes for events `1..` of `epoch`, given each event's fields.
fn encoded(epoch: Epoch, fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(
            EventId {
                epoch,
                seq: i as u64 + 1,
            }
            .to_string()
            .as_bytes(),
        );
        out.push(b'\n');
        out.extend_from_slice(f);
        out.push(b'\n');
    }
    out
}

#[tokio::test]
async fn invalid_utf8_and_nul_bytes_in_data_pass_through_byte_for_byte() {
    let _shared = LOCK.read().await;
    let store = MemoryStore::new();
    let (addr, calls) = serve_raw(
        store.clone(),
        None,
        |l| l,
        chunks(&[
            b"data: \xff\xfe\x00 nul \x00\n\n",
            b"data: caf\xc3",
            b"\xa9 \xc3 \xed\xa0\x80\ndata: \x00\n\n",
        ]),
    )
    .await;
    let live = answer(addr, "/raw?session_id=bytes", None).await;
    assert_eq!(live.status, 200);
    let epoch = store
        .lookup(&SessionKey::new("bytes").unwrap())
        .await
        .unwrap()
        .unwrap()
        .epoch;
    let expected = encoded(
        epoch,
        &[
            b"data: \xff\xfe\x00 nul \x00\n",
            b"data: caf\xc3\xa9 \xc3 \xed\xa0\x80\ndata: \x00\n",
        ],
    );
    assert_eq!(live.body, expected, "live");
    let replay = answer(addr, "/raw?session_id=bytes", None).await;
    assert_eq!(replay.body, expected, "replayed");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cr_only_line_ends_are_read_as_line_ends() {
    let _shared = LOCK.read().await;
    let store = MemoryStore::new();
    let (addr, _) = serve_raw(
        store.clone(),
        None,
        |l| l,
        chunks(&[
            b"data: a\rdata: b\r\revent: tick\rdata: c\r",
            b"\r: comment\r\rdata: d\r",
            b"\n\r\n",
        ]),
    )
    .await;
    let live = answer(addr, "/raw?session_id=cr", None).await;
    let epoch = store
        .lookup(&SessionKey::new("cr").unwrap())
        .await
        .unwrap()
        .unwrap()
        .epoch;
    let expected = encoded(
        epoch,
        &[
            b"data: a\ndata: b\n",
            b"event: tick\ndata: c\n",
            // CR LF is one line end, even across chunks.
            b"data: d\n",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&live.body),
        String::from_utf8_lossy(&expected)
    );
}

/// The process's resident memory, from `/proc/self/status`.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_100_mb_event_without_a_blank_line_fails_the_session_without_being_buffered() {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 100 << 20;
    let _exclusive = LOCK.write().await;
    let store = MemoryStore::new();
    let produced = Arc::new(AtomicUsize::new(0));
    let body = {
        let produced = produced.clone();
        move || {
            let produced = produced.clone();
            let head = stream::iter([Ok(Bytes::from_static(b"data: one\n\ndata: two\n\ndata: "))]);
            // 100 MiB of one data line, made chunk by chunk as the layer asks for it.
            let flood = stream::iter(0..TOTAL / CHUNK).map(move |_| {
                produced.fetch_add(CHUNK, Ordering::SeqCst);
                Ok(Bytes::from(vec![b'x'; CHUNK]))
            });
            head.chain(flood)
        }
    };
    let before = rss_bytes();
    let (addr, calls) = serve_raw(store.clone(), None, |l| l, body).await;
    let mut conn = get(addr, "/raw?session_id=flood", None).await;
    assert_eq!(conn.status, 200);
    let evs = conn.collect().await;
    assert_eq!(datas(&evs), ["one", "two"]);
    let key = SessionKey::new("flood").unwrap();
    eventually_status(&store, &key, Status::Finished(Outcome::Failed)).await;
    let grown = rss_bytes().saturating_sub(before);
    let produced = produced.load(Ordering::SeqCst);
    eprintln!("the inner body produced {produced} bytes; RSS grew by {grown} bytes");
    // The layer stopped reading shortly after the 1 MiB limit ...
    assert!(produced <= 4 << 20, "{produced} bytes were read");
    // ... and the process did not grow by anything like 100 MiB.
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    // The earlier events stay readable; a reconnect is told the session failed.
    let replay = get(addr, "/raw?session_id=flood", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&replay), ["one", "two"]);
    let r = answer(addr, "/raw?session_id=flood", evs[1].id.as_deref()).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (StatusCode::NO_CONTENT, Some("failed"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn eventually_status<St: Store>(store: &St, key: &SessionKey, want: Status) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let status = store.lookup(key).await.unwrap().map(|i| i.status);
        if status == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status {status:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Limits under load from one client

#[tokio::test]
async fn ten_thousand_new_sessions_from_one_client_stop_at_max_sessions_with_503_session_limit() {
    const SESSIONS: usize = 10_000;
    const MAX: usize = 1_000;
    let _shared = LOCK.read().await;
    let app = serve_fast(MemoryStore::builder().max_sessions(MAX).build(), |l| l).await;
    // One client, one pooled connection, one request after the other.
    let client = client();
    let mut answers = std::collections::HashMap::<(u16, Option<String>), usize>::new();
    for i in 0..SESSIONS {
        let req = http::Request::get(format!("http://{}/tokens?session_id=k{i}&n=1", app.addr))
            .body(Empty::new())
            .unwrap();
        let res = client.request(req).await.expect("request succeeds");
        let status = res.status().as_u16();
        let reason = res
            .headers()
            .get("resumable-sse-reason")
            .map(|v| v.to_str().unwrap().to_owned());
        res.into_body().collect().await.expect("body");
        *answers.entry((status, reason)).or_default() += 1;
    }
    let expected = std::collections::HashMap::from([
        ((200, None), MAX),
        ((503, Some("session-limit".to_owned())), SESSIONS - MAX),
    ]);
    assert_eq!(answers, expected);
    assert_eq!(app.store.len(), MAX);
    assert_eq!(app.inner.calls(), MAX);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_subscribers_share_one_history_instead_of_copying_it() {
    const SUBSCRIBERS: usize = 5_000;
    const HISTORY: usize = 10_000;
    const DATA: usize = 100;
    const LIVE: usize = 10;
    /// The bound per subscriber: its connection on both ends (the client is in this process
    /// too), its task, its cursor and the batch it reads ahead. A copy of the history would be
    /// ~1.2 MB.
    const PER_SUBSCRIBER: usize = 64 << 10;
    /// Subscribers that read the whole replay; the others stop early (the traffic of 5,000
    /// whole replays would dominate the suite's run time without proving more).
    const SAMPLED: usize = 20;
    let _exclusive = LOCK.write().await;

    let store = MemoryStore::new();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let body = {
        let release = release.clone();
        move || {
            let release = release.clone();
            let mut history = Vec::with_capacity(HISTORY * (DATA + 8));
            for i in 0..HISTORY {
                history.extend_from_slice(format!("data: {i:0>DATA$}\n\n").as_bytes());
            }
            let history = Bytes::from(history);
            let parts: Vec<Result<Bytes, Infallible>> = (0..history.len())
                .step_by(64 << 10)
                .map(|at| Ok(history.slice(at..(at + (64 << 10)).min(history.len()))))
                .collect();
            // Then `LIVE` events, each when the test releases it.
            let live = stream::iter(0..LIVE).then(move |i| {
                let release = release.clone();
                async move {
                    release.acquire().await.unwrap().forget();
                    Ok(Bytes::from(format!("data: live {i}\n\n")))
                }
            });
            stream::iter(parts).chain(live)
        }
    };
    let (addr, calls) = serve_raw(store.clone(), Some(8 << 10), |l| l.keep_alive(None), body).await;
    let path = "/raw?session_id=big";
    // The session runs with its whole history stored before anyone subscribes.
    let first = get(addr, path, None).await;
    let key = SessionKey::new("big").unwrap();
    let epoch = loop {
        let info = store.lookup(&key).await.unwrap().unwrap();
        if info.last_seq == HISTORY as u64 {
            break info.epoch;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drop(first);

    // 5,000 subscribers replay from the start: each reads its first event, then stops reading
    // and holds its place in the history.
    let before = rss_bytes();
    let replaying: Vec<Subscriber> = stream::iter(0..SUBSCRIBERS)
        .map(|_| Subscriber::connect(addr, path, None))
        .buffer_unordered(100)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "{SUBSCRIBERS} replaying subscribers: RSS grew by {grown} bytes, {} per subscriber",
        grown / SUBSCRIBERS
    );
    assert!(
        grown / SUBSCRIBERS < PER_SUBSCRIBER,
        "RSS grew by {} bytes per subscriber",
        grown / SUBSCRIBERS
    );
    // A sample reads the whole history, in order; the rest go away.
    let sampled: Vec<_> = replaying
        .into_iter()
        .take(SAMPLED)
        .map(|mut s| tokio::spawn(async move { s.read_events(HISTORY).await }))
        .collect();
    for s in sampled {
        let datas = s.await.unwrap();
        let expected: Vec<String> = (0..HISTORY).map(|i| format!("{i:0>DATA$}")).collect();
        assert_eq!(datas, expected);
    }

    // 5,000 subscribers follow the live end of the session; each gets every live event.
    let head = EventId {
        epoch,
        seq: HISTORY as u64,
    }
    .to_string();
    let live: Vec<Subscriber> = stream::iter(0..SUBSCRIBERS)
        .map(|_| Subscriber::connect(addr, path, Some(&head)))
        .buffer_unordered(100)
        .collect()
        .await;
    let readers: Vec<_> = live
        .into_iter()
        .map(|mut s| tokio::spawn(async move { (s.read_events(LIVE).await, s.ends().await) }))
        .collect();
    release.add_permits(LIVE);
    let expected: Vec<String> = (0..LIVE).map(|i| format!("live {i}")).collect();
    for r in readers {
        let (datas, ended) = r.await.unwrap();
        assert_eq!(datas, expected);
        assert!(ended, "the stream ends with the session");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A raw HTTP/1.1 subscriber with a small receive buffer.
struct Subscriber {
    conn: tokio::net::TcpStream,
    /// Bytes received and not parsed yet (the response head is skipped on connect).
    buf: Vec<u8>,
    /// Body bytes (chunk payloads) not yet split into events.
    body: Vec<u8>,
}

impl Subscriber {
    /// Connects, sends the request and waits for the response head and at least one byte of
    /// the body (with `last_event_id`, only the head).
    async fn connect(addr: std::net::SocketAddr, path: &str, last_event_id: Option<&str>) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut conn = socket.connect(addr).await.expect("connect");
        let last = last_event_id.map_or(String::new(), |id| format!("last-event-id: {id}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{last}connection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut s = Self {
            conn,
            buf: Vec::new(),
            body: Vec::new(),
        };
        let body_at = loop {
            if let Some(end) = s.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&s.buf[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
                break end + 4;
            }
            assert!(s.fill().await, "closed before the response head");
        };
        s.buf.drain(..body_at);
        if last_event_id.is_none() {
            while !s.buf.windows(2).any(|w| w == b"\n\n") {
                assert!(s.fill().await, "closed before the first event");
            }
        }
        s
    }

    /// Reads more; false at the end of the connection.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, self.conn.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next chunk of the body (a chunk holds one or more whole events); `None` at the end
    /// of the connection.
    async fn next_chunk(&mut self) -> Option<Vec<u8>> {
        loop {
            // `<hex size>\r\n<bytes>\r\n`
            let chunk = self
                .buf
                .windows(2)
                .position(|w| w == b"\r\n")
                .and_then(|eol| {
                    let size =
                        usize::from_str_radix(std::str::from_utf8(&self.buf[..eol]).ok()?, 16)
                            .ok()?;
                    let start = eol + 2;
                    (self.buf.len() >= start + size + 2).then_some((start, size))
                });
            if let Some((start, size)) = chunk {
                let bytes = self.buf[start..start + size].to_vec();
                self.buf.drain(..start + size + 2);
                return Some(bytes);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads `n` events and returns their data.
    async fn read_events(&mut self, n: usize) -> Vec<String> {
        let mut datas = Vec::with_capacity(n);
        while datas.len() < n {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let event = String::from_utf8(self.body.drain(..end + 2).collect()).unwrap();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("a data line");
                datas.push(data.to_owned());
                continue;
            }
            let chunk = self.next_chunk().await.expect("more events");
            assert!(
                !chunk.is_empty(),
                "the body ended after {} events",
                datas.len()
            );
            self.body.extend_from_slice(&chunk);
        }
        datas
    }

    /// Whether the body ends now, with no byte after the events read.
    async fn ends(&mut self) -> bool {
        self.body.is_empty() && self.next_chunk().await.is_some_and(|c| c.is_empty())
    }
}
