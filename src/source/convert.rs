//! Wire → domain: the one place where the API generations' spellings meet: G1 `usage` and
//! `span_id`, G3 `model_usage` and `model_request_start_id`, bare `terminated` and
//! `session.status_terminated`, `retry_status` at top level or inside `error`. Everything after
//! this module sees one shape ([`crate::event`]). Pure functions, no I/O.

use std::borrow::Cow;
use std::sync::Arc;

use crate::event::{
    Event, EventKind, RetryStatus, ThreadPhase, Tokens, ToolKind, UsageSnapshot, parse_time,
};
use crate::source::wire::{MAX_ID_BYTES, Str, StrOrNum, Typed, WireError, WireEvent, WireUsage};

/// A borrowed wire string the domain keeps: its own copy.
fn owned(s: Option<Str<'_>>) -> Option<String> {
    s.map(Str::into_owned)
}

impl Tokens {
    /// `None` unless at least one token field is present: a usage object with credits only
    /// (Qoder G3) carries no tokens, and that must not hide the turn's idle usage.
    pub fn from_wire(u: &WireUsage) -> Option<Tokens> {
        let any = u.input_tokens.is_some()
            || u.output_tokens.is_some()
            || u.cache_read_input_tokens.is_some()
            || u.cache_creation_input_tokens.is_some();
        any.then(|| Tokens {
            input: non_negative(u.input_tokens),
            output: non_negative(u.output_tokens),
            cache_read: non_negative(u.cache_read_input_tokens),
            cache_creation: non_negative(u.cache_creation_input_tokens),
        })
    }
}

/// Counters only go up: a negative or non-finite number from the wire counts as zero.
fn non_negative(v: Option<f64>) -> f64 {
    v.filter(|x| x.is_finite() && *x > 0.0).unwrap_or(0.0)
}

impl UsageSnapshot {
    /// Reads the snapshot fields from an event's top level and its `usage` (top level wins).
    /// `None` when neither carries any. A snapshot with `total_credits` only (the object of
    /// older deployments, which billed model credits alone) counts it as model credits.
    pub fn from_wire(top: &WireUsage, usage: Option<&WireUsage>) -> Option<UsageSnapshot> {
        let pick = |f: fn(&WireUsage) -> Option<f64>| f(top).or_else(|| usage.and_then(f));
        let model = pick(|u| u.model_credits);
        let sandbox = pick(|u| u.sandbox_runtime_credits);
        let total = pick(|u| u.total_credits);
        let active_seconds = pick(|u| u.active_seconds);
        let server_tools: Vec<(String, f64)> = top
            .server_tool_use
            .as_ref()
            .or_else(|| usage.and_then(|u| u.server_tool_use.as_ref()))
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.strip_suffix("_requests").unwrap_or(k).to_owned(), *v))
                    .collect()
            })
            .unwrap_or_default();
        let model_credits = model.or(if sandbox.is_none() { total } else { None });
        let any = model_credits.is_some()
            || sandbox.is_some()
            || active_seconds.is_some()
            || !server_tools.is_empty();
        any.then_some(UsageSnapshot {
            model_credits,
            sandbox_runtime_credits: sandbox,
            active_seconds,
            server_tools,
        })
    }
}

/// The turn id of the event converted last: the events read after it (a page, a replay
/// chunk) share one copy of it while it stays the same.
#[derive(Debug, Default)]
pub struct TurnIds(Option<Arc<str>>);

impl TurnIds {
    fn get(&mut self, id: &str) -> Arc<str> {
        match &self.0 {
            Some(last) if **last == *id => last.clone(),
            _ => {
                let id: Arc<str> = Arc::from(id);
                self.0 = Some(id.clone());
                id
            }
        }
    }
}

impl Event {
    /// Converts a decoded wire event. The caller has checked that `id` and `type` exist.
    pub fn from_wire(mut w: WireEvent<'_>) -> Event {
        Event::from_wire_with(&mut w, &mut TurnIds::default())
    }

    /// [`Event::from_wire`] for one of a sequence of events: its turn id is shared with the
    /// event before it when they have the same.
    /// The fields it keeps are taken out of `w` (converting by reference spares copying the
    /// large wire struct: those copies were a tenth of `replay`'s decoding).
    pub fn from_wire_with(w: &mut WireEvent<'_>, turns: &mut TurnIds) -> Event {
        let time_ns =
            parse_time(w.processed_at.as_deref()).or_else(|| parse_time(w.created_at.as_deref()));
        let id = w.id.take().map(Str::into_owned).unwrap_or_default();
        let type_name = w.kind.take().map_or(Cow::Borrowed(""), interned);
        let turn_id = w
            .turn_id
            .take()
            .filter(|t| !t.is_empty() && t.len() <= MAX_ID_BYTES)
            .map(|t| turns.get(&t));
        let thread_id = w
            .session_thread_id
            .as_deref()
            .filter(|t| !t.is_empty() && t.len() <= MAX_ID_BYTES)
            .map(str::to_owned);
        // Message or thinking text; a tool use's input when inputs are kept (both are exported
        // only on opt-in).
        let text = w
            .content
            .0
            .take()
            .or_else(|| w.thinking.0.take())
            .or_else(|| w.input.0.take());
        let kind = kind_of(&type_name, &id, w);
        Event {
            id,
            type_name,
            turn_id,
            thread_id,
            time_ns,
            kind,
            text,
        }
    }
}

