//! Prometheus metrics: the event-derived families, which are durable, and the process-derived
//! ones, which start afresh with the process.
//!
//! Event-derived series cannot use the `prometheus` crate's own counters and histograms: a
//! histogram cannot be restored from stored buckets, and the values must move in step with the
//! state store's transactions. So they live in [`DurableMetrics`], a map from series to value
//! that the pipeline changes in two steps: [`DurableMetrics::stage`] turns a batch's [`Delta`]
//! into new absolute values (which the state store writes in the batch's transaction), and
//! [`DurableMetrics::publish`] makes them visible once that transaction has committed. It is a
//! `prometheus` [`Collector`] and is rendered by the same encoder as everything else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use serde::{Deserialize, Serialize};

use crate::outcome::{Example, RequestFinished, Tally, UsageQuantity};

/// The event-derived families of the telemetry contract (`shared/conventions.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    Events,
    Tokens,
    Credits,
    Turns,
    TurnDuration,
    ModelRequests,
    ModelRequestErrors,
    ModelRequestDuration,
    ToolCalls,
    ToolCallErrors,
    SessionErrors,
    SessionCredits,
    SessionActiveSeconds,
    ServerToolUses,
    ThreadTurns,
    ThreadsCreated,
    ToolCallDuration,
}

/// Buckets for turns: agent turns run from seconds to an hour.
const TURN_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Buckets for tool calls: from a quick file read to a long build.
const TOOL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];
/// Buckets for model requests: sub-second to several minutes.
const REQUEST_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// The telemetry contract of the event-derived families, in one place: name, help, labels
/// and (histograms) buckets, in [`Family::ALL`] order. The README's tables are checked
/// against it (`the_readme_lists_every_family_as_declared`).
const SPECS: [FamilySpec; 17] = [
    FamilySpec {
        name: "qoder_events_total",
        help: "Events read from the Qoder session event log, by wire type.",
        labels: &["event_type", "agent"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_tokens_total",
        help: "Tokens used by model requests, by type (input excludes cache reads and writes).",
        labels: &["token_type", "agent", "model"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_credits_total",
        help: "Qoder credits billed for model requests.",
        labels: &["agent", "model"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_turns_total",
        help: "Agent turns that ended (session.status_idle), by stop reason.",
        labels: &["stop_reason", "agent"],
        buckets: None,
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_turn_duration_seconds",
        help: "Time from a turn's first event to the event that ends it.",
        labels: &["agent"],
        buckets: Some(TURN_BUCKETS),
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_model_requests_total",
        help: "Model requests that finished (span.model_request_end).",
        labels: &["agent", "model"],
        buckets: None,
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_model_request_errors_total",
        help: "Model requests that finished with is_error.",
        labels: &["agent", "model"],
        buckets: None,
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_model_request_duration_seconds",
        help: "Model request time from start to end event.",
        labels: &["agent", "model"],
        buckets: Some(REQUEST_BUCKETS),
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_tool_calls_total",
        help: "Tool calls made by agents (built-in, MCP and custom tools).",
        labels: &["tool", "agent"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_tool_call_errors_total",
        help: "Tool calls whose result was an error.",
        labels: &["tool", "agent"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_session_errors_total",
        help: "session.error events, by error type and retry status (exhausted = retries exhausted).",
        labels: &["error_type", "retry_status", "agent"],
        buckets: None,
        exemplars: true,
    },
    FamilySpec {
        name: "qoder_session_credits_total",
        help: "Billed credits from the sessions' cumulative usage snapshots, by kind (model, sandbox_runtime); the sum over kinds is what the account is charged.",
        labels: &["agent", "kind"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_session_active_seconds_total",
        help: "Seconds a session had a thread running (usage.active_seconds), what sandbox runtime is priced on.",
        labels: &["agent"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_server_tool_uses_total",
        help: "Server-side tool uses (web_search, web_fetch, ...) from the sessions' usage snapshots.",
        labels: &["agent", "tool"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_thread_turns_total",
        help: "Thread turns that ended (session.thread_status_idle), by the thread's agent and stop reason.",
        labels: &["agent", "stop_reason"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_threads_created_total",
        help: "Sub-agent threads started (session.thread_created).",
        labels: &["agent"],
        buckets: None,
        exemplars: false,
    },
    FamilySpec {
        name: "qoder_tool_call_duration_seconds",
        help: "Tool call time from the tool use to its result.",
        labels: &["tool", "agent"],
        buckets: Some(TOOL_BUCKETS),
        exemplars: false,
    },
];

/// One row of [`SPECS`].
#[derive(Debug)]
struct FamilySpec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// Histogram bucket bounds; `None` for counters.
    buckets: Option<&'static [f64]>,
    /// Its series carry an exemplar (the trace of a recent example) in OpenMetrics and OTLP.
    exemplars: bool,
}

impl Family {
    pub const ALL: [Family; 17] = [
        Family::Events,
        Family::Tokens,
        Family::Credits,
        Family::Turns,
        Family::TurnDuration,
        Family::ModelRequests,
        Family::ModelRequestErrors,
        Family::ModelRequestDuration,
        Family::ToolCalls,
        Family::ToolCallErrors,
        Family::SessionErrors,
        Family::SessionCredits,
        Family::SessionActiveSeconds,
        Family::ServerToolUses,
        Family::ThreadTurns,
        Family::ThreadsCreated,
        Family::ToolCallDuration,
    ];

    fn spec(self) -> &'static FamilySpec {
        &SPECS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    fn help(self) -> &'static str {
        self.spec().help
    }

    pub(crate) fn label_names(self) -> &'static [&'static str] {
        self.spec().labels
    }

    /// Histogram bucket bounds; `None` for counters.
    pub(crate) fn buckets(self) -> Option<&'static [f64]> {
        self.spec().buckets
    }

    /// Whether its series carry exemplars.
    pub(crate) fn has_exemplars(self) -> bool {
        self.spec().exemplars
    }

    /// How many distinct values a label may take before new ones become `other`. Values that
    /// come from the wire are unbounded in principle; a label set must not be.
    fn label_cap(label: &str) -> usize {
        match label {
            "event_type" => 64,
            "tool" => 200,
            "model" | "error_type" | "stop_reason" => 64,
            "agent" => 500,
            _ => usize::MAX,
        }
    }

    /// The stable key used in the state store.
    pub(crate) fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Counters are kept in millionths, so that sums of fractional values (credits) come out the
/// same whatever order the batches of different sessions commit in: integer addition is
/// associative, float addition is not, and a replay must reproduce the numbers exactly.
pub(crate) const COUNTER_SCALE: f64 = 1e6;

/// The value of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SeriesValue {
    /// In millionths of the counted unit.
    Counter(u64),
    /// Per-bucket (not cumulative) counts, one per bound plus the `+Inf` bucket, and the sum
    /// of observations in microseconds (integer, for the same reason as counters).
    Histogram { counts: Vec<u64>, sum_us: u64 },
}

fn to_micros(v: f64) -> u64 {
    // Saturating conversion: negative and non-finite values were filtered out before.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "saturating float to int"
    )]
    let m = (v * COUNTER_SCALE).round() as u64;
    m
}

fn from_micros(m: u64) -> f64 {
    m as f64 / COUNTER_SCALE
}

pub(crate) type SeriesKey = (Family, Vec<String>);

/// What one batch of events adds to the event-derived families.
///
/// Several updates per event land here, mostly on series the batch has seen already: the maps
/// are hashbrown's with its fast hasher (SipHash took a tenth of replay), and a lookup uses the
/// borrowed labels ([`LabelsRef`]), so a series already in the batch costs no allocation.
#[derive(Debug, Default)]
pub struct Delta {
    counters: hashbrown::HashMap<SeriesKey, u64>,
    /// Observed durations in nanoseconds.
    observations: hashbrown::HashMap<SeriesKey, Vec<i64>>,
    /// The latest example per series of the families that carry exemplars.
    exemplars: hashbrown::HashMap<SeriesKey, ExemplarRef>,
}

#[derive(Debug, Default, Clone)]
struct ExemplarRef {
    session_id: String,
    trace_key: String,
    span_event_id: String,
    value: f64,
    time_ns: Option<i64>,
}

impl ExemplarRef {
    fn resolve(&self) -> Exemplar {
        Exemplar {
            trace_id: super::traces::trace_id(&self.session_id, &self.trace_key).to_bytes(),
            span_id: super::traces::span_id(&self.session_id, "invoke_agent", &self.span_event_id)
                .to_bytes(),
            value: self.value,
            time_ns: self.time_ns,
        }
    }
}

/// A recent example of a series' increments, linking it to the turn that made it: served in
/// OpenMetrics and OTLP, kept in memory only (after a restart a series has none until it moves).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The increment (counters) or the observation in seconds (histograms).
    pub value: f64,
    pub time_ns: Option<i64>,
}

/// The tracker's outcomes, counted: which series each moves is decided here, with the
/// families' names and labels.
impl Tally for Delta {
    fn event(&mut self, type_name: &str, agent: &str) {
        self.inc(Family::Events, &[type_name, agent], 1.0);
    }

    fn turn_ended(&mut self, agent: &str, stop_reason: &str, example: Option<Example<'_>>) {
        let labels = [stop_reason, agent];
        self.inc(Family::Turns, &labels, 1.0);
        if let Some(at) = example {
            self.exemplar(Family::Turns, &labels, at, 1.0);
        }
    }

    fn turn_timed(&mut self, agent: &str, duration_ns: i64, example: Example<'_>) {
        self.observe_ns(Family::TurnDuration, &[agent], duration_ns);
        self.exemplar(
            Family::TurnDuration,
            &[agent],
            example,
            seconds(duration_ns),
        );
    }

    fn tokens_used(&mut self, agent: &str, model: &str, tokens: &crate::event::Tokens) {
        for (token_type, v) in tokens.by_type() {
            self.inc(Family::Tokens, &[token_type, agent, model], v);
        }
    }

    fn session_error(
        &mut self,
        agent: &str,
        error_type: &str,
        retry_status: &str,
        example: Option<Example<'_>>,
    ) {
        let labels = [error_type, retry_status, agent];
        self.inc(Family::SessionErrors, &labels, 1.0);
        if let Some(at) = example {
            self.exemplar(Family::SessionErrors, &labels, at, 1.0);
        }
    }

    fn request_finished(&mut self, r: RequestFinished<'_>) {
        let labels = [r.agent, r.model];
        self.inc(Family::ModelRequests, &labels, 1.0);
        if r.is_error {
            self.inc(Family::ModelRequestErrors, &labels, 1.0);
        }
        if let Some(ns) = r.duration_ns {
            self.observe_ns(Family::ModelRequestDuration, &labels, ns);
        }
        if let Some(at) = r.example {
            self.exemplar(Family::ModelRequests, &labels, at, 1.0);
            if r.is_error {
                self.exemplar(Family::ModelRequestErrors, &labels, at, 1.0);
            }
            if let Some(ns) = r.duration_ns {
                self.exemplar(Family::ModelRequestDuration, &labels, at, seconds(ns));
            }
        }
        if let Some(c) = r.credits {
            self.inc(Family::Credits, &labels, c);
        }
    }

    fn tool_called(&mut self, agent: &str, tool: &str) {
        self.inc(Family::ToolCalls, &[tool, agent], 1.0);
    }

    fn tool_finished(&mut self, agent: &str, tool: &str, is_error: bool, duration_ns: Option<i64>) {
        if is_error {
            self.inc(Family::ToolCallErrors, &[tool, agent], 1.0);
        }
        if let Some(ns) = duration_ns {
            self.observe_ns(Family::ToolCallDuration, &[tool, agent], ns);
        }
    }

    fn thread_created(&mut self, agent: &str) {
        self.inc(Family::ThreadsCreated, &[agent], 1.0);
    }

    fn thread_turn_ended(&mut self, agent: &str, stop_reason: &str) {
        self.inc(Family::ThreadTurns, &[agent, stop_reason], 1.0);
    }

    fn usage_increased(&mut self, agent: &str, quantity: UsageQuantity<'_>, amount: f64) {
        match quantity {
            UsageQuantity::Credits { kind } => {
                self.inc(Family::SessionCredits, &[agent, kind], amount);
            }
            UsageQuantity::ActiveSeconds => {
                self.inc(Family::SessionActiveSeconds, &[agent], amount);
            }
            UsageQuantity::ServerTool { tool } => {
                self.inc(Family::ServerToolUses, &[agent, tool], amount);
            }
        }
    }
}

/// A duration in seconds, as exemplars of duration histograms have it (negative: zero).
fn seconds(duration_ns: i64) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "a duration in seconds")]
    let secs = duration_ns.max(0) as f64 / 1e9;
    secs
}

