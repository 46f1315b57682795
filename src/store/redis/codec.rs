//! What Redis stores, and back: blocks cut into chunks (stream entries), the scripts' replies,
//! the response head.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::Value;

use super::bad_reply;
use crate::session::{Epoch, Outcome};
use crate::store::block::Page;
use crate::store::{EventBlock, ReadBatch, ResponseHead, SessionInfo, Status, StoreError};

// --- Chunks ------------------------------------------------------------------------------------

/// The most events in one stream entry.
const CHUNK_EVENTS: usize = crate::limits::REDIS_CHUNK_EVENTS;
/// The most bytes in one stream entry, unless it holds a single larger event.
const CHUNK_BYTES: u32 = crate::limits::REDIS_CHUNK_BYTES as u32;

/// Cuts a block into the chunks stored as stream entries: at most [`CHUNK_EVENTS`] events and
/// [`CHUNK_BYTES`] bytes each, at least one event each. The same block is always cut the same
/// way.
pub(super) fn cut(block: &EventBlock) -> Vec<EventBlock> {
    let first = block.first_seq();
    let mut chunks = Vec::with_capacity(block.len() / CHUNK_EVENTS + 1);
    // The chunk being built: its first event's index, where it starts, how many events.
    let (mut start, mut base, mut count) = (0u64, 0u32, 0usize);
    let mut prev_end = 0u32;
    let push = |from: u64, to: u64, chunks: &mut Vec<EventBlock>| {
        if let Some(chunk) = block.slice(first + from..first + to) {
            chunks.push(chunk);
        }
    };
    for (i, end) in (0u64..).zip(block.ends()) {
        if count > 0 && (count == CHUNK_EVENTS || end - base > CHUNK_BYTES) {
            push(start, i, &mut chunks);
            (start, base, count) = (i, prev_end, 0);
        }
        count += 1;
        prev_end = end;
    }
    push(start, block.len() as u64, &mut chunks);
    chunks
}

/// A chunk's ends as little-endian `u32`s, relative to its bytes.
pub(super) fn pack_ends(chunk: &EventBlock, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(chunk.len() * 4);
    for end in chunk.ends() {
        out.extend_from_slice(&end.to_le_bytes());
    }
}

/// A stream entry `[id, [field, value, ...]]` with fields `o` (ends) and `d` (data) back into a
/// block, sharing the reply's buffer.
fn decode_entry(entry: Value) -> Result<EventBlock, StoreError> {
    let corrupt =
        |why: &str| StoreError::unavailable(format!("corrupt event chunk in Redis: {why}"));
    let Value::Array(parts) = entry else {
        return Err(bad_reply("read"));
    };
    let mut parts = parts.into_iter();
    let (Some(id), Some(Value::Array(fields)), None) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_reply("read"));
    };
    let first_seq = as_bytes(&id)
        .and_then(|id| id.split(|&b| b == b'-').next())
        .and_then(|seq| std::str::from_utf8(seq).ok()?.parse::<u64>().ok())
        .ok_or_else(|| corrupt("entry id"))?;
    let (mut ends, mut data) = (None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match (as_bytes(&name), value) {
            (Some(b"o"), Value::BulkString(v)) => ends = Some(v),
            (Some(b"d"), Value::BulkString(v)) => data = Some(v),
            _ => {}
        }
    }
    let (Some(ends), Some(data)) = (ends, data) else {
        return Err(corrupt("missing field"));
    };
    if ends.len() % 4 != 0 {
        return Err(corrupt("offsets"));
    }
    let ends = ends
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    EventBlock::new(first_seq, Bytes::from(data), ends).map_err(StoreError::unavailable)
}

// --- Replies -----------------------------------------------------------------------------------

