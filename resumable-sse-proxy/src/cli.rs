//! Command-line flags, their environment variables, and the parsers of their values.

use std::time::Duration;

use clap::Parser;
use http::header::HeaderName;
use http::request::Parts;
use http::uri::{Authority, Scheme, Uri};
use http::Method;
use resumable_sse::{
    ExtractSessionKey, FromHeader, FromPath, FromQuery, InvalidSessionKey, SessionKey,
};

use crate::key::Binding;

const ABOUT: &str = "A reverse proxy that makes the Server-Sent-Events routes of an HTTP service \
resumable: a client that reconnects with Last-Event-ID gets exactly the events it missed, the \
upstream is called once per session, and a generation goes on when its client goes away.";

const AFTER_HELP: &str = "\
Every request is forwarded to --upstream with its body streamed both ways. Requests to a \
--route carrying a session key go through the resumable layer: the first one calls the upstream, \
and a 200 text/event-stream answer becomes a session; later requests with the same key replay \
the session after their Last-Event-ID (then follow it live) without calling the upstream, and a \
client that already has the last event gets 204. Other requests pass through untouched.

A session is named by its key together with the request's method (HEAD asks about GET's \
session), the route pattern it matched and its path: the same key on two routes, two paths or \
two methods names two sessions. With --bind-key, the caller's credential is part of the name \
too (as a SHA-256, never logged nor stored): another credential never reaches the session, and \
a request without the credential is forwarded unresumable.

Paths are normalised before anything reads them: `.` and empty segments are removed (`//` is \
`/`), escaped unreserved characters decoded. A `..` segment in any spelling (`%2e%2e`, `%2E.`, \
`..%2f`, `..\\`, `..%5c`, `..;`) is answered 400 and never forwarded, so nothing outside the \
upstream's path prefix can be named.

Metrics (Prometheus text) are served at GET /metrics on --metrics-listen only, never on the \
public listener unless --metrics-path asks for it. The upstream unreachable is 502 Bad \
Gateway, too slow to answer is 504 Gateway Timeout; neither creates a session. Logs go to \
stderr; RUST_LOG sets the level (default info).

Durations are a number with a unit: 500ms, 30s, 5m, 1h (a bare number is seconds).

Example, in front of a FastAPI app on port 8000:
  resumable-sse-proxy --upstream http://127.0.0.1:8000 --route '/v1/chat/*' \\
       --metrics-listen 127.0.0.1:9090 --bind-key header:Authorization
  curl -N -H 'Authorization: Bearer <token>' \\
       'http://127.0.0.1:8080/v1/chat/stream?session_id=0b9e6c2a'
  curl -N -H 'Authorization: Bearer <token>' -H 'Last-Event-ID: <the last id curl printed>' \\
       'http://127.0.0.1:8080/v1/chat/stream?session_id=0b9e6c2a'";

/// The proxy's settings. Every flag can also come from the environment variable named in its
/// help.
#[derive(Parser, Debug)]
#[command(name = "resumable-sse-proxy", version, about = ABOUT, after_help = AFTER_HELP)]
pub(crate) struct Args {
    /// The service every request is forwarded to: http://HOST:PORT, optionally with a path
    /// prefix (http://HOST:PORT/api). Plain HTTP only: terminate TLS in front of the proxy.
    #[arg(long, env = "RESUMABLE_SSE_PROXY_UPSTREAM", value_name = "URL", value_parser = Upstream::parse)]
    pub(crate) upstream: Upstream,

    /// Where to listen (port 0 picks a free port). Once connections are accepted, the proxy
    /// prints `listening on http://ADDR` on stdout with the bound address.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) listen: String,

