//! `replay`: JSON Lines through the pipeline, the metrics on stdout.

use anyhow::Context;
use qoder_exporter::app;
use qoder_exporter::config::{ReplayFlags, Settings};

/// `replay`: the files through the pipeline, the metrics on stdout, a summary on stderr.
pub async fn run(mut settings: Settings, r: ReplayFlags) -> anyhow::Result<()> {
    let _tmp = super::throwaway_state(&mut settings, "replay")?;
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
