//! The domain model: what an event means, whatever generation of the API wrote it.
//!
//! [`Event::from_wire`] is the one place where the generations' spellings meet: G1 `usage` and
//! `span_id`, G3 `model_usage` and `model_request_start_id`, bare `terminated` and
//! `session.status_terminated`, `retry_status` at top level or inside `error`. Everything after
//! this module sees one shape.

use serde::{Deserialize, Serialize};

use crate::source::wire::{StrOrNum, Typed, WireError, WireEvent, WireModel, WireUsage};

/// Token usage as the provider reports it; `input` excludes cache reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_creation: f64,
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

    pub fn add(&mut self, other: &Tokens) {
        self.input += other.input;
        self.output += other.output;
        self.cache_read += other.cache_read;
        self.cache_creation += other.cache_creation;
    }

    /// `(token_type label, value)` pairs in a fixed order.
    pub fn by_type(&self) -> [(&'static str, f64); 4] {
        [
            ("input", self.input),
            ("output", self.output),
            ("cache_read", self.cache_read),
            ("cache_creation", self.cache_creation),
        ]
    }
}

/// Counters only go up: a negative or non-finite number from the wire counts as zero.
fn non_negative(v: Option<f64>) -> f64 {
    v.filter(|x| x.is_finite() && *x > 0.0).unwrap_or(0.0)
}

/// A cumulative snapshot of a whole session's billed usage (SDK 0.11 `SessionUsage`), from a
/// `session.usage` event or the session object. Each field is the total so far, never an
/// increment: the tracker turns snapshots into counter increases against the last one applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSnapshot {
    pub model_credits: Option<f64>,
    pub sandbox_runtime_credits: Option<f64>,
    pub active_seconds: Option<f64>,
    /// Server tool uses by tool (`web_search`, `web_fetch`: the SDK's `*_requests` fields).
    pub server_tools: Vec<(String, f64)>,
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

/// Where a sub-agent thread is, from `session.thread_status_*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ThreadPhase {
    Running,
    Idle { stop_reason: Option<String> },
    Terminated,
}

/// `session.error`'s retry status, the fixed label set of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryStatus {
    Retrying,
    Exhausted,
    Terminal,
    None,
}

impl RetryStatus {
    fn parse(s: Option<&str>) -> RetryStatus {
        match s.map(str::to_ascii_lowercase).as_deref() {
            Some("retrying") => RetryStatus::Retrying,
            Some("exhausted" | "retries_exhausted") => RetryStatus::Exhausted,
            Some("terminal") => RetryStatus::Terminal,
            _ => RetryStatus::None,
        }
    }

    pub fn as_label(self) -> &'static str {
        match self {
            RetryStatus::Retrying => "retrying",
            RetryStatus::Exhausted => "exhausted",
            RetryStatus::Terminal => "terminal",
            RetryStatus::None => "none",
        }
    }

    /// The error ends the turn: the server gave up on it (exhausted) or on the session.
    pub fn ends_turn(self) -> bool {
        matches!(self, RetryStatus::Exhausted | RetryStatus::Terminal)
    }
}

/// Which kind of tool call an event opens or closes; tool use ids are per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToolKind {
    Builtin,
    Mcp,
    Custom,
}

