//! The real binary, run as a user runs it: `kill -9` at random moments, SIGTERM, `promtool
//! check metrics`, the golden `/metrics`, and the errors that stop it at startup.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qoder_exporter::sim::{ScenarioConfig, Sim, Totals};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_qoder-exporter");

/// A running exporter process with its stderr collected.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Sends SIGTERM and waits for a clean exit, at most 15 s; returns how long it took.
    pub fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "still running 15 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            exit.success(),
            "exit status {exit:?}; log: {:?}",
            self.log.lock().expect("log")
        );
        started.elapsed()
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

/// A test that fails half-way must not leave an exporter running.
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(sim: &Sim, state: &Path, extra: &[&str]) -> Proc {
    spawn_with_env(sim, state, extra, &[])
}

/// Starts the binary against `sim` with extra flags and environment variables.
pub fn spawn_with_env(sim: &Sim, state: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(BIN)
        .args([
            "--qoder.api-url",
            &sim.base_url(),
            "--web.listen-address",
            "127.0.0.1:0",
            "--state.path",
            state.to_str().expect("utf8 path"),
            "--qoder.poll-interval",
            "100ms",
            "--qoder.idle-poll-interval",
            "300ms",
            "--qoder.discovery-interval",
            "300ms",
            "--qoder.resync-interval",
            "1s",
            "--qoder.max-requests-per-second",
            "0",
        ])
        .args(extra)
        .env("QODER_PAT", sim.token())
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .env_remove("OTEL_METRICS_EXPORTER")
        .env_remove("OTEL_LOGS_EXPORTER")
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                let _ = tx.send(addr);
            }
            l.lock().expect("log").push(line);
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(a) => a.parse().expect("addr"),
        Err(_) => {
            let _ = child.kill();
            panic!("exporter did not start: {:?}", log.lock().expect("log"));
        }
    };
    Proc { child, addr, log }
}

