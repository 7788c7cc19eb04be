//! A simulated Qoder Cloud Agents API on loopback, for `qoder-exporter demo` and the tests.
//!
//! It follows the documented pagination exactly (events oldest first, sessions newest first,
//! `limit` default 20 and at most 100, `after_id`/`before_id`/`page` mutually exclusive, 400 on
//! an unknown cursor, `{data, first_id, last_id, has_more}`), checks the bearer token like the
//! real API (401 with the error envelope) and can inject every fault the exporter must survive.
//! Events become visible as a clock advances, so a log can grow while it is read.

pub mod scenario;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use scenario::{
    Generation, ScenarioConfig, SimEvent, SimSession, SimThread, Totals, agent_object, generate,
};

/// The faults the simulator can inject, each on a share of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    Status502,
    Status503,
    Status504,
    /// 429 with `Retry-After: 1`.
    RateLimitedSeconds,
    /// 429 with `Retry-After` as an HTTP date one second ahead.
    RateLimitedDate,
    /// 429 without any hint.
    RateLimitedBare,
    /// 200 whose body stops half-way.
    Truncated,
    /// 200 with an HTML body.
    NotJson,
    /// 200 with JSON of the wrong shape.
    WrongShape,
    /// 200 with an empty body.
    Empty,
    /// Answers after `slow_delay` (past the client's timeout in the tests).
    Slow,
    /// Sends part of the body, then drops the connection.
    Reset,
}

impl Fault {
    pub const ALL: [Fault; 13] = [
        Fault::Status500,
        Fault::Status502,
        Fault::Status503,
        Fault::Status504,
        Fault::RateLimitedSeconds,
        Fault::RateLimitedDate,
        Fault::RateLimitedBare,
        Fault::Truncated,
        Fault::NotJson,
        Fault::WrongShape,
        Fault::Empty,
        Fault::Slow,
        Fault::Reset,
    ];
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub scenario: ScenarioConfig,
    /// The token the API accepts.
    pub token: String,
    /// Share of requests (0..=1) that get a fault, drawn at random (seeded by `fault_seed`).
    pub fault_rate: f64,
    /// Instead of `fault_rate`: every this many requests, one gets the next fault of `faults`
    /// in turn, so a run of N requests has N / every faults, each kind as often as the others.
    pub fault_every: Option<u64>,
    pub faults: Vec<Fault>,
    pub fault_seed: u64,
    pub slow_delay: Duration,
    /// Advance the clock one step per this interval (live mode); `None`: tests drive it.
    pub step_interval: Option<Duration>,
    /// Page the session list as SDK 0.11 does: an opaque `next_page` token, `page=` to follow
    /// it, and `after_id` ignored (the first page again), with at most this many a page.
    pub session_page_tokens: Option<usize>,
    /// Serve `GET /agents/{id}` (off: 404, as an API without agent objects answers).
    pub agents_endpoint: bool,
    /// The first thread list asked for is cut short (a body that does not decode).
    pub break_first_thread_list: bool,
    /// A session's event list misbehaves: it ignores `after_id` (every page is the first),
    /// or, from the end of the second page on, leads back to the first page (a cycle).
    pub events_cursor: EventsCursor,
    /// Answer 400 to a session listing with `include_archived` or `statuses[]` (an API that
    /// validates its parameters and knows neither).
    pub reject_list_filters: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            scenario: ScenarioConfig::default(),
            token: "pt-sim-token".to_owned(),
            fault_rate: 0.0,
            fault_every: None,
            faults: Fault::ALL.to_vec(),
            fault_seed: 1,
            slow_delay: Duration::from_secs(3),
            step_interval: None,
            session_page_tokens: None,
            agents_endpoint: true,
            break_first_thread_list: false,
            events_cursor: EventsCursor::Honoured,
            reject_list_filters: false,
        }
    }
}

