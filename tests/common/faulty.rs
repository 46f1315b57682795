//! A store that fails on purpose, around a real one: for the tests of what the layer does when
//! its store is slow, fails, or loses a reply. The store under test stays real; only its answers
//! are delayed, dropped or replaced by an error.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use resumable_sse::store::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Store, StoreError,
};
use resumable_sse::{Epoch, MemoryStore, Outcome, SessionKey};
use tokio::sync::Semaphore;

#[derive(Default)]
struct Fault {
    calls: usize,
    /// The next calls fail without reaching the store.
    fail_next: usize,
    /// The next calls reach the store, then report a failure.
    fail_reply: usize,
    /// The next call cancels the session first.
    cancel_before: bool,
    /// Calls wait here after the store answered, until released.
    hold: Option<Arc<Semaphore>>,
    /// Calls wait this long after the store answered.
    delay: Duration,
}

/// A real store behind a wrapper that injects faults per method: the next calls fail without
/// reaching the store, or reach it and then report a failure (a lost reply), or are held (until
/// released, or for a while) after the store answered, or find their session cancelled first.
#[derive(Clone, Default)]
pub struct FaultyStore<S = MemoryStore> {
    pub inner: S,
    faults: Arc<Mutex<HashMap<&'static str, Fault>>>,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }

    fn with<T>(&self, method: &'static str, f: impl FnOnce(&mut Fault) -> T) -> T {
        f(self.faults.lock().unwrap().entry(method).or_default())
    }

    /// The calls of `method` so far.
    pub fn calls(&self, method: &'static str) -> usize {
        self.with(method, |f| f.calls)
    }

    /// The calls of every method so far.
    pub fn total_calls(&self) -> usize {
        self.faults.lock().unwrap().values().map(|f| f.calls).sum()
    }

    pub fn fail_next(&self, method: &'static str, n: usize) {
        self.with(method, |f| f.fail_next = n);
    }

    pub fn fail_reply(&self, method: &'static str, n: usize) {
        self.with(method, |f| f.fail_reply = n);
    }

    pub fn cancel_before(&self, method: &'static str) {
        self.with(method, |f| f.cancel_before = true);
    }

    pub fn hold(&self, method: &'static str) {
        self.with(method, |f| f.hold = Some(Arc::new(Semaphore::new(0))));
    }

    pub fn release(&self, method: &'static str) {
        if let Some(gate) = self.with(method, |f| f.hold.take()) {
            gate.add_permits(1 << 20);
        }
    }

    /// Calls of `method` wait `delay` after the store answered.
    pub fn delay(&self, method: &'static str, delay: Duration) {
        self.with(method, |f| f.delay = delay);
    }

    /// Runs `real` (a call of the real store) with the faults set for `method`.
    async fn around<T>(
        &self,
        method: &'static str,
        key: &SessionKey,
        real: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let (fail, cancel) = self.with(method, |f| {
            f.calls += 1;
            let fail = f.fail_next > 0;
            f.fail_next = f.fail_next.saturating_sub(1);
            (fail, std::mem::take(&mut f.cancel_before))
        });
        if fail {
            return Err(StoreError::unavailable(format!(
                "injected: {method} failed"
            )));
        }
        if cancel {
            assert!(self.inner.cancel(key).await.unwrap(), "a session to cancel");
        }
        let result = real.await;
        let (gate, delay, fail_reply) = self.with(method, |f| {
            let fail = f.fail_reply > 0;
            f.fail_reply = f.fail_reply.saturating_sub(1);
            (f.hold.clone(), f.delay, fail)
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(gate) = gate {
            drop(gate.acquire().await.unwrap());
        }
        if fail_reply {
            return Err(StoreError::unavailable(format!(
                "injected: the reply of {method} was lost"
            )));
        }
        result
    }
}

impl<S: Store> Store for FaultyStore<S> {
    type Subscription = S::Subscription;
    // Transparent: read as the store it wraps is read.
    const SHARED_TAIL: bool = S::SHARED_TAIL;
    const MAX_EVENT_BYTES: usize = S::MAX_EVENT_BYTES;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        self.around("claim", key, self.inner.claim(key, lifetime))
            .await
    }

    async fn claim_replacing(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Epoch,
    ) -> Result<Claim, StoreError> {
        self.around(
            "claim",
            key,
            self.inner.claim_replacing(key, lifetime, finished),
        )
        .await
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        self.around("start", key, self.inner.start(key, epoch, head))
            .await
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.around("release", key, self.inner.release(key, epoch))
            .await
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        self.around("append", key, self.inner.append(key, epoch, blocks))
            .await
    }

    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        self.around("finish", key, self.inner.finish(key, epoch, outcome))
            .await
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        self.around("lookup", key, self.inner.lookup(key)).await
    }

    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        self.around("read", key, self.inner.read(key, epoch, after, max))
            .await
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> Result<S::Subscription, StoreError> {
        self.around("subscribe", key, self.inner.subscribe(key, epoch))
            .await
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.around("cancelled", key, self.inner.cancelled(key, epoch))
            .await
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.around("cancel", key, self.inner.cancel(key)).await
    }
}
