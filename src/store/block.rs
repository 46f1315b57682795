//! [`EventBlock`]: consecutive encoded events in one shared buffer.

use std::collections::VecDeque;
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// Consecutive events of one session, encoded back to back in one shared buffer, with where each
/// one ends.
///
/// It is the unit of [`Store::append`](super::Store::append) and of a
/// [`ReadBatch`](super::ReadBatch): the producer appends the events it framed together as one
/// block, a store may keep it as it is (one allocation, one value), and a reader sends a block, or
/// the part of it after its position, as one write. [`slice`](Self::slice) and `clone` share the
/// buffer: no reader ever copies an event.
///
/// Every event in a block is a complete `text/event-stream` block with its `id:` line and the blank
/// line that ends it, so [`bytes`](Self::bytes) is valid on the wire as it is.
///
/// ```
/// use bytes::Bytes;
/// use resumable_sse::store::EventBlock;
///
/// let block = EventBlock::new(
///     7,
///     Bytes::from_static(b"id: a-7\ndata: x\n\nid: a-8\ndata: y\n\n"),
///     vec![17, 34],
/// )?;
/// assert_eq!((block.first_seq(), block.last_seq(), block.len()), (7, 8, 2));
/// assert_eq!(block.get(8).unwrap(), &b"id: a-8\ndata: y\n\n"[..]);
/// let tail = block.slice(8..).unwrap();
/// assert_eq!(tail.bytes(), &b"id: a-8\ndata: y\n\n"[..]);
/// # Ok::<(), resumable_sse::store::InvalidBlock>(())
/// ```
#[derive(Clone)]
pub struct EventBlock {
    /// The sequence number of the first event in `start..end`.
    first_seq: u64,
    /// Exactly the events `start..end` of the original block.
    bytes: Bytes,
    /// Where each event of the original block ends, from the original's start.
    ends: Ends,
    /// The events of the original block this one holds: indexes into `ends`.
    start: u32,
    end: u32,
}

/// The end offsets of a block's events. A block of one event (every append of a paced stream)
/// needs none: its event ends with its bytes.
#[derive(Clone)]
enum Ends {
    One,
    Many(Arc<[u32]>),
}

impl EventBlock {
    /// Where event `i` of the original block ends, from the original's start.
    fn end_at(&self, i: usize) -> u32 {
        match &self.ends {
            // A one-event block is never sliced: its bytes are the original's.
            Ends::One => self.bytes.len() as u32,
            Ends::Many(ends) => ends[i],
        }
    }
}

/// [`EventBlock::new`] was given parts that do not describe a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidBlock(&'static str);

impl fmt::Display for InvalidBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid event block: {}", self.0)
    }
}

impl std::error::Error for InvalidBlock {}

impl EventBlock {
    /// A block of `ends.len()` events numbered from `first_seq`; event `i` is
    /// `bytes[ends[i - 1]..ends[i]]` (from 0 for the first).
    ///
    /// Fails unless `first_seq` is at least 1, `ends` is non-empty, strictly increasing, starts
    /// above 0 and ends at `bytes.len()`, which must be below 4 GiB. A store that decodes blocks
    /// from elsewhere (a network, a file) gets a clean error for corrupt data.
    pub fn new(first_seq: u64, bytes: Bytes, ends: Vec<u32>) -> Result<Self, InvalidBlock> {
        if first_seq == 0 {
            return Err(InvalidBlock("sequence numbers start at 1"));
        }
        let Some(&last) = ends.last() else {
            return Err(InvalidBlock("no event"));
        };
        if u32::try_from(bytes.len()).ok() != Some(last) {
            return Err(InvalidBlock("the last event does not end with the bytes"));
        }
        let mut prev = 0;
        for &end in &ends {
            if end <= prev {
                return Err(InvalidBlock("event ends are not strictly increasing"));
            }
            prev = end;
        }
        if first_seq.checked_add(ends.len() as u64).is_none() {
            return Err(InvalidBlock("sequence numbers overflow"));
        }
        let end = u32::try_from(ends.len()).map_err(|_| InvalidBlock("too many events"))?;
        Ok(Self {
            first_seq,
            bytes,
            ends: Ends::from(ends),
            start: 0,
            end,
        })
    }