/// What an event means to the exporter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// `user.message`: opens a turn.
    UserMessage,
    /// `session.status_running` (G2, G3) or `session.status_rescheduled` (G1): a turn is on.
    TurnRunning,
    /// `session.status_idle`: ends the turn.
    Idle {
        stop_reason: Option<String>,
        tokens: Option<Tokens>,
        /// SDK 0.11 may put a cumulative session snapshot here instead of the turn's tokens.
        /// Boxed, as in `Usage`: rare, and every event would otherwise carry its size.
        snapshot: Option<Box<UsageSnapshot>>,
    },
    /// `session.usage`: a cumulative snapshot of the session's billed usage.
    Usage(Box<UsageSnapshot>),
    /// `session.updated` with a budget: the session's credit budget from now on.
    BudgetUpdated(f64),
    /// `session.thread_created`: a sub-agent started in thread `thread`.
    ThreadCreated {
        thread: String,
        agent: Option<String>,
    },
    /// `session.thread_status_running|rescheduled|idle|terminated`.
    ThreadStatus {
        thread: String,
        agent: Option<String>,
        phase: ThreadPhase,
    },
    /// `terminated` (G1), `session.status_terminated` (G3), `session.deleted`.
    Terminated { reason: Option<String> },
    /// `session.error`.
    Error {
        error_type: String,
        retry_status: RetryStatus,
        message: Option<String>,
        /// `error.qoder_error_code` (SDK 0.11): diagnostic, a span attribute only.
        code: Option<String>,
    },
    /// `span.model_request_start`.
    ModelRequestStart {
        model: Option<String>,
        span_id: Option<String>,
    },
    /// `span.model_request_end`.
    ModelRequestEnd {
        start_id: Option<String>,
        span_id: Option<String>,
        is_error: bool,
        tokens: Option<Tokens>,
        credits: Option<f64>,
    },
    /// `agent.tool_use`, `agent.mcp_tool_use`, `agent.custom_tool_use`.
    ToolUse {
        kind: ToolKind,
        use_id: String,
        name: String,
        server: Option<String>,
    },
    /// `agent.tool_result`, `agent.mcp_tool_result`, `user.custom_tool_result`.
    ToolResult {
        kind: ToolKind,
        use_id: Option<String>,
        is_error: bool,
    },
    /// `agent.message`, `agent.thinking`: counted, and their text is a span event on opt-in.
    AgentOutput,
    /// Any other type, known or not: counted by type and otherwise ignored.
    Other,
}

/// One event of a session's log in domain form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    /// The wire `type`, verbatim (it is the `event_type` label).
    pub type_name: String,
    pub turn_id: Option<String>,
    /// `session_thread_id` (SDK 0.11): the thread the event belongs to.
    pub thread_id: Option<String>,
    /// `processed_at`, else `created_at`, as Unix nanoseconds.
    pub time_ns: Option<i64>,
    pub kind: EventKind,
    /// Message or thinking text, kept only for opt-in content capture.
    pub text: Option<String>,
}

