//! Command line, environment and config file, resolved into one [`Settings`].
//!
//! Flags follow the Prometheus exporter habit (dotted namespaces). Every flag has an
//! environment variable and a key in the TOML file named by `--config.file` (the flag's
//! namespace is the table, the rest the key: `--web.listen-address` is `[web] listen-address`).
//! Precedence: flag, then environment, then file, then the default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::secret::Pat;

#[cfg(test)]
mod docs;
mod otlp;
pub use otlp::{
    OtlpFlags, OtlpGeneral, OtlpLogsSettings, OtlpMetricsSettings, OtlpProtocol, OtlpSection,
    OtlpSettings, OtlpSignalFlags, OtlpTarget, Temporality,
};

pub(crate) const DEFAULT_API_URL: &str = "https://api.qoder.com/api/v1/cloud";
pub(crate) const DEFAULT_LISTEN: &str = "0.0.0.0:9874";
pub const DEFAULT_TELEMETRY_PATH: &str = "/metrics";
pub const DEFAULT_STATE_PATH: &str = "qoder-exporter.db";
/// `--web.max-connections`: Prometheus needs one or two; the rest is room for people and
/// probes, well inside the default 1 024 descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// `--qoder.max-sessions`: sessions followed at once (ended ones do not count); memory stays
/// bounded when a list of live sessions never ends; an account with more splits them
/// (`--shard.count`).
pub const DEFAULT_MAX_SESSIONS: usize = 50_000;
/// `--metrics.session-series-limit`: per-session series for this many recent sessions.
pub(crate) const DEFAULT_SESSION_SERIES_LIMIT: usize = 100;
/// `--metrics.max-series`: Prometheus series of the event-derived families.
pub const DEFAULT_MAX_SERIES: usize = 50_000;
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `--qoder.max-requests-per-second`: the request budget of the whole exporter.
pub(crate) const DEFAULT_MAX_REQUESTS_PER_SECOND: u32 = 50;
pub(crate) const DEFAULT_CONCURRENCY: usize = 8;
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
pub(crate) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_IDLE_POLL_INTERVAL: Duration = Duration::from_secs(15);
pub(crate) const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_MAX_TURN_AGE: Duration = Duration::from_secs(6 * 3600);
pub(crate) const DEFAULT_CURRENCY: &str = "USD";

/// `cmd` (and its subcommands) with `[default: X]` after the help of each flag `shown` names.
fn with_defaults(mut cmd: clap::Command, shown: &[(&str, String)]) -> clap::Command {
    // `mut_arg` moves an argument to the end of the list, and the help orders its headings
    // by that list: every argument goes through it, in order, so the order stays as declared.
    let args: Vec<(String, Option<String>)> = cmd
        .get_arguments()
        .map(|a| {
            let d = a
                .get_long()
                .and_then(|long| shown.iter().find(|(flag, _)| *flag == long))
                .map(|(_, d)| d.clone());
            (a.get_id().to_string(), d)
        })
        .collect();
    for (id, d) in args {
        cmd = cmd.mut_arg(id, |a| {
            let Some(d) = d else { return a };
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            let long = a.get_long_help().map(ToString::to_string);
            let a = a.help(format!("{help} [default: {d}]"));
            match long {
                Some(l) => a.long_help(format!("{l} [default: {d}]")),
                None => a,
            }
        });
    }
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in subcommands {
        cmd = cmd.mut_subcommand(name, |c| with_defaults(c, shown));
    }
    cmd
}

/// Every default as the help shows it (`[default: X]`, added to the flag's help by
/// [`Cli::full_command`]), from the constants the code applies: a default is written once.
/// A default may go on after a comma (`1, no sharding`): the value is what comes before it.
/// The README's flag table and `deploy/config.example.toml` are generated from the help
/// (`config/docs.rs`).
pub(crate) fn shown_defaults() -> Vec<(&'static str, String)> {
    // As the flags are written: `6h`, `60s` (humantime would say `1m`).
    let d = |v: Duration| match v.as_secs() {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    };
    let mut shown = vec![
        ("log.level", DEFAULT_LOG_LEVEL.to_owned()),
        (
            "log.format",
            format!("{:?}", LogFormat::default()).to_lowercase(),
        ),
        ("qoder.api-url", DEFAULT_API_URL.to_owned()),
        ("qoder.request-timeout", d(DEFAULT_REQUEST_TIMEOUT)),
        (
            "qoder.max-requests-per-second",
            DEFAULT_MAX_REQUESTS_PER_SECOND.to_string(),
        ),
        ("qoder.concurrency", DEFAULT_CONCURRENCY.to_string()),
        (
            "qoder.max-response-bytes",
            format!(
                "{DEFAULT_MAX_RESPONSE_BYTES}, {} MiB",
                DEFAULT_MAX_RESPONSE_BYTES >> 20
            ),
        ),
        ("qoder.poll-interval", d(DEFAULT_POLL_INTERVAL)),
        ("qoder.idle-poll-interval", d(DEFAULT_IDLE_POLL_INTERVAL)),
        ("qoder.discovery-interval", d(DEFAULT_DISCOVERY_INTERVAL)),
        ("qoder.resync-interval", d(DEFAULT_RESYNC_INTERVAL)),
        ("qoder.max-sessions", DEFAULT_MAX_SESSIONS.to_string()),
        ("web.listen-address", DEFAULT_LISTEN.to_owned()),
        ("web.telemetry-path", DEFAULT_TELEMETRY_PATH.to_owned()),
        ("web.max-connections", DEFAULT_MAX_CONNECTIONS.to_string()),
        ("state.path", DEFAULT_STATE_PATH.to_owned()),
        ("state.max-turn-age", d(DEFAULT_MAX_TURN_AGE)),
        (
            "shard.count",
            format!("{}, no sharding", Shard::default().count),
        ),
        ("shard.index", Shard::default().index.to_string()),
        (
            "metrics.session-series-limit",
            DEFAULT_SESSION_SERIES_LIMIT.to_string(),
        ),
        ("metrics.max-series", DEFAULT_MAX_SERIES.to_string()),
        ("cost.currency", DEFAULT_CURRENCY.to_owned()),
    ];
    shown.extend(otlp::shown_defaults());
    shown
}

