//! Keys that Redis itself loses: evicted by a `maxmemory` policy, deleted or flushed. A session
//! whose events are gone is answered `410 evicted` (whose meta is gone, `410 unknown-session`),
//! and a connected reader ends; never an empty `200` that a client would reconnect to forever.
#![cfg(feature = "redis")]

mod common;

use common::redis::{shared_url, unique_prefix, RedisServer};
use common::*;
use resumable_sse::RedisStore;

async fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .connect()
        .await
        .expect("connect to redis")
}

async fn command(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection")
}

/// Deletes the events of every session under `prefix`, as an eviction of those keys would.
async fn lose_events(url: &str, prefix: &str) -> usize {
    lose(&[url.to_owned()], prefix, ":events").await
}

#[tokio::test]
async fn a_finished_session_whose_events_were_evicted_is_410_evicted_never_an_empty_stream() {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let app = serve_with(store(&url, &prefix).await, |l| l).await;
    let evs = get(app.addr, "/tokens?session_id=lost1&n=5", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..5));
    assert_eq!(lose_events(&url, &prefix).await, 1);
    let mut failures = Vec::new();
    for (what, last) in [
        ("from the start", None),
        ("from the first event", evs[0].id.as_deref()),
        ("from the fourth event", evs[3].id.as_deref()),
    ] {
        let conn = get(app.addr, "/tokens?session_id=lost1", last).await;
        failures.extend(conn.check_answer(what, 410, Some("evicted")).err());
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(app.inner.calls(), 1, "the generator never runs again");
}

#[tokio::test]
async fn a_reconnect_behind_events_lost_while_the_session_runs_is_410_evicted() {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let app = serve_with(store(&url, &prefix).await, |l| l).await;
    app.inner.gate("lost2");
    let mut first = get(app.addr, "/gated?session_id=lost2", None).await;
    app.inner.send("lost2", "one");
    let one = first.take(1).await;
    assert_eq!(datas(&one), ["one"]);
    drop(first);
    // A reader that stays, live.
    let mut live = get(app.addr, "/gated?session_id=lost2", one[0].id.as_deref()).await;
    app.inner.send("lost2", "two");
    assert_eq!(datas(&live.take(1).await), ["two"]);
    assert_eq!(lose_events(&url, &prefix).await, 1);
    app.inner.send("lost2", "three");
    // The live reader had every lost event: it goes on, with no false eviction.
    assert_eq!(datas(&live.take(1).await), ["three"]);
    // A client that left after `one` never got `two`, which is gone.
    let again = get(app.addr, "/gated?session_id=lost2", one[0].id.as_deref()).await;
    again
        .check_answer("reconnect after one", 410, Some("evicted"))
        .unwrap();
    let again = get(app.addr, "/gated?session_id=lost2", None).await;
    again
        .check_answer("reconnect from the start", 410, Some("evicted"))
        .unwrap();
    app.inner.end("lost2");
    assert_eq!(live.collect().await.len(), 0);
    assert!(!live.evicted);
}

#[tokio::test]
async fn a_read_behind_lost_events_reports_nothing_retained_so_the_reader_sees_the_gap() {
    use resumable_sse::store::Store;
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let app = serve_with(store(&url, &prefix).await, |l| l).await;
    get(app.addr, "/tokens?session_id=lost3&n=5", None)
        .await
        .collect()
        .await;
    let key = scoped("/tokens", "lost3");
    let info = session_finished(&app.store, &key).await;
    assert_eq!((info.first_seq, info.last_seq), (1, 5));
    assert_eq!(lose_events(&url, &prefix).await, 1);
    let info = app
        .store
        .lookup(&key)
        .await
        .unwrap()
        .expect("the record stays");
    assert_eq!((info.first_seq, info.last_seq), (6, 5), "nothing retained");
    for after in [0, 1, 4] {
        let batch = app
            .store
            .read(&key, info.epoch, after, 100)
            .await
            .unwrap()
            .expect("the record stays");
        assert!(batch.blocks.is_empty());
        assert_eq!(
            (batch.first_seq, batch.last_seq),
            (6, 5),
            "read after {after}: the events it needs are not retained"
        );
    }
}

