//! The SSE parser on arbitrary bytes, split into chunks at points the input chooses.
//!
//! Input: a first line of decimal numbers, then the stream. The first number is the
//! `max_event_size` (none: 1 MiB), the others are offsets in the stream where a chunk ends.
//! For example `16 3 9\ndata: hello\n\n` parses `data: hello\n\n` with a 16-byte limit in the
//! chunks `dat`, `a: hel` and `lo\n\n`.
//!
//! Checked for every input:
//! - no panic;
//! - the same events and the same outcome (an `EventTooLarge` after the same events) whether the
//!   stream is fed whole, in the chosen chunks or byte by byte;
//! - the events are those of a literal transcription of the WHATWG algorithm (as long as the
//!   limit is not hit), and encoding an event then parsing it gives it back;
//! - memory: the pending line plus the data buffer never hold more than the limit (read from the
//!   parser's `Debug` output), and the parser's heap, counted by the allocator below, never
//!   exceeds three times the limit (one line, one data and one event-type buffer);
//! - a parser that returned the error keeps returning it and reports nothing more.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use resumable_sse::sse::{encode_event, EventRef, EventTooLarge, Parser, DEFAULT_MAX_EVENT_SIZE};

/// Counts the bytes allocated (minus freed) by this thread while counting is on.
struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = LIVE.try_with(|live| live.set(live.get() + delta));
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the counting touches only
// thread-locals that need no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` with allocation counting on.
fn counted<T>(f: impl FnOnce() -> T) -> T {
    ON.with(|on| on.set(true));
    let out = f();
    ON.with(|on| on.set(false));
    out
}

/// Runs `f` with allocation counting off (inside a counted section).
fn uncounted<T>(f: impl FnOnce() -> T) -> T {
    let was = ON.with(|on| on.replace(false));
    let out = f();
    ON.with(|on| on.set(was));
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    event: Vec<u8>,
    data: Option<Vec<u8>>,
    retry: Option<u64>,
}

impl From<EventRef<'_>> for Owned {
    fn from(e: EventRef<'_>) -> Self {
        Self {
            event: e.event.to_vec(),
            data: e.data.map(<[u8]>::to_vec),
            retry: e.retry,
        }
    }
}

impl Owned {
    fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            event: &self.event,
            data: self.data.as_deref(),
            retry: self.retry,
        }
    }
}

/// `pending_line_len` and `data_len` from the parser's `Debug` output.
fn buffered_lens(parser: &Parser) -> (usize, usize) {
    let debug = format!("{parser:?}");
    let field = |name: &str| -> usize {
        let at = debug
            .find(name)
            .unwrap_or_else(|| panic!("{name} in {debug}"))
            + name.len();
        debug[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("{name} in {debug}"))
    };
    (field("pending_line_len: "), field("data_len: "))
}

/// Feeds `chunks` to a fresh parser; returns the events and the outcome.
fn run<'a>(
    limit: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Owned>, Result<(), EventTooLarge>) {
    LIVE.with(|live| live.set(0));
    let mut parser = Parser::new(limit);
    let mut events = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        result = counted(|| {
            parser.feed(chunk, |e| {
                uncounted(|| events.push(Owned::from(e)));
            })
        });
        let heap = LIVE.with(Cell::get);
        assert!(
            heap <= 3 * limit as isize,
            "the parser holds {heap} bytes of heap with a {limit}-byte limit"
        );
        let (line, data) = buffered_lens(&parser);
        assert!(
            line + data <= limit,
            "pending line {line} + data {data} bytes with a {limit}-byte limit"
        );
        if result.is_err() {
            // Poisoned: the same error, nothing reported, buffers released.
            let again = parser.feed(b"\n\ndata: x\n\n", |_| panic!("event after the error"));
            assert_eq!(again, result);
            assert_eq!(buffered_lens(&parser), (0, 0));
            break;
        }
    }
    (events, result)
}

/// A literal transcription of the WHATWG "Interpreting an event stream" algorithm, with this
/// crate's dispatch rule (a block is reported when it has data or a valid retry).
fn reference(input: &[u8]) -> Vec<Owned> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
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

fuzz_target!(|input: &[u8]| {
    let (config, stream) = match input.iter().position(|&b| b == b'\n') {
        Some(lf) => (&input[..lf], &input[lf + 1..]),
        None => (&b""[..], input),
    };
    let mut numbers = config
        .split(|b| !b.is_ascii_digit())
        .filter_map(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
    let limit = numbers
        .next()
        .map_or(DEFAULT_MAX_EVENT_SIZE, |n| n.min(DEFAULT_MAX_EVENT_SIZE));
    let mut cuts: Vec<usize> = numbers.map(|n| n % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for cut in cuts.into_iter().chain([stream.len()]) {
        chunks.push(&stream[from..cut]);
        from = cut;
    }

    let whole = run(limit, [stream]);
    let chunked = run(limit, chunks.iter().copied());
    assert_eq!(whole, chunked, "fed whole vs in chunks {chunks:?}");
    if stream.len() <= 1024 {
        let bytewise = run(limit, stream.chunks(1));
        assert_eq!(whole, bytewise, "fed whole vs byte by byte");
    }

    let (events, result) = whole;
    let expected = reference(stream);
    match result {
        Ok(()) => assert_eq!(events, expected, "parser vs WHATWG reference"),
        // The events before the oversized one are the reference's first events.
        Err(_) => assert_eq!(events[..], expected[..events.len()], "parser vs reference"),
    }
    // What the layer stores parses back to the same event.
    for event in &events {
        let bytes = encode_event(b"000000000001-1", &event.as_ref());
        let (again, result) = run(DEFAULT_MAX_EVENT_SIZE, [&bytes[..]]);
        if result.is_ok() {
            assert_eq!(again, std::slice::from_ref(event), "encoded as {bytes:?}");
        }
    }
});
