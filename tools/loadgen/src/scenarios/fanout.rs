//! One session with many subscribers at a steady pace, stamped events: emit-to-receipt latency,
//! events received of nominal, server CPU, Redis round trips and connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use super::{Run, CONNECT_CONCURRENCY};
use crate::http::connect;
use crate::procfs::cpu_ticks;
use crate::redis::{round_trips, RedisTarget};
use crate::report::{quantile, Report};
use crate::server::Mode;
use crate::tokens::{read_tokens_from, unix_micros};

/// Shared by the subscribers of a fan-out run.
#[derive(Default)]
struct FanShared {
    pub(crate) ready: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    /// Stamps (µs since the epoch) of the measured window; 0 until set.
    pub(crate) window_start: AtomicU64,
    pub(crate) window_end: AtomicU64,
    pub(crate) changed: Notify,
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

pub(crate) async fn fanout(
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