/// How the simulated event list treats `after_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsCursor {
    Honoured,
    /// Ignored: every page is the first one.
    Ignored,
    /// Honoured up to the end of the second page; from there it leads back to the first.
    Cycle,
    /// Honoured, but a page that starts 100 or more events into the stream starts with the
    /// event 100 before it again (beyond any window of recent ids a reader may keep).
    Echo,
}

/// Request counts the tests check the exporter's manners by.
#[derive(Debug, Default)]
pub struct Stats {
    pub sessions_requests: AtomicU64,
    pub session_requests: AtomicU64,
    pub events_requests: AtomicU64,
    pub thread_events_requests: AtomicU64,
    pub threads_requests: AtomicU64,
    pub agent_requests: AtomicU64,
    pub list_filters_refused: AtomicU64,
    pub unauthorized: AtomicU64,
    pub faults: AtomicU64,
    /// Requests that asked for an SSE stream from the list endpoint.
    pub accept_violations: AtomicU64,
    /// Requests with more than one cursor, or a limit over 100.
    pub param_violations: AtomicU64,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// TCP connections accepted (keep-alive: far fewer than requests).
    pub connections: AtomicU64,
}

impl Stats {
    pub fn total(&self) -> u64 {
        self.by_endpoint().iter().map(|(_, n)| n).sum()
    }

