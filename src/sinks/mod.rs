//! Where the pipeline's results go: Prometheus metrics and OTLP traces.

pub mod metrics;
pub mod otlp;
pub mod session_series;
pub mod traces;
