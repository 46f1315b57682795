//! Encoding of blocks back into the `text/event-stream` format.

use bytes::{BufMut, Bytes, BytesMut};

use super::EventRef;

/// The keep-alive comment the layer sends on idle connections.
pub const KEEP_ALIVE: &[u8] = b":\n\n";

/// The last frame of a connection whose position in its session was evicted by the store's
/// limits: a comment (clients ignore it) saying why the stream ends. The reconnect that follows
/// is answered `410 Gone` with `resumable-sse-reason: evicted`.
pub const EVICTED_COMMENT: &[u8] =
    b": evicted: this stream fell behind the session's retained history; reconnect to learn why\n\n";

/// Encodes a block with the given id: `id: <id>\n`, then `event: <type>\n` if the type is
/// non-empty, `retry: <n>\n` if any, one `data: <line>\n` per line of data, then the blank line.
/// One allocation, sized exactly.
///
/// The data is split on `\n` only and every line is written as `data: ` followed by the line,
/// so that parsing the output gives back exactly `event.data`: an empty data becomes a single
/// `data: ` line, and a line that begins with a space keeps it (the parser removes only the
/// space the encoder added). A block without data (`data: None`, a retry-only block) has no
/// `data` line and does not dispatch an event, but still sets the client's last event id.
///
/// `id`, `event.event` and `event.data` must not contain CR, and `id` and `event.event` must
/// not contain LF either (a browser would also ignore an id containing NUL). Everything that
/// [`Parser`](super::Parser) reports meets these requirements.
///
/// ```
/// use resumable_sse::sse::{encode_event, EventRef};
///
/// let event = EventRef { event: b"update", data: Some(b"a\n b"), retry: Some(3000) };
/// assert_eq!(
///     encode_event(b"7", &event),
///     &b"id: 7\nevent: update\nretry: 3000\ndata: a\ndata:  b\n\n"[..]
/// );
/// ```
pub fn encode_event(id: &[u8], event: &EventRef<'_>) -> Bytes {
    let mut out = BytesMut::new();
    encode_event_into(&mut out, id, event);
    out.freeze()
}

