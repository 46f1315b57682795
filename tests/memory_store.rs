//! The behaviour suite on [`MemoryStore`], and what only the in-memory store does.

mod common;
mod suite;

use std::time::Duration;

use common::*;
use resumable_sse::MemoryStore;
use suite::{Backend, Opts};

struct Memory;

impl Backend for Memory {
    type Store = MemoryStore;

    fn available(&self) -> bool {
        true
    }

    async fn store(&self, opts: Opts) -> MemoryStore {
        let mut b = MemoryStore::builder();
        if let Some(r) = opts.retention {
            b = b.retention(r);
        }
        if let Some(n) = opts.max_events {
            b = b.max_events_per_session(n);
        }
        b.build()
    }
}

store_suite!(Memory);

#[tokio::test]
async fn the_session_limit_refuses_new_sessions_only() {
    let store = MemoryStore::builder().max_sessions(1).build();
    let app = serve_with(store, |l| l).await;
    app.inner.gate("a");
    let mut a = get(app.addr, "/gated?session_id=a", None).await;
    let refused = get(app.addr, "/tokens?session_id=b&n=1", None).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.reason(), Some("session-limit"));
    // The existing session is unaffected.
    app.inner.send("a", "still here");
    assert_eq!(datas(&a.take(1).await), ["still here"]);
    assert_eq!(app.inner.calls(), 1);
}

#[tokio::test]
async fn expired_sessions_are_swept_from_memory() {
    let store = MemoryStore::builder()
        .retention(Duration::from_millis(50))
        .build();
    let app = serve_with(store, |l| l).await;
    get(app.addr, "/tokens?session_id=a&n=2", None)
        .await
        .collect()
        .await;
    assert_eq!(app.store.len(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The next operation sweeps; expired sessions no longer take memory or count against limits.
    get(app.addr, "/json?session_id=other", None).await;
    assert_eq!(app.store.len(), 0);
}
