//! [`RedisStore`]: sessions in Redis (or Valkey, or a Redis Cluster), shared by every instance.

// The parts: `keys` names a session's keys; `scripts` holds the Lua scripts (`lua/`) and calls
// them; `codec` turns events and heads into what Redis stores, and replies back; `notify` fans the
// pub/sub announcements out to the local subscribers; `lease` renews the leases of the sessions this process produces.

mod codec;
mod keys;
mod lease;
mod notify;
mod scripts;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::time::Instant;

use self::codec::{
    as_array, as_u64, cut, encode_head, pack_ends, parse_info, parse_read, status_from,
};
use self::keys::Keys;
use self::lease::Lease;
use self::notify::{Notifier, Sessions};
use self::scripts::{script_limit, Scripts};
use super::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError,
};
use crate::session::{Epoch, Outcome, SessionKey};

pub use self::notify::RedisSubscription;

/// Sessions in Redis: every instance behind a load balancer shares them, and they survive the
/// instance that produced them.
///
/// Requires Redis 6.2 or later (stream trimming by `MINID`), Valkey, or a Redis Cluster of them.
///
/// # Layout
///
/// Per session, under one hash tag so that they share a Cluster slot
/// (`<prefix>:{<escaped key>}:...`):
/// - `:meta`, a hash: epoch, status, the response head, the oldest and newest sequence numbers,
///   and the bytes of event data retained;
/// - `:events`, a Redis Stream of **chunks**: each entry holds up to 64 consecutive events (and
///   at most 64 KiB of them, or one larger event) as two values, whatever the number of events:
///   `o`, where each event ends in the chunk (little-endian `u32` offsets, 4 bytes per event),
///   and `d`, the events back to back exactly as they go on the wire. The entry id is the
///   sequence number of the chunk's first event (`<seq>-0`), so that a position is found with one
///   range lookup;
/// - `:lease`, a string with a TTL that the producing process renews; when it expires, the
///   producer is dead.
///
/// The producer's [`EventBlock`]s are cut into chunks in the process, deterministically (a retry
/// cuts the same blocks the same way), and a read gets the chunks back as they are and slices
/// them into the page: Redis and its Lua scripts handle a few strings per chunk, never one per
/// event, and the events reach the client without being split or copied again.
///
/// The session key is percent-escaped into the key name (so `{`, `}`, `*`, `?`, `[`, newlines and
/// every non-alphanumeric byte are inert), and every value reaches the Lua scripts as an argument,
/// never spliced into code.
///
/// # Behaviour
///
/// - **One producer across instances**: the claim is one script; the producer's appends are
///   fenced by its epoch and by the session's status, so a producer that lost the session (it was
///   cancelled, failed or expired) cannot write.
/// - **Batched writes**: one script call per append (store the chunks, trim, renew the TTL,
///   notify); the layer puts every event produced while a write is in flight into the next one.
/// - **Paged reads in one call**: a read finds the chunk holding the position after the reader's
///   and returns it with the chunks after it, up to the requested number of events, together
///   with the session's status.
/// - **Live changes with three connections per process** (on a Cluster, at most three per
///   node), whatever the number of subscribers and sessions: one multiplexed command connection
///   ([`ConnectionManager`], which reconnects by itself) for every read and write, named
///   `resumable-sse:cmd`; one lease connection, `resumable-sse:lease`, that carries nothing but
///   lease renewals and releases, so that no read's reply (up to a megabyte each) can hold a
///   renewal back until leases expire; and one pub/sub connection on which every change of
///   every session is announced on one channel (on a Cluster, on one node at a time: when that
///   node is lost, the process subscribes on another, and every local reader re-reads once
///   subscribed); a subscription waits on an in-memory signal fed by that connection. The
///   layer subscribes once per session and process and shares one tail of the session among
///   the readers of the process ([`Store::SHARED_TAIL`]), so one read per change serves all of
///   them: no blocking command is used, and the Redis work per event does not grow with the
///   number of subscribers. The periodic check below is one task for the process, not a timer
///   per subscriber, and a producer waits on status announcements only, so that it is not woken
///   (and queued behind every subscriber) at each event.
/// - **One lease renewal for the whole process**: every third of the lease, one task renews the
///   leases of every session the process produces, on the lease connection, in one pipeline per
///   256 sessions (on a Cluster, whose sessions live on several nodes, one call per session, all
///   at once): a session costs no task or timer of its own. A lease is renewed until the session's final
///   status is written: a producer whose last write fails keeps it while it retries (the session
///   is not marked failed meanwhile), and lets it go 30 s plus the response timeout after its
///   latest attempt if it gave up.
/// - **Cancels reach the producer** through the status announcement; a producer whose
///   announcement was lost learns at its next renewal (which finds the session no longer
///   running and announces it in the process), within a third of the lease. The producer polls
///   nothing while it waits.
/// - **Producer crash**: a claim whose process dies before its inner service answers is
///   dropped when its lease expires, and the next request claims the key afresh. A producer that
///   dies while running: the lease (default 5 s) expires; the next read, lookup or periodic check
///   of any instance (subscribers check at least every second) marks the session failed, so
///   clients end within the lease TTL plus one second, and reconnects get `204 failed`. The
///   lease is renewed for at most the lifetime given at the claim (the layer's
///   [`max_lifetime`](crate::ResumableSseLayer::max_lifetime) plus a grace): a session still
///   running then is marked failed in the same way, whatever its producer does.
/// - **No leaks**: a running session's keys carry a TTL renewed with the lease (lease + retention),
///   a finished session's keys expire after `retention`, and a session retains at most
///   [`max_bytes_per_session`](RedisStoreBuilder::max_bytes_per_session) bytes of events
///   (64 MiB by default) and, when set,
///   [`max_events_per_session`](RedisStoreBuilder::max_events_per_session) events (no count
///   limit by default). These are *soft* limits: each append trims the oldest whole chunks while
///   one is exceeded, but not the chunks that a reader connected to the producing instance (the
///   first client among them) still needs; those stay up to the *hard* limit,
///   [`hard_max_bytes_per_session`](RedisStoreBuilder::hard_max_bytes_per_session) (256 MiB by
///   default), past which the oldest chunks go whoever needs them. Readers on other instances
///   hold nothing: a soft limit may pass them by. The newest chunk always stays: up to one chunk
///   (64 events, 64 KiB, or one larger event) more than a limit may stay, and a single event
///   larger than the byte limit is kept alone. Trimmed events are gone: a client reading behind
///   them gets the evicted comment and its stream ends; its reconnect, or a new client without
///   `Last-Event-ID` once the first event is gone, is answered `410 evicted`. The byte limits
///   count the events as they go on the wire; Redis adds its own overhead per chunk and 4 bytes
///   per event for their offsets.
/// - **Bounded calls and sessions**: no request or reply carries more than
///   [`REDIS_MAX_EVENT_BYTES`](crate::limits::REDIS_MAX_EVENT_BYTES) (4 MiB) of events, plus
///   their offsets and the key names, whatever the size of the events: an append carries at most
///   [`APPEND_BYTES`](crate::limits::APPEND_BYTES) (1 MiB) or one event, a read at most
///   [`REDIS_READ_BYTES`](crate::limits::REDIS_READ_BYTES) (1 MiB) or one chunk, and an event
///   larger than 4 MiB once encoded fails its session (the events before it are kept), as one
///   above the layer's [`max_event_size`](crate::ResumableSseLayer::max_event_size) does (1 MiB
///   by default, so this bound only matters when that is raised). A new session beyond
///   [`max_sessions`](RedisStoreBuilder::max_sessions) (10,000 by default, counted in Redis for
///   every instance together) is refused with `503` (`session-limit`).
/// - **Redis trouble**: a request that finds Redis down gets the layer's
///   [`OnStoreError`](crate::OnStoreError) answer; a producer retries failed appends with backoff
///   and holds what it produced meanwhile (bounded; the generation waits when the bound is
///   reached). Appends are idempotent: a chunk whose events are all stored is skipped, and one
///   that is partly stored (a retry that grouped events differently) keeps only its events after
///   the newest stored one, so a retry after a lost reply stores nothing twice; events that do not
///   follow the newest stored one are refused with an error, and nothing of that append is
///   stored. If Redis lost the session, its epoch is gone with it: reconnects get
///   `410 unknown-session` and the producer stops; nothing is spliced onto another history.
/// - **Response timeout** (default 10 s, [`RedisStoreBuilder::response_timeout`]): it counts
///   from the moment a command is queued on the shared connection, so it includes the time spent
///   behind every other session's commands; a short one fails healthy commands of a busy process.
///   A server that is down is noticed sooner than this: its connection breaks, or fails to
///   connect within 2 s.
///
/// ```no_run
/// # async fn run() -> Result<(), resumable_sse::store::StoreError> {
/// use std::time::Duration;
/// use resumable_sse::{RedisStore, ResumableSseLayer};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .prefix("myapp:sse")
///     .retention(Duration::from_secs(300))
///     .connect()
///     .await?;
/// let layer = ResumableSseLayer::new(store);
/// # let _ = layer; Ok(()) }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct Config {
    prefix: String,
    retention: Duration,
    lease: Duration,
    max_events_per_session: usize,
    max_bytes_per_session: usize,
    hard_max_bytes_per_session: usize,
    max_sessions: usize,
    check_interval: Duration,
    response_timeout: Duration,
}

