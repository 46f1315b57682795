//! The fan-out: one store subscription and one store read per change, per session and process,
//! whatever the number of readers in the process.
//!
//! For a networked store ([`Store::SHARED_TAIL`]), the readers of a session in this process do
//! not each subscribe and read. A lone reader (the common case: one client per session) follows
//! with a subscription of its own, as it would without the fan-out, and costs nothing more. The
//! second reader of the session makes an entry for it, which subscribes once and runs a task (the
//! *driver*) that reads every change into a [`Tail`] of the session's newest events
//! ([`TAIL_CAPACITY_EVENTS`](crate::limits::TAIL_CAPACITY_EVENTS) and
//! [`TAIL_CAPACITY_BYTES`](crate::limits::TAIL_CAPACITY_BYTES) at most, and always the newest),
//! then wakes the readers; the lone reader joins that entry at its next read and drops its own
//! subscription. A reader at a position the tail holds is served from it; one older than the
//! tail (a replay) reads the store, page by page, until it reaches the tail. When the store
//! evicted events the tail had not read yet, the tail restarts at the oldest event the store
//! still has: the readers behind it read the store and get its answer (the gap, which ends
//! their response), and the others are served from the tail again. A store that is already in
//! the process (the [`MemoryStore`](crate::MemoryStore)) opts out, and its readers read and
//! subscribe directly.
//!
//! Everything here relies on the store contract only: a read returns the truth at the time of the
//! read, and a subscription misses no change made after it was made.
//!
//! Where each reader is ([`Subscription::reached`]) is kept here, and the entry's one
//! subscription is told the oldest position of them all, before a new reader behind it is served
//! and after every change, so that a store keeps what the readers of this process still need.

mod tail;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use self::tail::{Next, Serve, Tail};
use crate::session::{Epoch, Outcome, SessionKey};
use crate::store::pins::{Pin, Pins};
use crate::store::{EventBlock, ReadBatch, Status, Store, StoreError, Subscription};

/// Events one read of the driver asks for.
const TAIL_PAGE: usize = crate::limits::TAIL_PAGE_EVENTS;

/// The sessions that have readers in this process (one registry per layer).
#[derive(Clone, Debug, Default)]
pub(crate) struct Fanout(Arc<Mutex<Registry>>);

#[derive(Debug, Default)]
struct Registry {
    map: HashMap<(SessionKey, Epoch), Slot>,
    /// The size at which the slots of sessions nobody reads any more are forgotten.
    sweep_at: usize,
}

/// What the registry knows of a session's readers in this process.
#[derive(Debug, Default)]
struct Slot {
    /// The entry shared by its readers, once a second reader came.
    entry: Weak<Entry>,
    /// Its first reader, while it follows on its own subscription.
    solo: Weak<Solo>,
}

impl Slot {
    fn in_use(&self) -> bool {
        self.entry.strong_count() > 0 || self.solo.strong_count() > 0
    }
}

/// The mark of a reader that follows a session on its own subscription: the reader that makes
/// the session's entry later offers it here, and the lone reader joins it at its next read.
#[derive(Debug)]
pub(crate) struct Solo {
    offered: AtomicBool,
    entry: Mutex<Weak<Entry>>,
    _slot: Forget,
}

/// Forgets a session's slot in the registry when the last of its readers goes, so that what the
/// registry keeps returns once sessions are over, whether or not new ones come.
#[derive(Debug)]
struct Forget {
    registry: Weak<Mutex<Registry>>,
    key: SessionKey,
    epoch: Epoch,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut registry = lock(&registry);
        let id = (self.key.clone(), self.epoch);
        // The owner of this guard is being dropped: its weak reference no longer upgrades.
        if registry.map.get(&id).is_some_and(|slot| !slot.in_use()) {
            registry.map.remove(&id);
        }
    }
}

impl Solo {
    /// The entry offered to this reader, if one was and still lives.
    fn take(&self) -> Option<Arc<Entry>> {
        if !self.offered.swap(false, Ordering::AcqRel) {
            return None;
        }
        std::mem::take(&mut *lock(&self.entry)).upgrade()
    }

    fn offer(&self, entry: &Arc<Entry>) {
        *lock(&self.entry) = Arc::downgrade(entry);
        self.offered.store(true, Ordering::Release);
    }
}

