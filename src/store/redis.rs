//! [`RedisStore`]: sessions in Redis (or Valkey, or a Redis Cluster), shared by every instance.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, Script, ServerErrorKind, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::block::{drop_oldest, Page};
use super::{
    Appended, Claim, EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError,
    Subscription,
};
use crate::session::{Epoch, Outcome, SessionKey};

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
/// - **Live tail with two connections per process**, whatever the number of subscribers and
///   sessions: one multiplexed command connection ([`ConnectionManager`], which reconnects by
///   itself) and one pub/sub connection on which every change of every session is announced on one
///   channel; subscribers in the process wait on an in-memory signal fed by that connection, and
///   read from a **shared tail** of the session kept in the process (its newest 4,096 events, in
///   the chunks read from Redis), which one read per change refreshes for all of them, before
///   they are woken. No blocking command is used, and the Redis work per event does not grow with
///   the number of subscribers. The periodic check below is one task for the process, not a
///   timer per subscriber, and a producer waits on status announcements only, so that it is not
///   woken (and queued behind every subscriber) at each event.
/// - **One lease renewal for the whole process**: every third of the lease, one task renews the
///   leases of every session the process produces, in one pipeline per 256 sessions (on a
///   Cluster, whose sessions live on several nodes, one call per session, all at once): a
///   session costs no task or timer of its own. A lease is renewed until the session's final
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
///   clients end within the lease TTL plus one second, and reconnects get `204 failed`.
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
/// # async fn run() -> Result<(), redis::RedisError> {
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
    check_interval: Duration,
    response_timeout: Duration,
}

struct Inner {
    conn: Conn,
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
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    config: Config,
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

    /// How long a command may wait for its reply (default 10 s, at least 100 ms) before it fails
    /// as [`Unavailable`](super::StoreErrorKind::Unavailable).
    ///
    /// Every session of the process shares one connection, and the time counts from the moment
    /// a command is queued on it: it includes the wait behind the commands queued before. Keep it
    /// well above the time Redis takes to work through a burst (a few seconds); a server that is
    /// down is noticed without it, when its connection breaks.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Connects: one command connection and one pub/sub connection per process.
    pub async fn connect(self) -> RedisResult<RedisStore> {
        let first = self.nodes.first().cloned().unwrap_or_default();
        let pubsub_client = redis::Client::open(first.as_str())?;
        let timeout = self.config.response_timeout;
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .response_timeout(timeout)
                .connection_timeout(Duration::from_secs(2))
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(ConnectionManager::new_with_config(pubsub_client.clone(), config).await?)
        };
        let channel = format!("{}:notify", self.config.prefix);
        let inner = Arc::new(Inner {
            conn,
            channel,
            scripts: Scripts::new(),
            notifier: Notifier {
                client: pubsub_client,
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

/// Percent-escapes a session key for use inside a key name and a hash tag.
fn escape(key: &SessionKey) -> String {
    const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(key.as_str(), SAFE).to_string()
}

/// The Redis keys of one session, built once per session and shared by the callers that use it
/// (its producer, its local readers).
struct Keys {
    /// `<prefix>:{<escaped key>}`, which each key name continues.
    base: Box<str>,
    /// The session key itself: announcements name the session with it.
    key: SessionKey,
}

impl Keys {
    fn new(prefix: &str, key: &SessionKey) -> Self {
        Keys {
            base: format!("{prefix}:{{{}}}", escape(key)).into(),
            key: key.clone(),
        }
    }

    fn meta(&self) -> KeyName<'_> {
        KeyName(&self.base, ":meta")
    }

    fn events(&self) -> KeyName<'_> {
        KeyName(&self.base, ":events")
    }

    fn lease(&self) -> KeyName<'_> {
        KeyName(&self.base, ":lease")
    }
}

/// A key name written as one argument straight from its two parts.
#[derive(Clone, Copy)]
struct KeyName<'a>(&'a str, &'static str);

impl KeyName<'_> {
    fn len(self) -> usize {
        self.0.len() + self.1.len()
    }
}

impl redis::ToRedisArgs for KeyName<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's buffer cannot fail.
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

impl Inner {
    /// The keys of a session: those already built for its local readers or its producer, or
    /// new ones.
    fn keys(&self, key: &SessionKey) -> Arc<Keys> {
        if let Some(local) = lock(&self.notifier.sessions).map.get(key.as_str()) {
            return local.keys.clone();
        }
        if let Some(lease) = lock(&self.renewals).get(key) {
            return lease.keys.clone();
        }
        Arc::new(Keys::new(&self.config.prefix, key))
    }

    fn ttl_ms(&self) -> u64 {
        millis(self.config.lease + self.config.retention)
    }
}

/// A limit as the scripts take it: Lua numbers are doubles, so a limit beyond 2^53 (such as
/// `usize::MAX`, "no limit") is passed as 0, which the scripts read as "no limit".
fn script_limit(max: usize) -> u64 {
    match u64::try_from(max) {
        Ok(max) if max <= 1 << 53 => max,
        _ => 0,
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

// --- Lua scripts -------------------------------------------------------------------------------
//
// KEYS: meta, events, lease. Common ARGV prefix: channel, notification message (the session key).
// Status values: starting, running, completed, failed, cancelled.
// Sequence numbers are handled as Lua numbers (doubles): exact up to 2^53.

/// Marks a session whose producer lost its lease as failed. Shared by the scripts that read.
const CHECK_LEASE: &str = r#"
local function check_lease(st, ttl_retention)
  if (st == 'starting' or st == 'running') and redis.call('EXISTS', KEYS[3]) == 0 then
    if st == 'starting' then
      -- Claimed by a process that died before its response came: as if never claimed.
      redis.call('DEL', KEYS[1], KEYS[2])
      redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
      return false
    end
    redis.call('HSET', KEYS[1], 'status', 'failed')
    redis.call('PEXPIRE', KEYS[1], ttl_retention)
    redis.call('PEXPIRE', KEYS[2], ttl_retention)
    redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
    return 'failed'
  end
  return st
end
local function info(st)
  local m = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'last')
  return {m[1], st, m[2], m[3], m[4]}
end
"#;

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms, retention_ms
const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if st then st = check_lease(st, ARGV[6]) end
if st then
  return {0, info(st)}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'status', 'starting', 'first', 1, 'last', 0, 'bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return {1}
"#;

/// ARGV: channel, msg, epoch, head
const START: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] then
  return 0
end
if m[2] == 'running' then
  -- A retry after a lost reply: already started.
  return 1
end
if m[2] ~= 'starting' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running', 'head', ARGV[4])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, epoch
const RELEASE: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] or m[2] ~= 'starting' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, epoch, ttl_ms, max_events, max_bytes, hard_max_bytes (0: no limit),
/// pinned (-1: none), then per chunk: first seq, ends (little-endian u32 offsets), data. Returns
/// 1 when stored (or already stored), 0 when the session does not take events; an error when the
/// events do not follow the newest stored one.
///
/// After storing, the oldest whole chunks are trimmed while the session keeps more than
/// `max_events` events or more than `max_bytes` bytes of event data (`bytes` in the meta hash:
/// the sum of the retained chunks' `d` lengths), except chunks holding an event after `pinned`
/// (what a connected reader of the producing process still needs), and, whoever needs them,
/// while it keeps more than `hard_max_bytes`; the newest chunk is always kept. A trimmed chunk is
/// read once to learn its size, so trimming costs about what its append did.
const APPEND: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status', 'first', 'last', 'bytes')
if m[1] ~= ARGV[3] or m[2] ~= 'running' then
  return 0
