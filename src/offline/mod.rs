//! Offline work: `dump` writes sessions' events from the API as JSON Lines; `replay` feeds such
//! files through the same pipeline and state store as the live exporter.
//!
//! The line format is the API's own event objects, one per line, with `session_id` added where
//! the wire event lacks it (G2 and G3 events do not carry it). A line whose `type` is
//! `session` is a session object (agent, model, status) and applies to the events after it.
//! Replay is also how the benchmarks measure the pipeline without the network.

mod dump;
mod lines;
mod replay;

pub use dump::dump;
pub use replay::{ReplaySummary, replay};

/// A dump line holding an agent object (`GET /agents/{id}`), written before the first
/// session that names the agent by id only.
const AGENT_LINE: &str = "agent";
/// A dump line holding a thread object of a session's thread list (`session_id` set).
const THREAD_LINE: &str = "session_thread";

/// The line field that marks an event of a sub-agent thread's stream in a dump.
const STREAM_FIELD: &str = "qoder_exporter_stream";
