//! The `chat`, `hyper` and `tonic` examples, run as the programs a person or a tool would start, and
//! checked over HTTP against the routes their docs promise.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use common::child::Server;
use common::{datas, expected_tokens, get, Ev, TIMEOUT};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Builds an example (a no-op when `cargo test` already did) and returns its executable.
fn example(name: &'static str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(n, _)| *n == name) {
        return path.clone();
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    // The same features and profile as this test, so that the build is the one cargo already made.
    if cfg!(feature = "redis") {
        cmd.args(["--features", "redis"]);
    }
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cargo runs");
    assert!(out.status.success(), "cargo build --example {name} failed");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == name
                && msg["executable"].is_string()
        })
        .map(|msg| PathBuf::from(msg["executable"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("cargo did not name the executable of example {name}"));
    built.push((name, path.clone()));
    path
}

/// Starts an example (`--listen 127.0.0.1:0`, then `args`), killed when dropped.
fn start(name: &'static str, args: &[&str]) -> Server {
    Server::start(name, example(name), args)
}

/// Starts the `chat` example.
fn chat(args: &[&str]) -> Server {
    start("chat", args)
}

/// A plain request; returns the status, the headers and the whole body as text.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (http::StatusCode, http::HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(ct) = content_type {
        req = req.header(http::header::CONTENT_TYPE, ct);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let res = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .expect("response in time")
        .expect("request succeeds");
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("body in time")
        .expect("body reads")
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn get_text(addr: SocketAddr, path: &str) -> String {
    let (status, _, body) = request(addr, "GET", path, None, "").await;
    assert_eq!(status, 200, "GET {path}");
    body
}

async fn post_json(addr: SocketAddr, path: &str) -> (http::StatusCode, Value) {
    let (status, _, body) = request(addr, "POST", path, None, "").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The message events' data, and whether a final `done` event came.
fn answer_of(evs: &[Ev]) -> (String, bool) {
    let text = evs
        .iter()
        .filter(|e| e.event.is_none())
        .map(|e| e.data.as_str())
        .collect();
    let done = evs
        .last()
        .is_some_and(|e| e.event.as_deref() == Some("done"));
    (text, done)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn id_of(ev: &Ev) -> &str {
    ev.id.as_deref().expect("an event id")
}

#[tokio::test]
async fn tokens_route_is_numbered_and_resumes_exactly_once() {
    let server = chat(&[]);
    let addr = server.addr;

    let mut all = get(addr, "/chat?session_id=t1&tokens=50&interval_ms=0", None).await;
    assert_eq!(all.status, 200);
    let evs = all.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..50));
    assert!(evs.iter().all(|e| e.id.is_some() && e.event.is_none()));
    let mut ids: Vec<&str> = evs.iter().map(id_of).collect();
    ids.dedup();
    assert_eq!(ids.len(), 50, "every event has an id of its own");

    // Drop after 10 events while the session runs, then reconnect with Last-Event-ID.
    let path = "/chat?session_id=t2&tokens=50&interval_ms=10";
    let mut first = get(addr, path, None).await;
    let head = first.take(10).await;
    drop(first);
    assert_eq!(datas(&head), expected_tokens(0..10));
    let mut rest = get(addr, path, Some(id_of(&head[9]))).await;
    assert_eq!(rest.status, 200);
    let tail = rest.collect().await;
    assert_eq!(datas(&tail), expected_tokens(10..50));

    // A reconnect after the end is told that the session is done.
    let end = get(addr, path, Some(id_of(tail.last().unwrap()))).await;
    assert_eq!(end.status, 204);
    assert_eq!(end.reason(), Some("completed"));
}

#[tokio::test]
async fn bare_mode_serves_the_same_tokens_without_the_layer() {
    let server = chat(&["--bare"]);
    let path = "/chat?session_id=b1&tokens=50&interval_ms=0";
    let evs = get(server.addr, path, None).await.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..50));
    assert!(
        evs.iter().all(|e| e.id.is_none()),
        "no ids without the layer"
    );
    // Nothing is resumed: the same request generates again, Last-Event-ID or not.
    let again = get(server.addr, path, Some("000000000001-9")).await;
    assert_eq!(again.reason(), None);
    let mut again = again;
    assert_eq!(datas(&again.collect().await), expected_tokens(0..50));
}

