//! `RedisStore`'s `max_sessions`: one count in Redis, shared by every instance, with the
//! `MemoryStore`'s default and answers (`503 session-limit` for a new session, existing ones
//! unaffected), on a single Redis and on a Redis Cluster.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis::{shared_url, unique_prefix, RedisCluster};
use common::*;
use futures_util::future::join_all;
use resumable_sse::limits::DEFAULT_MAX_SESSIONS;
use resumable_sse::store::{Claim, ResponseHead, Store, StoreErrorKind};
use resumable_sse::{Outcome, RedisStore, RedisStoreBuilder, SessionKey};

const LIFETIME: Duration = Duration::from_secs(600);

/// Two instances on the same Redis and prefix.
async fn instances(builder: impl Fn() -> RedisStoreBuilder) -> (RedisStore, RedisStore) {
    let a = builder().connect().await.expect("connect to redis");
    let b = builder().connect().await.expect("connect to redis");
    (a, b)
}

fn key(i: usize) -> SessionKey {
    scoped("/tokens", &format!("s{i}"))
}

/// Claims `keys` concurrently, alternating between the two instances: what each got.
async fn claim_all(
    (a, b): &(RedisStore, RedisStore),
    keys: impl IntoIterator<Item = usize>,
) -> Vec<(usize, Result<Claim, StoreErrorKind>)> {
    let keys: Vec<usize> = keys.into_iter().collect();
    let mut out = Vec::with_capacity(keys.len());
    // In bounded batches: every claim of a batch is in flight at once, on both instances.
    for batch in keys.chunks(256) {
        let claims = batch.iter().map(|&i| async move {
            let store = if i % 2 == 0 { a } else { b };
            (
                i,
                store.claim(&key(i), LIFETIME).await.map_err(|e| e.kind()),
            )
        });
        let done = tokio::time::timeout(TIMEOUT, join_all(claims)).await;
        out.extend(done.expect("a batch of claims in time"));
    }
    out
}

fn claimed(results: &[(usize, Result<Claim, StoreErrorKind>)]) -> usize {
    results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(Claim::Claimed(_))))
        .count()
}

/// The members of the count, as Redis holds them.
async fn counted(url: &str, prefix: &str) -> usize {
    let mut conn = ::redis::Client::open(url)
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");
    ::redis::cmd("ZCARD")
        .arg(format!("{prefix}:sessions"))
        .query_async(&mut conn)
        .await
        .expect("ZCARD")
}

#[tokio::test]
async fn the_default_redis_store_takes_max_sessions_across_instances_and_refuses_the_next_ones_only(
) {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let stores = instances(|| RedisStore::builder(&url).prefix(&prefix)).await;
    let max = DEFAULT_MAX_SESSIONS;
    // Up to the limit (its last two at max - 1 and max), every claim makes a session, whichever
    // instance takes it.
    let first = claim_all(&stores, 0..max).await;
    assert_eq!(claimed(&first), max);
    assert_eq!(counted(&url, &prefix).await, max);
    // Beyond it (max + 1 up to 2 max), every new key is refused, and nothing is added.
    let beyond = claim_all(&stores, max..2 * max).await;
    for (i, r) in &beyond {
        assert_eq!(
            r.as_ref().err(),
            Some(&StoreErrorKind::SessionLimit),
            "session {}",
            i + 1
        );
    }
    assert_eq!(counted(&url, &prefix).await, max);
    // An existing session is found, not refused.
    let again = claim_all(&stores, [0, 1, max - 1]).await;
    for (i, r) in &again {
        assert!(matches!(r, Ok(Claim::Exists(_))), "session {i}: {r:?}");
    }
    // Over HTTP: a new key gets 503, an existing one still finds its session.
    let app = serve_with(stores.0.clone(), |l| l).await;
    let refused = get(app.addr, "/tokens?session_id=new&n=1", None).await;
    assert_eq!(
        (refused.status.as_u16(), refused.reason()),
        (503, Some("session-limit"))
    );
    assert!(app.store.cancel(&key(0)).await.expect("cancel"));
    let cancelled = get(app.addr, "/tokens?session_id=s0&n=1", None).await;
    assert_eq!(
        (cancelled.status.as_u16(), cancelled.reason()),
        (204, Some("cancelled"))
    );
    assert_eq!(app.inner.calls(), 0);
}