end
local last = tonumber(m[4])
-- Check the whole append before writing anything: every chunk is already stored, or follows.
local upto = last
for i = 9, #ARGV, 3 do
  local first, n = tonumber(ARGV[i]), #ARGV[i + 1] / 4
  if not first or first < 1 or n < 1 or n % 1 ~= 0 then
    return redis.error_reply('ERR resumable-sse: malformed chunk')
  end
  if first + n - 1 > upto then
    if first > upto + 1 then
      return redis.error_reply(string.format(
        'ERR resumable-sse: events must be appended in order: got %d after %d', first, upto))
    end
    upto = first + n - 1
  end
end
-- Idempotent: a retried append whose reply was lost stores nothing twice.
if upto == last then
  return 1
end
local bytes = math.max(tonumber(m[5]) or 0, 0)
for i = 9, #ARGV, 3 do
  local id, ends, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local first, n = tonumber(id), #ends / 4
  if first + n - 1 > last then
    if first <= last then
      -- Partly stored (a retry that grouped the events differently): keep what follows `last`.
      local skip = last - first + 1
      local base = struct.unpack('<I4', ends, 4 * skip - 3)
      local rest = {}
      for k = skip + 1, n do
        rest[#rest + 1] = struct.pack('<I4', struct.unpack('<I4', ends, 4 * k - 3) - base)
      end
      ends, data = table.concat(rest), string.sub(data, base + 1)
      first, n = last + 1, n - skip
      id = string.format('%d', first)
    end
    redis.call('XADD', KEYS[2], id .. '-0', 'o', ends, 'd', data)
    last = first + n - 1
    bytes = bytes + #data
  end
end
-- Trim whole chunks, oldest first, while a limit is exceeded; never the newest chunk.
local max_events, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local hard_max_bytes, pinned = tonumber(ARGV[7]), tonumber(ARGV[8])
local keep_from = 0
if max_events > 0 then keep_from = last - max_events + 1 end
local old_first = tonumber(m[3])
local first = old_first
local function over(chunk_last)
  if hard_max_bytes > 0 and bytes > hard_max_bytes then return true end
  if pinned >= 0 and chunk_last > pinned then return false end
  return (max_bytes > 0 and bytes > max_bytes) or chunk_last < keep_from
end
local done = false
while not done and over(first) do
  local e = redis.call('XRANGE', KEYS[2], string.format('%d-0', first), '+', 'COUNT', 16)
  if #e < 16 then done = true end
  for j = 1, #e do
    local id, f = e[j][1], e[j][2]
    local size, n = nil, nil
    for k = 1, #f, 2 do
      if f[k] == 'o' then n = #f[k + 1] / 4 elseif f[k] == 'd' then size = #f[k + 1] end
    end
    local chunk_last = tonumber(string.match(id, '^(%d+)')) + (n or 1) - 1
    if chunk_last >= last or not size or not over(chunk_last) then
      done = true
      break
    end
    bytes = bytes - size
    first = chunk_last + 1
  end
end
if first > old_first then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', first))
end
redis.call('HSET', KEYS[1], 'last', string.format('%d', last), 'first', string.format('%d', first),
  'bytes', string.format('%d', math.max(bytes, 0)))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], 'e' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, epoch, outcome, retention_ms. Also used to cancel (epoch empty: any).
const FINISH: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
local st = m[2]
if not st or (ARGV[3] ~= '' and m[1] ~= ARGV[3]) then
  return 0
end
if st ~= 'starting' and st ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, retention_ms
const LOOKUP: &str = r#"
local st = check_lease(redis.call('HGET', KEYS[1], 'status'), ARGV[3])
if not st then return false end
return info(st)
"#;

/// ARGV: channel, msg, retention_ms, epoch, after, max_events, max_bytes.
/// Returns {status, first, last, entries}: the raw stream entries holding the events
/// (after, after + max] (from the oldest retained one when `after` was evicted), stopping after
/// the entry that brings their data to `max_bytes` (at least one entry), so that no reply holds
/// the shared connection for long.
const READ: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status', 'first', 'last')
if m[1] ~= ARGV[4] then return false end
local st = check_lease(m[2], ARGV[3])
if not st then return false end
local after = math.max(tonumber(ARGV[5]), tonumber(m[3]) - 1)
local upto = math.min(after + tonumber(ARGV[6]), tonumber(m[4]))
local entries = {}
if upto > after then
  -- Entries are keyed by their first sequence number: the one holding after + 1 is the last
  -- that starts at or before it; the range after it is bounded by sequence, so a read moves
  -- what it asked for and at most one chunk's worth before it.
  local from = string.format('%d-0', after + 1)
  local e = redis.call('XREVRANGE', KEYS[2], from, '-', 'COUNT', 1)
  if #e > 0 then
    from = string.format('%d-0', tonumber(string.match(e[1][1], '^(%d+)')) + 1)
  end
  local to, budget, size = string.format('%d-0', upto), tonumber(ARGV[7]), 0
  local function size_of(entry)
    local f = entry[2]
    for k = 1, #f, 2 do
      if f[k] == 'd' then return #f[k + 1] end
    end
    return 0
  end
  if #e > 0 then
    entries[1] = e[1]
    size = size_of(e[1])
  end
  while size < budget do
    local batch = redis.call('XRANGE', KEYS[2], from, to, 'COUNT', 16)
    for j = 1, #batch do
      entries[#entries + 1] = batch[j]
      size = size + size_of(batch[j])
      if size >= budget then break end
    end
    if #batch < 16 then break end
    from = '(' .. batch[#batch][1]
  end
end
return {st, m[3], m[4], entries}
"#;

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms
const RENEW: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] or (m[2] ~= 'starting' and m[2] ~= 'running') then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"#;

/// ARGV: channel, msg, epoch
const STATUS: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] then return false end
return m[2]
"#;

struct Scripts {
    claim: Script,
    start: Script,
    release: Script,
    append: Script,
    finish: Script,
    lookup: Script,
    read: Script,
    renew: Script,
    status: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_helpers = |body: &str| Script::new(&format!("{CHECK_LEASE}\n{body}"));
        Self {
            claim: with_helpers(CLAIM),
            start: Script::new(START),
            release: Script::new(RELEASE),
            append: Script::new(APPEND),
            finish: Script::new(FINISH),
            lookup: with_helpers(LOOKUP),
            read: with_helpers(READ),
            renew: Script::new(RENEW),
            status: Script::new(STATUS),
        }
    }
}

/// One script call: `EVALSHA` with a session's keys and the common arguments, to which the
/// caller adds its own. The arguments are written once, straight into the command.
struct Call<'a> {
    script: &'a Script,
    cmd: Cmd,
}

impl Call<'_> {
    fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.cmd.arg(arg);
        self
    }
}

impl Inner {
    /// Prepares a script call on a session's keys, with room for `args` more arguments of
    /// `bytes` bytes in all.
    fn call<'a>(&self, script: &'a Script, keys: &Keys, args: usize, bytes: usize) -> Call<'a> {
        let name = keys.key.as_str();
        let (meta, events, lease) = (keys.meta(), keys.events(), keys.lease());
        let size =
            64 + meta.len() + events.len() + lease.len() + self.channel.len() + name.len() + bytes;
        let mut cmd = Cmd::with_capacity(8 + args, size);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(meta)
            .arg(events)
            .arg(lease)
            .arg(&self.channel)
            .arg(name);
        Call { script, cmd }
    }

    async fn invoke(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        match call.cmd.query_async::<Value>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // The server's script cache was emptied (a restart, SCRIPT FLUSH): load, retry.
                call.script
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                call.cmd.query_async(&mut conn).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }
}

