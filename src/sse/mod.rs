//! The Server-Sent-Events wire format (`text/event-stream`): an incremental
//! [`Parser`] that reads the blocks an upstream response produces, and
//! [`encode_event`], which writes a block back with the id the layer assigns.
//!
//! ```
//! use resumable_sse::sse::{encode_event, Parser};
//!
//! let mut parser = Parser::default();
//! let mut out = Vec::new();
//! // Chunks can split a line, or even a CRLF pair, anywhere.
//! for chunk in [&b"event: tick\nda"[..], b"ta: hello\r", b"\n\r\n: keep-alive\n\n"] {
//!     parser
//!         .feed(chunk, |event| out.push(encode_event(b"42", &event)))
//!         .unwrap();
//! }
//! assert_eq!(out, [&b"id: 42\nevent: tick\ndata: hello\n\n"[..]]);
//! ```
//!
//! The module does no I/O and keeps no state besides the parser's buffers,
//! whose size is bounded by the `max_event_size` given to [`Parser::new`].

mod encode;
mod parser;

pub use encode::{encode_event, encode_event_into, EVICTED_COMMENT, KEEP_ALIVE};
pub use parser::{EventRef, EventTooLarge, Parser, DEFAULT_MAX_EVENT_SIZE};
