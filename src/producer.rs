//! The detached task that drives an inner SSE body into the store.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::OptionFuture;
use futures_util::FutureExt;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::config::Config;
use crate::drain::ProducerGuard;
use crate::metrics;
use crate::session::{Epoch, EventId, IdBuf, Outcome, SessionKey};
use crate::sse::{encode_event_into, Parser};
use crate::store::{Appended, EventBlock, EventBlockBuilder, Store, StoreError};
use crate::BoxError;

/// Events produced while the store is unreachable are held up to this many; then the inner body
/// is not polled until the store takes them (the generation waits, nothing is dropped).
const MAX_PENDING_EVENTS: usize = crate::limits::MAX_PENDING_EVENTS;
/// The same bound in bytes: whatever the size of the events, the producer holds at most this
/// much (plus one event) while the store does not take them.
const MAX_PENDING_BYTES: usize = crate::limits::MAX_PENDING_BYTES;
/// Consecutive failed appends before the session is given up as failed.
const MAX_APPEND_FAILURES: u32 = crate::limits::MAX_APPEND_FAILURES;

/// The most bytes the producer puts in one block (a larger event is a block of its own): a
/// reader sends a block, or its part after the reader's position, as one write.
const MAX_BLOCK_BYTES: usize = crate::limits::BLOCK_BYTES;

/// The most bytes of events in one append: one store call does not hold a shared connection
/// (or a lock) for long, whatever the producer has ready.
const APPEND_BYTES: usize = crate::limits::APPEND_BYTES;

type InFlight =
    Pin<Box<dyn Future<Output = (Result<Appended, StoreError>, Vec<EventBlock>)> + Send>>;

/// Spawns the producer of a claimed, started session. It owns the inner body from now on: no
/// client connection can stop it, only its end, an error, a limit or a cancel.
pub(crate) fn spawn<St, B>(
    store: St,
    key: SessionKey,
    epoch: Epoch,
    body: B,
    config: Arc<Config>,
    running: ProducerGuard,
) where
    St: Store,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    metrics::session_started();
    let task = async move {
        let _running = running;
        let run = AssertUnwindSafe(produce(&store, &key, epoch, body, &config)).catch_unwind();
        let outcome = match run.await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                // Cancelled, or the session vanished: it already has its final state.
                metrics::session_ended(Outcome::Cancelled);
                tracing::debug!("session cancelled (or gone); its producer stopped");
                return;
            }
            Err(_) => {
                tracing::error!("the inner SSE body panicked; session marked failed");
                Outcome::Failed
            }
        };
        metrics::session_ended(outcome);
        match outcome {
            Outcome::Failed => tracing::warn!("session failed"),
            _ => tracing::debug!(outcome = outcome.reason().as_str(), "session ended"),
        }
        finish(&store, &key, epoch, outcome, &config).await;
    };
    // In the request's span: its lines name the session.
    tokio::spawn(tracing::Instrument::in_current_span(task));
}

/// Records the end of a session, retrying a failed call (a finish is idempotent and the store
/// keeps the first outcome, so a retry after a lost reply is safe).
///
/// The wait between attempts gives way to a cancel (the store then holds its outcome already,
/// which a finish would not overwrite anyway) and to the drain deadline (the process is going
/// away: the session expires with its lease or lifetime), so that neither waits for a backoff.
async fn finish<St: Store>(
    store: &St,
    key: &SessionKey,
    epoch: Epoch,
    outcome: Outcome,
    config: &Config,
) {
    let mut failures = 0;
    loop {
        let e = match store.finish(key, epoch, outcome).await {
            Ok(()) => return,
            Err(e) => e,
        };
        failures += 1;
        metrics::store_error();
        tracing::warn!(error = %e, failures, ?outcome, "could not record the end of a session");
        if failures >= MAX_APPEND_FAILURES {
            break;
        }
        tokio::select! {
            biased;
            Ok(()) = store.cancelled(key, epoch) => {
                tracing::debug!("session cancelled (or gone) while its end was being recorded");
                return;
            }
            () = config.drain.aborted() => {
                tracing::warn!("drain deadline reached while recording the end of a session");
                break;
            }
            () = tokio::time::sleep(backoff(failures)) => {}
        }
    }
    tracing::error!(
        ?outcome,
        "gave up recording the end of a session; it will expire with its lifetime"
    );
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64 << failures.min(6))
}

/// How long a watch for cancellation must have held before its failure counts as a new outage
/// (its backoff starts again from the shortest).
const CANCEL_WATCH_HELD: Duration = Duration::from_secs(10);

