//! Metrics (and the event log) over OTLP: what an in-process OTLP receiver gets, checked
//! against `/metrics` of the same exporter, series by series, across a SIGTERM and restart.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric, number_data_point};
use prost::Message;
use qoder_exporter::sim::ScenarioConfig;

use crate::binary::spawn_with_env;
use crate::common::*;

/// What the receiver got, and how it answers.
#[derive(Clone, Default)]
pub struct Received {
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Non-zero: answer every request with this HTTP status (gRPC: UNAVAILABLE).
    fail: Arc<AtomicU16>,
}

impl Received {
    pub fn fail_with(&self, status: u16) {
        self.fail.store(status, Ordering::SeqCst);
    }

    pub fn metric_pushes(&self) -> usize {
        self.metrics.lock().expect("lock").len()
    }

    pub fn last_metrics(&self) -> Option<ExportMetricsServiceRequest> {
        self.metrics.lock().expect("lock").last().cloned()
    }

    /// Every log record received, in order.
    pub fn log_records(&self) -> Vec<LogRecord> {
        self.logs
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| s.log_records.clone())
            .collect()
    }

    /// `(trace id, span id)` of every span received.
    pub fn span_ids(&self) -> BTreeSet<(Vec<u8>, Vec<u8>)> {
        self.traces
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| (s.trace_id.clone(), s.span_id.clone()))
            .collect()
    }
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

/// OTLP/HTTP: `POST /v1/metrics` and `POST /v1/logs` with protobuf bodies.
pub async fn http_receiver() -> Receiver {
    async fn metrics(State(r): State<Received>, body: axum::body::Bytes) -> impl IntoResponse {
        let status = r.fail.load(Ordering::SeqCst);
        if status != 0 {
            return (StatusCode::from_u16(status).expect("status"), Vec::new()).into_response();
        }
        let Ok(req) = ExportMetricsServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        r.metrics.lock().expect("lock").push(req);
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportMetricsServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }
    async fn logs(State(r): State<Received>, body: axum::body::Bytes) -> impl IntoResponse {
        let status = r.fail.load(Ordering::SeqCst);
        if status != 0 {
            return (StatusCode::from_u16(status).expect("status"), Vec::new()).into_response();
        }
        let Ok(req) = ExportLogsServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        r.logs.lock().expect("lock").push(req);
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportLogsServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }
    async fn traces(State(r): State<Received>, body: axum::body::Bytes) -> impl IntoResponse {
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
        };
        r.traces.lock().expect("lock").push(req);
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .route("/v1/metrics", axum::routing::post(metrics))
        .route("/v1/logs", axum::routing::post(logs))
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

struct GrpcMetrics(Received);

#[tonic::async_trait]
impl MetricsService for GrpcMetrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if self.0.fail.load(Ordering::SeqCst) != 0 {
            return Err(tonic::Status::unavailable("down"));
        }
        self.0
            .metrics
            .lock()
            .expect("lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

struct GrpcLogs(Received);

#[tonic::async_trait]
impl LogsService for GrpcLogs {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if self.0.fail.load(Ordering::SeqCst) != 0 {
            return Err(tonic::Status::unavailable("down"));
        }
        self.0.logs.lock().expect("lock").push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// OTLP/gRPC: the collector's `MetricsService` and `LogsService`.
pub async fn grpc_metrics_receiver() -> Receiver {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let svc = MetricsServiceServer::new(GrpcMetrics(received.clone()));
    let logs = LogsServiceServer::new(GrpcLogs(received.clone()));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .add_service(logs)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    Receiver {
        addr,
        received,
        task,
    }
}

/// One pushed data point as Prometheus would name it, with what it carried besides its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub value: f64,
    pub start: u64,
    pub cumulative: bool,
}

fn label_pairs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = kvs
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect();
    out.sort();
    out
}

/// The OpenTelemetry Collector's Prometheus name translation (its default, with suffixes):
/// the unit's Prometheus word is appended unless the name has it, and a monotonic sum gets
/// `_total` in place of any `total` word (`pkg/translator/prometheus`, `normalize_name.go`).
fn prometheus_name(name: &str, unit: &str, monotonic: bool) -> String {
    let mut out = if monotonic {
        name.split('_')
            .filter(|t| *t != "total")
            .collect::<Vec<_>>()
            .join("_")
    } else {
        name.to_owned()
    };
    let word = match unit {
        "s" => Some("seconds"),
        "By" => Some("bytes"),
        _ => None,
    };
    if let Some(w) = word
        && !name.split('_').any(|t| t == w)
    {
        out.push('_');
        out.push_str(w);
    }
    if monotonic {
        out.push_str("_total");
    }
    out
}

/// A pushed request as the `(name, labels) -> point` series a Prometheus exporter would show.
pub fn as_series(
    req: &ExportMetricsServiceRequest,
) -> BTreeMap<(String, Vec<(String, String)>), Point> {
    let mut out = BTreeMap::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                match m.data.as_ref().expect("data") {
                    metric::Data::Sum(s) => {
                        let name = prometheus_name(&m.name, &m.unit, s.is_monotonic);
                        for p in &s.data_points {
                            let Some(number_data_point::Value::AsDouble(v)) = p.value else {
                                panic!("{name}: a double");
                            };
                            out.insert(
                                (name.clone(), label_pairs(&p.attributes)),
                                Point {
                                    value: v,
                                    start: p.start_time_unix_nano,
                                    cumulative: s.aggregation_temporality
                                        == AggregationTemporality::Cumulative as i32,
                                },
                            );
                        }
                    }
                    metric::Data::Gauge(g) => {
                        let name = prometheus_name(&m.name, &m.unit, false);
                        for p in &g.data_points {
                            let Some(number_data_point::Value::AsDouble(v)) = p.value else {
                                panic!("{name}: a double");
                            };
                            out.insert(
                                (name.clone(), label_pairs(&p.attributes)),
                                Point {
                                    value: v,
                                    start: 0,
                                    cumulative: false,
                                },
                            );
                        }
                    }
                    metric::Data::Histogram(h) => {
                        let base = prometheus_name(&m.name, &m.unit, false);
                        let cumulative =
                            h.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                        for p in &h.data_points {
                            let labels = label_pairs(&p.attributes);
                            let point = |value: f64| Point {
                                value,
                                start: p.start_time_unix_nano,
                                cumulative,
                            };
                            let mut below = 0u64;
                            for (i, n) in p.bucket_counts.iter().enumerate() {
                                below += n;
                                let le = p
                                    .explicit_bounds
                                    .get(i)
                                    .map_or_else(|| "+Inf".to_owned(), |b| format!("{b}"));
                                let mut l = labels.clone();
                                l.push(("le".to_owned(), le));
                                l.sort();
                                out.insert((format!("{base}_bucket"), l), point(below as f64));
                            }
                            out.insert(
                                (format!("{base}_sum"), labels.clone()),
                                point(p.sum.expect("sum")),
                            );
                            out.insert((format!("{base}_count"), labels), point(p.count as f64));
                        }
                    }
                    other => panic!("{}: unexpected kind {other:?}", m.name),
                }
            }
        }
    }
    out
}

