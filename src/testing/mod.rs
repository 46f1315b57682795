//! The behaviour suite every [`Store`] must pass, for stores written outside the crate as much
//! as for the crate's own.
//!
//! The suite serves a test SSE service behind [`ResumableSseLayer`](crate::ResumableSseLayer)
//! on a real TCP socket and talks HTTP to it: resuming after disconnects, exactly once and in
//! order, one producer for concurrent first requests, slow clients, failures, cancelling,
//! keep-alives, retention, lifetime, oversized events, eviction, draining, and the edge matrix
//! (every stream ends exactly once around every page, block, chunk and batch size of
//! [`limits`](crate::limits)). The crate's stores, in memory, on Redis and on Redis Cluster, run
//! this same suite.
//!
//! # Running it on a store
//!
//! Enable the `test-util` feature in the store crate's dev-dependencies:
//!
//! ```toml
//! [dev-dependencies]
//! resumable-sse = { version = "0.1", features = ["test-util"] }
//! ```
//!
//! then, in an integration test (`tests/store_suite.rs`), say how to make a store from the
//! [`Opts`] a test needs, and let [`store_suite!`] write one test per behaviour:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use resumable_sse::MemoryStore;
//! # struct MyStore;
//! # impl MyStore {
//! #     fn new(_: Option<Duration>, _: Option<usize>) -> MemoryStore { MemoryStore::new() }
//! # }
//! resumable_sse::testing::store_suite!(|opts| async move {
//!     MyStore::new(opts.retention, opts.max_events_per_session)
//! });
//! # fn main() {}
//! ```
//!
//! `cargo test --test store_suite` then runs every test of the suite, each named after the
//! behaviour it checks (`reconnects_get_every_event_exactly_once`, ...), so a failure says what
//! broke. The constructor may be an `async fn(Opts) -> MyStore` too; a store whose backend needs
//! a server that may be missing implements [`Backend`] and says with [`Backend::available`]
//! whether it can run.
//!
//! # What the suite asks of a store
//!
//! - **Isolation**: every call of [`Backend::store`] returns a store that shares no session with
//!   any other: tests run in parallel and use the same session keys (a networked store gives each
//!   one a key prefix of its own).
//! - **Options**: each [`Opts`] field that is set must be applied; one that is `None` leaves the
//!   store's default.
//! - **Defaults**: with default options a store keeps finished sessions for at least a minute and
//!   at least [`DEFAULT_MAX_BYTES_PER_SESSION`](crate::limits::DEFAULT_MAX_BYTES_PER_SESSION)
//!   bytes of events per session (it may keep more, or everything).
//!
//! Each test runs on a runtime of its own (the edge matrix on two worker threads, the others on
//! one), serves on `127.0.0.1`, and fails after a deadline rather than hang.
//!
//! # Helpers for tests of your own
//!
//! What the suite is written with is public too, for a store's or an application's own tests
//! (the crate's integration tests use the same):
//!
//! - [`client`]: an HTTP client of event streams with its own SSE parser ([`client::get`],
//!   [`client::SseConn`], [`client::SseParser`]);
//! - [`wait`]: waits with a deadline instead of fixed sleeps ([`wait::TIMEOUT`],
//!   [`wait::eventually`], [`wait::session_finished`]);
//! - [`service`]: the inner service's side of a test ([`service::Inner`]: calls counted, event
//!   streams released one event at a time).

pub mod client;
mod edges;
mod harness;
pub mod service;
mod suite;
pub mod wait;

use std::future::Future;
use std::time::Duration;

use crate::store::Store;

/// Store options a test needs; `None` keeps the store's default.
///
/// More may be added in a minor version (the type is `#[non_exhaustive]`): read the fields,
/// as the options a store understands.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Opts {
    /// How long a finished session stays readable.
    pub retention: Option<Duration>,
    /// The most events a session keeps; older ones are evicted.
    pub max_events_per_session: Option<usize>,
}

