//! The scenarios, each run on a fresh server per mode and round: [`mod@throughput`] (one
//! connection at full speed), [`mod@fanout`] (one session, many subscribers), [`mod@breadth`]
//! (many sessions at once), [`mod@resume`] (`Last-Event-ID` in the middle of long sessions) and
//! [`mod@idle`] (memory per waiting connection).

mod breadth;
mod fanout;
mod idle;
mod resume;
mod throughput;

use self::breadth::breadth;
use self::fanout::fanout;
use self::idle::idle;
use self::resume::resume;
use self::throughput::throughput;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::http::connect;
use crate::redis::RedisTarget;
use crate::report::Report;
use crate::resp::RedisAdmin;
use crate::server::{Mode, Server};
use crate::tokens::read_tokens;

/// Connections being set up at once (the server's accept backlog is 1,024).
pub(crate) const CONNECT_CONCURRENCY: usize = 256;
/// The pause before each resume request: a reconnect finds the server idle, not still busy with
/// the replay the previous request dropped.
pub(crate) const RESUME_GAP: Duration = Duration::from_millis(20);
/// The pause of a fan-out stream between events.
const FANOUT_INTERVAL_MS: u64 = 10;

/// The size of every scenario.
#[derive(Clone, Debug)]
pub(crate) struct Sizes {
    pub(crate) throughput_events: u64,
    /// Subscribers and the pause between events (ms) of each fan-out run.
    pub(crate) fanout: Vec<(usize, u64)>,
    pub(crate) fanout_window: Duration,
    /// How long a fan-out stream lasts at most (the subscribers leave after the window).
    pub(crate) fanout_stream: Duration,
    pub(crate) breadth_sessions: usize,
    pub(crate) breadth_events: u64,
    pub(crate) resume_sessions: Vec<u64>,
    pub(crate) resume_requests: usize,
    pub(crate) idle_connections: usize,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Self {
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

pub(crate) struct Ctx {
    /// The server executable (a private copy).
    pub(crate) server: PathBuf,
    pub(crate) sizes: Sizes,
    pub(crate) redis: Option<RedisTarget>,
    pub(crate) clk_tck: u64,
    pub(crate) nofile: u64,
    /// Distinguishes this run's session ids from any other's (a shared Redis).
    pub(crate) run: String,
}

impl Ctx {
    pub(crate) fn redis(&self) -> &RedisTarget {
        self.redis
            .as_ref()
            .expect("the redis mode runs only with a Redis")
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Job {
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
    pub(crate) fn name(self) -> String {
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
pub(crate) struct Run<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) server: &'a Server,
    pub(crate) mode: Mode,
    /// Clients Redis had before the server started (redis mode).
    pub(crate) redis_baseline: Option<usize>,
    /// Unique per scenario run, for session ids.
    pub(crate) tag: String,
}

impl Run<'_> {
    pub(crate) fn session(&self, name: impl std::fmt::Display) -> String {
        format!("{}-{}-{name}", self.ctx.run, self.tag)
    }

    pub(crate) fn redis_connections(&self) -> Result<Option<f64>, String> {
        let Some(baseline) = self.redis_baseline else {
            return Ok(None);
        };
        let now = self.ctx.redis().admin(RedisAdmin::other_clients)?;
        Ok(Some(now.saturating_sub(baseline) as f64))
    }

    pub(crate) fn commandstats(&self) -> Result<Option<BTreeMap<String, u64>>, String> {
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

/// Runs one scenario on a fresh server.
pub(crate) async fn run_job(
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

/// The modes `job` runs in: in fan-out, the bare mode measures both baselines, independent
/// streams and broadcast.
pub(crate) fn job_modes(job: Job, modes: &[Mode]) -> Vec<Mode> {
    let mut out = modes.to_vec();
    if matches!(job, Job::Fanout { .. }) && modes.contains(&Mode::Bare) {
        out.push(Mode::BareBroadcast);
        out.sort();
    }
    out
}
