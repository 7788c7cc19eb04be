//! The Qoder API client: one method per endpoint the exporter reads, each bounded in time and
//! size, retried when the failure is transient, and counted.
//!
//! Retry policy (after the official SDK's): connection errors, timeouts, 408, 429 and 5xx are
//! retried up to [`ClientConfig::retries`] times with `min(0.5 s · 2^n, 8 s)` and 0–25 % jitter,
//! or as long as `Retry-After` / `retry-after-ms` says when that is at most 60 s. Longer waits
//! are handed back to the caller ([`ApiError::retry_after`]) so the poller can park the session
//! instead of holding a worker. Every attempt passes the global rate limiter first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tokio_util::sync::CancellationToken;

use crate::secret::Pat;
use crate::sinks::metrics::ProcessMetrics;
use crate::source::wire::ListCursor;

/// The endpoints, as the `endpoint` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Sessions,
    Session,
    Events,
    ThreadEvents,
    Threads,
    Agent,
}

impl Endpoint {
    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Endpoint::Sessions => "sessions",
            Endpoint::Session => "session",
            Endpoint::Events => "events",
            Endpoint::ThreadEvents => "thread_events",
            Endpoint::Threads => "threads",
            Endpoint::Agent => "agent",
        }
    }
}

/// Most pages of one session's thread list read at once.
const MAX_THREAD_LIST_PAGES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("request timed out")]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(#[source] reqwest::Error),
    /// The TLS handshake failed: an untrusted or wrong certificate, or not TLS at all.
    #[error(
        "TLS handshake failed ({detail}): check the URL's scheme and port, and the server's certificate"
    )]
    Tls { detail: String },
    #[error("token rejected (HTTP 401{})", fmt_type(.error_type))]
    Unauthorized { error_type: Option<String> },
    #[error("HTTP {status}{}{}", fmt_type(.error_type), fmt_message(.message))]
    Status {
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("connection lost while reading the body: {0}")]
    Body(#[source] reqwest::Error),
    #[error("malformed response: {0}")]
    Decode(String),
    #[error("request failed: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("shutting down")]
    Cancelled,
}

fn fmt_type(t: &Option<String>) -> String {
    t.as_ref().map(|t| format!(" {t}")).unwrap_or_default()
}

fn fmt_message(m: &Option<String>) -> String {
    m.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
}

impl ApiError {
    /// The `reason` label of `qoder_exporter_api_request_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Timeout => "timeout",
            ApiError::Connect(_) => "connect",
            ApiError::Tls { .. } => "tls",
            ApiError::Unauthorized { .. } => "status_401",
            ApiError::Status { status, .. } => match status {
                400 => "status_400",
                403 => "status_403",
                404 => "status_404",
                413 => "status_413",
                429 => "status_429",
                // SDK 0.11 `OverloadedError`: retried like a 503, counted apart.
                529 => "status_529",
                500..=599 => "status_5xx",
                _ => "status_4xx",
            },
            ApiError::TooLarge { .. } => "too_large",
            ApiError::Body(_) => "body",
            ApiError::Decode(_) => "decode",
            ApiError::Transport(_) => "transport",
            ApiError::Cancelled => "cancelled",
        }
    }

    /// Worth trying again soon: the server or the network may do better next time.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ApiError::Timeout
            | ApiError::Connect(_)
            | ApiError::Body(_)
            | ApiError::Transport(_)
            | ApiError::Decode(_) => true,
            ApiError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Unauthorized { .. } => Some(401),
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A server-requested wait too long to sit out inside the client.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, e.g. `https://api.qoder.com/api/v1/cloud`.
    pub base_url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub max_body_bytes: usize,
    /// Global request budget; `None` turns the limiter off (benchmarks).
    pub max_requests_per_second: Option<u32>,
    /// First retry delay; doubles per retry up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Sent as `qoder-workspace-id` on every request.
    pub workspace_id: Option<String>,
}

