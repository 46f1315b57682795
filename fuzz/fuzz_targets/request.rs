//! Arbitrary `session_id` query strings and `Last-Event-ID` values through the public API:
//! `EventId::parse`, `SessionKey::new`, and a whole `ResumableSse` service call on a
//! `MemoryStore`, driven by a current-thread runtime.
//!
//! Input: up to four lines.
//! 1. the raw `session_id` query value (bytes a URI cannot carry are percent-encoded);
//! 2. the `Last-Event-ID` header (left out when empty or not a valid header value);
//! 3. the raw `lastEventId` query value (left out when empty);
//! 4. the setup: a digit `n`, then what exists under the key before the request (`f` a finished
//!    session of `n` events, `r` a running one, `c` a cancelled one, anything else nothing), then
//!    what the inner service answers the request (`s` an SSE stream, `r` one that never ends,
//!    `j` JSON, `z` a gzip-coded stream, `e` a 500).
//!
//! In lines 2 and 3, `EPOCH` is replaced by the epoch of the session set up under the key, so
//! that the fuzzer can write ids of that session.
//!
//! Checked: nothing panics; a parsed id prints back to the same bytes; a key is valid exactly
//! when it has 1 to 256 bytes; every answer the layer gives itself is one of the documented
//! (status, reason) pairs and never calls the inner service; an invalid key, a malformed id and
//! the final id of a finished session get their documented answers; a request without a key
//! reaches the inner service untouched.
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use resumable_sse::store::{Status, Store};
use resumable_sse::{EventId, MemoryStore, ResumableSseLayer, SessionKey, MAX_SESSION_KEY_LEN};
use tower::{Layer, Service, ServiceExt};

/// The answers the layer documents for itself.
const DOCUMENTED: &[(u16, &str)] = &[
    (204, "completed"),
    (204, "failed"),
    (204, "cancelled"),
    (410, "unknown-session"),
    (410, "foreign-epoch"),
    (410, "evicted"),
    (400, "malformed-last-event-id"),
    (400, "beyond-head"),
    (400, "invalid-session-key"),
    (503, "session-limit"),
    (503, "store-unavailable"),
    (503, "session-starting"),
    (503, "draining"),
];

/// An inner body: some chunks, then the end or (`endless`) nothing ever again.
struct Chunks {
    chunks: VecDeque<Bytes>,
    endless: bool,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None if self.endless => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

fn sse(n: usize, endless: bool) -> Response<Chunks> {
    let chunks = (0..n)
        .map(|i| Bytes::from(format!("id: inner-{i}\ndata: token {i}\n\n")))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Chunks { chunks, endless })
        .unwrap()
}

fn inner_response(kind: u8, n: usize) -> Response<Chunks> {
    let plain = |status: u16, content_type: &str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Chunks {
                chunks: [Bytes::from_static(b"{}")].into(),
                endless: false,
            })
            .unwrap()
    };
    match kind {
        b'r' => sse(n, true),
        b'j' => plain(200, "application/json"),
        b'z' => {
            let mut res = sse(n, false);
            res.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            res
        }
        b'e' => plain(500, "text/plain"),
        _ => sse(n, false),
    }
}

/// Percent-encodes the bytes a URI query cannot hold, so that any input makes a request.
fn uri_safe(raw: &[u8]) -> String {
    static ALLOWED: std::sync::OnceLock<[bool; 128]> = std::sync::OnceLock::new();
    let allowed = ALLOWED.get_or_init(|| {
        std::array::from_fn(|b| {
            let c = b as u8 as char;
            c.is_ascii_graphic() && c != '#' && http::Uri::try_from(format!("/?{c}")).is_ok()
        })
    });
    let mut out = String::new();
    for &b in raw {
        if b < 128 && allowed[usize::from(b)] {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the layer should take as the key: the form-decoded value of the first `session_id`
/// parameter. `None`: no key; `Some(Err)`: an invalid one.
fn expected_key(query: &str) -> Option<Result<String, ()>> {
    let raw = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == "session_id").then_some(v)
    })?;
    if raw.is_empty() {
        return None;
    }
    let spaced = raw.replace('+', " ");
    let bytes = spaced.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                decoded.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    Some(match String::from_utf8(decoded) {
        Ok(key) if key.len() <= MAX_SESSION_KEY_LEN => Ok(key),
        _ => Err(()),
    })
}

/// The raw value of the first `lastEventId` parameter, if it is not empty.
fn query_position(query: &str) -> Option<Vec<u8>> {
    query
        .split('&')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == "lastEventId").then_some(v)
        })
        .filter(|v| !v.is_empty())
        .map(|v| v.as_bytes().to_vec())
}

