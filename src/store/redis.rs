//! [`RedisStore`]: sessions in Redis (or Valkey, or a Redis Cluster), shared by every instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Script, Value};
use tokio::sync::watch;

use super::{
    Appended, Claim, ReadBatch, ResponseHead, SessionInfo, Status, Store, StoreError, StoredEvent,
    Subscription,
};
use crate::session::{Epoch, Outcome, SessionKey};

/// Sessions in Redis: every instance behind a load balancer shares them, and they survive the
/// instance that produced them.
///
/// # Layout
///
/// Per session, under one hash tag so that they share a Cluster slot
/// (`<prefix>:{<escaped key>}:...`):
/// - `:meta`, a hash: epoch, status, the response head, the oldest and newest sequence numbers;
/// - `:events`, a Redis Stream with **one entry per appended batch**, whose id is the batch's
///   first sequence number and whose fields map each sequence number to its encoded event;
/// - `:lease`, a string with a TTL that the producing process renews; when it expires, the
///   producer is dead.
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
/// - **Batched writes**: one script call per batch (append, trim, renew TTLs, notify); the layer
///   puts every event produced while a write is in flight into the next one.
/// - **Live tail with two connections per process**, whatever the number of subscribers and
///   sessions: one multiplexed command connection ([`ConnectionManager`], which reconnects by
///   itself) and one pub/sub connection on which every change of every session is announced on one
///   channel; subscribers in the process wait on an in-memory signal fed by that connection, and
///   read from a **shared tail** of the session kept in the process (its newest 4,096 events),
///   which one read per change refreshes for all of them. No blocking command is used, and the
///   Redis work per event does not grow with the number of subscribers.
/// - **Producer crash**: a claim whose process dies before its inner service answers is
///   dropped when its lease expires, and the next request claims the key afresh. A producer that
///   dies while running: the lease (default 5 s) expires; the next read, lookup or periodic check
///   of any instance (subscribers check at least every second) marks the session failed, so
///   clients end within the lease TTL plus one second, and reconnects get `204 failed`.
/// - **No leaks**: a running session's keys carry a TTL renewed with the lease (lease + retention),
///   a finished session's keys expire after `retention`, and at most `max_events_per_session`
///   events are kept (the oldest whole batches are trimmed; a position before the oldest kept one
///   is answered `410 evicted`).
/// - **Redis trouble**: a request that finds Redis down gets the layer's
///   [`OnStoreError`](crate::OnStoreError) answer; a producer retries failed appends with backoff
///   and holds what it produced meanwhile (bounded; the generation waits when the bound is
///   reached). Appends are idempotent (an event whose sequence number is already stored is
///   skipped), so a retry after a lost reply stores nothing twice. If Redis lost the session, its
///   epoch is gone with it: reconnects get `410 unknown-session` and the producer stops; nothing is
///   spliced onto another history.
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
    check_interval: Duration,
}

struct Inner {
    conn: Conn,
    config: Config,
    channel: String,
    scripts: Scripts,
    notifier: Notifier,
    /// Lease renewals of the sessions this process produces.
    renewals: Mutex<HashMap<(SessionKey, Epoch), tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, task) in lock(&self.renewals).drain() {
            task.abort();
        }
        if let Some(task) = lock(&self.notifier.task).take() {
            task.abort();
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
                max_events_per_session: 100_000,
                check_interval: Duration::from_secs(1),
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

    /// The most events kept per session (default 100,000); the oldest batches are trimmed.
    pub fn max_events_per_session(mut self, max: usize) -> Self {
        self.config.max_events_per_session = max.max(1);
        self
    }

    /// Connects: one command connection and one pub/sub connection per process.
    pub async fn connect(self) -> RedisResult<RedisStore> {
        let first = self.nodes.first().cloned().unwrap_or_default();
        let pubsub_client = redis::Client::open(first.as_str())?;
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .response_timeout(Duration::from_secs(2))
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(Duration::from_secs(2)))
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
                sessions: Mutex::new(HashMap::new()),
                task: Mutex::new(None),
            },
            renewals: Mutex::new(HashMap::new()),
            config: self.config,
        });
        Notifier::start(&inner);
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

struct Keys {
    meta: String,
    events: String,
    lease: String,
    tag: String,
}