    /// A route to make resumable; repeatable (comma-separated in the environment variable). A
    /// `*` at the end matches every path that starts with what comes before it (`/v1/chat/*`,
    /// `/*` for every path); otherwise the path must be equal. Other routes pass through.
    #[arg(
        long = "route",
        env = "RESUMABLE_SSE_PROXY_ROUTE",
        value_name = "PATTERN",
        value_delimiter = ',',
        required = true,
        value_parser = Route::parse
    )]
    pub(crate) routes: Vec<Route>,

    /// Where a request's session key is: `query:NAME` (a query parameter), `header:NAME` (a
    /// request header) or `path:N` (the N-th segment of the path, counted from 1). A request on a
    /// route without a key passes through, unresumable.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_SESSION_KEY",
        value_name = "SPEC",
        default_value = "query:session_id",
        value_parser = KeySource::parse
    )]
    pub(crate) session_key: KeySource,

    /// Keep sessions in Redis (redis://HOST:PORT/DB) instead of memory, so that several proxies
    /// share them and a reconnect may land on any of them. Needs a build with the `redis`
    /// feature.
    #[arg(long, env = "RESUMABLE_SSE_PROXY_REDIS", value_name = "URL")]
    pub(crate) redis: Option<String>,

    /// The prefix of the Redis keys; proxies that share sessions must use the same one.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_REDIS_PREFIX",
        value_name = "PREFIX",
        default_value = "resumable-sse"
    )]
    pub(crate) redis_prefix: String,

    /// How long a finished session stays resumable.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_RETENTION",
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_duration
    )]
    pub(crate) retention: Duration,

    /// A `:` comment is sent on a session's connections after this long without an event; `0`
    /// or `off` sends none.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_KEEP_ALIVE",
        value_name = "DURATION",
        default_value = "15s",
        value_parser = parse_keep_alive
    )]
    pub(crate) keep_alive: KeepAlive,

    /// The longest a session may run; a longer one is stopped and ends as failed.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_MAX_LIFETIME",
        value_name = "DURATION",
        default_value = "1h",
        value_parser = parse_duration
    )]
    pub(crate) max_lifetime: Duration,

    /// The largest event the upstream may send, in bytes (at most 256 MiB; a larger value is
    /// taken as 256 MiB); a larger event ends the session as failed (the events before it stay
    /// readable).
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_MAX_EVENT_SIZE",
        value_name = "BYTES",
        default_value_t = 1024 * 1024
    )]
    pub(crate) max_event_size: usize,

    /// The most sessions kept at once (default 10000); a new session beyond it is answered 503.
    /// With `--redis`, counted in Redis for every proxy sharing it and its prefix.
    #[arg(long, env = "RESUMABLE_SSE_PROXY_MAX_SESSIONS", value_name = "N")]
    pub(crate) max_sessions: Option<usize>,

    /// How long the upstream may take to send its response head before the client gets 504
    /// Gateway Timeout, counted from the start of the request (connecting and sending the
    /// request body included). Response bodies, streams included, are not limited.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_UPSTREAM_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub(crate) upstream_timeout: Duration,

    /// On SIGTERM or Ctrl-C: how long running sessions may take to finish before they are ended
    /// as failed. New sessions are refused (503 `draining`) meanwhile; with `--redis` other
    /// proxies keep serving them afterwards.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub(crate) drain_timeout: Duration,

    /// The request methods whose streams are made resumable; repeatable (comma-separated in the
    /// environment variable). Add POST for services whose streams start with a POST (MCP's
    /// Streamable HTTP); each method has sessions of its own. A HEAD request answers from the
    /// GET session, if there is one, and never starts one.
    #[arg(
        long = "method",
        env = "RESUMABLE_SSE_PROXY_METHOD",
        value_name = "METHOD",
        value_delimiter = ',',
        default_values_t = [Method::GET, Method::HEAD],
        value_parser = parse_method
    )]
    pub(crate) methods: Vec<Method>,

    /// Binds every session to the credential of the caller that started it: `header:NAME` (every
    /// value of that request header, e.g. `header:Authorization`) or `cookie:NAME` (every value
    /// of that cookie). A SHA-256 of the credential is part of the session's name, so that a
    /// caller with another credential can never resume, nor probe with HEAD, a session even
    /// with its key (with a Last-Event-ID it is told 410 `unknown-session`, as for a session
    /// that does not exist; without one it starts its own); the credential is never logged or
    /// stored. A request without the credential
    /// (or with an empty one) is forwarded unresumable: it never reaches a stored session. The
    /// proxy does not check credentials: the upstream does, when a session starts.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_BIND_KEY",
        value_name = "SPEC",
        value_parser = Binding::parse
    )]
    pub(crate) bind_key: Option<Binding>,

    /// A second listener, for the metrics only: it answers GET /metrics (Prometheus text) and
    /// 404 to anything else. Keep it off the public network.
    #[arg(long, env = "RESUMABLE_SSE_PROXY_METRICS_LISTEN", value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,

    /// Also serve the metrics on the public listener, at this path (GET), instead of forwarding
    /// it. Off by default: every path of the public listener is forwarded, `/metrics` included.
    /// `off` turns it off.
    #[arg(
        long,
        env = "RESUMABLE_SSE_PROXY_METRICS_PATH",
        value_name = "PATH",
        default_value = "off",
        value_parser = parse_metrics_path
    )]
    pub(crate) metrics_path: MetricsPath,
}

