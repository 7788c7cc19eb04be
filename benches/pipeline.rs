//! Hot paths of the pipeline, on the simulator's events (`cargo bench`; numbers in
//! BENCHMARKS.md). Each group reports events per second.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use qoder_exporter::event::Event;
use qoder_exporter::pipeline::tracker::SessionState;
use qoder_exporter::sim::{ScenarioConfig, generate};
use qoder_exporter::sinks::metrics::{Delta, DurableMetrics, Exposition, Metrics};
use qoder_exporter::source::wire::{self, Page};
use qoder_exporter::state::{BatchWrite, StateStore};

/// One session's log as API pages of 100 events, plus the decoded events.
fn pages() -> (Vec<String>, Vec<(String, Vec<Event>)>) {
    let (sessions, _) = generate(&ScenarioConfig {
        seed: 1,
        sessions: 30,
        max_turns: 20,
        stagger: 0,
        hostile: false,
        sub_agents: true,
    });
    let mut pages = Vec::new();
    let mut decoded = Vec::new();
    for s in &sessions {
        let mut evs = Vec::new();
        for chunk in s.events.chunks(100) {
            let data: Vec<&str> = chunk.iter().map(|e| e.json.as_str()).collect();
            let page = format!(
                "{{\"data\":[{}],\"has_more\":true,\"last_id\":\"{}\"}}",
                data.join(","),
                chunk.last().map(|e| e.id.as_str()).unwrap_or_default()
            );
            for e in chunk {
                if let Ok(d) = wire::decode_event(&e.json) {
                    evs.push(Event::from_wire(d.event));
                }
            }
            pages.push(page);
        }
        decoded.push((s.id.clone(), evs));
    }
    (pages, decoded)
}

/// Every session's events through the state machine: the metric delta and the closed turns.
fn apply_all(
    sessions: &[(String, Vec<Event>)],
) -> (Delta, Vec<qoder_exporter::pipeline::tracker::ClosedTurn>) {
    let mut delta = Delta::default();
    let mut closed = Vec::new();
    for (id, events) in sessions {
        let mut st = SessionState::new("coder".into());
        for e in events {
            st.apply(id, e, &mut delta, &mut closed);
        }
    }
    (delta, closed)
}

fn events_in(pages: &[String]) -> u64 {
    pages
        .iter()
        .map(|p| {
            serde_json::from_str::<Page<'_>>(p)
                .map(|p| p.data.len() as u64)
                .unwrap_or(0)
        })
        .sum()
}

fn decode(c: &mut Criterion) {
    let (pages, _) = pages();
    let n = events_in(&pages);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(n));
    g.bench_function("serde_json Value (parse only)", |b| {
        b.iter(|| {
            for p in &pages {
                let v: serde_json::Value = serde_json::from_str(p).expect("json");
                std::hint::black_box(v);
            }
        })
    });
    g.bench_function("pages to domain events", |b| {
        b.iter(|| {
            for p in &pages {
                let page: Page<'_> = serde_json::from_str(p).expect("page");
                for raw in &page.data {
                    if let Ok(d) = wire::decode_event(raw.get()) {
                        std::hint::black_box(Event::from_wire(d.event));
                    }
                }
            }
        })
    });
    g.finish();
}

