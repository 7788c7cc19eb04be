//! Shared helpers: starting the simulator and the exporter, reading `/metrics`, comparing it
//! with the totals the simulator wrote.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use qoder_exporter::config::Settings;
use qoder_exporter::secret::Pat;
use qoder_exporter::sim::{ScenarioConfig, Sim, SimConfig, Totals};

pub type Series = BTreeMap<(String, Vec<(String, String)>), f64>;

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub async fn sim(scenario: ScenarioConfig) -> Sim {
    sim_with(SimConfig {
        scenario,
        ..SimConfig::default()
    })
    .await
}

pub async fn sim_with(cfg: SimConfig) -> Sim {
    Sim::start(cfg, loopback()).await.expect("sim starts")
}

/// A simulator whose event list misbehaves as `mode` says, with two sessions whose logs run
/// to several pages (more than 300 events).
pub async fn looping_sim(mode: qoder_exporter::sim::EventsCursor) -> Sim {
    sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 21,
            sessions: 2,
            max_turns: 80,
            sub_agents: false,
            ..ScenarioConfig::default()
        },
        events_cursor: mode,
        ..SimConfig::default()
    })
    .await
}

/// Settings for an in-process exporter against `sim`, fast timings, state at `state`.
pub fn settings(sim: &Sim, state: &Path) -> Settings {
    settings_for(&sim.base_url(), &sim.token(), state)
}

/// Settings for an in-process exporter against the API at `api_url`.
pub fn settings_for(api_url: &str, token: &str, state: &Path) -> Settings {
    Settings {
        api_url: api_url.to_owned(),
        pat: Pat::new(token),
        pat_file: None,
        sessions: Vec::new(),
        poll_interval: Duration::from_millis(100),
        idle_poll_interval: Duration::from_millis(300),
        discovery_interval: Duration::from_millis(300),
        resync_interval: Duration::from_millis(600),
        request_timeout: Duration::from_secs(5),
        max_requests_per_second: None,
        concurrency: 8,
        max_response_bytes: 32 * 1024 * 1024,
        listen_address: loopback(),
        telemetry_path: "/metrics".into(),
        web_config_file: None,
        max_connections: qoder_exporter::config::DEFAULT_MAX_CONNECTIONS,
        max_sessions: qoder_exporter::config::DEFAULT_MAX_SESSIONS,
        state_path: state.to_owned(),
        max_turn_age: Duration::from_secs(6 * 3600),
        log_level: "warn".into(),
        log_format: qoder_exporter::config::LogFormat::Text,
        workspace_id: None,
        credit_price: None,
        session_series_limit: 100,
        max_series: qoder_exporter::config::DEFAULT_MAX_SERIES,
        otlp: None,
        otlp_metrics: None,
        otlp_logs: None,
        shard: Default::default(),
    }
}

pub async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

/// Parses the text format into `(name, sorted labels) -> value`.
pub fn parse(text: &str) -> Series {
    let mut out = Series::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("sample value");
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut pairs = Vec::new();
        for part in split_labels(labels) {
            let (k, v) = part.split_once('=').expect("label pair");
            pairs.push((
                k.to_owned(),
                v.trim_matches('"')
                    .replace("\\\"", "\"")
                    .replace("\\\\", "\\"),
            ));
        }
        pairs.sort();
        out.insert((name.to_owned(), pairs), value);
    }
    out
}

fn split_labels(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut in_quotes, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if in_quotes && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        escaped = false;
    }
    if start < s.len() {
        parts.push(&s[start..]);
    }
    parts
}

