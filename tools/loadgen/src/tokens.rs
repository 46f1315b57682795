//! Reading the event streams of `/chat?tokens=N`: their data must be `token 0`, `token 1`, ... in
//! order, optionally stamped with the time each was made (`token 5 @1732480000123456`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::Body;

/// Splits a byte stream into lines (without the line end).
#[derive(Default)]
pub(crate) struct Lines {
    pub(crate) partial: Vec<u8>,
}

impl Lines {
    pub(crate) fn feed(&mut self, mut chunk: &[u8], mut f: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                None => {
                    self.partial.extend_from_slice(chunk);
                    return;
                }
                Some(i) => {
                    self.partial.extend_from_slice(&chunk[..i]);
                    f(trim_cr(&self.partial));
                    self.partial.clear();
                    chunk = &chunk[i + 1..];
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', chunk) {
            f(trim_cr(&chunk[..i]));
            chunk = &chunk[i + 1..];
        }
        self.partial.extend_from_slice(chunk);
    }
}

pub(crate) fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

pub(crate) fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// `token N` or `token N @STAMP`.
pub(crate) fn parse_token(data: &[u8]) -> Option<(u64, Option<u64>)> {
    let rest = data.strip_prefix(b"token ")?;
    match memchr::memchr(b' ', rest) {
        None => Some((parse_u64(rest)?, None)),
        Some(i) => Some((
            parse_u64(&rest[..i])?,
            Some(parse_u64(rest[i + 1..].strip_prefix(b"@")?)?),
        )),
    }
}

pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What a stream read returned.
pub(crate) struct Streamed {
    /// The events read.
    pub(crate) events: u64,
    pub(crate) first_id: Option<String>,
}

/// Reads an event stream, checking that its data are `token 0`, `token 1`, ... in order. `on_event`
/// gets each token, its stamp and the receipt time (µs since the epoch); it returns `false` to stop
/// reading. With `expect`, the stream must end after exactly that many events.
pub(crate) async fn read_tokens(
    body: &mut Body,
    expect: Option<u64>,
    on_event: impl FnMut(u64, Option<u64>, u64) -> bool,
) -> Result<Streamed, String> {
    read_tokens_from(body, Some(0), expect, on_event).await
}

/// [`read_tokens`] of a stream that starts at token `first`, or, when `first` is `None`, at any
/// token (a broadcast joined mid-stream): from there on the tokens must follow in order, with no
/// gap.
pub(crate) async fn read_tokens_from(
    body: &mut Body,
    first: Option<u64>,
    expect: Option<u64>,
    mut on_event: impl FnMut(u64, Option<u64>, u64) -> bool,
) -> Result<Streamed, String> {
    let mut lines = Lines::default();
    // The token expected next; `None` until the first one of a stream that may start anywhere.
    let mut next = first;
    let mut events = 0u64;
    let mut first_id = None;
    let mut error = None;
    let mut stop = false;
    loop {
        let mut now = 0;
        let more = body
            .next(|bytes| {
                if now == 0 {
                    now = unix_micros();
                }
                lines.feed(bytes, |line| {
                    if stop || error.is_some() {
                        return;
                    }
                    if let Some(data) = line.strip_prefix(b"data: ") {
                        match parse_token(data) {
                            Some((n, stamp)) if next.unwrap_or(n) == n => {
                                next = Some(n + 1);
                                events += 1;
                                if !on_event(n, stamp, now) {
                                    stop = true;
                                }
                            }
                            _ => {
                                let expected =
                                    next.map_or("a token".to_owned(), |n| format!("`token {n}`"));
                                error = Some(format!(
                                    "expected {expected}, got `{}`",
                                    String::from_utf8_lossy(data)
                                ))
                            }
                        }
                    } else if let Some(id) = line.strip_prefix(b"id: ") {
                        if first_id.is_none() {
                            first_id = Some(String::from_utf8_lossy(id).into_owned());
                        }
                    }
                })
            })
            .await
            .map_err(|e| format!("{e} (after {events} events)"))?;
        if let Some(e) = error {
            return Err(e);
        }
        if stop {
            return Ok(Streamed { events, first_id });
        }
        if !more {
            break;
        }
    }
    match expect {
        Some(n) if n != events => Err(format!("expected {n} events, got {events}")),
        _ => Ok(Streamed { events, first_id }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_and_without_a_stamp() {
        assert_eq!(parse_token(b"token 7"), Some((7, None)));
        assert_eq!(
            parse_token(b"token 7 @1732480000123456"),
            Some((7, Some(1_732_480_000_123_456)))
        );
        assert_eq!(parse_token(b"token x"), None);
        assert_eq!(parse_token(b"token 7 1"), None);
        assert_eq!(parse_token(b"token "), None);
    }

    #[test]
    fn lines_are_split_across_chunks_without_their_ends() {
        let mut lines = Lines::default();
        let mut got = Vec::new();
        for chunk in [&b"data: a\r"[..], b"\ndata", b": b\n\n"] {
            lines.feed(chunk, |l| got.push(l.to_vec()));
        }
        assert_eq!(got, [b"data: a".to_vec(), b"data: b".to_vec(), Vec::new()]);
    }
}
