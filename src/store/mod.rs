//! Where sessions live: the [`Store`] trait and the stores that implement it.
//!
//! A store keeps, per [`SessionKey`], one session: its [`Epoch`], its status, the head of the
//! original response and an ordered log of encoded events. It also tells interested parties when a
//! session changed. It does **not** parse, number or encode events, decide what a reconnect gets, or
//! merge replay and live events: the layer does that once for every backend.
//!
//! The trait is shaped for networked backends: appends come in batches (one round trip per batch),
//! reads are async and paged, and a [`Subscription`] is a cheap "something changed" signal that a
//! backend can serve from one shared connection per process.
//!
//! # Example: the in-memory store
//!
//! ```
//! use std::time::Duration;
//! use resumable_sse::{MemoryStore, ResumableSseLayer};
//!
//! let store = MemoryStore::builder()
//!     .retention(Duration::from_secs(60))
//!     .max_sessions(1_000)
//!     .max_events_per_session(50_000)
//!     .build();
//! let layer = ResumableSseLayer::new(store.clone());
//! # let _ = layer;
//! ```
//!
//! # Writing a store
//!
//! Implement [`Store`] and [`Subscription`]. The contract every method must keep is written on
//! the method; `tests/custom_store.rs` shows a complete store written outside the crate.
//! [`EventBlock::page`] and [`EventBlock::drop_oldest`] read and trim a session's log of blocks.
//! With the `test-util` feature, `resumable_sse::testing::store_suite!` runs on your store the
//! behaviour suite that the crate's stores pass, one test per behaviour:
//!
//! ```ignore
//! // tests/store_suite.rs
//! resumable_sse::testing::store_suite!(|opts| async move {
//!     MyStore::new(opts.retention, opts.max_events_per_session)
//! });
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::session::{Epoch, Outcome, SessionKey};
use crate::BoxError;

pub use block::{EventBlock, EventBlockBuilder, InvalidBlock};

pub(crate) mod block;
pub mod memory;
pub(crate) mod pins;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(test)]
pub(crate) mod test_blocks;

/// The status and headers of the response that created a session, replayed to every reconnect.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    /// The original status (always `200 OK` today).
    pub status: StatusCode,
    /// The original headers, less `content-length`, the hop-by-hop headers, `set-cookie` (a
    /// cookie is the first client's, not every key holder's) and `date`.
    pub headers: HeaderMap,
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Claimed by a request whose inner service has not answered yet.
    Starting,
    /// Its producer is appending events.
    Running,
    /// It ended; its events stay readable until it expires.
    Finished(Outcome),
}

impl Status {
    /// Whether the session has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Finished(_))
    }
}

/// A snapshot of a session.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// The session's incarnation.
    pub epoch: Epoch,
    /// Its status.
    pub status: Status,
    /// The response head, once the session runs.
    pub head: Option<Arc<ResponseHead>>,
    /// The sequence number of the oldest event still retained (`last_seq + 1` when none is).
    pub first_seq: u64,
    /// The sequence number of the newest event (0 before the first).
    pub last_seq: u64,
}

/// The answer to [`Store::claim`].
#[derive(Clone, Debug)]
pub enum Claim {
    /// No session existed: one now does, in [`Status::Starting`], and the caller is its only
    /// producer.
    Claimed(Epoch),
    /// A session already exists (in any status): the caller must not produce.
    Exists(SessionInfo),
}

/// A page of a session's log, read atomically with the session's status.
///
/// Every field is the truth at the time of the read, and nothing else: a store never adjusts
/// them for what it believes a reader will do next. The reader ends on
/// [`reaches_end`](Self::reaches_end), and otherwise reads again (or, when the page reached
/// [`last_seq`](Self::last_seq), waits for its subscription first).
#[derive(Clone, Debug)]
pub struct ReadBatch {
    /// Events after the requested position, in order and consecutive, at most the requested
    /// number, in blocks (a store returns the blocks it keeps, sliced where the page starts and
    /// ends). When the requested position was evicted the page starts at the oldest retained
    /// event; the caller sees the gap by comparing sequence numbers.
    pub blocks: Vec<EventBlock>,
    /// The status at the time of the read.
    pub status: Status,
    /// The oldest retained sequence number at the time of the read.
    pub first_seq: u64,
    /// The newest sequence number at the time of the read.
    pub last_seq: u64,
}

