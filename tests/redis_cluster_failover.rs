//! A Redis Cluster that loses the node a process listens to for notifications: the process
//! subscribes on another node, and its readers keep getting changes as they happen.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis::*;
use common::{event_stream_head as head, one_event as event};
use resumable_sse::store::{Claim, Store};
use resumable_sse::testing::wait::{within, TIMEOUT};
use resumable_sse::{RedisStore, SessionKey};
use tokio::time::Instant;

/// Subscribers to `channel` on each running node (`PUBSUB NUMSUB` counts a node's own).
fn subscribers(cluster: &RedisCluster, channel: &str) -> Vec<(usize, u64)> {
    cluster
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| cluster.live().any(|n| n.port == cluster.nodes[*i].port))
        .map(|(i, n)| {
            let out = cli(n.port, &["pubsub", "numsub", channel]);
            let count = out.lines().nth(1).and_then(|l| l.trim().parse().ok());
            (i, count.unwrap_or(0))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_changes_as_they_happen_after_the_notified_node_is_lost() {
    if !have_redis_server() {
        skip_or_fail("redis-server is not on PATH");
        return;
    }
    let mut cluster = RedisCluster::start_with_replicas(1000);
    let urls = cluster.urls();
    let prefix = unique_prefix();
    let channel = format!("{prefix}:notify");
    let reader = RedisStore::cluster_builder(urls.clone())
        .prefix(&prefix)
        .connect()
        .await
        .expect("connect the reader");
    // The node the reader's process listens on.
    let mut listened = None;
    within(TIMEOUT, "the reader subscribes", || {
        listened = subscribers(&cluster, &channel)
            .into_iter()
            .find(|(_, n)| *n > 0)
            .map(|(i, _)| i);
        listened.is_some()
    })
    .await;
    let listened = listened.expect("found above");
    // The producer's process listens elsewhere, and never needs the lost node to connect.
    let others: Vec<String> = (0..urls.len())
        .filter(|i| *i != listened)
        .map(|i| urls[i].clone())
        .collect();
    let producer = RedisStore::cluster_builder(others)
        .prefix(&prefix)
        .connect()
        .await
        .expect("connect the producer");
    within(TIMEOUT, "the producer subscribes", || {
        subscribers(&cluster, &channel)
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>()
            == 2
    })
    .await;

    let key = SessionKey::new("failover").unwrap();
    let Claim::Claimed(epoch) = producer
        .claim(&key, Duration::from_secs(600))
        .await
        .unwrap()
    else {
        panic!("a fresh key is claimable");
    };
    producer.start(&key, epoch, head()).await.unwrap();
    // A live reader: it reads whenever its subscription wakes it, and reports each event once
    // read.
    let mut sub = reader.subscribe(&key, epoch).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let reading = tokio::spawn({
        let (reader, key) = (reader.clone(), key.clone());
        async move {
            let mut after = 0;
            loop {
                use resumable_sse::store::Subscription;
                sub.changed().await;
                let Ok(Some(batch)) = reader.read(&key, epoch, after, 100).await else {
                    continue;
                };
                for block in &batch.blocks {
                    for (seq, _) in block.iter() {
                        after = seq;
                        let _ = tx.send((seq, Instant::now()));
                    }
                }
            }
        }
    });

    cluster.kill_and_fail_over(listened, Duration::from_secs(30));
    // The reader's process listens again, on a node still there.
    within(TIMEOUT, "the reader subscribes again", || {
        subscribers(&cluster, &channel)
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>()
            == 2
    })
    .await;

    let mut latencies = Vec::new();
    let mut received = Vec::new();
    for seq in 1..=10u64 {
        // Spaced irregularly, so that no event lines up with the periodic checks.
        tokio::time::sleep(Duration::from_millis(100 + (seq * 53) % 100)).await;
        let sent = Instant::now();
        let deadline = sent + TIMEOUT;
        // The producer's connection may still be learning the new topology: retry.
        while let Err(e) = producer.append(&key, epoch, &[event(seq)]).await {
            assert!(Instant::now() < deadline, "append {seq}: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let (got, at) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("event {seq} not received within {TIMEOUT:?}"))
                .expect("the reader runs");
            received.push(got);
            if got == seq {
                latencies.push(at - sent);
                break;
            }
        }
    }
    reading.abort();
    assert_eq!(
        received,
        (1..=10).collect::<Vec<_>>(),
        "every event exactly once"
    );
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    // Polling alone (the periodic check, every half second) would take about half a second.
    assert!(
        median < Duration::from_millis(200),
        "median notification latency {median:?} ({latencies:?})"
    );
}
