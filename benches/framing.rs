//! Cost of the SSE framing on the hot path, per event.
//!
//! Three operations over the same body, fed chunk by chunk:
//!
//! * `passthrough`: copy every chunk into a `Bytes` (what forwarding a bare
//!   stream costs);
//! * `parse`: run the chunks through [`Parser`];
//! * `framing`: parse, assign an id (`5f3a9b2c1d0e-<seq>`, formatted into a
//!   stack buffer) and re-encode every event with [`encode_event`]. The
//!   encoded events are kept in a ring of the last [`RETAINED`] events, the
//!   way a replay store holds them, rather than freed at once: freeing each
//!   one at once makes the allocator return the same buffer every time, and
//!   a fixed placement can land on a pathological case of the CPU (a copy
//!   whose destination is 1 to 31 bytes past its source modulo 4096, "4K
//!   aliasing") that no real stream hits systematically;
//! * `framing_blocks`: the same, written the way the layer's producer writes
//!   events: back to back into an [`EventBlockBuilder`] with
//!   [`encode_event_into`], a block finished at 64 KiB and at the end of the
//!   body (the producer finishes one per store append). The last
//!   [`RETAINED`] blocks are kept.
//!
//! Two event sizes (`data: token 12345\n\n`, 19 bytes, and a 4096-byte
//! single-line event) and three chunkings (1-byte chunks, 64-byte chunks and
//! one chunk per event). Throughput is reported in events; multiply by the
//! frame size in the benchmark name to get bytes.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use resumable_sse::sse::{encode_event, encode_event_into, EventRef, Parser};
use resumable_sse::store::{EventBlock, EventBlockBuilder};

/// Events in the token body (19 bytes each).
const TOKEN_EVENTS: usize = 1000;
/// Events in the 4 KiB body.
const BIG_EVENTS: usize = 64;
const BIG_FRAME: usize = 4096;
/// Encoded events kept alive by `framing`.
const RETAINED: usize = 64;

struct Body {
    name: String,
    frame_len: usize,
    events: usize,
    bytes: Vec<u8>,
}

fn token_body() -> Body {
    let bytes: Vec<u8> = (0..TOKEN_EVENTS)
        .flat_map(|i| format!("data: token {}\n\n", 10_000 + i).into_bytes())
        .collect();
    let frame_len = bytes.len() / TOKEN_EVENTS;
    Body {
        name: format!("token-{frame_len}B"),
        frame_len,
        events: TOKEN_EVENTS,
        bytes,
    }
}

fn big_body() -> Body {
    let payload = BIG_FRAME - b"data: \n\n".len();
    let mut bytes = Vec::with_capacity(BIG_EVENTS * BIG_FRAME);
    for i in 0..BIG_EVENTS {
        bytes.extend_from_slice(b"data: ");
        bytes.extend((0..payload).map(|j| b'a' + ((i + j) % 26) as u8));
        bytes.extend_from_slice(b"\n\n");
    }
    Body {
        name: "4KiB".to_owned(),
        frame_len: BIG_FRAME,
        events: BIG_EVENTS,
        bytes,
    }
}

/// Formats `5f3a9b2c1d0e-<seq>` ids into a stack buffer.
struct Ids {
    buf: [u8; Self::PREFIX.len() + 20],
    digits: itoa::Buffer,
    seq: u64,
}

impl Ids {
    const PREFIX: &'static [u8] = b"5f3a9b2c1d0e-";

    fn new() -> Self {
        let mut buf = [0; Self::PREFIX.len() + 20];
        buf[..Self::PREFIX.len()].copy_from_slice(Self::PREFIX);
        Self {
            buf,
            digits: itoa::Buffer::new(),
            seq: 0,
        }
    }

    fn next(&mut self) -> &[u8] {
        self.seq += 1;
        let digits = self.digits.format(self.seq).as_bytes();
        let end = Self::PREFIX.len() + digits.len();
        self.buf[Self::PREFIX.len()..end].copy_from_slice(digits);
        &self.buf[..end]
    }
}

fn passthrough(chunks: &[&[u8]]) {
    for chunk in chunks {
        black_box(Bytes::copy_from_slice(chunk));
    }
}

fn parse(parser: &mut Parser, chunks: &[&[u8]]) -> usize {
    let mut events = 0;
    for chunk in chunks {
        parser
            .feed(chunk, |event: EventRef<'_>| {
                black_box(event);
                events += 1;
            })
            .unwrap();
    }
    events
}

