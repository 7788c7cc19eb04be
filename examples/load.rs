//! Load harness: the simulated Qoder API in this process, the release binary of the exporter
//! in another (so its CPU and memory are its own), measured from outside.
//!
//!     cargo build --release && cargo run --release --example load -- backfill SESSIONS TURNS CONCURRENCY RPS
//!     cargo run --release --example load -- idle SESSIONS SECONDS
//!
//! `backfill`: time until the exporter has counted the whole log; events/s, requests, CPU
//! seconds, peak RSS. RPS 0 turns the request budget off. Prefix with `taskset -c 0` to hold
//! the exporter and the fake API to one core together, or set `LOAD_PIN=1` to pin only the
//! exporter to CPU 1.
//! `idle`: after the catch-up, CPU share, requests per minute and RSS while every session idles.
//! `active SESSIONS SECONDS`: the log grows one step a second; requests per hour by endpoint.
//! `LOAD_NO_THREADS=1`: no session runs a sub-agent; `LOAD_SDK_LIST=1`: the SDK 0.11 list;
//! `LOAD_EXPORTER=path`: measure that exporter binary instead (e.g. an older commit's).

#![allow(
    clippy::print_stdout,
    reason = "a measuring tool: its result is its output"
)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use qoder_exporter::sim::{ScenarioConfig, Sim, SimConfig};

fn exporter_bin() -> std::path::PathBuf {
    // LOAD_EXPORTER=path: another build (an older commit, for before/after).
    if let Some(p) = std::env::var_os("LOAD_EXPORTER") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("exe");
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("qoder-exporter"))
        .expect("target dir")
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of the process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    // One client for the whole run: building one per scrape loads the CA bundle each time,
    // on the fake API's core.
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The exporter process, killed when the harness is done with it (or bails out).
struct Exporter(Child);

impl Exporter {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `LOAD_PIN=1` holds the exporter to that CPU (`taskset -c 1`), the fake API keeps the rest.
fn spawn(sim: &Sim, port: u16, extra: &[&str], dir: &std::path::Path) -> Exporter {
    let mut cmd = match std::env::var("LOAD_PIN") {
        Ok(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu]).arg(exporter_bin());
            c
        }
        Err(_) => Command::new(exporter_bin()),
    };
    cmd.args(["--qoder.api-url", &sim.base_url()])
        .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
        .arg("--state.path")
        .arg(dir.join("state.db"))
        .args(["--log.level", "warn"])
        .args(extra)
        .env("QODER_PAT", sim.token())
        .stdout(Stdio::null())
        .spawn()
        .map(Exporter)
        .expect("exporter starts")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// Requests per hour since `before`, in all and per endpoint.
