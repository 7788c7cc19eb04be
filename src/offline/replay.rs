//! `replay`: JSON Lines files through the same pipeline and state store as the live exporter.

// The reader looks up a session per line: hashbrown's fast hasher, not SipHash.
use hashbrown::{HashMap, HashSet};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::app::Core;
use crate::config::{ReplayFlags, Settings};
use crate::event::DroppedFields;
use crate::pipeline::tracker::ListedThread;
use crate::pipeline::{Batch, GroupAck, Item, PipelineHandle};
use crate::sinks::metrics::Metrics;
use crate::source::poller::meta_of;
use crate::source::wire;

use super::lines::{self, Line, SessionName};

/// Events buffered across all sessions before everything buffered is sent.
const MAX_BUFFERED: usize = 200_000;
/// Groups sent to the pipeline and not yet acknowledged. Enough for reading to go on while a
/// group commits; more only leaves the pipeline a longer tail to work through alone when the
/// reading is done (8: 2-3 % slower, 40 MB more at the peak).
const IN_FLIGHT: usize = 3;
/// A stream's run of at least this many events goes to the pipeline when the next stream's
/// lines begin.
const RUN_FLUSH: usize = 64;
/// Events per state transaction: batches of many sessions are committed together, so a
/// backfill pays for one synchronous commit per this many events, not one per session.
const GROUP_EVENTS: usize = 20_000;

/// What a replay read.
#[derive(Debug, Default, Clone)]
pub struct ReplaySummary {
    pub bytes: u64,
    pub lines: u64,
    pub events: u64,
    pub sessions: u64,
    /// Lines that are not an event or a session (counted in `events_invalid_total`).
    pub invalid: u64,
    /// Events the state already held (an earlier replay into the same state): not applied.
    pub skipped: u64,
    pub elapsed: Duration,
    /// The first invalid lines, as `file:line: why` (at most `REPORTED_INVALID`).
    pub invalid_lines: Vec<String>,
}

/// Invalid lines reported one by one; past this many, only counted.
pub(crate) const REPORTED_INVALID: usize = 20;

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss, reason = "a rate for people to read")]
        let rate = self.events as f64 / secs;
        #[allow(clippy::cast_precision_loss, reason = "a rate for people to read")]
        let mb = self.bytes as f64 / 1e6 / secs;
        write!(
            f,
            "replayed {} events of {} sessions ({} lines, {} invalid, {} already in the state) in {:.2} s: {:.0} events/s, {:.1} MB/s",
            self.events, self.sessions, self.lines, self.invalid, self.skipped, secs, rate, mb
        )
    }
}

struct Ack(GroupAck);

impl Ack {
    /// Waits for the group's commit; its applied items are freed here, off the pipeline's
    /// thread.
    fn wait(self) -> anyhow::Result<()> {
        let (_outcomes, spent) = self.0.blocking_recv().context("pipeline stopped")??;
        drop(spent);
        Ok(())
    }
}

#[derive(Default)]
struct Pending {
    session: String,
    /// A sub-agent thread's stream (lines marked `qoder_exporter_stream`); `None`: the session's.
    thread: Option<String>,
    items: Vec<Item>,
    bad_fields: DroppedFields,
    meta: Option<crate::pipeline::SessionMeta>,
    threads_listed: Vec<ListedThread>,
}