impl ClientConfig {
    /// The client the settings ask for (timeouts, body cap, request budget).
    pub(crate) fn from_settings(s: &crate::config::Settings) -> ClientConfig {
        ClientConfig {
            base_url: s.api_url.clone(),
            timeout: s.request_timeout,
            max_body_bytes: s.max_response_bytes,
            max_requests_per_second: s.max_requests_per_second,
            workspace_id: s.workspace_id.clone(),
            ..ClientConfig::default()
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            base_url: crate::config::DEFAULT_API_URL.to_owned(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retries: 3,
            max_body_bytes: 32 * 1024 * 1024,
            max_requests_per_second: Some(50),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            workspace_id: None,
        }
    }
}

/// A token that can be replaced while requests are in flight (a rotated `--qoder.pat-file`).
#[derive(Debug, Clone)]
pub struct TokenSource(Arc<RwLock<Pat>>);

impl TokenSource {
    pub fn new(pat: Pat) -> TokenSource {
        TokenSource(Arc::new(RwLock::new(pat)))
    }
    pub fn get(&self) -> Pat {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Replaces the token; `true` when it changed.
    pub fn set(&self, pat: Pat) -> bool {
        let mut cur = self.0.write().unwrap_or_else(|e| e.into_inner());
        let changed = *cur != pat;
        *cur = pat;
        changed
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: TokenSource,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    metrics: ProcessMetrics,
    config: ClientConfig,
    cancel: CancellationToken,
    /// The API answered 400 to a listing with filters (`include_archived`, `statuses[]`):
    /// an older API that validates its parameters. Listings go without them from then on.
    filters_refused: Arc<AtomicBool>,
}

/// Which sessions a listing asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListScope {
    /// Every session, archived ones included.
    All,
    /// Only sessions that can still change (`statuses[]` of the live statuses, SDK 0.11):
    /// refreshes what is followed without paging through every ended session.
    Live,
}

/// The statuses of sessions that may still produce events, every generation's names.
const LIVE_STATUSES: [&str; 5] = ["rescheduling", "running", "idle", "canceling", "processing"];

impl Client {
    pub fn new(
        config: ClientConfig,
        token: TokenSource,
        metrics: ProcessMetrics,
        cancel: CancellationToken,
    ) -> anyhow::Result<Client> {
        let mut base = Url::parse(config.base_url.trim_end_matches('/'))
            .map_err(|e| anyhow::anyhow!("--qoder.api-url {:?}: {e}", config.base_url))?;
        if !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!(
                "--qoder.api-url {:?}: scheme must be http or https",
                config.base_url
            );
        }
        // Path joins below append segments; the base must end without a slash.
        let trimmed = base.path().trim_end_matches('/').to_owned();
        base.set_path(&trimmed);
        // The token goes with every request: over plain HTTP to another host, in clear
        // (refused by `Settings` unless --qoder.allow-insecure-http).
        if base.scheme() == "http" && !crate::config::is_this_machine(&base) {
            tracing::warn!(
                api = %shown_url(base.as_str()),
                "--qoder.api-url is plain http:// to a host that is not this machine: the token is sent in clear"
            );
        }
        let mut headers = HeaderMap::new();
        // The events URL answers as an SSE stream to `text/event-stream` (since 2026-08-24).
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(w) = &config.workspace_id {
            let value = HeaderValue::from_str(w).map_err(|_| {
                anyhow::anyhow!("--qoder.workspace-id {w:?}: not a valid header value")
            })?;
            headers.insert("qoder-workspace-id", value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("qoder-exporter/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let limiter = config.max_requests_per_second.and_then(|n| {
            std::num::NonZeroU32::new(n)
                .map(|n| Arc::new(RateLimiter::direct(Quota::per_second(n))))
        });
        Ok(Client {
            http,
            base,
            token,
            limiter,
            metrics,
            config,
            cancel,
            filters_refused: Arc::default(),
        })
    }

    /// Counts a failure found after the transfer (a body that does not decode).
    pub(crate) fn count_failure(&self, endpoint: &str, reason: &str) {
        self.metrics
            .api_failures
            .with_label_values(&[endpoint, reason])
            .inc();
    }

    /// Counts the API breaking its paging rules (see `metrics::API_ANOMALIES`).
    pub(crate) fn count_anomaly(&self, kind: &str) {
        self.metrics.api_anomalies.with_label_values(&[kind]).inc();
    }

