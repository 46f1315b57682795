//! The names of a session's keys: the session key, percent-escaped, in one hash tag.

use crate::session::{KeyDigest, SessionKey};

/// Percent-escapes a session key for use inside a key name and a hash tag.
fn escape(key: &SessionKey) -> String {
    const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(key.as_str(), SAFE).to_string()
}

/// The Redis keys of one session, built once per session and shared by the callers that use it
/// (its producer, its local readers).
pub(super) struct Keys {
    /// `<prefix>:{<escaped key>}`, which each key name continues.
    base: Box<str>,
    /// The session key itself.
    pub(super) key: SessionKey,
    /// The key's digest, which names the session in announcements: anyone allowed to subscribe
    /// to the channel reads them, and a key is a capability.
    pub(super) digest: KeyDigest,
    /// The digest as the announcements write it (16 hex digits).
    pub(super) note: Box<str>,
}

impl Keys {
    pub(super) fn new(prefix: &str, key: &SessionKey) -> Self {
        let digest = key.digest();
        Keys {
            base: format!("{prefix}:{{{}}}", escape(key)).into(),
            key: key.clone(),
            digest,
            note: digest.to_string().into(),
        }
    }

    /// `<prefix>:{<escaped key>}`: names the session in the set of live sessions.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    pub(super) fn meta(&self) -> KeyName<'_> {
        KeyName(&self.base, ":meta")
    }

    pub(super) fn events(&self) -> KeyName<'_> {
        KeyName(&self.base, ":events")
    }

    pub(super) fn lease(&self) -> KeyName<'_> {
        KeyName(&self.base, ":lease")
    }
}

/// A key name written as one argument straight from its two parts.
#[derive(Clone, Copy)]
pub(super) struct KeyName<'a>(&'a str, &'static str);

impl KeyName<'_> {
    pub(super) fn len(self) -> usize {
        self.0.len() + self.1.len()
    }
}

impl redis::ToRedisArgs for KeyName<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's buffer cannot fail.
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use redis::Cmd;

    use super::*;

    #[test]
    fn keys_escape_glob_and_hash_tag_characters() {
        let key = SessionKey::new("a}{*?[\n b").unwrap();
        let e = escape(&key);
        assert!(!e.contains(['{', '}', '*', '?', '[', '\n', ' ']), "{e}");
        assert_eq!(e, "a%7D%7B%2A%3F%5B%0A%20b");
        let keys = Keys::new("p", &key);
        let mut cmd = Cmd::new();
        cmd.arg(keys.meta()).arg(keys.lease());
        let args: Vec<_> = cmd.args_iter().collect();
        let want = [format!("p:{{{e}}}:meta"), format!("p:{{{e}}}:lease")];
        assert_eq!(args.len(), 2);
        for (arg, want) in args.into_iter().zip(want) {
            assert!(
                matches!(arg, redis::Arg::Simple(a) if a == want.as_bytes()),
                "{want}"
            );
        }
    }
}
