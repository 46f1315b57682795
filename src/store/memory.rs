//! [`MemoryStore`]: sessions in this process's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::block::{drop_oldest, oldest_to_drop, Page};
use super::pins::{Pin, Pins};
use super::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError,
    Subscription,
};
use crate::session::{Epoch, Outcome, SessionKey};

/// Sessions in this process's memory: the store for a single instance, tests and the demo.
///
/// Events are kept as the producer appended them, in [`EventBlock`]s (one shared buffer per
/// batch) in a ring per session; a reader finds its position by a binary search over the blocks,
/// so replay from the middle of a session costs about the same whatever its length, and no reader
/// copies the history: what it sends are slices of the stored blocks.
///
/// Limits, each with its outcome (see [`MemoryStoreBuilder`]):
/// - `retention` (default 5 minutes): how long a finished session stays resumable; then it is gone
///   and a reconnect with one of its ids gets `410 Gone` (`unknown-session`). A client still
///   reading a session when it expires sees its stream end, so keep retention well above the
///   time clients take to read and reconnect.
/// - `max_sessions` (default 10,000): a new session beyond it is refused with
///   `503 Service Unavailable` (`session-limit`); existing sessions are unaffected.
/// - **A session is bounded by bytes**, not by a count of events, unless you ask for one:
///   - `max_bytes_per_session` (default 64 MiB, [`DEFAULT_MAX_BYTES_PER_SESSION`]) and, only when
///     set, `max_events_per_session` are *soft* limits: the history kept for reconnects. Past
///     them the oldest events are evicted, but never one that a connected reader (a response
///     being served) still needs;
///   - `hard_max_bytes_per_session` (default 256 MiB, [`DEFAULT_HARD_MAX_BYTES_PER_SESSION`]) is
///     the *hard* bound on a session's memory: past it the oldest events go whoever needs them.
///
///   So with the defaults a client reading a stream of up to 64 MiB never loses an event, and
///   one that is connected and reading loses none until it is 256 MiB behind: a stream of
///   1,000,000 LLM-sized tokens (about 45 MB) is kept whole. The session keeps running through
///   evictions. A connected client whose next event was evicted anyway gets
///   [`EVICTED_COMMENT`](crate::sse::EVICTED_COMMENT) and the end of its response at its next
///   read; a request whose `Last-Event-ID` (or, without one, the first event) was evicted gets
///   `410 Gone` (`evicted`). Nothing is skipped silently.
///
/// [`DEFAULT_MAX_BYTES_PER_SESSION`]: crate::limits::DEFAULT_MAX_BYTES_PER_SESSION
/// [`DEFAULT_HARD_MAX_BYTES_PER_SESSION`]: crate::limits::DEFAULT_HARD_MAX_BYTES_PER_SESSION
///
/// Expired sessions are removed by a sweep that runs at most once per second, on the next store
/// operation; until then they are already treated as absent.
///
/// ```
/// use std::time::Duration;
/// use resumable_sse::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .retention(Duration::from_secs(120))
///     .max_sessions(50_000)
///     .build();
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("limits", &self.inner.limits)
            .field("sessions", &read(&self.inner.sessions).map.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    retention: Duration,
    max_sessions: usize,
    max_events_per_session: usize,
    max_bytes_per_session: usize,
    hard_max_bytes_per_session: usize,
}

struct Inner {
    /// Read-locked by every read of a session (each subscriber, each event), write-locked only
    /// to add or remove sessions.
    sessions: RwLock<Sessions>,
    limits: Limits,
}

struct Sessions {
    map: HashMap<SessionKey, Arc<Session>>,
    last_sweep: Option<Instant>,
}

struct Session {
    epoch: Epoch,
    state: RwLock<State>,
    /// Bumped on every change; subscribers wait on it.
    changed: watch::Sender<()>,
    /// Set once when the session is cancelled; the producer waits on it.
    cancelled: watch::Sender<bool>,
    /// Where each connected reader is: the events after it are kept past the soft limits.
    pins: Pins,
}

struct State {
    status: Status,
    head: Option<Arc<ResponseHead>>,
    blocks: VecDeque<EventBlock>,
    /// Events and bytes in `blocks`.
    events: usize,
    bytes: usize,
    last_seq: u64,
    expires_at: Instant,
}

impl State {
    fn first_seq(&self) -> u64 {
        self.blocks
            .front()
            .map_or(self.last_seq + 1, EventBlock::first_seq)
    }

