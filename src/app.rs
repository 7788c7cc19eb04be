//! Wiring: builds every stage from [`Settings`], runs them, and stops them in order.
//!
//! Shutdown order: stop polling (jobs finish the batch in hand), let the pipeline drain its
//! queue and commit, close the store, and only then stop serving, so the last scrape during a
//! shutdown still sees every committed count.

use std::net::SocketAddr;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::pipeline::StoredSession;
use crate::pipeline::{OutboxConfig, Pipeline, PipelineHandle};
use crate::server::{AppState, router};
use crate::sinks::drain::{StopRequest, StopSignal, stop_pair};
use crate::sinks::metrics::Metrics;
use crate::source::client::{Client, ClientConfig, TokenSource};
use crate::source::poller::{Poller, PollerConfig};
use crate::state::StateStore;

/// How long in-flight polling may take to wind down before it is abandoned (nothing is lost:
/// cursors only move on commit).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// How long the outboxes may take to flush and the metrics push its final totals, together, at
/// shutdown (what is left is sent next start). With the drain above, a SIGTERM exits well
/// within 15 s.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its deadline a stopping task is waited for before it is abandoned.
const ABANDON_AFTER: Duration = Duration::from_secs(1);
/// With `--otlp.logs.include-content`, a record's message text is cut to this many bytes.
const LOG_CONTENT_MAX_BYTES: usize = 16 * 1024;
/// Bounded queue between pollers and the pipeline.
const PIPELINE_QUEUE: usize = 64;

/// A started exporter.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Metrics,
    pub ready: watch::Receiver<bool>,
    poll_cancel: CancellationToken,
    server_cancel: CancellationToken,
    poller: tokio::task::JoinHandle<()>,
    downstream: Downstream,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A background task and the switch that stops it.
#[derive(Debug)]
pub(crate) struct Task {
    what: &'static str,
    stop: StopRequest,
    handle: tokio::task::JoinHandle<()>,
}

impl Task {
    pub fn spawn<F: Future<Output = ()> + Send + 'static>(
        what: &'static str,
        run: impl FnOnce(StopSignal) -> F,
    ) -> Task {
        let (stop, signal) = stop_pair();
        let handle = tokio::spawn(run(signal));
        Task { what, stop, handle }
    }

    /// Asks the task to stop by `deadline` and waits for it; a moment past that it is
    /// abandoned (what it held is kept for the next start).
    pub async fn stop(self, deadline: tokio::time::Instant) {
        let Task {
            what,
            stop,
            mut handle,
        } = self;
        stop.stop_by(deadline);
        if tokio::time::timeout_at(deadline + ABANDON_AFTER, &mut handle)
            .await
            .is_err()
        {
            tracing::warn!(
                task = what,
                "did not stop in time; what it held is kept for the next start"
            );
            handle.abort();
            let _ = handle.await;
        }
    }
}

/// Everything behind the pipeline handle: the pipeline thread, and the shippers that deliver
/// what it committed. Closed in order by [`Downstream::close`].
#[derive(Debug)]
pub(crate) struct Downstream {
    pipeline: std::thread::JoinHandle<StateStore>,
    /// To wait for what was sent to be committed before the last deliveries.
    handle: PipelineHandle,
    /// Drains the span outbox (traces on).
    spans: Option<Task>,
    /// Drains the log outbox (logs on).
    logs: Option<Task>,
    /// Pushes `/metrics` over OTLP (metrics push on).
    metrics_push: Option<Task>,
}

impl Downstream {
    /// Call once nothing more will be sent to the pipeline: once what was sent is committed,
    /// the outbox shippers send what is left and the metrics push sends the final totals,
    /// together, by one deadline [`FLUSH_TIMEOUT`] away (a slow endpoint for one signal takes
    /// no time from another); then the pipeline closes the store.
    pub(crate) async fn close(self) -> anyhow::Result<()> {
        // An error means the pipeline is gone already: there is nothing more to wait for.
        let _ = self.handle.barrier().await;
        drop(self.handle);
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        let stop = |t: Option<Task>| async move {
            if let Some(t) = t {
                t.stop(deadline).await;
            }
        };
        tokio::join!(stop(self.spans), stop(self.logs), stop(self.metrics_push));
        join_pipeline(self.pipeline).await
    }
}