    /// The sequence number of the first event.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The sequence number of the last event.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.end - self.start) - 1
    }

    /// The number of events (at least 1).
    #[allow(clippy::len_without_is_empty)] // a block is never empty
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// All the events, back to back, as they go on the wire.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// All the events, back to back, without the cost of a clone (a shared buffer's reference
    /// count is touched by every clone, and a fan-out clones the same buffer for every reader).
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Where each event ends in [`bytes`](Self::bytes), in order; the last is `bytes().len()`.
    pub fn ends(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        let base = self.base();
        (self.start as usize..self.end as usize).map(move |i| self.end_at(i) - base)
    }

    /// The event numbered `seq`, if this block holds it.
    pub fn get(&self, seq: u64) -> Option<Bytes> {
        let i = self.index(seq)?;
        let from = if i == 0 { 0 } else { self.end_at(i - 1) } - self.base();
        let to = self.end_at(i) - self.base();
        Some(self.bytes.slice(from as usize..to as usize))
    }

    /// Each event with its sequence number.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Bytes)> + '_ {
        let base = self.base();
        let mut from = 0;
        (self.start as usize..self.end as usize)
            .zip(self.first_seq..)
            .map(move |(i, seq)| {
                let to = (self.end_at(i) - base) as usize;
                let event = self.bytes.slice(from..to);
                from = to;
                (seq, event)
            })
    }

    /// The events of this block whose sequence numbers are in `seqs`, sharing its buffer; `None`
    /// when there is none.
    pub fn slice(&self, seqs: impl RangeBounds<u64>) -> Option<Self> {
        let lo = match seqs.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.checked_add(1)?,
            Bound::Unbounded => 0,
        }
        .max(self.first_seq);
        let hi = match seqs.end_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.checked_sub(1)?,
            Bound::Unbounded => u64::MAX,
        }
        .min(self.last_seq());
        if lo > hi {
            return None;
        }
        let start = self.start as usize + (lo - self.first_seq) as usize;
        let end = self.start as usize + (hi - self.first_seq) as usize + 1;
        let base = self.base();
        let from = if start == 0 {
            0
        } else {
            self.end_at(start - 1)
        } - base;
        let to = self.end_at(end - 1) - base;
        Some(Self {
            first_seq: lo,
            bytes: self.bytes.slice(from as usize..to as usize),
            ends: self.ends.clone(),
            start: start as u32,
            end: end as u32,
        })
    }

    /// The page a [`ReadBatch`](super::ReadBatch) holds: at most `max` consecutive events after
    /// `after`, from `blocks` in order, sliced where the page starts and ends and sharing their
    /// buffers. Where `after + 1` is no longer in `blocks` (evicted), the page starts at the
    /// oldest event they hold; it ends early at a gap between two blocks.
    ///
    /// With [`drop_oldest`](Self::drop_oldest), what a store that keeps a session's blocks in
    /// order needs for [`Store::read`](super::Store::read) and its per-session limits:
    ///
    /// ```
    /// use std::collections::VecDeque;
    /// use bytes::Bytes;
    /// use resumable_sse::store::EventBlock;
    ///
    /// // A session's log: events 1 and 2 in one block, 3 in another.
    /// let mut log = VecDeque::from([
    ///     EventBlock::new(1, Bytes::from_static(b"id: a-1\n\nid: a-2\n\n"), vec![9, 18])?,
    ///     EventBlock::new(3, Bytes::from_static(b"id: a-3\n\n"), vec![9])?,
    /// ]);
    /// // A reader that has event 1 asks for two events: 2 and 3, a slice of each block.
    /// let page = EventBlock::page(1, 2, &log);
    /// let seqs: Vec<_> = page.iter().map(|b| (b.first_seq(), b.last_seq())).collect();
    /// assert_eq!(seqs, [(2, 2), (3, 3)]);
    /// assert_eq!(page[0].bytes(), &b"id: a-2\n\n"[..]);
    ///
    /// // A limit of two events per session: the oldest goes (9 bytes).
    /// assert_eq!(EventBlock::drop_oldest(&mut log, 1), 9);
    /// assert_eq!(log[0].first_seq(), 2);
    /// // A reader whose position was evicted gets the oldest events kept; it sees the gap.
    /// let page = EventBlock::page(0, 100, &log);
    /// assert_eq!((page[0].first_seq(), page[1].last_seq()), (2, 3));
    /// # Ok::<(), resumable_sse::store::InvalidBlock>(())
    /// ```
    pub fn page<'a>(
        after: u64,
        max: usize,
        blocks: impl IntoIterator<Item = &'a EventBlock>,
    ) -> Vec<EventBlock> {
        Page::collect(after, max, blocks)
    }

    /// Forgets the oldest `n` events of `blocks` (all of them if they hold fewer), slicing the
    /// oldest block kept where needed, and returns the bytes forgotten: the eviction of a store
    /// that keeps a session's blocks in order. See [`page`](Self::page) for an example.
    pub fn drop_oldest(blocks: &mut VecDeque<EventBlock>, n: usize) -> usize {
        drop_oldest(blocks, n)
    }

    /// Where `bytes` starts in the original block.
    fn base(&self) -> u32 {
        if self.start == 0 {
            0
        } else {
            self.end_at(self.start as usize - 1)
        }
    }

    fn index(&self, seq: u64) -> Option<usize> {
        if seq < self.first_seq || seq > self.last_seq() {
            return None;
        }
        Some(self.start as usize + (seq - self.first_seq) as usize)
    }
}

