//! The layer as an application meets it: which requests it takes (methods, `Accept`, the key
//! space of each route), the `Sessions` handle a stop button uses, how a stream tells its client
//! how the session ended, the shutdown recipe, and what the logs say. Over real TCP, with axum.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::{self, post};
use axum::Router;
use bytes::Bytes;
use common::*;
use futures_util::stream;
use http_body_util::{BodyExt, Empty};
use resumable_sse::store::Status;
use resumable_sse::{
    FromPath, KeyScope, MemoryStore, Outcome, ResumableSseLayer, SessionKey, Sessions,
};

/// An event's id.
fn id(ev: &Ev) -> &str {
    ev.id.as_deref().expect("an id")
}

/// Sends `method path` with `headers`; the status, the reason header and the whole body.
async fn send(
    addr: std::net::SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, Bytes) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let run = async {
        let res = client()
            .request(req.body(Empty::new()).unwrap())
            .await
            .expect("an answer");
        let status = res.status();
        let reason = res
            .headers()
            .get("resumable-sse-reason")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = res.into_body().collect().await.expect("a body").to_bytes();
        (status, reason, body)
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .expect("answered in time")
}

/// The common routes plus `POST /tokens` (answers `posted`) behind the default layer.
async fn serve_with_post(layer: ResumableSseLayer<MemoryStore>) -> App {
    let inner = Inner::default();
    let app = routes(inner.clone())
        .route("/tokens", post(|| async { "posted" }))
        .layer(layer);
    App {
        addr: serve_router(app).await,
        inner,
        store: MemoryStore::new(),
    }
}

