//! The server under measurement, in one of its modes.

use std::net::SocketAddr;
use std::time::Duration;

use crate::process::Wrapped;
use crate::procfs::{cpu_ticks, rss_bytes};
use crate::scenarios::Ctx;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// `--bare`; in fan-out, independent streams: a generator per connection.
    Bare,
    /// `--bare` with `broadcast=1`: a generator per session, its frames written to every
    /// connection of the session. Fan-out only; it runs with `--modes bare`.
    BareBroadcast,
    Memory,
    Redis,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::BareBroadcast => "bare broadcast",
            Mode::Memory => "memory",
            Mode::Redis => "redis",
        }
    }

    /// The mode's key in the JSON document.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Mode::BareBroadcast => "bare_broadcast",
            m => m.name(),
        }
    }

    /// Whether the server runs without the layer.
    pub(crate) fn is_bare(self) -> bool {
        matches!(self, Mode::Bare | Mode::BareBroadcast)
    }
}

/// A running server (the fixture, or the executable given with `--chat`).
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) process: Wrapped,
}

impl Server {
    pub(crate) fn start(ctx: &Ctx, mode: Mode) -> Result<Self, String> {
        let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        match mode {
            Mode::Bare | Mode::BareBroadcast => args.push("--bare".to_owned()),
            Mode::Memory => {}
            Mode::Redis => {
                let url = ctx.redis.as_ref().ok_or("no Redis")?.url.clone();
                args.extend(["--redis".to_owned(), url]);
            }
        }
        let process = Wrapped::start(&ctx.server, &args, false)?;
        let addr = process.wait_line("listening on http://", Duration::from_secs(20))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("bad address from the server: {addr}"))?;
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

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid
    }

    pub(crate) fn rss_bytes(&self) -> Result<u64, String> {
        rss_bytes(self.pid())
    }

    pub(crate) fn cpu_ticks(&self) -> Result<u64, String> {
        cpu_ticks(self.pid())
    }
}
