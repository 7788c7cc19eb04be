//! Dashboards, rules and deploy files, checked against the real exporter and a real Prometheus
//! (Debian's package, started on loopback): every panel expression and recording rule returns
//! data, every rule evaluates cleanly, every metric they name exists in `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use qoder_exporter::app;
use qoder_exporter::config::{OtlpGeneral, OtlpLogsSettings, OtlpMetricsSettings, OtlpSignalFlags};
use qoder_exporter::sim::{Fault, ScenarioConfig, SimConfig};
use serde_json::Value;

use crate::common::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("dashboards")).expect("dashboards/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
                .expect("dashboard JSON parses");
            out.push((
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                v,
            ));
        }
    }
    assert!(out.len() >= 2, "both dashboards present");
    out
}

fn panels(board: &Value) -> Vec<&Value> {
    board["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// Grafana's variables replaced by what a query over everything would use.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "2m")
        .replace("$job", ".*")
        .replace("$agent", ".*")
}

/// Metric names (not recording rules, which contain ':') an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("qoder_") && !t.contains(':'))
        .map(|t| {
            let t = t
                .strip_suffix("_bucket")
                .or_else(|| t.strip_suffix("_count"))
                .or_else(|| t.strip_suffix("_sum"))
                .unwrap_or(t);
            t.to_owned()
        })
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn dashboards_follow_the_house_rules() {
    for (name, board) in dashboards() {
        assert!(
            board["uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("qoder-")),
            "{name}: fixed uid"
        );
        let vars: Vec<&str> = board["templating"]["list"]
            .as_array()
            .expect("vars")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(
            vars.contains(&"datasource") && vars.contains(&"job"),
            "{name}: datasource and job variables: {vars:?}"
        );
        for p in panels(&board) {
            let title = p["title"].as_str().unwrap_or("?");
            assert!(
                p["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()),
                "{name}/{title}: unit"
            );
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                if expr.contains("rate(") {
                    assert!(
                        expr.contains("[$__rate_interval]"),
                        "{name}/{title}: rate over $__rate_interval: {expr}"
                    );
                }
                assert!(
                    expr.contains("$job"),
                    "{name}/{title}: filtered by $job: {expr}"
                );
                // A panel broken down by agent, model, tool or error type links to the traces of it.
                let legend = t["legendFormat"].as_str().unwrap_or("");
                let links = p["fieldConfig"]["defaults"]["links"].to_string();
                for label in ["model", "tool", "error_type"] {
                    if legend.contains(&format!("{{{{{label}}}}}")) {
                        assert!(
                            links.contains(&format!("__field.labels.{label}")),
                            "{name}/{title}: trace link by {label}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn generated_files_are_current_and_rules_pass_promtool() {
    run(Command::new("python3")
        .arg(root().join("dashboards/generate.py"))
        .arg("--check"));
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/rules.yml")));
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(root().join("tests/rules/alerts_test.yml")));
}

#[test]
fn deploy_files_parse_and_name_real_flags() {
    run(Command::new("python3")
        .arg(root().join("deploy/check.py"))
        .arg(env!("CARGO_BIN_EXE_qoder-exporter")));
}

/// The image builds from `deploy/Dockerfile` (no Docker daemon here: the check reads the
/// Dockerfile, `.dockerignore` and `Cargo.toml` and fails when a path cargo needs is not copied).
#[test]
fn docker_build_context_has_what_cargo_reads() {
    run(Command::new("python3").arg(root().join("deploy/check_docker_context.py")));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// An OTLP/HTTP endpoint on loopback that accepts every metrics and logs push (200 with an
/// empty body, which reads as an export response without a partial success). Stops on drop.
struct OtlpSink {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn otlp_sink() -> OtlpSink {
    let accept = axum::routing::post(async || axum::http::StatusCode::OK);
    let app = axum::Router::new()
        .route("/v1/metrics", accept.clone())
        .route("/v1/logs", accept);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    OtlpSink { addr, task }
}

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(client: &reqwest::Client, base: &str, expr: &str) -> Value {
    let v: Value = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v
}

/// A real Prometheus (Debian's package) with the shipped rules, scraping `target` every second
/// and evaluating every second. Returns it (killed on drop) and its base URL.
fn start_prometheus(dir: &Path, target: std::net::SocketAddr) -> (Prometheus, String) {
    start_prometheus_with(dir, target, &[])
}

/// [`start_prometheus`] with extra command-line flags (`--enable-feature=…`).
fn start_prometheus_with(
    dir: &Path,
    target: std::net::SocketAddr,
    flags: &[&str],
) -> (Prometheus, String) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: qoder-exporter\n    static_configs:\n      - targets: ['{target}']\n",
            rules = root().join("deploy/prometheus/rules.yml").display(),
        ),
    )
    .expect("config");
    let port = free_port();
    let prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (.ci/run installs Debian's prometheus package)"),
    );
    (prom, format!("http://127.0.0.1:{port}"))
}

/// The number of scrapes of the exporter Prometheus has made in the last minute.
async fn scrapes(client: &reqwest::Client, base: &str) -> f64 {
    let Ok(r) = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", "count_over_time(up{job=\"qoder-exporter\"}[1m])")])
        .send()
        .await
    else {
        return 0.0;
    };
    r.json::<Value>()
        .await
        .ok()
        .and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(0.0)
}

/// The scrapes of the exporter that failed (`up` 0) in the last minute.
async fn failed_scrapes(client: &reqwest::Client, base: &str) -> f64 {
    let v = query(
        client,
        base,
        concat!(
            "count_over_time(up{job=\"qoder-exporter\"}[1m])",
            " - sum_over_time(up{job=\"qoder-exporter\"}[1m])"
        ),
    )
    .await;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// How many evaluations of each rule group Prometheus has started, from its own `/metrics`.
async fn rule_evaluations(client: &reqwest::Client, base: &str) -> BTreeMap<String, f64> {
    let Ok(r) = client.get(format!("{base}/metrics")).send().await else {
        return BTreeMap::new();
    };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("prometheus_rule_group_iterations_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Alerts of these names that are pending or firing now.
async fn active_alerts(client: &reqwest::Client, base: &str, names: &[&str]) -> Vec<Value> {
    let v = query(client, base, "ALERTS").await;
    v["data"]["result"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| names.contains(&r["metric"]["alertname"].as_str().unwrap_or_default()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The alerts that say "it happened" page on the first occurrence of a new series (born at
/// 1) and never for counts that come back unchanged: not on Prometheus' first scrape of an
/// exporter with history, not after the exporter restarts, not after an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_exhausted_error_pages_and_a_restart_pages_nothing() {
    const PAGE: [&str; 2] = ["QoderSessionRetriesExhausted", "QoderSessionTerminalErrors"];
    let sim = sim(ScenarioConfig {
        seed: 31,
        sessions: 24,
        max_turns: 5,
        ..ScenarioConfig::default()
    })
    .await;
    // The first `exhausted` error of the log: everything before it is history.
    let first = sim
        .sessions()
        .iter()
        .flat_map(|s| &s.events)
        .filter(|e| e.json.contains("\"exhausted\""))
        .map(|e| e.step)
        .min()
        .expect("the log has an exhausted error");
    assert!(first > 0);
    sim.set_clock(first - 1);
    let dir = tempfile::tempdir().expect("dir");
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.listen_address = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let addr = s.listen_address;
    let exhausted_seen = async || scrape(addr).await.contains("retry_status=\"exhausted\"");
    // History read before Prometheus ever looks.
    let running = app::start(s.clone()).await.expect("start");
    assert!(
        eventually(Duration::from_secs(20), async || {
            get(
                &parse(&scrape(addr).await),
                "qoder_exporter_last_successful_poll_timestamp_seconds",
            ) > 0.0
        })
        .await
    );
    // The history read on (about one more poll a session) before looking for the error.
    after_more_requests(addr, Some("events"), 24, Duration::from_secs(20)).await;
    assert!(
        !exhausted_seen().await,
        "no exhausted error before its step"
    );
    running.stop().await.expect("stop");

    let (_prom, base) = start_prometheus(dir.path(), addr);
    let client = reqwest::Client::new();
    // A restart: Prometheus' first scrapes show the stored counts beside build_info.
    let running = app::start(s.clone()).await.expect("restart");
    assert!(
        eventually(Duration::from_secs(30), async || scrapes(&client, &base)
            .await
            >= 5.0)
        .await
    );
    let after_restart = active_alerts(&client, &base, &PAGE).await;
    assert!(
        after_restart.is_empty(),
        "a restart paged: {after_restart:?}"
    );
    // An outage of a few scrapes (three that Prometheus saw fail), then the same counts again.
    running.stop().await.expect("stop");
    let failed = failed_scrapes(&client, &base).await;
    let outage = eventually(Duration::from_secs(30), async || {
        failed_scrapes(&client, &base).await >= failed + 3.0
    })
    .await;
    assert!(
        outage,
        "Prometheus saw three failed scrapes of the stopped exporter"
    );
    let running = app::start(s).await.expect("back");
    let before = scrapes(&client, &base).await;
    assert!(
        eventually(Duration::from_secs(30), async || scrapes(&client, &base)
            .await
            >= before + 4.0)
        .await
    );
    let after_outage = active_alerts(&client, &base, &PAGE).await;
    assert!(after_outage.is_empty(), "an outage paged: {after_outage:?}");

    // The first exhausted error: its series is born at 1, and the alert fires at once.
    sim.release_all();
    assert!(eventually(Duration::from_secs(30), exhausted_seen).await);
    let fired = eventually(Duration::from_secs(10), async || {
        active_alerts(&client, &base, &["QoderSessionRetriesExhausted"])
            .await
            .iter()
            .any(|a| a["metric"]["alertstate"] == "firing")
    })
    .await;
    assert!(fired, "the first exhausted error did not page");
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_finds_data_for_every_panel_and_rule() {
    // A few 503s, so the failure panels have something to show.
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 31,
            sessions: 24,
            stagger: 2,
            max_turns: 5,
            ..ScenarioConfig::default()
        },
        fault_rate: 0.05,
        faults: vec![Fault::Status503],
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    // Priced, so the money panels and rules have data.
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.credit_price = Some(qoder_exporter::config::CreditPrice {
        price: 0.01,
        currency: "USD".into(),
    });
    // Metrics and logs over OTLP on, as OTEL_METRICS_EXPORTER=otlp, OTEL_LOGS_EXPORTER=otlp and
    // OTEL_EXPORTER_OTLP_ENDPOINT set them: the values those variables carry, through the same
    // resolution (set on this process, the variables would reach every test in it and every
    // exporter they spawn). Traces stay off, as before. Metrics are pushed every 500 ms
    // (OTEL_METRIC_EXPORT_INTERVAL=500). The endpoint accepts everything, so the delivery panels
    // show data points and records going out, not only zeros, and the last-success gauge exists.
    let otlp = otlp_sink().await;
    let endpoint = format!("http://{}", otlp.addr);
    let general = OtlpGeneral {
        endpoint: Some(&endpoint),
        protocol: None,
    };
    let mut signals = OtlpSignalFlags {
        metrics_exporter: Some("otlp".into()),
        metrics_interval: Some(Duration::from_millis(500)),
        logs_exporter: Some("otlp".into()),
        ..OtlpSignalFlags::default()
    };
    s.otlp_metrics = OtlpMetricsSettings::resolve(&mut signals, Default::default(), general)
        .expect("metrics over OTLP");
    s.otlp_logs = OtlpLogsSettings::resolve(&mut signals, Default::default(), general)
        .expect("logs over OTLP");
    assert!(
        s.otlp_metrics.is_some() && s.otlp_logs.is_some(),
        "both signals on"
    );
    let running = app::start(s).await.expect("start");

    let (_prom, base) = start_prometheus(dir.path(), running.addr);
    let client = reqwest::Client::new();
    // The log grows while Prometheus scrapes, so rates are not all zero.
    let last = sim.last_step();
    for step in (0..=last).step_by((last / 40).max(1) as usize) {
        sim.set_clock(step);
        // A real pause: Prometheus scrapes on its own 1 s timer, and the growth must span
        // several of its scrapes for the rates to be non-zero.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    sim.release_all();
    assert!(
        eventually(Duration::from_secs(30), async || {
            match client
                .get(format!("{base}/api/v1/query"))
                .query(&[("query", "count_over_time(up{job=\"qoder-exporter\"}[1m])")])
                .send()
                .await
            {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| {
                        v["data"]["result"][0]["value"][1]
                            .as_str()
                            .map(|s| s.parse::<f64>().unwrap_or(0.0) >= 4.0)
                    })
                    .unwrap_or(false),
                Err(_) => false,
            }
        })
        .await,
        "prometheus scrapes the exporter"
    );
    // Every rule group evaluated again on what was scraped (a group counts an evaluation as
    // it starts, so two more means one has finished).
    let before = rule_evaluations(&client, &base).await;
    let evaluated = eventually(Duration::from_secs(30), async || {
        let now = rule_evaluations(&client, &base).await;
        !now.is_empty()
            && now
                .iter()
                .all(|(g, n)| *n >= before.get(g).copied().unwrap_or(0.0) + 2.0)
    })
    .await;
    assert!(
        evaluated,
        "Prometheus evaluated every rule group twice more"
    );

    let exposed: BTreeSet<String> = scrape(running.addr)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();

    let mut names = BTreeSet::new();
    for (name, board) in dashboards() {
        for p in panels(&board) {
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                names.extend(metric_names(expr));
                let v = query(&client, &base, &concrete(expr)).await;
                let n = v["data"]["result"].as_array().map_or(0, Vec::len);
                assert!(n > 0, "{name}/{}: no data for {expr}", p["title"]);
            }
        }
    }
    let rules: Value = client
        .get(format!("{base}/api/v1/rules"))
        .send()
        .await
        .expect("rules")
        .json()
        .await
        .expect("json");
    let groups = rules["data"]["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "both rule groups loaded");
    let mut evaluated = 0;
    for g in groups {
        for r in g["rules"].as_array().expect("rules") {
            let expr = r["query"].as_str().expect("query");
            names.extend(metric_names(expr));
            assert_eq!(
                r["health"], "ok",
                "rule {} does not evaluate: {r}",
                r["name"]
            );
            evaluated += 1;
            if r["type"] == "alerting" {
                let name = r["name"].as_str().expect("name");
                assert!(name.starts_with("Qoder"), "{name}: common prefix");
                assert!(
                    ["critical", "warning", "info"]
                        .contains(&r["labels"]["severity"].as_str().unwrap_or("")),
                    "{name}: severity"
                );
                for key in ["summary", "description", "runbook_url"] {
                    assert!(
                        r["annotations"][key]
                            .as_str()
                            .is_some_and(|s| !s.is_empty()),
                        "{name}: {key}"
                    );
                }
                let runbooks =
                    std::fs::read_to_string(root().join("docs/runbooks.md")).expect("runbooks");
                let anchor = r["annotations"]["runbook_url"]
                    .as_str()
                    .and_then(|u| u.split('#').nth(1))
                    .unwrap_or("");
                assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
                assert!(
                    runbooks.contains(&format!("\n## {name}\n")),
                    "{name}: a section in docs/runbooks.md"
                );
            }
            if r["type"] == "recording" {
                let record = r["name"].as_str().expect("name");
                let v = query(&client, &base, record).await;
                assert!(
                    v["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty()),
                    "recording rule {record} has no data"
                );
            }
        }
    }
    assert!(evaluated >= 15, "{evaluated} rules");
    let missing: Vec<_> = names.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "dashboards or rules use metrics the exporter does not expose: {missing:?}"
    );
    running.stop().await.expect("stop");
}

#[test]
fn metric_names_are_extracted_without_recording_rules() {
    let got = metric_names(
        "sum(rate(qoder_tokens_total[5m])) / job_agent:qoder_turns:rate5m + qoder_x_bucket",
    );
    assert_eq!(
        got,
        BTreeSet::from(["qoder_tokens_total".to_owned(), "qoder_x".to_owned()])
    );
    assert!(Path::new(&root()).join("docs/runbooks.md").exists());
}

/// Exemplars end to end: Prometheus negotiates OpenMetrics, stores the exemplars of turns and
/// model requests, and each points at a trace the exporter exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_stores_exemplars_that_point_at_exported_traces() {
    let sim = sim(ScenarioConfig {
        seed: 32,
        sessions: 6,
        stagger: 0,
        max_turns: 3,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let spans = crate::otlp::http_receiver().await;
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.otlp = qoder_exporter::config::OtlpSettings::resolve(
        Some(format!("http://{}", spans.addr)),
        None,
        None,
        false,
        None,
        None,
    )
    .expect("traces on");
    let running = app::start(s).await.expect("start");
    wait_exact(running.addr, &sim.totals, Duration::from_secs(60)).await;
    let (_prom, base) = start_prometheus_with(
        dir.path(),
        running.addr,
        &["--enable-feature=exemplar-storage"],
    );
    let client = reqwest::Client::new();
    let exemplars = async |metric: &str| -> Vec<String> {
        let Ok(r) = client
            .get(format!("{base}/api/v1/query_exemplars"))
            .query(&[
                ("query", metric),
                ("start", "1000000000"),
                ("end", "4000000000"),
            ])
            .send()
            .await
        else {
            return Vec::new();
        };
        let v: Value = r.json().await.unwrap_or_default();
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|series| series["exemplars"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["labels"]["trace_id"].as_str().map(str::to_owned))
            .collect()
    };
    let mut found = BTreeMap::new();
    for metric in [
        "qoder_model_requests_total",
        "qoder_turns_total",
        "qoder_turn_duration_seconds_bucket",
        "qoder_model_request_duration_seconds_bucket",
    ] {
        let mut ids = Vec::new();
        assert!(
            eventually(Duration::from_secs(30), async || {
                ids = exemplars(metric).await;
                !ids.is_empty()
            })
            .await,
            "Prometheus stored exemplars of {metric}"
        );
        found.insert(metric, ids);
    }
    // Every exemplar's trace was exported as spans (the spans go out when their turn closes).
    assert!(
        eventually(Duration::from_secs(30), async || !spans
            .received
            .span_ids()
            .is_empty())
        .await,
        "spans exported"
    );
    let traces: BTreeSet<String> = spans
        .received
        .span_ids()
        .into_iter()
        .map(|(t, _)| t.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    for (metric, ids) in &found {
        for id in ids {
            assert!(
                traces.contains(id),
                "{metric}: exemplar trace {id} was not exported"
            );
        }
    }
    running.stop().await.expect("stop");
}
