//! The OpenTelemetry side of the settings: where spans (and, with their own switches, metrics
//! and the event log) go, resolved the way the OpenTelemetry spec's environment variables work.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

/// Spans over OTLP.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "OpenTelemetry traces")]
pub struct OtlpFlags {
    /// Where spans go (OTLP); without it traces are off.
    ///
    /// For HTTP the base URL: `/v1/traces` is added. OTEL_EXPORTER_OTLP_TRACES_ENDPOINT wins
    /// and is used as is. Metrics and logs, when on, go here too unless they have their own.
    #[arg(long = "otlp.endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: `grpc` or `http/protobuf` (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL wins).
    ///
    /// `http/json` is not supported. Metrics and logs use it too unless they have their own.
    #[arg(long = "otlp.protocol", env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Export message and thinking text on turn spans (off: content never leaves the exporter).
    ///
    /// As `gen_ai.input.messages` and `gen_ai.output.messages`, each message cut to
    /// --otlp.content-max-bytes.
    #[arg(long = "otlp.capture-content", env = "QODER_OTLP_CAPTURE_CONTENT")]
    pub otlp_capture_content: bool,
    /// With --otlp.capture-content, each message is cut to this many bytes.
    #[arg(long = "otlp.content-max-bytes", env = "QODER_OTLP_CONTENT_MAX_BYTES")]
    pub otlp_content_max_bytes: Option<usize>,
    /// Closed turns kept for the OTLP endpoint while it is unreachable; past it the oldest are
    /// dropped and counted.
    #[arg(long = "otlp.outbox-max-turns", env = "QODER_OTLP_OUTBOX_MAX_TURNS")]
    pub otlp_outbox_max_turns: Option<u64>,
    #[command(flatten)]
    pub signals: OtlpSignalFlags,
}