    /// Requests so far per endpoint, named as the exporter's `endpoint` label names them.
    pub fn by_endpoint(&self) -> [(&'static str, u64); 6] {
        [
            ("sessions", &self.sessions_requests),
            ("session", &self.session_requests),
            ("events", &self.events_requests),
            ("thread_events", &self.thread_events_requests),
            ("threads", &self.threads_requests),
            ("agent", &self.agent_requests),
        ]
        .map(|(name, n)| (name, n.load(Ordering::Relaxed)))
    }
}

#[derive(Debug)]
struct SimState {
    sessions: Vec<SimSession>,
    index: HashMap<String, usize>,
    token: Mutex<String>,
    clock: AtomicU64,
    faults_on: AtomicBool,
    fault_rate: f64,
    fault_every: Option<u64>,
    /// Requests that could get a fault so far (the schedule's clock).
    fault_ticks: AtomicU64,
    faults: Vec<Fault>,
    rng: Mutex<fastrand::Rng>,
    slow_delay: Duration,
    refuse_next_cursor: AtomicBool,
    refuse_next_thread_cursor: AtomicBool,
    /// Serve event pages of up to 2 500 whatever the `limit` (a misbehaving API).
    oversize_pages: AtomicBool,
    session_page_tokens: Option<usize>,
    agents_endpoint: bool,
    reject_list_filters: bool,
    break_thread_list: AtomicBool,
    events_cursor: EventsCursor,
    stats: Stats,
}

/// A running simulator.
#[derive(Debug, Clone)]
pub struct Sim {
    state: Arc<SimState>,
    pub addr: SocketAddr,
    pub totals: Arc<Totals>,
    cancel: CancellationToken,
}

impl Sim {
    /// Generates the scenario and serves it on `addr` (use port 0 for any free port).
    pub async fn start(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<Sim> {
        let (sessions, totals) = generate(&cfg.scenario);
        let index = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let state = Arc::new(SimState {
            sessions,
            index,
            token: Mutex::new(cfg.token),
            clock: AtomicU64::new(0),
            faults_on: AtomicBool::new(cfg.fault_rate > 0.0 || cfg.fault_every.is_some()),
            fault_rate: cfg.fault_rate,
            fault_every: cfg.fault_every.filter(|n| *n > 0),
            fault_ticks: AtomicU64::new(0),
            faults: cfg.faults,
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.fault_seed)),
            slow_delay: cfg.slow_delay,
            refuse_next_cursor: AtomicBool::new(false),
            refuse_next_thread_cursor: AtomicBool::new(false),
            oversize_pages: AtomicBool::new(false),
            session_page_tokens: cfg.session_page_tokens,
            agents_endpoint: cfg.agents_endpoint,
            reject_list_filters: cfg.reject_list_filters,
            break_thread_list: AtomicBool::new(cfg.break_first_thread_list),
            events_cursor: cfg.events_cursor,
            stats: Stats::default(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let app = router(state.clone());
        let c = cancel.clone();
        let counted = state.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_tcp| {
            counted.stats.connections.fetch_add(1, Ordering::Relaxed);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(c.cancelled_owned())
                .await;
        });
        if let Some(every) = cfg.step_interval {
            let st = state.clone();
            let c = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { st.clock.fetch_add(1, Ordering::Relaxed); }
                        () = c.cancelled() => break,
                    }
                }
            });
        }
        Ok(Sim {
            state,
            addr,
            totals: Arc::new(totals),
            cancel,
        })
    }

    /// The API base URL to give the exporter.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1/cloud", self.addr)
    }

    pub fn token(&self) -> String {
        self.state
            .token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the accepted token (a rotation).
    pub fn set_token(&self, token: &str) {
        *self.state.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
    }

    pub fn sessions(&self) -> &[SimSession] {
        &self.state.sessions
    }

    /// Makes every event visible.
    pub fn release_all(&self) {
        self.state.clock.store(u64::MAX, Ordering::Relaxed);
    }

    /// Makes events up to `step` visible.
    pub fn set_clock(&self, step: u64) {
        self.state.clock.store(step, Ordering::Relaxed);
    }

    pub fn clock(&self) -> u64 {
        self.state.clock.load(Ordering::Relaxed)
    }

    /// The step at which the last event appears.
    pub fn last_step(&self) -> u64 {
        self.state
            .sessions
            .iter()
            .flat_map(|s| s.events.last())
            .map(|e| e.step)
            .max()
            .unwrap_or(0)
    }

    /// The next events request with a cursor gets 400 (a cursor the API no longer knows).
    /// From now on, event pages ignore `limit` and hold up to 2 500 events.
    pub fn set_oversize_pages(&self, on: bool) {
        self.state.oversize_pages.store(on, Ordering::Relaxed);
    }

    /// The next thread-events request that carries a cursor gets a 400.
    pub fn refuse_next_thread_cursor(&self) {
        self.state
            .refuse_next_thread_cursor
            .store(true, Ordering::Relaxed);
    }

    pub fn refuse_next_cursor(&self) {
        self.state.refuse_next_cursor.store(true, Ordering::Relaxed);
    }

    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/api/v1/cloud/sessions", get(list_sessions))
        .route("/api/v1/cloud/sessions/{id}", get(get_session))
        .route("/api/v1/cloud/sessions/{id}/events", get(list_events))
        .route("/api/v1/cloud/sessions/{id}/threads", get(list_threads))
        .route(
            "/api/v1/cloud/sessions/{id}/threads/{tid}/events",
            get(list_thread_events),
        )
        .route("/api/v1/cloud/agents/{id}", get(get_agent))
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "request_id": "req_sim", "error": {"type": kind, "message": message}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Counts and checks a request; `Err` is the response to send instead of the real one.
async fn admit<'a>(
    st: &'a SimState,
    headers: &HeaderMap,
    counter: &AtomicU64,
) -> Result<InFlight<'a>, Response> {
    counter.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight::new(&st.stats);
    let token = st.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {token}")) {
        st.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Invalid API key or token.",
        ));
    }
    if let Some(fault) = pick_fault(st) {
        st.stats.faults.fetch_add(1, Ordering::Relaxed);
        return Err(fault_response(st, fault).await);
    }
    Ok(guard)
}

struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn new(stats: &'a Stats) -> InFlight<'a> {
        let n = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(n, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn pick_fault(st: &SimState) -> Option<Fault> {
    if !st.faults_on.load(Ordering::Relaxed) || st.faults.is_empty() {
        return None;
    }
    if let Some(every) = st.fault_every {
        let n = st.fault_ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let k = usize::try_from(n / every).unwrap_or(0);
        return n
            .is_multiple_of(every)
            .then(|| st.faults[(k - 1) % st.faults.len()]);
    }
    let mut rng = st.rng.lock().unwrap_or_else(|e| e.into_inner());
    (rng.f64() < st.fault_rate).then(|| st.faults[rng.usize(0..st.faults.len())])
}

async fn fault_response(st: &SimState, fault: Fault) -> Response {
    let json_ct = [(header::CONTENT_TYPE, "application/json")];
    match fault {
        Fault::Status500 => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal error",
        ),
        Fault::Status502 => (StatusCode::BAD_GATEWAY, "bad gateway").into_response(),
        Fault::Status503 => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            "try later",
        ),
        Fault::Status504 => (StatusCode::GATEWAY_TIMEOUT, "").into_response(),
        Fault::RateLimitedSeconds => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "",
        )
            .into_response(),
        Fault::RateLimitedDate => {
            let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(1));
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, at)],
                "",
            )
                .into_response()
        }
        Fault::RateLimitedBare => (StatusCode::TOO_MANY_REQUESTS, "").into_response(),
        Fault::Truncated => (
            StatusCode::OK,
            json_ct,
            r#"{"data":[{"id":"evt_x","type":"user.mess"#,
        )
            .into_response(),
        Fault::NotJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html>gateway</html>",
        )
            .into_response(),
        Fault::WrongShape => (
            StatusCode::OK,
            json_ct,
            r#"{"data":"nope","has_more":"maybe"}"#,
        )
            .into_response(),
        Fault::Empty => (StatusCode::OK, json_ct, "").into_response(),
        Fault::Slow => {
            tokio::time::sleep(st.slow_delay).await;
            error(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", "slow")
        }
        Fault::Reset => {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
                Ok(br#"{"data":[{"id":"evt_partial","#.to_vec()),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                )),
            ];
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, "4096")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

/// `limit` (default 20, at most 100) and the one cursor allowed.
#[allow(
    clippy::result_large_err,
    reason = "the error is the response itself, built once per request"
)]
fn paging(
    st: &SimState,
    q: &HashMap<String, String>,
) -> Result<(usize, Option<String>, Option<String>), Response> {
    let limit = match q.get("limit") {
        None => 20,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                st.stats.param_violations.fetch_add(1, Ordering::Relaxed);
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "limit must be 1..100",
                ));
            }
        },
    };
    let cursors = ["after_id", "before_id", "page"]
        .iter()
        .filter(|c| q.contains_key(**c))
        .count();
    if cursors > 1 {
        st.stats.param_violations.fetch_add(1, Ordering::Relaxed);
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "page, after_id and before_id are mutually exclusive",
        ));
    }
    Ok((
        limit,
        q.get("after_id").cloned(),
        q.get("before_id").cloned(),
    ))
}

/// The page a cursor selects: after `after` (forward), or the `limit` records just before
/// `before`, or the first `limit`; with whether more records lie that way. An unknown cursor
/// is a 400, as on the real API.
#[allow(
    clippy::result_large_err,
    reason = "the error is the response itself, built once per request"
)]
fn cursor_slice<'a, T>(
    visible: &'a [T],
    id_of: impl Fn(&T) -> &str,
    after: Option<&str>,
    before: Option<&str>,
    limit: usize,
) -> Result<(&'a [T], bool), Response> {
    let find = |cursor: &str, name: &str| {
        visible
            .iter()
            .position(|x| id_of(x) == cursor)
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("{name} is not a known id"),
                )
            })
    };
    Ok(match (after, before) {
        (Some(a), _) => {
            let start = find(a, "after_id")? + 1;
            let end = (start + limit).min(visible.len());
            (&visible[start..end], end < visible.len())
        }
        (_, Some(b)) => {
            let end = find(b, "before_id")?;
            let start = end.saturating_sub(limit);
            (&visible[start..end], start > 0)
        }
        _ => {
            let end = limit.min(visible.len());
            (&visible[..end], end < visible.len())
        }
    })
}

