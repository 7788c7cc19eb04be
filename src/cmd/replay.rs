//! `replay`: JSON Lines through the pipeline, the metrics on stdout.

use anyhow::Context;
use qoder_exporter::app;
use qoder_exporter::config::{ReplayFlags, Settings};
use qoder_exporter::offline::ReplaySummary;
use qoder_exporter::server::{self, AppState};
use qoder_exporter::sinks::metrics::Exposition;
use qoder_exporter::web_config::WebConfig;
use tokio::net::TcpListener;

/// `replay`: the files through the pipeline, the metrics on stdout, a summary on stderr; with
/// `--serve`, the metrics on the web port afterwards.
pub async fn run(mut settings: Settings, r: ReplayFlags) -> anyhow::Result<()> {
    // What can refuse `--serve` is checked before hours of replay, not after.
    let serving = match r.serve {
        true => Some(bind(&settings).await?),
        false => None,
    };
    let _tmp = super::throwaway_state(&mut settings, "replay")?;
    let (metrics, summary) = qoder_exporter::offline::replay(&settings, &r).await?;
    let (text, _) = metrics.render(Exposition::Text);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(&text).context("writing the metrics")?;
        out.flush().context("writing the metrics")?;
    }
    report(&summary);
    if summary.invalid > 0 && !r.allow_invalid {
        anyhow::bail!(
            "{} line(s) could not be read (listed above; counted in qoder_exporter_events_invalid_total); --allow-invalid accepts them",
            summary.invalid
        );
    }
    if let Some((listener, web)) = serving {
        let (_tx, ready) = tokio::sync::watch::channel(true);
        let limits = server::Limits::new(settings.max_connections, &metrics.process);
        let app = server::router(
            AppState {
                metrics,
                ready,
                telemetry_path: settings.telemetry_path.clone(),
                api_url: format!("replay of {} file(s)", r.files.len()),
            },
            &web,
        );
        tracing::info!(addr = %listener.local_addr()?, "serving the replayed metrics; Ctrl-C to stop");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            app::shutdown_signal().await;
            s.cancel();
        });
        server::serve(listener, app, &web, stop, limits).await?;
    }
    Ok(())
}

/// The web config and the listener for `--serve`.
async fn bind(settings: &Settings) -> anyhow::Result<(TcpListener, WebConfig)> {
    let web = match &settings.web_config_file {
        Some(p) => WebConfig::load(p)?,
        None => WebConfig::default(),
    };
    let listener = TcpListener::bind(settings.listen_address)
        .await
        .with_context(|| format!("--web.listen-address {}", settings.listen_address))?;
    Ok((listener, web))
}

/// The summary and the invalid lines, on stderr.
fn report(summary: &ReplaySummary) {
    eprintln!("{summary}");
    for line in &summary.invalid_lines {
        eprintln!("{line}");
    }
    let unreported = summary.invalid - summary.invalid_lines.len() as u64;
    if unreported > 0 {
        eprintln!("… and {unreported} more invalid lines");
    }
}
