//! The poller: finds sessions, decides when each is read next, reads their event logs page by
//! page from the committed cursor, and hands the pages to the pipeline.
//!
//! Design notes:
//! - One scheduler loop owns every session's cursor and timing; reading is done by at most
//!   `concurrency` jobs at a time, each reading at most `max_pages_per_job` pages before the
//!   session goes back in line, so one busy session cannot starve the others.
//! - A cursor moves only when the pipeline acknowledges the batch as committed. A page that
//!   fails is fetched again from the same cursor.
//! - Running sessions are read every `poll_interval`, idle ones every `idle_interval`,
//!   terminated ones until drained and then never again (the store remembers them).
//! - Discovery lists sessions newest first and pages only until it reaches a page with no
//!   session it did not know ("known ground").
//! - A rejected token (401) stops all reading; one probe is sent at a growing interval (15 s up
//!   to 5 min) until the token is accepted again or replaced (`--qoder.pat-file` is re-read).
//! - A cursor the API refuses (400) is recovered by re-reading the log from the start and
//!   skipping the events already consumed (the store counts them), so nothing is lost or
//!   counted twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::event::{DroppedFields, Event, UsageSnapshot};
use crate::pipeline::StoredSession;
use crate::pipeline::tracker::{ListedThread, ThreadCursor};
use crate::pipeline::{Batch, Item, PipelineHandle, SendError, SessionMeta};
use crate::secret::Pat;
use crate::sinks::metrics::ProcessMetrics;
use crate::source::client::{ApiError, Client, ListScope, backoff};
use crate::source::convert::TurnIds;
use crate::source::wire::{self, ListCursor, Page, WireAgent, WireBudget, WireModel, WireSession};

#[derive(Debug, Clone)]
pub(crate) struct PollerConfig {
    pub poll_interval: Duration,
    pub idle_interval: Duration,
    pub discovery_interval: Duration,
    /// Follow only these sessions; empty means discover every session the token can see.
    pub sessions: Vec<String>,
    pub concurrency: usize,
    pub max_pages_per_job: usize,
    /// The API asks for at least 100 ms between pages of one listing.
    pub page_gap: Duration,
    pub pat_file: Option<PathBuf>,
    /// Follow only the sessions of this shard.
    pub shard: crate::config::Shard,
    /// How often discovery reads the whole session list (not just up to known sessions), to
    /// learn from `updated_at` which idle sessions changed.
    pub resync_interval: Duration,
    /// Sessions followed at once (not ended): past it, discovery follows no new one until
    /// some end.
    pub max_sessions: usize,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            poll_interval: Duration::from_secs(2),
            idle_interval: Duration::from_secs(15),
            discovery_interval: Duration::from_secs(10),
            sessions: Vec::new(),
            concurrency: 8,
            max_pages_per_job: 10,
            page_gap: Duration::from_millis(100),
            pat_file: None,
            shard: crate::config::Shard::default(),
            resync_interval: Duration::from_secs(60),
            max_sessions: crate::config::DEFAULT_MAX_SESSIONS,
        }
    }
}

/// Statuses after which a session produces no more events.
fn is_terminal(status: &str) -> bool {
    matches!(status, "terminated" | "archived" | "deleted")
}

fn is_running(status: &str) -> bool {
    matches!(
        status,
        "running"
            | "processing"
            | "rescheduling"
            | "rescheduled"
            | "canceling"
            | "terminating"
            | "unknown"
    )
}

#[derive(Debug)]
struct Tracked {
    cursor: Option<String>,
    consumed: u64,
    status: String,
    /// Agent and model known (from discovery or `GET /sessions/{id}`).
    meta: Option<SessionMeta>,
    meta_sent: bool,
    failures: u32,
    in_flight: bool,
    finished: bool,
    due: Instant,
    /// `updated_at` from the latest session listing that showed the session.
    listed_updated: Option<String>,
    /// The listing's `updated_at` when the session was last read to its end: while the two
    /// agree, the session has not changed and an idle poll is skipped.
    read_updated: Option<String>,
    /// Read (or failed) at least once: what readiness waits for.
    attempted: bool,
    /// The usage snapshot of the latest listing that showed the session.
    listed_usage: Option<UsageSnapshot>,
    /// The object usage snapshot last handed to the pipeline.
    usage_sent: Option<UsageSnapshot>,
    /// Sub-agent threads whose streams need reading, with their cursors (from the pipeline).
    threads: Vec<ThreadCursor>,
    /// The session's agent coordinates sub-agents: its thread list is read when it changed.
    multiagent: bool,
    /// When its thread list was last read.
    threads_listed_at: Option<Instant>,
    /// Reading its thread list failed: the next job reads it, changed or not.
    thread_list_failed: bool,
    cursor_history: CursorHistory,
}

/// What a job was asked to do.
#[derive(Debug)]
struct JobInput {
    id: String,
    cursor: Option<String>,
    consumed: u64,
    meta: Option<SessionMeta>,
    need_meta: bool,
    listed_updated: Option<String>,
    /// The usage snapshot of the latest listing that showed the session.
    listed_usage: Option<UsageSnapshot>,
    /// The object usage snapshot last handed to the pipeline.
    usage_sent: Option<UsageSnapshot>,
    /// No listing tells this session's usage (named sessions): read the object after new
    /// events instead.
    refresh_object: bool,
    threads: Vec<ThreadCursor>,
    multiagent: bool,
    /// The thread list may be read if the session changed (its last reading is old enough).
    thread_list_due: bool,
    /// The last attempt to read the thread list failed.
    thread_list_failed: bool,
    cursor_history: CursorHistory,
}

#[derive(Debug, Default)]
struct JobOutput {
    id: String,
    cursor: Option<String>,
    consumed: u64,
    status: Option<String>,
    meta_sent: bool,
    new_events: usize,
    more: bool,
    gone: bool,
    error: Option<ApiError>,
    stopped: bool,
    /// The pipeline could not commit a batch: a local fault, not the API's (it has its own
    /// counter and alert), so it leaves `qoder_up` alone; the page is read again later.
    store_failed: bool,
    /// Why, for the log (told at most once a minute however many sessions hit it).
    store_error: Option<String>,
    /// The API broke its paging rules for this session (a loop): its next read backs off.
    anomaly: bool,
    /// The listing's `updated_at` when the job started.
    listed_updated: Option<String>,
    /// The object usage snapshot last handed to the pipeline.
    usage_sent: Option<UsageSnapshot>,
    /// Threads still to read after this job (`None`: unchanged).
    threads: Option<Vec<ThreadCursor>>,
    /// The object read in this job says the agent coordinates sub-agents.
    multiagent: bool,
    /// The thread list was read in this job.
    threads_listed: bool,
    /// Reading the thread list failed in this job.
    thread_list_failed: bool,
    cursor_history: CursorHistory,
}