/// `/metrics` of the binary after it has counted the whole (released) log exactly.
async fn settled_metrics(scenario: ScenarioConfig) -> String {
    let sim = sim(scenario).await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let p = spawn(&sim, &dir.path().join("state.db"), &[]);
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    let text = scrape(p.addr).await;
    drop(p);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_doubles_nothing() {
    let sim = sim(ScenarioConfig {
        seed: 21,
        sessions: 15,
        stagger: 3,
        max_turns: 5,
        ..ScenarioConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state.db");
    // The log grows while it is read and while the exporter dies.
    let grower = grow_log(&sim);
    let mut rng = fastrand::Rng::with_seed(5);
    for round in 0..4 {
        let mut p = spawn(&sim, &state, &[]);
        tokio::time::sleep(Duration::from_millis(rng.u64(200..900))).await;
        let counted = get(&parse(&scrape(p.addr).await), "qoder_events_total");
        p.child.kill().expect("kill -9");
        p.child.wait().expect("reaped");
        eprintln!("round {round}: killed with {counted} events counted");
    }
    grower.await.expect("grower");
    sim.release_all();
    let p = spawn(&sim, &state, &[]);
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_and_exits_promptly() {
    let sim = sim(ScenarioConfig {
        seed: 22,
        sessions: 6,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state.db");
    let mut p = spawn(&sim, &state, &[]);
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    p.terminate();
    let log = p.log();
    assert!(log.contains("state committed and closed"), "{log}");
    // The lock is released: a new run on the same file starts and shows the same totals.
    let again = spawn(&sim, &state, &[]);
    wait_exact(again.addr, &sim.totals, Duration::from_secs(30)).await;
}

/// The exposition passes `promtool check metrics` (Prometheus' own linter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let text = settled_metrics(ScenarioConfig {
        seed: 23,
        sessions: 9,
        hostile: true,
        ..ScenarioConfig::default()
    })
    .await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (.ci/run installs Debian's prometheus package)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The event-derived part of `/metrics` for a fixed scenario, against
/// `tests/golden/metrics.txt`. Refresh with `UPDATE_GOLDEN=1 cargo nextest run golden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics() {
    let text = settled_metrics(ScenarioConfig {
        seed: 2026,
        sessions: 6,
        max_turns: 3,
        ..ScenarioConfig::default()
    })
    .await;
    // Only what the event log decides: process series (latencies, timestamps) vary by run.
    let mut golden = String::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            keep = name.starts_with("qoder_")
                && !name.starts_with("qoder_exporter_")
                && !matches!(name, "qoder_up" | "qoder_sessions");
        }
        if keep {
            golden.push_str(line);
            golden.push('\n');
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/metrics.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &golden).expect("write golden");
        return;
    }
    let want =
        std::fs::read_to_string(&path).expect("golden file (create it with UPDATE_GOLDEN=1)");
    if want != golden {
        let diff: Vec<String> = want
            .lines()
            .zip(golden.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "/metrics differs from tests/golden/metrics.txt (UPDATE_GOLDEN=1 to accept):\n{}",
            diff.join("\n")
        );
    }
}

fn run_to_exit(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("QODER_PAT")
        .env_remove("QODER_PERSONAL_ACCESS_TOKEN");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn startup_errors_are_clear_and_touch_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let (code, err) = run_to_exit(&["--qoder.poll-interval", "fast"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--qoder.poll-interval"), "{err}");

    let state = dir.path().join("state.db");
    let s = state.to_str().expect("utf8");
    let (code, err) = run_to_exit(
        &["--state.path", s, "--web.listen-address", "127.0.0.1:0"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("QODER_PAT") && err.contains("demo"), "{err}");

    std::fs::write(
        &state,
        b"definitely not sqlite, just some bytes that fill a header page",
    )
    .expect("write");
    let before = std::fs::read(&state).expect("read");
    let (code, err) = run_to_exit(
        &["--state.path", s, "--web.listen-address", "127.0.0.1:0"],
        &[("QODER_PAT", "pt-x")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("corrupt or not an SQLite database"), "{err}");
    assert_eq!(
        std::fs::read(&state).expect("read"),
        before,
        "a bad state file is never overwritten"
    );
}

#[test]
fn values_are_checked_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state.db");
    let s = state.to_str().expect("utf8");
    // A log level that would silently turn every line off.
    for level in ["verbose", "warning", "trace"] {
        let (code, err) = run_to_exit(
            &["--state.path", s, "--log.level", level],
            &[("QODER_PAT", "pt-x")],
        );
        assert_eq!(code, 2, "{level}: {err}");
        assert!(
            err.contains("must be one of debug, info, warn, error"),
            "{err}"
        );
    }
    let (code, err) = run_to_exit(
        &["--state.path", s, "--log.format", "xml"],
        &[("QODER_PAT", "pt-x")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("must be one of text, logfmt, json"), "{err}");
    let (code, err) = run_to_exit(&["replay", "--batch-size", "0", "-"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--batch-size"), "{err}");
    // Refusals found only when the run starts: a port taken, a file missing, a bad web config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let (code, err) = run_to_exit(
        &["--state.path", s, "--web.listen-address", &taken],
        &[("QODER_PAT", "pt-x")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--web.listen-address"), "{err}");
    let missing = dir.path().join("missing.jsonl");
    let (code, err) = run_to_exit(
        &["replay", "--state.path", s, missing.to_str().expect("utf8")],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing.jsonl"), "{err}");
    let (code, err) = run_to_exit(
        &[
            "replay",
            "--serve",
            "--state.path",
            s,
            "--web.listen-address",
            &taken,
            "-",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--web.listen-address"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "nothing created for a refused run"
    );
}

#[test]
fn a_missing_state_directory_is_made_or_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    // Its parent exists: made.
    let made = dir.path().join("state");
    let out = Command::new(BIN)
        .args(["replay", "-", "--state.path"])
        .arg(made.join("s.db"))
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(made.join("s.db").exists());
    // Two levels missing: refused, said once, nothing created.
    let deep = dir.path().join("a/b/s.db");
    let (code, err) = run_to_exit(
        &[
            "--state.path",
            deep.to_str().expect("utf8"),
            "--web.listen-address",
            "127.0.0.1:0",
        ],
        &[("QODER_PAT", "pt-x")],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");
    assert!(!dir.path().join("a").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_with_a_rejected_token_leaves_no_file() {
    let sim = sim(ScenarioConfig::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("log.jsonl");
    let out = Command::new(BIN)
        .args(["dump", "--qoder.api-url", &sim.base_url(), "--output"])
        .arg(&file)
        .env("QODER_PAT", "pt-wrong-token")
        .output()
        .expect("dump runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "no output and no temporary file left: {:?}",
        std::fs::read_dir(dir.path()).map(|d| d.count())
    );
}

/// `dump` of everything `sim` holds, to `file` (`--output`) or to stdout (returned).
fn dump_to(sim: &Sim, file: Option<&Path>) -> Vec<u8> {
    let mut cmd = Command::new(BIN);
    cmd.args(["dump", "--qoder.api-url", &sim.base_url()])
        .args(["--qoder.max-requests-per-second", "0"])
        .env("QODER_PAT", sim.token());
    if let Some(f) = file {
        cmd.arg("--output").arg(f);
    }
    let out = cmd.output().expect("dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A dump replayed into the state a live run left counts nothing twice: sessions the live run
/// drained and finished are skipped whole (their events, objects and thread lists), the way
/// live polling never reads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_replayed_into_a_live_state_counts_nothing_twice() {
    // A log where a terminated session's object carries a usage snapshot: replayed into a
    // fresh tracker, as a finished session was before, it would count its credits again.
    let config = (24..)
        .map(|seed| ScenarioConfig {
            seed,
            sessions: 12,
            ..ScenarioConfig::default()
        })
        .find(|c| {
            qoder_exporter::sim::generate(c)
                .0
                .iter()
                .any(|s| s.terminal && !s.usage.is_empty())
        })
        .expect("a seed");
    let sim = sim(config).await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("s.db");
    let mut p = spawn(&sim, &state, &[]);
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    // Until the terminated sessions are drained and marked finished.
    let terminal = sim.sessions().iter().filter(|s| s.terminal).count();
    assert!(terminal > 0);
    assert!(
        eventually(Duration::from_secs(30), async || get(
            &parse(&scrape(p.addr).await),
            "qoder_sessions"
        ) == (12 - terminal)
            as f64)
        .await,
        "terminated sessions are finished"
    );
    p.terminate();
    let store = qoder_exporter::state::StateStore::open(&state).expect("state");
    let stored = store
        .load_sessions::<serde_json::Value>()
        .expect("sessions");
    assert!(stored.iter().any(|s| s.finished), "a finished session");
    drop(store);
    let file = dir.path().join("log.jsonl");
    dump_to(&sim, Some(&file));
    let out = replay_into(&state, &[&file]).expect("replay");
    let problems = mismatches(&parse(&out), &sim.totals);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A sub-agent thread's event that only the session's stream shows is held until the thread's
/// own stream is read to its end, then counted. A thread whose lines all went to the pipeline
/// before the input ended (a long run, or full batches) still gets that end.
#[test]
fn a_thread_sent_before_the_end_still_counts_what_only_the_session_showed() {
    let mut log = vec![
        r#"{"id":"c1","type":"session.thread_created","session_id":"s1","session_thread_id":"t1","agent_name":"sub"}"#.to_owned(),
        // Shown by the session's stream only: held, counted at the thread's end.
        r#"{"id":"x1","type":"agent.tool_use","name":"Read","session_id":"s1","session_thread_id":"t1"}"#.to_owned(),
    ];
    log.extend((0..200).map(|i| {
        format!(
            r#"{{"id":"t1-{i}","type":"agent.tool_use","name":"Grep","session_id":"s1","session_thread_id":"t1","qoder_exporter_stream":"t1"}}"#
        )
    }));
    // Another session after it: the thread's run is sent when these lines begin.
    log.push(r#"{"id":"y1","type":"user.message","session_id":"s2"}"#.to_owned());
    let input = log.join("\n") + "\n";
    for args in [&[][..], &["--batch-size", "50"][..]] {
        let out = replay_from_stdin(args, input.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let metrics = String::from_utf8_lossy(&out.stdout);
        for line in [
            r#"qoder_tool_calls_total{agent="sub",tool="Read"} 1"#,
            r#"qoder_tool_calls_total{agent="sub",tool="Grep"} 200"#,
            r#"qoder_events_total{agent="sub",event_type="agent.tool_use"} 201"#,
        ] {
            assert!(metrics.contains(line), "{args:?}: no {line} in\n{metrics}");
        }
    }
}

/// `replay - ARGS…` with `input` on its standard input.
fn replay_from_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["replay", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("replay runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("feed");
    }
    child.wait_with_output().expect("replay ends")
}

/// A replay that succeeded and printed metrics equal to the log's totals.
fn assert_replayed_exactly(out: &std::process::Output, totals: &Totals, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let series = parse(std::str::from_utf8(&out.stdout).expect("utf8"));
    let problems = mismatches(&series, totals);
    assert!(problems.is_empty(), "{what}: {}", problems.join("\n"));
}

#[test]
fn help_reads_well() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--qoder.api-url",
        "--qoder.pat-file",
        "--qoder.session",
        "--qoder.poll-interval",
        "--web.listen-address",
        "--web.telemetry-path",
        "--state.path",
        "--config.file",
        "demo",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// `dump` writes the API's log as JSON Lines; `replay` of that file (and of stdin) prints
/// metrics equal to the log's totals; bad lines are counted, not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_then_replay_reproduces_the_totals() {
    let sim = sim(ScenarioConfig {
        seed: 23,
        sessions: 9,
        hostile: true,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("log.jsonl");
    dump_to(&sim, Some(&file));
    let text = std::fs::read_to_string(&file).expect("dump file");
    // To a path that is not a regular file: written as it is (nothing to rename).
    let out = Command::new(BIN)
        .args(["dump", "--qoder.api-url", &sim.base_url()])
        .args([
            "--qoder.max-requests-per-second",
            "0",
            "--output",
            "/dev/stdout",
        ])
        .env("QODER_PAT", sim.token())
        .output()
        .expect("dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        text,
        "--output /dev/stdout"
    );
    let sessions = text
        .lines()
        .filter(|l| l.contains("\"type\":\"session\""))
        .count();
    assert_eq!(sessions, 9, "one session line per session");
    // An agent named by id alone gets its object written once; a coordinator its thread list.
    let id_only = sim
        .sessions()
        .iter()
        .filter_map(|s| s.object.get("agent_id").and_then(|a| a.as_str()))
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert!(id_only > 0);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.iter().filter(|v| v["type"] == "agent").count(),
        id_only
    );
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "session_thread" && v["parent_thread_id"] == "sthr_main"),
        "a coordinator's thread list"
    );
    assert!(
        !text.contains(&sim.token()),
        "the token never reaches the output"
    );

    // From the file, with junk lines mixed in.
    let mut with_junk = text.clone();
    with_junk.push_str("not json\n{\"id\":\"evt_x\",\"type\":\"agent.message\"}\n\n");
    let junk_file = dir.path().join("junk.jsonl");
    std::fs::write(&junk_file, with_junk).expect("write");
    let out = Command::new(BIN)
        .args(["replay"])
        .arg(&junk_file)
        .output()
        .expect("replay runs");
    // Invalid lines are reported by file and line, and fail the run (the metrics are still
    // printed: everything readable was counted).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let junk_line = text.lines().count() + 1;
    assert!(
        stderr.contains(&format!("{}:{junk_line}: not_object", junk_file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-invalid"), "{stderr}");
    let series = parse(&String::from_utf8(out.stdout).expect("utf8"));
    let problems = mismatches(&series, &sim.totals);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(stderr.contains("replayed"), "{stderr}");
    // The simulator's own unreadable events plus the two junk lines.
    assert_eq!(
        get(&series, "qoder_exporter_events_invalid_total"),
        sim.totals.invalid as f64 + 2.0,
        "{stderr}"
    );

    // Gzip is read by content, whatever the file's name.
    let gz = dir.path().join("log.backup");
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).expect("create"),
            flate2::Compression::fast(),
        );
        e.write_all(text.as_bytes()).expect("gzip");
        e.finish().expect("gzip");
    }
    let out = Command::new(BIN)
        .args(["replay", "--allow-invalid"])
        .arg(&gz)
        .output()
        .expect("replay runs");
    assert_replayed_exactly(&out, &sim.totals, "gzip");
    // The same through a pipe, which hands out its first bytes as they come.
    let out = replay_from_stdin(&["--allow-invalid"], &std::fs::read(&gz).expect("gz"));
    assert_replayed_exactly(&out, &sim.totals, "gzip on stdin");

    // From stdin, into a state file: a second replay of the same file counts nothing twice.
    let state = dir.path().join("backfill.db");
    let state_arg = state.to_str().expect("utf8");
    for round in ["first", "second"] {
        let out = replay_from_stdin(
            &["--allow-invalid", "--state.path", state_arg],
            text.as_bytes(),
        );
        assert_replayed_exactly(&out, &sim.totals, round);
    }
    // The backfilled state then goes live: the exporter carries on from the replayed cursors
    // and counts nothing twice.
    let p = spawn(&sim, &state, &[]);
    // Ready means every session it knows has been read once from its cursor: a double count
    // would show by then. (Waiting for event requests instead flaked: sessions the replay
    // finished are not read again, so there may be only one.)
    assert!(
        eventually(Duration::from_secs(30), async || readyz(p.addr).await.0
            == 200)
        .await,
        "ready after the first round"
    );
    wait_exact(p.addr, &sim.totals, Duration::from_secs(30)).await;
}

/// No token anywhere: every log line (at `trace`, HTTP internals included) and every response
/// of a run with faults and a token rotated mid-run is scanned for both tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_appears_in_logs_or_responses() {
    use qoder_exporter::sim::SimConfig;
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 24,
            sessions: 6,
            ..ScenarioConfig::default()
        },
        token: "pt-first-SECRET-0123456789".into(),
        fault_rate: 0.15,
        ..SimConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let pat_file = dir.path().join("pat");
    std::fs::write(&pat_file, "pt-first-SECRET-0123456789\n").expect("pat");
    let mut child = Command::new(BIN)
        .args([
            "--qoder.api-url",
            &sim.base_url(),
            "--web.listen-address",
            "127.0.0.1:0",
        ])
        .arg("--state.path")
        .arg(dir.path().join("s.db"))
        .arg("--qoder.pat-file")
        .arg(&pat_file)
        .args([
            "--qoder.poll-interval",
            "100ms",
            "--qoder.idle-poll-interval",
            "300ms",
        ])
        .args([
            "--qoder.discovery-interval",
            "300ms",
            "--qoder.resync-interval",
            "1s",
            "--qoder.max-requests-per-second",
            "0",
        ])
        .args(["--log.level", "debug"])
        // The expert override, to see HTTP internals too.
        .env("RUST_LOG", "trace")
        .env_remove("QODER_PAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving metrics")
                && let Some(rest) = line.split("addr=").nth(1)
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
            l.lock().expect("log").push(line);
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("started")
        .parse()
        .expect("addr");
    let mut p = Proc {
        child,
        addr,
        log: lines.clone(),
    };
    wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    // Rotate: the API takes only the new token, the file gets it.
    sim.set_token("pt-second-SECRET-9876543210");
    std::fs::write(&pat_file, "pt-second-SECRET-9876543210\n").expect("rotate");
    let ok = eventually(Duration::from_secs(30), async || {
        scrape(p.addr).await.contains("qoder_up 1") && p.log().contains("token file changed")
    })
    .await;
    assert!(ok, "rotation picked up");
    let mut bodies = Vec::new();
    for path in ["/", "/metrics", "/healthz", "/readyz", "/nope"] {
        let r = reqwest::get(format!("http://{}{path}", p.addr))
            .await
            .expect("get");
        bodies.push(format!("{:?}", r.headers()));
        bodies.push(r.text().await.expect("body"));
    }
    p.terminate();
    let log = p.log();
    assert!(log.lines().count() > 100, "trace logging was on");
    for secret in ["SECRET-0123456789", "SECRET-9876543210"] {
        assert!(!log.contains(secret), "token in the log");
        for b in &bodies {
            assert!(!b.contains(secret), "token in a response: {b}");
        }
    }
}

/// `build_info{revision}` is the commit the binary was built from (`unknown` outside git).
#[test]
fn the_revision_is_the_git_commit() {
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let expected = std::env::var("QODER_EXPORTER_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or(git)
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(qoder_exporter::REVISION, expected);
}

/// `--log.format logfmt` and `json`: one parseable record a line, for log shippers.
#[test]
fn log_formats_for_shippers() {
    for format in ["logfmt", "json"] {
        let out = Command::new(BIN)
            .args([
                "replay",
                "-",
                "--log.format",
                format,
                "--log.level",
                "debug",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("replayed")).collect();
        assert!(!lines.is_empty(), "{format}: {err}");
        for line in lines {
            match format {
                "logfmt" => assert!(
                    line.starts_with("ts=") && line.contains(" level=") && line.contains(" msg="),
                    "{line}"
                ),
                _ => {
                    let v: serde_json::Value = serde_json::from_str(line).expect(line);
                    assert!(v["message"].is_string() && v["level"].is_string(), "{line}");
                }
            }
        }
    }
}

/// `/readyz`'s status code and body.
async fn readyz(addr: SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// A state file that stops taking commits (here another process holds its write lock; a full
/// disk or a read-only volume refuse them the same way) makes the exporter not ready and says
/// so in `qoder_exporter_state_writable`, logs it without a line per attempt, and loses
/// nothing: once commits go through again, the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_that_refuses_commits_is_not_ready_and_loses_nothing() {
    let sim = sim(ScenarioConfig {
        seed: 31,
        sessions: 6,
        ..ScenarioConfig::default()
    })
    .await;
    sim.set_clock(sim.last_step() / 3);
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("s.db");
    let p = spawn(&sim, &state, &[]);
    let wait = Duration::from_secs(60);
    assert!(
        eventually(wait, async || {
            readyz(p.addr).await.0 == 200
                && get(&parse(&scrape(p.addr).await), "qoder_events_total") > 0.0
        })
        .await,
        "ready with events counted"
    );
    assert_eq!(
        get(
            &parse(&scrape(p.addr).await),
            "qoder_exporter_state_writable"
        ),
        1.0
    );
    let blocker = rusqlite::Connection::open(&state).expect("open");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    sim.release_all();
    assert!(
        eventually(wait, async || {
            let series = parse(&scrape(p.addr).await);
            get(&series, "qoder_exporter_state_writable") == 0.0
                && get(&series, "qoder_exporter_state_commit_failures_total") > 0.0
        })
        .await,
        "commit failures seen"
    );
    let (code, body) = readyz(p.addr).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("state file"), "{body}");
    blocker.execute_batch("ROLLBACK").expect("release");
    drop(blocker);
    wait_exact(p.addr, &sim.totals, wait).await;
    assert_eq!(
        get(
            &parse(&scrape(p.addr).await),
            "qoder_exporter_state_writable"
        ),
        1.0
    );
    assert_eq!(readyz(p.addr).await.0, 200);
    let told = p.log().matches("state store commit failed").count();
    let failures = get(
        &parse(&scrape(p.addr).await),
        "qoder_exporter_state_commit_failures_total",
    );
    assert!(
        (1..=2).contains(&told),
        "told {told} times for {failures} failed commits:\n{}",
        p.log()
    );
}

/// `replay` reads the metrics group like the exporter: a series budget folds new label sets
/// into `other` and counts them, without losing a count; a credit price is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_applies_the_series_budget_and_the_credit_price() {
    let sim = sim(ScenarioConfig {
        seed: 33,
        sessions: 12,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dump = dump_to(&sim, None);
    // Prometheus series of the event-derived families (`qoder_*` but not the exporter's own,
    // the per-session gauges or the price).
    let open = replay_from_stdin(&[], &dump);
    assert_replayed_exactly(&open, &sim.totals, "no budget given (50 000)");
    let open_text = String::from_utf8_lossy(&open.stdout).into_owned();
    let budget = replay_from_stdin(
        &["--metrics.max-series", "40", "--cost.credit-price", "0.25"],
        &dump,
    );
    assert!(
        budget.status.success(),
        "{}",
        String::from_utf8_lossy(&budget.stderr)
    );
    let text = String::from_utf8_lossy(&budget.stdout).into_owned();
    let series = parse(&text);
    assert!(
        event_series(&open_text).len() > 100,
        "the log makes many series"
    );
    assert!(
        event_series(&text).len() < event_series(&open_text).len() / 2,
        "{} series with a budget of 40, {} without",
        event_series(&text).len(),
        event_series(&open_text).len()
    );
    assert!(get(&series, "qoder_exporter_series_dropped_total") > 0.0);
    assert!(text.contains("agent=\"other\""), "{text}");
    for family in [
        "qoder_events_total",
        "qoder_tokens_total",
        "qoder_credits_total",
        "qoder_turns_total",
    ] {
        // Summed over differently grouped series: equal up to float addition order.
        let (folded, open) = (get(&series, family), get(&parse(&open_text), family));
        assert!(
            (folded - open).abs() < 1e-6,
            "{family}: folding loses nothing ({folded} vs {open})"
        );
    }
    assert!(
        text.contains("qoder_credit_price{currency=\"USD\"} 0.25"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&budget.stderr).contains("series budget is spent"),
        "the log says so"
    );
}

/// A session list longer than `--qoder.max-sessions`: the exporter follows that many sessions
/// at once and no more, counts the list entries it leaves, and says so in the log (not per
/// entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_stops_following_at_max_sessions() {
    let sim = sim(ScenarioConfig {
        seed: 34,
        sessions: 12,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let p = spawn(
        &sim,
        &dir.path().join("s.db"),
        &["--qoder.max-sessions", "5"],
    );
    let wait = Duration::from_secs(60);
    // Two listings past the limit (the resync interval is 1 s): entries counted each time.
    assert!(
        eventually(wait, async || get(
            &parse(&scrape(p.addr).await),
            "qoder_exporter_sessions_not_followed_total"
        ) >= 14.0)
        .await,
        "list entries past the limit counted"
    );
    // At most 5 followed at once (ended ones make room; these stay idle).
    let followed = get(&parse(&scrape(p.addr).await), "qoder_sessions");
    assert!((1.0..=5.0).contains(&followed), "{followed} followed");
    let told = p.log().matches("--qoder.max-sessions").count();
    assert_eq!(told, 1, "told once a minute at most:\n{}", p.log());
}

/// The API breaking its paging rules is counted by kind: an event list that ignores
/// `after_id` (`cursor_ignored`), and one whose pages lead back to page 1 (`page_loop`). What
/// it does show is counted exactly once: the first page (of 100), or the first two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_anomalies_are_counted_by_kind() {
    use qoder_exporter::sim::EventsCursor;
    for (mode, kind, pages) in [
        (EventsCursor::Ignored, "cursor_ignored", 1),
        (EventsCursor::Cycle, "page_loop", 2),
    ] {
        let sim = looping_sim(mode).await;
        sim.release_all();
        let dir = tempfile::tempdir().expect("dir");
        let p = spawn(&sim, &dir.path().join("s.db"), &[]);
        let anomalies = |series: &Series| {
            series
                .iter()
                .filter(|((n, l), _)| {
                    n == "qoder_exporter_api_anomalies_total"
                        && l.iter().any(|(k, v)| k == "kind" && v == kind)
                })
                .map(|(_, v)| *v)
                .sum::<f64>()
        };
        assert!(
            eventually(Duration::from_secs(60), async || anomalies(&parse(
                &scrape(p.addr).await
            )) > 0.0)
            .await,
            "{kind} counted"
        );
        let shown: usize = sim
            .sessions()
            .iter()
            .map(|s| s.events.len().min(pages * 100))
            .sum();
        assert!(
            sim.totals.event_count() > shown as f64,
            "the log is longer than what the API shows"
        );
        assert!(
            eventually(Duration::from_secs(60), async || get(
                &parse(&scrape(p.addr).await),
                "qoder_events_total"
            ) >= shown as f64)
            .await,
            "{kind}: what the API shows is counted"
        );
        // And it stays there while the exporter keeps polling. (Waiting for more event reads
        // would wait on the back-off the anomaly earns, up to minutes; the anomaly counted
        // above already came from a read of pages counted before.)
        after_more_requests(p.addr, None, 5, Duration::from_secs(60)).await;
        let series = parse(&scrape(p.addr).await);
        assert_eq!(get(&series, "qoder_events_total"), shown as f64, "{kind}");
    }
}

/// An API that starts a page with the event 100 before it again (far past the tracker's window
/// of 32 recent ids) moves no count: every id is remembered for its stream, on disk, so the
/// repeats stay skipped across a `kill -9` and a restart. The kill comes once repeats were
/// skipped (a stream was read past 100 events and committed), so the restarted process meets
/// repeats of events only the state file knows it counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_api_repeats_100_events_later_counts_once() {
    use qoder_exporter::sim::{EventsCursor, SimConfig};
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 23,
            sessions: 3,
            max_turns: 40,
            ..ScenarioConfig::default()
        },
        events_cursor: EventsCursor::Echo,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("s.db");
    let grower = grow_log(&sim);
    let mut p = spawn(&sim, &state, &[]);
    let repeats = |series: &Series| get(series, "qoder_exporter_events_duplicate_total");
    assert!(
        eventually(Duration::from_secs(60), async || repeats(&parse(
            &scrape(p.addr).await
        )) >= 3.0)
        .await,
        "the API's repeats are seen:\n{}",
        p.log()
    );
    p.child.kill().expect("kill -9");
    p.child.wait().expect("reaped");
    grower.await.expect("grower");
    sim.release_all();
    let p = spawn(&sim, &state, &[]);
    let series = wait_exact(p.addr, &sim.totals, Duration::from_secs(60)).await;
    assert!(
        repeats(&series) > 0.0,
        "repeats skipped after the restart too"
    );
}

/// The event-derived series of a `/metrics` text, by their whole name-and-labels key.
fn event_series(text: &str) -> std::collections::BTreeMap<String, f64> {
    let skip = [
        "qoder_exporter_",
        "qoder_up",
        "qoder_sessions",
        "qoder_session_info",
        "qoder_session_credits{",
        "qoder_session_budget",
        "qoder_credit_price",
    ];
    text.lines()
        .filter(|l| l.starts_with("qoder_") && !skip.iter().any(|s| l.starts_with(s)))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// `replay --state.path STATE FILES…` to its end; its stdout, or the failure with its stderr.
fn replay_into(state: &Path, files: &[&Path]) -> Result<String, String> {
    let out = Command::new(BIN)
        .arg("replay")
        .arg("--state.path")
        .arg(state)
        .args(files)
        .output()
        .expect("replay runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A state file written by an older release (`tests/fixtures/state-c79f8ec`, before the
/// October API) is read as that release reported it, continues to the numbers one run of this
/// release over the whole log gives, and a file from a newer release is refused.
#[test]
fn a_state_file_from_an_older_release_is_read_and_continued() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-c79f8ec");
    let dir = tempfile::tempdir().expect("dir");
    let old = dir.path().join("old.db");
    std::fs::copy(fixture.join("state.db"), &old).expect("copy");
    let nothing = dir.path().join("empty.jsonl");
    std::fs::write(&nothing, b"").expect("write");
    let (head, tail) = (fixture.join("head.jsonl.gz"), fixture.join("tail.jsonl.gz"));

    // As the old release left it.
    let now = replay_into(&old, &[&nothing]).expect("reads the old state");
    let before = std::fs::read_to_string(fixture.join("old-metrics.txt")).expect("fixture");
    let (before, now) = (event_series(&before), event_series(&now));
    assert!(before.len() > 100, "the fixture holds series");
    for (key, value) in &before {
        assert_eq!(now.get(key), Some(value), "{key}");
    }

    // Continued with the rest of the log (a dump is whole: the replay skips the head the
    // state holds), it ends where one run of this release over all of it ends, in every
    // family the old release had. Not `qoder_thread_turns_total`, whose meaning changed with
    // the October API (threads read from their own streams), nor the families added since
    // (`qoder_tool_call_duration_seconds`): they cannot count what the old release did not.
    let continued = replay_into(&old, &[&head, &tail]).expect("continues");
    let fresh = dir.path().join("fresh.db");
    let whole = replay_into(&fresh, &[&head, &tail]).expect("one run");
    let family = |key: &str| key.split('{').next().unwrap_or(key).to_owned();
    let families: std::collections::BTreeSet<String> = before
        .keys()
        .map(|k| family(k))
        .filter(|f| f != "qoder_thread_turns_total")
        .collect();
    let kept = |text: &str| {
        let mut m = event_series(text);
        m.retain(|k, _| families.contains(&family(k)));
        m
    };
    let (continued, whole) = (kept(&continued), kept(&whole));
    assert!(continued.len() > 100);
    assert_eq!(continued, whole);

    // A file from a newer release: refused, and left alone.
    let newer = dir.path().join("newer.db");
    std::fs::copy(fixture.join("state.db"), &newer).expect("copy");
    rusqlite::Connection::open(&newer)
        .and_then(|c| c.pragma_update(None, "user_version", 99))
        .expect("bump the version");
    let before = std::fs::read(&newer).expect("read");
    let err = replay_into(&newer, &[&nothing]).expect_err("refused");
    assert!(err.contains("newer than this exporter"), "{err}");
    assert_eq!(
        std::fs::read(&newer).expect("read"),
        before,
        "left as it was"
    );
}
