//! Wire types: the Qoder API's JSON as it is, in all three generations of its shape.
//!
//! Every field but an event's `id` and `type` is optional, and fields whose shape changed
//! between generations (a string in one, an object in another) are untagged enums. A page is
//! decoded in two steps: the envelope with its events as raw JSON slices (no copy), then each
//! event on its own, so one bad event costs that event and not the page. An event whose typed
//! decoding fails is decoded again field by field, dropping only the fields of the wrong shape
//! (see [`decode_event`]).

use std::borrow::Cow;

use crate::event::{DroppedFields, InvalidReason};

use serde::Deserialize;
use serde_json::value::RawValue;

/// One page of a list endpoint: `{data, first_id, last_id, has_more, next_page}`.
#[derive(Debug, Deserialize)]
pub struct Page<'a> {
    #[serde(borrow)]
    pub data: Vec<&'a RawValue>,
    #[serde(default)]
    pub first_id: Option<String>,
    #[serde(default)]
    pub last_id: Option<String>,
    #[serde(default)]
    pub has_more: Option<bool>,
    #[serde(default)]
    pub next_page: Option<String>,
}

/// A string, or a number written where a string was documented (G1 `code`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StrOrNum {
    Str(String),
    Num(serde_json::Number),
}

impl StrOrNum {
    pub(crate) fn into_string(self) -> String {
        match self {
            StrOrNum::Str(s) => s,
            StrOrNum::Num(n) => n.to_string(),
        }
    }
}

/// `{ "type": "end_turn" }` (G1, G3) or a bare `"end_turn"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Typed {
    Obj {
        #[serde(default, rename = "type")]
        kind: Option<String>,
    },
    Str(String),
}

impl Typed {
    pub fn kind(self) -> Option<String> {
        match self {
            Typed::Obj { kind } => kind,
            Typed::Str(s) => Some(s),
        }
    }
}

/// `session.error`'s `error`: an object (G3, seed page) or a message string (G1 `{error, code}`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WireError {
    Obj {
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        retry_status: Option<Typed>,
        /// SDK 0.11: diagnostic only (a span attribute, never a label).
        #[serde(default)]
        qoder_error_code: Option<StrOrNum>,
    },
    Str(String),
}

/// A model named by a string (`"qwen3-coder"`) or an object (`{"id": "...", "speed": ...}`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WireModel {
    Str(String),
    Obj {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        name: Option<String>,
    },
}

impl WireModel {
    pub fn name(self) -> Option<String> {
        match self {
            WireModel::Str(s) => Some(s),
            WireModel::Obj { id, name } => id.or(name),
        }
    }
}

/// Token and credit usage: G1/G2 `usage` (tokens), G3 `model_usage` (credits),
/// Anthropic-shaped `model_usage` (tokens). Numbers are read as floats so `12.0` is accepted.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct WireUsage {
    #[serde(default)]
    pub input_tokens: Option<f64>,
    #[serde(default)]
    pub output_tokens: Option<f64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<f64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<f64>,
    #[serde(default)]
    pub credits: Option<f64>,
    // The session-snapshot shape (SDK 0.11 `SessionUsage`, on `session.usage`, the session
    // object and possibly `session.status_idle`): cumulative, never per request.
    #[serde(default)]
    pub model_credits: Option<f64>,
    #[serde(default)]
    pub sandbox_runtime_credits: Option<f64>,
    #[serde(default)]
    pub total_credits: Option<f64>,
    #[serde(default)]
    pub active_seconds: Option<f64>,
    /// `{web_search_requests, web_fetch_requests, …}`: counts by server tool.
    #[serde(default)]
    pub server_tool_use: Option<std::collections::BTreeMap<String, f64>>,
}

impl WireUsage {
    /// Whether this is a cumulative session snapshot rather than one request's or turn's use:
    /// it carries a field only the snapshot shape has.
    pub(crate) fn is_snapshot(&self) -> bool {
        self.model_credits.is_some()
            || self.sandbox_runtime_credits.is_some()
            || self.total_credits.is_some()
            || self.active_seconds.is_some()
            || self.server_tool_use.is_some()
    }
}

/// Largest token count, credit amount, second count or tool use count taken from the wire, per
/// request or as a session's running total. A billion of any of them is far beyond what one
/// session does; a larger number (1e308, u64::MAX) is hostile or broken, and counting it would
/// pin a counter at its ceiling for good.
pub(crate) const MAX_QUANTITY: f64 = 1e9;