    fn over_soft_limits(&self, limits: &Limits) -> bool {
        self.events > limits.max_events_per_session || self.bytes > limits.max_bytes_per_session
    }

    /// Evicts the oldest events until the session is within its limits, keeping at least its
    /// newest event: past the soft limits only events up to `pinned` (what every connected
    /// reader already has), past the hard byte limit whatever it takes.
    fn evict(&mut self, limits: &Limits, pinned: u64) {
        self.trim(
            limits.max_events_per_session,
            limits.max_bytes_per_session,
            pinned,
        );
        self.trim(usize::MAX, limits.hard_max_bytes_per_session, u64::MAX);
    }

    /// Drops the oldest events numbered up to `upto` while over `max_events` or `max_bytes`.
    fn trim(&mut self, max_events: usize, max_bytes: usize, upto: u64) {
        while self.events > 1 && (self.events > max_events || self.bytes > max_bytes) {
            let Some(oldest) = self.blocks.front() else {
                return;
            };
            // The oldest block's events that must go for both limits, and may go.
            let over_events = self.events.saturating_sub(max_events);
            let over_bytes = self.bytes.saturating_sub(max_bytes);
            let may =
                usize::try_from(upto.saturating_sub(oldest.first_seq() - 1)).unwrap_or(usize::MAX);
            let drop = oldest_to_drop(oldest, over_events, over_bytes, may).min(self.events - 1);
            if drop == 0 {
                return;
            }
            self.bytes -= drop_oldest(&mut self.blocks, drop);
            self.events -= drop;
        }
    }
}

/// Locks for writing, recovering the data if a thread panicked while holding the lock: every
/// critical section below leaves the state consistent at each step.
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Locks for reading; see [`write`].
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default limits.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the store's limits.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            limits: Limits {
                retention: crate::limits::DEFAULT_RETENTION,
                max_sessions: crate::limits::DEFAULT_MAX_SESSIONS,
                max_events_per_session: usize::MAX,
                max_bytes_per_session: crate::limits::DEFAULT_MAX_BYTES_PER_SESSION,
                hard_max_bytes_per_session: crate::limits::DEFAULT_HARD_MAX_BYTES_PER_SESSION,
            },
        }
    }

    /// The number of sessions held, expired ones included until the next sweep.
    pub fn len(&self) -> usize {
        read(&self.inner.sessions).map.len()
    }

    /// Whether the store holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live session under `key`, sweeping expired ones first when a sweep is due.
    fn get(&self, key: &SessionKey) -> Option<Arc<Session>> {
        let now = Instant::now();
        {
            // The common case, under a read lock that every reader of every session shares.
            let sessions = read(&self.inner.sessions);
            if !Self::sweep_due(&sessions, now) {
                let session = sessions.map.get(key)?;
                if read(&session.state).expires_at > now {
                    return Some(session.clone());
                }
            }
        }
        let mut sessions = write(&self.inner.sessions);
        self.sweep_if_due(&mut sessions, now);
        let session = sessions.map.get(key)?;
        if read(&session.state).expires_at <= now {
            sessions.map.remove(key);
            return None;
        }
        Some(session.clone())
    }

    /// The session under `key` if its epoch is `epoch`.
    fn get_epoch(&self, key: &SessionKey, epoch: Epoch) -> Option<Arc<Session>> {
        self.get(key).filter(|s| s.epoch == epoch)
    }

    fn sweep_due(sessions: &Sessions, now: Instant) -> bool {
        sessions
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
    }

    fn sweep_if_due(&self, sessions: &mut Sessions, now: Instant) {
        if !Self::sweep_due(sessions, now) {
            return;
        }
        sessions.last_sweep = Some(now);
        sessions.map.retain(|_, s| read(&s.state).expires_at > now);
    }
}

/// Builds a [`MemoryStore`]; see its docs for what each limit does when reached.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    limits: Limits,
}

