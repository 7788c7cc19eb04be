//! The event log over OTLP: the shipper that drains the log outbox into an OTLP endpoint.
//!
//! Each counted event waits in the outbox as an [`EventRecord`] (written in the transaction of
//! the batch that counted it). The shipper sends the oldest, and removes them only when the
//! endpoint accepted them: a crash between the two sends them again (at least once across a
//! crash, never lost while the outbox has room). A record carries the trace and span ids of
//! its turn, derived exactly as the spans' are, so a backend links it to the turn's trace.
//!
//! Refused as malformed (HTTP 400/413, gRPC `InvalidArgument`): retried one record at a time,
//! and a single refused record is dropped and counted, so one bad record cannot stall the rest.

use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::Notify;

use crate::event::unix_nanos;
use crate::record::{EventRecord, Severity};
use crate::sinks::drain::{OutboxSource, Round, Rounds, StopSignal, drain};
use crate::sinks::metrics::ProcessMetrics;
use crate::sinks::otlp_send::{OtlpSender, SendError};
use crate::sinks::traces::{self, semconv};

/// Records per export request.
const BATCH_RECORDS: usize = 512;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn text(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.to_owned()))
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "token counts are whole numbers far below 2^53"
)]
fn int(key: &str, v: f64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v.round() as i64))
}