/// Makes a fresh, isolated store for one test of the suite.
///
/// It is implemented for every function and closure taking [`Opts`] and returning a future of a
/// [`Store`], such as `async fn my_store(opts: Opts) -> MyStore` or, in [`store_suite!`],
/// `|opts| async move { .. }`. Implement it on a type of your own to skip the suite where the
/// store cannot run:
///
/// ```no_run
/// use resumable_sse::testing::{store_suite, Backend, Opts};
/// use resumable_sse::MemoryStore;
///
/// struct Remote;
///
/// impl Backend for Remote {
///     type Store = MemoryStore;
///
///     fn available(&self) -> bool {
///         std::env::var_os("STORE_URL").is_some()
///     }
///
///     async fn store(&self, _opts: Opts) -> MemoryStore {
///         MemoryStore::new()
///     }
/// }
///
/// store_suite!(Remote);
/// # fn main() {}
/// ```
pub trait Backend {
    /// The store the suite runs on.
    type Store: Store;

    /// A new store, sharing no session with any other, with `opts` applied.
    fn store(&self, opts: Opts) -> impl Future<Output = Self::Store> + Send;

    /// Whether the store can run here; when it cannot, every test of the suite passes at once
    /// without doing anything (say so loudly, for instance on stderr). `true` by default.
    fn available(&self) -> bool {
        true
    }
}

impl<F, Fut, St> Backend for F
where
    F: Fn(Opts) -> Fut,
    Fut: Future<Output = St> + Send,
    St: Store,
{
    type Store = St;

    fn store(&self, opts: Opts) -> impl Future<Output = St> + Send {
        self(opts)
    }
}

/// Writes one test per behaviour of the suite, for the [`Backend`] given: a type implementing
/// it, or a function or closure from [`Opts`] to a future of a store.
///
/// ```no_run
/// use resumable_sse::testing::store_suite;
/// use resumable_sse::MemoryStore;
///
/// store_suite!(|opts| async move {
///     let mut builder = MemoryStore::builder();
///     if let Some(retention) = opts.retention {
///         builder = builder.retention(retention);
///     }
///     if let Some(n) = opts.max_events_per_session {
///         builder = builder.max_events_per_session(n);
///     }
///     builder.build()
/// });
/// # fn main() {}
/// ```
///
/// Each test is a plain `#[test]` that runs the behaviour on a runtime of its own, in a thread
/// of its own (so the backend is `Send + 'static`, as functions and closures that capture
/// nothing are): the calling crate needs no attribute macro, and a test fails once it has taken
/// longer than its deadline (two minutes, ten for the edge matrix), whatever it is stuck on.
#[doc(inline)]
pub use crate::__store_suite as store_suite;

#[doc(hidden)]
#[macro_export]
macro_rules! __store_suite {
    // A closure without the type of its argument: the type is known.
    (|$opts:ident| $body:expr $(,)?) => {
        $crate::__store_suite_list! { @list tests |$opts: $crate::testing::Opts| $body; }
    };
    ($backend:expr $(,)?) => {
        $crate::__store_suite_list! { @list tests $backend; }
    };
}

