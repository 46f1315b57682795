//! What a request without `Last-Event-ID` gets for a session that has finished:
//! the replay by default, `204` with the outcome with `replay_finished(false)`; a running session
//! is streamed either way, and a request with `Last-Event-ID` is answered as always. Over real
//! TCP, on the memory store and on Redis.

mod common;

use common::*;
use resumable_sse::store::Store;
use resumable_sse::MemoryStore;

/// The answers of a layer on `store` that replays finished sessions (`replay`, the default) or
/// not (`replay_finished(false)`), for a session of each ending, and for a running one; every
/// mismatch is reported at once.
async fn check_finished_sessions<St: Store>(store: St, replay: bool) {
    let app = serve_with(store.clone(), |l| {
        if replay {
            l
        } else {
            l.replay_finished(false)
        }
    })
    .await;
    let mut failures = Vec::new();

    // Running: streamed from the start, then live, whatever the option.
    app.inner.gate("running");
    let mut first = get(app.addr, "/gated?session_id=running", None).await;
    app.inner.send("running", "token 0");
    app.inner.send("running", "token 1");
    let head = first.take(2).await;
    let mut again = get(app.addr, "/gated?session_id=running", None).await;
    failures.extend(again.check_answer("running, no position", 200, None).err());
    let replayed = again.take(2).await;
    if datas(&replayed) != expected_tokens(0..2) {
        failures.push(format!(
            "running: a request without a position got {:?}",
            datas(&replayed)
        ));
    }
    app.inner.send("running", "token 2");
    app.inner.end("running");
    let rest = again.collect().await;
    if datas(&rest) != expected_tokens(2..3) {
        failures.push(format!("running: then got {:?}", datas(&rest)));
    }
    first.collect().await;

    // Completed: three events.
    let completed = get(app.addr, "/tokens?session_id=completed&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&completed), expected_tokens(0..3));
    session_finished(&app.store, &scoped("/tokens", "completed")).await;

    // Cancelled after one event.
    app.inner.gate("cancelled");
    let mut cancelled = get(app.addr, "/gated?session_id=cancelled", None).await;
    app.inner.send("cancelled", "token 0");
    let cancelled_ids = cancelled.take(1).await;
    let key = scoped("/gated", "cancelled");
    assert!(app.store.cancel(&key).await.expect("cancel"), "it ran");
    session_finished(&app.store, &key).await;
    cancelled.collect().await;

    // Failed after one event.
    app.inner.gate("failed");
    let mut failed = get(app.addr, "/gated?session_id=failed", None).await;
    app.inner.send("failed", "token 0");
    let failed_ids = failed.take(1).await;
    app.inner.fail("failed");
    session_finished(&app.store, &scoped("/gated", "failed")).await;

    let calls = app.inner.calls();
    let cases = [
        ("/tokens?session_id=completed", "completed", &completed, 3),
        (
            "/gated?session_id=cancelled",
            "cancelled",
            &cancelled_ids,
            1,
        ),
        ("/gated?session_id=failed", "failed", &failed_ids, 1),
        ("/gated?session_id=running", "completed", &head, 3),
    ];
    for (path, outcome, evs, total) in cases {
        // Without a position: the replay, or the end.
        let mut conn = get(app.addr, path, None).await;
        if replay {
            failures.extend(conn.check_answer(path, 200, None).err());
            let got = conn.collect().await;
            if datas(&got) != expected_tokens(0..total) {
                failures.push(format!("{path}: replayed {:?}", datas(&got)));
            }
        } else if let Err(e) = conn.check_answer(path, 204, Some(outcome)) {
            failures.push(e);
        } else {
            let body = conn.bytes().await;
            if !body.is_empty() {
                failures.push(format!("{path}: a 204 with a body: {body:?}"));
            }
        }
        // With a position: unaffected by the option.
        let first_id = evs[0].id.as_deref().expect("an id");
        let mut after_first = get(app.addr, path, Some(first_id)).await;
        if total > 1 {
            let what = format!("{path} after the first event");
            failures.extend(after_first.check_answer(&what, 200, None).err());
            let got = after_first.collect().await;
            if datas(&got) != expected_tokens(1..total) {
                failures.push(format!("{what}: got {:?}", datas(&got)));
            }
        } else {
            let what = format!("{path} holding the last event");
            failures.extend(after_first.check_answer(&what, 204, Some(outcome)).err());
        }
    }
    assert_eq!(
        app.inner.calls(),
        calls,
        "no answer called the inner service again"
    );
    assert!(
        failures.is_empty(),
        "replaying finished sessions: {replay}:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn without_replay_a_finished_session_answers_204_with_its_outcome_in_memory() {
    check_finished_sessions(MemoryStore::new(), false).await;
}

#[tokio::test]
async fn by_default_a_finished_session_is_replayed_in_memory() {
    check_finished_sessions(MemoryStore::new(), true).await;
}

#[cfg(feature = "redis")]
mod on_redis {
    use resumable_sse::RedisStore;

    use super::common::redis::{shared_url, unique_prefix};
    use super::*;

    async fn store(url: String) -> RedisStore {
        RedisStore::builder(url)
            .prefix(unique_prefix())
            .connect()
            .await
            .expect("connect to redis")
    }

    #[tokio::test]
    async fn without_replay_a_finished_session_answers_204_with_its_outcome_on_redis() {
        let Some(url) = shared_url() else { return };
        check_finished_sessions(store(url).await, false).await;
    }

    #[tokio::test]
    async fn by_default_a_finished_session_is_replayed_on_redis() {
        let Some(url) = shared_url() else { return };
        check_finished_sessions(store(url).await, true).await;
    }
}
