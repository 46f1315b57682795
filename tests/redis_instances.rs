//! Several instances on one Redis, a dying producer, a failing Redis, and the connection count.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::event_stream_head as head;
use common::redis::*;
use common::*;
use resumable_sse::store::{
    Appended, Claim, EventBlock, EventBlockBuilder, ReadBatch, Status, Store,
};
use resumable_sse::{OnStoreError, Outcome, RedisStore, SessionKey};

async fn store_on(url: &str, prefix: &str, lease: Duration) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .lease(lease)
        .connect()
        .await
        .expect("connect")
}

fn url_or_skip() -> Option<String> {
    shared_url()
}

fn encoded(seq: u64) -> String {
    format!("id: x-{seq}\ndata: {seq}\n\n")
}

/// One block of the events numbered `seqs`, each as `encode` writes it.
fn block_of(seqs: std::ops::RangeInclusive<u64>, encode: fn(u64) -> String) -> EventBlock {
    let mut b = EventBlockBuilder::new(*seqs.start());
    for seq in seqs {
        b.push_with(|buf| buf.extend_from_slice(encode(seq).as_bytes()));
    }
    b.finish().expect("at least one event")
}

/// The sequence numbers of a page, checking that every event is the one `encode` wrote for it.
fn page_seqs(batch: &ReadBatch, encode: fn(u64) -> String) -> Vec<u64> {
    let mut seqs = Vec::new();
    for block in &batch.blocks {
        for (seq, bytes) in block.iter() {
            assert_eq!(bytes, encode(seq).as_bytes(), "event {seq}");
            seqs.push(seq);
        }
    }
    seqs
}

/// One block of the events numbered `seqs`, as the layer appends them.
fn events(seqs: std::ops::RangeInclusive<u64>) -> EventBlock {
    block_of(seqs, encoded)
}

/// The sequence numbers of a page, checking that every event is the one appended under it.
fn read_seqs(batch: &ReadBatch) -> Vec<u64> {
    page_seqs(batch, encoded)
}

#[tokio::test]
async fn a_client_moving_between_instances_gets_every_event_once() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let a = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    let b = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    let path = "/tokens?session_id=moving&n=400&interval_ms=1";
    let mut got = Vec::new();
    let mut conn = get(a.addr, path, None).await;
    let instances = [b.addr, a.addr];
    for (i, n) in [20, 50, 1, 90, 33].into_iter().enumerate() {
        got.extend(conn.take(n).await);
        drop(conn);
        // Every reconnect lands on the other instance.
        let last = got.last().unwrap().id.clone().unwrap();
        conn = get(instances[i % 2], path, Some(&last)).await;
        assert_eq!(conn.status, 200);
    }
    got.extend(conn.collect().await);
    assert_eq!(datas(&got), expected_tokens(0..400));
    // Only the first instance ever called its inner service.
    assert_eq!(a.inner.calls(), 1);
    assert_eq!(b.inner.calls(), 0);
    // The final reconnect, on either instance, is told the stream is complete.
    let last = got.last().unwrap().id.clone().unwrap();
    for addr in [a.addr, b.addr] {
        let done = get(addr, path, Some(&last)).await;
        assert_eq!(done.status, 204);
        assert_eq!(done.reason(), Some("completed"));
    }
}

#[tokio::test]
async fn concurrent_first_requests_on_several_instances_produce_once() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let a = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    let b = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    let path = "/tokens?session_id=race&n=50&interval_ms=2";
    let tasks = (0..10).map(|i| {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        tokio::spawn(async move { get(addr, path, None).await.collect().await })
    });
    let results = futures_util::future::join_all(tasks).await;
    for r in &results {
        assert_eq!(datas(r.as_ref().unwrap()), expected_tokens(0..50));
    }
    assert_eq!(a.inner.calls() + b.inner.calls(), 1);
}

#[tokio::test]
async fn a_dead_producer_is_detected_within_the_lease_and_marked_failed() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let lease = Duration::from_millis(600);
    let producer = store_on(&url, &prefix, lease).await;
    let other = serve_with(store_on(&url, &prefix, lease).await, |l| l).await;
    let key = scoped("/gated", "crash");
    let Claim::Claimed(epoch) = producer.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("fresh key must be claimable");
    };
    producer.start(&key, epoch, head()).await.unwrap();
    producer
        .append(&key, epoch, &[events(1..=2)])
        .await
        .unwrap();
    // A client follows the session on the other instance.
    let mut conn = get(other.addr, "/gated?session_id=crash", None).await;
    assert_eq!(conn.status, 200);
    assert_eq!(datas(&conn.take(2).await), ["1", "2"]);
    // The producing process dies: its lease renewals stop with it.
    let died = tokio::time::Instant::now();
    drop(producer);
    assert_eq!(
        conn.next().await,
        None,
        "the follower ends instead of hanging"
    );
    let took = died.elapsed();
    assert!(
        took <= lease + Duration::from_millis(1500),
        "ended after {took:?}, lease {lease:?}"
    );
    let info = other.store.lookup(&key).await.unwrap().unwrap();
    assert_eq!(info.status, Status::Finished(Outcome::Failed));
    let last = format!(
        "{}-2",
        resumable_sse::EventId { epoch, seq: 0 }
            .to_string()
            .split('-')
            .next()
            .unwrap()
    );
    let again = get(other.addr, "/gated?session_id=crash", Some(&last)).await;
    assert_eq!(again.status, 204);
    assert_eq!(again.reason(), Some("failed"));
    assert_eq!(
        other.inner.calls(),
        0,
        "a failed session is never generated again"
    );
}

