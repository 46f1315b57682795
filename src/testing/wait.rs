//! Waits with a deadline, which tests use instead of fixed sleeps: on a condition, and on the
//! state of a session in a store.
//!
//! Each wait checks its condition often (every millisecond, every 5 ms for a store) and fails
//! the test (a panic naming what it waited for) once its limit has passed on the runtime's
//! clock: the real one, or the paused one of `start_paused` tests, where it measures virtual
//! time.

use std::future::Future;
use std::time::Duration;

use crate::store::{SessionInfo, Store};
use crate::SessionKey;

/// The longest any wait of the tests takes before it fails the test: for a response head, a
/// frame, a condition.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`within`] and [`eventually`] check their condition.
const POLL: Duration = Duration::from_millis(1);
/// How often the asynchronous waits check their condition (a store call, say).
const POLL_ASYNC: Duration = Duration::from_millis(5);

/// Waits until `cond` holds.
///
/// # Panics
///
/// Once `limit` has passed on the runtime's clock, naming `what`.
pub async fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `cond` holds, for at most [`TIMEOUT`].
///
/// # Panics
///
/// Once [`TIMEOUT`] has passed, naming `what`.
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    within(TIMEOUT, what, cond).await;
}

/// Waits until the asynchronous `cond` holds, for at most [`TIMEOUT`].
///
/// # Panics
///
/// Once [`TIMEOUT`] has passed, naming `what`.
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_ASYNC).await;
    }
}

/// The key the layer stores the session of `id` under for requests to `route` (the default
/// key scope, [`KeyScope::Path`](crate::KeyScope::Path)).
///
/// # Panics
///
/// When `id` is not a valid key, or `route` not a valid path.
pub fn scoped(route: &str, id: &str) -> SessionKey {
    SessionKey::scoped(route, &SessionKey::new(id).expect("a valid key")).expect("a valid path")
}

/// Waits until the session under `key` exists and satisfies `cond`, for at most [`TIMEOUT`],
/// and returns its state.
///
/// # Panics
///
/// When a lookup fails, or once [`TIMEOUT`] has passed, naming `what` and the last state seen.
pub async fn session_when<St: Store>(
    store: &St,
    key: &SessionKey,
    what: &str,
    cond: impl Fn(&SessionInfo) -> bool,
) -> SessionInfo {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let info = store.lookup(key).await.expect("lookup");
        if let Some(info) = info.as_ref().filter(|i| cond(i)) {
            return info.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {key:?}: {what}: not within {TIMEOUT:?}; last seen {info:?}"
        );
        tokio::time::sleep(POLL_ASYNC).await;
    }
}

/// Waits until the session under `key` is finished, for at most [`TIMEOUT`], and returns its
/// state.
///
/// # Panics
///
/// As [`session_when`].
pub async fn session_finished<St: Store>(store: &St, key: &SessionKey) -> SessionInfo {
    session_when(store, key, "finished", |i| i.status.is_finished()).await
}
