//! A complete store written outside the crate, against the public `Store` and `Subscription`
//! traits only, serving the layer over real TCP; and the behaviour suite run on it as a store's
//! own tests run it, with the three lines below.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use resumable_sse::store::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError,
    Subscription,
};
use resumable_sse::{Epoch, EventId, Outcome, SessionKey};
use tokio::sync::watch;

resumable_sse::testing::store_suite!(|opts| async move {
    MapStore::new(opts.retention, opts.max_events_per_session)
});

/// Sessions in a map behind one mutex; a `watch` channel per session says "something changed",
/// another one says "cancelled". The only per-session limit is a count of events, when set.
#[derive(Clone)]
struct MapStore {
    sessions: Arc<Mutex<HashMap<SessionKey, Entry>>>,
    retention: Duration,
    max_events: Option<usize>,
}

struct Entry {
    epoch: Epoch,
    status: Status,
    head: Option<Arc<ResponseHead>>,
    /// The events kept, in order.
    blocks: VecDeque<EventBlock>,
    last_seq: u64,
    expires_at: Instant,
    changed: watch::Sender<()>,
    cancelled: watch::Sender<bool>,
}

impl Entry {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            epoch: self.epoch,
            status: self.status,
            head: self.head.clone(),
            first_seq: self
                .blocks
                .front()
                .map_or(self.last_seq + 1, EventBlock::first_seq),
            last_seq: self.last_seq,
        }
    }

    fn finish(&mut self, outcome: Outcome, retention: Duration) {
        self.status = Status::Finished(outcome);
        self.expires_at = Instant::now() + retention;
        self.changed.send_replace(());
    }
}

/// Wakes `changed()` on every change; returns at once when the session is gone.
struct MapSubscription {
    rx: Option<watch::Receiver<()>>,
}

impl Subscription for MapSubscription {
    async fn changed(&mut self) {
        let gone = match &mut self.rx {
            Some(rx) => rx.changed().await.is_err(),
            None => return,
        };
        if gone {
            self.rx = None;
        }
    }
}

