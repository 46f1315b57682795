//! Bad input, one row per test, over real TCP: what a client can send (`Last-Event-ID`,
//! `session_id`), what an inner service can produce (huge events, arbitrary bytes, CR line ends),
//! and load a single client can put on the limits. Each row checks the exact status and
//! `resumable-sse-reason`, and that the inner service is not called when it must not be.
//!
//! The rows that measure the process's memory (VmRSS) are in `tests/memory_use.rs`, a process of
//! their own, so that these run in parallel.

mod common;

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::stream;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use resumable_sse::store::Store;
use resumable_sse::{Epoch, EventId, MemoryStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// Asserts that the layer answered by itself with `status` and `reason`, and an empty body.
#[track_caller]
fn assert_rejected(a: &Answer, status: StatusCode, reason: &str, case: &str) {
    assert_eq!(a.status, status, "{case}");
    assert_eq!(a.reason.as_deref(), Some(reason), "{case}");
    assert!(a.body.is_empty(), "{case}");
}

/// An app on a fresh memory store with one finished session `key` of three events.
async fn app_with_session(key: &str) -> (App, Vec<Ev>) {
    let app = serve_with(MemoryStore::new(), |l| l).await;
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
        .lookup(&scoped("/tokens", "fresh"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn garbage_last_event_ids_are_400_malformed_without_calling_the_inner_service() {
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
    let app = serve_with(MemoryStore::new(), |l| l).await;
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
    let app = serve_with(MemoryStore::new(), |l| l).await;
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
    let app = serve_with(MemoryStore::new(), |l| l).await;
    let evs = get(app.addr, "/tokens?session_id=%zz&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    // The key is the three characters `%zz`: `%25zz` names the same session.
    let info = app.store.lookup(&scoped("/tokens", "%zz")).await;
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
    let app = serve_with(MemoryStore::new(), |l| l).await;
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
    let app = serve_with(store, |l| l).await;
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
        let info = app.store.lookup(&scoped("/tokens", key)).await;
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
    assert_keys_are_ordinary(MemoryStore::new(), GLOB_KEYS).await;
}

#[tokio::test]
async fn newlines_in_session_ids_are_ordinary_keys_in_memory() {
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
    let Some(store) = redis_store().await else {
        return;
    };
    assert_keys_are_ordinary(store, GLOB_KEYS).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn newlines_in_session_ids_are_ordinary_keys_on_redis() {
    let Some(store) = redis_store().await else {
        return;
    };
    assert_keys_are_ordinary(store, NEWLINE_KEYS).await;
}

// ---------------------------------------------------------------------------------------------
// What the inner service produces

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
        .lookup(&scoped("/raw", "bytes"))
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
        .lookup(&scoped("/raw", "cr"))
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

// ---------------------------------------------------------------------------------------------
// Limits under load from one client

#[tokio::test]
async fn ten_thousand_new_sessions_from_one_client_stop_at_max_sessions_with_503_session_limit() {
    const SESSIONS: usize = 10_000;
    const MAX: usize = 1_000;
    let app = serve_with(MemoryStore::builder().max_sessions(MAX).build(), |l| l).await;
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