// --- Chunks ------------------------------------------------------------------------------------

/// The most events in one stream entry.
const CHUNK_EVENTS: usize = crate::limits::REDIS_CHUNK_EVENTS;
/// The most bytes in one stream entry, unless it holds a single larger event.
const CHUNK_BYTES: u32 = crate::limits::REDIS_CHUNK_BYTES as u32;

/// Cuts a block into the chunks stored as stream entries: at most [`CHUNK_EVENTS`] events and
/// [`CHUNK_BYTES`] bytes each, at least one event each. The same block is always cut the same
/// way.
fn cut(block: &EventBlock) -> Vec<EventBlock> {
    let first = block.first_seq();
    let mut chunks = Vec::with_capacity(block.len() / CHUNK_EVENTS + 1);
    // The chunk being built: its first event's index, where it starts, how many events.
    let (mut start, mut base, mut count) = (0u64, 0u32, 0usize);
    let mut prev_end = 0u32;
    let push = |from: u64, to: u64, chunks: &mut Vec<EventBlock>| {
        if let Some(chunk) = block.slice(first + from..first + to) {
            chunks.push(chunk);
        }
    };
    for (i, end) in (0u64..).zip(block.ends()) {
        if count > 0 && (count == CHUNK_EVENTS || end - base > CHUNK_BYTES) {
            push(start, i, &mut chunks);
            (start, base, count) = (i, prev_end, 0);
        }
        count += 1;
        prev_end = end;
    }
    push(start, block.len() as u64, &mut chunks);
    chunks
}

/// A chunk's ends as little-endian `u32`s, relative to its bytes.
fn pack_ends(chunk: &EventBlock, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(chunk.len() * 4);
    for end in chunk.ends() {
        out.extend_from_slice(&end.to_le_bytes());
    }
}

/// A stream entry `[id, [field, value, ...]]` with fields `o` (ends) and `d` (data) back into a
/// block, sharing the reply's buffer.
fn decode_entry(entry: Value) -> Result<EventBlock, StoreError> {
    let corrupt =
        |why: &str| StoreError::unavailable(format!("corrupt event chunk in Redis: {why}"));
    let Value::Array(parts) = entry else {
        return Err(bad_reply("read"));
    };
    let mut parts = parts.into_iter();
    let (Some(id), Some(Value::Array(fields)), None) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_reply("read"));
    };
    let first_seq = as_bytes(&id)
        .and_then(|id| id.split(|&b| b == b'-').next())
        .and_then(|seq| std::str::from_utf8(seq).ok()?.parse::<u64>().ok())
        .ok_or_else(|| corrupt("entry id"))?;
    let (mut ends, mut data) = (None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match (as_bytes(&name), value) {
            (Some(b"o"), Value::BulkString(v)) => ends = Some(v),
            (Some(b"d"), Value::BulkString(v)) => data = Some(v),
            _ => {}
        }
    }
    let (Some(ends), Some(data)) = (ends, data) else {
        return Err(corrupt("missing field"));
    };
    if ends.len() % 4 != 0 {
        return Err(corrupt("offsets"));
    }
    let ends = ends
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    EventBlock::new(first_seq, Bytes::from(data), ends).map_err(StoreError::unavailable)
}

// --- Replies -----------------------------------------------------------------------------------

fn status_from(v: &Value) -> Option<Status> {
    Some(match as_bytes(v)? {
        b"starting" => Status::Starting,
        b"running" => Status::Running,
        b"completed" => Status::Finished(Outcome::Completed),
        b"failed" => Status::Finished(Outcome::Failed),
        b"cancelled" => Status::Finished(Outcome::Cancelled),
        _ => return None,
    })
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "completed",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// Parses `{epoch, status, head|false, first, last}`.
fn parse_info(v: &Value) -> Option<SessionInfo> {
    let a = as_array(v)?;
    let [epoch, status, head, first, last] = a else {
        return None;
    };
    Some(SessionInfo {
        epoch: Epoch::from_raw(as_u64(epoch)?),
        status: status_from(status)?,
        head: as_bytes(head).and_then(decode_head).map(Arc::new),
        first_seq: as_u64(first)?,
        last_seq: as_u64(last)?,
    })
}

/// Parses the reply of the READ script into the page of `max` events after `after`.
fn parse_read(reply: Value, after: u64, max: usize) -> Result<Option<ReadBatch>, StoreError> {
    let parts = match reply {
        Value::Nil => return Ok(None),
        Value::Array(parts) => parts,
        _ => return Err(bad_reply("read")),
    };
    let mut parts = parts.into_iter();
    let (Some(status), Some(first), Some(last), Some(Value::Array(entries)), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad_reply("read"));
    };
    let (Some(status), Some(first_seq), Some(last_seq)) =
        (status_from(&status), as_u64(&first), as_u64(&last))
    else {
        return Err(bad_reply("read"));
    };
    let blocks = entries
        .into_iter()
        .map(decode_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ReadBatch {
        blocks: Page::collect(after, max, &blocks),
        status,
        first_seq,
        last_seq,
    }))
}