#[tokio::test]
async fn a_producer_that_lost_the_session_cannot_write() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let a = store_on(&url, &prefix, Duration::from_secs(2)).await;
    let b = store_on(&url, &prefix, Duration::from_secs(2)).await;
    let key = SessionKey::new("fenced").unwrap();
    let Claim::Claimed(epoch) = a.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("claimable");
    };
    // Exactly one claim wins, across instances.
    assert!(matches!(
        b.claim(&key, Duration::from_secs(60)).await.unwrap(),
        Claim::Exists(_)
    ));
    a.start(&key, epoch, head()).await.unwrap();
    assert_eq!(
        a.append(&key, epoch, &[events(1..=1)]).await.unwrap(),
        Appended::Stored
    );
    // Another instance cancels the session: the producer's next write is refused.
    assert!(b.cancel(&key).await.unwrap());
    assert_eq!(
        a.append(&key, epoch, &[events(2..=2)]).await.unwrap(),
        Appended::Stopped
    );
    let read = b.read(&key, epoch, 0, 10).await.unwrap().unwrap();
    assert_eq!(read_seqs(&read), [1]);
    // A writer with another epoch is refused too.
    let stranger = resumable_sse::Epoch::from_raw(epoch.raw() ^ 1);
    assert_eq!(
        a.append(&key, stranger, &[events(2..=2)]).await.unwrap(),
        Appended::Stopped
    );
}

#[tokio::test]
async fn retried_appends_store_nothing_twice() {
    let Some(url) = url_or_skip() else { return };
    let store = store_on(&url, &unique_prefix(), Duration::from_secs(2)).await;
    let key = SessionKey::new("idem").unwrap();
    let Claim::Claimed(epoch) = store.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("claimable");
    };
    store.start(&key, epoch, head()).await.unwrap();
    store.append(&key, epoch, &[events(1..=2)]).await.unwrap();
    // The same batch again (as after a lost reply), then a batch overlapping it.
    store.append(&key, epoch, &[events(1..=2)]).await.unwrap();
    store.append(&key, epoch, &[events(2..=3)]).await.unwrap();
    let read = store.read(&key, epoch, 0, 100).await.unwrap().unwrap();
    assert_eq!(read_seqs(&read), [1, 2, 3]);
    assert_eq!(read.last_seq, 3);
    // A retry that carries an already stored block and a new one stores the new one only.
    for _ in 0..2 {
        assert_eq!(
            store
                .append(&key, epoch, &[events(1..=3), events(4..=5)])
                .await
                .unwrap(),
            Appended::Stored
        );
    }
    // Long blocks, stored in several chunks, and retried grouped otherwise: the partly stored
    // chunk keeps only what follows.
    store.append(&key, epoch, &[events(6..=200)]).await.unwrap();
    store
        .append(&key, epoch, &[events(100..=230), events(231..=231)])
        .await
        .unwrap();
    store
        .append(&key, epoch, &[events(6..=200), events(201..=240)])
        .await
        .unwrap();
    let read = store.read(&key, epoch, 0, 1000).await.unwrap().unwrap();
    assert_eq!(read_seqs(&read), (1..=240).collect::<Vec<_>>());
    assert_eq!((read.first_seq, read.last_seq), (1, 240));
    // Events that do not follow the newest stored one are refused, and nothing is stored.
    assert!(store
        .append(&key, epoch, &[events(241..=241), events(243..=243)])
        .await
        .is_err());
    let info = store.lookup(&key).await.unwrap().unwrap();
    assert_eq!(info.last_seq, 240);
}

#[tokio::test]
async fn blocks_are_stored_in_chunks_and_read_back_in_pages() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let store = store_on(&url, &prefix, Duration::from_secs(2)).await;
    let key = SessionKey::new("chunks").unwrap();
    let Claim::Claimed(epoch) = store.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("claimable");
    };
    store.start(&key, epoch, head()).await.unwrap();
    // 300 small events in one block: chunks of 64 events.
    store.append(&key, epoch, &[events(1..=300)]).await.unwrap();
    // Three events of 100 KiB: a chunk each.
    let mut big = EventBlockBuilder::new(301);
    let data = "x".repeat(100 * 1024);
    for seq in 301..=303 {
        big.push_with(|buf| {
            buf.extend_from_slice(format!("id: x-{seq}\ndata: {data}\n\n").as_bytes())
        });
    }
    let big = big.finish().unwrap();
    store
        .append(&key, epoch, std::slice::from_ref(&big))
        .await
        .unwrap();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let entries: u64 = ::redis::cmd("XLEN")
        .arg(format!("{prefix}:{{chunks}}:events"))
        .query_async(&mut rc)
        .await
        .unwrap();
    assert_eq!(entries, 5 + 3, "one stream entry per chunk");
    // Pages start and end inside chunks.
    let page = store.read(&key, epoch, 70, 100).await.unwrap().unwrap();
    assert_eq!(read_seqs(&page), (71..=170).collect::<Vec<_>>());
    let page = store.read(&key, epoch, 299, 3).await.unwrap().unwrap();
    let got: Vec<(u64, bytes::Bytes)> = page.blocks.iter().flat_map(|b| b.iter()).collect();
    let want: Vec<(u64, bytes::Bytes)> = events(300..=300)
        .iter()
        .chain(big.slice(..=302).unwrap().iter())
        .collect();
    assert_eq!(got, want);
    assert!(store
        .read(&key, epoch, 303, 10)
        .await
        .unwrap()
        .unwrap()
        .blocks
        .is_empty());
}

#[tokio::test]
async fn session_keys_never_reach_redis_unescaped() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let app = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    // Glob characters, hash-tag braces, spaces and newlines in the key.
    let raw = "a*?[x]{y} \n\r%";
    let encoded: String = raw.bytes().map(|b| format!("%{b:02X}")).collect();
    let path = format!("/tokens?session_id={encoded}&n=3");
    let evs = get(app.addr, &path, None).await.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    let last = evs.last().unwrap().id.clone().unwrap();
    assert_eq!(get(app.addr, &path, Some(&last)).await.status, 204);
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in &keys {
        // The count of live sessions (`max_sessions`) is the one key of no session.
        if *k == format!("{prefix}:sessions") {
            continue;
        }
        let tag = k.split_once('{').unwrap().1.split_once('}').unwrap().0;
        assert!(
            tag.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%-_.".contains(&b)),
            "{k}"
        );
    }
    // Another session's glob-looking key does not see this one.
    let other = get(app.addr, "/tokens?session_id=a*&n=1", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&other), expected_tokens(0..1));
    assert_eq!(app.inner.calls(), 2);
}

