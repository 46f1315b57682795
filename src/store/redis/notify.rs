//! The notifier: one pub/sub connection per process, fanned out to what the process keeps per
//! session ([`Local`]); and the [`RedisSubscription`] that the layer's fan-out waits on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use redis::RedisResult;
use tokio::sync::watch;

use super::keys::Keys;
use super::{lock, spawn_periodic, Inner};
use crate::session::{Epoch, KeyDigest, SessionKey};
use crate::store::pins::{Pin, Pins};
use crate::store::Subscription;

/// One pub/sub connection per process; every session's changes are announced on one channel and
/// fanned out here to the local subscribers of that session.
pub(super) struct Notifier {
    pub(super) client: redis::Client,
    pub(super) sessions: Mutex<Sessions>,
    pub(super) task: Mutex<Option<tokio::task::AbortHandle>>,
    pub(super) checks_task: Mutex<Option<tokio::task::AbortHandle>>,
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
    pub(super) fn start(inner: &Arc<Inner>) {
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
        Err(redis::RedisError::from(std::io::Error::other(
            "pub/sub connection closed",
        )))
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
