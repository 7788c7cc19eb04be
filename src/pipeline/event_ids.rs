//! Every event id a stream has counted, so no event is counted twice whatever the API does.
//!
//! The API promises neither that a page holds only events after the cursor nor that ids sort
//! (`qoder-api.md`: ids are opaque, "never sort or compare ids"), so "at or before the last
//! committed id" cannot tell an old event from a new one. What is exact is to remember every id:
//! each stream (a session's own, or one sub-agent thread's) keeps the set of its counted ids, as
//! 64-bit digests (the first 8 bytes of SHA-256, stable across versions and platforms). Two
//! distinct ids of one stream share a digest with probability about n²/2⁶⁵: 3·10⁻¹⁰ for a
//! stream of 100 000 events.
//!
//! The sets are durable: the digests a batch admits are committed with the batch (one blob per
//! stream and batch, `state::StateStore::load_event_ids`). In memory, a bounded number of
//! digests is kept; the streams used least recently are dropped past the budget and read back
//! from the state file the next time they have events.
//!
//! Admission is staged: a batch's new digests count as seen for the rest of its group, and
//! become part of the sets only once the group is committed. A commit that fails leaves the sets
//! as they were, so the retried batch is admitted again instead of being taken for a repeat.

use std::collections::HashMap;

use hashbrown::HashSet;
use sha2::{Digest, Sha256};

/// Digests held in memory across all streams before the least recently used streams are
/// dropped (about 10–18 bytes each in a hash set: at most ~9 MB).
pub const DEFAULT_BUDGET: usize = 500_000;

/// A stream: the session id, and the thread id (`""` for the session's own stream).
pub type StreamKey = (String, String);