/// The upstream's address and path prefix.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    pub(crate) authority: Authority,
    /// The path prefix without its trailing `/` (empty for none).
    pub(crate) prefix: String,
}

impl Upstream {
    fn parse(s: &str) -> Result<Self, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("not a URL ({e}); expected http://HOST:PORT"))?;
        match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => {}
            Some(scheme) if *scheme == Scheme::HTTPS => {
                return Err("https upstreams are not supported; use http://".to_owned())
            }
            _ => return Err("expected http://HOST:PORT".to_owned()),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or("expected http://HOST:PORT")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the upstream URL are not supported".to_owned());
        }
        if uri.query().is_some() {
            return Err("the upstream URL cannot have a query".to_owned());
        }
        Ok(Self {
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI of a request for `uri` (origin-form).
    pub(crate) fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let path = if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}{path}", self.prefix)
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

/// A `--route` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Exact(String),
    Prefix(String),
}

impl Route {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !s.starts_with('/') {
            return Err(format!("`{s}` must start with `/`"));
        }
        // Matched against normalised request paths, so normalised the same way.
        let normal = |p: &str| {
            crate::path::normalize(p)
                .map(|n| n.into_owned())
                .map_err(|e| format!("`{s}`: {e}"))
        };
        match s.find('*') {
            None => Ok(Self::Exact(normal(s)?)),
            Some(i) if i == s.len() - 1 => Ok(Self::Prefix(normal(&s[..i])?)),
            Some(_) => Err(format!("`{s}`: `*` is only allowed at the end")),
        }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(p) => f.write_str(p),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Where the session key of a request is, from `--session-key`.
#[derive(Clone, Debug)]
pub(crate) enum KeySource {
    Query(String, FromQuery),
    Header(HeaderName, FromHeader),
    /// The 1-based index of a path segment (the library's `FromPath` counts from 0).
    Path(usize, FromPath),
}

impl KeySource {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected query:NAME, header:NAME or path:N";
        let (kind, arg) = s.split_once(':').ok_or(EXPECTED)?;
        match kind {
            "query" if !arg.is_empty() => {
                Ok(Self::Query(arg.to_owned(), FromQuery::new(arg.to_owned())))
            }
            "header" => {
                let name = HeaderName::from_bytes(arg.as_bytes())
                    .map_err(|_| format!("`{arg}` is not a header name"))?;
                Ok(Self::Header(name.clone(), FromHeader::new(name)))
            }
            "path" => match arg.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Self::Path(n, FromPath::segment(n - 1))),
                _ => Err(format!(
                    "`path:{arg}`: N must be a segment number counted from 1"
                )),
            },
            _ => Err(EXPECTED.to_owned()),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Query(name, _) => write!(f, "query:{name}"),
            Self::Header(name, _) => write!(f, "header:{name}"),
            Self::Path(n, _) => write!(f, "path:{n}"),
        }
    }
}

