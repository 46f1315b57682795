//! The layer's configuration, shared by the layer, its services and their producers.

use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::drain::DrainState;
use crate::fanout::Fanout;
use crate::key::KeyScope;

/// What the layer does when its store fails (for instance Redis is down) while a request with a
/// session key arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Answer `503 Service Unavailable` with `retry-after: 1` and
    /// `resumable-sse-reason: store-unavailable` (the default). Nothing is generated twice.
    #[default]
    ServiceUnavailable,
    /// Call the inner service and pass its response through, unresumable. Availability first:
    /// a reconnect may then generate again.
    PassThrough,
}

/// What a layer, the services it makes and their producers share.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) keep_alive: crate::KeepAlive,
    pub(crate) max_lifetime: Duration,
    pub(crate) max_event_size: usize,
    pub(crate) on_store_error: OnStoreError,
    /// The methods the layer makes resumable; others pass through untouched.
    pub(crate) methods: Vec<Method>,
    pub(crate) scope: KeyScope,
    /// The name of the event that tells a client how its session ended, if one is sent.
    pub(crate) end_event: Option<Arc<str>>,
    /// Whether a connection to a session that failed ends with an error (aborted).
    pub(crate) abort_on_failure: bool,
    /// Whether a request without a position gets the replay of a finished session (or `204`).
    pub(crate) replay_finished: bool,
    /// The methods whose requests without a position start a new session over a finished one.
    pub(crate) restart_finished: Vec<Method>,
    pub(crate) drain: Arc<DrainState>,
    /// The sessions read in this process, shared by the readers of each.
    pub(crate) fanout: Fanout,
}

impl Default for Config {
    /// The defaults of [`ResumableSseLayer::new`](crate::ResumableSseLayer::new), from
    /// [`limits`](crate::limits).
    fn default() -> Self {
        Self {
            keep_alive: crate::KeepAlive::new(),
            max_lifetime: crate::limits::DEFAULT_MAX_LIFETIME,
            max_event_size: crate::limits::DEFAULT_MAX_EVENT_SIZE,
            on_store_error: OnStoreError::default(),
            methods: vec![Method::GET, Method::HEAD],
            scope: KeyScope::default(),
            end_event: None,
            abort_on_failure: true,
            replay_finished: true,
            restart_finished: Vec::new(),
            drain: Arc::default(),
            fanout: Fanout::default(),
        }
    }
}