impl MemoryStoreBuilder {
    /// How long a finished session stays resumable (default 5 minutes).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.limits.retention = retention;
        self
    }

    /// The most sessions the store holds at once (default 10,000).
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.limits.max_sessions = max;
        self
    }

    /// The most events retained per session for reconnects (default: no count limit); older
    /// ones are evicted once no connected reader needs them. A soft limit: see
    /// [`MemoryStore`].
    pub fn max_events_per_session(mut self, max: usize) -> Self {
        self.limits.max_events_per_session = max.max(1);
        self
    }

    /// The most encoded bytes retained per session for reconnects (default 64 MiB); older events
    /// are evicted once no connected reader needs them. A soft limit: see [`MemoryStore`].
    pub fn max_bytes_per_session(mut self, max: usize) -> Self {
        self.limits.max_bytes_per_session = max;
        self
    }

    /// The most encoded bytes a session may hold at all (default 256 MiB; never below
    /// [`max_bytes_per_session`](Self::max_bytes_per_session)): past it the oldest events are
    /// evicted even when a connected reader still needs them, and that reader's stream ends.
    pub fn hard_max_bytes_per_session(mut self, max: usize) -> Self {
        self.limits.hard_max_bytes_per_session = max;
        self
    }

    /// Builds the store.
    pub fn build(mut self) -> MemoryStore {
        let limits = &mut self.limits;
        limits.hard_max_bytes_per_session = limits
            .hard_max_bytes_per_session
            .max(limits.max_bytes_per_session);
        MemoryStore {
            inner: Arc::new(Inner {
                sessions: RwLock::new(Sessions {
                    map: HashMap::new(),
                    last_sweep: None,
                }),
                limits: self.limits,
            }),
        }
    }
}

/// The [`Subscription`] of a [`MemoryStore`]: also where its reader is, so that the session
/// keeps the events it still needs past the soft limits.
#[derive(Debug)]
pub struct MemorySubscription {
    rx: Option<watch::Receiver<()>>,
    pin: Option<Pin>,
    /// The session and its limits, to apply the soft limits again when this reader goes.
    session: Option<(Weak<Session>, Limits)>,
}

impl Drop for MemorySubscription {
    /// Events kept past the soft limits for this reader alone go with it, so that a session
    /// returns to its soft limits once its readers are gone, rather than at its next append
    /// (which may never come).
    fn drop(&mut self) {
        if self.pin.take().is_none() {
            return;
        }
        if let Some((session, limits)) = &self.session {
            if let Some(session) = session.upgrade() {
                let mut st = write(&session.state);
                if st.over_soft_limits(limits) {
                    st.evict(limits, session.pinned());
                }
            }
        }
    }
}

impl Subscription for MemorySubscription {
    async fn changed(&mut self) {
        if let Some(rx) = &mut self.rx {
            if rx.changed().await.is_err() {
                // The session is gone: every later call returns at once too.
                self.rx = None;
            }
        }
    }

    fn reached(&mut self, seq: u64) {
        if let Some(pin) = &self.pin {
            pin.reached(seq);
        }
    }
}

impl Session {
    fn info(&self) -> SessionInfo {
        let st = read(&self.state);
        SessionInfo {
            epoch: self.epoch,
            status: st.status,
            head: st.head.clone(),
            first_seq: st.first_seq(),
            last_seq: st.last_seq,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|_| {});
    }

    /// The newest sequence number every connected reader has reached (`u64::MAX` when none is
    /// connected): the events after it are still needed.
    fn pinned(&self) -> u64 {
        self.pins.min(self.epoch).unwrap_or(u64::MAX)
    }
}

impl MemoryStore {
    /// [`Store::claim`], and with `finished` [`Store::claim_replacing`].
    fn claim_over(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Option<Epoch>,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut sessions = write(&self.inner.sessions);
        self.sweep_if_due(&mut sessions, now);
        if let Some(s) = sessions.map.get(key) {
            let (expired, replaced) = {
                let st = read(&s.state);
                let replaced =
                    finished == Some(s.epoch) && matches!(st.status, Status::Finished(_));
                (st.expires_at <= now, replaced)
            };
            if !expired && !replaced {
                return Ok(Claim::Exists(s.info()));
            }
            if let Some(old) = sessions.map.remove(key) {
                // Its readers learn that it is gone.
                old.notify();
            }
        }
        if sessions.map.len() >= self.inner.limits.max_sessions {
            // Expired sessions must not hold the limit: sweep now, whatever the schedule.
            sessions.last_sweep = None;
            self.sweep_if_due(&mut sessions, now);
            if sessions.map.len() >= self.inner.limits.max_sessions {
                return Err(StoreError::session_limit());
            }
        }
        let epoch = Epoch::random();
        let session = Arc::new(Session {
            epoch,
            state: RwLock::new(State {
                status: Status::Starting,
                head: None,
                blocks: VecDeque::new(),
                events: 0,
                bytes: 0,
                last_seq: 0,
                expires_at: now + lifetime,
            }),
            changed: watch::Sender::new(()),
            cancelled: watch::Sender::new(false),
            pins: Pins::default(),
        });
        sessions.map.insert(key.clone(), session);
        Ok(Claim::Claimed(epoch))
    }
}