/// The head as `status\nname: value\n...`: header values never contain CR or LF.
fn encode_head(head: &ResponseHead) -> Vec<u8> {
    let mut out = head.status.as_str().as_bytes().to_vec();
    for (name, value) in &head.headers {
        out.push(b'\n');
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn decode_head(raw: &[u8]) -> Option<ResponseHead> {
    let mut lines = raw.split(|&b| b == b'\n');
    let status = StatusCode::from_bytes(lines.next()?).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = HeaderValue::from_bytes(line[colon + 1..].strip_prefix(b" ")?).ok()?;
        headers.append(name, value);
    }
    Some(ResponseHead { status, headers })
}

// --- Notifications -----------------------------------------------------------------------------

/// One pub/sub connection per process; every session's changes are announced on one channel and
/// fanned out here to the local subscribers of that session.
struct Notifier {
    client: redis::Client,
    sessions: Mutex<Sessions>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    checks_task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The sessions with local subscribers, by session key.
#[derive(Default)]
struct Sessions {
    map: HashMap<Arc<str>, Local>,
    /// The size at which sessions nobody listens to any more are forgotten.
    sweep_at: usize,
}

/// What this process keeps for a session that has local subscribers or its producer: the signal
/// the subscribers wait on, the tail of its log that they all read from, its keys, and the
/// signal of its status changes that its producer waits on.
struct Local {
    tx: watch::Sender<Generation>,
    tail: Arc<Mutex<Tail>>,
    keys: Arc<Keys>,
    /// Status changes only. The producer waits on this one, not on `tx`: woken with its
    /// subscribers at every event, it would queue behind all of them each time, and only
    /// produce its next event once every subscriber had been polled.
    status: watch::Sender<u64>,
    /// Where each local reader is, with the epoch it reads: the producer's appends keep what
    /// they still need past the soft limits.
    pins: Mutex<Vec<(Epoch, Weak<AtomicU64>)>>,
}

impl Local {
    fn new(keys: &Arc<Keys>) -> Self {
        Local {
            tx: watch::Sender::new(Generation::default()),
            tail: Arc::default(),
            keys: keys.clone(),
            status: watch::Sender::new(0),
            pins: Mutex::new(Vec::new()),
        }
    }

    /// A pin for a new reader of `epoch`, at the start until it says where it is.
    fn pin(&self, epoch: Epoch) -> Arc<AtomicU64> {
        let pin = Arc::new(AtomicU64::new(0));
        let mut pins = lock(&self.pins);
        // Readers that went away are forgotten when the list doubled, so it stays as long as
        // the number of connected readers (amortised).
        if pins.len() >= 64 && pins.len().is_power_of_two() {
            pins.retain(|(_, p)| p.strong_count() > 0);
        }
        pins.push((epoch, Arc::downgrade(&pin)));
        pin
    }

    /// The newest sequence number every local reader of `epoch` has reached, if one is
    /// connected.
    fn pinned(&self, epoch: Epoch) -> Option<u64> {
        let mut pins = lock(&self.pins);
        let mut min = None::<u64>;
        pins.retain(|(e, pin)| match pin.upgrade() {
            Some(pin) => {
                if *e == epoch {
                    let seq = pin.load(Ordering::Relaxed);
                    min = Some(min.map_or(seq, |m| m.min(seq)));
                }
                true
            }
            None => false,
        });
        min
    }

    /// Signals new events to the subscribers.
    fn events_changed(&self) {
        self.tx.send_modify(|g| g.events += 1);
    }

    /// Signals a new status (or a possibly missed change) to the subscribers and the producer.
    fn status_changed(&self) {
        self.tx.send_modify(|g| g.status += 1);
        self.status.send_modify(|n| *n += 1);
    }

    fn in_use(&self) -> bool {
        self.tx.receiver_count() > 0 || self.status.receiver_count() > 0
    }
}

/// Counts of event and status notifications received for a session, and of the periodic checks
/// asked of its subscribers.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Generation {
    events: u64,
    status: u64,
    checks: u64,
}

impl Notifier {
    fn start(inner: &Arc<Inner>) {
        let weak = Arc::downgrade(inner);
        let client = inner.notifier.client.clone();
        let channel = inner.channel.clone();
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match Self::listen(&client, &channel, &weak).await {
                    Ok(()) => return, // the store was dropped
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "Redis notifications lost; reconnecting");
                    }
                }
                // Changes may have been missed: wake everyone to re-read.
                let Some(inner) = weak.upgrade() else { return };
                inner.notifier.wake_all();
                drop(inner);
                tokio::time::sleep(Duration::from_millis(100u64 << failures.min(4))).await;
            }
        });
        *lock(&inner.notifier.task) = Some(task.abort_handle());
    }

    async fn listen(client: &redis::Client, channel: &str, weak: &Weak<Inner>) -> RedisResult<()> {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        if let Some(inner) = weak.upgrade() {
            // Subscribed again after a loss: whatever happened meanwhile is re-read.
            inner.notifier.wake_all();
        }
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Some(inner) = weak.upgrade() else {
                return Ok(());
            };
            let payload = msg.get_payload_bytes();
            let (kind, key) = payload.split_first().unwrap_or((&b'?', &[]));
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            let sessions = lock(&inner.notifier.sessions);
            if let Some(local) = sessions.map.get(key) {
                match kind {
                    b'e' => Self::events_announced(&inner, key, local),
                    _ => local.status_changed(),
                }
            }
        }
        Err(redis::RedisError::from(std::io::Error::other(
            "pub/sub connection closed",
        )))
    }

    /// New events of a session with local subscribers. When they read from the shared tail, the
    /// tail is refreshed first and they are woken once it holds the new events: each of them is
    /// then polled once per change and finds the events ready, rather than twice (once to find
    /// the tail behind and wait for its refresh, once when it is refreshed). The wake-up follows
    /// the fetch whatever its result, so nothing announced is missed.
    fn events_announced(inner: &Arc<Inner>, key: &str, local: &Local) {
        // The new generation, without waking anyone yet: a read from now on finds the tail
        // behind it.
        local.tx.send_if_modified(|g| {
            g.events += 1;
            false
        });
        let generation = *local.tx.borrow();
        let fetch = {
            let mut t = lock(&local.tail);
            match t.epoch {
                Some(epoch) if local.tx.receiver_count() > 0 => {
                    let store = RedisStore {
                        inner: inner.clone(),
                    };
                    Some(store.fetch(&local.tail, &mut t, local.keys.clone(), epoch, generation))
                }
                _ => None,
            }
        };
        let Some(fetch) = fetch else {
            local.events_changed();
            return;
        };
        let weak = Arc::downgrade(inner);
        let key: Arc<str> = Arc::from(key);
        tokio::spawn(async move {
            let _ = fetch.await;
            if let Some(inner) = weak.upgrade() {
                if let Some(local) = lock(&inner.notifier.sessions).map.get(&key) {
                    local.tx.send_modify(|_| {});
                }
            }
        });
    }

    /// Starts the one task that makes the local subscribers of every session check it when
    /// nothing was read from Redis for it lately: their next read goes to Redis, which marks
    /// the session failed if its producer's lease expired. A session whose tail is read (events
    /// or statuses announced) costs nothing here, and no subscriber has a timer of its own: a
    /// timer per subscriber would fire thousands of times a second for a large fan-out, each
    /// wake-up a read, and each firing in the way of the timers that pace the producers.
    fn start_checks(inner: &Arc<Inner>) {
        // Every half interval, the sessions not read for half an interval: each session is
        // checked at most an interval after its last read.
        let every = inner.config.check_interval / 2;
        let task = spawn_periodic(inner, every, move |inner| async move {
            inner.notifier.check_idle(every);
        });
        *lock(&inner.notifier.checks_task) = Some(task);
    }

    /// Wakes the subscribers of every session whose tail was not read from Redis within `idle`.
    fn check_idle(&self, idle: Duration) {
        for local in lock(&self.sessions).map.values() {
            if local.tx.receiver_count() == 0 {
                continue;
            }
            let recent = lock(&local.tail)
                .fetched_at
                .is_some_and(|t| t.elapsed() < idle);
            if !recent {
                local.tx.send_modify(|g| g.checks += 1);
            }
        }
    }

    /// Announces a status change of a session to its local subscribers.
    fn announce_status(&self, key: &SessionKey) {
        if let Some(local) = lock(&self.sessions).map.get(key.as_str()) {
            local.status_changed();
        }
    }

    fn wake_all(&self) {
        for local in lock(&self.sessions).map.values() {
            local.status_changed();
        }
    }

    /// A subscriber's signal, every change of the session, and its reader's pin.
    fn subscribe(
        &self,
        keys: &Arc<Keys>,
        epoch: Epoch,
    ) -> (watch::Receiver<Generation>, Arc<AtomicU64>) {
        self.with_local(keys, |local| (local.tx.subscribe(), local.pin(epoch)))
    }

    /// Where the local readers of a session's `epoch` are, if any is connected.
    fn pinned(&self, key: &SessionKey, epoch: Epoch) -> Option<u64> {
        let sessions = lock(&self.sessions);
        sessions.map.get(key.as_str())?.pinned(epoch)
    }

    /// The producer's signal: the session's status changes.
    fn subscribe_status(&self, keys: &Arc<Keys>) -> watch::Receiver<u64> {
        self.with_local(keys, |local| local.status.subscribe())
    }

    /// Runs `f` on what this process keeps for the session, made if needed.
    fn with_local<T>(&self, keys: &Arc<Keys>, f: impl FnOnce(&Local) -> T) -> T {
        let mut sessions = lock(&self.sessions);
        if let Some(local) = sessions.map.get(keys.key.as_str()) {
            return f(local);
        }
        // Forget sessions nobody in this process listens to any more, once their number doubled
        // since the last time (so that this costs O(1) per subscription on average).
        if sessions.map.len() >= sessions.sweep_at {
            sessions.map.retain(|_, local| local.in_use());
            sessions.sweep_at = (sessions.map.len() * 2).max(64);
        }
        let local = Local::new(keys);
        let out = f(&local);
        sessions.map.insert(Arc::from(keys.key.as_str()), local);
        out
    }

    /// The current generation, the tail and the keys of a session with local subscribers.
    fn local(&self, key: &SessionKey) -> Option<(Generation, Arc<Mutex<Tail>>, Arc<Keys>)> {
        let sessions = lock(&self.sessions);
        let local = sessions
            .map
            .get(key.as_str())
            .filter(|l| l.tx.receiver_count() > 0)?;
        let generation = *local.tx.borrow();
        Some((generation, local.tail.clone(), local.keys.clone()))
    }
}