#[derive(Debug, Parser)]
#[command(
    name = "qoder-exporter",
    version,
    about = "Prometheus metrics and OpenTelemetry traces from Qoder Cloud Agents sessions",
    long_about = "Polls the Qoder Cloud Agents API for the event logs of your sessions and serves \
        exact Prometheus metrics (tokens, credits, turns, model requests, tool calls, errors) on \
        /metrics. Counts survive restarts through an embedded state file.\n\n\
        The token is read from QODER_PAT (or QODER_PERSONAL_ACCESS_TOKEN) or from --qoder.pat-file. \
        Try it without an account: `qoder-exporter demo`. Each subcommand's --help lists the \
        flags it reads."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The exporter's own flags (no subcommand): every group.
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run against a built-in simulated Qoder API (no account needed).
    Demo(DemoFlags),
    /// Write sessions' events from the API as JSON Lines (one event per line, `session_id`
    /// added; a `"type": "session"` line per session carries its agent and model).
    Dump(DumpFlags),
    /// Feed JSON Lines files (from `dump`, `-` for stdin) through the pipeline and state
    /// store, then print the metrics in the Prometheus text format on stdout (a summary goes
    /// to stderr). Spans are exported when an OTLP endpoint is set.
    Replay(ReplayFlags),
    /// Exit 0 when the exporter at --url answers its health check (for container HEALTHCHECK).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9874/healthz")]
        url: String,
        /// Accept any TLS certificate (for a local liveness check of an exporter serving TLS).
        #[arg(long)]
        insecure: bool,
    },
}

/// A setting read only from the environment: no flag, no key in the file. The help says
/// where the token comes from (`Cli`'s `long_about`); the README's flag table lists these
/// with the flags, under `heading` (`config/docs.rs`).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct EnvOnly {
    /// The help heading of the flags it goes with.
    pub heading: &'static str,
    /// What it sets, in words (the table has no flag to name it by).
    pub what: &'static str,
    pub vars: &'static [&'static str],
    /// As the table shows it (markdown): `—` for none.
    pub default: String,
    pub meaning: &'static str,
}

/// Every [`EnvOnly`] setting: the token ([`Settings::resolve`] reads it), and the OTLP ones.
#[cfg(test)]
pub(crate) fn env_only() -> Vec<EnvOnly> {
    let mut all = vec![EnvOnly {
        heading: "Qoder API",
        what: "token",
        vars: &["QODER_PAT", "QODER_PERSONAL_ACCESS_TOKEN"],
        default: "—".to_owned(),
        meaning: "Personal access token (--qoder.pat-file wins over it); never logged or shown",
    }];
    all.extend(otlp::env_only());
    all
}

impl Cli {
    /// The command line as clap parses and shows it: each flag's help ends with its default,
    /// from [`shown_defaults`] (the constants the code applies).
    pub(crate) fn full_command() -> clap::Command {
        use clap::CommandFactory;
        with_defaults(Cli::command(), &shown_defaults())
    }

