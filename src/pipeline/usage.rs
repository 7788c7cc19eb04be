//! Billed usage: a session's cumulative snapshots (SDK 0.11 `SessionUsage`) turned into counter
//! increases, exactly once.
//!
//! A snapshot is the session's total so far, never an increment. What a snapshot adds is its
//! increase over the highest value already applied for that quantity, so snapshots are never
//! summed, and a snapshot seen twice (a re-read page, a replay, the same total in the object
//! and in an event) adds nothing the second time. The applied values are part of the session's
//! durable state and commit with the batch that moved them, so a crash can neither lose nor
//! repeat an increase.
//!
//! Two sources, one watermark: `session.usage` events (ordered, on the session's own stream) and
//! the session object (`GET /sessions/{id}` or a listing), which is read at other moments and
//! may be older or newer than the last event read. An event snapshot lower than the previous
//! event snapshot is the API contradicting itself: it is counted invalid and adds nothing. An
//! object snapshot lower than the watermark is merely an older view, and adds nothing quietly.

use crate::event::UsageSnapshot;
use crate::outcome::{Tally, UsageQuantity};
pub use crate::session::UsageState;

/// Applied values are kept in millionths, as the durable counters count (a test checks the two
/// scales agree), so the increases add up to a snapshot exactly.
pub(crate) const SCALE: f64 = 1_000_000.0;

/// Where a snapshot was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// A `session.usage` (or snapshot-shaped idle) event of the session's stream.
    Event,
    /// The session object's `usage`.
    Object,
}

/// What applying a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    Applied,
    /// An event snapshot below the previous one: nothing was added.
    Decreased,
}

fn micros(v: f64) -> Option<u64> {
    // Negative, NaN and infinite values are not usage; absurd ones saturate (and are then
    // never exceeded, so they cannot add twice).
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked finite and non-negative; saturating float to int"
    )]
    (v.is_finite() && v >= 0.0).then(|| (v * SCALE).round() as u64)
}

/// One quantity of a snapshot: its key in the applied values, what it is, its value.
struct Quantity<'a> {
    key: String,
    what: UsageQuantity<'a>,
    value: u64,
}

fn quantities(s: &UsageSnapshot) -> Vec<Quantity<'_>> {
    let mut out = Vec::new();
    let mut push = |key: String, what, v: Option<f64>| {
        if let Some(value) = v.and_then(micros) {
            out.push(Quantity { key, what, value });
        }
    };
    for (kind, v) in [
        ("model", s.model_credits),
        ("sandbox_runtime", s.sandbox_runtime_credits),
    ] {
        push(
            format!("credits:{kind}"),
            UsageQuantity::Credits { kind },
            v,
        );
    }
    push(
        "active_seconds".to_owned(),
        UsageQuantity::ActiveSeconds,
        s.active_seconds,
    );
    for (tool, v) in &s.server_tools {
        push(
            format!("server_tool:{tool}"),
            UsageQuantity::ServerTool { tool },
            Some(*v),
        );
    }
    out
}

