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

use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::unix_nanos;
use crate::record::{EventRecord, Severity};
use crate::sinks::metrics::ProcessMetrics;
use crate::sinks::otlp::OutboxError;
use crate::sinks::otlp_send::{OtlpSender, SendError};
use crate::sinks::traces::{self, semconv};

/// Records per export request.
const BATCH_RECORDS: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the shipper takes records from (the pipeline implements it over the state file).
pub(crate) trait RecordOutbox: Send + Sync {
    /// The oldest records waiting, at most `limit`, with their sequence numbers (`None`: a row
    /// that no longer decodes). They stay leased until removed or released.
    fn peek(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(i64, Option<EventRecord>)>, OutboxError>> + Send;
    /// Records up to `seq` were exported (or given up on).
    fn remove_through(&self, seq: i64) -> impl Future<Output = Result<(), OutboxError>> + Send;
    /// The export of the last peeked records failed: they may be trimmed again.
    fn release(&self) -> impl Future<Output = Result<(), OutboxError>> + Send;
}

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
        ("qoder.retry_status", &r.retry_status),
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

enum Round {
    Idle,
    Progress,
    Failed,
    Stopped,
}

fn after(e: OutboxError) -> Round {
    match e {
        OutboxError::Gone => Round::Stopped,
        OutboxError::Store => Round::Failed,
    }
}

impl<O: RecordOutbox> LogShipper<O> {
    /// Runs until `stop` is cancelled, then sends what is left for at most `flush_within`.
    pub async fn run(self, stop: CancellationToken, flush_within: Duration) {
        let mut batch = BATCH_RECORDS;
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            let round = tokio::select! {
                r = self.round(&mut batch, &mut failing) => r,
                () = stop.cancelled() => break,
            };
            match round {
                Round::Progress => backoff = BACKOFF_MIN,
                Round::Idle => {
                    tokio::select! {
                        () = self.notify.notified() => {}
                        () = stop.cancelled() => break,
                    }
                }
                Round::Failed => {
                    let wait = backoff.mul_f64(0.5 + fastrand::f64());
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => break,
                    }
                }
                Round::Stopped => return,
            }
        }
        let flush = async {
            loop {
                match self.round(&mut batch, &mut failing).await {
                    Round::Progress => {}
                    Round::Idle | Round::Stopped => return true,
                    Round::Failed => return false,
                }
            }
        };
        match tokio::time::timeout(flush_within, flush).await {
            Ok(true) => tracing::info!("log outbox flushed"),
            Ok(false) | Err(_) => tracing::warn!(endpoint = %self.sender.endpoint(),
                "could not flush the log outbox before exit; the records are kept and sent at the next start"),
        }
    }

    async fn round(&self, batch: &mut usize, failing: &mut bool) -> Round {
        let rows = match self.outbox.peek(*batch).await {
            Ok(rows) => rows,
            Err(e) => return after(e),
        };
        let Some(&(last, _)) = rows.last() else {
            return Round::Idle;
        };
        let observed = unix_nanos(SystemTime::now());
        let records: Vec<LogRecord> = rows
            .iter()
            .filter_map(|(_, r)| r.as_ref().map(|r| log_record(r, observed)))
            .collect();
        let unreadable = (rows.len() - records.len()) as u64;
        let p = &self.metrics;
        if unreadable > 0 {
            tracing::warn!(
                records = unreadable,
                "log outbox rows that no longer read (another version wrote them); dropped"
            );
            p.otlp_dropped
                .with_label_values(&["logs", "rejected"])
                .inc_by(unreadable);
        }
        let n = records.len() as u64;
        let result = if records.is_empty() {
            Ok(Default::default())
        } else {
            self.sender.logs(self.request(records)).await
        };
        match result {
            Ok(accepted) => {
                p.otlp_exported
                    .with_label_values(&["logs"])
                    .inc_by(n.saturating_sub(accepted.rejected));
                if accepted.rejected > 0 {
                    tracing::warn!(endpoint = %self.sender.endpoint(), rejected = accepted.rejected,
                        message = %accepted.message, "the OTLP endpoint dropped some log records");
                    p.otlp_dropped
                        .with_label_values(&["logs", "rejected"])
                        .inc_by(accepted.rejected);
                }
                #[allow(clippy::cast_precision_loss, reason = "Unix seconds")]
                p.otlp_last_success
                    .with_label_values(&["logs"])
                    .set(observed as f64 / 1e9);
                if let Err(e) = self.outbox.remove_through(last).await {
                    return after(e);
                }
                if std::mem::take(failing) {
                    tracing::info!(endpoint = %self.sender.endpoint(), "OTLP endpoint accepts log records again");
                }
                *batch = BATCH_RECORDS;
                Round::Progress
            }
            Err(SendError::Rejected(message)) => {
                p.otlp_export_failures.with_label_values(&["logs"]).inc();
                if rows.len() > 1 {
                    // Find the record it refuses: one at a time from here.
                    *batch = 1;
                    if let Err(e) = self.outbox.release().await {
                        return after(e);
                    }
                    return Round::Progress;
                }
                tracing::warn!(endpoint = %self.sender.endpoint(), error = %message,
                    "the OTLP endpoint refused a log record; dropped");
                p.otlp_dropped
                    .with_label_values(&["logs", "rejected"])
                    .inc_by(n);
                if let Err(e) = self.outbox.remove_through(last).await {
                    return after(e);
                }
                Round::Progress
            }
            Err(SendError::Failed(message)) => {
                p.otlp_export_failures.with_label_values(&["logs"]).inc();
                if let Err(e) = self.outbox.release().await {
                    return after(e);
                }
                if std::mem::replace(failing, true) {
                    tracing::debug!(endpoint = %self.sender.endpoint(), error = %message, "OTLP log export failed again");
                } else {
                    tracing::warn!(endpoint = %self.sender.endpoint(), error = %message,
                        "OTLP log export failed; records stay in the outbox and are retried");
                }
                Round::Failed
            }
        }
    }

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
}
