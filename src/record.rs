//! An event as the log outbox keeps it: what its OTLP log record needs, taken when the event
//! was counted and written in the transaction of the batch that counted it (so a record goes
//! out at most once per event, like its counts). Plain data; it imports only the event model.

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, RetryStatus, Tokens};

/// The turn an event belongs to: the trace it is in and the span it hangs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TurnRef {
    /// The key of the session turn whose trace it is in (a sub-agent's turn is in the trace of
    /// the session turn it ran in).
    pub trace_key: String,
    /// The first event of the turn whose root span it hangs under.
    pub span_event_id: String,
}

/// How bad an event is, as OTLP log severity numbers have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warn,
    Error,
}

/// One counted event, ready to become a log record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventRecord {
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    pub event_id: String,
    pub type_name: String,
    pub time_ns: Option<i64>,
    pub agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Tokens>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<TurnRef>,
    /// Message or thinking text, only with `--otlp.logs.include-content` (already cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Who an event was counted under, and the turn it belongs to (from the tracker).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordContext {
    pub agent: String,
    pub model: Option<String>,
    pub turn: Option<TurnRef>,
}

impl EventRecord {
    /// The record of `ev`, read on `thread`'s stream (`None`: the session's), with message
    /// text cut to `content_max` bytes when content is on.
    pub fn of(
        session_id: &str,
        thread: Option<&str>,
        ev: &Event,
        cx: RecordContext,
        content_max: Option<usize>,
    ) -> EventRecord {
        let mut r = EventRecord {
            session_id: session_id.to_owned(),
            thread_id: thread.map(str::to_owned).or_else(|| ev.thread_id.clone()),
            event_id: ev.id.clone(),
            type_name: ev.type_name.to_string(),
            time_ns: ev.time_ns,
            agent: cx.agent,
            model: cx.model,
            turn: cx.turn,
            content: content_max.and_then(|max| {
                ev.text
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .map(|t| crate::event::truncate(t, max).to_owned())
            }),
            ..EventRecord::default()
        };
        match &ev.kind {
            EventKind::Idle {
                stop_reason,
                tokens,
                ..
            } => {
                r.stop_reason.clone_from(stop_reason);
                r.tokens = *tokens;
            }
            EventKind::Error {
                error_type,
                retry_status,
                ..
            } => {
                r.error_type = Some(error_type.clone());
                r.retry_status = Some(retry_status.as_label().to_owned());
            }
            EventKind::ModelRequestStart {
                model: Some(model), ..
            } => r.model = Some(model.clone()),
            EventKind::ModelRequestEnd {
                is_error,
                tokens,
                credits,
                ..
            } => {
                r.is_error = Some(*is_error);
                r.tokens = *tokens;
                r.credits = *credits;
            }
            EventKind::ToolUse { name, .. } => r.tool = Some(name.clone()),
            EventKind::ToolResult { is_error, .. } => r.is_error = Some(*is_error),
            EventKind::Terminated { reason } => r.stop_reason.clone_from(reason),
            _ => {}
        }
        r
    }

    /// Errors are ERROR, except a `session.error` the server retries (WARN); a failed model
    /// request or tool call is WARN (the agent goes on); everything else INFO.
    pub fn severity(&self) -> Severity {
        if let Some(retry) = &self.retry_status {
            return if retry == RetryStatus::Retrying.as_label() {
                Severity::Warn
            } else {
                Severity::Error
            };
        }
        if self.is_error == Some(true) {
            return Severity::Warn;
        }
        Severity::Info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, type_name: &str) -> Event {
        Event {
            id: "evt_1".into(),
            type_name: type_name.to_owned().into(),
            turn_id: None,
            thread_id: None,
            time_ns: Some(5),
            kind,
            text: Some("secret text".into()),
        }
    }

    #[test]
    fn errors_and_retries_have_their_severity_and_content_needs_the_opt_in() {
        let err = |retry| {
            EventRecord::of(
                "s",
                None,
                &event(
                    EventKind::Error {
                        error_type: "model_error".into(),
                        retry_status: retry,
                        message: None,
                        code: None,
                    },
                    "session.error",
                ),
                RecordContext::default(),
                None,
            )
        };
        assert_eq!(err(RetryStatus::Exhausted).severity(), Severity::Error);
        assert_eq!(err(RetryStatus::None).severity(), Severity::Error);
        assert_eq!(err(RetryStatus::Retrying).severity(), Severity::Warn);
        assert_eq!(err(RetryStatus::Exhausted).content, None, "no opt-in");
        let msg = EventRecord::of(
            "s",
            Some("th"),
            &event(EventKind::AgentOutput, "agent.message"),
            RecordContext::default(),
            Some(6),
        );
        assert_eq!(msg.severity(), Severity::Info);
        assert_eq!(msg.content.as_deref(), Some("secret"));
        assert_eq!(msg.thread_id.as_deref(), Some("th"));
        let tool = EventRecord::of(
            "s",
            None,
            &event(
                EventKind::ToolResult {
                    kind: crate::event::ToolKind::Builtin,
                    use_id: None,
                    is_error: true,
                },
                "agent.tool_result",
            ),
            RecordContext::default(),
            None,
        );
        assert_eq!(tool.severity(), Severity::Warn);
    }

    #[test]
    fn a_record_reads_back_from_its_stored_form() {
        let r = EventRecord::of(
            "s",
            None,
            &event(
                EventKind::ModelRequestEnd {
                    start_id: None,
                    span_id: None,
                    is_error: false,
                    tokens: Some(Tokens {
                        input: 3.0,
                        ..Tokens::default()
                    }),
                    credits: Some(0.25),
                },
                "span.model_request_end",
            ),
            RecordContext {
                agent: "coder".into(),
                model: Some("qwen".into()),
                turn: Some(TurnRef {
                    trace_key: "t1".into(),
                    span_event_id: "e0".into(),
                }),
            },
            None,
        );
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<EventRecord>(&text).expect("back"), r);
        // A row from an older or newer version with fields missing or added still reads.
        let old: EventRecord =
            serde_json::from_str(r#"{"session_id":"s","event_id":"e","later":1}"#).expect("old");
        assert_eq!(old.event_id, "e");
    }
}