impl Inner {
    fn keys(&self, key: &SessionKey) -> Keys {
        let tag = escape(key);
        let base = format!("{}:{{{}}}", self.config.prefix, tag);
        Keys {
            meta: format!("{base}:meta"),
            events: format!("{base}:events"),
            lease: format!("{base}:lease"),
            tag,
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

// --- Lua scripts -------------------------------------------------------------------------------
//
// KEYS: meta, events, lease. Common ARGV prefix: channel, notification message.
// Status values: starting, running, completed, failed, cancelled.

/// Marks a session whose producer lost its lease as failed. Shared by the scripts that read.
const CHECK_LEASE: &str = r#"
local function check_lease(ttl_retention)
  local st = redis.call('HGET', KEYS[1], 'status')
  if st == 'starting' and redis.call('EXISTS', KEYS[3]) == 0 then
    -- Claimed by a process that died before its response came: as if never claimed.
    redis.call('DEL', KEYS[1], KEYS[2])
    redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
    return false
  end
  if st == 'running' and redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('HSET', KEYS[1], 'status', 'failed')
    redis.call('PEXPIRE', KEYS[1], ttl_retention)
    redis.call('PEXPIRE', KEYS[2], ttl_retention)
    redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
    return 'failed'
  end
  return st
end
local function info(st)
  return {redis.call('HGET', KEYS[1], 'epoch'), st, redis.call('HGET', KEYS[1], 'head') or false,
          redis.call('HGET', KEYS[1], 'first'), redis.call('HGET', KEYS[1], 'last')}
end
"#;

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms, retention_ms
const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if st then st = check_lease(ARGV[6]) end
if st then
  return {0, info(st)}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'status', 'starting', 'first', 1, 'last', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return {1}
"#;

/// ARGV: channel, msg, epoch, head
const START: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] or redis.call('HGET', KEYS[1], 'status') ~= 'starting' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running', 'head', ARGV[4])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, epoch
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] or redis.call('HGET', KEYS[1], 'status') ~= 'starting' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
"#;

/// ARGV: channel, msg, epoch, ttl_ms, max_events, then seq, bytes, seq, bytes...
/// Returns 1 when stored, 0 when the session does not take events.
const APPEND: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
local stored = false
local chunk, chunk_first = {}, nil
-- One stream entry per chunk of 64 events of a batch, keyed by its first sequence number: small
-- entries keep bounded reads small, and bound the number of values handed to unpack.
local function flush()
  if chunk_first then
    redis.call('XADD', KEYS[2], chunk_first .. '-0', unpack(chunk))
    chunk, chunk_first = {}, nil
  end
end
for i = 6, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  -- Idempotent: a retried batch whose reply was lost stores nothing twice.
  if seq > last then
    if not chunk_first then chunk_first = ARGV[i] end
    chunk[#chunk + 1] = ARGV[i]
    chunk[#chunk + 1] = ARGV[i + 1]
    last = seq
    stored = true
    if #chunk >= 128 then flush() end
  end
end
flush()
if stored then
  redis.call('HSET', KEYS[1], 'last', last)
  local keep_from = last - tonumber(ARGV[5]) + 1
  local first = tonumber(redis.call('HGET', KEYS[1], 'first'))
  if keep_from > first then
    -- Trim whole batches: keep the one that holds keep_from.
    local e = redis.call('XREVRANGE', KEYS[2], string.format('%d-0', keep_from), '-', 'COUNT', 1)
    if #e > 0 then
      local id = e[1][1]
      redis.call('XTRIM', KEYS[2], 'MINID', id)
      redis.call('HSET', KEYS[1], 'first', string.match(id, '^(%d+)'))
    end
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PUBLISH', ARGV[1], 'e' .. ARGV[2])
end
return 1
"#;

/// ARGV: channel, msg, epoch, outcome, retention_ms. Also used to cancel (epoch empty: any).
const FINISH: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st or (ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3]) then
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
if not redis.call('HGET', KEYS[1], 'status') then return false end
local st = check_lease(ARGV[3])
if not st then return false end
return info(st)
"#;

/// ARGV: channel, msg, retention_ms, epoch, after, max_entries
const READ: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[4] then return false end
local st = check_lease(ARGV[3])
if not st then return false end
local from = string.format('%d-0', tonumber(ARGV[5]) + 1)
local e = redis.call('XREVRANGE', KEYS[2], from, '-', 'COUNT', 1)
if #e > 0 then from = e[1][1] end
-- Entries are keyed by their first sequence number: bound the range by sequence as well as by
-- count, so that a read never moves more than it asked for plus one entry at each end.
local upto = string.format('%d-0', tonumber(ARGV[5]) + tonumber(ARGV[6]))
local entries = redis.call('XRANGE', KEYS[2], from, upto, 'COUNT', ARGV[6])
return {info(st), entries}
"#;

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms
const RENEW: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] or (st ~= 'starting' and st ~= 'running') then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"#;

/// ARGV: channel, msg, epoch
const STATUS: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] then return false end
return redis.call('HGET', KEYS[1], 'status')
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