struct Inner {
    conn: Conn,
    /// Lease renewals and releases only: nothing else queues on it.
    lease_conn: Conn,
    config: Config,
    channel: String,
    scripts: Scripts,
    notifier: Notifier,
    /// The sessions this process produces, whose leases the renewal task renews.
    renewals: Mutex<HashMap<SessionKey, Lease>>,
    renewal_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [
            &self.renewal_task,
            &self.notifier.task,
            &self.notifier.checks_task,
        ] {
            if let Some(task) = lock(task).take() {
                task.abort();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The command connection: one multiplexed connection, or a cluster connection.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Builds a [`RedisStore`].
///
/// Its `Debug` output shows the server URLs with their password masked
/// ([`redacted_url`]).
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    config: Config,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|n| redacted_url(n)).collect();
        f.debug_struct("RedisStoreBuilder")
            .field("nodes", &nodes)
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish()
    }
}

/// A Redis URL as a log or an error message may show it: its password replaced by `***`. A string that is not a URL is shown as `<not a URL>`, since it may be
/// anything, a password included.
///
/// ```
/// use resumable_sse::store::redis::redacted_url;
///
/// assert_eq!(redacted_url("redis://:hunter2@db:6379/0"), "redis://:***@db:6379/0");
/// assert_eq!(redacted_url("redis://app:hunter2@db/"), "redis://app:***@db/");
/// assert_eq!(redacted_url("redis://db:6379"), "redis://db:6379");
/// assert_eq!(redacted_url("hunter2"), "<not a URL>");
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub fn redacted_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<not a URL>".to_owned();
    };
    if parsed.password().is_some() {
        // Cannot fail on a URL that has a password (it has a host).
        let _ = parsed.set_password(Some("***"));
    }
    parsed.to_string()
}