pub(super) fn status_from(v: &Value) -> Option<Status> {
    Some(match as_bytes(v)? {
        b"starting" => Status::Starting,
        b"running" => Status::Running,
        b"completed" => Status::Finished(Outcome::Completed),
        b"failed" => Status::Finished(Outcome::Failed),
        b"cancelled" => Status::Finished(Outcome::Cancelled),
        _ => return None,
    })
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

pub(super) fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// Parses `{epoch, status, head|false, first, last}`.
pub(super) fn parse_info(v: &Value) -> Option<SessionInfo> {
    let a = as_array(v)?;
    let [epoch, status, head, first, last] = a else {
        return None;
    };
    Some(SessionInfo {
        epoch: Epoch::from_raw(as_u64(epoch)?),
        status: status_from(status)?,
        head: as_bytes(head).and_then(decode_head).map(Arc::new),
        first_seq: as_u64(first)?,
        last_seq: as_u64(last)?,
    })
}

/// Parses the reply of the READ script into the page of `max` events after `after`.
pub(super) fn parse_read(
    reply: Value,
    after: u64,
    max: usize,
) -> Result<Option<ReadBatch>, StoreError> {
    let parts = match reply {
        Value::Nil => return Ok(None),
        Value::Array(parts) => parts,
        _ => return Err(bad_reply("read")),
    };
    let mut parts = parts.into_iter();
    let (Some(status), Some(first), Some(last), Some(Value::Array(entries)), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad_reply("read"));
    };
    let (Some(status), Some(first_seq), Some(last_seq)) =
        (status_from(&status), as_u64(&first), as_u64(&last))
    else {
        return Err(bad_reply("read"));
    };
    let blocks = entries
        .into_iter()
        .map(decode_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ReadBatch {
        blocks: Page::collect(after, max, &blocks),
        status,
        first_seq,
        last_seq,
    }))
}