impl Inner {
    /// Prepares a script call on a session's keys with the common arguments.
    fn invocation<'a>(&self, script: &'a Script, keys: &Keys) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&keys.meta)
            .key(&keys.events)
            .key(&keys.lease)
            .arg(&self.channel)
            .arg(&keys.tag);
        inv
    }

    async fn invoke(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(unavailable)
    }
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
    sessions: Mutex<HashMap<String, Local>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// What this process keeps for a session that has local subscribers: the signal they wait on,
/// and the tail of its log that they all read from.
struct Local {
    tx: watch::Sender<Generation>,
    tail: Arc<Mutex<Tail>>,
}

/// Counts of event and status notifications received for a session.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Generation {
    events: u64,
    status: u64,
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
            let (kind, tag) = payload.split_first().unwrap_or((&b'?', &[]));
            let Ok(tag) = std::str::from_utf8(tag) else {
                continue;
            };
            let sessions = lock(&inner.notifier.sessions);
            if let Some(Local { tx, .. }) = sessions.get(tag) {
                tx.send_modify(|g| match kind {
                    b'e' => g.events += 1,
                    _ => g.status += 1,
                });
            }
        }
        Err(redis::RedisError::from(std::io::Error::other(
            "pub/sub connection closed",
        )))
    }

    fn wake_all(&self) {
        for local in lock(&self.sessions).values() {
            local.tx.send_modify(|g| g.status += 1);
        }
    }

    fn subscribe(&self, tag: &str) -> watch::Receiver<Generation> {
        let mut sessions = lock(&self.sessions);
        // Forget sessions nobody in this process listens to any more.
        if sessions.len() > 64 {
            sessions.retain(|_, local| local.tx.receiver_count() > 0);
        }
        sessions
            .entry(tag.to_owned())
            .or_insert_with(|| Local {
                tx: watch::Sender::new(Generation::default()),
                tail: Arc::default(),
            })
            .tx
            .subscribe()
    }

    /// The current generation and the tail of a session with local subscribers.
    fn local(&self, tag: &str) -> Option<(Generation, Arc<Mutex<Tail>>)> {
        let sessions = lock(&self.sessions);
        let local = sessions.get(tag).filter(|l| l.tx.receiver_count() > 0)?;
        let generation = *local.tx.borrow();
        Some((generation, local.tail.clone()))
    }
}

/// Events one fetch asks for.
const TAIL_PAGE: usize = 1024;
/// Events the shared tail keeps per session.
const TAIL_CAPACITY: usize = 4096;

type Fetch =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), Arc<str>>>>;

/// The newest events of a session, shared by the readers of this process: one fetch from Redis
/// per change serves every local subscriber.
#[derive(Default)]
struct Tail {
    epoch: Option<Epoch>,
    /// Consecutive events ending at `last_seq`.
    events: std::collections::VecDeque<StoredEvent>,
    last_seq: u64,
    status: Option<Status>,
    first_seq: u64,
    /// The newest sequence number Redis reported.
    head_seq: u64,
    gone: bool,
    /// The notifications the tail reflects, and when it was fetched.
    generation: Generation,
    fetched_at: Option<tokio::time::Instant>,
    fetching: Option<Fetch>,
}

impl Generation {
    /// A generation no notification produces, so that a tail marked with it is refreshed.
    fn stale() -> Self {
        Self {
            events: u64::MAX,
            status: u64::MAX,
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

    fn oldest_cached(&self) -> u64 {
        self.events.front().map_or(self.last_seq, |e| e.seq - 1)
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
        let skip = usize::try_from(after - self.oldest_cached()).ok()?;
        Some(Some(ReadBatch {
            events: self.events.iter().skip(skip).take(max).cloned().collect(),
            status,
            first_seq: self.first_seq,
            last_seq: self.head_seq,
        }))
    }
}

/// The [`Subscription`] of a [`RedisStore`]: woken by the process's pub/sub connection, and at
/// least every second, so that a dead producer is noticed even when nothing is announced.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Debug)]
pub struct RedisSubscription {
    rx: watch::Receiver<Generation>,
    check_interval: Duration,
}

impl Subscription for RedisSubscription {
    async fn changed(&mut self) {
        let _ = tokio::time::timeout(self.check_interval, self.rx.changed()).await;
    }
}

// --- The store ---------------------------------------------------------------------------------

impl RedisStore {
    fn spawn_renewal(&self, key: &SessionKey, epoch: Epoch) {
        let weak = Arc::downgrade(&self.inner);
        let (k, every) = (key.clone(), self.inner.config.lease / 3);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let keys = inner.keys(&k);
                let mut inv = inner.invocation(&inner.scripts.renew, &keys);
                inv.arg(epoch.raw())
                    .arg(millis(inner.config.lease))
                    .arg(inner.ttl_ms());
                match inner.invoke(&inv).await.map(|v| as_u64(&v)) {
                    Ok(Some(1)) => {}
                    Ok(_) => {
                        lock(&inner.renewals).remove(&(k, epoch));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew a producer lease"),
                }
            }
        });
        lock(&self.inner.renewals).insert((key.clone(), epoch), task.abort_handle());
    }

