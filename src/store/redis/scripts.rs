//! The Lua scripts (in `lua/`, one file each) and how they are called.

use redis::{Cmd, ErrorKind, Script, ServerErrorKind, Value};

use super::keys::Keys;
use super::{unavailable, Inner};
use crate::store::StoreError;

/// A limit as the scripts take it: Lua numbers are doubles, so a limit beyond 2^53 (such as
/// `usize::MAX`, "no limit") is passed as 0, which the scripts read as "no limit".
pub(super) fn script_limit(max: usize) -> u64 {
    match u64::try_from(max) {
        Ok(max) if max <= 1 << 53 => max,
        _ => 0,
    }
}

// KEYS: meta, events, lease. Common ARGV prefix: channel, notification message (the digest of the
// session key, never the key: a subscriber to the channel must not learn keys).
// Status values: starting, running, completed, failed, cancelled.
// Sequence numbers are handled as Lua numbers (doubles): exact up to 2^53.

/// Marks a session whose producer lost its lease as failed. Shared by the scripts that read.
const CHECK_LEASE: &str = include_str!("lua/check_lease.lua");

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms, retention_ms, finished (the epoch of a finished
/// session to replace; empty: none)
const CLAIM: &str = include_str!("lua/claim.lua");

/// ARGV: channel, msg, epoch, head
const START: &str = include_str!("lua/start.lua");

/// ARGV: channel, msg, epoch
const RELEASE: &str = include_str!("lua/release.lua");

/// ARGV: channel, msg, epoch, ttl_ms, max_events, max_bytes, hard_max_bytes (0: no limit),
/// pinned (-1: none), then per chunk: first seq, ends (little-endian u32 offsets), data. Returns
/// 1 when stored (or already stored), 0 when the session does not take events; an error when the
/// events do not follow the newest stored one.
///
/// After storing, the oldest whole chunks are trimmed while the session keeps more than
/// `max_events` events or more than `max_bytes` bytes of event data (`bytes` in the meta hash:
/// the sum of the retained chunks' `d` lengths), except chunks holding an event after `pinned`
/// (what a connected reader of the producing process still needs), and, whoever needs them,
/// while it keeps more than `hard_max_bytes`; the newest chunk is always kept. A trimmed chunk is
/// read once to learn its size, so trimming costs about what its append did.
const APPEND: &str = include_str!("lua/append.lua");

/// ARGV: channel, msg, epoch, outcome, retention_ms. Also used to cancel (epoch empty: any).
const FINISH: &str = include_str!("lua/finish.lua");

/// ARGV: channel, msg, retention_ms
const LOOKUP: &str = include_str!("lua/lookup.lua");

/// ARGV: channel, msg, retention_ms, epoch, after, max_events, max_bytes.
/// Returns {status, first, last, entries}: the raw stream entries holding the events
/// (after, after + max] (from the oldest retained one when `after` was evicted), stopping before
/// the entry that would bring their data past `max_bytes` (at least one entry), so that no reply
/// holds the shared connection for long, or carries more than `max_bytes` or one chunk.
const READ: &str = include_str!("lua/read.lua");

/// ARGV: channel, msg, epoch, lease_ms, ttl_ms
const RENEW: &str = include_str!("lua/renew.lua");

/// ARGV: channel, msg, epoch
const STATUS: &str = include_str!("lua/status.lua");

/// On the set of live sessions alone (KEYS: that set). ARGV: member, max (-1: no limit), ttl_ms.
/// Returns 1 when the session is counted (already, or now), 0 when the store is full.
const ADMIT: &str = include_str!("lua/admit.lua");

/// On the set of live sessions alone. ARGV: member, ttl_ms (-1: forget it).
const RECOUNT: &str = include_str!("lua/recount.lua");

pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) start: Script,
    pub(super) release: Script,
    pub(super) append: Script,
    pub(super) finish: Script,
    pub(super) lookup: Script,
    pub(super) read: Script,
    pub(super) renew: Script,
    pub(super) status: Script,
    pub(super) admit: Script,
    pub(super) recount: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with_helpers = |body: &str| Script::new(&format!("{CHECK_LEASE}\n{body}"));
        Self {
            claim: with_helpers(CLAIM),
            start: Script::new(START),
            release: Script::new(RELEASE),
            append: Script::new(APPEND),
            finish: Script::new(FINISH),
            lookup: with_helpers(LOOKUP),
            read: with_helpers(READ),
            renew: Script::new(RENEW),
            status: Script::new(STATUS),
            admit: Script::new(ADMIT),
            recount: Script::new(RECOUNT),
        }
    }
}

/// One script call: `EVALSHA` with a session's keys and the common arguments, to which the
/// caller adds its own. The arguments are written once, straight into the command.
pub(super) struct Call<'a> {
    script: &'a Script,
    pub(super) cmd: Cmd,
}

impl Call<'_> {
    pub(super) fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.cmd.arg(arg);
        self
    }
}

impl Inner {
    /// Prepares a script call on a session's keys, with room for `args` more arguments of
    /// `bytes` bytes in all.
    pub(super) fn call<'a>(
        &self,
        script: &'a Script,
        keys: &Keys,
        args: usize,
        bytes: usize,
    ) -> Call<'a> {
        let name = &*keys.note;
        let (meta, events, lease) = (keys.meta(), keys.events(), keys.lease());
        let size =
            64 + meta.len() + events.len() + lease.len() + self.channel.len() + name.len() + bytes;
        let mut cmd = Cmd::with_capacity(8 + args, size);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(meta)
            .arg(events)
            .arg(lease)
            .arg(&self.channel)
            .arg(name);
        Call { script, cmd }
    }

    /// Prepares a script call on the set of live sessions (`<prefix>:sessions`), for `member`
    /// (the base of a session's key names), with `args` more arguments.
    pub(super) fn count_call<'a>(&self, script: &'a Script, keys: &Keys, args: usize) -> Call<'a> {
        let member = keys.base();
        let prefix = &self.config.prefix;
        let mut cmd = Cmd::with_capacity(5 + args, 80 + prefix.len() + member.len());
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(format!("{prefix}:sessions"))
            .arg(member);
        Call { script, cmd }
    }

    pub(super) async fn invoke(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        match call.cmd.query_async::<Value>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // The server's script cache was emptied (a restart, SCRIPT FLUSH): load, retry.
                call.script
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                call.cmd.query_async(&mut conn).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_beyond_what_lua_counts_exactly_mean_no_limit() {
        assert_eq!(script_limit(usize::MAX), 0);
        assert_eq!(script_limit((1 << 53) + 1), 0);
        assert_eq!(script_limit(1 << 53), 1 << 53);
        assert_eq!(script_limit(64 << 20), 64 << 20);
        assert_eq!(script_limit(1), 1);
    }
}
