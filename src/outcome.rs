//! What the tracker concludes from the events, as the sinks take it: one method per domain
//! outcome (an event was counted, a turn ended, a model request finished, a usage snapshot
//! raised a quantity). The tracker says what happened; the metrics sink (its `Delta`) decides
//! which series that moves. No metric or span vocabulary here, and nothing but the event model
//! imported.

use crate::event::Tokens;

/// Where an outcome can be seen in the traces: the trace of the session turn it happened in
/// (a sub-agent's turn is in the trace of the session turn it ran in), the first event of the
/// turn whose root span it belongs to, and the event's time.
#[derive(Debug, Clone, Copy)]
pub struct Example<'a> {
    pub session_id: &'a str,
    pub trace_key: &'a str,
    pub span_event_id: &'a str,
    pub time_ns: Option<i64>,
}

/// A model request that finished (`span.model_request_end`).
#[derive(Debug, Clone, Copy)]
pub struct RequestFinished<'a> {
    pub agent: &'a str,
    /// The model its start named, else the session's.
    pub model: &'a str,
    pub is_error: bool,
    /// From its start, when the start was seen.
    pub duration_ns: Option<i64>,
    pub credits: Option<f64>,
    /// `None` outside a turn.
    pub example: Option<Example<'a>>,
}

/// A quantity of a session's billed usage (its cumulative snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageQuantity<'a> {
    /// Credits of one kind (`model`, `sandbox_runtime`).
    Credits { kind: &'a str },
    /// Seconds a thread of the session was running.
    ActiveSeconds,
    /// Uses of one server-side tool.
    ServerTool { tool: &'a str },
}

/// Where the tracker's outcomes go. Every method adds: an outcome is told once, when the
/// event that concludes it is counted.
pub trait Tally {
    /// An event was counted (any type).
    fn event(&mut self, type_name: &str, agent: &str);
    /// A turn ended; `stop_reason` as the idle event gave it (`unknown` if it gave none).
    fn turn_ended(&mut self, agent: &str, stop_reason: &str, example: Option<Example<'_>>);
    /// How long a session turn took (a sub-agent's turns run inside one and are not timed).
    fn turn_timed(&mut self, agent: &str, duration_ns: i64, example: Example<'_>);
    /// Tokens a model request (or, when no request reported any, a turn) used.
    fn tokens_used(&mut self, agent: &str, model: &str, tokens: &Tokens);
    /// A `session.error`, with its retry status as the API names it.
    fn session_error(
        &mut self,
        agent: &str,
        error_type: &str,
        retry_status: &str,
        example: Option<Example<'_>>,
    );
    fn request_finished(&mut self, request: RequestFinished<'_>);
    /// A tool was called (`agent.tool_use` and its MCP and custom kinds).
    fn tool_called(&mut self, agent: &str, tool: &str);
    /// A tool call's result came; `duration_ns` from its use, when the use was seen.
    fn tool_finished(&mut self, agent: &str, tool: &str, is_error: bool, duration_ns: Option<i64>);
    /// A sub-agent thread was created.
    fn thread_created(&mut self, agent: &str);
    /// A sub-agent thread went idle.
    fn thread_turn_ended(&mut self, agent: &str, stop_reason: &str);
    /// A usage snapshot raised a quantity by `amount` over the highest value applied before.
    fn usage_increased(&mut self, agent: &str, quantity: UsageQuantity<'_>, amount: f64);
}