    fn stop_renewal(&self, key: &SessionKey, epoch: Epoch) {
        if let Some(task) = lock(&self.inner.renewals).remove(&(key.clone(), epoch)) {
            task.abort();
        }
    }
}

impl RedisStore {
    /// Reads from Redis, bypassing the shared tail.
    async fn read_direct(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.read, &keys);
        // Entries hold whole batches: fetching `max` entries returns at least `max` events
        // when that many exist.
        inv.arg(millis(inner.config.retention))
            .arg(epoch.raw())
            .arg(after)
            .arg(max.clamp(1, 1024));
        let reply = inner.invoke(&inv).await?;
        if reply == Value::Nil {
            return Ok(None);
        }
        let parsed = (|| {
            let [info, entries] = as_array(&reply)? else {
                return None;
            };
            let info = parse_info(info)?;
            let mut events = Vec::new();
            for entry in as_array(entries)? {
                let [_id, fields] = as_array(entry)? else {
                    return None;
                };
                for pair in as_array(fields)?.chunks(2) {
                    let [seq, bytes] = pair else { return None };
                    let seq = as_u64(seq)?;
                    if seq > after && events.len() < max {
                        events.push(StoredEvent {
                            seq,
                            bytes: Bytes::copy_from_slice(as_bytes(bytes)?),
                        });
                    }
                }
            }
            Some(ReadBatch {
                events,
                status: info.status,
                first_seq: info.first_seq,
                last_seq: info.last_seq,
            })
        })();
        parsed.map(Some).ok_or_else(|| bad_reply("read"))
    }

    /// Fetches what follows the tail from Redis and appends it, for every local reader.
    async fn refresh(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        from: u64,
        generation: Generation,
        tail: &Mutex<Tail>,
    ) -> Result<(), Arc<str>> {
        let read = self.read_direct(key, epoch, from, TAIL_PAGE).await;
        let mut t = lock(tail);
        t.fetching = None;
        let batch = read.map_err(|e| Arc::<str>::from(e.to_string()))?;
        if t.epoch != Some(epoch) {
            return Ok(());
        }
        t.fetched_at = Some(tokio::time::Instant::now());
        match batch {
            None => {
                t.gone = true;
                t.generation = generation;
            }
            Some(batch) => {
                let complete = batch.events.len() < TAIL_PAGE;
                for e in batch.events {
                    if e.seq == t.last_seq + 1 {
                        t.last_seq = e.seq;
                        t.events.push_back(e);
                    }
                }
                while t.events.len() > TAIL_CAPACITY {
                    t.events.pop_front();
                }
                t.status = Some(batch.status);
                t.first_seq = batch.first_seq;
                t.head_seq = batch.last_seq;
                t.gone = false;
                // A full page means more is waiting: the tail is not fresh yet.
                t.generation = if complete {
                    generation
                } else {
                    Generation::stale()
                };
            }
        }
        Ok(())
    }
}

