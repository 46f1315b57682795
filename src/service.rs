use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{Reader, ResumableBody, SessionEvents};
use crate::config::{Config, OnStoreError};
use crate::future::ResponseFuture;
use crate::key::{self, last_event_id, ExtractSessionKey, FromQuery, LastEventId};
use crate::metrics;
use crate::reason::Reason;
use crate::session::{Epoch, SessionKey};
use crate::store::{Claim, ResponseHead, SessionInfo, Status, Store, StoreErrorKind, Subscription};
use crate::{producer, BoxError};

/// The header that names why the layer answered a request itself, without events.
pub const REASON_HEADER: HeaderName = HeaderName::from_static("resumable-sse-reason");

/// How long a request waits for another request's claim on the same session to produce a
/// response head before it is answered `503` with `session-starting`.
const START_WAIT: Duration = Duration::from_secs(30);
/// Grace given to the store beyond the producer's own deadline, so the session can be finished.
const FINISH_GRACE: Duration = Duration::from_secs(30);

/// The [`Service`] made by [`ResumableSseLayer`](crate::ResumableSseLayer).
///
/// See the [crate docs](crate) for what it does.
#[derive(Clone, Debug)]
pub struct ResumableSse<S, St, K = FromQuery> {
    pub(crate) inner: S,
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) config: Arc<Config>,
}

impl<S, St, K> ResumableSse<S, St, K> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for ResumableSse<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
    St: Store,
    K: ExtractSessionKey,
{
    type Response = Response<ResumableBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Only the methods the layer resumes, and only requests that can take an event stream:
        // everything else is the inner service's, whatever keys it carries.
        if !self.config.methods.contains(req.method()) || !key::accepts_event_stream(req.headers())
        {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        let key = match key::derive(&self.key, self.config.scope, &parts) {
            Ok(Some(key)) => key,
            Ok(None) => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                )
            }
            Err(e) => {
                tracing::debug!(error = %e, "invalid session key");
                let res = reject(StatusCode::BAD_REQUEST, Reason::InvalidSessionKey);
                return ResponseFuture::session(Box::pin(async move { Ok(res) }));
            }
        };
        let last = last_event_id(&parts);
        let probe = parts.method == http::Method::HEAD;
        // The future owns the service that was driven to readiness; leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let session = Session {
            store: self.store.clone(),
            config: self.config.clone(),
            key,
        };
        // Every line logged for this session (here, by its producer and by its readers) names it
        // by the digest of its key, and by its epoch once known.
        let span = tracing::debug_span!(
            "session",
            key = %session.key.digest(),
            epoch = tracing::field::Empty
        );
        let handle = session.handle(inner, Request::from_parts(parts, body), last, probe);
        ResponseFuture::session(Box::pin(tracing::Instrument::instrument(handle, span)))
    }
}

struct Session<St> {
    store: St,
    config: Arc<Config>,
    key: SessionKey,
}