/// A session's shared part: its readers hold it; the last one to go stops the driver.
#[derive(Debug)]
struct Entry {
    state: Arc<State>,
    driver: tokio::task::AbortHandle,
    _slot: Forget,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What the driver and the readers of a session share.
#[derive(Debug)]
struct State {
    tail: Mutex<Tail>,
    /// Counts the driver's reads: a reader that found nothing to send waits for the next one.
    moved: watch::Sender<u64>,
    epoch: Epoch,
    /// Where each reader is.
    pins: Pins,
    /// The oldest position the store was told about (0 once nothing can be evicted any more:
    /// the session finished or is gone). Locked while a reader joins and while the driver tells
    /// the store, so that a reader joining behind either is counted or sees the new value.
    told: Mutex<u64>,
    /// Readers behind `told` ask the driver to tell the store, and wait until it did.
    asked: AtomicU64,
    ask: Notify,
    answered: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fanout {
    /// A follower of `key`'s session `epoch` for a reader that has every event up to `after`:
    /// shared with the other readers of this process for a networked store, its own
    /// subscription otherwise (and while it is the session's only reader here).
    pub(crate) async fn follow<S: Store>(
        &self,
        store: &S,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
    ) -> Result<Follower<S>, StoreError> {
        if !S::SHARED_TAIL {
            let mut sub = store.subscribe(key, epoch).await?;
            sub.reached(after);
            return Ok(Follower::Direct(sub, None));
        }
        if let Some(entry) = self.entry(key, epoch) {
            return Ok(Follower::Shared(Shared::join(entry, after).await));
        }
        // Subscribed before the entry exists, and before its first read: no change is missed.
        let mut sub = store.subscribe(key, epoch).await?;
        // Readers upgraded under the registry's lock are dropped after it: the last one to go
        // takes the lock to forget its slot.
        let solo_ref: Option<Arc<Solo>>;
        let entry = {
            let mut registry = lock(&self.0);
            registry.sweep();
            let slot = registry.map.entry((key.clone(), epoch)).or_default();
            solo_ref = slot.solo.upgrade();
            match (slot.entry.upgrade(), &solo_ref) {
                // Another reader made the entry meanwhile.
                (Some(entry), _) => entry,
                // The second reader here: it makes the entry, and offers it to the first.
                (None, Some(solo)) => {
                    let forget = self.forget(key, epoch);
                    let shared = Shared::make(store, key, epoch, after, sub, forget);
                    slot.entry = Arc::downgrade(&shared.entry);
                    solo.offer(&shared.entry);
                    return Ok(Follower::Shared(shared));
                }
                // The only reader here: it follows on its own subscription.
                (None, None) => {
                    let solo = Arc::new(Solo {
                        offered: AtomicBool::new(false),
                        entry: Mutex::new(Weak::new()),
                        _slot: self.forget(key, epoch),
                    });
                    slot.solo = Arc::downgrade(&solo);
                    sub.reached(after);
                    return Ok(Follower::Direct(sub, Some(solo)));
                }
            }
        };
        drop((sub, solo_ref));
        Ok(Follower::Shared(Shared::join(entry, after).await))
    }

    fn forget(&self, key: &SessionKey, epoch: Epoch) -> Forget {
        Forget {
            registry: Arc::downgrade(&self.0),
            key: key.clone(),
            epoch,
        }
    }

    fn entry(&self, key: &SessionKey, epoch: Epoch) -> Option<Arc<Entry>> {
        lock(&self.0)
            .map
            .get(&(key.clone(), epoch))
            .and_then(|slot| slot.entry.upgrade())
    }

    /// The sessions with an entry (for tests).
    #[cfg(test)]
    fn entries(&self) -> usize {
        lock(&self.0)
            .map
            .values()
            .filter(|slot| slot.entry.strong_count() > 0)
            .count()
    }

    /// The sessions with readers here.
    #[cfg(any(test, feature = "test-util"))]
    fn slots(&self) -> usize {
        lock(&self.0).map.len()
    }

    /// The events and bytes the tail of `key`'s session `epoch` holds, while it has an entry
    /// (for tests).
    #[cfg(test)]
    fn tail_held(&self, key: &SessionKey, epoch: Epoch) -> Option<(usize, usize)> {
        self.entry(key, epoch)
            .map(|entry| lock(&entry.state.tail).held())
    }
}

#[cfg(feature = "test-util")]
impl<St, K> crate::ResumableSseLayer<St, K> {
    /// The sessions of which this layer's fan-out keeps something in this process (their
    /// readers here follow a store with [`Store::SHARED_TAIL`]): 0 once their readers are gone.
    /// For tests of what a process keeps; not part of the stable API.
    #[doc(hidden)]
    pub fn fanout_sessions(&self) -> usize {
        self.config.fanout.slots()
    }
}

impl Registry {
    /// Forgets the sessions nobody reads any more, once their number doubled since the last
    /// time (so that this costs O(1) per follow on average). Their last reader forgets them when
    /// it goes; this catches a slot whose readers went while another reader was making it.
    fn sweep(&mut self) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, slot| slot.in_use());
            self.sweep_at = (self.map.len() * 2).max(64);
        }
    }
}