fuzz_target!(|input: &[u8]| {
    let mut lines = input.splitn(4, |&b| b == b'\n');
    let key_raw = lines.next().unwrap_or_default();
    let header_raw = lines.next().unwrap_or_default();
    let query_id_raw = lines.next().unwrap_or_default();
    let setup = lines.next().unwrap_or_default();
    let n = setup
        .first()
        .filter(|b| b.is_ascii_digit())
        .map_or(2, |b| usize::from(b - b'0'));
    let state = setup.get(1).copied().unwrap_or(b'-');
    let kind = setup.get(2).copied().unwrap_or(b's');

    // The value types on their own.
    for raw in [header_raw, query_id_raw] {
        if let Some(id) = EventId::parse(raw) {
            assert_eq!(id.to_string().as_bytes(), raw, "one spelling per id");
        }
    }
    let lossy = String::from_utf8_lossy(key_raw);
    match SessionKey::new(&*lossy) {
        Ok(key) => {
            assert!(!lossy.is_empty() && lossy.len() <= MAX_SESSION_KEY_LEN);
            assert_eq!(key.as_str(), lossy);
        }
        Err(_) => assert!(lossy.is_empty() || lossy.len() > MAX_SESSION_KEY_LEN),
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = MemoryStore::builder()
            .max_events_per_session(4)
            .max_sessions(8)
            .build();
        let calls = Arc::new(AtomicUsize::new(0));
        let answer_kind = Arc::new(AtomicUsize::new(usize::from(b's')));
        let inner = {
            let (calls, answer_kind) = (calls.clone(), answer_kind.clone());
            tower::service_fn(move |_req: Request<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let kind = answer_kind.load(Ordering::SeqCst) as u8;
                async move { Ok::<_, Infallible>(inner_response(kind, n)) }
            })
        };
        let mut svc = ResumableSseLayer::new(store.clone()).layer(inner);

        let key_query = format!("session_id={}", uri_safe(key_raw));
        let key = expected_key(&key_query);

        // The session that exists before the request, if any.
        let mut epoch_hex = String::from("000000000001");
        let mut prepared = None;
        // (Not when the key's own line carries a position: that request would not start one.)
        if let (Some(Ok(k)), None) = (&key, query_position(&key_query)) {
            if matches!(state, b'f' | b'r' | b'c') {
                answer_kind.store(
                    usize::from(if state == b'f' { b's' } else { b'r' }),
                    Ordering::SeqCst,
                );
                let req = Request::get(format!("/chat?{key_query}")).body(()).unwrap();
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                let mut body = res.into_body();
                // (A reader that falls behind the 4-event ring is disconnected early.)
                for _ in 0..n {
                    match body.frame().await {
                        Some(frame) => assert!(frame.expect("no error").is_data()),
                        None => break,
                    }
                }
                drop(body);
                let sk = SessionKey::scoped("/chat", &SessionKey::new(k).unwrap()).unwrap();
                if state == b'c' {
                    assert!(store.cancel(&sk).await.unwrap());
                }
                let info = loop {
                    let info = store.lookup(&sk).await.unwrap().expect("session exists");
                    if state != b'f' || info.status.is_finished() {
                        break info;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                };
                epoch_hex = EventId {
                    epoch: info.epoch,
                    seq: 0,
                }
                .to_string()[..12]
                    .to_owned();
                prepared = Some(info);
            }
        }
        answer_kind.store(usize::from(kind), Ordering::SeqCst);
        let calls_before = calls.load(Ordering::SeqCst);

        let substitute = |raw: &[u8]| -> Vec<u8> {
            String::from_utf8_lossy(raw)
                .replace("EPOCH", &epoch_hex)
                .into_bytes()
        };
        let header = substitute(header_raw);
        let query_id = substitute(query_id_raw);
        let mut uri = format!("/chat?{key_query}");
        if !query_id.is_empty() {
            uri.push_str("&lastEventId=");
            uri.push_str(&uri_safe(&query_id));
        }
        let mut req = Request::get(&uri);
        let header_value = http::HeaderValue::from_bytes(&header)
            .ok()
            .filter(|_| !header.is_empty());
        if let Some(v) = &header_value {
            req = req.header("last-event-id", v.clone());
        }
        let req = req.body(()).expect("a valid request");
        // What the layer reads as the position: the header, else the raw query value.
        let position: Option<Vec<u8>> = match &header_value {
            Some(v) => Some(v.as_bytes().to_vec()),
            None => query_position(uri.split_once('?').map_or("", |(_, q)| q)),
        };

        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        let status = res.status();
        let reason = res
            .headers()
            .get("resumable-sse-reason")
            .map(|v| v.to_str().expect("ASCII reason").to_owned());
        let inner_calls = calls.load(Ordering::SeqCst) - calls_before;
        if let Some(reason) = &reason {
            assert!(
                DOCUMENTED.contains(&(status.as_u16(), reason.as_str())),
                "undocumented answer {status} {reason}"
            );
            assert_eq!(inner_calls, 0, "{status} {reason} called the inner service");
            assert_eq!(res.headers()["cache-control"], "no-store");
        }
        assert!(inner_calls <= 1);

        let answered = (status.as_u16(), reason.as_deref());
        match &key {
            None => {
                assert_eq!(inner_calls, 1, "no key: the inner service answers");
                assert_eq!(reason, None);
            }
            Some(Err(())) => assert_eq!(answered, (400, Some("invalid-session-key"))),
            Some(Ok(_)) => {
                let parsed = position.as_deref().map(EventId::parse);
                if let Some(None) = parsed {
                    assert_eq!(answered, (400, Some("malformed-last-event-id")));
                }
                if let (Some(info), Some(Some(id))) = (&prepared, parsed) {
                    if let Status::Finished(outcome) = info.status {
                        if id.epoch == info.epoch && id.seq == info.last_seq && info.last_seq > 0 {
                            assert_eq!(answered, (204, Some(outcome.reason().as_str())));
                        }
                    }
                }
            }
        }

        // Whatever the body is, reading it neither panics nor fails.
        let mut body = res.into_body();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
                Ok(Some(frame)) => {
                    frame.expect("body frame");
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});
