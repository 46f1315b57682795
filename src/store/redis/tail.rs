//! The shared tail: the newest events of a session, kept in the process for all its local
//! readers, and the fetch that refreshes it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::keys::Keys;
use super::notify::Generation;
use super::{lock, RedisStore};
use crate::session::Epoch;
use crate::store::block::{drop_oldest, Page};
use crate::store::{EventBlock, ReadBatch, Status};

/// Events one fetch asks for.
const TAIL_PAGE: usize = crate::limits::REDIS_TAIL_PAGE_EVENTS;
/// Events the shared tail keeps per session.
const TAIL_CAPACITY: usize = crate::limits::REDIS_TAIL_CAPACITY_EVENTS;

pub(super) type Fetch =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), Arc<str>>>>;

/// The newest events of a session, shared by the readers of this process: one fetch from Redis
/// per change serves every local subscriber.
#[derive(Default)]
pub(super) struct Tail {
    pub(super) epoch: Option<Epoch>,
    /// Consecutive events ending at `last_seq`, in the chunks read from Redis.
    pub(super) blocks: VecDeque<EventBlock>,
    /// The number of events in `blocks`.
    pub(super) events: usize,
    pub(super) last_seq: u64,
    pub(super) status: Option<Status>,
    pub(super) first_seq: u64,
    /// The newest sequence number Redis reported.
    pub(super) head_seq: u64,
    pub(super) gone: bool,
    /// The notifications the tail reflects, and when it was fetched.
    pub(super) generation: Generation,
    pub(super) fetched_at: Option<Instant>,
    pub(super) fetching: Option<Fetch>,
}

impl Tail {
    /// Fresh when it reflects every notification received and was checked within the interval
    /// (the periodic check is also what notices a dead producer).
    pub(super) fn is_fresh(&self, generation: Generation, interval: Duration) -> bool {
        self.generation == generation
            && self.fetched_at.is_some_and(|t| t.elapsed() < interval)
            && self.fetching.is_none()
    }

    /// Forgets every event held and continues from `last_seq`.
    fn restart_at(&mut self, last_seq: u64) {
        self.blocks.clear();
        self.events = 0;
        self.last_seq = last_seq;
    }

    pub(super) fn oldest_cached(&self) -> u64 {
        self.blocks
            .front()
            .map_or(self.last_seq, |b| b.first_seq() - 1)
    }

    /// Appends the blocks that continue the tail, and forgets its oldest events beyond the
    /// capacity.
    fn extend(&mut self, blocks: Vec<EventBlock>) {
        for block in blocks {
            let Some(block) = block.slice(self.last_seq.saturating_add(1)..) else {
                continue;
            };
            if block.first_seq() != self.last_seq + 1 {
                break;
            }
            self.last_seq = block.last_seq();
            self.events += block.len();
            self.blocks.push_back(block);
        }
        let excess = self.events.saturating_sub(TAIL_CAPACITY);
        drop_oldest(&mut self.blocks, excess);
        self.events -= excess;
    }

    /// Takes in a page fetched from where the tail ends (`None`: the session is gone), marked
    /// with the notifications received when the fetch began.
    fn apply(&mut self, batch: Option<ReadBatch>, generation: Generation) {
        let Some(batch) = batch else {
            self.gone = true;
            self.generation = generation;
            return;
        };
        let next = batch
            .blocks
            .first()
            .map_or(batch.first_seq, EventBlock::first_seq);
        if next > self.last_seq.saturating_add(1) {
            // The session's limits trimmed what followed the tail before it was fetched: the
            // tail restarts at the oldest retained event. Readers older than that read directly
            // from now on, and see the gap themselves (they are evicted). Without this the page
            // would not continue the tail, and the tail would never move again.
            self.restart_at(next - 1);
        }
        self.extend(batch.blocks);
        self.status = Some(batch.status);
        self.first_seq = batch.first_seq;
        self.head_seq = batch.last_seq;
        self.gone = false;
        // A page that stops short of the newest event (full, or at the byte budget) means more
        // is waiting: the tail is not fresh yet.
        let complete = self.last_seq >= batch.last_seq;
        self.generation = if complete {
            generation
        } else {
            Generation::stale()
        };
    }