/// Events one fetch asks for.
const TAIL_PAGE: usize = crate::limits::REDIS_TAIL_PAGE_EVENTS;
/// The most bytes of events one read brings back (at least one chunk).
const READ_BYTES: usize = crate::limits::REDIS_READ_BYTES;
/// Tail fetches one read waits for before it reads directly instead. One is what a reader
/// behind a change needs; a second when the fetch it joined had started before the events it
/// wants were announced.
const MAX_TAIL_FETCHES_PER_READ: usize = 3;
/// Events the shared tail keeps per session.
const TAIL_CAPACITY: usize = crate::limits::REDIS_TAIL_CAPACITY_EVENTS;

type Fetch =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), Arc<str>>>>;

/// The newest events of a session, shared by the readers of this process: one fetch from Redis
/// per change serves every local subscriber.
#[derive(Default)]
struct Tail {
    epoch: Option<Epoch>,
    /// Consecutive events ending at `last_seq`, in the chunks read from Redis.
    blocks: VecDeque<EventBlock>,
    /// The number of events in `blocks`.
    events: usize,
    last_seq: u64,
    status: Option<Status>,
    first_seq: u64,
    /// The newest sequence number Redis reported.
    head_seq: u64,
    gone: bool,
    /// The notifications the tail reflects, and when it was fetched.
    generation: Generation,
    fetched_at: Option<Instant>,
    fetching: Option<Fetch>,
}

impl Generation {
    /// A generation no notification produces, so that a tail marked with it is refreshed.
    fn stale() -> Self {
        Self {
            events: u64::MAX,
            status: u64::MAX,
            checks: u64::MAX,
        }
    }
}

impl Tail {
    /// Fresh when it reflects every notification received and was checked within the interval
    /// (the periodic check is also what notices a dead producer).
    fn is_fresh(&self, generation: Generation, interval: Duration) -> bool {
        self.generation == generation
            && self.fetched_at.is_some_and(|t| t.elapsed() < interval)
            && self.fetching.is_none()
    }

    /// Forgets every event held and continues from `last_seq`.
    fn restart_at(&mut self, last_seq: u64) {
        self.blocks.clear();
        self.events = 0;
        self.last_seq = last_seq;
    }

    fn oldest_cached(&self) -> u64 {
        self.blocks
            .front()
            .map_or(self.last_seq, |b| b.first_seq() - 1)
    }

    /// Appends the blocks that continue the tail, and forgets its oldest events beyond the
    /// capacity.
    fn extend(&mut self, blocks: Vec<EventBlock>) {
        for block in blocks {
            let Some(block) = block.slice(self.last_seq.saturating_add(1)..) else {
                continue;
            };
            if block.first_seq() != self.last_seq + 1 {
                break;
            }
            self.last_seq = block.last_seq();
            self.events += block.len();
            self.blocks.push_back(block);
        }
        let excess = self.events.saturating_sub(TAIL_CAPACITY);
        drop_oldest(&mut self.blocks, excess);
        self.events -= excess;
    }

    /// Takes in a page fetched from where the tail ends (`None`: the session is gone), marked
    /// with the notifications received when the fetch began.
    fn apply(&mut self, batch: Option<ReadBatch>, generation: Generation) {
        let Some(batch) = batch else {
            self.gone = true;
            self.generation = generation;
            return;
        };
        let next = batch
            .blocks
            .first()
            .map_or(batch.first_seq, EventBlock::first_seq);
        if next > self.last_seq.saturating_add(1) {
            // The session's limits trimmed what followed the tail before it was fetched: the
            // tail restarts at the oldest retained event. Readers older than that read directly
            // from now on, and see the gap themselves (they are evicted). Without this the page
            // would not continue the tail, and the tail would never move again.
            self.restart_at(next - 1);
        }
        self.extend(batch.blocks);
        self.status = Some(batch.status);
        self.first_seq = batch.first_seq;
        self.head_seq = batch.last_seq;
        self.gone = false;
        // A page that stops short of the newest event (full, or at the byte budget) means more
        // is waiting: the tail is not fresh yet.
        let complete = self.last_seq >= batch.last_seq;
        self.generation = if complete {
            generation
        } else {
            Generation::stale()
        };
    }

    /// The events the tail holds after `after`, when it holds that position and some events
    /// after it, whether or not it reflects every change announced. The page then says that
    /// more may follow (a newest sequence number past the page, and a finished status only when
    /// the tail holds every event), so that the reader reads again rather than waits for a
    /// change that may already have been announced.
    fn serve_ahead(&self, after: u64, max: usize) -> Option<ReadBatch> {
        if after >= self.last_seq {
            return None;
        }
        let mut batch = self.serve(after, max)??;
        let complete = batch.status.is_finished() && self.last_seq >= self.head_seq;
        if !complete {
            let served = batch.blocks.last().map_or(after, EventBlock::last_seq);
            batch.last_seq = batch.last_seq.max(served.saturating_add(1));
            if batch.status.is_finished() {
                batch.status = Status::Running;
            }
        }
        Some(batch)
    }

    /// The events after `after`, if the tail holds that position.
    fn serve(&self, after: u64, max: usize) -> Option<Option<ReadBatch>> {
        if self.gone {
            return Some(None);
        }
        let status = self.status?;
        if after < self.oldest_cached() || after > self.last_seq {
            return None;
        }
        let from = self.blocks.partition_point(|b| b.last_seq() <= after);
        Some(Some(ReadBatch {
            blocks: Page::collect(after, max, self.blocks.range(from..)),
            status,
            first_seq: self.first_seq,
            last_seq: self.head_seq,
        }))
    }
}

/// The [`Subscription`] of a [`RedisStore`]: woken by the process's pub/sub connection, and by
/// the process's periodic check of the sessions not read from Redis within the last second, so
/// that a dead producer is noticed even when nothing is announced. It has no timer of its own.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Debug)]
pub struct RedisSubscription {
    rx: watch::Receiver<Generation>,
    check_interval: Duration,
    /// Where its reader is; the producer in this process keeps what it still needs.
    pin: Arc<AtomicU64>,
}

impl RedisSubscription {
    fn new(
        (rx, pin): (watch::Receiver<Generation>, Arc<AtomicU64>),
        check_interval: Duration,
    ) -> Self {
        Self {
            rx,
            check_interval,
            pin,
        }
    }
}

impl Subscription for RedisSubscription {
    async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The store is gone, and its checks with it: wait as long as one would have.
            tokio::time::sleep(self.check_interval).await;
        }
    }

    fn reached(&mut self, seq: u64) {
        self.pin.store(seq, Ordering::Relaxed);
    }
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

