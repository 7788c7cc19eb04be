//! The real app, in-process, against the simulated API: exact totals on a static log, on a
//! growing one, through faults, across restarts, with a refused cursor and a wrong token.

use std::sync::atomic::Ordering;
use std::time::Duration;

use qoder_exporter::app;
use qoder_exporter::secret::Pat;
use qoder_exporter::sim::{Fault, ScenarioConfig, SimConfig};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_log_of_all_generations_is_counted_exactly() {
    let sim = sim(ScenarioConfig {
        seed: 11,
        sessions: 30,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert_eq!(get(&series, "qoder_up"), 1.0);
    assert_eq!(get(&series, "qoder_exporter_events_invalid_total"), 0.0);
    assert!(
        get(
            &series,
            "qoder_exporter_last_successful_poll_timestamp_seconds"
        ) > 1.7e9
    );
    assert_eq!(
        sim.stats().accept_violations.load(Ordering::Relaxed),
        0,
        "never asks the list endpoint for SSE"
    );
    assert_eq!(
        sim.stats().param_violations.load(Ordering::Relaxed),
        0,
        "one cursor, limit ≤ 100"
    );
    // Terminated sessions are drained and then left alone.
    let terminal = sim.sessions().iter().filter(|s| s.terminal).count();
    assert!(terminal > 0);
    let followed = get(&series, "qoder_sessions");
    assert!(
        eventually(Duration::from_secs(10), async || {
            get(&parse(&scrape(running.addr).await), "qoder_sessions") == (30 - terminal) as f64
        })
        .await,
        "sessions followed: {followed}, want {}",
        30 - terminal
    );
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_growing_while_read_is_counted_exactly() {
    let sim = sim(ScenarioConfig {
        seed: 12,
        sessions: 9,
        stagger: 5,
        ..ScenarioConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    // Release the log a few steps at a time while the exporter reads it.
    let last = sim.last_step();
    let mut step = 0;
    while step < last {
        step = (step + 7).min(last);
        sim.set_clock(step);
        // A real pause: the log grows on its own clock, as a real one does, not in step with
        // the exporter's reads (as `grow_log` does for the crash tests).
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    wait_exact(running.addr, &sim.totals, WAIT).await;
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_is_survived_with_nothing_lost_or_doubled() {
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 13,
            sessions: 12,
            ..ScenarioConfig::default()
        },
        // A schedule, not chance: every third request fails, each kind of fault in turn.
        fault_every: Some(3),
        faults: Fault::ALL.to_vec(),
        slow_delay: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.request_timeout = Duration::from_secs(1);
    let running = app::start(s).await.expect("start");
    let series = wait_exact(running.addr, &sim.totals, Duration::from_secs(120)).await;
    // Stopped first, so no request is in flight while the schedule is checked.
    running.stop().await.expect("stop");
    let faults = sim.stats().faults.load(Ordering::Relaxed);
    assert_eq!(
        faults,
        sim.stats().total() / 3,
        "every third request got a fault"
    );
    assert!(
        faults >= Fault::ALL.len() as u64,
        "each kind of fault at least once: {faults}"
    );
    // The figures the README's reliability section quotes.
    eprintln!(
        "faults: {faults} of {} requests; {} events counted exactly, lost 0",
        sim.stats().total(),
        sim.totals.event_count()
    );
    let failures = get(&series, "qoder_exporter_api_request_failures_total");
    assert!(failures >= 1.0, "failures counted: {failures}");
    for reason in ["status_5xx", "status_429", "decode"] {
        let n: f64 = series
            .iter()
            .filter(|((n, l), _)| {
                n == "qoder_exporter_api_request_failures_total"
                    && l.iter().any(|(k, v)| k == "reason" && v == reason)
            })
            .map(|(_, v)| v)
            .sum();
        assert!(
            n > 0.0,
            "no failure counted with reason {reason}: {series:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_counts_without_doubling() {
    let sim = sim(ScenarioConfig {
        seed: 14,
        sessions: 9,
        ..ScenarioConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("s.db");
    // First run sees half of the log.
    sim.set_clock(sim.last_step() / 2);
    let first = app::start(settings(&sim, &path)).await.expect("start");
    assert!(
        eventually(WAIT, async || get(
            &parse(&scrape(first.addr).await),
            "qoder_events_total"
        ) > 0.0)
        .await
    );
    // Reading on (about one more poll a session) before the stop, not just the first batch.
    after_more_requests(first.addr, Some("events"), 9, WAIT).await;
    first.stop().await.expect("stop");
    // The second run sees all of it and must arrive at the same totals as one run would.
    sim.release_all();
    let second = app::start(settings(&sim, &path)).await.expect("restart");
    wait_exact(second.addr, &sim.totals, WAIT).await;
    second.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cursor_is_recovered_without_loss_or_double_count() {
    let sim = sim(ScenarioConfig {
        seed: 15,
        sessions: 3,
        max_turns: 6,
        ..ScenarioConfig::default()
    })
    .await;
    sim.set_clock(sim.last_step() / 2);
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    assert!(
        eventually(WAIT, async || get(
            &parse(&scrape(running.addr).await),
            "qoder_events_total"
        ) > 10.0)
        .await
    );
    // A few more polls, so the sessions being read hold cursors to refuse.
    after_more_requests(running.addr, Some("events"), 3, WAIT).await;
    sim.refuse_next_cursor();
    sim.release_all();
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert_eq!(get(&series, "qoder_exporter_cursor_resets_total"), 1.0);
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_events_are_counted_and_skipped() {
    let sim = sim(ScenarioConfig {
        seed: 16,
        sessions: 12,
        hostile: true,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    assert!(sim.totals.invalid > 0);
    // Some events are not quite JSON (`NaN`): their pages are repaired, not lost.
    assert!(
        sim.sessions()
            .iter()
            .flat_map(|s| &s.events)
            .any(|e| e.json.contains(":NaN")),
        "a NaN in the log"
    );
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert_eq!(
        get(&series, "qoder_exporter_events_invalid_total"),
        sim.totals.invalid as f64
    );
    // Each kind of bad field costs the field alone, and is counted by its reason.
    for reason in ["wrong_shape", "out_of_range", "not_json"] {
        let dropped = series
            .iter()
            .filter(|((n, l), _)| {
                n == "qoder_exporter_event_fields_dropped_total"
                    && l.iter().any(|(k, v)| k == "reason" && v == reason)
            })
            .map(|(_, v)| *v)
            .sum::<f64>();
        assert!(dropped > 0.0, "{reason}: {dropped}");
    }
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_keeps_serving_reports_down_and_barely_asks() {
    let sim = sim(ScenarioConfig {
        seed: 17,
        sessions: 6,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let pat_file = dir.path().join("pat");
    std::fs::write(&pat_file, "pt-wrong\n").expect("write");
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.pat = Pat::new("pt-wrong");
    s.pat_file = Some(pat_file.clone());
    let running = app::start(s).await.expect("start");
    // A real 3 s: the claim is a rate against a backoff timed in seconds, and a rejected
    // token leaves no work to wait on (not asking is the point).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let series = parse(&scrape(running.addr).await);
    assert_eq!(get(&series, "qoder_up"), 0.0);
    assert_eq!(get(&series, "qoder_events_total"), 0.0);
    let asked = sim.stats().total();
    assert!(
        (1..=2).contains(&asked),
        "requests with a rejected token in 3 s: {asked}"
    );
    assert!(
        *running.ready.borrow(),
        "a failed first round still ends the first round"
    );
    // The landing page says it plainly.
    let page = reqwest::get(format!("http://{}/", running.addr))
        .await
        .expect("landing")
        .text()
        .await
        .expect("text");
    assert!(page.contains("the token is rejected (HTTP 401)"), "{page}");
    assert!(
        page.contains("<td>Sessions followed</td><td>0</td>"),
        "{page}"
    );
    assert!(page.contains("<td>never</td>"), "{page}");
    // Rotating the token file brings it back without a restart.
    rewrite(&pat_file, format!("{}\n", sim.token()));
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert_eq!(get(&series, "qoder_up"), 1.0);
    let page = reqwest::get(format!("http://{}/", running.addr))
        .await
        .expect("landing")
        .text()
        .await
        .expect("text");
    assert!(!page.contains("rejected"), "{page}");
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_sessions_only_and_a_missing_one_is_dropped() {
    let sim = sim(ScenarioConfig {
        seed: 18,
        sessions: 6,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let mut s = settings(&sim, &dir.path().join("s.db"));
    let chosen = sim.sessions()[1].id.clone();
    s.sessions = vec![chosen.clone(), "sess_does_not_exist".into()];
    let running = app::start(s).await.expect("start");
    let want = sim.sessions()[1].events.len() as f64;
    assert!(
        eventually(WAIT, async || get(
            &parse(&scrape(running.addr).await),
            "qoder_events_total"
        ) == want)
        .await
    );
    // Two more polls of the named session: nothing more is counted.
    after_more_requests(running.addr, Some("events"), 2, WAIT).await;
    let series = parse(&scrape(running.addr).await);
    assert_eq!(
        get(&series, "qoder_events_total"),
        want,
        "only the named session"
    );
    assert_eq!(
        sim.stats().sessions_requests.load(Ordering::Relaxed),
        0,
        "no discovery when sessions are named"
    );
    assert!(*running.ready.borrow());
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_budget_is_kept() {
    let sim = sim(ScenarioConfig {
        seed: 19,
        sessions: 40,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let mut s = settings(&sim, &dir.path().join("s.db"));
    s.max_requests_per_second = Some(20);
    let running = app::start(s).await.expect("start");
    let started = std::time::Instant::now();
    // A real 3 s: the limiter's budget is requests per second of wall-clock time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = sim.stats().total() as f64;
    let rate = n / started.elapsed().as_secs_f64();
    // The limiter allows a burst of one second's budget on top of the rate.
    assert!(
        n <= 20.0 * 3.0 + 20.0 + 1.0,
        "{n} requests in 3 s ({rate:.1}/s) with a budget of 20/s"
    );
    running.stop().await.expect("stop");
}

/// Three shards against one API: each session is followed by exactly one of them, and the
/// metrics summed across them (as PromQL `sum` does) equal the log's totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_split_the_sessions_and_sum_to_the_totals() {
    use qoder_exporter::config::Shard;
    use qoder_exporter::state::StateStore;
    let sim = sim(ScenarioConfig {
        seed: 17,
        sessions: 24,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let want = sim.totals.event_count();
    let mut running = Vec::new();
    for index in 0..3 {
        let mut s = settings(&sim, &dir.path().join(format!("shard{index}.db")));
        s.shard = Shard { count: 3, index };
        running.push(app::start(s).await.expect("start"));
    }
    let addrs: Vec<_> = running.iter().map(|r| r.addr).collect();
    let summed = async || {
        let mut sum = Series::new();
        for a in &addrs {
            for (k, v) in parse(&scrape(*a).await) {
                *sum.entry(k).or_insert(0.0) += v;
            }
        }
        sum
    };
    assert!(
        eventually(WAIT, async || get(&summed().await, "qoder_events_total")
            >= want)
        .await,
        "the shards together read the whole log"
    );
    // Each shard comes round again, in case a batch over the total is in flight.
    let more = |a| after_more_requests(a, None, 1, WAIT);
    tokio::join!(more(addrs[0]), more(addrs[1]), more(addrs[2]));
    let problems = mismatches(&summed().await, &sim.totals);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for r in running {
        r.stop().await.expect("stop");
    }
    // Who followed what: the state files say.
    let mut owner = std::collections::BTreeMap::new();
    for index in 0..3u32 {
        let store = StateStore::open(&dir.path().join(format!("shard{index}.db"))).expect("open");
        let ids: Vec<String> = store
            .load_sessions::<serde_json::Value>()
            .expect("sessions")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert!(!ids.is_empty(), "shard {index} followed nothing");
        for id in ids {
            assert!(
                owner.insert(id.clone(), index).is_none(),
                "{id} followed by two shards"
            );
        }
    }
    let all: Vec<String> = sim.sessions().iter().map(|s| s.id.clone()).collect();
    assert_eq!(owner.len(), all.len(), "every session followed");
    for id in &all {
        assert_eq!(owner[id], Shard::of(id, 3), "{id} in the wrong shard");
    }
}

/// Nothing listens where the API should be, or its name does not resolve: the exporter
/// starts, serves, is ready after its first (failed) round, says `qoder_up 0` and counts
/// `connect` failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_is_reported_not_fatal() {
    let sim = sim(ScenarioConfig::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    for url in [
        format!("http://127.0.0.1:{port}/api/v1/cloud"),
        // RFC 2606: `.invalid` never resolves.
        "http://qoder-api.invalid/api/v1/cloud".to_owned(),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = settings(&sim, &dir.path().join("s.db"));
        s.api_url = url.clone();
        let running = app::start(s).await.expect("start");
        let addr = running.addr;
        let counted = eventually(WAIT, async || {
            let series = parse(&scrape(addr).await);
            series.iter().any(|((n, l), v)| {
                n == "qoder_exporter_api_request_failures_total"
                    && l.iter().any(|(k, v)| k == "reason" && v == "connect")
                    && *v > 0.0
            })
        })
        .await;
        assert!(counted, "{url}: connect failures counted");
        assert_eq!(get(&parse(&scrape(addr).await), "qoder_up"), 0.0);
        // Never a successful poll: no timestamp at all (a 0 would read as 56 years stale),
        // even after the landing page, which shows it, was asked for.
        reqwest::get(format!("http://{addr}/"))
            .await
            .expect("landing page");
        assert!(
            !scrape(addr)
                .await
                .contains("qoder_exporter_last_successful_poll_timestamp_seconds "),
            "{url}: no timestamp before the first successful poll"
        );
        let ready = eventually(WAIT, async || {
            reqwest::get(format!("http://{addr}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(
            ready,
            "{url}: ready once the first round ends, even a failed one"
        );
        running.stop().await.expect("stop");
    }
}

/// A page far longer than asked for is read in parts (counted), nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pages_are_cut_and_read_on() {
    let sim = sim(ScenarioConfig {
        seed: 19,
        sessions: 2,
        max_turns: 250,
        ..ScenarioConfig::default()
    })
    .await;
    assert!(
        sim.sessions().iter().any(|s| s.events.len() > 1000),
        "a long session"
    );
    sim.set_oversize_pages(true);
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert!(
        get(&series, "qoder_exporter_event_pages_cut_total") > 0.0,
        "cuts counted"
    );
    running.stop().await.expect("stop");
}

/// Idle sessions the session list shows unchanged (`updated_at`) are not polled. (That a
/// session whose `updated_at` moves is read again is what the growing-log tests rely on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_idle_sessions_are_not_polled() {
    let sim = sim(ScenarioConfig {
        seed: 29,
        sessions: 24,
        ..ScenarioConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    let addr = running.addr;
    wait_exact(addr, &sim.totals, WAIT).await;
    // Settle (three listings, each compared with every session's last read), then count
    // event-list requests over ten listings with nothing changing: listings and idle polls
    // are both due every 300 ms, so that would be about 10 per idle session without the
    // listing's help.
    after_more_requests(addr, Some("sessions"), 3, WAIT).await;
    let followed = get(&parse(&scrape(addr).await), "qoder_sessions");
    assert!(followed >= 5.0, "idle sessions followed: {followed}");
    let before = sim.stats().events_requests.load(Ordering::Relaxed);
    let listings = sim.stats().sessions_requests.load(Ordering::Relaxed);
    after_more_requests(addr, Some("sessions"), 10, WAIT).await;
    let polled = sim.stats().events_requests.load(Ordering::Relaxed) - before;
    let listed = sim.stats().sessions_requests.load(Ordering::Relaxed) - listings;
    assert_eq!(
        polled, 0,
        "{polled} event-list requests over {listed} listings for {followed} unchanged sessions"
    );
    assert!(listed > 0, "the session list is still read");
    // Connections are reused (keep-alive): at most one per concurrent job, not one per request.
    let connections = sim.stats().connections.load(Ordering::Relaxed);
    let requests = sim.stats().total();
    eprintln!("{requests} requests over {connections} connections");
    assert!(
        connections <= 16 && connections * 4 < requests,
        "{requests} requests over {connections} connections"
    );
    running.stop().await.expect("stop");
}

/// A new session is followed within one discovery interval (plus a request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_are_noticed_within_one_discovery_interval() {
    let sim = sim(ScenarioConfig {
        seed: 31,
        sessions: 4,
        stagger: 400,
        ..ScenarioConfig::default()
    })
    .await;
    // The first session's whole log, none of the second's.
    sim.set_clock(399);
    let dir = tempfile::tempdir().expect("dir");
    let s = settings(&sim, &dir.path().join("s.db"));
    let interval = s.discovery_interval;
    let running = app::start(s).await.expect("start");
    let addr = running.addr;
    let count = async || {
        parse(&scrape(addr).await)
            .iter()
            .filter(|((n, _), _)| n == "qoder_events_total")
            .count()
    };
    assert!(
        eventually(WAIT, async || count().await > 0).await,
        "the first session is read"
    );
    // Settled before counting: the first session's whole log read, then two more listings, so
    // what reading it changed is in the gauge (it ends terminated: dropped once drained).
    let first_log = sim
        .sessions()
        .iter()
        .flat_map(|s| &s.events)
        .filter(|e| e.step <= 399)
        .count() as f64;
    assert!(
        eventually(WAIT, async || get(
            &parse(&scrape(addr).await),
            "qoder_events_total"
        ) == first_log)
        .await,
        "the first session's whole log is counted"
    );
    after_more_requests(addr, Some("sessions"), 2, WAIT).await;
    let known = get(&parse(&scrape(addr).await), "qoder_sessions");
    // The second session is born now.
    sim.set_clock(401);
    let born = std::time::Instant::now();
    assert!(
        eventually(WAIT, async || get(
            &parse(&scrape(addr).await),
            "qoder_sessions"
        ) > known)
        .await,
        "noticed"
    );
    let took = born.elapsed();
    eprintln!("new session followed {took:?} after it appeared (discovery interval {interval:?})");
    assert!(took < interval * 2 + Duration::from_millis(500), "{took:?}");
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_list_paged_by_token_is_read_to_its_end() {
    // SDK 0.11 lists: `next_page` tokens, three a page, and `after_id` ignored (it would give
    // the first page again and again). Every session is found and counted once.
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 41,
            sessions: 14,
            ..ScenarioConfig::default()
        },
        session_page_tokens: Some(3),
        ..SimConfig::default()
    })
    .await;
    sim.release_all();
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    // Archived sessions are listed only when asked for: they count like the others.
    assert!(
        sim.sessions()
            .iter()
            .any(|s| s.object.contains_key("archived_at")),
        "an archived session"
    );
    // Exact totals: every session of every page was read, none twice.
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert!(
        sim.stats().sessions_requests.load(Ordering::Relaxed) >= 5,
        "five pages"
    );
    assert!(
        get(&series, "qoder_session_credits_total") > 0.0,
        "billed credits of the listed sessions"
    );
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_sub_agents_cost_no_thread_requests() {
    // Only every other G3 session runs a sub-agent (the third of each six); with two sessions
    // there is none, and no thread stream may be asked for.
    let sim = sim(ScenarioConfig {
        seed: 12,
        sessions: 2,
        ..ScenarioConfig::default()
    })
    .await;
    assert!(sim.sessions().iter().all(|s| s.threads.is_empty()));
    let (_dir, running, _) = run_to_exact(&sim).await;
    assert_eq!(
        sim.stats().thread_events_requests.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        sim.stats().threads_requests.load(Ordering::Relaxed),
        0,
        "no thread list for a session whose agent coordinates none"
    );
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_named_by_id_alone_is_counted_under_its_name() {
    // With agent objects (`GET /agents/{id}`), each id is asked for once and every series
    // carries the name; the totals (by name) are exact.
    let sim = sim(ScenarioConfig {
        seed: 11,
        sessions: 30,
        ..ScenarioConfig::default()
    })
    .await;
    let id_only: std::collections::HashSet<String> = sim
        .sessions()
        .iter()
        .filter_map(|s| s.object.get("agent_id").and_then(|a| a.as_str()))
        .map(str::to_owned)
        .collect();
    assert!(!id_only.is_empty());
    let (_dir, running, _) = run_to_exact(&sim).await;
    let asked = sim.stats().agent_requests.load(Ordering::Relaxed);
    assert!(
        (1..=id_only.len() as u64 * 2).contains(&asked),
        "{asked} agent lookups for {} ids",
        id_only.len()
    );
    // Coordinators' thread lists are read; sessions without sub-agents cost none.
    assert!(sim.stats().threads_requests.load(Ordering::Relaxed) > 0);
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_agent_objects_the_ids_series_move_to_the_name_when_it_is_seen() {
    // An API without agent objects (404): an id-only session is counted under the id until
    // another session's object shows the agent's name; then the id's series move to the name.
    // Every agent here is named by some session, so in the end no id is left as a label.
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 11,
            sessions: 30,
            ..ScenarioConfig::default()
        },
        agents_endpoint: false,
        ..SimConfig::default()
    })
    .await;
    let (_dir, running, _) = run_to_exact(&sim).await;
    let text = scrape(running.addr).await;
    assert!(
        !text.contains("agent=\"agent_"),
        "an agent id left as a label"
    );
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_refuses_filters_is_listed_without_them() {
    // An API that validates its parameters and knows neither `include_archived` nor
    // `statuses[]` answers 400 once; the exporter lists without them from then on.
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 43,
            sessions: 12,
            ..ScenarioConfig::default()
        },
        reject_list_filters: true,
        ..SimConfig::default()
    })
    .await;
    let (_dir, running, _) = run_to_exact(&sim).await;
    assert_eq!(sim.stats().list_filters_refused.load(Ordering::Relaxed), 1);
    running.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_thread_list_loses_no_thread() {
    // The thread list fails on the first read of a coordinator: the threads its own stream
    // named are still read (the list is not needed for them), and the list is asked again.
    let sim = sim_with(SimConfig {
        scenario: ScenarioConfig {
            seed: 12,
            sessions: 6,
            ..ScenarioConfig::default()
        },
        break_first_thread_list: true,
        ..SimConfig::default()
    })
    .await;
    assert!(sim.sessions().iter().any(|s| !s.threads.is_empty()));
    let (_dir, running, _) = run_to_exact(&sim).await;
    assert!(sim.stats().threads_requests.load(Ordering::Relaxed) >= 2);
    running.stop().await.expect("stops");
}

/// An event list that ignores `after_id` (every page is the first) or leads back to a page
/// already read: the repeats are dropped and counted as duplicates, and the counts do not
/// grow with every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_list_that_loops_inflates_nothing() {
    use qoder_exporter::sim::EventsCursor;
    for mode in [EventsCursor::Ignored, EventsCursor::Cycle] {
        let sim = looping_sim(mode).await;
        let longest = sim
            .sessions()
            .iter()
            .map(|s| s.events.len())
            .max()
            .unwrap_or(0);
        assert!(longest > 300, "a log of more than three pages: {longest}");
        sim.release_all();
        let dir = tempfile::tempdir().expect("dir");
        let running = app::start(settings(&sim, &dir.path().join("s.db")))
            .await
            .expect("start");
        let addr = running.addr;
        // Many polls (100 ms apart in the tests' settings) of a list that loops.
        assert!(
            eventually(WAIT, async || {
                get(
                    &parse(&scrape(addr).await),
                    "qoder_exporter_events_duplicate_total",
                ) >= 200.0
            })
            .await,
            "{mode:?}: repeats counted as duplicates"
        );
        let first = get(&parse(&scrape(addr).await), "qoder_events_total");
        // Three more listings: each may send a session that looks changed to be read again.
        after_more_requests(addr, Some("sessions"), 3, WAIT).await;
        let second = get(&parse(&scrape(addr).await), "qoder_events_total");
        assert_eq!(first, second, "{mode:?}: counts grow with every poll");
        assert!(
            second <= sim.totals.event_count(),
            "{mode:?}: {second} events counted, the log has {}",
            sim.totals.event_count()
        );
        running.stop().await.expect("stops");
    }
}

/// A thread's cursor refused (400): its stream is read again from the start, skipping what
/// its own state says was consumed: nothing lost, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_thread_cursor_is_recovered_without_double_count() {
    let sim = sim(ScenarioConfig {
        seed: 12,
        sessions: 6,
        max_turns: 60,
        ..ScenarioConfig::default()
    })
    .await;
    let with_thread = sim
        .sessions()
        .iter()
        .find(|s| !s.threads.is_empty())
        .map(|s| s.threads[0].events.len())
        .expect("a session with a sub-agent");
    // Longer than the ring of recent ids, so only the skip count can keep it exact.
    assert!(with_thread > 100, "{with_thread}");
    sim.set_clock(sim.last_step() / 2);
    let dir = tempfile::tempdir().expect("dir");
    let running = app::start(settings(&sim, &dir.path().join("s.db")))
        .await
        .expect("start");
    assert!(
        eventually(WAIT, async || sim
            .stats()
            .thread_events_requests
            .load(Ordering::Relaxed)
            > 0)
        .await
    );
    // The thread's stream read on, so it holds a cursor to refuse.
    after_more_requests(running.addr, Some("thread_events"), 2, WAIT).await;
    sim.refuse_next_thread_cursor();
    sim.release_all();
    let series = wait_exact(running.addr, &sim.totals, WAIT).await;
    assert_eq!(get(&series, "qoder_exporter_cursor_resets_total"), 1.0);
    running.stop().await.expect("stop");
}