fn framing(
    parser: &mut Parser,
    ids: &mut Ids,
    retained: &mut VecDeque<Bytes>,
    chunks: &[&[u8]],
) -> usize {
    let mut events = 0;
    for chunk in chunks {
        parser
            .feed(chunk, |event| {
                if retained.len() == RETAINED {
                    retained.pop_front();
                }
                retained.push_back(encode_event(ids.next(), &event));
                events += 1;
            })
            .unwrap();
    }
    events
}

fn framing_blocks(
    parser: &mut Parser,
    ids: &mut Ids,
    builder: &mut EventBlockBuilder,
    retained: &mut VecDeque<EventBlock>,
    chunks: &[&[u8]],
) -> usize {
    let mut events = 0;
    let mut keep = |block: EventBlock| {
        if retained.len() == RETAINED {
            retained.pop_front();
        }
        retained.push_back(block);
    };
    for chunk in chunks {
        parser
            .feed(chunk, |event| {
                if builder.byte_len() >= 64 << 10 {
                    keep(builder.finish().expect("a non-empty block"));
                }
                let id = ids.next();
                builder.push_with(|buf| encode_event_into(buf, id, &event));
                events += 1;
            })
            .unwrap();
    }
    if let Some(block) = builder.finish() {
        keep(block);
    }
    events
}

fn bench(c: &mut Criterion) {
    let bodies = [token_body(), big_body()];
    let mut passthrough_group = c.benchmark_group("passthrough");
    configure(&mut passthrough_group);
    for body in &bodies {
        passthrough_group.throughput(Throughput::Elements(body.events as u64));
        for (chunking, chunks) in chunkings(body) {
            let id = BenchmarkId::new(&body.name, chunking);
            passthrough_group.bench_function(id, |b| b.iter(|| passthrough(&chunks)));
        }
    }
    passthrough_group.finish();

    let mut parse_group = c.benchmark_group("parse");
    configure(&mut parse_group);
    for body in &bodies {
        parse_group.throughput(Throughput::Elements(body.events as u64));
        for (chunking, chunks) in chunkings(body) {
            let mut parser = Parser::default();
            assert_eq!(parse(&mut parser, &chunks), body.events);
            let id = BenchmarkId::new(&body.name, chunking);
            parse_group.bench_function(id, |b| b.iter(|| parse(&mut parser, &chunks)));
        }
    }
    parse_group.finish();

    let mut framing_group = c.benchmark_group("framing");
    configure(&mut framing_group);
    for body in &bodies {
        framing_group.throughput(Throughput::Elements(body.events as u64));
        for (chunking, chunks) in chunkings(body) {
            let mut parser = Parser::default();
            let mut ids = Ids::new();
            let mut retained = VecDeque::with_capacity(RETAINED);
            let events = framing(&mut parser, &mut ids, &mut retained, &chunks);
            assert_eq!(events, body.events);
            let id = BenchmarkId::new(&body.name, chunking);
            framing_group.bench_function(id, |b| {
                b.iter(|| framing(&mut parser, &mut ids, &mut retained, &chunks))
            });
        }
    }
    framing_group.finish();

    let mut blocks_group = c.benchmark_group("framing_blocks");
    configure(&mut blocks_group);
    for body in &bodies {
        blocks_group.throughput(Throughput::Elements(body.events as u64));
        for (chunking, chunks) in chunkings(body) {
            let mut parser = Parser::default();
            let mut ids = Ids::new();
            let mut builder = EventBlockBuilder::new(1);
            let mut retained = VecDeque::with_capacity(RETAINED);
            let events =
                framing_blocks(&mut parser, &mut ids, &mut builder, &mut retained, &chunks);
            assert_eq!(events, body.events);
            let id = BenchmarkId::new(&body.name, chunking);
            blocks_group.bench_function(id, |b| {
                b.iter(|| {
                    framing_blocks(&mut parser, &mut ids, &mut builder, &mut retained, &chunks)
                })
            });
        }
    }
    blocks_group.finish();
}

/// The body split into 1-byte chunks, 64-byte chunks and one chunk per event.
fn chunkings(body: &Body) -> [(&'static str, Vec<&[u8]>); 3] {
    [
        ("1B-chunks", body.bytes.chunks(1).collect()),
        ("64B-chunks", body.bytes.chunks(64).collect()),
        ("frame-chunks", body.bytes.chunks(body.frame_len).collect()),
    ]
}

fn configure<M: criterion::measurement::Measurement>(group: &mut criterion::BenchmarkGroup<'_, M>) {
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

criterion_group!(benches, bench);
criterion_main!(benches);
