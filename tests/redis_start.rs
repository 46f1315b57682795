//! The start of a session on Redis, racing the client and the network: a client that goes away
//! while Redis starts the session, a start whose reply is lost, and a start that finds its claim
//! cancelled. The store is the real `RedisStore`; `common::faulty::FaultyStore` only delays or
//! drops the reply of `start` after the real call ran, or cancels the session just before it.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::faulty::FaultyStore;
use common::redis::*;
use common::*;
use resumable_sse::store::Status;
use resumable_sse::{EventId, Outcome, RedisStore};

/// The lease of these tests: short, so that a session whose producer was lost is seen failed
/// within a few seconds, and long enough that a loaded machine does not delay a renewal past it.
const LEASE: Duration = Duration::from_secs(1);

/// The real `RedisStore` behind the fault-injecting wrapper, on a private `redis-server`; `None`
/// (after a SKIP line, a failure under `CI=true`) without one.
async fn faulty_redis() -> Option<(FaultyStore<RedisStore>, RedisServer)> {
    shared_url()?;
    let server = RedisServer::start();
    let inner = RedisStore::builder(server.url())
        .prefix(unique_prefix())
        .lease(LEASE)
        .connect()
        .await
        .expect("connect");
    Some((FaultyStore::new(inner), server))
}

#[tokio::test]
async fn a_client_that_disconnects_while_redis_starts_the_session_loses_no_event() {
    // The start's reply takes longer than the client waits, and longer than the lease.
    let Some((store, _server)) = faulty_redis().await else {
        return;
    };
    store.delay("start", 3 * LEASE);
    let app = serve_with(store.clone(), |l| l).await;
    let path = "/tokens?session_id=gone&n=50&interval_ms=10";
    let addr = app.addr;
    let gone = tokio::time::timeout(Duration::from_millis(200), get(addr, path, None)).await;
    assert!(gone.is_err(), "the client gave up before the head came");
    // The generation was not lost with the client: it runs to its end, well past the lease.
    let info = session_finished(&store, &scoped("/tokens", "gone")).await;
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    assert_eq!(info.last_seq, 50);
    let evs = get(addr, path, None).await.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..50));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_lost_start_reply_on_redis_is_retried_and_the_session_is_produced_once() {
    let Some((store, _server)) = faulty_redis().await else {
        return;
    };
    store.fail_reply("start", 1);
    let app = serve_with(store.clone(), |l| l).await;
    let path = "/tokens?session_id=lost&n=20";
    let mut first = get(app.addr, path, None).await;
    assert_eq!(first.status, 200);
    assert_eq!(datas(&first.collect().await), expected_tokens(0..20));
    assert_eq!(store.calls("start"), 2, "one retry");
    let info = session_finished(&store, &scoped("/tokens", "lost")).await;
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    // A reconnect holding the last event is told it is done; the inner service ran once.
    let last = EventId {
        epoch: info.epoch,
        seq: 20,
    }
    .to_string();
    let again = get(app.addr, path, Some(&last)).await;
    assert_eq!(
        (again.status.as_u16(), again.reason()),
        (204, Some("completed"))
    );
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_start_that_finds_its_claim_cancelled_on_redis_drops_the_body_and_produces_nothing() {
    let Some((store, _server)) = faulty_redis().await else {
        return;
    };
    store.cancel_before("start");
    let app = serve_with(store.clone(), |l| l).await;
    app.inner.gate("cut");
    let path = "/gated?session_id=cut";
    let res = get(app.addr, path, None).await;
    // The request is answered as a reconnect to what the key holds: a cancelled session.
    assert_eq!(
        (res.status.as_u16(), res.reason()),
        (204, Some("cancelled"))
    );
    eventually("the generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    // Nothing produces: an event released now is stored nowhere. Waiting for something not to
    // happen takes a fixed wait: two leases, past any renewal or takeover.
    app.inner.send("cut", "late");
    tokio::time::sleep(2 * LEASE).await;
    let info = session_finished(&store, &scoped("/gated", "cut")).await;
    assert_eq!(info.status, Status::Finished(Outcome::Cancelled));
    assert_eq!(info.last_seq, 0);
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_redis_session_still_running_past_the_lifetime_of_its_claim_ends_as_failed() {
    // The store is used directly: the claim's lifetime is the store's backstop for a producer
    // that neither ends nor dies (the layer's own deadline is `max_lifetime`, before it).
    use resumable_sse::store::{Claim, ResponseHead, Store};
    use resumable_sse::SessionKey;
    let Some((store, _server)) = faulty_redis().await else {
        return;
    };
    let key = SessionKey::new("outlived").unwrap();
    let lifetime = 2 * LEASE;
    let Claim::Claimed(epoch) = store.claim(&key, lifetime).await.unwrap() else {
        panic!("a new key is claimed");
    };
    let head = ResponseHead {
        status: http::StatusCode::OK,
        headers: http::HeaderMap::new(),
    };
    assert!(store.start(&key, epoch, head).await.unwrap());
    // Renewed for the lifetime: still running after several leases.
    tokio::time::sleep(lifetime - LEASE / 2).await;
    let info = store
        .lookup(&key)
        .await
        .unwrap()
        .expect("the session exists");
    assert_eq!(info.status, Status::Running, "renewed within its lifetime");
    // Past it, the lease is let go and the session is failed once the lease expires.
    eventually_async("the session outliving its claim is failed", || async {
        let info = store.lookup(&key).await.unwrap();
        info.is_some_and(|i| i.epoch == epoch && i.status == Status::Finished(Outcome::Failed))
    })
    .await;
}
