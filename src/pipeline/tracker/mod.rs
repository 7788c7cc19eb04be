//! The per-session state machine: turns, model requests paired start→end, tool calls paired
//! use→result, and what each event adds to the metrics.
//!
//! [`SessionState::apply`] is a pure function of the state and one event: it tells a [`Tally`]
//! what happened (the metrics sink counts it) and hands closed turns (with their child spans)
//! to the caller.
//! The state is plain data, serialised into the state store with the batch that produced it,
//! so a restart resumes a half-finished turn exactly where it was.
//!
//! Turn rules (the API does not document them; see README "How turns and tokens are counted"):
//! - With G1 `turn_id`, a turn is the events sharing it; a new id closes the previous turn.
//! - Without it, `user.message`, `session.status_running` or `session.status_rescheduled` opens
//!   a turn when none is open, and so does any model, tool or agent-output event.
//! - `session.status_idle` closes the turn and is what `qoder_turns_total` counts.
//! - A `session.error` whose retry status is `exhausted` or `terminal` marks the turn failed;
//!   it ends there if the next event opens a new turn instead of idling.
//! - Termination (`terminated`, `session.status_terminated`, `session.deleted`) closes
//!   everything still open as incomplete.

use std::collections::BTreeMap;

mod handlers;

use handlers::{Cx, RequestEnd};

use super::usage::{SnapshotOutcome, SnapshotSource};
use crate::event::{Event, EventKind, ThreadPhase, Tokens, ToolKind, UsageSnapshot, truncate};
use crate::outcome::Tally;
pub use crate::session::{OpenRequest, OpenTool, SessionState, ThreadState, TurnSpan};
pub use crate::turn::{
    ChildDetail, ChildSpan, ClosedTurn, Message, ParentTurn, Turn, TurnEnd, TurnError,
};

/// Bounds on open state: a session that never closes what it opens cannot grow without limit.
const MAX_OPEN_REQUESTS: usize = 256;
const MAX_OPEN_TOOLS: usize = 256;
const MAX_CHILDREN: usize = 1000;
const MAX_TURN_ERRORS: usize = 100;
/// Captured messages per turn (only with `--otlp.capture-content`).
const MAX_MESSAGES: usize = 64;

/// Where a sub-agent thread's stream is to be read from: its cursor, and how many of its
/// events were consumed (what a re-read from the start after a refused cursor skips).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadCursor {
    pub id: String,
    pub cursor: Option<String>,
    pub consumed: u64,
}

/// A sub-agent thread as `GET /sessions/{id}/threads` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListedThread {
    pub id: String,
    pub agent: Option<String>,
    pub updated_at: Option<String>,
}

/// Closed session turns remembered for placing threads' turns.
const RECENT_TURNS: usize = 8;

/// What a batch of a thread's stream did to the stream's position.
#[derive(Debug)]
pub(crate) struct ThreadRead {
    pub cursor: Option<String>,
    pub at_end: bool,
    /// The thread is gone: nothing more will come, running or not.
    pub gone: bool,
}

/// What reading a batch of a thread's stream leaves: the events consumed from that stream so
/// far, and the cross-posts the end of the stream released and counted (each with the
/// context of its log record).
#[derive(Debug)]
pub(crate) struct ThreadReadOutcome {
    pub consumed: u64,
    pub released: Vec<Released>,
}

/// A held cross-post counted when its thread's stream ended without showing it.
#[derive(Debug)]
pub(crate) struct Released {
    pub event: Event,
    pub context: crate::record::RecordContext,
}

/// What applying one event did, beyond the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Counted,
    /// A repeat the tracker itself can tell: a cross-post of an event its thread already
    /// applied, or an id in an older state's window (every other repeat was skipped by the
    /// pipeline before the tracker saw it).
    Duplicate,
    /// Counted, but its usage snapshot was below the previous one and added nothing.
    DecreasingSnapshot,
    /// A thread's event cross-posted on the session's stream: it counts when the thread's own
    /// stream shows it (in its order there), or when that stream is read to its end without it.
    Held,
}

/// Cross-posted events held per thread at most; past that they are applied at once.
const MAX_HELD: usize = 64;

/// How many ids a thread remembers for cross-post dedupe.
const THREAD_SEEN_IDS: usize = 512;
/// Sub-agent threads followed per session at most.
const MAX_THREADS: usize = 256;

/// Whether `id` is among `ids`. Ids of one stream share long prefixes (`sevt_0001…`), so the
/// last byte is compared first: almost every other id differs there (a thread's window of
/// 512 ids compared in full was a tenth of the pipeline thread's time in `replay`).
fn among<'a>(ids: impl IntoIterator<Item = &'a str>, id: &str) -> bool {
    let last = id.as_bytes().last();
    ids.into_iter()
        .any(|r| r.len() == id.len() && r.as_bytes().last() == last && r == id)
}

/// Events the session stream may repeat from a thread's stream: not spans, not message text.
fn may_be_cross_posted(type_name: &str) -> bool {
    !(type_name.starts_with("span.") || matches!(type_name, "agent.message" | "agent.thinking"))
}

impl SessionState {
    pub fn new(agent: String) -> SessionState {
        SessionState {
            agent,
            status: "unknown".to_owned(),
            ..SessionState::default()
        }
    }

    fn model_or_unknown(&self) -> String {
        self.model.clone().unwrap_or_else(|| "unknown".to_owned())
    }

    /// Applies one readable event of the session's own stream.
    pub fn apply(
        &mut self,
        session_id: &str,
        ev: &Event,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        self.apply_from(session_id, ev, None, tally, closed)
    }

    /// Applies one readable event read from the session's stream (`from_thread` `None`) or
    /// from a sub-agent thread's stream. An event that belongs to a sub-agent thread (read on
    /// its stream, or cross-posted on the session's with its `session_thread_id`) goes to that
    /// thread's tracker, under the sub-agent's name, and counts once whichever stream shows it
    /// first.
    pub(crate) fn apply_from(
        &mut self,
        session_id: &str,
        ev: &Event,
        from_thread: Option<&str>,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        self.apply_checked(session_id, ev, from_thread, false, tally, closed)
    }