/// Whether an example at `candidate` replaces the one at `shown`: only a newer one does (or
/// the same instant). Prometheus drops an exemplar older than the last it stored for a series,
/// and events reach a series out of time order (a thread's stream is read after the session's).
/// A timed example is not replaced by an untimed one, which a scraper would stamp with the
/// scrape's time and so make every later timed one look old.
fn replaces(candidate: Option<i64>, shown: Option<i64>) -> bool {
    match (candidate, shown) {
        (Some(c), Some(s)) => c >= s,
        (None, Some(_)) => false,
        (_, None) => true,
    }
}

/// Most labels a family has.
const MAX_LABELS: usize = 3;

/// A [`SeriesKey`] borrowed: it hashes exactly as the owned key (a tuple hashes its fields in
/// order, a `Vec<String>` as a slice of `str`), so it finds the owned key in a map.
#[derive(Hash)]
struct LabelsRef<'a>(Family, &'a [&'a str]);

impl hashbrown::Equivalent<SeriesKey> for LabelsRef<'_> {
    fn equivalent(&self, (family, labels): &SeriesKey) -> bool {
        self.0 == *family
            && self.1.len() == labels.len()
            && self.1.iter().zip(labels).all(|(a, b)| *a == b)
    }
}

/// The labels cut as they are stored ([`MAX_LABEL_BYTES`]), without copying them.
fn cut_labels<'a>(labels: &[&'a str], out: &'a mut [&'a str; MAX_LABELS]) -> &'a [&'a str] {
    for (o, l) in out.iter_mut().zip(labels) {
        *o = crate::event::truncate(l, MAX_LABEL_BYTES);
    }
    &out[..labels.len().min(MAX_LABELS)]
}

fn owned_key(family: Family, labels: &[&str]) -> SeriesKey {
    (family, labels.iter().map(|s| (*s).to_owned()).collect())
}

/// Longest label value kept; longer ones (hostile input) are cut on a character boundary.
pub(crate) const MAX_LABEL_BYTES: usize = 128;

fn label(s: &str) -> String {
    crate::event::truncate(s, MAX_LABEL_BYTES).to_owned()
}

impl Delta {
    pub fn inc(&mut self, family: Family, labels: &[&str], by: f64) {
        debug_assert_eq!(labels.len(), family.label_names().len());
        if by <= 0.0 || !by.is_finite() {
            return;
        }
        let mut buf = [""; MAX_LABELS];
        let labels = cut_labels(labels, &mut buf);
        let by = to_micros(by);
        match self.counters.get_mut(&LabelsRef(family, labels)) {
            Some(c) => *c = c.saturating_add(by),
            None => {
                self.counters.insert(owned_key(family, labels), by);
            }
        }
    }

    /// Records a duration given in nanoseconds (negative ones, clock skew, count as zero).
    pub fn observe_ns(&mut self, family: Family, labels: &[&str], ns: i64) {
        debug_assert!(family.buckets().is_some());
        let mut buf = [""; MAX_LABELS];
        let labels = cut_labels(labels, &mut buf);
        match self.observations.get_mut(&LabelsRef(family, labels)) {
            Some(o) => o.push(ns.max(0)),
            None => {
                self.observations
                    .insert(owned_key(family, labels), vec![ns.max(0)]);
            }
        }
    }

    /// Records `at` as the latest example of a series `inc` or `observe_ns` moved by `value`
    /// (seconds for histograms); ignored for families without exemplars.
    pub fn exemplar(&mut self, family: Family, labels: &[&str], at: Example<'_>, value: f64) {
        if !family.has_exemplars() {
            return;
        }
        let mut buf = [""; MAX_LABELS];
        let labels = cut_labels(labels, &mut buf);
        let slot = match self.exemplars.get_mut(&LabelsRef(family, labels)) {
            Some(slot) if !replaces(at.time_ns, slot.time_ns) => return,
            Some(slot) => slot,
            None => self.exemplars.entry(owned_key(family, labels)).or_default(),
        };
        // Into the slot's own buffers: a series that moves every event costs no allocation.
        slot.trace_key.clear();
        slot.trace_key.push_str(at.trace_key);
        slot.span_event_id.clear();
        slot.span_event_id.push_str(at.span_event_id);
        slot.session_id.clear();
        slot.session_id.push_str(at.session_id);
        slot.value = value;
        slot.time_ns = at.time_ns;
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.observations.is_empty()
    }
}

#[derive(Debug, Default)]
struct Inner {
    series: BTreeMap<SeriesKey, SeriesValue>,
    /// Distinct values seen per (family, label position), for the label caps.
    seen: HashMap<(Family, usize), HashSet<String>>,
    /// Prometheus series in `series`, for the budget: a histogram is one per bucket, `+Inf`,
    /// `_sum` and `_count`.
    prometheus_series: usize,
    /// The latest example of the series of families with exemplars.
    exemplars: HashMap<SeriesKey, Exemplar>,
    /// Every relabel published, in order (one per agent id whose name was learned: few).
    relabels: Vec<(String, String)>,
}

/// How many Prometheus series one label set of `family` is.
fn series_cost(family: Family) -> usize {
    family.buckets().map_or(1, |b| b.len() + 3)
}