impl From<Vec<u32>> for Ends {
    fn from(ends: Vec<u32>) -> Self {
        if ends.len() == 1 {
            Ends::One
        } else {
            Ends::Many(ends.into())
        }
    }
}

impl PartialEq for EventBlock {
    fn eq(&self, other: &Self) -> bool {
        self.first_seq == other.first_seq
            && self.bytes == other.bytes
            && self.ends().eq(other.ends())
    }
}

impl Eq for EventBlock {}

impl fmt::Debug for EventBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBlock")
            .field("first_seq", &self.first_seq)
            .field("last_seq", &self.last_seq())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// Builds an [`EventBlock`] one encoded event at a time, in one growing buffer.
///
/// ```
/// use resumable_sse::sse::{encode_event_into, EventRef};
/// use resumable_sse::store::EventBlockBuilder;
///
/// let mut builder = EventBlockBuilder::new(1);
/// for data in [&b"a"[..], b"b"] {
///     let id = format!("e-{}", builder.next_seq());
///     builder.push_with(|buf| {
///         encode_event_into(buf, id.as_bytes(), &EventRef { event: b"", data: Some(data), retry: None })
///     });
/// }
/// let block = builder.finish().unwrap();
/// assert_eq!(block.bytes(), &b"id: e-1\ndata: a\n\nid: e-2\ndata: b\n\n"[..]);
/// ```
#[derive(Debug)]
pub struct EventBlockBuilder {
    first_seq: u64,
    buf: BytesMut,
    ends: Vec<u32>,
}

impl EventBlockBuilder {
    /// An empty builder whose first event will be numbered `first_seq` (at least 1).
    pub fn new(first_seq: u64) -> Self {
        Self {
            first_seq: first_seq.max(1),
            buf: BytesMut::new(),
            ends: Vec::new(),
        }
    }

