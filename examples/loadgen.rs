//! End-to-end load tool: the `chat` example served bare, through the layer on a `MemoryStore`,
//! and through the layer on a `RedisStore`, each driven over real TCP in one run.
//!
//! ```text
//! cargo run --release --features redis --example loadgen -- [--quick] [--redis URL] [--json]
//!     [--repeat K] [--scenarios LIST] [--modes LIST] [--chat PATH]
//! ```
//!
//! The tool builds the example (`cargo build --release --features redis --example chat`) and
//! starts its executable as a child process per scenario and mode, on `127.0.0.1:0`:
//!
//! - **bare**: `chat --bare`, plain axum SSE without the layer, the reference for every ratio. In
//!   `fanout` it is measured twice, as two baselines: **bare** (independent streams) and **bare
//!   broadcast** (`broadcast=1`); see the scenario table;
//! - **memory**: `chat`, the layer on a `MemoryStore`;
//! - **redis**: `chat --redis URL`, the layer on a `RedisStore`. Without `--redis`, a private
//!   `redis-server --save "" --appendonly no` on a free port is started (and killed at the end);
//!   when `redis-server` is not on PATH the mode is skipped with a loud `SKIP` line (an error under
//!   `CI=true`).
//!
//! The layer modes run with the stores' default limits (sessions bounded by bytes, 64 MiB, which
//! keeps a session of a million token events whole): nothing is raised to hide eviction. Every
//! child is started through `sh`, which kills it when
//! the tool's end of a pipe closes: children die with the tool however it ends (panic, signal).
//! The soft `RLIMIT_NOFILE` is raised to the hard limit first; the children inherit it.
//!
//! The client is a minimal HTTP/1.1 client over tokio's `TcpStream` with `TCP_NODELAY`, one TCP
//! connection per stream, on a multi-threaded tokio runtime; it decodes the chunked body in the
//! task that reads the socket. It counts the `data:` lines of each body and checks that they are
//! exactly `token 0` .. `token N-1`, in order (a bare broadcast joined mid-stream may start at any
//! token, and must go on in order, with no gap, from there). Each figure also gets its ratio to
//! bare, and each fan-out figure its ratio to bare broadcast too, measured in the same run.
//!
//! # Scenarios (`--scenarios` takes a comma-separated subset of these names)
//!
//! | name | what | figures |
//! |---|---|---|
//! | `throughput` | one connection, `tokens=1000000&interval_ms=0` | events/s; CPU per event of the server, of this tool (and of a private redis-server); RSS per stored event (RSS of the server after the session completed minus before, over the events); Redis: round trips per event, Redis `used_memory` per event |
//! | `fanout` | one session with 1,000 subscribers, then 10,000, at an event every 10 ms, then 10,000 at an event every 100 ms; `stamp=1`; a 5 s window once every subscriber streams. Bare is measured twice: **bare** (independent streams): as many connections, each with a generator and timer of its own at the same rate, since bare SSE has no sharing (when the server falls behind, the timers slip and far fewer events are made: a smaller load than the layer's); **bare broadcast**: `&broadcast=1`, one generator per session whose encoded frames every connection gets, joined mid-stream: the layer's work without resumability | p50 and p99 of emit-to-receipt latency of the events emitted in the window, events received over the nominal count (subscribers x window / interval), CPU of the server (utime + stime, % of one core); Redis: round trips per event, connections, CPU of redis-server. The layer's ratios are given to both baselines; the p99 target is checked against bare broadcast (same load), with the ratio to independent streams printed beside it |
//! | `breadth` | 1,000 sessions with one subscriber each, 1,000 events each, interval 0, all started at once | aggregate events/s; Redis: round trips per event, connections |
//! | `resume` | sessions of 100,000 and 1,000,000 events run to completion, then 50 requests each with `Last-Event-ID` in the middle, 20 ms apart, each on a new connection | median time from sending the request to the first replayed byte (bare: to the first byte of a new stream) |
//! | `idle` | 1,000 connections that got one event and wait (`interval_ms=3600000`), each its own session, then all on one shared session | server RSS per connection (after minus before, over the connections) |
//!
//! Redis round trips are the difference of `INFO commandstats` calls before and after, counting
//! every command but those the store's Lua scripts run inside Redis (`HGET`, `XADD`, ...) and this
//! tool's own (`INFO`, `CLIENT`), divided by the events. Redis connections are the `CLIENT LIST`
//! entries during the scenario less those before the server started (the tool's own connection is
//! named `loadgen` and not counted).
//!
//! `--quick` runs every scenario at a tiny size (10,000 events, 50 subscribers, 1 s windows) for
//! CI. The tool exits non-zero when any scenario fails: a wrong count, a gap, an error, a timeout.
//! `--repeat K` runs every scenario K times (modes interleaved) and reports medians. `--modes`
//! takes `bare`, `memory` and `redis`; `bare` brings both bare baselines into `fanout`. `--chat
//! PATH` runs that `chat` executable instead of building one (to measure another build of the
//! crate).
//! The table goes to stdout; with `--json`, a JSON document goes to stdout instead and the table
//! to stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

const USAGE: &str = "usage: loadgen [--quick] [--redis URL] [--json] [--repeat K] \
                     [--scenarios throughput,fanout,breadth,resume,idle] \
                     [--modes bare,memory,redis] [--chat PATH]";
const SCENARIOS: [&str; 5] = ["throughput", "fanout", "breadth", "resume", "idle"];
/// The longest a stream may stay silent before it counts as failed.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections being set up at once (the server's accept backlog is 1,024).
const CONNECT_CONCURRENCY: usize = 256;
/// The pause before each resume request: a reconnect finds the server idle, not still busy with
/// the replay the previous request dropped.
const RESUME_GAP: Duration = Duration::from_millis(20);
/// The pause of a fan-out stream between events.
const FANOUT_INTERVAL_MS: u64 = 10;
/// Commands the store's Lua scripts run inside Redis: not round trips.
const SCRIPT_COMMANDS: [&str; 12] = [
    "del",
    "exists",
    "hget",
    "hmget",
    "hset",
    "pexpire",
    "publish",
    "set",
    "xadd",
    "xrange",
    "xrevrange",
    "xtrim",
];
/// Commands this tool sends to Redis itself.
const OWN_COMMANDS: [&str; 2] = ["info", "client"];

// --- Options -----------------------------------------------------------------------------------

struct Args {
    quick: bool,
    redis: Option<String>,
    json: bool,
    repeat: usize,
    scenarios: Vec<String>,
    modes: Vec<String>,
    chat: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut out = Args {
        quick: false,
        redis: None,
        json: false,
        repeat: 1,
        scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        modes: ["bare", "memory", "redis"].map(String::from).to_vec(),
        chat: None,
    };
    let list = |v: String| v.split(',').map(str::to_owned).collect::<Vec<_>>();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--quick" => out.quick = true,
            "--json" => out.json = true,
            "--redis" => out.redis = Some(value("--redis")?),
            "--repeat" => {
                out.repeat = value("--repeat")?
                    .parse()
                    .ok()
                    .filter(|&k| k > 0)
                    .ok_or("--repeat needs a positive number")?
            }
            "--scenarios" => out.scenarios = list(value("--scenarios")?),
            "--modes" => out.modes = list(value("--modes")?),
            "--chat" => out.chat = Some(PathBuf::from(value("--chat")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    for s in &out.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            return Err(format!("unknown scenario `{s}`"));
        }
    }
    for m in &out.modes {
        if !["bare", "memory", "redis"].contains(&m.as_str()) {
            return Err(format!("unknown mode `{m}`"));
        }
    }
    Ok(out)
}