/// The event-derived families: their values stand still once the log is counted.
fn event_derived(name: &str) -> bool {
    name.starts_with("qoder_") && !name.starts_with("qoder_exporter_") && name != "qoder_up"
}

/// Waits for `n` more metric pushes than the receiver has now.
async fn more_pushes(rx: &Receiver, n: usize) {
    let before = rx.received.metric_pushes();
    assert!(
        eventually(Duration::from_secs(30), async || rx
            .received
            .metric_pushes()
            >= before + n)
        .await,
        "{n} more metric pushes"
    );
}

fn metrics_env(rx: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_METRICS_EXPORTER", "otlp".to_owned()),
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            format!("http://{}/v1/metrics", rx.addr),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_owned()),
    ]
}

fn env_refs<'a>(e: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    e.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_metrics_equal_the_scrape_series_by_series_and_continue_across_a_restart() {
    let sim = sim(ScenarioConfig {
        seed: 41,
        sessions: 8,
        stagger: 0,
        max_turns: 4,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let rx = http_receiver().await;
    let env = metrics_env(&rx);
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("s.db");
    let mut p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
    let scraped = wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    // A push taken after the totals were exact.
    more_pushes(&rx, 1).await;
    let pushed = as_series(&rx.received.last_metrics().expect("a push"));

    // Every series of the scrape was pushed, under the name the Collector gives back; the
    // event-derived ones with the same value, cumulative, from one start time.
    let mut missing = Vec::new();
    let mut differ = Vec::new();
    for (key, value) in &scraped {
        match pushed.get(key) {
            None => missing.push(format!("{key:?}")),
            Some(point) if event_derived(&key.0) => {
                if point.value != *value {
                    differ.push(format!("{key:?}: scraped {value}, pushed {}", point.value));
                }
                let counter = key.0.ends_with("_total")
                    || key.0.ends_with("_bucket")
                    || key.0.ends_with("_sum")
                    || key.0.ends_with("_count");
                if counter {
                    assert!(point.cumulative, "{key:?} cumulative");
                }
            }
            Some(_) => {}
        }
    }
    assert!(missing.is_empty(), "not pushed: {missing:#?}");
    assert!(differ.is_empty(), "values differ: {differ:#?}");
    // Series appear, never go: whatever the push has, a scrape after it has too.
    let later = parse(&scrape(p.addr).await);
    let extra: Vec<_> = pushed.keys().filter(|k| !later.contains_key(*k)).collect();
    assert!(extra.is_empty(), "pushed but not scraped: {extra:#?}");
    let starts: BTreeSet<u64> = pushed
        .iter()
        .filter(|(k, p)| event_derived(&k.0) && p.start > 0)
        .map(|(_, p)| p.start)
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "one start for the durable series: {starts:?}"
    );
    // The durable counters and histograms (per-session gauges are not durable).
    let durable: BTreeMap<_, _> = pushed
        .into_iter()
        .filter(|(k, p)| event_derived(&k.0) && p.cumulative)
        .collect();
    assert!(durable.len() > 50, "{} durable series", durable.len());

    // SIGTERM, then the same state again: the same series, values and start times.
    p.terminate();
    let after_stop = as_series(&rx.received.last_metrics().expect("a push"));
    let p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    more_pushes(&rx, 1).await;
    let again = as_series(&rx.received.last_metrics().expect("a push"));
    for (key, point) in &durable {
        assert_eq!(
            after_stop.get(key),
            Some(point),
            "{key:?} in the push at exit"
        );
        assert_eq!(again.get(key), Some(point), "{key:?} after the restart");
    }
    let log = p.log();
    assert!(log.contains("metrics push on"), "{log}");
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_costs_pushes_not_counts_and_grpc_gets_the_same_metrics_and_logs() {
    let sim = sim(ScenarioConfig {
        seed: 42,
        sessions: 5,
        stagger: 0,
        max_turns: 3,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let rx = grpc_metrics_receiver().await;
    rx.received.fail_with(503);
    let env = vec![
        ("OTEL_METRICS_EXPORTER", "otlp".to_owned()),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc".to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", rx.addr)),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100".to_owned()),
        ("OTEL_LOGS_EXPORTER", "otlp".to_owned()),
        ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "grpc".to_owned()),
        // Spans go to the same port, which has no trace service: they fail and wait in their
        // outbox; not what this test is about.
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://{}", rx.addr),
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc".to_owned()),
    ];
    let dir = tempfile::tempdir().expect("dir");
    let p = spawn_with_env(&sim, &dir.path().join("s.db"), &[], &env_refs(&env));
    let scraped = wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    let failures = async || {
        get(
            &parse(&scrape(p.addr).await),
            "qoder_exporter_otlp_export_failures_total",
        )
    };
    assert!(
        eventually(Duration::from_secs(30), async || failures().await >= 3.0).await,
        "failed pushes are counted"
    );
    assert_eq!(rx.received.metric_pushes(), 0);
    rx.received.fail_with(0);
    more_pushes(&rx, 1).await;
    let pushed = as_series(&rx.received.last_metrics().expect("a push"));
    for (key, value) in scraped.iter().filter(|(k, _)| event_derived(&k.0)) {
        assert_eq!(
            pushed.get(key).map(|p| p.value),
            Some(*value),
            "{key:?} after the outage"
        );
    }
    // The log records waited in the outbox through the outage: every event, once.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count"
    )]
    let events = sim.totals.event_count() as usize;
    assert!(
        eventually(Duration::from_secs(30), async || rx
            .received
            .log_records()
            .len()
            >= events)
        .await,
        "log records after the outage"
    );
    assert_eq!(rx.received.log_records().len(), events);
    let log = p.log();
    assert!(log.contains("OTLP metrics push failed"), "{log}");
    assert!(log.contains("accepts metrics again"), "{log}");
    assert!(log.contains("OTLP log export failed"), "{log}");
    drop(p);
}

