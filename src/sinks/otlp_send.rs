//! Sending OTLP requests this exporter builds itself (metrics and logs), over HTTP/protobuf or
//! gRPC. Spans go through `opentelemetry-otlp` ([`super::otlp`]); metrics and logs cannot: the
//! SDK's metric data cannot be built from stored values with a stored start time, and its log
//! records cannot carry the turn's deterministic trace context from a past event.
//!
//! Outcomes are sorted the way the shippers act on them: an endpoint that refuses what it was
//! sent as malformed (HTTP 400 or 413, gRPC `InvalidArgument`) will refuse it again
//! ([`SendError::Rejected`]); anything else (unreachable, 5xx, 429, a timeout, a wrong token)
//! may pass later ([`SendError::Failed`]).

use anyhow::Context;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;

use crate::config::{OtlpProtocol, OtlpTarget};

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The endpoint refused the request as malformed; sending it again cannot help.
    Rejected(String),
    /// The endpoint could not take it now; it may later.
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Rejected(m) => write!(f, "refused: {m}"),
            SendError::Failed(m) => f.write_str(m),
        }
    }
}

/// An accepted request, with what the endpoint said it dropped of it (OTLP partial success).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub rejected: u64,
    pub message: String,
}

/// One signal's connection to its endpoint.
#[derive(Debug, Clone)]
pub(crate) struct OtlpSender {
    endpoint: String,
    transport: Transport,
}

#[derive(Debug, Clone)]
enum Transport {
    Http {
        client: reqwest::Client,
        headers: reqwest::header::HeaderMap,
    },
    Grpc {
        channel: tonic::transport::Channel,
        metadata: tonic::metadata::MetadataMap,
    },
}

impl OtlpSender {
    /// Builds the client; nothing is connected until the first request.
    pub fn new(t: &OtlpTarget) -> anyhow::Result<OtlpSender> {
        let transport = match t.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &t.headers {
                    headers.insert(
                        reqwest::header::HeaderName::from_bytes(k.as_bytes())
                            .with_context(|| format!("OTLP header name {k:?}"))?,
                        reqwest::header::HeaderValue::from_str(v)
                            .with_context(|| format!("OTLP header {k:?}: not a valid value"))?,
                    );
                }
                let client = reqwest::Client::builder()
                    .timeout(t.timeout)
                    .user_agent(concat!("qoder-exporter/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .context("OTLP HTTP client")?;
                Transport::Http { client, headers }
            }
            OtlpProtocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(t.endpoint.clone())
                    .with_context(|| format!("OTLP endpoint {}", t.endpoint))?
                    .timeout(t.timeout)
                    .connect_timeout(t.timeout);
                if t.endpoint.starts_with("https://") {
                    endpoint = endpoint
                        .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                        .context("OTLP gRPC TLS")?;
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &t.headers {
                    metadata.insert(
                        tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                            .with_context(|| format!("OTLP header name {k:?}"))?,
                        v.parse()
                            .with_context(|| format!("OTLP header {k:?}: not a valid value"))?,
                    );
                }
                Transport::Grpc {
                    channel: endpoint.connect_lazy(),
                    metadata,
                }
            }
        };
        Ok(OtlpSender {
            endpoint: t.endpoint.clone(),
            transport,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn metrics(&self, req: ExportMetricsServiceRequest) -> Result<Accepted, SendError> {
        let resp = match &self.transport {
            Transport::Http { client, headers } => {
                let body = self.post(client, headers, req.encode_to_vec()).await?;
                ExportMetricsServiceResponse::decode(body).unwrap_or_default()
            }
            Transport::Grpc { channel, metadata } => MetricsServiceClient::new(channel.clone())
                .export(grpc_request(req, metadata))
                .await
                .map_err(grpc_error)?
                .into_inner(),
        };
        Ok(resp
            .partial_success
            .map_or_else(Accepted::default, |p| Accepted {
                rejected: u64::try_from(p.rejected_data_points).unwrap_or(0),
                message: p.error_message,
            }))
    }

    pub async fn logs(&self, req: ExportLogsServiceRequest) -> Result<Accepted, SendError> {
        let resp = match &self.transport {
            Transport::Http { client, headers } => {
                let body = self.post(client, headers, req.encode_to_vec()).await?;
                ExportLogsServiceResponse::decode(body).unwrap_or_default()
            }
            Transport::Grpc { channel, metadata } => LogsServiceClient::new(channel.clone())
                .export(grpc_request(req, metadata))
                .await
                .map_err(grpc_error)?
                .into_inner(),
        };
        Ok(resp
            .partial_success
            .map_or_else(Accepted::default, |p| Accepted {
                rejected: u64::try_from(p.rejected_log_records).unwrap_or(0),
                message: p.error_message,
            }))
    }

    /// POSTs a protobuf body; the response body on 2xx.
    async fn post(
        &self,
        client: &reqwest::Client,
        headers: &reqwest::header::HeaderMap,
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, SendError> {
        let resp = client
            .post(&self.endpoint)
            .headers(headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Failed(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .bytes()
                .await
                .map_err(|e| SendError::Failed(error_chain(&e)));
        }
        let message = format!("HTTP status {}", status.as_u16());
        if matches!(status.as_u16(), 400 | 413) {
            Err(SendError::Rejected(message))
        } else {
            Err(SendError::Failed(message))
        }
    }
}

fn grpc_request<T>(msg: T, metadata: &tonic::metadata::MetadataMap) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    *req.metadata_mut() = metadata.clone();
    req
}

fn grpc_error(s: tonic::Status) -> SendError {
    let message = format!("gRPC {:?}: {}", s.code(), s.message());
    if s.code() == tonic::Code::InvalidArgument {
        SendError::Rejected(message)
    } else {
        SendError::Failed(message)
    }
}

/// An error with its causes, as one line (reqwest's own `Display` hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