/// Keeps `v` when it is a plausible quantity; `false` when it had to be dropped.
fn plausible(v: &mut Option<f64>) -> bool {
    match *v {
        Some(x) if !x.is_finite() || x.abs() > MAX_QUANTITY => {
            *v = None;
            false
        }
        _ => true,
    }
}

impl WireUsage {
    /// Drops every quantity beyond [`MAX_QUANTITY`]; returns how many.
    pub(crate) fn drop_absurd(&mut self) -> u32 {
        let mut dropped = 0;
        for v in [
            &mut self.input_tokens,
            &mut self.output_tokens,
            &mut self.cache_read_input_tokens,
            &mut self.cache_creation_input_tokens,
            &mut self.credits,
            &mut self.model_credits,
            &mut self.sandbox_runtime_credits,
            &mut self.total_credits,
            &mut self.active_seconds,
        ] {
            dropped += u32::from(!plausible(v));
        }
        if let Some(tools) = &mut self.server_tool_use {
            let before = tools.len();
            tools.retain(|_, n| n.is_finite() && n.abs() <= MAX_QUANTITY);
            dropped += u32::try_from(before - tools.len()).unwrap_or(u32::MAX);
        }
        dropped
    }
}

/// `budget`: `{type: "limit", max_credit_cost: "25.00"}` (a decimal string of credits).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct WireBudget {
    #[serde(default)]
    pub max_credit_cost: Option<StrOrNum>,
}

impl WireBudget {
    /// The budget in credits; `None` unless a finite, non-negative number.
    pub fn credits(&self) -> Option<f64> {
        let v: f64 = match self.max_credit_cost.as_ref()? {
            StrOrNum::Str(s) => s.trim().parse().ok()?,
            StrOrNum::Num(n) => n.as_f64()?,
        };
        (v.is_finite() && v >= 0.0).then_some(v)
    }
}