/// `key` with every wire-derived label (the capped ones) set to `other`: where new label sets
/// go once the series budget is spent. There are few such keys (the fixed labels' values).
fn folded_key((family, labels): &SeriesKey) -> SeriesKey {
    let labels = labels
        .iter()
        .zip(family.label_names())
        .map(|(v, name)| {
            if Family::label_cap(name) == usize::MAX {
                v.clone()
            } else {
                "other".to_owned()
            }
        })
        .collect();
    (*family, labels)
}

impl Inner {
    fn capped_key(&self, staged: &Inner, (family, labels): &SeriesKey) -> SeriesKey {
        let mut out = Vec::with_capacity(labels.len());
        for (i, (value, name)) in labels.iter().zip(family.label_names()).enumerate() {
            let cap = Family::label_cap(name);
            let known = |inner: &Inner| {
                inner
                    .seen
                    .get(&(*family, i))
                    .is_some_and(|s| s.contains(value))
            };
            let count = |inner: &Inner| inner.seen.get(&(*family, i)).map_or(0, HashSet::len);
            if known(self) || known(staged) || count(self) + count(staged) < cap {
                out.push(value.clone());
            } else {
                out.push("other".to_owned());
            }
        }
        (*family, out)
    }

    fn remember(&mut self, (family, labels): &SeriesKey) {
        for (i, v) in labels.iter().enumerate() {
            self.seen.entry((*family, i)).or_default().insert(v.clone());
        }
    }

    fn insert(&mut self, key: SeriesKey, value: SeriesValue) {
        self.remember(&key);
        let cost = series_cost(key.0);
        if self.series.insert(key, value).is_none() {
            self.prometheus_series += cost;
        }
    }

    fn remove(&mut self, key: &SeriesKey) {
        if self.series.remove(key).is_some() {
            self.prometheus_series -= series_cost(key.0);
        }
    }
}

/// New absolute values for the series a batch touched, ready to be stored and published.
#[derive(Debug, Default)]
pub struct Staged {
    pub values: Vec<(SeriesKey, SeriesValue)>,
    new_labels: Inner,
    /// Label sets of this batch that went to an `other` series because the series budget
    /// was spent (`qoder_exporter_series_dropped_total`).
    pub folded: u64,
    /// The latest example of each series the batch moved, under the key it is counted under.
    exemplars: Vec<(SeriesKey, Exemplar)>,
}

/// Series moved from one `agent` label value to another (an agent's id to its name).
#[derive(Debug, Default)]
pub(crate) struct Relabel {
    /// The `agent` value moved from and to, cut like every label value.
    pub moved: (String, String),
    pub remove: Vec<SeriesKey>,
    pub put: Vec<(SeriesKey, SeriesValue)>,
}

/// `base` + `add`, for two values of one family.
fn merge_values(base: Option<SeriesValue>, add: &SeriesValue) -> SeriesValue {
    match (base, add) {
        (Some(SeriesValue::Counter(a)), SeriesValue::Counter(b)) => {
            SeriesValue::Counter(a.saturating_add(*b))
        }
        (
            Some(SeriesValue::Histogram { counts, sum_us }),
            SeriesValue::Histogram {
                counts: add_counts,
                sum_us: add_sum,
            },
        ) => {
            let mut counts = counts;
            counts.resize(counts.len().max(add_counts.len()), 0);
            for (c, a) in counts.iter_mut().zip(add_counts) {
                *c = c.saturating_add(*a);
            }
            SeriesValue::Histogram {
                counts,
                sum_us: sum_us.saturating_add(*add_sum),
            }
        }
        _ => add.clone(),
    }
}

/// The event-derived series, held in memory and rendered as a Prometheus collector.
#[derive(Debug)]
pub struct DurableMetrics {
    inner: RwLock<Inner>,
    descs: Vec<Desc>,
    /// `--metrics.max-series`: new label sets beyond it are folded into `other`.
    max_series: std::sync::atomic::AtomicUsize,
    /// The budget was reached and said so in the log.
    budget_told: std::sync::atomic::AtomicBool,
}

impl Default for DurableMetrics {
    fn default() -> Self {
        DurableMetrics::new()
    }
}

impl DurableMetrics {
    pub fn new() -> DurableMetrics {
        let descs = Family::ALL
            .into_iter()
            .filter_map(|f| {
                Desc::new(
                    f.name().to_owned(),
                    f.help().to_owned(),
                    f.label_names().iter().map(|s| (*s).to_owned()).collect(),
                    HashMap::new(),
                )
                .ok()
            })
            .collect();
        DurableMetrics {
            inner: RwLock::new(Inner::default()),
            descs,
            max_series: std::sync::atomic::AtomicUsize::new(crate::config::DEFAULT_MAX_SERIES),
            budget_told: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sets the series budget (`0`: none). Series already stored are kept whatever it is.
    pub(crate) fn set_max_series(&self, max: usize) {
        let max = if max == 0 { usize::MAX } else { max };
        self.max_series
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Loads values read from the state store at startup.
    pub(crate) fn restore(&self, values: impl IntoIterator<Item = (SeriesKey, SeriesValue)>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (key, value) in values {
            inner.insert(key, value);
        }
    }

    /// The label set `key` is counted under: capped label by label, then folded into `other`
    /// when it would be a new series past the budget.
    fn budgeted_key(
        &self,
        inner: &Inner,
        staged: &mut Staged,
        values: &BTreeMap<SeriesKey, SeriesValue>,
        new_series: &mut usize,
        key: &SeriesKey,
    ) -> SeriesKey {
        let key = inner.capped_key(&staged.new_labels, key);
        let exists = |k: &SeriesKey| values.contains_key(k) || inner.series.contains_key(k);
        if exists(&key) {
            return key;
        }
        let budget = self.max_series.load(std::sync::atomic::Ordering::Relaxed);
        let cost = series_cost(key.0);
        let key = if inner.prometheus_series + *new_series + cost > budget {
            let folded = folded_key(&key);
            if folded != key {
                staged.folded += 1;
                if !self
                    .budget_told
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        max_series = budget,
                        "the series budget is spent: new label sets are counted under `other` (qoder_exporter_series_dropped_total); raise --metrics.max-series if this is expected"
                    );
                }
            }
            folded
        } else {
            key
        };
        if !exists(&key) {
            *new_series += cost;
        }
        key
    }

    /// Computes the new values of the series `delta` touches, without publishing them.
    pub fn stage(&self, delta: &Delta) -> Staged {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut staged = Staged::default();
        let mut values: BTreeMap<SeriesKey, SeriesValue> = BTreeMap::new();
        let mut new_series = 0;
        // Label capping depends on order; sort so a batch caps the same way every time.
        let mut counters: Vec<_> = delta.counters.iter().collect();
        counters.sort_by(|a, b| a.0.cmp(b.0));
        for (key, by) in counters {
            let example = delta.exemplars.get(key);
            let key = self.budgeted_key(&inner, &mut staged, &values, &mut new_series, key);
            if let Some(e) = example {
                staged.exemplars.push((key.clone(), e.resolve()));
            }
            staged.new_labels.remember(&key);
            let current = values
                .get(&key)
                .or_else(|| inner.series.get(&key))
                .cloned()
                .unwrap_or(SeriesValue::Counter(0));
            if let SeriesValue::Counter(v) = current {
                values.insert(key, SeriesValue::Counter(v.saturating_add(*by)));
            }
        }
        let mut observations: Vec<_> = delta.observations.iter().collect();
        observations.sort_by(|a, b| a.0.cmp(b.0));
        for (key, samples) in observations {
            let bounds = key.0.buckets().unwrap_or(&[]);
            let example = delta.exemplars.get(key);
            let key = self.budgeted_key(&inner, &mut staged, &values, &mut new_series, key);
            if let Some(e) = example {
                staged.exemplars.push((key.clone(), e.resolve()));
            }
            staged.new_labels.remember(&key);
            let current = values
                .get(&key)
                .or_else(|| inner.series.get(&key))
                .cloned()
                .unwrap_or_else(|| SeriesValue::Histogram {
                    counts: vec![0; bounds.len() + 1],
                    sum_us: 0,
                });
            if let SeriesValue::Histogram {
                mut counts,
                mut sum_us,
            } = current
            {
                counts.resize(bounds.len() + 1, 0);
                for &ns in samples {
                    let secs = ns as f64 / 1e9;
                    let i = bounds.partition_point(|b| *b < secs);
                    counts[i] += 1;
                    sum_us = sum_us.saturating_add(u64::try_from(ns / 1000).unwrap_or(0));
                }
                values.insert(key, SeriesValue::Histogram { counts, sum_us });
            }
        }
        staged.values = values.into_iter().collect();
        staged
    }

    /// Makes staged values visible; call only after they are committed to the state store.
    pub fn publish(&self, staged: Staged) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (key, value) in staged.values {
            inner.insert(key, value);
        }
        for (key, e) in staged.exemplars {
            match inner.exemplars.get_mut(&key) {
                Some(shown) if replaces(e.time_ns, shown.time_ns) => *shown = e,
                Some(_) => {}
                None => {
                    inner.exemplars.insert(key, e);
                }
            }
        }
    }