/// The state store, the pipeline thread over it, and the shippers: what the exporter and
/// `replay` share.
#[derive(Debug)]
pub(crate) struct Core {
    pub handle: PipelineHandle,
    pub stored: Vec<StoredSession>,
    pub downstream: Downstream,
}

impl Core {
    /// Opens the state and starts the pipeline (and the shippers); call inside the runtime.
    pub fn start(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Core> {
        // Built before the state opens, so a bad OTLP setting is a startup error that
        // touches nothing.
        let instance = crate::sinks::otlp::instance_id(&settings.state_path);
        let exporter = settings
            .otlp
            .as_ref()
            .map(|o| crate::sinks::otlp::exporter(o, &instance))
            .transpose()?;
        let metrics_sender = settings
            .otlp_metrics
            .as_ref()
            .map(|m| crate::sinks::otlp_send::OtlpSender::new(&m.target))
            .transpose()?;
        let logs_sender = settings
            .otlp_logs
            .as_ref()
            .map(|l| crate::sinks::otlp_send::OtlpSender::new(&l.target))
            .transpose()?;
        let process_start = crate::event::unix_nanos(std::time::SystemTime::now());
        let store = StateStore::open(&settings.state_path)?;
        tracing::info!(path = %settings.state_path.display(), "state store open");
        let series_start = store.series_start()?;
        metrics.process.state_writable.set(1);
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let outbox = settings.otlp.as_ref().map(|o| OutboxConfig {
            max_turns: o.outbox_max_turns,
            notify: notify.clone(),
            capture_bytes: o.capture_content,
        });
        let (pipeline, stored) = Pipeline::new(store, metrics.clone(), outbox)?;
        let mut pipeline = pipeline.with_max_turn_age(settings.max_turn_age);
        let logs_notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let logs_content = settings
            .otlp_logs
            .as_ref()
            .is_some_and(|l| l.include_content);
        crate::source::wire::set_keep_tool_inputs(logs_content);
        crate::source::wire::set_keep_text(
            logs_content
                || settings
                    .otlp
                    .as_ref()
                    .is_some_and(|o| o.capture_content.is_some()),
        );
        if let Some(l) = &settings.otlp_logs {
            metrics.process.otlp_signal_on(&metrics.registry, "logs");
            pipeline = pipeline.with_logs(crate::pipeline::log_outbox::LogsConfig {
                max_records: l.outbox_max_records,
                notify: logs_notify.clone(),
                event_types: l.event_types.clone(),
                content_max: l.include_content.then_some(LOG_CONTENT_MAX_BYTES),
            })?;
        }
        let (handle, pipeline) = pipeline.spawn(PIPELINE_QUEUE).context("pipeline thread")?;
        let spans = match (exporter, &settings.otlp) {
            (Some(exporter), Some(o)) => {
                tracing::info!(endpoint = %o.endpoint, protocol = ?o.protocol,
                    capture_content = o.capture_content.is_some(), "traces on: exporting turn spans over OTLP");
                let shipper = crate::sinks::otlp::Shipper {
                    exporter,
                    outbox: handle.clone(),
                    metrics: metrics.process.clone(),
                    notify,
                    endpoint: o.endpoint.clone(),
                    shape: crate::sinks::traces::SpanShape::new(Some(&settings.api_url)),
                };
                Some(Task::spawn("span shipper", |stop| shipper.run(stop)))
            }
            _ => {
                tracing::info!(
                    "traces off: no OTLP endpoint (set --otlp.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)"
                );
                None
            }
        };
        let resource =
            crate::sinks::otlp_metrics::proto_resource(&crate::sinks::otlp::resource(&instance));
        let logs = match (logs_sender, &settings.otlp_logs) {
            (Some(sender), Some(l)) => {
                tracing::info!(endpoint = %l.target.endpoint, protocol = ?l.target.protocol,
                    include_content = l.include_content,
                    event_types = ?l.event_types, "logs on: every counted event also becomes an OTLP log record");
                let shipper = crate::sinks::otlp_logs::LogShipper {
                    sender,
                    outbox: handle.clone(),
                    metrics: metrics.process.clone(),
                    notify: logs_notify,
                    resource: resource.clone(),
                };
                Some(Task::spawn("log shipper", |stop| shipper.run(stop)))
            }
            _ => None,
        };
        let metrics_push = match (metrics_sender, &settings.otlp_metrics) {
            (Some(sender), Some(m)) => {
                tracing::info!(endpoint = %m.target.endpoint, protocol = ?m.target.protocol,
                    interval = %humantime::format_duration(m.interval), temporality = ?m.temporality,
                    "metrics push on: every /metrics family also goes over OTLP");
                metrics.process.otlp_signal_on(&metrics.registry, "metrics");
                let pusher = crate::sinks::otlp_metrics::MetricsPusher {
                    sender,
                    metrics: metrics.clone(),
                    resource,
                    starts: crate::sinks::otlp_metrics::StartTimes {
                        durable: series_start,
                        process: process_start,
                    },
                    interval: m.interval,
                    temporality: m.temporality,
                };
                let baseline = pusher.first_baseline();
                Some(Task::spawn("metrics push", |stop| {
                    pusher.run(baseline, stop)
                }))
            }
            _ => None,
        };
        Ok(Core {
            downstream: Downstream {
                pipeline,
                handle: handle.clone(),
                spans,
                logs,
                metrics_push,
            },
            handle,
            stored,
        })
    }
}

/// Waits for the pipeline thread to drain its queue and close the store.
pub(crate) async fn join_pipeline(
    pipeline: std::thread::JoinHandle<StateStore>,
) -> anyhow::Result<()> {
    let store = tokio::task::spawn_blocking(move || pipeline.join())
        .await
        .context("joining the pipeline")?
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
    drop(store);
    Ok(())
}

/// A registry with the `--metrics.*` and `--cost.*` settings applied (the exporter and
/// `replay` alike).
pub(crate) fn configured_metrics(settings: &Settings) -> anyhow::Result<Metrics> {
    let metrics = Metrics::new().context("metrics registry")?;
    metrics
        .process
        .set_credit_price(settings.credit_price.as_ref());
    metrics.sessions.set_limit(settings.session_series_limit);
    metrics.durable.set_max_series(settings.max_series);
    Ok(metrics)
}

/// Opens the state, binds the listener and starts polling. Errors here are bootstrap errors.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let pat = settings.require_pat()?;
    let metrics = configured_metrics(&settings)?;
    // Read before anything starts: a bad web config is a startup error.
    let web = match &settings.web_config_file {
        Some(p) => crate::web_config::WebConfig::load(p)?,
        None => crate::web_config::WebConfig::default(),
    };
    // Everything that can refuse the start is checked before the state file is touched.
    let poll_cancel = CancellationToken::new();
    let client = Client::new(
        ClientConfig::from_settings(&settings),
        TokenSource::new(pat),
        metrics.process.clone(),
        poll_cancel.clone(),
    )?;
    let listener = tokio::net::TcpListener::bind(settings.listen_address)
        .await
        .with_context(|| format!("--web.listen-address {}", settings.listen_address))?;
    let Core {
        handle,
        stored,
        downstream,
    } = Core::start(&settings, &metrics)?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let poller = Poller::new(
        client,
        handle,
        PollerConfig {
            poll_interval: settings.poll_interval,
            idle_interval: settings.idle_poll_interval.max(settings.poll_interval),
            discovery_interval: settings.discovery_interval,
            sessions: settings.sessions.clone(),
            concurrency: settings.concurrency,
            pat_file: settings.pat_file.clone(),
            shard: settings.shard,
            resync_interval: settings.resync_interval,
            max_sessions: settings.max_sessions,
            ..PollerConfig::default()
        },
        metrics.process.clone(),
        &stored,
        ready_tx,
    );