#[derive(Debug)]
enum Done {
    Session(Box<JobOutput>),
    /// The listing ended (its pages went to the poller one by one as they came).
    Discovery(Result<(), ApiError>),
}

#[derive(Debug)]
pub(crate) struct Poller {
    client: Client,
    pipeline: PipelineHandle,
    cfg: PollerConfig,
    metrics: ProcessMetrics,
    sessions: HashMap<String, Tracked>,
    queue: BTreeSet<(Instant, String)>,
    ready: watch::Sender<bool>,
    /// Sessions that must be read once before the exporter calls itself ready.
    initial: Option<HashSet<String>>,
    discovered_once: bool,
    auth: AuthState,
    logs: crate::log_limit::LogLimiter,
    /// Sessions the running listing added so far (logged when it ends).
    discovered_new: usize,
    pat_file_stamp: Option<SystemTime>,
    agent_names: Arc<AgentNames>,
    /// Full listings started so far.
    resyncs: u32,
    /// Sessions drained and dropped since the last summary line.
    ended_since_summary: usize,
    summary_logged_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct AuthState {
    failing: bool,
    failures: u32,
    probe_at: Option<Instant>,
}

const AUTH_BACKOFF_BASE: Duration = Duration::from_secs(15);
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(300);
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// An idle session the session list says is unchanged is still read this often, in case the
/// API's `updated_at` missed an event.
pub(crate) const UNCHANGED_POLL_INTERVAL: Duration = Duration::from_secs(600);
/// Longest page of events read at once (we ask for 100).
pub(crate) const MAX_EVENTS_PER_PAGE: usize = 1000;
/// The "sessions: new, ended, followed" line comes at most this often.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Every this many resync listings, one asks for every session rather than the live ones.
const UNFILTERED_RESYNC_EVERY: u32 = 6;
/// While the token is refused, how often the token file is checked for a new one.
const PAT_FILE_RECHECK: Duration = Duration::from_secs(1);

/// Discovery stops after this many pages in one round even without reaching known ground.
const MAX_DISCOVERY_PAGES: usize = 10_000;

impl Poller {
    pub fn new(
        client: Client,
        pipeline: PipelineHandle,
        cfg: PollerConfig,
        metrics: ProcessMetrics,
        stored: &[StoredSession],
        ready: watch::Sender<bool>,
    ) -> Poller {
        let now = Instant::now();
        let mut poller = Poller {
            client,
            pipeline,
            metrics,
            sessions: HashMap::new(),
            queue: BTreeSet::new(),
            ready,
            initial: None,
            discovered_once: false,
            auth: AuthState::default(),
            logs: crate::log_limit::LogLimiter::default(),
            discovered_new: 0,
            pat_file_stamp: None,
            agent_names: Arc::default(),
            resyncs: 0,
            ended_since_summary: 0,
            summary_logged_at: None,
            cfg,
        };
        poller.pat_file_stamp = poller.pat_file_mtime();
        for s in stored.iter().filter(|s| poller.cfg.shard.owns(&s.id)) {
            poller.sessions.insert(
                s.id.clone(),
                Tracked {
                    cursor: s.cursor.clone(),
                    consumed: s.state.consumed,
                    status: s.state.status.clone(),
                    meta: None,
                    // Stored sessions already carry their agent and model; one counted under
                    // its agent's id (an older state file) reads its object again, so the
                    // name is looked up and the id's series move to it.
                    meta_sent: (s.state.agent != "unknown" || s.state.model.is_some())
                        && s.state.agent_id.as_ref() != Some(&s.state.agent),
                    failures: 0,
                    in_flight: false,
                    finished: s.finished,
                    due: now,
                    listed_updated: None,
                    read_updated: None,
                    attempted: false,
                    listed_usage: None,
                    usage_sent: None,
                    threads: s.state.threads_to_read(),
                    multiagent: s.state.multiagent,
                    threads_listed_at: None,
                    thread_list_failed: false,
                    cursor_history: CursorHistory::new(),
                },
            );
        }
        let shard = poller.cfg.shard;
        poller.cfg.sessions.retain(|id| shard.owns(id));
        let explicit = poller.cfg.sessions.clone();
        for id in explicit {
            poller.add(&id, None, now);
        }
        let due: Vec<String> = poller
            .sessions
            .iter()
            .filter(|(_, t)| !t.finished && !t.in_flight)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            poller.queue.insert((now, id.clone()));
        }
        if !poller.cfg.sessions.is_empty() {
            // Explicit mode: ready once each named session has been read (or failed) once.
            poller.initial = Some(
                poller
                    .cfg
                    .sessions
                    .iter()
                    .filter(|id| poller.sessions.get(*id).is_some_and(|t| !t.finished))
                    .cloned()
                    .collect(),
            );
        }
        poller
    }

    fn discovery_mode(&self) -> bool {
        self.cfg.sessions.is_empty()
    }

    /// Starts following a session not seen before.
    fn add(&mut self, id: &str, meta: Option<SessionMeta>, now: Instant) -> bool {
        if self.sessions.contains_key(id) {
            return false;
        }
        let status = meta
            .as_ref()
            .and_then(|m| m.status.clone())
            .unwrap_or_else(|| "unknown".to_owned());
        let listed_usage = meta.as_ref().and_then(|m| m.usage.clone());
        let multiagent = meta.as_ref().is_some_and(|m| m.multiagent);
        self.sessions.insert(
            id.to_owned(),
            Tracked {
                cursor: None,
                consumed: 0,
                status,
                meta,
                meta_sent: false,
                failures: 0,
                in_flight: false,
                finished: false,
                due: now,
                listed_updated: None,
                read_updated: None,
                attempted: false,
                listed_usage,
                usage_sent: None,
                threads: Vec::new(),
                multiagent,
                threads_listed_at: None,
                thread_list_failed: false,
                cursor_history: CursorHistory::new(),
            },
        );
        self.queue.insert((now, id.to_owned()));
        true
    }

