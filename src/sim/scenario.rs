//! Simulated sessions: event logs in all three generations of the API's shapes, and the totals
//! the exporter must arrive at, counted while the log is written (not by parsing it back).
//!
//! The totals follow the telemetry contract in its plain words, independently of the
//! exporter's tracker, so a test comparing the two checks one against the other.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The API generation a session's events are shaped after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    G1,
    G2,
    G3,
}

/// One event of a simulated log.
#[derive(Debug, Clone)]
pub struct SimEvent {
    /// The id the server pages by; the JSON may omit it (a hostile, unreadable event).
    pub id: String,
    /// Clock step at which the event becomes visible.
    pub step: u64,
    pub json: String,
}

#[derive(Debug, Clone)]
pub struct SimSession {
    pub id: String,
    pub generation: Generation,
    pub created_step: u64,
    /// The session object as `GET /sessions/{id}` returns it (status filled in on the fly).
    pub object: Map<String, Value>,
    pub events: Vec<SimEvent>,
    /// The log ends with a termination event.
    pub terminal: bool,
    /// Steps at which a turn is over (idle), for the session's status.
    pub idle_steps: Vec<u64>,
    /// The object's cumulative `usage` as it stands from each step on.
    pub usage: Vec<(u64, Value)>,
    /// Sub-agent threads and their own event streams.
    pub threads: Vec<SimThread>,
}

/// A sub-agent thread of a simulated session.
#[derive(Debug, Clone)]
pub struct SimThread {
    pub id: String,
    pub agent: String,
    /// The thread's stream; events cross-posted to the session's stream keep their ids.
    pub events: Vec<SimEvent>,
}

/// One expected series: metric name, label pairs sorted by name, value.
pub(crate) type SeriesRow = (String, Vec<(String, String)>, f64);

/// Totals by label values, in the contract's label order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub events: BTreeMap<(String, String), f64>,
    pub tokens: BTreeMap<(String, String, String), f64>,
    pub credits: BTreeMap<(String, String), f64>,
    pub turns: BTreeMap<(String, String), f64>,
    pub turn_durations: BTreeMap<String, f64>,
    pub model_requests: BTreeMap<(String, String), f64>,
    pub model_request_errors: BTreeMap<(String, String), f64>,
    pub request_durations: BTreeMap<(String, String), f64>,
    pub tool_calls: BTreeMap<(String, String), f64>,
    pub tool_errors: BTreeMap<(String, String), f64>,
    pub session_errors: BTreeMap<(String, String, String), f64>,
    pub session_credits: BTreeMap<(String, String), f64>,
    pub active_seconds: BTreeMap<String, f64>,
    pub server_tools: BTreeMap<(String, String), f64>,
    pub thread_turns: BTreeMap<(String, String), f64>,
    pub threads_created: BTreeMap<String, f64>,
    pub tool_durations: BTreeMap<(String, String), f64>,
    /// Events served that cannot be read (no id); not in `events`.
    pub invalid: u64,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, f64>, k: K, by: f64) {
    *m.entry(k).or_insert(0.0) += by;
}