    let addr = listener.local_addr()?;
    let server_cancel = CancellationToken::new();
    let app = router(
        AppState {
            metrics: metrics.clone(),
            ready: ready_rx.clone(),
            telemetry_path: settings.telemetry_path.clone(),
            api_url: crate::source::client::shown_url(&settings.api_url),
        },
        &web,
    );
    let sc = server_cancel.clone();
    let tls = web.tls.is_some();
    let auth = web.auth.is_some();
    let limits = crate::server::Limits::new(settings.max_connections, &metrics.process);
    let server =
        tokio::spawn(async move { crate::server::serve(listener, app, &web, sc, limits).await });
    tracing::info!(%addr, path = %settings.telemetry_path, api = %crate::source::client::shown_url(&settings.api_url),
        sessions = if settings.sessions.is_empty() { "all (discovery)".to_owned() } else { settings.sessions.join(",") },
        shard = %format!("{}/{}", settings.shard.index, settings.shard.count),
        tls, basic_auth = auth,
        "serving metrics");
    let pc = poll_cancel.clone();
    let poller = tokio::spawn(poller.run(pc));
    Ok(Running {
        addr,
        metrics,
        ready: ready_rx,
        poll_cancel,
        server_cancel,
        poller,
        downstream,
        server,
    })
}

