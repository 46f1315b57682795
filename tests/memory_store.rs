//! The behaviour suite (`resumable_sse::testing`) on [`MemoryStore`], and what only the in-memory
//! store does.

mod common;

use std::time::Duration;

use common::*;
use resumable_sse::MemoryStore;

resumable_sse::testing::store_suite!(|opts| async move {
    let mut b = MemoryStore::builder();
    if let Some(r) = opts.retention {
        b = b.retention(r);
    }
    if let Some(n) = opts.max_events_per_session {
        b = b.max_events_per_session(n);
    }
    b.build()
});

#[tokio::test]
async fn the_session_limit_refuses_new_sessions_only() {
    let store = MemoryStore::builder().max_sessions(1).build();
    let app = serve_with(store, |l| l).await;
    app.inner.gate("a");
    let mut a = get(app.addr, "/gated?session_id=a", None).await;
    let refused = get(app.addr, "/tokens?session_id=b&n=1", None).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.reason(), Some("session-limit"));
    // The existing session is unaffected.
    app.inner.send("a", "still here");
    assert_eq!(datas(&a.take(1).await), ["still here"]);
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn expired_sessions_are_swept_from_memory() {
    let store = MemoryStore::builder()
        .retention(Duration::from_millis(50))
        .build();
    let app = serve_with(store, |l| l).await;
    get(app.addr, "/tokens?session_id=a&n=2", None)
        .await
        .collect()
        .await;
    assert_eq!(app.store.len(), 1);
    // Store operations sweep (at most once per second, so not necessarily the first one after
    // the retention): expired sessions no longer take memory or count against limits.
    eventually_async("the expired session swept by an operation", || async {
        get(app.addr, "/json?session_id=other", None).await;
        app.store.is_empty()
    })
    .await;
}

#[derive(Clone)]
struct User(String);

/// The recommended extractor of the README's security model: the key binds the authenticated
/// user (a request extension set by an auth layer outside) to the chat id.
#[tokio::test]
async fn a_key_bound_to_the_user_keeps_users_out_of_each_others_sessions() {
    use axum::extract::Request;
    use axum::middleware::{self, Next};

    async fn auth(mut req: Request, next: Next) -> axum::response::Response {
        if let Some(user) = req.headers().get("x-user").and_then(|v| v.to_str().ok()) {
            let user = User(user.to_owned());
            req.extensions_mut().insert(user);
        }
        next.run(req).await
    }

    let inner = Inner::default();
    let layer = resumable_sse::ResumableSseLayer::new(MemoryStore::new()).session_key(
        |parts: &http::request::Parts| {
            let user = parts.extensions.get::<User>()?;
            let chat = parts
                .uri
                .query()?
                .strip_prefix("chat=")?
                .split('&')
                .next()?;
            Some(format!("{}/{}", user.0, chat))
        },
    );
    let app = routes(inner.clone())
        .layer(layer)
        .layer(middleware::from_fn(auth));
    let addr = serve_router(app).await;

    let as_user = |user: &'static str, last: Option<String>| async move {
        let mut req =
            http::Request::get(format!("http://{addr}/tokens?chat=c1&n=5")).header("x-user", user);
        if let Some(id) = last {
            req = req.header("last-event-id", id);
        }
        client()
            .request(req.body(http_body_util::Empty::new()).unwrap())
            .await
            .unwrap()
    };
    // Alice starts chat c1 and reads it.
    let alice = as_user("alice", None).await;
    assert_eq!(alice.status(), 200);
    let body = http_body_util::BodyExt::collect(alice.into_body())
        .await
        .unwrap();
    let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    let last_id = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .next_back()
        .unwrap()
        .to_owned();
    assert_eq!(inner.calls(), 1);
    // Bob naming the same chat, even with Alice's id, never reaches her session.
    let bob = as_user("bob", Some(last_id.clone())).await;
    assert_eq!(bob.status(), 410);
    assert_eq!(bob.headers()["resumable-sse-reason"], "unknown-session");
    let bob = as_user("bob", None).await;
    assert_eq!(bob.status(), 200);
    http_body_util::BodyExt::collect(bob.into_body())
        .await
        .unwrap();
    assert_eq!(inner.calls(), 2, "Bob got a session of his own");
    // Alice, with her id, is told her stream is complete.
    let alice = as_user("alice", Some(last_id)).await;
    assert_eq!(alice.status(), 204);
    // Without an authenticated user there is no key: the request passes through unresumable.
    let anon = client()
        .request(
            http::Request::get(format!("http://{addr}/tokens?chat=c1&n=2"))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(anon.into_body())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&body.to_bytes()).contains("id: inner-0"));
    assert_eq!(inner.calls(), 3);
}