/// Metrics and the event log over OTLP: each has its own switch, and may have its own endpoint
/// and protocol (else `--otlp.endpoint` with `/v1/metrics` or `/v1/logs`, else the spec's
/// default `http://localhost:4318`).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "OpenTelemetry metrics and logs")]
pub struct OtlpSignalFlags {
    /// `otlp`: push every `/metrics` family over OTLP as well; `none`.
    ///
    /// `/metrics` is served either way. The README's section "Without Prometheus" shows what
    /// arrives and how to use it.
    #[arg(long = "otlp.metrics.exporter", env = "OTEL_METRICS_EXPORTER")]
    pub metrics_exporter: Option<String>,
    /// Where metrics go, used as is (for HTTP the full URL, `.../v1/metrics`).
    ///
    /// Unset: --otlp.endpoint (for HTTP with `/v1/metrics` added), else the spec's default,
    /// `http://localhost:4318/v1/metrics` (gRPC: `http://localhost:4317`).
    #[arg(
        long = "otlp.metrics.endpoint",
        env = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    )]
    pub metrics_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` for metrics.
    #[arg(
        long = "otlp.metrics.protocol",
        env = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
    )]
    pub metrics_protocol: Option<String>,
    /// How often metrics are pushed: milliseconds, as the variable has it, or a duration
    /// (`30s`).
    ///
    /// At least 100ms. In the config file an integer (milliseconds) or a string.
    #[arg(long = "otlp.metrics.interval", env = "OTEL_METRIC_EXPORT_INTERVAL", value_parser = parse_millis)]
    pub metrics_interval: Option<Duration>,
    /// `cumulative`, or `delta` (or `lowmemory`, the same here) for counters and histograms.
    ///
    /// Cumulative totals keep their start time in the state file, across restarts; delta
    /// reports what changed since the last accepted push.
    #[arg(
        long = "otlp.metrics.temporality",
        env = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
    )]
    pub metrics_temporality: Option<String>,
    /// `otlp`: every event read becomes one OTLP log record, at most once; `none`.
    #[arg(long = "otlp.logs.exporter", env = "OTEL_LOGS_EXPORTER")]
    pub logs_exporter: Option<String>,
    /// Where log records go, used as is (for HTTP the full URL, `.../v1/logs`).
    ///
    /// Unset: --otlp.endpoint (for HTTP with `/v1/logs` added), else the spec's default,
    /// `http://localhost:4318/v1/logs` (gRPC: `http://localhost:4317`).
    #[arg(long = "otlp.logs.endpoint", env = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")]
    pub logs_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` for logs.
    #[arg(long = "otlp.logs.protocol", env = "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")]
    pub logs_protocol: Option<String>,
    /// Put message and thinking text and tool inputs in log records (off: content never leaves
    /// the exporter).
    ///
    /// In the record body (tool inputs as JSON), each cut to 16 KiB.
    #[arg(
        long = "otlp.logs.include-content",
        env = "QODER_OTLP_LOGS_INCLUDE_CONTENT"
    )]
    pub logs_include_content: bool,
    /// Export only these event types (comma list, e.g. `session.error,span.model_request_end`).
    #[arg(
        long = "otlp.logs.event-types",
        env = "QODER_OTLP_LOGS_EVENT_TYPES",
        value_delimiter = ','
    )]
    pub logs_event_types: Vec<String>,
    /// Log records kept for the endpoint while it is unreachable; past it the oldest are
    /// dropped and counted.
    #[arg(
        long = "otlp.logs.outbox-max-records",
        env = "QODER_OTLP_LOGS_OUTBOX_MAX_RECORDS"
    )]
    pub logs_outbox_max_records: Option<u64>,
}

const DEFAULT_CONTENT_MAX_BYTES: usize = 4096;
const DEFAULT_OUTBOX_MAX_TURNS: u64 = 100_000;
const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_OUTBOX_MAX_RECORDS: u64 = 1_000_000;

/// The OTLP flags' defaults as the help shows them (see `config::shown_defaults`).
pub(super) fn shown_defaults() -> Vec<(&'static str, String)> {
    let general = "--otlp.protocol".to_owned();
    vec![
        ("otlp.protocol", "http/protobuf".to_owned()),
        (
            "otlp.content-max-bytes",
            DEFAULT_CONTENT_MAX_BYTES.to_string(),
        ),
        (
            "otlp.outbox-max-turns",
            DEFAULT_OUTBOX_MAX_TURNS.to_string(),
        ),
        ("otlp.metrics.exporter", "none".to_owned()),
        ("otlp.metrics.protocol", general.clone()),
        (
            "otlp.metrics.interval",
            DEFAULT_METRICS_INTERVAL.as_millis().to_string(),
        ),
        ("otlp.metrics.temporality", "cumulative".to_owned()),
        ("otlp.logs.exporter", "none".to_owned()),
        ("otlp.logs.protocol", general),
        ("otlp.logs.event-types", "all".to_owned()),
        (
            "otlp.logs.outbox-max-records",
            DEFAULT_OUTBOX_MAX_RECORDS.to_string(),
        ),
    ]
}

/// A number of milliseconds in the config file: `interval = 60000` or `interval = "60s"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a whole number of milliseconds, or a duration string such as \"30s\""
)]
pub enum Millis {
    Count(u64),
    Text(String),
}

/// `OTEL_METRIC_EXPORT_INTERVAL` is milliseconds; a flag may also say `30s`.
fn parse_millis(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(ms) => Ok(Duration::from_millis(ms)),
        Err(_) => crate::config::parse_duration(s),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtlpSection {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    #[serde(default)]
    pub capture_content: bool,
    pub content_max_bytes: Option<usize>,
    pub outbox_max_turns: Option<u64>,
    #[serde(default)]
    pub metrics: OtlpMetricsSection,
    #[serde(default)]
    pub logs: OtlpLogsSection,
}

/// `[otlp.metrics]`: the same keys as the `--otlp.metrics.*` flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtlpMetricsSection {
    pub exporter: Option<String>,
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    /// Milliseconds (a TOML integer or string) or a duration string.
    pub interval: Option<Millis>,
    pub temporality: Option<String>,
}

/// `[otlp.logs]`: the same keys as the `--otlp.logs.*` flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtlpLogsSection {
    pub exporter: Option<String>,
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    #[serde(default)]
    pub include_content: bool,
    #[serde(default)]
    pub event_types: Vec<String>,
    pub outbox_max_records: Option<u64>,
}

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Traces on: where and how spans go.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The URL requests go to (for HTTP, with `/v1/traces`).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// `Some(max bytes)` when message text is exported.
    pub capture_content: Option<usize>,
    pub outbox_max_turns: u64,
}