/// Groups lines into per-session batches and keeps a window of them in flight.
struct Feeder<'a> {
    handle: &'a PipelineHandle,
    metrics: &'a Metrics,
    batch_size: usize,
    pending: HashMap<String, Pending>,
    buffered: usize,
    /// Batches ready to go out together, in order.
    group: Vec<Batch>,
    group_events: usize,
    acks: VecDeque<Ack>,
    seen: HashSet<String>,
    /// Per session, events at the head of its log that the state already consumed.
    skip: HashMap<String, u64>,
    /// Sessions the state holds as finished (drained after termination): counted in full and
    /// never read again, as in live polling; their lines are skipped.
    finished: HashSet<String>,
    summary: ReplaySummary,
    /// Time the reader spent waiting for the pipeline (it is the bottleneck when this is large).
    waited: Duration,
    /// The input is read to its end: every stream's last batch says so.
    at_end: bool,
    /// Agent names from the file's agent lines, for sessions that name their agent by id.
    agent_names: HashMap<String, String>,
    /// The session the chunk's last event line named (what [`SessionName::Same`] means).
    chunk_session: Option<String>,
    /// Thread streams with batches sent before the input's end (key → session, thread): each
    /// gets one more at the end, empty if need be, that says the end came. Only then are a
    /// thread's held cross-posts (events the session's stream showed and the thread's did
    /// not) counted, so a thread whose batches all went early would lose them.
    threads_sent: HashMap<String, (String, String)>,
    /// The stream (its pending key) the last event line belonged to.
    last_stream: String,
    /// The session the last event line named (in `seen` from then on).
    last_session: String,
    /// Where the line being read is, for reports of invalid lines.
    file: String,
    line_no: u64,
}

