//! The HTTP side: `/metrics` (or `--web.telemetry-path`), a landing page at `/`, `/healthz`
//! and `/readyz`. It reads the metrics registry and the readiness flag and nothing else: it
//! never reaches into the poller.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus::core::Collector;
use std::sync::Mutex;
use tokio::sync::watch;

use crate::sinks::metrics::{Exposition, Metrics};
use crate::web_config::WebConfig;

#[derive(Debug, Clone)]
pub struct AppState {
    pub metrics: Metrics,
    pub ready: watch::Receiver<bool>,
    pub telemetry_path: String,
    /// Where the API is, shown on the landing page (no secrets in it).
    pub api_url: String,
}

/// Renders at once. Scrapes beyond it wait their turn (at most [`SCRAPE_QUEUE_WAIT`]), and a
/// waiting scrape is answered with a render that started after it arrived, if one did (so
/// never with older numbers than it asked for): a storm of scrapes costs a few renders, and
/// Prometheus's own scrape still gets an answer.
pub(crate) const MAX_CONCURRENT_SCRAPES: usize = 4;
/// How long a scrape waits for a render slot before it gets a 503.
pub(crate) const SCRAPE_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// No endpoint takes a body: anything larger than this is refused (413) before it is read.
pub(crate) const MAX_REQUEST_BODY: usize = 4096;

/// The endpoints, with what `--web.config.file` asks for (basic auth, extra headers).
pub fn router(state: AppState, web: &WebConfig) -> Router {
    router_with(state, web, MAX_CONCURRENT_SCRAPES)
}

/// [`router`] with a given cap on concurrent scrapes. Layers, outermost first: the
/// configured headers (they win), the security headers (on refusals too), gzip when the
/// client asks for it (Prometheus always does: a large `/metrics` shrinks about tenfold),
/// basic auth (not on the probes), the body cap, the routes.
///
/// `/healthz` and `/readyz` answer without credentials even when basic auth is on: they say
/// only "ok" or "not ready", and Kubernetes' HTTP probes cannot send a password.
pub(crate) fn router_with(state: AppState, web: &WebConfig, max_scrapes: usize) -> Router {
    let renders = std::sync::Arc::new(Renders {
        slots: tokio::sync::Semaphore::new(max_scrapes),
        last: Mutex::new([None, None, None]),
    });
    let mut router = Router::new()
        .route(
            &state.telemetry_path.clone(),
            get(move |s: State<AppState>, h: HeaderMap| {
                let renders = renders.clone();
                async move { metrics(s, h, &renders).await }
            }),
        )
        .route("/", get(landing));
    if let Some(auth) = &web.auth {
        router = router.layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            crate::web_config::require_auth,
        ));
    }
    router = router
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(axum::middleware::from_fn(refuse_bodies));
    router = router.layer(tower_http::compression::CompressionLayer::new().gzip(true));
    router = router.layer(axum::middleware::map_response(security_headers));
    if !web.headers.is_empty() {
        let headers = web.headers.clone();
        router = router.layer(axum::middleware::map_response(move |mut r: Response| {
            let headers = headers.clone();
            async move {
                for (k, v) in headers {
                    r.headers_mut().insert(k, v);
                }
                r
            }
        }));
    }
    router.with_state(state)
}

/// Every endpoint is a GET without a body: a declared body over the cap is refused unread.
async fn refuse_bodies(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if chunked || declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    next.run(req).await
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// The format the scraper prefers, by its `Accept` header: the media range with the highest
/// `q` among delimited protobuf (`application/vnd.google.protobuf;
/// proto=io.prometheus.client.MetricFamily; encoding=delimited`), OpenMetrics
/// (`application/openmetrics-text`) and the text format; the first listed on a tie. No header,
/// `*/*` or anything else: the text format 0.0.4.
fn negotiate(headers: &HeaderMap) -> Exposition {
    let mut best: Option<(f32, Exposition)> = None;
    for range in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut q = 1.0f32;
        let mut proto_family = false;
        for p in parts {
            match p.split_once('=') {
                Some(("q", v)) => q = v.trim().parse().unwrap_or(0.0),
                Some(("proto", v)) => {
                    proto_family = v.trim() == "io.prometheus.client.MetricFamily"
                }
                _ => {}
            }
        }
        let format = match media.as_str() {
            "application/vnd.google.protobuf" if proto_family => Exposition::Protobuf,
            "application/openmetrics-text" => Exposition::OpenMetrics,
            "text/plain" | "*/*" => Exposition::Text,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, format));
        }
    }
    best.map_or(Exposition::Text, |(_, f)| f)
}