impl MapStore {
    /// Keeps finished sessions for `retention` (a minute by default) and at most `max_events`
    /// events per session (no limit by default).
    fn new(retention: Option<Duration>, max_events: Option<usize>) -> Self {
        Self {
            sessions: Arc::default(),
            retention: retention.unwrap_or(Duration::from_secs(60)),
            max_events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SessionKey, Entry>> {
        self.sessions.lock().unwrap()
    }

    /// Runs `f` on the live session under `key` with `epoch` (any epoch when `None`), dropping
    /// it first if it expired.
    fn with<T>(
        &self,
        key: &SessionKey,
        epoch: Option<Epoch>,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Option<T> {
        let mut sessions = self.lock();
        if sessions
            .get(key)
            .is_some_and(|e| e.expires_at <= Instant::now())
        {
            sessions.remove(key);
        }
        let entry = sessions.get_mut(key)?;
        if epoch.is_some_and(|epoch| epoch != entry.epoch) {
            return None;
        }
        Some(f(entry))
    }

    /// The session of `id` on `/gated`.
    fn info(&self, id: &str) -> Option<SessionInfo> {
        self.with(&scoped("/gated", id), None, |e| e.info())
    }
}

impl Store for MapStore {
    type Subscription = MapSubscription;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        // Check and insert under one lock: exactly one concurrent caller claims.
        let mut sessions = self.lock();
        match sessions.get(key) {
            Some(e) if e.expires_at > Instant::now() => return Ok(Claim::Exists(e.info())),
            _ => {}
        }
        let epoch = Epoch::random();
        sessions.insert(
            key.clone(),
            Entry {
                epoch,
                status: Status::Starting,
                head: None,
                blocks: VecDeque::new(),
                last_seq: 0,
                expires_at: Instant::now() + lifetime,
                changed: watch::Sender::new(()),
                cancelled: watch::Sender::new(false),
            },
        );
        Ok(Claim::Claimed(epoch))
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        let started = self.with(key, Some(epoch), |e| match e.status {
            Status::Starting => {
                e.status = Status::Running;
                e.head = Some(Arc::new(head));
                e.changed.send_replace(());
                true
            }
            Status::Running => true,
            Status::Finished(_) => false,
        });
        Ok(started == Some(true))
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let mut sessions = self.lock();
        if sessions.get(key).is_some_and(|e| e.epoch == epoch) {
            // Dropping the entry drops its senders, which wakes every subscriber.
            sessions.remove(key);
        }
        Ok(())
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        let appended = self.with(key, Some(epoch), |e| {
            if e.status != Status::Running {
                return Appended::Stopped;
            }
            for block in blocks {
                // A retried append may repeat stored events: skip them.
                let Some(block) = block.slice(e.last_seq + 1..) else {
                    continue;
                };
                assert_eq!(
                    block.first_seq(),
                    e.last_seq + 1,
                    "consecutive sequence numbers"
                );
                e.last_seq = block.last_seq();
                e.blocks.push_back(block);
            }
            if let Some(max) = self.max_events {
                let kept = e.last_seq + 1 - e.info().first_seq;
                EventBlock::drop_oldest(&mut e.blocks, (kept as usize).saturating_sub(max));
            }
            e.changed.send_replace(());
            Appended::Stored
        });
        Ok(appended.unwrap_or(Appended::Stopped))
    }

    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        self.with(key, Some(epoch), |e| {
            if !e.status.is_finished() {
                e.finish(outcome, self.retention);
            }
        });
        Ok(())
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        Ok(self.with(key, None, |e| e.info()))
    }

    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        Ok(self.with(key, Some(epoch), |e| ReadBatch {
            blocks: EventBlock::page(after, max, &e.blocks),
            status: e.status,
            first_seq: e.info().first_seq,
            last_seq: e.last_seq,
        }))
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> Result<MapSubscription, StoreError> {
        Ok(MapSubscription {
            rx: self.with(key, Some(epoch), |e| e.changed.subscribe()),
        })
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let Some(mut rx) = self.with(key, Some(epoch), |e| e.cancelled.subscribe()) else {
            return Ok(());
        };
        // The lock is not held here; a dropped session ends the wait too.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
        Ok(())
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        Ok(self
            .with(key, None, |e| {
                if e.status.is_finished() {
                    return false;
                }
                e.finish(Outcome::Cancelled, self.retention);
                e.cancelled.send_replace(true);
                true
            })
            .unwrap_or(false))
    }
}

async fn serve_map_store() -> App<MapStore> {
    serve_with(MapStore::new(None, None), |layer| {
        layer.keep_alive(resumable_sse::KeepAlive::disabled())
    })
    .await
}

fn seq(ev: &Ev) -> u64 {
    EventId::parse(ev.id.as_deref().unwrap().as_bytes())
        .expect("an id of the layer")
        .seq
}

#[tokio::test]
async fn a_custom_store_serves_a_session_and_resumes_it_exactly_once() {
    let app = serve_map_store().await;
    app.inner.gate("chat");
    let path = "/gated?session_id=chat";
    let mut conn = get(app.addr, path, None).await;
    assert_eq!(conn.status, 200);
    assert_eq!(conn.headers["content-type"], "text/event-stream");
    app.inner.send("chat", "a");
    app.inner.send("chat", "b");
    let mut got = conn.take(2).await;
    drop(conn);

    // Generated while nobody is connected.
    app.inner.send("chat", "c");
    app.inner.send("chat", "d");
    eventually("four events stored", || {
        app.store.info("chat").is_some_and(|i| i.last_seq == 4)
    })
    .await;

    let mut resumed = get(app.addr, path, got.last().unwrap().id.as_deref()).await;
    assert_eq!(resumed.status, 200);
    assert_eq!(resumed.headers["content-type"], "text/event-stream");
    got.extend(resumed.take(2).await);
    app.inner.send("chat", "e");
    app.inner.end("chat");
    got.extend(resumed.collect().await);
    assert_eq!(datas(&got), ["a", "b", "c", "d", "e"]);
    assert_eq!(got.iter().map(seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(
        app.store.info("chat").unwrap().status,
        Status::Finished(Outcome::Completed)
    );

    let done = get(app.addr, path, got.last().unwrap().id.as_deref()).await;
    assert_eq!(done.status, 204);
    assert_eq!(done.reason(), Some("completed"));
    // A new client replays the whole session from the custom store.
    let replay = get(app.addr, path, None).await.collect().await;
    assert_eq!(replay, got);
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_on_a_custom_store_call_the_inner_service_once() {
    let app = serve_map_store().await;
    let path = "/tokens?session_id=crowd&n=50&interval_ms=1";
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = app.addr;
            tokio::spawn(async move { get(addr, path, None).await.collect().await })
        })
        .collect();
    let mut results = Vec::new();
    for client in clients {
        results.push(client.await.unwrap());
    }
    assert_eq!(datas(&results[0]), expected_tokens(0..50));
    for r in &results {
        assert_eq!(r, &results[0]);
    }
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn cancelling_through_a_custom_store_ends_the_stream_and_the_generation() {
    let app = serve_map_store().await;
    app.inner.gate("stop");
    let path = "/gated?session_id=stop";
    let mut conn = get(app.addr, path, None).await;
    app.inner.send("stop", "a");
    let got = conn.take(1).await;

    let key = scoped("/gated", "stop");
    assert!(app.store.cancel(&key).await.unwrap());
    // The connected client gets the end, and the generator is dropped.
    assert_eq!(conn.next().await, None);
    eventually("the generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    assert_eq!(
        app.store.info("stop").unwrap().status,
        Status::Finished(Outcome::Cancelled)
    );

    let end = get(app.addr, path, got[0].id.as_deref()).await;
    assert_eq!(end.status, 204);
    assert_eq!(end.reason(), Some("cancelled"));
    assert!(!app.store.cancel(&key).await.unwrap(), "already ended");
    assert!(!app
        .store
        .cancel(&SessionKey::new("nobody").unwrap())
        .await
        .unwrap());
    assert_eq!(app.inner.calls(), 1);
}