impl Feeder<'_> {
    fn push_ack(&mut self, ack: Ack) -> anyhow::Result<()> {
        self.acks.push_back(ack);
        let t = Instant::now();
        while self.acks.len() > IN_FLIGHT {
            if let Some(a) = self.acks.pop_front() {
                a.wait()?;
            }
        }
        self.waited += t.elapsed();
        Ok(())
    }

    fn flush(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(p) = self.pending.remove(key) else {
            return Ok(());
        };
        // A thread's events go after what the session's stream holds so far: its session
        // object (agent, model) and the `session.thread_created` that names the thread.
        if p.thread.is_some() {
            let session = p.session.clone();
            self.flush(&session)?;
        }
        // At the end a thread's batch goes even empty: it says its stream was read to the end.
        let says_end = self.at_end && p.thread.is_some();
        if p.items.is_empty() && p.meta.is_none() && p.threads_listed.is_empty() && !says_end {
            return Ok(());
        }
        if let Some(thread) = &p.thread
            && !self.at_end
        {
            self.threads_sent
                .insert(key.to_owned(), (p.session.clone(), thread.clone()));
        }
        self.buffered -= p.items.len();
        self.group_events += p.items.len();
        let cursor = p.items.iter().rev().find_map(|i| match i {
            Item::Event(e, _) => Some(e.id.clone()),
            Item::Invalid(_) => None,
        });
        self.group.push(Batch {
            session_id: p.session,
            thread: p.thread,
            items: p.items,
            cursor,
            bad_fields: p.bad_fields,
            meta: p.meta,
            at_end: self.at_end,
            thread_gone: false,
            threads_listed: p.threads_listed,
        });
        if self.group_events >= GROUP_EVENTS {
            self.send_group()?;
        }
        Ok(())
    }

    /// Sends `key`'s pending events in batches of `batch_size` while it holds that many (a
    /// run may fill several); the rest stays pending.
    fn flush_full(&mut self, key: &str) -> anyhow::Result<()> {
        while let Some(p) = self.pending.get_mut(key)
            && p.items.len() >= self.batch_size
        {
            let rest = p.items.split_off(self.batch_size);
            let (session, thread) = (p.session.clone(), p.thread.clone());
            self.flush(key)?;
            if !rest.is_empty() {
                self.pending.insert(
                    key.to_owned(),
                    Pending {
                        session,
                        thread,
                        items: rest,
                        ..Pending::default()
                    },
                );
            }
        }
        Ok(())
    }

    fn send_group(&mut self) -> anyhow::Result<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        let group = std::mem::take(&mut self.group);
        self.group_events = 0;
        let rx = self
            .handle
            .send_batches_blocking(group)
            .context("pipeline stopped")?;
        self.push_ack(Ack(rx))
    }

    fn flush_all(&mut self) -> anyhow::Result<()> {
        let ids: Vec<String> = self.pending.keys().cloned().collect();
        for id in ids {
            self.flush(&id)?;
        }
        self.send_group()
    }

    fn invalid(&mut self, reason: &str) {
        self.summary.invalid += 1;
        if self.summary.invalid_lines.len() < REPORTED_INVALID {
            self.summary
                .invalid_lines
                .push(format!("{}:{}: {reason}", self.file, self.line_no));
        }
        self.metrics
            .process
            .events_invalid
            .with_label_values(&[reason])
            .inc();
    }

    /// The lines move on to another stream: the stream before it goes to the pipeline now if
    /// it holds a run of events (a dump writes each stream's events together), instead of
    /// waiting for its batch to fill or for the buffer to (the pipeline idled until 200 000
    /// events were read, then had them all left to do when the reading was done). Short runs,
    /// as of streams written interleaved, stay buffered to be written together.
    fn stream_changed(&mut self, key: &str) -> anyhow::Result<()> {
        let previous = std::mem::replace(&mut self.last_stream, key.to_owned());
        if self
            .pending
            .get(&previous)
            .is_some_and(|p| p.items.len() >= RUN_FLUSH)
        {
            self.flush(&previous)?;
        }
        Ok(())
    }

    /// One decoded line, or a run of event lines, in file order.
    fn line(&mut self, line: Line) -> anyhow::Result<()> {
        let run = match line {
            Line::Blank => return Ok(()),
            Line::TooLarge => {
                self.invalid("too_large");
                return Ok(());
            }
            Line::Invalid(reason) => {
                self.summary.lines += 1;
                self.invalid(reason);
                return Ok(());
            }
            Line::Agent(agent) => {
                self.summary.lines += 1;
                self.agent_line(agent);
                return Ok(());
            }
            Line::Thread { thread, session } => {
                self.summary.lines += 1;
                self.thread_line(thread.map(|t| *t), session);
                return Ok(());
            }
            Line::Session(session) => {
                self.summary.lines += 1;
                return self.session_line(session.map(|s| *s));
            }
            Line::Events(run) => run,
        };
        self.summary.lines += run.items.len() as u64;
        // The session as the decoder sent it: a run of one session's lines names it once.
        let session = match run.session {
            SessionName::Named(s) => Some(s),
            SessionName::Same => self.chunk_session.take(),
            SessionName::Missing => None,
        };
        let result = self.event_run(session.as_deref(), run.stream, run.items, run.bad_fields);
        self.chunk_session = session;
        result
    }

    fn agent_line(&mut self, agent: Option<wire::WireAgentObject>) {
        match agent {
            // An agent without a name names nothing: the id stays the label, as live.
            Some(wire::WireAgentObject {
                id: Some(id),
                name: Some(name),
            }) if !name.is_empty() => {
                self.agent_names.insert(id, name);
            }
            Some(wire::WireAgentObject { id: Some(_), .. }) => {}
            _ => self.invalid("missing_id"),
        }
    }

    fn thread_line(&mut self, thread: Option<wire::WireThread>, session: Option<String>) {
        let (Some(t), Some(session)) = (thread, session) else {
            self.invalid("missing_session_id");
            return;
        };
        let (Some(tid), Some(_)) = (t.id.clone(), t.parent_thread_id.as_ref()) else {
            return;
        };
        let listed = ListedThread {
            id: tid,
            agent: t.agent_name().map(str::to_owned),
            updated_at: t.updated_at.clone(),
        };
        if self.finished.contains(&session) {
            return;
        }
        if self.seen.insert(session.clone()) {
            self.summary.sessions += 1;
        }
        let p = self.pending.entry(session.clone()).or_default();
        p.session = session;
        p.threads_listed.push(listed);
    }

    fn session_line(&mut self, session: Option<wire::WireSession>) -> anyhow::Result<()> {
        let Some(s) = session else {
            self.invalid("missing_id");
            return Ok(());
        };
        let id = s.id.clone().unwrap_or_default();
        if self.finished.contains(&id) {
            return Ok(());
        }
        // Metadata applies to what follows: it goes after what came before it, in the
        // same transaction as the events after it.
        self.flush(&id)?;
        if self.seen.insert(id.clone()) {
            self.summary.sessions += 1;
        }
        let p = self.pending.entry(id.clone()).or_default();
        p.session = id;
        let mut meta = meta_of(&s);
        if meta.agent_name.is_none() {
            meta.agent_name = meta
                .agent_id
                .as_ref()
                .and_then(|a| self.agent_names.get(a))
                .cloned();
        }
        p.meta = Some(meta);
        Ok(())
    }

    /// Consecutive event lines of one stream.
    fn event_run(
        &mut self,
        session: Option<&str>,
        stream: Option<String>,
        mut items: Vec<Item>,
        bad_fields: DroppedFields,
    ) -> anyhow::Result<()> {
        let Some(session) = session.filter(|s| !s.is_empty()) else {
            // Lines without a session never share a run: each is reported on its own.
            for _ in &items {
                self.invalid("missing_session_id");
            }
            return Ok(());
        };
        if self.finished.contains(session) {
            self.summary.skipped += items.len() as u64;
            return Ok(());
        }
        // Counted once; a run of one session's lines looks it up once.
        if self.last_session != session {
            if !self.pending.contains_key(session) && self.seen.insert(session.to_owned()) {
                self.summary.sessions += 1;
            }
            session.clone_into(&mut self.last_session);
        }
        let thread = stream.filter(|t| !t.is_empty());
        // A session's own stream is keyed by its id as it is; only a thread's needs a new key.
        let thread_key;
        let key: &str = match &thread {
            Some(t) => {
                thread_key = stream_key(session, Some(t));
                &thread_key
            }
            None => session,
        };
        if let Some(n) = self.skip.get_mut(key)
            && *n > 0
        {
            let head = items.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
            *n -= head as u64;
            self.summary.skipped += head as u64;
            items.drain(..head);
            if items.is_empty() {
                return Ok(());
            }
        }
        self.summary.events += items.len() as u64;
        self.buffered += items.len();
        if self.last_stream != key {
            self.stream_changed(key)?;
        }
        let p = match self.pending.get_mut(key) {
            Some(p) => p,
            None => self
                .pending
                .entry(key.to_owned())
                .or_insert_with(|| Pending {
                    session: session.to_owned(),
                    thread: thread.clone(),
                    ..Pending::default()
                }),
        };
        p.bad_fields += bad_fields;
        // The decoder's vector becomes the batch's when nothing is pending before it.
        if p.items.is_empty() {
            p.items = items;
        } else {
            p.items.append(&mut items);
        }
        self.flush_full(key)?;
        if self.buffered >= MAX_BUFFERED {
            self.flush_all()?;
        }
        Ok(())
    }
}

