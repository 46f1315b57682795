//! The edge matrix: every stream ends, exactly once, at every size.
//!
//! Event counts are derived from the public sizes in `resumable_sse::limits`, never repeated:
//! 0, 1, and p - 1, p, p + 1, 2p for every page, chunk and batch size p (byte sizes are turned
//! into event counts with `/sized` events of a size chosen here), and the same around the default
//! per-session byte limit with large events. Each count runs two sessions:
//!
//! - the **first client at full speed** reads everything, then **reconnects after the last
//!   event**, then a **new client after the finish** asks without `Last-Event-ID`;
//! - a first client reads half and drops, then **reconnects in the middle**.
//!
//! Each case has a deadline and a stall limit, and checks exactly which events come (data and
//! consecutive sequence numbers of one epoch), how each response ends (cleanly, with the eviction
//! comment, cut, or not at all) and the final status and reason. Where eviction makes an answer
//! depend on the store's state, the expected answer is computed from the store's `first_seq`,
//! read just before and just after the request. Every failing case is reported, not only the
//! first.
#![deny(dead_code)]

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::{stream, FutureExt, StreamExt};

use super::client::*;
use super::harness::*;
use super::service::*;
use super::wait::*;
use super::{Backend, Opts};
use crate::limits;
use crate::sse::{encode_event, EventRef};
use crate::store::{SessionInfo, Status, Store};
use crate::{Epoch, EventId, Outcome, SessionKey};

/// Cases in flight at once (each is a session, a server and a client or two).
const CONCURRENCY: usize = 4;
/// The longest a case waits for its next event, or for the end after its last one.
const STALL: Duration = Duration::from_secs(10);
/// The longest one case may take, whatever it does.
const CASE_DEADLINE: Duration = Duration::from_secs(120);

/// The encoded size of the `/sized` events that turn the byte sizes of blocks and Redis chunks
/// into event counts: four times the average at which a chunk's byte and event limits coincide,
/// so that the byte limit is the one reached.
const SMALL_EVENT_BYTES: usize = 4 * limits::REDIS_CHUNK_BYTES / limits::REDIS_CHUNK_EVENTS;
/// The encoded size of the events around the per-session byte limit: one block each, so that
/// twice the limit is a couple of thousand events rather than millions.
const LARGE_EVENT_BYTES: usize = limits::BLOCK_BYTES;

/// What the inner service of a case produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Events {
    /// `/tokens`: `token <i>`, a few dozen bytes each.
    Tokens,
    /// `/sized`: events encoded in exactly this many bytes.
    Sized(usize),
}

impl Events {
    /// The route of these events.
    fn route(self) -> &'static str {
        match self {
            Events::Tokens => "/tokens",
            Events::Sized(_) => "/sized",
        }
    }

    fn path(self, key: &str, n: usize) -> String {
        match self {
            Events::Tokens => format!("/tokens?session_id={key}&n={n}"),
            Events::Sized(bytes) => format!("/sized?session_id={key}&n={n}&bytes={bytes}"),
        }
    }

    /// The data of event `i` (sequence number `i + 1`).
    fn data(self, i: usize) -> String {
        match self {
            Events::Tokens => format!("token {i}"),
            Events::Sized(bytes) => sized_data(i, bytes),
        }
    }

    /// The bytes a store holds for `n` of these events.
    fn total_bytes(self, n: usize) -> usize {
        match self {
            Events::Sized(bytes) => bytes * n,
            Events::Tokens => (0..n)
                .map(|i| {
                    let id = EventId {
                        epoch: Epoch::from_raw(1),
                        seq: i as u64 + 1,
                    }
                    .to_string();
                    let data = self.data(i);
                    let event = EventRef {
                        event: b"",
                        data: Some(data.as_bytes()),
                        retry: None,
                    };
                    encode_event(id.as_bytes(), &event).len()
                })
                .sum(),
        }
    }

    fn describe(self) -> String {
        match self {
            Events::Tokens => "token events".to_owned(),
            Events::Sized(bytes) => format!("{bytes}-byte events"),
        }
    }
}