/// The size of every scenario.
#[derive(Clone, Debug)]
struct Sizes {
    throughput_events: u64,
    /// Subscribers and the pause between events (ms) of each fan-out run.
    fanout: Vec<(usize, u64)>,
    fanout_window: Duration,
    /// How long a fan-out stream lasts at most (the subscribers leave after the window).
    fanout_stream: Duration,
    breadth_sessions: usize,
    breadth_events: u64,
    resume_sessions: Vec<u64>,
    resume_requests: usize,
    idle_connections: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                throughput_events: 10_000,
                fanout: vec![(50, FANOUT_INTERVAL_MS)],
                fanout_window: Duration::from_secs(1),
                fanout_stream: Duration::from_secs(30),
                breadth_sessions: 50,
                breadth_events: 200,
                resume_sessions: vec![5_000, 20_000],
                resume_requests: 10,
                idle_connections: 50,
            }
        } else {
            Self {
                throughput_events: 1_000_000,
                // 10,000 subscribers at 10 ms is a million writes per second, more than two
                // shared cores serve; 10,000 at 100 ms is the load of 1,000 at 10 ms.
                fanout: vec![
                    (1_000, FANOUT_INTERVAL_MS),
                    (10_000, FANOUT_INTERVAL_MS),
                    (10_000, 10 * FANOUT_INTERVAL_MS),
                ],
                fanout_window: Duration::from_secs(5),
                fanout_stream: Duration::from_secs(180),
                breadth_sessions: 1_000,
                breadth_events: 1_000,
                resume_sessions: vec![100_000, 1_000_000],
                resume_requests: 50,
                idle_connections: 1_000,
            }
        }
    }
}

// --- Child processes ---------------------------------------------------------------------------

/// A process started through `sh`, which kills it (SIGKILL) as soon as our end of its stdin
/// closes: when this value is dropped, or when the tool exits in any way.
struct Wrapped {
    pid: u32,
    shell: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Wrapped {
    /// Starts `program args..`; its stdout lines are readable through [`Self::wait_line`].
    fn start(program: &Path, args: &[String], quiet: bool) -> Result<Self, String> {
        let redirect = if quiet { ">/dev/null 2>&1" } else { "" };
        let script = format!(
            "\"$0\" \"$@\" {redirect} & pid=$!; echo \"pid $pid\"; read _; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null"
        );
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdout = shell.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err_pipe = shell.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() < 1000 {
                    kept.push(line);
                }
            }
        });
        let mut child = Self {
            pid: 0,
            stdin: shell.stdin.take(),
            shell,
            lines,
            stderr,
        };
        let pid = child.wait_line("pid ", Duration::from_secs(10))?;
        child.pid = pid
            .parse()
            .map_err(|_| format!("bad pid line from sh: {pid}"))?;
        Ok(child)
    }

    /// Waits for a stdout line that starts with `prefix`; returns the rest of it.
    fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "no `{prefix}` line within {timeout:?}; stderr: {}",
                        self.stderr_tail(5)
                    ))
                }
            }
        }
    }

    fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(n);
        lines[start..].join(" | ")
    }

    fn stderr_lines(&self) -> usize {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.shell.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// `chat --bare`; in fan-out, independent streams: a generator per connection.
    Bare,
    /// `chat --bare` with `broadcast=1`: a generator per session, its frames written to every
    /// connection of the session. Fan-out only; it runs with `--modes bare`.
    BareBroadcast,
    Memory,
    Redis,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::BareBroadcast => "bare broadcast",
            Mode::Memory => "memory",
            Mode::Redis => "redis",
        }
    }

    /// The mode's key in the JSON document.
    fn key(self) -> &'static str {
        match self {
            Mode::BareBroadcast => "bare_broadcast",
            m => m.name(),
        }
    }

    /// Whether the server runs without the layer.
    fn is_bare(self) -> bool {
        matches!(self, Mode::Bare | Mode::BareBroadcast)
    }
}

/// A running `chat` example.
struct Server {
    addr: SocketAddr,
    process: Wrapped,
}

impl Server {
    fn start(ctx: &Ctx, mode: Mode) -> Result<Self, String> {
        let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        match mode {
            Mode::Bare | Mode::BareBroadcast => args.push("--bare".to_owned()),
            Mode::Memory => {}
            Mode::Redis => {
                let url = ctx.redis.as_ref().ok_or("no Redis")?.url.clone();
                args.extend(["--redis".to_owned(), url]);
            }
        }
        let process = Wrapped::start(&ctx.chat, &args, false)?;
        let addr = process.wait_line("listening on http://", Duration::from_secs(20))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("bad address from chat: {addr}"))?;
        let server = Self { addr, process };
        server.check_nofile(ctx)?;
        Ok(server)
    }

    /// The child must have inherited the raised open-file limit.
    fn check_nofile(&self, ctx: &Ctx) -> Result<(), String> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.process.pid))
            .map_err(|e| format!("cannot read the server's limits: {e}"))?;
        let soft = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok());
        match soft {
            Some(soft) if soft < ctx.nofile => Err(format!(
                "the server's open-file limit is {soft}, not the {} the tool set",
                ctx.nofile
            )),
            _ => Ok(()),
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid
    }

    fn rss_bytes(&self) -> Result<u64, String> {
        rss_bytes(self.pid())
    }

    fn cpu_ticks(&self) -> Result<u64, String> {
        cpu_ticks(self.pid())
    }
}

fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS for {pid}"))
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces: the fields that follow start after the last `)`.
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).ok_or("utime")?;
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).ok_or("stime")?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// --- Redis -------------------------------------------------------------------------------------

/// A minimal RESP client for the tool's own questions to Redis (`INFO`, `CLIENT LIST`).
struct RedisAdmin {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

/// A reply; integers and arrays are read through and not kept (the tool needs none).
#[derive(Debug)]
enum Resp {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Other,
}

impl RedisAdmin {
    fn connect(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("not a redis:// URL: {url}"))?;
        let (auth, host) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let host = host.split('/').next().unwrap_or_default();
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        let stream =
            std::net::TcpStream::connect(&host).map_err(|e| format!("redis {host}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut admin = Self {
            reader: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
            writer: stream,
        };
        if let Some(auth) = auth {
            let (user, pass) = auth.split_once(':').unwrap_or(("", auth));
            if user.is_empty() {
                admin.command(&["AUTH", pass])?;
            } else {
                admin.command(&["AUTH", user, pass])?;
            }
        }
        admin.command(&["CLIENT", "SETNAME", "loadgen"])?;
        Ok(admin)
    }

    fn command(&mut self, args: &[&str]) -> Result<Resp, String> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.writer.write_all(&out).map_err(|e| e.to_string())?;
        self.read()
    }

    fn read(&mut self) -> Result<Resp, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1.min(line.len()));
        let number = || rest.parse::<i64>().map_err(|_| format!("bad RESP: {line}"));
        match kind {
            "+" => Ok(Resp::Simple(rest.to_owned())),
            "-" => Err(format!("redis: {rest}")),
            ":" => number().map(|_| Resp::Other),
            "$" => {
                let n = number()?;
                if n < 0 {
                    return Ok(Resp::Bulk(None));
                }
                let mut buf = vec![0; n as usize + 2];
                self.reader
                    .read_exact(&mut buf)
                    .map_err(|e| e.to_string())?;
                buf.truncate(n as usize);
                Ok(Resp::Bulk(Some(buf)))
            }
            "*" => {
                for _ in 0..number()?.max(0) {
                    self.read()?;
                }
                Ok(Resp::Other)
            }
            _ => Err(format!("bad RESP: {line}")),
        }
    }

    fn text(&mut self, args: &[&str]) -> Result<String, String> {
        match self.command(args)? {
            Resp::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Resp::Simple(s) => Ok(s),
            other => Err(format!("unexpected reply to {args:?}: {other:?}")),
        }
    }

    /// Calls per command name, from `INFO commandstats`.
    fn commandstats(&mut self) -> Result<BTreeMap<String, u64>, String> {
        let info = self.text(&["INFO", "commandstats"])?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect())
    }

    fn used_memory(&mut self) -> Result<u64, String> {
        let info = self.text(&["INFO", "memory"])?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "no used_memory".to_owned())
    }

    /// Connected clients, not counting this one.
    fn other_clients(&mut self) -> Result<usize, String> {
        let list = self.text(&["CLIENT", "LIST"])?;
        Ok(list
            .lines()
            .filter(|l| !l.is_empty() && !l.contains(" name=loadgen "))
            .count())
    }
}

