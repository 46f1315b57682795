//! The child processes the tool starts (the measured server, a private `redis-server`), each
//! through `sh` so that it dies with the tool however the tool ends.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A process started through `sh`, which kills it (SIGKILL) as soon as our end of its stdin
/// closes: when this value is dropped, or when the tool exits in any way.
pub(crate) struct Wrapped {
    pub(crate) pid: u32,
    shell: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Wrapped {
    /// Starts `program args..`; its stdout lines are readable through [`Self::wait_line`].
    pub(crate) fn start(program: &Path, args: &[String], quiet: bool) -> Result<Self, String> {
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
    pub(crate) fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
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

    pub(crate) fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(n);
        lines[start..].join(" | ")
    }

    pub(crate) fn stderr_lines(&self) -> usize {
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
