//! Conformance with the API as the Python SDK 0.11 models it: every event type and envelope
//! generated from the SDK's own models (`tests/fixtures/sdk-0.11`, made by
//! `scripts/sdk_fixtures.py`) is read, and a multi-agent session served from those files by a
//! fake API on loopback comes out at the totals computed by hand in the fixtures' README.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Query, Request};
use axum::response::{IntoResponse, Response};
use qoder_exporter::app;
use qoder_exporter::event::{Event, EventKind, ThreadPhase};
use qoder_exporter::source::wire;
use serde_json::Value;

use crate::common::{after_more_requests, eventually, get, loopback, parse, scrape, settings_for};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk-0.11")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn event(rel: &str) -> Event {
    let text = read(rel);
    let d = wire::decode_event(&text).unwrap_or_else(|r| panic!("{rel}: {r:?}"));
    assert_eq!(
        d.bad_fields.total(),
        0,
        "{rel}: every field has the shape we read"
    );
    Event::from_wire(d.event)
}

#[test]
fn every_event_type_of_the_sdk_reads_without_a_dropped_field() {
    let dir = fixtures().join("events");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("events dir") {
        let path = entry.expect("entry").path();
        let rel = format!(
            "events/{}",
            path.file_name().and_then(|f| f.to_str()).expect("name")
        );
        let e = event(&rel);
        assert_eq!(
            format!("events/{}.json", e.type_name),
            rel,
            "the wire type is kept"
        );
        n += 1;
    }
    assert_eq!(n, 35, "one sample per type of §11.4");

    let EventKind::Usage(u) = event("events/session.usage.json").kind else {
        panic!("session.usage is a usage snapshot");
    };
    assert!(u.model_credits.is_some() && u.sandbox_runtime_credits.is_some());
    assert!(u.active_seconds.is_some() && !u.server_tools.is_empty());
    assert!(matches!(
        event("events/session.updated.json").kind,
        EventKind::BudgetUpdated(b) if b == 25.0
    ));
    let EventKind::Error { code, .. } = event("events/session.error.json").kind else {
        panic!("session.error");
    };
    assert!(
        code.is_some(),
        "qoder_error_code is read (a span attribute)"
    );
    assert!(matches!(
        event("events/session.thread_status_idle.json").kind,
        EventKind::ThreadStatus {
            phase: ThreadPhase::Idle { .. },
            ..
        }
    ));
    let EventKind::ModelRequestEnd {
        tokens, credits, ..
    } = event("events/span.model_request_end.json").kind
    else {
        panic!("span.model_request_end");
    };
    assert!(
        tokens.is_some() && credits.is_some(),
        "tokens and credits both"
    );
    let EventKind::Idle {
        tokens, snapshot, ..
    } = event("events/session.status_idle.json").kind
    else {
        panic!("idle");
    };
    // The idle usage of SDK 0.11 is the session's snapshot: its tokens are not the turn's.
    if snapshot.is_some() {
        assert!(tokens.is_none());
    }
}

#[test]
fn session_thread_and_list_envelopes_read() {
    let s = wire::decode_session(&read("session.json")).expect("session");
    let meta = qoder_exporter::source::poller::meta_of(&s);
    assert_eq!(meta.agent_name.as_deref(), Some("coordinator"));
    assert_eq!(meta.budget, Some(25.0));
    let u = meta.usage.expect("usage");
    assert!(u.model_credits.is_some() && u.sandbox_runtime_credits.is_some());
    for rel in [
        "multiagent/sessions.page1.json",
        "multiagent/sessions.page2.json",
        "multiagent/events.sesn_multi01.json",
        "multiagent/threads.sesn_multi01.json",
        "multiagent/thread_events.sesn_multi01.sthr_rev01.json",
    ] {
        let body = read(rel);
        let page: wire::Page<'_> =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(!page.data.is_empty(), "{rel}");
    }
    let body = read("multiagent/sessions.page1.json");
    let page: wire::Page<'_> = serde_json::from_str(&body).expect("page");
    assert_eq!(
        page.next_list_cursor(None, None),
        Some(wire::ListCursor::Page("pg_2".into())),
        "paged by the token, as the SDK does"
    );
}