/// Round trips between two `INFO commandstats`: every command a client sent, which is every
/// command counted except those the store's scripts run inside Redis and this tool's own.
fn round_trips(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after
        .iter()
        .filter(|(name, _)| {
            let base = name.split('|').next().unwrap_or(name);
            !SCRIPT_COMMANDS.contains(&base) && !OWN_COMMANDS.contains(&base)
        })
        .map(|(name, &calls)| calls.saturating_sub(before.get(name).copied().unwrap_or(0)))
        .sum()
}

/// The Redis the `redis` mode uses, and the tool's admin connection to it.
struct RedisTarget {
    url: String,
    admin: Mutex<RedisAdmin>,
    /// The private server, when the tool started one.
    server: Option<Wrapped>,
}

impl RedisTarget {
    fn admin<T>(&self, f: impl FnOnce(&mut RedisAdmin) -> Result<T, String>) -> Result<T, String> {
        let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        tokio::task::block_in_place(|| f(&mut admin))
    }

    fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.pid)
    }
}

fn start_private_redis(dir: &Path) -> Result<Option<RedisTarget>, String> {
    let have = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        let why = "redis-server is not on PATH (install redis-server or pass --redis URL)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err(format!("the redis mode cannot run under CI=true: {why}"));
        }
        eprintln!("SKIP: the layer + Redis mode is skipped: {why}");
        return Ok(None);
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))?;
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let server = Wrapped::start(Path::new("redis-server"), &args, true)?;
    let url = format!("redis://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    let admin = loop {
        if let Ok(mut admin) = RedisAdmin::connect(&url) {
            if admin.command(&["PING"]).is_ok() {
                break admin;
            }
        }
        if Instant::now() > deadline {
            return Err("the private redis-server did not start".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Some(RedisTarget {
        url,
        admin: Mutex::new(admin),
        server: Some(server),
    }))
}

// --- HTTP client -------------------------------------------------------------------------------
//
// A minimal HTTP/1.1 client: one request per TCP connection, the chunked body decoded in the task
// that reads the socket. (hyper's client hands every chunk from its connection task to the body's
// reader through a one-slot channel; with one chunk per event that hand-over, not the server, was
// the bottleneck of a single-connection stream: about 75,000 events/s.)

/// A connected socket, ready for one request.
struct Conn {
    tcp: TcpStream,
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(Conn { tcp })
}

impl Conn {
    /// Sends `GET path` and reads the response head; returns the body of a `200`.
    async fn get(mut self, path: &str, last_event_id: Option<&str>) -> Result<Body, String> {
        let mut req =
            format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("last-event-id: {id}\r\n"));
        }
        req.push_str("\r\n");
        self.tcp
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0;
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf[..len], b"\r\n\r\n") {
                break i + 4;
            }
            if len == buf.len() {
                return Err("response head too large".to_owned());
            }
            let n = timeout_read(&mut self.tcp, &mut buf[len..]).await?;
            if n == 0 {
                return Err("connection closed before the response head".to_owned());
            }
            len += n;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if status != "200" {
            return Err(format!("status {status} for {path}"));
        }
        let framing = if head.contains("\r\ntransfer-encoding: chunked\r\n") {
            Framing::Chunked(Chunked::Size(0))
        } else if let Some(n) = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
        {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        Ok(Body {
            tcp: self.tcp,
            buf,
            start: head_end,
            end: len,
            framing,
        })
    }
}

async fn timeout_read(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<usize, String> {
    match tokio::time::timeout(FRAME_TIMEOUT, tcp.read(buf)).await {
        Err(_) => Err("nothing received for 30 s".to_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(n)) => Ok(n),
    }
}

enum Framing {
    Chunked(Chunked),
    Length(u64),
    UntilClose,
}

/// Where a chunked-body decoder is.
#[derive(Clone, Copy)]
enum Chunked {
    /// In a chunk-size line, with the size read so far.
    Size(u64),
    /// In a chunk extension, with the size.
    Extension(u64),
    /// After the CR of the size line.
    SizeLf(u64),
    /// In chunk data, with the bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk (trailers are not read).
    Done,
}

impl Chunked {
    /// Decodes `input`, handing each run of body bytes to `f`.
    fn feed(&mut self, mut input: &[u8], f: &mut impl FnMut(&[u8])) -> Result<(), String> {
        while let Some(&b) = input.first() {
            match *self {
                Chunked::Data(left) => {
                    let n = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    f(&input[..n]);
                    input = &input[n..];
                    *self = match left - n as u64 {
                        0 => Chunked::DataCr,
                        left => Chunked::Data(left),
                    };
                    continue;
                }
                Chunked::Done => return Ok(()),
                state => {
                    *self = match (state, b) {
                        (Chunked::Size(n), b'0'..=b'9') => {
                            Chunked::Size(n * 16 + u64::from(b - b'0'))
                        }
                        (Chunked::Size(n), b'a'..=b'f') => {
                            Chunked::Size(n * 16 + u64::from(b - b'a' + 10))
                        }
                        (Chunked::Size(n), b'A'..=b'F') => {
                            Chunked::Size(n * 16 + u64::from(b - b'A' + 10))
                        }
                        (Chunked::Size(n), b';') => Chunked::Extension(n),
                        (Chunked::Size(n) | Chunked::Extension(n), b'\r') => Chunked::SizeLf(n),
                        (Chunked::Extension(n), _) => Chunked::Extension(n),
                        (Chunked::SizeLf(0), b'\n') => Chunked::Done,
                        (Chunked::SizeLf(n), b'\n') => Chunked::Data(n),
                        (Chunked::DataCr, b'\r') => Chunked::DataLf,
                        (Chunked::DataLf, b'\n') => Chunked::Size(0),
                        _ => return Err(format!("bad chunked encoding at byte {b:#04x}")),
                    };
                    input = &input[1..];
                }
            }
        }
        Ok(())
    }
}

/// A response body being read.
struct Body {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// Received bytes not decoded yet: `buf[start..end]`.
    start: usize,
    end: usize,
    framing: Framing,
}

impl Body {
    /// Decodes what was received (reading from the socket once when nothing was), handing each run
    /// of body bytes to `f`. Returns `false` at the end of the body.
    async fn next(&mut self, mut f: impl FnMut(&[u8])) -> Result<bool, String> {
        if self.start == self.end {
            if self.is_done() {
                return Ok(false);
            }
            let n = timeout_read(&mut self.tcp, &mut self.buf).await?;
            self.start = 0;
            self.end = n;
            if n == 0 {
                return match self.framing {
                    Framing::UntilClose => Ok(false),
                    _ => Err("connection closed in the middle of the body".to_owned()),
                };
            }
        }
        let input = &self.buf[self.start..self.end];
        self.start = self.end;
        match &mut self.framing {
            Framing::Chunked(state) => state.feed(input, &mut f)?,
            Framing::Length(left) => {
                let n = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                f(&input[..n]);
                *left -= n as u64;
            }
            Framing::UntilClose => f(input),
        }
        Ok(!self.is_done())
    }

    fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Chunked(Chunked::Done) | Framing::Length(0)
        )
    }
}

