//! Nothing the layer, its Redis store or their dependencies log, at any level, names a session
//! key or shows the Redis password; nor do the store builder's `Debug` output and its errors. In
//! a binary of its own: the capture is the process's global subscriber, so that every thread's
//! lines are in it.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis::{unique_prefix, RedisServer};
use common::*;
use resumable_sse::store::redis::redacted_url;
use resumable_sse::store::Store;
use resumable_sse::{RedisStore, SessionKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_logged_at_trace_names_a_key_or_the_redis_password() {
    if !common::redis::have_redis_server() {
        common::redis::skip_or_fail("redis-server is not on PATH");
        return;
    }
    let password = "pw-never-logged-5521";
    let server = RedisServer::start_on(None, &["--requirepass", password]);
    let url = format!("redis://:{password}@127.0.0.1:{}/", server.port);
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    // A full life: a session starts, is resumed, probed, followed live and cancelled; a
    // reconnect after the end; an unknown key; a wrong password.
    let builder = RedisStore::builder(url.clone()).prefix(unique_prefix());
    let shown = format!("{builder:?}");
    let store = builder.connect().await.expect("connect with the password");
    let app = serve_with(store, |l| l).await;
    let secret = "logged-secret-key-3391";
    let path = format!("/tokens?session_id={secret}&n=3");
    let evs = get(app.addr, &path, None).await.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    let again = get(app.addr, &path, evs[0].id.as_deref())
        .await
        .collect()
        .await;
    assert_eq!(datas(&again), expected_tokens(1..3));
    let gated = format!("/gated?session_id={secret}");
    app.inner.gate(secret);
    let mut live = get(app.addr, &gated, None).await;
    app.inner.send(secret, "one");
    assert_eq!(live.take(1).await.len(), 1);
    let key = SessionKey::new(format!("/gated {secret}")).unwrap();
    assert!(app.store.cancel(&key).await.expect("cancelled"));
    live.collect().await;
    let unknown = format!("/tokens?session_id=unknown-{secret}");
    let unknown = get(app.addr, &unknown, evs[0].id.as_deref()).await;
    unknown
        .check_answer("an unknown key", 410, Some("unknown-session"))
        .unwrap();
    let wrong = format!("redis://:wrong-{password}@127.0.0.1:{}/", server.port);
    let err = RedisStore::builder(wrong.clone())
        .connect()
        .await
        .expect_err("a wrong password is refused");
    let errors = format!("{err} {err:?}");
    eventually("the end of the cancelled session is logged", || {
        captured.text().contains("session cancelled")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let logs = captured.text();
    assert!(
        logs.lines().count() > 10,
        "the capture works: {} lines",
        logs.lines().count()
    );
    for (what, text) in [
        ("the logs", &logs),
        ("the builder's Debug", &shown),
        ("the connect error", &errors),
    ] {
        assert!(!text.contains(secret), "{what} name the key:\n{text}");
        assert!(
            !text.contains(password),
            "{what} show the password:\n{text}"
        );
    }
    assert!(shown.contains(&redacted_url(&url)), "{shown}");
    assert!(
        redacted_url(&wrong).contains(":***@"),
        "{}",
        redacted_url(&wrong)
    );
}
