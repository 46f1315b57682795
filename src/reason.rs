//! [`Reason`]: why the layer answered a request itself.

use std::fmt;

/// Why the layer answered a request itself, without events: the value of the
/// [`resumable-sse-reason`](crate::REASON_HEADER) header, and the `reason` label of the
/// `resumable_sse_rejections_total` metric. The crate docs list which status goes with each.
///
/// ```
/// use resumable_sse::{Outcome, Reason};
///
/// assert_eq!(Reason::Evicted.as_str(), "evicted");
/// assert_eq!(Outcome::Cancelled.reason(), Reason::Cancelled);
/// assert_eq!(Reason::from_str_token("beyond-head"), Some(Reason::BeyondHead));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// `204`: the client holds every event of a session that completed.
    Completed,
    /// `204`: ... of a session that failed.
    Failed,
    /// `204`: ... of a session that was cancelled.
    Cancelled,
    /// `410`: no session under the key (never was, or expired).
    UnknownSession,
    /// `410`: the `Last-Event-ID` is of another incarnation of the key, or another session.
    ForeignEpoch,
    /// `410`: the position asked for was evicted by the session's limits.
    Evicted,
    /// `400`: the `Last-Event-ID` is not one of the layer's ids.
    MalformedLastEventId,
    /// `400`: the `Last-Event-ID` is beyond the newest event.
    BeyondHead,
    /// `400`: the session key is invalid (too long, not UTF-8).
    InvalidSessionKey,
    /// `503`: the store holds as many sessions as it may.
    SessionLimit,
    /// `503`: the store failed.
    StoreUnavailable,
    /// `503`: another request's claim never produced a response, or this request's claim was
    /// lost before its session started.
    SessionStarting,
    /// `503`: the layer drains and starts no new session.
    Draining,
}

impl Reason {
    /// Every reason, in the order of the crate docs' table.
    pub const ALL: [Reason; 13] = [
        Reason::Completed,
        Reason::Failed,
        Reason::Cancelled,
        Reason::UnknownSession,
        Reason::ForeignEpoch,
        Reason::Evicted,
        Reason::MalformedLastEventId,
        Reason::BeyondHead,
        Reason::InvalidSessionKey,
        Reason::SessionLimit,
        Reason::StoreUnavailable,
        Reason::SessionStarting,
        Reason::Draining,
    ];

    /// The token sent in the header.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Completed => "completed",
            Reason::Failed => "failed",
            Reason::Cancelled => "cancelled",
            Reason::UnknownSession => "unknown-session",
            Reason::ForeignEpoch => "foreign-epoch",
            Reason::Evicted => "evicted",
            Reason::MalformedLastEventId => "malformed-last-event-id",
            Reason::BeyondHead => "beyond-head",
            Reason::InvalidSessionKey => "invalid-session-key",
            Reason::SessionLimit => "session-limit",
            Reason::StoreUnavailable => "store-unavailable",
            Reason::SessionStarting => "session-starting",
            Reason::Draining => "draining",
        }
    }

    /// The reason a header token names, if any (for clients of the layer, such as a proxy in
    /// front of it).
    pub fn from_str_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == token)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_token_and_reads_back() {
        let tokens: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(tokens.len(), Reason::ALL.len());
        for reason in Reason::ALL {
            assert_eq!(Reason::from_str_token(reason.as_str()), Some(reason));
            assert_eq!(reason.to_string(), reason.as_str());
        }
        assert_eq!(Reason::from_str_token("nope"), None);
    }
}