impl OtlpSettings {
    /// Resolves the OTLP settings the way the OpenTelemetry spec's environment variables
    /// work: a signal-specific endpoint is used as is; the general one gets `/v1/traces` for
    /// HTTP. No endpoint at all: traces are off (`None`).
    pub fn resolve(
        endpoint: Option<String>,
        traces_endpoint: Option<String>,
        protocol: Option<String>,
        capture_content: bool,
        content_max_bytes: Option<usize>,
        outbox_max_turns: Option<u64>,
    ) -> anyhow::Result<Option<OtlpSettings>> {
        let nonempty = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let protocol = match nonempty(protocol).as_deref() {
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("grpc") => OtlpProtocol::Grpc,
            Some(other) => bail!(
                "--otlp.protocol {other:?}: expected `grpc` or `http/protobuf` (http/json is not supported)"
            ),
        };
        let url = match (nonempty(traces_endpoint), nonempty(endpoint)) {
            (Some(t), _) => t,
            (None, Some(base)) => match protocol {
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
                OtlpProtocol::Grpc => base,
            },
            (None, None) => return Ok(None),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--otlp.endpoint {url:?}: must be an http:// or https:// URL");
        }
        let max_bytes = content_max_bytes.unwrap_or(DEFAULT_CONTENT_MAX_BYTES);
        if max_bytes == 0 {
            bail!("--otlp.content-max-bytes: must be at least 1");
        }
        let outbox_max_turns = outbox_max_turns.unwrap_or(DEFAULT_OUTBOX_MAX_TURNS);
        if outbox_max_turns == 0 {
            bail!("--otlp.outbox-max-turns: must be at least 1");
        }
        Ok(Some(OtlpSettings {
            endpoint: url,
            protocol,
            capture_content: capture_content.then_some(max_bytes),
            outbox_max_turns,
        }))
    }
}

/// `OTEL_EXPORTER_OTLP_(<SIGNAL>_)TIMEOUT` unset: the spec's default.
const DEFAULT_SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP settings read only from the environment (see `config::env_only`): the headers and
/// timeout of each signal, and the resource (`sinks::otlp::resource`).
#[cfg(test)]
pub(super) fn env_only() -> Vec<super::EnvOnly> {
    use super::EnvOnly;
    vec![
        EnvOnly {
            heading: "OpenTelemetry traces",
            what: "headers, timeout",
            vars: &[
                "OTEL_EXPORTER_OTLP_(TRACES_)HEADERS",
                "OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT",
            ],
            default: "—, `10s`".to_owned(),
            meaning: "The spans' request headers and timeout, read by `opentelemetry-otlp` \
                (the `TRACES_` variable wins)",
        },
        EnvOnly {
            heading: "OpenTelemetry traces",
            what: "resource",
            vars: &["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"],
            default: "`service.name=qoder-exporter`".to_owned(),
            meaning: "The resource of the spans, and of the metrics and log records pushed over \
                OTLP; `service.version` is set, and `service.instance.id` (stable for one state \
                file on one host) unless `OTEL_RESOURCE_ATTRIBUTES` sets it",
        },
        EnvOnly {
            heading: "OpenTelemetry metrics and logs",
            what: "metrics and logs headers, timeout",
            vars: &[
                "OTEL_EXPORTER_OTLP_(METRICS_|LOGS_)HEADERS",
                "OTEL_EXPORTER_OTLP_(METRICS_|LOGS_)TIMEOUT",
            ],
            default: format!("—, `{}` ms", DEFAULT_SIGNAL_TIMEOUT.as_millis()),
            meaning: "`key=value` pairs, comma-separated, values percent-encoded; the timeout in \
                milliseconds; the signal's own variable wins",
        },
    ]
}

/// Where one signal (metrics or logs) goes, and how.
#[derive(Debug, Clone)]
pub struct OtlpTarget {
    /// The URL requests go to (for HTTP, the full path).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// `OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: Vec<(String, String)>,
    /// `OTEL_EXPORTER_OTLP_<SIGNAL>_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` (ms) [10 s].
    pub timeout: Duration,
}

/// How counters and histograms are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    /// The total since a start time that is kept in the state file (survives restarts).
    Cumulative,
    /// What changed since the last accepted push.
    Delta,
}

/// Metrics pushed over OTLP.
#[derive(Debug, Clone)]
pub struct OtlpMetricsSettings {
    pub target: OtlpTarget,
    pub interval: Duration,
    pub temporality: Temporality,
}

