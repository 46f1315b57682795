use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::config::{Config, OnStoreError};
use crate::drain::Drain;
use crate::key::{ExtractSessionKey, FromQuery, KeyScope};
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
    /// The request methods the layer makes resumable (default `GET` and `HEAD`); a request with
    /// any other method goes to the inner service untouched, whatever keys it carries. A `HEAD`
    /// request is answered from an existing session (its head, or the answer a `GET` would
    /// get, without a body) and never starts one: it goes to the inner service when the session
    /// does not exist. Add `POST` for applications whose streams start with a `POST`, as MCP's
    /// Streamable HTTP does:
    ///
    /// ```
    /// use http::Method;
    /// use resumable_sse::{MemoryStore, ResumableSseLayer};
    ///
    /// let layer = ResumableSseLayer::new(MemoryStore::new())
    ///     .methods([Method::GET, Method::HEAD, Method::POST]);
    /// # let _ = layer;
    /// ```
    pub fn methods(mut self, methods: impl IntoIterator<Item = http::Method>) -> Self {
        Arc::make_mut(&mut self.config).methods = methods.into_iter().collect();
        self
    }

    /// Sets the key space the layer's keys name (default [`KeyScope::Path`]: each request path
    /// is its own); see [`KeyScope`].
    pub fn key_scope(mut self, scope: KeyScope) -> Self {
        Arc::make_mut(&mut self.config).scope = scope;
        self
    }

    /// Ends every stream of a session with an event named `name` whose data is how the session
    /// ended: `completed`, `failed` or `cancelled` (the [`Reason`](crate::Reason) tokens):
    ///
    /// ```text
    /// event: end
    /// id: 5f3a9c0b12de-42
    /// data: completed
    /// ```
    ///
    /// Off by default: a client that does not expect it would take it for a message. Every
    /// connection that reaches the end of the session gets it, a reconnect's replay as well as
    /// the live stream, after the last event; its id is the last event's, so a reconnect with it
    /// is told `204` with the same outcome in its reason. It is made by the layer as each
    /// connection reaches the end, not stored: that is how a cancelled session, or one whose
    /// producer died, has it too (neither has a producer left to append it).
    ///
    /// # Panics
    ///
    /// If `name` is empty or holds a line break.
    pub fn end_event(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(
            !name.is_empty() && !name.contains(['\r', '\n']),
            "an end event name must be one non-empty line"
        );
        Arc::make_mut(&mut self.config).end_event = Some(Arc::from(name));
        self
    }

    /// Whether a connection to a session that failed ends with an error (default `true`): the
    /// connection is aborted, as a plain handler's would be when its body fails (HTTP/1.1 closes
    /// without the final chunk; HTTP/2 resets the stream), after the last event and the
    /// [end event](Self::end_event), if any. A `fetch`-based client then reports an error instead
    /// of taking a crash for a complete answer, and an `EventSource` reconnects, to be told
    /// `204` with `failed`. With `false`, the stream of a failed session ends cleanly, like one
    /// that completed. A cancelled session's streams always end cleanly: the cancel was asked
    /// for.
    pub fn abort_on_failure(mut self, abort: bool) -> Self {
        Arc::make_mut(&mut self.config).abort_on_failure = abort;
        self
    }

    /// What a request without `Last-Event-ID` gets when its session has finished (completed,
    /// failed or cancelled) and is still retained: the replay of every stored event, from the
    /// start (`true`, the default), or `204 No Content` with the outcome in the
    /// [reason header](crate::REASON_HEADER) (`completed`, `failed` or `cancelled`), as a client
    /// that holds the last event gets (`false`).
    ///
    /// `false` suits clients that ask "is a stream still running for this key?" without a
    /// position and rebuild what they show from the whole stream when there is one, such as
    /// the Vercel AI SDK's `useChat({ resume: true })` (its `reconnectToStream` takes `204` for
    /// "nothing to resume"): a finished answer, which the client already has, is then not sent
    /// again. A running session is served from its start either way, and a request *with*
    /// `Last-Event-ID` is answered as always (the events after it, or `204` when it holds the
    /// last one).
    ///
    /// ```
    /// use resumable_sse::{MemoryStore, ResumableSseLayer};
    ///
    /// let layer = ResumableSseLayer::new(MemoryStore::new()).replay_finished(false);
    /// # let _ = layer;
    /// ```
    pub fn replay_finished(mut self, replay: bool) -> Self {
        Arc::make_mut(&mut self.config).replay_finished = replay;
        self
    }

    /// The methods whose requests without `Last-Event-ID` start a **new session over a finished
    /// one** under the same key (none by default): the inner service is called and its stream
    /// replaces the finished session, whose events are gone (its readers have had them all). A
    /// session that is running is joined as always, and a request with `Last-Event-ID`, or with
    /// another method, is answered as always (see [`replay_finished`](Self::replay_finished)).
    ///
    /// For applications that start every answer with a request under a key that lasts longer
    /// than one answer: a chat whose turns each `POST` to the chat's id, as the Vercel AI SDK's
    /// `useChat` does. Concurrent requests over the same finished session start one new
    /// session, which the others join. The store does the replacement atomically
    /// ([`Store::claim_replacing`](crate::store::Store::claim_replacing); the memory and Redis
    /// stores implement it; with a store that does not, the option changes nothing).
    ///
    /// ```
    /// use http::Method;
    /// use resumable_sse::{MemoryStore, ResumableSseLayer};
    ///
    /// let layer = ResumableSseLayer::new(MemoryStore::new())
    ///     .methods([Method::GET, Method::HEAD, Method::POST])
    ///     .restart_finished([Method::POST]);
    /// # let _ = layer;
    /// ```
    pub fn restart_finished(mut self, methods: impl IntoIterator<Item = http::Method>) -> Self {
        Arc::make_mut(&mut self.config).restart_finished = methods.into_iter().collect();
        self
    }

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

    /// The store (an application names and cancels sessions through [`sessions`](Self::sessions)
    /// instead: keys as the layer derives them, and no store trait to import).
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The application's handle on this layer's sessions: names them as the layer does and
    /// cancels them; see [`Sessions`](crate::Sessions).
    pub fn sessions(&self) -> crate::Sessions<St, K>
    where
        St: crate::store::Store,
        K: ExtractSessionKey,
    {
        crate::Sessions::new(self.store.clone(), self.key.clone(), self.config.scope)
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
