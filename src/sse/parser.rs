//! Incremental parser for the `text/event-stream` format.
//!
//! It follows the WHATWG HTML "Interpreting an event stream" algorithm, working
//! on bytes rather than decoded text, and reports every completed block of
//! fields that carries something worth storing.

use std::fmt;

use memchr::{memchr, memchr2};

/// The default limit of [`Parser::default`]: 1 MiB per event.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1 << 20;

/// The UTF-8 encoding of U+FEFF BYTE ORDER MARK.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// A complete block of fields, terminated by a blank line, that carries something to store:
/// it has data (it dispatches an event) or it has a valid `retry` field (or both).
///
/// The slices borrow either the chunk passed to [`Parser::feed`] or the
/// parser's internal buffers, so an `EventRef` only lives for the duration of
/// the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The event type (`event:` field), empty for the default `message` type.
    pub event: &'a [u8],
    /// The data buffer with the trailing LF removed (lines joined by `\n`); `None` when the
    /// block had no `data` field (then it does not dispatch an event).
    pub data: Option<&'a [u8]>,
    /// The last valid `retry:` value of the block (ASCII digits only, fits in u64), if any.
    pub retry: Option<u64>,
}

/// Returned when one event (its pending line plus its data buffer) grows beyond the limit.
///
/// Once a [`Parser`] has returned this error it is poisoned: every later call
/// to [`Parser::feed`] returns the same error without looking at its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTooLarge {
    /// The `max_event_size` the parser was created with.
    pub limit: usize,
}

impl fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server-sent event larger than the {}-byte limit",
            self.limit
        )
    }
}

impl std::error::Error for EventTooLarge {}

/// Where the leading byte order mark detection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bom {
    /// No byte of the stream has been processed yet; this many bytes of a BOM
    /// have been matched (and held back) so far.
    Pending(u8),
    /// The start of the stream is behind us.
    Done,
}

/// An incremental, allocation-free (in the steady state) parser of a
/// `text/event-stream` body.
///
/// Feed it the body chunk by chunk with [`Parser::feed`]; chunk boundaries can
/// fall anywhere, including inside a CRLF pair or inside the leading byte
/// order mark. Memory use is bounded by `max_event_size`: a line still being
/// received plus the data buffer and the event type of the current block may
/// not grow beyond it.
///
/// Parsing rules (WHATWG HTML, "Interpreting an event stream"):
///
/// * lines end with CRLF, LF or a lone CR;
/// * one leading UTF-8 byte order mark is skipped (a second one is not, so the
///   first field name then starts with U+FEFF and is ignored);
/// * a line starting with `:` is a comment;
/// * `name:value` is a field; one leading space of the value is removed; a
///   line without a colon is a field with an empty value;
/// * `data` appends its value and LF to the data buffer, `event` sets the
///   event type, `retry` is kept when its value is made of ASCII digits only
///   (and fits in a `u64`; an empty value is ignored too); `id` and unknown
///   fields are ignored (the ids are replaced by the caller);
/// * a blank line ends the block; it is reported when it has a `data` field
///   (even an empty one) or a valid `retry` field;
/// * bytes are never validated as UTF-8: invalid sequences and NUL bytes are
///   passed through unchanged.
///
/// A block left unterminated when the stream ends is simply never reported:
/// the caller stops feeding.
pub struct Parser {
    /// The most a pending line plus the data buffer may hold.
    max: usize,
    /// The start of a line not yet terminated, carried over from earlier chunks.
    line: Vec<u8>,
    /// The spec's data buffer: every `data` value followed by LF. Empty means
    /// no `data` field so far in this block.
    data: Vec<u8>,
    /// The event type buffer.
    event: Vec<u8>,
    /// The last valid `retry` of the current block.
    retry: Option<u64>,
    /// Leading byte order mark detection.
    bom: Bom,
    /// The last chunk ended with CR: an LF starting the next chunk belongs to it.
    after_cr: bool,
    /// Set once [`EventTooLarge`] has been returned.
    poisoned: bool,
}

impl fmt::Debug for Parser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parser")
            .field("max_event_size", &self.max)
            .field("pending_line_len", &self.line.len())
            .field("data_len", &self.data.len())
            .field("event_len", &self.event.len())
            .field("retry", &self.retry)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Default for Parser {
    /// A parser with a [`DEFAULT_MAX_EVENT_SIZE`] (1 MiB) limit.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_SIZE)
    }
}

/// The data field(s) of the block being parsed during one [`Parser::feed`].
#[derive(Clone, Copy)]
enum Data<'c> {
    /// No `data` field yet.
    None,
    /// Exactly one `data` field, whose value is this slice of the current chunk.
    Chunk(&'c [u8]),
    /// The data is in `Parser::data`.
    Buffered,
}