/// The event log over OTLP.
#[derive(Debug, Clone)]
pub struct OtlpLogsSettings {
    pub target: OtlpTarget,
    pub include_content: bool,
    /// `None`: every event type.
    pub event_types: Option<BTreeSet<String>>,
    pub outbox_max_records: u64,
}

/// The general settings a signal falls back to.
#[derive(Debug, Clone, Copy)]
pub struct OtlpGeneral<'a> {
    pub endpoint: Option<&'a str>,
    pub protocol: Option<&'a str>,
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn protocol(flag: &str, v: Option<&str>) -> anyhow::Result<OtlpProtocol> {
    match v {
        None | Some("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
        Some("grpc") => Ok(OtlpProtocol::Grpc),
        Some(other) => bail!(
            "{flag} {other:?}: expected `grpc` or `http/protobuf` (http/json is not supported)"
        ),
    }
}

/// Whether an `OTEL_<SIGNAL>_EXPORTER` value asks for OTLP (`otlp`, or a list naming it);
/// `none`, `prometheus` (the `/metrics` endpoint is always served) and `console` do not.
fn exporter_on(flag: &str, v: Option<&str>) -> anyhow::Result<bool> {
    let mut on = false;
    for name in v.unwrap_or("none").split(',').map(str::trim) {
        match name {
            "otlp" => on = true,
            "none" | "prometheus" | "console" | "" => {}
            other => bail!("{flag} {other:?}: expected `otlp` or `none`"),
        }
    }
    Ok(on)
}

/// `key=value` pairs separated by commas, values percent-encoded (the spec's header format).
pub(crate) fn parse_headers(var: &str, text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{var}: {pair:?} is not key=value"))?;
        let k = k.trim().to_ascii_lowercase();
        if k.is_empty() {
            bail!("{var}: a header without a name");
        }
        let v = percent_decode(v.trim()).with_context(|| format!("{var}: header {k:?}"))?;
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .context("a `%` without two hex digits")?;
            out.push(u8::from_str_radix(hex, 16).context("a `%` without two hex digits")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("not UTF-8 once decoded")
}

/// Reads an environment variable for the resolution below (empty counts as unset).
fn env(k: &str) -> Option<String> {
    nonempty(std::env::var(k).ok())
}

impl OtlpTarget {
    /// Resolves one signal's target: its own endpoint as is, else the general endpoint with
    /// `/v1/<signal>` (HTTP), else the spec's default on localhost.
    pub fn resolve(
        signal: &str,
        endpoint: Option<String>,
        protocol_name: Option<String>,
        general: OtlpGeneral<'_>,
    ) -> anyhow::Result<OtlpTarget> {
        let upper = signal.to_ascii_uppercase();
        // An error names where the wrong value came from: the signal's own setting, or the
        // general one it fell back to.
        let own = |key: &str| {
            format!(
                "--otlp.{signal}.{key} (OTEL_EXPORTER_OTLP_{upper}_{}, [otlp.{signal}] {key})",
                key.to_ascii_uppercase()
            )
        };
        let shared = |key: &str| {
            format!(
                "--otlp.{key} (OTEL_EXPORTER_OTLP_{}, [otlp] {key})",
                key.to_ascii_uppercase()
            )
        };
        let proto = match nonempty(protocol_name) {
            Some(p) => protocol(&own("protocol"), Some(&p))?,
            None => protocol(&shared("protocol"), general.protocol)?,
        };
        let (endpoint, endpoint_from) = match (nonempty(endpoint), general.endpoint) {
            (Some(e), _) => (e, own("endpoint")),
            (None, base) => {
                let base = base.unwrap_or(match proto {
                    OtlpProtocol::HttpProtobuf => "http://localhost:4318",
                    OtlpProtocol::Grpc => "http://localhost:4317",
                });
                let url = match proto {
                    OtlpProtocol::HttpProtobuf => {
                        format!("{}/v1/{signal}", base.trim_end_matches('/'))
                    }
                    OtlpProtocol::Grpc => base.to_owned(),
                };
                (url, shared("endpoint"))
            }
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!("{endpoint_from} {endpoint:?}: must be an http:// or https:// URL");
        }
        let headers_var = format!("OTEL_EXPORTER_OTLP_{upper}_HEADERS");
        let headers = match env(&headers_var) {
            Some(h) => parse_headers(&headers_var, &h)?,
            None => match env("OTEL_EXPORTER_OTLP_HEADERS") {
                Some(h) => parse_headers("OTEL_EXPORTER_OTLP_HEADERS", &h)?,
                None => Vec::new(),
            },
        };
        let timeout_var = format!("OTEL_EXPORTER_OTLP_{upper}_TIMEOUT");
        let timeout = match env(&timeout_var)
            .map(|t| (timeout_var.clone(), t))
            .or_else(|| {
                env("OTEL_EXPORTER_OTLP_TIMEOUT")
                    .map(|t| ("OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(), t))
            }) {
            Some((var, t)) => match t.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => bail!("{var} {t:?}: expected a positive number of milliseconds"),
            },
            None => DEFAULT_SIGNAL_TIMEOUT,
        };
        Ok(OtlpTarget {
            endpoint,
            protocol: proto,
            headers,
            timeout,
        })
    }
}

impl OtlpMetricsSettings {
    /// `None` unless `--otlp.metrics.exporter` (`OTEL_METRICS_EXPORTER`) says `otlp`.
    pub fn resolve(
        flags: &mut OtlpSignalFlags,
        file: OtlpMetricsSection,
        general: OtlpGeneral<'_>,
    ) -> anyhow::Result<Option<OtlpMetricsSettings>> {
        let exporter = nonempty(flags.metrics_exporter.take()).or(file.exporter);
        if !exporter_on("--otlp.metrics.exporter", exporter.as_deref())? {
            return Ok(None);
        }
        let target = OtlpTarget::resolve(
            "metrics",
            flags.metrics_endpoint.take().or(file.endpoint),
            flags.metrics_protocol.take().or(file.protocol),
            general,
        )?;
        let interval = match (flags.metrics_interval, file.interval) {
            (Some(d), _) => d,
            (None, Some(Millis::Count(ms))) => Duration::from_millis(ms),
            (None, Some(Millis::Text(s))) => parse_millis(&s)
                .map_err(|e| anyhow::anyhow!("[otlp.metrics] interval {s:?}: {e}"))?,
            (None, None) => DEFAULT_METRICS_INTERVAL,
        };
        if interval < Duration::from_millis(100) {
            bail!(
                "--otlp.metrics.interval (OTEL_METRIC_EXPORT_INTERVAL, [otlp.metrics] interval): must be at least 100ms"
            );
        }
        let temporality = match nonempty(flags.metrics_temporality.take())
            .or(file.temporality)
            .map(|t| t.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("cumulative") => Temporality::Cumulative,
            // The spec's `lowmemory` is delta for the synchronous counters and histograms
            // this exporter has (its up-down counters stay cumulative, and it has none).
            Some("delta" | "lowmemory") => Temporality::Delta,
            Some(other) => {
                bail!(
                    "--otlp.metrics.temporality (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, [otlp.metrics] temporality) {other:?}: expected `cumulative`, `delta` or `lowmemory`"
                )
            }
        };
        Ok(Some(OtlpMetricsSettings {
            target,
            interval,
            temporality,
        }))
    }
}

impl OtlpLogsSettings {
    /// `None` unless `--otlp.logs.exporter` (`OTEL_LOGS_EXPORTER`) says `otlp`.
    pub fn resolve(
        flags: &mut OtlpSignalFlags,
        file: OtlpLogsSection,
        general: OtlpGeneral<'_>,
    ) -> anyhow::Result<Option<OtlpLogsSettings>> {
        let exporter = nonempty(flags.logs_exporter.take()).or(file.exporter);
        if !exporter_on("--otlp.logs.exporter", exporter.as_deref())? {
            return Ok(None);
        }
        let target = OtlpTarget::resolve(
            "logs",
            flags.logs_endpoint.take().or(file.endpoint),
            flags.logs_protocol.take().or(file.protocol),
            general,
        )?;
        let types: Vec<String> = if flags.logs_event_types.is_empty() {
            file.event_types
        } else {
            std::mem::take(&mut flags.logs_event_types)
        };
        let types: BTreeSet<String> = types
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        let outbox_max_records = flags
            .logs_outbox_max_records
            .or(file.outbox_max_records)
            .unwrap_or(DEFAULT_OUTBOX_MAX_RECORDS);
        if outbox_max_records == 0 {
            bail!("--otlp.logs.outbox-max-records: must be at least 1");
        }
        Ok(Some(OtlpLogsSettings {
            target,
            include_content: flags.logs_include_content || file.include_content,
            event_types: (!types.is_empty()).then_some(types),
            outbox_max_records,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::config::tests::flags;

    #[test]
    fn otlp_endpoints_resolve_as_the_spec_says() {
        let r = |e: Option<&str>, t: Option<&str>, p: Option<&str>| {
            OtlpSettings::resolve(
                e.map(Into::into),
                t.map(Into::into),
                p.map(Into::into),
                false,
                None,
                None,
            )
        };
        assert!(
            r(None, None, None).expect("ok").is_none(),
            "no endpoint: off"
        );
        assert!(r(Some(""), None, None).expect("ok").is_none());
        let http = r(Some("http://c:4318/"), None, None)
            .expect("ok")
            .expect("on");
        assert_eq!(http.endpoint, "http://c:4318/v1/traces");
        assert_eq!(http.protocol, OtlpProtocol::HttpProtobuf);
        let grpc = r(Some("http://c:4317"), None, Some("grpc"))
            .expect("ok")
            .expect("on");
        assert_eq!(grpc.endpoint, "http://c:4317");
        let signal = r(Some("http://c:4318"), Some("http://t:1/x"), None)
            .expect("ok")
            .expect("on");
        assert_eq!(
            signal.endpoint, "http://t:1/x",
            "the traces endpoint is used as is"
        );
        assert!(r(Some("http://c"), None, Some("http/json")).is_err());
        assert!(r(Some("c:4317"), None, None).is_err());
        let s = Settings::resolve(flags(&[
            "--otlp.endpoint",
            "http://127.0.0.1:4318",
            "--otlp.capture-content",
            "--otlp.content-max-bytes",
            "10",
        ]))
        .expect("ok");
        let o = s.otlp.expect("on");
        assert_eq!(o.capture_content, Some(10));
        assert_eq!(o.outbox_max_turns, 100_000);
    }

    #[test]
    fn the_metrics_section_takes_an_integer_interval_and_lowmemory_means_delta() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[otlp.metrics]\nexporter = \"otlp\"\ninterval = 60000\ntemporality = \"lowmemory\"\n",
        )
        .expect("write");
        let s = Settings::resolve(flags(&["--config.file", path.to_str().expect("utf-8")]))
            .expect("reads");
        let m = s.otlp_metrics.expect("on");
        assert_eq!(m.interval, Duration::from_secs(60));
        assert_eq!(m.temporality, Temporality::Delta);
        std::fs::write(
            &path,
            "[otlp.metrics]\nexporter = \"otlp\"\ninterval = \"30s\"\n",
        )
        .expect("write");
        let s = Settings::resolve(flags(&["--config.file", path.to_str().expect("utf-8")]))
            .expect("reads");
        assert_eq!(
            s.otlp_metrics.expect("on").interval,
            Duration::from_secs(30)
        );
        std::fs::write(
            &path,
            "[otlp.metrics]\nexporter = \"otlp\"\ninterval = 1.5\n",
        )
        .expect("write");
        let err = Settings::resolve(flags(&["--config.file", path.to_str().expect("utf-8")]))
            .expect_err("refused");
        assert!(
            format!("{err:#}").contains("a whole number of milliseconds"),
            "{err:#}"
        );
    }

    #[test]
    fn an_error_names_the_setting_the_wrong_value_came_from() {
        let err =
            |args: &[&str]| format!("{:#}", Settings::resolve(flags(args)).expect_err("refused"));
        let general = err(&[
            "--otlp.metrics.exporter",
            "otlp",
            "--otlp.protocol",
            "bogus",
        ]);
        assert!(general.starts_with("--otlp.protocol "), "{general}");
        let own = err(&[
            "--otlp.logs.exporter",
            "otlp",
            "--otlp.logs.protocol",
            "bogus",
        ]);
        assert!(own.starts_with("--otlp.logs.protocol "), "{own}");
        let general = err(&["--otlp.logs.exporter", "otlp", "--otlp.endpoint", "c:4318"]);
        assert!(general.starts_with("--otlp.endpoint "), "{general}");
        let own = err(&[
            "--otlp.metrics.exporter",
            "otlp",
            "--otlp.metrics.endpoint",
            "c:1",
        ]);
        assert!(own.starts_with("--otlp.metrics.endpoint "), "{own}");
    }
}
