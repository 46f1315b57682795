//! Counters and gauges, through the [`metrics`] facade.
//!
//! Install any `metrics` recorder (for instance `metrics-exporter-prometheus`) to collect them;
//! without one they cost an atomic load each.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `resumable_sse_sessions_started_total` | counter | sessions created (an inner SSE response was taken over) |
//! | `resumable_sse_sessions_completed_total` | counter | sessions whose inner body ended normally |
//! | `resumable_sse_sessions_failed_total` | counter | sessions ended by an error, a limit or a panic |
//! | `resumable_sse_sessions_cancelled_total` | counter | sessions stopped through [`Store::cancel`](crate::store::Store::cancel) |
//! | `resumable_sse_sessions_active` | gauge | sessions whose producer runs in this process |
//! | `resumable_sse_clients_connected` | gauge | session bodies being served by this process |
//! | `resumable_sse_replays_total` | counter | requests answered from the store without calling the inner service |
//! | `resumable_sse_events_stored_total` | counter | events appended to the store |
//! | `resumable_sse_store_errors_total` | counter | failed store operations |
//! | `resumable_sse_readers_evicted_total` | counter | connections ended because the events they still needed were evicted |
//! | `resumable_sse_rejections_total` | counter | requests answered with a reason header, labelled `reason` |

use crate::session::Outcome;

/// Describes every metric of this crate to the installed recorder and registers each unlabelled
/// one at zero, so that an exporter lists every name from the start. Call it once, after
/// installing the recorder.
pub fn describe() {
    const COUNTERS: [(&str, &str); 8] = [
        ("resumable_sse_sessions_started_total", "Sessions created"),
        (
            "resumable_sse_sessions_completed_total",
            "Sessions whose inner body ended normally",
        ),
        (
            "resumable_sse_sessions_failed_total",
            "Sessions ended by an error, a limit or a panic",
        ),
        (
            "resumable_sse_sessions_cancelled_total",
            "Sessions stopped through Store::cancel",
        ),
        (
            "resumable_sse_replays_total",
            "Requests answered from the store without calling the inner service",
        ),
        (
            "resumable_sse_events_stored_total",
            "Events appended to the store",
        ),
        (
            "resumable_sse_store_errors_total",
            "Failed store operations",
        ),
        (
            "resumable_sse_readers_evicted_total",
            "Connections ended because the events they still needed were evicted",
        ),
    ];
    const GAUGES: [(&str, &str); 2] = [
        (
            "resumable_sse_sessions_active",
            "Sessions whose producer runs in this process",
        ),
        (
            "resumable_sse_clients_connected",
            "Session bodies being served by this process",
        ),
    ];
    for (name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
        metrics::gauge!(name).increment(0.0);
    }
    metrics::describe_counter!(
        "resumable_sse_rejections_total",
        "Requests answered with a reason header, by reason"
    );
}

pub(crate) fn session_started() {
    metrics::counter!("resumable_sse_sessions_started_total").increment(1);
    metrics::gauge!("resumable_sse_sessions_active").increment(1.0);
}

pub(crate) fn session_ended(outcome: Outcome) {
    metrics::gauge!("resumable_sse_sessions_active").decrement(1.0);
    match outcome {
        Outcome::Completed => metrics::counter!("resumable_sse_sessions_completed_total"),
        Outcome::Failed => metrics::counter!("resumable_sse_sessions_failed_total"),
        Outcome::Cancelled => metrics::counter!("resumable_sse_sessions_cancelled_total"),
    }
    .increment(1);
}

pub(crate) fn replay_served() {
    metrics::counter!("resumable_sse_replays_total").increment(1);
}

pub(crate) fn events_stored(n: usize) {
    metrics::counter!("resumable_sse_events_stored_total").increment(n as u64);
}

pub(crate) fn store_error() {
    metrics::counter!("resumable_sse_store_errors_total").increment(1);
}

pub(crate) fn reader_evicted() {
    metrics::counter!("resumable_sse_readers_evicted_total").increment(1);
}

pub(crate) fn rejected(reason: crate::Reason) {
    metrics::counter!("resumable_sse_rejections_total", "reason" => reason.as_str()).increment(1);
}

/// Counts a connected client for as long as it lives.
pub(crate) struct ConnectedClient(());

impl ConnectedClient {
    pub(crate) fn new() -> Self {
        metrics::gauge!("resumable_sse_clients_connected").increment(1.0);
        Self(())
    }
}

impl Drop for ConnectedClient {
    fn drop(&mut self) {
        metrics::gauge!("resumable_sse_clients_connected").decrement(1.0);
    }
}