/// Appends the encoding of [`encode_event`] to `out`, reserving exactly what it needs: the way to
/// write several events back to back into one buffer (one allocation for all of them).
///
/// ```
/// use bytes::BytesMut;
/// use resumable_sse::sse::{encode_event_into, EventRef};
///
/// let mut out = BytesMut::new();
/// encode_event_into(&mut out, b"1", &EventRef { event: b"", data: Some(b"a"), retry: None });
/// encode_event_into(&mut out, b"2", &EventRef { event: b"", data: Some(b"b"), retry: None });
/// assert_eq!(out, &b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n"[..]);
/// ```
pub fn encode_event_into(out: &mut BytesMut, id: &[u8], event: &EventRef<'_>) {
    debug_assert!(
        !id.contains(&b'\r') && !id.contains(&b'\n'),
        "CR or LF in id"
    );
    debug_assert!(
        !event.event.contains(&b'\r') && !event.event.contains(&b'\n'),
        "CR or LF in event type"
    );
    debug_assert!(
        !event.data.is_some_and(|data| data.contains(&b'\r')),
        "CR in data"
    );

    let mut retry_buf = itoa::Buffer::new();
    let retry = event.retry.map(|retry| retry_buf.format(retry).as_bytes());

    // The id line and the blank line that ends the block.
    let mut len = b"id: \n".len() + id.len() + b"\n".len();
    if !event.event.is_empty() {
        len += b"event: \n".len() + event.event.len();
    }
    if let Some(retry) = retry {
        len += b"retry: \n".len() + retry.len();
    }
    // Where the data's first line ends, if it has more than one.
    let first_lf = event.data.and_then(|data| memchr::memchr(b'\n', data));
    if let Some(data) = event.data {
        // Every line gets "data: " and ends with LF: the joining LFs are reused as line
        // ends, and the last line gets one more.
        let lines = match first_lf {
            None => 1,
            Some(lf) => 2 + memchr::memchr_iter(b'\n', &data[lf + 1..]).count(),
        };
        len += data.len() + b"data: ".len() * lines + 1;
    }

    out.reserve(len);
    let start = out.len();
    out.put_slice(b"id: ");
    out.put_slice(id);
    out.put_u8(b'\n');
    if !event.event.is_empty() {
        out.put_slice(b"event: ");
        out.put_slice(event.event);
        out.put_u8(b'\n');
    }
    if let Some(retry) = retry {
        out.put_slice(b"retry: ");
        out.put_slice(retry);
        out.put_u8(b'\n');
    }
    if let Some(data) = event.data {
        let mut start = 0;
        if let Some(first) = first_lf {
            let rest = memchr::memchr_iter(b'\n', &data[first + 1..]).map(|lf| first + 1 + lf);
            for lf in std::iter::once(first).chain(rest) {
                out.put_slice(b"data: ");
                out.put_slice(&data[start..=lf]);
                start = lf + 1;
            }
        }
        out.put_slice(b"data: ");
        out.put_slice(&data[start..]);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    debug_assert_eq!(out.len() - start, len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Parser;
    use proptest::prelude::*;

    fn event<'a>(event: &'a [u8], data: Option<&'a [u8]>, retry: Option<u64>) -> EventRef<'a> {
        EventRef { event, data, retry }
    }

    /// Parses `encoded` and checks it holds exactly one block equal to `expected`.
    fn assert_round_trip(encoded: &[u8], expected: &EventRef<'_>) {
        let mut parser = Parser::default();
        let mut seen = 0;
        parser
            .feed(encoded, |got| {
                assert_eq!(&got, expected);
                seen += 1;
            })
            .unwrap();
        assert_eq!(seen, 1, "{:?}", String::from_utf8_lossy(encoded));
    }

    #[test]
    fn token_event_is_id_then_data() {
        let e = event(b"", Some(b"token 123"), None);
        let out = encode_event(b"5f3a-1", &e);
        assert_eq!(out, &b"id: 5f3a-1\ndata: token 123\n\n"[..]);
        assert_round_trip(&out, &e);
    }

    #[test]
    fn all_fields_are_written_in_order() {
        let e = event(b"add", Some(b"1"), Some(2500));
        let out = encode_event(b"9", &e);
        assert_eq!(out, &b"id: 9\nevent: add\nretry: 2500\ndata: 1\n\n"[..]);
        assert_round_trip(&out, &e);
    }

    #[test]
    fn multi_line_data_gets_one_data_field_per_line() {
        let e = event(b"", Some(b"a\nb\n\nc"), None);
        let out = encode_event(b"1", &e);
        assert_eq!(out, &b"id: 1\ndata: a\ndata: b\ndata: \ndata: c\n\n"[..]);
        assert_round_trip(&out, &e);
    }

    #[test]
    fn empty_data_parses_back_as_empty_data() {
        let e = event(b"", Some(b""), None);
        let out = encode_event(b"1", &e);
        assert_eq!(out, &b"id: 1\ndata: \n\n"[..]);
        assert_round_trip(&out, &e);
    }

    #[test]
    fn data_beginning_with_a_space_keeps_it() {
        let e = event(b" t", Some(b" x\n  y\n"), None);
        let out = encode_event(b"1", &e);
        assert_eq!(
            out,
            &b"id: 1\nevent:  t\ndata:  x\ndata:   y\ndata: \n\n"[..]
        );
        assert_round_trip(&out, &e);
    }

    #[test]
    fn retry_only_block_has_no_data_line() {
        let e = event(b"", None, Some(0));
        let out = encode_event(b"1", &e);
        assert_eq!(out, &b"id: 1\nretry: 0\n\n"[..]);
        assert_round_trip(&out, &e);
    }

    #[test]
    fn block_without_data_or_retry_only_sets_the_id() {
        assert_eq!(
            encode_event(b"1", &event(b"", None, None)),
            &b"id: 1\n\n"[..]
        );
    }

    #[test]
    fn keep_alive_is_a_comment_block_that_reports_nothing() {
        assert_eq!(KEEP_ALIVE, b":\n\n");
        let mut parser = Parser::default();
        parser
            .feed(KEEP_ALIVE, |_| panic!("no event expected"))
            .unwrap();
    }

    fn no_line_end() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            any::<u8>().prop_filter("no line end", |b| *b != b'\r' && *b != b'\n'),
            0..12,
        )
    }

    fn data() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => any::<u8>().prop_filter("no CR", |b| *b != b'\r'),
            2 => prop::sample::select(vec![b'\n', b' ', b':']),
        ];
        prop::collection::vec(byte, 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn encode_then_parse_gives_the_same_event(
            id in no_line_end(),
            event_type in no_line_end(),
            data in prop::option::of(data()),
            retry in prop::option::of(any::<u64>()),
        ) {
            let e = event(&event_type, data.as_deref(), retry);
            let encoded = encode_event(&id, &e);
            let mut parser = Parser::default();
            let mut got = Vec::new();
            parser
                .feed(&encoded, |parsed| {
                    got.push((parsed.event.to_vec(), parsed.data.map(<[u8]>::to_vec), parsed.retry))
                })
                .unwrap();
            if data.is_none() && retry.is_none() {
                prop_assert!(got.is_empty());
            } else {
                prop_assert_eq!(got, vec![(event_type.clone(), data.clone(), retry)]);
            }
        }
    }
}