impl Event {
    /// Converts a decoded wire event. The caller has checked that `id` and `type` exist.
    pub fn from_wire(mut w: WireEvent) -> Event {
        let time_ns =
            parse_time(w.processed_at.as_deref()).or_else(|| parse_time(w.created_at.as_deref()));
        let id = w.id.take().unwrap_or_default();
        let type_name = w.kind.take().unwrap_or_default();
        let turn_id = w
            .turn_id
            .take()
            .filter(|t| !t.is_empty() && t.len() <= crate::source::wire::MAX_ID_BYTES);
        let thread_id = w
            .session_thread_id
            .clone()
            .filter(|t| !t.is_empty() && t.len() <= crate::source::wire::MAX_ID_BYTES);
        let text = match w.content.take() {
            Some(c) => Some(c.text()),
            None => w.thinking.take(),
        };
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

fn kind_of(type_name: &str, id: &str, w: WireEvent) -> EventKind {
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
                    .and_then(Typed::kind)
                    .filter(|s| !s.is_empty()),
                // A snapshot's tokens are the session's so far, not the turn's.
                tokens: match snapshot {
                    Some(_) => None,
                    None => w.usage.as_ref().and_then(Tokens::from_wire),
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
            match UsageSnapshot::from_wire(&top, w.usage.as_ref()) {
                Some(s) => EventKind::Usage(Box::new(s)),
                None => EventKind::Other,
            }
        }
        "session.updated" => match w.budget.as_ref().and_then(|b| b.credits()) {
            Some(b) => EventKind::BudgetUpdated(b),
            None => EventKind::Other,
        },
        "session.thread_created" => match w.session_thread_id {
            Some(thread) => EventKind::ThreadCreated {
                thread,
                agent: w.agent_name.filter(|a| !a.is_empty()),
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
                        .and_then(Typed::kind)
                        .filter(|s| !s.is_empty()),
                },
                "session.thread_status_terminated" => ThreadPhase::Terminated,
                _ => ThreadPhase::Running,
            };
            match w.session_thread_id {
                Some(thread) => EventKind::ThreadStatus {
                    thread,
                    agent: w.agent_name.filter(|a| !a.is_empty()),
                    phase,
                },
                None => EventKind::Other,
            }
        }
        "terminated" | "session.status_terminated" | "session.deleted" => EventKind::Terminated {
            reason: w.reason.map(StrOrNum::into_string),
        },
        "session.error" => error_kind(w),
        "span.model_request_start" => EventKind::ModelRequestStart {
            model: w.model.and_then(WireModel::name).filter(|m| !m.is_empty()),
            span_id: w.span_id,
        },
        "span.model_request_end" => {
            // G3 and Anthropic write `model_usage`; G1 wrote `usage`. Either may carry tokens,
            // credits or both.
            let usage = w.model_usage.or(w.usage).unwrap_or_default();
            EventKind::ModelRequestEnd {
                start_id: w.model_request_start_id,
                span_id: w.span_id,
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
            let use_id = w.tool_use_id.unwrap_or_else(|| id.to_owned());
            EventKind::ToolUse {
                kind,
                use_id,
                name: w
                    .name
                    .or(w.tool_name)
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "unknown".to_owned()),
                server: w.mcp_server_name,
            }
        }
        "agent.tool_result" => tool_result(ToolKind::Builtin, w.tool_use_id, w.is_error),
        "agent.mcp_tool_result" => tool_result(
            ToolKind::Mcp,
            w.mcp_tool_use_id.or(w.tool_use_id),
            w.is_error,
        ),
        "user.custom_tool_result" => tool_result(
            ToolKind::Custom,
            w.custom_tool_use_id.or(w.tool_use_id),
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

fn error_kind(w: WireEvent) -> EventKind {
    let top_retry = w.retry_status.and_then(Typed::kind);
    let code = w.code.map(StrOrNum::into_string);
    let (error_type, nested_retry, message, qoder_code) = match w.error {
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

/// The longest prefix of `s` no longer than `max` bytes that ends on a character boundary
/// (label values, span text: wire text is unbounded, what the exporter keeps is not).
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// RFC 3339 with any fractional precision (ns, µs, ms, none) and any offset.
pub fn parse_time(s: Option<&str>) -> Option<i64> {
    let s = s?.trim();
    if s.is_empty() {
        return None;
    }
    if let Some(t) = parse_utc(s) {
        return Some(t);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// The form every API generation writes, `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, read without the
/// general RFC 3339 parser (a tenth of replay's time went there). Anything else, or anything
/// this refuses (a leap second, ten fraction digits), goes to the general parser; a test
/// checks both agree.
fn parse_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[b.len() - 1] != b'Z'
        || [b[4], b[7], b[10], b[13], b[16]] != [b'-', b'-', b'T', b':', b':']
    {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            let scale = 10u32.pow(9 - u32::try_from(frac.len()).ok()?);
            digits(20..19 + 1 + frac.len())? * scale
        }
        _ => return None,
    };
    let small = |r| digits(r).and_then(|n| u8::try_from(n).ok());
    let month = time::Month::try_from(small(5..7)?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(digits(0..4)?).ok()?, month, small(8..10)?)
            .ok()?;
    let at = date
        .with_hms_nano(small(11..13)?, small(14..16)?, small(17..19)?, nanos)
        .ok()?
        .assume_utc();
    i64::try_from(at.unix_timestamp_nanos()).ok()
}

/// Fields of readable events that were dropped, by why. The event itself is kept and counted:
/// dropping a whole `span.model_request_end` for one absurd number would lose the request, its
/// pairing with its start, and its turn's other numbers too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DroppedFields {
    /// The wrong JSON type for the field (a string where a number goes).
    pub wrong_shape: u32,
    /// A quantity beyond `source::wire::MAX_QUANTITY` (1e308, `u64::MAX`): counting it would pin a counter.
    pub out_of_range: u32,
    /// Not JSON as written, repaired to `null` or U+FFFD: a byte that is not UTF-8, a bare
    /// `NaN` or `Infinity`.
    pub not_json: u32,
}

impl DroppedFields {
    /// The `reason` label values of `qoder_exporter_event_fields_dropped_total`.
    pub const REASONS: [&'static str; 3] = ["wrong_shape", "out_of_range", "not_json"];

    /// The counts by `reason` label, in the order of [`DroppedFields::REASONS`].
    pub fn by_reason(&self) -> [(&'static str, u32); 3] {
        let [a, b, c] = Self::REASONS;
        [
            (a, self.wrong_shape),
            (b, self.out_of_range),
            (c, self.not_json),
        ]
    }

    pub fn total(&self) -> u32 {
        self.wrong_shape + self.out_of_range + self.not_json
    }
}

impl std::iter::Sum for DroppedFields {
    fn sum<I: Iterator<Item = DroppedFields>>(iter: I) -> DroppedFields {
        let mut total = DroppedFields::default();
        for d in iter {
            total += d;
        }
        total
    }
}

impl std::ops::AddAssign for DroppedFields {
    fn add_assign(&mut self, o: DroppedFields) {
        self.wrong_shape = self.wrong_shape.saturating_add(o.wrong_shape);
        self.out_of_range = self.out_of_range.saturating_add(o.out_of_range);
        self.not_json = self.not_json.saturating_add(o.not_json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::wire::decode_event;

    fn ev(raw: &str) -> Event {
        Event::from_wire(decode_event(raw).expect("valid").event)
    }

    /// The fast path reads what the general RFC 3339 parser reads, to the nanosecond, and
    /// leaves the rest to it.
    #[test]
    fn the_fast_timestamp_path_agrees_with_the_rfc3339_parser() {
        let general = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let mut cases: Vec<String> = [
            "2026-10-05T10:00:17Z",
            "2024-02-29T23:59:59.999999999Z",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-31T24:00:00Z",
            "2016-12-31T23:59:60Z",
            "2026-10-05T10:00:17.1234567890Z",
            "2026-10-05T10:00:17.Z",
            "2026-10-05t10:00:17z",
            "2026-10-05T10:00:17+02:00",
            "1681-10-05T10:00:10Z",
            "2262-04-11T23:47:16.854775807Z",
            "2262-04-11T23:47:16.854775808Z",
            "0000-01-01T00:00:00Z",
            "+2026-10-05T10:00:17Z",
            "2026-1a-05T10:00:17Z",
        ]
        .map(str::to_owned)
        .to_vec();
        for _ in 0..20_000 {
            let frac = match rng.u8(0..4) {
                0 => String::new(),
                _ => format!(".{}", "7".repeat(rng.usize(1..11))),
            };
            cases.push(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}Z",
                rng.u32(1600..2300),
                rng.u32(0..14),
                rng.u32(0..33),
                rng.u32(0..25),
                rng.u32(0..61),
                rng.u32(0..62),
            ));
        }
        for c in &cases {
            assert_eq!(parse_time(Some(c)), general(c), "{c}");
            if let Some(fast) = parse_utc(c) {
                assert_eq!(Some(fast), general(c), "fast path on {c}");
            }
        }
        assert!(cases.iter().filter(|c| parse_utc(c).is_some()).count() > 1000);
    }

    #[test]
    fn timestamps_in_all_precisions_and_offsets() {
        let ns = parse_time(Some("2026-05-18T03:40:48.888851795Z")).expect("ns");
        assert_eq!(ns % 1_000_000_000, 888_851_795);
        let ms = parse_time(Some("2026-05-18T03:40:50.321Z")).expect("ms");
        assert_eq!(ms % 1_000_000_000, 321_000_000);
        let off = parse_time(Some("2026-05-18T11:40:50.321+08:00")).expect("offset");
        assert_eq!(off, ms);
        assert_eq!(
            parse_time(Some("2026-05-18T03:40:50Z")),
            Some(ms - 321_000_000)
        );
        assert_eq!(parse_time(Some("yesterday")), None);
        assert_eq!(parse_time(Some("")), None);
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