    /// [`SessionState::apply_from`], told whether the event's thread's own stream counted it
    /// already (`counted_on_thread`, from every id that stream counted: the tracker's own
    /// memory of a thread's ids is a window). A cross-post of such an event on the session's
    /// stream is a repeat, however late it comes.
    pub(crate) fn apply_checked(
        &mut self,
        session_id: &str,
        ev: &Event,
        from_thread: Option<&str>,
        counted_on_thread: bool,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        if let EventKind::ThreadCreated { thread, agent } = &ev.kind
            && from_thread.is_none()
            && !self.seen_recently(&ev.id)
        {
            if !self.threads.contains_key(thread) {
                self.add_thread(thread, agent.clone());
            }
            if let Some(t) = self.threads.get_mut(thread)
                && !t.created
            {
                t.created = true;
                if let Some(a) = agent
                    && t.tracker.agent == "unknown"
                {
                    t.tracker.agent.clone_from(a);
                }
                tally.thread_created(&t.tracker.agent);
            }
        }
        let owner = match from_thread {
            Some(t) => {
                if !self.threads.contains_key(t) {
                    self.add_thread(t, None);
                }
                Some(t.to_owned())
            }
            None => self.cross_posted_to(ev),
        };
        let Some(tid) = owner else {
            let applied = self.apply_own(session_id, ev, tally, closed);
            if applied == Applied::Counted
                && let Some(snap) = session_snapshot(&ev.kind)
                && self
                    .usage
                    .apply(snap, SnapshotSource::Event, &self.agent, tally)
                    == SnapshotOutcome::Decreased
            {
                return Applied::DecreasingSnapshot;
            }
            return applied;
        };
        let parent = self.turn_at(ev.time_ns);
        if !self.threads.contains_key(&tid) {
            return self.apply_own(session_id, ev, tally, closed);
        }
        // Consumed from the stream it was read on, even when the other stream showed it first.
        let admitted = match from_thread {
            None => self.admit(&ev.id),
            Some(_) => self
                .threads
                .get_mut(&tid)
                .is_some_and(|t| t.tracker.admit(&ev.id)),
        };
        let model = self.model.clone();
        let Some(thread) = self.threads.get_mut(&tid) else {
            return Applied::Duplicate;
        };
        // The session's agent snapshot may arrive after the thread was first seen (replay).
        if thread.tracker.model.is_none() {
            thread.tracker.model = model;
        }
        if !admitted
            || among(thread.seen.iter().map(String::as_str), &ev.id)
            || (from_thread.is_none() && counted_on_thread)
        {
            return Applied::Duplicate;
        }
        match from_thread {
            None => {
                thread.dirty = true;
                if thread.held.len() < MAX_HELD {
                    if !among(thread.held.iter().map(|h| h.id.as_str()), &ev.id) {
                        thread.held.push(ev.clone());
                    }
                    return Applied::Held;
                }
            }
            Some(_) => thread.held.retain(|h| h.id != ev.id),
        }
        Self::apply_to_thread(thread, parent, session_id, ev, tally, closed)
    }

    /// Applies an event to a thread's tracker, under the sub-agent's name.
    fn apply_to_thread(
        thread: &mut ThreadState,
        parent: Option<ParentTurn>,
        session_id: &str,
        ev: &Event,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        if may_be_cross_posted(&ev.type_name) {
            if thread.seen.len() == THREAD_SEEN_IDS {
                thread.seen.pop_front();
            }
            thread.seen.push_back(ev.id.clone());
        }
        if let EventKind::ThreadStatus { agent, phase, .. } = &ev.kind {
            thread.active = *phase == ThreadPhase::Running;
            if let Some(a) = agent
                && thread.tracker.agent == "unknown"
            {
                thread.tracker.agent = a.clone();
            }
        }
        let applied = thread.tracker.apply_admitted(session_id, ev, tally, closed);
        if let Some(turn) = &mut thread.tracker.turn
            && turn.parent.is_none()
        {
            turn.parent = parent;
        }
        applied
    }

    /// The session turn that was running at event time `at`: the open one, or one of the last
    /// closed ones (a thread's stream is read after the session's, often after its turn ended).
    fn turn_at(&self, at: Option<i64>) -> Option<ParentTurn> {
        let open = self.turn.as_ref().filter(|t| match (t.start_ns, at) {
            (Some(s), Some(a)) => s <= a,
            _ => true,
        });
        if let Some(t) = open {
            return Some(ParentTurn {
                key: t.key.clone(),
                first_event_id: t.first_event_id.clone(),
            });
        }
        let at = at?;
        self.recent_turns
            .iter()
            .rev()
            .find(|t| t.start_ns.is_some_and(|s| s <= at) && t.end_ns.is_none_or(|e| at <= e))
            .map(|t| t.turn.clone())
    }

    /// Who `ev` (just applied, read on `from_thread`'s stream or the session's) was counted
    /// under and the turn it belongs to: the turn it closed (one of `closed_now`, the turns
    /// its application closed), else the turn open on its stream after it.
    pub(crate) fn record_context(
        &self,
        ev: &Event,
        from_thread: Option<&str>,
        closed_now: &[ClosedTurn],
    ) -> crate::record::RecordContext {
        use crate::record::{RecordContext, TurnRef};
        let thread = from_thread
            .or(ev.thread_id.as_deref())
            .and_then(|t| self.threads.get(t));
        let tracker = thread.map_or(self, |t| &t.tracker);
        let turn_ref = |t: &Turn| TurnRef {
            trace_key: t.parent.as_ref().map_or(&t.key, |p| &p.key).clone(),
            span_event_id: t.first_event_id.clone(),
        };
        // An event that closed one turn and opened the next (a new `turn_id`) is the next
        // turn's first event: it belongs to the turn it opened.
        let opened = tracker.turn.as_ref().filter(|t| t.first_event_id == ev.id);
        let turn = match (opened, closed_now.last()) {
            (Some(t), _) => Some(turn_ref(t)),
            (None, Some(c)) => Some(turn_ref(&c.turn)),
            (None, None) => tracker.turn.as_ref().map(turn_ref),
        };
        // A request is counted under the model its start named, which the turn keeps.
        let request_model = match ev.kind {
            EventKind::ModelRequestEnd { .. } => {
                tracker.turn.as_ref().and_then(|t| t.last_model.clone())
            }
            _ => None,
        };
        RecordContext {
            agent: tracker.agent.clone(),
            model: request_model.or_else(|| tracker.model.clone()),
            turn,
        }
    }

