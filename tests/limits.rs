//! The default limits a client's input meets, at their edges: n - 1, n, n + 1 and 2n for the
//! largest event, the longest session key and the most sessions, each derived from the constant
//! in `resumable_sse::limits`, with the default configuration.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::routing;
use axum::Router;
use common::*;
use resumable_sse::limits::{DEFAULT_MAX_EVENT_SIZE, DEFAULT_MAX_SESSIONS, MAX_SESSION_KEY_LEN};
use resumable_sse::store::{Claim, Status, Store, StoreErrorKind};
use resumable_sse::{MemoryStore, Outcome, ResumableSseLayer};

/// An inner service whose body is `body`, as it is, as an event stream.
async fn serve_body(body: &'static [u8]) -> (std::net::SocketAddr, MemoryStore) {
    let store = MemoryStore::new();
    let app = Router::new()
        .route(
            "/raw",
            routing::get(move || async move {
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from(body))
                    .unwrap()
            }),
        )
        .layer(ResumableSseLayer::new(store.clone()));
    (serve_router(app).await, store)
}

#[tokio::test]
async fn an_event_line_up_to_the_default_max_event_size_is_stored_and_a_larger_one_fails_the_session(
) {
    let max = DEFAULT_MAX_EVENT_SIZE;
    for line in [max - 1, max, max + 1, 2 * max] {
        // `data: ` and the payload: a line of `line` bytes, between two small events.
        let payload = "x".repeat(line - "data: ".len());
        let body: &'static [u8] = Box::leak(
            format!("data: before\n\ndata: {payload}\n\ndata: after\n\n")
                .into_bytes()
                .into_boxed_slice(),
        );
        let (addr, store) = serve_body(body).await;
        let key = format!("e{line}");
        let evs = get(addr, &format!("/raw?session_id={key}"), None)
            .await
            .collect()
            .await;
        let status = session_finished(&store, &scoped("/raw", &key)).await.status;
        if line <= max {
            assert_eq!(datas(&evs), ["before", payload.as_str(), "after"], "{line}");
            assert_eq!(status, Status::Finished(Outcome::Completed), "{line}");
        } else {
            // The events before it stay; the session is failed, and a reconnect is told so.
            assert_eq!(datas(&evs), ["before"], "{line}");
            assert_eq!(status, Status::Finished(Outcome::Failed), "{line}");
            let last = evs[0].id.as_deref();
            let again = get(addr, &format!("/raw?session_id={key}"), last).await;
            assert_eq!(
                (again.status.as_u16(), again.reason()),
                (204, Some("failed"))
            );
        }
    }
}

#[tokio::test]
async fn session_keys_up_to_the_maximum_length_make_sessions_and_longer_ones_are_refused() {
    let app = serve().await;
    let mut sessions = 0;
    for len in [
        0,
        1,
        MAX_SESSION_KEY_LEN - 1,
        MAX_SESSION_KEY_LEN,
        MAX_SESSION_KEY_LEN + 1,
        2 * MAX_SESSION_KEY_LEN,
    ] {
        let key = "k".repeat(len);
        let path = format!("/tokens?session_id={key}&n=2");
        let mut conn = get(app.addr, &path, None).await;
        match len {
            // An empty key is no key: the inner service answers, untouched.
            0 => {
                assert_eq!(conn.status, 200);
                let evs = conn.collect().await;
                assert_eq!(evs[0].id.as_deref(), Some("inner-0"));
            }
            len if len <= MAX_SESSION_KEY_LEN => {
                assert_eq!(conn.status, 200, "{len}");
                let evs = conn.collect().await;
                assert_eq!(datas(&evs), expected_tokens(0..2));
                assert!(!evs[0].id.as_deref().unwrap().starts_with("inner"), "{len}");
                sessions += 1;
            }
            len => {
                assert_eq!(
                    (conn.status.as_u16(), conn.reason()),
                    (400, Some("invalid-session-key")),
                    "{len}"
                );
            }
        }
    }
    assert_eq!(app.store.len(), sessions);
    // The key-less request and every session called the inner service once; refusals never.
    assert_eq!(app.inner.calls(), sessions + 1);
}

#[tokio::test]
async fn the_default_store_takes_max_sessions_and_refuses_the_next_ones_only() {
    let max = DEFAULT_MAX_SESSIONS;
    let store = MemoryStore::new();
    let lifetime = Duration::from_secs(600);
    // Up to the limit (its last two at max - 1 and max), every claim makes a session.
    for i in 0..max {
        let key = scoped("/tokens", &format!("s{i}"));
        let claim = store.claim(&key, lifetime).await;
        assert!(
            matches!(claim, Ok(Claim::Claimed(_))),
            "session {} of {max}",
            i + 1
        );
    }
    assert_eq!(store.len(), max);
    // Beyond it (max + 1 up to 2 max), every new key is refused, and nothing is added.
    for i in max..2 * max {
        let key = scoped("/tokens", &format!("s{i}"));
        let err = store.claim(&key, lifetime).await.expect_err("refused");
        assert_eq!(
            err.kind(),
            StoreErrorKind::SessionLimit,
            "session {}",
            i + 1
        );
    }
    assert_eq!(store.len(), max);
    // Over HTTP: a new key gets 503, an existing one still finds its session.
    let app = serve_with(store, |l| l).await;
    let refused = get(app.addr, "/tokens?session_id=new&n=1", None).await;
    assert_eq!(
        (refused.status.as_u16(), refused.reason()),
        (503, Some("session-limit"))
    );
    let existing = scoped("/tokens", "s0");
    assert!(app.store.cancel(&existing).await.unwrap());
    let again = get(app.addr, "/tokens?session_id=s0&n=1", None).await;
    assert_eq!(
        (again.status.as_u16(), again.reason()),
        (204, Some("cancelled"))
    );
    assert_eq!(app.inner.calls(), 0);
}
