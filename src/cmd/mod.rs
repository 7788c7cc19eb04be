//! One module per subcommand; this one holds what they share: logging and throw-away state.

pub mod demo;
pub mod dump;
pub mod healthcheck;
pub mod replay;

use anyhow::Context;
use qoder_exporter::config::{self, Settings};

/// Logs to stderr at `level` (checked by `Settings`); `RUST_LOG`, when set and valid, is an
/// expert override and says so once.
pub fn init_logging(level: &str, format: config::LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let expert = rust_log
        .as_deref()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok());
    let overridden = expert.is_some();
    let filter = expert.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    use qoder_exporter::config::LogFormat;
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Logfmt => logs
            .with_ansi(false)
            .event_format(qoder_exporter::logfmt::Logfmt)
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
    match rust_log {
        Some(v) if overridden => {
            tracing::info!(rust_log = %v, "RUST_LOG is set: it overrides --log.level");
        }
        Some(v) => {
            tracing::warn!(rust_log = %v, level, "RUST_LOG is not a valid filter; using --log.level")
        }
        None => {}
    }
}

/// Without `--state.path`, a demo's or a replay's state is throw-away: a directory of its
/// own, removed on the way out. With it, the state is kept (a backfill).
pub fn throwaway_state(settings: &mut Settings, what: &str) -> anyhow::Result<Option<TempDir>> {
    if settings.state_path != std::path::Path::new(config::DEFAULT_STATE_PATH) {
        return Ok(None);
    }
    let dir = tempfile_dir(what)?;
    settings.state_path = dir.join("state.db");
    Ok(Some(TempDir(dir)))
}

fn tempfile_dir(what: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("qoder-exporter-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes a throw-away state directory on the way out.
pub struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