    /// Parses the command line; exits with clap's message on an error, as `Parser::parse`.
    ///
    /// A subcommand reads only its own groups, written after it: an exporter flag written
    /// before a subcommand (`qoder-exporter --state.path s.db replay f`) would be ignored,
    /// so it is refused with a hint instead. Environment variables are not refused (one
    /// environment serves every subcommand). The shared flags (`--log.*`, `--config.file`)
    /// go anywhere.
    pub fn parse_checked() -> Cli {
        Cli::try_parse_checked(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_checked`] on the given arguments, returning the error.
    pub(crate) fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::FromArgMatches;
        let mut command = Cli::full_command();
        let matches = command.try_get_matches_from_mut(args)?;
        if let Some((sub, _)) = matches.subcommand() {
            let misplaced = command.get_arguments().find(|a| {
                !a.is_global_set()
                    && matches.value_source(a.get_id().as_str())
                        == Some(clap::parser::ValueSource::CommandLine)
            });
            if let Some(arg) = misplaced {
                let flag = arg.get_long().unwrap_or_else(|| arg.get_id().as_str());
                return Err(command.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--{flag} is written before `{sub}`: write it after the subcommand if `{sub}` reads it (see `qoder-exporter {sub} --help`)"
                    ),
                ));
            }
        }
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
    }

    /// The subcommand and the flags it reads, as one [`Flags`] for [`Settings::resolve`]
    /// (the groups a subcommand does not read are left at their defaults).
    pub fn into_parts(self) -> (Option<Command>, Flags) {
        let Some(mut command) = self.command else {
            return (None, self.flags);
        };
        let common = self.flags.common;
        use std::mem::take;
        let flags = match &mut command {
            Command::Demo(d) => Flags {
                common,
                poll: take(&mut d.poll),
                web: take(&mut d.web),
                state: take(&mut d.state),
                otlp: take(&mut d.otlp),
                metrics: take(&mut d.metrics),
                ..Flags::default()
            },
            Command::Dump(d) => Flags {
                common,
                api: take(&mut d.api),
                shard: take(&mut d.shard),
                ..Flags::default()
            },
            Command::Replay(r) => Flags {
                common,
                web: take(&mut r.web),
                state: take(&mut r.state),
                otlp: take(&mut r.otlp),
                metrics: take(&mut r.metrics),
                ..Flags::default()
            },
            Command::Healthcheck { .. } => Flags {
                common,
                ..Flags::default()
            },
        };
        (Some(command), flags)
    }
}

#[derive(Debug, Args)]
pub struct DemoFlags {
    /// Sessions the simulator starts with; more arrive while it runs.
    #[arg(id = "demo_sessions", long = "demo.sessions", default_value_t = 12)]
    pub sessions: usize,
    /// Seed for the simulated sessions (same seed, same event log).
    #[arg(id = "demo_seed", long = "demo.seed", default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub poll: PollFlags,
    #[command(flatten)]
    pub web: WebFlags,
    #[command(flatten)]
    pub state: StateFlags,
    #[command(flatten)]
    pub otlp: OtlpFlags,
    #[command(flatten)]
    pub metrics: MetricsFlags,
}

#[derive(Debug, Args)]
pub struct DumpFlags {
    /// Write to this file instead of stdout.
    #[arg(id = "dump_output", long = "output", short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub api: ApiFlags,
    #[command(flatten)]
    pub shard: ShardFlags,
}

#[derive(Debug, Args)]
pub struct ReplayFlags {
    /// JSON Lines files, `-` for stdin.
    #[arg(id = "replay_files", required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Keep serving the metrics on --web.listen-address after the replay (until SIGTERM).
    #[arg(id = "replay_serve", long = "serve")]
    pub serve: bool,
    /// Events per session batch (one state commit each).
    #[arg(id = "replay_batch", long = "batch-size", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Exit 0 even when some lines could not be read (they are reported and counted either way).
    #[arg(id = "replay_allow_invalid", long = "allow-invalid")]
    pub allow_invalid: bool,
    #[command(flatten)]
    pub state: StateFlags,
    #[command(flatten)]
    pub otlp: OtlpFlags,
    #[command(flatten)]
    pub metrics: MetricsFlags,
    #[command(flatten)]
    pub web: WebFlags,
}

/// Every flag, by group; a subcommand flattens the groups it reads.
#[derive(Debug, Args, Default)]
pub struct Flags {
    #[command(flatten)]
    pub common: CommonFlags,
    #[command(flatten)]
    pub api: ApiFlags,
    #[command(flatten)]
    pub poll: PollFlags,
    #[command(flatten)]
    pub web: WebFlags,
    #[command(flatten)]
    pub state: StateFlags,
    #[command(flatten)]
    pub otlp: OtlpFlags,
    #[command(flatten)]
    pub shard: ShardFlags,
    #[command(flatten)]
    pub metrics: MetricsFlags,
}

/// Read by every subcommand, and accepted before or after it.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Config file and logs")]
pub struct CommonFlags {
    // Every subcommand shows this help: it names no flag that some of them do not take.
    /// TOML file with the same settings (flags and environment win over it).
    ///
    /// Every other flag is a key: its first part is the table (`[otlp.metrics]` and
    /// `[otlp.logs]` for those signals' flags), the rest the key, so `--log.level` is `[log]
    /// level`; the sessions to follow are `[qoder] sessions`, a list.
    /// deploy/config.example.toml has every key with its default.
    #[arg(
        long = "config.file",
        env = "QODER_EXPORTER_CONFIG_FILE",
        global = true
    )]
    pub config_file: Option<PathBuf>,
    /// Only log messages with this severity or above: debug, info, warn, error.
    ///
    /// Anything else is refused. RUST_LOG, when set to a valid filter, overrides it as an
    /// expert filter (e.g. `qoder_exporter::source=debug`), and the log says so once.
    #[arg(long = "log.level", env = "QODER_EXPORTER_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log line format: text (for people), logfmt or json (for log shippers).
    ///
    /// `text` has colours on a terminal; `logfmt` is `ts=… level=… target=… msg="…"
    /// key=value`, as the Prometheus exporters write it; `json` is one object a line.
    #[arg(long = "log.format", env = "QODER_EXPORTER_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

/// How the Qoder API is reached (the exporter and `dump`).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Qoder API")]
pub struct ApiFlags {
    /// Qoder API base URL (CN: https://api.qoder.com.cn/api/v1/cloud).
    ///
    /// Plain http:// only to this machine, unless --qoder.allow-insecure-http.
    #[arg(long = "qoder.api-url", env = "QODER_API_URL")]
    pub api_url: Option<String>,
    /// File holding the personal access token; re-read when it changes.
    ///
    /// A rotated token needs no restart. Without it, the token comes from QODER_PAT (or
    /// QODER_PERSONAL_ACCESS_TOKEN).
    #[arg(long = "qoder.pat-file", env = "QODER_PAT_FILE")]
    pub pat_file: Option<PathBuf>,
    /// Follow only this session (repeatable, or a comma list); without it, every session the
    /// token can see is discovered.
    #[arg(long = "qoder.session", env = "QODER_SESSIONS", value_delimiter = ',')]
    pub sessions: Vec<String>,
    /// Send the `qoder-workspace-id` header with every request (a workspace-scoped token).
    #[arg(long = "qoder.workspace-id", env = "QODER_WORKSPACE_ID")]
    pub workspace_id: Option<String>,
    /// Timeout of one API request, body included.
    #[arg(long = "qoder.request-timeout", env = "QODER_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Request budget for the whole exporter (the API's guidance); 0 turns the limiter off.
    #[arg(
        long = "qoder.max-requests-per-second",
        env = "QODER_MAX_REQUESTS_PER_SECOND"
    )]
    pub max_requests_per_second: Option<u32>,
    /// Sessions read at the same time.
    #[arg(long = "qoder.concurrency", env = "QODER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Largest API response accepted, in bytes; a larger one is refused and counted.
    #[arg(long = "qoder.max-response-bytes", env = "QODER_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<usize>,
    /// Accept a plain http:// --qoder.api-url to another machine (the token then travels in
    /// clear).
    ///
    /// For a TLS-terminating proxy on a private network, say. Without it such a URL is
    /// refused at start; `localhost` and loopback addresses need no flag.
    #[arg(long = "qoder.allow-insecure-http", env = "QODER_ALLOW_INSECURE_HTTP")]
    pub allow_insecure_http: bool,
}

/// How often sessions and the session list are read (the exporter and the demo).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Polling")]
pub struct PollFlags {
    /// How often a running session is polled.
    #[arg(long = "qoder.poll-interval", env = "QODER_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// How often an idle session is polled.
    #[arg(long = "qoder.idle-poll-interval", env = "QODER_IDLE_POLL_INTERVAL", value_parser = parse_duration)]
    pub idle_poll_interval: Option<Duration>,
    /// How often the session list is checked for new sessions.
    #[arg(long = "qoder.discovery-interval", env = "QODER_DISCOVERY_INTERVAL", value_parser = parse_duration)]
    pub discovery_interval: Option<Duration>,
    /// How often the whole session list is read to learn, from `updated_at`, which idle
    /// sessions changed (unchanged ones are not polled).
    ///
    /// An idle session whose `updated_at` has not moved since it was last read is not polled
    /// (but for a safety read every 10 min); one whose `updated_at` moved is read at once.
    #[arg(long = "qoder.resync-interval", env = "QODER_RESYNC_INTERVAL", value_parser = parse_duration)]
    pub resync_interval: Option<Duration>,
    /// Sessions followed at once (ended ones do not count), from discovery; past it new
    /// sessions in the list wait until some end.
    ///
    /// Those waiting are counted in `qoder_exporter_sessions_not_followed_total` (each listing
    /// that skips one counts it) and logged once a minute. It bounds memory if a list of live
    /// sessions never ends; an account with more live sessions shards (--shard.count).
    #[arg(long = "qoder.max-sessions", env = "QODER_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
}

