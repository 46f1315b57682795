//! A model-based property test of the protocol: random sequences of operations on one session
//! key (append bursts through `/gated`, reads at random positions, cuts, connected readers,
//! finish, fail, cancel, expiry and a new incarnation) run against the layer on a real socket,
//! and a small reference model predicts the status, the reason header and the exact events of
//! every response, how each ends, and how often the inner service is called.
//!
//! Runs on the in-memory store and on Redis (a `redis-server` of the test's own, or `REDIS_URL`;
//! skipped loudly when there is none, a failure under `CI=true`).

mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use resumable_sse::limits;
use resumable_sse::store::{Status, Store};
use resumable_sse::{Epoch, EventId, MemoryStore, Outcome, SessionKey};
use tokio::time::Instant;

/// Generated cases per store: few, short sequences, so that a run takes seconds.
const CASES: u32 = 32;
/// The longest operation sequence (after the initial start).
const MAX_OPS: usize = 24;
/// How long a finished session stays resumable in the model's stores.
const RETENTION: Duration = Duration::from_millis(1000);
/// A read of a finished session is only made this long before its retention may end (the
/// model lets the session expire first otherwise), so that no answer depends on timing.
const READ_BUDGET: Duration = Duration::from_millis(600);
/// Margin past the retention after which a finished session is certainly gone.
const EXPIRY_MARGIN: Duration = Duration::from_millis(150);
/// The longest wait for an event, an end, or a store state.
const STALL: Duration = Duration::from_secs(5);
/// The longest one operation may take.
const OP_DEADLINE: Duration = Duration::from_secs(30);
/// The longest one case may take.
const CASE_DEADLINE: Duration = Duration::from_secs(90);

const KEY: &str = "model";

/// Where a request's `Last-Event-ID` points.
#[derive(Clone, Copy, Debug)]
enum Pos {
    /// An id of the current incarnation, at `n % (events + 1)`: anything from `<epoch>-0` to the
    /// newest event.
    Seq(u16),
    /// One past the newest event.
    BeyondHead,
    /// An id of another incarnation (an earlier one when there was one).
    OtherEpoch(u16),
}

/// How a finish op ends the session.
#[derive(Clone, Copy, Debug)]
enum End {
    /// The inner stream ends.
    Complete,
    /// The inner stream fails.
    Fail,
    /// `Store::cancel`.
    Cancel,
}

#[derive(Clone, Debug)]
enum Op {
    /// A first request when there is no session (a new incarnation after an expiry); kept
    /// connected as a reader. With a session, a request without `Last-Event-ID`.
    Start,
    /// Releases a burst of events through the gate.
    Append(usize),
    /// A request that reads `cut` events (everything it is owed when `None`) and drops.
    Read {
        at: Option<Pos>,
        cut: Option<usize>,
    },
    /// A request kept connected across operations.
    Open {
        at: Option<Pos>,
    },
    /// Reads everything a connected reader is owed by now.
    Take(usize),
    /// Drops a connected reader.
    Cut(usize),
    Finish(End),
    /// Waits past the retention of a finished session.
    Expire,
}

