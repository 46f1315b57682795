//! The README's Rust snippets, compiled as an application that depends on axum (and tokio) would
//! write them: every ```rust block of the README appears below, line for line, inside the code that
//! makes it compile, or in `tests/custom_store.rs` (the store suite's three lines). The first test
//! fails when a snippet changes here or there alone, or names the `http` crate, which an axum
//! application does not have (it has `axum::http`).
#![allow(dead_code, unused_imports, unused_variables)]

use std::time::Duration;

use axum::response::sse::{Event, Sse};
use futures_util::stream::{self, Stream};

/// Any handler that returns an SSE response.
async fn chat() -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    Sse::new(stream::iter([Ok(Event::default().data("token"))]))
}

#[rustfmt::skip] // the README's lines, as they are
fn intro() {
    use axum::{routing::get, Router};
    use resumable_sse::{MemoryStore, ResumableSseLayer};

    let app = Router::new()
        .route("/chat", get(chat))          // any handler that returns an SSE response
        .layer(ResumableSseLayer::new(MemoryStore::new()));
    let _: Router = app;
}

#[rustfmt::skip] // the README's lines, as they are
#[cfg(feature = "redis")]
async fn redis() -> Result<(), Box<dyn std::error::Error>> {
    use axum::{routing::get, Router};
    use resumable_sse::{RedisStore, ResumableSseLayer};

    let store = RedisStore::builder("redis://127.0.0.1:6379").connect().await?;
    let app = Router::new().route("/chat", get(chat)).layer(ResumableSseLayer::new(store));
    let _: Router = app;
    Ok(())
}

#[rustfmt::skip] // the README's lines, as they are
fn stop_button() {
    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::{routing::get, Router};
    use resumable_sse::{MemoryStore, ResumableSseLayer, Sessions};

    async fn stop(State(sessions): State<Sessions<MemoryStore>>, req: Request) -> StatusCode {
        let (parts, _) = req.into_parts();
        match sessions.cancel_request(&parts).await {
            Ok(true) => StatusCode::NO_CONTENT,     // the generation stops; its clients see the end
            Ok(false) => StatusCode::NOT_FOUND,     // nothing running under that key
            Err(e) => e.status(),                   // 400: no or bad key; 503: store down
        }
    }

    let layer = ResumableSseLayer::new(MemoryStore::new());
    let app: Router = Router::new()
        .route("/chat", get(chat).delete(stop))     // DELETE /chat?session_id=... stops it
        .with_state(layer.sessions())
        .layer(layer);
}

