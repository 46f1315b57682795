//! Connections cut at random points, through a proxy, in front of one instance and in front of
//! two instances sharing one Redis; and a slow client next to a fast producer.
//!
//! The proxy prints its seed (`CHAOS_SEED=...`); run with that variable set to replay the same
//! cut offsets.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::routing;
use axum::Router;
use futures_util::stream::{self, Stream};
use resumable_sse::store::{Status, Store};
use resumable_sse::{EventId, MemoryStore, Outcome, ResumableSseLayer, SessionKey};

use common::chaos_proxy::{self, ChaosProxy};
use common::*;

/// The tests here load both cores: they run one at a time, so that timings mean something.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENTS: usize = 100;
const EVENTS: usize = 500;
/// Server bytes a connection may carry before the proxy cuts it. The smallest is above the size
/// of any response head, so every cut falls in a body; the largest is well below the ~22 KB of a
/// whole stream of `EVENTS` events, so every client is cut several times.
const CUT_AFTER: std::ops::Range<usize> = 300..4_000;

/// What one client saw while following its session through the proxy.
struct Followed {
    key: String,
    events: Vec<Ev>,
    /// Requests after the first one.
    reconnects: usize,
    /// Connections that ended before the client had every event.
    cut_short: usize,
    /// Requests whose connection closed before a response head arrived. The proxy never cuts
    /// that early, so each one is the server dropping a request unanswered.
    unanswered: usize,
    /// The status and reason of the last answer.
    last_answer: (http::StatusCode, Option<String>),
}

/// Follows one session through `proxy`, reconnecting with `Last-Event-ID` (the id of the last
/// complete event received) until the layer answers something else than `200`.
async fn follow(proxy: SocketAddr, key: String, interval_ms: u64) -> Followed {
    let path = format!("/tokens?session_id={key}&n={EVENTS}&interval_ms={interval_ms}");
    let mut events: Vec<Ev> = Vec::new();
    let mut requests = 0;
    let mut cut_short = 0;
    let mut unanswered = 0;
    loop {
        assert!(requests < 1_000, "{key}: no end after {requests} requests");
        let last = events.last().and_then(|e| e.id.clone());
        // Unlike the harness's `get`, a request that gets no response head is counted, not a
        // panic, so that the test can say what happened.
        let conn = request(proxy, &path, last.as_deref(), &[]).await;
        requests += 1;
        let Ok(mut conn) = conn else {
            unanswered += 1;
            continue;
        };
        if conn.status != http::StatusCode::OK {
            return Followed {
                key,
                events,
                reconnects: requests - 1,
                cut_short,
                unanswered,
                last_answer: (conn.status, conn.reason().map(str::to_owned)),
            };
        }
        // A cut shows up as the body ending (or failing) early; a partial event is dropped.
        while let Some(ev) = conn.next().await {
            events.push(ev);
        }
        if events.len() < EVENTS {
            cut_short += 1;
        }
    }
}

fn seq_of(ev: &Ev) -> u64 {
    EventId::parse(ev.id.as_deref().expect("every event has an id").as_bytes())
        .expect("ids are the layer's")
        .seq
}