/// Message content: a string (G1 list output) or content blocks (G2, G3).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WireContent {
    Str(String),
    Blocks(Vec<WireBlock>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WireBlock {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
}

impl WireContent {
    /// The text of the content, blocks joined by newlines; non-text blocks are left out.
    pub fn text(&self) -> String {
        match self {
            WireContent::Str(s) => s.clone(),
            WireContent::Blocks(blocks) => blocks
                .iter()
                .filter_map(|b| b.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Whether message and thinking text is kept (`--otlp.capture-content`,
/// `--otlp.logs.include-content`). Process-wide, as [`KEEP_TOOL_INPUTS`]: without it the text
/// is skipped unread instead of copied into every message event and dropped again.
static KEEP_TEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keep message and thinking text from now on (content export was asked for), or stop.
pub(crate) fn set_keep_text(on: bool) {
    KEEP_TEXT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A message's `content` (a string, or blocks whose text is joined) or `thinking`, as text,
/// when kept ([`set_keep_text`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageText(pub Option<String>);

impl<'de> Deserialize<'de> for MessageText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MessageText, D::Error> {
        read_if(&KEEP_TEXT, d, |d| {
            Ok(Option::<WireContent>::deserialize(d)?.map(|c| c.text()))
        })
        .map(MessageText)
    }
}

/// A field read by `read` while `keep` is on, and skipped unread (`None`) while it is off.
fn read_if<'de, D: serde::Deserializer<'de>>(
    keep: &std::sync::atomic::AtomicBool,
    d: D,
    read: impl FnOnce(D) -> Result<Option<String>, D::Error>,
) -> Result<Option<String>, D::Error> {
    if keep.load(std::sync::atomic::Ordering::Relaxed) {
        read(d)
    } else {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(None)
    }
}

/// Whether tool inputs are kept (`--otlp.logs.include-content`). Process-wide: the decoder
/// runs deep in the poller and `replay`, and an input is skipped unread unless it is wanted
/// (inputs hold whole files; copying them for nothing would cost every `agent.tool_use`).
static KEEP_TOOL_INPUTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keep tool inputs from now on (content export was asked for), or stop keeping them.
pub(crate) fn set_keep_tool_inputs(on: bool) {
    KEEP_TOOL_INPUTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A tool use's `input`, as the JSON text it was sent as, when kept (re-written from a parsed
/// value, keys sorted, when the event had a field of the wrong shape and was read leniently).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolInput(pub Option<String>);

impl<'de> Deserialize<'de> for ToolInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ToolInput, D::Error> {
        read_if(&KEEP_TOOL_INPUTS, d, |d| {
            KeptInput::deserialize(d).map(|k| k.0)
        })
        .map(ToolInput)
    }
}

/// A tool input kept as its text, unparsed: whatever the skipping decoder accepts (any depth,
/// numbers past `f64`), the keeping one accepts too, so the flag changes nothing but the text.
#[derive(Debug, Default, PartialEq)]
struct KeptInput(Option<String>);

impl<'de> Deserialize<'de> for KeptInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeptInput, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(KeptInput(
            (raw.get() != "null").then(|| raw.get().to_owned()),
        ))
    }
}

/// A string field of an event, borrowed from the input unless the JSON escaped something in
/// it: most of an event's strings are read, looked at and dropped (times, the session id, the
/// type of a known kind), so copying each into a `String` of its own was a third of `replay`'s
/// decoding. (serde's own `Cow<str>` borrows only as a bare field, not inside an `Option`.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Str<'a>(pub Cow<'a, str>);

impl Str<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Str<'a>, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(Visit).map(Str)
    }
}

/// One event as it arrives. Unknown fields are ignored; every known spelling is a field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct WireEvent<'a> {
    #[serde(default, borrow)]
    pub id: Option<Str<'a>>,
    #[serde(default, borrow, rename = "type")]
    pub kind: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub session_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub turn_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub processed_at: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub created_at: Option<Str<'a>>,
    /// SDK 0.11: the thread an event belongs to (sub-agents run in threads).
    #[serde(default, borrow)]
    pub session_thread_id: Option<Str<'a>>,
    /// `session.updated`: the session's new budget.
    #[serde(default)]
    pub budget: Option<Box<WireBudget>>,
    /// In a `dump` file: the sub-agent thread whose stream the event was read from.
    #[serde(default, borrow, rename = "qoder_exporter_stream")]
    pub dump_stream: Option<Str<'a>>,
    /// `session.thread_*`: the thread's agent name.
    #[serde(default, borrow)]
    pub agent_name: Option<Str<'a>>,
    // session.usage writes the snapshot's credit fields at top level (and/or in `usage`).
    #[serde(default)]
    pub model_credits: Option<f64>,
    #[serde(default)]
    pub sandbox_runtime_credits: Option<f64>,
    #[serde(default)]
    pub total_credits: Option<f64>,
    // session.status_idle
    #[serde(default)]
    pub stop_reason: Option<Typed>,
    #[serde(default)]
    pub usage: Option<Box<WireUsage>>,
    // session.error
    #[serde(default)]
    pub error: Option<Box<WireError>>,
    #[serde(default)]
    pub code: Option<Box<StrOrNum>>,
    #[serde(default)]
    pub retry_status: Option<Box<Typed>>,
    // terminated (G1)
    #[serde(default)]
    pub reason: Option<Box<StrOrNum>>,
    // span.model_request_*
    #[serde(default)]
    pub model: Option<Box<WireModel>>,
    #[serde(default, borrow)]
    pub span_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub model_request_start_id: Option<Str<'a>>,
    #[serde(default)]
    pub is_error: Option<bool>,
    #[serde(default)]
    pub model_usage: Option<Box<WireUsage>>,
    // tools
    #[serde(default, borrow)]
    pub name: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub tool_name: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub tool_use_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub mcp_tool_use_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub custom_tool_use_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub mcp_server_name: Option<Str<'a>>,
    /// A tool use's input, as JSON text, only while [`set_keep_tool_inputs`] has it on.
    #[serde(default)]
    pub input: ToolInput,
    // messages
    #[serde(default)]
    pub content: MessageText,
    #[serde(default)]
    pub thinking: MessageText,
}

/// Longest event id accepted (the API's are about 30 bytes).
pub(crate) const MAX_ID_BYTES: usize = 256;
/// Longest event type accepted.
pub(crate) const MAX_TYPE_BYTES: usize = 128;

/// A decoded event, with the fields that were dropped from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<'a> {
    pub event: WireEvent<'a>,
    pub bad_fields: DroppedFields,
}

impl Page<'_> {
    /// The cursor to read the next page from, or `None` when this page is the last one (no
    /// `has_more`, no records, or a cursor that would not move). `last_seen` is the id of the
    /// last record, for APIs that leave out `last_id`.
    pub fn next_cursor(&self, last_seen: Option<String>, current: Option<&str>) -> Option<String> {
        let next = self.last_id.clone().or(last_seen)?;
        let more = self.has_more.unwrap_or(false) && !self.data.is_empty();
        (more && Some(next.as_str()) != current).then_some(next)
    }
}