/// The key under which a stream's progress is kept: the session id, or `session#thread`.
fn stream_key(session: &str, thread: Option<&str>) -> String {
    match thread {
        Some(t) => format!("{session}#{t}"),
        None => session.to_owned(),
    }
}

/// Opens a replay input, decompressing gzip when its first bytes say so (whatever its name).
fn open_input(path: &Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
    let raw: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("replay: {}", path.display()))?)
    };
    // The first two bytes, however the input hands them out (a pipe may give one at a time).
    let mut raw = raw;
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < head.len() {
        match raw.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| format!("replay: reading {}", path.display()));
            }
        }
    }
    let whole = std::io::Cursor::new(head[..got].to_vec()).chain(raw);
    // The reader asks for blocks larger than these buffers, which then pass them by: the
    // input goes straight into the reader's chunks, not through a copy here.
    if head[..got] == [0x1f, 0x8b] {
        return Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            whole,
        ))));
    }
    Ok(Box::new(BufReader::new(whole)))
}

/// Reads every file and feeds the pipeline; runs on a blocking thread.
fn feed(
    files: &[PathBuf],
    handle: &PipelineHandle,
    metrics: &Metrics,
    batch_size: usize,
    skip: HashMap<String, u64>,
    finished: HashSet<String>,
) -> anyhow::Result<ReplaySummary> {
    let total: u64 = files
        .iter()
        .filter(|p| p.as_os_str() != "-")
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    // Drawn only when stderr is a terminal; hidden otherwise.
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut f = Feeder {
        handle,
        metrics,
        batch_size: batch_size.max(1),
        pending: HashMap::new(),
        buffered: 0,
        group: Vec::new(),
        group_events: 0,
        acks: VecDeque::new(),
        seen: HashSet::new(),
        skip,
        finished,
        summary: ReplaySummary::default(),
        waited: Duration::ZERO,
        at_end: false,
        agent_names: HashMap::new(),
        chunk_session: None,
        threads_sent: HashMap::new(),
        last_stream: String::new(),
        last_session: String::new(),
        file: String::new(),
        line_no: 0,
    };
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            if p.as_os_str() == "-" {
                "<stdin>".to_owned()
            } else {
                p.display().to_string()
            }
        })
        .collect();
    // The decoders share the cores with this thread and the pipeline's.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    lines::read_decoded(files.to_vec(), open_input, workers, |chunk| {
        f.summary.bytes += chunk.place.bytes;
        bar.inc(chunk.place.bytes);
        f.file.clone_from(&names[chunk.place.file]);
        f.chunk_session = None;
        let mut line_no = chunk.place.first_line;
        for line in chunk.lines.drain(..) {
            f.line_no = line_no;
            line_no += line.lines();
            f.line(line)?;
        }
        Ok(())
    })?;
    f.at_end = true;
    for (key, (session, thread)) in std::mem::take(&mut f.threads_sent) {
        f.pending.entry(key).or_insert_with(|| Pending {
            session,
            thread: Some(thread),
            ..Pending::default()
        });
    }
    f.flush_all()?;
    while let Some(a) = f.acks.pop_front() {
        a.wait()?;
    }
    bar.finish_and_clear();
    f.summary.elapsed = started.elapsed();
    tracing::debug!(waited_for_pipeline = ?f.waited, "replay read");
    Ok(f.summary)
}

