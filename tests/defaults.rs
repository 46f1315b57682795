//! The default configuration at the sizes where it used to break: streams far past what an
//! event-count limit allowed, read at full speed by the client that started them.

mod common;

use common::*;
use resumable_sse::{EventId, MemoryStore};

fn seq(ev: &Ev) -> u64 {
    EventId::parse(ev.id.as_deref().expect("an id").as_bytes())
        .expect("one of the layer's ids")
        .seq
}

/// The first client of `/tokens?n=N` (interval 0) on the default store and layer: every event,
/// in order, then the end; a reconnect with the last id gets `204 completed`.
async fn first_client_gets_everything(n: usize) {
    let app = serve_with(MemoryStore::new(), |l| l).await;
    let path = format!("/tokens?session_id=big{n}&n={n}");
    let mut conn = get(app.addr, &path, None).await;
    assert_eq!(conn.status, 200);
    let mut count = 0usize;
    let mut last = None;
    while let Some(ev) = conn.next().await {
        assert_eq!(ev.data, format!("token {count}"), "event {count} of {n}");
        assert_eq!(seq(&ev), count as u64 + 1);
        count += 1;
        last = ev.id;
    }
    assert_eq!(count, n, "the whole stream, then its end");
    assert_eq!(conn.comments, 0, "no eviction comment");
    let again = get(app.addr, &path, last.as_deref()).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("completed"));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_hundred_thousand_and_one_events_reach_the_first_client_whole_by_default() {
    first_client_gets_everything(100_001).await;
}

#[tokio::test]
async fn two_hundred_thousand_events_reach_the_first_client_whole_by_default() {
    first_client_gets_everything(200_000).await;
}

#[tokio::test]
async fn a_million_events_at_full_speed_reach_the_first_client_whole_by_default() {
    first_client_gets_everything(1_000_000).await;
}

#[tokio::test]
async fn a_reconnect_whose_remaining_count_is_a_multiple_of_the_read_page_ends() {
    let page = resumable_sse::limits::READ_PAGE_EVENTS;
    let n = 2 * page + 7;
    let app = serve_with(MemoryStore::new(), |l| l).await;
    let path = format!("/tokens?session_id=r&n={n}");
    let mut first = get(app.addr, &path, None).await;
    let got = first.take(7).await;
    drop(first);
    // Wait for the end of the session, then resume: exactly two pages remain.
    session_finished(&app.store, &scoped("/tokens", "r")).await;
    let mut again = get(app.addr, &path, got.last().unwrap().id.as_deref()).await;
    let rest = again.collect().await;
    assert_eq!(datas(&rest), expected_tokens(7..n));
}
