//! The request path, normalised before anything reads it: the metrics path, the route match, the
//! session key's scope and the upstream all see the same canonical path.
//!
//! - A `..` segment is refused, however it is spelled: percent-encoded (`%2e%2e`, `%2E.`, also
//!   when encoded several times over, `%252e%252e`), behind an encoded separator (`..%2f`,
//!   `%2f..`), a backslash (`..\`, `..%5c`, which some servers read as a separator) or a path
//!   parameter (`..;`, which some servers strip). No request can name anything outside the
//!   upstream's path prefix.
//! - A `.` segment is removed, and so is an empty one: `//` is one `/`. A trailing `/` stays.
//! - Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded and the hex
//!   digits of the other encodings are made uppercase (RFC 3986, 6.2.2), so that `/%761/chat`
//!   is `/v1/chat`.
//! - The path must start with `/`: the asterisk form (`OPTIONS *`) and the authority form
//!   (`CONNECT`) are refused.
//!
//! The query is left as it is.

use std::borrow::Cow;

/// Why a request path is refused (answered `400 Bad Request`, forwarded nowhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InvalidPath {
    /// The path does not start with `/`.
    NotOriginForm,
    /// The path has a `..` segment, in some spelling.
    DotDot,
}

impl std::fmt::Display for InvalidPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotOriginForm => "the request path does not start with `/`",
            Self::DotDot => "the request path has a `..` segment",
        })
    }
}

/// The normalised form of `path` (see the module docs), borrowed when it is already normal.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(InvalidPath::NotOriginForm);
    };
    let mut out = String::with_capacity(path.len());
    let mut segments = rest.split('/').peekable();
    while let Some(raw) = segments.next() {
        if is_dot_dot(raw) {
            return Err(InvalidPath::DotDot);
        }
        let segment = canonical(raw);
        let last = segments.peek().is_none();
        if segment.is_empty() || segment == "." {
            // Dropped, but a path that ends with it ends with `/`.
            if last {
                out.push('/');
            }
            continue;
        }
        out.push('/');
        out.push_str(&segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Whether a raw segment could be read as `..` by some server: decoded until nothing is left to
/// decode, split at `/` and `\`, each part up to a `;`.
fn is_dot_dot(raw: &str) -> bool {
    let mut bytes: Cow<'_, [u8]> = Cow::Borrowed(raw.as_bytes());
    // Each round that changes anything is shorter, so this ends.
    while let Some(decoded) = decode_once(&bytes) {
        bytes = Cow::Owned(decoded);
    }
    bytes
        .split(|&b| b == b'/' || b == b'\\')
        .any(|part| part.split(|&b| b == b';').next() == Some(b".."))
}

/// `bytes` with every `%XX` decoded, or `None` when it has none.
fn decode_once(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(v) = escape_at(bytes, i) {
            out.push(v);
            changed = true;
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    changed.then_some(out)
}

/// The byte of a `%XX` escape at `i`, if there is one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hi = hex(*bytes.get(i + 1)?)?;
    let lo = hex(*bytes.get(i + 2)?)?;
    u8::try_from(hi * 16 + lo).ok()
}

/// A segment with its unreserved characters decoded and its other escapes in uppercase.
fn canonical(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match escape_at(bytes, i) {
            Some(v) => {
                // `%` and hex digits are ASCII: both ends are character boundaries.
                out.push_str(&raw[start..i]);
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    out.push(char::from(v));
                } else {
                    out.push('%');
                    out.push_str(&raw[i + 1..i + 3].to_ascii_uppercase());
                }
                i += 3;
                start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&raw[start..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/",
            "/v1/chat/stream",
            "/a%2Fb",
            "/caf%C3%A9",
            "/a;b",
            "/..a",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_and_empty_segments_are_removed() {
        for (p, want) in [
            ("/./a", "/a"),
            ("/a/./b/.", "/a/b/"),
            ("/.", "/"),
            ("//a//b", "/a/b"),
            ("/a//", "/a/"),
            ("//", "/"),
            ("/%2e/a", "/a"),
            ("/v1/./chat//stream", "/v1/chat/stream"),
        ] {
            assert_eq!(normalize(p).unwrap(), want, "{p}");
        }
    }

    #[test]
    fn escapes_are_made_canonical() {
        assert_eq!(normalize("/%761/%63hat").unwrap(), "/v1/chat");
        assert_eq!(normalize("/a%2fb%c3%a9").unwrap(), "/a%2Fb%C3%A9");
        assert_eq!(normalize("/%7E%2D%5F").unwrap(), "/~-_");
        // Not escapes: left as they are.
        assert_eq!(normalize("/%zz/%4").unwrap(), "/%zz/%4");
    }

    #[test]
    fn dot_dot_is_refused_in_every_spelling() {
        for p in [
            "/..",
            "/../admin",
            "/a/../b",
            "/a/..",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/%2E./admin",
            "/.%2e/admin",
            "/%252e%252e/admin",
            "/%25252e./admin",
            "/a/..%2fadmin",
            "/a/..%2Fadmin",
            "/a%2f..%2fadmin",
            "/..\\admin",
            "/a\\..\\admin",
            "/..%5cadmin",
            "/..%5Cadmin",
            "/..;/admin",
            "/..;x=1/admin",
            "/%2e%2e;/admin",
        ] {
            assert_eq!(normalize(p), Err(InvalidPath::DotDot), "{p}");
        }
    }

    #[test]
    fn paths_not_starting_with_a_slash_are_refused() {
        for p in ["", "*", "a/b", "%2f"] {
            assert_eq!(normalize(p), Err(InvalidPath::NotOriginForm), "{p:?}");
        }
    }
}
