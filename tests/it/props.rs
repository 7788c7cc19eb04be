//! Property tests (proptest, bounded so CI stays fast; `PROPTEST_CASES=N` for longer runs):
//! - any bytes, and any JSON object built from the API's field names with values of any
//!   shape, go through page decoding and the turn state machine without a panic;
//! - random event logs, cut into random pages, interleaved across sessions, with random
//!   restarts (the state reopened from disk, polling resumed where it stood), end with metrics
//!   equal to the log's totals.

use std::collections::HashMap;

use proptest::prelude::*;
use qoder_exporter::event::{DroppedFields, Event, UsageSnapshot};
use qoder_exporter::pipeline::tracker::SessionState;
use qoder_exporter::pipeline::{Batch, Item, Pipeline, SessionMeta};
use qoder_exporter::sim::{ScenarioConfig, generate};
use qoder_exporter::sinks::metrics::{Delta, Exposition, Metrics};
use qoder_exporter::source::poller::meta_of;
use qoder_exporter::source::wire::{self, Page};
use qoder_exporter::state::StateStore;

use crate::common::{mismatches, parse};

const FIELDS: [&str; 22] = [
    "id",
    "type",
    "session_id",
    "turn_id",
    "processed_at",
    "created_at",
    "content",
    "usage",
    "stop_reason",
    "error",
    "retry_status",
    "model",
    "span_id",
    "model_request_start_id",
    "is_error",
    "model_usage",
    "name",
    "tool_name",
    "tool_use_id",
    "mcp_tool_use_id",
    "input",
    "thinking",
];
const TYPES: [&str; 12] = [
    "user.message",
    "session.status_idle",
    "session.status_running",
    "span.model_request_start",
    "span.model_request_end",
    "agent.tool_use",
    "agent.tool_result",
    "agent.mcp_tool_use",
    "session.error",
    "terminated",
    "agent.message",
    "x.unknown",
];

fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[a-z_.:0-9T-]{0,24}".prop_map(serde_json::Value::from),
        prop::sample::select(TYPES.to_vec()).prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("2026-11-20T08:00:00.123Z")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_like() -> impl Strategy<Value = String> {
    prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), any_json(), 0..10).prop_map(
        |m| {
            serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                .to_string()
        },
    )
}

/// What the poller does with a page, then the state machine: must never panic.
fn digest(page_text: &str) {
    let mut st = SessionState::new("a".into());
    let mut delta = Delta::default();
    let mut closed = Vec::new();
    if let Ok(page) = serde_json::from_str::<Page<'_>>(page_text) {
        for raw in &page.data {
            if let Ok(d) = wire::decode_event(raw.get()) {
                st.apply("s", &Event::from_wire(d.event), &mut delta, &mut closed);
            }
        }
    }
    let _ = wire::decode_session(page_text);
    if let Ok(d) = wire::decode_event(page_text) {
        st.apply("s", &Event::from_wire(d.event), &mut delta, &mut closed);
    }
    let m = qoder_exporter::sinks::metrics::DurableMetrics::new();
    m.publish(m.stage(&delta));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        digest(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn any_event_shaped_page_decodes_and_applies_without_panic(
        events in prop::collection::vec(event_like(), 0..40)
    ) {
        let page = format!("{{\"data\":[{}],\"has_more\":true}}", events.join(","));
        digest(&page);
        for e in &events {
            digest(e);
        }
    }
}

/// One session's log as the poller would hand it over.
struct Log {
    id: String,
    /// A sub-agent thread's stream; `None`: the session's.
    thread: Option<String>,
    meta: SessionMeta,
    items: Vec<(Item, DroppedFields)>,
}

impl Log {
    /// Where this stream has been read to is kept under this key.
    fn key(&self) -> String {
        stream_key(&self.id, self.thread.as_deref())
    }
}

fn stream_key(id: &str, thread: Option<&str>) -> String {
    match thread {
        Some(t) => format!("{id}#{t}"),
        None => id.to_owned(),
    }
}