    /// What the thread list says: a thread not known yet is registered (and read once); a
    /// known one whose object changed since the last listing is read again. Whether a
    /// listing shows it or not, `qoder_threads_created_total` counts `session.thread_created`
    /// events only, so a thread is never counted twice.
    pub(crate) fn thread_listed(&mut self, listed: &ListedThread) {
        if !self.threads.contains_key(&listed.id) {
            self.add_thread(&listed.id, listed.agent.clone());
            if let Some(t) = self.threads.get_mut(&listed.id) {
                t.active = false;
                t.listed_updated.clone_from(&listed.updated_at);
            }
            return;
        }
        if let Some(t) = self.threads.get_mut(&listed.id) {
            if let Some(a) = &listed.agent
                && t.tracker.agent == "unknown"
            {
                t.tracker.agent.clone_from(a);
            }
            if listed.updated_at.is_none() || t.listed_updated != listed.updated_at {
                t.dirty = true;
                t.listed_updated.clone_from(&listed.updated_at);
            }
        }
    }

    /// Registers a sub-agent thread (bounded: past the limit, its events stay the session's).
    fn add_thread(&mut self, thread: &str, agent: Option<String>) {
        // An empty id would share its stream of counted ids with the session's own stream.
        if self.threads.len() >= MAX_THREADS || thread.is_empty() {
            return;
        }
        let mut tracker = SessionState::new(agent.unwrap_or_else(|| "unknown".to_owned()));
        tracker.model.clone_from(&self.model);
        tracker.thread_id = Some(thread.to_owned());
        self.threads.insert(
            thread.to_owned(),
            ThreadState {
                active: true,
                dirty: true,
                tracker,
                ..ThreadState::default()
            },
        );
    }

    /// The sub-agent thread an event of the session's stream belongs to: the known thread its
    /// `session_thread_id` names, or a thread not announced yet whose status event names an
    /// agent other than the session's (the session's own thread is never a sub-agent's).
    fn cross_posted_to(&mut self, ev: &Event) -> Option<String> {
        if matches!(ev.kind, EventKind::ThreadCreated { .. }) {
            return None;
        }
        let tid = ev.thread_id.as_deref()?;
        if self.threads.contains_key(tid) {
            return Some(tid.to_owned());
        }
        if let EventKind::ThreadStatus {
            agent: Some(agent), ..
        } = &ev.kind
            && self.agent != "unknown"
            && *agent != self.agent
            && self.agent_id.as_deref() != Some(agent.as_str())
        {
            self.add_thread(tid, Some(agent.clone()));
            return self.threads.contains_key(tid).then(|| tid.to_owned());
        }
        None
    }

    /// Applies a snapshot of the session object's usage (a listing or `GET /sessions/{id}`).
    pub(crate) fn apply_object_usage(&mut self, snapshot: &UsageSnapshot, tally: &mut dyn Tally) {
        self.usage
            .apply(snapshot, SnapshotSource::Object, &self.agent, tally);
    }

    /// Billed credits so far by kind, from the snapshots applied.
    pub(crate) fn billed_credits(&self) -> BTreeMap<String, f64> {
        self.usage
            .applied
            .iter()
            .filter_map(|(k, v)| {
                let kind = k.strip_prefix("credits:")?;
                Some((kind.to_owned(), *v as f64 / crate::pipeline::usage::SCALE))
            })
            .collect()
    }

    /// The threads whose streams need reading: running, or named since last read to the end.
    pub(crate) fn threads_to_read(&self) -> Vec<ThreadCursor> {
        self.threads
            .iter()
            .filter(|(_, t)| t.active || t.dirty)
            .map(|(id, t)| ThreadCursor {
                id: id.clone(),
                cursor: t.cursor.clone(),
                consumed: t.tracker.consumed,
            })
            .collect()
    }

