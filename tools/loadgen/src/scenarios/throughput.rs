//! One connection reading a long session at full speed: events/s, CPU per event of the server,
//! of this tool and of a private redis-server, memory per stored event, Redis round trips.

use std::time::{Duration, Instant};

use super::Run;
use crate::http::connect;
use crate::procfs::cpu_ticks;
use crate::redis::round_trips;
use crate::report::Report;
use crate::server::Mode;
use crate::tokens::read_tokens;

pub(crate) async fn throughput(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
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
