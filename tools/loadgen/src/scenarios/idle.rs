//! Connections that got one event and wait: server memory per connection, each its own session,
//! then all on one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use super::{Run, CONNECT_CONCURRENCY};
use crate::http::connect;
use crate::report::Report;
use crate::tokens::read_tokens;

pub(crate) async fn idle(
    run: &Run<'_>,
    shared_session: bool,
    rep: &mut Report,
) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    let n = ctx.sizes.idle_connections;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = server.rss_bytes()?;
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let release = Arc::new(Notify::new());
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let session = if shared_session {
            run.session("idle")
        } else {
            run.session(format_args!("idle{i}"))
        };
        let path = format!("/chat?session_id={session}&tokens=2&interval_ms=3600000");
        let (permits, release, ready) = (permits.clone(), release.clone(), ready.clone());
        let addr = server.addr;
        tasks.spawn(async move {
            let released = release.notified();
            let permit = permits.acquire().await.map_err(|e| e.to_string())?;
            let mut body = connect(addr).await?.get(&path, None).await?;
            // Read up to the first event, then keep the connection open.
            read_tokens(&mut body, None, |_, _, _| false).await?;
            drop(permit);
            ready.fetch_add(1, Ordering::SeqCst);
            released.await;
            drop(body);
            Ok::<(), String>(())
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} idle connections got their first event",
                ready.load(Ordering::SeqCst)
            ));
        }
        if let Some(r) = tasks.try_join_next() {
            r.map_err(|e| e.to_string())??;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_bytes()?;
    release.notify_waiters();
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let (key, label) = if shared_session {
        (
            "idle_shared.rss_kb_per_connection",
            format!("RSS per idle connection, {n} subscribers of one session"),
        )
    } else {
        (
            "idle.rss_kb_per_connection",
            format!("RSS per idle connection, {n} connections, each its own session"),
        )
    };
    rep.record(
        key,
        &label,
        "KiB",
        true,
        mode,
        (after as f64 - before as f64) / n as f64 / 1024.0,
    );
    Ok(())
}
