//! Reconnects with `Last-Event-ID` in the middle of long completed sessions: the time to the first
//! replayed byte (bare: to the first byte of a new stream).

use std::time::Instant;

use super::{Run, RESUME_GAP};
use crate::http::{connect, Body};
use crate::report::{median, Report};
use crate::server::Mode;
use crate::tokens::read_tokens;

pub(crate) async fn resume(run: &Run<'_>, rep: &mut Report) -> Result<(), String> {
    let (ctx, server, mode) = (run.ctx, run.server, run.mode);
    for &n in &ctx.sizes.resume_sessions {
        let mut samples = Vec::new();
        if mode == Mode::Bare {
            // Bare SSE cannot resume: the reference is the first byte of a new stream.
            for _ in 0..ctx.sizes.resume_requests {
                tokio::time::sleep(RESUME_GAP).await;
                let conn = connect(server.addr).await?;
                let start = Instant::now();
                let mut body = conn.get(&format!("/chat?tokens={n}"), None).await?;
                first_bytes(&mut body).await?;
                samples.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        } else {
            let session = run.session(format!("rs{n}"));
            let conn = connect(server.addr).await?;
            let mut body = conn
                .get(&format!("/chat?session_id={session}&tokens={n}"), None)
                .await?;
            let streamed = read_tokens(&mut body, Some(n), |_, _, _| true).await?;
            drop(body);
            let first_id = streamed.first_id.ok_or("no id on the first event")?;
            let epoch = first_id
                .split_once('-')
                .map(|(e, _)| e.to_owned())
                .ok_or_else(|| format!("unexpected id {first_id}"))?;
            let mid = n / 2;
            let last_event_id = format!("{epoch}-{mid}");
            let want = format!("id: {epoch}-{}\n", mid + 1);
            for _ in 0..ctx.sizes.resume_requests {
                tokio::time::sleep(RESUME_GAP).await;
                let conn = connect(server.addr).await?;
                let start = Instant::now();
                let mut body = conn
                    .get(
                        &format!("/chat?session_id={session}"),
                        Some(last_event_id.as_str()),
                    )
                    .await?;
                let first = first_bytes(&mut body).await?;
                samples.push(start.elapsed().as_secs_f64() * 1000.0);
                if !first.starts_with(want.as_bytes()) {
                    return Err(format!(
                        "the replay after {last_event_id} starts with {:?}",
                        String::from_utf8_lossy(&first)
                    ));
                }
            }
        }
        rep.record(
            &format!("resume_{n}.ttfb_ms"),
            &format!(
                "time to the first replayed byte, Last-Event-ID in the middle of {n} events (bare: first byte of a new stream), median of {}",
                ctx.sizes.resume_requests
            ),
            "ms",
            true,
            mode,
            median(&samples).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// The first body bytes (at most 64) of a response.
async fn first_bytes(body: &mut Body) -> Result<Vec<u8>, String> {
    let mut first = Vec::new();
    while first.is_empty() {
        let more = body
            .next(|b| {
                if first.is_empty() {
                    first.extend_from_slice(&b[..b.len().min(64)]);
                }
            })
            .await?;
        if first.is_empty() && !more {
            return Err("the stream ended before its first byte".to_owned());
        }
    }
    Ok(first)
}
