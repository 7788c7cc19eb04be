//! qoder-exporter: Prometheus metrics (and OpenTelemetry traces) from the session event logs
//! of Qoder Cloud Agents.
//!
//! Data flows one way:
//!
//! ```text
//! Qoder API --HTTP--> source::client --pages--> source::poller (discovery, cursors, schedule)
//!     --batches (bounded queue)--> pipeline (tracker: turns, request/tool pairing)
//!     --> sinks::metrics (durable series) + state (SQLite: cursor, state, series, one tx)
//! server: /metrics, /, /healthz, /readyz (reads the registry only)
//! ```
//!
//! - [`source::wire`]: the API's JSON in all three generations; [`event`]: what it means.
//! - [`pipeline::tracker`]: the per-session state machine, a pure function per event.
//! - [`state`]: the store that makes counts exact across crashes.
//! - [`sim`]: a simulated Qoder API, for `qoder-exporter demo` and the tests.
//! - [`offline`]: `dump` (API → JSON Lines) and `replay` (JSON Lines → pipeline → metrics).
//! - [`app`] wires it all; `main` only parses and calls.

pub mod app;
pub mod config;
pub mod event;
pub mod log_limit;
pub mod logfmt;
pub mod offline;
pub mod pipeline;
pub mod secret;
pub mod server;
pub mod sim;
pub mod sinks;
pub mod source;
pub mod state;
pub mod web_config;

/// The git revision the binary was built from (`QODER_EXPORTER_REVISION` at build time).
pub const REVISION: &str = match option_env!("QODER_EXPORTER_REVISION") {
    Some(r) => r,
    None => "unknown",
};