fn pos() -> impl Strategy<Value = Option<Pos>> {
    prop_oneof![
        2 => Just(None),
        5 => any::<u16>().prop_map(|n| Some(Pos::Seq(n))),
        1 => Just(Some(Pos::BeyondHead)),
        1 => any::<u16>().prop_map(|n| Some(Pos::OtherEpoch(n))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    // Bursts of a few events, and now and then one that fills a Redis chunk or a read page.
    let burst = prop_oneof![
        6 => 1..=4usize,
        1 => Just(limits::REDIS_CHUNK_EVENTS),
        1 => Just(limits::READ_PAGE_EVENTS),
    ];
    let end = prop_oneof![Just(End::Complete), Just(End::Fail), Just(End::Cancel)];
    prop_oneof![
        1 => Just(Op::Start),
        4 => burst.prop_map(Op::Append),
        4 => (pos(), proptest::option::of(0..6usize)).prop_map(|(at, cut)| Op::Read { at, cut }),
        2 => pos().prop_map(|at| Op::Open { at }),
        2 => any::<usize>().prop_map(Op::Take),
        1 => any::<usize>().prop_map(Op::Cut),
        2 => end.prop_map(Op::Finish),
        1 => Just(Op::Expire),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..=MAX_OPS).prop_map(|mut ops| {
        ops.insert(0, Op::Start);
        ops
    })
}

/// The model's view of the current incarnation.
struct Session {
    epoch: Epoch,
    /// Which incarnation of the key this is (event data names it).
    incarnation: usize,
    events: u64,
    /// `None` while running.
    outcome: Option<Outcome>,
    /// When the finish was asked for, and when the store was seen finished.
    finished: Option<(Instant, Instant)>,
}

/// A connected reader: its response and what it has read.
struct Held {
    conn: SseConn,
    cursor: u64,
}

struct Model<St: Store> {
    app: App<St>,
    key: SessionKey,
    session: Option<Session>,
    old_epochs: Vec<Epoch>,
    incarnations: usize,
    calls: usize,
    readers: Vec<Held>,
    /// What was done so far, for the failure message.
    log: String,
    stats: Stats,
}

/// What a run checked, printed at the end so that a green run shows it did something.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    requests: usize,
    events: u64,
    ends: usize,
    expiries: usize,
    incarnations: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.requests += o.requests;
        self.events += o.events;
        self.ends += o.ends;
        self.expiries += o.expiries;
        self.incarnations += o.incarnations;
    }
}

fn data(incarnation: usize, seq: u64) -> String {
    format!("i{incarnation}-e{seq}")
}

impl<St: Store> Model<St> {
    async fn new(store: St) -> Self {
        Self {
            app: serve_with(store, |l| l).await,
            key: scoped("/gated", KEY),
            session: None,
            old_epochs: Vec::new(),
            incarnations: 0,
            calls: 0,
            readers: Vec::new(),
            log: String::new(),
            stats: Stats::default(),
        }
    }

    fn path(&self) -> String {
        format!("/gated?session_id={KEY}")
    }

    async fn get(&mut self, id: Option<&str>) -> SseConn {
        self.stats.requests += 1;
        get(self.app.addr, &self.path(), id).await
    }

