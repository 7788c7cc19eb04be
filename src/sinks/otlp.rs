//! OTLP delivery: the shipper that drains the span outbox into an OTLP endpoint.
//!
//! Closed turns wait in the state store's outbox (written in the transaction of the batch
//! that closed them). The shipper reads the oldest ones, builds their spans
//! ([`super::traces`]), sends them with `opentelemetry-otlp` (gRPC or HTTP/protobuf), and
//! removes them from the outbox only when the endpoint accepted them. A crash between the two
//! sends the same spans again with the same ids, which backends fold.
//!
//! When the endpoint fails, the turns stay and the shipper retries with capped backoff (the
//! loop, and how it stops, are [`super::drain`]'s); the pipeline bounds the outbox and drops
//! the oldest past `--otlp.outbox-max-turns`. A batch the endpoint refuses as malformed (HTTP
//! 400/413, gRPC `InvalidArgument`) is retried one turn at a time, and a single turn it
//! refuses is dropped (`reason="rejected"`), so one bad turn cannot stall the rest. Metrics
//! never wait on any of this.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{OtlpProtocol, OtlpSettings};
use crate::sinks::drain::{OutboxSource, Round, Rounds, StopSignal, drain};
use crate::sinks::metrics::ProcessMetrics;
use crate::sinks::traces;
use crate::turn::ClosedTurn;

/// Turns per export request (a turn is one root span plus its children).
const BATCH_TURNS: usize = 64;

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

/// Drains the span outbox into the endpoint until stopped.
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

impl<E, O> Shipper<E, O>
where
    E: opentelemetry_sdk::trace::SpanExporter,
    O: OutboxSource<ClosedTurn>,
{
    /// Runs until `stop` is asked for, then empties the outbox by its deadline (see
    /// [`super::drain`]).
    pub async fn run(self, stop: StopSignal) {
        let notify = self.notify.clone();
        let rounds = SpanRounds {
            shipper: self,
            batch: BATCH_TURNS,
            failing: None,
        };
        drain(rounds, notify, stop).await;
    }
}

/// The span shipper between rounds: how many turns it reads at once (one at a time while it
/// looks for a turn the endpoint refuses), and the outage in progress.
struct SpanRounds<E, O> {
    shipper: Shipper<E, O>,
    batch: usize,
    failing: Option<Outage>,
}

impl<E, O> Rounds for SpanRounds<E, O>
where
    E: opentelemetry_sdk::trace::SpanExporter,
    O: OutboxSource<ClosedTurn>,
{
    const SIGNAL: &'static str = "traces";

    fn endpoint(&self) -> &str {
        &self.shipper.endpoint
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
        let mut spans: Vec<SpanData> = Vec::new();
        let mut unusable = 0u64;
        for (_, turn) in &rows {
            match turn.as_ref().and_then(|t| traces::turn_spans(t, &s.shape)) {
                Some(t) => spans.extend(t),
                None => unusable += 1,
            }
        }
        // Turns that cannot become spans are counted when they leave the outbox, once.
        let drop_unusable = || {
            if unusable > 0 {
                tracing::warn!(
                    turns = unusable,
                    "turns without any timestamp (or unreadable) cannot become spans; dropped"
                );
                s.metrics
                    .spans_dropped
                    .with_label_values(&["invalid"])
                    .inc_by(unusable);
            }
        };
        let n = spans.len() as u64;
        let result = if spans.is_empty() {
            Ok(())
        } else {
            s.exporter.export(spans).await
        };
        match result {
            Ok(()) => {
                // Exported: counted even if the outbox cannot forget them now (they would be
                // sent again, with the same ids, rather than lost).
                s.metrics.spans_exported.inc_by(n);
                if let Err(e) = s.outbox.remove_through(last).await {
                    return e.into();
                }
                drop_unusable();
                if let Some(outage) = self.failing.take() {
                    tracing::info!(endpoint = %s.endpoint, failed_attempts = outage.failures,
                        outage = %humantime::format_duration(round_secs(outage.since.elapsed())),
                        "OTLP endpoint accepts spans again");
                }
                self.batch = BATCH_TURNS;
                Round::Progress
            }
            Err(e) => {
                s.metrics.span_export_failures.inc();
                let message = e.to_string();
                if is_rejection(&message) {
                    if rows.len() > 1 {
                        // Find the turn it refuses: one at a time from here.
                        self.batch = 1;
                        return match s.outbox.release().await {
                            Ok(()) => Round::Progress,
                            Err(e) => e.into(),
                        };
                    }
                    tracing::warn!(endpoint = %s.endpoint, error = %message, spans = n,
                        "the OTLP endpoint refused a turn's spans; dropped");
                    if let Err(e) = s.outbox.remove_through(last).await {
                        return e.into();
                    }
                    s.metrics
                        .spans_dropped
                        .with_label_values(&["rejected"])
                        .inc_by(n);
                    drop_unusable();
                    return Round::Progress;
                }
                if let Err(e) = s.outbox.release().await {
                    return e.into();
                }
                match &mut self.failing {
                    Some(outage) => {
                        outage.again(&s.endpoint, &message);
                    }
                    None => {
                        tracing::warn!(endpoint = %s.endpoint, error = %message,
                            "OTLP export failed; spans stay in the outbox and are retried");
                        self.failing = Some(Outage::new());
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