/// A page for a reader: what it sends next, and what it does after.
#[derive(Debug)]
pub(crate) struct Page {
    /// Events after the reader's position, in order and consecutive; when the position was
    /// evicted, they start at the oldest retained event (the reader sees the gap).
    pub(crate) blocks: Vec<EventBlock>,
    /// The oldest retained sequence number, when known (the gap check of an empty page).
    pub(crate) first_seq: u64,
    /// The page reaches the newest event of a finished session: nothing follows.
    pub(crate) end: bool,
    /// How the session ended, when `end`.
    pub(crate) outcome: Option<Outcome>,
    /// The page reaches the newest event known: wait for a change before the next read.
    pub(crate) caught_up: bool,
}

impl Page {
    fn from_read(batch: ReadBatch, after: u64) -> Self {
        let end = batch.reaches_end(after);
        let upto = batch.blocks.last().map_or(after, EventBlock::last_seq);
        Self {
            end,
            outcome: outcome(end, batch.status),
            caught_up: !end && upto >= batch.last_seq,
            first_seq: batch.first_seq,
            blocks: batch.blocks,
        }
    }
}

/// The outcome of a session whose end a page reaches.
fn outcome(end: bool, status: Status) -> Option<Outcome> {
    match status {
        Status::Finished(outcome) if end => Some(outcome),
        _ => None,
    }
}

/// How one reader learns of a session's changes and reads it.
pub(crate) enum Follower<S: Store> {
    /// Its own subscription, and reads of its own; with the mark of a session's lone reader,
    /// which joins the session's entry once another reader here makes one.
    Direct(S::Subscription, Option<Arc<Solo>>),
    /// The session's entry in this process.
    Shared(Shared),
}

impl<S: Store> std::fmt::Debug for Follower<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Follower::Direct(..) => "Follower::Direct",
            Follower::Shared(_) => "Follower::Shared",
        })
    }
}

/// A reader's part of a session's entry.
#[derive(Debug)]
pub(crate) struct Shared {
    entry: Arc<Entry>,
    rx: watch::Receiver<u64>,
    pin: Pin,
}

impl Shared {
    /// Makes the entry of a session, with its first reader at `after`, and starts its driver.
    fn make<S: Store>(
        store: &S,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        mut sub: S::Subscription,
        forget: Forget,
    ) -> Self {
        let state = Arc::new(State {
            tail: Mutex::new(Tail::starting_at(after)),
            moved: watch::Sender::new(0),
            epoch,
            pins: Pins::default(),
            told: Mutex::new(after),
            asked: AtomicU64::new(0),
            ask: Notify::new(),
            answered: watch::Sender::new(0),
        });
        let pin = state.pin_at(after);
        sub.reached(after);
        let driver = tokio::spawn(drive(store.clone(), key.clone(), epoch, sub, state.clone()))
            .abort_handle();
        Self {
            rx: state.moved.subscribe(),
            entry: Arc::new(Entry {
                state,
                driver,
                _slot: forget,
            }),
            pin,
        }
    }

    /// Joins an entry at `after`; returns once the store was told to keep what this reader
    /// needs.
    async fn join(entry: Arc<Entry>, after: u64) -> Self {
        let state = &entry.state;
        let behind = {
            let told = lock(&state.told);
            let pin = state.pin_at(after);
            (after < *told, pin)
        };
        let (behind, pin) = behind;
        if behind {
            let ticket = state.asked.fetch_add(1, Ordering::AcqRel) + 1;
            let mut answered = state.answered.subscribe();
            state.ask.notify_one();
            // Answered by the driver, or never needed (it stopped: nothing is evicted).
            let _ = answered.wait_for(|&a| a >= ticket).await;
        }
        Self {
            rx: state.moved.subscribe(),
            entry,
            pin,
        }
    }
}