fn tracker(c: &mut Criterion) {
    let (_, sessions) = pages();
    let n: u64 = sessions.iter().map(|(_, e)| e.len() as u64).sum();
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(n));
    g.bench_function("apply (turns, pairing, deltas)", |b| {
        b.iter(|| std::hint::black_box(apply_all(&sessions)))
    });
    let (delta, _) = apply_all(&sessions);
    g.bench_function("metrics stage + publish of those events' delta", |b| {
        b.iter_batched(
            DurableMetrics::new,
            |m| {
                let staged = m.stage(&delta);
                m.publish(staged);
                m
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn commit(c: &mut Criterion) {
    let (_, sessions) = pages();
    let dir = tempfile::tempdir().expect("dir");
    let mut store = StateStore::open(&dir.path().join("bench.db")).expect("store");
    let metrics = DurableMetrics::new();
    // A batch of 100 events of one session, and a group of 20 sessions' batches.
    let (id, events) = &sessions[0];
    let mut st = SessionState::new("coder".into());
    let mut delta = Delta::default();
    let mut closed = Vec::new();
    for e in events.iter().take(100) {
        st.apply(id, e, &mut delta, &mut closed);
    }
    let staged = metrics.stage(&delta);
    // The digests of the batch's event ids, committed with it.
    let ids = vec![(String::new(), (0..100u64).collect::<Vec<_>>())];
    let mut g = c.benchmark_group("state commit (WAL, synchronous=FULL)");
    g.throughput(Throughput::Elements(100));
    g.bench_function("one batch of 100 events", |b| {
        b.iter(|| {
            store
                .commit(&BatchWrite {
                    session_id: id,
                    cursor: Some("evt_x"),
                    finished: false,
                    state: &st,
                    series: &staged.values,
                    closed_turns: &[],
                    log_records: &[],
                    event_ids: &ids,
                })
                .expect("commit")
        })
    });
    let states: Vec<(String, SessionState)> =
        (0..20).map(|i| (format!("sess_{i}"), st.clone())).collect();
    g.throughput(Throughput::Elements(2000));
    g.bench_function("20 batches of 100 events in one transaction", |b| {
        b.iter(|| {
            let writes: Vec<BatchWrite<'_, SessionState>> = states
                .iter()
                .enumerate()
                .map(|(i, (id, s))| BatchWrite {
                    session_id: id,
                    cursor: Some("evt_x"),
                    finished: false,
                    state: s,
                    series: if i == 0 { &staged.values } else { &[] },
                    closed_turns: &[],
                    log_records: &[],
                    event_ids: &ids,
                })
                .collect();
            store.commit_many(&writes).expect("commit")
        })
    });
    g.finish();
}

fn render(c: &mut Criterion) {
    let (_, sessions) = pages();
    let m = Metrics::new().expect("metrics");
    let (delta, _) = apply_all(&sessions);
    let staged = m.durable.stage(&delta);
    m.durable.publish(staged);
    let mut g = c.benchmark_group("render");
    g.bench_function("/metrics text", |b| b.iter(|| m.render(Exposition::Text)));
    g.finish();
}

/// `/metrics` at about 50 000 samples (the goal: rendered in ≤ 10 ms): 150 agents, each with
/// 8 event types, 2 models, 20 tools, and the histograms that go with them.
fn render_at_scale(c: &mut Criterion) {
    use qoder_exporter::sinks::metrics::Family;
    let m = Metrics::new().expect("metrics");
    let mut delta = Delta::default();
    let models = ["claude-sonnet-4", "qwen3-coder"];
    for a in 0..150 {
        let agent = format!("agent-{a:03}");
        for t in 0..8 {
            delta.inc(Family::Events, &[&format!("type.{t}"), &agent], 1.0);
        }
        for model in models {
            for kind in ["input", "output", "cache_read", "cache_creation"] {
                delta.inc(Family::Tokens, &[kind, &agent, model], 10.0);
            }
            delta.inc(Family::Credits, &[&agent, model], 1.5);
            delta.inc(Family::ModelRequests, &[&agent, model], 1.0);
            delta.observe_ns(
                Family::ModelRequestDuration,
                &[&agent, model],
                2_000_000_000,
            );
        }
        for t in 0..20 {
            let tool = format!("tool_{t}");
            delta.inc(Family::ToolCalls, &[&tool, &agent], 1.0);
            delta.observe_ns(Family::ToolCallDuration, &[&tool, &agent], 300_000_000);
        }
        delta.inc(Family::Turns, &["end_turn", &agent], 1.0);
        delta.observe_ns(Family::TurnDuration, &[&agent], 30_000_000_000);
    }
    let staged = m.durable.stage(&delta);
    m.durable.publish(staged);
    let (text, _) = m.render(Exposition::Text);
    let samples = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && l[0] != b'#')
        .count();
    eprintln!(
        "render_at_scale: {samples} samples, {} bytes of text",
        text.len()
    );
    let mut g = c.benchmark_group(format!("render {samples} samples"));
    g.bench_function("/metrics text", |b| b.iter(|| m.render(Exposition::Text)));
    g.bench_function("/metrics protobuf", |b| {
        b.iter(|| m.render(Exposition::Protobuf))
    });
    g.finish();
}

criterion_group!(benches, decode, tracker, commit, render, render_at_scale);
criterion_main!(benches);