    fn schedule(&mut self, id: &str, due: Instant) {
        if let Some(t) = self.sessions.get_mut(id) {
            self.queue.remove(&(t.due, id.to_owned()));
            t.due = due;
            if !t.finished && !t.in_flight {
                self.queue.insert((due, id.to_owned()));
            }
        }
    }

    fn check_ready(&mut self) {
        let done = match &self.initial {
            Some(pending) => pending.is_empty() && (self.discovered_once || !self.discovery_mode()),
            None => false,
        };
        if done && !*self.ready.borrow() {
            tracing::info!(
                sessions = self.sessions.values().filter(|t| !t.finished).count(),
                "first polling round done; ready"
            );
            let _ = self.ready.send(true);
        }
    }

    fn pat_file_mtime(&self) -> Option<SystemTime> {
        let path = self.cfg.pat_file.as_ref()?;
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// Re-reads `--qoder.pat-file` when it changed, so a rotated token needs no restart.
    fn reload_pat_file(&mut self) {
        let Some(path) = self.cfg.pat_file.clone() else {
            return;
        };
        let stamp = self.pat_file_mtime();
        if stamp == self.pat_file_stamp {
            return;
        }
        self.pat_file_stamp = stamp;
        match std::fs::read_to_string(&path)
            .ok()
            .as_deref()
            .and_then(Pat::new)
        {
            Some(pat) => {
                if self.client.token().set(pat) {
                    tracing::info!(path = %path.display(), "token file changed; using the new token");
                    if self.auth.failing {
                        self.auth.probe_at = Some(Instant::now());
                    }
                }
            }
            None => self.logs.warn(
                "pat_file",
                &format!(
                    "token file {} is unreadable or empty; keeping the current token",
                    path.display()
                ),
            ),
        }
    }

    /// Runs until `cancel`; in-flight jobs finish their batch before it returns.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut jobs: JoinSet<Done> = JoinSet::new();
        let mut next_discovery = Instant::now();
        let mut next_full_listing = Instant::now();
        // Listed sessions arrive page by page, so a large account starts being read after its
        // first page, not after its last.
        let (list_tx, mut list_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<WireSession>>();
        let mut discovery_running = false;
        loop {
            let now = Instant::now();
            if now >= next_discovery {
                self.reload_pat_file();
            }
            // What may be started now.
            let probe_only = self.auth.failing;
            let may_probe =
                !probe_only || (self.auth.probe_at.is_none_or(|t| now >= t) && jobs.is_empty());
            if self.discovery_mode() && !discovery_running && now >= next_discovery && may_probe {
                discovery_running = true;
                if probe_only {
                    self.auth.probe_at = Some(now + self.auth_backoff());
                }
                let client = self.client.clone();
                let known: HashSet<String> = self.sessions.keys().cloned().collect();
                let gap = self.cfg.page_gap;
                let shard = self.cfg.shard;
                let full = now >= next_full_listing;
                // A resync lists to the end: every session at first and every
                // `UNFILTERED_RESYNC_EVERY`th time (for a gap an earlier listing left), the
                // live ones only otherwise (their status and `updated_at` are what it is for).
                let scope = if !full || self.resyncs.is_multiple_of(UNFILTERED_RESYNC_EVERY) {
                    ListScope::All
                } else {
                    ListScope::Live
                };
                if full {
                    next_full_listing = now + self.cfg.resync_interval;
                    self.resyncs += 1;
                }
                let tx = list_tx.clone();
                jobs.spawn(async move {
                    Done::Discovery(discover(&client, &known, shard, gap, full, scope, &tx).await)
                });
            }
            let limit = if probe_only { 1 } else { self.cfg.concurrency };
            while jobs.len() < limit && (!probe_only || (may_probe && !discovery_running)) {
                let Some((due, id)) = self.queue.first().cloned() else {
                    break;
                };
                if due > now {
                    break;
                }
                self.queue.remove(&(due, id.clone()));
                let refresh_object = !self.discovery_mode();
                let Some(t) = self.sessions.get_mut(&id) else {
                    continue;
                };
                t.in_flight = true;
                let input = JobInput {
                    id: id.clone(),
                    cursor: t.cursor.clone(),
                    consumed: t.consumed,
                    meta: t.meta.clone(),
                    need_meta: !t.meta_sent,
                    listed_updated: t.listed_updated.clone(),
                    listed_usage: t.listed_usage.clone(),
                    usage_sent: t.usage_sent.clone(),
                    refresh_object,
                    threads: t.threads.clone(),
                    multiagent: t.multiagent,
                    thread_list_due: t
                        .threads_listed_at
                        .is_none_or(|at| now.duration_since(at) >= self.cfg.resync_interval),
                    thread_list_failed: t.thread_list_failed,
                    cursor_history: std::mem::take(&mut t.cursor_history),
                };
                if probe_only {
                    self.auth.probe_at = Some(now + self.auth_backoff());
                }
                let client = self.client.clone();
                let pipeline = self.pipeline.clone();
                let max_pages = self.cfg.max_pages_per_job;
                let gap = self.cfg.page_gap;
                let metrics = self.metrics.clone();
                let cancel = cancel.clone();
                let agent_names = self.agent_names.clone();
                jobs.spawn(async move {
                    let ctx = JobCtx {
                        client: &client,
                        pipeline: &pipeline,
                        metrics: &metrics,
                        agent_names: &agent_names,
                        max_pages,
                        gap,
                        cancel: &cancel,
                    };
                    Done::Session(Box::new(read_session(&ctx, input).await))
                });
                if probe_only {
                    break;
                }
            }
            // Sleep until something finishes, something falls due, or we are told to stop. With
            // every slot busy a session that is due must wait for a job to finish: waking for it
            // would spin.
            let idle_wake = now + Duration::from_secs(60);
            let mut wake = if jobs.len() >= limit {
                idle_wake
            } else {
                self.queue.first().map_or(idle_wake, |(d, _)| *d)
            };
            if self.discovery_mode() && !discovery_running {
                wake = wake.min(next_discovery);
            }
            if let Some(p) = self.auth.probe_at.filter(|_| self.auth.failing) {
                wake = wake.max(p);
                // A token file that is rotated while the token is refused is noticed within
                // a second (a stat), not at the next probe (up to 5 minutes away).
                if self.cfg.pat_file.is_some() {
                    wake = wake.min(now + PAT_FILE_RECHECK);
                }
            }
            tokio::select! {
                Some(done) = jobs.join_next() => match done {
                    Ok(Done::Session(out)) => self.on_session(*out),
                    Ok(Done::Discovery(result)) => {
                        while let Ok(found) = list_rx.try_recv() {
                            self.on_listed(found);
                        }
                        discovery_running = false;
                        next_discovery = Instant::now() + self.cfg.discovery_interval;
                        self.on_discovery(result);
                    }
                    Err(e) => tracing::error!(error = %e, "poll job failed"),
                },
                Some(found) = list_rx.recv() => self.on_listed(found),
                () = tokio::time::sleep_until(wake.into()) => {}
                () = cancel.cancelled() => break,
            }
            self.check_ready();
        }
        // Let jobs finish the batch they hold: their cursor only moves on commit, so a job
        // stopped half-way loses nothing, but one that finishes saves a re-read.
        while let Some(done) = jobs.join_next().await {
            if let Ok(Done::Session(out)) = done {
                self.on_session(*out);
            }
        }
    }

    fn auth_backoff(&self) -> Duration {
        AUTH_BACKOFF_BASE
            .saturating_mul(2u32.saturating_pow(self.auth.failures.saturating_sub(1).min(10)))
            .min(AUTH_BACKOFF_MAX)
    }

    fn on_success(&mut self) {
        self.metrics.up.set(1);
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.set_last_poll(unix);
        self.metrics.set_api_problem(None);
        if self.auth.failing {
            tracing::info!("Qoder API accepts the token again; resuming");
            self.auth = AuthState::default();
        }
    }

    /// Handles a failed request; `true` when it was the token.
    fn on_error(&mut self, what: &str, e: &ApiError) -> bool {
        if matches!(e, ApiError::Cancelled) {
            return false;
        }
        self.metrics.up.set(0);
        self.metrics.set_api_problem(Some(match e {
            ApiError::Unauthorized { .. } => "the token is rejected (HTTP 401): check QODER_PAT, QODER_PERSONAL_ACCESS_TOKEN or --qoder.pat-file".to_owned(),
            other => other.to_string(),
        }));
        if let ApiError::Unauthorized { .. } = e {
            self.auth.failures += 1;
            if !self.auth.failing {
                self.auth.failing = true;
                tracing::error!(
                    error = %e,
                    retry_in = ?self.auth_backoff(),
                    "Qoder API rejected the token (HTTP 401): check QODER_PAT, QODER_PERSONAL_ACCESS_TOKEN or --qoder.pat-file; polling paused, probing with one request at a growing interval"
                );
            }
            self.auth.probe_at = Some(Instant::now() + self.auth_backoff());
            return true;
        }
        self.logs.warn(e.reason(), &format!("{what}: {e}"));
        false
    }

    fn on_discovery(&mut self, result: Result<(), ApiError>) {
        if let Err(e) = result {
            self.on_error("listing sessions", &e);
            if !self.discovered_once && !matches!(e, ApiError::Cancelled) {
                // A failed first round still ends the first round: readiness must not
                // hang on an unreachable API (qoder_up says what is wrong).
                self.discovered_once = true;
                self.initial.get_or_insert_with(HashSet::new);
            }
            return;
        }
        self.on_success();
        // One summary line at most a minute (the first round's at once), not a line per
        // session found or ended.
        let due = self
            .summary_logged_at
            .is_none_or(|at| at.elapsed() >= SUMMARY_INTERVAL);
        if (self.discovered_new > 0 || self.ended_since_summary > 0) && due {
            tracing::info!(
                new = self.discovered_new,
                ended = self.ended_since_summary,
                followed = self.sessions.values().filter(|t| !t.finished).count(),
                "sessions"
            );
            self.discovered_new = 0;
            self.ended_since_summary = 0;
            self.summary_logged_at = Some(Instant::now());
        }
        if !self.discovered_once {
            // Ready once every session known now has been read (or failed) once.
            self.discovered_once = true;
            let pending: HashSet<String> = self
                .sessions
                .iter()
                .filter(|(_, t)| !t.finished && !t.attempted)
                .map(|(id, _)| id.clone())
                .collect();
            self.initial = Some(pending);
        }
    }

    /// One page of the session list: new sessions are followed, known ones updated.
    fn on_listed(&mut self, found: Vec<WireSession>) {
        let now = Instant::now();
        // Sessions followed now (not ended), counted only once the map is that large: ended
        // sessions stay in it as small records and do not count against the limit.
        let mut followed: Option<usize> = None;
        for s in found {
            let Some(id) = s.id.clone() else { continue };
            let max = self.cfg.max_sessions;
            if self.sessions.len() >= max && !self.sessions.contains_key(&id) {
                let n = *followed
                    .get_or_insert_with(|| self.sessions.values().filter(|t| !t.finished).count());
                if n >= max {
                    self.metrics.sessions_not_followed.inc();
                    self.logs.warn(
                        "max_sessions",
                        &format!(
                            "{n} sessions are followed, --qoder.max-sessions: new sessions in the list wait until some end (qoder_exporter_sessions_not_followed_total); shard with --shard.count, or raise the limit"
                        ),
                    );
                    continue;
                }
            }
            let meta = meta_of(&s);
            if self.add(&id, Some(meta.clone()), now) {
                if let Some(n) = followed.as_mut() {
                    *n += 1;
                }
                if let Some(t) = self.sessions.get_mut(&id) {
                    t.listed_updated = s.updated_at.clone();
                }
                self.discovered_new += 1;
                continue;
            }
            // Known: take the newer status and `updated_at`; read it now when it started
            // running, ended, or its `updated_at` moved since it was last read.
            let Some(t) = self.sessions.get_mut(&id) else {
                continue;
            };
            if t.finished {
                continue;
            }
            t.multiagent |= meta.multiagent;
            let mut read_now = false;
            if meta.usage.is_some() && meta.usage != t.listed_usage {
                t.listed_usage.clone_from(&meta.usage);
                read_now |= meta.usage != t.usage_sent;
            }
            if s.updated_at.is_some() && s.updated_at != t.listed_updated {
                t.listed_updated = s.updated_at.clone();
                read_now |= t.read_updated.is_some();
            }
            if let Some(status) = meta.status {
                let woke = is_running(&status) && !is_running(&t.status);
                let ended = is_terminal(&status) && !is_terminal(&t.status);
                t.status = status;
                read_now |= woke || ended;
            }
            if read_now && !t.in_flight {
                self.schedule(&id, now);
            }
        }
    }

    fn on_session(&mut self, mut out: JobOutput) {
        let now = Instant::now();
        let id = out.id.clone();
        if let Some(pending) = &mut self.initial
            && !matches!(out.error, Some(ApiError::Cancelled))
        {
            pending.remove(&id);
        }
        let mut auth_failed = false;
        if let Some(e) = &out.error {
            auth_failed = self.on_error(&format!("session {id}"), e);
        } else if let Some(e) = &out.store_error {
            self.logs.warn(
                "state_commit",
                &format!("state store commit failed; the events will be read again: {e}"),
            );
        } else if !out.stopped {
            self.on_success();
        }
        let poll = self.cfg.poll_interval;
        let idle = self.cfg.idle_interval;
        let probe_at = self.auth.probe_at;
        let Some(t) = self.sessions.get_mut(&id) else {
            return;
        };
        t.in_flight = false;
        if !matches!(out.error, Some(ApiError::Cancelled)) {
            t.attempted = true;
        }
        t.cursor = out.cursor;
        t.consumed = out.consumed;
        t.meta_sent |= out.meta_sent;
        t.multiagent |= out.multiagent;
        if out.threads_listed {
            t.threads_listed_at = Some(now);
            t.thread_list_failed = false;
        }
        t.thread_list_failed |= out.thread_list_failed;
        t.cursor_history = std::mem::take(&mut out.cursor_history);
        if out.usage_sent.is_some() {
            t.usage_sent = out.usage_sent;
        }
        if let Some(threads) = out.threads {
            t.threads = threads;
        }
        if let Some(s) = out.status {
            t.status = s;
        }
        if out.gone {
            t.finished = true;
            tracing::info!(session = %id, "session is gone (404); no longer followed");
            self.spawn_finish(id);
            return;
        }
        if out.stopped {
            return;
        }
        let due = if let Some(e) = &out.error {
            t.failures += 1;
            if auth_failed {
                probe_at.unwrap_or(now + AUTH_BACKOFF_BASE)
            } else {
                let wait = e.retry_after().unwrap_or_else(|| {
                    backoff(
                        poll.max(Duration::from_secs(1)),
                        FAILURE_BACKOFF_MAX,
                        t.failures,
                    )
                });
                now + wait
            }
        } else if out.store_failed || out.anomaly {
            t.failures += 1;
            now + backoff(
                poll.max(Duration::from_secs(1)),
                FAILURE_BACKOFF_MAX,
                t.failures,
            )
        } else {
            t.failures = 0;
            // Ended and read to its end: no thread left to read, or a job that read them all
            // found nothing new (a thread that never said it stopped is not waited for).
            if is_terminal(&t.status) && !out.more && (t.threads.is_empty() || out.new_events == 0)
            {
                t.finished = true;
                tracing::debug!(session = %id, events = t.consumed, "session ended and is drained; no longer followed");
                self.ended_since_summary += 1;
                self.spawn_finish(id);
                return;
            }
            if !out.more {
                t.read_updated = out.listed_updated.clone();
            }
            if out.more {
                now
            } else if out.new_events > 0 || is_running(&t.status) {
                now + poll
            } else if !t.threads.is_empty() {
                // A sub-agent thread still running (or named since its last reading): read
                // at the idle cadence, not parked until the safety read.
                now + idle
            } else if t.read_updated.is_some() && t.read_updated == t.listed_updated {
                // Read to the end as of the listing's `updated_at`: nothing to fetch until a
                // listing shows it moved (that reschedules it), with a slow safety poll.
                now + idle.max(UNCHANGED_POLL_INTERVAL)
            } else {
                now + idle
            }
        };
        self.schedule(&id, due);
    }

    fn spawn_finish(&self, id: String) {
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            if let Err(e) = pipeline.finish(id.clone()).await {
                tracing::warn!(session = %id, error = %e, "could not record the session as finished; it will be drained again after a restart");
            }
        });
    }
}