/// The types every API generation writes, as static strings.
const KNOWN_TYPES: &[&str] = &[
    "user.message",
    "agent.message",
    "agent.thinking",
    "agent.tool_use",
    "agent.tool_result",
    "agent.mcp_tool_use",
    "agent.mcp_tool_result",
    "agent.custom_tool_use",
    "user.custom_tool_result",
    "span.model_request_start",
    "span.model_request_end",
    "session.status_running",
    "session.status_rescheduled",
    "session.status_idle",
    "session.status_terminated",
    "session.error",
    "session.usage",
    "session.updated",
    "session.deleted",
    "session.thread_created",
    "session.thread_status_running",
    "session.thread_status_rescheduled",
    "session.thread_status_idle",
    "session.thread_status_terminated",
    "terminated",
];

/// An event type as the domain keeps it: a known one without an allocation of its own.
fn interned(t: Str<'_>) -> Cow<'static, str> {
    match KNOWN_TYPES.iter().find(|k| **k == t.as_str()) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(t.into_owned()),
    }
}

fn kind_of(type_name: &str, id: &str, w: &mut WireEvent<'_>) -> EventKind {
    match type_name {
        "user.message" => EventKind::UserMessage,
        "session.status_running" | "session.status_rescheduled" => EventKind::TurnRunning,
        "session.status_idle" => {
            let snapshot = w
                .usage
                .as_ref()
                .filter(|u| u.is_snapshot())
                .and_then(|u| UsageSnapshot::from_wire(u, None))
                .map(Box::new);
            EventKind::Idle {
                stop_reason: w
                    .stop_reason
                    .take()
                    .and_then(Typed::kind)
                    .filter(|s| !s.is_empty()),
                // A snapshot's tokens are the session's so far, not the turn's.
                tokens: match snapshot {
                    Some(_) => None,
                    None => w.usage.as_deref().and_then(Tokens::from_wire),
                },
                snapshot,
            }
        }
        "session.usage" => {
            let top = WireUsage {
                model_credits: w.model_credits,
                sandbox_runtime_credits: w.sandbox_runtime_credits,
                total_credits: w.total_credits,
                ..WireUsage::default()
            };
            match UsageSnapshot::from_wire(&top, w.usage.as_deref()) {
                Some(s) => EventKind::Usage(Box::new(s)),
                None => EventKind::Other,
            }
        }
        "session.updated" => match w.budget.as_ref().and_then(|b| b.credits()) {
            Some(b) => EventKind::BudgetUpdated(b),
            None => EventKind::Other,
        },
        // A thread without an id (or one no API makes) names nothing that can be read.
        "session.thread_created" => match w
            .session_thread_id
            .take()
            .filter(|t| !t.is_empty() && t.len() <= MAX_ID_BYTES)
        {
            Some(thread) => EventKind::ThreadCreated {
                thread: thread.into_owned(),
                agent: owned(w.agent_name.take().filter(|a| !a.is_empty())),
            },
            None => EventKind::Other,
        },
        "session.thread_status_running"
        | "session.thread_status_rescheduled"
        | "session.thread_status_idle"
        | "session.thread_status_terminated" => {
            let phase = match type_name {
                "session.thread_status_idle" => ThreadPhase::Idle {
                    stop_reason: w
                        .stop_reason
                        .take()
                        .and_then(Typed::kind)
                        .filter(|s| !s.is_empty()),
                },
                "session.thread_status_terminated" => ThreadPhase::Terminated,
                _ => ThreadPhase::Running,
            };
            match w.session_thread_id.take() {
                Some(thread) => EventKind::ThreadStatus {
                    thread: thread.into_owned(),
                    agent: owned(w.agent_name.take().filter(|a| !a.is_empty())),
                    phase,
                },
                None => EventKind::Other,
            }
        }
        "terminated" | "session.status_terminated" | "session.deleted" => EventKind::Terminated {
            reason: w.reason.take().map(|r| r.into_string()),
        },
        "session.error" => error_kind(w),
        "span.model_request_start" => EventKind::ModelRequestStart {
            model: w
                .model
                .take()
                .and_then(|m| m.name())
                .filter(|m| !m.is_empty()),
            span_id: owned(w.span_id.take()),
        },
        "span.model_request_end" => {
            // G3 and Anthropic write `model_usage`; G1 wrote `usage`. Either may carry tokens,
            // credits or both.
            let usage = w
                .model_usage
                .take()
                .or(w.usage.take())
                .map(|u| *u)
                .unwrap_or_default();
            EventKind::ModelRequestEnd {
                start_id: owned(w.model_request_start_id.take()),
                span_id: owned(w.span_id.take()),
                is_error: w.is_error.unwrap_or(false),
                tokens: Tokens::from_wire(&usage),
                credits: usage.credits.filter(|c| c.is_finite() && *c > 0.0),
            }
        }
        "agent.tool_use" | "agent.mcp_tool_use" | "agent.custom_tool_use" => {
            let kind = match type_name {
                "agent.mcp_tool_use" => ToolKind::Mcp,
                "agent.custom_tool_use" => ToolKind::Custom,
                _ => ToolKind::Builtin,
            };
            // G2 documents a `tool_use_id` of its own on the use; G3 results point at the id.
            let use_id = w
                .tool_use_id
                .take()
                .map_or_else(|| id.to_owned(), Str::into_owned);
            EventKind::ToolUse {
                kind,
                use_id,
                name: w
                    .name
                    .take()
                    .or(w.tool_name.take())
                    .filter(|n| !n.is_empty())
                    .map_or_else(|| "unknown".to_owned(), Str::into_owned),
                server: owned(w.mcp_server_name.take()),
            }
        }
        "agent.tool_result" => {
            tool_result(ToolKind::Builtin, owned(w.tool_use_id.take()), w.is_error)
        }
        "agent.mcp_tool_result" => tool_result(
            ToolKind::Mcp,
            owned(w.mcp_tool_use_id.take().or(w.tool_use_id.take())),
            w.is_error,
        ),
        "user.custom_tool_result" => tool_result(
            ToolKind::Custom,
            owned(w.custom_tool_use_id.take().or(w.tool_use_id.take())),
            w.is_error,
        ),
        "agent.message" | "agent.thinking" => EventKind::AgentOutput,
        _ => EventKind::Other,
    }
}