// --- Lease renewals ----------------------------------------------------------------------------

/// Renewals sent in one pipeline.
const RENEWALS_PER_CALL: usize = crate::limits::REDIS_RENEWALS_PER_CALL;

type Held = (SessionKey, Epoch, Arc<Keys>);

/// A session this process produces, whose lease the renewal task renews.
struct Lease {
    epoch: Epoch,
    keys: Arc<Keys>,
    /// When its producer last began trying to record the session's end, if it did: the lease is
    /// renewed until the end is recorded, or until the producer stops trying.
    finishing: Option<Instant>,
}

/// How long after its latest attempt (beyond the response timeout) a producer that tries to
/// record its session's end keeps its lease. The producer retries with a backoff of a few
/// seconds at most, so this is only reached once it gave up.
const FINISH_RETRY_GRACE: Duration = Duration::from_secs(30);

impl Inner {
    /// Starts the one task that renews the leases of every session this process produces.
    fn start_renewals(inner: &Arc<Inner>) {
        let task = spawn_periodic(inner, inner.config.lease / 3, |inner| async move {
            inner.renew_all().await;
        });
        *lock(&inner.renewal_task) = Some(task);
    }

    /// Renews every lease held; forgets the sessions that ended or were taken over, and
    /// announces them in this process (their producer's [`Store::cancelled`] checks them).
    async fn renew_all(&self) {
        let held: Vec<Held> = {
            let mut renewals = lock(&self.renewals);
            let grace = self.config.response_timeout + FINISH_RETRY_GRACE;
            renewals.retain(|_, lease| {
                // A producer that stopped retrying to record its session's end: its lease is
                // let go, so the session is marked failed when it expires rather than running
                // forever.
                let given_up = lease.finishing.is_some_and(|at| at.elapsed() > grace);
                if given_up {
                    tracing::warn!(
                        "the end of a session could not be recorded; its lease is let go"
                    );
                }
                !given_up
            });
            renewals
                .iter()
                .map(|(key, lease)| (key.clone(), lease.epoch, lease.keys.clone()))
                .collect()
        };
        for batch in held.chunks(RENEWALS_PER_CALL) {
            let replies = match self.renew_batch(batch).await {
                Ok(replies) => replies,
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew producer leases");
                    continue;
                }
            };
            for ((key, epoch, _), reply) in batch.iter().zip(replies) {
                match reply {
                    Ok(Value::Int(1)) => {}
                    Ok(_) => {
                        // Finished, cancelled, taken over or gone: nothing more to renew.
                        self.release_lease(key, *epoch);
                        self.notifier.announce_status(key);
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew a producer lease"),
                }
            }
        }
    }

    fn renew_call<'a>(&'a self, keys: &Keys, epoch: Epoch) -> Call<'a> {
        let mut call = self.call(&self.scripts.renew, keys, 3, 48);
        call.arg(epoch.raw())
            .arg(millis(self.config.lease))
            .arg(self.ttl_ms());
        call
    }

    /// Sends renewals: in one pipeline on one server; on a Cluster, whose sessions live on
    /// several nodes, as concurrent calls on the shared connection.
    async fn renew_batch(
        &self,
        batch: &[Held],
    ) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
        if let Conn::Cluster(_) = self.conn {
            let calls: Vec<Call<'_>> = batch
                .iter()
                .map(|(_, epoch, keys)| self.renew_call(keys, *epoch))
                .collect();
            return Ok(
                futures_util::future::join_all(calls.iter().map(|call| self.invoke(call))).await,
            );
        }
        let mut pipe = redis::pipe();
        for (_, epoch, keys) in batch {
            pipe.add_command(self.renew_call(keys, *epoch).cmd);
        }
        let mut conn = self.conn.clone();
        let mut replies = conn
            .req_packed_commands(&pipe, 0, batch.len())
            .await
            .map_err(unavailable)?;
        let no_script = |v: &Value| matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript));
        if replies.iter().any(no_script) {
            // The server's script cache was emptied: load, retry (renewing twice is harmless).
            self.scripts
                .renew
                .load_async(&mut conn)
                .await
                .map_err(unavailable)?;
            replies = conn
                .req_packed_commands(&pipe, 0, batch.len())
                .await
                .map_err(unavailable)?;
        }
        Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::ServerError(e) => Err(StoreError::unavailable(redis::RedisError::from(e))),
                v => Ok(v),
            })
            .collect())
    }

    fn hold_lease(&self, key: &SessionKey, epoch: Epoch) {
        let keys = self.keys(key);
        lock(&self.renewals).insert(
            key.clone(),
            Lease {
                epoch,
                keys,
                finishing: None,
            },
        );
    }

    /// Notes an attempt to record the end of a session produced here: its lease stays renewed
    /// meanwhile.
    fn finishing(&self, key: &SessionKey, epoch: Epoch) {
        if let Some(lease) = lock(&self.renewals).get_mut(key) {
            if lease.epoch == epoch {
                lease.finishing = Some(Instant::now());
            }
        }
    }

    fn release_lease(&self, key: &SessionKey, epoch: Epoch) {
        let mut renewals = lock(&self.renewals);
        if renewals.get(key).is_some_and(|lease| lease.epoch == epoch) {
            renewals.remove(key);
        }
    }
}

// --- The store ---------------------------------------------------------------------------------

impl RedisStore {
    /// Reads from Redis, bypassing the shared tail.
    async fn read_direct(
        &self,
        keys: &Keys,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        let inner = &self.inner;
        let mut call = inner.call(&inner.scripts.read, keys, 5, 80);
        call.arg(millis(inner.config.retention))
            .arg(epoch.raw())
            .arg(after)
            .arg(max)
            .arg(READ_BYTES);
        parse_read(inner.invoke(&call).await?, after, max)
    }

    /// The status of the session if `epoch` is its current one (`Nil` otherwise).
    async fn status(&self, keys: &Keys, epoch: Epoch) -> Result<Value, StoreError> {
        let inner = &self.inner;
        let mut call = inner.call(&inner.scripts.status, keys, 1, 24);
        call.arg(epoch.raw());
        inner.invoke(&call).await
    }

    /// The fetch that refreshes the tail for every local reader: the one in flight, or a new one
    /// from where the tail ends, marked with `generation`.
    fn fetch(
        &self,
        tail: &Arc<Mutex<Tail>>,
        t: &mut Tail,
        keys: Arc<Keys>,
        epoch: Epoch,
        generation: Generation,
    ) -> Fetch {
        let from = t.last_seq;
        t.fetching
            .get_or_insert_with(|| {
                let store = self.clone();
                let tail = tail.clone();
                // A task of its own: the fetch completes (and clears itself) even when the
                // reader that started it goes away mid-flight.
                let task = tokio::spawn(async move {
                    store.refresh(&keys, epoch, from, generation, &tail).await
                });
                async move {
                    task.await
                        .unwrap_or_else(|e| Err(Arc::from(format!("tail fetch failed: {e}"))))
                }
                .boxed()
                .shared()
            })
            .clone()
    }

    /// Fetches what follows the tail from Redis and appends it, for every local reader.
    async fn refresh(
        &self,
        keys: &Keys,
        epoch: Epoch,
        from: u64,
        generation: Generation,
        tail: &Mutex<Tail>,
    ) -> Result<(), Arc<str>> {
        let read = self.read_direct(keys, epoch, from, TAIL_PAGE).await;
        let mut t = lock(tail);
        if t.epoch != Some(epoch) {
            // Replaced meanwhile by a tail of another epoch, which may have a fetch of its own.
            return Ok(());
        }
        t.fetching = None;
        let batch = read.map_err(|e| Arc::<str>::from(e.to_string()))?;
        t.fetched_at = Some(Instant::now());
        t.apply(batch, generation);
        Ok(())
    }
}

