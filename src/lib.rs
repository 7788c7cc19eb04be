//! qoder-exporter: Prometheus metrics (and OpenTelemetry traces) from the session event logs
//! of Qoder Cloud Agents.
//!
//! Data flows one way, and so do the imports (a module imports only the ones to its right, or
//! the domain model):
//!
//! ```text
//! Qoder API --HTTP--> source::client --pages--> source::poller (discovery, cursors, schedule)
//!     --batches (bounded queue)--> pipeline (tracker: turns, request/tool pairing; event ids)
//!     --> state (SQLite: cursor, session state, series, outbox, event ids; one transaction)
//!     --> sinks::metrics (durable series)  sinks::otlp (spans from the outbox)
//!         sinks::otlp_logs (log records from theirs)  sinks::otlp_metrics (pushes /metrics)
//! server: /metrics, /, /healthz, /readyz (reads the registry only)
//! ```
//!
//! - [`event`], [`turn`], [`session`], [`record`] and [`outcome`]: the domain model (what an
//!   event means; a turn and its child spans; what is kept about a session between batches; an
//!   event as its log record needs it; what the tracker concludes, as the sinks take it). They
//!   import nothing else of the crate but `event` and `turn`.
//! - [`source::wire`]: the API's JSON in all three generations; [`source::convert`]: wire →
//!   [`event`], pure.
//! - [`pipeline::tracker`]: the per-session state machine, a pure function per event that tells
//!   an [`outcome::Tally`] what happened (the metrics sink's `Delta` counts it);
//!   [`pipeline::event_ids`]: every counted id, so nothing counts twice.
//! - [`state`]: the store that makes counts exact across crashes (it stores the tracker's
//!   state without knowing its type).
//! - [`sinks`]: metrics and spans; they never import the pipeline (the span shipper drains the
//!   outbox through [`sinks::drain::OutboxSource`], which the pipeline implements).
//! - [`sim`]: a simulated Qoder API, for `qoder-exporter demo` and the tests.
//! - [`offline`]: `dump` (API → JSON Lines) and `replay` (JSON Lines → pipeline → metrics).
//! - [`app`] wires it all; `main` only parses and calls.

pub mod app;
pub mod config;
pub mod event;
pub mod log_limit;
pub mod logfmt;
pub mod offline;
pub mod outcome;
pub mod pipeline;
pub mod record;
pub mod secret;
pub mod server;
pub mod session;
pub mod sim;
pub mod sinks;
pub mod source;
pub mod state;
pub mod turn;
pub mod web_config;

/// The git revision the binary was built from (`QODER_EXPORTER_REVISION` at build time).
pub const REVISION: &str = match option_env!("QODER_EXPORTER_REVISION") {
    Some(r) => r,
    None => "unknown",
};