/// The HTTP endpoints.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Web")]
pub struct WebFlags {
    /// Address to serve /metrics, /, /healthz and /readyz on.
    ///
    /// `host:port`, `:port` (every interface) or `[v6]:port`.
    #[arg(long = "web.listen-address", env = "QODER_EXPORTER_WEB_LISTEN_ADDRESS")]
    pub listen_address: Option<String>,
    /// Path of the metrics endpoint.
    #[arg(long = "web.telemetry-path", env = "QODER_EXPORTER_WEB_TELEMETRY_PATH")]
    pub telemetry_path: Option<String>,
    /// TLS and basic auth for the endpoints, in the Prometheus exporter-toolkit format (YAML).
    ///
    /// The file node_exporter takes; the README's section "Access to the endpoints" shows one
    /// and what it does.
    #[arg(long = "web.config.file", env = "QODER_EXPORTER_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Connections open at once on the web port; one more is closed on arrival and counted.
    #[arg(
        long = "web.max-connections",
        env = "QODER_EXPORTER_WEB_MAX_CONNECTIONS"
    )]
    pub max_connections: Option<usize>,
}

/// The state file.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "State")]
pub struct StateFlags {
    /// The state file (SQLite) that keeps counts exact across restarts.
    ///
    /// SQLite in WAL mode; keep it on a volume.
    #[arg(long = "state.path", env = "QODER_EXPORTER_STATE_PATH")]
    pub state_path: Option<PathBuf>,
    /// A turn whose session stays quiet this long (by event time) mid-turn is closed as
    /// incomplete (`qoder.turn.end=stale`).
    #[arg(long = "state.max-turn-age", env = "QODER_EXPORTER_MAX_TURN_AGE", value_parser = parse_duration)]
    pub max_turn_age: Option<Duration>,
}

/// Splitting the sessions across several exporters (the exporter and `dump`).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Sharding")]
pub struct ShardFlags {
    /// Split the sessions across N exporters: this one follows only the sessions whose stable
    /// hash falls in --shard.index.
    ///
    /// The hash is of the session id (SHA-256, so the same on every machine and version).
    /// deploy/README.md, "Scaling past one exporter", says how to run shards and change N.
    #[arg(long = "shard.count", env = "QODER_SHARD_COUNT")]
    pub shard_count: Option<u32>,
    /// This exporter's shard, 0..count-1, or `ordinal` to take it from the host name's
    /// trailing number (a StatefulSet pod `qoder-exporter-2` is shard 2).
    #[arg(long = "shard.index", env = "QODER_SHARD_INDEX")]
    pub shard_index: Option<String>,
}

/// What the metrics show besides the counts.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Metrics")]
pub struct MetricsFlags {
    /// Per-session series (`qoder_session_info`, `qoder_session_credits`,
    /// `qoder_session_budget_credits`) for at most this many of the most recently active
    /// sessions; 0 turns them off.
    #[arg(
        long = "metrics.session-series-limit",
        env = "QODER_METRICS_SESSION_SERIES_LIMIT"
    )]
    pub session_series_limit: Option<usize>,
    /// Most Prometheus series the event-derived families may have (a histogram counts its
    /// buckets, `_sum` and `_count`); past it, new label sets are counted under `other` and in
    /// `qoder_exporter_series_dropped_total`. 0: no budget.
    ///
    /// `other` takes the place of a new label set's wire-derived labels; the drop is counted
    /// once per committed batch the label set appears in, and the log says so once. Series
    /// already counted keep moving.
    #[arg(long = "metrics.max-series", env = "QODER_METRICS_MAX_SERIES")]
    pub max_series: Option<usize>,
    /// Price of one Qoder credit, exported as `qoder_credit_price{currency}` so dashboards and
    /// recording rules can show money; unset: credits only.
    #[arg(long = "cost.credit-price", env = "QODER_COST_CREDIT_PRICE", value_parser = parse_price)]
    pub credit_price: Option<f64>,
    /// Currency of --cost.credit-price (an ISO 4217 code).
    #[arg(long = "cost.currency", env = "QODER_COST_CURRENCY")]
    pub currency: Option<String>,
}

fn parse_price(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e} (a number, e.g. 0.01)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err("must be a positive number".to_owned());
    }
    Ok(v)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