/// Where the next page of the session list starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListCursor {
    /// SDK 0.11: the opaque `next_page` token of the previous page.
    Page(String),
    /// Older deployments: the last id of the previous page.
    AfterId(String),
}

impl Page<'_> {
    /// Where the session list's next page starts, or `None` at its end. SDK 0.11 pages with an
    /// opaque `next_page` token and stops where there is none, whatever `has_more` says; a page
    /// without the field comes from an older deployment that pages by id. Detected per page,
    /// never configured.
    pub fn next_list_cursor(
        &self,
        last_seen: Option<String>,
        current: Option<&ListCursor>,
    ) -> Option<ListCursor> {
        match &self.next_page {
            Some(token) if self.has_more != Some(false) && !token.is_empty() => {
                Some(ListCursor::Page(token.clone()))
            }
            Some(_) => None,
            None => {
                let current = match current {
                    Some(ListCursor::AfterId(a)) => Some(a.as_str()),
                    _ => None,
                };
                self.next_cursor(last_seen, current)
                    .map(ListCursor::AfterId)
            }
        }
    }
}

/// Decodes one event. The fast path is one typed parse; when it fails the event is read as a
/// JSON object and every field that does not fit its type is dropped and counted.
/// The event's strings borrow from `raw` where they can.
#[inline]
pub fn decode_event(raw: &str) -> Result<Decoded<'_>, InvalidReason> {
    let mut event = WireEvent::default();
    let bad_fields = decode_event_into(raw, &mut event)?;
    Ok(Decoded { event, bad_fields })
}

/// [`decode_event`] into `place`, a wire struct reused from one event to the next (serde's
/// `deserialize_in_place`: every field the event does not have is reset). The struct is
/// large and is written where it is read: built and returned by value, each line moved it
/// three times, a fifth of `replay`'s decoding in `perf`. Returns the fields dropped.
#[inline]
pub fn decode_event_into<'a>(
    raw: &'a str,
    place: &mut WireEvent<'a>,
) -> Result<DroppedFields, InvalidReason> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let typed = WireEvent::deserialize_in_place(&mut de, place).and_then(|()| de.end());
    let mut bad_fields = DroppedFields::default();
    if typed.is_err() {
        let lenient = decode_event_leniently(raw)?;
        *place = lenient.event;
        bad_fields = lenient.bad_fields;
    }
    match (&place.id, &place.kind) {
        (None, _) => return Err(InvalidReason::MissingId),
        (Some(id), _) if id.is_empty() => return Err(InvalidReason::MissingId),
        (_, None) => return Err(InvalidReason::MissingType),
        (_, Some(kind)) if kind.is_empty() => return Err(InvalidReason::MissingType),
        (Some(id), Some(kind)) if id.len() > MAX_ID_BYTES || kind.len() > MAX_TYPE_BYTES => {
            return Err(InvalidReason::TooLong);
        }
        _ => {}
    }
    bad_fields.out_of_range = drop_absurd(place);
    Ok(bad_fields)
}

/// [`decode_event`] of an event whose typed decoding failed: field by field, and repaired
/// first when it is not quite JSON.
#[cold]
fn decode_event_leniently(raw: &str) -> Result<Decoded<'_>, InvalidReason> {
    let mut bad_fields = DroppedFields::default();
    let event = match decode_leniently(raw) {
        Some((event, bad)) => {
            bad_fields.wrong_shape = bad;
            event
        }
        // Not JSON as written: `NaN`, `Infinity` (which some encoders emit) become null.
        None => {
            let (fixed, repairs) = repair_json(raw.as_bytes()).ok_or(InvalidReason::NotObject)?;
            let (event, bad) = decode_leniently(&fixed).ok_or(InvalidReason::NotObject)?;
            bad_fields.wrong_shape = bad;
            bad_fields.not_json = repairs;
            event
        }
    };
    Ok(Decoded { event, bad_fields })
}

/// Drops an event's implausible quantities (counted with the fields of the wrong shape).
fn drop_absurd(e: &mut WireEvent<'_>) -> u32 {
    let mut dropped = 0;
    for v in [
        &mut e.model_credits,
        &mut e.sandbox_runtime_credits,
        &mut e.total_credits,
    ] {
        dropped += u32::from(!plausible(v));
    }
    for u in [&mut e.usage, &mut e.model_usage].into_iter().flatten() {
        dropped += u.drop_absurd();
    }
    dropped
}

