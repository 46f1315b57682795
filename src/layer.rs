use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::config::{Config, OnStoreError};
use crate::drain::Drain;
use crate::key::{ExtractSessionKey, FromQuery};
use crate::service::ResumableSse;

/// The ceiling of [`ResumableSseLayer::max_event_size`]: an event, once encoded with `data: `
/// before each of its lines (up to seven times its size), must fit in the 4 GiB a block holds.
const MAX_EVENT_SIZE_LIMIT: usize = 256 << 20;
// The worst expansion (every byte a line break), plus the rest of a block, stays below 4 GiB.
const _: () = assert!(7 * MAX_EVENT_SIZE_LIMIT + (64 << 10) < u32::MAX as usize);

/// A [`Layer`] that makes the SSE responses of the service it wraps resumable.
///
/// See the [crate docs](crate) for what it does and what it guarantees.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use resumable_sse::{KeepAlive, MemoryStore, ResumableSseLayer};
///
/// # async fn chat() -> &'static str { "" }
/// let store = MemoryStore::new();
/// let app: Router = Router::new()
///     .route("/chat", get(chat))
///     .layer(
///         ResumableSseLayer::new(store)
///             .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
///             .max_lifetime(Duration::from_secs(600)),
///     );
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ResumableSseLayer<St, K = FromQuery> {
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) config: Arc<Config>,
}

impl<St> ResumableSseLayer<St> {
    /// Wraps services with resumability backed by `store`, with the defaults: the key comes from
    /// `?session_id=`, a keep-alive comment every 15 s, a session lifetime of one hour, events of
    /// at most 1 MiB, and `503` when the store fails.
    pub fn new(store: St) -> Self {
        Self {
            store,
            key: FromQuery::default(),
            config: Arc::new(Config::default()),
        }
    }
}

impl<St, K> ResumableSseLayer<St, K> {
    /// Sets where the session key comes from; see [`ExtractSessionKey`].
    pub fn session_key<K2: ExtractSessionKey>(self, key: K2) -> ResumableSseLayer<St, K2> {
        ResumableSseLayer {
            store: self.store,
            key,
            config: self.config,
        }
    }

    /// Sets the comments sent on every connection the layer serves while it is idle (default
    /// an empty comment after 15 s without an event); see [`KeepAlive`](crate::KeepAlive).
    pub fn keep_alive(mut self, keep_alive: crate::KeepAlive) -> Self {
        Arc::make_mut(&mut self.config).keep_alive = keep_alive;
        self
    }

    /// The longest a session may run (default one hour). When it is reached the producer is
    /// stopped and the session ends as failed.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        Arc::make_mut(&mut self.config).max_lifetime = lifetime;
        self
    }

    /// The largest event the inner body may produce, in bytes (default 1 MiB, at most 256 MiB:
    /// a larger value is taken as 256 MiB). A larger event ends the session as failed; the events
    /// before it stay readable.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_event_size = bytes.min(MAX_EVENT_SIZE_LIMIT);
        self
    }

    /// What to do when the store fails; see [`OnStoreError`].
    pub fn on_store_error(mut self, policy: OnStoreError) -> Self {
        Arc::make_mut(&mut self.config).on_store_error = policy;
        self
    }

    /// A handle to drain the sessions this layer produces, for rolling deploys; see [`Drain`].
    pub fn drain_handle(&self) -> Drain {
        Drain {
            state: self.config.drain.clone(),
        }
    }

    /// The store, for instance to [cancel](crate::store::Store::cancel) a session.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<S, St: Clone, K: Clone> Layer<S> for ResumableSseLayer<St, K> {
    type Service = ResumableSse<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        ResumableSse {
            inner,
            store: self.store.clone(),
            key: self.key.clone(),
            config: self.config.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn max_event_size_is_capped_so_an_encoded_event_fits_in_a_block() {
        let layer = ResumableSseLayer::new(MemoryStore::new()).max_event_size(usize::MAX);
        assert_eq!(layer.config.max_event_size, 256 << 20);
        let layer = layer.max_event_size(4096);
        assert_eq!(layer.config.max_event_size, 4096);
    }
}
