//! `resumable-sse-proxy`: [`ResumableSseLayer`] as a reverse proxy, in front of a service in any
//! language.
//!
//! ```text
//! cargo build --release -p resumable-sse-proxy --features redis
//! target/release/resumable-sse-proxy --upstream http://127.0.0.1:8000 --route '/v1/chat/*'
//! ```
//!
//! Every request is forwarded to `--upstream` (plain HTTP) with its body streamed both ways,
//! without the hop-by-hop headers, with `Host` set for the upstream and `X-Forwarded-For` and
//! `Forwarded` added. Requests to a `--route` carrying a session key (`--session-key`) go through
//! [`ResumableSseLayer`], so the upstream's event streams on those routes become resumable
//! sessions, kept in memory or, with `--redis`, in Redis shared by several proxies. A session is
//! named by its key, the request's method, the route it matched and its path, and with
//! `--bind-key` the caller's credential (see the `key` module). Request paths are normalised, and
//! `..` refused, before anything reads them (see the `path` module). The proxy serves its own
//! metrics on `--metrics-listen` (and on the public listener only with `--metrics-path`), answers
//! `502` when the upstream cannot be reached and `504` when it is slower than
//! `--upstream-timeout` to answer; neither creates a session.
//!
//! The listener speaks HTTP/1.1 and the upstream is reached over HTTP/1.1 without TLS; protocol
//! upgrades (WebSocket) are not forwarded. `resumable-sse-proxy --help` lists every flag and its
//! environment variable.

mod cli;
mod forward;
mod key;
mod path;

use std::convert::Infallible;
use std::future::poll_fn;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
#[cfg(feature = "redis")]
use resumable_sse::store::redis::redacted_url;
use resumable_sse::store::Store;
use resumable_sse::{BoxError, MemoryStore, ResumableSse, ResumableSseLayer};
use tower_layer::Layer;
use tower_service::Service;

use crate::cli::{Args, Route};
use crate::forward::{answer, ClientAddr, Forwarder};
use crate::key::ProxyKey;

type Body = UnsyncBoxBody<Bytes, BoxError>;

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(2, &format!("cannot start the runtime: {e}")));
    if let Err(e) = runtime.block_on(run(args)) {
        fail(1, &e.to_string());
    }
}

fn fail(code: i32, message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(code);
}

async fn run(args: Args) -> Result<(), BoxError> {
    let metrics = install_metrics()?;
    match args.redis.clone() {
        #[cfg(feature = "redis")]
        Some(url) => {
            let mut store = resumable_sse::RedisStore::builder(url.clone())
                .prefix(args.redis_prefix.clone())
                .retention(args.retention);
            if let Some(max) = args.max_sessions {
                store = store.max_sessions(max);
            }
            let store = store
                .connect()
                .await
                .map_err(|e| format!("cannot connect to Redis at {}: {e}", redacted_url(&url)))?;
            tracing::info!(
                url = %redacted_url(&url),
                prefix = %args.redis_prefix,
                "sessions are kept in Redis"
            );
            serve(store, args, metrics).await
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => fail(
            2,
            "--redis needs a build with Redis support: cargo build -p resumable-sse-proxy --features redis",
        ),
        None => {
            let mut store = MemoryStore::builder().retention(args.retention);
            if let Some(max) = args.max_sessions {
                store = store.max_sessions(max);
            }
            serve(store.build(), args, metrics).await
        }
    }
}

/// Accepts connections until the process is stopped.
async fn serve<St: Store>(
    store: St,
    args: Args,
    metrics: PrometheusHandle,
) -> Result<(), BoxError> {
    let forwarder = Forwarder::new(args.upstream.clone(), args.upstream_timeout);
    let routes: Arc<[Route]> = args.routes.clone().into();
    let layer = ResumableSseLayer::new(store)
        .methods(args.methods.clone())
        .session_key(ProxyKey::new(
            args.session_key.clone(),
            routes.clone(),
            args.bind_key.clone(),
        ))
        .keep_alive(match args.keep_alive.0 {
            Some(interval) => resumable_sse::KeepAlive::new().interval(interval),
            None => resumable_sse::KeepAlive::disabled(),
        })
        .max_lifetime(args.max_lifetime)
        .max_event_size(args.max_event_size);
    let drain = layer.drain_handle();
    let app = Arc::new(App {
        resumable: layer.layer(forwarder.clone()),
        forwarder,
        routes,
        metrics_path: args.metrics_path.0.clone(),
        metrics: metrics.clone(),
    });

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match &args.metrics_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| format!("cannot listen on {listen} for the metrics: {e}"))?;
            let addr = listener.local_addr()?;
            tokio::spawn(serve_metrics(listener, metrics));
            Some(addr)
        }
        None => None,
    };
    let routes: Vec<String> = args.routes.iter().map(Route::to_string).collect();
    let methods: Vec<&str> = args.methods.iter().map(Method::as_str).collect();
    tracing::info!(
        %addr,
        upstream = %args.upstream.authority,
        routes = ?routes,
        methods = ?methods,
        session_key = %args.session_key,
        bind_key = args.bind_key.as_ref().map(tracing::field::display),
        metrics = metrics_addr.map(tracing::field::display),
        metrics_path = args.metrics_path.0.as_deref(),
        "proxy ready"
    );
    // Printed once every listener accepts connections.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{addr}")?;
    if let Some(metrics) = metrics_addr {
        writeln!(stdout, "metrics on http://{metrics}/metrics")?;
    }
    stdout.flush()?;
    drop(stdout);

    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, for instance: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        metrics::counter!("resumable_sse_proxy_connections_total").increment(1);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ClientAddr(peer));
                let app = app.clone();
                async move { app.handle(req).await }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            // A client that goes away mid-stream ends its connection with an error; its session
            // goes on without it.
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Stop accepting; let the running sessions finish, then exit.
    drop(listener);
    tracing::info!(
        running = drain.running(),
        "shutting down: draining sessions"
    );
    let report = drain.drain(args.drain_timeout).await;
    tracing::info!(
        ended_at_deadline = report.ended_at_deadline,
        "drained; exiting"
    );
    Ok(())
}

