//! Spans from closed turns: one trace per turn, built from the event log alone.
//!
//! Everything here is a pure function of a [`ClosedTurn`]: names, ids, times, attributes and
//! status come from the events, never from the clock, so a replay, a restart or a second
//! exporter reading the same log produces byte-for-byte the same spans, and a backend folds
//! the duplicates a crash between "exported" and "removed from the outbox" can cause.
//!
//! The trace of a turn:
//!
//! ```text
//! invoke_agent {agent}   CLIENT   first event of the turn → the event that ends it
//! ├── chat {model}       CLIENT   span.model_request_start → span.model_request_end
//! └── execute_tool {t}   INTERNAL agent.tool_use → its result
//! ```
//!
//! Ids: the trace id is the first 16 bytes of SHA-256 over the session id and the turn key;
//! a span id is the first 8 bytes of SHA-256 over the session id, the span's operation and
//! the id of the event that opened it. Attribute names are the OpenTelemetry GenAI semantic
//! conventions (core v1.41.0); each span also carries the values the metrics use as labels
//! (`gen_ai.agent.name` = `agent`, `gen_ai.request.model` = `model`, `error.type`,
//! `qoder.stop_reason`, `gen_ai.tool.name` = `tool`), so a panel can link to its traces.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event as SpanEventData, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use sha2::{Digest, Sha256};

use crate::event::{Tokens, ToolKind};
use crate::turn::{ChildDetail, ChildSpan, ClosedTurn, Message, TurnEnd};

/// The semantic-conventions version whose names the spans use (GenAI: core v1.41.0).
pub(crate) const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.41.0";

/// Attribute names, as OpenTelemetry semantic conventions v1.41.0 spell them. (The
/// `opentelemetry-semantic-conventions` crate has deprecated its GenAI names since they moved
/// to their own repository; the contract pins these.)
pub(crate) mod semconv {
    pub(crate) const ERROR_TYPE: &str = "error.type";
    pub(crate) const EXCEPTION_MESSAGE: &str = "exception.message";
    pub(crate) const QODER_RETRY_STATUS: &str = "qoder.retry_status";
    pub(crate) const QODER_ERROR_CODE: &str = "qoder.error.code";
    pub(crate) const SESSION_ID: &str = "session.id";
    pub(crate) const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
    pub(crate) const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
    pub(crate) const GEN_AI_AGENT_ID: &str = "gen_ai.agent.id";
    pub(crate) const GEN_AI_AGENT_NAME: &str = "gen_ai.agent.name";
    pub(crate) const GEN_AI_CONVERSATION_ID: &str = "gen_ai.conversation.id";
    pub(crate) const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
    pub(crate) const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub(crate) const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
    pub(crate) const SERVER_ADDRESS: &str = "server.address";
    pub(crate) const SERVER_PORT: &str = "server.port";
    pub(crate) const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub(crate) const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub(crate) const GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: &str =
        "gen_ai.usage.cache_read.input_tokens";
    pub(crate) const GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: &str =
        "gen_ai.usage.cache_creation.input_tokens";
    pub(crate) const GEN_AI_TOOL_NAME: &str = "gen_ai.tool.name";
    pub(crate) const GEN_AI_TOOL_CALL_ID: &str = "gen_ai.tool.call.id";
    pub(crate) const GEN_AI_INPUT_MESSAGES: &str = "gen_ai.input.messages";
    pub(crate) const GEN_AI_OUTPUT_MESSAGES: &str = "gen_ai.output.messages";
}
/// `gen_ai.provider.name` of every span.
pub(crate) const PROVIDER: &str = "qoder";

/// What every span of a run shares: the instrumentation scope, and the Qoder API server the
/// model requests went through (`server.address`, `server.port` on chat spans).
#[derive(Debug, Clone)]
pub(crate) struct SpanShape {
    pub scope: InstrumentationScope,
    pub server: Option<(String, u16)>,
}

impl SpanShape {
    /// For spans of sessions read from `api_url` (`None`: the server is not known).
    pub fn new(api_url: Option<&str>) -> SpanShape {
        let server = api_url
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| Some((u.host_str()?.to_owned(), u.port_or_known_default()?)));
        SpanShape {
            scope: scope(),
            server,
        }
    }
}