#[tokio::test]
async fn keys_carry_a_ttl_while_running_and_expire_after_retention() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .lease(Duration::from_secs(2))
        .retention(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let app = serve_with(store, |l| l).await;
    app.inner.gate("ttl");
    let mut conn = get(app.addr, "/gated?session_id=ttl", None).await;
    app.inner.send("ttl", "x");
    conn.take(1).await;
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut rc)
        .await
        .unwrap();
    // The session's meta, events and lease, and the count of live sessions.
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.contains(&format!("{prefix}:sessions")), "{keys:?}");
    for k in &keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut rc)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no TTL while running");
    }
    app.inner.end("ttl");
    assert_eq!(conn.next().await, None);
    // Gone once the retention has passed (Redis expires them; nothing deletes them).
    eventually_async("every key expired", || {
        let mut rc = rc.clone();
        let pattern = format!("{prefix}:*");
        async move {
            let left: Vec<String> = ::redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut rc)
                .await
                .unwrap();
            left.is_empty()
        }
    })
    .await;
}

#[tokio::test]
async fn a_thousand_subscribers_use_three_connections() {
    let Some(url) = url_or_skip() else { return };
    let server = RedisServer::start();
    let _ = url;
    let url = server.url();
    let app = serve_with(
        store_on(&url, &unique_prefix(), Duration::from_secs(2)).await,
        |l| l,
    )
    .await;
    app.inner.gate("many");
    let path = "/gated?session_id=many";
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(get(app.addr, path, None).await);
    }
    app.inner.send("many", "hello");
    for c in &mut conns {
        assert_eq!(datas(&c.take(1).await), ["hello"]);
    }
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut rc)
        .await
        .unwrap();
    // Ours: the store's command, lease and pub/sub connections (at most four); plus this
    // test's own.
    assert_eq!(list.lines().count(), 4, "{list}");
    assert_eq!(list.matches("name=resumable-sse:").count(), 2, "{list}");
    // The subscribers share one tail of the session: ten more events cost a few reads per
    // event for the whole process, not one per subscriber.
    let scripts = |info: String| -> u64 {
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let info = |rc: &mut ::redis::aio::MultiplexedConnection| {
        let mut rc = rc.clone();
        async move {
            let s: String = ::redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut rc)
                .await
                .unwrap();
            s
        }
    };
    let before = scripts(info(&mut rc).await);
    for i in 0..10 {
        app.inner.send("many", format!("more {i}"));
        for c in &mut conns {
            assert_eq!(datas(&c.take(1).await), [format!("more {i}")]);
        }
    }
    let used = scripts(info(&mut rc).await) - before;
    assert!(
        used < 200,
        "{used} script calls for 10 events to 1000 subscribers"
    );
    app.inner.end("many");
}

#[tokio::test]
async fn redis_down_when_a_request_arrives_gets_the_configured_answer() {
    if shared_url().is_none() {
        return;
    }
    let mut server = RedisServer::start();
    let store = store_on(&server.url(), &unique_prefix(), Duration::from_secs(2)).await;
    let unavailable = serve_with(store.clone(), |l| l).await;
    let passthrough = serve_with(store, |l| l.on_store_error(OnStoreError::PassThrough)).await;
    server.kill();
    let r = get(unavailable.addr, "/tokens?session_id=down&n=3", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.reason(), Some("store-unavailable"));
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(unavailable.inner.calls(), 0);
    // Availability first: the inner service answers, unresumable (its own ids pass through).
    let mut p = get(passthrough.addr, "/tokens?session_id=down&n=3", None).await;
    assert_eq!(p.status, 200);
    let evs = p.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    assert_eq!(evs[0].id.as_deref(), Some("inner-0"));
}