impl<St: Store> Session<St> {
    async fn handle<S, ReqBody, ResBody>(
        self,
        inner: S,
        req: Request<ReqBody>,
        last: LastEventId,
        probe: bool,
    ) -> Result<Response<ResumableBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        if probe {
            // `HEAD`: the answer a `GET` would get, without its body; never a new session.
            let res = self.probe(inner, req, last).await?;
            return Ok(res.map(|_| ResumableBody::empty()));
        }
        let last = match last {
            LastEventId::Malformed => {
                return Ok(reject(
                    StatusCode::BAD_REQUEST,
                    Reason::MalformedLastEventId,
                ))
            }
            LastEventId::Id(id) => Some(id),
            LastEventId::None => None,
        };
        // A request that finds the session starting waits for it; if that claim is released
        // (its response was not an event stream) the request tries to claim it itself.
        for _ in 0..3 {
            // While draining, a request without a position may still join a session that
            // exists, but never starts one.
            let draining = last.is_none() && self.config.drain.is_draining();
            let found = if last.is_some() || draining {
                match self.store.lookup(&self.key).await {
                    Ok(Some(info)) => Found::Session(info),
                    Ok(None) if draining => Found::Draining,
                    Ok(None) => Found::Unknown,
                    Err(e) => Found::StoreFailed(e),
                }
            } else {
                match self
                    .store
                    .claim(&self.key, self.config.max_lifetime + FINISH_GRACE)
                    .await
                {
                    Ok(Claim::Claimed(epoch)) => return self.start(inner, req, epoch).await,
                    Ok(Claim::Exists(info)) => Found::Session(info),
                    Err(e) => Found::StoreFailed(e),
                }
            };
            let info = match found {
                // Asked to start anew over a finished session: replace it, unless another
                // request did first (then that one's session is found).
                Found::Session(info)
                    if last.is_none()
                        && !draining
                        && info.status.is_finished()
                        && self.config.restart_finished.contains(req.method()) =>
                {
                    match self
                        .store
                        .claim_replacing(
                            &self.key,
                            self.config.max_lifetime + FINISH_GRACE,
                            info.epoch,
                        )
                        .await
                    {
                        Ok(Claim::Claimed(epoch)) => return self.start(inner, req, epoch).await,
                        Ok(Claim::Exists(other)) if other.epoch != info.epoch => {
                            if other.status == Status::Starting {
                                if let Err(e) = self.wait_started(other.epoch).await {
                                    return self.store_failed(e, inner, req).await;
                                }
                                continue;
                            }
                            other
                        }
                        Ok(Claim::Exists(same)) => same,
                        Err(e) if e.kind() == StoreErrorKind::SessionLimit => {
                            return Ok(reject(
                                StatusCode::SERVICE_UNAVAILABLE,
                                Reason::SessionLimit,
                            ))
                        }
                        Err(e) => return self.store_failed(e, inner, req).await,
                    }
                }
                Found::Session(info) => info,
                Found::Draining => return Ok(draining_response()),
                Found::Unknown => return Ok(reject(StatusCode::GONE, Reason::UnknownSession)),
                Found::StoreFailed(e) if e.kind() == StoreErrorKind::SessionLimit => {
                    return Ok(reject(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Reason::SessionLimit,
                    ))
                }
                Found::StoreFailed(e) => return self.store_failed(e, inner, req).await,
            };
            if info.status == Status::Starting {
                if let Err(e) = self.wait_started(info.epoch).await {
                    return self.store_failed(e, inner, req).await;
                }
                continue;
            }
            return Ok(self.resume(info, last));
        }
        Ok(reject(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::SessionStarting,
        ))
    }

    /// The first request: call the inner service and take over its event stream.
    async fn start<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        req: Request<ReqBody>,
        epoch: Epoch,
    ) -> Result<Response<ResumableBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        record_epoch(epoch);
        let mut claim = ClaimGuard {
            store: Some(self.store.clone()),
            key: self.key.clone(),
            epoch,
        };
        // Counted as a producer from now on: a drain that begins while the inner service
        // answers waits for this session, and one that began since the check in `handle` is
        // seen here, before anything is generated.
        let Some(running) = self.config.drain.producer() else {
            claim.release().await;
            return Ok(draining_response());
        };
        // A drain whose deadline passes while the inner service answers does not wait for it.
        let res = tokio::select! {
            res = inner.call(req) => res?,
            () = self.config.drain.aborted() => {
                claim.release().await;
                return Ok(draining_response());
            }
        };
        if !is_event_stream(&res) {
            claim.release().await;
            return Ok(res.map(ResumableBody::passthrough));
        }
        let (mut parts, body) = res.into_parts();
        strip_framing_headers(&mut parts.headers);
        let head = ResponseHead {
            status: parts.status,
            headers: replayed_headers(&parts.headers),
        };
        // From here on the session must not depend on this request: a client that goes away
        // while the store starts the session would otherwise leave it started with nobody
        // producing. The start and the producer run in a task of their own.
        claim.disarm();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, key, config) = (self.store.clone(), self.key.clone(), self.config.clone());
        // In the request's span (the session's), though it outlives the request.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            // A store that panics must not leave the claim behind (nor this request waiting).
            let start = AssertUnwindSafe(start_session(&store, &key, epoch, head)).catch_unwind();
            let started = match start.await.unwrap_or_else(|_| {
                Err(crate::store::StoreError::unavailable(
                    "the session store panicked while starting a session",
                ))
            }) {
                Ok(true) => {
                    // The first reader subscribes before the first event is appended: its
                    // position holds the session's events from the start (without it, a
                    // reader is subscribed at its first read).
                    let follower = config.fanout.follow(&store, &key, epoch, 0).await.ok();
                    producer::spawn(store, key, epoch, body, config, running);
                    tracing::debug!("session started");
                    Started::Running(follower)
                }
                Ok(false) => {
                    // The claim was lost meanwhile (cancelled, expired, taken over): another
                    // producer may run; this body is dropped, which stops its generation.
                    tracing::warn!(
                        ?epoch,
                        "session claim lost before it started; not producing"
                    );
                    drop(body);
                    Started::Lost
                }
                Err(e) => {
                    // The inner service has answered and must not be asked again: serve this
                    // response as it is, unresumable.
                    metrics::store_error();
                    tracing::warn!(error = %e, ?epoch, "could not start a session; serving the response unresumable");
                    if let Err(e) = store.release(&key, epoch).await {
                        tracing::warn!(error = %e, "could not release a session claim; it will expire");
                    }
                    Started::Unresumable(body)
                }
            };
            let _ = tx.send(started);
        }));
        match rx.await {
            Ok(Started::Running(follower)) => {
                let config = self.config.clone();
                let reader = Reader::following(self.store, config, self.key, epoch, 0, follower);
                Ok(Response::from_parts(
                    parts,
                    ResumableBody::session(SessionEvents::new(reader, &self.config.keep_alive)),
                ))
            }
            Ok(Started::Unresumable(body)) => Ok(Response::from_parts(
                parts,
                ResumableBody::passthrough(body),
            )),
            // Whatever holds the key now answers this request as it would a reconnect.
            Ok(Started::Lost) => match self.store.lookup(&self.key).await {
                Ok(Some(info)) if info.status != Status::Starting => Ok(self.resume(info, None)),
                // Gone, or claimed afresh: this request is told to come back.
                Ok(_) => Ok(unavailable(Reason::SessionStarting)),
                Err(e) => Ok(self.store_unavailable(e)),
            },
            // The task was dropped: the runtime is shutting down.
            Err(_) => Ok(
                self.store_unavailable(crate::store::StoreError::unavailable(
                    "the runtime stopped while starting a session",
                )),
            ),
        }
    }

    /// A `HEAD` request: looks the session up and answers as a `GET` would (the caller drops the
    /// body); without a session, the inner service answers.
    async fn probe<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        req: Request<ReqBody>,
        last: LastEventId,
    ) -> Result<Response<ResumableBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let last = match last {
            LastEventId::Malformed => {
                return Ok(reject(
                    StatusCode::BAD_REQUEST,
                    Reason::MalformedLastEventId,
                ))
            }
            LastEventId::Id(id) => Some(id),
            LastEventId::None => None,
        };
        match self.store.lookup(&self.key).await {
            Ok(Some(info)) if info.status == Status::Starting => {
                Ok(unavailable(Reason::SessionStarting))
            }
            Ok(Some(info)) => Ok(self.resume(info, last)),
            Ok(None) if last.is_some() => Ok(reject(StatusCode::GONE, Reason::UnknownSession)),
            Ok(None) => Ok(inner.call(req).await?.map(ResumableBody::passthrough)),
            Err(e) => self.store_failed(e, inner, req).await,
        }
    }

    /// A request for an existing session: replay and follow it, or say why not.
    fn resume<B>(
        self,
        info: SessionInfo,
        last: Option<crate::EventId>,
    ) -> Response<ResumableBody<B>> {
        // Asked not to replay a finished session to a request without a position: say it ended
        // (whatever of it is still kept).
        if let (None, Status::Finished(outcome)) = (last, info.status) {
            if !self.config.replay_finished {
                return reject(StatusCode::NO_CONTENT, outcome.reason());
            }
        }
        let after = match last {
            // A finished session without an event has nothing to replay, ever: say so, or an
            // `EventSource` would reconnect to an empty `200` for the whole retention.
            None if info.last_seq == 0 => match info.status {
                Status::Finished(outcome) => {
                    return reject(StatusCode::NO_CONTENT, outcome.reason())
                }
                _ => 0,
            },
            None if info.first_seq > 1 => return reject(StatusCode::GONE, Reason::Evicted),
            None => 0,
            Some(id) if id.epoch != info.epoch => {
                return reject(StatusCode::GONE, Reason::ForeignEpoch)
            }
            Some(id) if id.seq > info.last_seq => {
                return reject(StatusCode::BAD_REQUEST, Reason::BeyondHead)
            }
            Some(id) if id.seq < info.first_seq.saturating_sub(1) => {
                return reject(StatusCode::GONE, Reason::Evicted)
            }
            Some(id) => match info.status {
                Status::Finished(outcome) if id.seq == info.last_seq => {
                    return reject(StatusCode::NO_CONTENT, outcome.reason())
                }
                _ => id.seq,
            },
        };
        let Some(head) = info.head else {
            // A running or finished session always has its head; be safe anyway.
            return reject(StatusCode::GONE, Reason::UnknownSession);
        };
        record_epoch(info.epoch);
        tracing::debug!(after, status = ?info.status, "serving a session");
        metrics::replay_served();
        let config = self.config.clone();
        let reader = Reader::new(self.store, config, self.key, info.epoch, after);
        let mut res = Response::new(ResumableBody::session(SessionEvents::new(
            reader,
            &self.config.keep_alive,
        )));
        *res.status_mut() = head.status;
        *res.headers_mut() = head.headers.clone();
        res
    }

    /// Waits until a starting session runs, ends or goes away.
    async fn wait_started(&self, epoch: Epoch) -> Result<(), crate::store::StoreError> {
        let mut sub = self.store.subscribe(&self.key, epoch).await?;
        let wait = async {
            loop {
                match self.store.lookup(&self.key).await? {
                    Some(info) if info.epoch == epoch && info.status == Status::Starting => {
                        sub.changed().await
                    }
                    _ => return Ok(()),
                }
            }
        };
        // A claim that never starts is retried, then answered `session-starting`.
        tokio::time::timeout(START_WAIT, wait)
            .await
            .unwrap_or(Ok(()))
    }

    async fn store_failed<S, ReqBody, ResBody>(
        &self,
        e: crate::store::StoreError,
        mut inner: S,
        req: Request<ReqBody>,
    ) -> Result<Response<ResumableBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        match self.config.on_store_error {
            OnStoreError::PassThrough => {
                metrics::store_error();
                tracing::warn!(error = %e, "session store unavailable; passing the request through");
                let res = inner.call(req).await?;
                Ok(res.map(ResumableBody::passthrough))
            }
            OnStoreError::ServiceUnavailable => Ok(self.store_unavailable(e)),
        }
    }

    /// `503` with `store-unavailable`.
    fn store_unavailable<B>(&self, e: crate::store::StoreError) -> Response<ResumableBody<B>> {
        metrics::store_error();
        tracing::warn!(error = %e, "session store unavailable");
        unavailable(Reason::StoreUnavailable)
    }
}

