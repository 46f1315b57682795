//! The producer's watchdogs and the session start, under a store that fails on purpose: a
//! failed cancellation check, append and finish retries, the drain deadline and the lifetime
//! during a backoff, the drain racing a first request, and a start that is slow, loses its reply
//! or finds its claim lost.
//!
//! The store is the real `MemoryStore` behind `common::faulty::FaultyStore`, which can fail the
//! next calls of a method, fail the reply after the real call ran, cancel the session before a
//! call, or hold a call after it ran. The inner service is the test routes of `tests/common`, called as a tower
//! service (no socket), so the tests run on paused time: backoffs take no wall-clock time, and a
//! bound such as "within 100 ms" is measured on the runtime's clock, whatever the machine's load.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use resumable_sse::store::{Status, Store};
use resumable_sse::{
    Drain, EventId, Outcome, ResumableBody, ResumableSse, ResumableSseLayer, REASON_HEADER,
};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

// The waits of `common` measure the runtime's clock: paused time in most tests here.
use common::faulty::FaultyStore;
use common::{datas, eventually, scoped, within, Block, Ev, Inner, TIMEOUT};

/// How soon the producer must react to a cancel or a deadline. Far below every backoff it could
/// otherwise be sleeping through (the fourth failure waits 800 ms).
const PROMPTLY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The layer around the routes of `tests/common`, whose answers the test can hold.

type Routes = BoxCloneService<Request<Body>, Response<Body>, Infallible>;
type Svc = ResumableSse<Routes, FaultyStore>;
type Res = Response<ResumableBody<Body>>;

struct App {
    svc: Svc,
    store: FaultyStore,
    inner: Inner,
    drain: Drain,
    /// While closed, the inner service does not answer.
    answer_gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
    /// Calls that reached the inner service (answered or not).
    entered: Arc<AtomicUsize>,
}

fn app(
    layer: impl FnOnce(ResumableSseLayer<FaultyStore>) -> ResumableSseLayer<FaultyStore>,
) -> App {
    let store = FaultyStore::default();
    let inner = Inner::default();
    let router = common::routes(inner.clone());
    let answer_gate: Arc<Mutex<Option<Arc<Semaphore>>>> = Arc::default();
    let entered = Arc::new(AtomicUsize::new(0));
    let routes = {
        let (gate, entered) = (answer_gate.clone(), entered.clone());
        tower::service_fn(move |req: Request<Body>| {
            let (router, gate, entered) = (router.clone(), gate.clone(), entered.clone());
            async move {
                entered.fetch_add(1, Ordering::SeqCst);
                let held = gate.lock().unwrap().clone();
                if let Some(held) = held {
                    drop(held.acquire().await.unwrap());
                }
                router.oneshot(req).await
            }
        })
    };
    let layer = layer(
        ResumableSseLayer::new(store.clone()).keep_alive(resumable_sse::KeepAlive::disabled()),
    );
    let drain = layer.drain_handle();
    App {
        svc: layer.layer(BoxCloneService::new(routes)),
        store,
        inner,
        drain,
        answer_gate,
        entered,
    }
}