/// The head as `status\nname: value\n...`: header values never contain CR or LF.
pub(super) fn encode_head(head: &ResponseHead) -> Vec<u8> {
    let mut out = head.status.as_str().as_bytes().to_vec();
    for (name, value) in &head.headers {
        out.push(b'\n');
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn decode_head(raw: &[u8]) -> Option<ResponseHead> {
    let mut lines = raw.split(|&b| b == b'\n');
    let status = StatusCode::from_bytes(lines.next()?).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = HeaderValue::from_bytes(line[colon + 1..].strip_prefix(b" ")?).ok()?;
        headers.append(name, value);
    }
    Some(ResponseHead { status, headers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_blocks::{block, seqs};

    fn entry(chunk: &EventBlock) -> Value {
        let mut ends = Vec::new();
        pack_ends(chunk, &mut ends);
        Value::Array(vec![
            Value::BulkString(format!("{}-0", chunk.first_seq()).into_bytes()),
            Value::Array(vec![
                Value::BulkString(b"o".to_vec()),
                Value::BulkString(ends),
                Value::BulkString(b"d".to_vec()),
                Value::BulkString(chunk.bytes().to_vec()),
            ]),
        ])
    }

    #[test]
    fn heads_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2: colon"));
        let head = ResponseHead {
            status: StatusCode::OK,
            headers,
        };
        let back = decode_head(&encode_head(&head)).unwrap();
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(back.headers, head.headers);
    }

    #[test]
    fn blocks_are_cut_into_chunks_of_64_events_or_64_kib() {
        // 150 small events: 64 + 64 + 22.
        let small = block(5, &[10; 150]);
        let chunks = cut(&small);
        assert_eq!(seqs(&chunks), [(5, 68), (69, 132), (133, 154)]);
        assert_eq!(chunks, cut(&small), "the same block is cut the same way");
        // Large events: as many as fit in 64 KiB; a larger one is a chunk of its own.
        let large = block(1, &[30_000, 30_000, 30_000, 100_000, 1, 65_536]);
        let chunks = cut(&large);
        assert_eq!(seqs(&chunks), [(1, 2), (3, 3), (4, 4), (5, 5), (6, 6)]);
        let total: usize = chunks.iter().map(|c| c.bytes().len()).sum();
        assert_eq!(total, large.bytes().len());
        // A slice of a block is cut from where it starts.
        let tail = small.slice(100..).unwrap();
        assert_eq!(seqs(&cut(&tail)), [(100, 154)]);
    }

    #[test]
    fn chunks_round_trip_through_stream_entries() {
        let b = block(7, &[3, 1, 4, 1, 5]);
        let back = decode_entry(entry(&b)).unwrap();
        assert_eq!(back, b);
        let sliced = b.slice(9..=10).unwrap();
        assert_eq!(decode_entry(entry(&sliced)).unwrap(), sliced);
    }

    #[test]
    fn corrupt_entries_are_errors_not_panics() {
        let good = block(1, &[2, 2]);
        let Value::Array(parts) = entry(&good) else {
            unreachable!()
        };
        let with_fields =
            |fields: Vec<Value>| Value::Array(vec![parts[0].clone(), Value::Array(fields)]);
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![bulk(b"x-0"), parts[1].clone()]),
            Value::Array(vec![bulk(b"0-0"), parts[1].clone()]),
            with_fields(vec![
                bulk(b"o"),
                bulk(&[2, 0, 0]),
                bulk(b"d"),
                bulk(b"abcd"),
            ]),
            with_fields(vec![
                bulk(b"o"),
                bulk(&[2, 0, 0, 0]),
                bulk(b"d"),
                bulk(b"abcd"),
            ]),
            with_fields(vec![bulk(b"o"), bulk(&[]), bulk(b"d"), bulk(b"")]),
            with_fields(vec![bulk(b"d"), bulk(b"abcd")]),
            with_fields(vec![bulk(b"o"), Value::Int(4), bulk(b"d"), bulk(b"abcd")]),
        ] {
            assert!(decode_entry(bad.clone()).is_err(), "{bad:?}");
        }
        let reply = |entries| Value::Array(vec![bulk(b"running"), bulk(b"1"), bulk(b"2"), entries]);
        assert!(parse_read(reply(Value::Array(vec![entry(&good)])), 0, 10).is_ok());
        assert!(parse_read(reply(Value::Array(vec![Value::Int(1)])), 0, 10).is_err());
        assert!(parse_read(reply(Value::Int(1)), 0, 10).is_err());
        assert!(parse_read(Value::Int(1), 0, 10).is_err());
        assert!(matches!(parse_read(Value::Nil, 0, 10), Ok(None)));
    }

    #[test]
    fn outcomes_are_stored_under_the_names_read_back() {
        // `finish` and `cancel` store `Outcome::reason()`; the scripts write `failed` themselves.
        for outcome in [Outcome::Completed, Outcome::Failed, Outcome::Cancelled] {
            let stored = Value::BulkString(outcome.reason().as_str().as_bytes().to_vec());
            assert_eq!(status_from(&stored), Some(Status::Finished(outcome)));
        }
    }

    #[test]
    fn reads_slice_the_chunks_into_the_page() {
        let entries: Vec<Value> = [
            block(1, &[1; 64]),
            block(65, &[1; 64]),
            block(129, &[1; 10]),
        ]
        .iter()
        .map(entry)
        .collect();
        let reply = || {
            Value::Array(vec![
                Value::BulkString(b"running".to_vec()),
                Value::BulkString(b"1".to_vec()),
                Value::BulkString(b"138".to_vec()),
                Value::Array(entries.clone()),
            ])
        };
        let page = parse_read(reply(), 60, 70).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(61, 64), (65, 128), (129, 130)]);
        assert_eq!((page.first_seq, page.last_seq), (1, 138));
        let page = parse_read(reply(), 137, 70).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(138, 138)]);
        let page = parse_read(reply(), 138, 70).unwrap().unwrap();
        assert!(page.blocks.is_empty());
        // An evicted position: the page starts at the oldest event given.
        let page = parse_read(reply(), 0, 3).unwrap().unwrap();
        assert_eq!(seqs(&page.blocks), [(1, 3)]);
    }
}