/// The render slots and the last render of each format (text, protobuf, OpenMetrics).
struct Renders {
    slots: tokio::sync::Semaphore,
    last: Mutex<[Option<Render>; 3]>,
}

fn slot_of(format: Exposition) -> usize {
    match format {
        Exposition::Text => 0,
        Exposition::Protobuf => 1,
        Exposition::OpenMetrics => 2,
    }
}

#[derive(Clone)]
struct Render {
    /// When the render began: it shows everything published before then.
    started: std::time::Instant,
    body: bytes::Bytes,
    content_type: String,
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap, renders: &Renders) -> Response {
    let format = negotiate(&headers);
    let arrived = std::time::Instant::now();
    let Ok(Ok(_slot)) = tokio::time::timeout(SCRAPE_QUEUE_WAIT, renders.slots.acquire()).await
    else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many concurrent scrapes\n",
        )
            .into_response();
    };
    let fresh = |r: &Option<Render>| r.as_ref().filter(|r| r.started >= arrived).cloned();
    let reuse = fresh(&renders.last.lock().unwrap_or_else(|e| e.into_inner())[slot_of(format)]);
    let render = match reuse {
        Some(r) => Ok(r),
        None => {
            let m = state.metrics.clone();
            let started = std::time::Instant::now();
            tokio::task::spawn_blocking(move || m.render(format))
                .await
                .map(|(body, content_type)| Render {
                    started,
                    body: body.into(),
                    content_type,
                })
        }
    };
    if let Ok(r) = &render {
        let mut last = renders.last.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut last[slot_of(format)];
        if slot.as_ref().is_none_or(|l| l.started < r.started) {
            *slot = Some(r.clone());
        }
    }
    match render.map(|r| (r.body, r.content_type)) {
        Ok((body, content_type)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("render failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Ready once the first polling round is done, and while the state file takes commits (a
/// full disk must not look healthy: nothing read is counted meanwhile).
async fn readyz(State(state): State<AppState>) -> Response {
    let not_ready = |why: &'static str| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if !*state.ready.borrow() {
        not_ready("not ready: first polling round not done\n")
    } else if state.metrics.process.state_writable.get() == 0 {
        not_ready("not ready: the state file does not take commits (see the log)\n")
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn landing(State(state): State<AppState>) -> Html<String> {
    let p = &state.metrics.process;
    let followed: f64 = p
        .sessions
        .collect()
        .first()
        .map(|f| f.get_metric().iter().map(|m| m.get_gauge().value()).sum())
        .unwrap_or(0.0);
    // A sum of gauges that went up and down can be -0: show it as 0.
    let followed = if followed > 0.0 { followed } else { 0.0 };
    let last_poll = if let Some(last) = p.last_poll() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(last);
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        "never".to_owned()
    };
    let up = match (p.up.get() == 1, p.api_problem()) {
        (true, _) => "yes".to_owned(),
        (false, Some(problem)) => format!("<strong>no</strong>: {}", escape(&problem)),
        (false, None) => "not yet asked".to_owned(),
    };
    let ready = if !*state.ready.borrow() {
        "not yet"
    } else if p.state_writable.get() == 0 {
        "<strong>no</strong>: the state file does not take commits (see the log)"
    } else {
        "yes"
    };
    let path = escape(&state.telemetry_path);
    Html(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Qoder Exporter</title></head>\n<body>\n\
<h1>Qoder Exporter</h1>\n<p>Version {version} ({revision})</p>\n\
<table>\n<tr><td>Qoder API</td><td>{api}</td></tr>\n<tr><td>API reachable, token accepted</td><td>{up}</td></tr>\n\
<tr><td>Sessions followed</td><td>{followed}</td></tr>\n<tr><td>Last successful poll</td><td>{last_poll}</td></tr>\n\
<tr><td>Ready</td><td>{ready}</td></tr>\n</table>\n\
<ul>\n<li><a href=\"{path}\">Metrics</a></li>\n<li><a href=\"/healthz\">Health</a></li>\n<li><a href=\"/readyz\">Readiness</a></li>\n</ul>\n\
</body></html>\n",
        version = env!("CARGO_PKG_VERSION"),
        revision = crate::REVISION,
        api = escape(&state.api_url),
    ))
}

/// A client must have sent a request's headers within this long (slowloris, idle
/// keep-alive connections): then the connection is closed and its descriptor freed.
pub(crate) const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the web port holds at once, and where that is counted.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: std::time::Duration,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// `qoder_exporter_http_connections`.
    pub open: prometheus::IntGauge,
    /// `qoder_exporter_http_connections_refused_total`.
    pub refused: prometheus::IntCounter,
}

impl Limits {
    pub fn new(max_connections: usize, metrics: &crate::sinks::metrics::ProcessMetrics) -> Limits {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: max_connections.max(1),
            open: metrics.http_connections.clone(),
            refused: metrics.http_connections_refused.clone(),
        }
    }
}

