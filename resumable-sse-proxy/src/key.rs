//! The session key the proxy derives for a request: the caller's key (`--session-key`), scoped by
//! the request's method and the route it matched, and with `--bind-key` bound to the caller's
//! credential.
//!
//! The parts are hashed together (SHA-256) into a key of 64 hex digits, so that neither the
//! caller's key nor its credential is kept in the store, and the caller's key keeps the whole
//! length the layer allows ([`MAX_SESSION_KEY_LEN`](resumable_sse::limits::MAX_SESSION_KEY_LEN)
//! bytes, checked before hashing). The layer then scopes that key by the request path (its
//! default [`KeyScope::Path`](resumable_sse::KeyScope::Path)).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::Method;
use resumable_sse::{ExtractSessionKey, InvalidSessionKey, SessionKey};
use sha2::{Digest, Sha256};

use crate::cli::{KeySource, Route};

/// Tells the keys of this proxy apart from any other use of the same hash.
const DOMAIN: &[u8] = b"resumable-sse-proxy session key v1";

/// `--bind-key`: where the caller's credential is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Every value of a request header (`Authorization`, for instance), in order.
    Header(HeaderName),
    /// Every value of a cookie, in the order the `Cookie` headers give them.
    Cookie(String),
}

impl Binding {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected header:NAME or cookie:NAME";
        let (kind, arg) = s.trim().split_once(':').ok_or(EXPECTED)?;
        match kind {
            "header" => HeaderName::from_bytes(arg.as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("`{arg}` is not a header name")),
            // A cookie name is an HTTP token (RFC 6265), which is what a header name is too.
            "cookie" if HeaderName::from_bytes(arg.as_bytes()).is_ok() => {
                Ok(Self::Cookie(arg.to_owned()))
            }
            "cookie" => Err(format!("`{arg}` is not a cookie name")),
            _ => Err(EXPECTED.to_owned()),
        }
    }

    /// The SHA-256 of the caller's credential: every value found, each with its length. `None`
    /// when the request has none (or only empty ones).
    pub(crate) fn credential(&self, headers: &HeaderMap) -> Option<[u8; 32]> {
        let mut hash = Sha256::new();
        let mut found = false;
        let mut add = |value: &[u8]| {
            if !value.is_empty() {
                found = true;
                hash.update((value.len() as u64).to_be_bytes());
                hash.update(value);
            }
        };
        match self {
            Self::Header(name) => headers.get_all(name).iter().for_each(|v| add(v.as_bytes())),
            Self::Cookie(name) => {
                for pair in headers
                    .get_all(header::COOKIE)
                    .iter()
                    .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
                {
                    let pair = pair.trim_ascii();
                    let mut kv = pair.splitn(2, |&b| b == b'=');
                    if kv.next() == Some(name.as_bytes()) {
                        add(kv.next().unwrap_or_default().trim_ascii());
                    }
                }
            }
        }
        found.then(|| hash.finalize().into())
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(name) => write!(f, "header:{name}"),
            Self::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

/// The proxy's [`ExtractSessionKey`]: the configured source's key, scoped by method and route and
/// bound to the caller's credential. A request without the credential, when binding is on, has no
/// key: it is forwarded unresumable and never meets a stored session.
#[derive(Clone, Debug)]
pub(crate) struct ProxyKey {
    source: KeySource,
    routes: Arc<[Route]>,
    binding: Option<Binding>,
}

impl ProxyKey {
    pub(crate) fn new(source: KeySource, routes: Arc<[Route]>, binding: Option<Binding>) -> Self {
        Self {
            source,
            routes,
            binding,
        }
    }
}

impl ExtractSessionKey for ProxyKey {
    fn extract(&self, parts: &Parts) -> Result<Option<SessionKey>, InvalidSessionKey> {
        let Some(key) = self.source.extract(parts)? else {
            return Ok(None);
        };
        // The proxy sends only routed requests through the layer; another has no session.
        let Some(route) = self.routes.iter().find(|r| r.matches(parts.uri.path())) else {
            return Ok(None);
        };
        let credential = match &self.binding {
            None => None,
            Some(binding) => match binding.credential(&parts.headers) {
                Some(digest) => Some(digest),
                None => return Ok(None),
            },
        };
        // `HEAD` asks about the session a `GET` would get.
        let method = if parts.method == Method::HEAD {
            &Method::GET
        } else {
            &parts.method
        };
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        field(DOMAIN);
        field(method.as_str().as_bytes());
        field(route.to_string().as_bytes());
        field(credential.as_ref().map_or(&[][..], |c| &c[..]));
        field(key.as_str().as_bytes());
        let digest = hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        SessionKey::new(hex).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &ProxyKey, method: Method, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        k.extract(&parts).unwrap().map(|k| k.as_str().to_owned())
    }

    fn proxy_key(binding: Option<&str>) -> ProxyKey {
        let routes: Vec<Route> = ["/a/*", "/b/*"]
            .iter()
            .map(|r| Route::parse(r).unwrap())
            .collect();
        ProxyKey::new(
            KeySource::parse("query:sid").unwrap(),
            routes.into(),
            binding.map(|b| Binding::parse(b).unwrap()),
        )
    }

    #[test]
    fn keys_differ_by_method_and_route_and_head_is_get() {
        let k = proxy_key(None);
        let get = key(&k, Method::GET, "/a/x?sid=1", &[]).unwrap();
        assert_eq!(get.len(), 64);
        assert_eq!(key(&k, Method::HEAD, "/a/x?sid=1", &[]).unwrap(), get);
        assert_ne!(key(&k, Method::POST, "/a/x?sid=1", &[]).unwrap(), get);
        assert_ne!(key(&k, Method::GET, "/b/x?sid=1", &[]).unwrap(), get);
        assert_ne!(key(&k, Method::GET, "/a/x?sid=2", &[]).unwrap(), get);
        assert_eq!(key(&k, Method::GET, "/a/x", &[]), None);
        assert_eq!(key(&k, Method::GET, "/c?sid=1", &[]), None);
    }

    #[test]
    fn bound_keys_differ_by_credential_and_need_one() {
        let k = proxy_key(Some("header:authorization"));
        let alice = key(&k, Method::GET, "/a/x?sid=1", &[("authorization", "alice")]).unwrap();
        let bob = key(&k, Method::GET, "/a/x?sid=1", &[("authorization", "bob")]).unwrap();
        assert_ne!(alice, bob);
        assert_ne!(
            alice,
            key(&proxy_key(None), Method::GET, "/a/x?sid=1", &[]).unwrap()
        );
        assert_eq!(key(&k, Method::GET, "/a/x?sid=1", &[]), None);
        assert_eq!(
            key(&k, Method::GET, "/a/x?sid=1", &[("authorization", "")]),
            None
        );

        let k = proxy_key(Some("cookie:sid"));
        let one = key(&k, Method::GET, "/a/x?sid=1", &[("cookie", "a=1; sid=s1")]).unwrap();
        let same = key(&k, Method::GET, "/a/x?sid=1", &[("cookie", "sid=s1;a=2")]).unwrap();
        assert_eq!(one, same);
        let other = key(&k, Method::GET, "/a/x?sid=1", &[("cookie", "sid=s2")]).unwrap();
        assert_ne!(one, other);
        // Every value counts: adding one is another credential.
        let both = key(
            &k,
            Method::GET,
            "/a/x?sid=1",
            &[("cookie", "sid=s1; sid=s2")],
        )
        .unwrap();
        assert_ne!(both, one);
        for cookie in ["a=1", "xsid=s1", "sid=", "sid"] {
            assert_eq!(
                key(&k, Method::GET, "/a/x?sid=1", &[("cookie", cookie)]),
                None,
                "{cookie}"
            );
        }
    }

    #[test]
    fn bindings_parse() {
        assert_eq!(
            Binding::parse("header:Authorization"),
            Ok(Binding::Header(header::AUTHORIZATION))
        );
        assert_eq!(
            Binding::parse("cookie:session"),
            Ok(Binding::Cookie("session".to_owned()))
        );
        for bad in [
            "",
            "header:",
            "cookie:",
            "cookie:a b",
            "cookie:a=b",
            "query:x",
            "x",
        ] {
            assert!(Binding::parse(bad).is_err(), "{bad}");
        }
    }
}
