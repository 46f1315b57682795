//! [`Sessions`]: the application's handle on the sessions of a layer.

use http::request::Parts;
use http::StatusCode;

use crate::key::{self, ExtractSessionKey, FromQuery, KeyScope};
use crate::session::{InvalidSessionKey, SessionKey};
use crate::store::{SessionInfo, Store, StoreError};

/// The application's handle on the sessions of a [`ResumableSseLayer`](crate::ResumableSseLayer),
/// from [`ResumableSseLayer::sessions`](crate::ResumableSseLayer::sessions): it names sessions as
/// the layer does (with the layer's extractor and [`KeyScope`]) and stops them. Cheap to clone;
/// put it in the application's state.
///
/// A stop button is the stream's own URL with another method (the layer passes it through):
///
/// ```
/// use axum::extract::{Request, State};
/// use axum::http::StatusCode;
/// use axum::routing::get;
/// use axum::Router;
/// use resumable_sse::{MemoryStore, ResumableSseLayer, Sessions};
///
/// # async fn chat() -> &'static str { "" }
/// // `DELETE /chat?session_id=...` stops the generation that `GET /chat?session_id=...` follows.
/// async fn stop(State(sessions): State<Sessions<MemoryStore>>, req: Request) -> StatusCode {
///     let (parts, _) = req.into_parts();
///     match sessions.cancel_request(&parts).await {
///         Ok(true) => StatusCode::NO_CONTENT,
///         Ok(false) => StatusCode::NOT_FOUND,
///         Err(e) => e.status(),
///     }
/// }
///
/// let layer = ResumableSseLayer::new(MemoryStore::new());
/// let app: Router = Router::new()
///     .route("/chat", get(chat).delete(stop))
///     .with_state(layer.sessions())
///     .layer(layer);
/// ```
#[derive(Clone, Debug)]
pub struct Sessions<St, K = FromQuery> {
    store: St,
    key: K,
    scope: KeyScope,
}

impl<St: Store, K: ExtractSessionKey> Sessions<St, K> {
    pub(crate) fn new(store: St, key: K, scope: KeyScope) -> Self {
        Self { store, key, scope }
    }

    /// The session key the layer derives from a request, if it has one: the same extractor,
    /// within the same [`KeyScope`]. Whatever the request's method.
    pub fn key(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        key::derive(&self.key, self.scope, parts)
    }

    /// The session key of the key `id` on the route at `path` (as requests have it, still
    /// percent-encoded), for an application that stops a session from another route.
    pub fn key_at(&self, path: &str, id: &str) -> Result<SessionKey, InvalidSessionKey> {
        let id = SessionKey::new(id)?;
        match self.scope {
            KeyScope::Path => SessionKey::scoped(path, &id),
            KeyScope::Shared => Ok(id),
        }
    }

    /// Cancels the running (or starting) session under `key`: its producer drops the inner body,
    /// which stops the generation; it ends as cancelled, and its clients see its end. Returns
    /// whether a session was cancelled (`false`: none, or already finished). Works from any
    /// instance sharing the store.
    pub async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.store.cancel(key).await
    }

    /// Cancels the session the request names (see [`key`](Self::key)).
    pub async fn cancel_request(&self, parts: &Parts) -> Result<bool, SessionsError> {
        let key = self
            .key(parts)
            .map_err(SessionsError::InvalidKey)?
            .ok_or(SessionsError::NoKey)?;
        self.cancel(&key).await.map_err(SessionsError::Store)
    }

    /// The session under `key`, if one exists: its status and how many events it has.
    pub async fn status(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        self.store.lookup(key).await
    }
}

/// Why [`Sessions::cancel_request`] could not cancel.
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionsError {
    /// The request carries no session key.
    NoKey,
    /// The request's session key is not valid.
    InvalidKey(InvalidSessionKey),
    /// The store failed.
    Store(StoreError),
}

impl SessionsError {
    /// The status an HTTP answer to this error has: `400` for a missing or invalid key, `503`
    /// for a store failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoKey | Self::InvalidKey(_) => StatusCode::BAD_REQUEST,
            Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for SessionsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoKey => f.write_str("the request has no session key"),
            Self::InvalidKey(e) => e.fmt(f),
            Self::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SessionsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NoKey => None,
            Self::InvalidKey(e) => Some(e),
            Self::Store(e) => Some(e),
        }
    }
}