/// The instrumentation scope every span is reported under.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("qoder-exporter")
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_schema_url(SCHEMA_URL)
        .build()
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// The trace id of a turn: stable for the same session and turn key.
pub fn trace_id(session_id: &str, turn_key: &str) -> TraceId {
    let d = digest(&["trace", session_id, turn_key]);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    if b == [0; 16] {
        b[15] = 1; // the all-zero id is invalid
    }
    TraceId::from_bytes(b)
}

/// The span id of the span `operation` opened by event `event_id` of a session.
pub fn span_id(session_id: &str, operation: &str, event_id: &str) -> SpanId {
    let d = digest(&["span", session_id, operation, event_id]);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    if b == [0; 8] {
        b[7] = 1;
    }
    SpanId::from_bytes(b)
}

fn at(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "token counts are whole numbers far below 2^53; the f64 only carries them"
)]
fn int(v: f64) -> i64 {
    v.round() as i64
}

/// Credits as the API states them: sums of 2-decimal values carry float noise
/// (3.1300000000000003); six decimals, the precision the counters keep, removes it.
fn api_precision(credits: f64) -> f64 {
    (credits * 1e6).round() / 1e6
}

fn token_attributes(attrs: &mut Vec<KeyValue>, t: &Tokens) {
    // The GenAI rule for Anthropic-style usage: input tokens include the cached ones.
    attrs.push(KeyValue::new(
        semconv::GEN_AI_USAGE_INPUT_TOKENS,
        int(t.input + t.cache_read + t.cache_creation),
    ));
    attrs.push(KeyValue::new(
        semconv::GEN_AI_USAGE_OUTPUT_TOKENS,
        int(t.output),
    ));
    attrs.push(KeyValue::new(
        semconv::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        int(t.cache_read),
    ));
    attrs.push(KeyValue::new(
        semconv::GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
        int(t.cache_creation),
    ));
}

/// Attributes every span of a turn carries: where it belongs and the `agent` label value.
fn common(t: &ClosedTurn) -> Vec<KeyValue> {
    vec![
        KeyValue::new(semconv::GEN_AI_PROVIDER_NAME, PROVIDER),
        KeyValue::new(semconv::GEN_AI_AGENT_NAME, t.agent.clone()),
        KeyValue::new(semconv::GEN_AI_CONVERSATION_ID, t.session_id.clone()),
        KeyValue::new(semconv::SESSION_ID, t.session_id.clone()),
        KeyValue::new("qoder.turn.id", t.turn.key.clone()),
    ]
}

/// GenAI message JSON (`gen_ai.input.messages` / `gen_ai.output.messages`), one entry per
/// captured message.
fn messages_json(messages: &[Message], role: &str) -> Option<String> {
    let list: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| m.role == role)
        .map(|m| {
            serde_json::json!({
                "role": m.role,
                "parts": [{"type": m.part, "content": m.content}],
            })
        })
        .collect();
    (!list.is_empty()).then(|| serde_json::Value::Array(list).to_string())
}