pub fn meta_of(s: &WireSession) -> SessionMeta {
    let (agent_name, agent_id, model, multiagent) = match &s.agent {
        Some(WireAgent::Obj {
            id,
            name,
            model,
            multiagent,
        }) => (
            name.clone().filter(|n| !n.is_empty()),
            id.clone(),
            model.clone().and_then(WireModel::name),
            multiagent.is_some(),
        ),
        Some(WireAgent::Id(id)) => (None, Some(id.clone()), None, false),
        None => (None, None, None, false),
    };
    let status = if s.archived_at.as_deref().is_some_and(|a| !a.is_empty()) {
        Some("archived".to_owned())
    } else {
        s.status.clone()
    };
    SessionMeta {
        agent_name,
        agent_id: agent_id.or_else(|| s.agent_id.clone()),
        model,
        status,
        usage: s
            .usage
            .as_ref()
            .and_then(|u| UsageSnapshot::from_wire(u, None)),
        budget: s.budget.as_ref().and_then(WireBudget::credits),
        multiagent,
    }
}

/// Lists sessions newest first until a page holds no session of this shard not already known
/// (or, `full`, to the end); returns this shard's sessions only.
async fn discover(
    client: &Client,
    known: &HashSet<String>,
    shard: crate::config::Shard,
    gap: Duration,
    full: bool,
    scope: ListScope,
    tx: &tokio::sync::mpsc::UnboundedSender<Vec<WireSession>>,
) -> Result<(), ApiError> {
    let mut cursor: Option<ListCursor> = None;
    // Tokens and ids this scan has been sent to: one seen again is a loop, not more sessions.
    let mut visited: HashSet<ListCursor> = HashSet::new();
    for page_no in 0..MAX_DISCOVERY_PAGES {
        if page_no > 0 {
            tokio::time::sleep(gap).await;
        }
        let body = client.list_sessions(cursor.as_ref(), scope).await?;
        let page: Page<'_> =
            serde_json::from_slice(&body).map_err(|e| decode_failure(client, "sessions", &e))?;
        let mut any_new = false;
        let mut last = None;
        let mut found = Vec::with_capacity(page.data.len());
        for raw in &page.data {
            let Some(s) = wire::decode_session(raw.get()) else {
                continue;
            };
            let Some(id) = s.id.clone() else { continue };
            last = Some(id.clone());
            if shard.owns(&id) {
                any_new |= !known.contains(&id);
                found.push(s);
            }
        }
        // The poller is gone only when it is stopping; the listing ends with it.
        if tx.send(found).is_err() {
            return Err(ApiError::Cancelled);
        }
        // Known ground: a page with nothing new means the rest is known too.
        if !(any_new || full) {
            break;
        }
        let next = page.next_list_cursor(last, cursor.as_ref());
        let Some(next) = next else { break };
        if !visited.insert(next.clone()) {
            client.count_anomaly("list_loop");
            tracing::warn!(cursor = ?next, "the session list pointed back to a page already read; listing stopped there");
            break;
        }
        if page_no + 1 == MAX_DISCOVERY_PAGES {
            tracing::warn!(
                pages = MAX_DISCOVERY_PAGES,
                "the session list did not end within this many pages; the rest is read at the next listing"
            );
        }
        cursor = Some(next);
    }
    Ok(())
}

