//! The behaviour suite: what every store must let the layer do, over real TCP.
//!
//! Every test here is listed once in `store_suite!` (in `mod.rs`), which instantiates the list
//! for a backend. A test added here and not listed is never used, and `dead_code` is denied:
//! the crate does not compile until the list names it.
#![deny(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use super::client::*;
use super::harness::*;
use super::wait::*;
use super::{Backend, Opts};
use crate::store::{Status, Store};
use crate::{EventId, Outcome};

// --- Resuming ---

fn seqs(evs: &[Ev]) -> Vec<u64> {
    evs.iter()
        .map(|e| {
            EventId::parse(e.id.as_deref().unwrap().as_bytes())
                .unwrap()
                .seq
        })
        .collect()
}

pub(crate) async fn reconnects_get_every_event_exactly_once<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let path = "/tokens?session_id=s1&n=300&interval_ms=1";
    let mut got: Vec<Ev> = Vec::new();
    let mut conn = get(app.addr, path, None).await;
    assert_eq!(conn.status, 200);
    assert_eq!(conn.headers["content-type"], "text/event-stream");
    // Drop the connection four times at different points, resuming each time.
    for n in [1, 37, 80, 5] {
        got.extend(conn.take(n).await);
        drop(conn);
        let last = got.last().unwrap().id.clone().unwrap();
        conn = get(app.addr, path, Some(&last)).await;
        assert_eq!(conn.status, 200);
    }
    got.extend(conn.collect().await);
    assert_eq!(datas(&got), expected_tokens(0..300));
    assert_eq!(seqs(&got), (1..=300).collect::<Vec<_>>());
    // Ids are the layer's own, of one epoch, never the inner ones.
    let epochs: HashSet<_> = got
        .iter()
        .map(|e| {
            EventId::parse(e.id.as_deref().unwrap().as_bytes())
                .unwrap()
                .epoch
        })
        .collect();
    assert_eq!(epochs.len(), 1);
    assert!(got
        .iter()
        .all(|e| !e.id.as_deref().unwrap().starts_with("inner")));
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn reconnect_after_completion_gets_204<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let path = "/tokens?session_id=done&n=5";
    let evs = get(app.addr, path, None).await.collect().await;
    assert_eq!(evs.len(), 5);
    let last = evs.last().unwrap().id.clone().unwrap();
    let again = get(app.addr, path, Some(&last)).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("completed"));
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn a_second_client_replays_from_the_start_then_follows_live<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    app.inner.gate("two");
    let path = "/gated?session_id=two";
    let mut first = get(app.addr, path, None).await;
    app.inner.send("two", "a");
    app.inner.send("two", "b");
    assert_eq!(datas(&first.take(2).await), ["a", "b"]);
    let mut second = get(app.addr, path, None).await;
    assert_eq!(second.status, 200);
    assert_eq!(datas(&second.take(2).await), ["a", "b"]);
    app.inner.send("two", "c");
    app.inner.end("two");
    assert_eq!(datas(&first.collect().await), ["c"]);
    assert_eq!(datas(&second.collect().await), ["c"]);
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn events_appended_during_a_replay_are_neither_lost_nor_repeated<B: Backend>(
    b: &B,
) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    // A fast producer and many reconnects racing it: each reconnect replays while new events
    // keep arriving.
    let path = "/tokens?session_id=race&n=3000&interval_ms=0";
    let mut conn = get(app.addr, path, None).await;
    let mut got = conn.take(1).await;
    drop(conn);
    loop {
        let last = got.last().unwrap().id.clone().unwrap();
        let mut c = get(app.addr, path, Some(&last)).await;
        if c.status == 204 {
            break;
        }
        match c.next().await {
            Some(ev) => got.push(ev),
            None => continue,
        }
        got.extend(c.take(50.min(3000 - got.len())).await);
    }
    assert_eq!(datas(&got), expected_tokens(0..3000));
}

