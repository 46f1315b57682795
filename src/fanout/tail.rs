//! [`Tail`]: the newest events of a session, kept in the process for all its local readers, and
//! what it can serve a reader at a given position.

use std::collections::VecDeque;

use crate::store::block::{drop_oldest, oldest_to_drop, Page as Blocks};
use crate::store::{EventBlock, ReadBatch, Status};

/// Events the shared tail keeps per session.
const CAPACITY: usize = crate::limits::TAIL_CAPACITY_EVENTS;

/// Encoded bytes of events the shared tail keeps per session (beyond them, its newest event).
const CAPACITY_BYTES: usize = crate::limits::TAIL_CAPACITY_BYTES;

/// The newest events of a session, as the store returned them, shared by the readers of this
/// process: at most [`CAPACITY`] events and [`CAPACITY_BYTES`] bytes of them, and at least the
/// newest one. Every value in it is what a store read said at the time of that read.
#[derive(Debug, Default)]
pub(super) struct Tail {
    /// Consecutive events ending at `last_seq`, in the blocks the store returned.
    blocks: VecDeque<EventBlock>,
    /// The number of events in `blocks`.
    events: usize,
    /// The encoded bytes of the events in `blocks`.
    bytes: usize,
    /// The position the tail continues from: its newest event (or where it starts, before any).
    pub(super) last_seq: u64,
    /// The status of the latest read (`None` before the first).
    status: Option<Status>,
    /// The session's newest sequence number according to the latest read.
    head_seq: u64,
    /// The latest read found no session.
    gone: bool,
    /// The latest read failed: readers read the store themselves until one succeeds.
    failed: bool,
}

/// What the tail does after it took in a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Read again at once: the session has events the tail does not hold yet.
    Read,
    /// Wait for the store to signal a change.
    Wait,
    /// Nothing will change any more (finished with every event held, or gone).
    Done,
}

/// What the tail can do for a reader that has every event up to some position.
#[derive(Debug)]
pub(super) enum Serve {
    /// Events after the position, in order and consecutive from it; `end` when they reach the
    /// newest event of a finished session, `caught_up` when they reach the tail's newest one.
    Events {
        blocks: Vec<EventBlock>,
        end: bool,
        caught_up: bool,
        status: Status,
    },
    /// The reader has every event of the finished session (its final status).
    End(Status),
    /// The session no longer exists.
    Gone,
    /// The reader has everything the tail holds: wait until the tail moves.
    Wait,
    /// The tail cannot serve this position (older than the tail, or the latest read failed):
    /// read the store.
    Direct,
}

impl Tail {
    /// A tail that starts at `seq` (its first read asks for the events after it).
    pub(super) fn starting_at(seq: u64) -> Self {
        Self {
            last_seq: seq,
            head_seq: seq,
            ..Self::default()
        }
    }

    /// Forgets every event held and continues from `last_seq`.
    fn restart_at(&mut self, last_seq: u64) {
        self.blocks.clear();
        self.events = 0;
        self.bytes = 0;
        self.last_seq = last_seq;
    }

    /// The position the oldest event held follows (`last_seq` when none is held).
    pub(super) fn oldest_cached(&self) -> u64 {
        self.blocks
            .front()
            .map_or(self.last_seq, |b| b.first_seq() - 1)
    }