/// The digest an id is remembered by.
pub fn digest(id: &str) -> u64 {
    let d = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

/// The counted ids of the streams in memory.
#[derive(Debug)]
pub struct EventIds {
    streams: HashMap<StreamKey, Known>,
    /// Digests held across all streams.
    held: usize,
    budget: usize,
    /// Increases with every publish: the streams' last use, for dropping the oldest.
    clock: u64,
}

#[derive(Debug, Default)]
struct Known {
    ids: HashSet<u64>,
    used: u64,
}

/// The digests admitted by the batches of one group, not yet committed: session → thread →
/// digests.
#[derive(Debug, Default)]
pub struct Staged {
    sessions: hashbrown::HashMap<String, hashbrown::HashMap<String, HashSet<u64>>>,
}

impl Staged {
    /// The new digests of each stream of `session`, for the commit.
    pub fn of_session(&self, session: &str) -> Vec<(String, Vec<u64>)> {
        let mut out: Vec<(String, Vec<u64>)> = self
            .sessions
            .get(session)
            .into_iter()
            .flatten()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(thread, ids)| (thread.clone(), ids.iter().copied().collect()))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn stream(&mut self, (session, thread): &StreamKey) -> &mut HashSet<u64> {
        // `entry_ref`: the key is cloned only when the stream is new to the group.
        self.sessions
            .entry_ref(session.as_str())
            .or_default()
            .entry_ref(thread.as_str())
            .or_default()
    }
}

impl Default for EventIds {
    fn default() -> Self {
        EventIds::with_budget(DEFAULT_BUDGET)
    }
}

impl EventIds {
    pub fn with_budget(budget: usize) -> EventIds {
        EventIds {
            streams: HashMap::new(),
            held: 0,
            budget,
            clock: 0,
        }
    }

    /// Whether the stream's set is in memory (else it is to be read from the state file).
    pub fn is_loaded(&self, key: &StreamKey) -> bool {
        self.streams.contains_key(key)
    }

    /// Puts a stream's set, as read from the state file, in memory.
    pub fn load(&mut self, key: StreamKey, ids: Vec<u64>) {
        let known = Known {
            ids: ids.into_iter().collect(),
            used: self.clock,
        };
        self.held += known.ids.len();
        if let Some(old) = self.streams.insert(key, known) {
            self.held -= old.ids.len();
        }
    }

    /// Whether the stream counted `id` (committed, or earlier in this group). The stream's
    /// set must be loaded.
    pub fn counted(&self, staged: &Staged, key: &StreamKey, id: &str) -> bool {
        let d = digest(id);
        self.streams.get(key).is_some_and(|k| k.ids.contains(&d))
            || staged
                .sessions
                .get(key.0.as_str())
                .and_then(|t| t.get(key.1.as_str()))
                .is_some_and(|ids| ids.contains(&d))
    }

    /// Takes event `id` off the stream: `false` when the stream counted it before (committed,
    /// or earlier in this group), else it is staged as counted.
    pub fn admit(&self, staged: &mut Staged, key: &StreamKey, id: &str) -> bool {
        let d = digest(id);
        if self.streams.get(key).is_some_and(|k| k.ids.contains(&d)) {
            return false;
        }
        staged.stream(key).insert(d)
    }

    /// The group is committed: its digests join the sets. Past the budget, the streams used
    /// least recently leave memory (they are on disk) until a quarter of the budget is free;
    /// the streams of this group stay (a stream larger than the budget would otherwise be read
    /// back from disk for every page).
    pub fn publish(&mut self, staged: Staged) {
        self.clock += 1;
        let streams = staged.sessions.into_iter().flat_map(|(session, threads)| {
            threads
                .into_iter()
                .map(move |(thread, ids)| ((session.clone(), thread), ids))
        });
        for (key, ids) in streams {
            let known = self.streams.entry(key).or_default();
            known.used = self.clock;
            let before = known.ids.len();
            known.ids.extend(ids);
            self.held += known.ids.len() - before;
        }
        if self.held > self.budget {
            let mut by_age: Vec<(u64, StreamKey)> = self
                .streams
                .iter()
                .filter(|(_, v)| v.used < self.clock)
                .map(|(k, v)| (v.used, k.clone()))
                .collect();
            by_age.sort_unstable();
            let target = self.budget / 4 * 3;
            for (_, key) in by_age {
                if self.held <= target {
                    break;
                }
                if let Some(gone) = self.streams.remove(&key) {
                    self.held -= gone.ids.len();
                }
            }
        }
    }

    /// The session has ended for good: its streams leave memory.
    pub fn forget_session(&mut self, session: &str) {
        let held = &mut self.held;
        self.streams.retain(|(s, _), k| {
            let keep = s != session;
            if !keep {
                *held -= k.ids.len();
            }
            keep
        });
    }

    /// Digests in memory.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> StreamKey {
        (s.to_owned(), String::new())
    }

    #[test]
    fn the_digest_is_pinned() {
        // First 8 bytes of SHA-256("sevt_1"), little endian: a state file written by one build
        // is read by the next.
        // Python: int.from_bytes(hashlib.sha256(b"sevt_1").digest()[:8], "little")
        assert_eq!(digest("sevt_1"), 0x6d6d_b307_39e4_e5c5);
    }

    #[test]
    fn an_id_counts_once_per_stream_however_late_it_comes_back() {
        let mut ids = EventIds::default();
        let mut staged = Staged::default();
        assert!(ids.admit(&mut staged, &key("s1"), "e1"));
        assert!(
            !ids.admit(&mut staged, &key("s1"), "e1"),
            "repeated in the group"
        );
        assert!(ids.admit(&mut staged, &key("s2"), "e1"), "another stream");
        ids.publish(staged);
        let mut staged = Staged::default();
        for n in 2..500 {
            assert!(ids.admit(&mut staged, &key("s1"), &format!("e{n}")));
        }
        assert!(
            !ids.admit(&mut staged, &key("s1"), "e1"),
            "500 events later"
        );
        assert_eq!(ids.held(), 2);
    }

    #[test]
    fn a_group_that_is_not_committed_leaves_the_sets_as_they_were() {
        let ids = EventIds::default();
        let mut failed = Staged::default();
        assert!(ids.admit(&mut failed, &key("s1"), "e1"));
        drop(failed);
        let mut retry = Staged::default();
        assert!(
            ids.admit(&mut retry, &key("s1"), "e1"),
            "the retry counts it"
        );
        assert_eq!(
            retry.of_session("s1"),
            vec![(String::new(), vec![digest("e1")])]
        );
        assert!(retry.of_session("s2").is_empty());
    }

    #[test]
    fn a_stream_larger_than_the_budget_stays_while_it_is_read() {
        let mut ids = EventIds::with_budget(4);
        let mut staged = Staged::default();
        for n in 0..10 {
            ids.admit(&mut staged, &key("big"), &format!("e{n}"));
        }
        ids.publish(staged);
        assert!(ids.is_loaded(&key("big")));
        let mut staged = Staged::default();
        ids.admit(&mut staged, &key("small"), "s0");
        ids.publish(staged);
        assert!(
            !ids.is_loaded(&key("big")),
            "left once another stream is read"
        );
        assert_eq!(ids.held(), 1);
    }

    #[test]
    fn past_the_budget_the_oldest_streams_leave_memory_and_come_back_from_disk() {
        let mut ids = EventIds::with_budget(8);
        for s in ["a", "b", "c"] {
            let mut staged = Staged::default();
            for n in 0..3 {
                ids.admit(&mut staged, &key(s), &format!("{s}{n}"));
            }
            ids.publish(staged);
        }
        // 9 > 8: the oldest stream left until at most 6 remain.
        assert!(!ids.is_loaded(&key("a")));
        assert!(ids.is_loaded(&key("c")));
        assert_eq!(ids.held(), 6);
        ids.load(key("a"), vec![digest("a0")]);
        assert_eq!(ids.held(), 7);
        assert!(!ids.admit(&mut Staged::default(), &key("a"), "a0"));
        ids.forget_session("a");
        assert!(!ids.is_loaded(&key("a")));
        assert_eq!(ids.held(), 6);
    }
}