fn attr<'a>(r: &'a LogRecord, key: &str) -> Option<&'a str> {
    r.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(AnyValue::StringValue(s)) => Some(s.as_str()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_one_log_record_and_errors_point_at_their_turns_span() {
    let sim = sim(ScenarioConfig {
        seed: 43,
        sessions: 9,
        stagger: 0,
        max_turns: 4,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let rx = http_receiver().await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", rx.addr)),
        ("OTEL_LOGS_EXPORTER", "otlp".to_owned()),
    ];
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("s.db");
    let mut p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count"
    )]
    let events = sim.totals.event_count() as usize;
    // SIGTERM flushes both outboxes; then a restart on the same state sends nothing again.
    p.terminate();
    let p = spawn_with_env(&sim, &state, &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    drop(p);

    let records = rx.received.log_records();
    let ids: BTreeSet<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                attr(r, "session.id").expect("session"),
                attr(r, "qoder.event.id").expect("event id"),
            )
        })
        .collect();
    assert_eq!(ids.len(), records.len(), "no record twice");
    assert_eq!(records.len(), events, "one record per counted event");
    for r in &records {
        assert_eq!(attr(r, "event.name"), Some(r.event_name.as_str()));
        assert!(r.time_unix_nano > 0, "the event's own time");
    }
    let want_errors: f64 = sim.totals.session_errors.values().sum();
    let errors: Vec<&LogRecord> = records
        .iter()
        .filter(|r| r.event_name == "session.error")
        .collect();
    assert!(want_errors > 0.0, "the scenario has session errors");
    #[allow(clippy::cast_precision_loss, reason = "a count")]
    let got = errors.len() as f64;
    assert_eq!(got, want_errors);
    let spans = rx.received.span_ids();
    for e in &errors {
        assert!(
            e.severity_number >= 13,
            "WARN or ERROR: {}",
            e.severity_text
        );
        assert!(
            spans.contains(&(e.trace_id.clone(), e.span_id.clone())),
            "the error's trace and span were exported: {:?}",
            attr(e, "qoder.event.id")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_goes_out_only_on_opt_in_and_only_for_the_chosen_event_types() {
    let sim = sim(ScenarioConfig {
        seed: 44,
        sessions: 4,
        stagger: 0,
        max_turns: 3,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let mut bodies = Vec::new();
    for (name, content) in [("plain.db", false), ("content.db", true)] {
        let rx = http_receiver().await;
        let mut env = vec![
            (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                format!("http://{}/v1/logs", rx.addr),
            ),
            ("OTEL_LOGS_EXPORTER", "otlp".to_owned()),
            (
                "QODER_OTLP_LOGS_EVENT_TYPES",
                "user.message,agent.tool_use".to_owned(),
            ),
        ];
        if content {
            env.push(("QODER_OTLP_LOGS_INCLUDE_CONTENT", "true".to_owned()));
        }
        let mut p = spawn_with_env(&sim, &dir.path().join(name), &[], &env_refs(&env));
        wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
        p.terminate();
        let records = rx.received.log_records();
        let want: f64 = sim
            .totals
            .events
            .iter()
            .filter(|((t, _), _)| t == "user.message" || t == "agent.tool_use")
            .map(|(_, v)| v)
            .sum();
        #[allow(clippy::cast_precision_loss, reason = "a count")]
        let got = records.len() as f64;
        assert_eq!(got, want, "{name}: only the chosen types");
        let with_body: Vec<(String, String)> = records
            .iter()
            .filter_map(|r| match r.body.as_ref().and_then(|b| b.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => Some((r.event_name.clone(), s.clone())),
                _ => None,
            })
            .collect();
        bodies.push(with_body);
    }
    assert!(
        bodies[0].is_empty(),
        "no content without the opt-in: {:?}",
        bodies[0]
    );
    let tool_inputs: Vec<&String> = bodies[1]
        .iter()
        .filter(|(t, _)| t == "agent.tool_use")
        .map(|(_, b)| b)
        .collect();
    assert!(
        tool_inputs
            .iter()
            .any(|b| b.as_str() == r#"{"command":"ls"}"#),
        "a tool input, as JSON: {tool_inputs:?}"
    );
    assert!(
        bodies[1]
            .iter()
            .any(|(t, b)| t == "user.message" && !b.is_empty()),
        "message text"
    );
}

/// An endpoint that takes connections and never answers (a blackhole: a firewall dropping
/// replies, a hung collector) holds every export until its timeout (10 s by default). A
/// SIGTERM must not wait for each signal's in turn: the shippers and the final push share one
/// 5 s deadline, and what is left stays for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_every_signal_at_a_silent_endpoint_exits_by_the_shared_deadline() {
    let sim = sim(ScenarioConfig {
        seed: 43,
        sessions: 3,
        stagger: 0,
        max_turns: 2,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    // Listening, never accepting: the kernel completes the connections, nobody answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = format!("http://{}", silent.local_addr().expect("addr"));
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", at),
        ("OTEL_METRICS_EXPORTER", "otlp".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100".to_owned()),
        ("OTEL_LOGS_EXPORTER", "otlp".to_owned()),
    ];
    let dir = tempfile::tempdir().expect("dir");
    let mut p = spawn_with_env(&sim, &dir.path().join("s.db"), &[], &env_refs(&env));
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    let took = p.terminate();
    let log = p.log();
    assert!(
        took < Duration::from_secs(9),
        "SIGTERM took {took:?}: the deadlines were not shared\n{log}"
    );
    assert!(
        log.contains("could not flush the outbox before exit"),
        "{log}"
    );
    assert!(log.contains("state committed and closed"), "{log}");
    drop(silent);
}