    /// The events held, and their encoded bytes.
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        (self.events, self.bytes)
    }

    /// Appends the blocks that continue the tail, and forgets its oldest events beyond either
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
            self.bytes += block.bytes().len();
            self.blocks.push_back(block);
        }
        self.trim();
    }

    /// Forgets the oldest events while the tail holds more than [`CAPACITY`] events or
    /// [`CAPACITY_BYTES`] bytes, keeping at least its newest event.
    fn trim(&mut self) {
        while self.events > 1 && (self.events > CAPACITY || self.bytes > CAPACITY_BYTES) {
            let Some(oldest) = self.blocks.front() else {
                return;
            };
            // The oldest block's events that must go for both bounds.
            let over_events = self.events.saturating_sub(CAPACITY);
            let over_bytes = self.bytes.saturating_sub(CAPACITY_BYTES);
            let drop =
                oldest_to_drop(oldest, over_events, over_bytes, usize::MAX).min(self.events - 1);
            if drop == 0 {
                return;
            }
            self.bytes -= drop_oldest(&mut self.blocks, drop);
            self.events -= drop;
        }
    }

    /// Takes in a read of the events after `last_seq` (`None`: the session is gone).
    pub(super) fn apply(&mut self, batch: Option<ReadBatch>) -> Next {
        self.failed = false;
        let Some(batch) = batch else {
            self.gone = true;
            return Next::Done;
        };
        self.gone = false;
        let next = batch
            .blocks
            .first()
            .map_or(batch.first_seq, EventBlock::first_seq);
        if next > self.last_seq.saturating_add(1) {
            // The session's limits trimmed what followed the tail before it was read: the tail
            // restarts at the oldest retained event. Readers older than that read the store
            // and see the gap themselves (they are evicted).
            self.restart_at(next - 1);
        }
        self.extend(batch.blocks);
        self.status = Some(batch.status);
        self.head_seq = batch.last_seq;
        if self.head_seq > self.last_seq.saturating_add(CAPACITY as u64) {
            // Far behind the session (a tail started by a replay from the start of a long
            // session): only the newest events are worth holding; the readers behind them read
            // the store.
            self.restart_at(self.head_seq - CAPACITY as u64);
        }
        if self.last_seq < self.head_seq {
            Next::Read
        } else if batch.status.is_finished() {
            Next::Done
        } else {
            Next::Wait
        }
    }

    /// The latest read failed.
    pub(super) fn fail(&mut self) {
        self.failed = true;
    }

    /// What the tail can serve a reader that has every event up to `after`, at most `max`
    /// events.
    pub(super) fn serve(&self, after: u64, max: usize) -> Serve {
        if self.gone {
            return Serve::Gone;
        }
        if self.failed {
            return Serve::Direct;
        }
        let Some(status) = self.status else {
            // The first read is on its way: a reader does not wait for it (a replay far behind
            // the newest events would wait for a read that the tail then drops).
            return Serve::Direct;
        };
        if after < self.oldest_cached() {
            return Serve::Direct;
        }
        if after >= self.last_seq {
            return if status.is_finished() && after >= self.head_seq {
                Serve::End(status)
            } else {
                // Ahead of the tail (a reader that read the store) or at its end: the tail
                // moves when the store signals the next change.
                Serve::Wait
            };
        }
        let from = self.blocks.partition_point(|b| b.last_seq() <= after);
        let blocks = Blocks::collect(after, max, self.blocks.range(from..));
        let upto = blocks.last().map_or(after, EventBlock::last_seq);
        Serve::Events {
            end: status.is_finished() && upto >= self.head_seq,
            caught_up: upto >= self.last_seq,
            blocks,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Outcome;
    use crate::store::test_blocks::{block, seqs};

    fn page(blocks: Vec<EventBlock>, status: Status, first_seq: u64, last_seq: u64) -> ReadBatch {
        ReadBatch {
            blocks,
            status,
            first_seq,
            last_seq,
        }
    }

    fn events(serve: Serve) -> (Vec<(u64, u64)>, bool, bool) {
        match serve {
            Serve::Events {
                blocks,
                end,
                caught_up,
                ..
            } => (seqs(&blocks), end, caught_up),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn the_tail_keeps_its_newest_events_in_blocks() {
        let mut t = Tail::starting_at(0);
        t.status = Some(Status::Running);
        let mut next = 1;
        for _ in 0..100 {
            t.extend(vec![block(next, &[1; 50])]);
            next += 50;
        }
        assert_eq!(t.events, CAPACITY);
        assert_eq!(t.last_seq, 5000);
        assert_eq!(t.oldest_cached(), 5000 - CAPACITY as u64);
        // Blocks that overlap or skip are sliced or ignored.
        t.extend(vec![block(4990, &[1; 20]), block(5020, &[1; 3])]);
        assert_eq!(t.last_seq, 5009);
        t.head_seq = 5009;
        let (served, end, caught_up) = events(t.serve(4999, 5));
        assert_eq!(served, [(5000, 5000), (5001, 5004)]);
        assert!(!end && !caught_up);
        assert!(matches!(t.serve(5009, 5), Serve::Wait));
        assert!(
            matches!(t.serve(100, 5), Serve::Direct),
            "older than the tail"
        );
        let (served, _, caught_up) = events(t.serve(1000, usize::MAX));
        assert_eq!(served.iter().map(|(a, b)| b - a + 1).sum::<u64>(), 4009);
        assert!(caught_up);
    }

    #[test]
    fn the_tail_serves_its_capacity_and_no_more_at_every_edge() {
        let n = CAPACITY as u64;
        for held in [0, 1, n - 1, n, n + 1, 2 * n] {
            let mut t = Tail::starting_at(0);
            let next = t.apply(Some(page(
                if held == 0 {
                    vec![]
                } else {
                    vec![block(1, &vec![1; held as usize])]
                },
                Status::Running,
                1,
                held,
            )));
            assert_eq!(next, Next::Wait, "{held} events, all read");
            assert_eq!(t.last_seq, held);
            assert_eq!(t.oldest_cached(), held.saturating_sub(n), "{held} events");
            // The oldest position it serves, and the one before it.
            let oldest = held.saturating_sub(n);
            if held > 0 {
                let (served, end, caught_up) = events(t.serve(oldest, usize::MAX));
                assert_eq!(served.first().map(|s| s.0), Some(oldest + 1));
                assert!(!end && caught_up);
            }
            if oldest > 0 {
                assert!(matches!(t.serve(oldest - 1, 1), Serve::Direct));
            }
        }
    }

    /// The events the tail serves a reader at its oldest position, one by one with its size.
    fn held_sizes(t: &Tail) -> Vec<(u64, usize)> {
        match t.serve(t.oldest_cached(), usize::MAX) {
            Serve::Events { blocks, .. } => blocks
                .iter()
                .flat_map(|b| b.iter().map(|(seq, e)| (seq, e.len())).collect::<Vec<_>>())
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn the_tail_keeps_its_newest_events_within_its_byte_capacity_at_every_edge() {
        let n = crate::limits::TAIL_CAPACITY_BYTES;
        // Events of a sixteenth of the bound, the last one shorter, in blocks of three.
        let size = n / 16;
        for total in [0, 1, n - 1, n, n + 1, 2 * n] {
            let mut sizes = vec![size; total / size];
            if !total.is_multiple_of(size) {
                sizes.push(total % size);
            }
            let events = sizes.len() as u64;
            let mut t = Tail::starting_at(0);
            let mut next = 1;
            for chunk in sizes.chunks(3) {
                let read = page(vec![block(next, chunk)], Status::Running, 1, events);
                t.apply(Some(read));
                next += chunk.len() as u64;
                let (held, bytes) = t.held();
                assert!(
                    held <= 1 || bytes <= n,
                    "{total}: {held} events, {bytes} bytes"
                );
            }
            // The newest events, as many as the bound holds: one more would exceed it.
            let (held, bytes) = t.held();
            let kept = sizes
                .iter()
                .rev()
                .scan(0, |sum, s| {
                    *sum += s;
                    Some(*sum)
                })
                .take_while(|&sum| sum <= n)
                .count()
                .max(sizes.len().min(1));
            assert_eq!(held, kept, "{total} bytes");
            assert_eq!(bytes, sizes[sizes.len() - kept..].iter().sum::<usize>());
            assert_eq!(t.oldest_cached(), events - kept as u64, "{total} bytes");
            let served = held_sizes(&t);
            let expected: Vec<_> = (events - kept as u64 + 1..=events)
                .zip(sizes[sizes.len() - kept..].iter().copied())
                .collect();
            assert_eq!(served, expected, "{total} bytes: the newest, each once");
            if t.oldest_cached() > 0 {
                assert!(matches!(t.serve(t.oldest_cached() - 1, 1), Serve::Direct));
            }
        }
    }

    #[test]
    fn an_event_larger_than_the_byte_capacity_is_held_alone() {
        let n = crate::limits::TAIL_CAPACITY_BYTES;
        for (older, newest) in [
            (1, n - 1),
            (1, n),
            (1, n + 1),
            (1, 2 * n),
            (n, 1),
            (n + 1, 1),
            (2 * n, 1),
        ] {
            let mut t = Tail::starting_at(0);
            t.apply(Some(page(vec![block(1, &[older])], Status::Running, 1, 2)));
            assert_eq!(
                t.held(),
                (1, older),
                "a lone event is kept, whatever its size"
            );
            t.apply(Some(page(vec![block(2, &[newest])], Status::Running, 1, 2)));
            let expected = if older + newest <= n {
                vec![(1, older), (2, newest)]
            } else {
                vec![(2, newest)]
            };
            assert_eq!(held_sizes(&t), expected, "{older} then {newest} bytes");
        }
    }

    #[test]
    fn a_tail_overtaken_by_trimming_restarts_at_the_oldest_retained_event() {
        let mut t = Tail::starting_at(0);
        let next = t.apply(Some(page(vec![block(1, &[1; 10])], Status::Running, 1, 10)));
        assert_eq!((t.last_seq, next), (10, Next::Wait));
        // The limits trimmed events 11 to 3000 before the next read, whose page is full.
        let next = t.apply(Some(page(
            vec![block(3001, &[1; 1024])],
            Status::Running,
            3001,
            5000,
        )));
        assert_eq!((t.oldest_cached(), t.last_seq), (3000, 4024));
        assert_eq!(next, Next::Read, "more is waiting");
        // A reader at 10 is older than the tail: it reads the store and sees the gap.
        assert!(matches!(t.serve(10, 100), Serve::Direct));
        // Readers in the new tail are served, and not told it is the end.
        let (served, end, caught_up) = events(t.serve(4000, 100));
        assert_eq!(served, [(4001, 4024)]);
        assert!(!end && caught_up);
        // The rest, and the end.
        let next = t.apply(Some(page(
            vec![block(4025, &[1; 976])],
            Status::Finished(Outcome::Completed),
            3001,
            5000,
        )));
        assert_eq!((t.last_seq, next), (5000, Next::Done));
        assert!(matches!(t.serve(5000, 100), Serve::End(_)));
        let (_, end, _) = events(t.serve(4990, 1024));
        assert!(end);
        // A page after a gap that is not full: readers before the gap read the store.
        t.apply(Some(page(
            vec![block(9001, &[1; 300])],
            Status::Finished(Outcome::Completed),
            9001,
            9300,
        )));
        assert_eq!((t.oldest_cached(), t.last_seq), (9000, 9300));
        assert!(matches!(t.serve(5000, 100), Serve::Direct));
        assert!(matches!(t.serve(9300, 100), Serve::End(_)));
    }

    #[test]
    fn a_finished_session_is_not_the_end_for_a_reader_until_the_tail_holds_its_newest_event() {
        let mut t = Tail::starting_at(0);
        // A finished session of 3000 events, read a page at a time.
        let next = t.apply(Some(page(
            vec![block(1, &[1; 1024])],
            Status::Finished(Outcome::Completed),
            1,
            3000,
        )));
        assert_eq!(next, Next::Read);
        let (_, end, caught_up) = events(t.serve(0, usize::MAX));
        assert!(!end, "the status is final but events are missing");
        assert!(caught_up, "the reader waits for the tail to move");
        assert!(matches!(t.serve(1024, 10), Serve::Wait));
    }

    #[test]
    fn a_tail_far_behind_its_session_keeps_only_the_newest_events() {
        let mut t = Tail::starting_at(0);
        let next = t.apply(Some(page(
            vec![block(1, &[1; 1024])],
            Status::Running,
            1,
            1_000_000,
        )));
        assert_eq!(next, Next::Read);
        assert_eq!(t.last_seq, 1_000_000 - CAPACITY as u64);
        assert!(matches!(t.serve(1024, 10), Serve::Direct));
    }

    #[test]
    fn a_failed_read_sends_readers_to_the_store_until_one_succeeds() {
        let mut t = Tail::starting_at(0);
        assert!(
            matches!(t.serve(0, 1), Serve::Direct),
            "before the first read"
        );
        t.fail();
        assert!(matches!(t.serve(0, 1), Serve::Direct));
        t.apply(Some(page(vec![block(1, &[1; 3])], Status::Running, 1, 3)));
        let (served, _, _) = events(t.serve(0, 10));
        assert_eq!(served, [(1, 3)]);
        assert_eq!(t.apply(None), Next::Done);
        assert!(matches!(t.serve(0, 1), Serve::Gone));
    }
}