    /// The latest exemplar of a series given by its family's name and label pairs (any
    /// order), if it has one.
    pub(crate) fn exemplar_of(&self, family: &str, pairs: &[(String, String)]) -> Option<Exemplar> {
        let family = Family::from_name(family).filter(|f| f.has_exemplars())?;
        let labels = family
            .label_names()
            .iter()
            .map(|n| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
            .collect::<Option<Vec<String>>>()?;
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.exemplars.get(&(family, labels)).copied()
    }

    /// What moving every series labelled `agent=from` to `agent=to` takes: the series to
    /// remove and the merged values to write (counters added, histogram buckets added).
    /// Nothing is published; call `publish_relabel` once it is committed.
    pub(crate) fn stage_relabel(&self, from: &str, to: &str) -> Relabel {
        // As the values were stored: cut like every label value.
        let (from, to) = (label(from), label(to));
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut merged: BTreeMap<SeriesKey, SeriesValue> = BTreeMap::new();
        let mut remove = Vec::new();
        for ((family, labels), value) in &inner.series {
            let Some(pos) = family.label_names().iter().position(|l| *l == "agent") else {
                continue;
            };
            if labels[pos] != from {
                continue;
            }
            remove.push((*family, labels.clone()));
            let mut to_labels = labels.clone();
            to_labels[pos] = to.to_owned();
            let key = (*family, to_labels);
            let base = merged
                .remove(&key)
                .or_else(|| inner.series.get(&key).cloned());
            merged.insert(key, merge_values(base, value));
        }
        Relabel {
            moved: (from.to_owned(), to.to_owned()),
            remove,
            put: merged.into_iter().collect(),
        }
    }

    /// Makes a committed relabel visible.
    pub(crate) fn publish_relabel(&self, relabel: Relabel) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for key in &relabel.remove {
            inner.remove(key);
            inner.exemplars.remove(key);
        }
        for (key, value) in relabel.put {
            inner.insert(key, value);
        }
        inner.relabels.push(relabel.moved);
    }

    /// The durable families as [`Collector::collect`] has them, and the relabels published
    /// after the first `seen`, read at one instant: a delta push moves what it last pushed
    /// along with the series, or a relabelled value would be pushed twice.
    pub(crate) fn collect_since(
        &self,
        seen: usize,
    ) -> (Vec<proto::MetricFamily>, Vec<(String, String)>) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let moved = inner.relabels.get(seen..).unwrap_or_default().to_vec();
        (collect_families(&inner), moved)
    }

    /// The current value of a counter series, for tests and summaries.
    pub fn counter(&self, family: Family, labels: &[&str]) -> f64 {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let key = (family, labels.iter().map(|s| (*s).to_owned()).collect());
        match inner.series.get(&key) {
            Some(SeriesValue::Counter(v)) => from_micros(*v),
            _ => 0.0,
        }
    }

    /// Sums a family over all its series (counters: values; histograms: sample counts).
    pub fn total(&self, family: Family) -> f64 {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .series
            .range((family, Vec::new())..)
            .take_while(|((f, _), _)| *f == family)
            .map(|(_, v)| match v {
                SeriesValue::Counter(c) => from_micros(*c),
                SeriesValue::Histogram { counts, .. } => counts.iter().sum::<u64>() as f64,
            })
            .sum()
    }
}

/// Appends `v` as the text format writes label values (`\\`, `\n` and `"` escaped).
fn push_escaped(out: &mut Vec<u8>, v: &str, quote: bool) {
    for b in v.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'"' if quote => out.extend_from_slice(b"\\\""),
            _ => out.push(b),
        }
    }
}

/// Appends a sample value as the prometheus crate writes it (`f64`'s `Display`).
fn push_value(out: &mut Vec<u8>, v: f64) {
    use std::io::Write;
    let _ = write!(out, "{v}");
}

impl DurableMetrics {
    /// Each family with series as text, in name order: OpenMetrics (with exemplars) when
    /// `format` says so, else the classic text format 0.0.4 (byte for byte what it always was).
    pub(crate) fn families_as(&self, format: Exposition) -> Vec<(&'static str, Vec<u8>)> {
        let om = format == Exposition::OpenMetrics;
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut by_name: Vec<Family> = Family::ALL.to_vec();
        by_name.sort_by_key(|f| f.name());
        let mut out = Vec::new();
        for family in by_name {
            let mut series: Vec<_> = inner
                .series
                .range((family, Vec::new())..)
                .take_while(|((f, _), _)| *f == family)
                .collect();
            if series.is_empty() {
                continue;
            }
            let name = family.name();
            let mut text = Vec::with_capacity(4096);
            if om {
                super::openmetrics::header(
                    &mut text,
                    name,
                    family.help(),
                    if family.buckets().is_some() {
                        MetricType::HISTOGRAM
                    } else {
                        MetricType::COUNTER
                    },
                );
            } else {
                text.extend_from_slice(b"# HELP ");
                text.extend_from_slice(name.as_bytes());
                text.push(b' ');
                push_escaped(&mut text, family.help(), false);
                text.extend_from_slice(b"\n# TYPE ");
                text.extend_from_slice(name.as_bytes());
                text.extend_from_slice(match family.buckets() {
                    Some(_) => b" histogram\n",
                    None => b" counter\n",
                });
            }
            // Labels in name order, as the protobuf path sorts them.
            let names = family.label_names();
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by_key(|&i| names[i]);
            // Series in the order of their label values taken in label-name order, as the
            // registry sorts them (the store's order is by the family's own label order).
            if order.windows(2).any(|w| w[0] > w[1]) {
                series.sort_by(|((_, a), _), ((_, b), _)| {
                    order
                        .iter()
                        .map(|&i| &a[i])
                        .cmp(order.iter().map(|&i| &b[i]))
                });
            }
            let bounds: Vec<String> = family
                .buckets()
                .unwrap_or(&[])
                .iter()
                .map(f64::to_string)
                .collect();
            // OpenMetrics has exemplars on counters and histogram buckets, not on `unknown`.
            let exemplars_allowed = om
                && (family.buckets().is_some() || super::openmetrics::counter_stem(name).is_some());
            let mut labels = Vec::with_capacity(128);
            for (key, value) in series {
                let values = &key.1;
                let example = if exemplars_allowed {
                    inner.exemplars.get(key)
                } else {
                    None
                };
                labels.clear();
                for (k, &i) in order.iter().enumerate() {
                    labels.push(if k == 0 { b'{' } else { b',' });
                    labels.extend_from_slice(names[i].as_bytes());
                    labels.extend_from_slice(b"=\"");
                    push_escaped(&mut labels, &values[i], true);
                    labels.push(b'"');
                }
                let sample = |text: &mut Vec<u8>,
                              suffix: &str,
                              le: Option<&str>,
                              v: f64,
                              example: Option<&Exemplar>| {
                    text.extend_from_slice(name.as_bytes());
                    text.extend_from_slice(suffix.as_bytes());
                    text.extend_from_slice(&labels);
                    if let Some(le) = le {
                        text.extend_from_slice(if labels.is_empty() {
                            b"{le=\""
                        } else {
                            b",le=\""
                        });
                        text.extend_from_slice(le.as_bytes());
                        text.push(b'"');
                    }
                    if !labels.is_empty() || le.is_some() {
                        text.push(b'}');
                    }
                    text.push(b' ');
                    push_value(text, v);
                    if let Some(e) = example {
                        super::openmetrics::exemplar(text, e);
                    }
                    text.push(b'\n');
                };
                match value {
                    SeriesValue::Counter(v) => {
                        sample(&mut text, "", None, from_micros(*v), example);
                    }
                    SeriesValue::Histogram { counts, sum_us } => {
                        // The exemplar goes on the bucket its observation fell in.
                        let at = example.map(|e| {
                            family
                                .buckets()
                                .unwrap_or(&[])
                                .partition_point(|b| *b < e.value)
                        });
                        let mut cumulative = 0u64;
                        for (i, (bound, n)) in bounds.iter().zip(counts).enumerate() {
                            cumulative += n;
                            let e = example.filter(|_| at == Some(i));
                            sample(&mut text, "_bucket", Some(bound), cumulative as f64, e);
                        }
                        let total: u64 = counts.iter().sum();
                        let e = example.filter(|_| at == Some(bounds.len()));
                        sample(&mut text, "_bucket", Some("+Inf"), total as f64, e);
                        sample(&mut text, "_sum", None, from_micros(*sum_us), None);
                        sample(&mut text, "_count", None, total as f64, None);
                    }
                }
            }
            out.push((name, text));
        }
        out
    }
}

