//! The domain model: what an event means, whatever generation of the API wrote it. It imports
//! no other module of the crate; `source::convert` makes these from the wire's shapes.

use serde::{Deserialize, Serialize};

/// Token usage as the provider reports it; `input` excludes cache reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tokens {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_creation: f64,
}

impl Tokens {
    pub fn add(&mut self, other: &Tokens) {
        self.input += other.input;
        self.output += other.output;
        self.cache_read += other.cache_read;
        self.cache_creation += other.cache_creation;
    }

    /// `(token_type label, value)` pairs in a fixed order.
    pub(crate) fn by_type(&self) -> [(&'static str, f64); 4] {
        [
            ("input", self.input),
            ("output", self.output),
            ("cache_read", self.cache_read),
            ("cache_creation", self.cache_creation),
        ]
    }
}

/// A cumulative snapshot of a whole session's billed usage (SDK 0.11 `SessionUsage`), from a
/// `session.usage` event or the session object. Each field is the total so far, never an
/// increment: the tracker turns snapshots into counter increases against the last one applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageSnapshot {
    pub model_credits: Option<f64>,
    pub sandbox_runtime_credits: Option<f64>,
    pub active_seconds: Option<f64>,
    /// Server tool uses by tool (`web_search`, `web_fetch`: the SDK's `*_requests` fields).
    pub server_tools: Vec<(String, f64)>,
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
    /// The `retry_status.type` the API wrote (any case); [`RetryStatus::None`] when absent or
    /// unknown.
    pub fn parse(s: Option<&str>) -> RetryStatus {
        match s.map(str::to_ascii_lowercase).as_deref() {
            Some("retrying") => RetryStatus::Retrying,
            Some("exhausted" | "retries_exhausted") => RetryStatus::Exhausted,
            Some("terminal") => RetryStatus::Terminal,
            _ => RetryStatus::None,
        }
    }

    pub(crate) fn as_label(self) -> &'static str {
        match self {
            RetryStatus::Retrying => "retrying",
            RetryStatus::Exhausted => "exhausted",
            RetryStatus::Terminal => "terminal",
            RetryStatus::None => "none",
        }
    }

    /// The error ends the turn: the server gave up on it (exhausted) or on the session.
    pub(crate) fn ends_turn(self) -> bool {
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
    /// The wire `type`, verbatim (it is the `event_type` label): a known type is a static
    /// string, so an event costs no allocation for it.
    pub type_name: std::borrow::Cow<'static, str>,
    /// Shared by the events of a turn where they were read together (one allocation per
    /// turn, not per event).
    pub turn_id: Option<std::sync::Arc<str>>,
    /// `session_thread_id` (SDK 0.11): the thread the event belongs to.
    pub thread_id: Option<String>,
    /// `processed_at`, else `created_at`, as Unix nanoseconds.
    pub time_ns: Option<i64>,
    pub kind: EventKind,
    /// Message or thinking text (or a tool use's input, when tool inputs are kept), exported
    /// only on opt-in content capture.
    pub text: Option<String>,
}

/// The longest prefix of `s` no longer than `max` bytes that ends on a character boundary
/// (label values, span text: wire text is unbounded, what the exporter keeps is not).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A wall-clock time as Unix nanoseconds (0 before 1970).
pub fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
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

/// The forms the API writes, `YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z` (every generation)
/// or a `±HH:MM` offset (SDK 0.11's Python `isoformat()`, `+00:00`), read without the general
/// RFC 3339 parser (a tenth of replay's time went there). Anything else, or anything this
/// refuses (a leap second, ten fraction digits), goes to the general parser; a test checks
/// both agree.
fn parse_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || [b[4], b[7], b[10], b[13], b[16]] != [b'-', b'-', b'T', b':', b':'] {
        return None;
    }
    let end = b.len();
    let (fraction_end, offset_secs) = match b[end - 1] {
        b'Z' => (end - 1, 0),
        _ if end >= 25 && matches!(b[end - 6], b'+' | b'-') && b[end - 3] == b':' => {
            let (hours, minutes) = (two_digits(b, end - 5)?, two_digits(b, end - 2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let secs = i64::from(hours * 3600 + minutes * 60);
            (end - 6, if b[end - 6] == b'-' { -secs } else { secs })
        }
        _ => return None,
    };
    let nanos = match &b[19..fraction_end] {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            let n = frac.iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })?;
            n * 10u32.pow(9 - u32::try_from(frac.len()).ok()?)
        }
        _ => return None,
    };
    let year = two_digits(b, 0)? * 100 + two_digits(b, 2)?;
    let (month, day) = (two_digits(b, 5)?, two_digits(b, 8)?);
    let (hour, minute, second) = (two_digits(b, 11)?, two_digits(b, 14)?, two_digits(b, 17)?);
    let month_days = time::util::days_in_month(
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        i32::try_from(year).ok()?,
    );
    if day == 0 || day > u32::from(month_days) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let secs = days_from_civil(i64::from(year), month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    secs.checked_mul(1_000_000_000)?
        .checked_add(i64::from(nanos))
}

