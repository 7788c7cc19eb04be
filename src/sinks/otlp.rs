//! OTLP delivery: the shipper that drains the span outbox into an OTLP endpoint.
//!
//! Closed turns wait in the state store's outbox (written in the transaction of the batch
//! that closed them). The shipper reads the oldest ones, builds their spans
//! ([`super::traces`]), sends them with `opentelemetry-otlp` (gRPC or HTTP/protobuf), and
//! removes them from the outbox only when the endpoint accepted them. A crash between the two
//! sends the same spans again with the same ids, which backends fold.
//!
//! When the endpoint fails, the turns stay and the shipper retries with capped backoff; the
//! pipeline bounds the outbox and drops the oldest past `--otlp.outbox-max-turns`. A batch the
//! endpoint refuses as malformed (HTTP 400/413, gRPC `InvalidArgument`) is retried one turn at
//! a time, and a single turn it refuses is dropped (`reason="rejected"`), so one bad turn
//! cannot stall the rest. Metrics never wait on any of this.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{OtlpProtocol, OtlpSettings};
use crate::sinks::metrics::ProcessMetrics;
use crate::sinks::traces;
use crate::turn::ClosedTurn;

/// Turns per export request (a turn is one root span plus its children).
const BATCH_TURNS: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The resource every span is reported under: `service.name` defaults to `qoder-exporter`
/// unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one; `service.instance.id`
/// to `instance_id` unless `OTEL_RESOURCE_ATTRIBUTES` sets one.
pub fn resource(instance_id: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let mut b = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if !named {
        b = b.with_service_name("qoder-exporter");
    }
    if detected
        .get(&opentelemetry::Key::from_static_str("service.instance.id"))
        .is_none()
    {
        b = b.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance_id.to_owned(),
        ));
    }
    b.build()
}

/// A `service.instance.id` that stays the same across restarts of one exporter and differs
/// between exporters: a UUID (version 5 layout) from the host name and the state file, which
/// no two running exporters share (the state file is locked).
pub(crate) fn instance_id(state_path: &std::path::Path) -> String {
    use sha2::Digest;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    // The file's real directory and its name: the same before the file exists (the first
    // run) and after, so the id does not change at the first restart.
    let abs = std::path::absolute(state_path).unwrap_or_else(|_| state_path.to_owned());
    let path = match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map_or(abs.clone(), |d| d.join(name)),
        _ => abs,
    };
    let mut h = sha2::Sha256::new();
    h.update(host.trim().as_bytes());
    h.update([0]);
    h.update(path.to_string_lossy().as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Builds the OTLP span exporter. Headers and timeout come from the standard
/// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` / `_TIMEOUT` variables, read by the library.
pub fn exporter(
    s: &OtlpSettings,
    instance_id: &str,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let mut e = match s.protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(s.endpoint.clone())
            .build(),
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(s.endpoint.clone())
            .build(),
    }
    .with_context(|| format!("OTLP exporter for {}", s.endpoint))?;
    e.set_resource(&resource(instance_id));
    Ok(e)
}

