//! Many sessions, one subscriber each, all started at once: aggregate events/s, Redis round trips
//! and connections.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::{Run, CONNECT_CONCURRENCY};
use crate::http::connect;
use crate::redis::round_trips;
use crate::report::Report;
use crate::resp::RedisAdmin;
use crate::tokens::read_tokens;

pub(crate) async fn breadth(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
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