pub(crate) async fn a_replay_goes_out_in_a_few_large_writes_not_one_per_event<B: Backend>(b: &B) {
    const N: usize = 2_000;
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let path = format!("/tokens?session_id=burst&n={N}");
    let live = get(app.addr, &path, None).await.collect().await;
    assert_eq!(datas(&live), expected_tokens(0..N));
    // A second client replays the finished session from the start: stored events go out as
    // slices of the stored blocks, many events per chunk, in order and exactly once.
    let mut replay = get(app.addr, &path, None).await;
    let evs = replay.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..N));
    assert_eq!(seqs(&evs), (1..=N as u64).collect::<Vec<_>>());
    assert!(
        replay.frames * 20 <= N,
        "{} chunks for {N} events",
        replay.frames
    );
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn generation_continues_after_the_client_disconnects<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    app.inner.gate("bg");
    let path = "/gated?session_id=bg";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("bg", "before");
    assert_eq!(datas(&conn.take(1).await), ["before"]);
    drop(conn);
    // Nobody is connected now; the generator keeps running and its events are stored.
    for i in 0..5 {
        app.inner.send("bg", format!("after {i}"));
    }
    session_when(
        &app.store,
        &scoped("/gated", "bg"),
        "six events stored",
        |i| i.last_seq == 6,
    )
    .await;
    assert_eq!(
        app.inner.generators_dropped(),
        0,
        "generator must still run"
    );
    app.inner.end("bg");
    let all = get(app.addr, path, None).await.collect().await;
    assert_eq!(
        datas(&all),
        ["before", "after 0", "after 1", "after 2", "after 3", "after 4"]
    );
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn a_slow_client_does_not_slow_the_producer_or_others<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let path = "/tokens?session_id=slow&n=5000&interval_ms=0";
    let mut slow = get(app.addr, path, None).await;
    assert_eq!(datas(&slow.take(1).await), ["token 0"]);
    // The slow client stops reading; the producer and a fast client finish regardless.
    let fast = get(app.addr, path, None).await.collect().await;
    assert_eq!(datas(&fast), expected_tokens(0..5000));
    let key = scoped("/tokens", "slow");
    let info = app.store.lookup(&key).await.unwrap().unwrap();
    assert!(info.status.is_finished());
    assert_eq!(info.last_seq, 5000);
    // The slow client still gets everything, in order.
    let rest = slow.collect().await;
    assert_eq!(datas(&rest), expected_tokens(1..5000));
}

pub(crate) async fn concurrent_first_requests_call_the_inner_service_once<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let path = "/tokens?session_id=crowd&n=100&interval_ms=1";
    let clients = (0..16).map(|_| {
        let addr = app.addr;
        tokio::spawn(async move { get(addr, path, None).await.collect().await })
    });
    let results = futures_util::future::join_all(clients).await;
    let first = results[0].as_ref().unwrap().clone();
    assert_eq!(datas(&first), expected_tokens(0..100));
    for r in &results {
        assert_eq!(
            r.as_ref().unwrap(),
            &first,
            "every client sees the identical sequence"
        );
    }
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn last_event_id_query_parameter_is_a_fallback_for_the_header<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let evs = get(app.addr, "/tokens?session_id=q&n=10", None)
        .await
        .collect()
        .await;
    let mid = evs[3].id.clone().unwrap();
    let rest = get(
        app.addr,
        &format!("/tokens?session_id=q&n=10&lastEventId={mid}"),
        None,
    )
    .await
    .collect()
    .await;
    assert_eq!(datas(&rest), expected_tokens(4..10));
}

// --- How sessions end ---

/// Waits until the session under `key` has the status `want`.
async fn wait_status<St: Store>(store: &St, key: &str, want: Status) {
    session_when(
        store,
        &scoped("/gated", key),
        &format!("status {want:?}"),
        |i| i.status == want,
    )
    .await;
}