/// Releases a claim whose request went away before its response was taken over.
struct ClaimGuard<St: Store> {
    store: Option<St>,
    key: SessionKey,
    epoch: Epoch,
}

impl<St: Store> ClaimGuard<St> {
    fn disarm(&mut self) {
        self.store = None;
    }

    async fn release(&mut self) {
        if let Some(store) = self.store.take() {
            if let Err(e) = store.release(&self.key, self.epoch).await {
                metrics::store_error();
                tracing::warn!(error = %e, "could not release a session claim; it will expire");
            }
        }
    }
}

impl<St: Store> Drop for ClaimGuard<St> {
    fn drop(&mut self) {
        if let (Some(store), Ok(rt)) = (self.store.take(), tokio::runtime::Handle::try_current()) {
            let (key, epoch) = (self.key.clone(), self.epoch);
            rt.spawn(async move {
                let _ = store.release(&key, epoch).await;
            });
        }
    }
}

/// What a request that does not start a session found under its key.
enum Found {
    Session(SessionInfo),
    /// None, and the layer drains: no new session.
    Draining,
    /// None (never was, or expired).
    Unknown,
    StoreFailed(crate::store::StoreError),
}

/// What became of a session's start, told by the task that ran it to the request.
enum Started<B, Sub> {
    Running(Option<Sub>),
    Lost,
    Unresumable(B),
}