#[rustfmt::skip] // the README's lines, as they are
async fn shutdown(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    use resumable_sse::{MemoryStore, ResumableSseLayer};

    let layer = ResumableSseLayer::new(MemoryStore::new());
    let shutdown = layer
        .drain_handle()
        .on_signal(async { let _ = tokio::signal::ctrl_c().await; }, Duration::from_secs(30));
    let app = Router::new().route("/chat", get(chat)).layer(layer);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

#[rustfmt::skip] // the README's lines, as they are
fn user_bound_key(store: resumable_sse::MemoryStore) {
    use resumable_sse::{ExtractSessionKey, FromPath, ResumableSseLayer};

    #[derive(Clone)]
    struct User(String); // inserted by the authentication layer

    let layer = ResumableSseLayer::new(store).session_key(|parts: &axum::http::request::Parts| {
        let user = parts.extensions.get::<User>()?;       // no user: no session (pass-through)
        let chat = FromPath::segment(1).extract(parts).ok()??;  // `/chat/{id}`, decoded as `Path`
        Some(format!("{}/{}", user.0, chat.as_str()))
    });
}

#[rustfmt::skip] // the README's lines, as they are
fn ai_sdk(store: resumable_sse::MemoryStore) {
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::routing::{get, post};
    use axum::Router;
    use resumable_sse::{ExtractSessionKey, FromPath, FromQuery, KeyScope, MemoryStore, ResumableSseLayer, Sessions};

    async fn stop(State(sessions): State<Sessions<MemoryStore, resumable_sse::Or<FromPath, FromQuery>>>, req: Request) -> StatusCode {
        let (parts, _) = req.into_parts();
        match sessions.cancel_request(&parts).await {
            Ok(true) => StatusCode::NO_CONTENT,
            Ok(false) => StatusCode::NOT_FOUND,
            Err(e) => e.status(),
        }
    }

    let layer = ResumableSseLayer::new(store)
        .methods([Method::GET, Method::HEAD, Method::POST])   // the POST starts the stream
        .session_key(FromPath::segment(2).or(FromQuery::new("id")))  // /api/chat/{id}/stream, ?id=
        .key_scope(KeyScope::Shared)                          // both routes name one session
        .replay_finished(false)                               // finished: 204, nothing to resume
        .restart_finished([Method::POST]);                    // the next message: a new answer
    let app = Router::new()
        .route("/api/chat", post(chat))                       // streams the UI message protocol
        .route("/api/chat/{id}/stream", get(|| async { StatusCode::NO_CONTENT }).delete(stop))
        .with_state(layer.sessions())
        .layer(layer);
    let _: Router = app;
}

#[rustfmt::skip] // the README's lines, as they are
async fn with_tonic(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use axum::routing::get;
    use resumable_sse::{MemoryStore, ResumableSseLayer};
    use tonic::service::Routes;
    use tonic::transport::Server;

    async fn events() -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
        chat().await
    }

    let (_reporter, health) = tonic_health::server::health_reporter();
    let routes = Routes::new(health)                   // the gRPC services, as usual
        .into_axum_router()
        .route("/events", get(events));                // an SSE handler beside them
    Server::builder()
        .accept_http1(true)                            // a browser's EventSource speaks HTTP/1.1
        .layer(ResumableSseLayer::new(MemoryStore::new()))
        .add_routes(routes.into())
        .serve(addr)
        .await?;
    Ok(())
}

/// The code lines of a text: trimmed, without blank and comment-only lines.
fn code_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect()
}

#[test]
fn every_rust_snippet_of_the_readme_is_compiled_and_names_axum_http_only() {
    let readme = include_str!("../README.md");
    let homes = [
        code_lines(include_str!("readme.rs")),
        code_lines(include_str!("custom_store.rs")),
    ];
    let mut blocks = 0;
    for block in readme.split("```rust").skip(1) {
        let block = block.split("```").next().expect("a closed block");
        blocks += 1;
        let lines = code_lines(block);
        assert!(
            homes
                .iter()
                .any(|home| home.windows(lines.len()).any(|w| w == lines.as_slice())),
            "this README snippet is not compiled by the tests as it is:\n{block}"
        );
        for (at, _) in block.match_indices("http::") {
            assert!(
                block[..at].ends_with("axum::"),
                "a README snippet names the http crate, which an axum application lacks:\n{block}"
            );
        }
    }
    assert_eq!(blocks, 8, "the README's Rust snippets");
}

/// The file a test column of the threat model names: `src/...` from the repository's root,
/// `proxy.rs` the proxy's tests, any other `x.rs` in `tests/`.
fn test_file(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if name.starts_with("src/") {
        root.join(name)
    } else if name == "proxy.rs" {
        root.join("resumable-sse-proxy/tests/proxy.rs")
    } else {
        root.join("tests").join(name)
    }
}

#[test]
fn every_test_the_threat_model_names_exists_where_it_says() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("### Threat model")
        .nth(1)
        .expect("a threat model section")
        .split("\n## ")
        .next()
        .expect("its text");
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| **")).collect();
    assert!(rows.len() >= 10, "the table has {} rows", rows.len());
    let mut named = 0;
    let mut missing = Vec::new();
    for row in rows {
        let tests = row
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .expect("a test column");
        for part in tests.split(';') {
            let (file, names) = part.split_once(':').expect("`file`: `test`, ...");
            let file = test_file(file.trim().trim_matches('`'));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for name in names.split(',') {
                let name = name.trim().trim_matches('`');
                named += 1;
                if !text.contains(&format!("fn {name}(")) {
                    missing.push(format!("{name} in {}", file.display()));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the threat model names tests that do not exist: {missing:#?}"
    );
    assert!(named >= 20, "{named} tests named");
}