impl Store for RedisStore {
    type Subscription = RedisSubscription;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let epoch = Epoch::random();
        let mut inv = inner.invocation(&inner.scripts.claim, &keys);
        inv.arg(epoch.raw())
            .arg(millis(inner.config.lease))
            .arg(inner.ttl_ms())
            .arg(millis(inner.config.retention));
        let _ = lifetime; // the producer enforces it; the keys live as long as the lease is renewed
        let reply = inner.invoke(&inv).await?;
        let a = as_array(&reply).ok_or_else(|| bad_reply("claim"))?;
        match a {
            [flag] if as_u64(flag) == Some(1) => {
                self.spawn_renewal(key, epoch);
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
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.start, &keys);
        inv.arg(epoch.raw()).arg(encode_head(&head));
        inner.invoke(&inv).await.map(drop)
    }

    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.stop_renewal(key, epoch);
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.release, &keys);
        inv.arg(epoch.raw());
        inner.invoke(&inv).await.map(drop)
    }

    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        events: &[StoredEvent],
    ) -> Result<Appended, StoreError> {
        if events.is_empty() {
            return Ok(Appended::Stored);
        }
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.append, &keys);
        inv.arg(epoch.raw())
            .arg(inner.ttl_ms())
            .arg(inner.config.max_events_per_session);
        for e in events {
            inv.arg(e.seq).arg(&e.bytes[..]);
        }
        match as_u64(&inner.invoke(&inv).await?) {
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
        self.stop_renewal(key, epoch);
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.finish, &keys);
        inv.arg(epoch.raw())
            .arg(outcome_name(outcome))
            .arg(millis(inner.config.retention));
        inner.invoke(&inv).await.map(drop)
    }

    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.lookup, &keys);
        inv.arg(millis(inner.config.retention));
        match inner.invoke(&inv).await? {
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
        let tag = escape(key);
        loop {
            // Without local subscribers there is nothing to share: read directly.
            let Some((generation, tail)) = self.inner.notifier.local(&tag) else {
                return self.read_direct(key, epoch, after, max).await;
            };
            let fetch = {
                let mut t = lock(&tail);
                if t.epoch == Some(epoch)
                    && t.is_fresh(generation, self.inner.config.check_interval)
                {
                    match t.serve(after, max) {
                        Some(batch) => return Ok(batch),
                        // Older than the tail: a replay, served directly.
                        None => break,
                    }
                }
                if t.epoch != Some(epoch) {
                    *t = Tail {
                        epoch: Some(epoch),
                        last_seq: after,
                        ..Tail::default()
                    };
                }
                if t.epoch == Some(epoch) && after < t.oldest_cached() {
                    break;
                }
                // One fetch per process refreshes the tail for every local reader.
                let from = t.last_seq;
                t.fetching
                    .get_or_insert_with(|| {
                        let (store, key) = (self.clone(), key.clone());
                        let tail = tail.clone();
                        // A task of its own: the fetch completes (and clears itself) even when
                        // the reader that started it goes away mid-flight.
                        let task = tokio::spawn(async move {
                            store.refresh(&key, epoch, from, generation, &tail).await
                        });
                        async move {
                            task.await.unwrap_or_else(|e| {
                                Err(Arc::from(format!("tail fetch failed: {e}")))
                            })
                        }
                        .boxed()
                        .shared()
                    })
                    .clone()
            };
            fetch
                .await
                .map_err(|e| StoreError::unavailable(e.to_string()))?;
        }
        self.read_direct(key, epoch, after, max).await
    }

    async fn subscribe(
        &self,
        key: &SessionKey,
        _epoch: Epoch,
    ) -> Result<RedisSubscription, StoreError> {
        Ok(RedisSubscription {
            rx: self.inner.notifier.subscribe(&escape(key)),
            check_interval: self.inner.config.check_interval,
        })
    }

    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut rx = inner.notifier.subscribe(&keys.tag);
        let mut seen = *rx.borrow_and_update();
        loop {
            let mut inv = inner.invocation(&inner.scripts.status, &keys);
            inv.arg(epoch.raw());
            match inner.invoke(&inv).await? {
                Value::Nil => return Ok(()),
                v => match status_from(&v) {
                    Some(Status::Finished(Outcome::Cancelled)) | None => return Ok(()),
                    Some(_) => {}
                },
            }
            // Only status announcements (or the periodic check) can mean a cancel.
            let _ = tokio::time::timeout(inner.config.check_interval, async {
                while rx.changed().await.is_ok() {
                    let now = *rx.borrow_and_update();
                    if now.status != seen.status {
                        seen = now;
                        return;
                    }
                }
                std::future::pending::<()>().await
            })
            .await;
        }
    }

    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let keys = inner.keys(key);
        let mut inv = inner.invocation(&inner.scripts.finish, &keys);
        inv.arg("")
            .arg(outcome_name(Outcome::Cancelled))
            .arg(millis(inner.config.retention));
        Ok(as_u64(&inner.invoke(&inv).await?) == Some(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_glob_and_hash_tag_characters() {
        let key = SessionKey::new("a}{*?[\n b").unwrap();
        let e = escape(&key);
        assert!(!e.contains(['{', '}', '*', '?', '[', '\n', ' ']), "{e}");
        assert_eq!(e, "a%7D%7B%2A%3F%5B%0A%20b");
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
}