// The one list of the suite's tests, one per line, with the runtime each runs on: it is
// instantiated for a backend (`@tests`, by `store_suite!`) and, in this crate, as the functions
// those tests call (`@cases`). Those functions are the only users of the tests in `suite.rs` and
// `edges.rs`, where `dead_code` is denied: a test that is not listed here does not compile.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_suite_list {
    (@list $mode:ident $($args:tt)*) => {
        $crate::__store_suite_list! { @$mode $($args)*
            CurrentThread reconnects_get_every_event_exactly_once,
            CurrentThread reconnect_after_completion_gets_204,
            CurrentThread a_second_client_replays_from_the_start_then_follows_live,
            CurrentThread events_appended_during_a_replay_are_neither_lost_nor_repeated,
            CurrentThread a_replay_goes_out_in_a_few_large_writes_not_one_per_event,
            CurrentThread generation_continues_after_the_client_disconnects,
            CurrentThread a_slow_client_does_not_slow_the_producer_or_others,
            CurrentThread concurrent_first_requests_call_the_inner_service_once,
            CurrentThread last_event_id_query_parameter_is_a_fallback_for_the_header,
            CurrentThread inner_body_error_fails_the_session,
            CurrentThread cancel_stops_the_generator_and_reconnects_get_204,
            CurrentThread keep_alive_comments_reach_live_and_replayed_connections,
            CurrentThread keep_alive_can_be_turned_off,
            CurrentThread finished_sessions_expire_after_retention,
            CurrentThread a_session_past_its_lifetime_is_stopped_as_failed,
            CurrentThread an_oversized_event_fails_the_session_and_keeps_earlier_events,
            CurrentThread evicted_positions_are_reported_not_skipped,
            CurrentThread draining_refuses_new_sessions_and_lets_running_ones_finish,
            CurrentThread the_drain_deadline_ends_running_sessions_as_failed,
            // The edge matrix: many concurrent cases each, so on a worker per core.
            MultiThread a_session_without_events_ends_its_first_response_empty_then_answers_204_with_its_outcome,
            MultiThread every_count_around_every_page_chunk_and_batch_size_ends_exactly_once,
            MultiThread every_count_around_every_block_and_chunk_byte_size_ends_exactly_once,
            MultiThread sessions_around_the_default_byte_limit_end_exactly_once_or_report_eviction,
        }
    };
    (@tests $backend:expr; $($runtime:ident $name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                $crate::testing::__private::$name($backend);
            }
        )*
    };
    (@cases $($runtime:ident $name:ident,)*) => {
        $(
            /// Runs the test of the same name on `backend`.
            pub fn $name<B: $crate::testing::Backend + Send + 'static>(backend: B) {
                $crate::testing::__private::run(
                    stringify!($name),
                    $crate::testing::__private::Runtime::$runtime,
                    move || async move {
                        if backend.available() {
                            $crate::testing::__private::tests::$name(&backend).await;
                        }
                    },
                );
            }
        )*
    };
}

/// What the expansion of [`store_suite!`] calls; not a public API.
#[doc(hidden)]
pub mod __private {
    use std::future::Future;
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::time::Duration;

    pub(crate) mod tests {
        pub(crate) use super::super::edges::*;
        pub(crate) use super::super::suite::*;
    }

    /// The runtime a test runs on.
    #[derive(Clone, Copy, Debug)]
    pub enum Runtime {
        /// One thread, as `#[tokio::test]`.
        CurrentThread,
        /// Two worker threads, for the edge matrix.
        MultiThread,
    }

    impl Runtime {
        /// The longest a test on this runtime may take.
        fn deadline(self) -> Duration {
            match self {
                Runtime::CurrentThread => Duration::from_secs(120),
                Runtime::MultiThread => Duration::from_secs(600),
            }
        }
    }

    /// Runs the future `test` makes on a new runtime of the given kind, in a thread of its own;
    /// fails once the deadline has passed, even if the runtime is stuck (a task that never
    /// yields), leaving the thread behind.
    pub fn run<F, Fut>(name: &str, runtime: Runtime, test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (done, finished) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = match runtime {
                    Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
                    Runtime::MultiThread => {
                        let mut builder = tokio::runtime::Builder::new_multi_thread();
                        builder.worker_threads(2);
                        builder
                    }
                }
                .enable_all()
                .build()
                .expect("a Tokio runtime");
                rt.block_on(test());
                drop(rt);
                let _ = done.send(());
            })
            .expect("a thread for the test");
        let deadline = runtime.deadline();
        match finished.recv_timeout(deadline) {
            // Done, or panicked (the sender is dropped): the thread's result says which.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("{name}: not done within {deadline:?}"),
        }
    }

    crate::__store_suite_list! { @list cases }
}
