//! Reconnecting over real TCP: replay after `Last-Event-ID`, then live, exactly once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use resumable_sse::store::Store;
use resumable_sse::{EventId, SessionKey};

fn seqs(evs: &[Ev]) -> Vec<u64> {
    evs.iter()
        .map(|e| EventId::parse(e.id.as_deref().unwrap().as_bytes()).unwrap().seq)
        .collect()
}

#[tokio::test]
async fn reconnects_get_every_event_exactly_once() {
    let app = serve().await;
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
        .map(|e| EventId::parse(e.id.as_deref().unwrap().as_bytes()).unwrap().epoch)
        .collect();
    assert_eq!(epochs.len(), 1);
    assert!(got.iter().all(|e| !e.id.as_deref().unwrap().starts_with("inner")));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn reconnect_after_completion_gets_204() {
    let app = serve().await;
    let path = "/tokens?session_id=done&n=5";
    let evs = get(app.addr, path, None).await.collect().await;
    assert_eq!(evs.len(), 5);
    let last = evs.last().unwrap().id.clone().unwrap();
    let again = get(app.addr, path, Some(&last)).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("completed"));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_second_client_replays_from_the_start_then_follows_live() {
    let app = serve().await;
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

#[tokio::test]
async fn events_appended_during_a_replay_are_neither_lost_nor_repeated() {
    let app = serve().await;
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

#[tokio::test]
async fn generation_continues_after_the_client_disconnects() {
    let app = serve().await;
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
    let key = SessionKey::new("bg").unwrap();
    eventually(|| {
        futures_util::FutureExt::now_or_never(app.store.lookup(&key))
            .and_then(|r| r.ok().flatten())
            .is_some_and(|i| i.last_seq == 6)
    })
    .await;
    assert_eq!(app.inner.generators_dropped(), 0, "generator must still run");
    app.inner.end("bg");
    let all = get(app.addr, path, None).await.collect().await;
    assert_eq!(
        datas(&all),
        ["before", "after 0", "after 1", "after 2", "after 3", "after 4"]
    );
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_slow_client_does_not_slow_the_producer_or_others() {
    let app = serve().await;
    let path = "/tokens?session_id=slow&n=5000&interval_ms=0";
    let mut slow = get(app.addr, path, None).await;
    assert_eq!(datas(&slow.take(1).await), ["token 0"]);
    // The slow client stops reading; the producer and a fast client finish regardless.
    let fast = get(app.addr, path, None).await.collect().await;
    assert_eq!(datas(&fast), expected_tokens(0..5000));
    let key = SessionKey::new("slow").unwrap();
    let info = app.store.lookup(&key).await.unwrap().unwrap();
    assert!(info.status.is_finished());
    assert_eq!(info.last_seq, 5000);
    // The slow client still gets everything, in order.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rest = slow.collect().await;
    assert_eq!(datas(&rest), expected_tokens(1..5000));
}

#[tokio::test]
async fn concurrent_first_requests_call_the_inner_service_once() {
    let app = serve().await;
    let path = "/tokens?session_id=crowd&n=100&interval_ms=1";
    let clients = (0..16).map(|_| {
        let addr = app.addr;
        tokio::spawn(async move { get(addr, path, None).await.collect().await })
    });
    let results = futures_util::future::join_all(clients).await;
    let first = results[0].as_ref().unwrap().clone();
    assert_eq!(datas(&first), expected_tokens(0..100));
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), &first, "every client sees the identical sequence");
    }
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn last_event_id_query_parameter_is_a_fallback_for_the_header() {
    let app = serve().await;
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