    /// The events the tail holds after `after`, when it holds that position and some events
    /// after it, whether or not it reflects every change announced. The page then says that
    /// more may follow (a newest sequence number past the page, and a finished status only when
    /// the tail holds every event), so that the reader reads again rather than waits for a
    /// change that may already have been announced.
    pub(super) fn serve_ahead(&self, after: u64, max: usize) -> Option<ReadBatch> {
        if after >= self.last_seq {
            return None;
        }
        let mut batch = self.serve(after, max)??;
        let complete = batch.status.is_finished() && self.last_seq >= self.head_seq;
        if !complete {
            let served = batch.blocks.last().map_or(after, EventBlock::last_seq);
            batch.last_seq = batch.last_seq.max(served.saturating_add(1));
            if batch.status.is_finished() {
                batch.status = Status::Running;
            }
        }
        Some(batch)
    }

    /// The events after `after`, if the tail holds that position.
    pub(super) fn serve(&self, after: u64, max: usize) -> Option<Option<ReadBatch>> {
        if self.gone {
            return Some(None);
        }
        let status = self.status?;
        if after < self.oldest_cached() || after > self.last_seq {
            return None;
        }
        let from = self.blocks.partition_point(|b| b.last_seq() <= after);
        Some(Some(ReadBatch {
            blocks: Page::collect(after, max, self.blocks.range(from..)),
            status,
            first_seq: self.first_seq,
            last_seq: self.head_seq,
        }))
    }
}

impl RedisStore {
    /// The fetch that refreshes the tail for every local reader: the one in flight, or a new one
    /// from where the tail ends, marked with `generation`.
    pub(super) fn fetch(
        &self,
        tail: &Arc<Mutex<Tail>>,
        t: &mut Tail,
        keys: Arc<Keys>,
        epoch: Epoch,
        generation: Generation,
    ) -> Fetch {
        let from = t.last_seq;
        t.fetching
            .get_or_insert_with(|| {
                let store = self.clone();
                let tail = tail.clone();
                // A task of its own: the fetch completes (and clears itself) even when the
                // reader that started it goes away mid-flight.
                let task = tokio::spawn(async move {
                    store.refresh(&keys, epoch, from, generation, &tail).await
                });
                async move {
                    task.await
                        .unwrap_or_else(|e| Err(Arc::from(format!("tail fetch failed: {e}"))))
                }
                .boxed()
                .shared()
            })
            .clone()
    }

