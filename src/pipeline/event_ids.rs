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
//! A batch takes its stream's set out of the map ([`EventIds::open`]) and checks each event
//! against it with one hash lookup; the new digests go into the set at once and are also
//! staged for the commit. A group that is not committed is taken back out of the sets
//! ([`EventIds::discard`]), so the retried batch is admitted again instead of being taken for a
//! repeat.

use std::collections::HashMap;

use hashbrown::HashSet;
use sha2::{Digest, Sha256};

/// Digests held in memory across all streams before the least recently used streams are
/// dropped (about 10–18 bytes each in a hash set: at most ~9 MB).
pub(crate) const DEFAULT_BUDGET: usize = 500_000;

/// A stream: the session id, and the thread id (`""` for the session's own stream).
pub(crate) type StreamKey = (String, String);

/// The digest an id is remembered by: the first 8 bytes of its SHA-256, little-endian.
pub fn digest(id: &str) -> u64 {
    let bytes = id.as_bytes();
    let first = match one_block(bytes) {
        Some(block) => {
            let mut state = SHA256_IV;
            sha2::block_api::compress256(&mut state, &[block]);
            let mut first = [0u8; 8];
            first[..4].copy_from_slice(&state[0].to_be_bytes());
            first[4..].copy_from_slice(&state[1].to_be_bytes());
            first
        }
        None => {
            let d = Sha256::digest(bytes);
            let mut first = [0u8; 8];
            first.copy_from_slice(&d[..8]);
            first
        }
    };
    u64::from_le_bytes(first)
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// An id of at most 55 bytes (the API's are about 30) padded into the one block SHA-256
/// compresses for it: every event's id is digested, and the hasher's general buffering was a
/// third of the cost. `None` for a longer id.
fn one_block(bytes: &[u8]) -> Option<[u8; 64]> {
    if bytes.len() > 55 {
        return None;
    }
    let mut block = [0u8; 64];
    block[..bytes.len()].copy_from_slice(bytes);
    block[bytes.len()] = 0x80;
    let bits = u64::try_from(bytes.len()).ok()? * 8;
    block[56..].copy_from_slice(&bits.to_be_bytes());
    Some(block)
}

/// The counted ids of the streams in memory.
#[derive(Debug)]
pub(crate) struct EventIds {
    streams: HashMap<StreamKey, Known>,
    /// Digests held across all streams in the map.
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

/// One stream's set, taken out of the map while a batch of its events is admitted.
#[derive(Debug)]
pub(crate) struct OpenStream {
    key: StreamKey,
    known: Known,
    new: Vec<u64>,
}

impl OpenStream {
    /// Takes the event whose id has digest `d` off the stream: `false` when the stream
    /// counted it before (committed, or earlier in this group), else it is counted from now on.
    pub(crate) fn admit(&mut self, d: u64) -> bool {
        let new = self.known.ids.insert(d);
        if new {
            self.new.push(d);
        }
        new
    }
}

/// The digests admitted by the batches of one group, not yet committed: session → thread →
/// digests, in the order admitted.
#[derive(Debug, Default)]
pub struct Staged {
    sessions: hashbrown::HashMap<String, hashbrown::HashMap<String, Vec<u64>>>,
}

impl Staged {
    /// The new digests of each stream of `session`, for the commit.
    pub(crate) fn of_session(&self, session: &str) -> Vec<(String, Vec<u64>)> {
        let mut out: Vec<(String, Vec<u64>)> = self
            .sessions
            .get(session)
            .into_iter()
            .flatten()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(thread, ids)| (thread.clone(), ids.clone()))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn streams(self) -> impl Iterator<Item = (StreamKey, Vec<u64>)> {
        self.sessions.into_iter().flat_map(|(session, threads)| {
            threads
                .into_iter()
                .map(move |(thread, ids)| ((session.clone(), thread), ids))
        })
    }
}

impl Default for EventIds {
    fn default() -> Self {
        EventIds::with_budget(DEFAULT_BUDGET)
    }
}

impl EventIds {
    pub(crate) fn with_budget(budget: usize) -> EventIds {
        EventIds {
            streams: HashMap::new(),
            held: 0,
            budget,
            clock: 0,
        }
    }

    /// Whether the stream's set is in memory (else it is to be read from the state file).
    pub(crate) fn is_loaded(&self, key: &StreamKey) -> bool {
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

    /// Whether the stream counted the event whose id has digest `d` (committed, or earlier in
    /// this group). The stream's set must be loaded, and not open.
    pub fn counted(&self, key: &StreamKey, d: u64) -> bool {
        self.streams.get(key).is_some_and(|k| k.ids.contains(&d))
    }

    /// Takes a stream's set out of the map for a batch of its events (empty when it is not
    /// loaded). [`EventIds::close`] puts it back; a set never put back (an error on the way)
    /// is read from the state file again the next time, which holds what was committed.
    /// Room is made for `events` more at once (a batch's set grew step by step, rehashing).
    pub fn open(&mut self, key: StreamKey, events: usize) -> OpenStream {
        let mut known = self.streams.remove(&key).unwrap_or_default();
        self.held -= known.ids.len();
        known.ids.reserve(events);
        OpenStream {
            key,
            known,
            new: Vec::with_capacity(events),
        }
    }

    /// Puts a stream's set back, its new digests staged for the commit.
    pub(crate) fn close(&mut self, open: OpenStream, staged: &mut Staged) {
        let OpenStream { key, known, new } = open;
        if !new.is_empty() {
            staged
                .sessions
                .entry_ref(key.0.as_str())
                .or_default()
                .entry_ref(key.1.as_str())
                .or_default()
                .extend(new);
        }
        self.held += known.ids.len();
        self.streams.insert(key, known);
    }

    /// The group was not committed: its digests leave the sets.
    pub(crate) fn discard(&mut self, staged: Staged) {
        for (key, ids) in staged.streams() {
            if let Some(known) = self.streams.get_mut(&key) {
                for d in ids {
                    if known.ids.remove(&d) {
                        self.held -= 1;
                    }
                }
            }
        }
    }

    /// The group is committed: its streams are marked used. Past the budget, the streams used
    /// least recently leave memory (they are on disk) until a quarter of the budget is free;
    /// the streams of this group stay (a stream larger than the budget would otherwise be read
    /// back from disk for every page).
    pub fn publish(&mut self, staged: Staged) {
        self.clock += 1;
        for (key, _) in staged.streams() {
            if let Some(known) = self.streams.get_mut(&key) {
                known.used = self.clock;
            }
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
    pub(crate) fn forget_session(&mut self, session: &str) {
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
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_block_digest_is_sha256s() {
        // Every length on both sides of the one-block limit (55 bytes), and non-ASCII text.
        for len in 0..=130usize {
            let id: String = (0..len)
                .map(|i| char::from(b'!' + u8::try_from(i * 7 % 90).unwrap_or(0)))
                .collect();
            let d = Sha256::digest(id.as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&d[..8]);
            assert_eq!(digest(&id), u64::from_le_bytes(first), "length {len}");
        }
        let id = "evt_é✓😀_0123456789abcdef";
        let d = Sha256::digest(id.as_bytes());
        assert_eq!(digest(id).to_le_bytes(), d[..8]);
    }

    fn key(s: &str) -> StreamKey {
        (s.to_owned(), String::new())
    }

    /// Admits `ids` on stream `s` as one batch of a group.
    fn batch(ids: &mut EventIds, staged: &mut Staged, s: &str, events: &[&str]) -> Vec<bool> {
        let mut open = ids.open(key(s), events.len());
        let admitted = events.iter().map(|e| open.admit(digest(e))).collect();
        ids.close(open, staged);
        admitted
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
        assert_eq!(
            batch(&mut ids, &mut staged, "s1", &["e1", "e1"]),
            [true, false]
        );
        assert_eq!(
            batch(&mut ids, &mut staged, "s1", &["e1"]),
            [false],
            "same group"
        );
        assert_eq!(
            batch(&mut ids, &mut staged, "s2", &["e1"]),
            [true],
            "another stream"
        );
        assert!(ids.counted(&key("s1"), digest("e1")));
        ids.publish(staged);
        let mut staged = Staged::default();
        let later: Vec<String> = (2..500).map(|n| format!("e{n}")).collect();
        let later: Vec<&str> = later.iter().map(String::as_str).collect();
        assert!(
            batch(&mut ids, &mut staged, "s1", &later)
                .iter()
                .all(|a| *a)
        );
        assert_eq!(
            batch(&mut ids, &mut staged, "s1", &["e1"]),
            [false],
            "500 events later"
        );
        assert_eq!(ids.held(), 500);
    }

    #[test]
    fn a_group_that_is_not_committed_leaves_the_sets_as_they_were() {
        let mut ids = EventIds::default();
        let mut committed = Staged::default();
        batch(&mut ids, &mut committed, "s1", &["e0"]);
        ids.publish(committed);
        let mut failed = Staged::default();
        assert_eq!(batch(&mut ids, &mut failed, "s1", &["e1"]), [true]);
        ids.discard(failed);
        assert_eq!(ids.held(), 1);
        let mut retry = Staged::default();
        assert_eq!(
            batch(&mut ids, &mut retry, "s1", &["e1", "e0"]),
            [true, false]
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
        let many: Vec<String> = (0..10).map(|n| format!("e{n}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        batch(&mut ids, &mut staged, "big", &many);
        ids.publish(staged);
        assert!(ids.is_loaded(&key("big")));
        let mut staged = Staged::default();
        batch(&mut ids, &mut staged, "small", &["s0"]);
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
            let three: Vec<String> = (0..3).map(|n| format!("{s}{n}")).collect();
            let three: Vec<&str> = three.iter().map(String::as_str).collect();
            batch(&mut ids, &mut staged, s, &three);
            ids.publish(staged);
        }
        // 9 > 8: the oldest stream left until at most 6 remain.
        assert!(!ids.is_loaded(&key("a")));
        assert!(ids.is_loaded(&key("c")));
        assert_eq!(ids.held(), 6);
        ids.load(key("a"), vec![digest("a0")]);
        assert_eq!(ids.held(), 7);
        assert!(ids.counted(&key("a"), digest("a0")));
        ids.forget_session("a");
        assert!(!ids.is_loaded(&key("a")));
        assert_eq!(ids.held(), 6);
    }
}