/// Drives the body to its end. `None` when the session was cancelled or vanished.
async fn produce<St, B>(
    store: &St,
    key: &SessionKey,
    epoch: Epoch,
    body: B,
    config: &Config,
) -> Option<Outcome>
where
    St: Store,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    // The watch for cancellation. When it fails it is re-armed after a backoff: until then a
    // cancel is still seen by the next append.
    let mut cancelled = pin!(store.cancelled(key, epoch));
    let mut watch_cancel = true;
    let mut watch_armed_at = Instant::now();
    let mut watch_failures: u32 = 0;
    let mut rewatch = pin!(tokio::time::sleep(Duration::ZERO));
    let mut deadline = pin!(tokio::time::sleep(config.max_lifetime));
    let mut drained = pin!(config.drain.aborted());
    // Set when the drain deadline or the lifetime is reached: the body is not read any more and
    // events the store does not take at once are given up.
    let mut stopping = false;
    let mut framer = Framer::new(config.max_event_size, St::MAX_EVENT_BYTES, epoch);
    let mut in_flight: Option<InFlight> = None;
    let mut ended: Option<Outcome> = None;
    let mut failures: u32 = 0;
    // The wait before retrying a failed append: a state of the loop, not a sleep inside it, so
    // that a cancel, the drain deadline and the lifetime are seen during it, and the body is
    // still read (up to `MAX_PENDING_EVENTS`).
    let mut retry = pin!(tokio::time::sleep(Duration::ZERO));
    let mut retrying = false;

    loop {
        if in_flight.is_none() && !retrying && framer.has_pending() {
            // Everything produced while the previous write was in flight goes in this one.
            let batch = framer.take_pending();
            let (store, key) = (store.clone(), key.clone());
            in_flight = Some(Box::pin(async move {
                let result = store.append(&key, epoch, &batch).await;
                (result, batch)
            }));
        }
        if in_flight.is_none() && !framer.has_pending() {
            if let Some(outcome) = ended {
                return Some(outcome);
            }
        }
        let can_read = ended.is_none() && framer.has_room();
        tokio::select! {
            biased;
            result = &mut cancelled, if watch_cancel => match result {
                Ok(()) => return None,
                Err(e) => {
                    metrics::store_error();
                    if watch_armed_at.elapsed() >= CANCEL_WATCH_HELD {
                        watch_failures = 0;
                    }
                    watch_failures += 1;
                    let wait = backoff(watch_failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot watch for cancellation; retrying");
                    watch_cancel = false;
                    rewatch.as_mut().reset(Instant::now() + wait);
                }
            },
            Some((result, batch)) = OptionFuture::from(in_flight.as_mut()), if in_flight.is_some() => {
                in_flight = None;
                match result {
                    Ok(Appended::Stored) => {
                        failures = 0;
                        metrics::events_stored(batch.iter().map(EventBlock::len).sum());
                    }
                    Ok(Appended::Stopped) => return None,
                    Err(e) => {
                        failures += 1;
                        metrics::store_error();
                        if stopping {
                            tracing::warn!(error = %e, "could not store the last events of a session that is ending");
                            return Some(Outcome::Failed);
                        }
                        tracing::warn!(error = %e, failures, "could not store events; retrying");
                        if failures >= MAX_APPEND_FAILURES {
                            return Some(Outcome::Failed);
                        }
                        // Retry the same events first, in order, with what came since.
                        framer.put_back(batch);
                        retry.as_mut().reset(Instant::now() + backoff(failures));
                        retrying = true;
                    }
                }
            },
            () = &mut drained, if !stopping => {
                tracing::warn!("drain deadline reached; ending the session as failed");
                if let Some(outcome) = stop(&mut stopping, &mut ended, retrying) {
                    return Some(outcome);
                }
            },
            () = &mut deadline, if !stopping => {
                tracing::warn!(lifetime = ?config.max_lifetime, "session reached its maximum lifetime; ending it as failed");
                if let Some(outcome) = stop(&mut stopping, &mut ended, retrying) {
                    return Some(outcome);
                }
            },
            () = &mut retry, if retrying => retrying = false,
            () = &mut rewatch, if !watch_cancel => {
                cancelled.set(store.cancelled(key, epoch));
                watch_cancel = true;
                watch_armed_at = Instant::now();
            },
            frame = next_frame(body.as_mut()), if can_read => {
                ended = framer.take(frame);
                // Take every frame the body already has ready too, so that one append, one
                // notification and one reader wake-up carry them all. A frame that is not ready
                // ends the loop: a paced stream is not delayed.
                while ended.is_none() && framer.pending_events() < READY_BATCH && framer.has_room() {
                    match next_frame(body.as_mut()).now_or_never() {
                        Some(frame) => ended = framer.take(frame),
                        None => break,
                    }
                }
            },
        }
    }
}