impl RedisStore {
    /// A builder for a store on the Redis server at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes: vec![url.into()],
            cluster: false,
            config: Config {
                prefix: "resumable-sse".to_owned(),
                retention: Duration::from_secs(300),
                lease: Duration::from_secs(5),
                max_events_per_session: usize::MAX,
                max_bytes_per_session: crate::limits::DEFAULT_MAX_BYTES_PER_SESSION,
                hard_max_bytes_per_session: crate::limits::DEFAULT_HARD_MAX_BYTES_PER_SESSION,
                max_sessions: crate::limits::DEFAULT_MAX_SESSIONS,
                check_interval: Duration::from_secs(1),
                response_timeout: Duration::from_secs(10),
            },
        }
    }

    /// A builder for a store on a Redis Cluster reached through `nodes`.
    pub fn cluster_builder(
        nodes: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisStoreBuilder {
        let mut b = Self::builder(String::new());
        b.nodes = nodes.into_iter().map(Into::into).collect();
        b.cluster = true;
        b
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key and of the notification channel (default `resumable-sse`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// How long a finished session stays resumable (default 5 minutes).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// The producer's lease (default 5 s, at least 100 ms): a producer that dies is detected
    /// within this time plus one second. The lease is renewed every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// The most events kept per session (default: no count limit, sessions are bounded by
    /// [bytes](Self::max_bytes_per_session)).
    ///
    /// After each append, the oldest whole chunks (of up to 64 events) that hold only events
    /// older than the newest `max` are trimmed: up to 63 events more than `max` may stay.
    /// A soft limit: chunks that a reader connected to the producing instance still needs stay,
    /// up to [`hard_max_bytes_per_session`](Self::hard_max_bytes_per_session). Trimmed events
    /// are gone: a client reading behind them gets the evicted comment and its stream ends, and
    /// its reconnect is answered `410 evicted`. At least 1; a limit above 2^53 is no limit.
    pub fn max_events_per_session(mut self, max: usize) -> Self {
        self.config.max_events_per_session = max.max(1);
        self
    }

    /// The most bytes of events kept per session, counted as they go on the wire (default
    /// [`DEFAULT_MAX_BYTES_PER_SESSION`](crate::limits::DEFAULT_MAX_BYTES_PER_SESSION), 64 MiB).
    ///
    /// After each append, the oldest whole chunks (of up to 64 events and 64 KiB, or one larger
    /// event) are trimmed while the session keeps more than `max` bytes, never the newest chunk:
    /// a session keeps at most `max` bytes plus one chunk, and one event larger than `max` is
    /// kept alone. A soft limit: chunks that a reader connected to the producing instance still
    /// needs stay, up to [`hard_max_bytes_per_session`](Self::hard_max_bytes_per_session).
    /// Trimmed events are gone: a client reading behind them gets the evicted comment and its
    /// stream ends, and its reconnect is answered `410 evicted` (as is a new client without
    /// `Last-Event-ID` once the first event is gone). Redis memory per session is this plus its
    /// overhead: about 4 bytes per event and a few dozen per chunk. At least 1; a limit above
    /// 2^53 is no limit.
    pub fn max_bytes_per_session(mut self, max: usize) -> Self {
        self.config.max_bytes_per_session = max.max(1);
        self
    }

    /// The most bytes of events a session may keep at all (default
    /// [`DEFAULT_HARD_MAX_BYTES_PER_SESSION`](crate::limits::DEFAULT_HARD_MAX_BYTES_PER_SESSION),
    /// 256 MiB; never below [`max_bytes_per_session`](Self::max_bytes_per_session)): past it the
    /// oldest chunks are trimmed even when a connected reader still needs them, and that
    /// reader's stream ends with the evicted comment.
    pub fn hard_max_bytes_per_session(mut self, max: usize) -> Self {
        self.config.hard_max_bytes_per_session = max.max(1);
        self
    }

    /// The most sessions the store holds, counted in Redis and shared by every instance that
    /// uses the same Redis and [`prefix`](Self::prefix) (default
    /// [`DEFAULT_MAX_SESSIONS`](crate::limits::DEFAULT_MAX_SESSIONS), 10,000, as
    /// [`MemoryStore`](crate::MemoryStore)): a new session beyond it is refused with
    /// `503 Service Unavailable` (`session-limit`); existing sessions, and reconnects to them,
    /// are unaffected. `0` refuses every new session; `usize::MAX` is no limit (and saves the
    /// call that counts).
    ///
    /// The count is one sorted set, `<prefix>:sessions`, updated atomically by a script at each
    /// new session, so concurrent instances never admit more than `max` between them. A session
    /// counts from its claim until its keys expire: a finished one for its retention, a running
    /// one until it ends. A session whose end the count does not hear of (its producer died, or
    /// Redis failed the update) counts for at most its lifetime plus the lease and the
    /// retention, the longest its keys can live; one that was released (its response was not an
    /// event stream) stops counting at once. The set holds at most `max` members, and expires
    /// with its longest-lived one.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.config.max_sessions = max;
        self
    }

    /// How long a command may wait for its reply (default 10 s, at least 100 ms) before it fails
    /// as [`Unavailable`](super::StoreErrorKind::Unavailable).
    ///
    /// Every session of the process shares one command connection (lease renewals have one of
    /// their own, with the same timeout), and the time counts from the moment a command is
    /// queued on it: it includes the wait behind the commands queued before. Keep it well above
    /// the time Redis takes to work through a burst (a few seconds); a server that is down is
    /// noticed without it, when its connection breaks.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Connects: a command connection, a lease connection and a pub/sub connection per process
    /// (on a Cluster, the first two on every node, the last on one node). Fails with
    /// [`Unavailable`](super::StoreErrorKind::Unavailable) (the Redis error as its source) when
    /// the URL is not valid or no server answers.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        self.try_connect().await.map_err(unavailable)
    }

    async fn try_connect(self) -> RedisResult<RedisStore> {
        use crate::limits::{REDIS_COMMAND_CONNECTION_NAME, REDIS_LEASE_CONNECTION_NAME};
        let seeds = self
            .nodes
            .iter()
            .map(|n| redis::Client::open(n.as_str()))
            .collect::<RedisResult<Vec<_>>>()?;
        let first = match seeds.first() {
            Some(client) => client.clone(),
            None => redis::Client::open("")?,
        };
        // The command connection first (on a Cluster, one per node for each).
        let conn = self
            .connection(&first, REDIS_COMMAND_CONNECTION_NAME)
            .await?;
        let lease_conn = self.connection(&first, REDIS_LEASE_CONNECTION_NAME).await?;
        let channel = format!("{}:notify", self.config.prefix);
        let inner = Arc::new(Inner {
            conn,
            lease_conn,
            channel,
            scripts: Scripts::new(),
            notifier: Notifier {
                seeds,
                cluster: self.cluster,
                sessions: Mutex::new(Sessions::default()),
                task: Mutex::new(None),
                checks_task: Mutex::new(None),
            },
            renewals: Mutex::new(HashMap::new()),
            renewal_task: Mutex::new(None),
            config: self.config,
        });
        Notifier::start(&inner);
        Notifier::start_checks(&inner);
        Inner::start_renewals(&inner);
        Ok(RedisStore { inner })
    }
}

