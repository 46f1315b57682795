//! [`Pins`]: where the connected readers of a session are, so that a store keeps the events
//! they still need past its soft limits (see [`Subscription::reached`](super::Subscription::reached)).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::session::Epoch;

/// The positions of a session's connected readers, each with the epoch it reads. A reader holds
/// its [`Pin`]; dropping it forgets the reader.
#[derive(Debug, Default)]
pub(crate) struct Pins(Mutex<Vec<(Epoch, Weak<AtomicU64>)>>);

/// One reader's position: it has every event up to the value.
#[derive(Debug)]
pub(crate) struct Pin(Arc<AtomicU64>);

impl Pin {
    /// The reader has every event up to `seq`.
    pub(crate) fn reached(&self, seq: u64) {
        self.0.store(seq, Ordering::Relaxed);
    }
}

impl Pins {
    /// A pin for a new reader of `epoch`, at the start until it says where it is.
    pub(crate) fn pin(&self, epoch: Epoch) -> Pin {
        let pin = Arc::new(AtomicU64::new(0));
        let mut pins = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Readers that went away are forgotten when the list doubled, so it stays as long as
        // the number of connected readers (amortised).
        if pins.len() >= 64 && pins.len().is_power_of_two() {
            pins.retain(|(_, p)| p.strong_count() > 0);
        }
        pins.push((epoch, Arc::downgrade(&pin)));
        Pin(pin)
    }

    /// The newest sequence number every connected reader of `epoch` has reached, if one is
    /// connected: the events after it are still needed. Forgets readers that went away.
    pub(crate) fn min(&self, epoch: Epoch) -> Option<u64> {
        let mut pins = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut min = None::<u64>;
        pins.retain(|(e, pin)| match pin.upgrade() {
            Some(pin) => {
                if *e == epoch {
                    let seq = pin.load(Ordering::Relaxed);
                    min = Some(min.map_or(seq, |m| m.min(seq)));
                }
                true
            }
            None => false,
        });
        min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_is_over_the_live_readers_of_one_epoch() {
        let pins = Pins::default();
        let (a, b) = (Epoch::from_raw(1), Epoch::from_raw(2));
        assert_eq!(pins.min(a), None);
        let one = pins.pin(a);
        let two = pins.pin(a);
        let other = pins.pin(b);
        assert_eq!(pins.min(a), Some(0), "a new reader needs everything");
        one.reached(5);
        two.reached(9);
        other.reached(1);
        assert_eq!(pins.min(a), Some(5));
        drop(one);
        assert_eq!(pins.min(a), Some(9));
        drop(two);
        assert_eq!(pins.min(a), None);
        assert_eq!(pins.min(b), Some(1));
    }
}