#[tokio::test]
async fn a_redis_restart_that_keeps_data_loses_nothing() {
    if shared_url().is_none() {
        return;
    }
    let port = free_port();
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut server = RedisServer::start_on(Some(port), &aof);
    let store = store_on(&server.url(), &unique_prefix(), Duration::from_secs(5)).await;
    let app = serve_with(store, |l| l).await;
    app.inner.gate("restart");
    let path = "/gated?session_id=restart";
    let mut conn = get(app.addr, path, None).await;
    for i in 0..10 {
        app.inner.send("restart", format!("token {i}"));
    }
    let mut got = conn.take(10).await;
    drop(conn);
    server.kill();
    // Produced while Redis is down: held by the producer and retried. (The sleep is the
    // scenario: Redis stays down a while.)
    for i in 10..20 {
        app.inner.send("restart", format!("token {i}"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = RedisServer::start_on(Some(port), &aof);
    for i in 20..30 {
        app.inner.send("restart", format!("token {i}"));
    }
    app.inner.end("restart");
    let last = got.last().unwrap().id.clone().unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut c = get(
            app.addr,
            path,
            Some(&got.last().unwrap().id.clone().unwrap()),
        )
        .await;
        if c.status == 204 {
            break;
        }
        if c.status == 200 {
            got.extend(c.collect().await);
        }
        assert!(tokio::time::Instant::now() < deadline, "never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = last;
    assert_eq!(datas(&got), expected_tokens(0..30));
}

#[tokio::test]
async fn a_redis_restart_that_lost_data_is_reported_not_spliced() {
    if shared_url().is_none() {
        return;
    }
    let port = free_port();
    let mut server = RedisServer::start_on(Some(port), &[]);
    let store = store_on(&server.url(), &unique_prefix(), Duration::from_secs(5)).await;
    let app = serve_with(store, |l| l).await;
    app.inner.gate("lost");
    let path = "/gated?session_id=lost";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("lost", "before");
    let got = conn.take(1).await;
    server.kill();
    let _server = RedisServer::start_on(Some(port), &[]);
    app.inner.send("lost", "after");
    // The follower ends (its session is gone) rather than splicing another history.
    assert_eq!(conn.next().await, None);
    let last = got[0].id.clone().unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let r = loop {
        let r = get(app.addr, path, Some(&last)).await;
        if r.status != 503 {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 410);
    assert_eq!(r.reason(), Some("unknown-session"));
    // The generator was not run again.
    assert_eq!(app.inner.calls(), 1);
    let key = scoped("/gated", "lost");
    assert!(app.store.lookup(&key).await.unwrap().is_none());
}

#[tokio::test]
async fn after_a_drain_other_instances_keep_serving_the_sessions() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let mut drain = None;
    let a = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| {
        drain = Some(l.drain_handle());
        l
    })
    .await;
    let b = serve_with(store_on(&url, &prefix, Duration::from_secs(2)).await, |l| l).await;
    let path = "/tokens?session_id=deploy&n=100&interval_ms=2";
    let mut conn = get(a.addr, path, None).await;
    let mut got = conn.take(10).await;
    // Instance A is being replaced: it finishes what it produces, then goes away.
    let report = drain.unwrap().drain(TIMEOUT).await;
    assert_eq!((report.running_at_start, report.ended_at_deadline), (1, 0));
    drop(conn);
    let rest = get(
        b.addr,
        path,
        Some(got.last().unwrap().id.as_deref().unwrap()),
    )
    .await
    .collect()
    .await;
    got.extend(rest);
    assert_eq!(datas(&got), expected_tokens(0..100));
    assert_eq!((a.inner.calls(), b.inner.calls()), (1, 0));
}

#[tokio::test]
async fn a_claim_whose_process_died_before_answering_is_taken_over() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let lease = Duration::from_millis(300);
    let dead = store_on(&url, &prefix, lease).await;
    let key = scoped("/tokens", "orphan");
    assert!(matches!(
        dead.claim(&key, Duration::from_secs(60)).await.unwrap(),
        Claim::Claimed(_)
    ));
    // The claiming process dies before its inner service answered.
    drop(dead);
    let app = serve_with(store_on(&url, &prefix, lease).await, |l| l).await;
    // A request meanwhile waits for the claim, then takes the key over once the lease is gone.
    let evs = get(app.addr, "/tokens?session_id=orphan&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn one_renewal_task_keeps_every_lease_of_the_process() {
    let Some(url) = url_or_skip() else { return };
    let lease = Duration::from_millis(500);
    let prefix = unique_prefix();
    let store = store_on(&url, &prefix, lease).await;
    let mut sessions = Vec::new();
    for i in 0..300 {
        let key = SessionKey::new(format!("renewed-{i}")).unwrap();
        let Claim::Claimed(epoch) = store.claim(&key, Duration::from_secs(60)).await.unwrap()
        else {
            panic!("claimable");
        };
        store.start(&key, epoch, head()).await.unwrap();
        sessions.push((key, epoch));
    }
    // Several leases later, every session still runs and takes events.
    tokio::time::sleep(lease * 3).await;
    for (key, epoch) in &sessions {
        assert_eq!(
            store.append(key, *epoch, &[events(1..=1)]).await.unwrap(),
            Appended::Stored
        );
        let info = store.lookup(key).await.unwrap().unwrap();
        assert_eq!(info.status, Status::Running);
    }
    // A finished session is no longer renewed: its lease stays gone.
    let (key, epoch) = &sessions[0];
    store.finish(key, *epoch, Outcome::Completed).await.unwrap();
    tokio::time::sleep(lease * 2).await;
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let leases: u64 = ::redis::cmd("EXISTS")
        .arg(format!("{prefix}:{{renewed-0}}:lease"))
        .arg(format!("{prefix}:{{renewed-1}}:lease"))
        .query_async(&mut rc)
        .await
        .unwrap();
    assert_eq!(leases, 1, "only the running session holds a lease");
    let info = store.lookup(key).await.unwrap().unwrap();
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
}

#[tokio::test]
async fn a_cancel_whose_announcement_was_lost_reaches_the_producer_at_its_next_renewal() {
    let Some(url) = url_or_skip() else { return };
    let prefix = unique_prefix();
    let lease = Duration::from_millis(600);
    let store = store_on(&url, &prefix, lease).await;
    let key = SessionKey::new("quiet-cancel").unwrap();
    let Claim::Claimed(epoch) = store.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("claimable");
    };
    store.start(&key, epoch, head()).await.unwrap();
    let cancelled = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.cancelled(&key, epoch).await }
    });
    // A fixed wait: it checks that nothing happens.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!cancelled.is_finished());
    // Cancelled behind the store's back: nothing is announced.
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("HSET")
        .arg(format!("{prefix}:{{quiet-cancel}}:meta"))
        .arg("status")
        .arg("cancelled")
        .query_async(&mut rc)
        .await
        .unwrap();
    tokio::time::timeout(lease, cancelled)
        .await
        .expect("the producer learns within a third of the lease (plus slack)")
        .unwrap()
        .unwrap();
}

/// Blocks the whole server for about `ms` milliseconds with a busy script, from its own
/// connection, as a slow command of another client would.
fn block_server(url: &str, ms: u64) -> std::thread::JoinHandle<()> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let client = ::redis::Client::open(url).expect("client");
        let mut conn = client.get_connection().expect("connect");
        let script = "local t = redis.call('TIME') \
                      local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000 \
                      repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us \
                      return 1";
        let _: i64 = ::redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(ms)
            .query(&mut conn)
            .expect("busy script");
    })
}