impl Totals {
    /// Every series as `(metric name, [(label, value)], value)`, histograms as `_count`.
    pub fn series(&self) -> Vec<SeriesRow> {
        let mut out = Vec::new();
        let l = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            let mut v: Vec<_> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            v.sort();
            v
        };
        for ((t, a), v) in &self.events {
            out.push((
                "qoder_events_total".into(),
                l(&[("event_type", t), ("agent", a)]),
                *v,
            ));
        }
        for ((t, a, m), v) in &self.tokens {
            out.push((
                "qoder_tokens_total".into(),
                l(&[("token_type", t), ("agent", a), ("model", m)]),
                *v,
            ));
        }
        for ((a, m), v) in &self.credits {
            out.push((
                "qoder_credits_total".into(),
                l(&[("agent", a), ("model", m)]),
                *v,
            ));
        }
        for ((s, a), v) in &self.turns {
            out.push((
                "qoder_turns_total".into(),
                l(&[("stop_reason", s), ("agent", a)]),
                *v,
            ));
        }
        for (a, v) in &self.turn_durations {
            out.push((
                "qoder_turn_duration_seconds_count".into(),
                l(&[("agent", a)]),
                *v,
            ));
        }
        for ((a, m), v) in &self.model_requests {
            out.push((
                "qoder_model_requests_total".into(),
                l(&[("agent", a), ("model", m)]),
                *v,
            ));
        }
        for ((a, m), v) in &self.model_request_errors {
            out.push((
                "qoder_model_request_errors_total".into(),
                l(&[("agent", a), ("model", m)]),
                *v,
            ));
        }
        for ((a, m), v) in &self.request_durations {
            out.push((
                "qoder_model_request_duration_seconds_count".into(),
                l(&[("agent", a), ("model", m)]),
                *v,
            ));
        }
        for ((t, a), v) in &self.tool_calls {
            out.push((
                "qoder_tool_calls_total".into(),
                l(&[("tool", t), ("agent", a)]),
                *v,
            ));
        }
        for ((t, a), v) in &self.tool_errors {
            out.push((
                "qoder_tool_call_errors_total".into(),
                l(&[("tool", t), ("agent", a)]),
                *v,
            ));
        }
        for ((e, r, a), v) in &self.session_errors {
            out.push((
                "qoder_session_errors_total".into(),
                l(&[("error_type", e), ("retry_status", r), ("agent", a)]),
                *v,
            ));
        }
        for ((a, k), v) in &self.session_credits {
            out.push((
                "qoder_session_credits_total".into(),
                l(&[("agent", a), ("kind", k)]),
                *v,
            ));
        }
        for (a, v) in &self.active_seconds {
            out.push((
                "qoder_session_active_seconds_total".into(),
                l(&[("agent", a)]),
                *v,
            ));
        }
        for ((a, t), v) in &self.server_tools {
            out.push((
                "qoder_server_tool_uses_total".into(),
                l(&[("agent", a), ("tool", t)]),
                *v,
            ));
        }
        for ((a, s), v) in &self.thread_turns {
            out.push((
                "qoder_thread_turns_total".into(),
                l(&[("agent", a), ("stop_reason", s)]),
                *v,
            ));
        }
        for (a, v) in &self.threads_created {
            out.push(("qoder_threads_created_total".into(), l(&[("agent", a)]), *v));
        }
        for ((t, a), v) in &self.tool_durations {
            out.push((
                "qoder_tool_call_duration_seconds_count".into(),
                l(&[("tool", t), ("agent", a)]),
                *v,
            ));
        }
        out
    }

    pub fn event_count(&self) -> f64 {
        self.events.values().sum()
    }
}

/// The agent object `GET /agents/{id}` returns, for the simulated agents.
pub fn agent_object(id: &str) -> Option<Value> {
    let a = AGENTS.iter().find(|a| a.id == id)?;
    Some(
        json!({"id": a.id, "type": "agent", "name": a.name, "model": {"id": a.model}, "version": 1}),
    )
}

struct Agent {
    id: &'static str,
    name: &'static str,
    model: &'static str,
}

const AGENTS: [Agent; 3] = [
    Agent {
        id: "agent_01coder",
        name: "coder",
        model: "qwen3-coder-plus",
    },
    Agent {
        id: "agent_02review",
        name: "reviewer",
        model: "qoder-ultimate",
    },
    Agent {
        id: "agent_03triage",
        name: "triage",
        model: "auto",
    },
];
const TOOLS: [&str; 6] = ["Bash", "Read", "Edit", "Grep", "WebFetch", "Write"];
const MCP_TOOLS: [&str; 2] = ["search_docs", "create_ticket"];
const ERRORS: [&str; 4] = [
    "model_overloaded_error",
    "model_rate_limited_error",
    "unknown_error",
    "mcp_connection_failed_error",
];

/// Base time of the simulated logs: 2026-11-20T08:00:00Z.
const BASE_NS: i64 = 1_763_625_600_000_000_000;

/// Writes one session's log, adding what it contains to `totals`.
struct Writer<'a> {
    rng: &'a mut fastrand::Rng,
    totals: &'a mut Totals,
    generation: Generation,
    agent_label: String,
    session_model: String,
    session_id: String,
    hostile: bool,
    events: Vec<SimEvent>,
    step: u64,
    time_ns: i64,
    idle_steps: Vec<u64>,
    /// Billed usage so far, in hundredths of a credit (model, sandbox) and whole units.
    model_cents: u64,
    sandbox_cents: u64,
    active_seconds: u64,
    web_searches: u64,
    usage: Vec<(u64, Value)>,
    /// A multi-agent session: the sub-agent's thread (id, agent name) and its stream.
    sub_agent: Option<(String, String)>,
    thread_created: bool,
    thread_events: Vec<SimEvent>,
}

