//! What the exporter keeps about one session between batches, as it is stored (in the state
//! file, with the batch that produced it): the session's tracker state, its sub-agent threads,
//! its open requests and tools, its usage watermarks. Plain data, which imports only the
//! domain model; the tracker (`pipeline::tracker`) and the usage rules (`pipeline::usage`) are
//! what move it. Every struct reads with `#[serde(default)]`: a field added later reads from an
//! older file as its default.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{Event, ToolKind};
use crate::turn::{ParentTurn, Turn};

/// Everything the exporter keeps about one session between batches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionState {
    /// The `agent` label: the agent's name, else its id, else `unknown`.
    pub agent: String,
    pub agent_id: Option<String>,
    /// The model of the session's agent snapshot, the fallback `model` label.
    pub model: Option<String>,
    /// Last known status, from the session object or from status events.
    pub status: String,
    pub turn: Option<Turn>,
    /// Turns opened so far; names turns that have no `turn_id`.
    pub turn_seq: u64,
    pub requests: VecDeque<OpenRequest>,
    pub tools: VecDeque<OpenTool>,
    /// The last 32 ids a state file from before `pipeline::event_ids` remembered (that table
    /// does not know them): still skipped, and let go one per new event. New states keep none.
    #[serde(skip_serializing_if = "VecDeque::is_empty")]
    pub recent: VecDeque<String>,
    /// Events consumed from the log, readable or not: where a re-read resumes.
    pub consumed: u64,
    /// Billed usage applied so far from the session's cumulative snapshots.
    #[serde(default, skip_serializing_if = "UsageState::is_empty")]
    pub usage: UsageState,
    /// Sub-agent threads by thread id, each with its own stream cursor and tracker.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<String, ThreadState>,
    /// The session's last closed turns, for placing a thread's turn read after its session
    /// turn closed under the turn it ran in.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub recent_turns: VecDeque<TurnSpan>,
    /// The session's credit budget (`budget.max_credit_cost`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_credits: Option<f64>,
    /// The session's agent is a coordinator (`agent.multiagent`): its thread list is read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multiagent: bool,
    /// Set on a sub-agent thread's tracker: its id (names its turns apart from the session's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

/// A sub-agent thread of a session: where its own stream was read to, and its turns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThreadState {
    /// The thread's event cursor, committed with the batch that moved it.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Running (created or running, not idle since): its stream must be read.
    #[serde(default)]
    pub active: bool,
    /// The session's stream named the thread since its own stream was last read to the end.
    #[serde(default)]
    pub dirty: bool,
    /// Ids of this thread's events that may appear on both streams (everything but spans and
    /// message text), so a cross-posted event counts once whichever stream shows it first.
    #[serde(default)]
    pub seen: VecDeque<String>,
    /// Its `session.thread_created` was counted (it may come after the thread's own events).
    #[serde(default)]
    pub created: bool,
    /// Events of this thread the session's stream showed (cross-posts), held until the
    /// thread's own stream shows them in their order; applied as they are if it never does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<Event>,
    /// `updated_at` of the thread object when the thread list last showed it: a listing
    /// that shows another value means the thread changed and its stream is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed_updated: Option<String>,
    /// The thread's own state machine; its `agent` is the sub-agent's name.
    pub tracker: SessionState,
}

/// A closed session turn: which turn, and when it ran (event time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TurnSpan {
    pub turn: ParentTurn,
    pub start_ns: Option<i64>,
    pub end_ns: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenRequest {
    pub start_id: String,
    pub span_id: Option<String>,
    pub model: Option<String>,
    pub start_ns: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenTool {
    pub kind: ToolKind,
    pub use_id: String,
    pub event_id: String,
    pub name: String,
    pub start_ns: Option<i64>,
    /// Its span went out with a turn that closed before the result came.
    pub span_emitted: bool,
}

/// The per-session record of applied snapshots. Quantities are keyed `credits:<kind>`,
/// `active_seconds` and `server_tool:<tool>`; values are in the counters' millionths, so the
/// increases add up to the snapshot exactly, whatever the float arithmetic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageState {
    /// The highest value applied per quantity, from either source.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
    /// The last event snapshot per quantity: a later event below it is a decrease.
    #[serde(default)]
    pub last_event: BTreeMap<String, u64>,
}

impl UsageState {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.last_event.is_empty()
    }
}