impl RedisStoreBuilder {
    /// A multiplexed connection to the server (`first`), or a connection to the Cluster, named
    /// `name`.
    async fn connection(&self, first: &redis::Client, name: &str) -> RedisResult<Conn> {
        let timeout = self.config.response_timeout;
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .response_timeout(timeout)
                .connection_timeout(crate::limits::REDIS_CONNECT_TIMEOUT)
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(crate::limits::REDIS_CONNECT_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(ConnectionManager::new_with_config(first.clone(), config).await?)
        };
        name_connection(&conn, name).await;
        Ok(conn)
    }
}

/// Names a connection (`CLIENT SETNAME`; on a Cluster, on every node), so that `CLIENT LIST`
/// shows what it is for. A server that refuses is not an error: the name is only shown.
async fn name_connection(conn: &Conn, name: &str) {
    let mut conn = conn.clone();
    let named = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async::<Value>(&mut conn)
        .await;
    if let Err(e) = named {
        tracing::debug!(error = %e, name, "could not name a Redis connection");
    }
}

impl Inner {
    /// The keys of a session: those already built for its local readers or its producer, or
    /// new ones.
    fn keys(&self, key: &SessionKey) -> Arc<Keys> {
        if let Some(local) = lock(&self.notifier.sessions).map.get(&key.digest()) {
            // Another session's, when their digests collide.
            if local.keys.key == *key {
                return local.keys.clone();
            }
        }
        if let Some(lease) = lock(&self.renewals).get(key) {
            return lease.keys.clone();
        }
        Arc::new(Keys::new(&self.config.prefix, key))
    }

