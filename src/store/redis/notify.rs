//! The notifier: one pub/sub connection per process, fanned out to what the process keeps per
//! session ([`Local`]); and the [`RedisSubscription`] that the layer's fan-out waits on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use tokio::sync::watch;

use super::keys::Keys;
use super::{lock, spawn_periodic, Inner};
use crate::session::{Epoch, KeyDigest, SessionKey};
use crate::store::pins::{Pin, Pins};
use crate::store::Subscription;

/// One pub/sub connection per process; every session's changes are announced on one channel and
/// fanned out here to the local subscribers of that session.
pub(super) struct Notifier {
    /// Where to subscribe: the server, or the seed nodes of a Cluster (to which the nodes the
    /// Cluster reports are added when a subscription fails: a classic `PUBLISH` reaches every
    /// node of a Cluster, so any node will do).
    pub(super) seeds: Vec<redis::Client>,
    pub(super) cluster: bool,
    pub(super) sessions: Mutex<Sessions>,
    pub(super) task: Mutex<Option<tokio::task::AbortHandle>>,
    pub(super) checks_task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// How a subscription ended: whether it was in place before it failed, and why it failed.
type Lost = (bool, redis::RedisError);

/// The wait before the `failures`-th attempt in a row to subscribe again: none before the first,
/// then [`REDIS_NOTIFY_RETRY_MIN`](crate::limits::REDIS_NOTIFY_RETRY_MIN), doubled at each
/// further failure up to [`REDIS_NOTIFY_RETRY_MAX`](crate::limits::REDIS_NOTIFY_RETRY_MAX).
fn retry_after(failures: u32) -> Duration {
    use crate::limits::{REDIS_NOTIFY_RETRY_MAX, REDIS_NOTIFY_RETRY_MIN};
    let Some(doublings) = failures.checked_sub(1) else {
        return Duration::ZERO;
    };
    REDIS_NOTIFY_RETRY_MIN
        .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
        .unwrap_or(REDIS_NOTIFY_RETRY_MAX)
        .min(REDIS_NOTIFY_RETRY_MAX)
}

fn failed(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(what.to_owned()))
}

/// The sessions with local subscribers, by the digest of their key, which names them in
/// announcements. Two sessions whose digests collide share one entry: their subscribers are
/// woken by the changes of both and read again, which is harmless; [`Inner::keys`](super::Inner)
/// checks the key before it reuses an entry's keys.
#[derive(Default)]
pub(super) struct Sessions {
    pub(super) map: HashMap<KeyDigest, Local>,
    /// The size at which sessions nobody listens to any more are forgotten.
    sweep_at: usize,
}

/// What this process keeps for a session that has local subscribers or its producer: the signal
/// the subscribers wait on, its keys, and the signal of its status changes that its producer
/// waits on.
pub(super) struct Local {
    tx: watch::Sender<Generation>,
    /// When a change of the session was last announced.
    heard_at: Instant,
    pub(super) keys: Arc<Keys>,
    /// Status changes only. The producer waits on this one, not on `tx`: woken with its
    /// subscribers at every event, it would queue behind all of them each time, and only
    /// produce its next event once every subscriber had been polled.
    status: watch::Sender<u64>,
    /// Where each local reader is, with the epoch it reads: the producer's appends keep what
    /// they still need past the soft limits.
    pins: Pins,
}

impl Local {
    fn new(keys: &Arc<Keys>) -> Self {
        Local {
            tx: watch::Sender::new(Generation::default()),
            heard_at: Instant::now(),
            keys: keys.clone(),
            status: watch::Sender::new(0),
            pins: Pins::default(),
        }
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
pub(super) struct Generation {
    events: u64,
    status: u64,
    checks: u64,
}

impl Notifier {
    /// Starts the task that keeps the process subscribed: when its connection fails, it
    /// subscribes again, on a Cluster on the next node (so that the loss of a node does not stop
    /// the notifications), waiting longer after each failed attempt in a row; once subscribed
    /// again, every local subscriber and producer re-reads, so no change made meanwhile is
    /// missed.
    pub(super) fn start(inner: &Arc<Inner>) {
        let weak = Arc::downgrade(inner);
        let seeds = inner.notifier.seeds.clone();
        let cluster = inner.notifier.cluster;
        let channel = inner.channel.clone();
        let ping_timeout = inner.config.response_timeout;
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            let mut node = 0usize;
            loop {
                let nodes = if cluster && node > 0 {
                    Self::cluster_nodes(&weak, &seeds).await
                } else {
                    seeds.clone()
                };
                let Some(client) = nodes.get(node % nodes.len().max(1)) else {
                    return;
                };
                match Self::listen(client, &channel, &weak, ping_timeout).await {
                    Ok(()) => return, // the store was dropped
                    Err((subscribed, e)) => {
                        failures = if subscribed {
                            1
                        } else {
                            failures.saturating_add(1)
                        };
                        tracing::warn!(error = %e, "Redis notifications lost; subscribing again");
                    }
                }
                // Changes may have been missed: wake everyone to re-read.
                let Some(inner) = weak.upgrade() else { return };
                inner.notifier.wake_all();
                drop(inner);
                node = node.wrapping_add(1);
                tokio::time::sleep(retry_after(failures)).await;
            }
        });
        *lock(&inner.notifier.task) = Some(task.abort_handle());
    }