#[tokio::test]
async fn other_methods_pass_through_untouched_whatever_keys_they_carry() {
    let app = serve_with_post(ResumableSseLayer::new(MemoryStore::new())).await;
    let evs = get(app.addr, "/tokens?session_id=s1&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    // The same URL with POST: the handler answers, not a replay of the session.
    let (status, reason, body) = send(
        app.addr,
        http::Method::POST,
        "/tokens?session_id=s1",
        &[("last-event-id", id(&evs[0]))],
    )
    .await;
    assert_eq!(
        (status, reason, &body[..]),
        (StatusCode::OK, None, &b"posted"[..])
    );
    // A key the layer would refuse is none of its business on a method it does not resume.
    let long = "k".repeat(resumable_sse::MAX_SESSION_KEY_LEN + 1);
    let path = format!("/tokens?session_id={long}");
    let (status, reason, body) = send(app.addr, http::Method::POST, &path, &[]).await;
    assert_eq!(
        (status, reason, &body[..]),
        (StatusCode::OK, None, &b"posted"[..])
    );
    // With POST among the methods, the layer takes it: the same POST is now a replay.
    let app = serve_with_post(
        ResumableSseLayer::new(MemoryStore::new()).methods([http::Method::GET, http::Method::POST]),
    )
    .await;
    let evs = get(app.addr, "/tokens?session_id=s2&n=3", None)
        .await
        .collect()
        .await;
    let (status, _, body) = send(
        app.addr,
        http::Method::POST,
        "/tokens?session_id=s2",
        &[("last-event-id", id(&evs[0]))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(datas(&parse_events(&body)), expected_tokens(1..3));
}

#[tokio::test]
async fn the_same_key_on_two_routes_is_two_sessions_by_default() {
    let app = serve().await;
    let evs = get(app.addr, "/tokens?session_id=f1&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    // The JSON route with the same key: its handler answers.
    let (status, reason, body) =
        send(app.addr, http::Method::GET, "/json?session_id=f1", &[]).await;
    assert_eq!((status, reason), (StatusCode::OK, None));
    assert_eq!(&body[..], br#"{"plain":"json"}"#);
    // Another event-stream route with the same key: a session of its own.
    let sized = get(app.addr, "/sized?session_id=f1&n=2&bytes=64", None)
        .await
        .collect()
        .await;
    assert_eq!(sized.len(), 2);
    assert_ne!(sized[0].data, evs[0].data);
    assert_eq!(app.inner.calls(), 3, "three handlers ran");
    // Each route replays its own.
    let again = get(app.addr, "/tokens?session_id=f1", Some(id(&evs[0])))
        .await
        .collect()
        .await;
    assert_eq!(datas(&again), expected_tokens(1..3));
    // A path longer than the scope limit is an invalid key; one at the limit is not.
    let max = resumable_sse::limits::MAX_SCOPE_LEN;
    let cases = [
        (1, StatusCode::NOT_FOUND),
        (max - 1, StatusCode::NOT_FOUND),
        (max, StatusCode::NOT_FOUND),
        (max + 1, StatusCode::BAD_REQUEST),
        (2 * max, StatusCode::BAD_REQUEST),
    ];
    for (len, status) in cases {
        let path = format!("/{}?session_id=x", "p".repeat(len - 1));
        let (got, _, _) = send(app.addr, http::Method::GET, &path, &[]).await;
        assert_eq!(got, status, "a path of {len} bytes");
    }
}

#[tokio::test]
async fn a_shared_key_scope_makes_one_session_of_every_route() {
    let app = serve_with(MemoryStore::new(), |l| l.key_scope(KeyScope::Shared)).await;
    let evs = get(app.addr, "/tokens?session_id=k&n=3", None)
        .await
        .collect()
        .await;
    let other = get(app.addr, "/sized?session_id=k", Some(id(&evs[0])))
        .await
        .collect()
        .await;
    assert_eq!(
        datas(&other),
        expected_tokens(1..3),
        "the /tokens session, replayed"
    );
    assert_eq!(app.inner.calls(), 1);
    let info = app
        .store
        .lookup_key("k")
        .await
        .expect("stored under the bare key");
    assert_eq!(info.last_seq, 3);
}

#[tokio::test]
async fn a_request_that_does_not_accept_an_event_stream_is_never_answered_with_a_replay() {
    let app = serve().await;
    let evs = get(app.addr, "/tokens?session_id=a&n=3", None)
        .await
        .collect()
        .await;
    let json_only = [
        ("accept", "application/json"),
        ("last-event-id", id(&evs[0])),
    ];
    let (status, reason, body) = send(
        app.addr,
        http::Method::GET,
        "/tokens?session_id=a&n=1",
        &json_only,
    )
    .await;
    assert_eq!((status, reason), (StatusCode::OK, None));
    // The handler answered afresh (one event, its own ids), not the layer.
    let evs = parse_events(&body);
    assert_eq!(datas(&evs), expected_tokens(0..1));
    assert_eq!(id(&evs[0]), "inner-0");
    assert_eq!(app.inner.calls(), 2);
    // What EventSource and fetch send is taken.
    for accept in [
        "text/event-stream",
        "*/*",
        "text/*",
        "application/json, text/event-stream;q=0.9",
    ] {
        let conn = request(
            app.addr,
            "/tokens?session_id=a",
            None,
            &[("accept", accept)],
        )
        .await
        .unwrap();
        assert_eq!(conn.status, StatusCode::OK, "{accept}");
        assert_eq!(app.inner.calls(), 2, "{accept}: a replay");
    }
}

#[tokio::test]
async fn head_answers_from_an_existing_session_and_never_starts_one() {
    let app = serve().await;
    // No session: the handler answers (axum runs the GET handler for HEAD), and nothing is
    // stored, so a GET afterwards starts the session.
    let (status, _, body) = send(
        app.addr,
        http::Method::HEAD,
        "/tokens?session_id=h&n=3",
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert!(
        app.store.lookup_key("/tokens h").await.is_none(),
        "HEAD started nothing"
    );
    let evs = get(app.addr, "/tokens?session_id=h&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    let calls = app.inner.calls();
    // A session: its head, as a GET would get it, without a body; no handler runs.
    let (status, _, body) = send(app.addr, http::Method::HEAD, "/tokens?session_id=h", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    let last = id(evs.last().unwrap());
    let (status, reason, _) = send(
        app.addr,
        http::Method::HEAD,
        "/tokens?session_id=h",
        &[("last-event-id", last)],
    )
    .await;
    assert_eq!(
        (status, reason.as_deref()),
        (StatusCode::NO_CONTENT, Some("completed"))
    );
    assert_eq!(app.inner.calls(), calls);
}

/// `/chat/{id}`: a stream of numbered events, 20 ms apart, until it is dropped (`GET`), and its
/// stop button (`DELETE`), which cancels through the layer's handle; `POST /stop/{id}` stops it
/// from another route.
async fn serve_chat(store: MemoryStore) -> (App, Sessions<MemoryStore, FromPath>) {
    async fn stop(
        State(sessions): State<Sessions<MemoryStore, FromPath>>,
        req: Request,
    ) -> StatusCode {
        let (parts, _) = req.into_parts();
        match sessions.cancel_request(&parts).await {
            Ok(true) => StatusCode::NO_CONTENT,
            Ok(false) => StatusCode::NOT_FOUND,
            Err(e) => e.status(),
        }
    }
    async fn stop_elsewhere(
        State(sessions): State<Sessions<MemoryStore, FromPath>>,
        axum::extract::Path(id): axum::extract::Path<String>,
    ) -> StatusCode {
        // The stream's route as requests have it (percent-encoded), and the decoded id.
        let route = format!("/chat/{}", id.replace(' ', "%20"));
        let Ok(key) = sessions.key_at(&route, &id) else {
            return StatusCode::BAD_REQUEST;
        };
        match sessions.cancel(&key).await {
            Ok(true) => StatusCode::NO_CONTENT,
            Ok(false) => StatusCode::NOT_FOUND,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    let inner = Inner::default();
    let counts = inner.clone();
    let stream = move || {
        let inner = counts.clone();
        async move {
            inner.count_call();
            let guard = inner.generator_guard();
            Sse::new(stream::unfold((0u64, guard), |(i, guard)| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ev = Event::default().data(i.to_string());
                Some((Ok::<_, Infallible>(ev), (i + 1, guard)))
            }))
        }
    };
    let layer = ResumableSseLayer::new(store.clone()).session_key(FromPath::segment(1));
    let sessions = layer.sessions();
    let app = Router::new()
        .route("/chat/{id}", routing::get(stream).delete(stop))
        .route("/stop/{id}", post(stop_elsewhere))
        .with_state(sessions.clone())
        .layer(layer);
    let addr = serve_router(app).await;
    (App { addr, inner, store }, sessions)
}

#[tokio::test]
async fn a_stop_button_on_the_streams_own_url_cancels_through_the_sessions_handle() {
    let (app, sessions) = serve_chat(MemoryStore::new()).await;
    // A percent-encoded id: the stream and its stop button name the same session.
    let mut conn = get(app.addr, "/chat/my%20chat", None).await;
    let first = conn.take(2).await;
    let (status, _, _) = send(app.addr, http::Method::DELETE, "/chat/my%20chat", &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The generation stops, the stream ends cleanly, and the session says cancelled.
    let rest = conn.collect().await;
    assert!(!conn.errored, "a cancelled session's stream ends cleanly");
    eventually("the generator is dropped", || {
        app.inner.generators_dropped() == 1
    })
    .await;
    let key = sessions
        .key(
            &http::Request::get("/chat/my%20chat")
                .body(())
                .unwrap()
                .into_parts()
                .0,
        )
        .unwrap()
        .unwrap();
    let info = sessions.status(&key).await.unwrap().expect("the session");
    assert_eq!(info.status, Status::Finished(Outcome::Cancelled));
    assert_eq!(info.last_seq as usize, first.len() + rest.len());
    // A second stop finds nothing running; a stop without a key is a bad request.
    let (status, _, _) = send(app.addr, http::Method::DELETE, "/chat/my%20chat", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // From another route, by route and id.
    let mut other = get(app.addr, "/chat/other%20one", None).await;
    other.take(1).await;
    let (status, _, _) = send(app.addr, http::Method::POST, "/stop/other%20one", &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    other.collect().await;
    assert!(!other.errored);
}

#[tokio::test]
async fn the_end_event_names_the_outcome_for_live_and_resumed_clients() {
    let app = serve_with(MemoryStore::new(), |l| l.end_event("end")).await;
    let evs = get(app.addr, "/tokens?session_id=e&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(evs.len(), 4);
    assert_eq!(datas(&evs[..3]), expected_tokens(0..3));
    let end = &evs[3];
    assert_eq!(
        (end.event.as_deref(), end.data.as_str()),
        (Some("end"), "completed")
    );
    assert_eq!(end.id, evs[2].id, "the end carries the last event's id");
    // A resumed client gets the rest, then the same end.
    let resumed = get(app.addr, "/tokens?session_id=e", Some(id(&evs[0])))
        .await
        .collect()
        .await;
    assert_eq!(resumed.len(), 3);
    assert_eq!(&resumed[2], end);
    // A reconnect after the end is told the outcome.
    let after = answer(app.addr, "/tokens?session_id=e", Some(id(end))).await;
    assert_eq!(
        (after.status, after.reason.as_deref()),
        (StatusCode::NO_CONTENT, Some("completed"))
    );
    // Failed and cancelled sessions say so.
    app.inner.gate("f");
    let mut conn = get(app.addr, "/gated?session_id=f", None).await;
    app.inner.send("f", "one");
    app.inner.fail("f");
    let evs = conn.collect().await;
    assert_eq!(
        evs.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["one", "failed"]
    );
    assert_eq!(evs[1].event.as_deref(), Some("end"));
    assert!(conn.errored, "and the connection is aborted");
}

#[tokio::test]
async fn a_failed_session_aborts_its_connections_by_default_and_ends_them_cleanly_when_asked() {
    for abort in [true, false] {
        let app = serve_with(MemoryStore::new(), |l| l.abort_on_failure(abort)).await;
        app.inner.gate("g");
        let mut live = get(app.addr, "/gated?session_id=g", None).await;
        app.inner.send("g", "one");
        app.inner.send("g", "two");
        let first = live.take(1).await;
        app.inner.fail("g");
        let rest = live.collect().await;
        assert_eq!(datas(&rest), ["two"]);
        assert_eq!(live.errored, abort, "live, abort_on_failure({abort})");
        // A resumed client: the rest, then the same ending.
        let mut resumed = get(app.addr, "/gated?session_id=g", Some(id(&first[0]))).await;
        assert_eq!(datas(&resumed.collect().await), ["two"]);
        assert_eq!(resumed.errored, abort, "resumed, abort_on_failure({abort})");
    }
    // A completed session is never aborted.
    let app = serve().await;
    let mut conn = get(app.addr, "/tokens?session_id=ok&n=2", None).await;
    assert_eq!(conn.collect().await.len(), 2);
    assert!(!conn.errored);
}

#[tokio::test]
async fn the_shutdown_recipe_drains_first_then_the_server_closes() {
    const DEADLINE: Duration = Duration::from_millis(1500);
    let inner = Inner::default();
    let layer = ResumableSseLayer::new(MemoryStore::new());
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = layer.drain_handle().on_signal(
        async {
            let _ = signal_rx.await;
        },
        DEADLINE,
    );
    let app = routes(inner.clone()).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    // A generation that would never end by itself.
    inner.gate("long");
    let mut conn = get(addr, "/gated?session_id=long", None).await;
    inner.send("long", "one");
    let first = conn.take(1).await;
    let signalled = tokio::time::Instant::now();
    signal_tx.send(()).unwrap();
    // While draining: new sessions are told to go elsewhere, reconnects are served.
    eventually_async("new sessions are refused with 503 draining", || async {
        let a = answer(addr, "/tokens?session_id=new&n=1", None).await;
        a.status == StatusCode::SERVICE_UNAVAILABLE && a.reason.as_deref() == Some("draining")
    })
    .await;
    let resumed = get(addr, "/gated?session_id=long", Some(id(&first[0]))).await;
    assert_eq!(
        resumed.status,
        StatusCode::OK,
        "a reconnect is served while draining"
    );
    drop(resumed);
    // At the deadline the session ends (failed: its connection is aborted) and the server
    // closes.
    conn.collect().await;
    assert!(conn.errored);
    let closed = tokio::time::timeout(DEADLINE + TIMEOUT, server).await;
    assert!(closed.is_ok(), "the server closed");
    assert!(
        signalled.elapsed() < DEADLINE + Duration::from_secs(5),
        "closed {:?} after the signal",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn log_lines_name_the_session_by_digest_and_epoch_never_by_its_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = serve().await;
    let secret = "secret-key-1234";
    let evs = get(app.addr, &format!("/tokens?session_id={secret}&n=2"), None)
        .await
        .collect()
        .await;
    get(
        app.addr,
        &format!("/tokens?session_id={secret}"),
        Some(id(&evs[0])),
    )
    .await
    .collect()
    .await;
    eventually("the end is logged", || {
        captured.text().contains("session ended")
    })
    .await;
    let logs = captured.text();
    let digest = SessionKey::new(format!("/tokens {secret}"))
        .unwrap()
        .digest()
        .to_string();
    let epoch = id(&evs[0]).split('-').next().unwrap();
    for what in [
        "session started",
        "serving a session",
        "stream reached the end",
        "session ended",
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{logs}"));
        assert!(line.contains(&format!("key={digest}")), "{what}: {line}");
        assert!(line.contains(&format!("epoch={epoch}")), "{what}: {line}");
    }
    assert!(
        !logs.contains(secret),
        "the key itself is never logged:\n{logs}"
    );
}

/// Looks a session up by its stored key.
trait LookupKey {
    async fn lookup_key(&self, key: &str) -> Option<resumable_sse::store::SessionInfo>;
}

impl LookupKey for MemoryStore {
    async fn lookup_key(&self, key: &str) -> Option<resumable_sse::store::SessionInfo> {
        use resumable_sse::store::Store;
        self.lookup(&SessionKey::new(key).unwrap()).await.unwrap()
    }
}
