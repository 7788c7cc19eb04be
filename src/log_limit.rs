//! Repeated failures told without a line per occurrence.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often a kind of failure that keeps happening is told again.
const INTERVAL: Duration = Duration::from_secs(60);

/// Tells the operator about failures without a line per request: the first of each kind is
/// logged at once, repeats at most once a minute with the count since the last line.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// Per kind: when it was last told, and how many came since.
    last: HashMap<String, (Option<Instant>, u64)>,
}

impl LogLimiter {
    /// Counts one `kind`, and logs `msg` at WARN when it is due.
    pub fn warn(&mut self, kind: &str, msg: &str) {
        let entry = self.last.entry(kind.to_owned()).or_insert((None, 0));
        entry.1 += 1;
        // `None` and not "an hour ago": an Instant cannot go below the machine's boot.
        if entry.0.is_some_and(|told| told.elapsed() < INTERVAL) {
            return;
        }
        let repeats = entry.1 - 1;
        if repeats > 0 {
            tracing::warn!(kind, repeats_since_last_log = repeats, "{msg}");
        } else {
            tracing::warn!(kind, "{msg}");
        }
        *entry = (Some(Instant::now()), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_told_and_repeats_are_counted_until_the_next_line() {
        let mut logs = LogLimiter::default();
        logs.warn("connect", "down");
        assert_eq!(logs.last["connect"].1, 0, "told at once");
        logs.warn("connect", "down");
        logs.warn("connect", "down");
        assert_eq!(
            logs.last["connect"].1, 2,
            "within the minute: counted, not told"
        );
        logs.warn("tls", "bad certificate");
        assert_eq!(logs.last["tls"].1, 0, "another kind is told at once");
    }
}