pub(crate) async fn inner_body_error_fails_the_session<B: Backend>(b: &B) {
    let logs = Logs::default();
    // The test runtime is single-threaded: the producer task logs on this thread.
    let _guard = tracing::subscriber::set_default(logs.clone());

    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
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
    let text = logs.text();
    assert!(text.contains("inner SSE body failed"), "logged: {text}");
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn cancel_stops_the_generator_and_reconnects_get_204<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    app.inner.gate("stop");
    let path = "/gated?session_id=stop";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("stop", "partial");
    let evs = conn.take(1).await;
    let key = scoped("/gated", "stop");
    assert!(app.store.cancel(&key).await.unwrap());
    // The connected client sees the end; the generator is dropped.
    assert_eq!(conn.next().await, None);
    eventually("the generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    let again = get(app.addr, path, Some(evs[0].id.as_deref().unwrap())).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("cancelled"));
    // Cancelling a finished session does nothing.
    assert!(!app.store.cancel(&key).await.unwrap());
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn keep_alive_comments_reach_live_and_replayed_connections<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| {
        l.keep_alive(crate::KeepAlive::new().interval(Duration::from_millis(30)))
    })
    .await;
    app.inner.gate("idle");
    let path = "/gated?session_id=idle";
    let mut live = get(app.addr, path, None).await;
    app.inner.send("idle", "x");
    let first = live.take(1).await;
    let mut replayed = get(app.addr, path, Some(first[0].id.as_deref().unwrap())).await;
    // Both connections stay idle; comments arrive on both before the next event.
    live.comments_before_any_event(2).await;
    replayed.comments_before_any_event(2).await;
    app.inner.send("idle", "y");
    assert_eq!(datas(&live.take(1).await), ["y"]);
    assert_eq!(datas(&replayed.take(1).await), ["y"]);
    assert!(live.comments >= 2, "live saw {} comments", live.comments);
    assert!(
        replayed.comments >= 2,
        "replayed saw {} comments",
        replayed.comments
    );
    // Keep-alives are not stored: a replay from the start holds only events.
    app.inner.end("idle");
    let mut all = get(app.addr, path, None).await;
    assert_eq!(datas(&all.collect().await), ["x", "y"]);
    // (The replay connection may itself get a keep-alive if the store is slow: look at the log.)
    let key = scoped("/gated", "idle");
    let info = app.store.lookup(&key).await.unwrap().unwrap();
    let stored = app
        .store
        .read(&key, info.epoch, 0, 100)
        .await
        .unwrap()
        .unwrap();
    let events: Vec<_> = stored.blocks.iter().flat_map(|b| b.iter()).collect();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|(_, e)| !e.starts_with(b":")));
}

pub(crate) async fn keep_alive_can_be_turned_off<B: Backend>(b: &B) {
    // Turned off after a short interval was set: a layer that ignored `None` would keep
    // sending comments every `INTERVAL`.
    const INTERVAL: Duration = Duration::from_millis(20);
    let quiet = serve_with(b.store(Opts::default()).await, |l| {
        l.keep_alive(crate::KeepAlive::new().interval(INTERVAL))
            .keep_alive(crate::KeepAlive::disabled())
    })
    .await;
    quiet.inner.gate("quiet");
    let mut conn = get(quiet.addr, "/gated?session_id=quiet", None).await;
    // The control: the same, with the keep-alive left on, opened after the quiet connection.
    // Once it has had two comments, the quiet connection has been idle for longer than two
    // intervals.
    let loud = serve_with(b.store(Opts::default()).await, |l| {
        l.keep_alive(crate::KeepAlive::new().interval(INTERVAL))
    })
    .await;
    loud.inner.gate("loud");
    let mut control = get(loud.addr, "/gated?session_id=loud", None).await;
    control.comments_before_any_event(2).await;
    loud.inner.end("loud");
    quiet.inner.send("quiet", "only");
    quiet.inner.end("quiet");
    assert_eq!(datas(&conn.collect().await), ["only"]);
    assert_eq!(
        conn.comments, 0,
        "comments on a connection without keep-alive"
    );
}

pub(crate) async fn finished_sessions_expire_after_retention<B: Backend>(b: &B) {
    let store = b
        .store(Opts {
            retention: Some(Duration::from_millis(100)),
            ..Opts::default()
        })
        .await;
    let app = serve_with(store, |l| l).await;
    let path = "/tokens?session_id=old&n=3";
    let old = get(app.addr, path, None).await.collect().await;
    let old_id = old[1].id.clone().unwrap();
    // Still resumable within retention.
    assert_eq!(get(app.addr, path, Some(&old_id)).await.status, 200);
    // The scenario itself: the client comes back after the retention.
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
}

