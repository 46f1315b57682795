//! How sessions end, expire and hit their limits, over real TCP.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use resumable_sse::store::{Status, Store};
use resumable_sse::{EventId, MemoryStore, Outcome, SessionKey};

async fn status(store: &MemoryStore, key: &str) -> Option<Status> {
    let key = SessionKey::new(key).unwrap();
    store.lookup(&key).await.unwrap().map(|i| i.status)
}

async fn wait_status(store: &MemoryStore, key: &str, want: Status) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while status(store, key).await != Some(want) {
        assert!(tokio::time::Instant::now() < deadline, "status {want:?} not reached");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Collects what `tracing` writes, to check that failures are recorded.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn inner_body_error_fails_the_session() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test runtime is single-threaded: the producer task logs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = serve().await;
    app.inner.gate("boom");
    let path = "/gated?session_id=boom";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("boom", "one");
    app.inner.send("boom", "two");
    app.inner.fail("boom");
    // Connected clients get everything stored, then the end.
    let evs = conn.collect().await;
    assert_eq!(datas(&evs), ["one", "two"]);
    wait_status(&app.store, "boom", Status::Finished(Outcome::Failed)).await;
    // Later reconnects learn it.
    let last = evs.last().unwrap().id.clone().unwrap();
    let again = get(app.addr, path, Some(&last)).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("failed"));
    // A reconnect from the middle still gets what was stored.
    let first = evs[0].id.clone().unwrap();
    assert_eq!(
        datas(&get(app.addr, path, Some(&first)).await.collect().await),
        ["two"]
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("inner SSE body failed"), "logged: {text}");
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn cancel_stops_the_generator_and_reconnects_get_204() {
    let app = serve().await;
    app.inner.gate("stop");
    let path = "/gated?session_id=stop";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("stop", "partial");
    let evs = conn.take(1).await;
    let key = SessionKey::new("stop").unwrap();
    assert!(app.store.cancel(&key).await.unwrap());
    // The connected client sees the end; the generator is dropped.
    assert_eq!(conn.next().await, None);
    eventually(|| app.inner.generators_dropped() == 1).await;
    let again = get(app.addr, path, Some(evs[0].id.as_deref().unwrap())).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("cancelled"));
    // Cancelling a finished session does nothing.
    assert!(!app.store.cancel(&key).await.unwrap());
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn keep_alive_comments_reach_live_and_replayed_connections() {
    let app = serve_with(MemoryStore::new(), |l| {
        l.keep_alive(Some(Duration::from_millis(30)))
    })
    .await;
    app.inner.gate("idle");
    let path = "/gated?session_id=idle";
    let mut live = get(app.addr, path, None).await;
    app.inner.send("idle", "x");
    let first = live.take(1).await;
    let mut replayed = get(app.addr, path, Some(first[0].id.as_deref().unwrap())).await;
    // Both connections stay idle; comments arrive on both before the next event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.inner.send("idle", "y");
    assert_eq!(datas(&live.take(1).await), ["y"]);
    assert_eq!(datas(&replayed.take(1).await), ["y"]);
    assert!(live.comments >= 2, "live saw {} comments", live.comments);
    assert!(replayed.comments >= 2, "replayed saw {} comments", replayed.comments);
    // Keep-alives are not stored: a replay from the start holds only events.
    app.inner.end("idle");
    let mut all = get(app.addr, path, None).await;
    assert_eq!(datas(&all.collect().await), ["x", "y"]);
    assert_eq!(all.comments, 0);
}

#[tokio::test]
async fn keep_alive_can_be_turned_off() {
    let app = serve_with(MemoryStore::new(), |l| l.keep_alive(None)).await;
    app.inner.gate("quiet");
    let mut conn = get(app.addr, "/gated?session_id=quiet", None).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.inner.send("quiet", "only");
    app.inner.end("quiet");
    assert_eq!(datas(&conn.collect().await), ["only"]);
    assert_eq!(conn.comments, 0);
}