/// The config file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub qoder: QoderSection,
    #[serde(default)]
    pub web: WebSection,
    #[serde(default)]
    pub state: StateSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub otlp: OtlpSection,
    #[serde(default)]
    pub shard: ShardSection,
    #[serde(default)]
    pub cost: CostSection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct MetricsSection {
    pub session_series_limit: Option<usize>,
    pub max_series: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct CostSection {
    pub credit_price: Option<f64>,
    pub currency: Option<String>,
}

/// The configured price of one credit.
#[derive(Debug, Clone, PartialEq)]
pub struct CreditPrice {
    pub price: f64,
    pub currency: String,
}

impl CreditPrice {
    fn resolve(
        price: Option<f64>,
        currency: Option<String>,
    ) -> anyhow::Result<Option<CreditPrice>> {
        let currency = currency.map(|c| c.trim().to_ascii_uppercase());
        if let Some(c) = &currency
            && !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            anyhow::bail!(
                "--cost.currency {c:?}: an ISO 4217 code of three letters (e.g. USD, CNY)"
            );
        }
        match price {
            None if currency.is_some() => {
                anyhow::bail!("--cost.currency needs --cost.credit-price")
            }
            None => Ok(None),
            Some(p) if !(p.is_finite() && p > 0.0) => {
                anyhow::bail!("--cost.credit-price {p}: must be a positive number")
            }
            Some(price) => Ok(Some(CreditPrice {
                price,
                currency: currency.unwrap_or_else(|| DEFAULT_CURRENCY.to_owned()),
            })),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct ShardSection {
    pub count: Option<u32>,
    pub index: Option<String>,
}

/// Which sessions this exporter follows when several split the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub count: u32,
    pub index: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { count: 1, index: 0 }
    }
}

impl Shard {
    /// The shard a session belongs to: the first 8 bytes of SHA-256 of its id, big-endian,
    /// modulo the count. Stable across versions, machines and restarts.
    pub fn of(session_id: &str, count: u32) -> u32 {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(session_id.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        let n = u64::from_be_bytes(b) % u64::from(count.max(1));
        u32::try_from(n).unwrap_or(0)
    }

    pub(crate) fn owns(&self, session_id: &str) -> bool {
        self.count <= 1 || Shard::of(session_id, self.count) == self.index
    }

    /// Resolves `--shard.count` / `--shard.index`; `hostname` serves `ordinal`.
    pub fn resolve(
        count: Option<u32>,
        index: Option<&str>,
        hostname: Option<&str>,
    ) -> anyhow::Result<Shard> {
        let count = count.unwrap_or(Shard::default().count);
        if count == 0 {
            bail!("--shard.count: must be at least 1");
        }
        let index = match index.map(str::trim) {
            None | Some("") => 0,
            Some("ordinal") => {
                let host = hostname.unwrap_or_default();
                let digits: String = host
                    .chars()
                    .rev()
                    .take_while(char::is_ascii_digit)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                digits.parse().with_context(|| {
                    format!(
                        "--shard.index ordinal: the host name {host:?} does not end in a number"
                    )
                })?
            }
            Some(n) => n
                .parse()
                .with_context(|| format!("--shard.index {n:?}: a number or `ordinal`"))?,
        };
        if index >= count {
            bail!("--shard.index {index}: must be below --shard.count {count}");
        }
        Ok(Shard { count, index })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct QoderSection {
    pub api_url: Option<String>,
    pub pat_file: Option<PathBuf>,
    #[serde(default)]
    pub sessions: Vec<String>,
    #[serde(default, with = "humantime_serde_opt")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub idle_poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub discovery_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub resync_interval: Option<Duration>,
    pub max_requests_per_second: Option<u32>,
    pub concurrency: Option<usize>,
    pub max_response_bytes: Option<usize>,
    pub workspace_id: Option<String>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct WebSection {
    pub listen_address: Option<String>,
    pub telemetry_path: Option<String>,
    pub config_file: Option<PathBuf>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct StateSection {
    pub path: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    pub max_turn_age: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct LogSection {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// Durations in the file are humantime strings, as on the command line.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Everything the exporter needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api_url: String,
    pub pat: Option<Pat>,
    pub pat_file: Option<PathBuf>,
    pub sessions: Vec<String>,
    pub poll_interval: Duration,
    pub idle_poll_interval: Duration,
    pub discovery_interval: Duration,
    pub resync_interval: Duration,
    pub request_timeout: Duration,
    pub max_requests_per_second: Option<u32>,
    pub concurrency: usize,
    pub max_response_bytes: usize,
    pub listen_address: SocketAddr,
    pub telemetry_path: String,
    /// `--web.config.file`: TLS and basic auth.
    pub web_config_file: Option<PathBuf>,
    /// `--web.max-connections`.
    pub max_connections: usize,
    /// `--qoder.max-sessions`.
    pub max_sessions: usize,
    pub state_path: PathBuf,
    pub max_turn_age: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    /// `--qoder.workspace-id`: sent as the `qoder-workspace-id` header.
    pub workspace_id: Option<String>,
    /// `--cost.credit-price` and `--cost.currency`: `None`, credits only.
    pub credit_price: Option<CreditPrice>,
    /// `--metrics.session-series-limit`.
    pub session_series_limit: usize,
    /// `--metrics.max-series` (0: no budget).
    pub max_series: usize,
    /// `None`: traces off.
    pub otlp: Option<OtlpSettings>,
    /// `None`: metrics are only served, not pushed.
    pub otlp_metrics: Option<OtlpMetricsSettings>,
    /// `None`: the event log is not exported.
    pub otlp_logs: Option<OtlpLogsSettings>,
    pub shard: Shard,
}

impl Settings {
    /// Resolves flags (with their environment variables) over the config file over defaults.
    pub fn resolve(flags: Flags) -> anyhow::Result<Settings> {
        let file = match &flags.common.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--config.file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("--config.file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let q = file.qoder;
        let pat_file = flags.api.pat_file.or(q.pat_file);
        let pat = match &pat_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--qoder.pat-file {}", path.display()))?;
                Some(Pat::new(&text).with_context(|| {
                    format!("--qoder.pat-file {}: the file is empty", path.display())
                })?)
            }
            None => std::env::var("QODER_PAT")
                .ok()
                .or_else(|| std::env::var("QODER_PERSONAL_ACCESS_TOKEN").ok())
                .and_then(|t| Pat::new(&t)),
        };
        let listen = flags
            .web
            .listen_address
            .or(file.web.listen_address)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen_address = parse_listen(&listen)?;
        let web_config_file = flags.web.web_config_file.or(file.web.config_file);
        let telemetry_path = flags
            .web
            .telemetry_path
            .or(file.web.telemetry_path)
            .unwrap_or_else(|| DEFAULT_TELEMETRY_PATH.to_owned());
        if !telemetry_path.starts_with('/') || telemetry_path.len() < 2 {
            bail!(
                "--web.telemetry-path {telemetry_path:?}: must start with '/' and name a path other than '/'"
            );
        }
        if ["/healthz", "/readyz"].contains(&telemetry_path.as_str()) {
            bail!(
                "--web.telemetry-path {telemetry_path:?}: that path is taken by a probe endpoint"
            );
        }
        let api_url = flags
            .api
            .api_url
            .or(q.api_url)
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        check_api_url(
            &api_url,
            flags.api.allow_insecure_http || q.allow_insecure_http,
        )?;
        let mut sessions: Vec<String> = if flags.api.sessions.is_empty() {
            q.sessions
        } else {
            flags.api.sessions
        };
        sessions.retain(|s| !s.trim().is_empty());
        for s in &mut sessions {
            *s = s.trim().to_owned();
        }
        sessions.sort();
        sessions.dedup();
        let concurrency = flags
            .api
            .concurrency
            .or(q.concurrency)
            .unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            bail!("--qoder.concurrency: must be at least 1");
        }
        let max_response_bytes = flags
            .api
            .max_response_bytes
            .or(q.max_response_bytes)
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if max_response_bytes < 1024 {
            bail!("--qoder.max-response-bytes: must be at least 1024");
        }
        let env = |k: &str| std::env::var(k).ok();
        let o = file.otlp;
        let mut otlp_flags = flags.otlp;
        let general_endpoint = otlp_flags.otlp_endpoint.clone().or(o.endpoint.clone());
        let general_protocol = otlp_flags.otlp_protocol.clone().or(o.protocol.clone());
        let general = OtlpGeneral {
            endpoint: general_endpoint.as_deref().filter(|e| !e.trim().is_empty()),
            protocol: general_protocol.as_deref().filter(|p| !p.trim().is_empty()),
        };
        let otlp_metrics =
            OtlpMetricsSettings::resolve(&mut otlp_flags.signals, o.metrics, general)?;
        let otlp_logs = OtlpLogsSettings::resolve(&mut otlp_flags.signals, o.logs, general)?;
        let otlp = OtlpSettings::resolve(
            otlp_flags.otlp_endpoint.or(o.endpoint),
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or(otlp_flags.otlp_protocol)
                .or(o.protocol),
            otlp_flags.otlp_capture_content || o.capture_content,
            otlp_flags.otlp_content_max_bytes.or(o.content_max_bytes),
            otlp_flags.otlp_outbox_max_turns.or(o.outbox_max_turns),
        )?;
        let hostname = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned());
        let shard = Shard::resolve(
            flags.shard.shard_count.or(file.shard.count),
            flags.shard.shard_index.or(file.shard.index).as_deref(),
            hostname.as_deref(),
        )?;
        let credit_price = CreditPrice::resolve(
            flags.metrics.credit_price.or(file.cost.credit_price),
            flags.metrics.currency.or(file.cost.currency),
        )?;
        let workspace_id = flags
            .api
            .workspace_id
            .or(q.workspace_id.clone())
            .filter(|w| !w.trim().is_empty());
        Ok(Settings {
            shard,
            otlp,
            otlp_metrics,
            otlp_logs,
            workspace_id,
            credit_price,
            session_series_limit: flags
                .metrics
                .session_series_limit
                .or(file.metrics.session_series_limit)
                .unwrap_or(DEFAULT_SESSION_SERIES_LIMIT),
            max_series: flags
                .metrics
                .max_series
                .or(file.metrics.max_series)
                .unwrap_or(DEFAULT_MAX_SERIES),
            api_url,
            pat,
            pat_file,
            sessions,
            poll_interval: flags
                .poll
                .poll_interval
                .or(q.poll_interval)
                .unwrap_or(DEFAULT_POLL_INTERVAL),
            idle_poll_interval: flags
                .poll
                .idle_poll_interval
                .or(q.idle_poll_interval)
                .unwrap_or(DEFAULT_IDLE_POLL_INTERVAL),
            discovery_interval: flags
                .poll
                .discovery_interval
                .or(q.discovery_interval)
                .unwrap_or(DEFAULT_DISCOVERY_INTERVAL),
            resync_interval: flags
                .poll
                .resync_interval
                .or(q.resync_interval)
                .unwrap_or(DEFAULT_RESYNC_INTERVAL),
            request_timeout: flags
                .api
                .request_timeout
                .or(q.request_timeout)
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            max_requests_per_second: match flags
                .api
                .max_requests_per_second
                .or(q.max_requests_per_second)
            {
                Some(0) => None,
                Some(n) => Some(n),
                None => Some(DEFAULT_MAX_REQUESTS_PER_SECOND),
            },
            concurrency,
            max_response_bytes,
            listen_address,
            telemetry_path,
            web_config_file,
            max_sessions: match flags.poll.max_sessions.or(q.max_sessions) {
                Some(0) => bail!("--qoder.max-sessions: must be at least 1"),
                Some(n) => n,
                None => DEFAULT_MAX_SESSIONS,
            },
            max_connections: match flags.web.max_connections.or(file.web.max_connections) {
                Some(0) => bail!("--web.max-connections: must be at least 1"),
                Some(n) => n,
                None => DEFAULT_MAX_CONNECTIONS,
            },
            state_path: flags
                .state
                .state_path
                .or(file.state.path)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_PATH)),
            max_turn_age: flags
                .state
                .max_turn_age
                .or(file.state.max_turn_age)
                .unwrap_or(DEFAULT_MAX_TURN_AGE),
            log_level: log_level(flags.common.log_level.or(file.log.level))?,
            log_format: match flags.common.log_format.or(file.log.format).as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("logfmt") => LogFormat::Logfmt,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    anyhow::bail!("--log.format {other:?}: must be one of text, logfmt, json")
                }
            },
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing's human format (colours on a terminal).
    #[default]
    Text,
    /// `ts=… level=… msg="…" key=value`, as the Prometheus exporters write it.
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// The levels the Prometheus exporter toolkit accepts; anything else is refused (a typo must
/// not silently turn the logs off).
pub(crate) const LOG_LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

fn log_level(given: Option<String>) -> anyhow::Result<String> {
    match given {
        None => Ok(DEFAULT_LOG_LEVEL.to_owned()),
        Some(l) if LOG_LEVELS.contains(&l.as_str()) => Ok(l),
        Some(l) => anyhow::bail!("--log.level {l:?}: must be one of debug, info, warn, error"),
    }
}

impl Settings {
    /// The token, or the error that says how to give one.
    pub(crate) fn require_pat(&self) -> anyhow::Result<Pat> {
        self.pat.clone().context(
            "no Qoder token: set QODER_PAT (or QODER_PERSONAL_ACCESS_TOKEN), or pass --qoder.pat-file; \
             to try the exporter without an account run `qoder-exporter demo`",
        )
    }
}

/// An http(s) URL; plain http:// only to this machine unless `allow_insecure_http`, since
/// the token goes with every request.
fn check_api_url(api_url: &str, allow_insecure_http: bool) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(api_url);
    let Ok(url) = url.as_ref().map_err(|_| ()).and_then(|u| match u.scheme() {
        "http" | "https" if u.has_host() => Ok(u),
        _ => Err(()),
    }) else {
        bail!("--qoder.api-url: must be an http:// or https:// URL with a host");
    };
    if url.scheme() == "http" && !is_this_machine(url) && !allow_insecure_http {
        bail!(
            "--qoder.api-url: plain http:// to {} would send the token in clear; use https://, or pass --qoder.allow-insecure-http",
            url.host_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// `localhost` or a loopback address: a URL that never leaves this machine.
pub(crate) fn is_this_machine(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host:port`, `:port` (all interfaces, as Prometheus exporters accept) or `[v6]:port`.
fn parse_listen(s: &str) -> anyhow::Result<SocketAddr> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    if let Ok(a) = full.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!("--web.listen-address {s:?}: expected host:port, e.g. 0.0.0.0:9874 or :9874")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["qoder-exporter"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").flags
    }

    /// The switches that turn every optional output on (traces with content, metrics and logs
    /// over OTLP, a price), so that their defaults are resolved too.
    pub(super) const ALL_ON: [&str; 9] = [
        "--otlp.endpoint",
        "http://127.0.0.1:4318",
        "--otlp.capture-content",
        "--otlp.metrics.exporter",
        "otlp",
        "--otlp.logs.exporter",
        "otlp",
        "--cost.credit-price",
        "1",
    ];

    #[test]
    fn the_help_says_the_defaults_the_code_uses() {
        // A default is written in the help (`[default: X]`, which the README's table and
        // deploy/config.example.toml are generated from) and in the code that applies it;
        // they must agree. Settings resolved
        // from nothing but switches (signals on, a price), then every help default compared.
        let s = Settings::resolve(flags(&ALL_ON)).expect("resolves");
        let otlp = s.otlp.as_ref().expect("traces on");
        let metrics = s.otlp_metrics.as_ref().expect("metrics on");
        let logs = s.otlp_logs.as_ref().expect("logs on");
        let d = |v: Duration| humantime::format_duration(v).to_string();
        let used: Vec<(&str, String)> = vec![
            ("log.level", s.log_level.clone()),
            ("log.format", format!("{:?}", s.log_format).to_lowercase()),
            ("qoder.api-url", s.api_url.clone()),
            ("qoder.request-timeout", d(s.request_timeout)),
            (
                "qoder.max-requests-per-second",
                format!("{}", s.max_requests_per_second.unwrap_or(0)),
            ),
            ("qoder.concurrency", s.concurrency.to_string()),
            ("qoder.max-response-bytes", s.max_response_bytes.to_string()),
            ("qoder.poll-interval", d(s.poll_interval)),
            ("qoder.idle-poll-interval", d(s.idle_poll_interval)),
            ("qoder.discovery-interval", d(s.discovery_interval)),
            ("qoder.resync-interval", d(s.resync_interval)),
            ("qoder.max-sessions", s.max_sessions.to_string()),
            ("web.listen-address", s.listen_address.to_string()),
            ("web.telemetry-path", s.telemetry_path.clone()),
            ("web.max-connections", s.max_connections.to_string()),
            ("state.path", s.state_path.display().to_string()),
            ("state.max-turn-age", d(s.max_turn_age)),
            ("shard.count", s.shard.count.to_string()),
            ("shard.index", s.shard.index.to_string()),
            (
                "metrics.session-series-limit",
                s.session_series_limit.to_string(),
            ),
            ("metrics.max-series", s.max_series.to_string()),
            (
                "cost.currency",
                s.credit_price
                    .as_ref()
                    .map(|p| p.currency.clone())
                    .unwrap_or_default(),
            ),
            ("otlp.protocol", "http/protobuf".to_owned()),
            (
                "otlp.content-max-bytes",
                otlp.capture_content.unwrap_or(0).to_string(),
            ),
            ("otlp.outbox-max-turns", otlp.outbox_max_turns.to_string()),
            (
                "otlp.metrics.interval",
                metrics.interval.as_millis().to_string(),
            ),
            (
                "otlp.metrics.temporality",
                format!("{:?}", metrics.temporality).to_lowercase(),
            ),
            (
                "otlp.logs.outbox-max-records",
                logs.outbox_max_records.to_string(),
            ),
        ];
        assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
        // Defaults that name another setting or an absence: nothing to compare.
        let words = ["--otlp.protocol", "none", "all"];
        let root = Cli::full_command();
        let mut commands = vec![root.clone()];
        commands.extend(root.get_subcommands().cloned());
        let mut compared = 0;
        for arg in commands.iter().flat_map(|c| c.get_arguments()) {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            let Some((_, said)) = help.split_once("[default: ") else {
                continue;
            };
            let said = said.split([']', ',']).next().unwrap_or(said);
            if words.contains(&said) {
                continue;
            }
            let (_, value) = used
                .iter()
                .find(|(flag, _)| *flag == long)
                .unwrap_or_else(|| panic!("--{long}: add its default ({said}) to this test"));
            match (
                humantime::parse_duration(said),
                humantime::parse_duration(value),
            ) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "--{long}: help {said}, code {value}"),
                _ => assert_eq!(said, value, "--{long}: help and code disagree"),
            }
            compared += 1;
        }
        assert!(compared >= 25, "{compared} defaults compared");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::full_command().debug_assert();
        let cli = Cli::try_parse_checked([
            "q",
            "demo",
            "--demo.sessions",
            "3",
            "--web.listen-address",
            ":1",
        ])
        .expect("demo");
        assert!(matches!(
            cli.command,
            Some(Command::Demo(DemoFlags { sessions: 3, .. }))
        ));
        let (_, flags) = cli.into_parts();
        assert_eq!(flags.web.listen_address.as_deref(), Some(":1"));
    }

    #[test]
    fn a_subcommand_takes_only_the_flags_it_reads() {
        let refused = |args: &[&str]| {
            let mut all = vec!["q"];
            all.extend_from_slice(args);
            Cli::try_parse_checked(all)
                .expect_err("refused")
                .to_string()
        };
        // The demo has its own API; a replay reads no API at all.
        assert!(refused(&["demo", "--qoder.session", "s"]).contains("--qoder.session"));
        assert!(
            refused(&["replay", "f", "--qoder.api-url", "http://x"]).contains("--qoder.api-url")
        );
        assert!(refused(&["dump", "--state.path", "s.db"]).contains("--state.path"));
        // An exporter flag before the subcommand would be ignored: refused with a hint.
        let before = refused(&["--state.path", "s.db", "replay", "f"]);
        assert!(
            before.contains("--state.path is written before `replay`"),
            "{before}"
        );
        // The shared flags go anywhere; each subcommand gets the groups it reads.
        let (_, flags) = Cli::try_parse_checked([
            "q",
            "--log.level",
            "debug",
            "replay",
            "f",
            "--state.path",
            "s.db",
        ])
        .expect("ok")
        .into_parts();
        assert_eq!(flags.common.log_level.as_deref(), Some("debug"));
        assert_eq!(flags.state.state_path, Some(PathBuf::from("s.db")));
        let (_, flags) = Cli::try_parse_checked([
            "q",
            "dump",
            "--qoder.session",
            "a",
            "--shard.count",
            "2",
            "--log.format",
            "json",
        ])
        .expect("ok")
        .into_parts();
        assert_eq!(flags.api.sessions, ["a"]);
        assert_eq!(flags.shard.shard_count, Some(2));
        assert_eq!(flags.common.log_format.as_deref(), Some("json"));
        // Each subcommand's help lists its own groups only.
        let mut cli = Cli::full_command();
        cli.build();
        let help = |cli: &mut clap::Command, sub: &str| {
            cli.find_subcommand_mut(sub)
                .expect("subcommand")
                .render_long_help()
                .to_string()
        };
        let replay = help(&mut cli, "replay");
        assert!(replay.contains("--state.path") && replay.contains("--log.level"));
        assert!(!replay.contains("--qoder."), "{replay}");
        let dump = help(&mut cli, "dump");
        assert!(dump.contains("--qoder.api-url") && !dump.contains("--state.path"));
        assert!(
            !dump.contains("--qoder.poll-interval"),
            "dump does not poll"
        );
        let check = help(&mut cli, "healthcheck");
        assert!(
            !check.contains("--qoder.") && !check.contains("--web."),
            "{check}"
        );
    }

    #[test]
    fn defaults_are_sane() {
        let s = Settings::resolve(Flags::default()).expect("resolves");
        assert_eq!(s.api_url, DEFAULT_API_URL);
        assert_eq!(s.poll_interval, Duration::from_secs(2));
        assert_eq!(s.telemetry_path, "/metrics");
        assert_eq!(s.max_requests_per_second, Some(50));
        assert_eq!(s.listen_address.port(), 9874);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[qoder]\npoll-interval = \"5s\"\nsessions = [\"sess_a\"]\n[web]\nlisten-address = \":9999\"\ntelemetry-path = \"/m\"\n",
        )
        .expect("write");
        let p = path.to_str().expect("utf8");
        let s = Settings::resolve(flags(&[
            "--config.file",
            p,
            "--qoder.poll-interval",
            "500ms",
        ]))
        .expect("ok");
        assert_eq!(s.poll_interval, Duration::from_millis(500));
        assert_eq!(s.sessions, ["sess_a"]);
        assert_eq!(s.listen_address.port(), 9999);
        assert_eq!(s.telemetry_path, "/m");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Cli::try_parse_from(["q", "--qoder.poll-interval", "soon"]).expect_err("bad");
        assert!(err.to_string().contains("--qoder.poll-interval"), "{err}");
        let err = Settings::resolve(flags(&["--web.listen-address", "nope"])).expect_err("bad");
        assert!(err.to_string().contains("--web.listen-address"), "{err}");
        let err = Settings::resolve(flags(&["--web.telemetry-path", "metrics"])).expect_err("bad");
        assert!(err.to_string().contains("--web.telemetry-path"), "{err}");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[qoder]\npoll-intervall = \"5s\"\n").expect("write");
        let err = Settings::resolve(flags(&["--config.file", path.to_str().expect("utf8")]))
            .expect_err("typo");
        assert!(format!("{err:#}").contains("poll-intervall"), "{err:#}");
    }

    #[test]
    fn shards_split_sessions_stably() {
        assert_eq!(
            Shard::resolve(None, None, None).expect("ok"),
            Shard::default()
        );
        let s = Shard::resolve(Some(3), Some("ordinal"), Some("qoder-exporter-2")).expect("ok");
        assert_eq!(s, Shard { count: 3, index: 2 });
        assert!(Shard::resolve(Some(3), Some("3"), None).is_err());
        assert!(Shard::resolve(Some(3), Some("ordinal"), Some("exporter")).is_err());
        assert!(Shard::resolve(Some(0), None, None).is_err());
        // Pinned (Python: int.from_bytes(sha256(b"sess_1").digest()[:8], "big") % 3).
        assert_eq!(Shard::of("sess_1", 3), 0);
        // Every session has exactly one owner, and the split is even enough.
        let shards: Vec<Shard> = (0..3).map(|index| Shard { count: 3, index }).collect();
        let mut per = [0usize; 3];
        for i in 0..3000 {
            let id = format!("sess_{i}");
            let owners: Vec<usize> = (0..3).filter(|&k| shards[k].owns(&id)).collect();
            assert_eq!(owners.len(), 1);
            per[owners[0]] += 1;
        }
        assert!(per.iter().all(|&n| n > 850), "{per:?}");
    }

    #[test]
    fn plain_http_to_another_machine_needs_the_flag() {
        for ok in [
            "https://api.qoder.com/api/v1/cloud",
            "http://127.0.0.1:8080",
            "http://[::1]:8080/x",
            "http://localhost:1",
        ] {
            Settings::resolve(flags(&["--qoder.api-url", ok])).expect(ok);
        }
        let err = Settings::resolve(flags(&[
            "--qoder.api-url",
            "http://user:pt-secret@qoder.internal",
        ]))
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("--qoder.allow-insecure-http") && err.contains("qoder.internal"),
            "{err}"
        );
        assert!(
            !err.contains("pt-secret"),
            "credentials in the URL are not repeated: {err}"
        );
        Settings::resolve(flags(&[
            "--qoder.api-url",
            "http://qoder.internal",
            "--qoder.allow-insecure-http",
        ]))
        .expect("allowed");
        for bad in ["ftp://x", "api.qoder.com", "http://"] {
            assert!(
                Settings::resolve(flags(&["--qoder.api-url", bad])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn sessions_are_a_comma_list_or_repeated() {
        let s = Settings::resolve(flags(&["--qoder.session", "b,a", "--qoder.session", "a"]))
            .expect("ok");
        assert_eq!(s.sessions, ["a", "b"]);
    }

    #[test]
    fn pat_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pat");
        std::fs::write(&path, "pt-abc\n").expect("write");
        let s = Settings::resolve(flags(&["--qoder.pat-file", path.to_str().expect("utf8")]))
            .expect("ok");
        assert_eq!(s.pat.as_ref().map(Pat::expose), Some("pt-abc"));
        std::fs::write(&path, "\n").expect("write");
        assert!(
            Settings::resolve(flags(&["--qoder.pat-file", path.to_str().expect("utf8")])).is_err()
        );
    }
}