impl ExtractSessionKey for KeySource {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        match self {
            Self::Query(_, q) => q.extract(parts),
            Self::Header(_, h) => h.extract(parts),
            Self::Path(_, p) => p.extract(parts),
        }
    }
}

/// `--keep-alive`: an interval, or none.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeepAlive(pub(crate) Option<Duration>);

fn parse_keep_alive(s: &str) -> Result<KeepAlive, String> {
    match s.trim() {
        "0" | "off" | "none" => Ok(KeepAlive(None)),
        other => parse_duration(other).map(|d| KeepAlive(Some(d).filter(|d| !d.is_zero()))),
    }
}

/// A `--method`: an HTTP method token, in uppercase as sent.
fn parse_method(s: &str) -> Result<Method, String> {
    let s = s.trim();
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not a request method"))
}

/// `--metrics-path`: a path, or none.
#[derive(Clone, Debug)]
pub(crate) struct MetricsPath(pub(crate) Option<String>);

fn parse_metrics_path(s: &str) -> Result<MetricsPath, String> {
    match s.trim() {
        "off" | "" => Ok(MetricsPath(None)),
        // Compared with the normalised request path.
        p => crate::path::normalize(p)
            .map(|n| MetricsPath(Some(n.into_owned())))
            .map_err(|e| format!("`{p}`: {e} (or be `off`)")),
    }
}

/// `500ms`, `30s`, `5m`, `1h`, `1.5s`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; expected e.g. 500ms, 30s, 5m or 1h"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "`{other}` is not a unit of time; use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(number * scale).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_keep_alive("off").unwrap().0.is_none());
        assert!(parse_keep_alive("0").unwrap().0.is_none());
        assert_eq!(
            parse_keep_alive("10s").unwrap().0,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn routes() {
        let r = Route::parse("/v1/chat/*").unwrap();
        assert!(r.matches("/v1/chat/stream"));
        assert!(r.matches("/v1/chat/"));
        assert!(!r.matches("/v1/chat"));
        assert!(!r.matches("/v1/other"));
        let r = Route::parse("/events").unwrap();
        assert!(r.matches("/events"));
        assert!(!r.matches("/events/1"));
        assert!(Route::parse("/*").unwrap().matches("/anything"));
        assert!(Route::parse("v1/*").is_err());
        assert!(Route::parse("/a/*/b").is_err());
    }

    #[test]
    fn session_keys() {
        let k = KeySource::parse("path:3").unwrap();
        let key = k.extract(&parts("/v1/chat/a%20b/stream")).unwrap().unwrap();
        assert_eq!(key.as_str(), "a b");
        assert_eq!(k.extract(&parts("/v1/chat")).unwrap(), None);
        assert_eq!(k.extract(&parts("/v1/chat//x")).unwrap(), None);
        assert_eq!(
            k.extract(&parts("/v1/chat/%ff")),
            Err(InvalidSessionKey::NotUtf8)
        );
        let k = KeySource::parse("query:sid").unwrap();
        let key = k.extract(&parts("/x?sid=abc")).unwrap().unwrap();
        assert_eq!(key.as_str(), "abc");
        assert!(KeySource::parse("header:X-Session-Id").is_ok());
        for bad in [
            "",
            "query:",
            "header:",
            "header:a b",
            "path:0",
            "path:x",
            "cookie:a",
            "x",
        ] {
            assert!(KeySource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_uris() {
        let u = Upstream::parse("http://127.0.0.1:8000").unwrap();
        let uri = u.uri_for(&"/a/b?c=d".parse().unwrap()).unwrap();
        assert_eq!(uri, "http://127.0.0.1:8000/a/b?c=d");
        let u = Upstream::parse("http://h:1/api/").unwrap();
        assert_eq!(
            u.uri_for(&"/x?y".parse().unwrap()).unwrap(),
            "http://h:1/api/x?y"
        );
        assert!(Upstream::parse("https://h").is_err());
        assert!(Upstream::parse("h:1").is_err());
        assert!(Upstream::parse("http://h/?q").is_err());
    }

    #[test]
    fn the_flags_are_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