    /// The sequence number the next pushed event gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.ends.len() as u64
    }

    /// The number of events pushed.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no event was pushed.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The number of bytes pushed.
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one event: `write` must append exactly one complete encoded event to the buffer.
    /// An event that writes nothing is not counted.
    ///
    /// # Panics
    ///
    /// When the block would reach 4 GiB; keep blocks far smaller (the layer's are at most about
    /// 64 KiB, or one event).
    pub fn push_with(&mut self, write: impl FnOnce(&mut BytesMut)) {
        let before = self.buf.len();
        write(&mut self.buf);
        if self.buf.len() > before {
            let end = u32::try_from(self.buf.len()).expect("event block below 4 GiB");
            self.ends.push(end);
        }
    }

    /// The block of every event pushed, or `None` when there is none; the builder starts a new
    /// block numbered after it.
    pub fn finish(&mut self) -> Option<EventBlock> {
        if self.ends.is_empty() {
            return None;
        }
        let ends = std::mem::take(&mut self.ends);
        let count = ends.len() as u64;
        let end = ends.len() as u32;
        // A buffer filled exactly becomes the block without another allocation; otherwise the
        // block shares it and the next block is written after it.
        let bytes = if self.buf.len() == self.buf.capacity() {
            std::mem::take(&mut self.buf).freeze()
        } else {
            self.buf.split().freeze()
        };
        let block = EventBlock {
            first_seq: self.first_seq,
            bytes,
            ends: Ends::from(ends),
            start: 0,
            end,
        };
        self.first_seq += count;
        Some(block)
    }
}

/// Gathers a page of consecutive events after a position, at most `max` of them, from blocks
/// in order; where the position was evicted, the page starts at the oldest event given.
pub(crate) struct Page {
    next: u64,
    left: u64,
    pub(crate) blocks: Vec<EventBlock>,
}

impl Page {
    /// The page of the events after `after` in `blocks` (in order), at most `max` of them.
    pub(crate) fn collect<'a>(
        after: u64,
        max: usize,
        blocks: impl IntoIterator<Item = &'a EventBlock>,
    ) -> Vec<EventBlock> {
        let mut page = Self::new(after, max);
        for block in blocks {
            if !page.push(block) {
                break;
            }
        }
        page.blocks
    }

    pub(crate) fn new(after: u64, max: usize) -> Self {
        Self {
            next: after.saturating_add(1),
            left: u64::try_from(max).unwrap_or(u64::MAX),
            blocks: Vec::new(),
        }
    }

    /// Adds what `block` holds of the page; `false` once the page is complete (full, or
    /// interrupted by a gap).
    pub(crate) fn push(&mut self, block: &EventBlock) -> bool {
        if self.left == 0 {
            return false;
        }
        let Some(block) = block.slice(self.next..) else {
            return true;
        };
        if !self.blocks.is_empty() && block.first_seq() != self.next {
            return false;
        }
        let Some(block) = block.slice(..block.first_seq().saturating_add(self.left)) else {
            return false;
        };
        self.left -= block.len() as u64;
        self.next = block.last_seq().saturating_add(1);
        self.blocks.push(block);
        self.left > 0
    }
}

/// How many of the first events of `oldest` must go so that at least `over_events` events and
/// `over_bytes` bytes go, stopping at `may` events (or at the end of the block).
pub(crate) fn oldest_to_drop(
    oldest: &EventBlock,
    over_events: usize,
    over_bytes: usize,
    may: usize,
) -> usize {
    let (mut drop, mut freed) = (0, 0);
    for end in oldest.ends() {
        if (drop >= over_events && freed >= over_bytes) || drop >= may {
            break;
        }
        drop += 1;
        freed = end as usize;
    }
    drop
}