#[tokio::test]
async fn no_session_is_admitted_with_max_sessions_zero_and_one_with_one() {
    let Some(url) = shared_url() else { return };
    for max in [0, 1] {
        let prefix = unique_prefix();
        let stores =
            instances(|| RedisStore::builder(&url).prefix(&prefix).max_sessions(max)).await;
        let got = claim_all(&stores, 0..2).await;
        assert_eq!(claimed(&got), max, "max_sessions({max})");
        assert_eq!(counted(&url, &prefix).await, max);
    }
}

#[tokio::test]
async fn concurrent_claims_on_two_instances_never_exceed_max_sessions() {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let max = 100;
    let stores = instances(|| RedisStore::builder(&url).prefix(&prefix).max_sessions(max)).await;
    let got = claim_all(&stores, 0..4 * max).await;
    assert_eq!(claimed(&got), max);
    let refused = got
        .iter()
        .filter(|(_, r)| r.as_ref().err() == Some(&StoreErrorKind::SessionLimit))
        .count();
    assert_eq!(refused, 3 * max);
}

#[tokio::test]
async fn a_released_session_stops_counting_at_once_and_a_finished_one_when_its_retention_ends() {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let retention = Duration::from_millis(500);
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .retention(retention)
        .max_sessions(2)
        .connect()
        .await
        .expect("connect");
    let epoch = |c: Result<Claim, _>| match c {
        Ok(Claim::Claimed(e)) => e,
        other => panic!("a claim: {other:?}"),
    };
    let a = epoch(store.claim(&key(1), LIFETIME).await);
    let b = epoch(store.claim(&key(2), LIFETIME).await);
    let full = store.claim(&key(3), LIFETIME).await.expect_err("full");
    assert_eq!(full.kind(), StoreErrorKind::SessionLimit);
    // Released (its response was not an event stream): the room is back at once.
    store.release(&key(1), a).await.expect("release");
    let _c = epoch(store.claim(&key(3), LIFETIME).await);
    // Finished: it still counts while it is retained...
    assert!(store
        .start(
            &key(2),
            b,
            ResponseHead {
                status: http::StatusCode::OK,
                headers: http::HeaderMap::new(),
            }
        )
        .await
        .expect("start"));
    store
        .finish(&key(2), b, Outcome::Completed)
        .await
        .expect("finish");
    let full = store.claim(&key(4), LIFETIME).await.expect_err("full");
    assert_eq!(full.kind(), StoreErrorKind::SessionLimit);
    // ...and no longer once its retention is over.
    eventually_async("the finished session stops counting", || async {
        store.claim(&key(4), LIFETIME).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_session_whose_producer_died_stops_counting_when_its_keys_can_no_longer_live() {
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .retention(Duration::from_millis(300))
        .lease(Duration::from_millis(100))
        .max_sessions(1)
        .connect()
        .await
        .expect("connect");
    // A claim with a short lifetime whose producer never comes back: nothing tells the count
    // it ended. It counts for its lifetime, the lease and the retention, then no more.
    let lifetime = Duration::from_millis(300);
    assert!(matches!(
        store.claim(&key(1), lifetime).await,
        Ok(Claim::Claimed(_))
    ));
    let full = store.claim(&key(2), LIFETIME).await.expect_err("full");
    assert_eq!(full.kind(), StoreErrorKind::SessionLimit);
    drop(store);
    let other = RedisStore::builder(&url)
        .prefix(&prefix)
        .max_sessions(1)
        .connect()
        .await
        .expect("connect");
    eventually_async("the dead session stops counting", || async {
        other.claim(&key(2), LIFETIME).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn max_sessions_counts_the_sessions_of_every_cluster_slot_together() {
    let Some(urls) = RedisCluster::shared_urls() else {
        return;
    };
    let prefix = unique_prefix();
    let max = 20;
    let stores = instances(|| {
        RedisStore::cluster_builder(urls.clone())
            .prefix(&prefix)
            .max_sessions(max)
    })
    .await;
    let got = claim_all(&stores, 0..3 * max).await;
    assert_eq!(claimed(&got), max);
    let app = serve_with(stores.1.clone(), |l| l).await;
    let refused = get(app.addr, "/tokens?session_id=new&n=1", None).await;
    assert_eq!(
        (refused.status.as_u16(), refused.reason()),
        (503, Some("session-limit"))
    );
}