fn decode_failure(client: &Client, endpoint: &str, e: &serde_json::Error) -> ApiError {
    client.count_failure(endpoint, "decode");
    ApiError::Decode(e.to_string())
}

/// What a job needs besides its input.
struct JobCtx<'a> {
    client: &'a Client,
    pipeline: &'a PipelineHandle,
    metrics: &'a ProcessMetrics,
    agent_names: &'a AgentNames,
    max_pages: usize,
    gap: Duration,
    cancel: &'a CancellationToken,
}

/// Where a stream has been read to.
#[derive(Debug, Clone, Default)]
struct Position {
    cursor: Option<String>,
    consumed: u64,
}

/// Cursors a session's streams have stood at lately, per stream (`""`: the session's own,
/// else the thread id), kept between jobs in memory: a page that ends at one of them again
/// is the API leading back to what was read (a loop), and nothing of it is new.
type CursorHistory = HashMap<String, std::collections::VecDeque<String>>;
/// Cursors remembered per stream.
const CURSOR_HISTORY: usize = 64;

/// Reads one session: its metadata when not known yet, up to `max_pages` pages of its own
/// events, then the streams of its sub-agent threads that the session's stream says are
/// running or changed, then the object's usage when the listing showed a new snapshot (or,
/// once, when the session has ended and is drained).
async fn read_session(ctx: &JobCtx<'_>, input: JobInput) -> JobOutput {
    let mut out = JobOutput {
        id: input.id.clone(),
        cursor: input.cursor.clone(),
        consumed: input.consumed,
        listed_updated: input.listed_updated.clone(),
        cursor_history: input.cursor_history.clone(),
        ..JobOutput::default()
    };
    let id = input.id.as_str();
    let mut threads = input.threads.clone();
    let mut multiagent = input.multiagent;
    if input.need_meta {
        let mut meta = match input.meta {
            Some(m) if m.agent_name.is_some() || m.agent_id.is_some() => m,
            _ => match fetch_meta(ctx.client, id).await {
                Ok(m) => m,
                Err(e) => {
                    out.gone = e.status() == Some(404);
                    out.error = (!out.gone).then_some(e);
                    return out;
                }
            },
        };
        resolve_agent(ctx, &mut meta).await;
        multiagent |= meta.multiagent;
        out.multiagent = meta.multiagent;
        out.status = meta.status.clone();
        out.usage_sent = meta.usage.clone();
        match ctx.pipeline.meta(id.to_owned(), meta).await {
            Ok(o) => threads = o.threads,
            Err(e) => return stopped_or_failed(out, e),
        }
        out.meta_sent = true;
    }
    let mut pos = Position {
        cursor: out.cursor.clone(),
        consumed: out.consumed,
    };
    if let Some(t) = read_stream(ctx, id, None, &mut pos, &mut out).await {
        threads = t;
    }
    out.cursor = pos.cursor;
    out.consumed = pos.consumed;
    // What the session's stream said about its threads (as far as it was committed) is kept,
    // whatever fails next.
    out.threads = Some(threads.clone());
    if out.error.is_some() || out.gone || out.stopped || out.store_failed {
        return out;
    }
    // A coordinator's thread list: on the first read, at the end, and while it changes at most
    // once per resync interval. It finds threads the session's stream does not announce and
    // threads that changed; between readings, the session's stream names the busy ones.
    let ended = out.status.as_deref().is_some_and(is_terminal);
    if multiagent
        && (input.need_meta
            || ended
            || input.thread_list_failed
            || (out.new_events > 0 && input.thread_list_due))
    {
        match read_thread_list(ctx, id).await {
            Ok(listed) if !listed.is_empty() => {
                out.threads_listed = true;
                let batch = Batch {
                    session_id: id.to_owned(),
                    threads_listed: listed,
                    ..Batch::default()
                };
                match ctx.pipeline.batch(batch).await {
                    Ok(o) => {
                        threads = o.threads;
                        out.threads = Some(threads.clone());
                    }
                    Err(e) => return stopped_or_failed(out, e),
                }
            }
            Ok(_) => out.threads_listed = true,
            Err(e) => {
                // 404: an API without thread lists; don't ask again this interval.
                out.threads_listed = e.status() == Some(404);
                out.thread_list_failed = !out.threads_listed;
                out.error = (e.status() != Some(404)).then_some(e);
                if out.error.is_some() {
                    return out;
                }
            }
        }
    }
    for ThreadCursor {
        id: tid,
        cursor,
        consumed,
    } in threads
    {
        let mut pos = Position { cursor, consumed };
        if let Some(t) = read_stream(ctx, id, Some(&tid), &mut pos, &mut out).await {
            out.threads = Some(t);
        }
        if out.error.is_some() || out.stopped || out.store_failed {
            return out;
        }
    }
    if out.more {
        return out;
    }
    // The object's usage: a new snapshot from the listing; or, where no listing shows it, the
    // object read after new events; and the final one of an ended session (the only one a
    // session whose events carry none has).
    let ended = out.status.as_deref().is_some_and(is_terminal);
    let refresh = ended || (input.refresh_object && out.new_events > 0);
    let usage = match input.listed_usage {
        Some(u) if Some(&u) != input.usage_sent.as_ref() && !refresh => Some(u),
        _ if refresh => match fetch_meta(ctx.client, id).await {
            Ok(m) => m.usage,
            Err(e) => {
                out.error = (e.status() != Some(404)).then_some(e);
                return out;
            }
        },
        _ => None,
    };
    if let Some(u) = usage {
        let meta = SessionMeta {
            usage: Some(u.clone()),
            ..SessionMeta::default()
        };
        if let Err(e) = ctx.pipeline.meta(id.to_owned(), meta).await {
            return stopped_or_failed(out, e);
        }
        out.usage_sent = Some(u);
    }
    out
}