/// The event type of the block being parsed during one [`Parser::feed`].
#[derive(Clone, Copy)]
enum Event<'c> {
    /// The event type is in `Parser::event`.
    Buffered,
    /// The event type is this slice of the current chunk.
    Chunk(&'c [u8]),
}

/// The state of the current block that may borrow from the current chunk.
struct Block<'c> {
    data: Data<'c>,
    event: Event<'c>,
}

/// What a line means.
enum Line<'a> {
    Blank,
    Data(&'a [u8]),
    Event(&'a [u8]),
    Retry(u64),
    Ignored,
}

impl Parser {
    /// Creates a parser that rejects any event larger than `max_event_size`
    /// bytes: a line (without its line end) plus the data buffer of its block
    /// (every `data` value so far, each followed by LF) may not exceed it.
    pub fn new(max_event_size: usize) -> Self {
        Self {
            max: max_event_size,
            line: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
            retry: None,
            bom: Bom::Pending(0),
            after_cr: false,
            poisoned: false,
        }
    }

    /// Feeds the next chunk; calls `on_event` for every completed block that has data or retry. Blocks made only of comments, `id`, `event` or unknown fields are not reported.
    ///
    /// Chunks may be split anywhere. Events completed in this chunk are
    /// reported in order, before `feed` returns.
    ///
    /// # Errors
    ///
    /// Returns [`EventTooLarge`] when a line plus the data buffer of its block
    /// exceeds `max_event_size`. Events completed earlier in the same chunk
    /// have already been reported. The parser is then poisoned: its buffers
    /// are released and every later call returns the same error.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(EventRef<'_>),
    ) -> Result<(), EventTooLarge> {
        if self.poisoned {
            return Err(self.error());
        }
        let result = self.feed_inner(chunk, &mut on_event);
        if result.is_err() {
            self.poisoned = true;
            self.line = Vec::new();
            self.data = Vec::new();
            self.event = Vec::new();
            self.retry = None;
        }
        result
    }

    fn error(&self) -> EventTooLarge {
        EventTooLarge { limit: self.max }
    }

    fn feed_inner(
        &mut self,
        chunk: &[u8],
        on_event: &mut impl FnMut(EventRef<'_>),
    ) -> Result<(), EventTooLarge> {
        let mut pos = 0;
        if let Bom::Pending(held) = self.bom {
            let held = usize::from(held);
            let mut matched = held;
            while matched < BOM.len() && pos < chunk.len() && chunk[pos] == BOM[matched] {
                matched += 1;
                pos += 1;
            }
            if matched == BOM.len() {
                self.bom = Bom::Done;
            } else if pos == chunk.len() {
                // Still a possible BOM: hold its bytes back until the next chunk.
                self.bom = Bom::Pending(matched as u8);
                return Ok(());
            } else {
                // Not a BOM after all: the bytes held back start the first line,
                // and this chunk is parsed from its first byte.
                self.bom = Bom::Done;
                pos = 0;
                if held > 0 {
                    let block = Block {
                        data: Data::None,
                        event: Event::Buffered,
                    };
                    self.carry(&BOM[..held], &block)?;
                }
            }
        }
        if self.after_cr && pos < chunk.len() {
            self.after_cr = false;
            if chunk[pos] == b'\n' {
                pos += 1;
            }
        }

        let mut block = Block {
            data: if self.data.is_empty() {
                Data::None
            } else {
                Data::Buffered
            },
            event: Event::Buffered,
        };
        loop {
            let rest = &chunk[pos..];
            let found = match rest.first() {
                None => break,
                // A blank line, typically: skip the search.
                Some(b'\n' | b'\r') => Some(0),
                Some(_) => memchr2(b'\n', b'\r', rest),
            };
            let Some(offset) = found else {
                self.carry(rest, &block)?;
                break;
            };
            let end = pos + offset;
            let next = if chunk[end] == b'\r' {
                match chunk.get(end + 1) {
                    Some(b'\n') => end + 2,
                    Some(_) => end + 1,
                    None => {
                        self.after_cr = true;
                        end + 1
                    }
                }
            } else {
                end + 1
            };
            if self.line.is_empty() {
                // The whole line is in this chunk: parse it in place.
                let line = &chunk[pos..end];
                self.check(line.len(), &block)?;
                self.chunk_line(line, &mut block, on_event);
            } else {
                self.carry(&chunk[pos..end], &block)?;
                self.carried_line(&mut block, on_event);
            }
            pos = next;
        }

        // The block goes on in the next chunk: copy what still borrows this one.
        if let Data::Chunk(value) = block.data {
            self.data.clear();
            self.push_data(value);
        }
        if let Event::Chunk(value) = block.event {
            self.event.clear();
            extend_bounded(&mut self.event, value, self.max);
        }
        Ok(())
    }

    /// The length of the data buffer of `block`, LFs included.
    fn data_len(&self, block: &Block<'_>) -> usize {
        match block.data {
            Data::None => 0,
            Data::Chunk(value) => value.len() + 1,
            Data::Buffered => self.data.len(),
        }
    }

    /// The length of the event type of `block`.
    fn event_len(&self, block: &Block<'_>) -> usize {
        match block.event {
            Event::Buffered => self.event.len(),
            Event::Chunk(value) => value.len(),
        }
    }

    /// Fails when a line of `line_len` bytes would make the event too large: the pending line,
    /// the data buffer and the event type together stay within the limit.
    fn check(&self, line_len: usize, block: &Block<'_>) -> Result<(), EventTooLarge> {
        let held = self.data_len(block).saturating_add(self.event_len(block));
        if line_len.saturating_add(held) > self.max {
            Err(self.error())
        } else {
            Ok(())
        }
    }

    /// Appends `bytes` to the pending line, within the limit.
    fn carry(&mut self, bytes: &[u8], block: &Block<'_>) -> Result<(), EventTooLarge> {
        self.check(self.line.len() + bytes.len(), block)?;
        extend_bounded(&mut self.line, bytes, self.max);
        Ok(())
    }

    /// Appends one `data` value and its LF to the data buffer.
    fn push_data(&mut self, value: &[u8]) {
        reserve_bounded(&mut self.data, value.len() + 1, self.max);
        self.data.extend_from_slice(value);
        self.data.push(b'\n');
    }

    /// Handles a line that lies entirely in the current chunk.
    fn chunk_line<'c>(
        &mut self,
        line: &'c [u8],
        block: &mut Block<'c>,
        on_event: &mut impl FnMut(EventRef<'_>),
    ) {
        match classify(line) {
            Line::Blank => self.dispatch(block, on_event),
            Line::Data(value) => match block.data {
                Data::None => block.data = Data::Chunk(value),
                Data::Chunk(first) => {
                    self.data.clear();
                    self.push_data(first);
                    self.push_data(value);
                    block.data = Data::Buffered;
                }
                Data::Buffered => self.push_data(value),
            },
            Line::Event(value) => block.event = Event::Chunk(value),
            Line::Retry(retry) => self.retry = Some(retry),
            Line::Ignored => {}
        }
    }

    /// Handles the line completed in `self.line`, and empties `self.line`.
    fn carried_line(&mut self, block: &mut Block<'_>, on_event: &mut impl FnMut(EventRef<'_>)) {
        let mut line = std::mem::take(&mut self.line);
        match classify(&line) {
            Line::Data(value) if matches!(block.data, Data::None) => {
                // The first data line of the block, possibly large: the line
                // buffer becomes the data buffer instead of being copied to it
                // (the field value always runs to the end of the line).
                let value_start = line.len() - value.len();
                line.drain(..value_start);
                // No reallocation: the field name took at least 4 bytes.
                line.push(b'\n');
                self.line = std::mem::replace(&mut self.data, line);
                block.data = Data::Buffered;
            }
            _ => {
                self.buffered_line(&line, block, on_event);
                self.line = line;
            }
        }
        self.line.clear();
    }

    /// Handles a line assembled in a buffer that does not outlive the call.
    fn buffered_line(
        &mut self,
        line: &[u8],
        block: &mut Block<'_>,
        on_event: &mut impl FnMut(EventRef<'_>),
    ) {
        match classify(line) {
            Line::Blank => self.dispatch(block, on_event),
            Line::Data(value) => {
                match block.data {
                    Data::None => self.data.clear(),
                    Data::Chunk(first) => {
                        self.data.clear();
                        self.push_data(first);
                    }
                    Data::Buffered => {}
                }
                self.push_data(value);
                block.data = Data::Buffered;
            }
            Line::Event(value) => {
                self.event.clear();
                extend_bounded(&mut self.event, value, self.max);
                block.event = Event::Buffered;
            }
            Line::Retry(retry) => self.retry = Some(retry),
            Line::Ignored => {}
        }
    }

    /// Ends the block at a blank line.
    fn dispatch(&mut self, block: &mut Block<'_>, on_event: &mut impl FnMut(EventRef<'_>)) {
        let data = match block.data {
            Data::None => None,
            Data::Chunk(value) => Some(value),
            // The buffer ends with LF: strip it.
            Data::Buffered => Some(&self.data[..self.data.len() - 1]),
        };
        if data.is_some() || self.retry.is_some() {
            let event = match block.event {
                Event::Buffered => &self.event[..],
                Event::Chunk(value) => value,
            };
            on_event(EventRef {
                event,
                data,
                retry: self.retry,
            });
        }
        self.data.clear();
        self.event.clear();
        self.retry = None;
        block.data = Data::None;
        block.event = Event::Buffered;
    }
}

