//! No Redis call above the documented size, whatever the size of the events: each test runs its
//! own `redis-server` configured to refuse anything larger (`proto-max-bulk-len`,
//! `client-query-buffer-limit`, `client-output-buffer-limit`), so a request or a reply above the
//! bound breaks the connection, and the test checks Redis's own figures (`INFO`) afterwards.
//!
//! The bound ([`REDIS_MAX_EVENT_BYTES`], 4 MiB): one event at most that size, and
//! [`APPEND_BYTES`] and [`REDIS_READ_BYTES`] for the batches of smaller ones.
#![cfg(feature = "redis")]

mod common;

use common::redis::{cli, unique_prefix, RedisCluster, RedisServer};
use common::*;
use resumable_sse::limits::{
    APPEND_BYTES, DEFAULT_MAX_EVENT_SIZE, REDIS_MAX_EVENT_BYTES, REDIS_READ_BYTES,
};
use resumable_sse::store::{Status, Store};
use resumable_sse::{Outcome, RedisStore};

/// What a call may carry besides its events: the script's hash, the key names, the offsets.
const OVERHEAD: usize = 64 << 10;

/// The settings that make Redis refuse any bulk argument above the largest event, any request
/// above it plus [`OVERHEAD`], and drop a client whose replies queue above that.
fn strict_settings() -> [(&'static str, String); 3] {
    let call = (REDIS_MAX_EVENT_BYTES + OVERHEAD).to_string();
    [
        ("proto-max-bulk-len", REDIS_MAX_EVENT_BYTES.to_string()),
        ("client-query-buffer-limit", call.clone()),
        ("client-output-buffer-limit", format!("normal {call} 0 0")),
    ]
}

/// A Redis of the test's own with [`strict_settings`]: one server, or a three-master Cluster.
enum Strict {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Strict {
    fn start(cluster: bool) -> Option<Self> {
        if !common::redis::have_redis_server() {
            common::redis::skip_or_fail("redis-server is not installed");
            return None;
        }
        let settings = strict_settings();
        if cluster {
            let c = RedisCluster::start();
            for node in c.live() {
                for (name, value) in &settings {
                    let out = cli(node.port, &["config", "set", name, value]);
                    assert!(out.contains("OK"), "CONFIG SET {name}: {out}");
                }
            }
            Some(Strict::Cluster(c))
        } else {
            let args: Vec<String> = settings
                .iter()
                .flat_map(|(name, value)| [format!("--{name}"), value.clone()])
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Some(Strict::Single(RedisServer::start_on(None, &args)))
        }
    }

    fn urls(&self) -> Vec<String> {
        match self {
            Strict::Single(s) => vec![s.url()],
            Strict::Cluster(c) => c.urls(),
        }
    }

    async fn store(&self) -> RedisStore {
        let builder = match self {
            Strict::Single(s) => RedisStore::builder(s.url()),
            Strict::Cluster(c) => RedisStore::cluster_builder(c.urls()),
        };
        builder
            .prefix(unique_prefix())
            .connect()
            .await
            .expect("connect to redis")
    }
}

/// Asserts two lists of event data are equal without printing megabytes of them.
fn same(got: &[String], want: &[String], what: &str) {
    let first_difference = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        got == want,
        "{what}: {} events, {} expected, first difference at {first_difference:?}",
        got.len(),
        want.len()
    );
}

/// Connections of the test's own, one per node, for Redis's own figures.
struct Admin(Vec<::redis::aio::MultiplexedConnection>);

impl Admin {
    async fn new(redis: &Strict) -> Self {
        let mut conns = Vec::new();
        for url in redis.urls() {
            let conn = ::redis::Client::open(url)
                .expect("a client")
                .get_multiplexed_async_connection()
                .await
                .expect("a connection");
            conns.push(conn);
        }
        Admin(conns)
    }

    /// `field` of `INFO section` on every node, 0 where absent (an error kind never seen).
    async fn info(&mut self, section: &str, field: &str) -> Vec<u64> {
        let mut out = Vec::new();
        for conn in &mut self.0 {
            let text: String = ::redis::cmd("INFO")
                .arg(section)
                .query_async(conn)
                .await
                .expect("INFO");
            out.push(
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{field}:")))
                    .map(|v| {
                        let v = v.trim();
                        let v = v.strip_prefix("count=").unwrap_or(v);
                        v.parse()
                            .unwrap_or_else(|e| panic!("INFO {field}: {v}: {e}"))
                    })
                    .unwrap_or(0),
            );
        }
        out
    }

    /// Connections accepted and `ERR` replies (a protocol error among them) so far, on every
    /// node: a call above the bound breaks its connection, so the store reconnects; a script
    /// missing from the cache (`NOSCRIPT`, on a first call) is not trouble.
    async fn trouble(&mut self) -> (Vec<u64>, Vec<u64>) {
        (
            self.info("stats", "total_connections_received").await,
            self.info("errorstats", "errorstat_ERR").await,
        )
    }
}

async fn events_of_the_largest_default_size_go_through_calls_no_larger_than_the_bound(
    cluster: bool,
) {
    let Some(redis) = Strict::start(cluster) else {
        return;
    };
    // With the layer's defaults: events of 1 MiB (the default largest), encoded.
    let app = serve_with(redis.store().await, |l| l).await;
    let mut admin = Admin::new(&redis).await;
    let before = admin.trouble().await;
    let n = 2 * REDIS_MAX_EVENT_BYTES / DEFAULT_MAX_EVENT_SIZE + 1;
    let path = format!("/sized?session_id=mib&n={n}&bytes={DEFAULT_MAX_EVENT_SIZE}");
    let live = get(app.addr, &path, None).await.collect().await;
    assert_eq!(live.len(), n);
    // A replay from the start reads them back page by page.
    let replay = get(app.addr, &path, live[0].id.as_deref())
        .await
        .collect()
        .await;
    assert_eq!(replay.len(), n - 1);
    let want: Vec<String> = (0..n)
        .map(|i| sized_data(i, DEFAULT_MAX_EVENT_SIZE))
        .collect();
    same(&datas(&live), &want, "live");
    same(&datas(&replay), &want[1..], "replay");
    assert_eq!(admin.trouble().await, before, "no call was refused");
    // Redis's own peaks, on top of the limits it enforced.
    for field in [
        "client_recent_max_input_buffer",
        "client_recent_max_output_buffer",
    ] {
        for peak in admin.info("clients", field).await {
            assert!(
                peak as usize <= REDIS_MAX_EVENT_BYTES + OVERHEAD,
                "{field}: {peak}"
            );
        }
    }
    assert_eq!(app.inner.calls(), 1);
}

/// One event of `size` encoded bytes between two small ones, with the layer's own limit out of
/// the way: the store's bound alone decides.
async fn one_event_of(app: &App<RedisStore>, key: &str, size: usize) -> (Vec<Ev>, bool) {
    app.inner.gate(key);
    let mut conn = get(app.addr, &format!("/gated?session_id={key}"), None).await;
    app.inner.send(key, sized_data(0, 64));
    app.inner.send(key, sized_data(1, size));
    app.inner.send(key, sized_data(2, 64));
    app.inner.end(key);
    let evs = conn.collect().await;
    (evs, conn.errored)
}

async fn an_event_at_the_bound_is_kept_and_a_larger_one_fails_its_session_without_reaching_redis(
    cluster: bool,
) {
    let Some(redis) = Strict::start(cluster) else {
        return;
    };
    let app = serve_with(redis.store().await, |l| {
        l.max_event_size(4 * REDIS_MAX_EVENT_BYTES)
    })
    .await;
    let mut admin = Admin::new(&redis).await;
    let n = REDIS_MAX_EVENT_BYTES;
    for (case, size) in [
        ("the smallest", 64),
        ("n - 1", n - 1),
        ("n", n),
        ("n + 1", n + 1),
        ("2n", 2 * n),
        // Four times the bound: 16 MiB.
        ("4n", 4 * n),
    ] {
        let before = admin.trouble().await;
        let key = format!("big{size}");
        let (evs, errored) = one_event_of(&app, &key, size).await;
        let session = scoped("/gated", &key);
        let info = session_finished(&app.store, &session).await;
        if size <= n {
            let want = [sized_data(0, 64), sized_data(1, size), sized_data(2, 64)];
            same(&datas(&evs), &want, case);
            assert!(!errored, "{case}");
            assert_eq!(info.status, Status::Finished(Outcome::Completed), "{case}");
            // And read back whole from Redis.
            let replay = get(
                app.addr,
                &format!("/gated?session_id={key}"),
                evs[0].id.as_deref(),
            )
            .await
            .collect()
            .await;
            same(&datas(&replay), &want[1..], case);
        } else {
            // The event before it is kept and sent; the session fails there, and its stream is
            // aborted, as any failed session's.
            same(&datas(&evs), &[sized_data(0, 64)], case);
            assert!(errored, "{case}: a failed session aborts its stream");
            assert_eq!(info.status, Status::Finished(Outcome::Failed), "{case}");
            assert_eq!(info.last_seq, 1, "{case}: nothing of it stored");
            let again = get(
                app.addr,
                &format!("/gated?session_id={key}"),
                evs[0].id.as_deref(),
            )
            .await;
            again
                .check_answer(case, 204, Some("failed"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(admin.trouble().await, before, "{case}: no call was refused");
    }
}

async fn a_page_of_events_just_under_the_read_budget_stays_under_it(cluster: bool) {
    // Events that fill a read page to just below its budget, then one that would take it past:
    // that one waits for the next page, so no reply holds more than the budget or one chunk.
    let Some(redis) = Strict::start(cluster) else {
        return;
    };
    let store = redis.store().await;
    let app = serve_with(store.clone(), |l| {
        l.max_event_size(2 * REDIS_MAX_EVENT_BYTES)
    })
    .await;
    let mut admin = Admin::new(&redis).await;
    let before = admin.trouble().await;
    let key = "pages";
    app.inner.gate(key);
    let mut conn = get(app.addr, &format!("/gated?session_id={key}"), None).await;
    // A read budget's worth of large events then one at the bound, repeated.
    let big = APPEND_BYTES / 2;
    let mut sent = Vec::new();
    for round in 0..3 {
        for _ in 0..(REDIS_READ_BYTES / big) {
            sent.push(sized_data(sent.len(), big - 1));
        }
        sent.push(sized_data(sent.len(), REDIS_MAX_EVENT_BYTES - round));
    }
    for data in &sent {
        app.inner.send(key, data.clone());
    }
    app.inner.end(key);
    let live = conn.collect().await;
    same(&datas(&live), &sent, "live");
    let session = scoped("/gated", key);
    session_finished(&store, &session).await;
    // Read back through the store, from every position of the first round.
    for after in 0..=(REDIS_READ_BYTES / big + 1) as u64 {
        let mut got = Vec::new();
        let mut pos = after;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let batch = store
                .read(&session, store_epoch(&store, &session).await, pos, 1024)
                .await
                .expect("read")
                .expect("the session");
            let bytes: usize = batch.blocks.iter().map(|b| b.bytes().len()).sum();
            let events: usize = batch.blocks.iter().map(|b| b.len()).sum();
            assert!(
                events == 1 || bytes <= REDIS_READ_BYTES,
                "a page of {events} events and {bytes} bytes after {pos}"
            );
            for b in &batch.blocks {
                got.extend(b.iter().map(|(seq, _)| seq));
            }
            if batch.reaches_end(pos) || events == 0 {
                break;
            }
            pos = *got.last().expect("events");
            assert!(tokio::time::Instant::now() < deadline, "read did not end");
        }
        let expected: Vec<u64> = (after + 1..=sent.len() as u64).collect();
        assert_eq!(got, expected, "after {after}");
    }
    assert_eq!(admin.trouble().await, before, "no call was refused");
}

async fn store_epoch(store: &RedisStore, key: &resumable_sse::SessionKey) -> resumable_sse::Epoch {
    store
        .lookup(key)
        .await
        .expect("lookup")
        .expect("the session")
        .epoch
}

#[tokio::test]
async fn events_of_the_largest_default_size_go_through_calls_no_larger_than_the_bound_on_one_redis()
{
    events_of_the_largest_default_size_go_through_calls_no_larger_than_the_bound(false).await;
}

#[tokio::test]
async fn events_of_the_largest_default_size_go_through_calls_no_larger_than_the_bound_on_a_cluster()
{
    events_of_the_largest_default_size_go_through_calls_no_larger_than_the_bound(true).await;
}

#[tokio::test]
async fn an_event_at_the_bound_is_kept_and_a_larger_one_fails_its_session_without_reaching_redis_on_one_redis(
) {
    an_event_at_the_bound_is_kept_and_a_larger_one_fails_its_session_without_reaching_redis(false)
        .await;
}

#[tokio::test]
async fn an_event_at_the_bound_is_kept_and_a_larger_one_fails_its_session_without_reaching_redis_on_a_cluster(
) {
    an_event_at_the_bound_is_kept_and_a_larger_one_fails_its_session_without_reaching_redis(true)
        .await;
}

#[tokio::test]
async fn a_page_of_events_just_under_the_read_budget_stays_under_it_on_one_redis() {
    a_page_of_events_just_under_the_read_budget_stays_under_it(false).await;
}

#[tokio::test]
async fn a_page_of_events_just_under_the_read_budget_stays_under_it_on_a_cluster() {
    a_page_of_events_just_under_the_read_budget_stays_under_it(true).await;
}