/// One record as OTLP has it: `event_name` the event type, time the event's, severity from
/// the event, the turn's trace context, attributes for what the event says.
pub(crate) fn log_record(r: &EventRecord, observed: u64) -> LogRecord {
    let (severity_number, severity_text) = match r.severity() {
        Severity::Info => (SeverityNumber::Info, "INFO"),
        Severity::Warn => (SeverityNumber::Warn, "WARN"),
        Severity::Error => (SeverityNumber::Error, "ERROR"),
    };
    let mut attributes = vec![
        text("event.name", &r.type_name),
        text(semconv::SESSION_ID, &r.session_id),
        text(semconv::GEN_AI_CONVERSATION_ID, &r.session_id),
        text("qoder.event.id", &r.event_id),
        text(semconv::GEN_AI_AGENT_NAME, &r.agent),
    ];
    let optional = [
        ("qoder.thread.id", &r.thread_id),
        (semconv::GEN_AI_REQUEST_MODEL, &r.model),
        (semconv::GEN_AI_TOOL_NAME, &r.tool),
        (semconv::ERROR_TYPE, &r.error_type),
        (semconv::QODER_RETRY_STATUS, &r.retry_status),
        ("qoder.stop_reason", &r.stop_reason),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            attributes.push(text(key, v));
        }
    }
    if let Some(e) = r.is_error {
        attributes.push(kv("qoder.is_error", any_value::Value::BoolValue(e)));
    }
    if let Some(c) = r.credits {
        attributes.push(kv(
            "qoder.credits",
            any_value::Value::DoubleValue((c * 1e6).round() / 1e6),
        ));
    }
    if let Some(t) = &r.tokens {
        attributes.push(int(
            semconv::GEN_AI_USAGE_INPUT_TOKENS,
            t.input + t.cache_read + t.cache_creation,
        ));
        attributes.push(int(semconv::GEN_AI_USAGE_OUTPUT_TOKENS, t.output));
        attributes.push(int(
            semconv::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
            t.cache_read,
        ));
        attributes.push(int(
            semconv::GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
            t.cache_creation,
        ));
    }
    let (trace_id, span_id) = match &r.turn {
        Some(t) => (
            traces::trace_id(&r.session_id, &t.trace_key)
                .to_bytes()
                .to_vec(),
            traces::span_id(&r.session_id, "invoke_agent", &t.span_event_id)
                .to_bytes()
                .to_vec(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    LogRecord {
        time_unix_nano: r.time_ns.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
        observed_time_unix_nano: observed,
        severity_number: severity_number as i32,
        severity_text: severity_text.to_owned(),
        body: r.content.as_deref().map(|c| AnyValue {
            value: Some(any_value::Value::StringValue(c.to_owned())),
        }),
        attributes,
        trace_id,
        span_id,
        event_name: r.type_name.clone(),
        ..LogRecord::default()
    }
}

/// Drains the log outbox into the endpoint until stopped.
#[derive(Debug)]
pub(crate) struct LogShipper<O> {
    pub sender: OtlpSender,
    pub outbox: O,
    pub metrics: ProcessMetrics,
    pub notify: std::sync::Arc<Notify>,
    pub resource: Resource,
}

impl<O: OutboxSource<EventRecord>> LogShipper<O> {
    /// Runs until `stop` is asked for, then empties the outbox by its deadline (see
    /// [`super::drain`]).
    pub async fn run(self, stop: StopSignal) {
        let notify = self.notify.clone();
        drain(self.rounds(), notify, stop).await;
    }

    fn rounds(self) -> LogRounds<O> {
        LogRounds {
            shipper: self,
            batch: BATCH_RECORDS,
            failing: false,
        }
    }
}

/// The log shipper between rounds: how many records it reads at once (one at a time while it
/// looks for a record the endpoint refuses), and whether the endpoint is failing.
struct LogRounds<O> {
    shipper: LogShipper<O>,
    batch: usize,
    failing: bool,
}

impl<O: OutboxSource<EventRecord>> Rounds for LogRounds<O> {
    const SIGNAL: &'static str = "logs";

    fn endpoint(&self) -> &str {
        self.shipper.sender.endpoint()
    }

    async fn round(&mut self) -> Round {
        let s = &self.shipper;
        let rows = match s.outbox.peek(self.batch).await {
            Ok(rows) => rows,
            Err(e) => return e.into(),
        };
        let Some(&(last, _)) = rows.last() else {
            return Round::Idle;
        };
        let observed = unix_nanos(SystemTime::now());
        let records: Vec<LogRecord> = rows
            .iter()
            .filter_map(|(_, r)| r.as_ref().map(|r| log_record(r, observed)))
            .collect();
        let p = &s.metrics;
        // Rows that no longer read are counted when they leave the outbox, once.
        let unreadable = (rows.len() - records.len()) as u64;
        let drop_unreadable = || {
            if unreadable > 0 {
                tracing::warn!(
                    records = unreadable,
                    "log outbox rows that no longer read (another version wrote them); dropped"
                );
                p.otlp_dropped
                    .with_label_values(&["logs", "rejected"])
                    .inc_by(unreadable);
            }
        };
        let n = records.len() as u64;
        let result = if records.is_empty() {
            Ok(Default::default())
        } else {
            s.sender.logs(s.request(records)).await
        };
        match result {
            Ok(accepted) => {
                p.otlp_exported
                    .with_label_values(&["logs"])
                    .inc_by(n.saturating_sub(accepted.rejected));
                if accepted.rejected > 0 {
                    tracing::warn!(endpoint = %s.sender.endpoint(), rejected = accepted.rejected,
                        message = %accepted.message, "the OTLP endpoint dropped some log records");
                    p.otlp_dropped
                        .with_label_values(&["logs", "rejected"])
                        .inc_by(accepted.rejected);
                }
                #[allow(clippy::cast_precision_loss, reason = "Unix seconds")]
                p.otlp_last_success
                    .with_label_values(&["logs"])
                    .set(observed as f64 / 1e9);
                if let Err(e) = s.outbox.remove_through(last).await {
                    return e.into();
                }
                drop_unreadable();
                if std::mem::take(&mut self.failing) {
                    tracing::info!(endpoint = %s.sender.endpoint(), "OTLP endpoint accepts log records again");
                }
                self.batch = BATCH_RECORDS;
                Round::Progress
            }
            Err(SendError::Rejected(message)) => {
                p.otlp_export_failures.with_label_values(&["logs"]).inc();
                if rows.len() > 1 {
                    // Find the record it refuses: one at a time from here.
                    self.batch = 1;
                    return match s.outbox.release().await {
                        Ok(()) => Round::Progress,
                        Err(e) => e.into(),
                    };
                }
                tracing::warn!(endpoint = %s.sender.endpoint(), error = %message,
                    "the OTLP endpoint refused a log record; dropped");
                if let Err(e) = s.outbox.remove_through(last).await {
                    return e.into();
                }
                p.otlp_dropped
                    .with_label_values(&["logs", "rejected"])
                    .inc_by(n);
                drop_unreadable();
                Round::Progress
            }
            Err(SendError::Failed(message)) => {
                p.otlp_export_failures.with_label_values(&["logs"]).inc();
                if let Err(e) = s.outbox.release().await {
                    return e.into();
                }
                if std::mem::replace(&mut self.failing, true) {
                    tracing::debug!(endpoint = %s.sender.endpoint(), error = %message, "OTLP log export failed again");
                } else {
                    tracing::warn!(endpoint = %s.sender.endpoint(), error = %message,
                        "OTLP log export failed; records stay in the outbox and are retried");
                }
                Round::Failed
            }
        }
    }
}

impl<O> LogShipper<O> {
    fn request(&self, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "qoder-exporter".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..InstrumentationScope::default()
                    }),
                    log_records: records,
                    schema_url: traces::SCHEMA_URL.to_owned(),
                }],
                ..ResourceLogs::default()
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::TurnRef;

    #[test]
    fn a_record_carries_its_turns_trace_and_root_span() {
        let r = EventRecord {
            session_id: "sess_1".into(),
            event_id: "evt_9".into(),
            type_name: "session.error".into(),
            time_ns: Some(1_700_000_000_000_000_000),
            agent: "coder".into(),
            error_type: Some("model_error".into()),
            retry_status: Some("exhausted".into()),
            turn: Some(TurnRef {
                trace_key: "turn_1".into(),
                span_event_id: "evt_1".into(),
            }),
            ..EventRecord::default()
        };
        let l = log_record(&r, 5);
        assert_eq!(
            l.trace_id,
            traces::trace_id("sess_1", "turn_1").to_bytes().to_vec()
        );
        assert_eq!(
            l.span_id,
            traces::span_id("sess_1", "invoke_agent", "evt_1")
                .to_bytes()
                .to_vec()
        );
        assert_eq!(l.severity_number, SeverityNumber::Error as i32);
        assert_eq!(l.event_name, "session.error");
        assert_eq!(l.time_unix_nano, 1_700_000_000_000_000_000);
        assert!(l.body.is_none(), "no content without the opt-in");
        let keys: Vec<&str> = l.attributes.iter().map(|a| a.key.as_str()).collect();
        assert!(
            keys.contains(&"error.type") && keys.contains(&"session.id"),
            "{keys:?}"
        );
    }

    /// An outbox in memory, for the shipper's rounds.
    #[derive(Default)]
    struct Rows(std::sync::Mutex<Vec<(i64, Option<EventRecord>)>>);

    impl OutboxSource<EventRecord> for Rows {
        async fn peek(
            &self,
            limit: usize,
        ) -> Result<Vec<(i64, Option<EventRecord>)>, crate::sinks::drain::OutboxError> {
            Ok(self
                .0
                .lock()
                .expect("rows")
                .iter()
                .take(limit)
                .cloned()
                .collect())
        }
        async fn remove_through(&self, seq: i64) -> Result<(), crate::sinks::drain::OutboxError> {
            self.0.lock().expect("rows").retain(|(s, _)| *s > seq);
            Ok(())
        }
        async fn release(&self) -> Result<(), crate::sinks::drain::OutboxError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_unreadable_row_is_one_dropped_record_however_often_its_batch_is_retried() {
        let metrics = crate::sinks::metrics::Metrics::new().expect("metrics");
        // Nothing listens on port 9 (discard) here: every send fails.
        let target = crate::config::OtlpTarget {
            endpoint: "http://127.0.0.1:9/v1/logs".into(),
            protocol: crate::config::OtlpProtocol::HttpProtobuf,
            headers: Vec::new(),
            timeout: std::time::Duration::from_secs(1),
        };
        let outbox = Rows::default();
        let readable = EventRecord {
            session_id: "s".into(),
            event_id: "e".into(),
            ..EventRecord::default()
        };
        outbox
            .0
            .lock()
            .expect("rows")
            .extend([(1, None), (2, Some(readable))]);
        let mut rounds = LogShipper {
            sender: OtlpSender::new(&target).expect("sender"),
            outbox,
            metrics: metrics.process.clone(),
            notify: std::sync::Arc::default(),
            resource: Resource::default(),
        }
        .rounds();
        let dropped = || {
            metrics
                .process
                .otlp_dropped
                .with_label_values(&["logs", "rejected"])
                .get()
        };
        for _ in 0..3 {
            assert_eq!(rounds.round().await, Round::Failed);
        }
        assert_eq!(dropped(), 0, "still in the outbox: not dropped yet");
        // With only the unreadable row left there is nothing to send: it leaves, counted once.
        rounds
            .shipper
            .outbox
            .0
            .lock()
            .expect("rows")
            .retain(|(s, _)| *s == 1);
        assert_eq!(rounds.round().await, Round::Progress);
        assert_eq!(rounds.round().await, Round::Idle);
        assert_eq!(dropped(), 1);
    }
}