pub fn get(series: &Series, name: &str) -> f64 {
    series
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

/// The event-derived families whose every series must match the totals.
const EVENT_FAMILIES: [&str; 17] = [
    "qoder_events_total",
    "qoder_tokens_total",
    "qoder_credits_total",
    "qoder_turns_total",
    "qoder_turn_duration_seconds_count",
    "qoder_model_requests_total",
    "qoder_model_request_errors_total",
    "qoder_model_request_duration_seconds_count",
    "qoder_tool_calls_total",
    "qoder_tool_call_errors_total",
    "qoder_session_errors_total",
    "qoder_session_credits_total",
    "qoder_session_active_seconds_total",
    "qoder_server_tool_uses_total",
    "qoder_thread_turns_total",
    "qoder_threads_created_total",
    "qoder_tool_call_duration_seconds_count",
];

/// Every event-derived series equals the totals, and there is no series the totals lack.
pub fn mismatches(series: &Series, totals: &Totals) -> Vec<String> {
    let mut expected: Series = Series::new();
    for (name, labels, v) in totals.series() {
        expected.insert((name, labels), v);
    }
    let mut problems = Vec::new();
    for (key, want) in &expected {
        let got = series.get(key).copied().unwrap_or(0.0);
        if (got - want).abs() > 1e-6 * want.abs().max(1.0) {
            problems.push(format!("{} {:?}: exporter {got}, log {want}", key.0, key.1));
        }
    }
    for (key, got) in series {
        if EVENT_FAMILIES.contains(&key.0.as_str()) && !expected.contains_key(key) && *got != 0.0 {
            problems.push(format!(
                "{} {:?}: exporter {got}, not in the log",
                key.0, key.1
            ));
        }
    }
    problems
}

/// Scrapes until the events counted reach the log's total (or `timeout`), then, once the
/// exporter has asked the API again (it must still be: discovery, or a session followed),
/// compares.
pub async fn wait_exact(addr: SocketAddr, totals: &Totals, timeout: Duration) -> Series {
    let deadline = Instant::now() + timeout;
    let want = totals.event_count();
    loop {
        let series = parse(&scrape(addr).await);
        let got = get(&series, "qoder_events_total");
        if got >= want || Instant::now() > deadline {
            if got >= want {
                // A batch over the total may still be in flight (it must not be): let the
                // exporter come round to ask the API again before the counts are compared.
                after_more_requests(addr, None, 1, timeout).await;
                // and until what it read has gone through the pipeline's queue.
                assert!(
                    eventually(timeout, async || get(
                        &parse(&scrape(addr).await),
                        "qoder_exporter_pipeline_queue_depth"
                    ) == 0.0)
                    .await,
                    "the pipeline's queue drained"
                );
            }
            let series = parse(&scrape(addr).await);
            let problems = mismatches(&series, totals);
            assert!(
                problems.is_empty(),
                "{} mismatches:\n{}",
                problems.len(),
                problems.join("\n")
            );
            return series;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API requests the exporter at `addr` has sent so far, to `endpoint` (the value of its
/// `endpoint` label) or, with `None`, to every endpoint.
async fn api_requests(addr: SocketAddr, endpoint: Option<&str>) -> f64 {
    parse(&scrape(addr).await)
        .iter()
        .filter(|((name, labels), _)| {
            name == "qoder_exporter_api_requests_total"
                && endpoint.is_none_or(|e| labels.iter().any(|(k, v)| k == "endpoint" && v == e))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Waits until the exporter at `addr` has sent `n` more API requests (to `endpoint` only, when
/// given) than it had when called; fails the test if that takes longer than `timeout`.
///
/// Before asserting that something did *not* happen (a count moved twice, an unchanged session
/// was polled), a test must know the exporter had its chance to do it. A fixed sleep only
/// guesses at that: too short on a loaded CI machine, where the exporter may not have run at
/// all, and time wasted on a fast one. Requests are the exporter's own record of its work, and
/// every run of it has them (the simulator, a fake API, the binary).
pub async fn after_more_requests(
    addr: SocketAddr,
    endpoint: Option<&str>,
    n: u64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let before = api_requests(addr, endpoint).await;
    loop {
        let now = api_requests(addr, endpoint).await;
        if now >= before + n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited {timeout:?} for {n} more API requests ({}) from the exporter; it sent {}",
            endpoint.unwrap_or("any endpoint"),
            now - before
        );
        // Closer than `eventually`: these waits are short, and tests wait on many of them.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `f` until true or the timeout.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Rewrites `path` with `contents`, its mtime at least 2 s past the old one. The exporter
/// notices a changed token file or certificate by a changed mtime; where mtimes have a 1 s
/// granularity, a rewrite within the same second would look unchanged. Setting the stamp
/// makes the change certain without sleeping past the tick.
pub fn rewrite(path: &Path, contents: impl AsRef<[u8]>) {
    let mtime = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let old = mtime(path);
    std::fs::write(path, contents).expect("rewrite");
    let new = mtime(path).max(old + Duration::from_secs(2));
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(new))
        .expect("set mtime");
}

/// Advances the simulator's clock two steps every 25 ms until the whole log is visible: a log
/// that grows while it is read (and while the exporter dies, in the crash tests).
pub fn grow_log(sim: &Sim) -> tokio::task::JoinHandle<()> {
    let sim = sim.clone();
    let last = sim.last_step();
    tokio::spawn(async move {
        let mut step = 0;
        while step < last {
            step = (step + 2).min(last);
            sim.set_clock(step);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

/// The whole log released, the app started on a fresh state against it, and its metrics once
/// they equal the log's totals. The state directory lives as long as the returned guard.
pub async fn run_to_exact(sim: &Sim) -> (tempfile::TempDir, qoder_exporter::app::Running, Series) {
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let running = qoder_exporter::app::start(settings(sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    let series = wait_exact(running.addr, &sim.totals, Duration::from_secs(60)).await;
    (dir, running, series)
}