    /// The seed nodes, then every other node the Cluster reports (`CLUSTER SLOTS`, masters and
    /// replicas), reached with the seeds' credentials and TLS settings.
    async fn cluster_nodes(weak: &Weak<Inner>, seeds: &[redis::Client]) -> Vec<redis::Client> {
        let mut nodes = seeds.to_vec();
        let (Some(base), Some(mut conn)) = (seeds.first(), weak.upgrade().map(|i| i.conn.clone()))
        else {
            return nodes;
        };
        let reply = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<redis::Value>(&mut conn)
            .await;
        let Ok(redis::Value::Array(ranges)) = reply else {
            return nodes;
        };
        let mut known: Vec<Option<(String, u16)>> = nodes.iter().map(tcp_addr).collect();
        for range in &ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            for node in parts.iter().skip(2) {
                let Some((host, port)) = node_addr(node) else {
                    continue;
                };
                let addr = Some((host.clone(), port));
                if known.contains(&addr) {
                    continue;
                }
                if let Some(client) = at(base, host, port) {
                    known.push(addr);
                    nodes.push(client);
                }
            }
        }
        nodes
    }

    /// Subscribes through `client` and fans the announcements out until the connection fails
    /// (`Err`) or the store is dropped (`Ok`). The connection is pinged every
    /// [`REDIS_NOTIFY_PING_INTERVAL`](crate::limits::REDIS_NOTIFY_PING_INTERVAL), so that a
    /// server gone without closing it is noticed too.
    async fn listen(
        client: &redis::Client,
        channel: &str,
        weak: &Weak<Inner>,
        ping_timeout: Duration,
    ) -> Result<(), Lost> {
        use crate::limits::{REDIS_CONNECT_TIMEOUT, REDIS_NOTIFY_PING_INTERVAL};
        let pubsub = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| (false, failed("timed out connecting for notifications")))?
            .map_err(|e| (false, e))?;
        let (mut sink, mut messages) = pubsub.split();
        tokio::time::timeout(ping_timeout, sink.subscribe(channel))
            .await
            .map_err(|_| (false, failed("timed out subscribing")))?
            .map_err(|e| (false, e))?;
        if let Some(inner) = weak.upgrade() {
            // Subscribed again after a loss: whatever happened meanwhile is re-read.
            inner.notifier.wake_all();
        }
        let mut pings = tokio::time::interval_at(
            Instant::now() + REDIS_NOTIFY_PING_INTERVAL,
            REDIS_NOTIFY_PING_INTERVAL,
        );
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                msg = messages.next() => msg,
                _ = pings.tick() => {
                    match tokio::time::timeout(ping_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return Err((true, e)),
                        Err(_) => return Err((true, failed("pub/sub connection unresponsive"))),
                    }
                }
            };
            let Some(msg) = msg else {
                return Err((true, failed("pub/sub connection closed")));
            };
            let Some(inner) = weak.upgrade() else {
                return Ok(());
            };
            let payload = msg.get_payload_bytes();
            let (kind, digest) = payload.split_first().unwrap_or((&b'?', &[]));
            let Some(digest) = KeyDigest::parse_hex(digest) else {
                continue;
            };
            let mut sessions = lock(&inner.notifier.sessions);
            if let Some(local) = sessions.map.get_mut(&digest) {
                local.heard_at = Instant::now();
                match kind {
                    b'e' => local.events_changed(),
                    _ => local.status_changed(),
                }
            }
        }
    }

    /// Starts the one task that wakes the subscribers of every session that announced nothing
    /// lately: their next read goes to Redis, which marks the session failed if its producer's
    /// lease expired. A session whose changes are announced costs nothing here, and no
    /// subscriber has a timer of its own: a timer per subscriber would fire thousands of times a
    /// second for a large fan-out, each firing in the way of the timers that pace the
    /// producers.
    pub(super) fn start_checks(inner: &Arc<Inner>) {
        // Every half interval, the sessions silent for half an interval: each session is
        // checked at most an interval after its last announcement.
        let every = inner.config.check_interval / 2;
        let task = spawn_periodic(inner, every, move |inner| async move {
            inner.notifier.check_idle(every);
        });
        *lock(&inner.notifier.checks_task) = Some(task);
    }

    /// Wakes the subscribers of every session that announced nothing within `idle`, and
    /// forgets the sessions nobody in this process listens to any more (so that what the
    /// process keeps per session returns once its sessions are over, whether or not new ones
    /// come).
    fn check_idle(&self, idle: Duration) {
        lock(&self.sessions).map.retain(|_, local| {
            if !local.in_use() {
                return false;
            }
            if local.tx.receiver_count() > 0 && local.heard_at.elapsed() >= idle {
                local.heard_at = Instant::now();
                local.tx.send_modify(|g| g.checks += 1);
            }
            true
        });
    }

    /// Announces a status change of a session to its local subscribers.
    pub(super) fn announce_status(&self, key: &SessionKey) {
        if let Some(local) = lock(&self.sessions).map.get(&key.digest()) {
            local.status_changed();
        }
    }

    fn wake_all(&self) {
        for local in lock(&self.sessions).map.values() {
            local.status_changed();
        }
    }

    /// A subscriber's signal, every change of the session, and its reader's pin.
    pub(super) fn subscribe(
        &self,
        keys: &Arc<Keys>,
        epoch: Epoch,
    ) -> (watch::Receiver<Generation>, Pin) {
        self.with_local(keys, |local| (local.tx.subscribe(), local.pins.pin(epoch)))
    }

    /// Where the local readers of a session's `epoch` are, if any is connected.
    pub(super) fn pinned(&self, key: &SessionKey, epoch: Epoch) -> Option<u64> {
        let sessions = lock(&self.sessions);
        sessions.map.get(&key.digest())?.pins.min(epoch)
    }

    /// The producer's signal: the session's status changes.
    pub(super) fn subscribe_status(&self, keys: &Arc<Keys>) -> watch::Receiver<u64> {
        self.with_local(keys, |local| local.status.subscribe())
    }

    /// Runs `f` on what this process keeps for the session, made if needed.
    fn with_local<T>(&self, keys: &Arc<Keys>, f: impl FnOnce(&Local) -> T) -> T {
        let mut sessions = lock(&self.sessions);
        if let Some(local) = sessions.map.get(&keys.digest) {
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
        sessions.map.insert(keys.digest, local);
        out
    }
}