    fn running(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.outcome.is_none())
    }

    /// Turns a position into the id a client would send, and the sequence number it names in
    /// the current incarnation (`None` for an id of another one).
    fn id(&self, pos: Pos) -> (String, Option<u64>) {
        let other = |n: u16| {
            let current = self.session.as_ref().map(|s| s.epoch);
            let epoch = match self.old_epochs.last() {
                Some(&e) if Some(e) != current => e,
                _ => {
                    // An epoch no incarnation had.
                    let raw = current.map_or(1, |e| e.raw() ^ 1);
                    Epoch::from_raw(raw)
                }
            };
            (
                EventId {
                    epoch,
                    seq: u64::from(n % 8),
                }
                .to_string(),
                None,
            )
        };
        let Some(s) = &self.session else {
            let n = match pos {
                Pos::Seq(n) | Pos::OtherEpoch(n) => n,
                Pos::BeyondHead => 1,
            };
            return other(n);
        };
        let seq = match pos {
            Pos::Seq(n) => u64::from(n) % (s.events + 1),
            Pos::BeyondHead => s.events + 1,
            Pos::OtherEpoch(n) => return other(n),
        };
        (
            EventId {
                epoch: s.epoch,
                seq,
            }
            .to_string(),
            Some(seq),
        )
    }

    /// Waits until the store's session satisfies `cond`.
    async fn wait_store(
        &self,
        what: &str,
        cond: impl Fn(Option<&resumable_sse::store::SessionInfo>) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + STALL;
        loop {
            let info = self
                .app
                .store
                .lookup(&self.key)
                .await
                .map_err(|e| format!("lookup failed: {e}"))?;
            if cond(info.as_ref()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{what}: not reached within {STALL:?}: {info:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads `n` events (or, when `to_end`, up to the end) and checks they are
    /// `from..from + n` of the current incarnation, and that the body then ends: aborted when
    /// the session failed (the layer's default), cleanly otherwise.
    async fn expect_events(
        &mut self,
        what: &str,
        conn: &mut SseConn,
        from: u64,
        n: u64,
        to_end: bool,
    ) -> Result<(), String> {
        self.stats.events += n;
        self.stats.ends += usize::from(to_end);
        let s = self.session.as_ref().expect("a session");
        let aborted = s.outcome == Some(Outcome::Failed);
        for i in 0..n {
            let seq = from + i;
            let ev = match tokio::time::timeout(STALL, conn.next()).await {
                Err(_) => {
                    return Err(format!(
                        "{what}: stalled after {i} of {n} events (expected seq {seq} next)"
                    ))
                }
                Ok(None) => {
                    return Err(format!(
                        "{what}: ended after {i} of {n} events (expected seq {seq} next; evicted {}, cut {})",
                        conn.evicted, conn.errored
                    ))
                }
                Ok(Some(ev)) => ev,
            };
            let want = EventId {
                epoch: s.epoch,
                seq,
            }
            .to_string();
            let want_data = data(s.incarnation, seq);
            if ev.id.as_deref() != Some(want.as_str()) || ev.data != want_data {
                return Err(format!(
                    "{what}: event {i} is {:?} {:?}, expected {want} {want_data:?}",
                    ev.id, ev.data
                ));
            }
        }
        if to_end {
            match tokio::time::timeout(STALL, conn.next()).await {
                Err(_) => return Err(format!("{what}: no end within {STALL:?} after {n} events")),
                Ok(Some(ev)) => {
                    return Err(format!("{what}: an event after the last: {ev:?}"));
                }
                Ok(None) if conn.evicted || conn.errored != aborted => {
                    return Err(format!(
                        "{what}: ended evicted {} / cut {} instead of {}",
                        conn.evicted,
                        conn.errored,
                        if aborted { "aborted" } else { "cleanly" }
                    ));
                }
                Ok(None) => {}
            }
        }
        Ok(())
    }

    fn expect_status(
        what: &str,
        conn: &SseConn,
        status: u16,
        reason: Option<&str>,
    ) -> Result<(), String> {
        conn.check_answer(what, status, reason)
    }

    /// A finished session is read only well inside its retention: past that point, the model
    /// lets it expire first, so that no answer depends on timing.
    async fn settle(&mut self) -> Result<(), String> {
        if let Some((asked, _)) = self.session.as_ref().and_then(|s| s.finished) {
            if Instant::now() + READ_BUDGET >= asked + RETENTION {
                self.log.push_str("  (expiring first)\n");
                self.expire().await?;
            }
        }
        Ok(())
    }

    async fn expire(&mut self) -> Result<(), String> {
        let Some((_, seen)) = self.session.as_ref().and_then(|s| s.finished) else {
            return Ok(());
        };
        tokio::time::sleep_until(seen + RETENTION + EXPIRY_MARGIN).await;
        let s = self.session.take().unwrap();
        self.old_epochs.push(s.epoch);
        self.stats.expiries += 1;
        self.wait_store("expiry", |info| info.is_none()).await
    }

    async fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.settle().await?;
        match *op {
            Op::Start if self.session.is_none() => {
                self.app.inner.gate(KEY);
                let conn = self.get(None).await;
                self.calls += 1;
                Self::expect_status("first request", &conn, 200, None)?;
                let info = self
                    .app
                    .store
                    .lookup(&self.key)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no session after the first request")?;
                if info.status != Status::Running || info.last_seq != 0 {
                    return Err(format!("after the first request: {info:?}"));
                }
                if self.old_epochs.contains(&info.epoch) {
                    return Err(format!("a new incarnation reuses {:?}", info.epoch));
                }
                self.session = Some(Session {
                    epoch: info.epoch,
                    incarnation: self.incarnations,
                    events: 0,
                    outcome: None,
                    finished: None,
                });
                self.incarnations += 1;
                self.stats.incarnations += 1;
                self.readers.push(Held { conn, cursor: 0 });
            }
            Op::Start => self.read(None, None).await?,
            Op::Append(n) => {
                if !self.running() {
                    return Ok(());
                }
                let s = self.session.as_mut().unwrap();
                for _ in 0..n {
                    s.events += 1;
                    self.app.inner.send(KEY, data(s.incarnation, s.events));
                }
                let want = s.events;
                self.wait_store("append", |info| info.is_some_and(|i| i.last_seq == want))
                    .await?;
            }
            Op::Read { at, cut } => self.read(at, cut).await?,
            Op::Open { at } => {
                let valid = matches!(at, None | Some(Pos::Seq(_)));
                if !self.running() || !valid {
                    return self.read(at, None).await;
                }
                let (id, seq) = match at {
                    Some(pos) => {
                        let (id, seq) = self.id(pos);
                        (Some(id), seq.unwrap())
                    }
                    None => (None, 0),
                };
                let conn = self.get(id.as_deref()).await;
                Self::expect_status("connected reader", &conn, 200, None)?;
                self.readers.push(Held { conn, cursor: seq });
            }
            Op::Take(j) => {
                if self.readers.is_empty() {
                    return Ok(());
                }
                let j = j % self.readers.len();
                let mut held = self.readers.remove(j);
                let events = self.session.as_ref().unwrap().events;
                let result = self
                    .expect_events(
                        "connected reader",
                        &mut held.conn,
                        held.cursor + 1,
                        events - held.cursor,
                        false,
                    )
                    .await;
                held.cursor = events;
                self.readers.insert(j, held);
                result?;
            }
            Op::Cut(j) => {
                if !self.readers.is_empty() {
                    let j = j % self.readers.len();
                    drop(self.readers.remove(j));
                }
            }
            Op::Finish(end) => self.finish(end).await?,
            Op::Expire => self.expire().await?,
        }
        if self.app.inner.calls() != self.calls {
            return Err(format!(
                "the inner service was called {} times, expected {}",
                self.app.inner.calls(),
                self.calls
            ));
        }
        Ok(())
    }

    async fn finish(&mut self, end: End) -> Result<(), String> {
        if !self.running() {
            if let End::Cancel = end {
                // Cancelling a finished or missing session does nothing.
                let cancelled = self
                    .app
                    .store
                    .cancel(&self.key)
                    .await
                    .map_err(|e| e.to_string())?;
                if cancelled {
                    return Err("cancel of a session that is not running returned true".into());
                }
            }
            return Ok(());
        }
        let asked = Instant::now();
        let outcome = match end {
            End::Complete => {
                self.app.inner.end(KEY);
                Outcome::Completed
            }
            End::Fail => {
                self.app.inner.fail(KEY);
                Outcome::Failed
            }
            End::Cancel => {
                let cancelled = self
                    .app
                    .store
                    .cancel(&self.key)
                    .await
                    .map_err(|e| e.to_string())?;
                if !cancelled {
                    return Err("cancel of a running session returned false".into());
                }
                Outcome::Cancelled
            }
        };
        let events = self.session.as_ref().unwrap().events;
        self.wait_store("finish", |info| {
            info.is_some_and(|i| i.status == Status::Finished(outcome) && i.last_seq == events)
        })
        .await?;
        let s = self.session.as_mut().unwrap();
        s.outcome = Some(outcome);
        s.finished = Some((asked, Instant::now()));
        // Every connected reader gets what it has not read yet, then the end.
        for (i, mut held) in std::mem::take(&mut self.readers).into_iter().enumerate() {
            let what = format!("connected reader {i} at the finish");
            self.expect_events(
                &what,
                &mut held.conn,
                held.cursor + 1,
                events - held.cursor,
                true,
            )
            .await?;
        }
        Ok(())
    }

    /// A request that reads `cut` events, or all it is owed, and drops.
    async fn read(&mut self, at: Option<Pos>, cut: Option<usize>) -> Result<(), String> {
        let (id, seq) = match at {
            Some(pos) => {
                let (id, seq) = self.id(pos);
                (Some(id), seq)
            }
            None => (None, Some(0)),
        };
        let what = format!("request with Last-Event-ID {id:?}");
        let mut conn = self.get(id.as_deref()).await;
        let Some(s) = &self.session else {
            if id.is_none() {
                // A new session is claimed; `/gated` has no gate for it: not an event stream,
                // passed through, the claim released.
                self.calls += 1;
                return Self::expect_status(&what, &conn, 404, None);
            }
            return Self::expect_status(&what, &conn, 410, Some("unknown-session"));
        };
        let Some(after) = seq else {
            return Self::expect_status(&what, &conn, 410, Some("foreign-epoch"));
        };
        if after > s.events {
            return Self::expect_status(&what, &conn, 400, Some("beyond-head"));
        }
        if let Some(outcome) = s.outcome {
            if after == s.events {
                return Self::expect_status(&what, &conn, 204, Some(outcome.reason().as_str()));
            }
        }
        Self::expect_status(&what, &conn, 200, None)?;
        let owed = s.events - after;
        let take = cut.map_or(owed, |c| owed.min(c as u64));
        let to_end = s.outcome.is_some() && take == owed;
        self.expect_events(&what, &mut conn, after + 1, take, to_end)
            .await
    }
}

async fn run<St: Store>(store: St, ops: Vec<Op>) -> Result<Stats, String> {
    let mut model = Model::new(store).await;
    for (i, op) in ops.iter().enumerate() {
        let _ = writeln!(model.log, "{i}: {op:?}");
        let result = tokio::time::timeout(OP_DEADLINE, model.apply(op))
            .await
            .unwrap_or_else(|_| Err(format!("not done within {OP_DEADLINE:?}")));
        if let Err(e) = result {
            return Err(format!("op {i} ({op:?}): {e}\nops:\n{}", model.log));
        }
    }
    // Whatever the sequence left running ends, and its connected readers with it.
    model
        .finish(End::Complete)
        .await
        .map_err(|e| format!("final finish: {e}\nops:\n{}", model.log))?;
    Ok(model.stats)
}

fn check<St, F, Fut>(make_store: F)
where
    St: Store,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = St>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = Config {
        cases: CASES,
        max_shrink_iters: 64,
        max_shrink_time: 60_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let total = std::sync::Mutex::new(Stats::default());
    let started = std::time::Instant::now();
    let result = runner.run(&ops(), |ops| {
        rt.block_on(async {
            let store = make_store().await;
            let stats = tokio::time::timeout(CASE_DEADLINE, run(store, ops))
                .await
                .unwrap_or_else(|_| Err(format!("case not done within {CASE_DEADLINE:?}")))
                .map_err(TestCaseError::fail)?;
            *total.lock().unwrap() += stats;
            Ok(())
        })
    });
    eprintln!(
        "{CASES} cases in {:?}: {:?}",
        started.elapsed(),
        total.lock().unwrap()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn the_memory_store_answers_every_request_as_the_model_predicts() {
    check(|| async { MemoryStore::builder().retention(RETENTION).build() });
}

#[cfg(feature = "redis")]
#[test]
fn the_redis_store_answers_every_request_as_the_model_predicts() {
    use common::redis::{shared_url, unique_prefix};
    use resumable_sse::RedisStore;

    // Prints a loud SKIP line when there is no server (and fails under CI=true).
    let Some(url) = shared_url() else {
        return;
    };
    check(|| {
        let url = url.clone();
        async move {
            RedisStore::builder(url)
                .prefix(unique_prefix())
                .retention(RETENTION)
                .connect()
                .await
                .expect("connect to redis")
        }
    });
}