/// Builds a turn's spans, root first. `None` when no event of the turn carried a time: a span
/// needs times, and they never come from the clock.
pub(crate) fn turn_spans(t: &ClosedTurn, shape: &SpanShape) -> Option<Vec<SpanData>> {
    let scope = &shape.scope;
    let turn = &t.turn;
    let child_start = turn.children.iter().filter_map(|c| c.start_ns).min();
    let start = turn.start_ns.or(child_start).or(t.end_ns)?;
    let end = t.end_ns.or(turn.last_ns).unwrap_or(start).max(start);
    // A sub-agent's turn is a subtree of the session turn it ran in: that turn's trace, under
    // that turn's root span.
    let (trace, parent_id) = match &turn.parent {
        Some(p) => (
            trace_id(&t.session_id, &p.key),
            span_id(&t.session_id, "invoke_agent", &p.first_event_id),
        ),
        None => (trace_id(&t.session_id, &turn.key), SpanId::INVALID),
    };
    let root_id = span_id(&t.session_id, "invoke_agent", &turn.first_event_id);

    let mut attrs = common(t);
    attrs.push(KeyValue::new(
        semconv::GEN_AI_OPERATION_NAME,
        "invoke_agent",
    ));
    if let Some(id) = &t.agent_id {
        attrs.push(KeyValue::new(semconv::GEN_AI_AGENT_ID, id.clone()));
    }
    attrs.push(KeyValue::new(
        semconv::GEN_AI_REQUEST_MODEL,
        t.model.clone(),
    ));
    // No false zeros: token and credit sums only where an event of the turn reported them.
    if turn.tokens_reported {
        token_attributes(&mut attrs, &turn.tokens);
    }
    if turn.credits_reported {
        attrs.push(KeyValue::new("qoder.credits", api_precision(turn.credits)));
    }
    let end_kind = match &t.end {
        TurnEnd::Idle { stop_reason } => {
            attrs.push(KeyValue::new("qoder.stop_reason", stop_reason.clone()));
            attrs.push(KeyValue::new(
                semconv::GEN_AI_RESPONSE_FINISH_REASONS,
                Value::Array(Array::String(vec![stop_reason.clone().into()])),
            ));
            "idle"
        }
        TurnEnd::Failed { .. } => "failed",
        TurnEnd::Terminated => "terminated",
        TurnEnd::Superseded => "superseded",
        TurnEnd::Stale => "stale",
    };
    attrs.push(KeyValue::new("qoder.turn.end", end_kind));
    // A turn hit by an exhausted or terminal error failed, whether the session then idled
    // (stop reason `retries_exhausted`) or went on to the next turn.
    let failed = match &t.end {
        TurnEnd::Failed { error_type } => Some(error_type),
        _ => turn.failed.as_ref().map(|(e, _)| e),
    };
    let status = match failed {
        Some(error_type) => {
            attrs.push(KeyValue::new(semconv::ERROR_TYPE, error_type.clone()));
            // Diagnostic only (SDK 0.11): an attribute, never a label.
            if let Some(code) = &turn.error_code {
                attrs.push(KeyValue::new(semconv::QODER_ERROR_CODE, code.clone()));
            }
            Status::error(format!("the turn ended with a {error_type} error"))
        }
        None => Status::Unset,
    };
    if turn.children_dropped > 0 {
        attrs.push(KeyValue::new(
            "qoder.children_dropped",
            i64::from(turn.children_dropped),
        ));
    }
    if let Some(j) = messages_json(&turn.messages, "user") {
        attrs.push(KeyValue::new(semconv::GEN_AI_INPUT_MESSAGES, j));
    }
    if let Some(j) = messages_json(&turn.messages, "assistant") {
        attrs.push(KeyValue::new(semconv::GEN_AI_OUTPUT_MESSAGES, j));
    }
    let when = |t: Option<i64>| at(t.unwrap_or(start).clamp(start, end));
    let errors = turn.errors.iter().map(|e| {
        let mut attributes = vec![
            KeyValue::new(semconv::ERROR_TYPE, e.error_type.clone()),
            KeyValue::new(semconv::QODER_RETRY_STATUS, e.retry_status.clone()),
        ];
        if let Some(m) = &e.message {
            attributes.push(KeyValue::new(semconv::EXCEPTION_MESSAGE, m.clone()));
        }
        if let Some(c) = &e.code {
            attributes.push(KeyValue::new(semconv::QODER_ERROR_CODE, c.clone()));
        }
        SpanEventData::new("session.error", when(e.time_ns), attributes, 0)
    });
    // Turns stored by older releases carry their span events ready-made.
    let stored = turn.span_events.iter().map(|e| {
        let attributes = e
            .attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        SpanEventData::new(e.name.clone(), when(e.time_ns), attributes, 0)
    });
    let events = errors.chain(stored).collect();

    let mut spans = Vec::with_capacity(1 + turn.children.len());
    spans.push(span(
        trace,
        root_id,
        parent_id,
        SpanKind::Client,
        format!("invoke_agent {}", t.agent),
        (start, end),
        attrs,
        events,
        status,
        scope,
    ));
    for c in &turn.children {
        spans.push(child_span(t, c, trace, root_id, (start, end), shape));
    }
    Some(spans)
}