impl Running {
    /// Stops in order and waits; the state file is closed when this returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.poll_cancel.cancel();
        let mut poller = self.poller;
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut poller)
            .await
            .is_err()
        {
            tracing::warn!(
                "polling did not wind down in {DRAIN_TIMEOUT:?}; abandoning in-flight pages (they are read again next start)"
            );
            poller.abort();
        }
        // The poller held the last pipeline handle but the shippers': close what is behind it.
        self.downstream.close().await?;
        tracing::info!("state committed and closed");
        self.server_cancel.cancel();
        self.server
            .await
            .context("server task")?
            .context("server")?;
        Ok(())
    }
}

/// Turns transparent huge pages off for this process, first thing in `main`. Where the kernel
/// backs every aligned 2 MiB of the allocator's arenas with a huge page (`enabled=always`, the
/// default of many distributions), memory freed inside them stays resident: 10 000 idle
/// sessions held 105–112 MB with them and 87 MB without, a replay's peak 203 MB and 156 MB, in
/// the same time (BENCHMARKS.md). A kernel that refuses changes nothing, so its error is ignored.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// Runs until `shutdown` resolves, then stops gracefully.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(settings).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.stop().await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_once_asked() {
        no_huge_pages();
        // A kernel without the prctl (before 3.15) refuses both calls; it has nothing to undo.
        if let Ok(off) = rustix::thread::transparent_huge_pages_are_disabled() {
            assert!(off, "the process still allows transparent huge pages");
        }
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A span endpoint that never answers takes no time from the final metrics push: they
    /// share the deadline side by side, not one after the other.
    #[tokio::test(start_paused = true)]
    async fn the_final_push_runs_even_when_a_shipper_spends_the_whole_deadline() {
        let dir = tempfile::tempdir().expect("dir");
        let store = StateStore::open(&dir.path().join("s.db")).expect("store");
        let metrics = Metrics::new().expect("metrics");
        let (pipeline, _) = Pipeline::new(store, metrics, None).expect("pipeline");
        let (handle, thread) = pipeline.spawn(4).expect("pipeline thread");
        // A shipper whose round never ends (a silent endpoint): cut at the deadline.
        let spans = Task::spawn("span shipper", |stop| async move {
            let _ = stop.finish(std::future::pending::<()>()).await;
        });
        // The push's last step, as `MetricsPusher::run` has it: a 50 ms export by the deadline.
        let pushed = Arc::new(AtomicBool::new(false));
        let push = Task::spawn("metrics push", {
            let pushed = pushed.clone();
            move |stop| async move {
                stop.requested().await;
                let export = tokio::time::sleep(Duration::from_millis(50));
                if stop.finish(export).await.is_some() {
                    pushed.store(true, Ordering::SeqCst);
                }
            }
        });
        let started = tokio::time::Instant::now();
        Downstream {
            pipeline: thread,
            handle,
            spans: Some(spans),
            logs: None,
            metrics_push: Some(push),
        }
        .close()
        .await
        .expect("close");
        assert!(
            pushed.load(Ordering::SeqCst),
            "the final totals were pushed"
        );
        assert!(started.elapsed() <= FLUSH_TIMEOUT + Duration::from_millis(100));
    }
}