    /// Counts a new session in the set of live sessions if there is room (or it is counted
    /// already): `false` when the store is full. It counts, to begin with, for the longest its
    /// keys can live: its `lifetime`, the lease and the retention.
    async fn admit(&self, keys: &Keys, lifetime: Duration) -> Result<bool, StoreError> {
        let max = self.config.max_sessions;
        if max == usize::MAX {
            return Ok(true);
        }
        // Lua counts exactly up to 2^53: a larger limit is no limit.
        let max = i64::try_from(max)
            .ok()
            .filter(|m| *m <= 1 << 53)
            .unwrap_or(-1);
        let mut call = self.count_call(&self.scripts.admit, keys, 2);
        call.arg(max).arg(millis(
            lifetime.saturating_add(self.config.lease + self.config.retention),
        ));
        match as_u64(&self.invoke(&call).await?) {
            Some(admitted) => Ok(admitted == 1),
            None => Err(bad_reply("admit")),
        }
    }

    /// Tells the set of live sessions that a session ended (it counts for `retention` more, as
    /// long as its keys live) or, with `None`, that it is gone. Best effort: if the call fails,
    /// the session counts until the bound it was admitted with.
    async fn recount(&self, keys: &Keys, retention: Option<Duration>) {
        if self.config.max_sessions == usize::MAX {
            return;
        }
        let mut call = self.count_call(&self.scripts.recount, keys, 1);
        call.arg(retention.map_or(-1, |r| i64::try_from(millis(r)).unwrap_or(i64::MAX)));
        if let Err(e) = self.invoke(&call).await {
            tracing::debug!(error = %e, "could not update the count of live sessions");
        }
    }

