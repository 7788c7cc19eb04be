//! Where the pipeline's results go: Prometheus metrics, and OTLP traces, metrics and logs.

pub mod drain;
pub mod metrics;
pub mod openmetrics;
pub mod otlp;
pub mod otlp_logs;
pub mod otlp_metrics;
pub mod otlp_send;
pub mod session_series;
pub mod traces;