#[tokio::test]
async fn prompt_answer_adds_up_to_the_published_text() {
    let server = chat(&[]);
    let addr = server.addr;
    let expected = get_text(addr, "/answer?prompt=why%20is%20the%20sky%20blue").await;
    assert!(expected.contains("why is the sky blue"));
    let words = expected.split(' ').count();
    assert!((60..=80).contains(&words), "{words} words");

    let path = "/chat?session_id=p1&prompt=why+is+the+sky+blue&interval_ms=2";
    let mut conn = get(addr, path, None).await;
    let evs = conn.collect().await;
    assert_eq!(evs.len(), words + 1);
    assert_eq!(answer_of(&evs), (expected.clone(), true));
    assert_eq!(evs.last().unwrap().data, "[DONE]");

    // The page's refresh: the same URL without Last-Event-ID replays from the start.
    let replay = get(addr, path, None).await.collect().await;
    assert_eq!(replay, evs);

    let (status, _, html) = request(addr, "GET", "/", None, "").await;
    assert_eq!(status, 200);
    assert!(html.contains("EventSource") && html.contains("drop connection"));
}

#[tokio::test]
async fn drop_ends_only_the_named_clients_connection() {
    let server = chat(&[]);
    let addr = server.addr;
    let expected = get_text(addr, "/answer?prompt=tides").await;
    let path =
        |client: &str| format!("/chat?session_id=d1&prompt=tides&interval_ms=25&client={client}");

    let mut a = get(addr, &path("a"), None).await;
    let mut b = get(addr, &path("b"), None).await;
    let mut got_a = a.take(3).await;
    let mut got_b = b.take(3).await;

    let (status, body) = post_json(addr, "/drop?session_id=d1&client=a").await;
    assert_eq!(status, 200);
    assert_eq!(body["dropped"], 1);
    // a's response ends soon (after at most the events already on their way); b's goes on.
    while let Some(ev) = a.next().await {
        got_a.push(ev);
    }
    assert!(!answer_of(&got_a).1, "a was cut before the end");
    got_b.extend(b.take(3).await);

    // a reconnects as EventSource would, and misses nothing.
    let mut a = get(addr, &path("a"), Some(id_of(got_a.last().unwrap()))).await;
    got_a.extend(a.collect().await);
    got_b.extend(b.collect().await);
    assert_eq!(answer_of(&got_a), (expected.clone(), true));
    assert_eq!(answer_of(&got_b), (expected, true));

    // Nothing is left registered for a finished session.
    let (_, body) = post_json(addr, "/drop?session_id=d1").await;
    assert_eq!(body["dropped"], 0);
}

