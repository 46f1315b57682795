//! Where a request's session key and `Last-Event-ID` come from.

use std::borrow::Cow;

use http::header::HeaderName;
use http::request::Parts;
use percent_encoding::percent_decode_str;

use crate::session::{EventId, InvalidSessionKey, SessionKey};

/// Finds the session key of a request.
///
/// `Ok(None)` means the request has no key: the layer passes it to the inner service untouched.
/// `Err` means it has one that is not valid: the layer answers `400 Bad Request` with
/// `resumable-sse-reason: invalid-session-key` and calls nothing.
///
/// Implemented by [`FromQuery`] (the default, `?session_id=`), [`FromHeader`], [`FromPath`],
/// their combination with [`or`](ExtractSessionKey::or), and any
/// `Fn(&Parts) -> Option<String>` closure (`axum::http::request::Parts` in an axum
/// application), which is how an application binds the key to the authenticated user:
///
/// ```
/// use axum::http::request::Parts;
/// use resumable_sse::{ExtractSessionKey, FromPath, MemoryStore, ResumableSseLayer};
///
/// #[derive(Clone)]
/// struct User(String); // set as a request extension by an authentication layer
///
/// // `/chat/{id}`: the id decoded as `FromPath` (and axum's `Path`) decode it.
/// let layer = ResumableSseLayer::new(MemoryStore::new()).session_key(|parts: &Parts| {
///     let user = parts.extensions.get::<User>()?;
///     let chat = FromPath::segment(1).extract(parts).ok()??;
///     // One user can never name another user's session.
///     Some(format!("{}/{}", user.0, chat.as_str()))
/// });
/// # let _ = layer;
/// ```
///
/// An application that needs a session's key itself (to cancel it, or to show its status)
/// asks the layer's [`Sessions`](crate::Sessions) handle, which derives it the same way.
pub trait ExtractSessionKey: Clone + Send + Sync + 'static {
    /// Returns the request's session key, if it has one.
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey>;

    /// This extractor's key, or, when the request has none, `other`'s. An invalid key is an
    /// answer: `other` is not asked.
    ///
    /// ```
    /// use http::HeaderName;
    /// use resumable_sse::{ExtractSessionKey, FromHeader, FromQuery};
    ///
    /// let key = FromHeader::new(HeaderName::from_static("x-session-id")).or(FromQuery::default());
    /// let req = http::Request::get("/chat?session_id=q").body(()).unwrap();
    /// let (parts, ()) = req.into_parts();
    /// assert_eq!(key.extract(&parts).unwrap().unwrap().as_str(), "q");
    /// ```
    fn or<B: ExtractSessionKey>(self, other: B) -> Or<Self, B>
    where
        Self: Sized,
    {
        Or { first: self, other }
    }
}

/// The key of one extractor, or of another when the request has none; see
/// [`ExtractSessionKey::or`].
#[derive(Clone, Debug)]
pub struct Or<A, B> {
    first: A,
    other: B,
}

impl<A: ExtractSessionKey, B: ExtractSessionKey> ExtractSessionKey for Or<A, B> {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        match self.first.extract(parts)? {
            Some(key) => Ok(Some(key)),
            None => self.other.extract(parts),
        }
    }
}

impl<F> ExtractSessionKey for F
where
    F: Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        self(parts).map(SessionKey::new).transpose()
    }
}

/// Takes the session key from a query parameter (form-decoded: `+` is a space, `%XX` a byte, and
/// the result must be UTF-8). An absent or empty parameter means no key.
#[derive(Clone, Debug)]
pub struct FromQuery {
    name: Cow<'static, str>,
}

impl FromQuery {
    /// Reads the parameter called `name`.
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self { name: name.into() }
    }
}

impl Default for FromQuery {
    /// `?session_id=`.
    fn default() -> Self {
        Self::new("session_id")
    }
}

impl ExtractSessionKey for FromQuery {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        match query_param(parts.uri.query(), &self.name) {
            None | Some("") => Ok(None),
            Some(raw) => decode_form_value(raw).and_then(SessionKey::new).map(Some),
        }
    }
}

/// Takes the session key from a request header. An absent or empty header means no key.
#[derive(Clone, Debug)]
pub struct FromHeader {
    name: HeaderName,
}

impl FromHeader {
    /// Reads the header called `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl ExtractSessionKey for FromHeader {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        match parts.headers.get(&self.name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => std::str::from_utf8(v.as_bytes())
                .map_err(|_| InvalidSessionKey::NotUtf8)
                .and_then(SessionKey::new)
                .map(Some),
        }
    }
}