impl Store for RedisStore {
    type Subscription = RedisSubscription;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let epoch = Epoch::random();
        let mut call = inner.call(&inner.scripts.claim, &keys, 4, 80);
        call.arg(epoch.raw())
            .arg(millis(inner.config.lease))
            .arg(inner.ttl_ms())
            .arg(millis(inner.config.retention));
        let _ = lifetime; // the producer enforces it; the keys live as long as the lease is renewed
        let reply = inner.invoke(&call).await?;
        let a = as_array(&reply).ok_or_else(|| bad_reply("claim"))?;
        match a {
            [flag] if as_u64(flag) == Some(1) => {
                inner.hold_lease(key, epoch);
                Ok(Claim::Claimed(epoch))
            }
            [_, info] => parse_info(info)
                .map(Claim::Exists)
                .ok_or_else(|| bad_reply("claim")),
            _ => Err(bad_reply("claim")),
        }
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
        inner.invoke(&call).await.map(drop)
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
            .arg(outcome_name(outcome))
            .arg(millis(inner.config.retention));
        // 1: finished now; 0: it had already ended (a retry after a lost reply, a cancel, a
        // takeover). Either way there is nothing left to renew.
        inner.invoke(&call).await?;
        inner.release_lease(key, epoch);
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
        // Every turn of this loop returns, or waits for a fetch that moved the tail forward or
        // marked it fresh; after a few fetches that did not serve this reader (the tail far
        // behind it, or replaced by another epoch's), it reads directly: a read never spins.
        let mut fetches = 0;
        let keys = loop {
            // Without local subscribers there is nothing to share: read directly.
            let Some((generation, tail, keys)) = self.inner.notifier.local(key) else {
                let keys = self.inner.keys(key);
                return Box::pin(self.read_direct(&keys, epoch, after, max)).await;
            };
            let fetch = {
                let mut t = lock(&tail);
                if t.epoch == Some(epoch) {
                    if t.is_fresh(generation, self.inner.config.check_interval) {
                        match t.serve(after, max) {
                            Some(batch) => return Ok(batch),
                            // Older than the tail: a replay, served directly.
                            None => break keys,
                        }
                    }
                    // Behind a change not fetched yet, but the tail holds events this reader
                    // has not sent: they go now, without waiting for the fetch (which, under a
                    // steady stream, a newer change would follow before this reader's turn).
                    if let Some(batch) = t.serve_ahead(after, max) {
                        return Ok(Some(batch));
                    }
                }
                if fetches == MAX_TAIL_FETCHES_PER_READ {
                    break keys;
                }
                if t.epoch != Some(epoch) {
                    *t = Tail {
                        epoch: Some(epoch),
                        last_seq: after,
                        ..Tail::default()
                    };
                }
                if after < t.oldest_cached() {
                    break keys;
                }
                fetches += 1;
                self.fetch(&tail, &mut t, keys, epoch, generation)
            };
            fetch
                .await
                .map_err(|e| StoreError::unavailable(e.to_string()))?;
        };
        // Boxed: a reader keeps its read future for its whole life, but a call's state only
        // while the call is in flight.
        Box::pin(self.read_direct(&keys, epoch, after, max)).await
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
            .arg(outcome_name(Outcome::Cancelled))
            .arg(millis(inner.config.retention));
        Ok(as_u64(&inner.invoke(&call).await?) == Some(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first_seq: u64, sizes: &[usize]) -> EventBlock {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            bytes.extend(std::iter::repeat(b'a' + (i % 26) as u8).take(size));
            ends.push(bytes.len() as u32);
        }
        EventBlock::new(first_seq, Bytes::from(bytes), ends).unwrap()
    }

    fn seqs(blocks: &[EventBlock]) -> Vec<(u64, u64)> {
        blocks
            .iter()
            .map(|b| (b.first_seq(), b.last_seq()))
            .collect()
    }

    fn entry(chunk: &EventBlock) -> Value {
        let mut ends = Vec::new();
        pack_ends(chunk, &mut ends);
        Value::Array(vec![
            Value::BulkString(format!("{}-0", chunk.first_seq()).into_bytes()),
            Value::Array(vec![
                Value::BulkString(b"o".to_vec()),
                Value::BulkString(ends),
                Value::BulkString(b"d".to_vec()),
                Value::BulkString(chunk.bytes().to_vec()),
            ]),
        ])
    }

    #[test]
    fn keys_escape_glob_and_hash_tag_characters() {
        let key = SessionKey::new("a}{*?[\n b").unwrap();
        let e = escape(&key);
        assert!(!e.contains(['{', '}', '*', '?', '[', '\n', ' ']), "{e}");
        assert_eq!(e, "a%7D%7B%2A%3F%5B%0A%20b");
        let keys = Keys::new("p", &key);
        let mut cmd = Cmd::new();
        cmd.arg(keys.meta()).arg(keys.lease());
        let args: Vec<_> = cmd.args_iter().collect();
        let want = [format!("p:{{{e}}}:meta"), format!("p:{{{e}}}:lease")];
        assert_eq!(args.len(), 2);
        for (arg, want) in args.into_iter().zip(want) {
            assert!(
                matches!(arg, redis::Arg::Simple(a) if a == want.as_bytes()),
                "{want}"
            );
        }
    }