/// Makes a body that is almost JSON readable: bytes that are not UTF-8 become U+FFFD, and the
/// bare `NaN`, `Infinity` and `-Infinity` some encoders write become `null`. Returns the text
/// and how many repairs it took; `None` when there was nothing to repair (it is broken in
/// another way). One bad byte or number must cost one field, not the page it sits in.
pub(crate) fn repair_json(raw: &[u8]) -> Option<(String, u32)> {
    let text = String::from_utf8_lossy(raw);
    let mut repairs = u32::from(matches!(text, Cow::Owned(_)));
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text.as_ref();
    while let Some(c) = rest.chars().next() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            repairs += 1;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    (repairs > 0).then_some((out, repairs))
}

/// Parses a list page; a body that is not quite JSON is repaired (see [`repair_json`]) into
/// `repaired`, which the page then borrows from. Returns the page and the repairs it took;
/// the error is the original one when no repair helps.
pub fn parse_page<'a>(
    body: &'a [u8],
    repaired: &'a mut Option<String>,
) -> Result<(Page<'a>, u32), serde_json::Error> {
    let error = match serde_json::from_slice(body) {
        Ok(page) => return Ok((page, 0)),
        Err(e) => e,
    };
    let Some((text, repairs)) = repair_json(body) else {
        return Err(error);
    };
    *repaired = Some(text);
    let text: &'a Option<String> = repaired;
    match serde_json::from_str(text.as_deref().unwrap_or_default()) {
        Ok(page) => Ok((page, repairs)),
        Err(_) => Err(error),
    }
}

/// Parses `raw` as a JSON object into `T`, keeping every field that fits `T` on its own and
/// counting those that do not. `None` when `raw` is not a JSON object. The result's strings
/// are its own (read from a parsed object, they borrow from nothing), whatever `'a` is.
fn decode_leniently<'a, T: Deserialize<'a>>(raw: &str) -> Option<(T, u32)> {
    let serde_json::Value::Object(map) = serde_json::from_str(raw).ok()? else {
        return None;
    };
    let mut kept = serde_json::Map::new();
    let mut bad = 0;
    for (key, field) in map {
        let single = serde_json::Value::Object(serde_json::Map::from_iter([(key, field)]));
        if T::deserialize(single.clone()).is_ok() {
            if let serde_json::Value::Object(mut m) = single {
                kept.append(&mut m);
            }
        } else {
            bad += 1;
        }
    }
    let value = T::deserialize(serde_json::Value::Object(kept)).ok()?;
    Some((value, bad))
}

/// An agent as a session carries it: an id string, or a snapshot object.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WireAgent {
    Id(String),
    Obj {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        model: Option<WireModel>,
        /// SDK 0.11: `{type: "coordinator", agents: […]}` on an agent that runs sub-agents.
        #[serde(default)]
        multiagent: Option<serde::de::IgnoredAny>,
    },
}

/// A session object (list item or `GET /sessions/{id}`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct WireSession {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub agent: Option<WireAgent>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub archived_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    /// SDK 0.11 `SessionUsage`: the session's cumulative billed usage.
    #[serde(default)]
    pub usage: Option<WireUsage>,
    #[serde(default)]
    pub budget: Option<WireBudget>,
}

/// An agent object (`GET /agents/{id}`), as far as a label needs it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub(crate) struct WireAgentObject {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// A thread object (`GET /sessions/{id}/threads` items, SDK 0.11 `SessionThread`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct WireThread {
    #[serde(default)]
    pub id: Option<String>,
    /// `None` on the primary (coordinator) thread, whose events are the session's stream.
    #[serde(default)]
    pub parent_thread_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub agent: Option<WireAgent>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl WireThread {
    /// The thread's agent name, when the object shows one.
    pub fn agent_name(&self) -> Option<&str> {
        match &self.agent {
            Some(WireAgent::Obj { name: Some(n), .. }) if !n.is_empty() => Some(n),
            _ => None,
        }
    }
}