impl<S: Store> Follower<S> {
    /// The next page after `after`, at most `max` events; `None` when the session is gone.
    pub(crate) async fn read(
        &mut self,
        store: &S,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<Page>, StoreError> {
        if let Follower::Direct(_, Some(solo)) = self {
            if let Some(entry) = solo.take() {
                // Another reader here made the session's entry: join it, then drop the own
                // subscription (after: the store keeps this reader's position meanwhile).
                *self = Follower::Shared(Shared::join(entry, after).await);
            }
        }
        if let Follower::Shared(shared) = self {
            // Marked as seen before the tail is looked at: a read after this wakes `changed`.
            shared.rx.borrow_and_update();
            let serve = lock(&shared.entry.state.tail).serve(after, max);
            let page = match serve {
                Serve::Events {
                    blocks,
                    end,
                    caught_up,
                    status,
                } => Page {
                    first_seq: blocks.first().map_or(after + 1, EventBlock::first_seq),
                    blocks,
                    end,
                    outcome: outcome(end, status),
                    caught_up,
                },
                Serve::End(status) => Page {
                    blocks: Vec::new(),
                    first_seq: after + 1,
                    end: true,
                    outcome: outcome(true, status),
                    caught_up: false,
                },
                Serve::Wait => Page {
                    blocks: Vec::new(),
                    first_seq: after + 1,
                    end: false,
                    outcome: None,
                    caught_up: true,
                },
                Serve::Gone => return Ok(None),
                Serve::Direct => {
                    let batch = Box::pin(store.read(key, epoch, after, max)).await?;
                    return Ok(batch.map(|b| Page::from_read(b, after)));
                }
            };
            return Ok(Some(page));
        }
        // Boxed: a reader keeps its read future for its whole life, but a call's state only
        // while the call is in flight.
        let batch = Box::pin(store.read(key, epoch, after, max)).await?;
        Ok(batch.map(|b| Page::from_read(b, after)))
    }

    /// Waits until the session may have changed since the previous read.
    pub(crate) async fn changed(&mut self) {
        match self {
            Follower::Direct(sub, _) => sub.changed().await,
            Follower::Shared(shared) => {
                if shared.rx.changed().await.is_err() {
                    // The driver is gone (it cannot be while this entry lives); do not spin.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// The reader has every event up to `seq`.
    pub(crate) fn reached(&mut self, seq: u64) {
        match self {
            Follower::Direct(sub, _) => sub.reached(seq),
            Follower::Shared(shared) => shared.pin.reached(seq),
        }
    }
}

/// Backoff after the driver's `n`th failed read in a row.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(100u64 << n.min(4))
}

/// The driver of a session's entry: reads every change into the tail, then wakes the readers;
/// tells the store where the oldest reader is. Runs until the session cannot change any more,
/// or the last reader goes (the entry aborts it).
async fn drive<S: Store>(
    store: S,
    key: SessionKey,
    epoch: Epoch,
    mut sub: S::Subscription,
    state: Arc<State>,
) {
    let mut failures = 0u32;
    loop {
        let from = lock(&state.tail).last_seq;
        // Boxed: the driver waits far longer than it reads, and its state should not hold a
        // read's while it waits.
        let read = state.telling(&mut sub, Box::pin(store.read(&key, epoch, from, TAIL_PAGE)));
        let next = match read.await {
            Ok(batch) => {
                failures = 0;
                let mut tail = lock(&state.tail);
                match tail.apply(batch) {
                    // A read that says more follows but brings nothing new (a store that
                    // breaks its contract): wait for a change rather than read again at once,
                    // which would spin.
                    Next::Read if tail.last_seq == from => Next::Wait,
                    next => next,
                }
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "shared read of a session failed; its readers read the store");
                lock(&state.tail).fail();
                state.moved.send_modify(|n| *n += 1);
                state.tell(&mut sub);
                // Read again after a change or the backoff, whichever comes first.
                let sleep = tokio::time::sleep(backoff(failures));
                let mut sleep = std::pin::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        _ = sub.changed() => break,
                        _ = state.ask.notified() => state.tell(&mut sub),
                    }
                }
                continue;
            }
        };
        state.moved.send_modify(|n| *n += 1);
        state.tell(&mut sub);
        match next {
            Next::Read => {}
            Next::Wait => state.until_changed(&mut sub).await,
            Next::Done => {
                // Nothing can be appended or evicted any more: readers joining behind need not
                // wait for the store to be told.
                *lock(&state.told) = 0;
                state.answered.send_replace(u64::MAX);
                return;
            }
        }
    }
}

impl State {
    /// A reader's pin, at `seq`.
    fn pin_at(&self, seq: u64) -> Pin {
        let pin = self.pins.pin(self.epoch);
        pin.reached(seq);
        pin
    }

    /// Tells the store where the oldest reader of this process is, and answers the readers
    /// that asked.
    fn tell<Sub: Subscription>(&self, sub: &mut Sub) {
        let asked = self.asked.load(Ordering::Acquire);
        {
            let mut told = lock(&self.told);
            if let Some(oldest) = self.pins.min(self.epoch) {
                sub.reached(oldest);
                *told = oldest;
            }
        }
        self.answered.send_if_modified(|a| {
            let moved = *a < asked;
            *a = (*a).max(asked);
            moved
        });
    }

    /// Waits for `fut`, telling the store about readers that join behind meanwhile.
    async fn telling<Sub: Subscription, F: Future>(&self, sub: &mut Sub, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = self.ask.notified() => self.tell(sub),
            }
        }
    }

    /// Waits for the store to signal a change, telling it about readers that join behind
    /// meanwhile.
    async fn until_changed<Sub: Subscription>(&self, sub: &mut Sub) {
        loop {
            let asked = tokio::select! {
                _ = sub.changed() => false,
                _ = self.ask.notified() => true,
            };
            if !asked {
                return;
            }
            self.tell(sub);
        }
    }
}

#[cfg(test)]
mod tests;