/// Counts a connection open until it ends (its task returns or is dropped).
struct OpenConnection {
    open: prometheus::IntGauge,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Serves `app` on `listener`, over TLS when the web config has it, until `shutdown`. One
/// connection loop for plain HTTP and TLS, so both get the same timeouts and limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    web: &WebConfig,
    shutdown: tokio_util::sync::CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let acceptor = web.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let header_read_timeout = limits.header_read_timeout;
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // HTTP/1 only: scrapers and probes speak it, and with the auto-detection of HTTP/2 a
    // connection that sends nothing (or only the start of the HTTP/2 preface) waited forever,
    // before any header timeout applied, so 512 silent connections locked Prometheus out.
    let mut builder = builder.http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut refusals = crate::log_limit::LogLimiter::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Over the limit: closed at once, so the descriptor comes back and the backlog moves.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limits.refused.inc();
            refusals.warn(
                "max_connections",
                &format!(
                    "the web port is at --web.max-connections ({}); new connections are closed (qoder_exporter_http_connections_refused_total)",
                    limits.max_connections
                ),
            );
            drop(tcp);
            continue;
        };
        limits.open.inc();
        let connection = OpenConnection {
            open: limits.open.clone(),
            _slot: slot,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _connection = connection;
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let Some(acceptor) = acceptor else {
                let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            };
            let stream = match tokio::time::timeout(header_read_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // In-flight requests finish (bounded); idle keep-alive connections are closed.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[test]
    fn the_scrapers_preference_picks_the_format() {
        let pick = |accept: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert(header::ACCEPT, a.parse().expect("header"));
            }
            negotiate(&h)
        };
        assert_eq!(pick(None), Exposition::Text);
        assert_eq!(pick(Some("*/*")), Exposition::Text);
        // Prometheus 2.42, as it sends it.
        assert_eq!(
            pick(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Exposition::OpenMetrics
        );
        // Prometheus 3 (its default scrape protocols).
        assert_eq!(
            pick(Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )),
            Exposition::OpenMetrics
        );
        // Native histograms on: protobuf first.
        assert_eq!(
            pick(Some(
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,text/plain;version=0.0.4;q=0.5"
            )),
            Exposition::Protobuf
        );
        assert_eq!(
            pick(Some("application/openmetrics-text;q=0, text/plain")),
            Exposition::Text,
            "q=0 refuses"
        );
        assert_eq!(
            pick(Some(
                "text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"
            )),
            Exposition::Text
        );
        assert_eq!(
            pick(Some("application/vnd.google.protobuf")),
            Exposition::Text,
            "protobuf of another message"
        );
    }

    /// A client that never finishes its headers (slowloris) is cut off, and the server keeps
    /// answering others.
    #[tokio::test]
    async fn a_connection_that_never_sends_its_headers_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (router, _tx) = app(true);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            let web = WebConfig::default();
            serve(listener, router, &web, stopped, test_limits(8, 200)).await
        });
        // A half-sent request, silence, or only the start of the HTTP/2 preface: each is
        // closed (a bounded wait; without the timeout none of them would be).
        for opening in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[..],
            b"",
            b"P",
            b"PRI * HTTP/2.0\r\n",
        ] {
            let mut quiet = tokio::net::TcpStream::connect(addr).await.expect("connect");
            quiet.write_all(opening).await.expect("write");
            let mut buf = Vec::new();
            let closed = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                quiet.read_to_end(&mut buf),
            )
            .await;
            assert!(closed.is_ok(), "{opening:?}: still open");
        }
        // A whole request on a new connection is answered.
        let mut ok = tokio::net::TcpStream::connect(addr).await.expect("connect");
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut reply = String::new();
        ok.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    fn test_limits(max_connections: usize, header_read_ms: u64) -> Limits {
        let registry = prometheus::Registry::new();
        let metrics = crate::sinks::metrics::ProcessMetrics::register(&registry).expect("metrics");
        Limits {
            header_read_timeout: std::time::Duration::from_millis(header_read_ms),
            ..Limits::new(max_connections, &metrics)
        }
    }

    /// Past `--web.max-connections` a connection is closed on arrival and counted; once one
    /// closes, the next is served.
    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (router, _tx) = app(true);
        let limits = test_limits(3, 60_000);
        let (open, refused) = (limits.open.clone(), limits.refused.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            serve(listener, router, &WebConfig::default(), stopped, limits).await
        });
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open.get() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "three connections open"
            );
            tokio::task::yield_now().await;
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            extra.read_to_end(&mut buf),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "closed without an answer: {closed:?}"
        );
        assert_eq!(refused.get(), 1);
        drop(idle.pop());
        let mut next = None;
        while next.is_none() {
            assert!(std::time::Instant::now() < deadline, "a slot came back");
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut reply = String::new();
            let _ = c.read_to_string(&mut reply).await;
            if reply.starts_with("HTTP/1.1 200") {
                next = Some(reply);
            }
        }
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    /// A storm of concurrent scrapes is answered, not refused: they queue for the render
    /// slots and share renders that started after they arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_of_scrapes_is_answered() {
        let (app, _tx) = app(true);
        let storm: Vec<_> = (0..400)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { get(&app, "/metrics", None).await.0 })
            })
            .collect();
        for s in storm {
            assert_eq!(s.await.expect("join"), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn metrics_are_gzipped_when_asked_for() {
        let (app, _tx) = app(true);
        let plain = get(&app, "/metrics", None).await.2;
        let resp = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/metrics")
                    .header(header::ACCEPT_ENCODING, "gzip")
                    .body(Body::empty())
                    .expect("req"),
            )
            .await
            .expect("resp");
        assert_eq!(
            resp.headers().get(header::CONTENT_ENCODING),
            Some(&HeaderValue::from_static("gzip"))
        );
        let zipped = resp.into_body().collect().await.expect("body").to_bytes();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut text)
            .expect("gunzip");
        // The same exposition, but for the process series, which move between two scrapes.
        let stable = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("process_"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(stable(&text), stable(&plain));
        assert!(
            zipped.len() * 3 < plain.len(),
            "{} of {}",
            zipped.len(),
            plain.len()
        );
    }

    /// The endpoints over a fresh registry whose state file takes commits.
    fn app(ready: bool) -> (Router, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(ready);
        let metrics = Metrics::new().expect("metrics");
        metrics.process.state_writable.set(1);
        let state = AppState {
            metrics,
            ready: rx,
            telemetry_path: "/metrics".into(),
            api_url: "http://127.0.0.1:1/api/v1/cloud".into(),
        };
        (router(state, &WebConfig::default()), tx)
    }

    async fn get(app: &Router, uri: &str, accept: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::builder().uri(uri);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).expect("req"))
            .await
            .expect("resp");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// With no render slot free for [`SCRAPE_QUEUE_WAIT`] (the clock is paused and jumps),
    /// a scrape gets a 503 with Retry-After.
    #[tokio::test(start_paused = true)]
    async fn scrapes_over_the_cap_and_bodies_are_refused() {
        let (tx, rx) = watch::channel(true);
        let state = AppState {
            metrics: Metrics::new().expect("metrics"),
            ready: rx,
            telemetry_path: "/metrics".into(),
            api_url: String::new(),
        };
        let full = router_with(state.clone(), &WebConfig::default(), 0);
        let (s, h, _) = get(&full, "/metrics", None).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h[header::RETRY_AFTER], "1");
        assert_eq!(
            h["x-frame-options"], "DENY",
            "security headers on refusals too"
        );
        let app = router(state, &WebConfig::default());
        let big = Request::builder()
            .uri("/metrics")
            .header(header::CONTENT_LENGTH, "100000")
            .body(Body::from(vec![b'x'; 100_000]))
            .expect("req");
        let resp = app.clone().oneshot(big).await.expect("resp");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(get(&app, "/metrics", None).await.0, StatusCode::OK);
        drop(tx);
    }

    #[tokio::test]
    async fn routes_answer() {
        let (app, ready) = app(false);
        let (s, h, body) = get(&app, "/metrics", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            h[header::CONTENT_TYPE]
                .to_str()
                .expect("ct")
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(body.contains("qoder_up 0"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(get(&app, "/healthz", None).await.0, StatusCode::OK);
        assert_eq!(
            get(&app, "/readyz", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.send(true).expect("send");
        assert_eq!(get(&app, "/readyz", None).await.0, StatusCode::OK);
        let (s, _, page) = get(&app, "/", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(page.contains("href=\"/metrics\"") && page.contains("Sessions followed"));
        assert_eq!(get(&app, "/nope", None).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn protobuf_when_asked() {
        let (app, _) = app(true);
        let accept = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3";
        let (_, h, _) = get(&app, "/metrics", Some(accept)).await;
        assert!(
            h[header::CONTENT_TYPE]
                .to_str()
                .expect("ct")
                .starts_with("application/vnd.google.protobuf")
        );
    }

    #[test]
    fn sessions_gauge_is_collectable() {
        let m = Metrics::new().expect("m");
        m.process.sessions.with_label_values(&["idle"]).set(2);
        assert_eq!(m.process.sessions.collect()[0].get_metric().len(), 1);
    }
}