/// Decodes a session leniently (same two-step rule as events); `None` without an id.
pub fn decode_session(raw: &str) -> Option<WireSession> {
    let session = match serde_json::from_str::<WireSession>(raw) {
        Ok(s) => s,
        Err(_) => decode_leniently::<WireSession>(raw)?.0,
    };
    session.id.as_ref().filter(|id| !id.is_empty())?;
    let mut session = session;
    if let Some(u) = &mut session.usage
        && u.drop_absurd() > 0
    {
        tracing::warn!(session = ?session.id, "a session object's usage had implausible numbers (over {MAX_QUANTITY}); they are ignored");
    }
    Some(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One wire struct reused from line to line decodes each line as a fresh one would:
    /// nothing of the line before stays, whichever path (typed, lenient, refused) it took.
    #[test]
    fn a_reused_wire_struct_keeps_nothing_of_the_event_before() {
        let lines = [
            r#"{"id":"e1","type":"span.model_request_end","session_id":"s1","turn_id":"t1","processed_at":"2026-10-05T10:00:17Z","session_thread_id":"th1","model":{"id":"m"},"span_id":"sp","model_request_start_id":"st","is_error":true,"model_usage":{"credits":2.5,"input_tokens":10},"qoder_exporter_stream":"th1"}"#,
            r#"{"id":"e2","type":"session.error","error":{"type":"overloaded","message":"m","retry_status":{"type":"exhausted"}},"code":7,"reason":"r","stop_reason":"end_turn","budget":{"credits":5}}"#,
            r#"{"id":"e3","type":"agent.tool_use","name":"Read","tool_use_id":"tu","mcp_server_name":"srv","usage":{"input_tokens":1e300}}"#,
            // The wrong shape: read leniently (the field dropped and counted).
            r#"{"id":"e4","type":"span.model_request_start","model":17,"span_id":"sp4"}"#,
            // Refused: no id.
            r#"{"type":"user.message","session_id":"s9"}"#,
            r#"{"id":"e5","type":"user.message"}"#,
            r#"{"id":"e6","type":"session.usage","model_credits":3,"sandbox_runtime_credits":1,"total_credits":4}"#,
            r#"{"id":"e7","type":"user.message","session_id":"s1"}"#,
        ];
        let mut place = WireEvent::default();
        for line in lines {
            let fresh = decode_event(line);
            let reused = decode_event_into(line, &mut place);
            match fresh {
                Ok(fresh) => {
                    assert_eq!(reused, Ok(fresh.bad_fields), "{line}");
                    assert_eq!(place, fresh.event, "{line}");
                }
                Err(reason) => assert_eq!(reused, Err(reason), "{line}"),
            }
        }
    }

    #[test]
    fn nan_and_bad_bytes_cost_a_field_not_the_event() {
        let d = decode_event(
            r#"{"id":"e1","type":"agent.message","score":NaN,"x":-Infinity,"text":"NaN stays"}"#,
        )
        .expect("repaired");
        assert_eq!(d.event.id.as_deref(), Some("e1"));
        assert_eq!(
            d.bad_fields,
            DroppedFields {
                not_json: 2,
                ..DroppedFields::default()
            }
        );
        // Inside strings nothing changes; outside, each bad token is one repair.
        let (fixed, n) =
            repair_json(br#"{"a":"NaN \" Infinity","b":[NaN,Infinity]}"#).expect("fixed");
        assert_eq!(fixed, r#"{"a":"NaN \" Infinity","b":[null,null]}"#);
        assert_eq!(n, 2);
        let (fixed, n) = repair_json(b"{\"id\":\"e\xff2\",\"type\":\"t\"}").expect("fixed");
        assert_eq!(n, 1);
        assert!(fixed.contains('\u{fffd}'));
        assert_eq!(repair_json(br#"{"ok":1}"#), None);
    }

    #[test]
    fn absurd_numbers_are_dropped_and_counted_not_counted() {
        let raw = r#"{"id":"e1","type":"span.model_request_end","model_usage":{"input_tokens":1e308,"output_tokens":18446744073709551615,"cache_read_input_tokens":12,"credits":-1e300},"model_credits":1e12}"#;
        let d = decode_event(raw).expect("still an event");
        let u = d.event.model_usage.as_ref().expect("usage");
        assert_eq!(u.input_tokens, None);
        assert_eq!(u.output_tokens, None);
        assert_eq!(u.credits, None);
        assert_eq!(
            u.cache_read_input_tokens,
            Some(12.0),
            "plausible fields stay"
        );
        assert_eq!(d.event.model_credits, None);
        assert_eq!(
            d.bad_fields,
            DroppedFields {
                out_of_range: 4,
                ..DroppedFields::default()
            }
        );
        // The session object's usage too.
        let s = decode_session(
            r#"{"id":"sess_1","usage":{"model_credits":2.5,"sandbox_runtime_credits":1e300,"server_tool_use":{"web_search_requests":1e200,"web_fetch_requests":3}}}"#,
        )
        .expect("session");
        let u = s.usage.expect("usage");
        assert_eq!(u.model_credits, Some(2.5));
        assert_eq!(u.sandbox_runtime_credits, None);
        let tools = u.server_tool_use.expect("tools");
        assert_eq!(tools.get("web_fetch_requests"), Some(&3.0));
        assert!(!tools.contains_key("web_search_requests"));
    }

    #[test]
    fn seed_page_events_decode() {
        let raw = r#"{"id":"evt_1","type":"user.message","content":"hi","session_id":"sess_1",
            "turn_id":"turn_1","schema_version":"1.0","created_at":"2026-05-18T03:40:48.888851795Z",
            "processed_at":"2026-05-18T03:40:48.888851795Z"}"#;
        set_keep_text(true);
        let d = decode_event(raw).expect("decodes");
        assert_eq!(d.bad_fields.total(), 0);
        assert_eq!(d.event.turn_id.as_deref(), Some("turn_1"));
        assert_eq!(d.event.content, MessageText(Some("hi".into())));
    }

    #[test]
    fn error_in_both_shapes() {
        let g1 = decode_event(r#"{"id":"e","type":"session.error","error":"boom","code":503}"#)
            .expect("g1");
        assert_eq!(
            g1.event.error,
            Some(Box::new(WireError::Str("boom".into())))
        );
        assert_eq!(g1.event.code.map(|c| c.into_string()), Some("503".into()));
        let g3 = decode_event(
            r#"{"id":"e","type":"session.error","error":{"type":"model_overloaded_error",
            "message":"m","retry_status":{"type":"retrying"}}}"#,
        )
        .expect("g3");
        let Some(WireError::Obj {
            kind, retry_status, ..
        }) = g3.event.error.map(|e| *e)
        else {
            panic!("object error expected");
        };
        assert_eq!(kind.as_deref(), Some("model_overloaded_error"));
        assert_eq!(
            retry_status.and_then(Typed::kind).as_deref(),
            Some("retrying")
        );
    }

    #[test]
    fn wrong_shaped_field_is_dropped_not_the_event() {
        let d = decode_event(
            r#"{"id":"e","type":"session.status_idle","usage":"lots","stop_reason":{"type":"end_turn"}}"#,
        )
        .expect("still an event");
        assert_eq!(
            d.bad_fields,
            DroppedFields {
                wrong_shape: 1,
                ..DroppedFields::default()
            }
        );
        assert_eq!(d.event.usage, None);
        assert_eq!(
            d.event.stop_reason.and_then(Typed::kind).as_deref(),
            Some("end_turn")
        );
    }

    #[test]
    fn unreadable_events_say_why() {
        assert_eq!(decode_event("[1,2]"), Err(InvalidReason::NotObject));
        assert_eq!(decode_event("42"), Err(InvalidReason::NotObject));
        assert_eq!(
            decode_event(r#"{"type":"x"}"#),
            Err(InvalidReason::MissingId)
        );
        assert_eq!(
            decode_event(r#"{"id":7,"type":"x"}"#),
            Err(InvalidReason::MissingId)
        );
        assert_eq!(
            decode_event(r#"{"id":"a"}"#),
            Err(InvalidReason::MissingType)
        );
        assert_eq!(
            decode_event(r#"{"id":"a","type":""}"#),
            Err(InvalidReason::MissingType)
        );
        let long_id = format!(r#"{{"id":"{}","type":"x"}}"#, "e".repeat(MAX_ID_BYTES + 1));
        assert_eq!(decode_event(&long_id), Err(InvalidReason::TooLong));
        let long_type = format!(
            r#"{{"id":"e","type":"{}"}}"#,
            "t".repeat(MAX_TYPE_BYTES + 1)
        );
        assert_eq!(decode_event(&long_type), Err(InvalidReason::TooLong));
    }

    #[test]
    fn hostile_label_values_are_cut() {
        use crate::sinks::metrics::{Delta, DurableMetrics, Family, MAX_LABEL_BYTES};
        let mut d = Delta::default();
        let huge = "é".repeat(1000);
        d.inc(Family::ToolCalls, &[&huge, "agent"], 1.0);
        let m = DurableMetrics::new();
        m.publish(m.stage(&d));
        let cut = crate::event::truncate(&huge, MAX_LABEL_BYTES);
        assert!(cut.len() <= MAX_LABEL_BYTES && cut.len() >= MAX_LABEL_BYTES - 1);
        assert_eq!(m.counter(Family::ToolCalls, &[cut, "agent"]), 1.0);
    }

    #[test]
    fn next_cursor_stops_where_paging_must() {
        let page = |t: &str| {
            serde_json::from_str::<Page<'_>>(t)
                .expect("page")
                .clone_cursor()
        };
        assert_eq!(
            page(r#"{"data":[{}],"has_more":true,"last_id":"b"}"#),
            Some("b".into())
        );
        assert_eq!(
            page(r#"{"data":[{}],"has_more":false,"last_id":"b"}"#),
            None
        );
        assert_eq!(page(r#"{"data":[],"has_more":true,"last_id":"b"}"#), None);
        let p: Page<'_> = serde_json::from_str(r#"{"data":[{}],"has_more":true}"#).expect("page");
        assert_eq!(
            p.next_cursor(Some("e9".into()), None),
            Some("e9".into()),
            "from the data"
        );
        assert_eq!(
            p.next_cursor(Some("e9".into()), Some("e9")),
            None,
            "a cursor that would not move"
        );
        assert_eq!(p.next_cursor(None, None), None);
    }

    impl Page<'_> {
        fn clone_cursor(&self) -> Option<String> {
            self.next_cursor(None, None)
        }
    }

    #[test]
    fn content_blocks_join_text() {
        set_keep_text(true);
        let d = decode_event(
            r#"{"id":"e","type":"agent.message","content":[{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}]}"#,
        )
        .expect("decodes");
        assert_eq!(d.event.content.0.as_deref(), Some("a\nb"));
    }

    #[test]
    fn page_envelope_borrows_events() {
        let body = r#"{"data":[{"id":"a","type":"x"},{"id":"b","type":"y"}],"first_id":"a","last_id":"b","has_more":false}"#;
        let page: Page<'_> = serde_json::from_str(body).expect("page");
        assert_eq!(page.data.len(), 2);
        assert_eq!(page.last_id.as_deref(), Some("b"));
        assert_eq!(page.has_more, Some(false));
    }

    #[test]
    fn sessions_in_every_shape() {
        let s = decode_session(
            r#"{"id":"sess_1","status":"running","agent":{"id":"agent_1","name":"coder","model":{"id":"qwen"}}}"#,
        )
        .expect("session");
        let Some(WireAgent::Obj { name, model, .. }) = s.agent else {
            panic!("obj")
        };
        assert_eq!(name.as_deref(), Some("coder"));
        assert_eq!(model.and_then(WireModel::name).as_deref(), Some("qwen"));
        let g1 = decode_session(r#"{"id":"sess_2","agent":"agent_9","status":7}"#).expect("g1");
        assert_eq!(g1.agent, Some(WireAgent::Id("agent_9".into())));
        assert_eq!(g1.status, None);
        assert!(decode_session(r#"{"status":"idle"}"#).is_none());
    }

    #[test]
    fn a_kept_tool_input_is_its_text_whatever_the_skipping_decoder_accepts() {
        // Deeper than serde_json's recursion limit (128), and a number past f64: skipping
        // reads both, so keeping must too (the flag must not make an event unreadable).
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for input in [deep.as_str(), r#"{"x":1e400}"#, r#"{"command":"ls"}"#] {
            let skipped = serde_json::from_str::<serde::de::IgnoredAny>(input);
            let kept = serde_json::from_str::<KeptInput>(input).expect("kept");
            assert!(skipped.is_ok(), "{input}");
            assert_eq!(kept.0.as_deref(), Some(input));
        }
        assert_eq!(
            serde_json::from_str::<KeptInput>("null").expect("null").0,
            None
        );
        // The lenient decoder's path (a `Value`) keeps it too.
        let v = serde_json::json!({"command": "ls"});
        let kept = serde_json::from_value::<KeptInput>(v).expect("from a value");
        assert_eq!(kept.0.as_deref(), Some(r#"{"command":"ls"}"#));
        // With inputs skipped (the default), such an event reads.
        let raw = format!(r#"{{"id":"e1","type":"agent.tool_use","name":"Read","input":{deep}}}"#);
        assert!(decode_event(&raw).is_ok());
    }
}