/// Forgets the oldest `n` events of `blocks` (all of them if it holds fewer), slicing the
/// oldest block kept where needed; returns the bytes forgotten.
pub(crate) fn drop_oldest(blocks: &mut VecDeque<EventBlock>, mut n: usize) -> usize {
    let mut freed = 0;
    while n > 0 {
        let Some(front) = blocks.front_mut() else {
            break;
        };
        if front.len() <= n {
            n -= front.len();
            freed += front.bytes().len();
            blocks.pop_front();
        } else {
            let rest = front.slice(front.first_seq() + n as u64..);
            if let Some(rest) = rest {
                freed += front.bytes().len() - rest.bytes().len();
                *front = rest;
            }
            break;
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first_seq: u64, events: &[&str]) -> EventBlock {
        let mut b = EventBlockBuilder::new(first_seq);
        for e in events {
            b.push_with(|buf| buf.extend_from_slice(e.as_bytes()));
        }
        b.finish().unwrap()
    }

    #[test]
    fn slices_share_the_buffer_and_keep_the_numbers() {
        let b = block(10, &["aa", "bbb", "c", "dddd"]);
        assert_eq!((b.first_seq(), b.last_seq(), b.len()), (10, 13, 4));
        let mid = b.slice(11..=12).unwrap();
        assert_eq!(mid.bytes(), &b"bbbc"[..]);
        assert_eq!((mid.first_seq(), mid.last_seq()), (11, 12));
        assert_eq!(mid.ends().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(mid.get(12).unwrap(), &b"c"[..]);
        assert_eq!(mid.get(13), None);
        assert_eq!(mid.bytes().as_ptr(), b.bytes()[2..].as_ptr());
        let inner = mid.slice(12..).unwrap();
        assert_eq!(inner.bytes(), &b"c"[..]);
        assert_eq!(
            inner.iter().collect::<Vec<_>>(),
            vec![(12, Bytes::from("c"))]
        );
        assert_eq!(b.slice(14..), None);
        assert_eq!(b.slice(..10), None);
        assert_eq!(b.slice(..).unwrap(), b);
        let all: Vec<_> = b.iter().map(|(s, e)| (s, e.to_vec())).collect();
        assert_eq!(all[3], (13, b"dddd".to_vec()));
    }

    #[test]
    fn new_rejects_parts_that_are_not_a_block() {
        let bytes = Bytes::from_static(b"abcdef");
        assert!(EventBlock::new(1, bytes.clone(), vec![2, 6]).is_ok());
        for (seq, ends) in [
            (0, vec![6]),
            (1, vec![]),
            (1, vec![2, 5]),
            (1, vec![3, 3, 6]),
            (1, vec![0, 6]),
            (1, vec![4, 2, 6]),
            (u64::MAX, vec![6]),
        ] {
            assert!(
                EventBlock::new(seq, bytes.clone(), ends.clone()).is_err(),
                "{seq} {ends:?}"
            );
        }
    }

    #[test]
    fn the_builder_numbers_blocks_one_after_the_other() {
        let mut b = EventBlockBuilder::new(1);
        assert!(b.finish().is_none());
        b.push_with(|buf| buf.extend_from_slice(b"x"));
        b.push_with(|_| {});
        assert_eq!(b.len(), 1);
        let first = b.finish().unwrap();
        b.push_with(|buf| buf.extend_from_slice(b"y"));
        let second = b.finish().unwrap();
        assert_eq!((first.first_seq(), second.first_seq()), (1, 2));
        assert_eq!(second.bytes(), &b"y"[..]);
    }

    /// A block of `n` one-byte events from `first`.
    fn sized(first: u64, n: usize) -> EventBlock {
        block(first, &vec!["x"; n])
    }

    fn spans(blocks: &[EventBlock]) -> Vec<(u64, u64)> {
        blocks
            .iter()
            .map(|b| (b.first_seq(), b.last_seq()))
            .collect()
    }

    #[test]
    fn pages_stop_at_a_gap_and_at_the_limit() {
        let mut page = Page::new(3, 100);
        assert!(page.push(&sized(1, 3)));
        assert!(
            page.push(&sized(6, 2)),
            "the page starts where the events do"
        );
        assert!(!page.push(&sized(9, 2)), "a gap ends the page");
        assert_eq!(spans(&page.blocks), [(6, 7)]);
        let mut page = Page::new(0, 3);
        assert!(!page.push(&sized(1, 5)));
        assert_eq!(spans(&page.blocks), [(1, 3)]);
        assert!(!Page::new(0, 0).push(&sized(1, 1)));
    }

    #[test]
    fn dropping_the_oldest_events_slices_the_oldest_block_kept() {
        let mut blocks: VecDeque<_> = [block(1, &["aa", "b"]), block(3, &["ccc", "d"])].into();
        assert_eq!(drop_oldest(&mut blocks, 3), 6);
        assert_eq!(spans(blocks.make_contiguous()), [(4, 4)]);
        assert_eq!(drop_oldest(&mut blocks, 5), 1);
        assert!(blocks.is_empty());
    }
}