#[tokio::test]
async fn a_reply_slower_than_the_response_timeout_fails_and_the_default_waits_for_it() {
    if shared_url().is_none() {
        return;
    }
    // A private server: this test stalls it.
    let server = RedisServer::start();
    let url = server.url();
    let key = SessionKey::new("slow").unwrap();
    let short = RedisStore::builder(&url)
        .prefix(unique_prefix())
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    let default = store_on(&url, &unique_prefix(), Duration::from_secs(5)).await;
    // Both connections (and the probe's, below) are up before the server stalls.
    assert!(short.lookup(&key).await.unwrap().is_none());
    assert!(default.lookup(&key).await.unwrap().is_none());

    let probe = inspector(&url).await;
    let busy = block_server(&url, 2_500);
    // The script runs once the server stops answering at once.
    eventually_async("the server stalled by the script", || {
        let mut probe = probe.clone();
        async move {
            let ping = ::redis::cmd("PING");
            let answer = ping.query_async::<String>(&mut probe);
            tokio::time::timeout(Duration::from_millis(50), answer)
                .await
                .is_err()
        }
    })
    .await;
    let started = tokio::time::Instant::now();
    let (slow, waited) = tokio::join!(short.lookup(&key), default.lookup(&key));
    // The short timeout gives a clean store error, well before the server answers ...
    let err = slow.expect_err("a reply later than the response timeout fails");
    assert_eq!(
        err.kind(),
        resumable_sse::store::StoreErrorKind::Unavailable
    );
    // ... and the default (10 s) waits for the stalled server's answer.
    assert!(waited.expect("the default timeout waits").is_none());
    assert!(started.elapsed() >= Duration::from_millis(2_000));
    busy.join().expect("busy script thread");
    // The store with the short timeout works again once the server does.
    assert!(short.lookup(&key).await.unwrap().is_none());
}

// --- Every stream ends, exactly once, at every size: limits, the shared tail, the final status --

/// A private server for a test that counts its commands, stalls it or goes through a proxy;
/// `None` (after a SKIP line) without `redis-server`.
fn private_server() -> Option<RedisServer> {
    shared_url()?;
    Some(RedisServer::start())
}

