//! `resumable-sse-proxy` as a separate process in front of a real Python service (FastAPI with
//! sse-starlette, `tests/upstream/app.py`) that knows nothing of resumption.
//!
//! The Python packages are installed once into a virtual environment under the system's temp
//! folder, reused by later runs. Without `python3` (or when pip fails) the tests print a SKIP
//! line, and fail under `CI=true`.

// The repository's shared test helpers (SSE reader, `TIMEOUT`, `free_port`, private Redis,
// child servers).
#[path = "../../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::child::{relay, Server};
use common::redis::free_port;
use common::{datas, Ev, SseConn, TIMEOUT};
use futures_util::stream;
use http::{HeaderMap, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

const PROXY: &str = env!("CARGO_BIN_EXE_resumable-sse-proxy");

// ---------------------------------------------------------------------------------------------
// The Python upstream

fn upstream_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream")
}

/// Prints a loud SKIP line, or fails under `CI=true`.
fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the proxy tests cannot run under CI=true: {why}");
    }
    eprintln!("SKIP: proxy tests skipped: {why}");
}

/// The Python of a virtual environment with `tests/upstream/requirements.txt` installed, made
/// once (under the temp folder, named after the requirements and the Python version) and reused.
fn python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(make_venv);
    match found {
        Ok(python) => Some(python.clone()),
        Err(why) => {
            skip_or_fail(why);
            None
        }
    }
}