/// Runs `CLIENTS` clients through `proxy` and checks everything each one received.
async fn run_clients_through_cuts<St: Store>(
    proxy: &ChaosProxy,
    stores: &[&St],
    interval_ms: u64,
) -> Vec<Followed> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(follow(proxy.addr, format!("chaos-{i}"), interval_ms)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("client task"));
    }
    eprintln!(
        "{CLIENTS} clients x {EVENTS} events in {:?}: {} connections, {} cut, {} closed unanswered, {} bytes (seed {})",
        started.elapsed(),
        proxy.connections(),
        proxy.cuts(),
        proxy.silent_closes(),
        proxy.bytes_down(),
        proxy.seed,
    );
    let expected = expected_tokens(0..EVENTS);
    for f in &all {
        let seed = proxy.seed;
        let ctx = format!("{} (CHAOS_SEED={seed})", f.key);
        // Every stream completes, and the final reconnect is told so.
        assert_eq!(
            f.last_answer,
            (http::StatusCode::NO_CONTENT, Some("completed".to_owned())),
            "{ctx}"
        );
        // No duplicate, no gap: the data is exactly token 0..EVENTS-1, the ids exactly 1..=EVENTS.
        assert_eq!(datas(&f.events), expected, "{ctx}");
        assert!(f.events.iter().all(|e| e.event.is_none()), "{ctx}");
        let seqs: Vec<u64> = f.events.iter().map(seq_of).collect();
        assert_eq!(seqs, (1..=EVENTS as u64).collect::<Vec<_>>(), "{ctx}");
        assert!(
            f.cut_short >= 3 && f.reconnects >= 3,
            "{ctx}: cut {} times, reconnected {} times",
            f.cut_short,
            f.reconnects
        );
        let key = scoped("/tokens", &f.key);
        for store in stores {
            let info = store.lookup(&key).await.unwrap().expect("session retained");
            assert_eq!(info.status, Status::Finished(Outcome::Completed), "{ctx}");
            assert_eq!(info.last_seq, EVENTS as u64, "{ctx}");
        }
    }
    // The proxy never cuts before the end of a response head: a connection closed without any
    // answer was closed by the server.
    let unanswered: usize = all.iter().map(|f| f.unanswered).sum();
    assert_eq!(
        (unanswered, proxy.silent_closes()),
        (0, 0),
        "requests the server closed without any answer (CHAOS_SEED={})",
        proxy.seed
    );
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_resume_without_loss_or_duplicates_on_one_instance() {
    let _serial = SERIAL.lock().await;
    let app = serve_with(MemoryStore::new(), |l| l).await;
    let seed = chaos_proxy::seed("one instance");
    let proxy = ChaosProxy::start(vec![app.addr], seed, CUT_AFTER).await;
    run_clients_through_cuts(&proxy, &[&app.store], 1).await;
    assert_eq!(
        app.inner.calls(),
        CLIENTS,
        "the inner service runs once per session"
    );
    assert!(proxy.cuts() >= 3 * CLIENTS);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_alternating_between_two_instances_on_one_redis_resume_without_loss_or_duplicates(
) {
    use common::redis::{shared_url, unique_prefix};
    use resumable_sse::RedisStore;

    let _serial = SERIAL.lock().await;
    let Some(url) = shared_url() else { return };
    let prefix = unique_prefix();
    let connect = || async {
        RedisStore::builder(url.clone())
            .prefix(prefix.clone())
            .connect()
            .await
            .expect("connect to redis")
    };
    let a = serve_with(connect().await, |l| l).await;
    let b = serve_with(connect().await, |l| l).await;
    let seed = chaos_proxy::seed("two instances");
    let proxy = ChaosProxy::start(vec![a.addr, b.addr], seed, CUT_AFTER).await;
    // Both instances see every session the same way.
    run_clients_through_cuts(&proxy, &[&a.store, &b.store], 1).await;
    assert_eq!(
        a.inner.calls() + b.inner.calls(),
        CLIENTS,
        "the inner service runs once per session, across instances"
    );
    assert!(
        a.inner.calls() > 0 && b.inner.calls() > 0,
        "both instances served first requests"
    );
}

// ---------------------------------------------------------------------------------------------
// A slow client next to a fast producer.

const BURST_EVENTS: usize = 30_000;
/// Events per millisecond: 10,000 per second, so production takes about three seconds.
const PER_MS: usize = 10;

/// `GET /burst`: `BURST_EVENTS` events `token 0`.., `PER_MS` every millisecond.
async fn burst(
    State(calls): State<Arc<AtomicUsize>>,
    Query(_): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    calls.fetch_add(1, Ordering::SeqCst);
    let tick = tokio::time::interval(Duration::from_millis(1));
    Sse::new(stream::unfold((0usize, tick), |(i, mut tick)| async move {
        if i == BURST_EVENTS {
            return None;
        }
        if i % PER_MS == 0 {
            tick.tick().await;
        }
        let ev = Event::default().data(format!("token {i}"));
        Some((Ok(ev), (i + 1, tick)))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_one_event_per_second_delays_neither_the_producer_nor_fast_clients() {
    let _serial = SERIAL.lock().await;
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/burst", routing::get(burst))
        .with_state(calls.clone())
        .layer(ResumableSseLayer::new(store.clone()));
    let addr = serve_router(app).await;
    let path = "/burst?session_id=burst";
    let key = scoped("/burst", "burst");
    let started = Instant::now();

    // The slow client: one event, then one per second while the session runs, then the rest.
    let mut slow = get(addr, path, None).await;
    assert_eq!(slow.status, 200);
    let running = Arc::new(AtomicBool::new(true));
    let read_while_running = Arc::new(AtomicUsize::new(0));
    let slow = tokio::spawn({
        let (running, read) = (running.clone(), read_while_running.clone());
        async move {
            let mut got = vec![slow.next().await.expect("first event")];
            read.store(1, Ordering::SeqCst);
            while running.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if running.load(Ordering::SeqCst) {
                    got.push(slow.next().await.expect("an event"));
                    read.store(got.len(), Ordering::SeqCst);
                }
            }
            // It speeds up.
            got.extend(slow.collect().await);
            got
        }
    });
    // Fast clients on the same session, joining while it runs.
    let fast: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(addr, path, None).await.collect().await }))
        .collect();

    // The producer finishes on time, whatever the slow client does.
    let finished = loop {
        let info = store.lookup(&key).await.unwrap().expect("session exists");
        if info.status.is_finished() {
            assert_eq!(info.status, Status::Finished(Outcome::Completed));
            assert_eq!(info.last_seq, BURST_EVENTS as u64);
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "producer not done"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let slow_had = read_while_running.load(Ordering::SeqCst);
    running.store(false, Ordering::SeqCst);
    let nominal = Duration::from_millis((BURST_EVENTS / PER_MS) as u64);
    eprintln!("produced {BURST_EVENTS} events in {finished:?} (nominal {nominal:?}); the slow client had read {slow_had}");
    assert!(
        finished < nominal * 2,
        "production took {finished:?}, nominal {nominal:?}"
    );
    // One event at the start and about one per second since.
    assert!(
        slow_had <= 2 + finished.as_secs() as usize,
        "the slow client read {slow_had} events"
    );

    let expected = expected_tokens(0..BURST_EVENTS);
    for f in fast {
        assert_eq!(datas(&f.await.unwrap()), expected, "a fast client");
    }
    // Everything was retained (default limits), so the slow client gets it all, in order.
    let slow = slow.await.unwrap();
    assert_eq!(datas(&slow), expected, "the slow client");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A reader's `read` is dropped mid-flight when its client disconnects. The Redis store shares
/// one fetch of a session's tail among the readers of a process; the next reader must get the
/// events, not an error left over from the abandoned fetch.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_redis_read_joining_a_tail_fetch_abandoned_by_a_disconnected_reader_succeeds() {
    use common::redis::{shared_url, unique_prefix};
    use futures_util::FutureExt;
    use resumable_sse::store::{Claim, EventBlock, ResponseHead};
    use resumable_sse::RedisStore;

    let _serial = SERIAL.lock().await;
    let Some(url) = shared_url() else { return };
    let store = RedisStore::builder(url)
        .prefix(unique_prefix())
        .connect()
        .await
        .expect("connect to redis");
    let key = SessionKey::new("abandoned").unwrap();
    let Claim::Claimed(epoch) = store.claim(&key, Duration::from_secs(60)).await.unwrap() else {
        panic!("a fresh key is claimable");
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "text/event-stream".parse().unwrap());
    let head = ResponseHead {
        status: http::StatusCode::OK,
        headers,
    };
    store.start(&key, epoch, head).await.unwrap();
    let mut builder = resumable_sse::store::EventBlockBuilder::new(1);
    for seq in 1..=3 {
        builder.push_with(|buf| {
            buf.extend_from_slice(format!("id: x-{seq}\ndata: {seq}\n\n").as_bytes())
        });
    }
    let events: Vec<EventBlock> = builder.finish().into_iter().collect();
    store.append(&key, epoch, &events).await.unwrap();
    // A connected client: the process now shares one tail fetch among its readers.
    let _subscription = store.subscribe(&key, epoch).await.unwrap();
    // The command connection is busy ...
    let busy: Vec<_> = (0..500)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { store.lookup(&key).await.unwrap() })
        })
        .collect();
    tokio::task::yield_now().await;
    // ... when a reader starts a read and its client goes away (its body, and the read with it,
    // is dropped after one poll).
    assert!(store.read(&key, epoch, 0, 256).now_or_never().is_none());
    for b in busy {
        b.await.unwrap();
    }
    // Longer than the store's response timeout, with nobody waiting on that read.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let batch = store
        .read(&key, epoch, 0, 256)
        .await
        .expect("the next reader's read succeeds")
        .expect("the session exists");
    assert_eq!(batch.blocks, events);
}