    /// Records that a batch of thread `tid`'s stream was applied: its cursor (when it moved),
    /// and whether the stream was read to its end (or is gone). Returns the events
    /// consumed from that stream so far, and the held cross-posts this counted.
    pub(crate) fn thread_read(
        &mut self,
        session_id: &str,
        tid: &str,
        read: ThreadRead,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> ThreadReadOutcome {
        let ThreadRead {
            cursor,
            at_end,
            gone,
        } = read;
        let mut released = Vec::new();
        if at_end {
            // Read to its end without showing them: the cross-posts count as they are.
            let held = self
                .threads
                .get_mut(tid)
                .map(|t| std::mem::take(&mut t.held))
                .unwrap_or_default();
            for ev in held {
                let parent = self.turn_at(ev.time_ns);
                let closed_before = closed.len();
                if let Some(thread) = self.threads.get_mut(tid)
                    && !among(thread.seen.iter().map(String::as_str), &ev.id)
                    && Self::apply_to_thread(thread, parent, session_id, &ev, tally, closed)
                        == Applied::Counted
                {
                    let context = self.record_context(&ev, Some(tid), &closed[closed_before..]);
                    released.push(Released { event: ev, context });
                }
            }
        }
        let Some(thread) = self.threads.get_mut(tid) else {
            return ThreadReadOutcome {
                consumed: 0,
                released,
            };
        };
        if cursor.is_some() {
            thread.cursor = cursor;
        }
        if at_end {
            thread.dirty = false;
        }
        if gone {
            thread.active = false;
        }
        ThreadReadOutcome {
            consumed: thread.tracker.consumed,
            released,
        }
    }

    /// An event of a stream (the session's, or thread `thread`'s) that could not be read: it
    /// is consumed from that stream all the same, so a re-read skips it.
    pub(crate) fn skip_unreadable(&mut self, thread: Option<&str>) {
        match thread {
            None => self.consumed += 1,
            Some(t) => {
                if let Some(th) = self.threads.get_mut(t) {
                    th.tracker.consumed += 1;
                }
            }
        }
    }

    /// One readable event of this tracker's own stream.
    fn apply_own(
        &mut self,
        session_id: &str,
        ev: &Event,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        if !self.admit(&ev.id) {
            return Applied::Duplicate;
        }
        self.apply_admitted(session_id, ev, tally, closed)
    }

    /// Whether `id` is among the recent ids an older state file left.
    fn seen_recently(&self, id: &str) -> bool {
        among(self.recent.iter().map(String::as_str), id)
    }

    /// Takes an event off this tracker's stream: `false` when an older state's recent ids say
    /// the stream showed it already, else it counts as consumed from the stream. Every other
    /// repeat was skipped before the tracker saw it: the pipeline remembers every id each stream
    /// counted (`pipeline::event_ids`), so the tracker keeps no window of its own (it cost 32
    /// ids of memory per session and a kilobyte per state write).
    fn admit(&mut self, id: &str) -> bool {
        if !self.recent.is_empty() {
            if self.seen_recently(id) {
                return false;
            }
            self.recent.pop_front();
        }
        self.consumed += 1;
        true
    }

    /// Applies an event already admitted from whichever stream showed it: what every event
    /// does (counted, closes a superseded G1 turn, moves the turn's last time) here, what its
    /// kind does in its handler (`handlers.rs`).
    fn apply_admitted(
        &mut self,
        session_id: &str,
        ev: &Event,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> Applied {
        let agent = self.agent.clone();
        tally.event(&ev.type_name, &agent);

        // G1: a new turn_id closes a turn that never idled.
        if let (Some(tid), Some(turn)) = (&ev.turn_id, &self.turn)
            && turn.has_turn_id
            && *turn.key != **tid
        {
            let end = turn.last_ns;
            self.close_turn(session_id, end, TurnEnd::Superseded, tally, closed);
        }

        let mut cx = Cx {
            session_id,
            ev,
            agent: &agent,
            tally,
            closed,
        };
        match &ev.kind {
            EventKind::UserMessage | EventKind::TurnRunning => self.on_turn_running(&mut cx),
            EventKind::Idle {
                stop_reason,
                tokens,
                ..
            } => self.on_idle(&mut cx, stop_reason.as_deref(), tokens.as_ref()),
            EventKind::Terminated { .. } => self.on_terminated(&mut cx),
            EventKind::Error {
                error_type,
                retry_status,
                message,
                code,
            } => self.on_error(
                &mut cx,
                error_type,
                *retry_status,
                message.as_deref(),
                code.as_ref(),
            ),
            EventKind::ModelRequestStart { model, span_id } => {
                self.on_request_start(ev, model.as_ref(), span_id.as_ref());
            }
            EventKind::ModelRequestEnd {
                start_id,
                span_id,
                is_error,
                tokens,
                credits,
            } => self.on_request_end(
                &mut cx,
                &RequestEnd {
                    start_id: start_id.as_deref(),
                    span_id: span_id.as_deref(),
                    is_error: *is_error,
                    tokens: tokens.as_ref(),
                    credits: *credits,
                },
            ),
            EventKind::ToolUse {
                kind, use_id, name, ..
            } => self.on_tool_use(&mut cx, *kind, use_id, name),
            EventKind::ToolResult {
                kind,
                use_id,
                is_error,
            } => self.on_tool_result(&mut cx, *kind, use_id.as_deref(), *is_error),
            EventKind::AgentOutput => self.ensure_turn(ev),
            EventKind::ThreadStatus { phase, .. } => self.on_thread_status(&mut cx, phase),
            EventKind::BudgetUpdated(b) => self.budget_credits = Some(*b),
            EventKind::Usage(_) | EventKind::ThreadCreated { .. } | EventKind::Other => {}
        }
        if let Some(turn) = &mut self.turn
            && ev.time_ns.is_some()
        {
            turn.last_ns = ev.time_ns;
        }
        Applied::Counted
    }

    /// A sub-agent thread's status: running opens its turn, idle and termination close it.
    fn thread_status(
        &mut self,
        session_id: &str,
        ev: &Event,
        phase: &ThreadPhase,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) {
        match phase {
            ThreadPhase::Running => {
                self.status = "running".to_owned();
                self.ensure_turn(ev);
            }
            ThreadPhase::Idle { stop_reason } => {
                self.status = "idle".to_owned();
                let stop_reason = stop_reason.clone().unwrap_or_else(|| "unknown".to_owned());
                self.close_turn(
                    session_id,
                    ev.time_ns,
                    TurnEnd::Idle { stop_reason },
                    tally,
                    closed,
                );
            }
            ThreadPhase::Terminated => {
                self.status = "terminated".to_owned();
                self.close_turn(session_id, ev.time_ns, TurnEnd::Terminated, tally, closed);
                self.requests.clear();
                self.tools.clear();
            }
        }
    }

    fn ensure_turn(&mut self, ev: &Event) {
        if self.turn.is_some() {
            return;
        }
        self.turn_seq += 1;
        let (key, has_turn_id) = match (&ev.turn_id, &self.thread_id) {
            (Some(t), _) => (t.to_string(), true),
            // A thread's turns are named apart from the session's (they share its trace ids).
            (None, Some(thread)) => (format!("{thread}/seq-{}", self.turn_seq), false),
            (None, None) => (format!("seq-{}", self.turn_seq), false),
        };
        self.turn = Some(Turn {
            key,
            has_turn_id,
            first_event_id: ev.id.clone(),
            start_ns: ev.time_ns,
            last_ns: ev.time_ns,
            tokens_from_requests: false,
            tokens_reported: false,
            credits_reported: false,
            tokens: Tokens::default(),
            credits: 0.0,
            last_model: None,
            failed: None,
            children: Vec::new(),
            children_dropped: 0,
            errors: Vec::new(),
            span_events: Vec::new(),
            messages: Vec::new(),
            parent: None,
            error_code: None,
        });
    }

    /// Closes the open turn as [`TurnEnd::Stale`] when event `at` comes more than `max_age_ns`
    /// after the turn's last event: a turn that never closed must not hold its state (and its
    /// spans) forever. Event time only, so a replay closes the same turns.
    pub(crate) fn close_stale(
        &mut self,
        session_id: &str,
        at: Option<i64>,
        max_age_ns: i64,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) -> bool {
        let (Some(at), Some(turn)) = (at, &self.turn) else {
            return false;
        };
        let Some(last) = turn.last_ns else {
            return false;
        };
        if at.saturating_sub(last) <= max_age_ns {
            return false;
        }
        self.close_turn(session_id, Some(last), TurnEnd::Stale, tally, closed);
        self.requests.clear();
        true
    }

    /// Records the text of a user message, agent message or thinking event on the open turn,
    /// cut to `max_bytes` (on a character boundary). Called only with content capture on.
    pub(crate) fn capture(&mut self, ev: &Event, max_bytes: usize) {
        let (role, part) = match &*ev.type_name {
            "user.message" => ("user", "text"),
            "agent.message" => ("assistant", "text"),
            "agent.thinking" => ("assistant", "reasoning"),
            _ => return,
        };
        let (Some(text), Some(turn)) = (&ev.text, &mut self.turn) else {
            return;
        };
        if turn.messages.len() >= MAX_MESSAGES || text.is_empty() {
            return;
        }
        turn.messages.push(Message {
            role: role.to_owned(),
            part: part.to_owned(),
            content: truncate(text, max_bytes).to_owned(),
        });
    }

    /// Pairs an end with its start: by `model_request_start_id` (G3), by `span_id` (G1), else
    /// the oldest open start.
    fn take_request(
        &mut self,
        start_id: Option<&str>,
        span_id: Option<&str>,
    ) -> Option<OpenRequest> {
        let pos = match (start_id, span_id) {
            (Some(s), _) if self.requests.iter().any(|r| r.start_id == s) => {
                self.requests.iter().position(|r| r.start_id == s)
            }
            (_, Some(sp))
                if self
                    .requests
                    .iter()
                    .any(|r| r.span_id.as_deref() == Some(sp)) =>
            {
                self.requests
                    .iter()
                    .position(|r| r.span_id.as_deref() == Some(sp))
            }
            (None, None) => (!self.requests.is_empty()).then_some(0),
            // An explicit id that matches nothing: an end whose start we never saw.
            _ => None,
        };
        pos.and_then(|p| self.requests.remove(p))
    }

    fn take_tool(&mut self, kind: ToolKind, use_id: &str) -> Option<OpenTool> {
        let pos = self
            .tools
            .iter()
            .position(|t| t.kind == kind && t.use_id == use_id)
            .or_else(|| self.tools.iter().position(|t| t.use_id == use_id))?;
        self.tools.remove(pos)
    }

    fn close_turn(
        &mut self,
        session_id: &str,
        end_ns: Option<i64>,
        end: TurnEnd,
        tally: &mut dyn Tally,
        closed: &mut Vec<ClosedTurn>,
    ) {
        let Some(mut turn) = self.turn.take() else {
            return;
        };
        // `qoder_turn_duration_seconds` times the session's turns; a thread's turn is inside one.
        if let (Some(s), Some(e), None) = (turn.start_ns, end_ns, &self.thread_id) {
            let at = handlers::example_at(session_id, &turn, end_ns);
            tally.turn_timed(&self.agent, e.saturating_sub(s), at);
        }
        // What is still open ends with the turn, marked incomplete. Requests are done with;
        // tools stay open so a late result still counts against the right tool.
        for r in self.requests.drain(..) {
            let model = r
                .model
                .unwrap_or_else(|| self.model.clone().unwrap_or_else(|| "unknown".to_owned()));
            push_child(
                &mut turn,
                ChildSpan {
                    id: r.start_id,
                    detail: ChildDetail::Chat {
                        model,
                        tokens: None,
                        credits: None,
                    },
                    start_ns: r.start_ns,
                    end_ns,
                    is_error: false,
                    incomplete: true,
                },
            );
        }
        for t in self.tools.iter_mut().filter(|t| !t.span_emitted) {
            t.span_emitted = true;
            let child = ChildSpan {
                id: t.event_id.clone(),
                detail: ChildDetail::Tool {
                    name: t.name.clone(),
                    call_id: t.use_id.clone(),
                    kind: t.kind,
                },
                start_ns: t.start_ns,
                end_ns,
                is_error: false,
                incomplete: true,
            };
            push_child(&mut turn, child);
        }
        // Only sessions with sub-agents need them (and only they pay for storing them).
        if self.thread_id.is_none() && !self.threads.is_empty() {
            if self.recent_turns.len() == RECENT_TURNS {
                self.recent_turns.pop_front();
            }
            self.recent_turns.push_back(TurnSpan {
                turn: ParentTurn {
                    key: turn.key.clone(),
                    first_event_id: turn.first_event_id.clone(),
                },
                start_ns: turn.start_ns,
                end_ns,
            });
        }
        let model = turn
            .last_model
            .clone()
            .unwrap_or_else(|| self.model.clone().unwrap_or_else(|| "unknown".to_owned()));
        closed.push(ClosedTurn {
            session_id: session_id.to_owned(),
            agent: self.agent.clone(),
            agent_id: self.agent_id.clone(),
            model,
            turn,
            end_ns,
            end,
        });
    }
}

/// The session-wide usage snapshot an event carries, if any.
fn session_snapshot(kind: &EventKind) -> Option<&UsageSnapshot> {
    match kind {
        EventKind::Usage(s) => Some(s),
        EventKind::Idle {
            snapshot: Some(s), ..
        } => Some(s),
        _ => None,
    }
}

fn push_child(turn: &mut Turn, child: ChildSpan) {
    if turn.children.len() < MAX_CHILDREN {
        turn.children.push(child);
    } else {
        turn.children_dropped += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::metrics::{Delta, DurableMetrics, Family};
    use crate::source::wire::decode_event;

    /// A state written before a field existed reads with the field's default (every stored
    /// struct has `#[serde(default)]`), not as an unreadable file.
    #[test]
    fn a_state_missing_later_fields_reads_with_their_defaults() {
        let s: SessionState = serde_json::from_str(
            r#"{"agent":"coder","status":"idle","turn":{"key":"t1","first_event_id":"e1"},
                "requests":[{"start_id":"r1"}],"threads":{"thr_1":{"tracker":{}}}}"#,
        )
        .expect("reads");
        assert_eq!(s.agent, "coder");
        let turn = s.turn.expect("turn");
        assert_eq!(turn.key, "t1");
        assert!(turn.tokens_reported, "turns from before the flag say yes");
        assert_eq!(s.requests[0].start_id, "r1");
        assert_eq!(s.threads["thr_1"].tracker.consumed, 0);
        assert!(s.recent.is_empty() && s.usage.is_empty());
    }

    fn run(state: &mut SessionState, events: &[&str]) -> (DurableMetrics, Vec<ClosedTurn>) {
        let m = DurableMetrics::new();
        let mut delta = Delta::default();
        let mut closed = Vec::new();
        for raw in events {
            let e = Event::from_wire(decode_event(raw).expect("valid").event);
            state.apply("sess_1", &e, &mut delta, &mut closed);
        }
        m.publish(m.stage(&delta));
        (m, closed)
    }

    fn ev(raw: &str) -> Event {
        Event::from_wire(decode_event(raw).expect("valid").event)
    }

    /// Found by the `event_page` fuzz target: a result stamped three centuries before its
    /// use (times near the ends of i64 nanoseconds) overflowed the duration; it counts as 0 s.
    #[test]
    fn durations_between_absurd_times_do_not_overflow() {
        let mut st = SessionState::new("coder".into());
        let (m, _) = run(
            &mut st,
            &[
                r#"{"id":"t0","type":"session.status_running","processed_at":"2262-01-01T00:00:00Z"}"#,
                r#"{"id":"u1","type":"agent.tool_use","name":"Bash","processed_at":"2262-01-01T00:00:00Z"}"#,
                r#"{"id":"r1","type":"agent.tool_result","tool_use_id":"u1","processed_at":"1681-10-05T10:00:10Z"}"#,
                r#"{"id":"s1","type":"span.model_request_start","processed_at":"2262-01-01T00:00:00Z"}"#,
                r#"{"id":"e1","type":"span.model_request_end","model_request_start_id":"s1","processed_at":"1681-10-05T10:00:10Z"}"#,
                r#"{"id":"i1","type":"session.status_idle","stop_reason":{"type":"end_turn"},"processed_at":"1681-10-05T10:00:10Z"}"#,
            ],
        );
        assert_eq!(m.total(Family::ToolCallDuration), 1.0);
        assert_eq!(m.total(Family::ModelRequestDuration), 1.0);
        assert_eq!(m.total(Family::TurnDuration), 1.0);
    }

    #[test]
    fn a_cross_post_counts_once_whichever_stream_shows_it_and_a_gone_thread_releases_it() {
        let created = ev(
            r#"{"id":"c","type":"session.thread_created","session_thread_id":"t1","agent_name":"sub"}"#,
        );
        let tool_use =
            r#"{"id":"x","type":"agent.tool_use","name":"Read","session_thread_id":"t1"}"#;
        let idle = r#"{"id":"i","type":"session.thread_status_idle","session_thread_id":"t1","agent_name":"sub","stop_reason":{"type":"end_turn"}}"#;
        let m = DurableMetrics::new();
        let mut d = Delta::default();
        let mut closed = Vec::new();
        // Session stream first: the cross-posts are held, then the thread's stream shows them.
        let mut s = SessionState::new("coord".into());
        s.apply("s", &created, &mut d, &mut closed);
        assert_eq!(
            s.apply("s", &ev(tool_use), &mut d, &mut closed),
            Applied::Held
        );
        assert_eq!(s.apply("s", &ev(idle), &mut d, &mut closed), Applied::Held);
        for raw in [tool_use, idle] {
            assert_eq!(
                s.apply_from("s", &ev(raw), Some("t1"), &mut d, &mut closed),
                Applied::Counted
            );
        }
        assert_eq!(
            s.threads["t1"].tracker.consumed, 2,
            "consumed from the thread's stream"
        );
        assert_eq!(s.consumed, 3, "and from the session's");
        // Thread's stream first: the session stream's copies are duplicates.
        let mut s2 = SessionState::new("coord".into());
        s2.apply("s", &created, &mut d, &mut closed);
        for raw in [tool_use, idle] {
            s2.apply_from("s", &ev(raw), Some("t1"), &mut d, &mut closed);
            assert_eq!(
                s2.apply("s", &ev(raw), &mut d, &mut closed),
                Applied::Duplicate
            );
        }
        // A thread that is gone: what was held counts as it is, and it is not read again.
        let mut s3 = SessionState::new("coord".into());
        s3.apply("s", &created, &mut d, &mut closed);
        s3.apply("s", &ev(tool_use), &mut d, &mut closed);
        assert_eq!(s3.threads_to_read().len(), 1);
        let read = ThreadRead {
            cursor: None,
            at_end: true,
            gone: true,
        };
        let out = s3.thread_read("s", "t1", read, &mut d, &mut closed);
        let released: Vec<&str> = out.released.iter().map(|r| r.event.id.as_str()).collect();
        assert_eq!(
            released,
            [ev(tool_use).id.as_str()],
            "the held one is released"
        );
        assert!(s3.threads_to_read().is_empty());
        m.publish(m.stage(&d));
        assert_eq!(
            m.counter(Family::ToolCalls, &["Read", "sub"]),
            3.0,
            "once per session"
        );
        assert_eq!(m.counter(Family::ThreadTurns, &["sub", "end_turn"]), 2.0);
        assert_eq!(m.counter(Family::ThreadsCreated, &["sub"]), 3.0);
        assert_eq!(m.counter(Family::ToolCalls, &["Read", "coord"]), 0.0);
    }

    const G1_TURN: &[&str] = &[
        r#"{"id":"e1","type":"user.message","content":"hi","turn_id":"turn_1","processed_at":"2026-05-18T03:40:48Z"}"#,
        r#"{"id":"e2","type":"session.status_rescheduled","turn_id":"turn_1","processed_at":"2026-05-18T03:40:49Z"}"#,
        r#"{"id":"e3","type":"span.model_request_start","model":"qwen","span_id":"sp1","turn_id":"turn_1","processed_at":"2026-05-18T03:40:50Z"}"#,
        r#"{"id":"e4","type":"agent.message","content":[{"type":"text","text":"yo"}],"turn_id":"turn_1","processed_at":"2026-05-18T03:40:51Z"}"#,
        r#"{"id":"e5","type":"span.model_request_end","span_id":"sp1","turn_id":"turn_1","processed_at":"2026-05-18T03:40:52.5Z"}"#,
        r#"{"id":"e6","type":"session.status_idle","turn_id":"turn_1","usage":{"input_tokens":150,"output_tokens":42,"cache_read_input_tokens":10,"cache_creation_input_tokens":0},"stop_reason":{"type":"end_turn"},"processed_at":"2026-05-18T03:40:53Z"}"#,
    ];

    #[test]
    fn g1_turn_counts_idle_tokens_once() {
        let mut s = SessionState::new("coder".into());
        let (m, closed) = run(&mut s, G1_TURN);
        assert_eq!(m.total(Family::Events), 6.0);
        assert_eq!(m.counter(Family::Turns, &["end_turn", "coder"]), 1.0);
        assert_eq!(
            m.counter(Family::Tokens, &["input", "coder", "qwen"]),
            150.0
        );
        assert_eq!(
            m.counter(Family::Tokens, &["cache_read", "coder", "qwen"]),
            10.0
        );
        assert_eq!(m.counter(Family::ModelRequests, &["coder", "qwen"]), 1.0);
        assert_eq!(m.total(Family::ModelRequestDuration), 1.0);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].turn.key, "turn_1");
        assert_eq!(
            closed[0]
                .end_ns
                .zip(closed[0].turn.start_ns)
                .map(|(e, s)| e - s),
            Some(5_000_000_000)
        );
        assert!(s.turn.is_none());
    }

