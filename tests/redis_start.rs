//! The start of a session on Redis, racing the client and the network: a client that goes away
//! while Redis starts the session, a start whose reply is lost, and a start that finds its claim
//! cancelled. The store is the real `RedisStore`; a thin wrapper only delays or drops the reply
//! of `start` after the real call ran, or cancels the session just before it.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::*;
use common::*;
use resumable_sse::store::redis::RedisSubscription;
use resumable_sse::store::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError,
};
use resumable_sse::{Epoch, EventId, Outcome, RedisStore, SessionKey};

/// The lease of these tests: short, so that a session whose producer was lost is seen failed
/// within a few seconds, and long enough that a loaded machine does not delay a renewal past it.
const LEASE: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct RacyStart {
    inner: RedisStore,
    /// Held after the real start ran, before its reply reaches the layer.
    delay: Duration,
    /// The next start's reply is lost (after the real call ran).
    lose_reply: Arc<AtomicBool>,
    /// The next start finds its session cancelled first.
    cancel_first: Arc<AtomicBool>,
    starts: Arc<AtomicUsize>,
}

impl RacyStart {
    /// On a private `redis-server`; `None` (after a SKIP line, a failure under `CI=true`)
    /// without one.
    async fn new(delay: Duration) -> Option<(Self, RedisServer)> {
        shared_url()?;
        let server = RedisServer::start();
        let inner = RedisStore::builder(server.url())
            .prefix(unique_prefix())
            .lease(LEASE)
            .connect()
            .await
            .expect("connect");
        let store = Self {
            inner,
            delay,
            lose_reply: Arc::default(),
            cancel_first: Arc::default(),
            starts: Arc::default(),
        };
        Some((store, server))
    }
}

impl Store for RacyStart {
    type Subscription = RedisSubscription;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        self.inner.claim(key, lifetime).await
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if self.cancel_first.swap(false, Ordering::SeqCst) {
            self.inner.cancel(key).await?;
        }
        let started = self.inner.start(key, epoch, head).await;
        tokio::time::sleep(self.delay).await;
        if self.lose_reply.swap(false, Ordering::SeqCst) {
            return Err(StoreError::unavailable("reply lost"));
        }
        started
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.inner.release(key, epoch).await
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        self.inner.append(key, epoch, blocks).await
    }

    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        self.inner.finish(key, epoch, outcome).await
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        self.inner.lookup(key).await
    }

    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        self.inner.read(key, epoch, after, max).await
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> Result<RedisSubscription, StoreError> {
        self.inner.subscribe(key, epoch).await
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.inner.cancelled(key, epoch).await
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.inner.cancel(key).await
    }
}

#[tokio::test]
async fn a_client_that_disconnects_while_redis_starts_the_session_loses_no_event() {
    // The start's reply takes longer than the client waits, and longer than the lease.
    let Some((store, _server)) = RacyStart::new(3 * LEASE).await else {
        return;
    };
    let app = serve_with(store.clone(), |l| l).await;
    let path = "/tokens?session_id=gone&n=50&interval_ms=10";
    let addr = app.addr;
    let gone = tokio::time::timeout(Duration::from_millis(200), get(addr, path, None)).await;
    assert!(gone.is_err(), "the client gave up before the head came");
    // The generation was not lost with the client: it runs to its end, well past the lease.
    let info = session_finished(&store, "gone").await;
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    assert_eq!(info.last_seq, 50);
    let evs = get(addr, path, None).await.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..50));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn a_lost_start_reply_on_redis_is_retried_and_the_session_is_produced_once() {
    let Some((store, _server)) = RacyStart::new(Duration::ZERO).await else {
        return;
    };
    store.lose_reply.store(true, Ordering::SeqCst);
    let app = serve_with(store.clone(), |l| l).await;
    let path = "/tokens?session_id=lost&n=20";
    let mut first = get(app.addr, path, None).await;
    assert_eq!(first.status, 200);
    assert_eq!(datas(&first.collect().await), expected_tokens(0..20));
    assert_eq!(store.starts.load(Ordering::SeqCst), 2, "one retry");
    let info = session_finished(&store, "lost").await;
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
    let Some((store, _server)) = RacyStart::new(Duration::ZERO).await else {
        return;
    };
    store.cancel_first.store(true, Ordering::SeqCst);
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
    let info = session_finished(&store, "cut").await;
    assert_eq!(info.status, Status::Finished(Outcome::Cancelled));
    assert_eq!(info.last_seq, 0);
    assert_eq!(app.inner.calls(), 1);
}
