//! A process's memory returns to its baseline once its sessions are over and expired: through
//! the layer over real TCP, rounds of sessions run to their end, are read by a client and
//! expire; the resident memory after a second round is that after the first (the first warms
//! the allocator's arenas up), and nothing is left of them in the store or the fan-out. In a
//! test binary of its own, one test at a time, so that no other test's allocations are counted.
#![cfg(target_os = "linux")]

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use resumable_sse::store::Store;
use resumable_sse::{MemoryStore, ResumableSseLayer};
use tokio::sync::Mutex;

use common::*;

/// Held by each test: the tests of this binary measure the whole process, so they run alone.
static ALONE: Mutex<()> = Mutex::const_new(());

/// Sessions per round.
const SESSIONS: usize = 10_000;
/// Sessions run at once (each a connection of the client's pool).
const CONCURRENT: usize = 64;
/// Events per session, and the bytes of each as the layer encodes it.
const EVENTS: usize = 4;
const EVENT_BYTES: usize = 1024;
/// How long a finished session stays resumable.
const RETENTION: Duration = Duration::from_secs(1);

/// The process's resident memory, in pages, from `/proc/self/statm`.
fn resident_pages() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("the resident pages in /proc/self/statm")
}

/// Hands the memory the allocator keeps free back to the system, so that what is measured is
/// what the process still uses rather than where glibc's arenas happen to stand.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: glibc's malloc_trim takes no pointer and may be called at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The resident memory once it has stopped moving: sampled every 50 ms, after the allocator's
/// free memory went back to the system, until two samples are within 1% (or [`TIMEOUT`]
/// passes).
async fn settled_pages() -> usize {
    release_free_memory();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut last = resident_pages();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        release_free_memory();
        let now = resident_pages();
        if now.abs_diff(last) <= last / 100 || tokio::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Runs `SESSIONS` sessions of `round` to their end, `CONCURRENT` at a time, each read whole by
/// a client over a pooled connection; returns once every response has ended.
async fn run_round(addr: std::net::SocketAddr, round: &str) {
    let client = client();
    let expected: Vec<String> = (0..EVENTS).map(|i| sized_data(i, EVENT_BYTES)).collect();
    let sessions = stream::iter(0..SESSIONS)
        .map(|i| {
            let client = client.clone();
            let expected = &expected;
            async move {
                let uri = format!(
                    "http://{addr}/sized?n={EVENTS}&bytes={EVENT_BYTES}&session_id={round}-{i}"
                );
                let res = tokio::time::timeout(TIMEOUT, client.get(uri.parse().expect("a URI")))
                    .await
                    .unwrap_or_else(|_| panic!("session {round}-{i}: no answer in time"))
                    .unwrap_or_else(|e| panic!("session {round}-{i}: {e}"));
                let mut conn = SseConn::new(res);
                assert_eq!(conn.status, 200, "session {round}-{i}");
                assert_eq!(
                    &datas(&conn.collect().await),
                    expected,
                    "session {round}-{i}"
                );
            }
        })
        .buffer_unordered(CONCURRENT);
    tokio::time::timeout(TIMEOUT * 6, sessions.collect::<Vec<()>>())
        .await
        .expect("a round of sessions in time");
    // The pool's idle connections close with the client.
    drop(client);
}

/// Two rounds of sessions through `layer`'s app, each followed by their expiry (`expired`: the
/// store holds none of them any more); the resident memory after the second is within 10% of
/// that after the first.
async fn memory_returns_after_expiry<St, F, Fut>(store: St, expired: F)
where
    St: Store,
    F: Fn(St) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut kept = None;
    let app = serve_with(store.clone(), |l: ResumableSseLayer<St>| {
        kept = Some(l.clone());
        l
    })
    .await;
    let layer = kept.expect("the layer");
    let started = Instant::now();
    let mut after = Vec::new();
    for round in ["warm-up", "second"] {
        run_round(app.addr, round).await;
        let peak = resident_pages();
        eventually_async("the round's sessions expire from the store", || {
            expired(store.clone())
        })
        .await;
        eventually("the fan-out forgets the round's sessions", || {
            layer.fanout_sessions() == 0
        })
        .await;
        let settled = settled_pages().await;
        eprintln!(
            "{round}: {peak} resident pages with the round's sessions, {settled} once they expired ({:?} in)",
            started.elapsed()
        );
        after.push(settled);
    }
    let (rss0, rss1) = (after[0], after[1]);
    assert!(
        rss1.abs_diff(rss0) <= rss0 / 10,
        "resident memory after the second round: {rss1} pages, after the first: {rss0}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_its_baseline_after_sessions_expire_on_the_memory_store() {
    let _alone = ALONE.lock().await;
    let store = MemoryStore::builder()
        .retention(RETENTION)
        // Room for both rounds: a store that kept expired sessions fails on what it holds, not
        // by refusing new ones.
        .max_sessions(3 * SESSIONS)
        .build();
    memory_returns_after_expiry(store, |store: MemoryStore| async move {
        // A store operation sweeps the expired sessions (at most once per second).
        let probe = resumable_sse::SessionKey::new("probe").expect("a key");
        let _ = store.lookup(&probe).await;
        store.is_empty()
    })
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_its_baseline_after_sessions_expire_on_the_redis_store() {
    use common::redis::{have_redis_server, skip_or_fail, unique_prefix, RedisServer};
    use resumable_sse::RedisStore;

    let _alone = ALONE.lock().await;
    if !have_redis_server() {
        skip_or_fail("redis-server is not on PATH");
        return;
    }
    let server = RedisServer::start_on(None, &[]);
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix())
        .retention(RETENTION)
        .connect()
        .await
        .expect("connect to redis");
    let client = ::redis::Client::open(server.url()).expect("a Redis URL");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to redis");
    memory_returns_after_expiry(store, move |_| {
        let mut conn = conn.clone();
        async move {
            // The server of this test holds the store's keys only: the sessions' and the count
            // of live sessions, which goes with its last member.
            let keys: usize = ::redis::cmd("DBSIZE")
                .query_async(&mut conn)
                .await
                .expect("DBSIZE");
            keys == 0
        }
    })
    .await;
}