/// Agent names looked up by id, for this run: `None` when the API could not name the agent
/// (no such endpoint or agent), so it is not asked again.
type AgentNames = std::sync::Mutex<HashMap<String, Option<String>>>;

/// Gives an id-only session its agent's name before any of its events is counted: from an
/// earlier lookup, or from `GET /agents/{id}`. When the API cannot say, the id stays the
/// label until an object shows the name (the pipeline then moves the id's series to it).
async fn resolve_agent(ctx: &JobCtx<'_>, meta: &mut SessionMeta) {
    let Some(id) = meta.agent_id.clone().filter(|_| meta.agent_name.is_none()) else {
        return;
    };
    let known = ctx
        .agent_names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned();
    if let Some(name) = known {
        meta.agent_name = name;
        return;
    }
    let name = match ctx.client.get_agent(&id).await {
        Ok(body) => match serde_json::from_slice::<wire::WireAgentObject>(&body) {
            Ok(a) if a.id.as_deref().is_none_or(|i| i == id) => a.name.filter(|n| !n.is_empty()),
            Ok(_) => None,
            Err(e) => {
                ctx.client.count_failure("agent", "decode");
                tracing::warn!(agent_id = %id, error = %e, "agent object did not decode; the id stays the label");
                None
            }
        },
        Err(e) if e.status() == Some(404) => {
            tracing::info!(agent_id = %id, "the API has no agent object for this id; the id stays the label");
            None
        }
        // A transient failure: this session keeps the id for now, the next one asks again.
        Err(e) => {
            tracing::warn!(agent_id = %id, error = %e, "looking up an agent's name failed");
            return;
        }
    };
    ctx.agent_names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, name.clone());
    meta.agent_name = name;
}