/// Which session of a count a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// First client at full speed, then a reconnect after the last event, then a new client
    /// after the finish.
    FirstClientThenAfterTheEnd,
    /// A first client reads half and drops; it reconnects in the middle.
    ReconnectInTheMiddle,
}

#[derive(Clone, Debug)]
struct Case {
    count: usize,
    events: Events,
    /// Why this count: the sizes it is next to, e.g. `READ_PAGE_EVENTS + 1`.
    why: String,
    scenario: Scenario,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} {} ({}), {:?}",
            self.count,
            self.events.describe(),
            self.why,
            self.scenario
        )
    }

    fn key(&self) -> String {
        let kind = match self.events {
            Events::Tokens => "t".to_owned(),
            Events::Sized(bytes) => format!("s{bytes}"),
        };
        let scenario = match self.scenario {
            Scenario::FirstClientThenAfterTheEnd => "first",
            Scenario::ReconnectInTheMiddle => "middle",
        };
        format!("edge-{kind}-{}-{scenario}", self.count)
    }

    /// Whether the session's events exceed the default soft limit, so that a store may evict.
    fn may_evict(&self) -> bool {
        self.events.total_bytes(self.count) > limits::DEFAULT_MAX_BYTES_PER_SESSION
    }
}

/// Counts p - 1, p, p + 1 and 2p around each named size, merged: one entry per count, naming
/// every size it is next to.
fn around(sizes: &[(&str, usize)], also: &[(&str, usize)]) -> BTreeMap<usize, Vec<String>> {
    let mut counts: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for &(name, n) in also {
        counts.entry(n).or_default().push(name.to_owned());
    }
    for &(name, p) in sizes {
        assert!(p > 1, "{name} is {p}");
        for (n, label) in [
            (p - 1, format!("{name} - 1")),
            (p, name.to_owned()),
            (p + 1, format!("{name} + 1")),
            (2 * p, format!("2 x {name}")),
        ] {
            counts.entry(n).or_default().push(label);
        }
    }
    counts
}

/// Both scenarios for every count (a middle needs two events at least).
fn cases(events: Events, counts: BTreeMap<usize, Vec<String>>) -> Vec<Case> {
    let mut cases = Vec::new();
    for (count, why) in counts {
        let why = why.join(", ");
        for scenario in [
            Scenario::FirstClientThenAfterTheEnd,
            Scenario::ReconnectInTheMiddle,
        ] {
            if scenario == Scenario::ReconnectInTheMiddle && count < 2 {
                continue;
            }
            cases.push(Case {
                count,
                events,
                why: why.clone(),
                scenario,
            });
        }
    }
    cases
}

