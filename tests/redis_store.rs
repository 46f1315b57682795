//! The behaviour suite (`resumable_sse::testing`) on [`RedisStore`] against a real
//! `redis-server`.
#![cfg(feature = "redis")]

mod common;

use common::redis::*;
use resumable_sse::testing::{store_suite, Backend, Opts};
use resumable_sse::RedisStore;

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
        if let Some(n) = opts.max_events_per_session {
            b = b.max_events_per_session(n);
        }
        b.connect().await.expect("connect to redis")
    }
}

store_suite!(Redis);