#[tokio::test]
async fn after_a_flushall_readers_end_and_reconnects_are_410_unknown_session() {
    if !common::redis::have_redis_server() {
        common::redis::skip_or_fail("redis-server is not on PATH");
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let prefix = unique_prefix();
    let app = serve_with(store(&url, &prefix).await, |l| l).await;
    let done = get(app.addr, "/tokens?session_id=f1&n=3", None)
        .await
        .collect()
        .await;
    app.inner.gate("f2");
    let mut live = get(app.addr, "/gated?session_id=f2", None).await;
    app.inner.send("f2", "one");
    let first = live.take(1).await;
    let _: () = ::redis::cmd("FLUSHALL")
        .query_async(&mut command(&url).await)
        .await
        .expect("FLUSHALL");
    // The live reader ends (its next read, at the latest the periodic check's, finds nothing).
    let rest = live.collect().await;
    assert!(rest.is_empty(), "{rest:?}");
    for (path, id) in [
        ("/tokens?session_id=f1", done[0].id.as_deref()),
        ("/gated?session_id=f2", first[0].id.as_deref()),
    ] {
        get(app.addr, path, id)
            .await
            .check_answer(path, 410, Some("unknown-session"))
            .unwrap();
    }
    app.inner.end("f2");
}

/// Under a real `maxmemory` with a policy that evicts any key, every reconnect gets either
/// every event it asked for or a `410`: never a short `200`.
#[tokio::test]
async fn under_a_maxmemory_eviction_policy_a_reconnect_gets_everything_or_410() {
    if !common::redis::have_redis_server() {
        common::redis::skip_or_fail("redis-server is not on PATH");
        return;
    }
    let server = RedisServer::start_on(
        None,
        &["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-random"],
    );
    let url = server.url();
    let prefix = unique_prefix();
    let app = serve_with(store(&url, &prefix).await, |l| l).await;
    const SESSIONS: usize = 40;
    const EVENTS: usize = 50;
    // 40 sessions of 50 events of 4 KiB: 8 MiB, twice what Redis may keep.
    let mut ids = Vec::new();
    for s in 0..SESSIONS {
        let path = format!("/sized?session_id=m{s}&n={EVENTS}&bytes=4096");
        let evs = get(app.addr, &path, None).await.collect().await;
        // A session may lose its keys while it runs; what it sends is still in order.
        ids.push(evs.first().and_then(|e| e.id.clone()));
    }
    let (mut whole, mut gone) = (0, 0);
    let mut failures = Vec::new();
    for (s, id) in ids.iter().enumerate() {
        let Some(id) = id else { continue };
        let path = format!("/sized?session_id=m{s}");
        let mut conn = get(app.addr, &path, Some(id)).await;
        match conn.status.as_u16() {
            200 => {
                let evs = conn.collect().await;
                if evs.len() == EVENTS - 1 && !conn.evicted {
                    whole += 1;
                } else if !conn.evicted {
                    failures.push(format!(
                        "m{s}: a 200 with {} of {} events",
                        evs.len(),
                        EVENTS - 1
                    ));
                }
            }
            410 => gone += 1,
            other => failures.push(format!("m{s}: {other} {:?}", conn.reason())),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        gone > 0,
        "nothing was evicted: the test is too small ({whole} whole)"
    );
}

/// Deletes the keys of every session under `prefix` whose name ends in `suffix`, on every server
/// (every node of a Cluster).
async fn lose(urls: &[String], prefix: &str, suffix: &str) -> usize {
    let mut lost = 0;
    for url in urls {
        let mut conn = command(url).await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}:*{suffix}"))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        for key in &keys {
            let _: i64 = ::redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("DEL");
        }
        lost += keys.len();
    }
    lost
}

#[tokio::test]
async fn on_a_cluster_lost_events_are_410_evicted_and_a_lost_session_410_unknown_session() {
    let Some(urls) = common::redis::RedisCluster::shared_urls() else {
        return;
    };
    let prefix = unique_prefix();
    let store = RedisStore::cluster_builder(urls.clone())
        .prefix(&prefix)
        .connect()
        .await
        .expect("connect to the cluster");
    let app = serve_with(store, |l| l).await;
    // Sessions on several slots: some lose their events, then every one its record.
    let mut firsts = Vec::new();
    for i in 0..6 {
        let evs = get(app.addr, &format!("/tokens?session_id=c{i}&n=4"), None)
            .await
            .collect()
            .await;
        assert_eq!(datas(&evs), expected_tokens(0..4));
        firsts.push(evs[0].id.clone());
    }
    assert_eq!(lose(&urls, &prefix, ":events").await, 6);
    let mut failures = Vec::new();
    for (i, id) in firsts.iter().enumerate() {
        let path = format!("/tokens?session_id=c{i}");
        let conn = get(app.addr, &path, id.as_deref()).await;
        failures.extend(conn.check_answer(&path, 410, Some("evicted")).err());
    }
    assert_eq!(lose(&urls, &prefix, ":meta").await, 6);
    for (i, id) in firsts.iter().enumerate() {
        let path = format!("/tokens?session_id=c{i}");
        let conn = get(app.addr, &path, id.as_deref()).await;
        failures.extend(conn.check_answer(&path, 410, Some("unknown-session")).err());
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(app.inner.calls(), 6, "the generator never runs again");
}