impl Store for MemoryStore {
    type Subscription = MemorySubscription;

    /// Reads are in the process and share the stored blocks: every reader reads by itself.
    const SHARED_TAIL: bool = false;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        self.claim_over(key, lifetime, None)
    }

    async fn claim_replacing(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Epoch,
    ) -> Result<Claim, StoreError> {
        self.claim_over(key, lifetime, Some(finished))
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        let Some(s) = self.get_epoch(key, epoch) else {
            return Ok(false);
        };
        let started = {
            let mut st = write(&s.state);
            match st.status {
                Status::Starting => {
                    st.status = Status::Running;
                    st.head = Some(Arc::new(head));
                    true
                }
                Status::Running => true,
                Status::Finished(_) => false,
            }
        };
        s.notify();
        Ok(started)
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let mut sessions = write(&self.inner.sessions);
        if sessions.map.get(key).is_some_and(|s| s.epoch == epoch) {
            if let Some(s) = sessions.map.remove(key) {
                s.notify();
            }
        }
        Ok(())
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        let Some(s) = self.get_epoch(key, epoch) else {
            return Ok(Appended::Stopped);
        };
        {
            let mut st = write(&s.state);
            if st.status != Status::Running {
                return Ok(Appended::Stopped);
            }
            for block in blocks {
                // Events already stored (a retried append) are skipped.
                let Some(block) = block.slice(st.last_seq + 1..) else {
                    continue;
                };
                if block.first_seq() != st.last_seq + 1 {
                    return Err(StoreError::unavailable(format!(
                        "events must be appended in order: got {} after {}",
                        block.first_seq(),
                        st.last_seq
                    )));
                }
                st.last_seq = block.last_seq();
                st.events += block.len();
                st.bytes += block.bytes().len();
                st.blocks.push_back(block);
            }
            if st.over_soft_limits(&self.inner.limits) {
                st.evict(&self.inner.limits, s.pinned());
            }
        }
        s.notify();
        Ok(Appended::Stored)
    }

    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.get_epoch(key, epoch) {
            {
                let mut st = write(&s.state);
                if st.status.is_finished() {
                    return Ok(());
                }
                st.status = Status::Finished(outcome);
                st.expires_at = Instant::now() + self.inner.limits.retention;
            }
            s.notify();
        }
        Ok(())
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        Ok(self.get(key).map(|s| s.info()))
    }

    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        let Some(s) = self.get_epoch(key, epoch) else {
            return Ok(None);
        };
        let st = read(&s.state);
        let first_seq = st.first_seq();
        // The first block with an event after `after`: a binary search, whatever the length.
        let start = st.blocks.partition_point(|b| b.last_seq() <= after);
        Ok(Some(ReadBatch {
            blocks: Page::collect(after, max, st.blocks.range(start..)),
            status: st.status,
            first_seq,
            last_seq: st.last_seq,
        }))
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> Result<MemorySubscription, StoreError> {
        let session = self.get_epoch(key, epoch);
        Ok(MemorySubscription {
            rx: session.as_ref().map(|s| s.changed.subscribe()),
            pin: session.as_ref().map(|s| s.pins.pin(s.epoch)),
            session: session.map(|s| (Arc::downgrade(&s), self.inner.limits)),
        })
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let Some(mut rx) = self.get_epoch(key, epoch).map(|s| s.cancelled.subscribe()) else {
            return Ok(());
        };
        // An error means the session was dropped: that stops the producer too.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
        Ok(())
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let Some(s) = self.get(key) else {
            return Ok(false);
        };
        {
            let mut st = write(&s.state);
            if st.status.is_finished() {
                return Ok(false);
            }
            st.status = Status::Finished(Outcome::Cancelled);
            st.expires_at = Instant::now() + self.inner.limits.retention;
        }
        s.cancelled.send_replace(true);
        s.notify();
        Ok(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::EventBlockBuilder;
    use http::{HeaderMap, StatusCode};

    /// A block of events `first..first + n`, each `"<seq>;"` padded to `size` bytes.
    fn block(first: u64, n: u64, size: usize) -> EventBlock {
        let mut b = EventBlockBuilder::new(first);
        for seq in first..first + n {
            b.push_with(|buf| buf.extend_from_slice(format!("{seq:>size$};").as_bytes()));
        }
        b.finish().unwrap()
    }

    /// Claims and starts the session `k` on `store` (also the crate's other unit tests' setup).
    pub(crate) async fn running(store: &MemoryStore) -> (SessionKey, Epoch) {
        let key = SessionKey::new("k").unwrap();
        let Ok(Claim::Claimed(epoch)) = store.claim(&key, Duration::from_secs(60)).await else {
            panic!("claim");
        };
        let head = ResponseHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        };
        store.start(&key, epoch, head).await.unwrap();
        (key, epoch)
    }

    async fn stored(store: &MemoryStore, key: &SessionKey, epoch: Epoch) -> Vec<u64> {
        let batch = store.read(key, epoch, 0, 1000).await.unwrap().unwrap();
        batch
            .blocks
            .iter()
            .flat_map(|b| b.iter().map(|(seq, _)| seq))
            .collect()
    }

    #[tokio::test]
    async fn eviction_cuts_inside_a_block_and_keeps_the_newest_events() {
        let store = MemoryStore::builder().max_events_per_session(4).build();
        let (key, epoch) = running(&store).await;
        store.append(&key, epoch, &[block(1, 10, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [7, 8, 9, 10]);
        let info = store.lookup(&key).await.unwrap().unwrap();
        assert_eq!((info.first_seq, info.last_seq), (7, 10));
        store.append(&key, epoch, &[block(11, 2, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [9, 10, 11, 12]);
    }

    #[tokio::test]
    async fn eviction_by_bytes_counts_the_bytes_of_each_event() {
        // Events of 10 bytes; 35 bytes allowed: the newest three stay.
        let store = MemoryStore::builder().max_bytes_per_session(35).build();
        let (key, epoch) = running(&store).await;
        store
            .append(&key, epoch, &[block(1, 4, 9), block(5, 3, 9)])
            .await
            .unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [5, 6, 7]);
        // One event larger than the limit is kept alone.
        store.append(&key, epoch, &[block(8, 1, 99)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [8]);
    }

    #[tokio::test]
    async fn by_default_a_session_is_bounded_by_bytes_not_by_a_count_of_events() {
        // Many more events than any count limit used to allow, in a few hundred bytes each: all
        // kept, as long as they fit in the default byte limit.
        let store = MemoryStore::new();
        let (key, epoch) = running(&store).await;
        let n = 250_000u64;
        let blocks: Vec<_> = (0..n / 1000)
            .map(|i| block(i * 1000 + 1, 1000, 9))
            .collect();
        store.append(&key, epoch, &blocks).await.unwrap();
        let info = store.lookup(&key).await.unwrap().unwrap();
        assert_eq!((info.first_seq, info.last_seq), (1, n));
        // Past the default byte limit, the oldest go (nobody is reading).
        let per_block = 1000 * 10;
        let over = crate::limits::DEFAULT_MAX_BYTES_PER_SESSION / per_block + 1;
        let more: Vec<_> = (0..over as u64)
            .map(|i| block(n + i * 1000 + 1, 1000, 9))
            .collect();
        store.append(&key, epoch, &more).await.unwrap();
        let info = store.lookup(&key).await.unwrap().unwrap();
        let kept = (info.last_seq - info.first_seq + 1) as usize * 10;
        assert!(
            kept <= crate::limits::DEFAULT_MAX_BYTES_PER_SESSION,
            "{kept}"
        );
        assert!(kept > crate::limits::DEFAULT_MAX_BYTES_PER_SESSION - 10 * 1000);
    }

    #[tokio::test]
    async fn soft_limits_keep_what_a_connected_reader_still_needs() {
        let store = MemoryStore::builder().max_events_per_session(4).build();
        let (key, epoch) = running(&store).await;
        let mut reader = store.subscribe(&key, epoch).await.unwrap();
        reader.reached(2);
        store.append(&key, epoch, &[block(1, 10, 9)]).await.unwrap();
        // The reader has 1..=2: only those may go; 3..=10 are kept past the limit of 4.
        assert_eq!(
            stored(&store, &key, epoch).await,
            (3..=10).collect::<Vec<_>>()
        );
        reader.reached(8);
        store.append(&key, epoch, &[block(11, 1, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [8, 9, 10, 11]);
        // Once the reader is gone, the limit applies in full, at once.
        drop(reader);
        assert_eq!(stored(&store, &key, epoch).await, [8, 9, 10, 11]);
        store.append(&key, epoch, &[block(12, 3, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [11, 12, 13, 14]);
    }

    #[tokio::test]
    async fn a_session_returns_to_its_soft_limits_when_its_last_reader_goes() {
        let store = MemoryStore::builder().max_events_per_session(4).build();
        let (key, epoch) = running(&store).await;
        let mut one = store.subscribe(&key, epoch).await.unwrap();
        let mut two = store.subscribe(&key, epoch).await.unwrap();
        one.reached(2);
        two.reached(5);
        store.append(&key, epoch, &[block(1, 10, 9)]).await.unwrap();
        assert_eq!(
            stored(&store, &key, epoch).await,
            (3..=10).collect::<Vec<_>>()
        );
        // The furthest behind goes: what the other still needs stays.
        drop(one);
        assert_eq!(
            stored(&store, &key, epoch).await,
            (6..=10).collect::<Vec<_>>()
        );
        // No reader left: the limit, without waiting for another append.
        drop(two);
        assert_eq!(stored(&store, &key, epoch).await, [7, 8, 9, 10]);
    }

    #[tokio::test]
    async fn the_hard_byte_limit_evicts_even_what_a_reader_needs() {
        // Events of 10 bytes; soft 40 bytes, hard 100 bytes.
        let store = MemoryStore::builder()
            .max_bytes_per_session(40)
            .hard_max_bytes_per_session(100)
            .build();
        let (key, epoch) = running(&store).await;
        let reader = store.subscribe(&key, epoch).await.unwrap();
        // At 0: the reader needs everything.
        store.append(&key, epoch, &[block(1, 10, 9)]).await.unwrap();
        assert_eq!(
            stored(&store, &key, epoch).await,
            (1..=10).collect::<Vec<_>>()
        );
        store.append(&key, epoch, &[block(11, 1, 9)]).await.unwrap();
        assert_eq!(
            stored(&store, &key, epoch).await,
            (2..=11).collect::<Vec<_>>()
        );
        drop(reader);
        store.append(&key, epoch, &[block(12, 1, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [9, 10, 11, 12]);
    }

    #[tokio::test]
    async fn the_hard_limit_is_never_below_the_soft_one() {
        let store = MemoryStore::builder()
            .max_bytes_per_session(40)
            .hard_max_bytes_per_session(0)
            .build();
        let (key, epoch) = running(&store).await;
        store.append(&key, epoch, &[block(1, 6, 9)]).await.unwrap();
        assert_eq!(stored(&store, &key, epoch).await, [3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_retried_append_stores_nothing_twice() {
        let store = MemoryStore::new();
        let (key, epoch) = running(&store).await;
        store.append(&key, epoch, &[block(1, 3, 9)]).await.unwrap();
        // The same block again, then one overlapping it, then a new one.
        let retry = [block(1, 3, 9), block(2, 4, 9), block(6, 2, 9)];
        store.append(&key, epoch, &retry).await.unwrap();
        assert_eq!(
            stored(&store, &key, epoch).await,
            (1..=7).collect::<Vec<_>>()
        );
        // A gap is refused, and nothing of it is stored.
        assert!(store.append(&key, epoch, &[block(9, 1, 9)]).await.is_err());
        assert_eq!(
            stored(&store, &key, epoch).await,
            (1..=7).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_page_is_sliced_from_the_blocks_without_copying() {
        let store = MemoryStore::new();
        let (key, epoch) = running(&store).await;
        let blocks = [block(1, 5, 9), block(6, 5, 9)];
        store.append(&key, epoch, &blocks).await.unwrap();
        let page = store.read(&key, epoch, 3, 4).await.unwrap().unwrap();
        let seqs: Vec<_> = page
            .blocks
            .iter()
            .map(|b| (b.first_seq(), b.last_seq()))
            .collect();
        assert_eq!(seqs, [(4, 5), (6, 7)]);
        // The page shares the stored buffers.
        assert_eq!(
            page.blocks[0].bytes().as_ptr(),
            blocks[0].bytes()[30..].as_ptr()
        );
        assert_eq!(page.blocks[1].bytes().as_ptr(), blocks[1].bytes().as_ptr());
        assert_eq!((page.first_seq, page.last_seq), (1, 10));
    }
}