fn child_span(
    t: &ClosedTurn,
    c: &ChildSpan,
    trace: TraceId,
    parent: SpanId,
    (turn_start, turn_end): (i64, i64),
    shape: &SpanShape,
) -> SpanData {
    let scope = &shape.scope;
    let start = c.start_ns.or(c.end_ns).unwrap_or(turn_start);
    let end = c.end_ns.unwrap_or(turn_end).max(start);
    let mut attrs = common(t);
    let (operation, name, kind, failure) = match &c.detail {
        ChildDetail::Chat {
            model,
            tokens,
            credits,
        } => {
            attrs.push(KeyValue::new(semconv::GEN_AI_OPERATION_NAME, "chat"));
            attrs.push(KeyValue::new(semconv::GEN_AI_REQUEST_MODEL, model.clone()));
            // The event log names the model a request ran on; there is no separate request.
            if model != "unknown" {
                attrs.push(KeyValue::new(semconv::GEN_AI_RESPONSE_MODEL, model.clone()));
            }
            if let Some((address, port)) = &shape.server {
                attrs.push(KeyValue::new(semconv::SERVER_ADDRESS, address.clone()));
                attrs.push(KeyValue::new(semconv::SERVER_PORT, i64::from(*port)));
            }
            if let Some(tk) = tokens {
                token_attributes(&mut attrs, tk);
            }
            if let Some(cr) = credits {
                attrs.push(KeyValue::new("qoder.credits", api_precision(*cr)));
            }
            (
                "chat",
                format!("chat {model}"),
                SpanKind::Client,
                "the model request failed",
            )
        }
        ChildDetail::Tool {
            name,
            call_id,
            kind,
        } => {
            attrs.push(KeyValue::new(
                semconv::GEN_AI_OPERATION_NAME,
                "execute_tool",
            ));
            attrs.push(KeyValue::new(semconv::GEN_AI_TOOL_NAME, name.clone()));
            attrs.push(KeyValue::new(semconv::GEN_AI_TOOL_CALL_ID, call_id.clone()));
            attrs.push(KeyValue::new(
                "qoder.tool.kind",
                match kind {
                    ToolKind::Builtin => "builtin",
                    ToolKind::Mcp => "mcp",
                    ToolKind::Custom => "custom",
                },
            ));
            (
                "execute_tool",
                format!("execute_tool {name}"),
                SpanKind::Internal,
                "the tool returned an error",
            )
        }
    };
    let status = if c.incomplete {
        attrs.push(KeyValue::new("qoder.incomplete", true));
        attrs.push(KeyValue::new(semconv::ERROR_TYPE, "incomplete"));
        Status::error("incomplete: the turn or session ended before it finished")
    } else if c.is_error {
        attrs.push(KeyValue::new(semconv::ERROR_TYPE, "_OTHER"));
        Status::error(failure)
    } else {
        Status::Unset
    };
    span(
        trace,
        span_id(&t.session_id, operation, &c.id),
        parent,
        kind,
        name,
        (start, end),
        attrs,
        Vec::new(),
        status,
        scope,
    )
}