impl Collector for DurableMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        collect_families(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The durable series as Prometheus families.
fn collect_families(inner: &Inner) -> Vec<proto::MetricFamily> {
    let mut families: BTreeMap<Family, Vec<proto::Metric>> = BTreeMap::new();
    for ((family, labels), value) in &inner.series {
        let mut m = proto::Metric::default();
        let mut pairs: Vec<proto::LabelPair> = family
            .label_names()
            .iter()
            .zip(labels)
            .map(|(n, v)| {
                let mut p = proto::LabelPair::default();
                p.set_name((*n).to_owned());
                p.set_value(v.clone());
                p
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        m.set_label(pairs);
        match value {
            SeriesValue::Counter(v) => {
                let mut c = proto::Counter::default();
                c.set_value(from_micros(*v));
                m.set_counter(c);
            }
            SeriesValue::Histogram { counts, sum_us } => {
                let bounds = family.buckets().unwrap_or(&[]);
                let mut h = proto::Histogram::default();
                let mut cumulative = 0;
                let buckets = bounds
                    .iter()
                    .zip(counts)
                    .map(|(bound, n)| {
                        cumulative += n;
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                h.set_bucket(buckets);
                h.set_sample_count(counts.iter().sum());
                h.set_sample_sum(from_micros(*sum_us));
                m.set_histogram(h);
            }
        }
        families.entry(*family).or_default().push(m);
    }
    families
        .into_iter()
        .map(|(family, metrics)| {
            let mut mf = proto::MetricFamily::default();
            mf.set_name(family.name().to_owned());
            mf.set_help(family.help().to_owned());
            mf.set_field_type(if family.buckets().is_some() {
                MetricType::HISTOGRAM
            } else {
                MetricType::COUNTER
            });
            mf.set_metric(metrics);
            mf
        })
        .collect()
}

/// How the API can break its paging rules (`qoder_exporter_api_anomalies_total{kind}`):
/// events at or before the cursor it was given (`after_id` ignored), event pages that lead
/// back to one already read, a session list that points back to a page already read, and a
/// page that was not valid JSON (repaired).
pub(crate) const API_ANOMALIES: [&str; 4] =
    ["cursor_ignored", "page_loop", "list_loop", "invalid_json"];

/// Process-derived series: this process's view of the API, the queue and the sinks.
#[derive(Debug, Clone)]
pub struct ProcessMetrics {
    pub up: IntGauge,
    /// What went wrong with the API last, in words for the landing page (`None`: nothing
    /// since the last success). Not a series.
    api_problem: std::sync::Arc<RwLock<Option<String>>>,
    pub sessions: IntGaugeVec,
    pub api_requests: IntCounterVec,
    pub api_failures: IntCounterVec,
    pub api_duration: HistogramVec,
    /// No labels; a vector only so the series is absent until the first successful poll (a
    /// timestamp of 0 would make every staleness query see an age of fifty years).
    last_poll: GaugeVec,
    pub events_invalid: IntCounterVec,
    pub fields_dropped: IntCounterVec,
    pub events_duplicate: IntCounter,
    pub series_dropped: IntCounter,
    pub cursor_resets: IntCounter,
    pub pages_cut: IntCounter,
    pub spans_exported: IntCounter,
    pub spans_dropped: IntCounterVec,
    pub span_export_failures: IntCounter,
    pub span_outbox_turns: IntGauge,
    /// Metrics and logs over OTLP (`signal` = `metrics` | `logs`): series exist once the
    /// signal is switched on ([`ProcessMetrics::otlp_signal_on`]).
    pub otlp_exported: IntCounterVec,
    pub otlp_export_failures: IntCounterVec,
    pub otlp_dropped: IntCounterVec,
    pub otlp_last_success: GaugeVec,
    pub log_outbox_records: IntGauge,
    pub state_commits: IntCounter,
    pub state_commit_failures: IntCounter,
    /// 1 while the state file takes commits; 0 from a failed commit to the next good one.
    pub state_writable: IntGauge,
    pub http_connections: IntGauge,
    pub sessions_not_followed: IntCounter,
    /// `qoder_exporter_api_anomalies_total{kind}`, kinds in [`API_ANOMALIES`].
    pub api_anomalies: IntCounterVec,
    pub http_connections_refused: IntCounter,
    pub state_commit_duration: Histogram,
    pub queue_depth: IntGauge,
    pub build_info: GaugeVec,
    /// The configured price of one credit; no series unless configured.
    pub credit_price: GaugeVec,
}

/// The `reason` values of `qoder_exporter_api_request_failures_total`: a fixed set, so every
/// endpoint × reason series exists at zero from the first scrape (alerts over `rate()` and
/// `increase()` see a failure's first occurrence).
pub(crate) const FAILURE_REASONS: [&str; 16] = [
    "timeout",
    "connect",
    "tls",
    "status_400",
    "status_401",
    "status_403",
    "status_404",
    "status_413",
    "status_429",
    "status_4xx",
    "status_529",
    "status_5xx",
    "too_large",
    "body",
    "decode",
    "transport",
];

/// The API endpoints, as the `endpoint` label names them.
pub(crate) const ENDPOINTS: [&str; 6] = [
    "sessions",
    "session",
    "events",
    "thread_events",
    "threads",
    "agent",
];

impl ProcessMetrics {
    /// Creates the process metrics and registers them in `registry`.
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<ProcessMetrics> {
        let m = ProcessMetrics {
            api_problem: std::sync::Arc::default(),
            up: IntGauge::new(
                "qoder_up",
                "1 when the last round of Qoder API requests succeeded (reachable, token accepted), else 0.",
            )?,
            sessions: IntGaugeVec::new(
                Opts::new(
                    "qoder_sessions",
                    "Sessions being followed, by last known status.",
                ),
                &["status"],
            )?,
            api_requests: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_api_requests_total",
                    "Qoder API requests made.",
                ),
                &["endpoint"],
            )?,
            api_failures: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_api_request_failures_total",
                    "Qoder API requests that failed, by reason.",
                ),
                &["endpoint", "reason"],
            )?,
            api_duration: HistogramVec::new(
                HistogramOpts::new(
                    "qoder_exporter_api_request_duration_seconds",
                    "Qoder API request latency.",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["endpoint"],
            )?,
            last_poll: GaugeVec::new(
                Opts::new(
                    "qoder_exporter_last_successful_poll_timestamp_seconds",
                    "Unix time of the last poll round that succeeded; tells how fresh the data is. Absent until the first one.",
                ),
                &[],
            )?,
            events_invalid: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_events_invalid_total",
                    "Events that could not be read (not an object, no id, no type) and were skipped.",
                ),
                &["reason"],
            )?,
            fields_dropped: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_event_fields_dropped_total",
                    "Fields of otherwise readable events that were ignored (the event still counts), by reason: wrong_shape, out_of_range (a quantity over 1e9), not_json (a byte that is not UTF-8, NaN or Infinity).",
                ),
                &["reason"],
            )?,
            events_duplicate: IntCounter::new(
                "qoder_exporter_events_duplicate_total",
                "Events the API returned again after they were counted; skipped.",
            )?,
            series_dropped: IntCounter::new(
                "qoder_exporter_series_dropped_total",
                "Label sets of committed batches counted under `other` because --metrics.max-series was reached (a label set that comes back in another batch counts again).",
            )?,
            cursor_resets: IntCounter::new(
                "qoder_exporter_cursor_resets_total",
                "Times a session's event cursor was refused and the log re-read from the start.",
            )?,
            pages_cut: IntCounter::new(
                "qoder_exporter_event_pages_cut_total",
                "Event pages longer than 1000 events, read in parts (the API was asked for 100).",
            )?,
            spans_exported: IntCounter::new(
                "qoder_exporter_spans_exported_total",
                "Spans accepted by the OTLP endpoint.",
            )?,
            spans_dropped: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_spans_dropped_total",
                    "Spans given up on, by reason.",
                ),
                &["reason"],
            )?,
            span_export_failures: IntCounter::new(
                "qoder_exporter_span_export_failures_total",
                "OTLP export attempts that failed; the spans stay in the outbox and are sent again.",
            )?,
            span_outbox_turns: IntGauge::new(
                "qoder_exporter_span_outbox_turns",
                "Closed turns whose spans wait in the outbox for the OTLP endpoint (bounded by --otlp.outbox-max-turns).",
            )?,
            otlp_exported: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_otlp_exported_total",
                    "Metric data points and log records the OTLP endpoint accepted, by signal.",
                ),
                &["signal"],
            )?,
            otlp_export_failures: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_otlp_export_failures_total",
                    "OTLP pushes of metrics or logs that failed, by signal (metrics: the next push carries the same totals; logs: the records stay in the outbox).",
                ),
                &["signal"],
            )?,
            otlp_dropped: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_otlp_dropped_total",
                    "Metric data points and log records given up on, by signal and reason (rejected: the endpoint refused them; outbox_full: logs past --otlp.logs.outbox-max-records).",
                ),
                &["signal", "reason"],
            )?,
            otlp_last_success: GaugeVec::new(
                Opts::new(
                    "qoder_exporter_otlp_last_success_timestamp_seconds",
                    "Unix time of the last OTLP push the endpoint accepted, by signal.",
                ),
                &["signal"],
            )?,
            log_outbox_records: IntGauge::new(
                "qoder_exporter_log_outbox_records",
                "Log records waiting in the outbox for the OTLP endpoint (bounded by --otlp.logs.outbox-max-records).",
            )?,
            state_commits: IntCounter::new(
                "qoder_exporter_state_commits_total",
                "Batches committed to the state store.",
            )?,
            state_commit_failures: IntCounter::new(
                "qoder_exporter_state_commit_failures_total",
                "Batches whose commit failed; the batch is read again.",
            )?,
            state_writable: IntGauge::new(
                "qoder_exporter_state_writable",
                "1 while the state file takes commits; 0 from a failed commit (disk full, locked, read-only) until one succeeds. /readyz fails meanwhile.",
            )?,
            http_connections: IntGauge::new(
                "qoder_exporter_http_connections",
                "Connections open on the web port (bounded by --web.max-connections).",
            )?,
            sessions_not_followed: IntCounter::new(
                "qoder_exporter_sessions_not_followed_total",
                "Session list entries not followed because --qoder.max-sessions sessions are known (an entry listed again counts again).",
            )?,
            api_anomalies: IntCounterVec::new(
                Opts::new(
                    "qoder_exporter_api_anomalies_total",
                    "Times the API broke its own paging rules, by kind (the exporter counted nothing twice; see the README).",
                ),
                &["kind"],
            )?,
            http_connections_refused: IntCounter::new(
                "qoder_exporter_http_connections_refused_total",
                "Connections closed on arrival because --web.max-connections were open.",
            )?,
            state_commit_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "qoder_exporter_state_commit_duration_seconds",
                    "Time to apply and commit one batch.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ]),
            )?,
            queue_depth: IntGauge::new(
                "qoder_exporter_pipeline_queue_depth",
                "Batches waiting for the pipeline (bounded; a full queue slows the poller).",
            )?,
            build_info: GaugeVec::new(
                Opts::new("qoder_exporter_build_info", "Build information; always 1."),
                &["version", "revision"],
            )?,
            credit_price: GaugeVec::new(
                Opts::new(
                    "qoder_credit_price",
                    "The configured price of one Qoder credit (--cost.credit-price), by currency; money is credits times this.",
                ),
                &["currency"],
            )?,
        };
        registry.register(Box::new(m.up.clone()))?;
        registry.register(Box::new(m.sessions.clone()))?;
        registry.register(Box::new(m.api_requests.clone()))?;
        registry.register(Box::new(m.api_failures.clone()))?;
        registry.register(Box::new(m.api_duration.clone()))?;
        registry.register(Box::new(m.last_poll.clone()))?;
        registry.register(Box::new(m.events_invalid.clone()))?;
        registry.register(Box::new(m.fields_dropped.clone()))?;
        registry.register(Box::new(m.events_duplicate.clone()))?;
        registry.register(Box::new(m.series_dropped.clone()))?;
        registry.register(Box::new(m.cursor_resets.clone()))?;
        registry.register(Box::new(m.pages_cut.clone()))?;
        registry.register(Box::new(m.spans_exported.clone()))?;
        registry.register(Box::new(m.spans_dropped.clone()))?;
        registry.register(Box::new(m.span_export_failures.clone()))?;
        registry.register(Box::new(m.span_outbox_turns.clone()))?;
        registry.register(Box::new(m.otlp_exported.clone()))?;
        registry.register(Box::new(m.otlp_export_failures.clone()))?;
        registry.register(Box::new(m.otlp_dropped.clone()))?;
        registry.register(Box::new(m.otlp_last_success.clone()))?;
        registry.register(Box::new(m.state_commits.clone()))?;
        registry.register(Box::new(m.state_commit_failures.clone()))?;
        registry.register(Box::new(m.state_writable.clone()))?;
        registry.register(Box::new(m.http_connections.clone()))?;
        registry.register(Box::new(m.sessions_not_followed.clone()))?;
        registry.register(Box::new(m.api_anomalies.clone()))?;
        registry.register(Box::new(m.http_connections_refused.clone()))?;
        registry.register(Box::new(m.state_commit_duration.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.build_info.clone()))?;
        registry.register(Box::new(m.credit_price.clone()))?;
        // Series that alerts rate() over exist from the start, at zero.
        for e in ENDPOINTS {
            m.api_requests.with_label_values(&[e]);
            for r in FAILURE_REASONS {
                m.api_failures.with_label_values(&[e, r]);
            }
        }
        for r in [
            "not_object",
            "missing_id",
            "missing_type",
            "too_long",
            "decreasing_snapshot",
        ] {
            m.events_invalid.with_label_values(&[r]);
        }
        for r in crate::event::DroppedFields::REASONS {
            m.fields_dropped.with_label_values(&[r]);
        }
        for k in API_ANOMALIES {
            m.api_anomalies.with_label_values(&[k]);
        }
        // The outbox gives up on spans when it is full, when the endpoint refuses a turn's
        // spans as malformed (a retry cannot help), or when a turn cannot become spans.
        for r in ["outbox_full", "rejected", "invalid"] {
            m.spans_dropped.with_label_values(&[r]);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::REVISION])
            .set(1.0);
        Ok(m)
    }

    /// Creates a switched-on signal's delivery series at zero (alerts see the first failure).
    /// The log outbox gauge is registered only with logs on.
    pub(crate) fn otlp_signal_on(&self, registry: &Registry, signal: &str) {
        self.otlp_exported.with_label_values(&[signal]);
        self.otlp_export_failures.with_label_values(&[signal]);
        self.otlp_dropped.with_label_values(&[signal, "rejected"]);
        if signal == "logs" {
            self.otlp_dropped
                .with_label_values(&[signal, "outbox_full"]);
            let _ = registry.register(Box::new(self.log_outbox_records.clone()));
        }
    }

    /// Says what went wrong with the API (`None`: it works again).
    pub(crate) fn set_api_problem(&self, problem: Option<String>) {
        *self.api_problem.write().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    pub(crate) fn api_problem(&self) -> Option<String> {
        self.api_problem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a successful poll round at `unix` seconds.
    pub(crate) fn set_last_poll(&self, unix: f64) {
        self.last_poll.with_label_values::<&str>(&[]).set(unix);
    }

    /// The last successful poll, if there was one.
    pub(crate) fn last_poll(&self) -> Option<f64> {
        // Read through `collect`: asking for the child would create it (at 0).
        self.last_poll
            .collect()
            .first()
            .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().value()))
            .filter(|t| *t > 0.0)
    }

    /// Exports the configured credit price (`--cost.credit-price`, `--cost.currency`).
    pub(crate) fn set_credit_price(&self, price: Option<&crate::config::CreditPrice>) {
        if let Some(p) = price {
            self.credit_price
                .with_label_values(&[p.currency.as_str()])
                .set(p.price);
        }
    }
}

