//! The OpenTelemetry side of the settings: where spans (and, with their own switches, metrics
//! and the event log) go, resolved the way the OpenTelemetry spec's environment variables work.

use anyhow::bail;
use clap::Args;
use serde::Deserialize;

/// Spans over OTLP.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "OpenTelemetry traces")]
pub struct OtlpFlags {
    /// Where spans go (OTLP); without it traces are off. For HTTP the base URL, `/v1/traces` is
    /// added (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, taken as is, wins)
    #[arg(long = "otlp.endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: `grpc` or `http/protobuf` (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL wins) [default: http/protobuf]
    #[arg(long = "otlp.protocol", env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Export message and thinking text on turn spans (off: content never leaves the exporter)
    #[arg(long = "otlp.capture-content", env = "QODER_OTLP_CAPTURE_CONTENT")]
    pub otlp_capture_content: bool,
    /// With --otlp.capture-content, each message is cut to this many bytes [default: 4096]
    #[arg(long = "otlp.content-max-bytes", env = "QODER_OTLP_CONTENT_MAX_BYTES")]
    pub otlp_content_max_bytes: Option<usize>,
    /// Closed turns kept for the OTLP endpoint while it is unreachable; past it the oldest are dropped [default: 100000]
    #[arg(long = "otlp.outbox-max-turns", env = "QODER_OTLP_OUTBOX_MAX_TURNS")]
    pub otlp_outbox_max_turns: Option<u64>,
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
        let max_bytes = content_max_bytes.unwrap_or(4096);
        if max_bytes == 0 {
            bail!("--otlp.content-max-bytes: must be at least 1");
        }
        let outbox_max_turns = outbox_max_turns.unwrap_or(100_000);
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
}
