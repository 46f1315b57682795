//! End-to-end load tool: an SSE server served bare, through the layer on a `MemoryStore`, and
//! through the layer on a `RedisStore`, each driven over real TCP in one run.
//!
//! ```text
//! cargo run --release -p loadgen -- [--quick] [--redis URL] [--json]
//!     [--repeat K] [--scenarios LIST] [--modes LIST] [--chat PATH]
//! ```
//!
//! The tool builds its fixture server (`cargo build --release -p loadgen --bin fixture`,
//! `src/bin/fixture/`: the token route of the `chat` example, `/chat?tokens=N`, as the example
//! serves it, with `stamp` and `broadcast`) and starts its executable as a child process per
//! scenario and mode, on `127.0.0.1:0`:
//!
//! - **bare**: `fixture --bare`, plain axum SSE without the layer, the reference for every ratio.
//!   In `fanout` it is measured twice, as two baselines: **bare** (independent streams) and
//!   **bare broadcast** (`broadcast=1`); see the scenario table;
//! - **memory**: `fixture`, the layer on a `MemoryStore`;
//! - **redis**: `fixture --redis URL`, the layer on a `RedisStore`. Without `--redis`, a private
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
//! PATH` runs that server executable instead of building the fixture (to measure another build
//! of the crate): any server with the fixture's options (`--listen`, `--bare`, `--redis`), its
//! `listening on http://ADDR` line and its `/chat` route, such as the `chat` example of a build
//! from before the fixture moved out of it.
//! The table goes to stdout; with `--json`, a JSON document goes to stdout instead and the table
//! to stderr.

mod http;
mod process;
mod procfs;
mod redis;
mod report;
mod resp;
mod scenarios;
mod server;
mod tokens;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use crate::procfs::{clock_ticks_per_second, loadavg, machine};
use crate::redis::{start_private_redis, RedisTarget};
use crate::report::{figure_ratio, fmt_value, median, print_table, ratio_pairs, targets, Report};
use crate::resp::RedisAdmin;
use crate::scenarios::{job_modes, run_job, Ctx, Job, Sizes};
use crate::server::Mode;
use crate::tokens::unix_micros;

const USAGE: &str = "usage: loadgen [--quick] [--redis URL] [--json] [--repeat K] \
                     [--scenarios throughput,fanout,breadth,resume,idle] \
                     [--modes bare,memory,redis] [--chat PATH]";
const SCENARIOS: [&str; 5] = ["throughput", "fanout", "breadth", "resume", "idle"];

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

/// Builds the fixture server with the profile of a release run and returns its executable.
fn build_fixture() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("building: cargo build --release -p loadgen --bin fixture");
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--release",
            "-p",
            "loadgen",
            "--bin",
            "fixture",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err("cargo build --bin fixture failed".to_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == "fixture"
                && msg["executable"].is_string()
        })
        .and_then(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo did not name the fixture executable".to_owned())
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
        None => build_fixture()?,
    };
    // A private copy: a rebuild of the server during the run must not change what runs.
    let dir = std::env::temp_dir().join(format!("loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let server = dir.join("server");
    std::fs::copy(&built, &server).map_err(|e| {
        format!(
            "cannot copy {} to {}: {e}",
            built.display(),
            server.display()
        )
    })?;
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
        server,
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
                "bare": "--bare; in fan-out, independent streams: a generator per connection",
                "bare_broadcast": "--bare with broadcast=1 (fan-out only): one generator \
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