const SUB_AGENT: &str = "researcher";

impl Writer<'_> {
    /// Emits an event of the sub-agent's thread onto its stream, and onto the session's
    /// stream too when `cross_post` (same id, as the API shows a thread's lifecycle and tool
    /// uses on both). Counted once, under the sub-agent.
    fn emit_thread(&mut self, kind: &str, mut fields: Value, cross_post: bool) -> String {
        let Some((tid, agent)) = self.sub_agent.clone() else {
            return String::new();
        };
        fields["session_thread_id"] = json!(tid);
        let coordinator = std::mem::replace(&mut self.agent_label, agent);
        let id = self.emit(kind, fields, None);
        self.agent_label = coordinator;
        if let Some(ev) = self.events.pop() {
            if cross_post {
                self.events.push(ev.clone());
            }
            self.thread_events.push(ev);
        }
        id
    }

    /// One turn of the sub-agent, run inside the coordinator's turn.
    fn sub_agent_turn(&mut self) {
        let Some((tid, agent)) = self.sub_agent.clone() else {
            return;
        };
        if !self.thread_created {
            self.thread_created = true;
            self.emit(
                "session.thread_created",
                json!({"session_thread_id": tid, "agent_name": agent}),
                None,
            );
            bump(&mut self.totals.threads_created, agent.clone(), 1.0);
        }
        self.emit_thread(
            "session.thread_status_running",
            json!({"agent_name": agent}),
            false,
        );
        let start = self.emit_thread("span.model_request_start", json!({}), false);
        let cents = self.rng.u32(1..200);
        self.model_cents += u64::from(cents);
        let credits = f64::from(cents) / 100.0;
        self.emit_thread(
            "span.model_request_end",
            json!({"model_request_start_id": start, "is_error": false, "model_usage": {"credits": credits}}),
            false,
        );
        let key = (agent.clone(), self.session_model.clone());
        bump(&mut self.totals.model_requests, key.clone(), 1.0);
        bump(&mut self.totals.request_durations, key.clone(), 1.0);
        bump(&mut self.totals.credits, key, credits);
        let tool = TOOLS[self.rng.usize(0..TOOLS.len())];
        let is_error = self.rng.u32(0..4) == 0;
        let use_id = self.emit_thread("agent.tool_use", json!({"name": tool, "input": {}}), true);
        self.emit_thread(
            "agent.tool_result",
            json!({"tool_use_id": use_id, "is_error": is_error}),
            false,
        );
        let key = (tool.to_owned(), agent.clone());
        bump(&mut self.totals.tool_calls, key.clone(), 1.0);
        bump(&mut self.totals.tool_durations, key.clone(), 1.0);
        if is_error {
            bump(&mut self.totals.tool_errors, key, 1.0);
        }
        self.emit_thread(
            "session.thread_status_idle",
            json!({"agent_name": agent, "stop_reason": {"type": "end_turn"}}),
            true,
        );
        bump(
            &mut self.totals.thread_turns,
            (agent, "end_turn".into()),
            1.0,
        );
    }

    /// The session's usage grows with every turn; G3 reports it as a `session.usage` snapshot
    /// event, and every generation but G1 shows it on the session object.
    fn usage_snapshot(&mut self) {
        let g = self.generation;
        if g == Generation::G1 {
            return;
        }
        // Work no request span describes (the account is charged for it all the same).
        self.model_cents += if g == Generation::G2 { 25 } else { 1 };
        if g == Generation::G3 {
            self.sandbox_cents += u64::from(self.rng.u32(1..20));
            self.active_seconds += u64::from(self.rng.u32(2..30));
            self.web_searches += u64::from(self.rng.u32(0..3) == 0);
        }
        #[allow(clippy::cast_precision_loss, reason = "hundredths of small numbers")]
        let (model, sandbox) = (
            self.model_cents as f64 / 100.0,
            self.sandbox_cents as f64 / 100.0,
        );
        let object = if g == Generation::G3 {
            let usage = json!({"model_credits": model, "sandbox_runtime_credits": sandbox,
                "total_credits": (self.model_cents + self.sandbox_cents) as f64 / 100.0,
                "active_seconds": self.active_seconds,
                "server_tool_use": {"web_search_requests": self.web_searches, "web_fetch_requests": 0}});
            let mut event = json!({"usage": usage});
            for k in ["model_credits", "sandbox_runtime_credits", "total_credits"] {
                event[k] = usage[k].clone();
            }
            self.emit("session.usage", event, None);
            usage
        } else {
            // The older object knew one figure: total credits.
            json!({"total_credits": model})
        };
        self.usage.push((self.step, object));
    }

    /// What the session's usage adds to the totals, once, at the end of its log.
    fn count_usage(&mut self) {
        if self.generation == Generation::G1 {
            return;
        }
        let agent = self.agent_label.clone();
        #[allow(clippy::cast_precision_loss, reason = "hundredths of small numbers")]
        let pairs = [
            ("model", self.model_cents as f64 / 100.0),
            ("sandbox_runtime", self.sandbox_cents as f64 / 100.0),
        ];
        for (kind, v) in pairs {
            if v > 0.0 {
                bump(
                    &mut self.totals.session_credits,
                    (agent.clone(), kind.into()),
                    v,
                );
            }
        }
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let (active, searches) = (self.active_seconds as f64, self.web_searches as f64);
        if active > 0.0 {
            bump(&mut self.totals.active_seconds, agent.clone(), active);
        }
        if searches > 0.0 {
            bump(
                &mut self.totals.server_tools,
                (agent, "web_search".into()),
                searches,
            );
        }
    }

    fn hex(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from_digit(self.rng.u32(0..16), 16).unwrap_or('0'))
            .collect()
    }

    fn time(&self) -> String {
        let secs = self.time_ns.div_euclid(1_000_000_000);
        let nanos = self.time_ns.rem_euclid(1_000_000_000);
        let t = time::OffsetDateTime::from_unix_timestamp(secs)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
            + time::Duration::nanoseconds(nanos);
        let base = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        match self.generation {
            // G1 writes nanoseconds, as the seed page shows.
            Generation::G1 => format!("{base}.{nanos:09}Z"),
            // G2 (Alibaba mirror) microseconds with an explicit offset.
            Generation::G2 => format!("{base}.{:06}+00:00", nanos / 1000),
            Generation::G3 => format!("{base}.{:03}Z", nanos / 1_000_000),
        }
    }

    /// Appends an event of `kind` with `fields`; returns its id.
    fn emit(&mut self, kind: &str, fields: Value, turn_id: Option<&str>) -> String {
        self.time_ns +=
            i64::from(self.rng.u32(150..4000)) * 1_000_000 + i64::from(self.rng.u32(0..1000));
        self.step += 1;
        let id = format!("evt_{}", self.hex(24));
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        m.insert("type".into(), json!(kind));
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        let t = self.time();
        match self.generation {
            Generation::G1 => {
                m.insert("session_id".into(), json!(self.session_id));
                if let Some(tid) = turn_id {
                    m.insert("turn_id".into(), json!(tid));
                }
                m.insert("schema_version".into(), json!("1.0"));
                m.insert("created_at".into(), json!(t));
                m.insert("processed_at".into(), json!(t));
            }
            Generation::G2 => {
                m.insert("created_at".into(), json!(t));
                m.insert("processed_at".into(), json!(t));
            }
            Generation::G3 => {
                m.insert("processed_at".into(), json!(t));
            }
        }
        bump(
            &mut self.totals.events,
            (kind.to_owned(), self.agent_label.clone()),
            1.0,
        );
        self.events.push(SimEvent {
            id: id.clone(),
            step: self.step,
            json: Value::Object(m).to_string(),
        });
        id
    }

    /// An event the exporter cannot read: no id on the wire (the server still pages by one).
    fn emit_unreadable(&mut self) {
        self.step += 1;
        let id = format!("evt_{}", self.hex(24));
        self.totals.invalid += 1;
        self.events.push(SimEvent {
            id,
            step: self.step,
            json: json!({"type": "agent.message", "content": "no id here"}).to_string(),
        });
    }

    fn content(&self, text: &str) -> Value {
        match self.generation {
            Generation::G1 => json!(text),
            _ => json!([{"type": "text", "text": text}]),
        }
    }

    fn tokens(&mut self) -> (f64, f64, f64, f64) {
        (
            f64::from(self.rng.u32(50..4000)),
            f64::from(self.rng.u32(10..1500)),
            f64::from(self.rng.u32(0..3) * self.rng.u32(0..2000)),
            f64::from(self.rng.u32(0..2) * self.rng.u32(0..800)),
        )
    }

    fn count_tokens(&mut self, model: &str, t: (f64, f64, f64, f64)) {
        for (kind, v) in [
            ("input", t.0),
            ("output", t.1),
            ("cache_read", t.2),
            ("cache_creation", t.3),
        ] {
            if v > 0.0 {
                bump(
                    &mut self.totals.tokens,
                    (kind.into(), self.agent_label.clone(), model.into()),
                    v,
                );
            }
        }
    }

    fn session_error(&mut self, retry: &str, turn_id: Option<&str>) -> String {
        let etype = ERRORS[self.rng.usize(0..ERRORS.len())];
        let fields = match (self.generation, self.rng.bool()) {
            // The seed page's shape: retry status at top level, plus `details`.
            (Generation::G1, _) | (Generation::G2, true) => json!({
                "error": {"message": "The operation was aborted due to timeout", "type": etype},
                "details": {"message": "The operation was aborted due to timeout", "name": "TimeoutError"},
                "retry_status": {"type": retry}
            }),
            _ => json!({
                "error": {"type": etype, "message": "upstream failed", "retry_status": {"type": retry}}
            }),
        };
        self.emit("session.error", fields, turn_id);
        bump(
            &mut self.totals.session_errors,
            (etype.into(), retry.into(), self.agent_label.clone()),
            1.0,
        );
        etype.to_owned()
    }

    fn turn(&mut self, anthropic_tokens: bool, g1_end_usage: bool) {
        let g = self.generation;
        let turn_id = (g == Generation::G1).then(|| format!("turn_{}", self.hex(24)));
        let tid = turn_id.as_deref();
        match g {
            Generation::G1 => {
                let c = self.content("Fix the failing test in parser.rs");
                self.emit("user.message", json!({"content": c}), tid);
                self.emit(
                    "session.status_rescheduled",
                    json!({"status": "rescheduled"}),
                    tid,
                );
            }
            Generation::G2 => {
                self.emit("session.status_running", json!({"status": "running"}), tid);
                let c = self.content("Review the open pull request");
                self.emit("user.message", json!({"content": c}), tid);
            }
            Generation::G3 => {
                self.emit("session.status_running", json!({}), tid);
                self.emit(
                    "session.thread_status_running",
                    json!({"session_thread_id": "sthr_main", "agent_name": self.agent_label}),
                    tid,
                );
                let c = self.content("Triage the new issues");
                self.emit("user.message", json!({"content": c}), tid);
            }
        }
        let mut request_tokens = false;
        let mut last_model = self.session_model.clone();
        for r in 0..self.rng.usize(1..4) {
            let model = self.session_model.clone();
            let span_id = format!("span_{}", self.hex(12));
            let start_fields = match g {
                Generation::G1 => json!({"model": model, "span_id": span_id}),
                _ => json!({}),
            };
            let start_id = self.emit("span.model_request_start", start_fields, tid);
            if self.rng.bool() {
                let f = match g {
                    Generation::G3 => json!({}),
                    _ => json!({"content": "thinking about it"}),
                };
                self.emit("agent.thinking", f, tid);
            }
            for _ in 0..self.rng.usize(0..3) {
                self.tool_call(tid);
            }
            if self.hostile && self.rng.u32(0..10) == 0 {
                self.emit_unreadable();
            }
            let mut msg = json!({"content": self.content("Done with this step.")});
            if self.hostile && self.rng.u32(0..8) == 0 {
                // A field of the wrong shape, or numbers no session reaches (they would pin a
                // counter at its ceiling): the event still counts, the field is ignored. Which
                // of the two follows from the log's length, so the random draws stay as they were.
                msg["usage"] = if self.events.len().is_multiple_of(2) {
                    json!("lots")
                } else {
                    json!({"input_tokens": 1e308, "output_tokens": u64::MAX})
                };
            }
            self.emit("agent.message", msg, tid);
            if self.hostile && self.rng.u32(0..8) == 0 {
                // Not quite JSON, as some encoders write it: the event still counts.
                if let Some(last) = self.events.last_mut()
                    && let Some(body) = last.json.strip_suffix('}')
                {
                    last.json = format!("{body},\"score\":NaN}}");
                }
            }
            if r == 0 && self.rng.u32(0..8) == 0 {
                self.session_error("retrying", tid);
            }
            let is_error = g == Generation::G3 && self.rng.u32(0..10) == 0;
            let end_fields = match g {
                Generation::G1 => {
                    let mut f = json!({"span_id": span_id});
                    if g1_end_usage {
                        let t = self.tokens();
                        f["usage"] = json!({"input_tokens": t.0, "output_tokens": t.1,
                            "cache_read_input_tokens": t.2, "cache_creation_input_tokens": t.3});
                        self.count_tokens(&model, t);
                        request_tokens = true;
                    }
                    f
                }
                Generation::G2 => json!({}),
                Generation::G3 => {
                    let cents = self.rng.u32(0..300);
                    self.model_cents += u64::from(cents);
                    let credits = f64::from(cents) / 100.0;
                    let mut usage = json!({"credits": credits});
                    if anthropic_tokens {
                        let t = self.tokens();
                        usage = json!({"credits": credits, "input_tokens": t.0, "output_tokens": t.1,
                            "cache_read_input_tokens": t.2, "cache_creation_input_tokens": t.3});
                        self.count_tokens(&model, t);
                        request_tokens = true;
                    }
                    if credits > 0.0 {
                        bump(
                            &mut self.totals.credits,
                            (self.agent_label.clone(), model.clone()),
                            credits,
                        );
                    }
                    json!({"model_request_start_id": start_id, "is_error": is_error, "model_usage": usage})
                }
            };
            self.emit("span.model_request_end", end_fields, tid);
            if r == 0 {
                self.sub_agent_turn();
            }
            let key = (self.agent_label.clone(), model.clone());
            bump(&mut self.totals.model_requests, key.clone(), 1.0);
            bump(&mut self.totals.request_durations, key.clone(), 1.0);
            if is_error {
                bump(&mut self.totals.model_request_errors, key, 1.0);
            }
            last_model = model;
        }
        if self.rng.u32(0..6) == 0 {
            let kind = if self.rng.bool() {
                "agent.artifact_delivered"
            } else {
                "session.usage_snapshot_v9"
            };
            self.emit(kind, json!({"file_id": "file_1", "size": 10}), tid);
        }
        let failed = self.rng.u32(0..7) == 0;
        let stop = if failed {
            self.session_error("exhausted", tid);
            "retries_exhausted"
        } else if self.rng.u32(0..10) == 0 {
            "requires_action"
        } else if g == Generation::G3 && self.rng.u32(0..6) == 0 {
            "budget_reached"
        } else {
            "end_turn"
        };
        if g == Generation::G3 {
            self.emit(
                "session.thread_status_idle",
                json!({"session_thread_id": "sthr_main"}),
                tid,
            );
            bump(
                &mut self.totals.thread_turns,
                (self.agent_label.clone(), "unknown".into()),
                1.0,
            );
        }
        let mut idle = json!({"status": "idle", "stop_reason": {"type": stop}});
        if g != Generation::G3 || anthropic_tokens {
            let t = self.tokens();
            idle["usage"] = json!({"input_tokens": t.0, "output_tokens": t.1,
                "cache_read_input_tokens": t.2, "cache_creation_input_tokens": t.3});
            if !request_tokens {
                self.count_tokens(&last_model, t);
            }
        }
        self.emit("session.status_idle", idle, tid);
        self.idle_steps.push(self.step);
        self.usage_snapshot();
        if stop == "budget_reached" {
            // Paused until someone raises the budget: a pause, not a failure.
            self.emit(
                "session.updated",
                json!({"budget": {"type": "limit", "max_credit_cost": "100.00"}}),
                None,
            );
        }
        bump(
            &mut self.totals.turns,
            (stop.into(), self.agent_label.clone()),
            1.0,
        );
        bump(
            &mut self.totals.turn_durations,
            self.agent_label.clone(),
            1.0,
        );
    }

    fn tool_call(&mut self, tid: Option<&str>) {
        let g = self.generation;
        let mcp = g == Generation::G3 && self.rng.u32(0..3) == 0;
        let is_error = self.rng.u32(0..7) == 0;
        let name = if mcp {
            MCP_TOOLS[self.rng.usize(0..MCP_TOOLS.len())]
        } else {
            TOOLS[self.rng.usize(0..TOOLS.len())]
        };
        if mcp {
            let use_id = self.emit(
                "agent.mcp_tool_use",
                json!({"name": name, "mcp_server_name": "docs", "input": {}}),
                tid,
            );
            self.emit(
                "agent.mcp_tool_result",
                json!({"mcp_tool_use_id": use_id, "is_error": is_error, "content": []}),
                tid,
            );
        } else if g == Generation::G2 {
            let tu = format!("toolu_{}", self.hex(12));
            self.emit(
                "agent.tool_use",
                json!({"tool_name": name, "tool_use_id": tu, "tool_input": {}}),
                tid,
            );
            self.emit("agent.tool_result", json!({"tool_use_id": tu, "is_error": is_error, "content": [{"type": "text", "text": "ok"}]}), tid);
        } else {
            let use_id = self.emit(
                "agent.tool_use",
                json!({"name": name, "input": {"command": "ls"}}),
                tid,
            );
            self.emit(
                "agent.tool_result",
                json!({"tool_use_id": use_id, "is_error": is_error}),
                tid,
            );
        }
        bump(
            &mut self.totals.tool_calls,
            (name.into(), self.agent_label.clone()),
            1.0,
        );
        bump(
            &mut self.totals.tool_durations,
            (name.into(), self.agent_label.clone()),
            1.0,
        );
        if is_error {
            bump(
                &mut self.totals.tool_errors,
                (name.into(), self.agent_label.clone()),
                1.0,
            );
        }
    }
}