fn make_venv() -> Result<PathBuf, String> {
    let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let version = Command::new(&base)
        .args(["-c", "import sys; print(sys.version)"])
        .output()
        .map_err(|e| format!("cannot run `{base}`: {e}"))?;
    if !version.status.success() {
        return Err(format!("`{base}` does not run"));
    }
    let requirements = upstream_dir().join("requirements.txt");
    let pinned = std::fs::read(&requirements).map_err(|e| format!("{e}"))?;
    // FNV-1a of what the environment depends on.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pinned.iter().chain(&version.stdout) {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let dir = std::env::temp_dir().join(format!("resumable-sse-proxy-venv-{hash:016x}"));
    let python = dir.join("bin/python");
    if dir.join(".ready").exists() {
        return Ok(python);
    }
    // Built aside and renamed into place, so that an interrupted install is never used.
    let building = std::env::temp_dir().join(format!(
        "resumable-sse-proxy-venv-{hash:016x}.{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("{what} did not start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    eprintln!(
        "creating the upstream's virtual environment in {}",
        dir.display()
    );
    run(
        Command::new(&base).args(["-m", "venv"]).arg(&building),
        &format!("`{base} -m venv`"),
    )?;
    run(
        Command::new(building.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
        "`pip install -r tests/upstream/requirements.txt`",
    )?;
    std::fs::write(building.join(".ready"), b"").map_err(|e| e.to_string())?;
    if std::fs::rename(&building, &dir).is_err() {
        // Another run got there first.
        let _ = std::fs::remove_dir_all(&building);
        if !dir.join(".ready").exists() {
            return Err(format!("cannot move the environment to {}", dir.display()));
        }
    }
    Ok(python)
}

/// `uvicorn app:app` on a port of its own, killed when dropped.
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Upstream {
    /// Starts the app on a free port; `None` (after a SKIP line) without Python.
    fn start() -> Option<Upstream> {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Option<Upstream> {
        let python = python()?;
        let mut child = Command::new(python)
            .args(["-m", "uvicorn", "app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--log-level", "warning"])
            .current_dir(upstream_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("uvicorn starts");
        relay("upstream", child.stdout.take().unwrap());
        relay("upstream", child.stderr.take().unwrap());
        let upstream = Upstream {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        };
        // Ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(upstream.addr) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /json HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.ends_with(b"200") {
                    return Some(upstream);
                }
            }
            assert!(Instant::now() < deadline, "uvicorn did not start on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many times the app's stream routes were called for `session`.
    async fn calls(&self, session: &str) -> u64 {
        let (status, _, body) = fetch(self.addr, "GET", &format!("/calls?session_id={session}"))
            .send()
            .await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["calls"].as_u64().unwrap()
    }

    /// Every request the app received so far, as (method, raw path), without those that asked
    /// for this list.
    async fn seen(&self) -> Vec<(String, String)> {
        let (status, _, body) = fetch(self.addr, "GET", "/requests").send().await;
        assert_eq!(status, 200);
        let all: Vec<(String, String)> = serde_json::from_slice(&body).unwrap();
        all.into_iter().filter(|(_, p)| p != "/requests").collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// A running `resumable-sse-proxy`, killed when dropped.
struct Proxy {
    server: Server,
    /// Its `--metrics-listen` address, when the test knows it.
    metrics: Option<SocketAddr>,
}

impl Proxy {
    /// Starts the proxy with `--metrics-listen` on a free port, and `args`.
    fn start(upstream: &str, args: &[&str]) -> Proxy {
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let listen = metrics.to_string();
        let args = [&["--upstream", upstream, "--metrics-listen", &listen], args].concat();
        Proxy {
            server: Server::start("proxy", PROXY, &args),
            metrics: Some(metrics),
        }
    }

    fn spawn(cmd: Command) -> Proxy {
        Proxy {
            server: Server::spawn("proxy", cmd),
            metrics: None,
        }
    }

    /// The value of a metric line (`name{labels}`), 0 when absent, from `--metrics-listen`.
    async fn metric(&self, series: &str) -> f64 {
        let addr = self
            .metrics
            .expect("the proxy was started with --metrics-listen");
        let (status, headers, body) = fetch(addr, "GET", "/metrics").send().await;
        assert_eq!(status, 200);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl std::ops::Deref for Proxy {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for Proxy {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

/// The proxy run to its end with `args` and `env`: exit code and stderr.
fn run_proxy(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(PROXY);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the proxy runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP and SSE over hyper

type ReqBody = BoxBody<Bytes, Infallible>;

fn client() -> Client<HttpConnector, ReqBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Fetch {
    req: http::request::Builder,
    body: ReqBody,
}

fn fetch(addr: SocketAddr, method: &str, path: &str) -> Fetch {
    Fetch {
        req: http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}")),
        body: Empty::new().boxed(),
    }
}

impl Fetch {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.req = self.req.header(name, value);
        self
    }

    fn body(mut self, body: ReqBody) -> Self {
        self.body = body;
        self
    }

    async fn response(self) -> http::Response<Incoming> {
        let req = self.req.body(self.body).unwrap();
        tokio::time::timeout(TIMEOUT, client().request(req))
            .await
            .expect("response head in time")
            .expect("request succeeds")
    }

    /// The whole response.
    async fn send(self) -> (StatusCode, HeaderMap, Bytes) {
        let (parts, body) = self.response().await.into_parts();
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .expect("body in time")
            .expect("body reads")
            .to_bytes();
        (parts.status, parts.headers, body)
    }

    /// The response as an event stream.
    async fn events(self) -> SseConn {
        SseConn::new(self.response().await)
    }
}

fn tokens(n: usize) -> Vec<String> {
    words("token", n)
}

fn words(word: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{word} {i}")).collect()
}

/// Sends `METHOD TARGET HTTP/1.1` as written, over a plain TCP connection (HTTP clients
/// normalise the paths they are given), and returns the status code of the answer.
async fn raw_status(addr: SocketAddr, method: &str, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("an answer in time");
    let head = String::from_utf8_lossy(&answer);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{target}: not an HTTP answer: {head:?}"))
}

/// Reads a session in pieces of `pieces` events, dropping the connection after each and
/// reconnecting with `Last-Event-ID` (to `addrs[i % len]`), then to its end; checks the final
/// reconnect is `204`. Returns every event received.
async fn read_with_reconnects(
    addrs: &[SocketAddr],
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[usize],
) -> Vec<Ev> {
    read_session(addrs, "GET", path, headers, pieces).await
}

/// [`read_with_reconnects`] with `method` for every connection.
async fn read_session(
    addrs: &[SocketAddr],
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[usize],
) -> Vec<Ev> {
    let open = |i: usize, last: Option<String>| {
        let mut f = fetch(addrs[i % addrs.len()], method, path);
        for (k, v) in headers {
            f = f.header(k, v);
        }
        if let Some(id) = last {
            f = f.header("last-event-id", &id);
        }
        f.events()
    };
    let mut got: Vec<Ev> = Vec::new();
    for (i, n) in pieces.iter().enumerate() {
        let last = got.last().and_then(|e| e.id.clone());
        let mut conn = open(i, last).await;
        assert_eq!(conn.status, 200, "connection {i}");
        assert!(conn.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        got.extend(conn.take(*n).await);
        // Dropping `conn` closes the connection mid-stream.
    }
    let last = got.last().and_then(|e| e.id.clone());
    let mut conn = open(pieces.len(), last).await;
    assert_eq!(conn.status, 200);
    got.extend(conn.collect().await);
    let last = got.last().and_then(|e| e.id.clone());
    let done = open(pieces.len() + 1, last).await;
    assert_eq!(done.status, StatusCode::NO_CONTENT);
    assert_eq!(done.reason(), Some("completed"));
    got
}

fn assert_ids_increase(evs: &[Ev]) {
    let ids: Vec<(&str, u64)> = evs
        .iter()
        .map(|e| {
            let id = e.id.as_deref().expect("every event has an id");
            let (epoch, seq) = id.rsplit_once('-').expect("an id is EPOCH-SEQ");
            (epoch, seq.parse().expect("a sequence number"))
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
        "ids of one epoch, strictly increasing: {ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn reconnects_get_every_token_once_and_the_upstream_is_called_once() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(&up.url(), &["--route", "/v1/chat/*"]);
    let got = read_with_reconnects(
        &[proxy.addr],
        "/v1/chat/stream?session_id=s1&n=40&interval_ms=10",
        &[],
        &[5, 10, 1],
    )
    .await;
    assert_eq!(datas(&got), tokens(40));
    assert_ids_increase(&got);
    assert_eq!(up.calls("s1").await, 1);
    assert_eq!(
        proxy.metric("resumable_sse_sessions_started_total").await,
        1.0
    );
    assert_eq!(proxy.metric("resumable_sse_replays_total").await, 3.0);

    // Without a session key the route is forwarded unresumable: the upstream is called each time.
    for _ in 0..2 {
        let mut conn = fetch(proxy.addr, "GET", "/v1/chat/stream?n=3")
            .events()
            .await;
        assert_eq!(conn.status, 200);
        let evs = conn.collect().await;
        assert_eq!(datas(&evs), tokens(3));
        assert!(evs.iter().all(|e| e.id.is_none()));
    }
    assert_eq!(up.calls("").await, 2);
}

#[tokio::test]
async fn sigterm_drains_running_sessions_then_exits() {
    let Some(up) = Upstream::start() else { return };
    let mut proxy = Proxy::start(
        &up.url(),
        &["--route", "/v1/chat/*", "--drain-timeout", "30s"],
    );
    let mut conn = fetch(
        proxy.addr,
        "GET",
        "/v1/chat/stream?session_id=d1&n=40&interval_ms=25",
    )
    .events()
    .await;
    assert_eq!(conn.status, 200);
    let mut got = vec![conn.next().await.expect("a first event")];
    let pid = proxy.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    // The proxy stops accepting connections at once...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(proxy.addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...the running session still finishes, every token once...
    got.extend(conn.collect().await);
    assert_eq!(datas(&got), tokens(40));
    // ...and then the process exits cleanly, well before the drain timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(up.calls("d1").await, 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn two_proxies_sharing_redis_resume_each_others_sessions() {
    let Some(url) = common::redis::shared_url() else {
        return;
    };
    let Some(up) = Upstream::start() else { return };
    let prefix = common::redis::unique_prefix();
    let args = [
        "--route",
        "/v1/chat/*",
        "--redis",
        &url,
        "--redis-prefix",
        &prefix,
    ];
    let a = Proxy::start(&up.url(), &args);
    let b = Proxy::start(&up.url(), &args);
    // Connections alternate: a, b, a, b...
    let got = read_with_reconnects(
        &[a.addr, b.addr],
        "/v1/chat/stream?session_id=r1&n=30&interval_ms=10",
        &[],
        &[7, 5],
    )
    .await;
    assert_eq!(datas(&got), tokens(30));
    assert_ids_increase(&got);
    assert_eq!(up.calls("r1").await, 1);
    assert_eq!(a.metric("resumable_sse_sessions_started_total").await, 1.0);
    assert_eq!(b.metric("resumable_sse_sessions_started_total").await, 0.0);
}

#[tokio::test]
async fn other_routes_pass_through_byte_for_byte() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(&up.url(), &["--route", "/v1/chat/*"]);

    for path in ["/json", "/download?size=5242880", "/nowhere"] {
        let direct = fetch(up.addr, "GET", path).send().await;
        let proxied = fetch(proxy.addr, "GET", path).send().await;
        assert_eq!(proxied.0, direct.0, "{path}: status");
        assert_eq!(
            proxied.1.get("content-type"),
            direct.1.get("content-type"),
            "{path}"
        );
        assert_eq!(proxied.2, direct.2, "{path}: body");
    }
    let (_, headers, body) = fetch(proxy.addr, "GET", "/download?size=5242880")
        .send()
        .await;
    assert_eq!(body.len(), 5 * 1024 * 1024);
    assert_eq!(headers["content-length"], "5242880");

    // A streamed upload (chunked, no length) arrives whole.
    let upload = || {
        let chunks = (0..48u8).map(|i| Ok(Frame::data(Bytes::from(vec![i; 65_536]))));
        StreamBody::new(stream::iter(chunks)).boxed()
    };
    let direct = fetch(up.addr, "POST", "/upload")
        .body(upload())
        .send()
        .await;
    let proxied = fetch(proxy.addr, "POST", "/upload")
        .body(upload())
        .send()
        .await;
    assert_eq!(proxied.0, 200);
    assert_eq!(proxied.2, direct.2);
    let v: Value = serde_json::from_slice(&proxied.2).unwrap();
    assert_eq!(v["size"], 48 * 65_536);
    let fixed = fetch(proxy.addr, "POST", "/upload")
        .body(Full::new(Bytes::from_static(b"hello")).boxed())
        .send()
        .await;
    let v: Value = serde_json::from_slice(&fixed.2).unwrap();
    assert_eq!(v["size"], 5);

    // What the upstream sees of the request headers.
    let (status, _, body) = fetch(proxy.addr, "GET", "/headers")
        .header("connection", "x-private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eDp5")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-end-to-end", "kept")
        .send()
        .await;
    assert_eq!(status, 200);
    let pairs: Vec<(String, String)> = serde_json::from_slice(&body).unwrap();
    let get = |name: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("host"), [up.addr.to_string().as_str()]);
    assert_eq!(get("x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(
        get("forwarded"),
        [format!("for=127.0.0.1;proto=http;host=\"{}\"", proxy.addr).as_str()]
    );
    assert_eq!(get("x-end-to-end"), ["kept"]);
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(get(gone).is_empty(), "{gone} reached the upstream");
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_trace_log_of_the_proxy_shows_no_key_no_request_target_and_no_password() {
    if !common::redis::have_redis_server() {
        common::redis::skip_or_fail("redis-server is not on PATH");
        return;
    }
    let Some(up) = Upstream::start() else { return };
    let password = "proxy-pw-never-logged-8134";
    let server = common::redis::RedisServer::start_on(None, &["--requirepass", password]);
    let url = format!("redis://:{password}@127.0.0.1:{}/", server.port);
    let secret = "proxy-logged-key-2207";
    let path = format!("/v1/chat/stream?session_id={secret}&n=5");
    let mut cmd = Command::new(PROXY);
    cmd.args(["--upstream", &up.url(), "--listen", "127.0.0.1:0"])
        .args(["--route", "/v1/chat/*", "--redis", &url])
        .env("RUST_LOG", "trace");
    let proxy = Proxy::spawn(cmd);
    let first = read_with_reconnects(&[proxy.addr], &path, &[], &[2]).await;
    assert_eq!(datas(&first), tokens(5));
    // The same key through a proxy whose upstream is down: a warning about the failure.
    let port = free_port();
    let mut cmd = Command::new(PROXY);
    cmd.args(["--upstream", &format!("http://127.0.0.1:{port}")])
        .args(["--listen", "127.0.0.1:0", "--route", "/v1/chat/*"])
        .env("RUST_LOG", "trace");
    let down = Proxy::spawn(cmd);
    let (status, _, _) = fetch(down.addr, "GET", &path).send().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // A wrong password: the proxy exits with an error that does not show it.
    let wrong = format!("redis://:wrong-{password}@127.0.0.1:{}/", server.port);
    let (code, refused) = run_proxy(
        &[
            "--upstream",
            &up.url(),
            "--listen",
            "127.0.0.1:0",
            "--redis",
            &wrong,
        ],
        &[("RUST_LOG", "trace")],
    );
    assert_ne!(code, Some(0), "{refused}");
    common::eventually("the proxy logs the upstream failure", || {
        down.log.lock().unwrap().contains("upstream request failed")
    })
    .await;
    let logs = [
        ("the proxy's log", proxy.log.lock().unwrap().clone()),
        ("the failing proxy's log", down.log.lock().unwrap().clone()),
        ("the refused start", refused),
    ];
    assert!(
        logs[0].1.contains("sessions are kept in Redis"),
        "{}",
        logs[0].1
    );
    assert!(logs[0].1.contains("TRACE"), "a trace log:\n{}", logs[0].1);
    for (what, text) in &logs {
        for secret in [secret, password, "session_id=", "/v1/chat/stream"] {
            assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_creates_no_session() {
    // Nothing listens on the port yet.
    let port = free_port();
    let proxy = Proxy::start(
        &format!("http://127.0.0.1:{port}"),
        &["--route", "/v1/chat/*"],
    );
    let path = "/v1/chat/stream?session_id=d1&n=5";
    for p in [path, "/json"] {
        let (status, _, _) = fetch(proxy.addr, "GET", p).send().await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{p}");
    }
    assert_eq!(
        proxy
            .metric("resumable_sse_proxy_upstream_errors_total{kind=\"connect\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy.metric("resumable_sse_sessions_started_total").await,
        0.0
    );

    // The upstream comes up: the same session key calls it now.
    let Some(up) = Upstream::start_on(port) else {
        return;
    };
    let mut conn = fetch(proxy.addr, "GET", path).events().await;
    assert_eq!(conn.status, 200);
    assert_eq!(datas(&conn.collect().await), tokens(5));
    assert_eq!(up.calls("d1").await, 1);
    assert_eq!(
        proxy.metric("resumable_sse_sessions_started_total").await,
        1.0
    );
}

#[tokio::test]
async fn a_slow_upstream_is_504_and_creates_no_session() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &up.url(),
        &["--route", "/slow", "--upstream-timeout", "500ms"],
    );
    let started = Instant::now();
    let (status, _, _) = fetch(proxy.addr, "GET", "/slow?session_id=t1&seconds=5")
        .send()
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        proxy
            .metric("resumable_sse_proxy_upstream_errors_total{kind=\"timeout\"}")
            .await,
        1.0
    );

    // The upstream answers in time now: the same session key calls it again.
    let mut conn = fetch(proxy.addr, "GET", "/slow?session_id=t1&seconds=0&n=3")
        .events()
        .await;
    assert_eq!(conn.status, 200);
    let evs = conn.collect().await;
    assert_eq!(datas(&evs), tokens(3));
    assert_eq!(up.calls("t1").await, 2);
    let last = evs.last().unwrap().id.clone().unwrap();
    let done = fetch(proxy.addr, "GET", "/slow?session_id=t1&seconds=0&n=3")
        .header("last-event-id", &last)
        .events()
        .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT);
    assert_eq!(up.calls("t1").await, 2);
}

#[tokio::test]
async fn the_session_key_can_come_from_a_header() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &up.url(),
        &[
            "--route",
            "/v1/chat/stream",
            "--session-key",
            "header:X-Session-Id",
        ],
    );
    let got = read_with_reconnects(
        &[proxy.addr],
        "/v1/chat/stream?n=20&interval_ms=10",
        &[("x-session-id", "h1")],
        &[4, 6],
    )
    .await;
    assert_eq!(datas(&got), tokens(20));
    assert_eq!(up.calls("h1").await, 1);
}

#[tokio::test]
async fn the_session_key_can_come_from_a_path_segment() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &up.url(),
        &["--route", "/v1/chat/*", "--session-key", "path:3"],
    );
    let got = read_with_reconnects(
        &[proxy.addr],
        "/v1/chat/p1/stream?n=20&interval_ms=10",
        &[],
        &[4, 6],
    )
    .await;
    assert_eq!(datas(&got), tokens(20));
    assert_eq!(up.calls("p1").await, 1);
    // Another segment is another session.
    let got = read_with_reconnects(&[proxy.addr], "/v1/chat/p2/stream?n=5", &[], &[2]).await;
    assert_eq!(datas(&got), tokens(5));
    assert_eq!(up.calls("p2").await, 1);
}

#[tokio::test]
async fn settings_come_from_the_environment() {
    let port = free_port();
    let mut cmd = Command::new(PROXY);
    cmd.env(
        "RESUMABLE_SSE_PROXY_UPSTREAM",
        format!("http://127.0.0.1:{port}"),
    )
    .env("RESUMABLE_SSE_PROXY_LISTEN", "127.0.0.1:0")
    .env("RESUMABLE_SSE_PROXY_ROUTE", "/a,/v1/chat/*")
    .env("RESUMABLE_SSE_PROXY_SESSION_KEY", "header:X-Session-Id")
    .env("RESUMABLE_SSE_PROXY_UPSTREAM_TIMEOUT", "5s")
    .env("RESUMABLE_SSE_PROXY_KEEP_ALIVE", "off")
    .env("RESUMABLE_SSE_PROXY_RETENTION", "300s")
    .env("RESUMABLE_SSE_PROXY_MAX_SESSIONS", "10")
    .env("RESUMABLE_SSE_PROXY_METRICS_PATH", "/_proxy/metrics");
    let proxy = Proxy::spawn(cmd);
    let (status, _, body) = fetch(proxy.addr, "GET", "/_proxy/metrics").send().await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for name in [
        "resumable_sse_sessions_started_total",
        "resumable_sse_proxy_upstream_errors_total",
        "resumable_sse_proxy_requests_total",
    ] {
        assert!(text.contains(name), "{name} is listed:\n{text}");
    }
    // `/metrics` is forwarded now, and the upstream is down.
    let (status, _, _) = fetch(proxy.addr, "GET", "/metrics").send().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // An invalid key in the header named by the environment is the layer's 400.
    let res = fetch(proxy.addr, "GET", "/a")
        .header("x-session-id", &"k".repeat(300))
        .events()
        .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.reason(), Some("invalid-session-key"));
}

#[test]
fn invalid_settings_are_refused_at_startup() {
    let up = [
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--route", "/x", "--session-key", "cookie:sid"],
            "--session-key",
        ),
        (
            &["--route", "/x", "--session-key", "path:0"],
            "--session-key",
        ),
        (
            &["--route", "/x", "--session-key", "header:a b"],
            "--session-key",
        ),
        (&["--route", "v1/*"], "--route"),
        (&["--route", "/a/*/b"], "--route"),
        (
            &["--route", "/x", "--retention", "5 parsecs"],
            "--retention",
        ),
        (&["--route", "/x", "--keep-alive", "soon"], "--keep-alive"),
        (
            &["--route", "/x", "--bind-key", "query:token"],
            "--bind-key",
        ),
        (&["--route", "/x", "--bind-key", "cookie:"], "--bind-key"),
        (&["--route", "/x", "--bind-key", "header:a b"], "--bind-key"),
        (&["--route", "/x", "--method", "GE T"], "--method"),
        (
            &["--route", "/x", "--metrics-path", "metrics"],
            "--metrics-path",
        ),
        (
            &["--route", "/x", "--metrics-path", "/a/../metrics"],
            "--metrics-path",
        ),
        (&["--route", "/v1/../admin/*"], "--route"),
        (
            &["--route", "/x", "--max-event-size", "big"],
            "--max-event-size",
        ),
        (&[], "--route"),
    ];
    for (args, flag) in cases {
        let all: Vec<&str> = up.iter().chain(args.iter()).copied().collect();
        let (code, out) = run_proxy(&all, &[]);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(out.contains(flag), "{args:?} names {flag}: {out}");
    }
    let (code, out) = run_proxy(&["--upstream", "https://example.com", "--route", "/x"], &[]);
    assert_eq!(code, Some(2));
    assert!(out.contains("https"), "{out}");
    let (code, out) = run_proxy(
        &["--upstream", "http://127.0.0.1:9"],
        &[
            ("RESUMABLE_SSE_PROXY_ROUTE", "/x"),
            ("RESUMABLE_SSE_PROXY_SESSION_KEY", "bogus"),
        ],
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("--session-key"), "{out}");

    let (code, help) = run_proxy(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for flag in [
        "upstream",
        "listen",
        "route",
        "session-key",
        "redis",
        "redis-prefix",
        "retention",
        "keep-alive",
        "max-lifetime",
        "max-event-size",
        "max-sessions",
        "upstream-timeout",
        "method",
        "bind-key",
        "metrics-listen",
        "metrics-path",
    ] {
        assert!(help.contains(&format!("--{flag} ")), "--{flag} in --help");
        let var = format!(
            "RESUMABLE_SSE_PROXY_{}",
            flag.to_uppercase().replace('-', "_")
        );
        assert!(help.contains(&var), "{var} in --help");
    }
}

#[cfg(not(feature = "redis"))]
#[test]
fn redis_needs_the_redis_feature() {
    let (code, out) = run_proxy(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--route",
            "/x",
            "--redis",
            "redis://127.0.0.1:6379",
        ],
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("--features redis"), "{out}");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn max_sessions_with_redis_counts_the_sessions_of_every_proxy_together() {
    let Some(url) = common::redis::shared_url() else {
        return;
    };
    let Some(up) = Upstream::start() else { return };
    let prefix = common::redis::unique_prefix();
    let args = [
        "--route",
        "/v1/chat/*",
        "--redis",
        &url,
        "--redis-prefix",
        &prefix,
        "--max-sessions",
        "1",
    ];
    let a = Proxy::start(&up.url(), &args);
    let b = Proxy::start(&up.url(), &args);
    let first = common::get(a.addr, "/v1/chat/stream?session_id=m1&n=3", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&first), tokens(3));
    // The other proxy's new session is one too many; the first one's session still answers.
    let refused = common::get(b.addr, "/v1/chat/stream?session_id=m2&n=3", None).await;
    assert_eq!(
        (refused.status.as_u16(), refused.reason()),
        (503, Some("session-limit"))
    );
    let replay = common::get(
        b.addr,
        "/v1/chat/stream?session_id=m1",
        first[0].id.as_deref(),
    )
    .await
    .collect()
    .await;
    assert_eq!(datas(&replay), tokens(3)[1..]);
    assert_eq!(up.calls("m2").await, 0);
}

// ---------------------------------------------------------------------------------------------
// Security: metrics, key scopes, bound keys, paths

#[tokio::test]
async fn the_public_listener_forwards_the_metrics_path_unless_asked() {
    let Some(up) = Upstream::start() else { return };
    let metrics_requests = |seen: Vec<(String, String)>| {
        seen.iter()
            .filter(|(m, p)| m == "GET" && p == "/metrics")
            .count()
    };
    // No metrics flag at all: `/metrics` is the upstream's (FastAPI's 404).
    let mut cmd = Command::new(PROXY);
    cmd.args(["--upstream", &up.url(), "--listen", "127.0.0.1:0"])
        .args(["--route", "/v1/chat/*"]);
    let plain = Proxy::spawn(cmd);
    let (status, _, body) = fetch(plain.addr, "GET", "/metrics").send().await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&body).contains("resumable_sse"));
    assert_eq!(metrics_requests(up.seen().await), 1);

    // `--metrics-path` asks for them on the public listener: served there, not forwarded.
    let opted = Proxy::start(
        &up.url(),
        &["--route", "/v1/chat/*", "--metrics-path", "/metrics"],
    );
    let (status, headers, body) = fetch(opted.addr, "GET", "/metrics").send().await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(String::from_utf8_lossy(&body).contains("resumable_sse_proxy_requests_total"));
    // ...at its normalised path too.
    let (status, _, _) = fetch(opted.addr, "GET", "/./metrics").send().await;
    assert_eq!(status, 200);
    assert_eq!(metrics_requests(up.seen().await), 1);
}

#[tokio::test]
async fn metrics_listen_serves_the_metrics_on_its_own_address_only() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(&up.url(), &["--route", "/v1/chat/*"]);
    let metrics = proxy.metrics.unwrap();
    // The public listener forwards `/metrics`.
    let (status, _, body) = fetch(proxy.addr, "GET", "/metrics").send().await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&body).contains("resumable_sse"));
    assert!(up
        .seen()
        .await
        .contains(&("GET".to_owned(), "/metrics".to_owned())));
    // The metrics listener serves them, counting the public listener's requests...
    assert_eq!(
        proxy
            .metric("resumable_sse_proxy_requests_total{route=\"passthrough\"}")
            .await,
        1.0
    );
    // ...and forwards nothing: any other path is its own 404.
    let before = up.seen().await.len();
    for path in [
        "/v1/chat/stream?session_id=m1&n=2",
        "/json",
        "/metrics/x",
        "/",
    ] {
        let (status, _, body) = fetch(metrics, "GET", path).send().await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(&body[..], b"not found\n", "{path}");
    }
    let (status, _, _) = fetch(metrics, "POST", "/metrics").send().await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(up.seen().await.len(), before);
    assert_eq!(up.calls("m1").await, 0);
}

#[tokio::test]
async fn one_key_on_two_routes_or_two_methods_is_two_sessions() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &up.url(),
        &[
            "--route",
            "/v1/chat/*",
            "--route",
            "/v2/chat/*",
            "--method",
            "GET,HEAD,POST",
        ],
    );
    // The same key on the same path: a POST stream, then a GET stream.
    let path = "/v1/chat/stream?session_id=same&n=12&interval_ms=10";
    let post = read_session(&[proxy.addr], "POST", path, &[], &[3, 4]).await;
    assert_eq!(datas(&post), words("post", 12));
    let get = read_session(&[proxy.addr], "GET", path, &[], &[5]).await;
    assert_eq!(datas(&get), tokens(12));
    assert_eq!(up.calls("POST%20same").await, 1);
    assert_eq!(up.calls("same").await, 1);
    // The same key on another route.
    let other = read_with_reconnects(
        &[proxy.addr],
        "/v2/chat/stream?session_id=same&n=8&word=beta",
        &[],
        &[2],
    )
    .await;
    assert_eq!(datas(&other), words("beta", 8));
    assert_eq!(up.calls("same").await, 2);
    assert_eq!(
        proxy.metric("resumable_sse_sessions_started_total").await,
        3.0
    );
    // HEAD asks about the GET session: it is over.
    let head = fetch(proxy.addr, "HEAD", path)
        .header("last-event-id", get.last().unwrap().id.as_ref().unwrap())
        .events()
        .await;
    assert_eq!(head.status, StatusCode::NO_CONTENT);
    assert_eq!(head.reason(), Some("completed"));
}

#[tokio::test]
async fn a_scoped_and_bound_key_keeps_the_whole_key_length() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &up.url(),
        &[
            "--route",
            "/v1/chat/*",
            "--bind-key",
            "header:authorization",
        ],
    );
    let n = resumable_sse::limits::MAX_SESSION_KEY_LEN;
    for len in [0, 1, n - 1, n, n + 1, 2 * n] {
        let key = "k".repeat(len);
        let path = format!("/v1/chat/stream?session_id={key}&n=3");
        let mut conn = fetch(proxy.addr, "GET", &path)
            .header("authorization", "Bearer length")
            .events()
            .await;
        if len > n {
            assert_eq!(conn.status, StatusCode::BAD_REQUEST, "{len}");
            assert_eq!(conn.reason(), Some("invalid-session-key"), "{len}");
            assert_eq!(up.calls(&key).await, 0, "{len}");
            continue;
        }
        assert_eq!(conn.status, 200, "{len}");
        let evs = conn.collect().await;
        assert_eq!(datas(&evs), tokens(3), "{len}");
        // No key (an empty one) is forwarded unresumable; any other key is a session.
        assert_eq!(evs.iter().all(|e| e.id.is_some()), len > 0, "{len}");
    }
}

/// Starts a proxy on `/v1/chat/*` with `--bind-key BIND` and a trace log.
fn bound_proxy(up: &Upstream, bind: &str) -> Proxy {
    let mut cmd = Command::new(PROXY);
    cmd.args(["--upstream", &up.url(), "--listen", "127.0.0.1:0"])
        .args(["--route", "/v1/chat/*", "--bind-key", bind])
        .env("RUST_LOG", "trace");
    Proxy::spawn(cmd)
}

/// Caller A starts a session and reads 3 events; caller B (`other`: another credential) with
/// A's key and A's position is told the session is unknown, and without a position gets a
/// generation of its own; A reconnecting gets the rest of its own. Checks that neither
/// credential shows in the proxy's log.
async fn check_binding(up: &Upstream, proxy: &Proxy, key: &str, a: (&str, &str), b: (&str, &str)) {
    let path = format!("/v1/chat/stream?session_id={key}&n=30&interval_ms=10");
    let mut conn = fetch(proxy.addr, "GET", &path)
        .header(a.0, a.1)
        .events()
        .await;
    assert_eq!(conn.status, 200);
    let first = conn.take(3).await;
    drop(conn);
    let last = first[2].id.clone().expect("an id");

    let stolen = fetch(proxy.addr, "GET", &path)
        .header(b.0, b.1)
        .header("last-event-id", &last)
        .events()
        .await;
    assert_eq!(stolen.status, StatusCode::GONE);
    assert_eq!(stolen.reason(), Some("unknown-session"));
    let probe = fetch(proxy.addr, "HEAD", &path)
        .header(b.0, b.1)
        .header("last-event-id", &last)
        .events()
        .await;
    assert_eq!(probe.status, StatusCode::GONE);
    assert_eq!(up.calls(key).await, 1);

    let own = read_with_reconnects(&[proxy.addr], &path, &[b], &[4]).await;
    assert_eq!(datas(&own), tokens(30));
    assert_eq!(up.calls(key).await, 2);

    let mut resumed = fetch(proxy.addr, "GET", &path)
        .header(a.0, a.1)
        .header("last-event-id", &last)
        .events()
        .await;
    assert_eq!(resumed.status, 200);
    let rest = resumed.collect().await;
    assert_eq!(datas(&rest), tokens(30)[3..]);
    assert_eq!(up.calls(key).await, 2);

    let log = proxy.log.lock().unwrap().clone();
    assert!(log.contains("TRACE"), "a trace log:\n{log}");
    for (_, credential) in [a, b] {
        let secret = credential.rsplit(['=', ' ']).next().unwrap();
        assert!(!log.contains(secret), "the log shows {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn a_session_bound_to_a_header_is_not_reached_with_another_value() {
    let Some(up) = Upstream::start() else { return };
    let proxy = bound_proxy(&up, "header:authorization");
    check_binding(
        &up,
        &proxy,
        "bound-h",
        ("authorization", "Bearer alice-secret-5521"),
        ("authorization", "Bearer mallory-secret-7730"),
    )
    .await;
}

#[tokio::test]
async fn a_session_bound_to_a_cookie_is_not_reached_with_another_value() {
    let Some(up) = Upstream::start() else { return };
    let proxy = bound_proxy(&up, "cookie:sid");
    check_binding(
        &up,
        &proxy,
        "bound-c",
        ("cookie", "theme=dark; sid=alice-cookie-1184"),
        ("cookie", "sid=mallory-cookie-9046; theme=dark"),
    )
    .await;
    // Other cookies do not count: A with another theme still resumes its session.
    let path = "/v1/chat/stream?session_id=bound-c&n=30&interval_ms=10";
    let done = fetch(proxy.addr, "HEAD", path)
        .header("cookie", "sid=alice-cookie-1184; theme=light")
        .events()
        .await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(done.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
}

#[tokio::test]
async fn without_the_bound_credential_a_stream_is_forwarded_unresumable() {
    let Some(up) = Upstream::start() else { return };
    for (bind, a, missing) in [
        (
            "header:authorization",
            ("authorization", "Bearer alice-secret-3307"),
            ("authorization", ""),
        ),
        (
            "cookie:sid",
            ("cookie", "sid=alice-cookie-3307"),
            ("cookie", "theme=dark; xsid=alice-cookie-3307"),
        ),
    ] {
        let proxy = bound_proxy(&up, bind);
        let key = format!("unbound-{}", &bind[..6]);
        let path = format!("/v1/chat/stream?session_id={key}&n=10");
        let mut conn = fetch(proxy.addr, "GET", &path)
            .header(a.0, a.1)
            .events()
            .await;
        let owned = conn.collect().await;
        let last = owned[4].id.clone().unwrap();
        assert_eq!(up.calls(&key).await, 1);
        // Without the credential (absent, empty, or another cookie): the upstream every time,
        // every token from the start, no ids; never the session of A, even with its position.
        for (i, with) in [None, Some(missing)].into_iter().enumerate() {
            let mut f = fetch(proxy.addr, "GET", &path).header("last-event-id", &last);
            if let Some((k, v)) = with {
                f = f.header(k, v);
            }
            let mut conn = f.events().await;
            assert_eq!(conn.status, 200, "{bind}");
            let evs = conn.collect().await;
            assert_eq!(datas(&evs), tokens(10), "{bind}");
            assert!(evs.iter().all(|e| e.id.is_none()), "{bind}");
            assert_eq!(up.calls(&key).await, 2 + i as u64, "{bind}");
        }
        assert_eq!(
            proxy.log.lock().unwrap().matches("alice-").count(),
            0,
            "{bind}"
        );
    }
}

#[tokio::test]
async fn dot_dot_in_any_spelling_is_refused_and_never_reaches_the_upstream() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(
        &format!("{}/api", up.url()),
        &["--route", "/v1/chat/*", "--route", "/*"],
    );
    let before = up.seen().await;
    for target in [
        "/../admin",
        "/api/../admin",
        "/v1/chat/../../admin?session_id=t1",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/%2E./admin",
        "/.%2e/admin",
        "/%252e%252e/admin",
        "/..%2fadmin",
        "/x/..%2F..%2Fadmin",
        "/x%2f..%2f..%2fadmin",
        "/..\\admin",
        "/x\\..\\..\\admin",
        "/..%5cadmin",
        "/..%5Cadmin",
        "/..;/admin",
        "/v1/chat/%2e%2e;x/%2e%2e/admin?session_id=t2",
        "http://x/../admin",
    ] {
        for method in ["GET", "POST", "HEAD"] {
            assert_eq!(
                raw_status(proxy.addr, method, target).await,
                400,
                "{method} {target}"
            );
        }
    }
    for asterisk in ["OPTIONS"] {
        assert_eq!(raw_status(proxy.addr, asterisk, "*").await, 400);
    }
    assert_eq!(
        up.seen().await,
        before,
        "a refused request reached the upstream"
    );
    assert_eq!(up.calls("t1").await + up.calls("t2").await, 0);

    // A path that stays inside is forwarded under the prefix, normalised.
    assert_eq!(raw_status(proxy.addr, "GET", "/./x//%79/.").await, 404);
    let seen = up.seen().await;
    assert_eq!(
        seen.last(),
        Some(&("GET".to_owned(), "/api/x/y/".to_owned()))
    );
}

#[tokio::test]
async fn a_path_is_normalised_before_it_is_matched_and_forwarded() {
    let Some(up) = Upstream::start() else { return };
    let proxy = Proxy::start(&up.url(), &["--route", "/v1/chat/*"]);
    let mut conn = fetch(
        proxy.addr,
        "GET",
        "/v1/./chat//%73tream?session_id=norm&n=10",
    )
    .events()
    .await;
    assert_eq!(conn.status, 200);
    let first = conn.take(4).await;
    drop(conn);
    assert!(first.iter().all(|e| e.id.is_some()), "a session: {first:?}");
    // The canonical spelling of the path names the same session.
    let mut rest = fetch(proxy.addr, "GET", "/v1/chat/stream?session_id=norm&n=10")
        .header("last-event-id", first[3].id.as_ref().unwrap())
        .events()
        .await;
    assert_eq!(rest.status, 200);
    assert_eq!(datas(&rest.collect().await), tokens(10)[4..]);
    assert_eq!(up.calls("norm").await, 1);
    let seen = up.seen().await;
    assert!(
        seen.contains(&("GET".to_owned(), "/v1/chat/stream".to_owned())),
        "{seen:?}"
    );
    assert!(!seen
        .iter()
        .any(|(_, p)| p.contains("/./") || p.contains("//")));
}

/// Events per second of one client on one connection: straight from the upstream, through the
/// proxy on a route without the layer (plain forwarding) and through the proxy with the layer
/// (memory store); N = 20000 events with no pause, medians of 7 runs each, interleaved. Also the
/// CPU time the proxy and the upstream spend per event (from `/proc`).
///
/// ```text
/// cargo test --release -p resumable-sse-proxy --test proxy -- --ignored --nocapture events_per_second
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it in release mode"]
async fn events_per_second_through_the_proxy_and_direct() {
    const N: usize = 20_000;
    const RUNS: usize = 7;
    let Some(up) = Upstream::start() else { return };
    let resumable = Proxy::start(&up.url(), &["--route", "/v1/chat/*"]);
    let forwarding = Proxy::start(&up.url(), &["--route", "/elsewhere"]);
    let run = |addr: SocketAddr, session: String| async move {
        let path = format!("/v1/chat/stream?session_id={session}&n={N}&interval_ms=0");
        let started = Instant::now();
        let mut conn = fetch(addr, "GET", &path).events().await;
        assert_eq!(conn.status, 200);
        let mut count = 0;
        while let Some(ev) = conn.next().await {
            assert_eq!(ev.data, format!("token {count}"));
            count += 1;
        }
        assert_eq!(count, N);
        N as f64 / started.elapsed().as_secs_f64()
    };
    let configs: [(&str, SocketAddr, Option<&Proxy>); 3] = [
        ("direct", up.addr, None),
        ("proxy, forwarding only", forwarding.addr, Some(&forwarding)),
        ("proxy, resumable", resumable.addr, Some(&resumable)),
    ];
    // (events per second of each run, proxy CPU, upstream CPU)
    let mut results = vec![(Vec::new(), Duration::ZERO, Duration::ZERO); configs.len()];
    for (c, (_, addr, _)) in configs.iter().enumerate() {
        run(*addr, format!("warm-{c}")).await;
    }
    for i in 0..RUNS {
        for (c, (_, addr, proxy)) in configs.iter().enumerate() {
            let proxy_pid = proxy.map(|p| p.child.id());
            let p0 = proxy_pid.map_or(Duration::ZERO, cpu_time);
            let u0 = cpu_time(up.child.id());
            let rate = run(*addr, format!("c{c}-{i}")).await;
            let r = &mut results[c];
            r.0.push(rate);
            r.1 += proxy_pid
                .map_or(Duration::ZERO, cpu_time)
                .saturating_sub(p0);
            r.2 += cpu_time(up.child.id()).saturating_sub(u0);
        }
    }
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (RUNS * N) as f64;
    let mut direct = 0.0;
    println!("{N} events, {RUNS} runs each; events/s (median; runs), CPU per event");
    for ((name, _, _), (mut rates, proxy_cpu, upstream_cpu)) in configs.iter().zip(results) {
        let runs = rates
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        if direct == 0.0 {
            direct = median;
        }
        println!(
            "{name:>24}: {median:>6.0}/s ({:>5.1}% of direct; {runs}); proxy {:.1} us, upstream {:.1} us",
            100.0 * median / direct,
            per_event(proxy_cpu),
            per_event(upstream_cpu)
        );
    }
}

/// The CPU time (user + system) a process has used so far, from `/proc` (zero elsewhere).
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The fields after the command name, which is in parentheses; utime and stime are the
    // 14th and 15th fields, in clock ticks (100 a second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