    #[test]
    fn request_tokens_win_over_idle_usage() {
        let mut s = SessionState::new("a".into());
        s.model = Some("m".into());
        let (m, _) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"session.status_running"}"#,
                r#"{"id":"2","type":"span.model_request_start"}"#,
                r#"{"id":"3","type":"span.model_request_end","model_request_start_id":"2","model_usage":{"input_tokens":5,"output_tokens":1}}"#,
                r#"{"id":"4","type":"session.status_idle","usage":{"input_tokens":5,"output_tokens":1},"stop_reason":{"type":"end_turn"}}"#,
            ],
        );
        assert_eq!(m.counter(Family::Tokens, &["input", "a", "m"]), 5.0);
        assert_eq!(m.counter(Family::Tokens, &["output", "a", "m"]), 1.0);
    }

    #[test]
    fn g3_credits_only_requests_leave_idle_tokens_counted() {
        let mut s = SessionState::new("a".into());
        let (m, _) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"span.model_request_start"}"#,
                r#"{"id":"2","type":"span.model_request_end","model_request_start_id":"1","is_error":true,"model_usage":{"credits":0.5}}"#,
                r#"{"id":"3","type":"session.status_idle","usage":{"input_tokens":7}}"#,
            ],
        );
        assert_eq!(m.counter(Family::Credits, &["a", "unknown"]), 0.5);
        assert_eq!(
            m.counter(Family::ModelRequestErrors, &["a", "unknown"]),
            1.0
        );
        assert_eq!(m.counter(Family::Tokens, &["input", "a", "unknown"]), 7.0);
        assert_eq!(m.counter(Family::Turns, &["unknown", "a"]), 1.0);
    }

    #[test]
    fn tools_pair_and_errors_name_the_tool() {
        let mut s = SessionState::new("a".into());
        let (m, closed) = run(
            &mut s,
            &[
                r#"{"id":"u1","type":"agent.tool_use","name":"Bash"}"#,
                r#"{"id":"u2","type":"agent.mcp_tool_use","name":"search","mcp_server_name":"docs"}"#,
                r#"{"id":"r2","type":"agent.mcp_tool_result","mcp_tool_use_id":"u2","is_error":true}"#,
                r#"{"id":"r1","type":"agent.tool_result","tool_use_id":"u1","is_error":false}"#,
                r#"{"id":"r9","type":"agent.tool_result","tool_use_id":"nope","is_error":true}"#,
                r#"{"id":"i","type":"session.status_idle","stop_reason":"end_turn"}"#,
            ],
        );
        assert_eq!(m.counter(Family::ToolCalls, &["Bash", "a"]), 1.0);
        assert_eq!(m.counter(Family::ToolCalls, &["search", "a"]), 1.0);
        assert_eq!(m.counter(Family::ToolCallErrors, &["search", "a"]), 1.0);
        assert_eq!(m.counter(Family::ToolCallErrors, &["unknown", "a"]), 1.0);
        assert_eq!(closed[0].turn.children.len(), 2);
        assert!(
            closed[0]
                .turn
                .children
                .iter()
                .any(|c| c.is_error && c.id == "u2")
        );
    }

    #[test]
    fn the_recent_ids_of_an_older_state_are_still_skipped_then_let_go() {
        let mut s = SessionState::new("a".into());
        s.recent = ["0".to_owned(), "1".to_owned()].into();
        let (m, _) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"user.message"}"#,
                r#"{"id":"2","type":"user.message"}"#,
                r#"{"id":"3","type":"user.message"}"#,
            ],
        );
        assert_eq!(m.total(Family::Events), 2.0);
        assert_eq!(s.consumed, 2);
        assert!(s.recent.is_empty(), "one let go per new event");
    }

    #[test]
    fn exhausted_error_fails_the_turn_and_next_turn_closes_it() {
        let mut s = SessionState::new("a".into());
        let (m, closed) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"user.message","processed_at":"2026-01-01T00:00:00Z"}"#,
                r#"{"id":"2","type":"session.error","error":{"type":"model_overloaded_error"},"retry_status":{"type":"retrying"}}"#,
                r#"{"id":"3","type":"session.error","error":{"type":"model_overloaded_error","retry_status":{"type":"exhausted"}},"processed_at":"2026-01-01T00:00:09Z"}"#,
                r#"{"id":"4","type":"user.message","processed_at":"2026-01-01T00:01:00Z"}"#,
            ],
        );
        assert_eq!(
            m.counter(
                Family::SessionErrors,
                &["model_overloaded_error", "retrying", "a"]
            ),
            1.0
        );
        assert_eq!(
            m.counter(
                Family::SessionErrors,
                &["model_overloaded_error", "exhausted", "a"]
            ),
            1.0
        );
        assert_eq!(closed.len(), 1);
        assert_eq!(
            closed[0].end,
            TurnEnd::Failed {
                error_type: "model_overloaded_error".into()
            }
        );
        assert_eq!(closed[0].turn.errors.len(), 2);
        assert!(s.turn.is_some(), "the second turn is open");
    }

    #[test]
    fn termination_closes_open_work_as_incomplete() {
        let mut s = SessionState::new("a".into());
        let (_, closed) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"span.model_request_start","processed_at":"2026-01-01T00:00:00Z"}"#,
                r#"{"id":"2","type":"agent.tool_use","name":"Read"}"#,
                r#"{"id":"3","type":"terminated","reason":"timeout","processed_at":"2026-01-01T00:00:05Z"}"#,
            ],
        );
        assert_eq!(closed[0].end, TurnEnd::Terminated);
        assert_eq!(
            closed[0]
                .turn
                .children
                .iter()
                .filter(|c| c.incomplete)
                .count(),
            2
        );
        assert_eq!(s.status, "terminated");
        assert!(s.requests.is_empty() && s.tools.is_empty());
    }

    #[test]
    fn g1_new_turn_id_supersedes_an_open_turn() {
        let mut s = SessionState::new("a".into());
        let (m, closed) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"user.message","turn_id":"t1"}"#,
                r#"{"id":"2","type":"user.message","turn_id":"t2"}"#,
                r#"{"id":"3","type":"session.status_idle","turn_id":"t2"}"#,
            ],
        );
        assert_eq!(
            closed
                .iter()
                .map(|c| c.turn.key.as_str())
                .collect::<Vec<_>>(),
            ["t1", "t2"]
        );
        assert_eq!(closed[0].end, TurnEnd::Superseded);
        assert_eq!(m.total(Family::Turns), 1.0);
    }

    #[test]
    fn a_turn_quiet_for_too_long_is_closed_stale() {
        let mut st = SessionState::new("a".into());
        let mut delta = Delta::default();
        let mut closed = Vec::new();
        let ev = |id: &str, kind: EventKind, t: i64| Event {
            id: id.into(),
            type_name: "x".into(),
            turn_id: None,
            thread_id: None,
            time_ns: Some(t),
            kind,
            text: None,
        };
        st.apply(
            "s",
            &ev("e1", EventKind::UserMessage, 0),
            &mut delta,
            &mut closed,
        );
        let hour = 3_600_000_000_000;
        assert!(!st.close_stale("s", Some(hour), 2 * hour, &mut delta, &mut closed));
        assert!(st.close_stale("s", Some(3 * hour), 2 * hour, &mut delta, &mut closed));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].end, TurnEnd::Stale);
        assert!(st.turn.is_none());
        assert!(!st.close_stale("s", Some(9 * hour), 2 * hour, &mut delta, &mut closed));
    }

    #[test]
    fn fifo_pairing_without_ids() {
        let mut s = SessionState::new("a".into());
        let (_, closed) = run(
            &mut s,
            &[
                r#"{"id":"1","type":"span.model_request_start","model":"m1"}"#,
                r#"{"id":"2","type":"span.model_request_start","model":"m2"}"#,
                r#"{"id":"3","type":"span.model_request_end"}"#,
                r#"{"id":"4","type":"span.model_request_end"}"#,
                r#"{"id":"5","type":"session.status_idle"}"#,
            ],
        );
        let models: Vec<_> = closed[0]
            .turn
            .children
            .iter()
            .map(|c| match &c.detail {
                ChildDetail::Chat { model, .. } => model.clone(),
                ChildDetail::Tool { name, .. } => name.clone(),
            })
            .collect();
        assert_eq!(models, ["m1", "m2"]);
    }

    #[test]
    fn state_survives_serialisation() {
        let mut s = SessionState::new("a".into());
        run(&mut s, &G1_TURN[..3]);
        let json = serde_json::to_string(&s).expect("ser");
        let back: SessionState = serde_json::from_str(&json).expect("de");
        assert_eq!(back, s);
    }

    #[test]
    fn a_listed_thread_is_read_once_new_and_again_only_when_it_changed() {
        let mut s = SessionState::new("coordinator".into());
        let listed = |updated: &str| ListedThread {
            id: "sthr_2".into(),
            agent: Some("researcher".into()),
            updated_at: Some(updated.into()),
        };
        // Not announced on the session's stream: the listing registers it, to be read once.
        s.thread_listed(&listed("t1"));
        let to_read = |s: &SessionState| -> Vec<(String, Option<String>)> {
            s.threads_to_read()
                .into_iter()
                .map(|t| (t.id, t.cursor))
                .collect()
        };
        assert_eq!(to_read(&s), vec![("sthr_2".to_owned(), None)]);
        assert_eq!(s.threads["sthr_2"].tracker.agent, "researcher");
        let (mut delta, mut closed) = (Delta::default(), Vec::new());
        s.thread_read(
            "sess_1",
            "sthr_2",
            ThreadRead {
                cursor: Some("e9".into()),
                at_end: true,
                gone: false,
            },
            &mut delta,
            &mut closed,
        );
        assert!(s.threads_to_read().is_empty(), "read to its end: clean");
        // The same listing again: unchanged, not read.
        s.thread_listed(&listed("t1"));
        assert!(s.threads_to_read().is_empty());
        // Its object changed: read again from its cursor.
        s.thread_listed(&listed("t2"));
        assert_eq!(
            to_read(&s),
            vec![("sthr_2".to_owned(), Some("e9".to_owned()))]
        );
        // A listing never counts a thread as created (only `session.thread_created` does).
        assert!(delta.is_empty());
    }
}
