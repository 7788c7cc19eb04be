//! Traces: what a real OTLP receiver (in-process, gRPC and HTTP/protobuf) gets for a simulated
//! log, checked against what the simulator wrote: one root per turn, one chat span per model
//! request, one tool span per tool call, parents present, times from the log, errors marked,
//! the same ids from every run, nothing lost across `kill -9`, bounded when the endpoint is down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use qoder_exporter::app;
use qoder_exporter::config::{OtlpProtocol, OtlpSettings};
use qoder_exporter::sim::{ScenarioConfig, Sim};

use crate::binary::spawn_with_env;
use crate::common::*;

// ---------------------------------------------------------------------------------------------
// The receiver.

/// What a receiver got, and how it should answer.
#[derive(Clone, Default)]
pub struct Received {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Non-zero: answer every request with this HTTP status (gRPC: UNAVAILABLE).
    fail: Arc<AtomicU16>,
    /// Refuse (HTTP 400) any request carrying a span with this name.
    reject_span: Arc<Mutex<Option<String>>>,
    attempts: Arc<AtomicU64>,
    /// Answer this many milliseconds late (a slow endpoint).
    delay_ms: Arc<AtomicU64>,
}

impl Received {
    /// `Err(status)` when the request is to be refused.
    fn take(&self, req: ExportTraceServiceRequest) -> Result<(), u16> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match self.fail.load(Ordering::SeqCst) {
            0 => {}
            s => return Err(s),
        }
        if let Some(bad) = self.reject_span.lock().expect("lock").as_deref() {
            let hit = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .any(|s| s.name == bad);
            if hit {
                return Err(400);
            }
        }
        self.requests.lock().expect("lock").push(req);
        Ok(())
    }

    pub fn fail_with(&self, status: u16) {
        self.fail.store(status, Ordering::SeqCst);
    }

    pub fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for req in self.requests.lock().expect("lock").iter() {
            for rs in &req.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(Span {
                            trace: hex(&s.trace_id),
                            id: hex(&s.span_id),
                            parent: hex(&s.parent_span_id),
                            name: s.name.clone(),
                            kind: s.kind,
                            start: s.start_time_unix_nano,
                            end: s.end_time_unix_nano,
                            attrs: attrs(&s.attributes),
                            status: s.status.as_ref().map_or(0, |st| st.code),
                            status_message: s
                                .status
                                .as_ref()
                                .map(|st| st.message.clone())
                                .unwrap_or_default(),
                            events: s
                                .events
                                .iter()
                                .map(|e| {
                                    format!(
                                        "{}@{} {:?}",
                                        e.name,
                                        e.time_unix_nano,
                                        attrs(&e.attributes)
                                    )
                                })
                                .collect(),
                            service: resource.get("service.name").cloned().unwrap_or_default(),
                            schema: ss.schema_url.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

/// A span as the receiver decoded it, flattened for comparisons.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub trace: String,
    pub id: String,
    pub parent: String,
    pub name: String,
    pub kind: i32,
    pub start: u64,
    pub end: u64,
    pub attrs: BTreeMap<String, String>,
    pub status: i32,
    pub status_message: String,
    pub events: Vec<String>,
    pub service: String,
    pub schema: String,
}

const KIND_INTERNAL: i32 = 1;
const KIND_CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => format!("{d}"),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::ArrayValue(a)) => format!(
                    "[{}]",
                    a.values
                        .iter()
                        .map(|v| match &v.value {
                            Some(AnyValue::StringValue(s)) => s.clone(),
                            other => format!("{other:?}"),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// OTLP/HTTP: `POST /v1/traces` with a protobuf body.
pub async fn http_receiver() -> Receiver {
    async fn export(State(r): State<Received>, body: axum::body::Bytes) -> impl IntoResponse {
        let delay = r.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            // A real delay: this is the slow endpoint, late against the exporter's real timeout.
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        match r.take(req) {
            Ok(()) => (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response(),
            Err(s) => (
                StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Vec::new(),
            )
                .into_response(),
        }
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver {
        addr,
        received,
        task,
    }
}

struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.0.take(request.into_inner()) {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(400) => Err(tonic::Status::invalid_argument("refused")),
            Err(_) => Err(tonic::Status::unavailable("down")),
        }
    }
}

/// OTLP/gRPC: the collector's `TraceService`.
pub async fn grpc_receiver() -> Receiver {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let svc = TraceServiceServer::new(Grpc(received.clone()));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    Receiver {
        addr,
        received,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// What the log says the spans must be.

struct Expected {
    roots: usize,
    /// Sub-agents' turns: an `invoke_agent` span each, under the session turn they ran in.
    sub_turns: usize,
    chats: usize,
    chat_errors: usize,
    tools: BTreeMap<String, usize>,
    failed_turns: usize,
    sessions: BTreeSet<String>,
    first_ns: u64,
    last_ns: u64,
}

/// A count the simulator kept as f64 (it shares the metrics' types); always a whole number.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counts of events, whole and small"
)]
fn count(v: f64) -> usize {
    v as usize
}

impl Expected {
    fn of(sim: &Sim) -> Expected {
        let t = &sim.totals;
        let n = |m: &BTreeMap<(String, String), f64>| count(m.values().sum::<f64>());
        let mut tools = BTreeMap::new();
        for ((tool, _), v) in &t.tool_calls {
            *tools.entry(tool.clone()).or_default() += count(*v);
        }
        let mut times = Vec::new();
        for s in sim.sessions() {
            for e in &s.events {
                let v: serde_json::Value = serde_json::from_str(&e.json).expect("json");
                let at = v
                    .get("processed_at")
                    .or(v.get("created_at"))
                    .and_then(|x| x.as_str());
                if let Some(ns) = qoder_exporter::event::parse_time(at) {
                    times.push(u64::try_from(ns).expect("after 1970"));
                }
            }
        }
        let sub_turns = t
            .thread_turns
            .iter()
            .filter(|((agent, _), _)| agent == "researcher")
            .map(|(_, v)| count(*v))
            .sum();
        Expected {
            roots: n(&t.turns),
            sub_turns,
            chats: n(&t.model_requests),
            chat_errors: n(&t.model_request_errors),
            tools,
            failed_turns: t
                .turns
                .iter()
                .filter(|((stop, _), _)| stop == "retries_exhausted")
                .map(|(_, v)| count(*v))
                .sum(),
            sessions: sim.sessions().iter().map(|s| s.id.clone()).collect(),
            first_ns: times.iter().copied().min().unwrap_or(0),
            last_ns: times.iter().copied().max().unwrap_or(0),
        }
    }

    fn total(&self) -> usize {
        self.turns() + self.chats + self.tools.values().sum::<usize>()
    }

    /// Closed turns of sessions and sub-agents: each a batch of the outbox.
    fn turns(&self) -> usize {
        self.roots + self.sub_turns
    }
}

/// One copy of each span (a crash may have sent some twice; their content must be identical).
fn distinct(spans: Vec<Span>) -> Vec<Span> {
    let mut by_id: BTreeMap<(String, String), Span> = BTreeMap::new();
    for s in spans {
        let key = (s.trace.clone(), s.id.clone());
        if let Some(prev) = by_id.get(&key) {
            assert_eq!(prev, &s, "two different spans share trace and span id");
        } else {
            by_id.insert(key, s);
        }
    }
    by_id.into_values().collect()
}

/// Every property the checker asks for, against the log.
fn check_spans(spans: &[Span], want: &Expected) {
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    let chats: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat "))
        .collect();
    let tools: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("execute_tool "))
        .collect();
    assert_eq!(roots.len(), want.roots, "one root span per turn");
    assert!(roots.iter().all(|r| r.name.starts_with("invoke_agent ")));
    // A sub-agent's turn hangs under the session turn it ran in, in that turn's trace.
    let sub_turns: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("invoke_agent ") && !s.parent.is_empty())
        .collect();
    assert_eq!(
        sub_turns.len(),
        want.sub_turns,
        "one span per sub-agent turn"
    );
    for s in &sub_turns {
        assert_eq!(s.name, "invoke_agent researcher");
        assert!(
            roots.iter().any(|r| r.trace == s.trace && r.id == s.parent),
            "a sub-agent turn's parent is a session turn of its trace"
        );
    }
    assert_eq!(chats.len(), want.chats, "one chat span per model request");
    assert_eq!(spans.len(), want.total(), "no other spans");
    let mut tool_counts: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tools {
        *tool_counts
            .entry(t.name.trim_start_matches("execute_tool ").to_owned())
            .or_default() += 1;
        assert_eq!(t.kind, KIND_INTERNAL);
        assert_eq!(
            t.attrs.get("gen_ai.tool.name").map(String::as_str),
            Some(&t.name[13..])
        );
    }
    assert_eq!(
        tool_counts, want.tools,
        "one execute_tool span per tool call"
    );
    // Turn spans (sessions' and sub-agents') are what request, tool and sub-agent spans hang on.
    let root_of: BTreeMap<(&str, &str), &Span> = roots
        .iter()
        .chain(sub_turns.iter())
        .map(|r| ((r.trace.as_str(), r.id.as_str()), *r))
        .collect();
    let traces: BTreeSet<&str> = roots.iter().map(|r| r.trace.as_str()).collect();
    assert_eq!(traces.len(), roots.len(), "one trace per turn");
    for s in spans {
        assert!(s.end >= s.start, "{}: ends before it starts", s.name);
        assert!(
            s.start >= want.first_ns && s.end <= want.last_ns,
            "{}: {}..{} outside the log's {}..{}",
            s.name,
            s.start,
            s.end,
            want.first_ns,
            want.last_ns
        );
        assert_eq!(s.service, "qoder-exporter", "service.name");
        assert_eq!(s.schema, "https://opentelemetry.io/schemas/1.41.0");
        assert!(s.attrs.contains_key("gen_ai.agent.name"), "{s:?}");
        if !s.parent.is_empty() {
            let parent = root_of
                .get(&(s.trace.as_str(), s.parent.as_str()))
                .unwrap_or_else(|| panic!("{}: parent missing from its trace", s.name));
            assert!(
                s.start >= parent.start && s.end <= parent.end,
                "{s:?} outside {parent:?}"
            );
        }
    }
    for r in &roots {
        assert_eq!(r.kind, KIND_CLIENT);
        let sid = r
            .attrs
            .get("gen_ai.conversation.id")
            .expect("conversation id");
        assert_eq!(r.attrs.get("session.id"), Some(sid));
        assert!(want.sessions.contains(sid), "unknown session {sid}");
        assert_eq!(
            r.attrs.get("gen_ai.operation.name").map(String::as_str),
            Some("invoke_agent")
        );
    }
    for c in &chats {
        assert_eq!(c.kind, KIND_CLIENT);
        assert_eq!(
            c.attrs.get("gen_ai.request.model").map(String::as_str),
            Some(&c.name[5..])
        );
    }
    let chat_errors = chats.iter().filter(|c| c.status == STATUS_ERROR).count();
    assert_eq!(
        chat_errors, want.chat_errors,
        "ERROR on every failed model request"
    );
    let failed = roots.iter().filter(|r| r.status == STATUS_ERROR).count();
    assert_eq!(
        failed, want.failed_turns,
        "ERROR on every turn ended by exhausted retries"
    );
    assert!(
        roots
            .iter()
            .filter(|r| r.status == STATUS_ERROR)
            .all(|r| r.attrs.contains_key("error.type"))
    );
    // Content is private by default.
    for s in spans {
        for v in s.attrs.values() {
            for text in [
                "failing test",
                "open pull request",
                "Done with this step",
                "thinking about",
            ] {
                assert!(
                    !v.contains(text),
                    "message text exported without opt-in: {v}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runs.

fn otlp(receiver: &Receiver, protocol: OtlpProtocol) -> OtlpSettings {
    OtlpSettings {
        endpoint: match protocol {
            OtlpProtocol::HttpProtobuf => format!("http://{}/v1/traces", receiver.addr),
            OtlpProtocol::Grpc => format!("http://{}", receiver.addr),
        },
        protocol,
        capture_content: None,
        outbox_max_turns: 100_000,
    }
}

/// Runs the exporter in-process until the metrics are exact and `done` holds, then stops it.
async fn run_until(
    sim: &Sim,
    state: &Path,
    otlp: OtlpSettings,
    done: impl AsyncFnMut(&qoder_exporter::sinks::metrics::Metrics) -> bool,
) -> qoder_exporter::sinks::metrics::Metrics {
    let mut s = settings(sim, state);
    s.otlp = Some(otlp);
    let running = app::start(s).await.expect("starts");
    wait_exact(running.addr, &sim.totals, Duration::from_secs(60)).await;
    let metrics = running.metrics.clone();
    let mut done = done;
    let ok = eventually(Duration::from_secs(40), async || done(&metrics).await).await;
    running.stop().await.expect("stops");
    assert!(ok, "condition not reached");
    metrics
}

fn static_scenario(seed: u64, sessions: usize) -> ScenarioConfig {
    ScenarioConfig {
        seed,
        sessions,
        max_turns: 4,
        ..ScenarioConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_match_the_log_and_repeat_exactly_over_both_protocols() {
    let sim = sim(static_scenario(31, 12)).await;
    sim.release_all();
    let want = Expected::of(&sim);
    let total = want.total() as u64;
    let dir = tempfile::tempdir().expect("dir");

    let http = http_receiver().await;
    let m = run_until(
        &sim,
        &dir.path().join("a.db"),
        otlp(&http, OtlpProtocol::HttpProtobuf),
        async |m| m.process.spans_exported.get() >= total,
    )
    .await;
    assert_eq!(m.process.spans_exported.get(), total);
    assert_eq!(m.process.span_outbox_turns.get(), 0);
    let first = http.received.spans();
    assert_eq!(first.len() as u64, total, "each span sent once");
    check_spans(&first, &want);

    // A second, independent exporter (fresh state, the other protocol) emits the very same spans.
    let grpc = grpc_receiver().await;
    run_until(
        &sim,
        &dir.path().join("b.db"),
        otlp(&grpc, OtlpProtocol::Grpc),
        async |m| m.process.spans_exported.get() >= total,
    )
    .await;
    let mut a = first;
    let mut b = grpc.received.spans();
    a.sort();
    b.sort();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "runs differ");
    }
}

/// The span tree of a small fixed log, as a backend would show it (`UPDATE_GOLDEN=1` rewrites).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_span_tree() {
    let sim = sim(ScenarioConfig {
        seed: 3,
        sessions: 3,
        max_turns: 2,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let total = Expected::of(&sim).total() as u64;
    let dir = tempfile::tempdir().expect("dir");
    let rx = http_receiver().await;
    run_until(
        &sim,
        &dir.path().join("s.db"),
        otlp(&rx, OtlpProtocol::HttpProtobuf),
        async |m| m.process.spans_exported.get() >= total,
    )
    .await;
    // Chat spans name the API server they went through: the simulator, on a port of its own.
    let text = render_tree(&rx.received.spans()).replace(
        &format!("server.address=127.0.0.1 server.port={} ", sim.addr.port()),
        "server.address=127.0.0.1 server.port=SIM_PORT ",
    );
    assert!(text.contains("server.port=SIM_PORT"), "{text}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/spans.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("write golden");
    }
    let golden =
        std::fs::read_to_string(&path).expect("tests/golden/spans.txt (UPDATE_GOLDEN=1 writes it)");
    if golden != text {
        let diff: Vec<String> = golden
            .lines()
            .zip(text.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "span tree differs from the golden file:\n{}",
            diff.join("\n")
        );
    }
}

fn render_tree(spans: &[Span]) -> String {
    let kind = |k: i32| match k {
        KIND_INTERNAL => "INTERNAL",
        KIND_CLIENT => "CLIENT",
        _ => "OTHER",
    };
    let status = |s: &Span| match s.status {
        STATUS_ERROR => format!("ERROR({})", s.status_message),
        1 => "OK".to_owned(),
        _ => "UNSET".to_owned(),
    };
    let line = |s: &Span, indent: &str| {
        let attrs: Vec<String> = s.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut l = format!(
            "{indent}{} [{}] {} +{}ms {}\n{indent}  {}\n",
            s.name,
            kind(s.kind),
            s.id,
            (s.end - s.start) / 1_000_000,
            status(s),
            attrs.join(" ")
        );
        for e in &s.events {
            l.push_str(&format!("{indent}  event {e}\n"));
        }
        l
    };
    let mut roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    roots.sort_by_key(|r| (r.start, r.trace.clone()));
    let mut out = String::new();
    for r in roots {
        out.push_str(&format!("trace {} start {}\n", r.trace, r.start));
        out.push_str(&line(r, "  "));
        let mut children: Vec<&Span> = spans
            .iter()
            .filter(|s| s.trace == r.trace && s.parent == r.id)
            .collect();
        children.sort_by_key(|c| (c.start, c.id.clone()));
        for c in children {
            out.push_str(&line(c, "    "));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_blocks_nothing_and_the_outbox_catches_up() {
    let down = with_endpoint_down(32, 100_000).await;
    let (want, rx, running) = (&down.want, &down.rx, down.running);
    let total = want.total() as u64;
    let p = running.metrics.process.clone();
    assert!(
        eventually(Duration::from_secs(10), async || p
            .span_export_failures
            .get()
            > 0)
        .await,
        "failures counted"
    );
    assert_eq!(p.spans_exported.get(), 0);
    assert_eq!(
        p.span_outbox_turns.get(),
        want.turns() as i64,
        "every closed turn waits"
    );
    // The endpoint comes back: everything waiting arrives, once.
    rx.received.fail_with(0);
    assert!(
        eventually(Duration::from_secs(30), async || p.spans_exported.get()
            >= total)
        .await,
        "caught up: {} of {total}",
        p.spans_exported.get()
    );
    running.stop().await.expect("stops");
    assert_eq!(p.span_outbox_turns.get(), 0);
    let spans = rx.received.spans();
    assert_eq!(spans.len() as u64, total);
    check_spans(&spans, want);
}

/// An exporter whose OTLP endpoint answers 503, run until its metrics are exact (they must
/// be: nothing waits for traces).
struct EndpointDown {
    want: Expected,
    rx: Receiver,
    running: app::Running,
    _sim: Sim,
    _dir: tempfile::TempDir,
}

async fn with_endpoint_down(seed: u64, outbox_max_turns: u64) -> EndpointDown {
    let sim = sim(static_scenario(seed, 8)).await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let rx = http_receiver().await;
    rx.received.fail_with(503);
    let mut s = settings(&sim, &dir.path().join("s.db"));
    let mut o = otlp(&rx, OtlpProtocol::HttpProtobuf);
    o.outbox_max_turns = outbox_max_turns;
    s.otlp = Some(o);
    let running = app::start(s).await.expect("starts");
    wait_exact(running.addr, &sim.totals, Duration::from_secs(60)).await;
    EndpointDown {
        want: Expected::of(&sim),
        rx,
        running,
        _sim: sim,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_oldest_first_and_counts_it() {
    let down = with_endpoint_down(33, 5).await;
    let (want, rx, running) = (&down.want, &down.rx, down.running);
    let total = want.total() as u64;
    let p = running.metrics.process.clone();
    assert!(p.span_outbox_turns.get() <= 5, "bounded");
    let dropped = || p.spans_dropped.with_label_values(&["outbox_full"]).get();
    assert!(dropped() > 0, "drops are counted");
    rx.received.fail_with(0);
    assert!(
        eventually(Duration::from_secs(30), async || p.spans_exported.get()
            + dropped()
            >= total)
        .await,
        "exported {} + dropped {} of {total}",
        p.spans_exported.get(),
        dropped()
    );
    running.stop().await.expect("stops");
    eprintln!(
        "exported {} dropped {} received {} total {total}",
        p.spans_exported.get(),
        dropped(),
        rx.received.spans().len()
    );
    assert_eq!(p.spans_exported.get() + dropped(), total);
    // What survived is the newest five turns (of sessions or sub-agents), complete.
    let spans = rx.received.spans();
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.name.starts_with("invoke_agent "))
            .count(),
        5
    );
    assert_eq!(spans.len() as u64, p.spans_exported.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_the_endpoint_refuses_is_dropped_alone() {
    let sim = sim(static_scenario(34, 9)).await;
    sim.release_all();
    let want = Expected::of(&sim);
    let total = want.total() as u64;
    let bad = "execute_tool WebFetch";
    assert!(
        want.tools.get("WebFetch").copied().unwrap_or(0) > 0,
        "scenario has the tool"
    );
    let dir = tempfile::tempdir().expect("dir");
    let rx = grpc_receiver().await;
    *rx.received.reject_span.lock().expect("lock") = Some(bad.to_owned());
    let rejected = |m: &qoder_exporter::sinks::metrics::Metrics| {
        m.process
            .spans_dropped
            .with_label_values(&["rejected"])
            .get()
    };
    let m = run_until(
        &sim,
        &dir.path().join("s.db"),
        otlp(&rx, OtlpProtocol::Grpc),
        async |m| m.process.spans_exported.get() + rejected(m) >= total,
    )
    .await;
    let spans = rx.received.spans();
    assert!(rejected(&m) > 0);
    assert!(
        spans.iter().all(|s| s.name != bad),
        "the refused turns are not there"
    );
    // Every turn without the refused tool arrived whole.
    let refused_traces = want.roots - spans.iter().filter(|s| s.parent.is_empty()).count();
    assert!(refused_traces > 0 && refused_traces < want.roots);
    assert_eq!(spans.len() as u64 + rejected(&m), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_exported_only_on_opt_in_and_truncated() {
    let sim = sim(static_scenario(35, 3)).await;
    sim.release_all();
    let total = Expected::of(&sim).total() as u64;
    let dir = tempfile::tempdir().expect("dir");
    let rx = http_receiver().await;
    let mut o = otlp(&rx, OtlpProtocol::HttpProtobuf);
    o.capture_content = Some(8);
    run_until(&sim, &dir.path().join("s.db"), o, async |m| {
        m.process.spans_exported.get() >= total
    })
    .await;
    let spans = rx.received.spans();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    for r in &roots {
        let input = r
            .attrs
            .get("gen_ai.input.messages")
            .expect("user message captured");
        let v: serde_json::Value = serde_json::from_str(input).expect("json");
        let content = v[0]["parts"][0]["content"].as_str().expect("content");
        assert!(content.len() <= 8, "{content:?} not truncated");
        assert!(
            ["Fix the ", "Review t", "Triage t"].contains(&content),
            "{content:?}"
        );
        assert_eq!(v[0]["role"], "user");
        let output = r
            .attrs
            .get("gen_ai.output.messages")
            .expect("agent output captured");
        assert!(output.contains("\"assistant\""), "{output}");
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary, configured by the standard environment variables.

fn otel_env(rx: &Receiver) -> [(&'static str, String); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", rx.addr)),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
    ]
}

fn env_refs<'a>(e: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    e.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_flushes_on_sigterm_and_a_second_run_emits_the_same_ids() {
    let sim = sim(static_scenario(36, 10)).await;
    sim.release_all();
    let want = Expected::of(&sim);
    let dir = tempfile::tempdir().expect("dir");
    let mut runs = Vec::new();
    for name in ["a.db", "b.db"] {
        let rx = http_receiver().await;
        let env = otel_env(&rx);
        let mut p = spawn_with_env(&sim, &dir.path().join(name), &[], &env_refs(&env));
        wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
        // No waiting for the spans: SIGTERM must flush whatever is still in the outbox.
        let took = p.terminate();
        eprintln!("{name}: exited {took:?} after SIGTERM");
        let log = p.log();
        assert!(log.contains("traces on"), "{log}");
        let spans = distinct(rx.received.spans());
        check_spans(&spans, &want);
        runs.push(
            spans
                .into_iter()
                .map(|s| (s.trace, s.id, s.parent, s.name, s.start, s.end))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        runs[0], runs[1],
        "the same trace and span ids from a second run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_kill_9_loses_no_spans() {
    let sim = sim(ScenarioConfig {
        seed: 37,
        sessions: 12,
        stagger: 3,
        max_turns: 4,
        ..ScenarioConfig::default()
    })
    .await;
    let want = Expected::of(&sim);
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state.db");
    let rx = http_receiver().await;
    let env = otel_env(&rx);
    let grower = grow_log(&sim);
    let mut rng = fastrand::Rng::with_seed(9);
    for round in 0..4 {
        let mut p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
        // A real, seeded delay: a crash comes at a moment unrelated to the exporter's work,
        // and the seed makes the run's delays the same every time.
        tokio::time::sleep(Duration::from_millis(rng.u64(200..900))).await;
        p.child.kill().expect("kill -9");
        p.child.wait().expect("reaped");
        eprintln!(
            "round {round}: killed with {} spans received",
            rx.received.spans().len()
        );
    }
    grower.await.expect("grower");
    sim.release_all();
    let mut p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    p.terminate();
    let all = rx.received.spans();
    let spans = distinct(all.clone());
    eprintln!("{} spans received, {} distinct", all.len(), spans.len());
    check_spans(&spans, &want);
}

/// A slow endpoint (answers after the export timeout): metrics stay exact and fresh, the
/// timeouts are counted as failed exports, and the spans wait in the outbox until it is fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_a_slow_endpoint_keeps_metrics_flowing() {
    let sim = sim(static_scenario(38, 6)).await;
    sim.release_all();
    let want = Expected::of(&sim);
    let dir = tempfile::tempdir().expect("dir");
    let rx = http_receiver().await;
    rx.received.delay_ms.store(3_000, Ordering::SeqCst);
    let mut env = otel_env(&rx).to_vec();
    env.push(("OTEL_EXPORTER_OTLP_TIMEOUT", "300".to_owned()));
    let mut p = spawn_with_env(&sim, &dir.path().join("s.db"), &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    let failing = eventually(Duration::from_secs(20), async || {
        get(
            &parse(&scrape(p.addr).await),
            "qoder_exporter_span_export_failures_total",
        ) > 0.0
    })
    .await;
    assert!(failing, "timeouts counted as failed exports");
    let series = parse(&scrape(p.addr).await);
    assert_eq!(get(&series, "qoder_up"), 1.0, "the API side is unaffected");
    assert!(
        get(&series, "qoder_exporter_span_outbox_turns") > 0.0,
        "spans wait"
    );
    // The endpoint gets fast again: everything arrives.
    rx.received.delay_ms.store(0, Ordering::SeqCst);
    let total = want.total();
    let arrived = eventually(Duration::from_secs(60), async || {
        distinct(rx.received.spans()).len() >= total
    })
    .await;
    assert!(
        arrived,
        "{} of {total} spans",
        distinct(rx.received.spans()).len()
    );
    p.terminate();
    check_spans(&distinct(rx.received.spans()), &want);
}