/// Replays `flags.files` into the state at `settings.state_path`, exports spans if configured,
/// and returns the metrics and what was read.
pub async fn replay(
    settings: &Settings,
    flags: &ReplayFlags,
) -> anyhow::Result<(Metrics, ReplaySummary)> {
    // A missing file refuses the replay before the state file is created or touched.
    for path in flags.files.iter().filter(|p| p.as_os_str() != "-") {
        std::fs::File::open(path).with_context(|| format!("replay: {}", path.display()))?;
    }
    let metrics = crate::app::configured_metrics(settings)?;
    let core = Core::start(settings, &metrics)?;
    let handle = core.handle.clone();
    let files = flags.files.clone();
    let m = metrics.clone();
    let batch = usize::try_from(flags.batch_size).unwrap_or(usize::MAX);
    // Replaying into a state that already holds a session's head skips that head: replaying
    // the same file twice counts nothing twice.
    let mut skip: HashMap<String, u64> = HashMap::new();
    let mut finished = HashSet::new();
    for s in &core.stored {
        if s.finished {
            finished.insert(s.id.clone());
            continue;
        }
        skip.insert(s.id.clone(), s.state.consumed);
        for (tid, t) in &s.state.threads {
            skip.insert(stream_key(&s.id, Some(tid)), t.tracker.consumed);
        }
    }
    let fed = tokio::task::spawn_blocking(move || feed(&files, &handle, &m, batch, skip, finished))
        .await
        .context("replay thread")?;
    // Whatever happened, close in order: spans flushed, the pipeline drained, the store
    // closed, the final totals pushed.
    drop(core.handle);
    core.downstream.close().await?;
    Ok((metrics, fed?))
}
