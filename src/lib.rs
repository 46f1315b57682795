//! A [tower] middleware that makes any Server-Sent-Events response resumable.
//!
//! Wrap a service whose responses are SSE streams (an LLM answer, a build log, a progress feed)
//! in [`ResumableSseLayer`], and a dropped connection loses nothing: the stream keeps being
//! generated, every event is stored with an id of its own, and a client that reconnects with
//! `Last-Event-ID` (as a browser's `EventSource` does by itself) gets exactly the events it missed,
//! then the live ones.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use axum::response::sse::{Event, Sse};
//! use axum::{routing::get, Router};
//! use futures_util::stream::{self, Stream, StreamExt};
//! use resumable_sse::{MemoryStore, ResumableSseLayer};
//!
//! // A plain SSE handler that knows nothing of resumption.
//! async fn chat() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     let tokens = stream::iter(["Hello", " world"]).then(|t| async move {
//!         tokio::time::sleep(Duration::from_millis(50)).await;
//!         Ok(Event::default().data(t))
//!     });
//!     Sse::new(tokens)
//! }
//!
//! let app: Router = Router::new()
//!     .route("/chat", get(chat))
//!     .layer(ResumableSseLayer::new(MemoryStore::new()));
//! // GET /chat?session_id=<unguessable id> streams; the same URL resumes.
//! ```
//!
//! # How a request is answered
//!
//! 0. **Not the layer's**: a method it does not resume (by default anything but `GET` and
//!    `HEAD`; see [`ResumableSseLayer::methods`]), or an `Accept` header that names neither
//!    `text/event-stream`, `text/*` nor `*/*`: the request goes to the inner service untouched,
//!    whatever keys it carries (`tests/app_api.rs`:
//!    `other_methods_pass_through_untouched_whatever_keys_they_carry`,
//!    `a_request_that_does_not_accept_an_event_stream_is_never_answered_with_a_replay`). A
//!    `HEAD` gets the answer a `GET` would, without a body, and never starts a session
//!    (`head_answers_from_an_existing_session_and_never_starts_one`).
//! 1. **No session key** (by default the `session_id` query parameter; see
//!    [`ResumableSseLayer::session_key`]): the request goes to the inner service untouched, with
//!    no store access and no allocation. Each request path is a key space of its own by default
//!    ([`KeyScope`]): the same key on two routes names two sessions
//!    (`the_same_key_on_two_routes_is_two_sessions_by_default`).
//! 2. **A key, no session yet**: the inner service is called once. A `200` response with
//!    `content-type: text/event-stream` (any case, any parameters, no `content-encoding`) creates
//!    the session; any other response passes through and creates none. The body is driven by a
//!    detached task, so a client that disconnects never stops the generation.
//! 3. **A key whose session exists** (running, or finished and still retained): the inner service
//!    is *not* called. The response carries the original status and headers, replays the stored
//!    events after `Last-Event-ID` (the header; the `lastEventId` query parameter when the header
//!    is absent), or from the start when there is none, then follows the live events until the
//!    session ends.
//!
//! Everything the layer answers itself carries a reason in the `resumable-sse-reason` header
//! ([`REASON_HEADER`]; the tokens are the [`Reason`]s) and `cache-control: no-store`:
//!
//! | case | status | reason |
//! |---|---|---|
//! | the client already holds the last event of a completed session, or the session completed without any event (with or without `Last-Event-ID`) | `204` | `completed` |
//! | ... of a failed session (inner body error, size limit, lifetime, producer died) | `204` | `failed` |
//! | ... of a cancelled session | `204` | `cancelled` |
//! | with [`replay_finished(false)`](ResumableSseLayer::replay_finished), a request without `Last-Event-ID` for a finished session | `204` | the outcome |
//! | `Last-Event-ID` for a session that does not exist (never did, or expired) | `410` | `unknown-session` |
//! | `Last-Event-ID` whose epoch is not the session's (an earlier incarnation of the key, or another session's id) | `410` | `foreign-epoch` |
//! | the position asked for (or, without `Last-Event-ID`, the first event) was evicted by the per-session limits | `410` | `evicted` |
//! | `Last-Event-ID` that is not one of ours (garbage, too long, negative, overflow, wrong case, NUL in `lastEventId`) | `400` | `malformed-last-event-id` |
//! | `Last-Event-ID` beyond the newest event | `400` | `beyond-head` |
//! | session key present but invalid (over 256 bytes, not UTF-8) | `400` | `invalid-session-key` |
//! | the store holds as many sessions as it may | `503` | `session-limit` |
//! | the store failed (with [`OnStoreError::ServiceUnavailable`], the default) | `503` + `retry-after` | `store-unavailable` |
//! | another request's claim on the session never produced a response, or this request's claim was lost before its session started | `503` (+ `retry-after` for the latter) | `session-starting` |
//! | a new session while the layer [drains](Drain) | `503` + `retry-after` | `draining` |
//!
//! `204` is what makes a browser's `EventSource` stop reconnecting; `4xx` stop it too. None of
//! these answers calls the inner service, so a generation never runs twice. (A NUL byte in the
//! `Last-Event-ID` header never reaches the layer: HTTP servers refuse such a header with a bare
//! `400`. The `lastEventId` parameter is used as it is, not percent-decoded: ids are URL-safe.)
//!
//! # Guarantees
//!
//! Each guarantee is proved by the test named after it (in `tests/` unless noted).
//!
//! - **One producer.** Concurrent first requests for one key call the inner service exactly
//!   once, and all get the identical sequence (`suite`:
//!   `concurrent_first_requests_call_the_inner_service_once`).
//! - **Generation survives the client.** The inner body is driven to its end even when every
//!   client has gone (`suite`: `generation_continues_after_the_client_disconnects`).
//! - **Exactly once, in order, per connection.** A reconnect gets every event after its
//!   `Last-Event-ID`, then the live ones, with no duplicate and no gap, including events
//!   appended while the replay is being written (the reader subscribes before it reads)
//!   (`suite`: `reconnects_get_every_event_exactly_once`,
//!   `events_appended_during_a_replay_are_neither_lost_nor_repeated`).
//! - **Own ids.** Every stored event gets an id `<epoch>-<seq>` replacing the inner one; ids are
//!   strictly increasing within a session and an id from an earlier incarnation of the key is
//!   recognised (`suite`: `finished_sessions_expire_after_retention`).
//! - **Done means done.** A client holding the final event gets `204`
//!   (`suite`: `reconnect_after_completion_gets_204`).
//! - **Failures are visible.** An inner body error ends the session as failed: clients get what
//!   was stored, then the end; reconnects get `204 failed`; a `tracing` warning records it
//!   (`suite`: `inner_body_error_fails_the_session`).
//! - **Slow clients only slow themselves.** Each connection has its own cursor into the stored
//!   log; events are encoded once and shared as [`bytes::Bytes`] (`suite`:
//!   `a_slow_client_does_not_slow_the_producer_or_others`).
//! - **Every stream ends, exactly once, at every size.** A reader that has the last event of a
//!   finished session ends at once, whatever the read page, block or chunk sizes divide (the
//!   sizes are in [`limits`]); a session that finished before its first event answers `204` to
//!   every later request for its whole retention, and its inner service is not called again
//!   (`body.rs`: `a_reader_ends_at_once_whatever_the_read_page_divides`; `suite`: the edge
//!   matrix, `edges.rs`).
//! - **Limits never cut a reading client short by default.** Sessions are bounded by bytes
//!   (64 MiB of history per session by default), with no count of events unless one is set; events
//!   a connected reader still needs are kept past those soft limits, up to a hard bound (256 MiB
//!   by default); see [`MemoryStore`] and `RedisStore` for each
//!   store's terms.
//! - **Nothing is skipped silently.** A client whose position was evicted is told `410 evicted`;
//!   a connected client whose next event was evicted gets
//!   [`EVICTED_COMMENT`](sse::EVICTED_COMMENT) and the end of its response, so its reconnect is
//!   told (`suite`: `evicted_positions_are_reported_not_skipped`).
//! - **Non-SSE traffic is untouched**, trailers included (`passthrough.rs`), and a request
//!   without a key costs no allocation and no store access (`service.rs`:
//!   `requests_without_a_key_pass_through_without_allocating`).
//! - **Cancel stops the generation** (`suite`: `cancel_stops_the_generator_and_reconnects_get_204`).
//! - **Drain for deploys** (`suite`: `draining_refuses_new_sessions_and_lets_running_ones_finish`,
//!   `the_drain_deadline_ends_running_sessions_as_failed`; `redis_instances.rs`:
//!   `after_a_drain_other_instances_keep_serving_the_sessions`).
//!
//! The tests named `suite` are the behaviour suite of `resumable_sse::testing` (feature
//! `test-util`, `src/testing/`) and run against every store: memory, Redis, Redis Cluster and a
//! store written outside the crate; a store of your own runs them too. With Redis, the
//! guarantees hold across instances (`redis_instances.rs`:
//! `a_client_moving_between_instances_gets_every_event_once`,
//! `concurrent_first_requests_on_several_instances_produce_once`,
//! `a_dead_producer_is_detected_within_the_lease_and_marked_failed`).
//!
//! # Keep-alive, retention and limits
//!
//! - [`ResumableSseLayer::keep_alive`]: a `:` comment on every session connection after 15 s
//!   without an event (configurable, can be turned off): the timer is not re-armed on every
//!   event, so the comment comes between one and two intervals after the last event. Keep-alive
//!   comments of the inner body are not stored.
//! - [`ResumableSseLayer::max_lifetime`] (default one hour): a longer session is stopped and
//!   ends as failed.
//! - [`ResumableSseLayer::max_event_size`] (default 1 MiB): a larger event ends the session as
//!   failed; the events before it stay readable. The parser never buffers more than this.
//! - The store's limits: retention of finished sessions, sessions per store, bytes (and, when
//!   set, events) per session (see [`MemoryStore`]). Every size and default is in [`limits`].
//!
//! # Cancelling, and how a stream ends
//!
//! [`Sessions::cancel`] (from [`ResumableSseLayer::sessions`], which names sessions as the layer
//! does) stops a running session: its producer drops the inner body (which stops the
//! generation), connected clients get what was stored and then the end, and reconnects get
//! `204 cancelled` (`a_stop_button_on_the_streams_own_url_cancels_through_the_sessions_handle`).
//!
//! The streams of a **failed** session end with an error after its last stored event (the
//! connection is aborted, as a plain handler's would be), unless
//! [`abort_on_failure(false)`](ResumableSseLayer::abort_on_failure); completed and cancelled
//! sessions end cleanly
//! (`a_failed_session_aborts_its_connections_by_default_and_ends_them_cleanly_when_asked`).
//! [`ResumableSseLayer::end_event`] adds a final event naming the outcome, for live and resumed
//! clients alike (`the_end_event_names_the_outcome_for_live_and_resumed_clients`). Log lines name
//! the session by [`SessionKey::digest`] and its epoch, never by its key
//! (`log_lines_name_the_session_by_digest_and_epoch_never_by_its_key`).
//!
//! # Composing with tower-http
//!
//! Put [`ResumableSseLayer`] *inside* `TraceLayer` and `CompressionLayer`, and `TimeoutLayer`
//! either side:
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_http::{compression::CompressionLayer, timeout::TimeoutLayer, trace::TraceLayer};
//! use resumable_sse::{MemoryStore, ResumableSseLayer};
//!
//! let middleware = ServiceBuilder::new()
//!     .layer(TraceLayer::new_for_http())
//!     .layer(CompressionLayer::new())
//!     .layer(TimeoutLayer::with_status_code(http::StatusCode::REQUEST_TIMEOUT, Duration::from_secs(10)))
//!     .layer(ResumableSseLayer::new(MemoryStore::new()));
//! # let _ = middleware;
//! ```
//!
//! The layer must read the inner event stream, so it must sit *inside* any compression
//! (an inner response with a `content-encoding` is passed through unresumable).
//! `CompressionLayer`'s default predicate leaves `text/event-stream` uncompressed, so events are
//! not buffered. `TimeoutLayer` bounds the time to the response head only, so it does not cut
//! long streams; outside the layer it also bounds the store's work.
//!
//! # Security
//!
//! A session key is a capability: whoever presents it can read the whole stream and cancel it.
//! Use unguessable keys (128 random bits), or bind the key to the authenticated user with
//! [`ResumableSseLayer::session_key`]. The layer trusts the inner service and its responses; it
//! trusts no request field: keys and `Last-Event-ID` are validated and bounded as listed above.
//!
//! [tower]: https://docs.rs/tower

#![deny(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod config;
mod drain;
mod fanout;
mod future;
mod keep_alive;
mod key;
mod layer;
pub mod limits;
pub mod metrics;
mod producer;
mod reason;
mod service;
mod session;
mod sessions;
pub mod sse;
pub mod store;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

pub use body::ResumableBody;
pub use config::OnStoreError;
pub use drain::{Drain, DrainReport};
pub use future::ResponseFuture;
pub use keep_alive::KeepAlive;
pub use key::{ExtractSessionKey, FromHeader, FromPath, FromQuery, KeyScope, Or};
pub use layer::ResumableSseLayer;
pub use reason::Reason;
pub use service::{ResumableSse, REASON_HEADER};
pub use session::{
    Epoch, EventId, InvalidSessionKey, KeyDigest, Outcome, SessionKey, MAX_SESSION_KEY_LEN,
};
pub use sessions::{Sessions, SessionsError};
pub use store::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::{RedisStore, RedisStoreBuilder};

/// The error type of [`ResumableBody`]: any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