/// The host and port a client reaches over TCP (with or without TLS).
fn tcp_addr(client: &redis::Client) -> Option<(String, u16)> {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
        redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
}

/// A node of a `CLUSTER SLOTS` reply: `[host, port, id, ...]`.
fn node_addr(node: &redis::Value) -> Option<(String, u16)> {
    let redis::Value::Array(fields) = node else {
        return None;
    };
    let host = match fields.first()? {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
        redis::Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    let port = match fields.get(1)? {
        redis::Value::Int(p) => u16::try_from(*p).ok()?,
        _ => return None,
    };
    // A node that does not know its own address reports an empty host ("?" when unknown).
    (!host.is_empty() && host != "?" && port != 0).then_some((host, port))
}

/// A client for the node at `host:port`, with `base`'s credentials, database and TLS settings.
fn at(base: &redis::Client, host: String, port: u16) -> Option<redis::Client> {
    let info = base.get_connection_info().clone();
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(..) => redis::ConnectionAddr::Tcp(host, port),
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => return None,
    };
    redis::Client::open(info.set_addr(addr)).ok()
}

/// The [`Subscription`] of a [`RedisStore`](super::RedisStore): woken by the process's pub/sub
/// connection, and by the process's periodic check of the sessions that announced nothing
/// within the check interval (one second), so that a dead producer is noticed even when nothing
/// is announced. It has no timer of its own.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Debug)]
pub struct RedisSubscription {
    rx: watch::Receiver<Generation>,
    check_interval: Duration,
    /// Where its reader is; the producer in this process keeps what it still needs.
    pin: Pin,
}

impl RedisSubscription {
    pub(super) fn new(
        (rx, pin): (watch::Receiver<Generation>, Pin),
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
        self.pin.reached(seq);
    }
}

#[cfg(feature = "test-util")]
impl super::RedisStore {
    /// How many sessions the process keeps an entry for (its local readers' signals and pins):
    /// those with a local reader or producer, and those not yet swept since their last one left.
    #[doc(hidden)]
    pub fn local_session_entries(&self) -> usize {
        lock(&self.inner.notifier.sessions).map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{REDIS_NOTIFY_RETRY_MAX, REDIS_NOTIFY_RETRY_MIN};

    #[test]
    fn resubscribing_waits_longer_after_each_failure_up_to_the_maximum() {
        // n: the failures after which the wait first reaches the maximum.
        let n =
            (REDIS_NOTIFY_RETRY_MAX.as_millis() / REDIS_NOTIFY_RETRY_MIN.as_millis()).ilog2() + 1;
        assert_eq!(retry_after(0), Duration::ZERO);
        assert_eq!(retry_after(1), REDIS_NOTIFY_RETRY_MIN);
        assert_eq!(retry_after(2), REDIS_NOTIFY_RETRY_MIN * 2);
        assert_eq!(retry_after(n - 1), REDIS_NOTIFY_RETRY_MAX / 2);
        assert_eq!(retry_after(n), REDIS_NOTIFY_RETRY_MAX);
        assert_eq!(retry_after(n + 1), REDIS_NOTIFY_RETRY_MAX);
        assert_eq!(retry_after(2 * n), REDIS_NOTIFY_RETRY_MAX);
        assert_eq!(retry_after(40), REDIS_NOTIFY_RETRY_MAX);
        assert_eq!(retry_after(u32::MAX), REDIS_NOTIFY_RETRY_MAX);
    }
}