/// Takes the session key from a segment of the request's path, percent-decoded as axum's `Path`
/// extractor decodes it, so that a handler reading `Path<String>` names the same session (for
/// instance to cancel it). A path too short to have the segment, or an empty segment, means no
/// key; a segment that does not decode to UTF-8 is an invalid key.
///
/// ```
/// use resumable_sse::{ExtractSessionKey, FromPath};
///
/// // `/chat/{id}` and `/chat/{id}/stream`: the segment after `chat`.
/// let key = FromPath::segment(1);
/// let req = http::Request::get("/chat/my%20chat/stream").body(()).unwrap();
/// let (parts, ()) = req.into_parts();
/// assert_eq!(key.extract(&parts).unwrap().unwrap().as_str(), "my chat");
/// ```
#[derive(Clone, Debug)]
pub struct FromPath {
    index: usize,
}

impl FromPath {
    /// Reads the path segment at `index`, counting from 0 after the leading `/`
    /// (`/a/b/c`: 0 is `a`, 2 is `c`).
    pub fn segment(index: usize) -> Self {
        Self { index }
    }
}

impl ExtractSessionKey for FromPath {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        let path = parts.uri.path();
        match path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .nth(self.index)
        {
            None | Some("") => Ok(None),
            Some(raw) => percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| InvalidSessionKey::NotUtf8)
                .and_then(|key| SessionKey::new(&key))
                .map(Some),
        }
    }
}

/// Which sessions a key names: the key space of a layer.
///
/// By default each request path is a key space of its own: `GET /chat?session_id=1` and
/// `GET /summary?session_id=1` are two sessions, and a route that does not stream never meets a
/// session of another route. [`Shared`](KeyScope::Shared) makes one key space of every route under
/// the layer, for an application that serves one session under several paths on purpose.
///
/// ```
/// use resumable_sse::{KeyScope, MemoryStore, ResumableSseLayer};
///
/// // `/v1/chat` and `/v2/chat` resume each other's sessions.
/// let layer = ResumableSseLayer::new(MemoryStore::new()).key_scope(KeyScope::Shared);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyScope {
    /// Each request path is a key space of its own (the default). The path is taken as the
    /// request has it (still percent-encoded), so a reconnect to the same URL finds its session;
    /// a path longer than [`MAX_SCOPE_LEN`](crate::limits::MAX_SCOPE_LEN) is an invalid key.
    #[default]
    Path,
    /// One key space for every route under the layer: the extracted key alone names the
    /// session.
    Shared,
}

/// The session key of a request as the layer derives it: the extractor's key, within `scope`.
pub(crate) fn derive<K: ExtractSessionKey>(
    extract: &K,
    scope: KeyScope,
    parts: &Parts,
) -> Result<Option<SessionKey>, InvalidSessionKey> {
    let Some(key) = extract.extract(parts)? else {
        return Ok(None);
    };
    match scope {
        KeyScope::Path => SessionKey::scoped(parts.uri.path(), &key).map(Some),
        KeyScope::Shared => Ok(Some(key)),
    }
}

/// Whether a request's `Accept` header lets it receive an event stream: absent, or naming
/// `text/event-stream`, `text/*` or `*/*` (parameters and weights aside). A request that only
/// accepts something else is never answered with a replay.
pub(crate) fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(http::header::ACCEPT).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    values.any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|range| {
            let essence = range.split(|&b| b == b';').next().unwrap_or_default();
            let essence = essence.trim_ascii();
            [&b"text/event-stream"[..], b"text/*", b"*/*"]
                .iter()
                .any(|m| essence.eq_ignore_ascii_case(m))
        })
    })
}

/// The raw value of the first query parameter called `name`, without allocating.
pub(crate) fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn decode_form_value(raw: &str) -> Result<String, InvalidSessionKey> {
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| InvalidSessionKey::NotUtf8)
}

/// What a request says about where it resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LastEventId {
    /// No `Last-Event-ID` header (or an empty one) and no `lastEventId` parameter.
    None,
    /// A well-formed id.
    Id(EventId),
    /// Something that is not an id of ours.
    Malformed,
}

