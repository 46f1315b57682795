//! Servers run as child processes, as a person or a tool starts them: the `chat` and `hyper`
//! examples, the proxy, the load tool's fixture. Each prints `listening on http://ADDR` on stdout
//! once it accepts connections; its stderr goes to the test's output, and it is killed when the
//! test drops it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long a child has to print its address.
const START: Duration = Duration::from_secs(60);

/// A running server, killed (and waited for) when dropped.
pub struct Server {
    pub child: Child,
    /// Where it listens, as it printed it.
    pub addr: SocketAddr,
    /// What it wrote to its stderr so far (its log).
    pub log: Log,
}

/// The lines a child wrote to its stderr so far.
pub type Log = Arc<Mutex<String>>;

impl Server {
    /// Starts `program --listen 127.0.0.1:0 ARGS...`; `name` prefixes its stderr lines.
    pub fn start(name: &'static str, program: impl AsRef<OsStr>, args: &[&str]) -> Server {
        let mut cmd = Command::new(program);
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        Server::spawn(name, cmd)
    }

    /// Starts `cmd`, which says where to listen, and waits (for at most a minute) for the
    /// `listening on http://ADDR` line; fails the test without it, or with port 0.
    pub fn spawn(name: &'static str, mut cmd: Command) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        let log = Log::default();
        relay_into(name, child.stderr.take().unwrap(), log.clone());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        // Killed on a failure below too.
        let mut server = Server {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            log,
        };
        let addr = rx
            .recv_timeout(START)
            .unwrap_or_else(|e| panic!("{name} did not print `listening on http://ADDR`: {e}"));
        server.addr = addr.parse().expect("a socket address");
        assert_ne!(
            server.addr.port(),
            0,
            "the printed address has the real port"
        );
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards a child's output lines to this test's captured stderr, each prefixed with
/// `[name]`.
pub fn relay(name: &'static str, out: impl std::io::Read + Send + 'static) {
    relay_into(name, out, Log::default());
}

/// Forwards a child's output lines as [`relay`] does, and keeps them in `log`.
pub fn relay_into(name: &'static str, out: impl std::io::Read + Send + 'static, log: Log) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
}
