//! Lease bookkeeping: the sessions this process produces, and the one task that renews their
//! leases on the lease connection, which nothing else uses: no read's reply can hold a renewal
//! back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, Script, ServerErrorKind, Value};
use tokio::time::Instant;

use super::keys::Keys;
use super::scripts::Call;
use super::{lock, millis, name_connection, spawn_periodic, unavailable, Conn, Inner};
use crate::limits::{REDIS_COMMAND_CONNECTION_NAME, REDIS_LEASE_CONNECTION_NAME};
use crate::session::{Epoch, SessionKey};
use crate::store::StoreError;

/// Renewals sent in one pipeline.
const RENEWALS_PER_CALL: usize = crate::limits::REDIS_RENEWALS_PER_CALL;

type Held = (SessionKey, Epoch, Arc<Keys>);

/// A session this process produces, whose lease the renewal task renews.
pub(super) struct Lease {
    epoch: Epoch,
    pub(super) keys: Arc<Keys>,
    /// When its producer last began trying to record the session's end, if it did: the lease is
    /// renewed until the end is recorded, or until the producer stops trying.
    finishing: Option<Instant>,
    /// The end of the lifetime given at the claim: the lease is not renewed past it, so a
    /// session its producer did not end in time is marked failed when the lease expires.
    until: Instant,
}

/// How long after its latest attempt (beyond the response timeout) a producer that tries to
/// record its session's end keeps its lease. The producer retries with a backoff of a few
/// seconds at most, so this is only reached once it gave up.
const FINISH_RETRY_GRACE: Duration = Duration::from_secs(30);

/// A lifetime too long to add to the clock counts as this long.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

impl Inner {
    /// Starts the one task that renews the leases of every session this process produces.
    ///
    /// Each round also names the connections again (a connection made again after a loss is
    /// unnamed), apart from the renewals, so that a stalled command connection cannot hold them
    /// back.
    pub(super) fn start_renewals(inner: &Arc<Inner>) {
        let naming = Arc::new(AtomicBool::new(false));
        let task = spawn_periodic(inner, inner.config.lease / 3, move |inner| {
            let naming = naming.clone();
            async move {
                if !naming.swap(true, Ordering::AcqRel) {
                    let (conn, lease_conn) = (inner.conn.clone(), inner.lease_conn.clone());
                    tokio::spawn(async move {
                        name_connection(&conn, REDIS_COMMAND_CONNECTION_NAME).await;
                        name_connection(&lease_conn, REDIS_LEASE_CONNECTION_NAME).await;
                        naming.store(false, Ordering::Release);
                    });
                }
                inner.renew_all().await;
            }
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
                let too_old = Instant::now() >= lease.until;
                if too_old && !given_up {
                    tracing::warn!(
                        "a session outlived the lifetime given at its claim; its lease is let go"
                    );
                }
                !given_up && !too_old
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

    /// Sends renewals on the lease connection: in one pipeline on one server; on a Cluster, whose
    /// sessions live on several nodes, as concurrent calls.
    async fn renew_batch(
        &self,
        batch: &[Held],
    ) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
        if let Conn::Cluster(_) = self.lease_conn {
            let calls: Vec<Call<'_>> = batch
                .iter()
                .map(|(_, epoch, keys)| self.renew_call(keys, *epoch))
                .collect();
            return Ok(futures_util::future::join_all(
                calls
                    .iter()
                    .map(|call| self.invoke_lease(&self.scripts.renew, call)),
            )
            .await);
        }
        let mut pipe = redis::pipe();
        for (_, epoch, keys) in batch {
            pipe.add_command(self.renew_call(keys, *epoch).cmd);
        }
        let mut conn = self.lease_conn.clone();
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

    /// Calls `script` on the lease connection (loading it first if the server's script cache
    /// was emptied).
    pub(super) async fn invoke_lease(
        &self,
        script: &Script,
        call: &Call<'_>,
    ) -> Result<Value, StoreError> {
        let mut conn = self.lease_conn.clone();
        match call.cmd.query_async::<Value>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(&mut conn).await.map_err(unavailable)?;
                call.cmd.query_async(&mut conn).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }

    /// Renews the lease of a session claimed here, for at most `lifetime`.
    pub(super) fn hold_lease(&self, key: &SessionKey, epoch: Epoch, lifetime: Duration) {
        let keys = self.keys(key);
        let now = Instant::now();
        lock(&self.renewals).insert(
            key.clone(),
            Lease {
                epoch,
                keys,
                finishing: None,
                until: now.checked_add(lifetime).unwrap_or(now + YEAR),
            },
        );
    }

    /// Notes an attempt to record the end of a session produced here: its lease stays renewed
    /// meanwhile.
    pub(super) fn finishing(&self, key: &SessionKey, epoch: Epoch) {
        if let Some(lease) = lock(&self.renewals).get_mut(key) {
            if lease.epoch == epoch {
                lease.finishing = Some(Instant::now());
            }
        }
    }

    pub(super) fn release_lease(&self, key: &SessionKey, epoch: Epoch) {
        let mut renewals = lock(&self.renewals);
        if renewals.get(key).is_some_and(|lease| lease.epoch == epoch) {
            renewals.remove(key);
        }
    }
}
