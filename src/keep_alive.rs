//! [`KeepAlive`]: the comments that keep an idle session stream open.

use std::time::Duration;

use bytes::Bytes;

use crate::sse::KEEP_ALIVE;

/// The comments the layer sends on a session stream that has been idle, so that proxies and load
/// balancers do not close it; see [`ResumableSseLayer::keep_alive`](crate::ResumableSseLayer::keep_alive).
///
/// The default sends `:` (an empty comment) after every
/// [`DEFAULT_KEEP_ALIVE`](crate::limits::DEFAULT_KEEP_ALIVE) (15 s) without an event. Comments are
/// not events: clients ignore them and they are never stored.
///
/// ```
/// use std::time::Duration;
/// use resumable_sse::{KeepAlive, MemoryStore, ResumableSseLayer};
///
/// let layer = ResumableSseLayer::new(MemoryStore::new())
///     .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)).text("ping"));
/// let quiet = ResumableSseLayer::new(MemoryStore::new()).keep_alive(KeepAlive::disabled());
/// # let _ = (layer, quiet);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct KeepAlive {
    interval: Option<Duration>,
    comment: Bytes,
}

impl KeepAlive {
    /// An empty comment after every 15 s without an event (the default).
    pub fn new() -> Self {
        Self {
            interval: Some(crate::limits::DEFAULT_KEEP_ALIVE),
            comment: Bytes::from_static(KEEP_ALIVE),
        }
    }

    /// No keep-alive comments.
    pub fn disabled() -> Self {
        Self {
            interval: None,
            ..Self::new()
        }
    }

    /// Sends a comment after `interval` without an event; a zero interval turns them off. The
    /// timer is checked once per interval rather than re-armed on every event, so a comment goes
    /// out between one and two intervals after the last event.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// The comment's text (`:<text>`), empty by default.
    ///
    /// # Panics
    ///
    /// If `text` holds a line break (a comment is one line).
    pub fn text(mut self, text: &str) -> Self {
        assert!(
            !text.contains(['\r', '\n']),
            "a keep-alive comment is one line"
        );
        self.comment = Bytes::from(format!(":{text}\n\n"));
        self
    }

    /// The interval, or `None` when keep-alives are off.
    pub fn get_interval(&self) -> Option<Duration> {
        self.interval
    }

    /// The bytes of one comment.
    pub(crate) fn comment(&self) -> &Bytes {
        &self.comment
    }
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_interval_turns_keep_alives_off_and_text_makes_one_comment_line() {
        assert_eq!(
            KeepAlive::new().get_interval(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            KeepAlive::new().interval(Duration::ZERO),
            KeepAlive::disabled()
        );
        assert_eq!(KeepAlive::disabled().get_interval(), None);
        let ka = KeepAlive::new().interval(Duration::from_millis(1));
        assert_eq!(ka.get_interval(), Some(Duration::from_millis(1)));
        assert_eq!(&KeepAlive::new().comment()[..], b":\n\n");
        assert_eq!(&KeepAlive::new().text("ping").comment()[..], b":ping\n\n");
    }

    #[test]
    #[should_panic(expected = "one line")]
    fn a_keep_alive_text_with_a_line_break_is_refused() {
        let _ = KeepAlive::new().text("a\nb");
    }
}