/// Serves the multi-agent scenario's files as the API would: `page` tokens on the session
/// list, `after_id` on event lists (an id past the end gives an empty page).
async fn fake_api(req: Request) -> Response {
    let path = req
        .uri()
        .path()
        .trim_start_matches("/api/v1/cloud/")
        .to_owned();
    let q: Query<HashMap<String, String>> =
        Query::try_from_uri(req.uri()).unwrap_or(Query(HashMap::new()));
    let parts: Vec<&str> = path.split('/').collect();
    let file = match parts.as_slice() {
        ["sessions"] => match q.get("page").map(String::as_str) {
            None => "sessions.page1.json".to_owned(),
            Some("pg_2") => "sessions.page2.json".to_owned(),
            Some(_) => return (axum::http::StatusCode::BAD_REQUEST, "bad page").into_response(),
        },
        ["sessions", id] => format!("session.{id}.json"),
        ["sessions", id, "events"] => format!("events.{id}.json"),
        ["sessions", id, "threads"] => format!("threads.{id}.json"),
        ["sessions", id, "threads", tid, "events"] => format!("thread_events.{id}.{tid}.json"),
        _ => return (axum::http::StatusCode::NOT_FOUND, "{}").into_response(),
    };
    let Ok(body) = std::fs::read_to_string(fixtures().join("multiagent").join(&file)) else {
        return (axum::http::StatusCode::NOT_FOUND, "{}").into_response();
    };
    let body = match q.get("after_id") {
        Some(after) => {
            let mut v: Value = serde_json::from_str(&body).expect("json");
            let data = v["data"].as_array().cloned().unwrap_or_default();
            let rest: Vec<Value> = match data.iter().position(|e| e["id"] == after.as_str()) {
                Some(i) => data[i + 1..].to_vec(),
                None => data,
            };
            v["data"] = Value::Array(rest);
            v["has_more"] = Value::Bool(false);
            v.to_string()
        }
        None => body,
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn value(series: &crate::common::Series, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    series.get(&(name.to_owned(), want)).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_agent_session_shaped_by_the_sdk_comes_out_at_the_hand_computed_totals() {
    let listener = tokio::net::TcpListener::bind(loopback())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, axum::Router::new().fallback(fake_api)).await;
    });
    let dir = tempfile::tempdir().expect("dir");
    let s = settings_for(
        &format!("http://{addr}/api/v1/cloud"),
        "any-token",
        &dir.path().join("s.db"),
    );
    let running = app::start(s).await.expect("start");
    let settled = eventually(Duration::from_secs(20), async || {
        let series = parse(&scrape(running.addr).await);
        get(&series, "qoder_events_total") >= 27.0
            && get(&series, "qoder_session_credits_total") >= 3.4 - 1e-9
    })
    .await;
    let series = parse(&scrape(running.addr).await);
    assert!(settled, "did not settle: {series:?}");
    // Polled a few more rounds (the listing carries the credits): nothing moves twice.
    after_more_requests(running.addr, Some("sessions"), 3, Duration::from_secs(20)).await;
    let series2 = parse(&scrape(running.addr).await);
    let c = "qoder_session_credits_total";
    for (kind, want) in [("model", 2.8), ("sandbox_runtime", 0.6)] {
        let got: f64 = series2
            .iter()
            .filter(|((n, l), _)| n == c && l.iter().any(|(k, v)| k == "kind" && v == kind))
            .map(|(_, v)| v)
            .sum();
        assert!((got - want).abs() < 1e-9, "{kind}: {got} != {want}");
    }
    assert_eq!(
        value(&series2, c, &[("agent", "coordinator"), ("kind", "model")]),
        1.3
    );
    // A session with no events contributes through its object alone.
    assert_eq!(
        value(&series2, c, &[("agent", "solo"), ("kind", "model")]),
        1.5
    );
    assert_eq!(
        value(
            &series2,
            c,
            &[("agent", "solo"), ("kind", "sandbox_runtime")]
        ),
        0.25
    );
    let credits = "qoder_credits_total";
    assert_eq!(
        value(
            &series2,
            credits,
            &[("agent", "coordinator"), ("model", "qwen3-coder")]
        ),
        0.9
    );
    assert_eq!(
        value(
            &series2,
            credits,
            &[("agent", "reviewer"), ("model", "qwen3-coder-flash")]
        ),
        0.4
    );
    let req = "qoder_model_requests_total";
    assert_eq!(
        value(
            &series2,
            req,
            &[("agent", "coordinator"), ("model", "qwen3-coder")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &series2,
            req,
            &[("agent", "reviewer"), ("model", "qwen3-coder-flash")]
        ),
        2.0
    );
    let tok = "qoder_tokens_total";
    assert_eq!(
        value(
            &series2,
            tok,
            &[
                ("agent", "reviewer"),
                ("model", "qwen3-coder-flash"),
                ("token_type", "input")
            ]
        ),
        1500.0
    );
    assert_eq!(
        value(
            &series2,
            tok,
            &[
                ("agent", "coordinator"),
                ("model", "qwen3-coder"),
                ("token_type", "cache_creation")
            ]
        ),
        1000.0
    );
    assert_eq!(
        value(
            &series2,
            "qoder_tool_calls_total",
            &[("agent", "reviewer"), ("tool", "Read")]
        ),
        1.0
    );
    assert_eq!(
        get(&series2, "qoder_tool_calls_total"),
        1.0,
        "the cross-posted use counts once"
    );
    assert_eq!(
        value(
            &series2,
            "qoder_tool_call_errors_total",
            &[("agent", "reviewer"), ("tool", "Read")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &series2,
            "qoder_threads_created_total",
            &[("agent", "reviewer")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &series2,
            "qoder_thread_turns_total",
            &[("agent", "reviewer"), ("stop_reason", "end_turn")]
        ),
        1.0
    );
    let turns = "qoder_turns_total";
    assert_eq!(
        value(
            &series2,
            turns,
            &[("agent", "coordinator"), ("stop_reason", "end_turn")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &series2,
            turns,
            &[("agent", "coordinator"), ("stop_reason", "budget_reached")]
        ),
        1.0
    );
    assert_eq!(
        get(&series2, turns),
        2.0,
        "thread idles are not session turns"
    );
    assert_eq!(
        value(
            &series2,
            "qoder_session_errors_total",
            &[
                ("agent", "coordinator"),
                ("error_type", "model_overloaded_error"),
                ("retry_status", "retrying")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &series2,
            "qoder_server_tool_uses_total",
            &[("agent", "coordinator"), ("tool", "web_search")]
        ),
        2.0
    );
    assert_eq!(
        get(&series2, "qoder_session_active_seconds_total"),
        33.0 + 600.0
    );
    assert_eq!(
        get(&series2, "qoder_events_total"),
        27.0,
        "every event once, by id"
    );
    assert_eq!(
        value(
            &series2,
            "qoder_session_budget_credits",
            &[("session_id", "sesn_multi01")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &series2,
            "qoder_session_credits",
            &[("kind", "sandbox_runtime"), ("session_id", "sesn_plain02")]
        ),
        0.25
    );
    // The sums the account is charged agree with the first settled scrape: nothing doubled.
    assert_eq!(get(&series, c), get(&series2, c));
    running.stop().await.expect("stops");
}