fn status_of(s: &SimSession, clock: u64) -> &'static str {
    let visible = s.events.iter().filter(|e| e.step <= clock).count();
    if visible == s.events.len() {
        return if s.terminal { "terminated" } else { "idle" };
    }
    let last = s.events[..visible].last().map_or(0, |e| e.step);
    if s.idle_steps.contains(&last) || visible == 0 {
        "idle"
    } else {
        "running"
    }
}

/// An ended session is archived once all of its events are out.
fn archived(s: &SimSession, clock: u64) -> bool {
    s.object.contains_key("archived_at") && s.events.iter().all(|e| e.step <= clock)
}

fn session_object(s: &SimSession, clock: u64) -> Value {
    let mut o = s.object.clone();
    if !archived(s, clock) {
        o.remove("archived_at");
    }
    let status = status_of(s, clock);
    let status = match (s.generation, status) {
        (Generation::G1 | Generation::G2, "running") => "processing",
        (_, st) => st,
    };
    o.insert("status".into(), json!(status));
    if let Some((_, usage)) = s.usage.iter().rev().find(|(step, _)| *step <= clock) {
        o.insert("usage".into(), usage.clone());
    }
    // `updated_at` moves when an event becomes visible (as the API's does on activity).
    o.insert(
        "updated_at".into(),
        json!(updated_at(&s.events, clock, s.created_step)),
    );
    Value::Object(o)
}

