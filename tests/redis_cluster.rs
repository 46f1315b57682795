//! The behaviour suite (`resumable_sse::testing`) on [`RedisStore`] against a local
//! three-master Redis Cluster, and how sessions spread over it.
#![cfg(feature = "redis")]

mod common;

use common::redis::*;
use resumable_sse::testing::{store_suite, Backend, Opts};
use resumable_sse::RedisStore;

struct Cluster;

impl Backend for Cluster {
    type Store = RedisStore;

    fn available(&self) -> bool {
        RedisCluster::shared_urls().is_some()
    }

    async fn store(&self, opts: Opts) -> RedisStore {
        let urls = RedisCluster::shared_urls().expect("checked by available()");
        let mut b = RedisStore::cluster_builder(urls).prefix(unique_prefix());
        if let Some(r) = opts.retention {
            b = b.retention(r);
        }
        if let Some(n) = opts.max_events_per_session {
            b = b.max_events_per_session(n);
        }
        b.connect().await.expect("connect to the cluster")
    }
}

store_suite!(Cluster);

#[tokio::test]
async fn sessions_spread_over_the_cluster_slots() {
    let Some(urls) = RedisCluster::shared_urls() else {
        return;
    };
    let store = Cluster.store(Opts::default()).await;
    let app = common::serve_with(store, |l| l).await;
    // Enough keys to land on every master; each session works wherever it lives.
    for i in 0..12 {
        let path = format!("/tokens?session_id=k{i}&n=3");
        let evs = common::get(app.addr, &path, None).await.collect().await;
        assert_eq!(common::datas(&evs), common::expected_tokens(0..3));
    }
    let mut masters_with_keys = 0;
    for url in &urls {
        let client = ::redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let n: i64 = ::redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
        masters_with_keys += usize::from(n > 0);
    }
    assert!(masters_with_keys >= 2, "sessions all landed on one master");
}