/// The two ASCII digits at `at` as a number.
#[inline]
fn two_digits(b: &[u8], at: usize) -> Option<u32> {
    let (hi, lo) = (b[at], b[at + 1]);
    (hi.is_ascii_digit() && lo.is_ascii_digit())
        .then(|| u32::from(hi - b'0') * 10 + u32::from(lo - b'0'))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`: eras of 400 years, years starting in March).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = i64::from((153 * ((month + 9) % 12) + 2) / 5 + day - 1);
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Why an event could not be read at all. The label values of
/// `qoder_exporter_events_invalid_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    NotObject,
    MissingId,
    MissingType,
    /// An id or type longer than any the API makes (a hostile or corrupt event).
    TooLong,
}

impl InvalidReason {
    pub(crate) fn as_label(self) -> &'static str {
        match self {
            InvalidReason::NotObject => "not_object",
            InvalidReason::MissingId => "missing_id",
            InvalidReason::MissingType => "missing_type",
            InvalidReason::TooLong => "too_long",
        }
    }
}

/// Fields of readable events that were dropped, by why. The event itself is kept and counted:
/// dropping a whole `span.model_request_end` for one absurd number would lose the request, its
/// pairing with its start, and its turn's other numbers too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DroppedFields {
    /// The wrong JSON type for the field (a string where a number goes).
    pub wrong_shape: u32,
    /// A quantity beyond `source::wire::MAX_QUANTITY` (1e9; the wire has sent 1e308 and
    /// `u64::MAX`): counting it would pin a counter at its ceiling.
    pub out_of_range: u32,
    /// Not JSON as written, repaired to `null` or U+FFFD: a byte that is not UTF-8, a bare
    /// `NaN` or `Infinity`.
    pub not_json: u32,
}

impl DroppedFields {
    /// The `reason` label values of `qoder_exporter_event_fields_dropped_total`.
    pub(crate) const REASONS: [&'static str; 3] = ["wrong_shape", "out_of_range", "not_json"];

    /// The counts by `reason` label, in the order of [`DroppedFields::REASONS`].
    pub(crate) fn by_reason(&self) -> [(&'static str, u32); 3] {
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
            "2026-10-05T10:00:17.123456+00:00",
            "2026-10-05T10:00:17-00:00",
            "2026-10-05T00:30:00.5+05:30",
            "2026-10-05T23:59:59-11:45",
            "2026-10-05T10:00:17+24:00",
            "2026-10-05T10:00:17+02:60",
            "2026-10-05T10:00:17+0200",
            "2026-10-05T10:00:17 02:00",
            "2026-10-05T10:00:17+2:00",
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
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
            let zone = match rng.u8(0..3) {
                0 => "Z".to_owned(),
                _ => format!(
                    "{}{:02}:{:02}",
                    if rng.bool() { '+' } else { '-' },
                    rng.u32(0..26),
                    rng.u32(0..62)
                ),
            };
            cases.push(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}{zone}",
                if rng.bool() {
                    rng.u32(1600..2300)
                } else {
                    rng.u32(0..10_000)
                },
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
        // SDK 0.11's form takes the fast path too.
        assert!(parse_utc("2026-10-05T10:00:17.123456+00:00").is_some());
        assert!(parse_utc("2026-10-05T00:30:00.5+05:30").is_some());
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
}