fn tool_result(kind: ToolKind, use_id: Option<String>, is_error: Option<bool>) -> EventKind {
    EventKind::ToolResult {
        kind,
        use_id,
        is_error: is_error.unwrap_or(false),
    }
}

fn error_kind(w: &mut WireEvent<'_>) -> EventKind {
    let top_retry = w.retry_status.take().and_then(|t| t.kind());
    let code = w.code.take().map(|c| c.into_string());
    let (error_type, nested_retry, message, qoder_code) = match w.error.take().map(|e| *e) {
        Some(WireError::Obj {
            kind,
            message,
            retry_status,
            qoder_error_code,
        }) => (
            kind,
            retry_status.and_then(Typed::kind),
            message,
            qoder_error_code.map(StrOrNum::into_string),
        ),
        // G1 `{error: "<message>", code: "<code>"}`: the code is the type.
        Some(WireError::Str(message)) => (None, None, Some(message), None),
        None => (None, None, None, None),
    };
    let error_type = error_type
        .or(code)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    EventKind::Error {
        error_type,
        retry_status: RetryStatus::parse(top_retry.or(nested_retry).as_deref()),
        message,
        code: qoder_code.filter(|c| !c.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::wire::decode_event;

    fn ev(raw: &str) -> Event {
        Event::from_wire(decode_event(raw).expect("valid").event)
    }

    #[test]
    fn processed_at_wins_over_created_at() {
        let e = ev(
            r#"{"id":"a","type":"x","created_at":"2026-01-01T00:00:00Z","processed_at":"2026-01-01T00:00:01Z"}"#,
        );
        let c =
            ev(r#"{"id":"a","type":"x","created_at":"2026-01-01T00:00:00Z","processed_at":null}"#);
        assert_eq!(
            e.time_ns.map(|t| t - c.time_ns.unwrap_or(0)),
            Some(1_000_000_000)
        );
    }

    #[test]
    fn idle_with_seed_usage() {
        let e = ev(
            r#"{"id":"a","type":"session.status_idle","status":"idle","usage":{"input_tokens":150,
            "output_tokens":42,"cache_read_input_tokens":0,"cache_creation_input_tokens":0},"stop_reason":{"type":"end_turn"}}"#,
        );
        assert_eq!(
            e.kind,
            EventKind::Idle {
                stop_reason: Some("end_turn".into()),
                tokens: Some(Tokens {
                    input: 150.0,
                    output: 42.0,
                    cache_read: 0.0,
                    cache_creation: 0.0
                }),
                snapshot: None,
            }
        );
    }

    #[test]
    fn seed_error_with_top_level_retry_status() {
        let e = ev(
            r#"{"id":"a","type":"session.error","error":{"message":"m","type":"unknown_error"},
            "details":{"message":"m","name":"TimeoutError"},"retry_status":{"type":"exhausted"}}"#,
        );
        assert_eq!(
            e.kind,
            EventKind::Error {
                error_type: "unknown_error".into(),
                retry_status: RetryStatus::Exhausted,
                message: Some("m".into()),
                code: None,
            }
        );
    }

    #[test]
    fn g1_error_code_is_the_type() {
        let e =
            ev(r#"{"id":"a","type":"session.error","error":"model timed out","code":"timeout"}"#);
        assert_eq!(
            e.kind,
            EventKind::Error {
                error_type: "timeout".into(),
                retry_status: RetryStatus::None,
                message: Some("model timed out".into()),
                code: None,
            }
        );
    }

    #[test]
    fn model_request_end_in_three_generations() {
        let g1 = ev(
            r#"{"id":"a","type":"span.model_request_end","span_id":"s1","usage":{"input_tokens":5,"output_tokens":2}}"#,
        );
        let g3 = ev(
            r#"{"id":"b","type":"span.model_request_end","model_request_start_id":"x","is_error":true,"model_usage":{"credits":0.25}}"#,
        );
        let anthropic = ev(
            r#"{"id":"c","type":"span.model_request_end","model_usage":{"input_tokens":1,"output_tokens":1,"cache_read_input_tokens":7,"cache_creation_input_tokens":3}}"#,
        );
        let EventKind::ModelRequestEnd {
            span_id,
            tokens,
            credits,
            ..
        } = g1.kind
        else {
            panic!()
        };
        assert_eq!(span_id.as_deref(), Some("s1"));
        assert_eq!(tokens.map(|t| t.input + t.output), Some(7.0));
        assert_eq!(credits, None);
        let EventKind::ModelRequestEnd {
            start_id,
            is_error,
            tokens,
            credits,
            ..
        } = g3.kind
        else {
            panic!()
        };
        assert_eq!(
            (start_id.as_deref(), is_error, tokens, credits),
            (Some("x"), true, None, Some(0.25))
        );
        let EventKind::ModelRequestEnd { tokens, .. } = anthropic.kind else {
            panic!()
        };
        assert_eq!(
            tokens.map(|t| (t.cache_read, t.cache_creation)),
            Some((7.0, 3.0))
        );
    }

    #[test]
    fn tool_events_pair_by_their_generation_ids() {
        let g3 = ev(r#"{"id":"evt_9","type":"agent.tool_use","name":"Bash","input":{}}"#);
        assert!(
            matches!(g3.kind, EventKind::ToolUse { ref use_id, ref name, .. } if use_id == "evt_9" && name == "Bash")
        );
        let g2 =
            ev(r#"{"id":"evt_9","type":"agent.tool_use","tool_name":"Read","tool_use_id":"tu_1"}"#);
        assert!(
            matches!(g2.kind, EventKind::ToolUse { ref use_id, ref name, .. } if use_id == "tu_1" && name == "Read")
        );
        let mcp = ev(
            r#"{"id":"r","type":"agent.mcp_tool_result","mcp_tool_use_id":"m1","is_error":true}"#,
        );
        assert_eq!(
            mcp.kind,
            EventKind::ToolResult {
                kind: ToolKind::Mcp,
                use_id: Some("m1".into()),
                is_error: true
            }
        );
    }

    #[test]
    fn terminations_and_unknowns() {
        assert!(matches!(
            ev(r#"{"id":"a","type":"terminated","reason":"timeout"}"#).kind,
            EventKind::Terminated { .. }
        ));
        assert!(matches!(
            ev(r#"{"id":"a","type":"session.status_terminated"}"#).kind,
            EventKind::Terminated { .. }
        ));
        assert_eq!(
            ev(r#"{"id":"a","type":"agent.artifact_delivered"}"#).kind,
            EventKind::Other
        );
        assert_eq!(
            ev(r#"{"id":"a","type":"brand.new_type"}"#).type_name,
            "brand.new_type"
        );
    }

    #[test]
    fn negative_or_nonsense_numbers_count_as_zero() {
        let e = ev(
            r#"{"id":"a","type":"session.status_idle","usage":{"input_tokens":-5,"output_tokens":3}}"#,
        );
        let EventKind::Idle { tokens, .. } = e.kind else {
            panic!()
        };
        assert_eq!(tokens.map(|t| (t.input, t.output)), Some((0.0, 3.0)));
    }
}