    pub fn token(&self) -> &TokenSource {
        &self.token
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// `GET /sessions?limit=100[&page=…|&after_id=…]` (newest first). Never both cursors.
    /// Archived sessions are asked for too (the SDK leaves them out by default, and their
    /// events were billed like any other); `Live` adds `statuses[]`. An API that refuses
    /// the filters (400) is asked again without them, and never with them again.
    pub(crate) async fn list_sessions(
        &self,
        cursor: Option<&ListCursor>,
        scope: ListScope,
    ) -> Result<Bytes, ApiError> {
        let mut q = vec![("limit", "100")];
        match cursor {
            Some(ListCursor::Page(p)) => q.push(("page", p)),
            Some(ListCursor::AfterId(a)) => q.push(("after_id", a)),
            None => {}
        }
        let plain = q.clone();
        if !self.filters_refused.load(Ordering::Relaxed) {
            q.push(("include_archived", "true"));
            if scope == ListScope::Live {
                q.extend(LIVE_STATUSES.iter().map(|s| ("statuses[]", *s)));
            }
            match self
                .get(Endpoint::Sessions, self.url(&["sessions"], &q))
                .await
            {
                // Only a first page's 400 says the filters are refused: a later page's may be
                // about its token or cursor.
                Err(e) if e.status() == Some(400) && cursor.is_none() => {
                    self.filters_refused.store(true, Ordering::Relaxed);
                    tracing::info!(
                        error = %e,
                        "the session list refuses include_archived/statuses[]; listing without them"
                    );
                }
                other => return other,
            }
        }
        self.get(Endpoint::Sessions, self.url(&["sessions"], &plain))
            .await
    }

    /// `GET /sessions/{id}`.
    pub(crate) async fn get_session(&self, id: &str) -> Result<Bytes, ApiError> {
        self.get(Endpoint::Session, self.url(&["sessions", id], &[]))
            .await
    }

    /// `GET /agents/{id}`: an agent's name, for sessions that name their agent by id alone.
    pub(crate) async fn get_agent(&self, id: &str) -> Result<Bytes, ApiError> {
        self.get(Endpoint::Agent, self.url(&["agents", id], &[]))
            .await
    }

    /// Every page of a session's thread list, as the objects the API sent: paged like the SDK
    /// (`next_page` while `has_more`), at most `MAX_THREAD_LIST_PAGES` pages, and a page token
    /// seen twice (a loop) ends it.
    pub(crate) async fn thread_objects(
        &self,
        id: &str,
    ) -> Result<Vec<Box<serde_json::value::RawValue>>, ApiError> {
        let mut out = Vec::new();
        let mut page_token: Option<String> = None;
        let mut visited = std::collections::HashSet::new();
        for _ in 0..MAX_THREAD_LIST_PAGES {
            let body = self.list_threads(id, page_token.as_deref()).await?;
            let page: crate::source::wire::Page<'_> =
                serde_json::from_slice(&body).map_err(|e| {
                    self.count_failure("threads", "decode");
                    ApiError::Decode(e.to_string())
                })?;
            out.extend(page.data.iter().map(|raw| (*raw).to_owned()));
            match page.next_page {
                Some(next) if page.has_more.unwrap_or(false) && visited.insert(next.clone()) => {
                    page_token = Some(next);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// `GET /sessions/{id}/threads?limit=100[&page=…]`: a session's threads (SDK 0.11).
    pub(crate) async fn list_threads(
        &self,
        id: &str,
        page: Option<&str>,
    ) -> Result<Bytes, ApiError> {
        let mut q = vec![("limit", "100")];
        if let Some(p) = page {
            q.push(("page", p));
        }
        self.get(
            Endpoint::Threads,
            self.url(&["sessions", id, "threads"], &q),
        )
        .await
    }

    /// `GET /sessions/{id}/events?limit=100[&after_id=…]` (oldest first). Never more than one
    /// cursor: the API answers 400 to a combination.
    pub(crate) async fn list_events(
        &self,
        id: &str,
        after_id: Option<&str>,
    ) -> Result<Bytes, ApiError> {
        let mut q = vec![("limit", "100")];
        if let Some(a) = after_id {
            q.push(("after_id", a));
        }
        self.get(Endpoint::Events, self.url(&["sessions", id, "events"], &q))
            .await
    }

    /// `GET /sessions/{id}/threads/{tid}/events?limit=100[&after_id=…]` (oldest first).
    pub(crate) async fn list_thread_events(
        &self,
        id: &str,
        thread: &str,
        after_id: Option<&str>,
    ) -> Result<Bytes, ApiError> {
        let mut q = vec![("limit", "100")];
        if let Some(a) = after_id {
            q.push(("after_id", a));
        }
        self.get(
            Endpoint::ThreadEvents,
            self.url(&["sessions", id, "threads", thread, "events"], &q),
        )
        .await
    }

    async fn get(&self, endpoint: Endpoint, url: Url) -> Result<Bytes, ApiError> {
        let mut attempt = 0;
        loop {
            let result = self.attempt(endpoint, &url).await;
            let err = match result {
                Ok(body) => return Ok(body),
                Err(e) => e,
            };
            let wait = match err.retry_after() {
                Some(w) if w > Duration::from_secs(60) => return Err(err),
                Some(w) => w,
                None => backoff(self.config.base_backoff, self.config.max_backoff, attempt),
            };
            if !err.is_transient() || attempt >= self.config.retries {
                return Err(err);
            }
            attempt += 1;
            tracing::debug!(endpoint = endpoint.as_label(), attempt, ?wait, error = %err, "retrying");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.cancel.cancelled() => return Err(ApiError::Cancelled),
            }
        }
    }

    async fn attempt(&self, endpoint: Endpoint, url: &Url) -> Result<Bytes, ApiError> {
        if let Some(l) = &self.limiter {
            tokio::select! {
                () = l.until_ready() => {}
                () = self.cancel.cancelled() => return Err(ApiError::Cancelled),
            }
        }
        let label = endpoint.as_label();
        self.metrics.api_requests.with_label_values(&[label]).inc();
        let started = Instant::now();
        let result = tokio::select! {
            r = self.send(url) => r,
            () = self.cancel.cancelled() => Err(ApiError::Cancelled),
        };
        self.metrics
            .api_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result
            && !matches!(e, ApiError::Cancelled)
        {
            self.metrics
                .api_failures
                .with_label_values(&[label, e.reason()])
                .inc();
        }
        result
    }

    async fn send(&self, url: &Url) -> Result<Bytes, ApiError> {
        let mut auth = HeaderValue::try_from(format!("Bearer {}", self.token.get().expose()))
            .map_err(|_| ApiError::Unauthorized {
                error_type: Some("token_not_a_header_value".to_owned()),
            })?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .get(url.clone())
            .header(AUTHORIZATION, auth)
            .send()
            .await
            .map_err(classify)?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let body = self.read_body(resp).await?;
        if status.is_success() {
            return Ok(body);
        }
        let (error_type, message) = error_envelope(&body);
        // What the API says goes to the logs: never the token, never a forged line.
        let token = self.token.get();
        let clean = |s: Option<String>| s.map(|s| log_safe(&s, token.expose()));
        let (error_type, message) = (clean(error_type), clean(message));
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized { error_type });
        }
        Err(ApiError::Status {
            status: status.as_u16(),
            error_type,
            message,
            retry_after,
        })
    }

    async fn read_body(&self, mut resp: reqwest::Response) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(ApiError::TooLarge { limit });
        }
        let mut buf = BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > limit {
                        return Err(ApiError::TooLarge { limit });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(buf.freeze()),
                Err(e) if e.is_timeout() => return Err(ApiError::Timeout),
                Err(e) => return Err(ApiError::Body(e)),
            }
        }
    }
}

fn classify(e: reqwest::Error) -> ApiError {
    if let Some(detail) = tls_failure(&e) {
        ApiError::Tls { detail }
    } else if e.is_timeout() {
        ApiError::Timeout
    } else if e.is_connect() {
        ApiError::Connect(e)
    } else {
        ApiError::Transport(e)
    }
}

/// The rustls error somewhere in `e`'s causes. An `io::Error` hides what it wraps from
/// `source()`, so its inner error is followed too.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => c.source(),
        };
    }
    None
}

