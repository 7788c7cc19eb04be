//! A turn as the exporter keeps it while it runs and hands it over when it closes: the domain
//! outcome the tracker produces and the sinks turn into spans (and the state store keeps in the
//! span outbox). Plain data; it imports only the event model.

use serde::{Deserialize, Serialize};

use crate::event::{Tokens, ToolKind};

/// The session turn a thread's turn ran in: its trace, and the span it hangs under.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParentTurn {
    pub key: String,
    pub first_event_id: String,
}

fn reported() -> bool {
    true
}

/// A turn: open in its session's tracker state while it runs, then closed into a
/// [`ClosedTurn`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Turn {
    /// `turn_id` when the API gives one, else `seq-N`.
    pub key: String,
    pub has_turn_id: bool,
    pub first_event_id: String,
    pub start_ns: Option<i64>,
    pub last_ns: Option<i64>,
    /// Tokens came from model requests; the idle usage must not count them again.
    pub tokens_from_requests: bool,
    pub tokens: Tokens,
    pub credits: f64,
    /// Some event of the turn reported tokens / credits: only then do its sums become span
    /// attributes (no false zeros). Turns stored before these flags existed say yes.
    #[serde(default = "reported")]
    pub tokens_reported: bool,
    #[serde(default = "reported")]
    pub credits_reported: bool,
    pub last_model: Option<String>,
    /// Set by an error that ends the turn: `(error_type, time)`.
    pub failed: Option<(String, Option<i64>)>,
    pub children: Vec<ChildSpan>,
    pub children_dropped: u32,
    /// The `session.error`s of the turn (the spans show them as span events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<TurnError>,
    /// Span events as releases before 2026-12-01 stored them (their names and attributes
    /// already in OpenTelemetry's words); read so that turns they left in an outbox keep them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub span_events: Vec<SpanEvent>,
    /// Message and thinking text, recorded only when content capture is on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// A sub-agent's turn: the session turn it ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentTurn>,
    /// `error.qoder_error_code` of the error that failed the turn (diagnostic, SDK 0.11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// A captured message of a turn (opt-in), already truncated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// `text` or `reasoning` (GenAI message part types).
    pub part: String,
    pub content: String,
}

/// A model request or tool call inside a turn, ready to become a child span.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildSpan {
    /// The event id the span id derives from (the start, or the end when no start was seen).
    pub id: String,
    pub detail: ChildDetail,
    pub start_ns: Option<i64>,
    pub end_ns: Option<i64>,
    pub is_error: bool,
    /// Never finished: the turn or the session ended first.
    pub incomplete: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChildDetail {
    Chat {
        model: String,
        tokens: Option<Tokens>,
        credits: Option<f64>,
    },
    Tool {
        name: String,
        call_id: String,
        kind: ToolKind,
    },
}

/// A `session.error` during a turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TurnError {
    pub time_ns: Option<i64>,
    pub error_type: String,
    /// As the `retry_status` label has it.
    pub retry_status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `error.qoder_error_code` (SDK 0.11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// A span event as older releases stored it (see [`Turn::span_events`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpanEvent {
    pub name: String,
    pub time_ns: Option<i64>,
    pub attributes: Vec<(String, String)>,
}

/// Why a turn ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TurnEnd {
    Idle {
        stop_reason: String,
    },
    Failed {
        error_type: String,
    },
    Terminated,
    /// A later turn started without this one idling (G1 `turn_id` change).
    Superseded,
    /// The session went quiet mid-turn for longer than the configured age; closed incomplete.
    Stale,
}

/// A turn that closed, with everything needed to build its trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedTurn {
    pub session_id: String,
    pub agent: String,
    pub agent_id: Option<String>,
    pub model: String,
    pub turn: Turn,
    pub end_ns: Option<i64>,
    pub end: TurnEnd,
}
