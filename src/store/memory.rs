//! [`MemoryStore`]: sessions in this process's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Appended, Claim, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError, StoredEvent,
    Subscription,
};
use crate::session::{Epoch, Outcome, SessionKey};

/// Sessions in this process's memory: the store for a single instance, tests and the demo.
///
/// Events are kept as shared [`Bytes`](bytes::Bytes) in a ring per session; a reader's position is
/// an index into it, so replay from the middle of a session costs the same whatever its length,
/// and no reader copies the history.
///
/// Limits, each with its outcome (see [`MemoryStoreBuilder`]):
/// - `retention` (default 5 minutes): how long a finished session stays resumable; then it is gone
///   and a reconnect with one of its ids gets `410 Gone` (`unknown-session`). A client still
///   reading a session when it expires sees its stream end, so keep retention well above the
///   time clients take to read and reconnect.
/// - `max_sessions` (default 10,000): a new session beyond it is refused with
///   `503 Service Unavailable` (`session-limit`); existing sessions are unaffected.
/// - `max_events_per_session` (default 100,000) and `max_bytes_per_session` (default 64 MiB): the
///   oldest events are evicted (the session keeps running); a client whose `Last-Event-ID` points
///   before the oldest retained event gets `410 Gone` (`evicted`), and a connected client that
///   falls that far behind is disconnected so that its reconnect learns it. Nothing is skipped
///   silently.
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
            .field("sessions", &lock(&self.inner.sessions).map.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    retention: Duration,
    max_sessions: usize,
    max_events_per_session: usize,
    max_bytes_per_session: usize,
}

struct Inner {
    sessions: Mutex<Sessions>,
    limits: Limits,
}

struct Sessions {
    map: HashMap<SessionKey, Arc<Session>>,
    last_sweep: Option<Instant>,
}

struct Session {
    epoch: Epoch,
    state: Mutex<State>,
    /// Bumped on every change; subscribers wait on it.
    changed: watch::Sender<()>,
    /// Set once when the session is cancelled; the producer waits on it.
    cancelled: watch::Sender<bool>,
}

struct State {
    status: Status,
    head: Option<Arc<ResponseHead>>,
    events: VecDeque<StoredEvent>,
    bytes: usize,
    last_seq: u64,
    expires_at: Instant,
}

impl State {
    fn first_seq(&self) -> u64 {
        self.events.front().map_or(self.last_seq + 1, |e| e.seq)
    }
}

/// Locks a mutex, recovering the data if a thread panicked while holding it: every critical
/// section below leaves the state consistent at each step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
                retention: Duration::from_secs(300),
                max_sessions: 10_000,
                max_events_per_session: 100_000,
                max_bytes_per_session: 64 << 20,
            },
        }
    }

    /// The number of sessions held, expired ones included until the next sweep.
    pub fn len(&self) -> usize {
        lock(&self.inner.sessions).map.len()
    }

    /// Whether the store holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live session under `key`, sweeping expired ones first when a sweep is due.
    fn get(&self, key: &SessionKey) -> Option<Arc<Session>> {
        let now = Instant::now();
        let mut sessions = lock(&self.inner.sessions);
        self.sweep_if_due(&mut sessions, now);
        let session = sessions.map.get(key)?;
        if lock(&session.state).expires_at <= now {
            sessions.map.remove(key);
            return None;
        }
        Some(session.clone())
    }

    /// The session under `key` if its epoch is `epoch`.
    fn get_epoch(&self, key: &SessionKey, epoch: Epoch) -> Option<Arc<Session>> {
        self.get(key).filter(|s| s.epoch == epoch)
    }

    fn sweep_if_due(&self, sessions: &mut Sessions, now: Instant) {
        if sessions
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        sessions.last_sweep = Some(now);
        sessions.map.retain(|_, s| lock(&s.state).expires_at > now);
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

    /// The most events retained per session (default 100,000); older ones are evicted.
    pub fn max_events_per_session(mut self, max: usize) -> Self {
        self.limits.max_events_per_session = max.max(1);
        self
    }

    /// The most encoded bytes retained per session (default 64 MiB); older events are evicted.
    pub fn max_bytes_per_session(mut self, max: usize) -> Self {
        self.limits.max_bytes_per_session = max;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                sessions: Mutex::new(Sessions {
                    map: HashMap::new(),
                    last_sweep: None,
                }),
                limits: self.limits,
            }),
        }
    }
}

/// The [`Subscription`] of a [`MemoryStore`].
#[derive(Debug)]
pub struct MemorySubscription {
    rx: Option<watch::Receiver<()>>,
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
}

impl Session {
    fn info(&self) -> SessionInfo {
        let st = lock(&self.state);
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
}

impl Store for MemoryStore {
    type Subscription = MemorySubscription;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut sessions = lock(&self.inner.sessions);
        self.sweep_if_due(&mut sessions, now);
        if let Some(s) = sessions.map.get(key) {
            if lock(&s.state).expires_at > now {
                return Ok(Claim::Exists(s.info()));
            }
            sessions.map.remove(key);
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
            state: Mutex::new(State {
                status: Status::Starting,
                head: None,
                events: VecDeque::new(),
                bytes: 0,
                last_seq: 0,
                expires_at: now + lifetime,
            }),
            changed: watch::Sender::new(()),
            cancelled: watch::Sender::new(false),
        });
        sessions.map.insert(key.clone(), session);
        Ok(Claim::Claimed(epoch))
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.get_epoch(key, epoch) {
            {
                let mut st = lock(&s.state);
                if st.status == Status::Starting {
                    st.status = Status::Running;
                    st.head = Some(Arc::new(head));
                }
            }
            s.notify();
        }
        Ok(())
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let mut sessions = lock(&self.inner.sessions);
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
        events: &[StoredEvent],
    ) -> Result<Appended, StoreError> {
        let Some(s) = self.get_epoch(key, epoch) else {
            return Ok(Appended::Stopped);
        };
        {
            let mut st = lock(&s.state);
            if st.status != Status::Running {
                return Ok(Appended::Stopped);
            }
            let limits = &self.inner.limits;
            for e in events {
                debug_assert_eq!(
                    e.seq,
                    st.last_seq + 1,
                    "sequence numbers must be consecutive"
                );
                st.last_seq = e.seq;
                st.bytes += e.bytes.len();
                st.events.push_back(e.clone());
            }
            while st.events.len() > limits.max_events_per_session
                || (st.bytes > limits.max_bytes_per_session && st.events.len() > 1)
            {
                if let Some(old) = st.events.pop_front() {
                    st.bytes -= old.bytes.len();
                }
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
                let mut st = lock(&s.state);
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
        let st = lock(&s.state);
        let first_seq = st.first_seq();
        // Sequence numbers in the ring are consecutive: the position is arithmetic, not a search.
        let start = usize::try_from(after.saturating_add(1).saturating_sub(first_seq))
            .unwrap_or(usize::MAX)
            .min(st.events.len());
        let events = st.events.range(start..).take(max).cloned().collect();
        Ok(Some(ReadBatch {
            events,
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
        Ok(MemorySubscription {
            rx: self.get_epoch(key, epoch).map(|s| s.changed.subscribe()),
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
            let mut st = lock(&s.state);
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