/// Options for [`generate`].
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    pub seed: u64,
    pub sessions: usize,
    /// Turns per session, at most.
    pub max_turns: usize,
    /// Steps between one session's creation and the next (0: all exist from the start).
    pub stagger: u64,
    /// Add unreadable events and wrong-shaped fields.
    pub hostile: bool,
    /// Every sixth session (a G3 one) coordinates a sub-agent in a thread.
    pub sub_agents: bool,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            seed: 7,
            sessions: 12,
            max_turns: 4,
            stagger: 0,
            hostile: false,
            sub_agents: true,
        }
    }
}

/// Writes `cfg.sessions` sessions (generations in turn: G1, G2, G3) and their totals.
pub fn generate(cfg: &ScenarioConfig) -> (Vec<SimSession>, Totals) {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let mut totals = Totals::default();
    let mut sessions = Vec::with_capacity(cfg.sessions);
    for i in 0..cfg.sessions {
        let generation = [Generation::G1, Generation::G2, Generation::G3][i % 3];
        let agent = &AGENTS[rng.usize(0..AGENTS.len())];
        let session_id = format!(
            "sess_{:04}{}",
            i,
            (0..20)
                .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
                .collect::<String>()
        );
        // Half of the G1 sessions name their agent by id only; `GET /agents/{id}` names it,
        // so the label is the name all the same.
        let id_only = generation == Generation::G1 && rng.bool();
        let agent_label = agent.name.to_owned();
        let multiagent = cfg.sub_agents && i % 6 == 2;
        let session_model = agent.model.to_owned();
        let created_step = i as u64 * cfg.stagger;
        let mut object = Map::new();
        object.insert("id".into(), json!(session_id));
        object.insert("type".into(), json!("session"));
        if id_only {
            object.insert("agent_id".into(), json!(agent.id));
        } else {
            let mut a = json!({"id": agent.id, "type": "agent", "name": agent.name, "model": {"id": agent.model}, "version": 1});
            if multiagent {
                a["multiagent"] = json!({"type": "coordinator", "agents": [{"name": SUB_AGENT, "type": "agent"}]});
            }
            object.insert("agent".into(), a);
        }
        object.insert("environment_id".into(), json!("env_sim"));
        let anthropic_tokens = generation == Generation::G3 && rng.u32(0..3) == 0;
        let g1_end_usage = generation == Generation::G1 && rng.u32(0..3) == 0;
        let mut w = Writer {
            rng: &mut rng,
            totals: &mut totals,
            generation,
            agent_label,
            session_model,
            session_id: session_id.clone(),
            hostile: cfg.hostile,
            events: Vec::new(),
            step: created_step,
            time_ns: BASE_NS + i64::try_from(created_step).unwrap_or(0) * 1_000_000_000,
            idle_steps: Vec::new(),
            model_cents: 0,
            sandbox_cents: 0,
            active_seconds: 0,
            web_searches: 0,
            usage: Vec::new(),
            // Every other G3 session runs a sub-agent in a thread.
            sub_agent: multiagent.then(|| (format!("sthr_{i:04}sub"), SUB_AGENT.to_owned())),
            thread_created: false,
            thread_events: Vec::new(),
        };
        let turns = w.rng.usize(1..=cfg.max_turns.max(1));
        for _ in 0..turns {
            w.turn(anthropic_tokens, g1_end_usage);
            w.step += u64::from(w.rng.u32(0..4));
        }
        let terminal = generation != Generation::G2 && w.rng.bool();
        if terminal {
            match generation {
                Generation::G1 => w.emit("terminated", json!({"reason": "closed"}), None),
                _ => w.emit("session.status_terminated", json!({}), None),
            };
        }
        // Some ended sessions are archived afterwards (the SDK 0.11 list hides them unless
        // asked with `include_archived=true`).
        if terminal && generation == Generation::G3 && i % 4 == 1 {
            object.insert("archived_at".into(), json!("2026-10-02T00:00:00+00:00"));
        }
        w.count_usage();
        let threads = w
            .sub_agent
            .take()
            .map(|(id, agent)| SimThread {
                id,
                agent,
                events: std::mem::take(&mut w.thread_events),
            })
            .into_iter()
            .collect();
        let (events, idle_steps, usage) = (w.events, w.idle_steps, w.usage);
        sessions.push(SimSession {
            id: session_id,
            generation,
            created_step,
            object,
            events,
            terminal,
            idle_steps,
            usage,
            threads,
        });
    }
    (sessions, totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_log() {
        let cfg = ScenarioConfig {
            sessions: 6,
            ..ScenarioConfig::default()
        };
        let (a, ta) = generate(&cfg);
        let (b, tb) = generate(&cfg);
        assert_eq!(ta, tb);
        assert_eq!(
            a.iter().map(|s| s.events.len()).collect::<Vec<_>>(),
            b.iter().map(|s| s.events.len()).collect::<Vec<_>>()
        );
        // Every event counts once, whichever streams show it (cross-posts show on two).
        let unique: usize = a
            .iter()
            .map(|s| {
                s.events
                    .iter()
                    .chain(s.threads.iter().flat_map(|t| &t.events))
                    .map(|e| e.id.as_str())
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            })
            .sum();
        assert_eq!(ta.event_count(), unique as f64);
    }

    #[test]
    fn every_generation_and_fallback_appears() {
        let (sessions, totals) = generate(&ScenarioConfig {
            sessions: 30,
            ..ScenarioConfig::default()
        });
        let all: String = sessions
            .iter()
            .flat_map(|s| s.events.iter().map(|e| e.json.as_str()))
            .collect();
        for needle in [
            "\"turn_id\"",
            "session.status_rescheduled",
            "\"tool_use_id\":\"toolu_",
            "model_request_start_id",
            "\"terminated\"",
            "session.status_terminated",
            "+00:00",
            "agent.mcp_tool_use",
        ] {
            assert!(all.contains(needle), "{needle}");
        }
        assert!(
            sessions
                .iter()
                .any(|s| s.object.contains_key("agent_id") && !s.object.contains_key("agent")),
            "a session naming its agent by id only"
        );
        assert!(
            !totals.events.keys().any(|(_, a)| a.starts_with("agent_")),
            "every agent is counted under its name"
        );
        assert!(
            totals
                .session_errors
                .keys()
                .any(|(_, r, _)| r == "exhausted")
        );
    }
}