/// Parses one line (without its line end).
#[inline]
fn classify(line: &[u8]) -> Line<'_> {
    if let Some(value) = line.strip_prefix(b"data:") {
        return Line::Data(value.strip_prefix(b" ").unwrap_or(value));
    }
    let (name, value) = match line.first() {
        None => return Line::Blank,
        Some(b':') => return Line::Ignored,
        Some(_) => match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        },
    };
    match name {
        b"data" => Line::Data(value),
        b"event" => Line::Event(value),
        b"retry" => parse_retry(value).map_or(Line::Ignored, Line::Retry),
        _ => Line::Ignored,
    }
}

/// A `retry` value: one or more ASCII digits that fit in a `u64`.
fn parse_retry(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// `buf.extend_from_slice(bytes)`, growing the capacity no further than `limit`
/// (unless the contents themselves need more).
fn extend_bounded(buf: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    reserve_bounded(buf, bytes.len(), limit);
    buf.extend_from_slice(bytes);
}

/// Makes room for `additional` more bytes, doubling the capacity as `Vec` does
/// but never beyond `limit` (unless the contents themselves need more).
fn reserve_bounded(buf: &mut Vec<u8>, additional: usize, limit: usize) {
    let needed = buf.len() + additional;
    if needed > buf.capacity() {
        let target = buf
            .capacity()
            .saturating_mul(2)
            .max(64)
            .min(limit)
            .max(needed);
        buf.reserve_exact(target - buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        event: Vec<u8>,
        data: Option<Vec<u8>>,
        retry: Option<u64>,
    }

    impl From<EventRef<'_>> for Owned {
        fn from(e: EventRef<'_>) -> Self {
            Owned {
                event: e.event.to_vec(),
                data: e.data.map(<[u8]>::to_vec),
                retry: e.retry,
            }
        }
    }

    fn ev(event: &str, data: Option<&[u8]>, retry: Option<u64>) -> Owned {
        Owned {
            event: event.as_bytes().to_vec(),
            data: data.map(<[u8]>::to_vec),
            retry,
        }
    }

    fn msg(data: &[u8]) -> Owned {
        ev("", Some(data), None)
    }

    fn parse_with(parser: &mut Parser, chunks: &[&[u8]]) -> Result<Vec<Owned>, EventTooLarge> {
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| out.push(Owned::from(e)))?;
        }
        Ok(out)
    }

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Owned> {
        parse_with(&mut Parser::default(), chunks).unwrap()
    }

    fn parse(input: &[u8]) -> Vec<Owned> {
        parse_chunks(&[input])
    }

    fn parse_bytewise(input: &[u8]) -> Vec<Owned> {
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        parse_chunks(&chunks)
    }

    /// Checks `input` gives `expected` whole, byte by byte and split at every position.
    fn assert_parses(input: &[u8], expected: &[Owned]) {
        assert_eq!(parse(input), expected, "whole input");
        assert_eq!(parse_bytewise(input), expected, "1-byte chunks");
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(parse_chunks(&[a, b]), expected, "split at {split}");
        }
    }

    #[test]
    fn single_data_line_dispatches_a_message() {
        assert_parses(b"data: token 123\n\n", &[msg(b"token 123")]);
    }

    #[test]
    fn event_field_sets_the_type() {
        assert_parses(b"event: add\ndata: 1\n\n", &[ev("add", Some(b"1"), None)]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_parses(b"data: a\ndata: b\ndata: c\n\n", &[msg(b"a\nb\nc")]);
    }

    #[test]
    fn leading_bom_is_stripped() {
        assert_parses(b"\xEF\xBB\xBFdata: x\n\n", &[msg(b"x")]);
    }

    #[test]
    fn second_bom_is_not_stripped_so_the_first_field_is_ignored() {
        assert_parses(
            b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n",
            &[msg(b"y")],
        );
    }

    #[test]
    fn bom_split_across_chunks_is_stripped() {
        let chunks: [&[u8]; 3] = [b"\xEF", b"\xBB", b"\xBFdata: x\n\n"];
        assert_eq!(parse_chunks(&chunks), [msg(b"x")]);
        let chunks: [&[u8]; 4] = [
            b"",
            b"\xEF\xBB",
            b"",
            b"\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n",
        ];
        assert_eq!(parse_chunks(&chunks), [msg(b"y")]);
    }

    #[test]
    fn bom_only_counts_at_the_start_of_the_stream() {
        // WPT format-leading-bom: the BOMs before the second block are part of its field name.
        assert_parses(
            b"\xEF\xBB\xBFdata:1\n\n\xEF\xBB\xBFdata:2\n\ndata:3\n\n",
            &[msg(b"1"), msg(b"3")],
        );
    }

    #[test]
    fn incomplete_bom_prefix_is_kept_as_line_bytes() {
        // The held-back bytes start the first field name, which is then unknown.
        let chunks: [&[u8]; 2] = [b"\xEF\xBB", b"data: x\n\ndata: y\n\n"];
        assert_eq!(parse_chunks(&chunks), [msg(b"y")]);
        let chunks: [&[u8]; 3] = [b"\xEF", b"\xBB", b"\n\ndata: y\n\n"];
        assert_eq!(parse_chunks(&chunks), [msg(b"y")]);
        assert_parses(b"\xEF\xBBdata: x\n\ndata: y\n\n", &[msg(b"y")]);
        // A lone partial BOM as a comment-like prefix of a data value.
        assert_parses(b":\xEF\xBB\ndata:\xEF\xBB\n\n", &[msg(b"\xEF\xBB")]);
    }

    #[test]
    fn retry_with_non_digits_is_ignored() {
        assert_parses(b"retry: 1a\ndata: x\n\n", &[msg(b"x")]);
        assert_parses(b"retry: -1\ndata: x\n\n", &[msg(b"x")]);
        assert_parses(b"retry:  12\ndata: x\n\n", &[msg(b"x")]);
        assert_parses(b"retry: 12 \ndata: x\n\n", &[msg(b"x")]);
        assert_parses(b"retry:\ndata: x\n\n", &[msg(b"x")]);
        assert_parses(b"retry\ndata: x\n\n", &[msg(b"x")]);
    }

    #[test]
    fn retry_overflowing_u64_is_ignored() {
        assert_parses(
            b"retry: 18446744073709551615\ndata: x\n\n",
            &[ev("", Some(b"x"), Some(u64::MAX))],
        );
        assert_parses(b"retry: 18446744073709551616\ndata: x\n\n", &[msg(b"x")]);
    }

    #[test]
    fn last_valid_retry_of_the_block_wins() {
        // WPT format-field-retry-bogus: an invalid retry leaves the valid one in place.
        assert_parses(
            b"retry:3000\nretry:1000x\ndata:x\n\n",
            &[ev("", Some(b"x"), Some(3000))],
        );
        assert_parses(
            b"retry: 1\nretry: 0002\ndata: x\n\n",
            &[ev("", Some(b"x"), Some(2))],
        );
    }

    #[test]
    fn retry_only_block_is_reported_without_data() {
        assert_parses(
            b"retry: 5000\n\ndata: x\n\n",
            &[ev("", None, Some(5000)), msg(b"x")],
        );
    }

    #[test]
    fn retry_does_not_carry_over_to_the_next_block() {
        assert_parses(
            b"retry: 7\ndata: a\n\ndata: b\n\n",
            &[ev("", Some(b"a"), Some(7)), msg(b"b")],
        );
    }

    #[test]
    fn id_containing_nul_is_ignored_and_the_event_still_reported() {
        assert_parses(b"id: a\0b\ndata: x\n\n", &[msg(b"x")]);
    }

    #[test]
    fn id_only_block_is_not_reported() {
        assert_parses(b"id: 1\n\nid\n\n", &[]);
    }

    #[test]
    fn cr_at_chunk_end_and_lf_at_next_start_is_one_line_end() {
        let chunks: [&[u8]; 4] = [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"];
        assert_eq!(parse_chunks(&chunks), [msg(b"a\nb")]);
        // An empty chunk between the CR and the LF changes nothing.
        let chunks: [&[u8]; 5] = [b"data: a\r", b"", b"\n", b"\r", b"\ndata: b\n\n"];
        assert_eq!(parse_chunks(&chunks), [msg(b"a"), msg(b"b")]);
    }

    #[test]
    fn cr_at_chunk_end_followed_by_other_bytes_is_a_line_end() {
        let chunks: [&[u8]; 3] = [b"data: a\r", b"data: b\r", b"\r"];
        assert_eq!(parse_chunks(&chunks), [msg(b"a\nb")]);
    }

    #[test]
    fn data_without_colon_is_a_data_field_with_empty_value() {
        assert_parses(b"data\n\n", &[msg(b"")]);
        assert_parses(b"data\ndata\n\n", &[msg(b"\n")]);
        assert_parses(b"data:\n\n", &[msg(b"")]);
    }

    #[test]
    fn empty_data_value_still_dispatches() {
        // WPT format-field-data.
        assert_parses(
            b"data:\n\ndata\ndata\n\ndata:test\n\n",
            &[msg(b""), msg(b"\n"), msg(b"test")],
        );
    }

    #[test]
    fn tab_after_colon_is_kept() {
        assert_parses(b"data:\tx\n\n", &[msg(b"\tx")]);
        assert_parses(b"event:\tt\ndata: x\n\n", &[ev("\tt", Some(b"x"), None)]);
    }

    #[test]
    fn only_one_leading_space_is_removed() {
        assert_parses(b"data:  x\n\n", &[msg(b" x")]);
        assert_parses(b"data:x\n\n", &[msg(b"x")]);
        assert_parses(b"data: x \n\n", &[msg(b"x ")]);
        assert_parses(b"event:  t\ndata\n\n", &[ev(" t", Some(b""), None)]);
    }

    #[test]
    fn colons_after_the_first_belong_to_the_value() {
        assert_parses(b"data: a:b: c\n\n", &[msg(b"a:b: c")]);
    }

    #[test]
    fn cr_only_line_ends() {
        assert_parses(
            b"data: a\rdata: b\r\rdata: c\r\r",
            &[msg(b"a\nb"), msg(b"c")],
        );
    }

    #[test]
    fn crlf_line_ends() {
        assert_parses(
            b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
            &[msg(b"a\nb"), msg(b"c")],
        );
    }

    #[test]
    fn mixed_line_ends() {
        // WPT format-newlines.
        assert_parses(
            b"data:test\r\ndata\ndata:test\r\n\r\n",
            &[msg(b"test\n\ntest")],
        );
        assert_parses(b"data: a\n\rdata: b\r\n\n", &[msg(b"a"), msg(b"b")]);
    }

    #[test]
    fn field_parsing_vectors() {
        // WPT format-field-parsing.
        assert_parses(
            b"data:\0\ndata:  2\rData:1\ndata\0:2\ndata:1\r\0data:4\nda-ta:3\rdata_5\ndata:3\rdata:\r\n data:32\ndata:4\n\n",
            &[msg(b"\0\n 2\n1\n3\n\n4")],
        );
    }

    #[test]
    fn comments_and_comment_only_blocks_are_not_reported() {
        assert_parses(b":\n\n: keep-alive\n\n:x\n:y\n\n", &[]);
        assert_parses(b": hi\ndata: a\n:data: b\ndata: c\n\n", &[msg(b"a\nc")]);
    }

    #[test]
    fn event_only_block_is_not_reported_and_its_type_is_reset() {
        assert_parses(b"event: a\n\ndata: x\n\n", &[msg(b"x")]);
    }

    #[test]
    fn event_type_resets_after_each_event() {
        assert_parses(
            b"event: a\ndata: 1\n\ndata: 2\n\n",
            &[ev("a", Some(b"1"), None), msg(b"2")],
        );
        assert_parses(
            b"event: a\nevent: b\ndata: 1\n\n",
            &[ev("b", Some(b"1"), None)],
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_parses(b"foo: bar\nDATA: x\ndata : y\ndata: z\n\n", &[msg(b"z")]);
        assert_parses(b"foo: bar\n\n", &[]);
    }

    #[test]
    fn unterminated_block_at_the_end_is_not_reported() {
        assert_parses(b"data: a\n\ndata: b\n", &[msg(b"a")]);
        assert_parses(b"data: a\n\ndata: b", &[msg(b"a")]);
        assert_parses(b"retry: 10\n", &[]);
    }

    #[test]
    fn invalid_utf8_and_nul_bytes_pass_through() {
        assert_parses(
            b"event: \xFF\0\ndata: \xC3\x28\0\xFE\n\n",
            &[Owned {
                event: b"\xFF\0".to_vec(),
                data: Some(b"\xC3\x28\0\xFE".to_vec()),
                retry: None,
            }],
        );
    }

    #[test]
    fn block_state_survives_chunk_boundaries() {
        let chunks: [&[u8]; 4] = [b"event: e\n", b"data: a\n", b"data: b\n", b"\n"];
        assert_eq!(parse_chunks(&chunks), [ev("e", Some(b"a\nb"), None)]);
        let chunks: [&[u8]; 2] = [b"event: e\ndata: a\n", b"\n"];
        assert_eq!(parse_chunks(&chunks), [ev("e", Some(b"a"), None)]);
    }

    #[test]
    fn many_events_in_one_chunk() {
        let input: Vec<u8> = (0..100)
            .flat_map(|i| format!("data: {i}\n\n").into_bytes())
            .collect();
        let expected: Vec<Owned> = (0..100).map(|i| msg(format!("{i}").as_bytes())).collect();
        assert_eq!(parse(&input), expected);
        assert_eq!(parse_bytewise(&input), expected);
    }

    #[test]
    fn internal_buffers_are_reused_between_events() {
        let mut parser = Parser::default();
        // The line and data buffers may swap roles, but are never reallocated.
        let buffers = |parser: &Parser| {
            let mut pair = [parser.line.as_ptr(), parser.data.as_ptr()];
            pair.sort();
            (pair, parser.event.as_ptr())
        };
        for chunk_len in [1, 3, 64] {
            let input = b"event: e\ndata: a\ndata: b\n\ndata: c\n\n";
            let chunks: Vec<&[u8]> = input.chunks(chunk_len).collect();
            parse_with(&mut parser, &chunks).unwrap();
            let before = buffers(&parser);
            for _ in 0..5 {
                assert_eq!(
                    parse_with(&mut parser, &chunks).unwrap(),
                    [ev("e", Some(b"a\nb"), None), msg(b"c")]
                );
                assert_eq!(buffers(&parser), before);
            }
        }
    }

    #[test]
    fn default_limit_is_one_mib() {
        assert_eq!(DEFAULT_MAX_EVENT_SIZE, 1024 * 1024);
        assert_eq!(Parser::default().max, DEFAULT_MAX_EVENT_SIZE);
    }

    #[test]
    fn event_at_the_limit_is_accepted() {
        // "data: 0123456789" is 16 bytes; the data buffer then holds 11 bytes.
        let mut parser = Parser::new(16);
        let got = parse_with(&mut parser, &[b"data: 0123456789\n\n"]).unwrap();
        assert_eq!(got, [msg(b"0123456789")]);
        let got = parse_with(&mut parser, &[b"data: 01234567\n", b"data\n\n"]).unwrap();
        assert_eq!(got, [msg(b"01234567\n")]);
    }

    #[test]
    fn line_over_the_limit_in_one_chunk_is_too_large() {
        let mut parser = Parser::new(16);
        let err = parse_with(&mut parser, &[b"data: 01234567890\n\n"]).unwrap_err();
        assert_eq!(err, EventTooLarge { limit: 16 });
        // Comments count too: the limit does not depend on how the input is chunked.
        let mut parser = Parser::new(16);
        assert!(parse_with(&mut parser, &[b":01234567890123456\n"]).is_err());
    }

    #[test]
    fn event_type_counts_against_the_limit() {
        let mut p = Parser::new(32);
        p.feed(b"event: 0123456789012345678901\n", |_| {}).unwrap();
        let err = p
            .feed(b"data: 0123456789\n\n", |_| panic!("reported"))
            .unwrap_err();
        assert_eq!(err, EventTooLarge { limit: 32 });
    }

    #[test]
    fn data_buffer_over_the_limit_is_too_large() {
        let chunk = b"data: 0123456789abcdef\n";
        let mut parser = Parser::new(1024);
        let mut fed = 0;
        let err = loop {
            match parser.feed(chunk, |_| panic!("no event expected")) {
                Ok(()) => fed += 1,
                Err(err) => break err,
            }
            assert!(parser.data.capacity() <= 1024);
            assert!(fed < 1000);
        };
        assert_eq!(err.limit, 1024);
        // Each 22-byte line is accepted while it fits next to the data so far (17 bytes a line).
        assert_eq!(fed, (1024 - 22) / 17 + 1);
    }

    #[test]
    fn data_carried_over_to_the_next_chunk_stays_within_the_limit() {
        let mut parser = Parser::new(1000);
        let line = [&b"data: "[..], &[b'x'; 900], b"\n"].concat();
        assert_eq!(parse_with(&mut parser, &[&line]).unwrap(), []);
        assert!(parser.data.capacity() <= 1000, "{}", parser.data.capacity());
        let got = parse_with(&mut parser, &[b"\n"]).unwrap();
        assert_eq!(got, [msg(&[b'x'; 900])]);
    }

    #[test]
    fn stream_without_newline_is_too_large_and_memory_stays_bounded() {
        const LIMIT: usize = DEFAULT_MAX_EVENT_SIZE;
        let chunk = vec![b'a'; 64 * 1024];
        let mut parser = Parser::default();
        let mut result = Ok(());
        // 100 MiB in 64 KiB chunks.
        for _ in 0..1600 {
            result = parser.feed(&chunk, |_| panic!("no event expected"));
            assert!(
                parser.line.capacity() <= LIMIT,
                "{}",
                parser.line.capacity()
            );
            assert!(parser.data.capacity() <= LIMIT);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(EventTooLarge { limit: LIMIT }));
        // Poisoned: its buffers are released and it keeps failing.
        assert_eq!(parser.line.capacity(), 0);
        assert_eq!(
            parser.feed(b"\n\ndata: x\n\n", |_| panic!("no event expected")),
            Err(EventTooLarge { limit: LIMIT })
        );
    }

    #[test]
    fn parser_is_poisoned_after_the_error() {
        let mut parser = Parser::new(8);
        assert!(parse_with(&mut parser, &[b"data: 0123", b"45678"]).is_err());
        for chunk in [&b"\n\n"[..], b"data: x\n\n", b""] {
            assert_eq!(
                parser.feed(chunk, |_| panic!("no event expected")),
                Err(EventTooLarge { limit: 8 })
            );
        }
    }

    #[test]
    fn events_before_the_error_in_the_same_chunk_are_reported() {
        let mut parser = Parser::new(8);
        let mut got = Vec::new();
        let result = parser.feed(b"data: 1\n\ndata: 0123456789\n\n", |e| {
            got.push(Owned::from(e))
        });
        assert!(result.is_err());
        assert_eq!(got, [msg(b"1")]);
    }

    #[test]
    fn error_displays_the_limit() {
        let err = EventTooLarge { limit: 42 };
        assert_eq!(
            err.to_string(),
            "server-sent event larger than the 42-byte limit"
        );
        let _: &dyn std::error::Error = &err;
    }

    #[test]
    fn debug_shows_state_without_dumping_buffers() {
        let mut parser = Parser::new(100);
        parser.feed(b"event: e\ndata: abc", |_| {}).unwrap();
        let debug = format!("{parser:?}");
        assert!(debug.contains("pending_line_len: 9"), "{debug}");
        assert!(debug.contains("event_len: 1"), "{debug}");
    }

    /// A literal transcription of the WHATWG algorithm over the whole input.
    fn reference(input: &[u8]) -> Vec<Owned> {
        let input = input.strip_prefix(&BOM[..]).unwrap_or(input);
        let mut lines = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < input.len() {
            match input[i] {
                b'\n' => {
                    lines.push(&input[start..i]);
                    i += 1;
                    start = i;
                }
                b'\r' => {
                    lines.push(&input[start..i]);
                    i += if input.get(i + 1) == Some(&b'\n') {
                        2
                    } else {
                        1
                    };
                    start = i;
                }
                _ => i += 1,
            }
        }
        let (mut data, mut event, mut retry) = (Vec::new(), Vec::new(), None);
        let mut out = Vec::new();
        for line in lines {
            if line.is_empty() {
                if !data.is_empty() || retry.is_some() {
                    let has_data = !data.is_empty();
                    data.pop();
                    out.push(Owned {
                        event: std::mem::take(&mut event),
                        data: has_data.then(|| data.clone()),
                        retry,
                    });
                }
                data.clear();
                event.clear();
                retry = None;
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &[][..]),
            };
            match name {
                b"data" => {
                    data.extend_from_slice(value);
                    data.push(b'\n');
                }
                b"event" => event = value.to_vec(),
                b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                    if let Ok(n) = std::str::from_utf8(value).unwrap().parse() {
                        retry = Some(n);
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => any::<u8>().prop_filter("no line end", |b| *b != b'\r' && *b != b'\n'),
            1 => prop::sample::select(vec![b':', b' ', b'\t', 0, 0xEF, 0xBB, 0xBF, b'7']),
        ];
        prop::collection::vec(byte, 0..8)
    }

    fn line() -> impl Strategy<Value = Vec<u8>> {
        let named = |name: &'static str| value().prop_map(move |v| [name.as_bytes(), &v].concat());
        prop_oneof![
            4 => Just(Vec::new()),
            4 => named("data: "),
            2 => named("data:"),
            1 => Just(b"data".to_vec()),
            2 => named("event: "),
            1 => "retry: [0-9]{0,4}".prop_map(String::into_bytes),
            1 => named("retry:"),
            1 => named("id: "),
            1 => named(":"),
            1 => named("foo:"),
            1 => value(),
            1 => named("\u{FEFF}data:"),
        ]
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let line_end = prop::sample::select(vec![&b"\n"[..], b"\r", b"\r\n"]);
        (
            0..3usize,
            prop::collection::vec((line(), line_end), 0..24),
            value(),
        )
            .prop_map(|(boms, lines, tail)| {
                let mut out = BOM.repeat(boms);
                for (line, end) in lines {
                    out.extend_from_slice(&line);
                    out.extend_from_slice(end);
                }
                out.extend_from_slice(&tail);
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_chunking_gives_the_same_events_as_the_whole_input(
            input in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = parse(&input);
            prop_assert_eq!(&whole, &reference(&input));
            prop_assert_eq!(&parse_bytewise(&input), &whole);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&input[start..cut]);
                start = cut;
            }
            chunks.push(&input[start..]);
            prop_assert_eq!(&parse_chunks(&chunks), &whole);
        }

        #[test]
        fn the_limit_does_not_depend_on_chunking_and_bounds_memory(
            input in stream(),
            max in 0..24usize,
            chunk_len in 1..8usize,
        ) {
            let whole = parse_with(&mut Parser::new(max), &[&input]);
            let mut parser = Parser::new(max);
            let mut chunked = Vec::new();
            let mut result = Ok(());
            for chunk in input.chunks(chunk_len) {
                result = parser.feed(chunk, |e| chunked.push(Owned::from(e)));
                prop_assert!(parser.line.capacity() <= max);
                prop_assert!(parser.data.capacity() <= max);
                prop_assert!(parser.event.capacity() <= max);
                if result.is_err() {
                    break;
                }
            }
            match whole {
                Ok(events) => {
                    prop_assert!(result.is_ok());
                    prop_assert_eq!(chunked, events);
                }
                Err(_) => prop_assert!(result.is_err()),
            }
        }
    }
}
