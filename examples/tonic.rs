//! A tonic gRPC server with a resumable SSE route beside its services, all behind one
//! [`ResumableSseLayer`].
//!
//! ```text
//! cargo run --example tonic -- --listen 127.0.0.1:0
//! curl -N 'http://ADDR/events?session_id=demo'
//! # interrupt it, then go on from any id it printed:
//! curl -N -H 'Last-Event-ID: <id>' 'http://ADDR/events?session_id=demo'
//! ```
//!
//! The gRPC service is the standard health service (`grpc.health.v1.Health`, from
//! `tonic-health`): `Check` is a unary call, `Watch` a server-streaming one. Beside it,
//! `GET /events?session_id=ID&n=N&interval_ms=MS` is a plain axum SSE handler that streams `N`
//! events (default 20) whose data are `tick 0` .. `tick N-1`, `MS` milliseconds apart (default
//! 200); the layer numbers them, keeps them, and answers reconnects.
//!
//! # Where the layer goes
//!
//! Where a tonic server takes any tower middleware: `Server::builder().layer(..)`, which wraps
//! every route of the server, the gRPC services and the SSE route alike. gRPC calls are `POST`s
//! without a session key, so the layer hands them to the service untouched: their messages,
//! their trailers (`grpc-status`, `grpc-message`) and their errors go through as they are
//! (`tests/tonic.rs` compares them byte for byte with the same server without the layer). The
//! server stays tonic's, with its HTTP/2 settings and gRPC handling (`grpc-timeout`, keep-alive,
//! concurrency limits); `accept_http1(true)` lets a browser's `EventSource`, which speaks
//! HTTP/1.1 to a plain-text server, reach the SSE route. (The other way, tonic's `Routes` turned
//! into an axum router under `axum::serve`, works too, but gives up those settings and needs
//! axum's `http2` feature for the gRPC clients.)
//!
//! `--listen ADDR` sets the address (default `127.0.0.1:3002`; port 0 picks a free port). Once
//! the server accepts connections it prints `listening on http://ADDR` with the bound address.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::Query;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use futures_util::stream::{self, Stream, StreamExt};
use resumable_sse::{MemoryStore, ResumableSseLayer};
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// `GET /events`: a plain SSE handler that knows nothing of sessions.
async fn events(
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let param =
        |name: &str, default: u64| q.get(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let n = param("n", 20);
    let interval = Duration::from_millis(param("interval_ms", 200));
    Sse::new(stream::iter(0..n).then(move |i| async move {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Ok(Event::default().data(format!("tick {i}")))
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut listen = "127.0.0.1:3002".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            _ if arg.starts_with("--listen=") => listen = arg["--listen=".len()..].to_owned(),
            other => {
                return Err(
                    format!("unknown argument `{other}`; usage: tonic [--listen ADDR]").into(),
                )
            }
        }
    }

    // The reporter sets what `Check` answers and `Watch` streams; every service is serving here.
    let (_reporter, health) = tonic_health::server::health_reporter();
    // tonic's routes (with its `Unimplemented` answer for unknown gRPC services), plus the SSE
    // route.
    let routes = Routes::new(health)
        .into_axum_router()
        .route("/events", get(events));

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    Server::builder()
        .accept_http1(true)
        .layer(ResumableSseLayer::new(MemoryStore::new()))
        .add_routes(routes.into())
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