pub(crate) async fn a_session_past_its_lifetime_is_stopped_as_failed<B: Backend>(b: &B) {
    let app = serve_with(b.store(Opts::default()).await, |l| {
        l.max_lifetime(Duration::from_millis(150))
    })
    .await;
    app.inner.gate("long");
    let mut conn = get(app.addr, "/gated?session_id=long", None).await;
    app.inner.send("long", "early");
    // The generator never ends by itself; the lifetime ends it.
    assert_eq!(datas(&conn.collect().await), ["early"]);
    wait_status(&app.store, "long", Status::Finished(Outcome::Failed)).await;
    eventually("the generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
}

pub(crate) async fn an_oversized_event_fails_the_session_and_keeps_earlier_events<B: Backend>(
    b: &B,
) {
    let app = serve_with(b.store(Opts::default()).await, |l| l.max_event_size(1024)).await;
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

pub(crate) async fn evicted_positions_are_reported_not_skipped<B: Backend>(b: &B) {
    let store = b
        .store(Opts {
            max_events_per_session: Some(10),
            ..Opts::default()
        })
        .await;
    let app = serve_with(store, |l| l).await;
    app.inner.gate("ring");
    let path = "/gated?session_id=ring";
    let mut slow = get(app.addr, path, None).await;
    app.inner.send("ring", "token 0");
    let first = slow.take(1).await;
    // The producer runs far past what the ring holds while the slow client reads nothing. One
    // append per event: stores may keep whole batches, and this test is about eviction.
    let key = scoped("/gated", "ring");
    for i in 1..50u64 {
        app.inner.send("ring", format!("token {i}"));
        session_when(&app.store, &key, "the event stored", |info| {
            info.last_seq == i + 1
        })
        .await;
    }
    app.inner.end("ring");
    session_finished(&app.store, &key).await;
    // A position before the oldest retained event is reported, not skipped.
    let r = get(app.addr, path, Some(first[0].id.as_deref().unwrap())).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.reason(), Some("evicted"));
    // So is a fresh client, whose start is gone.
    let r = get(app.addr, path, None).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.reason(), Some("evicted"));
    // A position inside the ring still resumes. (Stores may trim whole batches, so the ring can
    // keep a little more than the limit.)
    let info = app.store.lookup(&key).await.unwrap().unwrap();
    assert_eq!(info.last_seq, 50);
    assert!(info.first_seq > 2 && info.first_seq <= 41, "{info:?}");
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
    assert_eq!(
        datas(&tail),
        expected_prefix,
        "no event skipped before the end"
    );
}

// --- Draining ---

pub(crate) async fn draining_refuses_new_sessions_and_lets_running_ones_finish<B: Backend>(b: &B) {
    let mut drain = None;
    let app = serve_with(b.store(Opts::default()).await, |l| {
        drain = Some(l.drain_handle());
        l
    })
    .await;
    let drain = drain.unwrap();
    app.inner.gate("running");
    let path = "/gated?session_id=running";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("running", "one");
    let first = conn.take(1).await;
    assert_eq!(drain.running(), 1);
    let draining = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain(TIMEOUT).await }
    });
    eventually("draining", || drain.is_draining()).await;
    // New sessions go elsewhere.
    let refused = get(app.addr, "/tokens?session_id=new&n=1", None).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.reason(), Some("draining"));
    assert!(refused.headers.contains_key("retry-after"));
    // Reconnects to running sessions are still served.
    let mut again = get(app.addr, path, Some(first[0].id.as_deref().unwrap())).await;
    assert_eq!(again.status, 200);
    app.inner.send("running", "two");
    app.inner.end("running");
    assert_eq!(datas(&again.collect().await), ["two"]);
    assert_eq!(datas(&conn.collect().await), ["two"]);
    let report = draining.await.unwrap();
    assert_eq!(report.running_at_start, 1);
    assert_eq!(report.ended_at_deadline, 0);
    let key = scoped("/gated", "running");
    let info = app.store.lookup(&key).await.unwrap().unwrap();
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    assert_eq!(app.inner.calls(), 1);
}

pub(crate) async fn the_drain_deadline_ends_running_sessions_as_failed<B: Backend>(b: &B) {
    let mut drain = None;
    let app = serve_with(b.store(Opts::default()).await, |l| {
        drain = Some(l.drain_handle());
        l
    })
    .await;
    let drain = drain.unwrap();
    app.inner.gate("forever");
    let mut conn = get(app.addr, "/gated?session_id=forever", None).await;
    app.inner.send("forever", "only");
    conn.take(1).await;
    let report = drain.drain(Duration::from_millis(100)).await;
    assert_eq!(report.running_at_start, 1);
    assert_eq!(report.ended_at_deadline, 1);
    assert_eq!(drain.running(), 0);
    assert_eq!(conn.next().await, None);
    wait_status(&app.store, "forever", Status::Finished(Outcome::Failed)).await;
    eventually("the generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
}