/// Splits a byte stream into lines (without the line end).
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, mut chunk: &[u8], mut f: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                None => {
                    self.partial.extend_from_slice(chunk);
                    return;
                }
                Some(i) => {
                    self.partial.extend_from_slice(&chunk[..i]);
                    f(trim_cr(&self.partial));
                    self.partial.clear();
                    chunk = &chunk[i + 1..];
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', chunk) {
            f(trim_cr(&chunk[..i]));
            chunk = &chunk[i + 1..];
        }
        self.partial.extend_from_slice(chunk);
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// `token N` or `token N @STAMP`.
fn parse_token(data: &[u8]) -> Option<(u64, Option<u64>)> {
    let rest = data.strip_prefix(b"token ")?;
    match memchr::memchr(b' ', rest) {
        None => Some((parse_u64(rest)?, None)),
        Some(i) => Some((
            parse_u64(&rest[..i])?,
            Some(parse_u64(rest[i + 1..].strip_prefix(b"@")?)?),
        )),
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What a stream read returned.
struct Streamed {
    /// The events read.
    events: u64,
    first_id: Option<String>,
}

/// Reads an event stream, checking that its data are `token 0`, `token 1`, ... in order. `on_event`
/// gets each token, its stamp and the receipt time (µs since the epoch); it returns `false` to stop
/// reading. With `expect`, the stream must end after exactly that many events.
async fn read_tokens(
    body: &mut Body,
    expect: Option<u64>,
    on_event: impl FnMut(u64, Option<u64>, u64) -> bool,
) -> Result<Streamed, String> {
    read_tokens_from(body, Some(0), expect, on_event).await
}

/// [`read_tokens`] of a stream that starts at token `first`, or, when `first` is `None`, at any
/// token (a broadcast joined mid-stream): from there on the tokens must follow in order, with no
/// gap.
async fn read_tokens_from(
    body: &mut Body,
    first: Option<u64>,
    expect: Option<u64>,
    mut on_event: impl FnMut(u64, Option<u64>, u64) -> bool,
) -> Result<Streamed, String> {
    let mut lines = Lines::default();
    // The token expected next; `None` until the first one of a stream that may start anywhere.
    let mut next = first;
    let mut events = 0u64;
    let mut first_id = None;
    let mut error = None;
    let mut stop = false;
    loop {
        let mut now = 0;
        let more = body
            .next(|bytes| {
                if now == 0 {
                    now = unix_micros();
                }
                lines.feed(bytes, |line| {
                    if stop || error.is_some() {
                        return;
                    }
                    if let Some(data) = line.strip_prefix(b"data: ") {
                        match parse_token(data) {
                            Some((n, stamp)) if next.unwrap_or(n) == n => {
                                next = Some(n + 1);
                                events += 1;
                                if !on_event(n, stamp, now) {
                                    stop = true;
                                }
                            }
                            _ => {
                                let expected =
                                    next.map_or("a token".to_owned(), |n| format!("`token {n}`"));
                                error = Some(format!(
                                    "expected {expected}, got `{}`",
                                    String::from_utf8_lossy(data)
                                ))
                            }
                        }
                    } else if let Some(id) = line.strip_prefix(b"id: ") {
                        if first_id.is_none() {
                            first_id = Some(String::from_utf8_lossy(id).into_owned());
                        }
                    }
                })
            })
            .await
            .map_err(|e| format!("{e} (after {events} events)"))?;
        if let Some(e) = error {
            return Err(e);
        }
        if stop {
            return Ok(Streamed { events, first_id });
        }
        if !more {
            break;
        }
    }
    match expect {
        Some(n) if n != events => Err(format!("expected {n} events, got {events}")),
        _ => Ok(Streamed { events, first_id }),
    }
}

// --- Results -----------------------------------------------------------------------------------

struct Figure {
    key: String,
    label: String,
    unit: &'static str,
    /// Whether a ratio to bare means something for this figure.
    ratio: bool,
    values: BTreeMap<Mode, Vec<f64>>,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn record(
        &mut self,
        key: &str,
        label: &str,
        unit: &'static str,
        ratio: bool,
        mode: Mode,
        value: f64,
    ) {
        let idx = match self.figures.iter().position(|f| f.key == key) {
            Some(i) => i,
            None => {
                self.figures.push(Figure {
                    key: key.to_owned(),
                    label: label.to_owned(),
                    unit,
                    ratio,
                    values: BTreeMap::new(),
                });
                self.figures.len() - 1
            }
        };
        self.figures[idx]
            .values
            .entry(mode)
            .or_default()
            .push(value);
    }

    fn median(&self, key: &str, mode: Mode) -> Option<f64> {
        let f = self.figures.iter().find(|f| f.key == key)?;
        median(f.values.get(&mode)?)
    }

    fn fail(&mut self, scenario: &str, mode: Mode, error: impl std::fmt::Display) {
        let line = format!("{scenario} [{}]: {error}", mode.name());
        eprintln!("FAILED: {line}");
        self.failures.push(line);
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The `q` quantile (nearest rank) of sorted values.
fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if v.abs() >= 10_000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 || v == 0.0 {
        format!("{v:.2}")
    } else {
        // Three significant digits.
        let digits = (2 - v.abs().log10().floor() as i32).clamp(2, 9) as usize;
        format!("{v:.digits$}")
    }
}

// --- Scenarios ---------------------------------------------------------------------------------

struct Ctx {
    chat: PathBuf,
    sizes: Sizes,
    redis: Option<RedisTarget>,
    clk_tck: u64,
    nofile: u64,
    /// Distinguishes this run's session ids from any other's (a shared Redis).
    run: String,
}

impl Ctx {
    fn redis(&self) -> &RedisTarget {
        self.redis
            .as_ref()
            .expect("the redis mode runs only with a Redis")
    }
}

#[derive(Clone, Copy, Debug)]
enum Job {
    Throughput,
    Fanout {
        subscribers: usize,
        interval_ms: u64,
    },
    Breadth,
    Resume,
    Idle {
        shared: bool,
    },
}

impl Job {
    fn name(self) -> String {
        match self {
            Job::Throughput => "throughput".to_owned(),
            Job::Fanout {
                subscribers,
                interval_ms,
            } => format!("fanout {subscribers} @{interval_ms}ms"),
            Job::Breadth => "breadth".to_owned(),
            Job::Resume => "resume".to_owned(),
            Job::Idle { shared: false } => "idle".to_owned(),
            Job::Idle { shared: true } => "idle shared".to_owned(),
        }
    }
}

/// One scenario on one fresh server.
struct Run<'a> {
    ctx: &'a Ctx,
    server: &'a Server,
    mode: Mode,
    /// Clients Redis had before the server started (redis mode).
    redis_baseline: Option<usize>,
    /// Unique per scenario run, for session ids.
    tag: String,
}

impl Run<'_> {
    fn session(&self, name: impl std::fmt::Display) -> String {
        format!("{}-{}-{name}", self.ctx.run, self.tag)
    }

    fn redis_connections(&self) -> Result<Option<f64>, String> {
        let Some(baseline) = self.redis_baseline else {
            return Ok(None);
        };
        let now = self.ctx.redis().admin(RedisAdmin::other_clients)?;
        Ok(Some(now.saturating_sub(baseline) as f64))
    }

    fn commandstats(&self) -> Result<Option<BTreeMap<String, u64>>, String> {
        if self.mode != Mode::Redis {
            return Ok(None);
        }
        self.ctx.redis().admin(RedisAdmin::commandstats).map(Some)
    }
}

/// A fresh server, warmed up by two short streams so that its runtime threads and allocator
/// arenas exist before anything is measured.
async fn warm_server(ctx: &Ctx, mode: Mode, tag: &str) -> Result<Server, String> {
    let server = Server::start(ctx, mode)?;
    for i in 0..2 {
        let conn = connect(server.addr).await?;
        let path = format!("/chat?session_id={}-{tag}-warm{i}&tokens=100", ctx.run);
        let mut body = conn.get(&path, None).await?;
        read_tokens(&mut body, Some(100), |_, _, _| true).await?;
    }
    Ok(server)
}

async fn throughput(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    let n = ctx.sizes.throughput_events;
    let redis_before = if mode == Mode::Redis {
        Some(
            ctx.redis()
                .admin(|a| Ok((a.commandstats()?, a.used_memory()?)))?,
        )
    } else {
        None
    };
    let rss_before = server.rss_bytes()?;
    let conn = connect(server.addr).await?;
    let path = format!("/chat?session_id={}&tokens={n}", run.session("tp"));
    let redis_pid = match mode {
        Mode::Redis => ctx.redis().server_pid(),
        _ => None,
    };
    let redis_cpu0 = redis_pid.map(cpu_ticks).transpose()?;
    let (server_cpu0, client_cpu0) = (server.cpu_ticks()?, cpu_ticks(std::process::id())?);
    let start = Instant::now();
    let mut body = conn.get(&path, None).await?;
    read_tokens(&mut body, Some(n), |_, _, _| true).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let (server_cpu1, client_cpu1) = (server.cpu_ticks()?, cpu_ticks(std::process::id())?);
    let redis_cpu1 = redis_pid.map(cpu_ticks).transpose()?;
    drop(body);
    let us_per_event = |ticks: u64| ticks as f64 / ctx.clk_tck as f64 * 1_000_000.0 / n as f64;
    if let (Some(c0), Some(c1)) = (redis_cpu0, redis_cpu1) {
        rep.record(
            "one_connection.redis_cpu_us_per_event",
            "one connection: redis-server CPU per event",
            "µs/event",
            false,
            mode,
            us_per_event(c1 - c0),
        );
    }
    rep.record(
        "one_connection.server_cpu_us_per_event",
        "one connection: server CPU per event",
        "µs/event",
        true,
        mode,
        us_per_event(server_cpu1 - server_cpu0),
    );
    rep.record(
        "one_connection.client_cpu_us_per_event",
        "one connection: client (this tool) CPU per event",
        "µs/event",
        true,
        mode,
        us_per_event(client_cpu1 - client_cpu0),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = server.rss_bytes()?;
    rep.record(
        "one_connection.events_per_s",
        &format!("one connection, {n} events, interval 0"),
        "events/s",
        true,
        mode,
        n as f64 / elapsed,
    );
    rep.record(
        "stored.rss_bytes_per_event",
        &format!("server RSS growth per event after a {n}-event session completed"),
        "B/event",
        false,
        mode,
        (rss_after as f64 - rss_before as f64) / n as f64,
    );
    if let Some((stats, mem)) = redis_before {
        let (stats_after, mem_after) = ctx
            .redis()
            .admin(|a| Ok((a.commandstats()?, a.used_memory()?)))?;
        rep.record(
            "one_connection.round_trips_per_event",
            "Redis round trips per event, one connection",
            "trips/event",
            false,
            mode,
            round_trips(&stats, &stats_after) as f64 / n as f64,
        );
        rep.record(
            "stored.redis_bytes_per_event",
            "Redis used_memory growth per stored event",
            "B/event",
            false,
            mode,
            (mem_after as f64 - mem as f64) / n as f64,
        );
    }
    Ok(())
}

/// Shared by the subscribers of a fan-out run.
#[derive(Default)]
struct FanShared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Stamps (µs since the epoch) of the measured window; 0 until set.
    window_start: AtomicU64,
    window_end: AtomicU64,
    changed: Notify,
}

/// One subscriber of a fan-out run. With `mid_stream`, its stream may start at any token (a
/// broadcast it joins), else at `token 0` (a session it replays from the start, or a stream of its
/// own).
async fn fanout_subscriber(
    addr: SocketAddr,
    path: String,
    mid_stream: bool,
    shared: Arc<FanShared>,
    permits: Arc<Semaphore>,
) -> Result<Vec<u32>, String> {
    let permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
    let conn = connect(addr).await?;
    let mut body = conn.get(&path, None).await?;
    drop(permit);
    let mut latencies = Vec::new();
    let mut first = true;
    let start = if mid_stream { None } else { Some(0) };
    let streamed = read_tokens_from(&mut body, start, None, |_, stamp, now| {
        if first {
            first = false;
            shared.ready.fetch_add(1, Ordering::SeqCst);
            shared.changed.notify_waiters();
        }
        let Some(stamp) = stamp else { return true };
        let start = shared.window_start.load(Ordering::Relaxed);
        let end = shared.window_end.load(Ordering::Relaxed);
        if start != 0 && stamp >= start && stamp < end {
            latencies.push(u32::try_from(now.saturating_sub(stamp)).unwrap_or(u32::MAX));
        }
        // Leave on the first event emitted after the window.
        end == 0 || stamp < end
    })
    .await?;
    if shared.window_end.load(Ordering::Relaxed) == 0 {
        return Err(format!(
            "the stream ended after {} events, before the window",
            streamed.events
        ));
    }
    Ok(latencies)
}

async fn fanout(
    run: &Run<'_>,
    subscribers: usize,
    interval_ms: u64,
    rep: &mut Report,
) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    let window = ctx.sizes.fanout_window;
    let tokens = ctx.sizes.fanout_stream.as_millis() as u64 / interval_ms;
    // Bare broadcast: one generator per session, joined mid-stream by all but the first.
    let broadcast = mode == Mode::BareBroadcast;
    let path = format!(
        "/chat?session_id={}&tokens={tokens}&interval_ms={interval_ms}&stamp=1{}",
        run.session("fan"),
        if broadcast { "&broadcast=1" } else { "" }
    );
    let shared = Arc::new(FanShared::default());
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let connect_start = Instant::now();
    for _ in 0..subscribers {
        let (shared, permits, path) = (shared.clone(), permits.clone(), path.clone());
        let addr = server.addr;
        tasks.spawn(async move {
            let r = fanout_subscriber(addr, path, broadcast, shared.clone(), permits).await;
            if r.is_err() {
                shared.failed.fetch_add(1, Ordering::SeqCst);
                shared.changed.notify_waiters();
            }
            r
        });
    }
    // Wait until every subscriber streams.
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let notified = shared.changed.notified();
        let ready = shared.ready.load(Ordering::SeqCst);
        if shared.failed.load(Ordering::SeqCst) > 0 {
            while let Some(r) = tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    return Err(format!("a subscriber failed while connecting: {e}"));
                }
            }
        }
        if ready == subscribers {
            break;
        }
        if Instant::now() > connect_deadline {
            return Err(format!(
                "only {ready} of {subscribers} subscribers streaming after 120 s"
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
    let connect_time = connect_start.elapsed();
    // The window opens once every subscriber streams, after a short settling time.
    let settle = Duration::from_millis(500);
    let start_us = unix_micros() + settle.as_micros() as u64;
    shared.window_start.store(start_us, Ordering::SeqCst);
    shared
        .window_end
        .store(start_us + window.as_micros() as u64, Ordering::SeqCst);
    tokio::time::sleep(settle).await;
    let redis_pid = ctx.redis.as_ref().and_then(RedisTarget::server_pid);
    let cpu0 = server.cpu_ticks()?;
    let redis_cpu0 = match (mode, redis_pid) {
        (Mode::Redis, Some(pid)) => Some(cpu_ticks(pid)?),
        _ => None,
    };
    let stats0 = run.commandstats()?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = server.cpu_ticks()?;
    let redis_cpu1 = match (redis_cpu0, redis_pid) {
        (Some(_), Some(pid)) => Some(cpu_ticks(pid)?),
        _ => None,
    };
    let secs = t0.elapsed().as_secs_f64();
    let stats1 = run.commandstats()?;
    let connections = run.redis_connections()?;
    // Every subscriber leaves on its first event stamped after the window.
    let mut latencies = Vec::new();
    let collect = async {
        while let Some(r) = tasks.join_next().await {
            latencies.extend(r.map_err(|e| e.to_string())??);
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .map_err(|_| "subscribers still streaming 120 s after the window".to_owned())??;
    latencies.sort_unstable();
    let nominal = window.as_millis() as f64 / interval_ms as f64;
    let key = |k: &str| format!("fanout_{subscribers}_{interval_ms}ms.{k}");
    let label = |k: &str| format!("fan-out to {subscribers}, an event every {interval_ms} ms: {k}");
    rep.record(
        &key("p50_ms"),
        &label("p50 latency"),
        "ms",
        true,
        mode,
        quantile(&latencies, 0.50) / 1000.0,
    );
    rep.record(
        &key("p99_ms"),
        &label("p99 latency"),
        "ms",
        true,
        mode,
        quantile(&latencies, 0.99) / 1000.0,
    );
    rep.record(
        &key("delivered_pct"),
        &label("events received of nominal"),
        "%",
        true,
        mode,
        latencies.len() as f64 / (subscribers as f64 * nominal) * 100.0,
    );
    rep.record(
        &key("cpu_pct"),
        &label("server CPU"),
        "% of a core",
        true,
        mode,
        (cpu1 - cpu0) as f64 / ctx.clk_tck as f64 / secs * 100.0,
    );
    if let (Some(stats0), Some(stats1)) = (stats0, stats1) {
        // Every subscriber of the one session gets every event emitted in the window.
        let emitted = latencies.len() as f64 / subscribers as f64;
        rep.record(
            &key("round_trips_per_event"),
            &label("Redis round trips per event emitted"),
            "trips/event",
            false,
            mode,
            round_trips(&stats0, &stats1) as f64 / emitted.max(1.0),
        );
    }
    if let Some(c) = connections {
        rep.record(
            &key("redis_connections"),
            &label("Redis connections of the server"),
            "connections",
            false,
            mode,
            c,
        );
    }
    if let (Some(c0), Some(c1)) = (redis_cpu0, redis_cpu1) {
        rep.record(
            &key("redis_cpu_pct"),
            &label("redis-server CPU"),
            "% of a core",
            false,
            mode,
            (c1 - c0) as f64 / ctx.clk_tck as f64 / secs * 100.0,
        );
    }
    eprintln!(
        "  fanout {subscribers} @{interval_ms}ms [{}]: all streaming after {:.1} s, {} samples",
        mode.name(),
        connect_time.as_secs_f64(),
        latencies.len()
    );
    Ok(())
}

async fn breadth(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    let sessions = ctx.sizes.breadth_sessions;
    let n = ctx.sizes.breadth_events;
    // Open every connection first, then start every session at once.
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let go = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let (permits, go) = (permits.clone(), go.clone());
        let addr = server.addr;
        let path = format!("/chat?session_id={}&tokens={n}", run.session(i));
        tasks.spawn(async move {
            let conn = async {
                let _permit = permits.acquire().await.map_err(|e| e.to_string())?;
                connect(addr).await
            }
            .await;
            go.wait().await;
            let mut body = conn?.get(&path, None).await?;
            read_tokens(&mut body, Some(n), |_, _, _| true).await?;
            Ok::<Instant, String>(Instant::now())
        });
    }
    let stats0 = run.commandstats()?;
    go.wait().await;
    let start = Instant::now();
    let mut connections = None;
    let mut last = start;
    while let Some(r) = tasks.join_next().await {
        last = last.max(r.map_err(|e| e.to_string())??);
        if connections.is_none() {
            // Sampled while most sessions still run.
            connections = Some(run.redis_connections()?);
        }
    }
    let elapsed = (last - start).as_secs_f64();
    let total = sessions as u64 * n;
    rep.record(
        "breadth.events_per_s",
        &format!("{sessions} sessions x {n} events, interval 0: aggregate"),
        "events/s",
        true,
        mode,
        total as f64 / elapsed,
    );
    if let Some(stats0) = stats0 {
        let stats1 = ctx.redis().admin(RedisAdmin::commandstats)?;
        rep.record(
            "breadth.round_trips_per_event",
            &format!("Redis round trips per event, {sessions} sessions"),
            "trips/event",
            false,
            mode,
            round_trips(&stats0, &stats1) as f64 / total as f64,
        );
    }
    if let Some(Some(c)) = connections {
        rep.record(
            "breadth.redis_connections",
            &format!("Redis connections of the server, {sessions} sessions"),
            "connections",
            false,
            mode,
            c,
        );
    }
    Ok(())
}

async fn resume(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    for &n in &ctx.sizes.resume_sessions {
        let mut samples = Vec::new();
        if mode == Mode::Bare {
            // Bare SSE cannot resume: the reference is the first byte of a new stream.
            for _ in 0..ctx.sizes.resume_requests {
                tokio::time::sleep(RESUME_GAP).await;
                let conn = connect(server.addr).await?;
                let start = Instant::now();
                let mut body = conn.get(&format!("/chat?tokens={n}"), None).await?;
                first_bytes(&mut body).await?;
                samples.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        } else {
            let session = run.session(format!("rs{n}"));
            let conn = connect(server.addr).await?;
            let mut body = conn
                .get(&format!("/chat?session_id={session}&tokens={n}"), None)
                .await?;
            let streamed = read_tokens(&mut body, Some(n), |_, _, _| true).await?;
            drop(body);
            let first_id = streamed.first_id.ok_or("no id on the first event")?;
            let epoch = first_id
                .split_once('-')
                .map(|(e, _)| e.to_owned())
                .ok_or_else(|| format!("unexpected id {first_id}"))?;
            let mid = n / 2;
            let last_event_id = format!("{epoch}-{mid}");
            let want = format!("id: {epoch}-{}\n", mid + 1);
            for _ in 0..ctx.sizes.resume_requests {
                tokio::time::sleep(RESUME_GAP).await;
                let conn = connect(server.addr).await?;
                let start = Instant::now();
                let mut body = conn
                    .get(
                        &format!("/chat?session_id={session}"),
                        Some(last_event_id.as_str()),
                    )
                    .await?;
                let first = first_bytes(&mut body).await?;
                samples.push(start.elapsed().as_secs_f64() * 1000.0);
                if !first.starts_with(want.as_bytes()) {
                    return Err(format!(
                        "the replay after {last_event_id} starts with {:?}",
                        String::from_utf8_lossy(&first)
                    ));
                }
            }
        }
        rep.record(
            &format!("resume_{n}.ttfb_ms"),
            &format!(
                "time to the first replayed byte, Last-Event-ID in the middle of {n} events (bare: first byte of a new stream), median of {}",
                ctx.sizes.resume_requests
            ),
            "ms",
            true,
            mode,
            median(&samples).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// The first body bytes (at most 64) of a response.
async fn first_bytes(body: &mut Body) -> Result<Vec<u8>, String> {
    let mut first = Vec::new();
    while first.is_empty() {
        let more = body
            .next(|b| {
                if first.is_empty() {
                    first.extend_from_slice(&b[..b.len().min(64)]);
                }
            })
            .await?;
        if first.is_empty() && !more {
            return Err("the stream ended before its first byte".to_owned());
        }
    }
    Ok(first)
}

async fn idle(run: &Run<'_>, shared_session: bool, rep: &mut Report) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    let n = ctx.sizes.idle_connections;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = server.rss_bytes()?;
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let release = Arc::new(Notify::new());
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let session = if shared_session {
            run.session("idle")
        } else {
            run.session(format_args!("idle{i}"))
        };
        let path = format!("/chat?session_id={session}&tokens=2&interval_ms=3600000");
        let (permits, release, ready) = (permits.clone(), release.clone(), ready.clone());
        let addr = server.addr;
        tasks.spawn(async move {
            let released = release.notified();
            let permit = permits.acquire().await.map_err(|e| e.to_string())?;
            let mut body = connect(addr).await?.get(&path, None).await?;
            // Read up to the first event, then keep the connection open.
            read_tokens(&mut body, None, |_, _, _| false).await?;
            drop(permit);
            ready.fetch_add(1, Ordering::SeqCst);
            released.await;
            drop(body);
            Ok::<(), String>(())
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} idle connections got their first event",
                ready.load(Ordering::SeqCst)
            ));
        }
        if let Some(r) = tasks.try_join_next() {
            r.map_err(|e| e.to_string())??;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_bytes()?;
    release.notify_waiters();
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let (key, label) = if shared_session {
        (
            "idle_shared.rss_kb_per_connection",
            format!("RSS per idle connection, {n} subscribers of one session"),
        )
    } else {
        (
            "idle.rss_kb_per_connection",
            format!("RSS per idle connection, {n} connections, each its own session"),
        )
    };
    rep.record(
        key,
        &label,
        "KiB",
        true,
        mode,
        (after as f64 - before as f64) / n as f64 / 1024.0,
    );
    Ok(())
}

/// Runs one scenario on a fresh server.
async fn run_job(
    ctx: &Ctx,
    job: Job,
    mode: Mode,
    round: usize,
    rep: &mut Report,
) -> Result<(), String> {
    let redis_baseline = if mode == Mode::Redis {
        Some(ctx.redis().admin(RedisAdmin::other_clients)?)
    } else {
        None
    };
    let tag = format!("r{round}-{}", job.name().replace([' ', '@'], ""));
    let server = warm_server(ctx, mode, &tag).await?;
    let run = Run {
        ctx,
        server: &server,
        mode,
        redis_baseline,
        tag,
    };
    let result = match job {
        Job::Throughput => throughput(&run, rep).await,
        Job::Fanout {
            subscribers,
            interval_ms,
        } => fanout(&run, subscribers, interval_ms, rep).await,
        Job::Breadth => breadth(&run, rep).await,
        Job::Resume => resume(&run, rep).await,
        Job::Idle { shared } => idle(&run, shared, rep).await,
    };
    let lines = server.process.stderr_lines();
    match result {
        Err(e) if lines > 0 => Err(format!(
            "{e}; the server's stderr ends with: {}",
            server.process.stderr_tail(3)
        )),
        Err(e) => Err(e),
        Ok(()) => {
            if lines > 0 {
                rep.notes.push(format!(
                    "{} [{}]: the server wrote {lines} lines to stderr, the last: {}",
                    job.name(),
                    mode.name(),
                    server.process.stderr_tail(3)
                ));
            }
            Ok(())
        }
    }
}

// --- Main --------------------------------------------------------------------------------------

fn build_chat() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("building: cargo build --release --features redis --example chat");
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--release",
            "--features",
            "redis",
            "--example",
            "chat",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err("cargo build --example chat failed".to_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == "chat"
                && msg["executable"].is_string()
        })
        .and_then(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo did not name the chat executable".to_owned())
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({ "nproc": nproc, "cpu": cpu, "rustc": rustc })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The layer modes' ratios to the baselines, `(layer, baseline)`: to bare, and to bare broadcast
/// when it was measured.
fn ratio_pairs(rep: &Report, modes: &[Mode]) -> Vec<(Mode, Mode)> {
    let broadcast = rep
        .figures
        .iter()
        .any(|f| f.values.contains_key(&Mode::BareBroadcast));
    let baselines: &[Mode] = if broadcast {
        &[Mode::Bare, Mode::BareBroadcast]
    } else {
        &[Mode::Bare]
    };
    modes
        .iter()
        .filter(|m| !m.is_bare())
        .flat_map(|&m| baselines.iter().map(move |&b| (m, b)))
        .collect()
}

/// The ratio of the medians of `f` in `mode` and in `baseline`, when it means something.
fn figure_ratio(f: &Figure, mode: Mode, baseline: Mode) -> Option<f64> {
    let v = median(f.values.get(&mode)?)?;
    let b = median(f.values.get(&baseline)?)?;
    (f.ratio && b != 0.0).then(|| v / b)
}

fn print_table(out: &mut dyn Write, rep: &Report, modes: &[Mode]) -> std::io::Result<()> {
    let pairs = ratio_pairs(rep, modes);
    let mut shown = modes.to_vec();
    if pairs.iter().any(|&(_, b)| b == Mode::BareBroadcast) {
        shown.push(Mode::BareBroadcast);
        shown.sort();
    }
    let mut header = "| figure | unit |".to_owned();
    for m in &shown {
        header.push_str(&format!(" {} |", m.name()));
    }
    for (m, b) in &pairs {
        header.push_str(&format!(" {}/{} |", m.name(), b.name()));
    }
    writeln!(out, "{header}")?;
    writeln!(out, "|{}", "---|".repeat(2 + shown.len() + pairs.len()))?;
    for f in &rep.figures {
        let mut row = format!("| {} | {} |", f.label, f.unit);
        for m in &shown {
            let v = f.values.get(m).and_then(|v| median(v));
            row.push_str(&format!(" {} |", v.map_or("-".to_owned(), fmt_value)));
        }
        for &(m, b) in &pairs {
            let ratio = figure_ratio(f, m, b).map_or("-".to_owned(), |r| format!("{r:.2}x"));
            row.push_str(&format!(" {ratio} |"));
        }
        writeln!(out, "{row}")?;
    }
    if shown.contains(&Mode::BareBroadcast) {
        writeln!(
            out,
            "\nfan-out baselines: `bare` is independent streams (a generator per connection); \
             `bare broadcast` is one generator per session whose frames every connection of the \
             session gets, the work the layer does."
        )?;
    }
    Ok(())
}

/// Checks the figures against the crate's targets (meaningful at full size only).
fn targets(rep: &Report, sizes: &Sizes) -> Vec<Value> {
    let mut out = Vec::new();
    // `also`: a figure printed with the target but not checked.
    let mut check_also =
        |target: &str, measured: Option<f64>, limit: f64, at_least: bool, also: Option<Value>| {
            let Some(m) = measured.filter(|m| m.is_finite()) else {
                return;
            };
            let met = if at_least { m >= limit } else { m <= limit };
            let mut goal = json!({ "target": target, "measured": m, "limit": limit, "met": met });
            if let Some(also) = also {
                goal["also"] = also;
            }
            out.push(goal);
        };
    let ratio_to = |key: &str, mode: Mode, baseline: Mode| {
        Some(rep.median(key, mode)? / rep.median(key, baseline)?)
    };
    let ratio = |key: &str, mode: Mode| ratio_to(key, mode, Mode::Bare);
    macro_rules! check {
        ($target:expr, $measured:expr, $limit:expr, $at_least:expr $(,)?) => {
            check_also($target, $measured, $limit, $at_least, None)
        };
    }
    let tp = "one_connection.events_per_s";
    check!(
        "layer + memory, one connection, events/s vs bare (>= 0.8x)",
        ratio(tp, Mode::Memory),
        0.8,
        true,
    );
    check!(
        "layer + Redis, one connection, events/s vs bare (>= 0.5x)",
        ratio(tp, Mode::Redis),
        0.5,
        true,
    );
    check!(
        "layer + Redis, concurrent sessions, aggregate events/s vs bare (>= 0.5x)",
        ratio("breadth.events_per_s", Mode::Redis),
        0.5,
        true,
    );
    // Fan-out at the same load: against the bare server that also runs one generator per session
    // and writes its frames to every connection. The ratio to independent streams (a generator per
    // connection, which falls behind and delivers far fewer events) is printed alongside.
    for (s, i) in &sizes.fanout {
        let key = format!("fanout_{s}_{i}ms.p99_ms");
        for m in [Mode::Memory, Mode::Redis] {
            let independent = ratio(&key, m)
                .filter(|r| r.is_finite())
                .map(|r| json!({ "label": "vs bare, independent streams", "measured": r }));
            check_also(
                &format!(
                    "fan-out to {s} at {i} ms, p99 vs bare broadcast, {} (<= 2x)",
                    m.name()
                ),
                ratio_to(&key, m, Mode::BareBroadcast),
                2.0,
                false,
                independent,
            );
        }
    }
    let (small, large) = (
        sizes.resume_sessions.first().copied().unwrap_or(0),
        sizes.resume_sessions.last().copied().unwrap_or(0),
    );
    for (m, limit) in [(Mode::Memory, 1.0), (Mode::Redis, 5.0)] {
        for n in &sizes.resume_sessions {
            check!(
                &format!("resume, {n} events, {}, ms (< {limit})", m.name()),
                rep.median(&format!("resume_{n}.ttfb_ms"), m),
                limit,
                false,
            );
        }
        let grow = rep
            .median(&format!("resume_{large}.ttfb_ms"), m)
            .zip(rep.median(&format!("resume_{small}.ttfb_ms"), m));
        check!(
            &format!("resume, {large} vs {small} events, {} (<= 1.5x)", m.name()),
            grow.map(|(l, s)| l / s),
            1.5,
            false,
        );
    }
    let conns = rep
        .figures
        .iter()
        .filter(|f| f.key.ends_with("redis_connections"))
        .filter_map(|f| {
            f.values
                .get(&Mode::Redis)
                .and_then(|v| v.iter().copied().reduce(f64::max))
        })
        .reduce(f64::max);
    check!("Redis connections per process (<= 4)", conns, 4.0, false);
    for m in [Mode::Memory, Mode::Redis] {
        check!(
            &format!("idle connection RSS vs bare, {} (<= 1.25x)", m.name()),
            ratio("idle.rss_kb_per_connection", m),
            1.25,
            false,
        );
    }
    out
}

/// The modes `job` runs in: in fan-out, the bare mode measures both baselines, independent
/// streams and broadcast.
fn job_modes(job: Job, modes: &[Mode]) -> Vec<Mode> {
    let mut out = modes.to_vec();
    if matches!(job, Job::Fanout { .. }) && modes.contains(&Mode::Bare) {
        out.push(Mode::BareBroadcast);
        out.sort();
    }
    out
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let sizes = Sizes::new(args.quick);
    let nofile = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-file limit: {e}"))?;
    let needed = sizes.fanout.iter().map(|f| f.0).max().unwrap_or(0) as u64 + 1000;
    if nofile < needed {
        eprintln!(
            "warning: the open-file limit is {nofile}; the largest fan-out needs about {needed}"
        );
    }
    let built = match args.chat.clone() {
        Some(p) => p,
        None => build_chat()?,
    };
    // A private copy: a rebuild of the example during the run must not change what runs.
    let dir = std::env::temp_dir().join(format!("loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let chat = dir.join("chat");
    std::fs::copy(&built, &chat)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), chat.display()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut modes: Vec<Mode> = args
        .modes
        .iter()
        .map(|m| match m.as_str() {
            "bare" => Mode::Bare,
            "memory" => Mode::Memory,
            _ => Mode::Redis,
        })
        .collect();
    modes.sort();
    modes.dedup();
    let redis = if modes.contains(&Mode::Redis) {
        match &args.redis {
            Some(url) => Some(RedisTarget {
                url: url.clone(),
                admin: Mutex::new(RedisAdmin::connect(url)?),
                server: None,
            }),
            None => start_private_redis(&dir)?,
        }
    } else {
        None
    };
    if redis.is_none() {
        modes.retain(|&m| m != Mode::Redis);
    }
    let ctx = Ctx {
        chat,
        sizes: sizes.clone(),
        redis,
        clk_tck: clock_ticks_per_second(),
        nofile,
        run: format!("lg{}-{}", std::process::id(), unix_micros() % 1_000_000_000),
    };
    let started = loadavg();
    let began = Instant::now();
    eprintln!(
        "loadgen: {} size, {} round(s), modes {:?}, open-file limit {nofile}, load average {started}",
        if args.quick { "quick" } else { "full" },
        args.repeat,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>()
    );
    let mut jobs = Vec::new();
    for scenario in &args.scenarios {
        match scenario.as_str() {
            "throughput" => jobs.push(Job::Throughput),
            "fanout" => {
                jobs.extend(
                    sizes
                        .fanout
                        .iter()
                        .map(|&(subscribers, interval_ms)| Job::Fanout {
                            subscribers,
                            interval_ms,
                        }),
                )
            }
            "breadth" => jobs.push(Job::Breadth),
            "resume" => jobs.push(Job::Resume),
            _ => jobs.extend([Job::Idle { shared: false }, Job::Idle { shared: true }]),
        }
    }
    let mut rep = Report::default();
    for round in 0..args.repeat {
        for &job in &jobs {
            for mode in job_modes(job, &modes) {
                let t = Instant::now();
                match run_job(&ctx, job, mode, round, &mut rep).await {
                    Ok(()) => eprintln!(
                        "ok: round {} {} [{}] in {:.1} s (load average {})",
                        round + 1,
                        job.name(),
                        mode.name(),
                        t.elapsed().as_secs_f64(),
                        loadavg()
                    ),
                    Err(e) => rep.fail(&job.name(), mode, e),
                }
            }
        }
    }
    let ended = loadavg();
    let goals = targets(&rep, &sizes);
    let mut table = Vec::new();
    print_table(&mut table, &rep, &modes).map_err(|e| e.to_string())?;
    let mut summary = String::from_utf8_lossy(&table).into_owned();
    summary.push_str(&format!(
        "\nload average: {started} at the start, {ended} at the end; {:.0} s\n",
        began.elapsed().as_secs_f64()
    ));
    if !args.quick {
        summary.push_str("\n| target | measured | met |\n|---|---|---|\n");
        for g in &goals {
            let mut measured = fmt_value(g["measured"].as_f64().unwrap_or(f64::NAN));
            if let (Some(label), Some(v)) =
                (g["also"]["label"].as_str(), g["also"]["measured"].as_f64())
            {
                measured.push_str(&format!(" ({label}: {})", fmt_value(v)));
            }
            summary.push_str(&format!(
                "| {} | {measured} | {} |\n",
                g["target"].as_str().unwrap_or_default(),
                if g["met"] == true { "met" } else { "MISSED" }
            ));
        }
    }
    for note in &rep.notes {
        summary.push_str(&format!("note: {note}\n"));
    }
    for failure in &rep.failures {
        summary.push_str(&format!("FAILED: {failure}\n"));
    }
    if args.json {
        eprint!("{summary}");
        let pairs = ratio_pairs(&rep, &modes);
        let figures: Vec<Value> = rep
            .figures
            .iter()
            .map(|f| {
                let values: serde_json::Map<String, Value> = f
                    .values
                    .iter()
                    .map(|(m, v)| {
                        (
                            m.key().to_owned(),
                            json!({ "median": median(v), "samples": v }),
                        )
                    })
                    .collect();
                let ratios: serde_json::Map<String, Value> = pairs
                    .iter()
                    .filter_map(|&(m, b)| {
                        let r = figure_ratio(f, m, b)?;
                        Some((format!("{}/{}", m.key(), b.key()), json!(r)))
                    })
                    .collect();
                json!({
                    "key": f.key,
                    "label": f.label,
                    "unit": f.unit,
                    "values": values,
                    "ratios": ratios,
                })
            })
            .collect();
        let doc = json!({
            "machine": machine(),
            "quick": args.quick,
            "rounds": args.repeat,
            "load_average": { "start": started, "end": ended },
            "baselines": {
                "bare": "chat --bare; in fan-out, independent streams: a generator per connection",
                "bare_broadcast": "chat --bare with broadcast=1 (fan-out only): one generator \
                                   per session, its frames written to every connection",
            },
            "figures": figures,
            "targets": goals,
            "notes": rep.notes,
            "failures": rep.failures,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{summary}");
    }
    Ok(if rep.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
