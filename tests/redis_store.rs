//! The behaviour suite on [`RedisStore`] against a real `redis-server`, and what only the Redis
//! store does: several instances, producer crashes, connection counts.
#![cfg(feature = "redis")]

mod common;
mod suite;

use common::redis::*;
use resumable_sse::RedisStore;
use suite::{Backend, Opts};

struct Redis;

impl Backend for Redis {
    type Store = RedisStore;

    fn available(&self) -> bool {
        // Prints a loud SKIP line when there is no server (and fails under CI=true).
        shared_url().is_some()
    }

    async fn store(&self, opts: Opts) -> RedisStore {
        let url = shared_url().expect("checked by available()");
        let mut b = RedisStore::builder(url).prefix(unique_prefix());
        if let Some(r) = opts.retention {
            b = b.retention(r);
        }
        if let Some(n) = opts.max_events {
            b = b.max_events_per_session(n);
        }
        if let Some(n) = opts.max_bytes {
            b = b.max_bytes_per_session(n);
        }
        b.connect().await.expect("connect to redis")
    }
}

store_suite!(Redis);
