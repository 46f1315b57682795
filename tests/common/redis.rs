//! A `redis-server` of the test's own, on a free port, that dies with the test process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A server started for the tests. Its wrapper shell kills it when our end of its stdin closes,
/// which happens when the test process exits, whatever way it exits.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl RedisServer {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts `redis-server` with `extra` arguments on a free port (or on `port`).
    pub fn start_on(port: Option<u16>, extra: &[&str]) -> Self {
        let port = port.unwrap_or_else(free_port);
        let dir = std::env::temp_dir().join(format!("rsse-redis-{port}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            "".to_owned(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "redis-server {} >/dev/null 2>&1 & pid=$!; echo started; read _; kill -9 $pid",
            quoted.join(" ")
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn redis-server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let server = Self {
            port,
            stdin: child.stdin.take(),
            child,
        };
        wait_for_ping(port);
        server
    }

    pub fn start() -> Self {
        Self::start_on(None, &[])
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.child.wait();
        // Wait until the port is free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "redis-server did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 7];
                // A server with a password answers `-NOAUTH`: it is up.
                if std::io::Read::read(&mut s, &mut buf)
                    .is_ok_and(|n| n >= 5 && (&buf[..5] == b"+PONG" || buf == *b"-NOAUTH"))
                {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `redis-server` is on PATH.
pub fn have_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The URL of the server the suite shares: `REDIS_URL`, or one started for this test binary.
/// `None` (after a loud SKIP line) when there is neither; under `CI=true` that is a failure.
pub fn shared_url() -> Option<String> {
    static SERVER: OnceLock<Option<(String, Option<RedisServer>)>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("REDIS_URL") {
                return Some((url, None));
            }
            if !have_redis_server() {
                skip_or_fail("redis-server is not on PATH");
                return None;
            }
            let server = RedisServer::start();
            Some((server.url(), Some(server)))
        })
        .as_ref()
        .map(|(url, _)| url.clone())
}

/// Prints a loud SKIP line, or fails under `CI=true`.
pub fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("Redis tests cannot run under CI=true: {why}");
    }
    eprintln!("SKIP: Redis tests skipped: {why} (install redis-server or set REDIS_URL)");
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().as_nanos()
    )
}

/// What `redis-cli -p <port> <args>` prints (empty when it cannot run).
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A local three-master Redis Cluster of the tests' own.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    pub fn start() -> Self {
        Self::start_nodes(3, 0, 2000)
    }

    /// Three masters, each with one replica (the masters are `nodes[..3]`), whose nodes count
    /// one another failed after `node_timeout_ms`: a lost master's replica takes over soon after.
    pub fn start_with_replicas(node_timeout_ms: u64) -> Self {
        let cluster = Self::start_nodes(6, 1, node_timeout_ms);
        // Every replica is in sync with its master (so that it can take over).
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &cluster.nodes {
            loop {
                let info = cli(n.port, &["info", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "replicas did not sync");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    fn start_nodes(count: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let mut nodes = Vec::new();
        let timeout = node_timeout_ms.to_string();
        while nodes.len() < count {
            let port = free_port();
            // The cluster bus listens on port + 10000.
            if port > 55_000 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let conf = format!("nodes-{port}.conf");
            nodes.push(RedisServer::start_on(
                Some(port),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    &timeout,
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// The nodes still running.
    pub fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.stdin.is_some())
    }

    /// Waits until every running node reports the cluster ok (every slot served).
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for n in self.live() {
            while !cli(n.port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster not ok within {limit:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Kills node `i` (SIGKILL); if it was a master, waits until its replica took over and every
    /// other node reports the cluster ok again.
    pub fn kill_and_fail_over(&mut self, i: usize, limit: Duration) {
        let port = self.nodes[i].port;
        let id = cli(port, &["cluster", "myid"]).trim().to_owned();
        let replica = cli(port, &["cluster", "nodes"]).lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 3 && f[3] == id && f[2].contains("slave"))
                .then(|| f[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())
                .flatten()
        });
        self.nodes[i].kill();
        let deadline = Instant::now() + limit;
        if let Some(replica) = replica {
            while !cli(replica, &["info", "replication"]).contains("role:master") {
                assert!(Instant::now() < deadline, "no failover within {limit:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.wait_ok(deadline.saturating_duration_since(Instant::now()));
    }

    /// One cluster for the whole test binary; `None` (after a SKIP line) without `redis-server`.
    pub fn shared_urls() -> Option<Vec<String>> {
        static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
        CLUSTER
            .get_or_init(|| {
                if !have_redis_server() {
                    skip_or_fail("redis-server is not on PATH");
                    return None;
                }
                Some(RedisCluster::start())
            })
            .as_ref()
            .map(RedisCluster::urls)
    }
}
