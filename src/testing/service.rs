//! The inner service's side of a test: what the service behind the layer was asked, and event
//! streams that the test releases one event at a time.
//!
//! The suite serves its routes on an [`Inner`]:
//!
//! - `GET /tokens?n=N&interval_ms=MS`: N events `token 0`..`token N-1` (default 10, at full
//!   speed), with inner ids the layer must replace;
//! - `GET /gated?session_id=K`: the events the test releases with [`Inner::send`], until
//!   [`Inner::end`] or [`Inner::fail`];
//! - `GET /sized?n=N&bytes=B`: N events, all at once, each encoded by the layer in exactly B
//!   bytes (see [`sized_data`]).
//!
//! A test application of your own (an axum router, say) can serve the same routes on one:
//! [`Inner::count_call`] on each call, [`Inner::gated`] for the events of `/gated`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::stream::{self, Stream};
use tokio::sync::mpsc;

use crate::sse::{encode_event, EventRef};
use crate::{Epoch, EventId};

enum GateMsg {
    Data(String),
    Fail,
}

type Gates<T> = Arc<Mutex<HashMap<String, T>>>;

/// What a test sees of the service behind the layer: its calls, counted, and the event sources
/// of its gated streams. Clones share all of it.
#[derive(Clone, Default)]
pub struct Inner {
    calls: Arc<AtomicUsize>,
    gates: Gates<mpsc::UnboundedReceiver<GateMsg>>,
    senders: Gates<mpsc::UnboundedSender<GateMsg>>,
    generators_dropped: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("calls", &self.calls())
            .field("generators_dropped", &self.generators_dropped())
            .finish_non_exhaustive()
    }
}

fn lock<T>(gates: &Gates<T>) -> MutexGuard<'_, HashMap<String, T>> {
    gates.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Counts one call of the service: a route served on this `Inner` calls it once per
    /// request.
    pub fn count_call(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    /// How many times the service was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Prepares the gated stream `key` (`/gated?session_id=key`): its events are released by
    /// [`Inner::send`].
    pub fn gate(&self, key: &str) {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.gates).insert(key.to_owned(), rx);
        lock(&self.senders).insert(key.to_owned(), tx);
    }

    /// Releases one event of the gated stream `key`.
    ///
    /// # Panics
    ///
    /// When `key` was not [gated](Inner::gate), or was [ended](Inner::end).
    pub fn send(&self, key: &str, data: impl Into<String>) {
        let _ = lock(&self.senders)[key].send(GateMsg::Data(data.into()));
    }

    /// Makes the gated stream `key` fail: its next item is an error.
    ///
    /// # Panics
    ///
    /// When `key` was not [gated](Inner::gate), or was [ended](Inner::end).
    pub fn fail(&self, key: &str) {
        let _ = lock(&self.senders)[key].send(GateMsg::Fail);
    }

    /// Ends the gated stream `key`, after the events released so far.
    pub fn end(&self, key: &str) {
        lock(&self.senders).remove(key);
    }

    /// The events of the gated stream `key`, as the test releases them: the data of each
    /// [`Inner::send`], an error for [`Inner::fail`], the end at [`Inner::end`]. `None` when
    /// `key` was not [gated](Inner::gate) or a request took its events already. Dropping the
    /// stream counts in [`Inner::generators_dropped`].
    pub fn gated(
        &self,
        key: &str,
    ) -> Option<impl Stream<Item = Result<String, std::io::Error>> + Send + 'static> {
        let rx = lock(&self.gates).remove(key)?;
        let guard = self.generator_guard();
        Some(stream::unfold((rx, guard), |(mut rx, guard)| async move {
            match rx.recv().await? {
                GateMsg::Data(d) => Some((Ok(d), (rx, guard))),
                GateMsg::Fail => {
                    Some((Err(std::io::Error::other("generator failed")), (rx, guard)))
                }
            }
        }))
    }

    /// A guard that counts in [`Inner::generators_dropped`] when it drops: for the event
    /// streams of routes of a test's own, which keep it.
    pub fn generator_guard(&self) -> GeneratorGuard {
        GeneratorGuard(self.generators_dropped.clone())
    }

    /// How many gated streams (and [guards](Inner::generator_guard)) were dropped: by their
    /// end, or by the layer.
    pub fn generators_dropped(&self) -> usize {
        self.generators_dropped.load(Ordering::SeqCst)
    }
}

/// Counts in [`Inner::generators_dropped`] when it drops; made by [`Inner::generator_guard`].
#[derive(Debug)]
pub struct GeneratorGuard(Arc<AtomicUsize>);

impl Drop for GeneratorGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The data of event `i` of `/sized?bytes=B`: `"<i>:"` padded with `x` so that the layer's
/// encoding of the event (`id: <epoch>-<i + 1>`, the data line, the blank line) is exactly
/// `bytes` long. The overhead is measured with the crate's own encoder, not assumed.
///
/// # Panics
///
/// When `bytes` is too short to hold the event.
pub fn sized_data(i: usize, bytes: usize) -> String {
    let id = EventId {
        epoch: Epoch::from_raw(1),
        seq: i as u64 + 1,
    }
    .to_string();
    let empty = EventRef {
        event: b"",
        data: Some(b""),
        retry: None,
    };
    let overhead = encode_event(id.as_bytes(), &empty).len();
    let prefix = format!("{i}:");
    let len = bytes
        .checked_sub(overhead)
        .filter(|&len| len >= prefix.len())
        .unwrap_or_else(|| panic!("{bytes} bytes cannot hold event {i}"));
    let pad = len - prefix.len();
    prefix + &"x".repeat(pad)
}
