//! Every size and limit in the crate, in one place: the page, block, chunk and batch sizes the
//! layer and its stores work in, and the defaults of every configurable limit.
//!
//! None of the sizes changes what a client receives: a stream ends exactly once, with every event
//! once, whatever the number of events and however it divides by these sizes. They are public so
//! that tests (the crate's edge matrix among them) and capacity planning can derive their cases
//! from them rather than repeat the numbers.

use std::time::Duration;

/// The most events one read of a session fetches from its store for one connection
/// (a replay of more goes out in several reads).
pub const READ_PAGE_EVENTS: usize = 1024;

/// The longest request path that scopes a session key ([`KeyScope::Path`](crate::KeyScope::Path),
/// the default), in bytes; a longer one is answered `400` with `invalid-session-key`.
pub const MAX_SCOPE_LEN: usize = 1024;

/// The events one read of a session's shared tail asks for (stores with
/// [`Store::SHARED_TAIL`](crate::store::Store::SHARED_TAIL)): one read per change while the
/// tail keeps up, several in a row when it is further behind.
pub const TAIL_PAGE_EVENTS: usize = 1024;

/// The newest events of a session that each process keeps in the session's shared tail, for
/// all its readers there (stores with [`Store::SHARED_TAIL`](crate::store::Store::SHARED_TAIL)),
/// and within [`TAIL_CAPACITY_BYTES`] too. A reader further behind reads the store itself, page
/// by page, until it reaches the tail.
pub const TAIL_CAPACITY_EVENTS: usize = 4096;

/// The most bytes the producer encodes into one [`EventBlock`](crate::store::EventBlock)
/// (a larger event is a block of its own). A reader sends a block, or its part after the
/// reader's position, as one write.
pub const BLOCK_BYTES: usize = 64 << 10;

/// The most bytes of events the producer hands to one append, unless one block is larger:
/// a networked store's call (and the connection every session of the process shares) is not held
/// for long by a burst, so lease renewals and reads are not queued behind it.
pub const APPEND_BYTES: usize = 1 << 20;

/// The most events the producer takes from the frames its inner body already has ready before it
/// appends them (one append, one notification, one wake-up per reader for all of them).
pub const READY_BATCH_EVENTS: usize = 1024;

/// Events the producer holds while its store does not take them (Redis slow or down); beyond
/// this the inner body is not polled until the store catches up: nothing is dropped.
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// Bytes of events the producer holds while its store does not take them, whatever their
/// number: beyond this (plus the event that crosses it) the inner body is not polled until the
/// store catches up, so a slow store costs a session at most this much memory in the process,
/// whatever the size of its events. Nothing is dropped.
pub const MAX_PENDING_BYTES: usize = 16 << 20;

/// Consecutive failed appends (each after a backoff) before a session is given up as failed.
pub const MAX_APPEND_FAILURES: u32 = 8;

/// Calls of `Store::start` (the first and its retries, each after a backoff) before a response
/// whose session cannot be started is served as it is, unresumable.
pub const START_ATTEMPTS: u32 = 4;

/// The longest session key, in bytes; a longer one is answered `400 invalid-session-key`.
pub const MAX_SESSION_KEY_LEN: usize = crate::session::MAX_SESSION_KEY_LEN;

/// The default of [`ResumableSseLayer::max_event_size`](crate::ResumableSseLayer::max_event_size).
pub const DEFAULT_MAX_EVENT_SIZE: usize = crate::sse::DEFAULT_MAX_EVENT_SIZE;

/// The default of [`ResumableSseLayer::max_lifetime`](crate::ResumableSseLayer::max_lifetime).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The default keep-alive interval ([`ResumableSseLayer::keep_alive`](crate::ResumableSseLayer::keep_alive)).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The default retention of a finished session, on every store.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(300);

/// The default most sessions a [`MemoryStore`](crate::MemoryStore) holds.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;

/// The default most encoded bytes a session retains, on every store: the hard bound on a
/// session's memory. A session is bounded by bytes by default; an event count bound applies
/// only when one is asked for (`max_events_per_session`).
pub const DEFAULT_MAX_BYTES_PER_SESSION: usize = 64 << 20;

