//! What a request without `Last-Event-ID` gets for a session that has finished:
//! the replay by default, `204` with the outcome with `replay_finished(false)`, a new session with
//! `restart_finished(methods)`; a running session is streamed either way, and a request with
//! `Last-Event-ID` is answered as always. Over real
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

/// The epoch part of a layer's event id.
fn epoch_of(ev: &Ev) -> String {
    let id = ev.id.as_deref().expect("an id");
    id.split_once('-').expect("<epoch>-<seq>").0.to_owned()
}

/// `restart_finished([GET])`: a request without a position over a finished session starts a new
/// generation (once, whatever the number of concurrent requests), which replaces the old one;
/// a running session is joined; a request with a position, or of another method, is answered as
/// always.
async fn check_restarted_sessions<St: Store>(store: St) {
    let app = serve_with(store.clone(), |l| {
        l.restart_finished([http::Method::GET])
            .replay_finished(false)
    })
    .await;
    let first = get(app.addr, "/tokens?session_id=turns&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&first), expected_tokens(0..3));
    session_finished(&app.store, &scoped("/tokens", "turns")).await;
    assert_eq!(app.inner.calls(), 1);
    // The same key again, without a position: a new generation, with ids of a new epoch.
    let second = get(app.addr, "/tokens?session_id=turns&n=2", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&second), expected_tokens(0..2));
    assert_eq!(app.inner.calls(), 2, "a new generation");
    assert_ne!(epoch_of(&second[0]), epoch_of(&first[0]), "a new session");
    // The old session is gone: its ids name another epoch.
    get(app.addr, "/tokens?session_id=turns", first[0].id.as_deref())
        .await
        .check_answer("an id of the replaced session", 410, Some("foreign-epoch"))
        .unwrap();
    // A position in the new one is answered as always.
    let rest = get(
        app.addr,
        "/tokens?session_id=turns",
        second[0].id.as_deref(),
    )
    .await
    .collect()
    .await;
    assert_eq!(datas(&rest), expected_tokens(1..2));
    session_finished(&app.store, &scoped("/tokens", "turns")).await;

    // Concurrent requests over a finished session: one new generation, which all of them get
    // (it lasts long enough for all of them to join it while it runs).
    let calls = app.inner.calls();
    let conns = futures_util::future::join_all((0..8).map(|_| {
        get(
            app.addr,
            "/tokens?session_id=turns&n=4&interval_ms=50",
            None,
        )
    }))
    .await;
    let mut epochs = std::collections::HashSet::new();
    for mut conn in conns {
        let evs = conn.collect().await;
        assert_eq!(datas(&evs), expected_tokens(0..4));
        epochs.insert(epoch_of(&evs[0]));
    }
    assert_eq!(app.inner.calls(), calls + 1, "one generation for the eight");
    assert_eq!(epochs.len(), 1, "one session for the eight");

    // A running session is joined, not restarted.
    app.inner.gate("running");
    let mut live = get(app.addr, "/gated?session_id=running", None).await;
    app.inner.send("running", "token 0");
    live.take(1).await;
    let calls = app.inner.calls();
    let mut joined = get(app.addr, "/gated?session_id=running", None).await;
    assert_eq!(datas(&joined.take(1).await), expected_tokens(0..1));
    app.inner.end("running");
    joined.collect().await;
    live.collect().await;
    assert_eq!(app.inner.calls(), calls, "joined, not restarted");

    // A method that is not named is answered as always: here told how the session ended.
    let other = serve_with(store, |l| {
        l.restart_finished([http::Method::POST])
            .replay_finished(false)
    })
    .await;
    let done = get(other.addr, "/tokens?session_id=turns", None).await;
    done.check_answer("GET when only POST restarts", 204, Some("completed"))
        .unwrap();
    assert_eq!(other.inner.calls(), 0);
}

#[tokio::test]
async fn a_restart_method_starts_a_new_session_over_a_finished_one_in_memory() {
    check_restarted_sessions(MemoryStore::new()).await;
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
    async fn a_restart_method_starts_a_new_session_over_a_finished_one_on_redis() {
        let Some(url) = shared_url() else { return };
        check_restarted_sessions(store(url).await).await;
    }

    #[tokio::test]
    async fn by_default_a_finished_session_is_replayed_on_redis() {
        let Some(url) = shared_url() else { return };
        check_finished_sessions(store(url).await, true).await;
    }
}
