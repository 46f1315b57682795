//! A minimal HTTP/1.1 client: one request per TCP connection, the chunked body decoded in the task
//! that reads the socket. (hyper's client hands every chunk from its connection task to the body's
//! reader through a one-slot channel; with one chunk per event that hand-over, not the server, was
//! the bottleneck of a single-connection stream: about 75,000 events/s.)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest a stream may stay silent before it counts as failed.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected socket, ready for one request.
pub(crate) struct Conn {
    pub(crate) tcp: TcpStream,
}

pub(crate) async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(Conn { tcp })
}

impl Conn {
    /// Sends `GET path` and reads the response head; returns the body of a `200`.
    pub(crate) async fn get(
        mut self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<Body, String> {
        let mut req =
            format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("last-event-id: {id}\r\n"));
        }
        req.push_str("\r\n");
        self.tcp
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0;
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf[..len], b"\r\n\r\n") {
                break i + 4;
            }
            if len == buf.len() {
                return Err("response head too large".to_owned());
            }
            let n = timeout_read(&mut self.tcp, &mut buf[len..]).await?;
            if n == 0 {
                return Err("connection closed before the response head".to_owned());
            }
            len += n;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if status != "200" {
            return Err(format!("status {status} for {path}"));
        }
        let framing = if head.contains("\r\ntransfer-encoding: chunked\r\n") {
            Framing::Chunked(Chunked::Size(0))
        } else if let Some(n) = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
        {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        Ok(Body {
            tcp: self.tcp,
            buf,
            start: head_end,
            end: len,
            framing,
        })
    }
}

pub(crate) async fn timeout_read(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<usize, String> {
    match tokio::time::timeout(FRAME_TIMEOUT, tcp.read(buf)).await {
        Err(_) => Err("nothing received for 30 s".to_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(n)) => Ok(n),
    }
}

pub(crate) enum Framing {
    Chunked(Chunked),
    Length(u64),
    UntilClose,
}

/// Where a chunked-body decoder is.
#[derive(Clone, Copy)]
pub(crate) enum Chunked {
    /// In a chunk-size line, with the size read so far.
    Size(u64),
    /// In a chunk extension, with the size.
    Extension(u64),
    /// After the CR of the size line.
    SizeLf(u64),
    /// In chunk data, with the bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk (trailers are not read).
    Done,
}

impl Chunked {
    /// Decodes `input`, handing each run of body bytes to `f`.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        f: &mut impl FnMut(&[u8]),
    ) -> Result<(), String> {
        while let Some(&b) = input.first() {
            match *self {
                Chunked::Data(left) => {
                    let n = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    f(&input[..n]);
                    input = &input[n..];
                    *self = match left - n as u64 {
                        0 => Chunked::DataCr,
                        left => Chunked::Data(left),
                    };
                    continue;
                }
                Chunked::Done => return Ok(()),
                state => {
                    *self = match (state, b) {
                        (Chunked::Size(n), b'0'..=b'9') => {
                            Chunked::Size(n * 16 + u64::from(b - b'0'))
                        }
                        (Chunked::Size(n), b'a'..=b'f') => {
                            Chunked::Size(n * 16 + u64::from(b - b'a' + 10))
                        }
                        (Chunked::Size(n), b'A'..=b'F') => {
                            Chunked::Size(n * 16 + u64::from(b - b'A' + 10))
                        }
                        (Chunked::Size(n), b';') => Chunked::Extension(n),
                        (Chunked::Size(n) | Chunked::Extension(n), b'\r') => Chunked::SizeLf(n),
                        (Chunked::Extension(n), _) => Chunked::Extension(n),
                        (Chunked::SizeLf(0), b'\n') => Chunked::Done,
                        (Chunked::SizeLf(n), b'\n') => Chunked::Data(n),
                        (Chunked::DataCr, b'\r') => Chunked::DataLf,
                        (Chunked::DataLf, b'\n') => Chunked::Size(0),
                        _ => return Err(format!("bad chunked encoding at byte {b:#04x}")),
                    };
                    input = &input[1..];
                }
            }
        }
        Ok(())
    }
}

/// A response body being read.
pub(crate) struct Body {
    pub(crate) tcp: TcpStream,
    pub(crate) buf: Vec<u8>,
    /// Received bytes not decoded yet: `buf[start..end]`.
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) framing: Framing,
}

impl Body {
    /// Decodes what was received (reading from the socket once when nothing was), handing each run
    /// of body bytes to `f`. Returns `false` at the end of the body.
    pub(crate) async fn next(&mut self, mut f: impl FnMut(&[u8])) -> Result<bool, String> {
        if self.start == self.end {
            if self.is_done() {
                return Ok(false);
            }
            let n = timeout_read(&mut self.tcp, &mut self.buf).await?;
            self.start = 0;
            self.end = n;
            if n == 0 {
                return match self.framing {
                    Framing::UntilClose => Ok(false),
                    _ => Err("connection closed in the middle of the body".to_owned()),
                };
            }
        }
        let input = &self.buf[self.start..self.end];
        self.start = self.end;
        match &mut self.framing {
            Framing::Chunked(state) => state.feed(input, &mut f)?,
            Framing::Length(left) => {
                let n = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                f(&input[..n]);
                *left -= n as u64;
            }
            Framing::UntilClose => f(input),
        }
        Ok(!self.is_done())
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Chunked(Chunked::Done) | Framing::Length(0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body bytes of `chunks` fed in turn, and whether the last chunk was reached.
    fn decode(chunks: &[&[u8]]) -> Result<(Vec<u8>, bool), String> {
        let mut state = Chunked::Size(0);
        let mut out = Vec::new();
        for c in chunks {
            state.feed(c, &mut |b| out.extend_from_slice(b))?;
        }
        Ok((out, matches!(state, Chunked::Done)))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n";
        for at in 0..=wire.len() {
            let (a, b) = wire.split_at(at);
            assert_eq!(
                decode(&[a, b]).unwrap(),
                (b"hello0123456789".to_vec(), true),
                "split at {at}"
            );
        }
        assert_eq!(decode(&[b"5\r\nhel"]).unwrap(), (b"hel".to_vec(), false));
        assert!(decode(&[b"5\r\nhelloX"]).is_err());
        assert!(decode(&[b"g\r\n"]).is_err());
    }
}
