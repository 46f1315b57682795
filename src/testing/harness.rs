//! The suite's server: a test-controlled SSE service (the routes of [`Inner`]) behind the
//! layer on a real TCP socket, and a collector of log lines.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use tower_layer::Layer;
use tower_service::Service;

use super::service::{sized_data, Inner};
use crate::store::Store;
use crate::{BoxError, ResumableSseLayer};

type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The answer of the suite's service to `req`: the routes listed in [`super::service`].
fn answer(inner: &Inner, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let query: HashMap<&str, &str> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let number = |name: &str, default: usize| {
        query
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match req.uri().path() {
        "/tokens" => {
            inner.count_call();
            let n = number("n", 10);
            let interval = Duration::from_millis(number("interval_ms", 0) as u64);
            let events = stream::iter(0..n).then(move |i| async move {
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Ok(event(Some(&format!("inner-{i}")), &format!("token {i}")))
            });
            sse(events)
        }
        "/gated" => {
            inner.count_call();
            let key = query.get("session_id").copied().unwrap_or_default();
            let Some(events) = inner.gated(key) else {
                return not_found();
            };
            sse(events.map(|e| e.map(|d| event(None, &d)).map_err(BoxError::from)))
        }
        "/sized" => {
            inner.count_call();
            let bytes = number("bytes", 64);
            let events = stream::iter(0..number("n", 10))
                .map(move |i| Ok(event(None, &sized_data(i, bytes))));
            sse(events)
        }
        _ => not_found(),
    }
}

/// One event as an SSE handler writes it.
fn event(id: Option<&str>, data: &str) -> Bytes {
    let mut out = String::new();
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

fn not_found() -> Response<Body> {
    let mut res = Response::new(Body::default());
    *res.status_mut() = StatusCode::NOT_FOUND;
    res
}

/// A `200 text/event-stream` response of `events`.
fn sse(
    events: impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
) -> Response<Body> {
    let body = StreamBody::new(events.map(|e| e.map(Frame::data)));
    Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(body.boxed_unsync())
        .expect("a valid response")
}

/// [`Inner`] as a service.
#[derive(Clone)]
struct InnerService(Inner);

impl Service<Request<hyper::body::Incoming>> for InnerService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        std::future::ready(Ok(answer(&self.0, &req)))
    }
}

/// A tower service as a hyper one.
struct Hyper<S>(S);

impl<S, B> hyper::service::Service<Request<hyper::body::Incoming>> for Hyper<S>
where
    S: Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let mut service = self.0.clone();
        Box::pin(async move {
            poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(req).await
        })
    }
}

/// A server of the suite: where it listens, its inner service and its store.
pub(crate) struct App<St> {
    pub(crate) addr: SocketAddr,
    pub(crate) inner: Inner,
    pub(crate) store: St,
}

/// Serves [`Inner`] behind `layer` on a free port, with `TCP_NODELAY` on every connection
/// (Nagle plus delayed ACKs would hold every multi-part write ~40 ms).
pub(crate) async fn serve_with<St: Store>(
    store: St,
    layer: impl FnOnce(ResumableSseLayer<St>) -> ResumableSseLayer<St>,
) -> App<St> {
    let inner = Inner::default();
    let service = layer(ResumableSseLayer::new(store.clone())).layer(InnerService(inner.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), Hyper(service.clone()));
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
    App { addr, inner, store }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Collects the messages and fields of the `tracing` events of the thread it is set on (with
/// [`tracing::subscriber::set_default`]), to check that failures are recorded.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<String>>);

impl Logs {
    /// Everything recorded so far, one event a line.
    pub(crate) fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Logs {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = self.0.lock().unwrap();
        text.push_str(event.metadata().level().as_str());
        text.push(' ');
        event.record(&mut Fields(&mut text));
        text.push('\n');
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
