//! Where the pipeline's results go: Prometheus metrics.

pub mod metrics;