/// The default hard bound on a session's retained bytes, on every store: past the soft bound
/// ([`DEFAULT_MAX_BYTES_PER_SESSION`], or the event count when one is set), events that a
/// connected reader still needs are kept, up to this many bytes; beyond it the oldest go whoever
/// needs them, and such a reader's stream ends with [`EVICTED_COMMENT`](crate::sse::EVICTED_COMMENT).
pub const DEFAULT_HARD_MAX_BYTES_PER_SESSION: usize = 256 << 20;

/// The most events in one Redis stream entry (a chunk).
pub const REDIS_CHUNK_EVENTS: usize = 64;

/// The most bytes in one Redis stream entry, unless it holds one larger event.
pub const REDIS_CHUNK_BYTES: usize = 64 << 10;

/// The most bytes of events one Redis read brings back (at least one chunk): a page of large
/// events is cut short, so that no reply holds the connection that every session of the process
/// shares (lease renewals included) for long.
pub const REDIS_READ_BYTES: usize = 1 << 20;

/// The largest event a [`RedisStore`](crate::store::redis::RedisStore) takes, encoded as it goes
/// on the wire ([`Store::MAX_EVENT_BYTES`](crate::store::Store::MAX_EVENT_BYTES)): a larger one
/// fails its session, as an event above
/// [`max_event_size`](crate::ResumableSseLayer::max_event_size) does, with the events before it
/// kept. With [`APPEND_BYTES`] and [`REDIS_READ_BYTES`] it bounds every call: no request or reply
/// carries more than 4 MiB of events (plus their offsets, 4 bytes per event, and the key names),
/// whatever the event sizes, so that no call holds Redis, or the connection the process shares,
/// for long.
pub const REDIS_MAX_EVENT_BYTES: usize = 4 << 20;

/// Lease renewals sent in one pipeline.
pub const REDIS_RENEWALS_PER_CALL: usize = 256;

/// The name a Redis store gives its command connection (`CLIENT SETNAME`), the one that carries
/// every read and write, so that `CLIENT LIST` shows it (on every node of a Cluster).
pub const REDIS_COMMAND_CONNECTION_NAME: &str = "resumable-sse:cmd";

/// The name a Redis store gives its lease connection (`CLIENT SETNAME`), which carries nothing
/// but lease renewals and releases: no reply to a read can delay them.
pub const REDIS_LEASE_CONNECTION_NAME: &str = "resumable-sse:lease";

/// How long a Redis store waits for a connection to a Redis server (or a Cluster node) to open.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The wait before a Redis store's notifier subscribes again after its first failed attempt in a
/// row; each further failed attempt doubles it, up to [`REDIS_NOTIFY_RETRY_MAX`]. On a Cluster,
/// each attempt goes to the next node.
pub const REDIS_NOTIFY_RETRY_MIN: Duration = Duration::from_millis(100);

/// The longest wait between two attempts of a Redis store's notifier to subscribe again.
pub const REDIS_NOTIFY_RETRY_MAX: Duration = Duration::from_millis(1600);

/// How often a Redis store's notifier pings its pub/sub connection: a connection whose server
/// vanished without closing it (a lost host, a partition) fails within this plus the response
/// timeout, and the notifier subscribes again (on a Cluster, on another node).
pub const REDIS_NOTIFY_PING_INTERVAL: Duration = Duration::from_secs(5);

/// The most encoded bytes of events that each process keeps in a session's shared tail (stores
/// with [`Store::SHARED_TAIL`](crate::store::Store::SHARED_TAIL)), beside
/// [`TAIL_CAPACITY_EVENTS`]: the tail keeps the newest events within both bounds, and always at
/// least the newest event (so it holds at most this plus one event, which the layer's
/// [`max_event_size`](crate::ResumableSseLayer::max_event_size) bounds). A reader further behind
/// reads the store itself, page by page, until it reaches the tail. At 4 MiB, a tail of small
/// events (LLM tokens) is bounded by its count, one of 1 MiB events holds the newest four.
pub const TAIL_CAPACITY_BYTES: usize = 4 << 20;