#[tokio::test]
async fn cancel_stops_the_session() {
    let server = chat(&[]);
    let addr = server.addr;
    let path = "/chat?session_id=c1&prompt=stop+me&interval_ms=50";
    let mut conn = get(addr, path, None).await;
    let mut got = conn.take(3).await;
    let status = get_text(addr, "/session?session_id=c1").await;
    assert!(status.contains("\"running\""), "{status}");

    let (status, _) = post_json(addr, "/cancel?session_id=c1").await;
    assert_eq!(status, 204);
    got.extend(conn.collect().await);
    let (text, done) = answer_of(&got);
    assert!(!done);
    let expected = get_text(addr, "/answer?prompt=stop+me").await;
    assert!(expected.starts_with(&text) && text.len() < expected.len());

    let again = get(addr, path, Some(id_of(got.last().unwrap()))).await;
    assert_eq!(
        (again.status.as_u16(), again.reason()),
        (204, Some("cancelled"))
    );
    let status: Value =
        serde_json::from_str(&get_text(addr, "/session?session_id=c1").await).unwrap();
    assert_eq!(status["status"], "cancelled");
    let (status, _) = post_json(addr, "/cancel?session_id=c1").await;
    assert_eq!(status, 404);
    let (status, _, _) = request(addr, "GET", "/session?session_id=never", None, "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn metrics_are_listed_and_count_sessions() {
    let server = chat(&[]);
    let addr = server.addr;
    let names = [
        "resumable_sse_sessions_started_total",
        "resumable_sse_sessions_completed_total",
        "resumable_sse_sessions_failed_total",
        "resumable_sse_sessions_cancelled_total",
        "resumable_sse_sessions_active",
        "resumable_sse_clients_connected",
        "resumable_sse_replays_total",
        "resumable_sse_events_stored_total",
        "resumable_sse_store_errors_total",
        "resumable_sse_readers_evicted_total",
    ];
    let before = get_text(addr, "/metrics").await;
    for name in names {
        assert_eq!(
            metric(&before, name),
            Some(0.0),
            "{name} listed at zero:\n{before}"
        );
    }

    let path = "/chat?session_id=m1&tokens=20";
    let evs = get(addr, path, None).await.collect().await;
    let replay = get(addr, path, Some(id_of(&evs[4]))).await.collect().await;
    assert_eq!(replay.len(), 15);

    let after = get_text(addr, "/metrics").await;
    assert!(
        metric(&after, "resumable_sse_sessions_started_total") >= Some(1.0),
        "{after}"
    );
    assert!(metric(&after, "resumable_sse_sessions_completed_total") >= Some(1.0));
    assert!(metric(&after, "resumable_sse_events_stored_total") >= Some(20.0));
    assert!(metric(&after, "resumable_sse_replays_total") >= Some(1.0));
    for name in names {
        assert!(metric(&after, name).is_some(), "{name}");
    }
}

#[tokio::test]
async fn api_chat_posts_a_prompt_then_streams_and_resumes() {
    let server = chat(&[]);
    let addr = server.addr;
    let expected = get_text(addr, "/answer?prompt=hello%20there").await;

    let (status, _, body) = request(
        addr,
        "POST",
        "/api/chat",
        Some("application/json"),
        r#"{"prompt": "hello there"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");

    // The first GET starts the answer; cut it short, then resume with Last-Event-ID.
    let stream = format!("/api/chat/{id}/stream?interval_ms=10");
    let mut first = get(addr, &stream, None).await;
    assert_eq!(first.status, 200);
    let mut got = first.take(5).await;
    drop(first);
    let mut rest = get(addr, &stream, Some(id_of(&got[4]))).await;
    got.extend(rest.collect().await);
    assert_eq!(answer_of(&got), (expected.clone(), true));

    // A later GET without Last-Event-ID replays the same events.
    let replay = get(addr, &stream, None).await.collect().await;
    assert_eq!(replay, got);

    // The session lives in the same store as the page's.
    let status = get_text(addr, &format!("/session?session_id={id}")).await;
    assert!(status.contains("\"completed\""), "{status}");

    // Plain text and AI SDK message lists are prompts too.
    let (_, _, body) = request(addr, "POST", "/api/chat", Some("text/plain"), "hello there").await;
    let id2 = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(id2, id);
    let evs = get(addr, &format!("/api/chat/{id2}/stream?interval_ms=0"), None)
        .await
        .collect()
        .await;
    assert_eq!(answer_of(&evs), (expected.clone(), true));
    let messages = r#"{"messages": [{"role": "user", "content": "no"},
        {"role": "assistant", "content": "?"},
        {"role": "user", "parts": [{"type": "text", "text": "hello there"}]}]}"#;
    let (_, _, body) = request(
        addr,
        "POST",
        "/api/chat",
        Some("application/json"),
        messages,
    )
    .await;
    let id3 = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let evs = get(addr, &format!("/api/chat/{id3}/stream?interval_ms=0"), None)
        .await
        .collect()
        .await;
    assert_eq!(answer_of(&evs), (expected, true));

    let unknown = get(addr, "/api/chat/nope/stream", None).await;
    assert_eq!(unknown.status, 404);
    let (status, _, _) = request(addr, "POST", "/api/chat", Some("application/json"), "{").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn redis_flag_without_support_is_a_clear_error() {
    if cfg!(feature = "redis") {
        return;
    }
    let out = Command::new(example("chat"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis",
            "redis://127.0.0.1:6379",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("this build has no Redis support; rebuild with --features redis"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}

#[tokio::test]
async fn hyper_example_resumes() {
    let server = start("hyper", &[]);
    let path = "/events?session_id=h1&tokens=30&interval_ms=5";
    let mut first = get(server.addr, path, None).await;
    let head = first.take(7).await;
    drop(first);
    let tail = get(server.addr, path, Some(id_of(&head[6])))
        .await
        .collect()
        .await;
    assert_eq!(datas(&tail), expected_tokens(7..30));
    let end = get(server.addr, path, Some(id_of(tail.last().unwrap()))).await;
    assert_eq!(
        (end.status.as_u16(), end.reason()),
        (204, Some("completed"))
    );
}

#[cfg(feature = "redis")]
mod with_redis {
    use std::time::Duration;

    use super::*;
    use common::redis::shared_url;

    #[tokio::test]
    async fn two_chat_instances_share_one_redis() {
        let Some(url) = shared_url() else { return };
        let a = start("chat", &["--redis", &url]);
        let b = start("chat", &["--redis", &url]);
        let path = "/chat?session_id=shared-two&tokens=200&interval_ms=2";
        let mut got: Vec<Ev> = Vec::new();
        let mut conn = get(a.addr, path, None).await;
        for (i, n) in [15, 40, 7, 60].into_iter().enumerate() {
            got.extend(conn.take(n).await);
            drop(conn);
            let addr = if i % 2 == 0 { b.addr } else { a.addr };
            conn = get(addr, path, Some(id_of(got.last().unwrap()))).await;
            assert_eq!(conn.status, 200);
        }
        got.extend(conn.collect().await);
        assert_eq!(datas(&got), expected_tokens(0..200));
        let end = get(b.addr, path, Some(id_of(got.last().unwrap()))).await;
        assert_eq!(
            (end.status.as_u16(), end.reason()),
            (204, Some("completed"))
        );
    }

    #[tokio::test]
    async fn killing_the_producing_instance_ends_followers_within_the_lease() {
        let Some(url) = shared_url() else { return };
        let lease = Duration::from_millis(1000);
        let mut producer = start("chat", &["--redis", &url, "--lease-ms", "1000"]);
        let follower = start("chat", &["--redis", &url, "--lease-ms", "1000"]);
        let path = "/chat?session_id=crash-child&tokens=10000&interval_ms=20";
        let mut first = get(producer.addr, path, None).await;
        first.take(3).await;
        // A client follows the same session through the other instance.
        let mut conn = get(follower.addr, path, None).await;
        let got = conn.take(5).await;
        assert_eq!(datas(&got), expected_tokens(0..5));
        // SIGKILL: no chance to clean up; only the lease tells.
        producer.child.kill().unwrap();
        producer.child.wait().unwrap();
        let killed = std::time::Instant::now();
        let rest = conn.collect().await;
        let took = killed.elapsed();
        assert!(
            took <= lease + Duration::from_millis(1000) + Duration::from_millis(250),
            "the follower ended {took:?} after the crash (lease {lease:?})"
        );
        // Everything stored before the crash arrived, in order, then the end.
        let all: Vec<Ev> = got.into_iter().chain(rest).collect();
        assert_eq!(datas(&all), expected_tokens(0..all.len()));
        assert!(all.len() < 10000);
        // Reconnects learn that the session failed; nothing is generated again.
        let again = get(follower.addr, path, Some(id_of(all.last().unwrap()))).await;
        assert_eq!(
            (again.status.as_u16(), again.reason()),
            (204, Some("failed"))
        );
        let fresh = get(follower.addr, path, None).await.collect().await;
        assert_eq!(datas(&fresh), datas(&all), "a replay, not a new generation");
    }
}

/// The `tonic` example as its docs start it: its gRPC health service answers a real tonic
/// client through the layer, and its SSE route resumes after `Last-Event-ID`.
#[tokio::test]
async fn the_tonic_example_answers_grpc_and_resumes_its_sse_route() {
    use tonic::transport::Channel;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let server = start("tonic", &[]);
    let endpoint = Channel::from_shared(format!("http://{}", server.addr)).expect("a URI");
    let channel = tokio::time::timeout(TIMEOUT, endpoint.connect())
        .await
        .expect("connected in time")
        .expect("connected");
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    let answer = tokio::time::timeout(TIMEOUT, check)
        .await
        .expect("an answer in time")
        .expect("grpc-status 0");
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);

    let path = "/events?session_id=demo&n=6&interval_ms=20";
    let mut first = get(server.addr, path, None).await;
    let head = first.take(2).await;
    drop(first);
    let rest = get(server.addr, path, head[1].id.as_deref())
        .await
        .collect()
        .await;
    let ticks: Vec<String> = (0..6).map(|i| format!("tick {i}")).collect();
    assert_eq!(datas(&head), ticks[..2]);
    assert_eq!(datas(&rest), ticks[2..], "the rest, once");
}
