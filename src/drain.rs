//! Graceful drain for rolling deploys.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Drains the sessions that one [`ResumableSseLayer`](crate::ResumableSseLayer) (and every
/// service made from it) produces in this process, for rolling deploys.
///
/// [`drain`](Self::drain) stops taking new sessions (a request that would start one is answered
/// `503 Service Unavailable` with `retry-after: 1` and `resumable-sse-reason: draining`, so a load
/// balancer retries it elsewhere), keeps serving reconnects, lets the running producers finish
/// within a deadline, ends the ones still running then as failed, and returns. With a shared store
/// (Redis) the sessions stay readable from every other instance afterwards.
///
/// ```
/// use std::time::Duration;
/// use resumable_sse::{MemoryStore, ResumableSseLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = ResumableSseLayer::new(MemoryStore::new());
/// let drain = layer.drain_handle();
/// // ... serve the app; on SIGTERM:
/// let report = drain.drain(Duration::from_secs(30)).await;
/// assert_eq!(report.ended_at_deadline, 0);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Drain {
    pub(crate) state: Arc<DrainState>,
}

/// What [`Drain::drain`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Producers that were running when the drain began.
    pub running_at_start: usize,
    /// Producers still running at the deadline, which were ended as failed.
    pub ended_at_deadline: usize,
}

#[derive(Debug)]
pub(crate) struct DrainState {
    draining: AtomicBool,
    /// The number of producers running in this process.
    active: watch::Sender<usize>,
    /// Set when the deadline passed: running producers end.
    abort: watch::Sender<bool>,
}

impl Default for DrainState {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            active: watch::Sender::new(0),
            abort: watch::Sender::new(false),
        }
    }
}

impl DrainState {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a producer for as long as the guard lives; `None` once a drain has begun.
    ///
    /// The count goes up before the drain flag is read, and [`Drain::drain`] sets the flag before
    /// it reads the count (both through the count's lock): either the drain waits for this
    /// producer, or this call sees the drain and refuses. A request that passed an earlier drain
    /// check can therefore never start a producer after `drain()` returned.
    pub(crate) fn producer(self: &Arc<Self>) -> Option<ProducerGuard> {
        self.active.send_modify(|n| *n += 1);
        let guard = ProducerGuard(self.clone());
        (!self.is_draining()).then_some(guard)
    }

    /// Resolves when the drain deadline passed.
    pub(crate) async fn aborted(&self) {
        let mut rx = self.abort.subscribe();
        let _ = rx.wait_for(|aborted| *aborted).await;
    }
}

pub(crate) struct ProducerGuard(Arc<DrainState>);

impl Drop for ProducerGuard {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Drain {
    /// The number of producers running in this process.
    pub fn running(&self) -> usize {
        *self.state.active.borrow()
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.state.is_draining()
    }

    /// The shutdown future for a server: waits for `signal`, [drains](Self::drain) within
    /// `deadline`, then resolves. Give it to the server's graceful shutdown
    /// (`axum::serve(..).with_graceful_shutdown(..)`, or hyper-util's `GracefulShutdown`).
    ///
    /// The order matters, and this is it: the server keeps accepting while the sessions drain,
    /// so a new session is answered `503` with `resumable-sse-reason: draining` (a load balancer
    /// retries it elsewhere) instead of a refused connection, and a reconnect is still served.
    /// Once the drain returns every session this process produced has ended, so their streams
    /// end too, and the server's own wait for open connections is short. (Calling `drain` after
    /// the server's shutdown instead leaves the server waiting for streams that run up to their
    /// lifetime, and refuses new clients meanwhile.) A stream that follows a session another
    /// instance produces (a shared store) is not ended by this drain; the server waits for it
    /// like for any open response.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use axum::{routing::get, Router};
    /// use resumable_sse::{MemoryStore, ResumableSseLayer};
    ///
    /// # async fn chat() -> &'static str { "" }
    /// # #[tokio::main]
    /// # async fn main() -> std::io::Result<()> {
    /// let layer = ResumableSseLayer::new(MemoryStore::new());
    /// let shutdown = layer
    ///     .drain_handle()
    ///     .on_signal(async { let _ = tokio::signal::ctrl_c().await; }, Duration::from_secs(30));
    /// let app = Router::new().route("/chat", get(chat)).layer(layer);
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:3000").await?;
    /// let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    /// server.await?;
    /// # Ok(()) }
    /// ```
    pub fn on_signal<F>(&self, signal: F, deadline: Duration) -> impl Future<Output = ()> + Send
    where
        F: Future + Send + 'static,
    {
        let drain = self.clone();
        async move {
            signal.await;
            tracing::info!(
                running = drain.running(),
                ?deadline,
                "shutting down: draining sessions"
            );
            let report = drain.drain(deadline).await;
            tracing::info!(
                running_at_start = report.running_at_start,
                ended_at_deadline = report.ended_at_deadline,
                "sessions drained; the server closes"
            );
        }
    }

    /// Stops taking new sessions, waits up to `deadline` for the running producers to finish,
    /// ends the rest as failed, and returns once none runs.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.state.draining.store(true, Ordering::Release);
        let running_at_start = self.running();
        let mut active = self.state.active.subscribe();
        let finished = tokio::time::timeout(deadline, active.wait_for(|n| *n == 0))
            .await
            .is_ok();
        let ended_at_deadline = match finished {
            true => 0,
            false => {
                let left = self.running();
                tracing::warn!(
                    left,
                    "drain deadline reached; ending the running sessions as failed"
                );
                self.state.abort.send_replace(true);
                let _ = active.wait_for(|n| *n == 0).await;
                left
            }
        };
        DrainReport {
            running_at_start,
            ended_at_deadline,
        }
    }
}
