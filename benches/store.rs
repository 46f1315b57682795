//! Memory store: append, and replay from the middle of sessions of 1k, 100k and 1M events.
//!
//! Replay from the middle must not scan from the start: the figure for 1M events stays within
//! 1.5x of the one for 1k.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, StatusCode};
use resumable_sse::store::{Claim, EventBlock, EventBlockBuilder, ResponseHead, Store};
use resumable_sse::{EventId, MemoryStore, SessionKey};
use std::fmt::Write as _;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// A block of the token events `first..first + n`, as the producer builds it.
fn block(epoch: resumable_sse::Epoch, first: u64, n: u64) -> EventBlock {
    let mut builder = EventBlockBuilder::new(first);
    for seq in first..first + n {
        let id = EventId { epoch, seq };
        builder.push_with(|out| {
            // `EventId` formats without allocating; the `format!` of the data is the producer's
            // encoder's stand-in.
            let _ = write!(out, "id: {id}");
            out.extend_from_slice(format!("\ndata: token {seq}\n\n").as_bytes());
        });
    }
    builder.finish().expect("a block has events")
}

/// A running session holding `n` events, one block per event: the worst case for finding a
/// position (a paced stream, where every event is its own append).
fn session(
    rt: &tokio::runtime::Runtime,
    n: u64,
) -> (MemoryStore, SessionKey, resumable_sse::Epoch) {
    rt.block_on(async {
        // The configuration a new user gets: a million of these events fit in its byte
        // limits, and a long append run evicts as it would in production.
        let store = MemoryStore::new();
        let key = SessionKey::new("bench").expect("key");
        let Ok(Claim::Claimed(epoch)) = store.claim(&key, Duration::from_secs(3600)).await else {
            panic!("claim");
        };
        let head = ResponseHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        };
        store.start(&key, epoch, head).await.expect("start");
        let mut seq = 1;
        while seq <= n {
            let batch: Vec<_> = (seq..(seq + 1000).min(n + 1))
                .map(|s| block(epoch, s, 1))
                .collect();
            seq += batch.len() as u64;
            store.append(&key, epoch, &batch).await.expect("append");
        }
        (store, key, epoch)
    })
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory_store/append");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for batch in [1u64, 64] {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, &batch| {
            let (store, key, epoch) = session(&rt, 0);
            let mut seq = 1;
            b.iter(|| {
                let events = [block(epoch, seq, batch)];
                seq += batch;
                rt.block_on(store.append(&key, epoch, &events))
                    .expect("append")
            });
        });
    }
    group.finish();
}

fn replay_from_middle(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory_store/read_256_from_middle");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    for n in [1_000u64, 100_000, 1_000_000] {
        let (store, key, epoch) = session(&rt, n);
        group.throughput(Throughput::Elements(256));
        group.bench_with_input(BenchmarkId::new("events", n), &n, |b, &n| {
            b.iter(|| {
                let batch = rt
                    .block_on(store.read(&key, epoch, n / 2, 256))
                    .expect("read")
                    .expect("session");
                assert_eq!(batch.blocks.iter().map(EventBlock::len).sum::<usize>(), 256);
                batch
            });
        });
    }
    group.finish();
}

criterion_group!(benches, append, replay_from_middle);
criterion_main!(benches);