    fn ttl_ms(&self) -> u64 {
        millis(self.config.lease + self.config.retention)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::unavailable(e)
}

fn bad_reply(what: &str) -> StoreError {
    StoreError::unavailable(format!("unexpected reply from Redis to {what}"))
}

/// Runs `tick` every `every` (the first time after `every`, later ones delayed rather than
/// bunched when a tick runs long) for as long as the store is alive.
fn spawn_periodic<F, Fut>(inner: &Arc<Inner>, every: Duration, tick: F) -> tokio::task::AbortHandle
where
    F: Fn(Arc<Inner>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            tick(inner).await;
        }
    })
    .abort_handle()
}

/// The most bytes of events one read brings back (at least one chunk).
const READ_BYTES: usize = crate::limits::REDIS_READ_BYTES;

// --- The store ---------------------------------------------------------------------------------

impl RedisStore {
    /// The status of the session if `epoch` is its current one (`Nil` otherwise).
    async fn status(&self, keys: &Keys, epoch: Epoch) -> Result<Value, StoreError> {
        let inner = &self.inner;
        let mut call = inner.call(&inner.scripts.status, keys, 1, 24);
        call.arg(epoch.raw());
        inner.invoke(&call).await
    }
}

impl RedisStore {
    /// [`Store::claim`], and with `finished` [`Store::claim_replacing`].
    async fn claim_over(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Option<Epoch>,
    ) -> Result<Claim, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        // Counted first: a session that exists is counted already and always admitted, so a
        // full store refuses new sessions only.
        if !inner.admit(&keys, lifetime).await? {
            return Err(StoreError::session_limit());
        }
        let epoch = Epoch::random();
        let mut call = inner.call(&inner.scripts.claim, &keys, 5, 104);
        call.arg(epoch.raw())
            .arg(millis(inner.config.lease))
            .arg(inner.ttl_ms())
            .arg(millis(inner.config.retention));
        match finished {
            Some(e) => call.arg(e.raw()),
            None => call.arg(""),
        };
        let reply = inner.invoke(&call).await?;
        let a = as_array(&reply).ok_or_else(|| bad_reply("claim"))?;
        match a {
            [flag] if as_u64(flag) == Some(1) => {
                // Renewed for at most `lifetime`: a session whose producer has not ended it by
                // then is marked failed when the lease expires.
                inner.hold_lease(key, epoch, lifetime);
                Ok(Claim::Claimed(epoch))
            }
            [_, info] => parse_info(info)
                .map(Claim::Exists)
                .ok_or_else(|| bad_reply("claim")),
            _ => Err(bad_reply("claim")),
        }
    }
}

impl Store for RedisStore {
    type Subscription = RedisSubscription;