    #[test]
    fn heads_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2: colon"));
        let head = ResponseHead {
            status: StatusCode::OK,
            headers,
        };
        let back = decode_head(&encode_head(&head)).unwrap();
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(back.headers, head.headers);
    }

    #[test]
    fn blocks_are_cut_into_chunks_of_64_events_or_64_kib() {
        // 150 small events: 64 + 64 + 22.
        let small = block(5, &[10; 150]);
        let chunks = cut(&small);
        assert_eq!(seqs(&chunks), [(5, 68), (69, 132), (133, 154)]);
        assert_eq!(chunks, cut(&small), "the same block is cut the same way");
        // Large events: as many as fit in 64 KiB; a larger one is a chunk of its own.
        let large = block(1, &[30_000, 30_000, 30_000, 100_000, 1, 65_536]);
        let chunks = cut(&large);
        assert_eq!(seqs(&chunks), [(1, 2), (3, 3), (4, 4), (5, 5), (6, 6)]);
        let total: usize = chunks.iter().map(|c| c.bytes().len()).sum();
        assert_eq!(total, large.bytes().len());
        // A slice of a block is cut from where it starts.
        let tail = small.slice(100..).unwrap();
        assert_eq!(seqs(&cut(&tail)), [(100, 154)]);
    }

    #[test]
    fn chunks_round_trip_through_stream_entries() {
        let b = block(7, &[3, 1, 4, 1, 5]);
        let back = decode_entry(entry(&b)).unwrap();
        assert_eq!(back, b);
        let sliced = b.slice(9..=10).unwrap();
        assert_eq!(decode_entry(entry(&sliced)).unwrap(), sliced);
    }

    #[test]
    fn corrupt_entries_are_errors_not_panics() {
        let good = block(1, &[2, 2]);
        let Value::Array(parts) = entry(&good) else {
            unreachable!()
        };
        let with_fields =
            |fields: Vec<Value>| Value::Array(vec![parts[0].clone(), Value::Array(fields)]);
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![bulk(b"x-0"), parts[1].clone()]),
            Value::Array(vec![bulk(b"0-0"), parts[1].clone()]),
            with_fields(vec![
                bulk(b"o"),
                bulk(&[2, 0, 0]),
                bulk(b"d"),
                bulk(b"abcd"),
            ]),
            with_fields(vec![
                bulk(b"o"),
                bulk(&[2, 0, 0, 0]),
                bulk(b"d"),
                bulk(b"abcd"),
            ]),
            with_fields(vec![bulk(b"o"), bulk(&[]), bulk(b"d"), bulk(b"")]),
            with_fields(vec![bulk(b"d"), bulk(b"abcd")]),
            with_fields(vec![bulk(b"o"), Value::Int(4), bulk(b"d"), bulk(b"abcd")]),
        ] {
            assert!(decode_entry(bad.clone()).is_err(), "{bad:?}");
        }
        let reply = |entries| Value::Array(vec![bulk(b"running"), bulk(b"1"), bulk(b"2"), entries]);
        assert!(parse_read(reply(Value::Array(vec![entry(&good)])), 0, 10).is_ok());
        assert!(parse_read(reply(Value::Array(vec![Value::Int(1)])), 0, 10).is_err());
        assert!(parse_read(reply(Value::Int(1)), 0, 10).is_err());
        assert!(parse_read(Value::Int(1), 0, 10).is_err());
        assert!(matches!(parse_read(Value::Nil, 0, 10), Ok(None)));
    }

    #[test]
    fn reads_slice_the_chunks_into_the_page() {
        let entries: Vec<Value> = [
            block(1, &[1; 64]),
            block(65, &[1; 64]),
            block(129, &[1; 10]),
        ]
        .iter()
        .map(entry)
        .collect();
        let reply = || {
            Value::Array(vec![
                Value::BulkString(b"running".to_vec()),
                Value::BulkString(b"1".to_vec()),
                Value::BulkString(b"138".to_vec()),
                Value::Array(entries.clone()),
            ])
        };
        let page = parse_read(reply(), 60, 70).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(61, 64), (65, 128), (129, 130)]);
        assert_eq!((page.first_seq, page.last_seq), (1, 138));
        let page = parse_read(reply(), 137, 70).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(138, 138)]);
        let page = parse_read(reply(), 138, 70).unwrap().unwrap();
        assert!(page.blocks.is_empty());
        // An evicted position: the page starts at the oldest event given.
        let page = parse_read(reply(), 0, 3).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(1, 3)]);
    }

    #[test]
    fn the_tail_keeps_its_newest_events_in_blocks() {
        let mut t = Tail {
            status: Some(Status::Running),
            ..Tail::default()
        };
        let mut next = 1;
        for _ in 0..100 {
            t.extend(vec![block(next, &[1; 50])]);
            next += 50;
        }
        assert_eq!(t.events, TAIL_CAPACITY);
        assert_eq!(t.last_seq, 5000);
        assert_eq!(t.oldest_cached(), 5000 - TAIL_CAPACITY as u64);
        // Blocks that overlap or skip are sliced or ignored.
        t.extend(vec![block(4990, &[1; 20]), block(5020, &[1; 3])]);
        assert_eq!(t.last_seq, 5009);
        let served = t.serve(4999, 5).unwrap().unwrap();
        assert_eq!(seqs(&served.blocks), [(5000, 5000), (5001, 5004)]);
        assert_eq!(t.serve(5009, 5).unwrap().unwrap().blocks.len(), 0);
        assert!(t.serve(100, 5).is_none(), "older than the tail");
        let events: usize = t
            .serve(1000, usize::MAX)
            .unwrap()
            .unwrap()
            .blocks
            .iter()
            .map(EventBlock::len)
            .sum();
        assert_eq!(events, 4009);
    }

    #[test]
    fn limits_beyond_what_lua_counts_exactly_mean_no_limit() {
        assert_eq!(script_limit(usize::MAX), 0);
        assert_eq!(script_limit((1 << 53) + 1), 0);
        assert_eq!(script_limit(1 << 53), 1 << 53);
        assert_eq!(script_limit(64 << 20), 64 << 20);
        assert_eq!(script_limit(1), 1);
    }

    fn page(blocks: Vec<EventBlock>, status: Status, first_seq: u64, last_seq: u64) -> ReadBatch {
        ReadBatch {
            blocks,
            status,
            first_seq,
            last_seq,
        }
    }

    #[test]
    fn a_tail_overtaken_by_trimming_restarts_at_the_oldest_retained_event() {
        let fetched = Generation::default();
        let mut t = Tail::default();
        t.apply(
            Some(page(vec![block(1, &[1; 10])], Status::Running, 1, 10)),
            fetched,
        );
        assert_eq!((t.last_seq, t.generation), (10, fetched));
        // The limits trimmed events 11 to 3000 before the next fetch, whose page is full.
        t.apply(
            Some(page(
                vec![block(3001, &[1; 1024])],
                Status::Running,
                3001,
                5000,
            )),
            fetched,
        );
        assert_eq!((t.oldest_cached(), t.last_seq), (3000, 4024));
        assert_eq!(t.generation, Generation::stale(), "more is waiting");
        // A reader at 10 is older than the tail: it reads directly and sees the gap.
        assert!(t.serve(10, 100).is_none());
        assert!(t.serve_ahead(10, 100).is_none());
        // Readers in the new tail are served, and told more may follow.
        let ahead = t.serve_ahead(4000, 100).unwrap();
        assert_eq!(seqs(&ahead.blocks), [(4001, 4024)]);
        assert!(!ahead.reaches_end(4000) && ahead.last_seq > 4024);
        // The rest, and the end.
        t.apply(
            Some(page(
                vec![block(4025, &[1; 976])],
                Status::Finished(Outcome::Completed),
                3001,
                5000,
            )),
            fetched,
        );
        assert_eq!((t.last_seq, t.generation), (5000, fetched));
        let end = t.serve(5000, 100).unwrap().unwrap();
        assert!(end.blocks.is_empty() && end.reaches_end(5000));
        let last = t.serve(4990, 1024).unwrap().unwrap();
        assert!(last.reaches_end(4990));
        // A page after a gap that is not full: fresh, and the readers before the gap are not
        // served an empty page that never ends.
        t.apply(
            Some(page(
                vec![block(9001, &[1; 300])],
                Status::Finished(Outcome::Completed),
                9001,
                9300,
            )),
            fetched,
        );
        assert_eq!((t.oldest_cached(), t.last_seq), (9000, 9300));
        assert!(t.serve(5000, 100).is_none());
        assert!(t.serve(9300, 100).unwrap().unwrap().reaches_end(9300));
    }

    #[test]
    fn a_tail_behind_a_change_serves_what_it_holds_and_says_more_may_follow() {
        let mut t = Tail {
            status: Some(Status::Running),
            ..Tail::default()
        };
        t.extend(vec![block(1, &[1; 10])]);
        t.head_seq = 10;
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!(seqs(&page.blocks), [(5, 10)]);
        assert!(
            page.last_seq > 10,
            "the reader must not take itself as caught up"
        );
        assert!(
            t.serve_ahead(10, 100).is_none(),
            "nothing held after the position"
        );
        // Finished with every event held: final, as it is.
        t.status = Some(Status::Finished(Outcome::Completed));
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!((page.status, page.last_seq), (t.status.unwrap(), 10));
        // Finished with events not fetched yet: not the end for this reader.
        t.head_seq = 20;
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!(page.status, Status::Running);
        assert_eq!(page.last_seq, 20);
    }
}