/// Reads the `Last-Event-ID` header, or the `lastEventId` query parameter when the header is
/// absent (for clients that cannot set headers).
pub(crate) fn last_event_id(parts: &Parts) -> LastEventId {
    let parse = |raw: &[u8]| match EventId::parse(raw) {
        Some(id) => LastEventId::Id(id),
        None => LastEventId::Malformed,
    };
    if let Some(h) = parts.headers.get("last-event-id") {
        // EventSource sends the header only when its last event id is non-empty; an empty one
        // carries no position.
        return if h.is_empty() {
            LastEventId::None
        } else {
            parse(h.as_bytes())
        };
    }
    match query_param(parts.uri.query(), "lastEventId") {
        None | Some("") => LastEventId::None,
        // Our ids are URL-safe, so the raw parameter is the id.
        Some(raw) => parse(raw.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &[u8])]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn query_key_is_form_decoded() {
        let q = FromQuery::default();
        let key = q
            .extract(&parts("/chat?a=1&session_id=a%2Fb+c&x", &[]))
            .unwrap()
            .unwrap();
        assert_eq!(key.as_str(), "a/b c");
    }

    #[test]
    fn absent_or_empty_query_key_is_no_key() {
        let q = FromQuery::default();
        assert_eq!(q.extract(&parts("/chat", &[])), Ok(None));
        assert_eq!(q.extract(&parts("/chat?session_id=", &[])), Ok(None));
        assert_eq!(q.extract(&parts("/chat?session_idx=1", &[])), Ok(None));
    }

    #[test]
    fn invalid_query_keys_are_rejected() {
        let q = FromQuery::default();
        assert_eq!(
            q.extract(&parts("/chat?session_id=%ff", &[])),
            Err(InvalidSessionKey::NotUtf8)
        );
        let long = format!("/chat?session_id={}", "k".repeat(10_000));
        assert_eq!(
            q.extract(&parts(&long, &[])),
            Err(InvalidSessionKey::TooLong(10_000))
        );
        // Bad percent-encoding is taken literally, like browsers do.
        assert_eq!(
            q.extract(&parts("/chat?session_id=%zz", &[]))
                .unwrap()
                .unwrap()
                .as_str(),
            "%zz"
        );
    }

    #[test]
    fn header_key_is_read_verbatim() {
        let h = FromHeader::new(HeaderName::from_static("x-session-id"));
        let key = h
            .extract(&parts("/", &[("x-session-id", b"abc*?[")]))
            .unwrap()
            .unwrap();
        assert_eq!(key.as_str(), "abc*?[");
        assert_eq!(h.extract(&parts("/", &[])), Ok(None));
        assert_eq!(
            h.extract(&parts("/", &[("x-session-id", b"\xff")])),
            Err(InvalidSessionKey::NotUtf8)
        );
    }

    #[test]
    fn path_keys_are_segments_decoded_like_axum_path() {
        let at = |i, uri| FromPath::segment(i).extract(&parts(uri, &[]));
        assert_eq!(
            at(1, "/chat/a%2Fb%20c/stop").unwrap().unwrap().as_str(),
            "a/b c"
        );
        assert_eq!(at(0, "/chat").unwrap().unwrap().as_str(), "chat");
        // `+` is a plus in a path, not a space.
        assert_eq!(at(1, "/chat/a+b").unwrap().unwrap().as_str(), "a+b");
        assert_eq!(at(1, "/chat"), Ok(None));
        assert_eq!(at(1, "/chat/"), Ok(None));
        assert_eq!(at(1, "/chat/%ff"), Err(InvalidSessionKey::NotUtf8));
        let long = format!("/chat/{}", "k".repeat(300));
        assert_eq!(at(1, &long), Err(InvalidSessionKey::TooLong(300)));
    }

    #[test]
    fn or_takes_the_first_key_found_and_stops_at_an_invalid_one() {
        let key = FromHeader::new(HeaderName::from_static("x-k")).or(FromQuery::default());
        let from_header = key.extract(&parts("/?session_id=q", &[("x-k", b"h")]));
        assert_eq!(from_header.unwrap().unwrap().as_str(), "h");
        let from_query = key.extract(&parts("/?session_id=q", &[]));
        assert_eq!(from_query.unwrap().unwrap().as_str(), "q");
        assert_eq!(key.extract(&parts("/", &[])), Ok(None));
        assert_eq!(
            key.extract(&parts("/?session_id=q", &[("x-k", b"\xff")])),
            Err(InvalidSessionKey::NotUtf8)
        );
    }

    #[test]
    fn last_event_id_header_wins_over_query() {
        let p = parts(
            "/?lastEventId=000000000001-5",
            &[("last-event-id", b"000000000001-7")],
        );
        assert!(matches!(last_event_id(&p), LastEventId::Id(id) if id.seq == 7));
        let p = parts("/?lastEventId=000000000001-5", &[]);
        assert!(matches!(last_event_id(&p), LastEventId::Id(id) if id.seq == 5));
        assert_eq!(
            last_event_id(&parts("/", &[("last-event-id", b"")])),
            LastEventId::None
        );
        assert_eq!(
            last_event_id(&parts("/", &[("last-event-id", b"garbage")])),
            LastEventId::Malformed
        );
    }
}
