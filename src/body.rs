use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use std::sync::Arc;

use crate::config::Config;
use crate::fanout::Follower;
use crate::metrics;
use crate::session::{Epoch, EventId, Outcome, SessionKey};
use crate::sse::EVICTED_COMMENT;
use crate::store::{EventBlock, Store};
use crate::BoxError;

pin_project! {
    /// The response body of [`ResumableSse`](crate::ResumableSse): the inner body untouched, or a
    /// session's events (replayed, then live) with keep-alive comments, or nothing.
    ///
    /// See the [crate docs](crate) for what a session body guarantees.
    pub struct ResumableBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] inner: B },
        Session { events: SessionEvents },
        Empty,
    }
}

impl<B> std::fmt::Debug for ResumableBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Session { .. } => "Session",
            Kind::Empty => "Empty",
        };
        f.debug_tuple("ResumableBody").field(&kind).finish()
    }
}

impl<B> ResumableBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    pub(crate) fn session(events: SessionEvents) -> Self {
        Self {
            kind: Kind::Session { events },
        }
    }
}

impl<B> Default for ResumableBody<B> {
    /// An empty body (what `tower_http::timeout::TimeoutLayer` needs for its `408`).
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> Body for ResumableBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Session { events } => events.poll_frame(cx),
            KindProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Session { events } => events.done && events.error.is_none(),
            Kind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Session { .. } => SizeHint::default(),
            Kind::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A session's events for one connection, with keep-alive comments while it is idle.
pub(crate) struct SessionEvents {
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>,
    keep_alive: Option<Ticker>,
    /// Whether the first frame was sent, and whether to be pending once now (see `poll_frame`).
    started: bool,
    yield_next: bool,
    done: bool,
    /// An error that ends the stream, held for one poll: the server writes out what it holds
    /// first (the last events, the end event), then aborts.
    error: Option<BoxError>,
}

/// The keep-alive timer of one connection.
struct Ticker {
    interval: Duration,
    comment: Bytes,
    sleep: Pin<Box<Sleep>>,
    /// Whether an event went out since the timer was last armed. Events only set the flag, so
    /// the clock is read once per interval, not once per event.
    active: bool,
}

impl SessionEvents {
    pub(crate) fn new<St: Store>(reader: Reader<St>, keep_alive: &crate::KeepAlive) -> Self {
        // In the request's span: its lines name the session.
        let span = tracing::Span::current();
        let stream = futures_util::stream::unfold(reader, move |mut reader| {
            let span = span.clone();
            async move {
                let item = tracing::Instrument::instrument(reader.next(), span).await?;
                Some((item, reader))
            }
        });
        Self {
            stream: Box::pin(stream),
            keep_alive: keep_alive.get_interval().map(|interval| Ticker {
                interval,
                comment: keep_alive.comment().clone(),
                sleep: Box::pin(tokio::time::sleep(interval)),
                active: false,
            }),
            started: false,
            yield_next: false,
            done: false,
            error: None,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(e) = self.error.take() {
            self.done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        if std::mem::take(&mut self.yield_next) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some(ka) = &mut self.keep_alive {
                    // The timer is re-armed lazily when it fires, not on every event.
                    ka.active = true;
                }
                if !self.started {
                    // After the first frame, be pending once (having asked to be polled again):
                    // hyper then writes the head and that frame at once instead of filling its
                    // buffer with what a replay has ready, so the first byte leaves early.
                    self.started = true;
                    self.yield_next = true;
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Poll::Ready(Some(Err(e))) => {
                // Pending once, having asked to be polled again: a server flushes what it
                // buffered when its body is pending, and may drop it when the body fails.
                self.error = Some(e);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let Some(ka) = &mut self.keep_alive else {
            return Poll::Pending;
        };
        loop {
            ready!(ka.sleep.as_mut().poll(cx));
            let next = Instant::now() + ka.interval;
            ka.sleep.as_mut().reset(next);
            // A comment goes out after a whole interval without events: between one and two
            // intervals after the last event.
            if !std::mem::take(&mut ka.active) {
                return Poll::Ready(Some(Ok(Frame::data(ka.comment.clone()))));
            }
        }
    }
}

/// The event that tells a client how its session ended: named `name`, with the id of the last
/// event the client has (`seq`), and the outcome's reason as its data.
fn end_event(name: &str, epoch: Epoch, seq: u64, outcome: Outcome) -> Bytes {
    let id = EventId { epoch, seq };
    Bytes::from(format!(
        "event: {name}\nid: {id}\ndata: {}\n\n",
        outcome.reason().as_str()
    ))
}

/// How many events one store read fetches at most.
const READ_BATCH: usize = crate::limits::READ_PAGE_EVENTS;

/// One connection's cursor into a session log: it replays what is stored after the cursor, then
/// waits for changes. The log is the buffer, so a slow reader only delays itself. It reads and
/// waits through its [`Follower`]: the store itself, or the session's shared tail in this process.
pub(crate) struct Reader<St: Store> {
    store: St,
    config: Arc<Config>,
    key: SessionKey,
    epoch: Epoch,
    cursor: u64,
    follower: Option<Follower<St>>,
    buffered: VecDeque<EventBlock>,
    finished: bool,
    /// How the session ended, once the reader has its last event: what is left to send about
    /// it (the end event, the abort).
    ending: Option<Outcome>,
    /// The end event went out; the abort follows.
    abort: bool,
    /// The last read returned everything up to the newest event.
    caught_up: bool,
    _connected: metrics::ConnectedClient,
}

impl<St: Store> Reader<St> {
    pub(crate) fn new(
        store: St,
        config: Arc<Config>,
        key: SessionKey,
        epoch: Epoch,
        after: u64,
    ) -> Self {
        Self {
            store,
            config,
            key,
            epoch,
            cursor: after,
            follower: None,
            buffered: VecDeque::new(),
            finished: false,
            ending: None,
            abort: false,
            caught_up: false,
            _connected: metrics::ConnectedClient::new(),
        }
    }

    /// A reader with its follower already made (the first request's, made before the producer
    /// starts, so that its position holds the session's events from the first one).
    pub(crate) fn following(
        store: St,
        config: Arc<Config>,
        key: SessionKey,
        epoch: Epoch,
        after: u64,
        follower: Option<Follower<St>>,
    ) -> Self {
        let mut reader = Self::new(store, config, key, epoch, after);
        reader.follower = follower;
        reader
    }

    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if let Some(block) = self.buffered.pop_front() {
                // A whole block, or what follows the cursor in it, is one frame: shared with the
                // store, never copied.
                self.cursor = block.last_seq();
                return Some(Ok(block.into_bytes()));
            }
            if self.finished {
                return self.end();
            }
            if std::mem::take(&mut self.caught_up) {
                // The last read reached the newest event: nothing can be new until the store
                // signals a change, so wait for it rather than read an empty page.
                if let Some(f) = &mut self.follower {
                    f.changed().await;
                }
            }
            let follower = match &mut self.follower {
                Some(f) => f,
                None => {
                    // Subscribe before the first read, so nothing appended in between is missed.
                    let follow =
                        self.config
                            .fanout
                            .follow(&self.store, &self.key, self.epoch, self.cursor);
                    match follow.await {
                        Ok(f) => self.follower.insert(f),
                        Err(e) => return Some(Err(self.failed(e))),
                    }
                }
            };
            let read = follower.read(&self.store, &self.key, self.epoch, self.cursor, READ_BATCH);
            let batch = match read.await {
                Ok(Some(batch)) => batch,
                // Expired or replaced: there is nothing more to send.
                Ok(None) => return None,
                Err(e) => return Some(Err(self.failed(e))),
            };
            let next_seq = batch
                .blocks
                .first()
                .map_or(batch.first_seq, EventBlock::first_seq);
            if next_seq > self.cursor.saturating_add(1) {
                // The events this client still needs were evicted. The connection ends at once,
                // with a comment saying why, and its reconnect is told `410 evicted`, rather than
                // skipping ahead silently.
                tracing::debug!(
                    cursor = self.cursor,
                    oldest = next_seq,
                    "reader fell behind the retained history"
                );
                metrics::reader_evicted();
                self.finished = true;
                return Some(Ok(Bytes::from_static(EVICTED_COMMENT)));
            }
            if batch.end {
                self.ending = batch.outcome;
            }
            if batch.blocks.is_empty() {
                if batch.end {
                    self.finished = true;
                    return self.end();
                }
                follower.changed().await;
                continue;
            }
            // The page holds the newest event of a finished session: nothing follows, whatever
            // the page size divides.
            self.finished = batch.end;
            self.caught_up = batch.caught_up;
            if let Some(last) = batch.blocks.last() {
                // What this reader holds now needs the store no more.
                follower.reached(last.last_seq());
            }
            self.buffered.extend(batch.blocks);
        }
    }

    /// What goes out after the last event: the end event and the abort, as configured.
    fn end(&mut self) -> Option<Result<Bytes, BoxError>> {
        if std::mem::take(&mut self.abort) {
            return Some(Err("the session failed".into()));
        }
        let outcome = self.ending.take()?;
        tracing::debug!(
            outcome = outcome.reason().as_str(),
            "stream reached the end of its session"
        );
        self.abort = outcome == Outcome::Failed && self.config.abort_on_failure;
        match &self.config.end_event {
            Some(name) => Some(Ok(end_event(name, self.epoch, self.cursor, outcome))),
            None => self.end(),
        }
    }

    fn failed(&mut self, e: crate::store::StoreError) -> BoxError {
        metrics::store_error();
        tracing::warn!(error = %e, "session store failed while serving a client");
        self.finished = true;
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::tests::running;
    use crate::store::EventBlockBuilder;
    use crate::MemoryStore;

    /// The next frame's bytes, and when it came (the clock is paused: only timers move it).
    async fn next(events: &mut SessionEvents) -> (Bytes, Instant) {
        let frame = std::future::poll_fn(|cx| events.poll_frame(cx)).await;
        let data = frame.expect("a frame").expect("no error").into_data();
        (data.expect("a data frame"), Instant::now())
    }

    /// A finished session of `n` one-event blocks, and the events a reader from `after` sends
    /// before its stream ends (the clock is paused: a reader that waits for a change that never
    /// comes fails the deadline at once instead of hanging).
    async fn read_to_end(n: u64, after: u64, blocks_of: u64) -> Vec<u64> {
        let store = MemoryStore::new();
        let (key, epoch) = running(&store).await;
        let mut first = 1;
        while first <= n {
            let mut b = EventBlockBuilder::new(first);
            for seq in first..(first + blocks_of).min(n + 1) {
                b.push_with(|buf| buf.extend_from_slice(format!("{seq}\n\n").as_bytes()));
            }
            let block = b.finish().unwrap();
            first = block.last_seq() + 1;
            store.append(&key, epoch, &[block]).await.unwrap();
        }
        store
            .finish(&key, epoch, crate::Outcome::Completed)
            .await
            .unwrap();
        let mut reader = Reader::new(store, Arc::default(), key, epoch, after);
        let mut seqs = Vec::new();
        let read_all = async {
            while let Some(frame) = reader.next().await {
                let frame = frame.expect("no error");
                for ev in frame.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    seqs.push(std::str::from_utf8(ev).unwrap().parse::<u64>().unwrap());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3600), read_all)
            .await
            .expect("the stream ends");
        seqs
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_ends_at_once_whatever_the_read_page_divides() {
        let p = READ_BATCH as u64;
        for n in [0, 1, p - 1, p, p + 1, 2 * p, 2 * p + 1] {
            for after in [0, 1, n.saturating_sub(p), n.saturating_sub(1), n] {
                let after = after.min(n);
                for blocks_of in [1, p, 3 * p] {
                    let got = read_to_end(n, after, blocks_of).await;
                    assert_eq!(
                        got,
                        (after + 1..=n).collect::<Vec<_>>(),
                        "n {n}, after {after}, blocks of {blocks_of}"
                    );
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_comes_one_to_two_intervals_after_the_last_event_and_never_while_events_flow(
    ) {
        const INTERVAL: Duration = Duration::from_millis(100);
        let store = MemoryStore::new();
        let (key, epoch) = running(&store).await;
        let reader = Reader::new(store.clone(), Arc::default(), key.clone(), epoch, 0);
        let keep_alive = crate::KeepAlive::new().interval(INTERVAL);
        let mut events = SessionEvents::new(reader, &keep_alive);
        // An event every 60 ms for a second: no comment among them.
        let producer = tokio::spawn(async move {
            for seq in 1..=17u64 {
                let mut b = EventBlockBuilder::new(seq);
                b.push_with(|buf| buf.extend_from_slice(format!("data: {seq}\n\n").as_bytes()));
                store
                    .append(&key, epoch, &[b.finish().unwrap()])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        });
        let mut last_event = Instant::now();
        for seq in 1..=17 {
            let (bytes, at) = next(&mut events).await;
            assert_eq!(
                bytes,
                format!("data: {seq}\n\n"),
                "no keep-alive between events"
            );
            last_event = at;
        }
        producer.await.unwrap();
        let (bytes, at) = next(&mut events).await;
        assert_eq!(bytes, crate::sse::KEEP_ALIVE);
        let idle = at - last_event;
        assert!(idle >= INTERVAL && idle <= 2 * INTERVAL, "{idle:?}");
        // Then one per interval while idle.
        let (bytes, again) = next(&mut events).await;
        assert_eq!(bytes, crate::sse::KEEP_ALIVE);
        assert_eq!(again - at, INTERVAL);
    }
}