/// `{"type":"error","error":{"type":…,"message":…}}`, when the body is one.
fn error_envelope(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(rename = "type")]
        kind: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error: Some(i) }) => (i.kind, i.message.map(|m| truncate(&m, 200))),
        _ => (None, None),
    }
}

/// The API URL as logs and the landing page show it: without credentials written into it.
pub(crate) fn shown_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            format!("{u} (credentials in the URL not shown)")
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// Text from the API made safe to log: the token (which a hostile or buggy server may echo
/// back) becomes `[redacted]`, control characters (newlines that would forge a log line, ANSI
/// escapes) are shown escaped, and the length is bounded.
pub(crate) fn log_safe(s: &str, token: &str) -> String {
    let s = if token.len() >= 4 {
        s.replace(token, "[redacted]")
    } else {
        s.to_owned()
    };
    let mut escaped = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    truncate(&escaped, 200)
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// `retry-after-ms`, else `Retry-After` in seconds or as an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `min(base · 2^attempt, max)` with 0–25 % jitter subtracted, so retries of many sessions
/// spread out instead of arriving together.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let capped = exp.min(max);
    capped.mul_f64(1.0 - fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_with_jitter() {
        let b = Duration::from_millis(500);
        let m = Duration::from_secs(8);
        for attempt in 0..10 {
            let d = backoff(b, m, attempt);
            let full = (b * 2u32.pow(attempt)).min(m);
            assert!(
                d <= full && d >= full.mul_f64(0.75),
                "{attempt}: {d:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn retry_after_in_all_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert(
            RETRY_AFTER,
            HeaderValue::try_from(httpdate::fmt_http_date(later)).expect("hv"),
        );
        let d = retry_after(&h).expect("date");
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.clear();
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn credentials_in_the_api_url_are_not_shown() {
        let shown = shown_url("https://user:hunter2@api.qoder.com/api/v1/cloud");
        assert!(
            !shown.contains("hunter2") && !shown.contains("user@"),
            "{shown}"
        );
        assert!(
            shown.starts_with("https://api.qoder.com/api/v1/cloud"),
            "{shown}"
        );
        assert_eq!(
            shown_url("https://api.qoder.com/api/v1/cloud"),
            "https://api.qoder.com/api/v1/cloud"
        );
    }

    #[test]
    fn what_the_api_says_is_logged_safely() {
        let token = "pt-SECRET-0123456789";
        let said =
            format!("bad token {token}\n2026-11-30T00:00:00Z INFO forged line \u{1b}[31mred");
        let safe = log_safe(&said, token);
        assert!(!safe.contains(token), "{safe}");
        assert!(safe.contains("[redacted]"));
        assert!(!safe.contains('\n') && !safe.contains('\u{1b}'), "{safe}");
        assert!(safe.contains("\\n2026"), "{safe}");
    }

    #[test]
    fn error_envelope_is_read_and_bounded() {
        let (t, m) = error_envelope(
            br#"{"type":"error","error":{"type":"not_found_error","message":"no such session"}}"#,
        );
        assert_eq!(
            (t.as_deref(), m.as_deref()),
            (Some("not_found_error"), Some("no such session"))
        );
        assert_eq!(error_envelope(b"<html>"), (None, None));
        let long = "x".repeat(500);
        let body = format!(r#"{{"error":{{"message":"{long}"}}}}"#);
        assert_eq!(
            error_envelope(body.as_bytes()).1.map(|m| m.chars().count()),
            Some(201)
        );
    }

    #[test]
    fn every_reason_is_pre_created() {
        use crate::sinks::metrics::FAILURE_REASONS;
        for status in [400, 403, 404, 408, 413, 418, 429, 500, 503, 529] {
            let e = ApiError::Status {
                status,
                error_type: None,
                message: None,
                retry_after: None,
            };
            assert!(FAILURE_REASONS.contains(&e.reason()), "{status}");
        }
        for e in [
            ApiError::Timeout,
            ApiError::Unauthorized { error_type: None },
            ApiError::TooLarge { limit: 1 },
            ApiError::Decode("x".into()),
        ] {
            assert!(FAILURE_REASONS.contains(&e.reason()), "{e}");
        }
    }

    /// A server that does not speak TLS behind an `https://` URL: a TLS failure, counted as
    /// `reason="tls"`, not as a connection failure.
    #[tokio::test]
    async fn a_tls_failure_has_its_own_reason() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let registry = prometheus::Registry::new();
        let metrics = ProcessMetrics::register(&registry).expect("metrics");
        let client = Client::new(
            ClientConfig {
                base_url: format!("https://{addr}/api/v1/cloud"),
                retries: 0,
                max_requests_per_second: None,
                ..ClientConfig::default()
            },
            TokenSource::new(Pat::new("pt-x").expect("pat")),
            metrics.clone(),
            CancellationToken::new(),
        )
        .expect("client");
        let e = client.get_session("sess_1").await.expect_err("not TLS");
        assert_eq!(e.reason(), "tls", "{e}");
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
        assert_eq!(
            metrics
                .api_failures
                .with_label_values(&["session", "tls"])
                .get(),
            1
        );
    }

    #[test]
    fn reasons_are_a_small_fixed_set() {
        let s = |status| ApiError::Status {
            status,
            error_type: None,
            message: None,
            retry_after: None,
        };
        assert_eq!(s(503).reason(), "status_5xx");
        assert_eq!(s(429).reason(), "status_429");
        assert_eq!(s(418).reason(), "status_4xx");
        assert!(s(429).is_transient() && s(502).is_transient() && !s(404).is_transient());
        assert!(!ApiError::Unauthorized { error_type: None }.is_transient());
    }
}
