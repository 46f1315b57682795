//! The Redis of the `redis` mode: a private `redis-server` or the one of `--redis`, and the
//! round trips the server makes to it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::Wrapped;
use crate::resp::RedisAdmin;

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

/// Round trips between two `INFO commandstats`: every command a client sent, which is every
/// command counted except those the store's scripts run inside Redis and this tool's own.
pub(crate) fn round_trips(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
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
pub(crate) struct RedisTarget {
    pub(crate) url: String,
    pub(crate) admin: Mutex<RedisAdmin>,
    /// The private server, when the tool started one.
    pub(crate) server: Option<Wrapped>,
}

impl RedisTarget {
    pub(crate) fn admin<T>(
        &self,
        f: impl FnOnce(&mut RedisAdmin) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        tokio::task::block_in_place(|| f(&mut admin))
    }

    pub(crate) fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.pid)
    }
}

pub(crate) fn start_private_redis(dir: &Path) -> Result<Option<RedisTarget>, String> {
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
