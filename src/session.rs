//! Session keys, event ids and session outcomes.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The longest session key the layer accepts, in bytes.
pub const MAX_SESSION_KEY_LEN: usize = 256;

/// The key a session is stored under.
///
/// A key is a *capability*: whoever presents it can replay the whole stream and cancel it. Use
/// unguessable keys (at least 128 random bits), or bind the key to the authenticated user with a
/// custom extractor (see [`ResumableSseLayer::session_key`](crate::ResumableSseLayer::session_key)).
///
/// Any UTF-8 string of 1 to [`MAX_SESSION_KEY_LEN`] bytes is a valid key; the layer never interprets
/// it, and stores escape it where their key syntax needs it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(Arc<str>);

impl SessionKey {
    /// Makes a key, or says why the string cannot be one.
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidSessionKey> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(InvalidSessionKey::Empty);
        }
        if key.len() > MAX_SESSION_KEY_LEN {
            return Err(InvalidSessionKey::TooLong(key.len()));
        }
        Ok(Self(Arc::from(key)))
    }

    /// The key the layer stores the session of `key` under for requests to `path`, with the
    /// default [`KeyScope::Path`](crate::KeyScope::Path): `"<path> <key>"` (a path holds no
    /// space, so two paths never share a key). For tools that look at a store directly; an
    /// application asks its [`Sessions`](crate::Sessions) handle.
    ///
    /// ```
    /// use resumable_sse::SessionKey;
    ///
    /// let id = SessionKey::new("abc").unwrap();
    /// assert_eq!(SessionKey::scoped("/chat", &id).unwrap().as_str(), "/chat abc");
    /// ```
    pub fn scoped(path: &str, key: &SessionKey) -> Result<Self, InvalidSessionKey> {
        if path.len() > crate::limits::MAX_SCOPE_LEN {
            return Err(InvalidSessionKey::PathTooLong(path.len()));
        }
        let mut s = String::with_capacity(path.len() + 1 + key.0.len());
        s.push_str(path);
        s.push(' ');
        s.push_str(&key.0);
        Ok(Self(Arc::from(s)))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A digest of the key for logs: 16 hex digits, the same in every process and version (a
    /// 64-bit FNV-1a hash), so that the lines of one session can be found across instances. A
    /// key is a capability and never appears in the layer's logs; its digest does not reveal it
    /// (keys must be unguessable anyway).
    pub fn digest(&self) -> KeyDigest {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        KeyDigest(h)
    }
}

/// A [`SessionKey`]'s digest, as its logs name it; see [`SessionKey::digest`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyDigest(u64);

impl KeyDigest {
    /// A digest from its 16 hex digits, as [`Display`](fmt::Display) writes it.
    #[cfg(feature = "redis")]
    pub(crate) fn parse_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 16 {
            return None;
        }
        let hex = std::str::from_utf8(hex).ok()?;
        u64::from_str_radix(hex, 16).ok().map(KeyDigest)
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A key is a capability: keep it out of logs unless asked for explicitly.
        write!(f, "SessionKey({} bytes)", self.0.len())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a valid [`SessionKey`]. The layer answers `400 Bad Request` with
/// `resumable-sse-reason: invalid-session-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidSessionKey {
    /// The key is empty.
    Empty,
    /// The key is longer than [`MAX_SESSION_KEY_LEN`] bytes (the length is given).
    TooLong(usize),
    /// The key is not valid UTF-8 once percent-decoded.
    NotUtf8,
    /// The request path, which scopes the key ([`KeyScope::Path`](crate::KeyScope::Path)), is
    /// longer than [`MAX_SCOPE_LEN`](crate::limits::MAX_SCOPE_LEN) bytes (the length is given).
    PathTooLong(usize),
}

impl fmt::Display for InvalidSessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("session key is empty"),
            Self::TooLong(n) => write!(
                f,
                "session key is {n} bytes long, the limit is {MAX_SESSION_KEY_LEN}"
            ),
            Self::NotUtf8 => f.write_str("session key is not valid UTF-8"),
            Self::PathTooLong(n) => write!(
                f,
                "the path that scopes the session key is {n} bytes long, the limit is {}",
                crate::limits::MAX_SCOPE_LEN
            ),
        }
    }
}

impl std::error::Error for InvalidSessionKey {}

/// Identifies one incarnation of a session key.
///
/// A new epoch is drawn at random each time a session is created, so an event id from an expired
/// earlier session under the same key is recognised as foreign instead of being applied to the new
/// one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Epoch(u64);

impl Epoch {
    /// Epochs use 48 bits: 12 hex digits in every id, and a collision between two incarnations of
    /// one key has a chance of 2^-48.
    const MASK: u64 = (1 << 48) - 1;

    /// Draws a fresh random epoch.
    pub fn random() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // `RandomState` is seeded from the OS; hashing a process-wide counter and the clock makes
        // every call differ even within one thread.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        // Never zero, so that no valid id looks like an unset one.
        Self((h.finish() & Self::MASK).max(1))
    }

    /// An epoch from its raw value (for stores that persist it). Only the low 48 bits are kept.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw & Self::MASK)
    }

    /// The raw value, for stores that persist it.
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// The id the layer gives to an event: the session's [`Epoch`] and the event's sequence number.
///
/// On the wire it reads `<epoch as 12 hex digits>-<sequence in decimal>`, e.g. `5f3a9b2c1d0e-42`.
/// Clients must treat it as opaque. Sequence numbers start at 1 and grow by one per stored event;
/// `<epoch>-0` means "before the first event".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EventId {
    /// The session incarnation.
    pub epoch: Epoch,
    /// The position in the session log (1 for the first event).
    pub seq: u64,
}

