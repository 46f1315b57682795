//! A resumable SSE endpoint on plain hyper 1 and hyper-util, without axum.
//!
//! ```text
//! cargo run --example hyper -- --listen 127.0.0.1:3001
//! curl -N 'http://127.0.0.1:3001/events?session_id=demo'
//! # interrupt it, then go on from any id it printed:
//! curl -N -H 'Last-Event-ID: <id>' 'http://127.0.0.1:3001/events?session_id=demo'
//! ```
//!
//! `GET /events?session_id=ID&tokens=N&interval_ms=MS` streams `N` events (default 20) whose data
//! are `token 0` .. `token N-1`, `MS` milliseconds apart (default 200). The service that writes
//! them builds the event stream by hand, as `StreamBody` frames, and knows nothing of sessions;
//! [`ResumableSseLayer`] numbers the events, keeps them, and answers reconnects. Any other path
//! is `404`.
//!
//! `--listen ADDR` sets the address (default `127.0.0.1:3001`; port 0 picks a free port). Once
//! the server accepts connections it prints `listening on http://ADDR` with the bound address.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use resumable_sse::{MemoryStore, ResumableSseLayer};
use tower::ServiceBuilder;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The inner service: a plain SSE endpoint.
async fn events(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/events" {
        let body = Full::new(Bytes::from_static(b"not found\n")).boxed_unsync();
        let mut res = Response::new(body);
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    }
    let param = |name: &str| -> Option<u64> {
        req.uri().query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
    };
    let n = param("tokens").unwrap_or(20);
    let interval = Duration::from_millis(param("interval_ms").unwrap_or(200));
    let frames = stream::iter(0..n).then(move |i| async move {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: token {i}\n\n"))))
    });
    let res = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("a valid response");
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut listen = "127.0.0.1:3001".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            _ if arg.starts_with("--listen=") => listen = arg["--listen=".len()..].to_owned(),
            other => {
                return Err(
                    format!("unknown argument `{other}`; usage: hyper [--listen ADDR]").into(),
                )
            }
        }
    }

    let service = ServiceBuilder::new()
        .layer(ResumableSseLayer::new(MemoryStore::new()))
        .service_fn(events);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            // A client that goes away mid-stream ends its connection with an error: nothing to
            // report, the session goes on without it.
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