impl App {
    fn hold_answers(&self) {
        *self.answer_gate.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    fn release_answers(&self) {
        if let Some(gate) = self.answer_gate.lock().unwrap().take() {
            gate.add_permits(1 << 20);
        }
    }

    fn call(&self, path: &str, last_event_id: Option<&str>) -> JoinHandle<Res> {
        let mut req = Request::get(path);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let req = req.body(Body::empty()).unwrap();
        let svc = self.svc.clone();
        tokio::spawn(async move {
            match svc.oneshot(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            }
        })
    }

    async fn get(&self, path: &str, last_event_id: Option<&str>) -> Res {
        answer(self.call(path, last_event_id)).await
    }

    /// The status of the session of `key` on `route`.
    async fn status(&self, route: &str, key: &str) -> Option<Status> {
        let key = scoped(route, key);
        let info = self.store.inner.lookup(&key).await.unwrap();
        info.map(|i| i.status)
    }

    /// Cancels the session of `key` on `route`.
    async fn cancel(&self, route: &str, key: &str) {
        let key = scoped(route, key);
        assert!(
            self.store.inner.cancel(&key).await.unwrap(),
            "a session to cancel"
        );
    }
}

async fn answer(call: JoinHandle<Res>) -> Res {
    tokio::time::timeout(TIMEOUT, call)
        .await
        .expect("an answer in time")
        .expect("the call does not panic")
}

fn reason(res: &Res) -> Option<&str> {
    res.headers()
        .get(REASON_HEADER)
        .map(|v| v.to_str().unwrap())
}

/// The body to its end, as events (read by the tests' one parser). Keep-alive is off: a
/// comment fails the test.
async fn events(res: Res) -> Vec<Ev> {
    let mut body = res.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("a frame or the end in time")
    {
        if let Ok(data) = frame.expect("the body does not fail").into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    common::parse_blocks(&bytes)
        .into_iter()
        .map(|block| match block {
            Block::Event(ev) => ev,
            Block::Comment(c) => panic!("a comment, with keep-alive off: {c:?}"),
        })
        .collect()
}

/// Every id is the layer's, and they follow each other from 1.
fn assert_layer_ids(evs: &[Ev]) {
    for (i, ev) in evs.iter().enumerate() {
        let id = ev.id.as_deref().unwrap_or_default();
        let id = EventId::parse(id.as_bytes()).unwrap_or_else(|| panic!("not a layer id: {id}"));
        assert_eq!(id.seq, i as u64 + 1, "ids in order, without gap or repeat");
    }
}

/// A running `/gated` session with its first event stored, and the response that started it.
async fn gated_session(app: &App, key: &str) -> Res {
    app.inner.gate(key);
    let res = app.get(&format!("/gated?session_id={key}"), None).await;
    assert_eq!(res.status(), StatusCode::OK);
    app.inner.send(key, "first");
    res
}

// ---------------------------------------------------------------------------------------------
// The watch for cancellation.

#[tokio::test(start_paused = true)]
async fn cancel_still_stops_the_generation_after_one_failed_cancellation_check() {
    let app = app(|l| l);
    app.store.fail_next("cancelled", 1);
    let res = gated_session(&app, "watch").await;
    eventually("the first check failed", || {
        app.store.calls("cancelled") >= 1
    })
    .await;
    eventually("the first event stored", || app.store.calls("append") >= 1).await;
    // The generator is idle: no append will see the cancel, only the watch can.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.cancel("/gated", "watch").await;
    within(
        Duration::from_secs(5),
        "the generator dropped after the cancel",
        || app.inner.generators_dropped() == 1,
    )
    .await;
    assert_eq!(
        app.store.calls("cancelled"),
        2,
        "the watch was re-armed once"
    );
    assert_eq!(
        app.status("/gated", "watch").await,
        Some(Status::Finished(Outcome::Cancelled))
    );
    assert_eq!(datas(&events(res).await), ["first"]);
    eventually("the producer ended", || app.drain.running() == 0).await;
}

// ---------------------------------------------------------------------------------------------
// Append retries: every watchdog stays live during the backoff.

/// Fails every append until the fourth failure, which waits 800 ms before its retry.
async fn in_append_backoff(app: &App, key: &str) -> Res {
    app.store.fail_next("append", 7);
    let res = gated_session(app, key).await;
    eventually("four appends failed", || app.store.calls("append") >= 4).await;
    res
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_an_append_backoff_stops_the_producer_promptly() {
    let app = app(|l| l);
    let _res = in_append_backoff(&app, "cancel-backoff").await;
    app.cancel("/gated", "cancel-backoff").await;
    within(PROMPTLY, "the generator dropped after the cancel", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    eventually("the producer ended", || app.drain.running() == 0).await;
    assert_eq!(app.store.calls("append"), 4, "no retry after the cancel");
    assert_eq!(app.store.calls("finish"), 0, "a cancel is not overwritten");
    assert_eq!(
        app.status("/gated", "cancel-backoff").await,
        Some(Status::Finished(Outcome::Cancelled))
    );
}

#[tokio::test(start_paused = true)]
async fn the_drain_deadline_during_an_append_backoff_ends_the_session_promptly() {
    let app = app(|l| l);
    let _res = in_append_backoff(&app, "drain-backoff").await;
    let deadline = Duration::from_millis(10);
    let report = tokio::time::timeout(deadline + PROMPTLY, app.drain.drain(deadline))
        .await
        .expect("the drain returns right after its deadline");
    assert_eq!(report.running_at_start, 1);
    assert_eq!(report.ended_at_deadline, 1);
    assert_eq!(app.inner.generators_dropped(), 1);
    assert_eq!(
        app.status("/gated", "drain-backoff").await,
        Some(Status::Finished(Outcome::Failed))
    );
}

#[tokio::test(start_paused = true)]
async fn the_max_lifetime_during_an_append_backoff_ends_the_session_promptly() {
    let lifetime = Duration::from_secs(1);
    let app = app(|l| l.max_lifetime(lifetime));
    let started = Instant::now();
    app.store.fail_next("append", 7);
    // Appends fail at 0, 100, 300 and 700 ms; the fourth waits until 1,500 ms: the lifetime
    // ends in the middle of that wait.
    let _res = gated_session(&app, "lifetime-backoff").await;
    let ended = tokio::time::timeout_at(started + lifetime + PROMPTLY, async {
        while app.inner.generators_dropped() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the generator is dropped at the lifetime, not after the backoff"
    );
    assert_eq!(app.store.calls("append"), 4);
    eventually("the producer ended", || app.drain.running() == 0).await;
    assert_eq!(
        app.status("/gated", "lifetime-backoff").await,
        Some(Status::Finished(Outcome::Failed))
    );
}

#[tokio::test(start_paused = true)]
async fn events_are_still_generated_during_an_append_backoff_and_stored_in_order() {
    let app = app(|l| l);
    let res = in_append_backoff(&app, "keeps-reading").await;
    // Generated while the producer waits to retry: read from the body, appended with the retry.
    for i in 0..5 {
        app.inner.send("keeps-reading", format!("during {i}"));
    }
    app.inner.end("keeps-reading");
    let evs = events(res).await;
    assert_layer_ids(&evs);
    let expected: Vec<String> = std::iter::once("first".to_owned())
        .chain((0..5).map(|i| format!("during {i}")))
        .collect();
    assert_eq!(datas(&evs), expected);
    assert_eq!(
        app.status("/gated", "keeps-reading").await,
        Some(Status::Finished(Outcome::Completed))
    );
}

// ---------------------------------------------------------------------------------------------
// Finish retries.

#[tokio::test(start_paused = true)]
async fn a_completed_session_whose_first_finish_calls_fail_is_recorded_completed() {
    let app = app(|l| l);
    app.store.fail_next("finish", 3);
    let evs = events(app.get("/tokens?session_id=fin&n=5", None).await).await;
    assert_layer_ids(&evs);
    assert_eq!(datas(&evs), common::expected_tokens(0..5));
    assert_eq!(app.store.calls("finish"), 4);
    assert_eq!(
        app.status("/tokens", "fin").await,
        Some(Status::Finished(Outcome::Completed))
    );
    let end = app
        .get("/tokens?session_id=fin&n=5", evs[4].id.as_deref())
        .await;
    assert_eq!(end.status(), StatusCode::NO_CONTENT);
    assert_eq!(reason(&end), Some("completed"));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_finish_reply_is_retried_and_the_session_stays_completed() {
    let app = app(|l| l);
    app.store.fail_reply("finish", 2);
    let evs = events(app.get("/tokens?session_id=fin-reply&n=3", None).await).await;
    assert_eq!(datas(&evs), common::expected_tokens(0..3));
    eventually("the producer ended", || app.drain.running() == 0).await;
    assert_eq!(app.store.calls("finish"), 3);
    assert_eq!(
        app.status("/tokens", "fin-reply").await,
        Some(Status::Finished(Outcome::Completed))
    );
}

/// A session whose body ended and whose finish keeps failing.
async fn in_finish_backoff(app: &App, key: &str) -> Res {
    app.store.fail_next("finish", usize::MAX);
    let res = gated_session(app, key).await;
    app.inner.end(key);
    eventually("two finish calls failed", || app.store.calls("finish") >= 2).await;
    res
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_finish_retries_is_kept_and_ends_the_retries() {
    let app = app(|l| l);
    let res = in_finish_backoff(&app, "fin-cancel").await;
    app.cancel("/gated", "fin-cancel").await;
    let finishes = app.store.calls("finish");
    within(PROMPTLY, "the producer ended after the cancel", || {
        app.drain.running() == 0
    })
    .await;
    assert_eq!(
        app.store.calls("finish"),
        finishes,
        "no retry after the cancel"
    );
    assert_eq!(
        app.status("/gated", "fin-cancel").await,
        Some(Status::Finished(Outcome::Cancelled))
    );
    assert_eq!(datas(&events(res).await), ["first"]);
}

#[tokio::test(start_paused = true)]
async fn the_drain_deadline_during_finish_retries_ends_the_producer_promptly() {
    let app = app(|l| l);
    let _res = in_finish_backoff(&app, "fin-drain").await;
    let deadline = Duration::from_millis(10);
    let report = tokio::time::timeout(deadline + PROMPTLY, app.drain.drain(deadline))
        .await
        .expect("the drain returns right after its deadline");
    assert_eq!(report.ended_at_deadline, 1);
    assert_eq!(app.drain.running(), 0);
}

// ---------------------------------------------------------------------------------------------
// The drain racing a first request.

#[tokio::test(start_paused = true)]
async fn a_drain_that_begins_while_the_inner_service_answers_waits_for_that_session() {
    let app = app(|l| l);
    app.hold_answers();
    let first = app.call("/tokens?session_id=racing&n=3", None);
    eventually("the inner service is answering", || {
        app.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let drain = app.drain.clone();
    let draining = tokio::spawn(async move { drain.drain(TIMEOUT).await });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(app.drain.is_draining());
    assert_eq!(app.drain.running(), 1, "the answering session is counted");
    assert!(!draining.is_finished(), "the drain waits for that session");
    // Other new sessions are refused meanwhile.
    let refused = app.get("/tokens?session_id=other&n=3", None).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&refused), Some("draining"));

    app.release_answers();
    let evs = events(answer(first).await).await;
    assert_eq!(datas(&evs), common::expected_tokens(0..3));
    let report = tokio::time::timeout(TIMEOUT, draining)
        .await
        .expect("the drain returns")
        .unwrap();
    assert_eq!(report.running_at_start, 1);
    assert_eq!(report.ended_at_deadline, 0);
    assert_eq!(
        app.status("/tokens", "racing").await,
        Some(Status::Finished(Outcome::Completed))
    );
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_passed_the_drain_check_before_the_drain_began_is_refused_and_produces_nothing(
) {
    let app = app(|l| l);
    // The request is past its drain check, its claim in flight, when the drain begins.
    app.store.hold("claim");
    let late = app.call("/gated?session_id=late", None);
    app.inner.gate("late");
    eventually("the claim is in flight", || app.store.calls("claim") == 1).await;
    let report = tokio::time::timeout(TIMEOUT, app.drain.drain(TIMEOUT))
        .await
        .expect("nothing runs: the drain returns");
    assert_eq!(report.running_at_start, 0);

    app.store.release("claim");
    let res = answer(late).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&res), Some("draining"));
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(app.entered.load(Ordering::SeqCst), 0, "nothing generated");
    eventually("the claim released", || app.store.calls("release") == 1).await;
    assert_eq!(app.status("/gated", "late").await, None);
    assert_eq!(app.drain.running(), 0);
    assert_eq!(app.store.calls("start"), 0);
    assert_eq!(app.store.calls("append"), 0);
}

// ---------------------------------------------------------------------------------------------
// The start of a session, in a task of its own.

#[tokio::test(start_paused = true)]
async fn a_client_that_disconnects_during_a_slow_start_loses_no_event() {
    let app = app(|l| l);
    // The start is stored, its reply is slow, and the client goes away meanwhile.
    app.store.hold("start");
    let first = app.call("/tokens?session_id=slow-start&n=50", None);
    eventually("the start is in flight", || app.store.calls("start") == 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    app.store.release("start");

    let evs = events(app.get("/tokens?session_id=slow-start&n=50", None).await).await;
    assert_layer_ids(&evs);
    assert_eq!(datas(&evs), common::expected_tokens(0..50));
    let end = app
        .get("/tokens?session_id=slow-start&n=50", evs[49].id.as_deref())
        .await;
    assert_eq!(end.status(), StatusCode::NO_CONTENT);
    assert_eq!(reason(&end), Some("completed"));
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_start_reply_is_retried_and_the_session_is_produced_once() {
    let app = app(|l| l);
    app.store.fail_reply("start", 1);
    let res = app.get("/tokens?session_id=lost-start&n=20", None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let evs = events(res).await;
    assert_layer_ids(&evs);
    assert_eq!(datas(&evs), common::expected_tokens(0..20));
    assert_eq!(app.store.calls("start"), 2);
    eventually("the producer ended", || app.drain.running() == 0).await;
    assert_eq!(
        app.status("/tokens", "lost-start").await,
        Some(Status::Finished(Outcome::Completed))
    );
    // A reconnect from the start gets the same events, once.
    let again = events(app.get("/tokens?session_id=lost-start&n=20", None).await).await;
    assert_eq!(again, evs);
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_start_failing_fewer_times_than_its_attempts_still_makes_a_session_and_more_do_not() {
    let n = resumable_sse::limits::START_ATTEMPTS as usize;
    for failures in [0, 1, n - 1, n, n + 1, 2 * n] {
        let app = app(|l| l);
        app.store.fail_next("start", failures);
        let key = format!("fails-{failures}");
        let evs = events(
            app.get(&format!("/tokens?session_id={key}&n=3"), None)
                .await,
        )
        .await;
        assert_eq!(
            datas(&evs),
            common::expected_tokens(0..3),
            "{failures} failures"
        );
        if failures < n {
            assert_layer_ids(&evs);
            assert_eq!(
                app.store.calls("start"),
                failures + 1,
                "{failures} failures"
            );
            eventually("the producer ended", || app.drain.running() == 0).await;
            assert_eq!(
                app.status("/tokens", &key).await,
                Some(Status::Finished(Outcome::Completed)),
                "{failures} failures"
            );
        } else {
            assert_eq!(evs[0].id.as_deref(), Some("inner-0"), "{failures} failures");
            assert_eq!(app.store.calls("start"), n, "{failures} failures");
            assert_eq!(
                app.status("/tokens", &key).await,
                None,
                "{failures} failures"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_start_that_keeps_failing_serves_the_response_unresumable_and_releases_the_claim() {
    let app = app(|l| l);
    app.store.fail_next("start", usize::MAX);
    let res = app.get("/tokens?session_id=no-start&n=3", None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let evs = events(res).await;
    assert_eq!(datas(&evs), common::expected_tokens(0..3));
    assert_eq!(
        evs[0].id.as_deref(),
        Some("inner-0"),
        "passed through, with the inner ids"
    );
    assert_eq!(app.store.calls("append"), 0);
    assert_eq!(
        app.status("/tokens", "no-start").await,
        None,
        "the claim is released"
    );
    assert_eq!(app.drain.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_finds_its_claim_lost_drops_the_body_and_starts_no_producer() {
    let app = app(|l| l);
    // Cancelled between the claim and the start: the start answers `false`.
    app.store.cancel_before("start");
    app.inner.gate("lost-claim");
    let res = app.get("/gated?session_id=lost-claim", None).await;
    // Answered as a reconnect of the cancelled session would be.
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(reason(&res), Some("cancelled"));
    eventually("the inner generator dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    eventually("no producer counted", || app.drain.running() == 0).await;
    assert_eq!(app.store.calls("start"), 1);
    assert_eq!(app.store.calls("cancelled"), 0, "no producer ran");
    assert_eq!(app.store.calls("append"), 0);
    assert_eq!(app.store.calls("finish"), 0);
    assert_eq!(app.inner.calls(), 1);
    assert_eq!(
        app.status("/gated", "lost-claim").await,
        Some(Status::Finished(Outcome::Cancelled))
    );
}

/// A first request whose inner service has not answered when the drain deadline passes holds a
/// producer guard that nothing ends: `drain()` waits for the inner service, however long it takes.
#[tokio::test(start_paused = true)]
async fn the_drain_deadline_while_the_inner_service_answers_refuses_that_request() {
    let app = app(|l| l);
    app.hold_answers();
    let first = app.call("/tokens?session_id=slow-inner&n=3", None);
    eventually("the inner service is answering", || {
        app.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let deadline = Duration::from_millis(10);
    let report = tokio::time::timeout(deadline + PROMPTLY, app.drain.drain(deadline))
        .await
        .expect("the drain returns right after its deadline");
    assert_eq!(report.ended_at_deadline, 1);
    let res = answer(first).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&res), Some("draining"));
    assert_eq!(
        app.status("/tokens", "slow-inner").await,
        None,
        "the claim is released"
    );
    app.release_answers();
}

// ---------------------------------------------------------------------------------------------
// What the producer holds while its store does not take events.

/// The producer reads at most [`MAX_PENDING_BYTES`] ahead of a store that does not answer
/// (after the append in flight), whatever the size of the events; once the store answers,
/// every event is stored and delivered once, in order. Bodies of 0 and 1 events, and of one below,
/// at, one above and twice the bound in bytes, in events far fewer than [`MAX_PENDING_EVENTS`].
#[tokio::test(start_paused = true)]
async fn the_producer_reads_at_most_max_pending_bytes_ahead_of_a_store_that_does_not_answer() {
    use futures_util::stream::{self, StreamExt};
    use resumable_sse::limits::{APPEND_BYTES, MAX_PENDING_BYTES, MAX_PENDING_EVENTS};

    // Events of a size that divides the bound: few enough that the count bound never applies.
    let size = MAX_PENDING_BYTES / 64;
    assert!(MAX_PENDING_BYTES / size < MAX_PENDING_EVENTS);
    // The encoded sizes of a body of `total` bytes: whole events, the last one adjusted.
    let body_of = |total: usize| -> Vec<usize> {
        let mut sizes = vec![size; total / size];
        match total % size {
            0 => {}
            1 => *sizes.last_mut().expect("an event") += 1,
            r if r == size - 1 => sizes.push(size - 1),
            r => panic!("pick totals around multiples of {size}: {r}"),
        }
        sizes
    };
    let n = MAX_PENDING_BYTES;
    for (case, sizes) in [
        ("no event", vec![]),
        ("one event", vec![size]),
        ("n - 1 bytes", body_of(n - 1)),
        ("n bytes", body_of(n)),
        ("n + 1 bytes", body_of(n + 1)),
        ("2n bytes", body_of(2 * n)),
    ] {
        let store: FaultyStore = FaultyStore::default();
        let pulled = Arc::new(AtomicUsize::new(0));
        let inner = {
            let (pulled, sizes) = (pulled.clone(), sizes.clone());
            tower::service_fn(move |_req: Request<Body>| {
                let (pulled, sizes) = (pulled.clone(), sizes.clone());
                async move {
                    let events =
                        stream::iter(sizes.into_iter().enumerate()).map(move |(i, bytes)| {
                            pulled.fetch_add(bytes, Ordering::SeqCst);
                            let data = common::sized_data(i, bytes);
                            Ok::<_, Infallible>(bytes::Bytes::from(format!("data: {data}\n\n")))
                        });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Body::from_stream(events))
                            .unwrap(),
                    )
                }
            })
        };
        let svc = ResumableSseLayer::new(store.clone())
            .keep_alive(resumable_sse::KeepAlive::disabled())
            .layer(inner);
        store.hold("append");
        let req = Request::get("/big?session_id=pending")
            .body(Body::empty())
            .unwrap();
        let res = tokio::time::timeout(TIMEOUT, svc.oneshot(req))
            .await
            .expect("an answer in time")
            .unwrap();
        let total: usize = sizes.iter().sum();
        assert_eq!(res.status(), StatusCode::OK, "{case}");
        // The runtime's clock moves only once every task is idle: the producer has read all it
        // could by then.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ahead = pulled.load(Ordering::SeqCst);
        assert!(
            ahead <= APPEND_BYTES + MAX_PENDING_BYTES + size,
            "{case}: {ahead} bytes read with the store held"
        );
        assert!(
            ahead >= total.min(MAX_PENDING_BYTES),
            "{case}: only {ahead} bytes read with the store held"
        );
        store.release("append");
        let evs = events(res).await;
        assert_layer_ids(&evs);
        let want: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, bytes)| common::sized_data(i, *bytes))
            .collect();
        assert!(
            datas(&evs) == want,
            "{case}: {} events delivered, {} sent",
            evs.len(),
            want.len()
        );
        assert_eq!(pulled.load(Ordering::SeqCst), total, "{case}");
    }
}