#[allow(
    clippy::too_many_arguments,
    reason = "a plain constructor of the SDK's struct"
)]
fn span(
    trace: TraceId,
    id: SpanId,
    parent: SpanId,
    kind: SpanKind,
    name: String,
    (start, end): (i64, i64),
    attributes: Vec<KeyValue>,
    events: Vec<SpanEventData>,
    status: Status,
    scope: &InstrumentationScope,
) -> SpanData {
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    SpanData {
        span_context: SpanContext::new(
            trace,
            id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: false,
        span_kind: kind,
        name: Cow::Owned(name),
        start_time: at(start),
        end_time: at(end),
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_server_comes_from_the_api_url() {
        let s = SpanShape::new(Some("https://api.qoder.com/api/v1/cloud"));
        assert_eq!(s.server, Some(("api.qoder.com".to_owned(), 443)));
        let s = SpanShape::new(Some("http://127.0.0.1:8080/api/v1/cloud"));
        assert_eq!(s.server, Some(("127.0.0.1".to_owned(), 8080)));
        assert_eq!(SpanShape::new(Some("not a url")).server, None);
        assert_eq!(SpanShape::new(None).server, None);
    }
    use crate::turn::{SpanEvent, Turn, TurnError};

    fn closed(end: TurnEnd) -> ClosedTurn {
        ClosedTurn {
            session_id: "sess_1".into(),
            agent: "coder".into(),
            agent_id: Some("agt_1".into()),
            model: "qwen3-coder".into(),
            turn: Turn {
                key: "seq-1".into(),
                has_turn_id: false,
                first_event_id: "ev_1".into(),
                start_ns: Some(1_000_000_000),
                last_ns: Some(5_000_000_000),
                tokens_from_requests: true,
                tokens: Tokens {
                    input: 10.0,
                    output: 20.0,
                    cache_read: 100.0,
                    cache_creation: 5.0,
                },
                credits: 0.5,
                tokens_reported: true,
                credits_reported: true,
                last_model: Some("qwen3-coder".into()),
                failed: None,
                children: vec![
                    ChildSpan {
                        id: "ev_2".into(),
                        detail: ChildDetail::Chat {
                            model: "qwen3-coder".into(),
                            tokens: None,
                            credits: Some(0.5),
                        },
                        start_ns: Some(2_000_000_000),
                        end_ns: Some(3_000_000_000),
                        is_error: true,
                        incomplete: false,
                    },
                    ChildSpan {
                        id: "ev_4".into(),
                        detail: ChildDetail::Tool {
                            name: "bash".into(),
                            call_id: "tu_1".into(),
                            kind: ToolKind::Builtin,
                        },
                        start_ns: Some(3_500_000_000),
                        end_ns: None,
                        is_error: false,
                        incomplete: true,
                    },
                ],
                children_dropped: 0,
                errors: vec![TurnError {
                    time_ns: Some(4_000_000_000),
                    error_type: "overloaded".into(),
                    retry_status: "retrying".into(),
                    message: Some("try later".into()),
                    code: None,
                }],
                // As a release before 2026-12-01 stored a turn's error.
                span_events: vec![SpanEvent {
                    name: "session.error".into(),
                    time_ns: Some(4_500_000_000),
                    attributes: vec![("error.type".into(), "stored".into())],
                }],
                messages: Vec::new(),
                parent: None,
                error_code: None,
            },
            end_ns: Some(5_000_000_000),
            end,
        }
    }

    fn attr<'a>(s: &'a SpanData, k: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_turn_is_a_root_with_its_children() {
        let spans = turn_spans(
            &closed(TurnEnd::Idle {
                stop_reason: "end_turn".into(),
            }),
            &SpanShape::new(None),
        )
        .expect("timed");
        assert_eq!(spans.len(), 3);
        let root = &spans[0];
        assert_eq!(root.name, "invoke_agent coder");
        assert_eq!(root.span_kind, SpanKind::Client);
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(
            attr(root, "gen_ai.conversation.id").map(ToString::to_string),
            Some("sess_1".into())
        );
        // input = input + cache_read + cache_creation
        assert_eq!(
            attr(root, "gen_ai.usage.input_tokens"),
            Some(&Value::I64(115))
        );
        assert_eq!(root.status, Status::Unset);
        let events: Vec<(String, Vec<String>)> = root
            .events
            .iter()
            .map(|e| {
                let attrs = e
                    .attributes
                    .iter()
                    .map(|kv| format!("{}={}", kv.key, kv.value));
                (e.name.to_string(), attrs.collect())
            })
            .collect();
        assert_eq!(
            events,
            [
                (
                    "session.error".to_owned(),
                    vec![
                        "error.type=overloaded".to_owned(),
                        "qoder.retry_status=retrying".to_owned(),
                        "exception.message=try later".to_owned()
                    ]
                ),
                (
                    "session.error".to_owned(),
                    vec!["error.type=stored".to_owned()]
                )
            ]
        );
        let chat = &spans[1];
        assert_eq!(chat.name, "chat qwen3-coder");
        assert_eq!(chat.parent_span_id, root.span_context.span_id());
        assert_eq!(chat.span_context.trace_id(), root.span_context.trace_id());
        assert!(matches!(chat.status, Status::Error { .. }));
        let tool = &spans[2];
        assert_eq!(tool.name, "execute_tool bash");
        assert_eq!(tool.span_kind, SpanKind::Internal);
        assert!(matches!(tool.status, Status::Error { .. }));
        assert_eq!(attr(tool, "qoder.incomplete"), Some(&Value::Bool(true)));
        // An open tool ends with the turn.
        assert_eq!(tool.end_time, at(5_000_000_000));
        for s in &spans {
            assert!(s.end_time >= s.start_time);
            assert_eq!(
                attr(s, "gen_ai.agent.name").map(ToString::to_string),
                Some("coder".into())
            );
        }
    }

    #[test]
    fn an_exhausted_turn_that_idles_is_still_an_error() {
        let mut t = closed(TurnEnd::Idle {
            stop_reason: "retries_exhausted".into(),
        });
        t.turn.failed = Some(("model_overloaded_error".into(), Some(4_000_000_000)));
        let spans = turn_spans(&t, &SpanShape::new(None)).expect("timed");
        assert!(matches!(spans[0].status, Status::Error { .. }));
        assert_eq!(
            attr(&spans[0], "error.type").map(ToString::to_string),
            Some("model_overloaded_error".into())
        );
        assert_eq!(
            attr(&spans[0], "qoder.stop_reason").map(ToString::to_string),
            Some("retries_exhausted".into())
        );
    }

    #[test]
    fn a_failed_turn_is_an_error_with_its_type() {
        let spans = turn_spans(
            &closed(TurnEnd::Failed {
                error_type: "overloaded".into(),
            }),
            &SpanShape::new(None),
        )
        .expect("timed");
        assert!(matches!(spans[0].status, Status::Error { .. }));
        assert_eq!(
            attr(&spans[0], "error.type").map(ToString::to_string),
            Some("overloaded".into())
        );
        assert_eq!(attr(&spans[0], "qoder.error.code"), None, "none reported");
        let mut t = closed(TurnEnd::Failed {
            error_type: "overloaded".into(),
        });
        t.turn.error_code = Some("QCA-5291".into());
        let spans = turn_spans(&t, &SpanShape::new(None)).expect("timed");
        assert_eq!(
            attr(&spans[0], "qoder.error.code").map(ToString::to_string),
            Some("QCA-5291".into())
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(trace_id("s", "t"), trace_id("s", "t"));
        assert_ne!(trace_id("s", "t1"), trace_id("s", "t"));
        assert_ne!(trace_id("ab", "c"), trace_id("a", "bc"));
        assert_ne!(span_id("s", "chat", "e"), span_id("s", "invoke_agent", "e"));
        // Pinned (computed independently, with Python's hashlib): a change here breaks
        // deduplication against spans already exported.
        assert_eq!(
            trace_id("sess_1", "seq-1").to_string(),
            "23a105af96c0aa01bb66b283acd8499d"
        );
        assert_eq!(
            span_id("sess_1", "invoke_agent", "ev_1").to_string(),
            "df1660610004912f"
        );
        let a = turn_spans(&closed(TurnEnd::Terminated), &SpanShape::new(None)).expect("timed");
        let b = turn_spans(&closed(TurnEnd::Terminated), &SpanShape::new(None)).expect("timed");
        let ids = |v: &[SpanData]| {
            v.iter()
                .map(|s| (s.span_context.trace_id(), s.span_context.span_id()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
    }

    #[test]
    fn an_untimed_turn_has_no_spans() {
        let mut t = closed(TurnEnd::Terminated);
        t.turn.start_ns = None;
        t.end_ns = None;
        for c in &mut t.turn.children {
            c.start_ns = None;
        }
        assert!(turn_spans(&t, &SpanShape::new(None)).is_none());
    }

    #[test]
    fn content_is_exported_only_when_captured() {
        let t = closed(TurnEnd::Terminated);
        let spans = turn_spans(&t, &SpanShape::new(None)).expect("timed");
        assert!(attr(&spans[0], "gen_ai.input.messages").is_none());
        let mut t = t;
        t.turn.messages.push(Message {
            role: "user".into(),
            part: "text".into(),
            content: "fix the bug".into(),
        });
        let spans = turn_spans(&t, &SpanShape::new(None)).expect("timed");
        let v = attr(&spans[0], "gen_ai.input.messages")
            .expect("captured")
            .to_string();
        assert_eq!(
            v,
            r#"[{"parts":[{"content":"fix the bug","type":"text"}],"role":"user"}]"#
        );
    }
}
