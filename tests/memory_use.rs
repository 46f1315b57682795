//! The process's memory (VmRSS) under inputs that must not make it grow: a huge event, and
//! thousands of subscribers of one history. In a test binary of their own, one test at a time,
//! so that no other test's allocations are counted.
#![cfg(target_os = "linux")]

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::StatusCode;
use resumable_sse::store::Status;
use resumable_sse::{EventId, MemoryStore, Outcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use common::*;

/// Held by each test: the tests of this binary measure the whole process, so they run alone.
static ALONE: Mutex<()> = Mutex::const_new(());

/// The process's resident memory, from `/proc/self/status`.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

/// The resident memory once it has stopped growing: sampled every 50 ms until it grows by less
/// than 1 MiB between two samples (or [`TIMEOUT`] passes), so that what connections and tasks
/// settle into is measured, not a moment of their start.
async fn settled_rss_bytes() -> usize {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut last = rss_bytes();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = rss_bytes();
        if now < last + (1 << 20) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn a_100_mb_event_without_a_blank_line_fails_the_session_without_being_buffered() {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 100 << 20;
    let _alone = ALONE.lock().await;
    let store = MemoryStore::new();
    let produced = Arc::new(AtomicUsize::new(0));
    let body = {
        let produced = produced.clone();
        move || {
            let produced = produced.clone();
            let head = stream::iter([Ok(Bytes::from_static(b"data: one\n\ndata: two\n\ndata: "))]);
            // 100 MiB of one data line, made chunk by chunk as the layer asks for it.
            let flood = stream::iter(0..TOTAL / CHUNK).map(move |_| {
                produced.fetch_add(CHUNK, Ordering::SeqCst);
                Ok(Bytes::from(vec![b'x'; CHUNK]))
            });
            head.chain(flood)
        }
    };
    let before = rss_bytes();
    let (addr, calls) = serve_raw(store.clone(), None, |l| l, body).await;
    let mut conn = get(addr, "/raw?session_id=flood", None).await;
    assert_eq!(conn.status, 200);
    let evs = conn.collect().await;
    assert_eq!(datas(&evs), ["one", "two"]);
    session_when(&store, &scoped("/raw", "flood"), "failed", |i| {
        i.status == Status::Finished(Outcome::Failed)
    })
    .await;
    let grown = rss_bytes().saturating_sub(before);
    let produced = produced.load(Ordering::SeqCst);
    eprintln!("the inner body produced {produced} bytes; RSS grew by {grown} bytes");
    // The layer stopped reading shortly after the 1 MiB limit ...
    assert!(produced <= 4 << 20, "{produced} bytes were read");
    // ... and the process did not grow by anything like 100 MiB.
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    // The earlier events stay readable; a reconnect is told the session failed.
    let replay = get(addr, "/raw?session_id=flood", None)
        .await
        .collect()
        .await;
    assert_eq!(datas(&replay), ["one", "two"]);
    let r = answer(addr, "/raw?session_id=flood", evs[1].id.as_deref()).await;
    assert_eq!(
        (r.status, r.reason.as_deref()),
        (StatusCode::NO_CONTENT, Some("failed"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_subscribers_share_one_history_instead_of_copying_it() {
    const SUBSCRIBERS: usize = 5_000;
    const HISTORY: usize = 10_000;
    const DATA: usize = 100;
    const LIVE: usize = 10;
    /// The bound per subscriber: its connection on both ends (the client is in this process
    /// too), its task, its cursor and the batch it reads ahead. A copy of the history would be
    /// ~1.2 MB.
    const PER_SUBSCRIBER: usize = 64 << 10;
    /// Subscribers that read the whole replay; the others stop early (the traffic of 5,000
    /// whole replays would dominate the suite's run time without proving more).
    const SAMPLED: usize = 20;
    let _alone = ALONE.lock().await;

    let store = MemoryStore::new();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let body = {
        let release = release.clone();
        move || {
            let release = release.clone();
            let mut history = Vec::with_capacity(HISTORY * (DATA + 8));
            for i in 0..HISTORY {
                history.extend_from_slice(format!("data: {i:0>DATA$}\n\n").as_bytes());
            }
            let history = Bytes::from(history);
            let parts: Vec<Result<Bytes, Infallible>> = (0..history.len())
                .step_by(64 << 10)
                .map(|at| Ok(history.slice(at..(at + (64 << 10)).min(history.len()))))
                .collect();
            // Then `LIVE` events, each when the test releases it.
            let live = stream::iter(0..LIVE).then(move |i| {
                let release = release.clone();
                async move {
                    release.acquire().await.unwrap().forget();
                    Ok(Bytes::from(format!("data: live {i}\n\n")))
                }
            });
            stream::iter(parts).chain(live)
        }
    };
    let (addr, calls) = serve_raw(
        store.clone(),
        Some(8 << 10),
        |l| l.keep_alive(resumable_sse::KeepAlive::disabled()),
        body,
    )
    .await;
    let path = "/raw?session_id=big";
    // The session runs with its whole history stored before anyone subscribes.
    let first = get(addr, path, None).await;
    let epoch = session_when(&store, &scoped("/raw", "big"), "the history stored", |i| {
        i.last_seq == HISTORY as u64
    })
    .await
    .epoch;
    drop(first);

    // 5,000 subscribers replay from the start: each reads its first event, then stops reading
    // and holds its place in the history.
    let before = rss_bytes();
    let replaying: Vec<Subscriber> = stream::iter(0..SUBSCRIBERS)
        .map(|_| Subscriber::connect(addr, path, None))
        .buffer_unordered(100)
        .collect()
        .await;
    let grown = settled_rss_bytes().await.saturating_sub(before);
    eprintln!(
        "{SUBSCRIBERS} replaying subscribers: RSS grew by {grown} bytes, {} per subscriber",
        grown / SUBSCRIBERS
    );
    assert!(
        grown / SUBSCRIBERS < PER_SUBSCRIBER,
        "RSS grew by {} bytes per subscriber",
        grown / SUBSCRIBERS
    );
    // A sample reads the whole history, in order; the rest go away.
    let sampled: Vec<_> = replaying
        .into_iter()
        .take(SAMPLED)
        .map(|mut s| tokio::spawn(async move { s.read_events(HISTORY).await }))
        .collect();
    for s in sampled {
        let datas = s.await.unwrap();
        let expected: Vec<String> = (0..HISTORY).map(|i| format!("{i:0>DATA$}")).collect();
        assert_eq!(datas, expected);
    }

    // 5,000 subscribers follow the live end of the session; each gets every live event.
    let head = EventId {
        epoch,
        seq: HISTORY as u64,
    }
    .to_string();
    let live: Vec<Subscriber> = stream::iter(0..SUBSCRIBERS)
        .map(|_| Subscriber::connect(addr, path, Some(&head)))
        .buffer_unordered(100)
        .collect()
        .await;
    let readers: Vec<_> = live
        .into_iter()
        .map(|mut s| tokio::spawn(async move { (s.read_events(LIVE).await, s.ends().await) }))
        .collect();
    release.add_permits(LIVE);
    let expected: Vec<String> = (0..LIVE).map(|i| format!("live {i}")).collect();
    for r in readers {
        let (datas, ended) = r.await.unwrap();
        assert_eq!(datas, expected);
        assert!(ended, "the stream ends with the session");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A raw HTTP/1.1 subscriber with a small receive buffer.
struct Subscriber {
    conn: tokio::net::TcpStream,
    /// Bytes received and not parsed yet (the response head is skipped on connect).
    buf: Vec<u8>,
    /// Body bytes (chunk payloads), read as events.
    events: SseParser,
}

impl Subscriber {
    /// Connects, sends the request and waits for the response head and at least one byte of
    /// the body (with `last_event_id`, only the head).
    async fn connect(addr: std::net::SocketAddr, path: &str, last_event_id: Option<&str>) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut conn = socket.connect(addr).await.expect("connect");
        let last = last_event_id.map_or(String::new(), |id| format!("last-event-id: {id}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{last}connection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut s = Self {
            conn,
            buf: Vec::new(),
            events: SseParser::default(),
        };
        let body_at = loop {
            if let Some(end) = s.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&s.buf[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
                break end + 4;
            }
            assert!(s.fill().await, "closed before the response head");
        };
        s.buf.drain(..body_at);
        if last_event_id.is_none() {
            while !s.buf.windows(2).any(|w| w == b"\n\n") {
                assert!(s.fill().await, "closed before the first event");
            }
        }
        s
    }

    /// Reads more; false at the end of the connection.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, self.conn.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next chunk of the body (a chunk holds one or more whole events); `None` at the end
    /// of the connection.
    async fn next_chunk(&mut self) -> Option<Vec<u8>> {
        loop {
            // `<hex size>\r\n<bytes>\r\n`
            let chunk = self
                .buf
                .windows(2)
                .position(|w| w == b"\r\n")
                .and_then(|eol| {
                    let size =
                        usize::from_str_radix(std::str::from_utf8(&self.buf[..eol]).ok()?, 16)
                            .ok()?;
                    let start = eol + 2;
                    (self.buf.len() >= start + size + 2).then_some((start, size))
                });
            if let Some((start, size)) = chunk {
                let bytes = self.buf[start..start + size].to_vec();
                self.buf.drain(..start + size + 2);
                return Some(bytes);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads `n` events and returns their data.
    async fn read_events(&mut self, n: usize) -> Vec<String> {
        let mut datas = Vec::with_capacity(n);
        while datas.len() < n {
            match self.events.next_block() {
                Some(Block::Event(ev)) => datas.push(ev.data),
                Some(Block::Comment(c)) => panic!("a comment, with keep-alive off: {c:?}"),
                None => {
                    let chunk = self.next_chunk().await.expect("more events");
                    assert!(
                        !chunk.is_empty(),
                        "the body ended after {} events",
                        datas.len()
                    );
                    self.events.push(&chunk);
                }
            }
        }
        datas
    }

    /// Whether the body ends now, with no byte after the events read.
    async fn ends(&mut self) -> bool {
        self.events.holds_nothing() && self.next_chunk().await.is_some_and(|c| c.is_empty())
    }
}