/// Runs every case, [`CONCURRENCY`] at a time, each in a task of its own on a fresh store and
/// server, and fails with the list of every failing case.
async fn run_matrix<B: Backend>(b: &B, cases: Vec<Case>) {
    let total = cases.len();
    let started = std::time::Instant::now();
    let results: Vec<(String, Result<(), String>)> = stream::iter(cases)
        .then(|case| async move { (case, b.store(Opts::default()).await) })
        .map(|(case, store)| {
            let name = case.name();
            let task = tokio::spawn(async move {
                let run = AssertUnwindSafe(run_case(store, case)).catch_unwind();
                match tokio::time::timeout(CASE_DEADLINE, run).await {
                    Err(_) => Err(format!("not done within {CASE_DEADLINE:?}")),
                    Ok(Err(panic)) => Err(format!("panicked: {}", panic_message(&*panic))),
                    Ok(Ok(result)) => result,
                }
            });
            async move {
                let result = task
                    .await
                    .unwrap_or_else(|e| Err(format!("task failed: {e}")));
                (name, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("- {name}: {e}")))
        .collect();
    eprintln!(
        "{total} cases in {:?}, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The body ended cleanly, without the eviction comment.
    Clean,
    /// The body ended after the layer's eviction comment.
    Evicted,
    /// The connection broke before the body's end.
    Cut,
    /// Nothing came for [`STALL`].
    Stalled,
}

/// Events read from one response, and how it ended (`None`: the read stopped by itself).
struct Read {
    events: Vec<Ev>,
    end: Option<End>,
}

/// Reads up to `max` events (all, when `None`) and, when the body ends first or `max` is
/// `None`, how it ends.
async fn read(conn: &mut SseConn, max: Option<usize>) -> Read {
    let mut events = Vec::new();
    loop {
        if max.is_some_and(|max| events.len() >= max) {
            return Read { events, end: None };
        }
        match tokio::time::timeout(STALL, conn.next()).await {
            Err(_) => {
                return Read {
                    events,
                    end: Some(End::Stalled),
                }
            }
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => {
                let end = if conn.evicted {
                    End::Evicted
                } else if conn.errored {
                    End::Cut
                } else {
                    End::Clean
                };
                return Read {
                    events,
                    end: Some(end),
                };
            }
        }
    }
}

fn id_of(ev: &Ev) -> Option<EventId> {
    EventId::parse(ev.id.as_deref()?.as_bytes())
}

/// Checks that `got` holds exactly the events `from..=to` of one epoch, with the right data, and
/// ended as `end` says (`None`: the read was to stop by itself after them).
fn check_events(
    what: &str,
    got: &Read,
    events: Events,
    from: u64,
    to: u64,
    end: Option<End>,
) -> Result<(), String> {
    let evs = &got.events;
    let span = match (evs.first().and_then(id_of), evs.last().and_then(id_of)) {
        (Some(a), Some(b)) => format!("seqs {}..={}", a.seq, b.seq),
        _ => "none".to_owned(),
    };
    let wanted = if from > to {
        "no event".to_owned()
    } else {
        format!("seqs {from}..={to}")
    };
    let summary = format!(
        "{what}: got {} events ({span}), end {:?}; expected {wanted}, end {end:?}",
        evs.len(),
        got.end
    );
    let expected_len = (to + 1).saturating_sub(from) as usize;
    let epoch = evs.first().and_then(id_of).map(|id| id.epoch);
    for (i, ev) in evs.iter().enumerate() {
        let seq = from + i as u64;
        let Some(id) = id_of(ev) else {
            return Err(format!("{summary}; event {i} has id {:?}", ev.id));
        };
        if Some(id.epoch) != epoch {
            return Err(format!("{summary}; event {i} is of another epoch: {id}"));
        }
        if id.seq != seq {
            return Err(format!(
                "{summary}; event {i} is seq {}, expected {seq}",
                id.seq
            ));
        }
        if seq > to {
            return Err(format!("{summary}; seq {seq} is beyond the last, {to}"));
        }
        let data = events.data(seq as usize - 1);
        if ev.data != data {
            let cut = |s: &str| s.chars().take(40).collect::<String>();
            return Err(format!(
                "{summary}; seq {seq} has data {:?}.., expected {:?}..",
                cut(&ev.data),
                cut(&data)
            ));
        }
    }
    if evs.len() != expected_len || got.end != end {
        return Err(summary);
    }
    Ok(())
}

fn check_status(
    what: &str,
    conn: &SseConn,
    status: u16,
    reason: Option<&str>,
) -> Result<(), String> {
    conn.check_answer(what, status, reason)?;
    if status == 200
        && conn.headers.get("content-type").map(|v| v.as_bytes()) != Some(b"text/event-stream")
    {
        return Err(format!(
            "{what}: content-type {:?}",
            conn.headers.get("content-type")
        ));
    }
    Ok(())
}

async fn lookup<St: Store>(store: &St, key: &SessionKey) -> Result<SessionInfo, String> {
    store
        .lookup(key)
        .await
        .map_err(|e| format!("lookup failed: {e}"))?
        .ok_or_else(|| "the session is gone".to_owned())
}

/// Waits (within [`STALL`]) until the session is finished.
async fn finished<St: Store>(store: &St, key: &SessionKey) -> Result<SessionInfo, String> {
    let deadline = tokio::time::Instant::now() + STALL;
    loop {
        let info = lookup(store, key).await?;
        if info.status.is_finished() {
            return Ok(info);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not finished within {STALL:?}: {info:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The final state every finished case must reach: completed, with every event numbered.
fn check_final(info: &SessionInfo, case: &Case) -> Result<(), String> {
    if info.status != Status::Finished(Outcome::Completed) || info.last_seq != case.count as u64 {
        return Err(format!(
            "final state {:?} with last_seq {}, expected completed with {}",
            info.status, info.last_seq, case.count
        ));
    }
    if !case.may_evict() && info.first_seq != 1 {
        return Err(format!(
            "first_seq {} although the session is within the default limits",
            info.first_seq
        ));
    }
    Ok(())
}

/// A request with `Last-Event-ID` at `after` (none when `None`) to a finished session whose
/// oldest retained event was `first_before` just before the request and `first_after` just
/// after: the rest then a clean end when `after` was retained, `410 evicted` when it was not
/// (either, only if eviction happened between the two reads of the store).
async fn check_resume<St: Store>(
    what: &str,
    app: &App<St>,
    case: &Case,
    key: &SessionKey,
    epoch: Epoch,
    after: Option<u64>,
) -> Result<(), String> {
    let path = case.events.path(&case.key(), case.count);
    let first_before = lookup(&app.store, key).await?.first_seq;
    if case.may_evict() {
        eprintln!(
            "{}: {what}: oldest retained event before the request: {first_before}",
            case.name()
        );
    }
    let id = after.map(|seq| EventId { epoch, seq }.to_string());
    let mut conn = get(app.addr, &path, id.as_deref()).await;
    let first_after = lookup(&app.store, key).await?.first_seq;
    let position = after.unwrap_or(0);
    let n = case.count as u64;
    // Without Last-Event-ID a session without events has nothing to replay, ever.
    let done = position == n;
    if done {
        return check_status(what, &conn, 204, Some("completed"));
    }
    let retained_before = after.map_or(first_before <= 1, |seq| seq + 1 >= first_before);
    let retained_after = after.map_or(first_after <= 1, |seq| seq + 1 >= first_after);
    if conn.status == 410 && !retained_after {
        return check_status(what, &conn, 410, Some("evicted"));
    }
    if !retained_before {
        return check_status(what, &conn, 410, Some("evicted"));
    }
    check_status(what, &conn, 200, None)?;
    let got = read(&mut conn, None).await;
    let end = if got.end == Some(End::Evicted) && !retained_after {
        End::Evicted
    } else {
        End::Clean
    };
    let to = if end == End::Evicted {
        position + got.events.len() as u64
    } else {
        n
    };
    check_events(what, &got, case.events, position + 1, to, Some(end))
}

async fn run_case<St: Store>(store: St, case: Case) -> Result<(), String> {
    let app = serve_with(store, |l| l).await;
    let key = scoped(case.events.route(), &case.key());
    let Err(e) = run_session(&app, &key, &case).await else {
        return Ok(());
    };
    // What the store says now, to tell a stall from a failed or evicted session.
    let state = match tokio::time::timeout(STALL, app.store.lookup(&key)).await {
        Ok(Ok(Some(info))) => format!(
            "{:?}, first_seq {}, last_seq {}",
            info.status, info.first_seq, info.last_seq
        ),
        Ok(Ok(None)) => "no session".to_owned(),
        Ok(Err(e)) => format!("lookup failed: {e}"),
        Err(_) => "lookup timed out".to_owned(),
    };
    Err(format!("{e} [store now: {state}]"))
}

async fn run_session<St: Store>(
    app: &App<St>,
    key: &SessionKey,
    case: &Case,
) -> Result<(), String> {
    let path = case.events.path(&case.key(), case.count);
    let n = case.count as u64;
    match case.scenario {
        Scenario::FirstClientThenAfterTheEnd => {
            let what = "first client at full speed";
            let mut conn = get(app.addr, &path, None).await;
            check_status(what, &conn, 200, None)?;
            let got = read(&mut conn, None).await;
            drop(conn);
            check_events(what, &got, case.events, 1, n, Some(End::Clean))?;
            // The end is sent once the session is finished: the store says so already.
            let info = lookup(&app.store, key).await?;
            check_final(&info, case)?;
            if let Some(last) = got.events.last().and_then(id_of) {
                if last.epoch != info.epoch {
                    return Err(format!(
                        "events of epoch {:?}, session {:?}",
                        last.epoch, info.epoch
                    ));
                }
            }
            check_resume(
                "reconnect after the last event",
                app,
                case,
                key,
                info.epoch,
                Some(n),
            )
            .await?;
            check_resume(
                "new client after the finish",
                app,
                case,
                key,
                info.epoch,
                None,
            )
            .await?;
        }
        Scenario::ReconnectInTheMiddle => {
            let middle = n / 2;
            let what = "first client, up to the middle";
            let mut conn = get(app.addr, &path, None).await;
            check_status(what, &conn, 200, None)?;
            let got = read(&mut conn, Some(middle as usize)).await;
            drop(conn);
            check_events(what, &got, case.events, 1, middle, None)?;
            let epoch = id_of(got.events.last().unwrap()).unwrap().epoch;
            if case.may_evict() {
                // Whether the middle is still retained depends on how far the producer got
                // while nobody held it: decide once it stopped.
                finished(&app.store, key).await?;
            }
            check_resume(
                "reconnect in the middle",
                app,
                case,
                key,
                epoch,
                Some(middle),
            )
            .await?;
            let info = finished(&app.store, key).await?;
            check_final(&info, case)?;
            check_resume(
                "reconnect after the last event",
                app,
                case,
                key,
                epoch,
                Some(n),
            )
            .await?;
        }
    }
    if app.inner.calls() != 1 {
        return Err(format!(
            "the inner service was called {} times",
            app.inner.calls()
        ));
    }
    Ok(())
}

// --- The tests ---

/// 0, 1, and around every size counted in events: the read page, the producer's ready batch and
/// pending bound, the Redis chunk, and the shared tail's page and capacity.
pub(crate) async fn every_count_around_every_page_chunk_and_batch_size_ends_exactly_once<
    B: Backend,
>(
    b: &B,
) {
    let counts = around(
        &[
            ("READ_PAGE_EVENTS", limits::READ_PAGE_EVENTS),
            ("READY_BATCH_EVENTS", limits::READY_BATCH_EVENTS),
            ("MAX_PENDING_EVENTS", limits::MAX_PENDING_EVENTS),
            ("REDIS_CHUNK_EVENTS", limits::REDIS_CHUNK_EVENTS),
            ("TAIL_PAGE_EVENTS", limits::TAIL_PAGE_EVENTS),
            ("TAIL_CAPACITY_EVENTS", limits::TAIL_CAPACITY_EVENTS),
        ],
        &[("no event", 0), ("one event", 1)],
    );
    run_matrix(b, cases(Events::Tokens, counts)).await;
}

/// 1, and around every size counted in bytes (the producer's block and append, the Redis chunk
/// and read), with events of a fixed encoded size.
pub(crate) async fn every_count_around_every_block_and_chunk_byte_size_ends_exactly_once<
    B: Backend,
>(
    b: &B,
) {
    let per = |bytes: usize| {
        assert_eq!(
            bytes % SMALL_EVENT_BYTES,
            0,
            "pick an event size dividing {bytes}"
        );
        bytes / SMALL_EVENT_BYTES
    };
    let counts = around(
        &[
            ("BLOCK_BYTES", per(limits::BLOCK_BYTES)),
            ("REDIS_CHUNK_BYTES", per(limits::REDIS_CHUNK_BYTES)),
            ("APPEND_BYTES", per(limits::APPEND_BYTES)),
            ("REDIS_READ_BYTES", per(limits::REDIS_READ_BYTES)),
        ],
        &[("one event", 1)],
    );
    run_matrix(b, cases(Events::Sized(SMALL_EVENT_BYTES), counts)).await;
}

/// Around the default per-session byte limit, with large events: below and at the limit nothing
/// is evicted; beyond it the first client still gets every event (the events a connected reader
/// needs are kept), and later requests get the rest or `410 evicted`, as the store's oldest
/// retained event says.
pub(crate) async fn sessions_around_the_default_byte_limit_end_exactly_once_or_report_eviction<
    B: Backend,
>(
    b: &B,
) {
    assert_eq!(limits::DEFAULT_MAX_BYTES_PER_SESSION % LARGE_EVENT_BYTES, 0);
    let counts = around(
        &[(
            "DEFAULT_MAX_BYTES_PER_SESSION",
            limits::DEFAULT_MAX_BYTES_PER_SESSION / LARGE_EVENT_BYTES,
        )],
        &[],
    );
    run_matrix(b, cases(Events::Sized(LARGE_EVENT_BYTES), counts)).await;
}

/// A session that ends without an event, as completed, failed or cancelled: its first request
/// (and one that joined while it ran) gets `200` and an empty body that ends (aborted when the
/// session failed); every later
/// request, without `Last-Event-ID` or with `<epoch>-0`, gets `204` with the outcome; the inner
/// service is called once. The same for a stream that ends at once, at full speed.
pub(crate) async fn a_session_without_events_ends_its_first_response_empty_then_answers_204_with_its_outcome<
    B: Backend,
>(
    b: &B,
) {
    let app = serve_with(b.store(Opts::default()).await, |l| l).await;
    let mut calls = 0;
    for outcome in [Outcome::Completed, Outcome::Failed, Outcome::Cancelled] {
        let name = format!("zero-{}", outcome.reason());
        let path = format!("/gated?session_id={name}");
        let key = scoped("/gated", &name);
        app.inner.gate(&name);
        let mut first = get(app.addr, &path, None).await;
        check_status("first request", &first, 200, None).unwrap();
        let mut joined = get(app.addr, &path, None).await;
        check_status("request while running", &joined, 200, None).unwrap();
        if outcome == Outcome::Completed {
            app.inner.end(&name);
        } else if outcome == Outcome::Failed {
            app.inner.fail(&name);
        } else {
            assert!(app.store.cancel(&key).await.unwrap());
        }
        for (what, conn) in [
            ("first request", &mut first),
            ("request while running", &mut joined),
        ] {
            // A failed session's connections are aborted (the layer's default), others end.
            let end = match outcome {
                Outcome::Failed => End::Cut,
                _ => End::Clean,
            };
            let got = read(conn, None).await;
            check_events(what, &got, Events::Tokens, 1, 0, Some(end)).unwrap();
        }
        let info = finished(&app.store, &key).await.unwrap();
        assert_eq!(info.status, Status::Finished(outcome));
        assert_eq!(info.last_seq, 0);
        let before_first = EventId {
            epoch: info.epoch,
            seq: 0,
        }
        .to_string();
        for (what, id) in [
            ("a request without Last-Event-ID", None),
            ("a request with <epoch>-0", Some(before_first.as_str())),
            ("another request without Last-Event-ID", None),
        ] {
            let conn = get(app.addr, &path, id).await;
            check_status(what, &conn, 204, Some(outcome.reason().as_str())).unwrap();
        }
        calls += 1;
        assert_eq!(app.inner.calls(), calls, "{outcome:?}");
    }

    // At full speed: the body ends at once.
    let path = Events::Tokens.path("zero-fast", 0);
    let mut first = get(app.addr, &path, None).await;
    check_status("first request", &first, 200, None).unwrap();
    let got = read(&mut first, None).await;
    check_events(
        "first request",
        &got,
        Events::Tokens,
        1,
        0,
        Some(End::Clean),
    )
    .unwrap();
    let info = lookup(&app.store, &scoped("/tokens", "zero-fast"))
        .await
        .unwrap();
    assert_eq!(info.status, Status::Finished(Outcome::Completed));
    for _ in 0..2 {
        let conn = get(app.addr, &path, None).await;
        check_status("a later request", &conn, 204, Some("completed")).unwrap();
    }
    assert_eq!(app.inner.calls(), calls + 1);
}
