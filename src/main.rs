//! The binary: parse the command line, resolve settings, start logging, run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use qoder_exporter::config::{Cli, Command, DemoFlags, ReplayFlags, Settings};
use qoder_exporter::secret::Pat;
use qoder_exporter::sim::{ScenarioConfig, Sim, SimConfig};
use qoder_exporter::{app, config};

/// mimalloc: the pipeline allocates and frees many small strings per event; glibc's malloc
/// spent about a sixth of replay's time on them (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck { url, insecure }) = &cli.command {
        return healthcheck(url, *insecure);
    }
    let demo = matches!(cli.command, Some(Command::Demo(_)));
    let mut flags = cli.flags;
    if demo {
        // The demo's state is throw-away and its listener local unless told otherwise.
        flags
            .listen_address
            .get_or_insert_with(|| "127.0.0.1:9874".to_owned());
        flags
            .poll_interval
            .get_or_insert(Duration::from_millis(500));
        flags
            .discovery_interval
            .get_or_insert(Duration::from_secs(2));
    }
    let settings = match Settings::resolve(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qoder-exporter: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&settings.log_level, settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Demo(d)) => demo_run(settings, d).await,
            Some(Command::Dump(d)) => qoder_exporter::offline::dump(&settings, &d).await,
            Some(Command::Replay(r)) => replay_run(settings, r).await,
            Some(Command::Healthcheck { .. }) | None => {
                app::run(settings, app::shutdown_signal()).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One GET with a short timeout; no logging, no state.
fn healthcheck(url: &str, insecure: bool) -> std::process::ExitCode {
    let ok = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .is_some_and(|rt| {
            rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .tls_danger_accept_invalid_certs(insecure)
                    .build();
                match client {
                    Ok(c) => c
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    Err(_) => false,
                }
            })
        });
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Logs to stderr at `level` (checked by `Settings`); `RUST_LOG`, when set and valid, is an
/// expert override and says so once.
fn init_logging(level: &str, format: config::LogFormat) {
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

/// Starts the simulated API and the exporter against it.
async fn demo_run(mut settings: Settings, d: DemoFlags) -> anyhow::Result<()> {
    let sim = Sim::start(
        SimConfig {
            scenario: ScenarioConfig {
                seed: d.seed,
                // A few sessions at once, then one arriving every 20 s, for about an hour.
                sessions: d.sessions.max(1) * 15,
                max_turns: 5,
                stagger: 20,
                hostile: false,
                sub_agents: true,
            },
            step_interval: Some(Duration::from_secs(1)),
            ..SimConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .context("starting the simulated Qoder API")?;
    // Let the first sessions be under way already.
    sim.set_clock(20 * d.sessions.max(1) as u64 / 3);
    settings.api_url = sim.base_url();
    settings.pat = Pat::new(&sim.token());
    settings.pat_file = None;
    let _tmp;
    if settings.state_path == std::path::Path::new("qoder-exporter.db") {
        let dir = tempfile_dir("demo")?;
        settings.state_path = dir.join("state.db");
        _tmp = TempDir(dir);
    }
    let running = app::start(settings).await?;
    let addr = running.addr;
    tracing::info!(api = %sim.base_url(), "simulated Qoder API running");
    eprintln!(
        "\nqoder-exporter demo\n  metrics:   http://{addr}{metrics}\n  overview:  http://{addr}/\n  simulated Qoder API: {api} (token {token})\nPress Ctrl-C to stop.\n",
        metrics = config::DEFAULT_TELEMETRY_PATH,
        api = sim.base_url(),
        token = sim.token(),
    );
    app::shutdown_signal().await;
    running.stop().await?;
    sim.stop();
    Ok(())
}

/// `replay`: the files through the pipeline, the metrics on stdout, a summary on stderr.
async fn replay_run(mut settings: Settings, r: ReplayFlags) -> anyhow::Result<()> {
    // Without --state.path the replay's state is throw-away; with it, a backfill.
    let _tmp;
    if settings.state_path == std::path::Path::new("qoder-exporter.db") {
        let dir = tempfile_dir("replay")?;
        settings.state_path = dir.join("state.db");
        _tmp = TempDir(dir);
    }
    let (metrics, summary) = qoder_exporter::offline::replay(&settings, &r).await?;
    let (text, _) = metrics.render(false);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(&text).context("writing the metrics")?;
        out.flush().context("writing the metrics")?;
    }
    eprintln!("{summary}");
    for line in &summary.invalid_lines {
        eprintln!("{line}");
    }
    let unreported = summary.invalid - summary.invalid_lines.len() as u64;
    if unreported > 0 {
        eprintln!("… and {unreported} more invalid lines");
    }
    if summary.invalid > 0 && !r.allow_invalid {
        anyhow::bail!(
            "{} line(s) could not be read (listed above; counted in qoder_exporter_events_invalid_total); --allow-invalid accepts them",
            summary.invalid
        );
    }
    if r.serve {
        let (_tx, ready) = tokio::sync::watch::channel(true);
        let web = match &settings.web_config_file {
            Some(p) => qoder_exporter::web_config::WebConfig::load(p)?,
            None => qoder_exporter::web_config::WebConfig::default(),
        };
        let app = qoder_exporter::server::router(
            qoder_exporter::server::AppState {
                metrics,
                ready,
                telemetry_path: settings.telemetry_path.clone(),
                api_url: format!("replay of {} file(s)", r.files.len()),
            },
            &web,
        );
        let listener = tokio::net::TcpListener::bind(settings.listen_address)
            .await
            .with_context(|| format!("--web.listen-address {}", settings.listen_address))?;
        tracing::info!(addr = %listener.local_addr()?, "serving the replayed metrics; Ctrl-C to stop");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            app::shutdown_signal().await;
            s.cancel();
        });
        qoder_exporter::server::serve(listener, app, &web, stop).await?;
    }
    Ok(())
}

fn tempfile_dir(what: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("qoder-exporter-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes the demo's state directory on the way out.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
