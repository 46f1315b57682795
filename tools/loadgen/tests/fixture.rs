//! The fixture server run as the load tool runs it, and checked over HTTP against the routes its
//! docs promise: `stamp`, and `broadcast` in bare mode.

// The repository's shared test helpers (SSE reader, `TIMEOUT`, child servers).
#[path = "../../../tests/common/mod.rs"]
mod common;

use common::child::Server;
use common::{datas, expected_tokens, get, Ev};

/// Starts the fixture (`--listen 127.0.0.1:0`, then `args`), killed when dropped.
fn start(args: &[&str]) -> Server {
    Server::start("fixture", env!("CARGO_BIN_EXE_fixture"), args)
}

/// `token N` of an event whose data is `token N @STAMP`.
fn token_of(ev: &Ev) -> &str {
    ev.data.split_once(" @").expect("a stamped token").0
}

fn stamp_of(ev: &Ev) -> u64 {
    let stamp = ev.data.split_once(" @").expect("a stamped token").1;
    stamp.parse().expect("microseconds")
}

#[tokio::test]
async fn stamped_tokens_carry_the_time_they_were_made_through_the_layer() {
    let server = start(&[]);
    let path = "/chat?session_id=st1&tokens=20&interval_ms=2&stamp=1";
    let evs = get(server.addr, path, None).await.collect().await;
    let tokens: Vec<&str> = evs.iter().map(token_of).collect();
    assert_eq!(tokens, expected_tokens(0..20));
    assert!(evs.iter().all(|e| e.id.is_some()), "the layer numbers them");
    let stamps: Vec<u64> = evs.iter().map(stamp_of).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
    // A replay gives the very events, stamps and all.
    let again = get(server.addr, path, None).await.collect().await;
    assert_eq!(again, evs);
    // Without `tokens` there is nothing to serve.
    let none = get(server.addr, "/chat?session_id=st2", None).await;
    assert_eq!(none.status, 400);
}

#[tokio::test]
async fn bare_broadcast_connections_share_one_generator() {
    let server = start(&["--bare"]);
    let addr = server.addr;
    let path = "/chat?session_id=bc1&tokens=300&interval_ms=10&stamp=1&broadcast=1";
    let mut first = get(addr, path, None).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.headers[http::header::CONTENT_TYPE],
        "text/event-stream"
    );
    let head = first.take(20).await;
    // The second connection joins mid-stream; its own parameters are not used.
    let late = "/chat?session_id=bc1&tokens=5&interval_ms=1000&broadcast=1";
    let mut second = get(addr, late, None).await;
    assert_eq!(second.status, 200);
    let joined = second.collect().await;
    let all: Vec<Ev> = head.into_iter().chain(first.collect().await).collect();

    let tokens: Vec<&str> = all.iter().map(token_of).collect();
    assert_eq!(
        tokens,
        expected_tokens(0..300),
        "the first connection gets every event"
    );
    assert!(all.iter().all(|e| e.id.is_none() && e.event.is_none()));
    // The later one gets the events made after it joined, in order, and each is the very event
    // the first one got, stamp and all: one generator made them.
    assert!(
        !joined.is_empty() && joined.len() <= 280,
        "{} events after joining",
        joined.len()
    );
    assert_eq!(joined, all[300 - joined.len()..]);
    let stamps: Vec<u64> = all.iter().map(stamp_of).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]));

    // The session is forgotten when its generator ends: the next request starts another.
    let again = get(addr, "/chat?session_id=bc1&tokens=3&broadcast=1", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&again), expected_tokens(0..3));
    // Another session has a generator of its own.
    let other = get(addr, "/chat?session_id=bc2&tokens=4&broadcast=1", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&other), expected_tokens(0..4));
    let unkeyed = get(addr, "/chat?tokens=3&broadcast=1", None).await;
    assert_eq!(unkeyed.status, 400, "broadcast=1 needs a session_id");
}

#[tokio::test]
async fn layer_ignores_broadcast() {
    let server = start(&[]);
    let addr = server.addr;
    let path = "/chat?session_id=lb1&tokens=50&interval_ms=5&broadcast=1";
    let mut first = get(addr, path, None).await;
    let head = first.take(10).await;
    assert_eq!(datas(&head), expected_tokens(0..10));
    // A second request replays the session from the start, as without `broadcast`.
    let second = get(addr, path, None).await.collect().await;
    assert_eq!(datas(&second), expected_tokens(0..50));
    assert!(second.iter().all(|e| e.id.is_some()));
    let rest = first.collect().await;
    assert_eq!(rest, second[10..]);
    // Without a session the answer is streamed, not refused.
    let mut unkeyed = get(addr, "/chat?tokens=3&broadcast=1", None).await;
    assert_eq!(unkeyed.status, 200);
    assert_eq!(datas(&unkeyed.collect().await), expected_tokens(0..3));
}

#[tokio::test]
async fn drop_ends_the_open_responses_of_a_session_as_in_the_chat_example() {
    let server = start(&[]);
    let addr = server.addr;
    let mut open = get(addr, "/chat?session_id=d1&tokens=1000&interval_ms=20", None).await;
    assert_eq!(datas(&open.take(2).await), expected_tokens(0..2));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{addr}/drop?session_id=d1"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = client.request(req).await.expect("request succeeds");
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], br#"{"dropped":1}"#);
    // The response ends cleanly, long before its 1,000 events.
    let rest = open.collect().await;
    assert!(rest.len() < 100, "{} events after the drop", rest.len());
}