/// A client of the test's own on `url`, for looking into what the store keeps.
async fn inspector(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// The script calls the server ran so far.
async fn script_calls(rc: &mut ::redis::aio::MultiplexedConnection) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(rc)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// An encoded event of exactly [`FIXED_LEN`] bytes.
fn fixed(seq: u64) -> String {
    format!("id: x-{seq:010}\ndata: {seq:010}\n\n")
}

const FIXED_LEN: usize = 35;

/// One block of fixed-size events.
fn fixed_events(seqs: std::ops::RangeInclusive<u64>) -> EventBlock {
    block_of(seqs, fixed)
}

/// The sequence numbers of a page of fixed-size events, checking every event's bytes.
fn fixed_seqs(batch: &ReadBatch) -> Vec<u64> {
    page_seqs(batch, fixed)
}

/// Claims and starts `key` on `store`.
async fn running(store: &RedisStore, key: &SessionKey) -> resumable_sse::Epoch {
    let Claim::Claimed(epoch) = store.claim(key, Duration::from_secs(60)).await.unwrap() else {
        panic!("a fresh key is claimable");
    };
    assert!(store.start(key, epoch, head()).await.unwrap());
    epoch
}

/// A stream entry as `XRANGE` returns it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// What Redis retains of a session: the meta hash's `first`, `last` and `bytes`, and the stream
/// entries' first sequence numbers with the length of their data.
struct Retained {
    first: u64,
    last: u64,
    bytes: u64,
    chunks: Vec<(u64, usize)>,
}

impl Retained {
    async fn of(rc: &mut ::redis::aio::MultiplexedConnection, prefix: &str, key: &str) -> Self {
        let (first, last, bytes): (u64, u64, u64) = ::redis::cmd("HMGET")
            .arg(format!("{prefix}:{{{key}}}:meta"))
            .arg("first")
            .arg("last")
            .arg("bytes")
            .query_async(rc)
            .await
            .expect("HMGET");
        let entries: Vec<StreamEntry> = ::redis::cmd("XRANGE")
            .arg(format!("{prefix}:{{{key}}}:events"))
            .arg("-")
            .arg("+")
            .query_async(rc)
            .await
            .expect("XRANGE");
        let chunks = entries
            .into_iter()
            .map(|(id, fields)| {
                let seq = id.split('-').next().unwrap().parse().unwrap();
                let data = fields.iter().find(|(f, _)| f == "d").expect("data field");
                (seq, data.1.len())
            })
            .collect();
        Self {
            first,
            last,
            bytes,
            chunks,
        }
    }

    /// Checks that the meta hash describes the stream: `bytes` is the sum of the chunks' data and
    /// `first` the oldest chunk's first event.
    fn assert_consistent(&self) {
        let sum: usize = self.chunks.iter().map(|c| c.1).sum();
        assert_eq!(self.bytes, sum as u64, "bytes field vs the chunks retained");
        assert_eq!(Some(self.first), self.chunks.first().map(|c| c.0), "first");
    }
}

#[tokio::test]
async fn two_hundred_thousand_events_at_full_speed_reach_the_first_client_with_the_default_configuration(
) {
    let Some(server) = private_server() else {
        return;
    };
    // The default configuration: only a prefix of the test's own.
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix())
        .connect()
        .await
        .expect("connect");
    let app = serve_with(store, |l| l).await;
    const N: u64 = 200_000;
    let path = format!("/tokens?session_id=big&n={N}");
    let run = async {
        let started = std::time::Instant::now();
        let mut conn = get(app.addr, &path, None).await;
        assert_eq!(conn.status, 200);
        let mut seq = 0u64;
        let mut last = None;
        while let Some(ev) = conn.next().await {
            assert_eq!(ev.data, format!("token {seq}"), "in order, none missing");
            seq += 1;
            let id = ev.id.expect("an id");
            assert!(id.ends_with(&format!("-{seq}")), "{id} is event {seq}");
            last = Some(id);
        }
        assert_eq!(seq, N, "every event, then the end");
        assert_eq!(conn.comments, 0, "not evicted");
        eprintln!("{N} events in {:?}", started.elapsed());
        let done = get(app.addr, &path, last.as_deref()).await;
        assert_eq!(
            (done.status.as_u16(), done.reason()),
            (204, Some("completed"))
        );
    };
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the stream ends in time");
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_client_behind_the_hard_byte_limit_gets_a_prefix_then_the_evicted_comment_and_410() {
    let Some(server) = private_server() else {
        return;
    };
    // Events of 8 KiB, and room for about 300 of them, even for a connected reader.
    const DATA: usize = 8 << 10;
    const EVENTS: usize = 6_000; // 48 MiB: far more than the socket buffers hold
    let cap = 300 * DATA;
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix())
        .max_bytes_per_session(cap)
        .hard_max_bytes_per_session(cap)
        .connect()
        .await
        .expect("connect");
    let app = serve_with(store, |l| {
        l.keep_alive(resumable_sse::KeepAlive::disabled())
    })
    .await;
    let path = "/gated?session_id=behind";
    let key = scoped("/gated", "behind");
    let run = async {
        app.inner.gate("behind");
        let mut first = get(app.addr, path, None).await;
        assert_eq!(first.status, 200);
        let data = |i: usize| format!("{i:08}{}", "x".repeat(DATA - 8));
        app.inner.send("behind", data(0));
        let mut got = first.take(1).await;
        // Then the client reads nothing while the rest of the stream is produced.
        for i in 1..EVENTS {
            app.inner.send("behind", data(i));
        }
        app.inner.end("behind");
        let info = session_finished(&app.store, &key).await;
        assert_eq!(info.status, Status::Finished(Outcome::Completed));
        assert!(info.first_seq > 1, "the oldest events were trimmed");
        // Then it reads: what the connection already held, then the evicted comment, then the end.
        got.extend(first.collect().await);
        assert!(got.len() < EVENTS - 300, "{} events", got.len());
        for (i, ev) in got.iter().enumerate() {
            assert!(
                ev.data.starts_with(&format!("{i:08}")),
                "a prefix, in order"
            );
        }
        assert_eq!(first.comments, 1, "the evicted comment");
        let last = got.last().unwrap().id.clone().unwrap();
        let again = get(app.addr, path, Some(&last)).await;
        assert_eq!(
            (again.status.as_u16(), again.reason()),
            (410, Some("evicted"))
        );
        // A new client without Last-Event-ID: the session's start is gone.
        let fresh = get(app.addr, path, None).await;
        assert_eq!(
            (fresh.status.as_u16(), fresh.reason()),
            (410, Some("evicted"))
        );
        // What is retained is still served, to the end, to a client positioned in it.
        let info = app.store.lookup(&key).await.unwrap().unwrap();
        let epoch = info.epoch;
        let from = resumable_sse::EventId {
            epoch,
            seq: info.first_seq - 1,
        }
        .to_string();
        let mut tail = get(app.addr, path, Some(&from)).await;
        assert_eq!(tail.status, 200);
        let rest = tail.collect().await;
        assert_eq!(rest.len() as u64, info.last_seq - info.first_seq + 1);
        assert_eq!(info.last_seq, EVENTS as u64);
        assert_eq!(tail.comments, 0);
        eprintln!("prefix of {} events, {} retained", got.len(), rest.len());
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("in time");
}

#[tokio::test]
async fn a_client_on_the_producing_instance_keeps_what_it_needs_past_the_soft_byte_limit() {
    let Some(server) = private_server() else {
        return;
    };
    // The same stream as above, with only the soft limit that small: the connected first
    // client, which reads nothing while it is produced, still gets every event.
    const DATA: usize = 8 << 10;
    const EVENTS: usize = 6_000;
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix())
        .max_bytes_per_session(300 * DATA)
        .connect()
        .await
        .expect("connect");
    let app = serve_with(store, |l| {
        l.keep_alive(resumable_sse::KeepAlive::disabled())
    })
    .await;
    let path = "/gated?session_id=held";
    let run = async {
        app.inner.gate("held");
        let mut first = get(app.addr, path, None).await;
        let data = |i: usize| format!("{i:08}{}", "x".repeat(DATA - 8));
        app.inner.send("held", data(0));
        let mut got = first.take(1).await;
        for i in 1..EVENTS {
            app.inner.send("held", data(i));
        }
        app.inner.end("held");
        let info = session_finished(&app.store, &scoped("/gated", "held")).await;
        assert_eq!(info.status, Status::Finished(Outcome::Completed));
        got.extend(first.collect().await);
        assert_eq!(got.len(), EVENTS);
        for (i, ev) in got.iter().enumerate() {
            assert!(
                ev.data.starts_with(&format!("{i:08}")),
                "every event, in order"
            );
        }
        assert_eq!(first.comments, 0, "no evicted comment");
        // What it had read when the later appends came was not held: the start is gone.
        let fresh = get(app.addr, path, None).await;
        assert_eq!(
            fresh.status.as_u16(),
            410,
            "the start was trimmed once no reader held it"
        );
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the test ends");
}

#[tokio::test]
async fn the_byte_limit_bounds_what_redis_retains_and_keeps_one_larger_event_alone() {
    let Some(server) = private_server() else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix();
    const CAP: usize = 100_000;
    // A chunk of these small events holds at most 64 of them.
    const CHUNK: usize = 64 * FIXED_LEN;
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .max_bytes_per_session(CAP)
        .connect()
        .await
        .expect("connect");
    let mut rc = inspector(&url).await;
    let key = SessionKey::new("capped").unwrap();
    let run = async {
        let epoch = running(&store, &key).await;
        let mut next = 1u64;
        let mut appended = 0;
        while appended < 10 * CAP {
            let n = 37 + next % 50;
            let block = fixed_events(next..=next + n - 1);
            assert_eq!(
                store.append(&key, epoch, &[block]).await.unwrap(),
                Appended::Stored
            );
            next += n;
            appended += n as usize * FIXED_LEN;
            let r = Retained::of(&mut rc, &prefix, "capped").await;
            r.assert_consistent();
            assert_eq!(r.last, next - 1);
            assert!(
                r.bytes as usize <= CAP + CHUNK,
                "{} bytes retained",
                r.bytes
            );
            if appended > CAP {
                // Only what must go is trimmed.
                assert!(r.bytes as usize > CAP - CHUNK, "{} bytes retained", r.bytes);
            }
        }
        let r = Retained::of(&mut rc, &prefix, "capped").await;
        let usage: u64 = ::redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("{prefix}:{{capped}}:events"))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut rc)
            .await
            .unwrap();
        assert!(
            usage < 2 * CAP as u64,
            "{usage} bytes of Redis memory for {} bytes of events in {} chunks",
            r.bytes,
            r.chunks.len()
        );
        // Readers start at the oldest retained event.
        let page = store.read(&key, epoch, 0, 10).await.unwrap().unwrap();
        assert_eq!(page.first_seq, r.first);
        assert_eq!(
            fixed_seqs(&page),
            (r.first..r.first + 10).collect::<Vec<_>>()
        );
        let info = store.lookup(&key).await.unwrap().unwrap();
        assert_eq!((info.first_seq, info.last_seq), (r.first, next - 1));

        // One event larger than the limit: kept, alone.
        let big_seq = next;
        let mut big = EventBlockBuilder::new(big_seq);
        let data = "y".repeat(3 * CAP);
        big.push_with(|buf| buf.extend_from_slice(format!("data: {data}\n\n").as_bytes()));
        let big = big.finish().unwrap();
        store
            .append(&key, epoch, std::slice::from_ref(&big))
            .await
            .unwrap();
        let r = Retained::of(&mut rc, &prefix, "capped").await;
        r.assert_consistent();
        assert_eq!(r.chunks, [(big_seq, big.bytes().len())]);
        let page = store.read(&key, epoch, 0, 10).await.unwrap().unwrap();
        assert_eq!(page.blocks, std::slice::from_ref(&big));
        // The next event pushes it out.
        store
            .append(&key, epoch, &[fixed_events(big_seq + 1..=big_seq + 1)])
            .await
            .unwrap();
        let r = Retained::of(&mut rc, &prefix, "capped").await;
        r.assert_consistent();
        assert_eq!(r.chunks, [(big_seq + 1, FIXED_LEN)]);

        // The event count limit, when set, works alongside.
        let counted = RedisStore::builder(&url)
            .prefix(&prefix)
            .max_events_per_session(100)
            .connect()
            .await
            .expect("connect");
        let key = SessionKey::new("counted").unwrap();
        let epoch = running(&counted, &key).await;
        for from in (1..=1000u64).step_by(30) {
            counted
                .append(&key, epoch, &[fixed_events(from..=from + 29)])
                .await
                .unwrap();
            let r = Retained::of(&mut rc, &prefix, "counted").await;
            r.assert_consistent();
            let kept = r.last - r.first + 1;
            assert!(
                (kept >= 100 || r.first == 1) && kept < 100 + 64,
                "{kept} events kept"
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("in time");
}

#[tokio::test]
async fn a_shared_tail_overtaken_by_trimming_restarts_so_that_no_subscriber_stalls() {
    let Some(server) = private_server() else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix();
    // The producing instance keeps about 1,500 events; the subscribers are on another instance,
    // whose shared tail of the session follows it through notifications.
    let producer = RedisStore::builder(&url)
        .prefix(&prefix)
        .max_bytes_per_session(1_500 * FIXED_LEN)
        .connect()
        .await
        .expect("connect");
    let subscribers = serve_with(
        RedisStore::builder(&url)
            .prefix(&prefix)
            .connect()
            .await
            .expect("connect"),
        |l| l.keep_alive(resumable_sse::KeepAlive::disabled()),
    )
    .await;
    let mut rc = inspector(&url).await;
    let key = scoped("/gated", "overtaken");
    let path = "/gated?session_id=overtaken";
    const SUBSCRIBERS: usize = 50;
    let run = async {
        let epoch = running(&producer, &key).await;
        producer
            .append(&key, epoch, &[fixed_events(1..=10)])
            .await
            .unwrap();
        // A subscriber that started early: the tail of its instance holds events 1 to 10.
        let mut early = get(subscribers.addr, path, None).await;
        assert_eq!(early.status, 200);
        assert_eq!(early.take(10).await.len(), 10);
        // One append of 5,000 events: the limit trims the events that follow the tail before
        // the tail is refreshed, and the page it then fetches is full.
        producer
            .append(&key, epoch, &[fixed_events(11..=5_010)])
            .await
            .unwrap();
        let info = producer.lookup(&key).await.unwrap().unwrap();
        assert!(info.first_seq > 11 + 1_024, "{}", info.first_seq);
        // The early subscriber's next events are gone: it is told so, and its stream ends.
        assert_eq!(early.next().await, None);
        assert_eq!(early.comments, 1, "the evicted comment");
        // Subscribers joining near the head are served, and keep being served from the shared
        // tail: Redis work per event does not grow with their number.
        let id = |seq| resumable_sse::EventId { epoch, seq }.to_string();
        let mut late = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let mut conn = get(subscribers.addr, path, Some(&id(5_000))).await;
            assert_eq!(conn.status, 200);
            let got: Vec<String> = conn.take(10).await.into_iter().map(|e| e.data).collect();
            let want: Vec<String> = (5_001..=5_010u64).map(|s| format!("{s:010}")).collect();
            assert_eq!(got, want);
            late.push(conn);
        }
        let before = script_calls(&mut rc).await;
        for seq in 5_011..=5_030u64 {
            producer
                .append(&key, epoch, &[fixed_events(seq..=seq)])
                .await
                .unwrap();
            for conn in &mut late {
                assert_eq!(conn.take(1).await[0].data, format!("{seq:010}"));
            }
        }
        let used = script_calls(&mut rc).await - before;
        assert!(
            used < 20 * 5,
            "{used} script calls for 20 events to {SUBSCRIBERS} subscribers: the tail is not shared"
        );
        // No read spins: idle, the instance costs Redis a few calls a second. (Fixed waits: the
        // scenario is an idle second, after the last reads settle.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = script_calls(&mut rc).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = script_calls(&mut rc).await - before;
        assert!(idle < 20, "{idle} script calls in an idle second");
        eprintln!("{used} script calls for 20 events to {SUBSCRIBERS} subscribers, {idle} idle");
        producer
            .finish(&key, epoch, Outcome::Completed)
            .await
            .unwrap();
        for conn in &mut late {
            assert_eq!(conn.next().await, None);
            assert_eq!(conn.comments, 0);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("no subscriber stalls");
}

#[tokio::test]
async fn reads_of_a_finished_session_end_at_every_multiple_of_the_page_tail_and_chunk_sizes() {
    let Some(server) = private_server() else {
        return;
    };
    let url = server.url();
    let prefix = unique_prefix();
    let run = async {
        for n in [64u64, 1_024, 4_096, 4_160, 8_192] {
            let store = RedisStore::builder(&url)
                .prefix(&prefix)
                .connect()
                .await
                .expect("connect");
            let key = SessionKey::new(format!("sized-{n}")).unwrap();
            let epoch = running(&store, &key).await;
            for from in (1..=n).step_by(1_000) {
                store
                    .append(&key, epoch, &[fixed_events(from..=(from + 999).min(n))])
                    .await
                    .unwrap();
            }
            store.finish(&key, epoch, Outcome::Completed).await.unwrap();
            // A local subscriber, so that reads go through the instance's shared tail.
            let _sub = store.subscribe(&key, epoch).await.unwrap();
            // Every multiple of 64 (so of 1,024 and 4,096 too), and the one before the end; from
            // the end backwards first (the tail starts near the end), then forwards.
            let mut starts: Vec<u64> = (0..=n).step_by(64).chain([n - 1]).collect();
            starts.sort_unstable();
            for &start in starts.iter().rev().chain(&starts) {
                let mut after = start;
                let mut reads = 0;
                loop {
                    reads += 1;
                    assert!(
                        reads < 50,
                        "n {n}, from {start}: no end after {reads} reads"
                    );
                    let page = store
                        .read(&key, epoch, after, 1_024)
                        .await
                        .unwrap()
                        .unwrap();
                    let seqs = fixed_seqs(&page);
                    assert_eq!(
                        seqs,
                        (after + 1..after + 1 + seqs.len() as u64).collect::<Vec<_>>()
                    );
                    if page.reaches_end(after) {
                        after = seqs.last().copied().unwrap_or(after);
                        break;
                    }
                    // Not the end: the page must say more follows, or the reader would wait
                    // for a change that will never come.
                    let upto = seqs.last().copied().unwrap_or(after);
                    assert!(
                        upto < page.last_seq,
                        "n {n}, from {start}: a page up to {upto} is neither the end nor says \
                         more follows"
                    );
                    after = upto;
                }
                assert_eq!(after, n);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("in time");
}

/// A TCP proxy to a Redis server that, once armed, cuts the connection carrying any command
/// that names the outcome `completed` (the producer's FINISH), for `window` from the first one:
/// the producer's final write fails, over and over, while its other commands get through.
struct FinishCutter {
    addr: std::net::SocketAddr,
    armed: std::sync::atomic::AtomicBool,
    window: Duration,
    /// When each FINISH was cut.
    cuts: std::sync::Mutex<Vec<std::time::Instant>>,
}

impl FinishCutter {
    async fn start(upstream: u16, window: Duration) -> std::sync::Arc<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let this = std::sync::Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            armed: Default::default(),
            window,
            cuts: Default::default(),
        });
        let state = this.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                });
                let state = state.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    // The end of the previous read, for a name split between two reads.
                    let mut carry: Vec<u8> = Vec::new();
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        carry.extend_from_slice(&buf[..n]);
                        if state.cut(&carry) {
                            // Neither this command nor the connection goes any further.
                            down.abort();
                            return;
                        }
                        carry.drain(..carry.len().saturating_sub(16));
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        this
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the bytes carry a FINISH to cut now.
    fn cut(&self, bytes: &[u8]) -> bool {
        const NAME: &[u8] = b"\r\ncompleted\r\n";
        if !self.armed.load(std::sync::atomic::Ordering::SeqCst)
            || !bytes.windows(NAME.len()).any(|w| w == NAME)
        {
            return false;
        }
        let mut cuts = self.cuts.lock().unwrap();
        if cuts
            .first()
            .is_some_and(|first| first.elapsed() > self.window)
        {
            return false;
        }
        cuts.push(std::time::Instant::now());
        true
    }
}

#[tokio::test]
async fn a_producer_keeps_its_lease_while_it_retries_recording_the_end() {
    let Some(server) = private_server() else {
        return;
    };
    let prefix = unique_prefix();
    let lease = Duration::from_millis(900);
    // The producer's connections go through a proxy that cuts its FINISH for four leases.
    let cutter = FinishCutter::start(server.port, lease * 4).await;
    let producing = serve_with(store_on(&cutter.url(), &prefix, lease).await, |l| l).await;
    // A follower on another instance, straight to Redis.
    let following = serve_with(store_on(&server.url(), &prefix, lease).await, |l| l).await;
    let path = "/gated?session_id=ending";
    let run = async {
        producing.inner.gate("ending");
        let mut starter = get(producing.addr, path, None).await;
        producing.inner.send("ending", "a");
        let first = starter.take(1).await;
        drop(starter);
        let mut follower = get(following.addr, path, first[0].id.as_deref()).await;
        assert_eq!(follower.status, 200);
        producing.inner.send("ending", "b");
        let got = follower.take(1).await;
        assert_eq!(datas(&got), ["b"]);
        // The stream ends; recording it fails for four leases, then succeeds.
        cutter.arm();
        producing.inner.end("ending");
        assert_eq!(follower.next().await, None, "the follower ends");
        let key = scoped("/gated", "ending");
        let info = following.store.lookup(&key).await.unwrap().unwrap();
        assert_eq!(info.status, Status::Finished(Outcome::Completed));
        let again = get(following.addr, path, got[0].id.as_deref()).await;
        assert_eq!(
            (again.status.as_u16(), again.reason()),
            (204, Some("completed"))
        );
        // The fault did last: recording the end failed for longer than the lease.
        let cuts = cutter.cuts.lock().unwrap().clone();
        assert!(cuts.len() >= 2, "{} FINISH cut", cuts.len());
        let failing = cuts[cuts.len() - 1] - cuts[0];
        assert!(
            failing > lease,
            "the end failed to be recorded for {failing:?} only"
        );
        eprintln!("{} FINISH cut over {failing:?}", cuts.len());
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("in time");
}