/// Resolves on SIGTERM (what a deploy sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Serves `GET /metrics` (and `HEAD`) on the metrics listener, 404 for anything else, until the
/// process exits.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: PrometheusHandle) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the metrics listener");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let res = if (req.method() == Method::GET || req.method() == Method::HEAD)
                    && req.uri().path() == "/metrics"
                {
                    render_metrics(&metrics)
                } else {
                    answer(StatusCode::NOT_FOUND, "not found\n")
                        .map(|b| b.map_err(Into::into).boxed_unsync())
                };
                std::future::ready(Ok::<_, Infallible>(res))
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Routes a request: the metrics, a resumable route, or straight to the upstream.
struct App<St> {
    resumable: ResumableSse<Forwarder, St, ProxyKey>,
    forwarder: Forwarder,
    routes: Arc<[Route]>,
    metrics_path: Option<String>,
    metrics: PrometheusHandle,
}

impl<St: Store> App<St> {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        // Everything below (the metrics path, the routes, the session key's scope, the upstream)
        // reads the normalised path; the refused path itself is never logged.
        let req = match normalize_path(req) {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!(%method, error = %e, "request path refused");
                let res = answer(StatusCode::BAD_REQUEST, "bad request path\n");
                return Ok(res.map(|b| b.map_err(Into::into).boxed_unsync()));
            }
        };
        let path = req.uri().path().to_owned();
        if req.method() == Method::GET && self.metrics_path.as_deref() == Some(path.as_str()) {
            return Ok(render_metrics(&self.metrics));
        }
        // The route a resumable request matched, as configured: its path, which may carry a
        // session key (a capability), is never logged.
        let matched = self.routes.iter().find(|r| r.matches(&path));
        drop(path);
        let resumable = matched.is_some();
        let kind = if resumable {
            "resumable"
        } else {
            "passthrough"
        };
        metrics::counter!("resumable_sse_proxy_requests_total", "route" => kind).increment(1);
        let res = if resumable {
            let mut service = self.resumable.clone();
            poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(req).await?.map(BodyExt::boxed_unsync)
        } else {
            let mut service = self.forwarder.clone();
            service
                .call(req)
                .await?
                .map(|b| b.map_err(Into::into).boxed_unsync())
        };
        tracing::debug!(
            %method,
            route = kind,
            pattern = matched.map(tracing::field::display),
            status = res.status().as_u16(),
            reason = res.headers().get(resumable_sse::REASON_HEADER).and_then(|v| v.to_str().ok()),
            elapsed = ?started.elapsed(),
            "request"
        );
        Ok(res)
    }
}

/// The request with its path normalised (see the `path` module), or why it is refused.
fn normalize_path(req: Request<Incoming>) -> Result<Request<Incoming>, String> {
    let normal = match path::normalize(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(req),
        Ok(std::borrow::Cow::Owned(normal)) => normal,
        Err(e) => return Err(e.to_string()),
    };
    let (mut parts, body) = req.into_parts();
    let target = match parts.uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut uri = parts.uri.into_parts();
    uri.path_and_query = Some(target.try_into().map_err(|e| format!("{e}"))?);
    parts.uri = http::Uri::from_parts(uri).map_err(|e| e.to_string())?;
    Ok(Request::from_parts(parts, body))
}

/// The metrics as Prometheus text.
fn render_metrics(metrics: &PrometheusHandle) -> Response<Body> {
    metrics.run_upkeep();
    let body = Full::new(Bytes::from(metrics.render()))
        .map_err(|e| match e {})
        .boxed_unsync();
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Installs the Prometheus recorder and registers every metric at zero, so that each name is
/// listed from the start.
fn install_metrics() -> Result<PrometheusHandle, BoxError> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    // The library describes its own metrics; the proxy adds its own.
    resumable_sse::metrics::describe();
    metrics::describe_counter!(
        "resumable_sse_proxy_connections_total",
        "Client connections accepted"
    );
    metrics::counter!("resumable_sse_proxy_connections_total").increment(0);
    metrics::describe_counter!(
        "resumable_sse_proxy_requests_total",
        "Requests forwarded, by route kind (resumable or passthrough)"
    );
    for kind in ["resumable", "passthrough"] {
        metrics::counter!("resumable_sse_proxy_requests_total", "route" => kind).increment(0);
    }
    metrics::describe_counter!(
        "resumable_sse_proxy_upstream_errors_total",
        "Upstream requests that got no response head, by kind (connect, timeout, other)"
    );
    for kind in ["connect", "timeout", "other"] {
        metrics::counter!("resumable_sse_proxy_upstream_errors_total", "kind" => kind).increment(0);
    }
    Ok(handle)
}