/// A session's sub-agent threads from its thread list (the primary thread, without a
/// parent, is the session's own stream and is left out).
async fn read_thread_list(ctx: &JobCtx<'_>, id: &str) -> Result<Vec<ListedThread>, ApiError> {
    Ok(ctx
        .client
        .thread_objects(id)
        .await?
        .iter()
        .filter_map(|raw| serde_json::from_str::<wire::WireThread>(raw.get()).ok())
        .filter(|t| t.parent_thread_id.is_some())
        .filter_map(|t| {
            Some(ListedThread {
                id: t.id.clone().filter(|i| !i.is_empty())?,
                agent: t.agent_name().map(str::to_owned),
                updated_at: t.updated_at.clone(),
            })
        })
        .collect())
}

/// `GET /sessions/{id}`, as what the pipeline learns from it.
async fn fetch_meta(client: &Client, id: &str) -> Result<SessionMeta, ApiError> {
    let body = client.get_session(id).await?;
    match wire::decode_session(&String::from_utf8_lossy(&body)) {
        Some(s) => Ok(meta_of(&s)),
        None => {
            client.count_failure("session", "decode");
            Err(ApiError::Decode("session object without an id".to_owned()))
        }
    }
}

/// Reads up to `max_pages` pages of one stream (the session's, or thread `thread`'s) from
/// `pos`, committing each page before moving on. Failures land in `out`; the session's stream
/// also sets `out`'s status. Returns the threads the last committed batch said need reading.
async fn read_stream(
    ctx: &JobCtx<'_>,
    id: &str,
    thread: Option<&str>,
    pos: &mut Position,
    out: &mut JobOutput,
) -> Option<Vec<ThreadCursor>> {
    let mut threads = None;
    // Events to skip when the log is being re-read after a refused cursor.
    let mut skip: u64 = 0;
    let mut reset_done = false;
    let mut pages = 0;
    let stream = thread.unwrap_or_default().to_owned();
    loop {
        if ctx.cancel.is_cancelled() {
            out.stopped = true;
            return threads;
        }
        let result = match thread {
            None => ctx.client.list_events(id, pos.cursor.as_deref()).await,
            Some(t) => {
                ctx.client
                    .list_thread_events(id, t, pos.cursor.as_deref())
                    .await
            }
        };
        let body = match result {
            Ok(b) => b,
            Err(e) if e.status() == Some(400) && pos.cursor.is_some() && !reset_done => {
                tracing::warn!(session = id, thread, error = %e, skip = pos.consumed, "event cursor refused; re-reading the log from the start and skipping what was counted");
                ctx.metrics.cursor_resets.inc();
                reset_done = true;
                skip = pos.consumed;
                pos.cursor = None;
                // The log is read again from its start on purpose: not a loop.
                out.cursor_history.remove(&stream);
                continue;
            }
            Err(e) if thread.is_some() && e.status() == Some(404) => {
                // A thread that is gone has nothing more to read: its stream ends here, so
                // what the session's stream cross-posted of it counts as it is, and it is not
                // asked for again until the session's stream names it.
                tracing::info!(
                    session = id,
                    thread,
                    "thread is gone (404); its stream ends here"
                );
                let end = Batch {
                    session_id: id.to_owned(),
                    thread: thread.map(str::to_owned),
                    at_end: true,
                    thread_gone: true,
                    ..Batch::default()
                };
                match ctx.pipeline.batch(end).await {
                    Ok(outcome) => threads = Some(outcome.threads),
                    Err(e) => *out = stopped_or_failed(std::mem::take(out), e),
                }
                return threads;
            }
            Err(e) => {
                out.gone = thread.is_none() && e.status() == Some(404);
                out.error = (!out.gone).then_some(e);
                return threads;
            }
        };
        // A page that is not quite JSON (a bad byte, a `NaN`) is repaired, so the one field
        // costs one field and not the session's progress; anything worse is a decode failure.
        let mut repaired = None;
        let (page, repairs) = match wire::parse_page(&body, &mut repaired) {
            Ok(p) => p,
            Err(e) => {
                out.error = Some(decode_failure(ctx.client, "events", &e));
                return threads;
            }
        };
        if repairs > 0 {
            ctx.client.count_anomaly("invalid_json");
            tracing::warn!(
                session = id,
                thread,
                repairs,
                "an event page was not valid JSON (bytes that are not UTF-8, NaN or Infinity); repaired, the fields are dropped"
            );
        }
        // We ask for 100 per page; a page far longer than that is cut, read on from where
        // the cut fell (counted), so a hostile page cannot hold a session's memory hostage.
        let cut = page.data.len() > MAX_EVENTS_PER_PAGE;
        if cut {
            ctx.metrics.pages_cut.inc();
        }
        let kept = &page.data[..page.data.len().min(MAX_EVENTS_PER_PAGE)];
        let mut items = Vec::with_capacity(kept.len());
        let mut bad_fields = DroppedFields {
            not_json: repairs,
            ..DroppedFields::default()
        };
        let mut last_id = None;
        let mut turns = TurnIds::default();
        for raw in kept {
            match wire::decode_event(raw.get()) {
                Ok(mut d) => {
                    bad_fields += d.bad_fields;
                    let e = Event::from_wire_with(&mut d.event, &mut turns);
                    last_id = Some(e.id.clone());
                    items.push(Item::event(e));
                }
                Err(reason) => items.push(Item::Invalid(reason)),
            }
        }
        if skip > 0 {
            let n = usize::try_from(skip).unwrap_or(usize::MAX).min(items.len());
            items.drain(..n);
            skip -= n as u64;
        }
        let next_cursor = if cut {
            last_id.or(pos.cursor.clone())
        } else {
            page.last_id.clone().or(last_id).or(pos.cursor.clone())
        };
        // An API that ignores the cursor answers with events at or before it: those up to
        // and including the cursor's event were counted already.
        if let Some(at) = pos.cursor.as_deref()
            && let Some(i) = items
                .iter()
                .position(|it| matches!(it, Item::Event(e, _) if e.id == at))
        {
            let repeated = i + 1;
            items.drain(..repeated);
            ctx.metrics.events_duplicate.inc_by(repeated as u64);
            ctx.client.count_anomaly("cursor_ignored");
            tracing::warn!(
                session = id,
                thread,
                repeated,
                cursor = at,
                "the API answered with events before the cursor (is after_id ignored?); they are not counted again"
            );
        }
        // A page that ends where this stream has already been: a loop. Nothing of it is new.
        if let Some(next) = next_cursor.as_deref()
            && next_cursor != pos.cursor
            && out
                .cursor_history
                .get(&stream)
                .is_some_and(|h| h.iter().any(|c| c == next))
        {
            let repeated = items.len();
            ctx.metrics.events_duplicate.inc_by(repeated as u64);
            ctx.client.count_anomaly("page_loop");
            // The session's next read backs off like after a failure: a looping API must
            // not spend the request budget.
            out.anomaly = true;
            tracing::warn!(
                session = id,
                thread,
                repeated,
                cursor = next,
                "the API's pages lead back to one already read; reading stops here until the next poll"
            );
            return threads;
        }
        let advanced = next_cursor != pos.cursor;
        let has_more = (cut || page.has_more.unwrap_or(false)) && !page.data.is_empty() && advanced;
        if !items.is_empty() || advanced || (thread.is_some() && !has_more) {
            let n = items.len();
            let batch = Batch {
                session_id: id.to_owned(),
                thread: thread.map(str::to_owned),
                at_end: !has_more,
                thread_gone: false,
                items,
                cursor: next_cursor.clone(),
                bad_fields,
                meta: None,
                threads_listed: Vec::new(),
            };
            match ctx.pipeline.batch(batch).await {
                Ok(outcome) => {
                    pos.consumed = outcome.consumed;
                    if thread.is_none() {
                        out.status = Some(outcome.status);
                    }
                    threads = Some(outcome.threads);
                    // Remembered only once committed: a failed commit reads the page again,
                    // and that is no loop.
                    if let Some(next) = &next_cursor
                        && advanced
                    {
                        let history = out.cursor_history.entry(stream.clone()).or_default();
                        if history.len() == CURSOR_HISTORY {
                            history.pop_front();
                        }
                        history.push_back(next.clone());
                    }
                    pos.cursor = next_cursor;
                    out.new_events += n;
                }
                Err(e) => {
                    *out = stopped_or_failed(std::mem::take(out), e);
                    return threads;
                }
            }
        }
        pages += 1;
        if !has_more {
            return threads;
        }
        // While skipping what a refused cursor made us read again, go on past the page
        // limit: the skip count lives only in this job.
        if pages >= ctx.max_pages && skip == 0 {
            out.more = true;
            return threads;
        }
        tokio::select! {
            () = tokio::time::sleep(ctx.gap) => {}
            () = ctx.cancel.cancelled() => {
                out.more = true;
                out.stopped = true;
                return threads;
            }
        }
    }
}