/// A registry with both kinds of metrics in it.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub durable: std::sync::Arc<DurableMetrics>,
    pub process: ProcessMetrics,
    /// The bounded per-session series.
    pub sessions: std::sync::Arc<super::session_series::SessionSeries>,
    /// Serialises renders: the encoder's buffers are reused (see `render`).
    render_lock: std::sync::Arc<Mutex<()>>,
}

/// Content type of the classic text format, version 0.0.4.
pub(crate) const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let process = ProcessMetrics::register(&registry)?;
        // Not in the registry: rendered by `render` itself (see there).
        let durable = std::sync::Arc::new(DurableMetrics::new());
        // `process_*` (CPU, resident memory, open and maximum file descriptors, start time),
        // as every Prometheus exporter has them: from the first scrape.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let sessions = std::sync::Arc::new(super::session_series::SessionSeries::new(
            crate::config::DEFAULT_SESSION_SERIES_LIMIT,
        ));
        registry.register(Box::new(SessionCollector(sessions.clone())))?;
        Ok(Metrics {
            registry,
            durable,
            process,
            sessions,
            render_lock: std::sync::Arc::new(Mutex::new(())),
        })
    }

    /// Renders every family, in name order, in the exposition format asked for.
    ///
    /// The event-derived families are most of the series (50 000 at the budget) and are
    /// written to text straight from their values: going through the prometheus crate's
    /// protobuf structs and its `TextEncoder` took 11 ms at 50 000 series, this path 3 ms
    /// (BENCHMARKS.md), with the same bytes (a test compares them).
    pub fn render(&self, format: Exposition) -> (Vec<u8>, String) {
        use prometheus::Encoder;
        let _guard = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        let others = self.registry.gather();
        if format == Exposition::Protobuf {
            let mut families = others.clone();
            families.extend(self.durable.collect());
            families.sort_by(|a, b| a.name().cmp(b.name()));
            let mut buf = Vec::with_capacity(64 * 1024);
            let enc = prometheus::ProtobufEncoder::new();
            if enc.encode(&families, &mut buf).is_ok() {
                return (buf, enc.format_type().to_owned());
            }
        }
        let om = format == Exposition::OpenMetrics;
        let durable = self.durable.families_as(format);
        let mut buf =
            Vec::with_capacity(durable.iter().map(|(_, t)| t.len()).sum::<usize>() + 16 * 1024);
        let enc = prometheus::TextEncoder::new();
        let mut durable = durable.into_iter().peekable();
        for family in &others {
            while let Some((_, text)) = durable.next_if(|(name, _)| *name < family.name()) {
                buf.extend_from_slice(&text);
            }
            if om {
                super::openmetrics::write_family(&mut buf, family);
            } else {
                // Encoding into a Vec cannot fail for well-formed families.
                let _ = enc.encode(std::slice::from_ref(family), &mut buf);
            }
        }
        for (_, text) in durable {
            buf.extend_from_slice(&text);
        }
        if om {
            buf.extend_from_slice(super::openmetrics::EOF);
            return (buf, super::openmetrics::CONTENT_TYPE.to_owned());
        }
        (buf, TEXT_FORMAT.to_owned())
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// The classic text format 0.0.4 (the default).
    Text,
    /// Delimited protobuf (`io.prometheus.client.MetricFamily`).
    Protobuf,
    /// OpenMetrics 1.0.0, with exemplars.
    OpenMetrics,
}