    /// Fetches what follows the tail from Redis and appends it, for every local reader.
    async fn refresh(
        &self,
        keys: &Keys,
        epoch: Epoch,
        from: u64,
        generation: Generation,
        tail: &Mutex<Tail>,
    ) -> Result<(), Arc<str>> {
        let read = self.read_direct(keys, epoch, from, TAIL_PAGE).await;
        let mut t = lock(tail);
        if t.epoch != Some(epoch) {
            // Replaced meanwhile by a tail of another epoch, which may have a fetch of its own.
            return Ok(());
        }
        t.fetching = None;
        let batch = read.map_err(|e| Arc::<str>::from(e.to_string()))?;
        t.fetched_at = Some(Instant::now());
        t.apply(batch, generation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_blocks::{block, seqs};
    use super::*;
    use crate::session::Outcome;

    #[test]
    fn the_tail_keeps_its_newest_events_in_blocks() {
        let mut t = Tail {
            status: Some(Status::Running),
            ..Tail::default()
        };
        let mut next = 1;
        for _ in 0..100 {
            t.extend(vec![block(next, &[1; 50])]);
            next += 50;
        }
        assert_eq!(t.events, TAIL_CAPACITY);
        assert_eq!(t.last_seq, 5000);
        assert_eq!(t.oldest_cached(), 5000 - TAIL_CAPACITY as u64);
        // Blocks that overlap or skip are sliced or ignored.
        t.extend(vec![block(4990, &[1; 20]), block(5020, &[1; 3])]);
        assert_eq!(t.last_seq, 5009);
        let served = t.serve(4999, 5).unwrap().unwrap();
        assert_eq!(seqs(&served.blocks), [(5000, 5000), (5001, 5004)]);
        assert_eq!(t.serve(5009, 5).unwrap().unwrap().blocks.len(), 0);
        assert!(t.serve(100, 5).is_none(), "older than the tail");
        let events: usize = t
            .serve(1000, usize::MAX)
            .unwrap()
            .unwrap()
            .blocks
            .iter()
            .map(EventBlock::len)
            .sum();
        assert_eq!(events, 4009);
    }

    fn page(blocks: Vec<EventBlock>, status: Status, first_seq: u64, last_seq: u64) -> ReadBatch {
        ReadBatch {
            blocks,
            status,
            first_seq,
            last_seq,
        }
    }

    #[test]
    fn a_tail_overtaken_by_trimming_restarts_at_the_oldest_retained_event() {
        let fetched = Generation::default();
        let mut t = Tail::default();
        t.apply(
            Some(page(vec![block(1, &[1; 10])], Status::Running, 1, 10)),
            fetched,
        );
        assert_eq!((t.last_seq, t.generation), (10, fetched));
        // The limits trimmed events 11 to 3000 before the next fetch, whose page is full.
        t.apply(
            Some(page(
                vec![block(3001, &[1; 1024])],
                Status::Running,
                3001,
                5000,
            )),
            fetched,
        );
        assert_eq!((t.oldest_cached(), t.last_seq), (3000, 4024));
        assert_eq!(t.generation, Generation::stale(), "more is waiting");
        // A reader at 10 is older than the tail: it reads directly and sees the gap.
        assert!(t.serve(10, 100).is_none());
        assert!(t.serve_ahead(10, 100).is_none());
        // Readers in the new tail are served, and told more may follow.
        let ahead = t.serve_ahead(4000, 100).unwrap();
        assert_eq!(seqs(&ahead.blocks), [(4001, 4024)]);
        assert!(!ahead.reaches_end(4000) && ahead.last_seq > 4024);
        // The rest, and the end.
        t.apply(
            Some(page(
                vec![block(4025, &[1; 976])],
                Status::Finished(Outcome::Completed),
                3001,
                5000,
            )),
            fetched,
        );
        assert_eq!((t.last_seq, t.generation), (5000, fetched));
        let end = t.serve(5000, 100).unwrap().unwrap();
        assert!(end.blocks.is_empty() && end.reaches_end(5000));
        let last = t.serve(4990, 1024).unwrap().unwrap();
        assert!(last.reaches_end(4990));
        // A page after a gap that is not full: fresh, and the readers before the gap are not
        // served an empty page that never ends.
        t.apply(
            Some(page(
                vec![block(9001, &[1; 300])],
                Status::Finished(Outcome::Completed),
                9001,
                9300,
            )),
            fetched,
        );
        assert_eq!((t.oldest_cached(), t.last_seq), (9000, 9300));
        assert!(t.serve(5000, 100).is_none());
        assert!(t.serve(9300, 100).unwrap().unwrap().reaches_end(9300));
    }

    #[test]
    fn a_tail_behind_a_change_serves_what_it_holds_and_says_more_may_follow() {
        let mut t = Tail {
            status: Some(Status::Running),
            ..Tail::default()
        };
        t.extend(vec![block(1, &[1; 10])]);
        t.head_seq = 10;
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!(seqs(&page.blocks), [(5, 10)]);
        assert!(
            page.last_seq > 10,
            "the reader must not take itself as caught up"
        );
        assert!(
            t.serve_ahead(10, 100).is_none(),
            "nothing held after the position"
        );
        // Finished with every event held: final, as it is.
        t.status = Some(Status::Finished(Outcome::Completed));
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!((page.status, page.last_seq), (t.status.unwrap(), 10));
        // Finished with events not fetched yet: not the end for this reader.
        t.head_seq = 20;
        let page = t.serve_ahead(4, 100).unwrap();
        assert_eq!(page.status, Status::Running);
        assert_eq!(page.last_seq, 20);
    }
}