impl UsageState {
    /// Applies a snapshot of the session whose `agent` label is given, adding its increases
    /// over what was applied before to `tally`.
    pub fn apply(
        &mut self,
        snapshot: &UsageSnapshot,
        source: SnapshotSource,
        agent: &str,
        tally: &mut dyn Tally,
    ) -> SnapshotOutcome {
        let qs = quantities(snapshot);
        if source == SnapshotSource::Event {
            let decreased = qs.iter().any(|q| {
                self.last_event
                    .get(&q.key)
                    .is_some_and(|last| q.value < *last)
            });
            if decreased {
                return SnapshotOutcome::Decreased;
            }
            for q in &qs {
                self.last_event.insert(q.key.clone(), q.value);
            }
        }
        for q in qs {
            let applied = self.applied.get(&q.key).copied().unwrap_or(0);
            if q.value > applied {
                tally.usage_increased(agent, q.what, (q.value - applied) as f64 / SCALE);
                self.applied.insert(q.key, q.value);
            }
        }
        SnapshotOutcome::Applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::metrics::{COUNTER_SCALE, Delta, DurableMetrics, Family};

    #[test]
    fn applied_values_use_the_durable_counters_scale() {
        // An increase is handed over as `millionths / SCALE` and counted as `value * COUNTER_SCALE`:
        // the two must be the same scale for the sum of increases to be the snapshot exactly.
        assert_eq!(SCALE, COUNTER_SCALE);
    }

    fn snap(model: f64, sandbox: f64) -> UsageSnapshot {
        UsageSnapshot {
            model_credits: Some(model),
            sandbox_runtime_credits: Some(sandbox),
            active_seconds: None,
            server_tools: vec![("web_search".into(), 2.0)],
        }
    }

    fn publish(delta: &Delta) -> DurableMetrics {
        let m = DurableMetrics::new();
        m.publish(m.stage(delta));
        m
    }

    #[test]
    fn cumulative_snapshots_add_their_increases_never_their_sum() {
        let mut u = UsageState::default();
        let mut d = Delta::default();
        for s in [snap(0.4, 0.1), snap(0.4, 0.1), snap(1.3, 0.35)] {
            assert_eq!(
                u.apply(&s, SnapshotSource::Event, "a", &mut d),
                SnapshotOutcome::Applied
            );
        }
        let m = publish(&d);
        assert_eq!(m.counter(Family::SessionCredits, &["a", "model"]), 1.3);
        assert_eq!(
            m.counter(Family::SessionCredits, &["a", "sandbox_runtime"]),
            0.35
        );
        assert_eq!(m.counter(Family::ServerToolUses, &["a", "web_search"]), 2.0);
    }

    #[test]
    fn an_event_snapshot_that_decreases_adds_nothing() {
        let mut u = UsageState::default();
        let mut d = Delta::default();
        u.apply(&snap(1.0, 0.2), SnapshotSource::Event, "a", &mut d);
        assert_eq!(
            u.apply(&snap(0.5, 0.3), SnapshotSource::Event, "a", &mut d),
            SnapshotOutcome::Decreased
        );
        u.apply(&snap(1.5, 0.3), SnapshotSource::Event, "a", &mut d);
        let m = publish(&d);
        assert_eq!(m.counter(Family::SessionCredits, &["a", "model"]), 1.5);
        assert_eq!(
            m.counter(Family::SessionCredits, &["a", "sandbox_runtime"]),
            0.3
        );
    }

    #[test]
    fn an_object_ahead_of_the_events_is_not_counted_again() {
        let mut u = UsageState::default();
        let mut d = Delta::default();
        // The object is read first (newer), then the older event snapshots arrive.
        u.apply(&snap(1.3, 0.35), SnapshotSource::Object, "a", &mut d);
        for s in [snap(0.4, 0.1), snap(1.3, 0.35)] {
            assert_eq!(
                u.apply(&s, SnapshotSource::Event, "a", &mut d),
                SnapshotOutcome::Applied
            );
        }
        // An older object view later is quiet, and adds nothing.
        u.apply(&snap(0.4, 0.1), SnapshotSource::Object, "a", &mut d);
        let m = publish(&d);
        assert_eq!(m.counter(Family::SessionCredits, &["a", "model"]), 1.3);
        assert_eq!(
            m.counter(Family::SessionCredits, &["a", "sandbox_runtime"]),
            0.35
        );
    }

    #[test]
    fn hundredths_add_up_exactly() {
        let mut u = UsageState::default();
        let mut d = Delta::default();
        let mut v = 0.0;
        for _ in 0..1000 {
            v += 0.01;
            u.apply(&snap(v, 0.0), SnapshotSource::Event, "a", &mut d);
        }
        let m = publish(&d);
        assert_eq!(
            m.counter(Family::SessionCredits, &["a", "model"]),
            (v * COUNTER_SCALE).round() / COUNTER_SCALE
        );
    }
}