/// The time of the last event of `events` visible at `clock` (else of step `created`).
fn updated_at(events: &[SimEvent], clock: u64, created: u64) -> String {
    let seen = events.partition_point(|e| e.step <= clock);
    let step = events[..seen].last().map_or(created, |e| e.step);
    time::OffsetDateTime::from_unix_timestamp(1_763_625_600 + i64::try_from(step).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn page(items: Vec<String>, ids: &[&str], has_more: bool) -> Response {
    let first = ids.first().map_or(Value::Null, |i| json!(i));
    let last = ids.last().map_or(Value::Null, |i| json!(i));
    let body = format!(
        r#"{{"data":[{}],"first_id":{first},"last_id":{last},"has_more":{has_more}}}"#,
        items.join(",")
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn list_sessions(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let _g = match admit(&st, &headers, &st.stats.sessions_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let statuses: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "statuses[]")
        .map(|(_, v)| v.as_str())
        .collect();
    let include_archived = pairs
        .iter()
        .any(|(k, v)| k == "include_archived" && v == "true");
    let filtered = include_archived || !statuses.is_empty();
    if filtered && st.reject_list_filters {
        st.stats
            .list_filters_refused
            .fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unknown query parameter",
        );
    }
    let q: HashMap<String, String> = pairs.iter().cloned().collect();
    let (limit, after, before) = match paging(&st, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let clock = st.clock.load(Ordering::Relaxed);
    // Newest first. The SDK 0.11 list (token paging) leaves archived sessions out unless
    // asked, and honours `statuses[]`; the older list ignores both.
    let sdk_list = st.session_page_tokens.is_some();
    let visible: Vec<&SimSession> = st
        .sessions
        .iter()
        .rev()
        .filter(|s| s.created_step <= clock)
        .filter(|s| !sdk_list || include_archived || !archived(s, clock))
        .filter(|s| !sdk_list || statuses.is_empty() || statuses.contains(&status_of(s, clock)))
        .collect();
    if let Some(size) = st.session_page_tokens {
        return token_page(
            &visible,
            q.get("page").map(String::as_str),
            limit.min(size),
            clock,
        );
    }
    let (slice, has_more) = match cursor_slice(
        &visible,
        |s| &s.id,
        after.as_deref(),
        before.as_deref(),
        limit,
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let items = slice
        .iter()
        .map(|s| session_object(s, clock).to_string())
        .collect();
    let ids: Vec<&str> = slice.iter().map(|s| s.id.as_str()).collect();
    page(items, &ids, has_more)
}

/// A page of the session list in the SDK 0.11 style: `page` is the opaque token of the
/// previous page (here, the offset it starts at, disguised), `after_id` is not understood.
fn token_page(visible: &[&SimSession], page: Option<&str>, limit: usize, clock: u64) -> Response {
    let start = match page.map(|p| p.strip_prefix("pg_").and_then(|n| n.parse::<usize>().ok())) {
        None => 0,
        Some(Some(n)) if n <= visible.len() => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "page is not a valid page token",
            );
        }
    };
    let end = (start + limit).min(visible.len());
    let slice = &visible[start..end];
    let items: Vec<String> = slice
        .iter()
        .map(|s| session_object(s, clock).to_string())
        .collect();
    let has_more = end < visible.len();
    let body = json!({
        "data": items.iter().map(|i| serde_json::from_str::<Value>(i).unwrap_or(Value::Null)).collect::<Vec<_>>(),
        "first_id": slice.first().map(|s| s.id.clone()),
        "last_id": slice.last().map(|s| s.id.clone()),
        "has_more": has_more,
        "next_page": has_more.then(|| format!("pg_{end}")),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn get_session(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let _g = match admit(&st, &headers, &st.stats.session_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let clock = st.clock.load(Ordering::Relaxed);
    match visible_session(&st, &id, clock) {
        Some(s) => (
            [(header::CONTENT_TYPE, "application/json")],
            session_object(s, clock).to_string(),
        )
            .into_response(),
        None => session_not_found(),
    }
}

async fn list_events(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
    {
        st.stats.accept_violations.fetch_add(1, Ordering::Relaxed);
    }
    let _g = match admit(&st, &headers, &st.stats.events_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let (mut limit, after, before) = match paging(&st, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if st.oversize_pages.load(Ordering::Relaxed) {
        limit = 2500;
    }
    let clock = st.clock.load(Ordering::Relaxed);
    let Some(s) = visible_session(&st, &id, clock) else {
        return session_not_found();
    };
    if after.is_some() && st.refuse_next_cursor.swap(false, Ordering::Relaxed) {
        return refused_cursor();
    }
    let after = match st.events_cursor {
        EventsCursor::Honoured | EventsCursor::Echo => after,
        EventsCursor::Ignored => None,
        EventsCursor::Cycle => after.filter(|a| {
            s.events
                .iter()
                .position(|e| e.id == *a)
                .is_none_or(|i| i + 1 < 2 * limit)
        }),
    };
    let echo = st.events_cursor == EventsCursor::Echo;
    events_page(
        &s.events,
        clock,
        after.as_deref(),
        before.as_deref(),
        limit,
        echo,
    )
}

/// The session `id` if it exists at `clock`.
fn visible_session<'a>(st: &'a SimState, id: &str, clock: u64) -> Option<&'a SimSession> {
    st.index
        .get(id)
        .map(|i| &st.sessions[*i])
        .filter(|s| s.created_step <= clock)
}

/// The API's 404 for a session it does not have.
fn session_not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "session not found",
    )
}

/// The 400 the API answers to an event cursor it does not know.
fn refused_cursor() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "after_id is not a known event",
    )
}

/// The page of a stream's events visible at `clock` that a cursor selects.
fn events_page(
    events: &[SimEvent],
    clock: u64,
    after: Option<&str>,
    before: Option<&str>,
    limit: usize,
    echo: bool,
) -> Response {
    let visible: Vec<_> = events.iter().filter(|e| e.step <= clock).collect();
    let (slice, has_more) = match cursor_slice(&visible, |e| &e.id, after, before, limit) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut page_events: Vec<&SimEvent> = slice.to_vec();
    let start = slice
        .first()
        .and_then(|f| visible.iter().position(|e| e.id == f.id));
    if echo && let Some(start) = start.filter(|s| *s >= 100) {
        page_events.insert(0, visible[start - 100]);
    }
    let items = page_events.iter().map(|e| e.json.clone()).collect();
    let ids: Vec<&str> = page_events.iter().map(|e| e.id.as_str()).collect();
    page(items, &ids, has_more)
}

/// `GET /sessions/{id}/threads`: the primary thread (no parent) and every sub-agent thread
/// created by now, each with an `updated_at` that moves with its stream. One page.
async fn list_threads(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let _g = match admit(&st, &headers, &st.stats.threads_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if st.break_thread_list.swap(false, Ordering::Relaxed) {
        return fault_response(&st, Fault::Truncated).await;
    }
    let clock = st.clock.load(Ordering::Relaxed);
    let Some(s) = visible_session(&st, &id, clock) else {
        return session_not_found();
    };
    let primary = json!({
        "id": "sthr_main", "type": "session_thread", "session_id": s.id,
        "parent_thread_id": null, "agent": s.object.get("agent"),
        "updated_at": updated_at(&s.events, clock, s.created_step),
    });
    let mut items = vec![primary.to_string()];
    let mut ids = vec!["sthr_main"];
    for t in &s.threads {
        let Some(first) = t.events.first().filter(|e| e.step <= clock) else {
            continue;
        };
        items.push(
            json!({
                "id": t.id, "type": "session_thread", "session_id": s.id,
                "parent_thread_id": "sthr_main", "status": "idle",
                "agent": {"name": t.agent, "type": "agent"},
                "updated_at": updated_at(&t.events, clock, first.step),
            })
            .to_string(),
        );
        ids.push(&t.id);
    }
    page(items, &ids, false)
}

/// `GET /agents/{id}`: the agent object (name and model), or 404 when switched off.
async fn get_agent(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let _g = match admit(&st, &headers, &st.stats.agent_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    match agent_object(&id).filter(|_| st.agents_endpoint) {
        Some(agent) => (
            [(header::CONTENT_TYPE, "application/json")],
            agent.to_string(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found_error", "agent not found"),
    }
}

/// `GET /sessions/{id}/threads/{tid}/events`: a sub-agent thread's own stream.
async fn list_thread_events(
    State(st): State<Arc<SimState>>,
    headers: HeaderMap,
    Path((id, tid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let _g = match admit(&st, &headers, &st.stats.thread_events_requests).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let (limit, after, before) = match paging(&st, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let clock = st.clock.load(Ordering::Relaxed);
    let Some(thread) =
        visible_session(&st, &id, clock).and_then(|s| s.threads.iter().find(|t| t.id == tid))
    else {
        return error(StatusCode::NOT_FOUND, "not_found_error", "thread not found");
    };
    if after.is_some() && st.refuse_next_thread_cursor.swap(false, Ordering::Relaxed) {
        return refused_cursor();
    }
    events_page(
        &thread.events,
        clock,
        after.as_deref(),
        before.as_deref(),
        limit,
        st.events_cursor == EventsCursor::Echo,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_select_the_documented_pages() {
        let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
        let page = |after: Option<&str>, before: Option<&str>, limit| {
            let (s, more) =
                cursor_slice(&ids, |s| s.as_str(), after, before, limit).expect("known cursor");
            (s.join(","), more)
        };
        assert_eq!(page(None, None, 4), ("e0,e1,e2,e3".into(), true));
        assert_eq!(page(Some("e3"), None, 4), ("e4,e5,e6,e7".into(), true));
        assert_eq!(page(Some("e7"), None, 4), ("e8,e9".into(), false));
        assert_eq!(page(Some("e9"), None, 4), (String::new(), false));
        assert_eq!(page(None, Some("e5"), 4), ("e1,e2,e3,e4".into(), true));
        assert_eq!(page(None, Some("e2"), 4), ("e0,e1".into(), false));
        assert!(cursor_slice(&ids, |s| s.as_str(), Some("nope"), None, 4).is_err());
    }
}