/// The longest `Last-Event-ID` the layer tries to parse; longer ones are malformed.
const MAX_ID_LEN: usize = 12 + 1 + 20;

impl EventId {
    /// Parses an id as written by the layer. Anything else (other formats, overflowing numbers,
    /// NUL bytes, surrounding whitespace) is `None`.
    pub fn parse(s: &[u8]) -> Option<Self> {
        if s.len() > MAX_ID_LEN {
            return None;
        }
        let dash = s.iter().position(|&b| b == b'-')?;
        let (epoch, seq) = (&s[..dash], &s[dash + 1..]);
        if epoch.len() != 12 || seq.is_empty() || seq.len() > 20 {
            return None;
        }
        let mut e: u64 = 0;
        for &b in epoch {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => return None,
            };
            e = (e << 4) | u64::from(d);
        }
        let mut n: u64 = 0;
        for &b in seq {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        if seq.len() > 1 && seq[0] == b'0' {
            return None; // one spelling per id
        }
        Some(Self {
            epoch: Epoch(e),
            seq: n,
        })
    }

    /// Writes the id into `buf` and returns its bytes (no allocation).
    pub(crate) fn write<'a>(&self, buf: &'a mut IdBuf) -> &'a [u8] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let out = &mut buf.0;
        for (i, slot) in out[..12].iter_mut().enumerate() {
            *slot = HEX[((self.epoch.0 >> (44 - 4 * i)) & 0xf) as usize];
        }
        out[12] = b'-';
        let mut itoa = itoa::Buffer::new();
        let digits = itoa.format(self.seq).as_bytes();
        out[13..13 + digits.len()].copy_from_slice(digits);
        &out[..13 + digits.len()]
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = IdBuf::default();
        // The buffer holds only ASCII hex digits, a dash and decimal digits.
        f.write_str(std::str::from_utf8(self.write(&mut buf)).map_err(|_| fmt::Error)?)
    }
}

/// A stack buffer that holds one formatted [`EventId`].
#[derive(Debug)]
pub(crate) struct IdBuf([u8; MAX_ID_LEN]);

impl Default for IdBuf {
    fn default() -> Self {
        Self([0; MAX_ID_LEN])
    }
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The inner body ended normally.
    Completed,
    /// The inner body returned an error, an event exceeded the size limit, the session exceeded its
    /// lifetime, or its producer died. Everything stored before the failure stays readable.
    Failed,
    /// The session was cancelled through [`Store::cancel`](crate::store::Store::cancel).
    Cancelled,
}

impl Outcome {
    /// The reason token the layer sends in `resumable-sse-reason` when a client that already holds
    /// every event of a session with this outcome reconnects.
    pub fn reason(self) -> crate::Reason {
        match self {
            Self::Completed => crate::Reason::Completed,
            Self::Failed => crate::Reason::Failed,
            Self::Cancelled => crate::Reason::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_round_trips_through_its_wire_form() {
        let id = EventId {
            epoch: Epoch::from_raw(0x5f3a_9b2c_1d0e),
            seq: 42,
        };
        assert_eq!(id.to_string(), "5f3a9b2c1d0e-42");
        assert_eq!(EventId::parse(b"5f3a9b2c1d0e-42"), Some(id));
        let max = EventId {
            epoch: Epoch::from_raw(u64::MAX),
            seq: u64::MAX,
        };
        assert_eq!(EventId::parse(max.to_string().as_bytes()), Some(max));
    }

    #[test]
    fn malformed_event_ids_are_rejected() {
        for bad in [
            &b""[..],
            b"garbage",
            b"5f3a9b2c1d0e",
            b"5f3a9b2c1d0e-",
            b"5f3a9b2c1d0e--1",
            b"5f3a9b2c1d0e-18446744073709551616",
            b"5f3a9b2c1d0e-1\0",
            b"5F3A9B2C1D0E-1",
            b"5f3a9b2c1d0-1",
            b" 5f3a9b2c1d0e-1",
            b"5f3a9b2c1d0e-01",
            b"5f3a9b2c1d0e-1x",
        ] {
            assert_eq!(
                EventId::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(EventId::parse(&[b'1'; 10_000]), None);
    }

    #[test]
    fn epochs_differ_between_incarnations() {
        let a = Epoch::random();
        let b = Epoch::random();
        assert_ne!(a, b);
        assert!(a.raw() < 1 << 48 && a.raw() != 0);
    }

    #[test]
    fn session_keys_are_bounded_and_non_empty() {
        assert_eq!(SessionKey::new(""), Err(InvalidSessionKey::Empty));
        assert_eq!(
            SessionKey::new("x".repeat(257)),
            Err(InvalidSessionKey::TooLong(257))
        );
        assert_eq!(SessionKey::new("a*?[\n").unwrap().as_str(), "a*?[\n");
        assert!(!format!("{:?}", SessionKey::new("secret").unwrap()).contains("secret"));
    }
}