#[tokio::test]
async fn finished_sessions_expire_after_retention() {
    let store = MemoryStore::builder()
        .retention(Duration::from_millis(100))
        .build();
    let app = serve_with(store, |l| l).await;
    let path = "/tokens?session_id=old&n=3";
    let old = get(app.addr, path, None).await.collect().await;
    let old_id = old[1].id.clone().unwrap();
    // Still resumable within retention.
    assert_eq!(get(app.addr, path, Some(&old_id)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let gone = get(app.addr, path, Some(&old_id)).await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.reason(), Some("unknown-session"));
    assert_eq!(app.inner.calls(), 1);
    // A new incarnation under the same key: the old id is recognised as foreign.
    let new = get(app.addr, path, None).await.collect().await;
    assert_eq!(datas(&new), expected_tokens(0..3));
    assert_eq!(app.inner.calls(), 2);
    let foreign = get(app.addr, path, Some(&old_id)).await;
    assert_eq!(foreign.status, 410);
    assert_eq!(foreign.reason(), Some("foreign-epoch"));
    let old_epoch = EventId::parse(old_id.as_bytes()).unwrap().epoch;
    let new_epoch = EventId::parse(new[0].id.as_deref().unwrap().as_bytes())
        .unwrap()
        .epoch;
    assert_ne!(old_epoch, new_epoch);
    // Sweeping removes expired sessions from memory.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&app.store, "old").await, None);
    assert_eq!(app.store.len(), 0);
}

#[tokio::test]
async fn a_session_past_its_lifetime_is_stopped_as_failed() {
    let app = serve_with(MemoryStore::new(), |l| {
        l.max_lifetime(Duration::from_millis(150))
    })
    .await;
    app.inner.gate("long");
    let mut conn = get(app.addr, "/gated?session_id=long", None).await;
    app.inner.send("long", "early");
    // The generator never ends by itself; the lifetime ends it.
    assert_eq!(datas(&conn.collect().await), ["early"]);
    wait_status(&app.store, "long", Status::Finished(Outcome::Failed)).await;
    eventually(|| app.inner.generators_dropped() == 1).await;
}

#[tokio::test]
async fn an_oversized_event_fails_the_session_and_keeps_earlier_events() {
    let app = serve_with(MemoryStore::new(), |l| l.max_event_size(1024)).await;
    app.inner.gate("big");
    let path = "/gated?session_id=big";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("big", "small");
    app.inner.send("big", "x".repeat(4096));
    app.inner.send("big", "never stored");
    assert_eq!(datas(&conn.collect().await), ["small"]);
    wait_status(&app.store, "big", Status::Finished(Outcome::Failed)).await;
    assert_eq!(
        datas(&get(app.addr, path, None).await.collect().await),
        ["small"]
    );
}

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
async fn evicted_positions_are_reported_not_skipped() {
    let store = MemoryStore::builder().max_events_per_session(10).build();
    let app = serve_with(store, |l| l).await;
    app.inner.gate("ring");
    let path = "/gated?session_id=ring";
    let mut slow = get(app.addr, path, None).await;
    app.inner.send("ring", "token 0");
    let first = slow.take(1).await;
    // The producer runs far past what the ring holds while the slow client reads nothing.
    for i in 1..50 {
        app.inner.send("ring", format!("token {i}"));
    }
    app.inner.end("ring");
    let key = SessionKey::new("ring").unwrap();
    eventually(|| {
        futures_util::FutureExt::now_or_never(app.store.lookup(&key))
            .and_then(|r| r.ok().flatten())
            .is_some_and(|i| i.status.is_finished())
    })
    .await;
    // A position before the oldest retained event is reported, not skipped.
    let r = get(app.addr, path, Some(first[0].id.as_deref().unwrap())).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.reason(), Some("evicted"));
    // So is a fresh client, whose start is gone.
    let r = get(app.addr, path, None).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.reason(), Some("evicted"));
    // A position inside the ring still resumes.
    let all_ids = {
        let info = app.store.lookup(&key).await.unwrap().unwrap();
        (info.first_seq, info.last_seq)
    };
    assert_eq!(all_ids, (41, 50));
    let epoch = EventId::parse(first[0].id.as_deref().unwrap().as_bytes())
        .unwrap()
        .epoch;
    let inside = EventId { epoch, seq: 45 }.to_string();
    let rest = get(app.addr, path, Some(&inside)).await.collect().await;
    assert_eq!(datas(&rest), expected_tokens(45..50));
    // The connected slow client, now behind the ring, is disconnected rather than skipped.
    let tail = slow.collect().await;
    let expected_prefix = expected_tokens(1..1 + tail.len());
    // (Without the eviction check its reader would jump from token 0 to token 40.)
    assert_eq!(datas(&tail), expected_prefix, "no event skipped before the end");
}