/// The drain deadline or the lifetime is reached: the body is read no more and, unless it had
/// already ended, the session ends as failed. Events waiting for the retry of a failed append
/// are given up at once (`Some`): the store is failing and the session may not wait for it.
/// An append in flight is still waited for, and what it leaves is stored without retry.
fn stop(stopping: &mut bool, ended: &mut Option<Outcome>, retrying: bool) -> Option<Outcome> {
    *stopping = true;
    ended.get_or_insert(Outcome::Failed);
    retrying.then_some(Outcome::Failed)
}

/// Events taken from a body's ready frames before they are appended.
const READY_BATCH: usize = crate::limits::READY_BATCH_EVENTS;

/// Turns the inner body's frames into stored events: parse, number, encode once, back to back
/// into blocks.
struct Framer {
    parser: Parser,
    epoch: Epoch,
    /// The block being filled.
    block: EventBlockBuilder,
    id_buf: IdBuf,
    /// Full blocks waiting for the next append (and failed ones waiting for their retry).
    pending: Vec<EventBlock>,
    /// Events in `pending`.
    pending_events: usize,
    /// Bytes of the events in `pending`.
    pending_bytes: usize,
    /// The largest encoded event the store takes ([`Store::MAX_EVENT_BYTES`]).
    max_encoded: usize,
}

impl Framer {
    fn new(max_event_size: usize, max_encoded: usize, epoch: Epoch) -> Self {
        Framer {
            parser: Parser::new(max_event_size),
            epoch,
            block: EventBlockBuilder::new(1),
            id_buf: IdBuf::default(),
            pending: Vec::new(),
            pending_events: 0,
            pending_bytes: 0,
            max_encoded,
        }
    }

    /// Parses one frame into the current block; `Some` when the body ended.
    fn take(
        &mut self,
        frame: Option<Result<http_body::Frame<Bytes>, BoxError>>,
    ) -> Option<Outcome> {
        match frame {
            None => Some(Outcome::Completed),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "inner SSE body failed; session marked failed");
                Some(Outcome::Failed)
            }
            Some(Ok(frame)) => {
                // Trailers mean nothing to an event stream; only data is parsed.
                let data = frame.into_data().ok()?;
                let Self {
                    parser,
                    epoch,
                    block,
                    id_buf,
                    pending,
                    pending_events,
                    pending_bytes,
                    max_encoded,
                } = self;
                // Set by an event too large for the store once encoded: it is not kept, nor is
                // anything after it.
                let mut too_large = None;
                let fed = parser.feed(&data, |event| {
                    if too_large.is_some() {
                        return;
                    }
                    if block.byte_len() >= MAX_BLOCK_BYTES {
                        if let Some(full) = block.finish() {
                            *pending_events += full.len();
                            *pending_bytes += full.bytes().len();
                            pending.push(full);
                        }
                    }
                    let id = EventId {
                        epoch: *epoch,
                        seq: block.next_seq(),
                    };
                    let id = id.write(id_buf);
                    block.push_with(|buf| {
                        let before = buf.len();
                        encode_event_into(buf, id, &event);
                        let size = buf.len() - before;
                        if size > *max_encoded {
                            buf.truncate(before);
                            too_large = Some(size);
                        }
                    });
                });
                if let Some(size) = too_large {
                    tracing::warn!(size, max = *max_encoded, "inner SSE body produced an event larger than the store takes; session marked failed");
                    return Some(Outcome::Failed);
                }
                match fed {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "inner SSE body produced an oversized event; session marked failed");
                        Some(Outcome::Failed)
                    }
                }
            }
        }
    }

    /// Events framed and not yet handed to an append.
    fn pending_events(&self) -> usize {
        self.pending_events + self.block.len()
    }

    /// Bytes of the events framed and not yet handed to an append.
    fn pending_bytes(&self) -> usize {
        self.pending_bytes + self.block.byte_len()
    }

    fn has_pending(&self) -> bool {
        self.pending_events() > 0
    }

    /// Whether the body may be read further: fewer than [`MAX_PENDING_EVENTS`] events and
    /// [`MAX_PENDING_BYTES`] bytes wait for the store.
    fn has_room(&self) -> bool {
        self.pending_events() < MAX_PENDING_EVENTS && self.pending_bytes() < MAX_PENDING_BYTES
    }

    /// The oldest framed events, in blocks, for one append: every one, up to
    /// [`APPEND_BYTES`] (at least one block). What is left goes in the next append, at once.
    fn take_pending(&mut self) -> Vec<EventBlock> {
        if let Some(block) = self.block.finish() {
            self.pending_events += block.len();
            self.pending_bytes += block.bytes().len();
            self.pending.push(block);
        }
        let mut bytes = 0;
        let take = self
            .pending
            .iter()
            .position(|b| {
                bytes += b.bytes().len();
                bytes > APPEND_BYTES
            })
            .unwrap_or(self.pending.len())
            .max(1)
            .min(self.pending.len());
        let rest = self.pending.split_off(take);
        let batch = std::mem::replace(&mut self.pending, rest);
        self.pending_events -= batch.iter().map(EventBlock::len).sum::<usize>();
        self.pending_bytes -= batch.iter().map(|b| b.bytes().len()).sum::<usize>();
        batch
    }

    /// Puts the blocks of a failed append back in front of what was framed since.
    fn put_back(&mut self, mut failed: Vec<EventBlock>) {
        self.pending_events += failed.iter().map(EventBlock::len).sum::<usize>();
        self.pending_bytes += failed.iter().map(|b| b.bytes().len()).sum::<usize>();
        failed.append(&mut self.pending);
        self.pending = failed;
    }
}