/// Whether a failed export can never succeed as sent (retrying the same bytes is pointless).
fn is_rejection(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "status code: 400",
        "status code: 413",
        "invalidargument",
        "invalid argument",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// Where the shipper takes closed turns from: the span outbox, which the pipeline keeps in the
/// state file (a turn enters it in the transaction of the batch that closed it).
pub(crate) trait TurnOutbox: Send + Sync {
    /// The oldest turns waiting, at most `limit`, with their outbox sequence numbers (`None`: a
    /// row that no longer decodes). They stay leased until removed or released.
    fn peek(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(i64, Option<ClosedTurn>)>, OutboxError>> + Send;
    /// Turns up to `seq` were exported (or given up on).
    fn remove_through(&self, seq: i64) -> impl Future<Output = Result<(), OutboxError>> + Send;
    /// The export of the last peeked turns failed: they may be trimmed again.
    fn release(&self) -> impl Future<Output = Result<(), OutboxError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxError {
    /// The pipeline stopped: the shipper stops too (what is left is sent at the next start).
    Gone,
    /// The state file refused the read or write: tried again after a back-off.
    Store,
}

/// Drains the outbox into the endpoint until stopped.
#[derive(Debug)]
pub(crate) struct Shipper<E, O> {
    pub exporter: E,
    pub outbox: O,
    pub metrics: ProcessMetrics,
    pub notify: Arc<Notify>,
    pub endpoint: String,
    /// The scope and API server every span carries.
    pub shape: traces::SpanShape,
}

impl Round {
    fn after(e: OutboxError) -> Round {
        match e {
            OutboxError::Gone => Round::Stopped,
            OutboxError::Store => Round::Failed,
        }
    }
}

enum Round {
    /// The outbox is empty.
    Idle,
    /// Something was sent (or dropped); look again at once.
    Progress,
    /// The endpoint failed; wait before trying again.
    Failed,
    /// The pipeline is gone.
    Stopped,
}

impl<E: opentelemetry_sdk::trace::SpanExporter, O: TurnOutbox> Shipper<E, O> {
    /// Runs until `stop` is cancelled, then makes a last attempt to empty the outbox, for at
    /// most `flush_within`.
    pub async fn run(self, stop: CancellationToken, flush_within: Duration) {
        let shape = self.shape.clone();
        let mut batch = BATCH_TURNS;
        let mut backoff = BACKOFF_MIN;
        let mut failing: Option<Outage> = None;
        loop {
            let round = tokio::select! {
                r = self.round(&shape, &mut batch, &mut failing) => r,
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
        // Shutting down: the pipeline has committed what it will; send what is left.
        let flush = async {
            loop {
                match self.round(&shape, &mut batch, &mut failing).await {
                    Round::Progress => {}
                    Round::Idle | Round::Stopped => return true,
                    Round::Failed => return false,
                }
            }
        };
        match tokio::time::timeout(flush_within, flush).await {
            Ok(true) => tracing::info!("span outbox flushed"),
            Ok(false) | Err(_) => tracing::warn!(
                endpoint = %self.endpoint,
                "could not flush the span outbox before exit; the spans are kept and sent at the next start"
            ),
        }
    }

    async fn round(
        &self,
        shape: &traces::SpanShape,
        batch: &mut usize,
        failing: &mut Option<Outage>,
    ) -> Round {
        let rows = match self.outbox.peek(*batch).await {
            Ok(rows) => rows,
            Err(e) => return Round::after(e),
        };
        let Some(&(last, _)) = rows.last() else {
            return Round::Idle;
        };
        let mut spans: Vec<SpanData> = Vec::new();
        let mut unusable = 0u64;
        for (_, turn) in &rows {
            match turn.as_ref().and_then(|t| traces::turn_spans(t, shape)) {
                Some(s) => spans.extend(s),
                None => unusable += 1,
            }
        }
        if unusable > 0 {
            tracing::warn!(
                turns = unusable,
                "turns without any timestamp (or unreadable) cannot become spans; dropped"
            );
            self.metrics
                .spans_dropped
                .with_label_values(&["invalid"])
                .inc_by(unusable);
        }
        let n = spans.len() as u64;
        let result = if spans.is_empty() {
            Ok(())
        } else {
            self.exporter.export(spans).await
        };
        match result {
            Ok(()) => {
                // Exported: counted even if the outbox cannot forget them now (they would be
                // sent again, with the same ids, rather than lost).
                self.metrics.spans_exported.inc_by(n);
                if let Err(e) = self.outbox.remove_through(last).await {
                    return Round::after(e);
                }
                if let Some(outage) = failing.take() {
                    tracing::info!(endpoint = %self.endpoint, failed_attempts = outage.failures,
                        outage = %humantime::format_duration(round_secs(outage.since.elapsed())),
                        "OTLP endpoint accepts spans again");
                }
                *batch = BATCH_TURNS;
                Round::Progress
            }
            Err(e) => {
                self.metrics.span_export_failures.inc();
                let message = e.to_string();
                if is_rejection(&message) {
                    if rows.len() > 1 {
                        // Find the turn it refuses: one at a time from here.
                        *batch = 1;
                        return Round::Progress;
                    }
                    tracing::warn!(endpoint = %self.endpoint, error = %message, spans = n,
                        "the OTLP endpoint refused a turn's spans; dropped");
                    self.metrics
                        .spans_dropped
                        .with_label_values(&["rejected"])
                        .inc_by(n);
                    if let Err(e) = self.outbox.remove_through(last).await {
                        return Round::after(e);
                    }
                    return Round::Progress;
                }
                if let Err(e) = self.outbox.release().await {
                    return Round::after(e);
                }
                match failing {
                    Some(outage) => {
                        outage.again(&self.endpoint, &message);
                    }
                    None => {
                        tracing::warn!(endpoint = %self.endpoint, error = %message,
                            "OTLP export failed; spans stay in the outbox and are retried");
                        *failing = Some(Outage::new());
                    }
                }
                Round::Failed
            }
        }
    }
}

/// An unreachable endpoint is told once when it starts, then at most every
/// [`OUTAGE_REMINDER`] with the failures in between, and once more when it ends.
#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u64,
    told: Instant,
    untold: u64,
}

const OUTAGE_REMINDER: Duration = Duration::from_secs(300);

impl Outage {
    fn new() -> Outage {
        let now = Instant::now();
        Outage {
            since: now,
            failures: 1,
            told: now,
            untold: 0,
        }
    }

    /// Another failure; true when it was logged at WARN (a reminder).
    fn again(&mut self, endpoint: &str, message: &str) -> bool {
        self.failures += 1;
        self.untold += 1;
        if self.told.elapsed() < OUTAGE_REMINDER {
            tracing::debug!(endpoint, error = %message, "OTLP export failed again");
            return false;
        }
        tracing::warn!(endpoint, error = %message, failed_attempts_since_last_log = self.untold,
            outage = %humantime::format_duration(round_secs(self.since.elapsed())),
            "OTLP export still failing; spans stay in the outbox");
        self.told = Instant::now();
        self.untold = 0;
        true
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_told_at_its_start_then_every_five_minutes_with_a_count() {
        let mut outage = Outage::new();
        let mut told = 0;
        // One failed attempt every 10 s for 12 minutes.
        for _ in 0..72 {
            tokio::time::advance(Duration::from_secs(10)).await;
            told += u32::from(outage.again("http://c", "connection refused"));
        }
        assert_eq!(told, 2, "reminders at 5 and 10 minutes only");
        assert_eq!(outage.failures, 73);
        assert_eq!(outage.untold, 12, "the failures since the last reminder");
    }

    #[test]
    fn rejections_are_told_from_outages() {
        assert!(is_rejection("HTTP export failed with status code: 400"));
        assert!(is_rejection("status: InvalidArgument, message: bad span"));
        assert!(!is_rejection("HTTP export failed with status code: 503"));
        assert!(!is_rejection("HTTP export failed: network error"));
    }

    #[test]
    fn the_instance_id_is_a_stable_uuid_per_state_file() {
        let a = instance_id(std::path::Path::new("/var/lib/qoder-exporter/shard-0.db"));
        let b = instance_id(std::path::Path::new("/var/lib/qoder-exporter/shard-1.db"));
        assert_eq!(
            a,
            instance_id(std::path::Path::new("/var/lib/qoder-exporter/shard-0.db"))
        );
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert!(a.as_bytes()[14] == b'5', "version 5 layout: {a}");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