fn per_hour(before: &[(&'static str, u64); 6], sim: &Sim, secs: f64) -> String {
    let now = sim.stats().by_endpoint();
    let rate = |n: u64| n as f64 / secs * 3600.0;
    let parts: Vec<String> = now
        .iter()
        .zip(before)
        .map(|((name, n), (_, b))| format!("{name} {:.0}", rate(n - b)))
        .collect();
    let total: u64 = now.iter().zip(before).map(|((_, n), (_, b))| n - b).sum();
    format!("{:.0} ({})", rate(total), parts.join(", "))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| -> u64 { args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d) };
    let mode = args.first().cloned().unwrap_or_else(|| "backfill".into());
    let sessions = usize::try_from(arg(1, 500))?;
    let turns = usize::try_from(arg(2, 20))?;
    let third = if mode == "idle" || mode == "active" {
        arg(2, 60)
    } else {
        arg(3, 64)
    };
    let sim = Sim::start(
        SimConfig {
            scenario: ScenarioConfig {
                seed: 5,
                sessions,
                max_turns: if mode == "idle" { 2 } else { turns },
                stagger: 0,
                hostile: false,
                sub_agents: std::env::var_os("LOAD_NO_THREADS").is_none(),
            },
            // `active`: the log grows one step a second, as sessions work.
            step_interval: (mode == "active").then_some(Duration::from_secs(1)),
            // LOAD_SDK_LIST=1: the SDK 0.11 session list (page tokens, `statuses[]` honoured).
            session_page_tokens: std::env::var_os("LOAD_SDK_LIST").map(|_| 100),
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    if mode != "active" {
        sim.release_all();
    }
    let total = sim.totals.event_count();
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    match mode.as_str() {
        "backfill" => {
            let rps = arg(4, 0).to_string();
            let conc = third.to_string();
            let started = Instant::now();
            let child = spawn(
                &sim,
                port,
                &[
                    "--qoder.concurrency",
                    &conc,
                    "--qoder.max-requests-per-second",
                    &rps,
                    "--qoder.poll-interval",
                    "1s",
                ],
                dir.path(),
            );
            let pid = child.id();
            let mut peak = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peak = peak.max(proc_status(pid, "VmRSS:"));
                if metric(addr, "qoder_events_total").await >= total {
                    break;
                }
                if started.elapsed() > Duration::from_secs(600) {
                    anyhow::bail!("no catch-up in 10 minutes");
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds(pid);
            let reqs = sim.stats().total();
            println!(
                "backfill: {total} events, {sessions} sessions, concurrency {conc}, budget {rps} req/s: {secs:.2} s, {:.0} events/s, {reqs} requests ({:.0}/s), exporter CPU {cpu:.2} s ({:.0} events per CPU-second), peak RSS {} MB",
                total / secs,
                reqs as f64 / secs,
                total / cpu.max(0.01),
                peak / 1024
            );
            drop(child);
        }
        "idle" => {
            let seconds = third;
            let started = Instant::now();
            // Extra exporter flags for the idle run, e.g. LOAD_ARGS="--qoder.max-requests-per-second 0".
            let extra = std::env::var("LOAD_ARGS").unwrap_or_default();
            let extra: Vec<&str> = extra.split_whitespace().collect();
            let child = spawn(&sim, port, &extra, dir.path());
            let pid = child.id();
            while metric(addr, "qoder_events_total").await < total {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if started.elapsed() > Duration::from_secs(900) {
                    anyhow::bail!("no catch-up in 15 minutes");
                }
            }
            let caught_up = started.elapsed().as_secs_f64();
            // A session that had new events is read once more soon after (it may be mid-turn);
            // measure the idle state once those re-reads are done: no event-list request in 5 s.
            loop {
                let before = sim.stats().events_requests.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(5)).await;
                if sim.stats().events_requests.load(Ordering::Relaxed) == before {
                    break;
                }
            }
            let followed = metric(addr, "qoder_sessions").await;
            let (cpu0, req0, t0) = (cpu_seconds(pid), sim.stats().total(), Instant::now());
            let by0 = sim.stats().by_endpoint();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds(pid) - cpu0;
            let reqs = sim.stats().total() - req0;
            println!("idle requests per hour: {}", per_hour(&by0, &sim, secs));
            // /metrics with every session followed: 200 scrapes, one at a time.
            let scraper = reqwest::Client::new();
            let mut times = Vec::new();
            for _ in 0..200 {
                let t = Instant::now();
                let body = scraper
                    .get(format!("http://{addr}/metrics"))
                    .send()
                    .await?
                    .bytes()
                    .await?;
                times.push(t.elapsed());
                std::hint::black_box(body);
            }
            times.sort();
            println!(
                "/metrics with {followed} sessions: p50 {:?}, p99 {:?}, max {:?}",
                times[100], times[197], times[199]
            );
            let events = sim.stats().events_requests.load(Ordering::Relaxed);
            println!(
                "idle: {sessions} sessions ({followed} followed), caught up in {caught_up:.1} s; over {secs:.0} s idle: CPU {:.2} % of a core, {:.0} requests/min, RSS {} MB (peak {} MB); event-list requests in all: {events}",
                cpu / secs * 100.0,
                reqs as f64 / secs * 60.0,
                proc_status(pid, "VmRSS:") / 1024,
                proc_status(pid, "VmHWM:") / 1024
            );
            drop(child);
        }
        "active" => {
            let seconds = third;
            let extra = std::env::var("LOAD_ARGS").unwrap_or_default();
            let extra: Vec<&str> = extra.split_whitespace().collect();
            let child = spawn(&sim, port, &extra, dir.path());
            let by0 = sim.stats().by_endpoint();
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let secs = t0.elapsed().as_secs_f64();
            let counted = metric(addr, "qoder_events_total").await;
            let running = metric(addr, "qoder_sessions{status=\"running\"}").await
                + metric(addr, "qoder_sessions{status=\"processing\"}").await;
            println!(
                "active: {sessions} sessions growing one step a second, {counted} events counted in {secs:.0} s, {running} running at the end; requests per hour: {}",
                per_hour(&by0, &sim, secs)
            );
            drop(child);
        }
        other => anyhow::bail!("unknown mode {other}: backfill, idle or active"),
    }
    sim.stop();
    Ok(())
}