/// The next frame, with the error boxed so that the producer's state stays `Send` whatever the
/// body's error type.
async fn next_frame<B>(body: Pin<&mut B>) -> Option<Result<http_body::Frame<Bytes>, BoxError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    body.frame().await.map(|r| r.map_err(Into::into))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: u64, n: u64) -> EventBlock {
        let mut b = EventBlockBuilder::new(first);
        for seq in first..first + n {
            b.push_with(|buf| buf.extend_from_slice(format!("{seq};").as_bytes()));
        }
        b.finish().unwrap()
    }

    #[test]
    fn producer_stop_gives_up_events_waiting_for_a_retry_at_once() {
        let (mut stopping, mut ended) = (false, None);
        assert_eq!(stop(&mut stopping, &mut ended, true), Some(Outcome::Failed));
        assert!(stopping);
    }

    #[test]
    fn producer_stop_without_a_retry_keeps_flushing_and_keeps_a_body_end() {
        let (mut stopping, mut ended) = (false, None);
        assert_eq!(stop(&mut stopping, &mut ended, false), None);
        assert_eq!(ended, Some(Outcome::Failed));
        // A body that had ended completes if its last events are stored.
        let (mut stopping, mut ended) = (false, Some(Outcome::Completed));
        assert_eq!(stop(&mut stopping, &mut ended, false), None);
        assert_eq!(ended, Some(Outcome::Completed));
    }

    #[test]
    fn producer_backoff_doubles_from_100_ms_up_to_3_2_s() {
        let waits: Vec<u64> = (1..=8).map(|f| backoff(f).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 3200, 3200]);
    }

    #[test]
    fn producer_appends_at_most_append_bytes_at_once_and_at_least_one_block() {
        let framer = |blocks: Vec<EventBlock>| {
            let mut f = Framer::new(1024, usize::MAX, Epoch::from_raw(1));
            f.put_back(blocks);
            f
        };
        // Blocks of exactly a quarter of the limit: four per append, then the rest.
        let sized = |first: u64| {
            let mut b = EventBlockBuilder::new(first);
            b.push_with(|buf| buf.resize(APPEND_BYTES / 4, b'x'));
            b.finish().unwrap()
        };
        for (n, appends) in [
            (0, vec![]),
            (1, vec![1]),
            (3, vec![3]),
            (4, vec![4]),
            (5, vec![4, 1]),
            (8, vec![4, 4]),
            (9, vec![4, 4, 1]),
        ] {
            let mut f = framer((1..=n).map(sized).collect());
            let mut got = Vec::new();
            while f.has_pending() {
                got.push(f.take_pending().len());
            }
            assert_eq!(got, appends, "{n} blocks");
            assert_eq!(f.pending_events(), 0);
            assert_eq!(f.pending_bytes(), 0);
        }
        // One block larger than the limit goes alone.
        let mut big = EventBlockBuilder::new(1);
        big.push_with(|buf| buf.resize(2 * APPEND_BYTES, b'x'));
        let mut f = framer(vec![big.finish().unwrap(), block(2, 1)]);
        assert_eq!(f.take_pending().len(), 1);
        assert_eq!(f.take_pending().len(), 1);
        assert!(!f.has_pending());
    }

    #[test]
    fn producer_put_back_retries_failed_blocks_before_newer_ones() {
        let mut framer = Framer::new(1024, usize::MAX, Epoch::from_raw(1));
        framer.put_back(vec![block(3, 2)]);
        framer.put_back(vec![block(1, 2)]);
        assert_eq!(framer.pending_events(), 4);
        let batch = framer.take_pending();
        let firsts: Vec<u64> = batch.iter().map(EventBlock::first_seq).collect();
        assert_eq!(firsts, [1, 3]);
        assert!(!framer.has_pending());
    }
}
