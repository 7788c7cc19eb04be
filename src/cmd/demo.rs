//! `demo`: the exporter against the built-in simulated Qoder API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use qoder_exporter::app;
use qoder_exporter::config::{self, DemoFlags, Flags, Settings};
use qoder_exporter::secret::Pat;
use qoder_exporter::sim::{ScenarioConfig, Sim, SimConfig};

/// The demo's listener is local and its polling brisk unless told otherwise.
pub fn defaults(flags: &mut Flags) {
    flags
        .web
        .listen_address
        .get_or_insert_with(|| "127.0.0.1:9874".to_owned());
    flags
        .poll
        .poll_interval
        .get_or_insert(Duration::from_millis(500));
    flags
        .poll
        .discovery_interval
        .get_or_insert(Duration::from_secs(2));
}

/// Starts the simulated API and the exporter against it.
pub async fn run(mut settings: Settings, d: DemoFlags) -> anyhow::Result<()> {
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
    let _tmp = super::throwaway_state(&mut settings, "demo")?;
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
