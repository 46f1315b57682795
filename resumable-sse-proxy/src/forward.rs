//! Forwarding a request to the upstream, as a tower service.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::cli::Upstream;

/// The body of a forwarded response: the upstream's, or one the proxy wrote itself.
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The address of the client a request came from, set as a request extension per connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Forwards every request to the upstream and returns its response. Never fails: an upstream
/// that cannot be reached is `502`, one that is too slow to answer is `504`.
#[derive(Clone)]
pub(crate) struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpConnector, Incoming>,
    upstream: Upstream,
    host: HeaderValue,
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstream: Upstream, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let host = HeaderValue::from_str(upstream.authority.as_str())
            .expect("an authority is a valid header value");
        Self {
            inner: Arc::new(Inner {
                client,
                upstream,
                host,
                timeout,
            }),
        }
    }
}

impl Service<Request<Incoming>> for Forwarder {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(inner.forward(req).await) })
    }
}

impl Inner {
    async fn forward(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let client = parts.extensions.get::<ClientAddr>().map(|c| c.0.ip());
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        remove_hop_by_hop(&mut parts.headers);
        // The proxy answered any `100-continue` itself when it read the body.
        parts.headers.remove(header::EXPECT);
        if let Some(ip) = client {
            add_forwarded(&mut parts.headers, ip, original_host.as_ref());
        }
        parts.headers.insert(header::HOST, self.host.clone());
        parts.uri = match self.upstream.uri_for(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::debug!(error = %e, "request target cannot be forwarded");
                return answer(StatusCode::BAD_REQUEST, "bad request target\n");
            }
        };
        parts.version = Version::HTTP_11;
        // The request target is never logged: its query or path may carry a session key, which
        // is a capability.
        let method = parts.method.clone();
        let request = self.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(res)) => {
                let (mut parts, body) = res.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Ok(Err(e)) => {
                let kind = if e.is_connect() { "connect" } else { "other" };
                metrics::counter!("resumable_sse_proxy_upstream_errors_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(%method, error = %ErrorChain(&e), "upstream request failed");
                answer(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
            }
            Err(_) => {
                metrics::counter!("resumable_sse_proxy_upstream_errors_total", "kind" => "timeout")
                    .increment(1);
                tracing::warn!(%method, timeout = ?self.timeout, "upstream did not answer in time");
                answer(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
            }
        }
    }
}

/// A response the proxy writes itself.
pub(crate) fn answer(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Removes the headers that concern one connection only: `Connection` and the headers it names,
/// `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For` and adds a `Forwarded` element
/// (`for=CLIENT;proto=http;host=HOST`) after any the request already has.
fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<&HeaderValue>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let mut chain: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(client.to_string());
    if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(&xff, v);
    }

    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        element.push_str(&forwarded_value(host));
    }
    let mut elements: Vec<String> = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    elements.push(element);
    if let Ok(v) = HeaderValue::from_str(&elements.join(", ")) {
        headers.insert(header::FORWARDED, v);
    }
}

/// A `Forwarded` parameter value: the token itself, or a quoted string (RFC 7239).
fn forwarded_value(v: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !v.is_empty() && v.chars().all(is_tchar) {
        v.to_owned()
    } else {
        let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// An error with its sources, `outer: inner: ...`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Custom"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "1"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "text/event-stream"),
            ("last-event-id", "1-2"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept", "last-event-id"]);
    }

    #[test]
    fn forwarding_headers_are_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        add_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            Some(&HeaderValue::from_static("example.com:8080")),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=http;host=\"example.com:8080\""
        );
        let mut h = HeaderMap::new();
        h.insert("forwarded", HeaderValue::from_static("for=192.0.2.1"));
        add_forwarded(
            &mut h,
            "::1".parse().unwrap(),
            Some(&HeaderValue::from_static("example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1, for=\"[::1]\";proto=http;host=example.com"
        );
    }
}