fn stopped_or_failed(mut out: JobOutput, e: SendError) -> JobOutput {
    match e {
        SendError::Stopped => out.stopped = true,
        SendError::State(e) => {
            tracing::debug!(session = %out.id, error = %e, "state store commit failed");
            out.store_failed = true;
            out.store_error = Some(e.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_prefers_name_then_id() {
        let s = wire::decode_session(
            r#"{"id":"s","status":"idle","agent":{"id":"agent_1","name":"","model":"qwen"}}"#,
        )
        .expect("s");
        let m = meta_of(&s);
        assert_eq!(
            (m.agent_name, m.agent_id.as_deref(), m.model.as_deref()),
            (None, Some("agent_1"), Some("qwen"))
        );
        let g1 = wire::decode_session(
            r#"{"id":"s","agent_id":"ag_9","archived_at":"2026-06-01T00:00:00Z","status":"idle"}"#,
        )
        .expect("s");
        let m = meta_of(&g1);
        assert_eq!(
            (m.agent_id.as_deref(), m.status.as_deref()),
            (Some("ag_9"), Some("archived"))
        );
    }

    #[test]
    fn statuses_of_all_generations_are_classified() {
        for s in ["running", "processing", "rescheduling", "canceling"] {
            assert!(is_running(s), "{s}");
        }
        for s in ["idle", "cancelled"] {
            assert!(!is_running(s) && !is_terminal(s), "{s}");
        }
        for s in ["terminated", "archived", "deleted"] {
            assert!(is_terminal(s), "{s}");
        }
    }
}