#[derive(Debug)]
struct SessionCollector(std::sync::Arc<super::session_series::SessionSeries>);

impl Collector for SessionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_family_as_declared() {
        // The contract is declared once (SPECS); the README's tables must say the same.
        for (i, f) in Family::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i, "SPECS follows Family::ALL");
        }
        let readme = include_str!("../../README.md");
        for f in Family::ALL {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", f.name())))
                .unwrap_or_else(|| panic!("README has no row for {}", f.name()));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let kind = if f.buckets().is_some() {
                "histogram"
            } else {
                "counter"
            };
            assert_eq!(cells[2], kind, "{}: type", f.name());
            let labels: Vec<&str> = cells[3].split(", ").map(|l| l.trim_matches('`')).collect();
            assert_eq!(labels, f.label_names(), "{}: labels", f.name());
        }
        // Every process family is named in the README too.
        let m = Metrics::new().expect("metrics");
        m.process.otlp_signal_on(&m.registry, "logs");
        for family in m.registry.gather() {
            assert!(
                readme.contains(family.name()) || family.name().starts_with("process_"),
                "README does not name {}",
                family.name()
            );
        }
    }

    #[test]
    fn a_series_example_is_only_ever_replaced_by_a_newer_one() {
        let m = Metrics::new().expect("metrics");
        let labels = ["coder", "qwen"];
        let pairs = [
            ("agent".to_owned(), "coder".to_owned()),
            ("model".to_owned(), "qwen".to_owned()),
        ];
        let batch = |times: &[i64]| {
            let mut d = Delta::default();
            for (i, t) in times.iter().enumerate() {
                d.inc(Family::ModelRequests, &labels, 1.0);
                let span = format!("evt_{i}");
                let at = Example {
                    session_id: "sess_1",
                    trace_key: "turn_1",
                    span_event_id: &span,
                    time_ns: Some(*t),
                };
                d.exemplar(Family::ModelRequests, &labels, at, 1.0);
            }
            m.durable.publish(m.durable.stage(&d));
            m.durable
                .exemplar_of("qoder_model_requests_total", &pairs)
                .and_then(|e| e.time_ns)
        };
        assert_eq!(batch(&[20, 10]), Some(20), "within a batch");
        assert_eq!(batch(&[15]), Some(20), "a later batch with an older event");
        assert_eq!(batch(&[30]), Some(30));
        assert!(replaces(Some(1), None) && !replaces(None, Some(1)) && replaces(None, None));
    }

    #[test]
    fn openmetrics_has_the_same_samples_and_exemplars_where_they_belong() {
        let m = Metrics::new().expect("metrics");
        let mut d = Delta::default();
        let at = Example {
            session_id: "sess_1",
            trace_key: "turn_1",
            span_event_id: "evt_1",
            time_ns: Some(1_700_000_000_123_000_000),
        };
        d.inc(Family::ModelRequests, &["coder", "qwen"], 1.0);
        d.exemplar(Family::ModelRequests, &["coder", "qwen"], at, 1.0);
        d.observe_ns(Family::TurnDuration, &["coder"], 3_000_000_000);
        d.exemplar(Family::TurnDuration, &["coder"], at, 3.0);
        d.inc(Family::Tokens, &["input", "coder", "qwen"], 5.0);
        m.durable.publish(m.durable.stage(&d));
        let (classic, ct) = m.render(Exposition::Text);
        assert_eq!(ct, TEXT_FORMAT);
        let (om, ct) = m.render(Exposition::OpenMetrics);
        assert_eq!(ct, super::super::openmetrics::CONTENT_TYPE);
        let (classic, om) = (
            String::from_utf8(classic).expect("utf8"),
            String::from_utf8(om).expect("utf8"),
        );
        assert!(om.ends_with("# EOF\n"), "ends with # EOF");
        assert!(
            !classic.contains(" # {"),
            "no exemplar in the classic format"
        );
        // The same samples, once the exemplars are cut off.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" # {").next().unwrap_or(l).to_owned())
                .filter(|l| !l.starts_with("process_"))
                .collect()
        };
        assert_eq!(samples(&classic), samples(&om));
        assert!(om.contains("# TYPE qoder_model_requests counter\n"), "{om}");
        assert!(om.contains("# TYPE qoder_exporter_api_requests counter\n"));
        let trace = hex_of(&crate::sinks::traces::trace_id("sess_1", "turn_1").to_bytes());
        let span =
            hex_of(&crate::sinks::traces::span_id("sess_1", "invoke_agent", "evt_1").to_bytes());
        let suffix =
            format!(" # {{trace_id=\"{trace}\",span_id=\"{span}\"}} 1 1700000000.123000000");
        assert!(
            om.contains(&format!(
                "qoder_model_requests_total{{agent=\"coder\",model=\"qwen\"}} 1{suffix}\n"
            )),
            "{om}"
        );
        // 3 s falls in the bucket le="5" of the turn buckets, and only there.
        let with: Vec<&str> = om
            .lines()
            .filter(|l| l.starts_with("qoder_turn_duration_seconds") && l.contains(" # {"))
            .collect();
        assert_eq!(with.len(), 1, "{with:?}");
        assert!(
            with[0]
                .starts_with("qoder_turn_duration_seconds_bucket{agent=\"coder\",le=\"5\"} 1 # {"),
            "{with:?}"
        );
        assert!(!om.contains(
            "qoder_tokens_total{token_type=\"input\",agent=\"coder\",model=\"qwen\"} 5 #"
        ));
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_borrowed_key_finds_the_owned_one() {
        use std::hash::BuildHasher;
        let state = hashbrown::DefaultHashBuilder::default();
        let owned: SeriesKey = (
            Family::Tokens,
            vec!["input".into(), "coder".into(), "m".into()],
        );
        let borrowed = LabelsRef(Family::Tokens, &["input", "coder", "m"]);
        assert_eq!(state.hash_one(&owned), state.hash_one(&borrowed));
        // Updates to one series, long labels cut alike, land in one entry.
        let long = "x".repeat(300);
        let mut d = Delta::default();
        for _ in 0..3 {
            d.inc(Family::Events, &["user.message", &long], 1.0);
            d.observe_ns(Family::TurnDuration, &[&long], 5);
        }
        assert_eq!(d.counters.len(), 1);
        assert_eq!(d.counters.values().copied().sum::<u64>(), 3_000_000);
        assert_eq!(d.observations.values().map(Vec::len).sum::<usize>(), 3);
        let (_, labels) = d.counters.keys().next().expect("one");
        assert_eq!(labels[1].len(), MAX_LABEL_BYTES);
    }

    #[test]
    fn the_direct_text_path_writes_what_the_prometheus_encoder_writes() {
        use prometheus::Encoder;
        let m = Metrics::new().expect("metrics");
        let mut d = Delta::default();
        // Label values that need escaping, several series per family, histograms.
        for agent in ["coder", "a\"quoted\" \\ back\nslash", "zeta", "ünïcode"] {
            d.inc(Family::Events, &["user.message", agent], 3.0);
            d.inc(Family::Events, &["agent.message", agent], 1.0);
            d.inc(Family::Tokens, &["input", agent, "qwen3-coder"], 1234.0);
            d.inc(Family::Tokens, &["output", agent, "claude"], 99.0);
            d.inc(Family::Credits, &[agent, "qwen3-coder"], 0.125);
            d.observe_ns(Family::ToolCallDuration, &["Bash", agent], 1_234_567_890);
            d.observe_ns(Family::TurnDuration, &[agent], 61_000_000_000);
        }
        d.inc(
            Family::SessionErrors,
            &["model_error", "exhausted", "coder"],
            1.0,
        );
        m.durable.publish(m.durable.stage(&d));
        // The reference: the same metrics gathered by a registry (which sorts families and
        // series) and written by the prometheus crate's encoder.
        #[derive(Debug)]
        struct Shared(std::sync::Arc<DurableMetrics>);
        impl Collector for Shared {
            fn desc(&self) -> Vec<&Desc> {
                self.0.desc()
            }
            fn collect(&self) -> Vec<proto::MetricFamily> {
                self.0.collect()
            }
        }
        let reference = Registry::new();
        reference
            .register(Box::new(Shared(m.durable.clone())))
            .expect("register");
        let mut families = m.registry.gather();
        families.extend(reference.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut expected = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&families, &mut expected)
            .expect("encode");
        let (text, _) = m.render(Exposition::Text);
        // `process_*` move between the two renders (CPU time, memory); the rest must not.
        let steady = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .filter(|l| !l.contains("process_"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        let (got, want) = (steady(&text), steady(&expected));
        if got != want {
            let first = got.lines().zip(want.lines()).find(|(g, w)| g != w);
            panic!("first difference (got, want): {first:?}");
        }
        // And the protobuf path has every family.
        let (proto, _) = m.render(Exposition::Protobuf);
        assert!(proto.len() > 1000);
    }

    #[test]
    fn past_the_series_budget_new_label_sets_fold_into_other_and_nothing_is_lost() {
        let m = DurableMetrics::new();
        // Ten counter series, or one counter and a histogram (14 series: 11 buckets, +Inf,
        // _sum, _count).
        m.set_max_series(10);
        let mut d = Delta::default();
        for a in 0..25 {
            d.inc(
                Family::Events,
                &["user.message", &format!("agent-{a:02}")],
                2.0,
            );
        }
        d.observe_ns(Family::TurnDuration, &["agent-00"], 1_000_000_000);
        let staged = m.stage(&d);
        assert_eq!(
            staged.folded, 16,
            "15 counters and the histogram past the budget"
        );
        m.publish(staged);
        assert_eq!(m.total(Family::Events), 50.0, "every count kept");
        assert_eq!(
            m.counter(Family::Events, &["user.message", "agent-08"]),
            2.0
        );
        assert_eq!(m.counter(Family::Events, &["other", "other"]), 30.0);
        assert_eq!(m.total(Family::TurnDuration), 1.0);
        // Known series still move; new ones keep folding in later batches too.
        let mut d = Delta::default();
        d.inc(Family::Events, &["user.message", "agent-00"], 1.0);
        d.inc(Family::Events, &["user.message", "agent-99"], 1.0);
        let staged = m.stage(&d);
        assert_eq!(staged.folded, 1);
        m.publish(staged);
        assert_eq!(
            m.counter(Family::Events, &["user.message", "agent-00"]),
            3.0
        );
        assert_eq!(m.counter(Family::Events, &["other", "other"]), 31.0);
        // Series restored from the state are kept whatever the budget.
        let restored = DurableMetrics::new();
        restored.set_max_series(1);
        restored.restore(m.inner.read().expect("lock").series.clone());
        assert_eq!(restored.total(Family::Events), 52.0);
        // 0: no budget.
        let open = DurableMetrics::new();
        open.set_max_series(0);
        let mut d = Delta::default();
        for a in 0..300 {
            d.inc(
                Family::Events,
                &["user.message", &format!("agent-{a}")],
                1.0,
            );
        }
        assert_eq!(open.stage(&d).folded, 0);
    }

    #[test]
    fn counters_and_histograms_stage_then_publish() {
        let m = DurableMetrics::new();
        let mut d = Delta::default();
        d.inc(Family::Events, &["user.message", "a"], 1.0);
        d.inc(Family::Events, &["user.message", "a"], 2.0);
        d.observe_ns(Family::TurnDuration, &["a"], 3_000_000_000);
        d.observe_ns(Family::TurnDuration, &["a"], 500_000_000);
        d.observe_ns(Family::TurnDuration, &["a"], 99_999_000_000_000);
        let staged = m.stage(&d);
        assert_eq!(
            m.counter(Family::Events, &["user.message", "a"]),
            0.0,
            "not yet published"
        );
        m.publish(staged);
        assert_eq!(m.counter(Family::Events, &["user.message", "a"]), 3.0);
        let fam = m.collect();
        let hist = fam
            .iter()
            .find(|f| f.name() == "qoder_turn_duration_seconds")
            .expect("hist");
        let h = hist.get_metric()[0].get_histogram();
        assert_eq!(h.get_sample_count(), 3);
        assert_eq!(h.get_sample_sum(), 100_002.5);
        // 0.5 ≤ 1, 3 ≤ 5; the huge one only in +Inf. The sum is kept in microseconds.
        let cum: Vec<u64> = h
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        assert_eq!(cum, vec![1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn staging_adds_to_restored_values() {
        let m = DurableMetrics::new();
        m.restore([(
            (Family::Credits, vec!["a".into(), "m".into()]),
            SeriesValue::Counter(1_500_000),
        )]);
        let mut d = Delta::default();
        d.inc(Family::Credits, &["a", "m"], 0.25);
        let staged = m.stage(&d);
        assert_eq!(
            staged.values,
            vec![(
                (Family::Credits, vec!["a".into(), "m".into()]),
                SeriesValue::Counter(1_750_000)
            )]
        );
    }

    #[test]
    fn fractional_sums_do_not_depend_on_order() {
        let values = [0.1, 0.29, 1.37, 0.07, 2.99, 0.01, 0.33];
        let sum_in = |order: &[usize]| {
            let m = DurableMetrics::new();
            for &i in order {
                let mut d = Delta::default();
                d.inc(Family::Credits, &["a", "m"], values[i]);
                d.observe_ns(
                    Family::TurnDuration,
                    &["a"],
                    1_000_000_001 * (i as i64 + 1) / 7,
                );
                m.publish(m.stage(&d));
            }
            let fam = m.collect();
            let h = fam
                .iter()
                .find(|f| f.name() == "qoder_turn_duration_seconds")
                .expect("h");
            (
                m.counter(Family::Credits, &["a", "m"]).to_bits(),
                h.get_metric()[0].get_histogram().get_sample_sum().to_bits(),
            )
        };
        assert_eq!(
            sum_in(&[0, 1, 2, 3, 4, 5, 6]),
            sum_in(&[6, 4, 2, 0, 5, 3, 1])
        );
        assert_eq!(f64::from_bits(sum_in(&[0, 1, 2, 3, 4, 5, 6]).0), 5.16);
    }

    #[test]
    fn event_type_label_is_capped_at_64() {
        let m = DurableMetrics::new();
        let mut d = Delta::default();
        for i in 0..70 {
            d.inc(Family::Events, &[&format!("t{i:02}"), "a"], 1.0);
        }
        m.publish(m.stage(&d));
        assert_eq!(m.counter(Family::Events, &["other", "a"]), 6.0);
        assert_eq!(m.total(Family::Events), 70.0);
        // A value seen before the cap keeps its own series.
        let mut d = Delta::default();
        d.inc(Family::Events, &["t00", "a"], 1.0);
        d.inc(Family::Events, &["new", "a"], 1.0);
        m.publish(m.stage(&d));
        assert_eq!(m.counter(Family::Events, &["t00", "a"]), 2.0);
        assert_eq!(m.counter(Family::Events, &["other", "a"]), 7.0);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_fresh_registry_has_the_process_families_and_every_failure_series() {
        let metrics = Metrics::new().expect("metrics");
        let (text, _) = metrics.render(Exposition::Text);
        let text = String::from_utf8(text).expect("utf8");
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        let failures = text
            .lines()
            .filter(|l| l.starts_with("qoder_exporter_api_request_failures_total{"))
            .count();
        assert_eq!(failures, ENDPOINTS.len() * FAILURE_REASONS.len());
    }

    #[test]
    fn text_render_has_help_and_types() {
        let metrics = Metrics::new().expect("metrics");
        let mut d = Delta::default();
        d.inc(Family::Tokens, &["input", "a", "m"], 10.0);
        metrics.durable.publish(metrics.durable.stage(&d));
        let (body, ct) = metrics.render(Exposition::Text);
        let text = String::from_utf8(body).expect("utf8");
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        assert!(text.contains("# HELP qoder_tokens_total "));
        assert!(text.contains("# TYPE qoder_tokens_total counter"));
        assert!(text.contains(r#"qoder_tokens_total{agent="a",model="m",token_type="input"} 10"#));
        assert!(text.contains("qoder_exporter_build_info{"));
        let (_, ct) = metrics.render(Exposition::Protobuf);
        assert!(ct.contains("application/vnd.google.protobuf"));
    }
}