impl ReadBatch {
    /// Whether a reader that sends this page, read after `after`, has every event of the
    /// session: the session is finished and the page (or `after`, when the page is empty) reaches
    /// its newest event. Computed from [`status`](Self::status) and
    /// [`last_seq`](Self::last_seq), so a store states only the truth at the time of the read.
    pub fn reaches_end(&self, after: u64) -> bool {
        let upto = self.blocks.last().map_or(after, EventBlock::last_seq);
        self.status.is_finished() && upto >= self.last_seq
    }
}

/// The answer to [`Store::append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The events are stored and subscribers were notified.
    Stored,
    /// Nothing was stored: the session was cancelled, expired or taken over. The producer stops.
    Stopped,
}

/// A store operation failed.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<BoxError>,
}

/// What kind of failure a [`StoreError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or answered with an error. Transient.
    Unavailable,
    /// The store holds as many sessions as it may (`503` with `resumable-sse-reason: session-limit`).
    SessionLimit,
}

impl StoreError {
    /// A backend failure, with its cause.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            source: Some(source.into()),
        }
    }

    /// The store's session limit is reached.
    pub fn session_limit() -> Self {
        Self {
            kind: StoreErrorKind::SessionLimit,
            source: None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.kind, &self.source) {
            (StoreErrorKind::Unavailable, Some(e)) => write!(f, "session store unavailable: {e}"),
            (StoreErrorKind::Unavailable, None) => f.write_str("session store unavailable"),
            (StoreErrorKind::SessionLimit, _) => f.write_str("session store is full"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

/// A signal that a session may have changed (new events, a new status, removal).
///
/// Spurious wake-ups are allowed; missed ones are not: every change made after
/// [`Store::subscribe`] returned must wake a pending or later call to [`changed`](Self::changed).
pub trait Subscription: Send + 'static {
    /// Waits until the session may have changed since the previous call (or since the
    /// subscription was made). Returns at once when the session no longer exists.
    ///
    /// The future may be dropped before it completes (the layer waits on it beside other
    /// things); a change must not be lost by that: the next call returns at once for it.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;

    /// Tells the store that the reader holding this subscription has every event up to `seq`
    /// (it calls this before its first read with its starting position, then after every read).
    /// While the subscription lives, a store may keep the events after `seq` past its soft
    /// limits, so that a connected reader is not cut off by an eviction it would have outrun;
    /// its hard limits still apply. The default keeps nothing.
    fn reached(&mut self, seq: u64) {
        let _ = seq;
    }
}

/// Storage for sessions. See the [module docs](self) for the division of labour.
///
/// # Contract
///
/// This is the whole contract a store keeps; the layer relies on nothing else, and the
/// conformance suite checks it.
///
/// - Every method is called with the session's key and, after the claim, its [`Epoch`]; a
///   method called with an epoch that is not the current one for that key acts as if the
///   session did not exist.
/// - What a method returns is the truth at the time of the call: a [`ReadBatch`] or a
///   [`SessionInfo`] is one atomic snapshot of the session.
/// - Sequence numbers are consecutive from 1; the only gaps a reader may meet are events the
///   store evicted to respect its limits (it then reads on from the oldest retained event).
/// - A [`Subscription`] misses no change made after [`subscribe`](Self::subscribe) returned.
/// - Implementations are cheap to clone (an `Arc` inside) and shared by every request.
///
/// How the layer uses a store: one [`claim`](Self::claim) per new session and its
/// [`start`](Self::start), one [`append`](Self::append) per batch of events and one
/// [`finish`](Self::finish) from its producer; per reader, a subscription and paged reads (or,
/// with [`SHARED_TAIL`](Self::SHARED_TAIL), one subscription and one read per change for all
/// the readers of a session in a process).
pub trait Store: Clone + Send + Sync + 'static {
    /// The [`Subscription`] this store hands out.
    type Subscription: Subscription;

    /// Whether the layer shares one subscription and one tail of each session among the readers
    /// of a process: it then subscribes once per session and process, reads each change once
    /// (pages of [`TAIL_PAGE_EVENTS`](crate::limits::TAIL_PAGE_EVENTS)) into a tail of its
    /// newest events (at most [`TAIL_CAPACITY_EVENTS`](crate::limits::TAIL_CAPACITY_EVENTS) and
    /// [`TAIL_CAPACITY_BYTES`](crate::limits::TAIL_CAPACITY_BYTES), and always the newest), and serves
    /// every reader at a position the tail holds from it; readers behind the tail (replays) read
    /// the store themselves. The work a networked store does per event then does not grow with
    /// the number of readers. `true` by default; a store whose reads are already in the process
    /// and cheap (the [`MemoryStore`](crate::MemoryStore)) sets `false`, and each reader then
    /// subscribes and reads by itself.
    const SHARED_TAIL: bool = true;

    /// The largest event the store takes, in bytes as it goes on the wire (its `id:`, `event:`
    /// and `data:` lines): a larger one ends its session as failed, as an event above the
    /// layer's [`max_event_size`](crate::ResumableSseLayer::max_event_size) does, with the events
    /// before it kept; it never reaches [`append`](Self::append). No bound by default
    /// (`usize::MAX`); a networked store sets one so that no call carries more
    /// ([`RedisStore`](crate::store::redis::RedisStore):
    /// [`REDIS_MAX_EVENT_BYTES`](crate::limits::REDIS_MAX_EVENT_BYTES), 4 MiB).
    const MAX_EVENT_BYTES: usize = usize::MAX;

    /// Atomically creates a session in [`Status::Starting`] if none exists under `key` (expired
    /// sessions do not exist), or returns the existing one. Exactly one of any number of
    /// concurrent callers, in any number of processes sharing the store, gets
    /// [`Claim::Claimed`]. The new session runs at most `lifetime`: one still running then
    /// (its producer died or hung) ends as [`Outcome::Failed`], or expires, within the store's
    /// own delay to notice (for a store with leases, the lease).
    fn claim(
        &self,
        key: &SessionKey,
        lifetime: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// As [`claim`](Self::claim), except that a session under `key` that has finished and has
    /// the epoch `finished` is replaced: atomically, it is gone (its events with it) and a new
    /// session in [`Status::Starting`] takes its place, so exactly one of any number of
    /// concurrent callers gets [`Claim::Claimed`] and the others find the new session. Any other
    /// session under `key` (running, or of another epoch) is returned as [`Claim::Exists`].
    ///
    /// For [`ResumableSseLayer::restart_finished`](crate::ResumableSseLayer::restart_finished).
    /// The default replaces nothing: it is [`claim`](Self::claim), so with a store that does not
    /// implement it a finished session is answered as if the option were not set.
    fn claim_replacing(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Epoch,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let _ = finished;
        self.claim(key, lifetime)
    }

    /// Moves a claimed session to [`Status::Running`] with the head of its response. Returns
    /// `true` when the session under `key` with this `epoch` is now running (a retry after a lost
    /// reply also gets `true`: the call is idempotent), `false` when the claim was lost meanwhile
    /// (expired, cancelled, taken over): the caller must then not produce.
    fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes a claimed session that will not run (its response was not an event stream).
    fn release(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Appends blocks of events, in order, with consecutive sequence numbers following the
    /// newest stored one, and wakes subscribers; a block whose events are already stored (a
    /// retried append) is skipped, so retries are idempotent. Only a [`Status::Running`] session
    /// accepts events. The store may evict its oldest events to respect its per-session limits.
    fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Ends a running session with `outcome` (a finished session keeps its first outcome), wakes
    /// subscribers, and keeps it readable for the store's retention period.
    fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Returns the current session under `key`, if one exists.
    fn lookup(
        &self,
        key: &SessionKey,
    ) -> impl Future<Output = Result<Option<SessionInfo>, StoreError>> + Send;

    /// Reads up to `max` events with a sequence number greater than `after`, with the status at
    /// that moment. `None` when the session does not exist.
    fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> impl Future<Output = Result<Option<ReadBatch>, StoreError>> + Send;

    /// Subscribes to changes of a session. Changes made after this returns are never missed.
    fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Self::Subscription, StoreError>> + Send;

    /// Resolves when the session is cancelled or no longer exists; the producer then drops the
    /// inner body, which stops the generation.
    fn cancelled(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Cancels the running (or starting) session under `key`: it ends as
    /// [`Outcome::Cancelled`] and its producer stops. Returns whether a session was cancelled;
    /// a finished or missing session is left as it is. This is the "stop generating" button.
    fn cancel(&self, key: &SessionKey) -> impl Future<Output = Result<bool, StoreError>> + Send;
}