fn open(
    path: &std::path::Path,
) -> (
    Metrics,
    qoder_exporter::pipeline::PipelineHandle,
    std::thread::JoinHandle<StateStore>,
    HashMap<String, u64>,
) {
    let metrics = Metrics::new().expect("metrics");
    let store = StateStore::open(path).expect("store");
    let (p, stored) = Pipeline::new(store, metrics.clone(), None).expect("pipeline");
    let (h, t) = p.spawn(8).expect("thread");
    let mut at = HashMap::new();
    for s in stored {
        for (tid, t) in &s.state.threads {
            at.insert(stream_key(&s.id, Some(tid)), t.tracker.consumed);
        }
        at.insert(s.id, s.state.consumed);
    }
    (metrics, h, t, at)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_pages_and_restarts_count_exactly(
        seed in any::<u64>(),
        sessions in 1usize..5,
        hostile in any::<bool>(),
        choices in prop::collection::vec((any::<prop::sample::Index>(), 1usize..150, 0u8..100), 1..400),
    ) {
        let (log, totals) = generate(&ScenarioConfig { seed, sessions, max_turns: 4, stagger: 0, hostile, sub_agents: true });
        let decode = |events: &[qoder_exporter::sim::scenario::SimEvent]| -> Vec<(Item, DroppedFields)> {
            events
                .iter()
                .map(|e| match wire::decode_event(&e.json) {
                    Ok(d) => (Item::event(Event::from_wire(d.event)), d.bad_fields),
                    Err(r) => (Item::Invalid(r), DroppedFields::default()),
                })
                .collect()
        };
        // The session object as the poller hands it over: an agent named by id alone is
        // named by the API's agent object (`GET /agents/{id}`) first.
        fn resolved_meta(s: &qoder_exporter::sim::SimSession) -> SessionMeta {
            let mut meta = wire::decode_session(&serde_json::Value::Object(s.object.clone()).to_string())
                .map(|w| meta_of(&w))
                .unwrap_or_default();
            if meta.agent_name.is_none() {
                meta.agent_name = meta
                    .agent_id
                    .as_deref()
                    .and_then(qoder_exporter::sim::agent_object)
                    .and_then(|a| a["name"].as_str().map(str::to_owned));
            }
            meta
        }
        // Every stream on its own: the session's, and each sub-agent thread's, read in any
        // interleaving (cross-posted events must count once whichever stream comes first).
        let mut logs: Vec<Log> = Vec::new();
        for s in &log {
            logs.push(Log {
                id: s.id.clone(),
                thread: None,
                meta: resolved_meta(s),
                items: decode(&s.events),
            });
            for t in &s.threads {
                logs.push(Log {
                    id: s.id.clone(),
                    thread: Some(t.id.clone()),
                    meta: SessionMeta::default(),
                    items: decode(&t.events),
                });
            }
        }
        // The session object's final usage, read once the streams are drained.
        let final_usage: Vec<(String, SessionMeta)> = log
            .iter()
            .filter_map(|s| {
                let (_, usage) = s.usage.last()?;
                let wire: wire::WireUsage = serde_json::from_value(usage.clone()).ok()?;
                Some((
                    s.id.clone(),
                    SessionMeta {
                        usage: UsageSnapshot::from_wire(&wire, None),
                        ..SessionMeta::default()
                    },
                ))
            })
            .collect();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let mut restarts = 0;
        let metrics = rt.block_on(async {
            let (mut metrics, mut handle, mut thread, mut at) = open(&path);
            for l in logs.iter().filter(|l| l.thread.is_none()) {
                handle.meta(l.id.clone(), l.meta.clone()).await.expect("meta");
            }
            let mut choices = choices.into_iter();
            loop {
                let open_logs: Vec<&Log> = logs
                    .iter()
                    .filter(|l| at.get(&l.key()).copied().unwrap_or(0) < l.items.len() as u64)
                    .collect();
                if open_logs.is_empty() {
                    break;
                }
                let (pick, size, restart) = match choices.next() {
                    Some((i, size, restart)) => (i.index(open_logs.len()), size, restart),
                    None => (0, 100, 100),
                };
                if restart < 8 {
                    // A restart: everything committed is on disk; polling resumes from there.
                    drop(handle);
                    drop(thread.join().expect("pipeline thread"));
                    restarts += 1;
                    (metrics, handle, thread, at) = open(&path);
                }
                let l = open_logs[pick];
                let from = usize::try_from(at.get(&l.key()).copied().unwrap_or(0)).expect("usize");
                let to = (from + size).min(l.items.len());
                let page = &l.items[from..to];
                let outcome = handle
                    .batch(Batch {
                        session_id: l.id.clone(),
                        thread: l.thread.clone(),
                        at_end: to == l.items.len(),
                        items: page.iter().map(|(i, _)| i.clone()).collect(),
                        cursor: None,
                        bad_fields: page.iter().map(|(_, b)| *b).sum(),
                        ..Batch::default()
                    })
                    .await
                    .expect("batch");
                at.insert(l.key(), outcome.consumed);
            }
            for (id, meta) in &final_usage {
                handle.meta(id.clone(), meta.clone()).await.expect("final usage");
            }
            drop(handle);
            drop(thread.join().expect("pipeline thread"));
            metrics
        });
        let (text, _) = metrics.render(Exposition::Text);
        let series = parse(&String::from_utf8(text).expect("utf8"));
        let problems = mismatches(&series, &totals);
        prop_assert!(problems.is_empty(), "{} restarts; {}", restarts, problems.join("\n"));
    }
}