/// Attempts at starting a session whose store fails, before the response is served unresumable.
const START_ATTEMPTS: u32 = crate::limits::START_ATTEMPTS;

/// Starts a claimed session, retrying a failed call (a start is idempotent, so a retry after a
/// lost reply is safe).
async fn start_session<St: Store>(
    store: &St,
    key: &SessionKey,
    epoch: Epoch,
    head: ResponseHead,
) -> Result<bool, crate::store::StoreError> {
    let mut attempt = 1;
    loop {
        match store.start(key, epoch, head.clone()).await {
            Err(e) if attempt < START_ATTEMPTS => {
                metrics::store_error();
                tracing::warn!(error = %e, attempt, ?epoch, "could not start a session; retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// `503` with `draining` and `retry-after: 1`, so that a load balancer retries elsewhere.
fn draining_response<B>() -> Response<ResumableBody<B>> {
    unavailable(Reason::Draining)
}

/// `503` with `reason` and `retry-after: 1`: the request may succeed if it comes again.
fn unavailable<B>(reason: Reason) -> Response<ResumableBody<B>> {
    let mut res = reject(StatusCode::SERVICE_UNAVAILABLE, reason);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// Names the session's epoch in the current span (the request's).
fn record_epoch(epoch: Epoch) {
    tracing::Span::current().record(
        "epoch",
        tracing::field::display(format_args!("{:012x}", epoch.raw())),
    );
}

/// An answer the layer gives itself, with the reason in [`REASON_HEADER`].
fn reject<B>(status: StatusCode, reason: Reason) -> Response<ResumableBody<B>> {
    metrics::rejected(reason);
    let mut res = Response::new(ResumableBody::empty());
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `200 OK` with `content-type: text/event-stream` (any case, any parameters) and no content
/// coding: the layer must be able to read the events.
fn is_event_stream<B>(res: &Response<B>) -> bool {
    if res.status() != StatusCode::OK {
        return false;
    }
    let coded = res
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let sse = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let essence = v
            .as_bytes()
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default();
        essence
            .trim_ascii()
            .eq_ignore_ascii_case(b"text/event-stream")
    });
    sse && !coded
}

/// The layer re-frames the body, so its length changes; hop-by-hop headers belong to one
/// connection only.
fn strip_framing_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The headers a reconnect gets: the original response's, less those that belong to that one
/// response and its client. `set-cookie` would hand the first client's cookie to every holder of
/// the key, and `date` would be stale (the server dates each response itself).
fn replayed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut replayed = headers.clone();
    replayed.remove(header::SET_COOKIE);
    replayed.remove(header::DATE);
    replayed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn event_stream_detection_ignores_case_and_parameters() {
        assert!(is_event_stream(&res(
            200,
            &[("content-type", "text/event-stream")]
        )));
        assert!(is_event_stream(&res(
            200,
            &[("content-type", "Text/Event-Stream; charset=utf-8")]
        )));
        assert!(is_event_stream(&res(
            200,
            &[("content-type", " text/event-stream ;x=1")]
        )));
    }

    #[test]
    fn other_responses_are_not_event_streams() {
        assert!(!is_event_stream(&res(
            201,
            &[("content-type", "text/event-stream")]
        )));
        assert!(!is_event_stream(&res(
            200,
            &[("content-type", "application/json")]
        )));
        assert!(!is_event_stream(&res(200, &[])));
        assert!(!is_event_stream(&res(
            200,
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "gzip")
            ]
        )));
    }
}