    /// No call carries more than about 4 MiB of events.
    const MAX_EVENT_BYTES: usize = crate::limits::REDIS_MAX_EVENT_BYTES;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        self.claim_over(key, lifetime, None).await
    }

    async fn claim_replacing(
        &self,
        key: &SessionKey,
        lifetime: Duration,
        finished: Epoch,
    ) -> Result<Claim, StoreError> {
        self.claim_over(key, lifetime, Some(finished)).await
    }

    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let head = encode_head(&head);
        let mut call = inner.call(&inner.scripts.start, &keys, 2, 32 + head.len());
        call.arg(epoch.raw()).arg(head);
        match as_u64(&inner.invoke(&call).await?) {
            Some(1) => Ok(true),
            Some(_) => {
                // The claim was lost (expired, cancelled or taken over): nothing to renew.
                inner.release_lease(key, epoch);
                Ok(false)
            }
            None => Err(bad_reply("start")),
        }
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        inner.release_lease(key, epoch);
        let mut call = inner.call(&inner.scripts.release, &keys, 1, 32);
        call.arg(epoch.raw());
        let released = inner.invoke_lease(&inner.scripts.release, &call).await?;
        if as_u64(&released) == Some(1) {
            inner.recount(&keys, None).await;
        }
        Ok(())
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        if blocks.is_empty() {
            return Ok(Appended::Stored);
        }
        let inner = &self.inner;
        let keys = inner.keys(key);
        let chunks: Vec<EventBlock> = blocks.iter().flat_map(cut).collect();
        let bytes: usize = chunks
            .iter()
            .map(|c| c.bytes().len() + 4 * c.len() + 32)
            .sum();
        let mut call = inner.call(
            &inner.scripts.append,
            &keys,
            6 + 3 * chunks.len(),
            112 + bytes,
        );
        // What the readers of this session in this process still need is kept past the soft
        // limits (the first client, served by the instance that produces, among them).
        let pinned = match inner.notifier.pinned(key, epoch) {
            Some(seq) => i64::try_from(seq).unwrap_or(i64::MAX),
            None => -1,
        };
        let hard = inner
            .config
            .hard_max_bytes_per_session
            .max(inner.config.max_bytes_per_session);
        call.arg(epoch.raw())
            .arg(inner.ttl_ms())
            .arg(script_limit(inner.config.max_events_per_session))
            .arg(script_limit(inner.config.max_bytes_per_session))
            .arg(script_limit(hard))
            .arg(pinned);
        let mut ends = Vec::new();
        for chunk in &chunks {
            pack_ends(chunk, &mut ends);
            call.arg(chunk.first_seq())
                .arg(&ends[..])
                .arg(&chunk.bytes()[..]);
        }
        match as_u64(&inner.invoke(&call).await?) {
            Some(1) => Ok(Appended::Stored),
            Some(_) => Ok(Appended::Stopped),
            None => Err(bad_reply("append")),
        }
    }

    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        // The lease is kept, and renewed, until the final status is written: a producer whose
        // call fails retries, and its session must not be marked failed meanwhile because the
        // lease expired.
        inner.finishing(key, epoch);
        let mut call = inner.call(&inner.scripts.finish, &keys, 3, 64);
        call.arg(epoch.raw())
            .arg(outcome.reason().as_str())
            .arg(millis(inner.config.retention));
        // 1: finished now; 0: it had already ended (a retry after a lost reply, a cancel, a
        // takeover). Either way there is nothing left to renew.
        let finished = as_u64(&inner.invoke(&call).await?) == Some(1);
        inner.release_lease(key, epoch);
        if finished {
            inner.recount(&keys, Some(inner.config.retention)).await;
        }
        Ok(())
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut call = inner.call(&inner.scripts.lookup, &keys, 1, 24);
        call.arg(millis(inner.config.retention));
        match inner.invoke(&call).await? {
            Value::Nil => Ok(None),
            v => parse_info(&v).map(Some).ok_or_else(|| bad_reply("lookup")),
        }
    }

    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut call = inner.call(&inner.scripts.read, &keys, 5, 80);
        call.arg(millis(inner.config.retention))
            .arg(epoch.raw())
            .arg(after)
            .arg(max)
            .arg(READ_BYTES);
        parse_read(inner.invoke(&call).await?, after, max)
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        epoch: Epoch,
    ) -> Result<RedisSubscription, StoreError> {
        let keys = self.inner.keys(key);
        Ok(RedisSubscription::new(
            self.inner.notifier.subscribe(&keys, epoch),
            self.inner.config.check_interval,
        ))
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let keys = self.inner.keys(key);
        // Subscribed before the first check: a change after it wakes the wait below.
        let mut rx = self.inner.notifier.subscribe_status(&keys);
        loop {
            // Boxed, like the reads: the call's state takes memory while it is in flight, not
            // for the producer's whole life.
            match Box::pin(self.status(&keys, epoch)).await? {
                Value::Nil => return Ok(()),
                v => match status_from(&v) {
                    Some(Status::Finished(Outcome::Cancelled)) | None => return Ok(()),
                    Some(_) => {}
                },
            }
            // Only a status announcement can mean a cancel; the lease renewal announces, in this
            // process, a session it found ended or gone (covering a lost announcement). Event
            // announcements do not wake this wait.
            if rx.changed().await.is_err() {
                // The store is gone: nothing will announce anything any more.
                std::future::pending::<()>().await;
            }
        }
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut call = inner.call(&inner.scripts.finish, &keys, 3, 48);
        call.arg("")
            .arg(Outcome::Cancelled.reason().as_str())
            .arg(millis(inner.config.retention));
        let cancelled = as_u64(&inner.invoke(&call).await?) == Some(1);
        if cancelled {
            inner.recount(&keys, Some(inner.config.retention)).await;
        }
        Ok(cancelled)
    }
}
