//! The pipeline: the single writer that applies batches of events to session state, stages the
//! metric changes, commits both to the state store in one transaction, and only then publishes
//! the new values.
//!
//! It runs on its own thread (SQLite is synchronous) and is fed by a bounded channel: when it
//! falls behind, pollers wait on `send`, so a slow disk slows the polling instead of growing
//! memory. Each batch is acknowledged, and a poller only moves its cursor on a successful ack,
//! so a failed commit means the same page is read again, never skipped.

pub mod event_ids;
pub mod log_outbox;
pub mod tracker;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::event::{DroppedFields, Event, InvalidReason, UsageSnapshot};
use crate::record::EventRecord;
use crate::sinks::drain::{OutboxError, OutboxSource};
use crate::sinks::metrics::{Delta, Metrics};
use crate::sinks::session_series::SessionView;
use crate::state::{BatchWrite, Outbox, StateError, StateStore};
use event_ids::{EventIds, Staged, StreamKey};
use tracker::{Applied, ClosedTurn, SessionState};

/// A session as the state file keeps it, with its tracker state.
pub type StoredSession = crate::state::StoredSession<SessionState>;

/// One entry of a page: a readable event, or the reason it could not be read.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every item is an event; a box would cost an allocation each"
)]
pub enum Item {
    /// An event, with the digest of its id ([`event_ids::digest`]). The digest is taken where
    /// the event is read (the poller's tasks, `replay`'s decoders), not on the pipeline's
    /// single thread, where hashing every id was an eighth of its time.
    Event(Event, u64),
    Invalid(InvalidReason),
}

impl Item {
    /// An event, its id digested.
    pub fn event(event: Event) -> Item {
        let digest = event_ids::digest(&event.id);
        Item::Event(event, digest)
    }
}

/// The items of applied batches, handed back to the sender to be freed there: `replay`'s
/// decoders allocated them, and freeing a group's 20 000 events took a ninth of the pipeline
/// thread's time, the one thread everything else waits for.
#[derive(Debug, Default)]
pub struct Spent(
    #[allow(dead_code, reason = "held only to be dropped by the receiver")] Vec<Vec<Item>>,
);

/// A page's worth of one session's events, with the cursor that follows them.
#[derive(Debug, Default)]
pub struct Batch {
    pub session_id: String,
    /// The sub-agent thread whose stream the items come from; `None`: the session's stream.
    pub thread: Option<String>,
    /// The stream was read to its end with this batch (a thread is then clean until named).
    pub at_end: bool,
    /// The thread is gone (404): its stream has ended for good.
    pub thread_gone: bool,
    pub items: Vec<Item>,
    pub cursor: Option<String>,
    /// Fields dropped from the items, by why (the events themselves were kept).
    pub bad_fields: DroppedFields,
    /// Session metadata to apply before the items, in the same transaction (`replay`).
    pub meta: Option<SessionMeta>,
    /// The session's sub-agent threads as its thread list shows them, applied before the items.
    pub threads_listed: Vec<tracker::ListedThread>,
}

/// What the poller learns from a session object.
#[derive(Debug, Clone, Default)]
pub struct SessionMeta {
    pub agent_name: Option<String>,
    pub agent_id: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
    /// The object's cumulative usage snapshot, applied after the batch's events.
    pub usage: Option<UsageSnapshot>,
    /// The object's credit budget.
    pub budget: Option<f64>,
    /// The agent is a coordinator of sub-agents (`agent.multiagent`).
    pub multiagent: bool,
}

#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// Events consumed from the batch's stream so far (the re-read position).
    pub consumed: u64,
    /// Session status after the batch.
    pub status: String,
    /// Sub-agent threads whose streams need reading, with their cursors.
    pub threads: Vec<tracker::ThreadCursor>,
}

pub(crate) type Ack<T> = oneshot::Sender<Result<T, StateError>>;

/// The answer to a group of batches: each batch's outcome, and the items to free.
pub(crate) type GroupAck = oneshot::Receiver<Result<(Vec<BatchOutcome>, Spent), StateError>>;

#[derive(Debug)]
pub enum Command {
    Batch(Box<Batch>, Ack<BatchOutcome>),
    /// Several batches committed in one transaction (`replay`: one commit per many sessions).
    Batches(Vec<Batch>, Ack<(Vec<BatchOutcome>, Spent)>),
    /// The session is done (drained after termination, or gone): never read again.
    Finish(String, Ack<()>),
    /// The oldest closed turns waiting in the outbox, at most this many.
    OutboxPeek(usize, Ack<Vec<(i64, Option<ClosedTurn>)>>),
    /// Turns up to this outbox sequence number were exported (or given up on): remove them.
    OutboxRemove(i64, Ack<()>),
    /// The export of the last peeked batch failed: its turns may be trimmed again.
    OutboxRelease(Ack<()>),
    /// The same three for the log outbox (logs on).
    LogPeek(usize, Ack<Vec<(i64, Option<EventRecord>)>>),
    LogRemove(i64, Ack<()>),
    LogRelease(Ack<()>),
    /// Answered once every command sent before it is done: what was sent is committed.
    Barrier(Ack<()>),
}

/// Traces on: closed turns go to the outbox, in the transaction of the batch that closed them.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Past this many turns, the oldest are dropped (`spans_dropped_total{reason="outbox_full"}`).
    pub max_turns: u64,
    /// Woken after a commit that added turns.
    pub notify: Arc<Notify>,
    /// Record message text on turns, cut to this many bytes (`--otlp.capture-content`).
    pub capture_bytes: Option<usize>,
}

/// Cloneable handle the pollers use to talk to the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    tx: mpsc::Sender<Command>,
    metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("pipeline stopped")]
    Stopped,
    #[error(transparent)]
    State(#[from] StateError),
}

impl PipelineHandle {
    async fn call<T>(&self, make: impl FnOnce(Ack<T>) -> Command) -> Result<T, SendError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(make(ack))
            .await
            .map_err(|_| SendError::Stopped)?;
        self.metrics
            .process
            .queue_depth
            .set(i64::try_from(self.tx.max_capacity() - self.tx.capacity()).unwrap_or(0));
        Ok(rx.await.map_err(|_| SendError::Stopped)??)
    }

    /// Sends batches from a blocking thread, to be applied in order and committed in one
    /// transaction, without waiting: `replay` keeps several groups in flight.
    pub(crate) fn send_batches_blocking(&self, batches: Vec<Batch>) -> Result<GroupAck, SendError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::Batches(batches, ack))
            .map_err(|_| SendError::Stopped)?;
        Ok(rx)
    }

    pub async fn batch(&self, batch: Batch) -> Result<BatchOutcome, SendError> {
        self.call(|ack| Command::Batch(Box::new(batch), ack)).await
    }

    /// Applies what a session object says (agent, status, usage snapshot), committed like a
    /// batch: a usage snapshot moves durable counters.
    pub async fn meta(&self, id: String, meta: SessionMeta) -> Result<BatchOutcome, SendError> {
        self.batch(Batch {
            session_id: id,
            meta: Some(meta),
            ..Batch::default()
        })
        .await
    }

    pub async fn finish(&self, id: String) -> Result<(), SendError> {
        self.call(|ack| Command::Finish(id, ack)).await
    }

    /// Waits until everything sent before is applied and committed (and so visible in the
    /// metrics and the outboxes).
    pub(crate) async fn barrier(&self) -> Result<(), SendError> {
        self.call(Command::Barrier).await
    }
}

/// The span shipper drains the outbox through the pipeline, the one writer of the state file.
impl OutboxSource<ClosedTurn> for PipelineHandle {
    async fn peek(&self, limit: usize) -> Result<Vec<(i64, Option<ClosedTurn>)>, OutboxError> {
        self.call(|ack| Command::OutboxPeek(limit, ack))
            .await
            .map_err(outbox_error)
    }

    async fn remove_through(&self, seq: i64) -> Result<(), OutboxError> {
        self.call(|ack| Command::OutboxRemove(seq, ack))
            .await
            .map_err(outbox_error)
    }

    async fn release(&self) -> Result<(), OutboxError> {
        self.call(Command::OutboxRelease)
            .await
            .map_err(outbox_error)
    }
}

fn outbox_error(e: SendError) -> OutboxError {
    match e {
        SendError::Stopped => OutboxError::Gone,
        SendError::State(e) => {
            tracing::debug!(error = %e, "outbox read or write failed");
            OutboxError::Store
        }
    }
}

/// What a session object says, merged into the session's state.
fn merge_meta(state: &mut SessionState, meta: SessionMeta) {
    // The `agent` label: the agent's name, else its id, else `unknown`. A name once known is
    // not given up for the same agent's bare id (a listing that shows ids only), so one agent
    // is never counted under two label values.
    match (&meta.agent_name, &meta.agent_id) {
        (Some(name), _) => state.agent.clone_from(name),
        (None, Some(id)) if state.agent == "unknown" || state.agent_id.as_ref() != Some(id) => {
            state.agent.clone_from(id);
        }
        _ => {}
    }
    if meta.agent_id.is_some() {
        state.agent_id = meta.agent_id;
    }
    if meta.model.is_some() {
        state.model = meta.model;
    }
    if let Some(s) = meta.status {
        state.status = s;
    }
    if meta.budget.is_some() {
        state.budget_credits = meta.budget;
    }
    state.multiagent |= meta.multiagent;
}

/// The pipeline stage and its state.
#[derive(Debug)]
pub struct Pipeline {
    store: StateStore,
    sessions: HashMap<String, SessionState>,
    /// Every event id each stream counted: an event the API returns again, however late, is
    /// skipped.
    event_ids: EventIds,
    /// Agent id → name, durable: a session that names its agent by id alone is counted under
    /// the name when any object has shown both.
    agents: HashMap<String, String>,
    metrics: Metrics,
    /// Traces on: where closed turns go.
    outbox: Option<OutboxConfig>,
    /// Turns in the outbox.
    outbox_len: u64,
    /// A turn quiet (by event time) for longer than this is closed as stale.
    max_turn_age_ns: Option<i64>,
    /// The batch being exported ends here: trimming must not drop it (it would be counted
    /// both dropped and exported).
    leased_through: Option<i64>,
    /// Logs on: counted events also go to the log outbox.
    logs: Option<log_outbox::LogOutbox>,
}

impl Pipeline {
    /// Loads stored sessions and series; the metrics show the stored values from here on.
    pub fn new(
        store: StateStore,
        metrics: Metrics,
        outbox: Option<OutboxConfig>,
    ) -> Result<(Pipeline, Vec<StoredSession>), StateError> {
        metrics.durable.restore(store.load_series()?);
        let outbox_len = store.outbox_len(Outbox::Turns)?;
        metrics
            .process
            .span_outbox_turns
            .set(i64::try_from(outbox_len).unwrap_or(i64::MAX));
        let stored: Vec<StoredSession> = store.load_sessions()?;
        let agents = store.load_agents()?.into_iter().collect();
        let mut sessions = HashMap::new();
        for s in &stored {
            if !s.finished {
                metrics
                    .process
                    .sessions
                    .with_label_values(&[&s.state.status])
                    .inc();
                sessions.insert(s.id.clone(), s.state.clone());
            }
        }
        Ok((
            Pipeline {
                store,
                sessions,
                event_ids: EventIds::default(),
                agents,
                metrics,
                outbox,
                outbox_len,
                leased_through: None,
                max_turn_age_ns: None,
                logs: None,
            },
            stored,
        ))
    }

    /// Closes turns that stay quiet longer than `age` (by event time) as stale.
    pub(crate) fn with_max_turn_age(mut self, age: std::time::Duration) -> Pipeline {
        self.max_turn_age_ns = i64::try_from(age.as_nanos()).ok();
        self
    }

    /// Starts the pipeline thread. It ends when every handle is dropped and the queue drained.
    pub fn spawn(
        self,
        capacity: usize,
    ) -> std::io::Result<(PipelineHandle, std::thread::JoinHandle<StateStore>)> {
        let (tx, rx) = mpsc::channel(capacity);
        let handle = PipelineHandle {
            tx,
            metrics: self.metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pipeline".to_owned())
            .spawn(move || self.run(rx))?;
        Ok((handle, thread))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) -> StateStore {
        while let Some(cmd) = rx.blocking_recv() {
            self.metrics
                .process
                .queue_depth
                .set(i64::try_from(rx.len()).unwrap_or(0));
            match cmd {
                Command::Batch(batch, ack) => {
                    let _ = ack.send(self.apply_batch(*batch));
                }
                Command::Batches(batches, ack) => {
                    let mut spent = Vec::with_capacity(batches.len());
                    let applied = self.apply_group(batches, &mut spent);
                    let _ = ack.send(applied.map(|outcomes| (outcomes, Spent(spent))));
                }
                Command::Finish(id, ack) => {
                    let _ = ack.send(self.finish(&id));
                }
                Command::OutboxPeek(limit, ack) => {
                    let rows = self.store.outbox_peek(Outbox::Turns, limit);
                    if let Ok(r) = &rows {
                        self.leased_through = r.last().map(|(seq, _)| *seq);
                    }
                    let _ = ack.send(rows);
                }
                Command::OutboxRemove(through, ack) => {
                    self.leased_through = None;
                    let _ = ack.send(self.outbox_remove(through));
                }
                Command::OutboxRelease(ack) => {
                    self.leased_through = None;
                    let _ = ack.send(Ok(()));
                }
                Command::LogPeek(limit, ack) => {
                    let _ = ack.send(self.log_peek(limit));
                }
                Command::LogRemove(through, ack) => {
                    let _ = ack.send(self.log_remove(through));
                }
                Command::LogRelease(ack) => {
                    self.log_release();
                    let _ = ack.send(Ok(()));
                }
                Command::Barrier(ack) => {
                    let _ = ack.send(Ok(()));
                }
            }
        }
        self.store
    }

    fn set_status(&self, old: &str, new: &str) {
        if old != new {
            let g = &self.metrics.process.sessions;
            g.with_label_values(&[old]).dec();
            g.with_label_values(&[new]).inc();
        }
    }

    fn state_of(&mut self, id: &str) -> SessionState {
        if let Some(s) = self.sessions.get(id) {
            return s.clone();
        }
        let s = SessionState::new("unknown".to_owned());
        self.metrics
            .process
            .sessions
            .with_label_values(&[&s.status])
            .inc();
        self.sessions.insert(id.to_owned(), s.clone());
        s
    }

    /// Any write to the state file says whether it takes commits (`/readyz` follows): a disk
    /// that recovers is seen at the next write of any kind, not only at the next batch.
    fn note_write<T>(&self, result: &Result<T, StateError>) {
        self.metrics
            .process
            .state_writable
            .set(i64::from(result.is_ok()));
    }

    fn finish(&mut self, id: &str) -> Result<(), StateError> {
        let state = self.sessions.get(id).cloned().unwrap_or_default();
        let written = self.store.upsert_session(id, &state, true);
        self.note_write(&written);
        written?;
        self.event_ids.forget_session(id);
        if self.sessions.remove(id).is_some() {
            self.metrics
                .process
                .sessions
                .with_label_values(&[&state.status])
                .dec();
        }
        Ok(())
    }

    fn set_outbox_len(&mut self, len: u64) {
        self.outbox_len = len;
        self.metrics
            .process
            .span_outbox_turns
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    fn outbox_remove(&mut self, through: i64) -> Result<(), StateError> {
        let removed = self.store.outbox_remove_through(Outbox::Turns, through);
        self.note_write(&removed);
        let removed = removed?;
        self.set_outbox_len(self.outbox_len.saturating_sub(removed as u64));
        Ok(())
    }

    /// Past the bound, the oldest turns make room: counted, never silent.
    fn trim_outbox(&mut self) {
        let Some(max) = self.outbox.as_ref().map(|o| o.max_turns) else {
            return;
        };
        if self.outbox_len <= max {
            return;
        }
        match self
            .store
            .outbox_trim::<ClosedTurn>(Outbox::Turns, max, self.leased_through)
        {
            Ok(dropped) => {
                // An unreadable row counts as the one span it would at least have been.
                let spans: u64 = dropped
                    .iter()
                    .map(|t| 1 + t.as_ref().map_or(0, |t| t.turn.children.len() as u64))
                    .sum();
                self.metrics
                    .process
                    .spans_dropped
                    .with_label_values(&["outbox_full"])
                    .inc_by(spans);
                tracing::warn!(
                    turns = dropped.len(),
                    spans,
                    max_turns = max,
                    "span outbox full (is the OTLP endpoint down?): dropped the oldest turns"
                );
                self.set_outbox_len(self.outbox_len.saturating_sub(dropped.len() as u64));
            }
            Err(e) => tracing::warn!(error = %e, "trimming the span outbox failed"),
        }
    }

    /// Records that agent `id` is called `name`. Where the id was used as the `agent` label
    /// (a session that named its agent by id alone, read before any object showed the name),
    /// its series and sessions move to the name in one transaction: one agent, one label.
    /// The counters' sum is unchanged; the name's series steps up by what the id's had.
    fn learn_agent(&mut self, id: &str, name: &str) -> Result<(), StateError> {
        if id == name || self.agents.get(id).is_some_and(|n| n == name) {
            return Ok(());
        }
        let relabel = self.metrics.durable.stage_relabel(id, name);
        let sessions: Vec<(String, SessionState)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.agent == id)
            .map(|(sid, s)| {
                let mut s = s.clone();
                name.clone_into(&mut s.agent);
                (sid.clone(), s)
            })
            .collect();
        let written = self.store.commit_agent(&crate::state::AgentRelabel {
            id,
            name,
            remove: &relabel.remove,
            put: &relabel.put,
            sessions: &sessions,
        });
        self.note_write(&written);
        written?;
        if !relabel.remove.is_empty() || !sessions.is_empty() {
            tracing::info!(
                agent_id = id,
                agent = name,
                series = relabel.remove.len(),
                sessions = sessions.len(),
                "agent name learned: what was counted under its id now counts under its name"
            );
        }
        self.metrics.durable.publish_relabel(relabel);
        self.agents.insert(id.to_owned(), name.to_owned());
        for (sid, state) in sessions {
            self.metrics.sessions.update(
                &sid,
                SessionView {
                    agent: state.agent.clone(),
                    status: state.status.clone(),
                    credits: state.billed_credits(),
                    budget: state.budget_credits,
                },
                false,
            );
            self.sessions.insert(sid, state);
        }
        Ok(())
    }

    /// Puts a stream's counted ids in memory, from the state file, unless they are there.
    fn load_event_ids(&mut self, stream: &StreamKey) -> Result<(), StateError> {
        if self.event_ids.is_loaded(stream) {
            return Ok(());
        }
        let read = self.store.load_event_ids(&stream.0, &stream.1);
        // A read that works says nothing of whether commits do (it may have merged rows,
        // but a failure to is what counts).
        if read.is_err() {
            self.note_write(&read);
        }
        self.event_ids.load(stream.clone(), read?);
        Ok(())
    }

    fn apply_batch(&mut self, batch: Batch) -> Result<BatchOutcome, StateError> {
        let mut out = self.apply_group(vec![batch], &mut Vec::new())?;
        Ok(out.pop().unwrap_or(BatchOutcome {
            consumed: 0,
            status: "unknown".to_owned(),
            threads: Vec::new(),
        }))
    }

    /// Applies batches (of one or many sessions, in order) and commits them in one
    /// transaction; nothing of them is visible unless all of it is on disk. The batches' items
    /// go to `spent` as they are applied.
    fn apply_group(
        &mut self,
        batches: Vec<Batch>,
        spent: &mut Vec<Vec<Item>>,
    ) -> Result<Vec<BatchOutcome>, StateError> {
        let mut ids = Staged::default();
        let applied = self.apply_group_staged(batches, &mut ids, spent);
        if applied.is_err() {
            // Not committed: the ids the group admitted are not counted.
            self.event_ids.discard(ids);
        }
        applied
    }

    /// [`Pipeline::apply_group`], the event ids it admits staged in `ids`.
    fn apply_group_staged(
        &mut self,
        batches: Vec<Batch>,
        ids: &mut Staged,
        spent: &mut Vec<Vec<Item>>,
    ) -> Result<Vec<BatchOutcome>, StateError> {
        struct Touched {
            id: String,
            state: SessionState,
            old_status: String,
            cursor: Option<String>,
            /// Events or a usage snapshot came: the session is active now.
            active: bool,
        }
        let started = std::time::Instant::now();
        // Names first: a batch's events are counted under the agent's name when any object
        // of the group shows it, never under its id first.
        for meta in batches.iter().filter_map(|b| b.meta.as_ref()) {
            if let (Some(id), Some(name)) = (&meta.agent_id, &meta.agent_name) {
                self.learn_agent(id, name)?;
            }
        }
        let mut delta = Delta::default();
        let mut closed: Vec<ClosedTurn> = Vec::new();
        let mut records: Vec<EventRecord> = Vec::new();
        let mut invalid: HashMap<&'static str, u64> = HashMap::new();
        let mut duplicates = 0;
        let mut bad_fields = DroppedFields::default();
        let capture = self.outbox.as_ref().and_then(|o| o.capture_bytes);
        let mut touched: Vec<Touched> = Vec::new();
        let mut outcomes = Vec::with_capacity(batches.len());
        for mut batch in batches {
            let pos = match touched.iter().position(|t| t.id == batch.session_id) {
                Some(p) => p,
                None => {
                    let state = self.state_of(&batch.session_id);
                    touched.push(Touched {
                        id: batch.session_id.clone(),
                        old_status: state.status.clone(),
                        state,
                        cursor: None,
                        active: false,
                    });
                    touched.len() - 1
                }
            };
            let t = &mut touched[pos];
            let usage = batch.meta.as_ref().and_then(|m| m.usage.clone());
            t.active |= !batch.items.is_empty() || usage.is_some();
            if let Some(mut meta) = batch.meta {
                if meta.agent_name.is_none() {
                    meta.agent_name = meta
                        .agent_id
                        .as_ref()
                        .and_then(|id| self.agents.get(id))
                        .cloned();
                }
                merge_meta(&mut t.state, meta);
            }
            for listed in &batch.threads_listed {
                t.state.thread_listed(listed);
            }
            let thread = batch.thread.as_deref();
            // Only a batch with items opens its stream's set: opening one that is not loaded
            // would put an empty set in its place.
            let mut stream_ids = if batch.items.is_empty() {
                None
            } else {
                let stream: StreamKey = (t.id.clone(), thread.unwrap_or_default().to_owned());
                self.load_event_ids(&stream)?;
                Some(self.event_ids.open(stream, batch.items.len()))
            };
            for item in &batch.items {
                match item {
                    Item::Event(e, digest) => {
                        if stream_ids.as_mut().is_some_and(|s| !s.admit(*digest)) {
                            duplicates += 1;
                            continue;
                        }
                        if let Some(max) = self.max_turn_age_ns {
                            t.state
                                .close_stale(&t.id, e.time_ns, max, &mut delta, &mut closed);
                        }
                        // A cross-post of a sub-agent's event on the session's stream: did
                        // the thread's own stream count it already?
                        let counted_on_thread = match e.thread_id.as_deref() {
                            Some(tid) if thread.is_none() && t.state.threads.contains_key(tid) => {
                                let own: StreamKey = (t.id.clone(), tid.to_owned());
                                self.load_event_ids(&own)?;
                                self.event_ids.counted(&own, *digest)
                            }
                            _ => false,
                        };
                        let closed_before = closed.len();
                        let applied = t.state.apply_checked(
                            &t.id,
                            e,
                            thread,
                            counted_on_thread,
                            &mut delta,
                            &mut closed,
                        );
                        match applied {
                            Applied::Duplicate => duplicates += 1,
                            Applied::Held => {}
                            Applied::DecreasingSnapshot => {
                                tracing::warn!(session = %t.id, event = %e.id, "a usage snapshot is lower than the one before it; it adds nothing");
                                *invalid.entry("decreasing_snapshot").or_default() += 1;
                            }
                            Applied::Counted => {
                                if let Some(max) = capture {
                                    t.state.capture(e, max);
                                }
                            }
                        }
                        if matches!(applied, Applied::Counted | Applied::DecreasingSnapshot)
                            && let Some(logs) = &self.logs
                        {
                            records.extend(logs.record_of(&t.id, thread, e, || {
                                t.state.record_context(e, thread, &closed[closed_before..])
                            }));
                        }
                    }
                    Item::Invalid(reason) => {
                        t.state.skip_unreadable(thread);
                        *invalid.entry(reason.as_label()).or_default() += 1;
                    }
                }
            }
            if let Some(open) = stream_ids {
                self.event_ids.close(open, ids);
            }
            if let Some(snapshot) = &usage {
                t.state.apply_object_usage(snapshot, &mut delta);
            }
            let consumed = match thread {
                Some(tid) => {
                    let read = t.state.thread_read(
                        &t.id,
                        tid,
                        tracker::ThreadRead {
                            cursor: batch.cursor.clone(),
                            at_end: batch.at_end,
                            gone: batch.thread_gone,
                        },
                        &mut delta,
                        &mut closed,
                    );
                    // Held cross-posts its end released: counted now, like any other event.
                    for r in read.released {
                        if let Some(max) = capture {
                            t.state.capture(&r.event, max);
                        }
                        if let Some(logs) = &self.logs {
                            records.extend(logs.record_of(&t.id, thread, &r.event, || r.context));
                        }
                    }
                    read.consumed
                }
                None => {
                    if batch.cursor.is_some() {
                        t.cursor = batch.cursor;
                    }
                    t.state.consumed
                }
            };
            bad_fields += batch.bad_fields;
            spent.push(std::mem::take(&mut batch.items));
            outcomes.push(BatchOutcome {
                consumed,
                status: t.state.status.clone(),
                threads: t.state.threads_to_read(),
            });
        }
        let staged = self.metrics.durable.stage(&delta);
        let turns: &[ClosedTurn] = if self.outbox.is_some() { &closed } else { &[] };
        let new_ids: Vec<Vec<(String, Vec<u64>)>> =
            touched.iter().map(|t| ids.of_session(&t.id)).collect();
        let writes: Vec<BatchWrite<'_, SessionState>> = touched
            .iter()
            .zip(&new_ids)
            .enumerate()
            .map(|(i, (t, event_ids))| BatchWrite {
                session_id: &t.id,
                cursor: t.cursor.as_deref(),
                finished: false,
                state: &t.state,
                series: if i == 0 { &staged.values } else { &[] },
                closed_turns: if i == 0 { turns } else { &[] },
                log_records: if i == 0 { &records } else { &[] },
                event_ids,
            })
            .collect();
        let result = self.store.commit_many(&writes);
        drop(writes);
        self.note_write(&result);
        let p = &self.metrics.process;
        if let Err(e) = result {
            p.state_commit_failures.inc();
            return Err(e);
        }
        // Committed: now, and only now, the batches become visible.
        self.event_ids.publish(std::mem::take(ids));
        p.series_dropped.inc_by(staged.folded);
        self.metrics.durable.publish(staged);
        p.state_commits.inc();
        p.state_commit_duration
            .observe(started.elapsed().as_secs_f64());
        for (reason, n) in invalid {
            p.events_invalid.with_label_values(&[reason]).inc_by(n);
        }
        for (reason, n) in bad_fields.by_reason() {
            p.fields_dropped
                .with_label_values(&[reason])
                .inc_by(u64::from(n));
        }
        p.events_duplicate.inc_by(duplicates);
        self.logs_committed(records.len());
        if !turns.is_empty() {
            self.set_outbox_len(self.outbox_len + turns.len() as u64);
            self.trim_outbox();
            if let Some(o) = &self.outbox {
                o.notify.notify_one();
            }
        }
        for t in touched {
            self.metrics.sessions.update(
                &t.id,
                SessionView {
                    agent: t.state.agent.clone(),
                    status: t.state.status.clone(),
                    credits: t.state.billed_credits(),
                    budget: t.state.budget_credits,
                },
                t.active,
            );
            self.set_status(&t.old_status, &t.state.status);
            self.sessions.insert(t.id, t.state);
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::metrics::{Exposition, Family};
    use crate::source::wire;

    fn event(raw: &str) -> Item {
        Item::event(Event::from_wire(
            wire::decode_event(raw).expect("event").event,
        ))
    }

    fn request(id: &str) -> Item {
        event(&format!(
            r#"{{"id":"{id}","type":"span.model_request_end","model_usage":{{"credits":1.5,"input_tokens":10}}}}"#
        ))
    }

    fn meta(id: Option<&str>, name: Option<&str>) -> SessionMeta {
        SessionMeta {
            agent_id: id.map(str::to_owned),
            agent_name: name.map(str::to_owned),
            model: Some("qwen".to_owned()),
            ..SessionMeta::default()
        }
    }

    fn batch(session: &str, meta: SessionMeta, items: Vec<Item>) -> Batch {
        let cursor = items.iter().rev().find_map(|i| match i {
            Item::Event(e, _) => Some(e.id.clone()),
            Item::Invalid(_) => None,
        });
        Batch {
            session_id: session.to_owned(),
            meta: Some(meta),
            items,
            cursor,
            ..Batch::default()
        }
    }

    /// A pipeline on the state file at `path` (a new one, or the one a test left), and its
    /// metrics.
    fn open(path: &std::path::Path) -> (Pipeline, Metrics, Vec<StoredSession>) {
        let metrics = Metrics::new().expect("metrics");
        let store = StateStore::open(path).expect("store");
        let (p, stored) = Pipeline::new(store, metrics.clone(), None).expect("pipeline");
        (p, metrics, stored)
    }

    fn requests(m: &Metrics, agent: &str) -> f64 {
        m.durable.counter(Family::ModelRequests, &[agent, "qwen"])
    }

    #[test]
    fn an_agent_counted_under_its_id_moves_to_its_name_once_and_for_good() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        {
            let (mut p, metrics, _) = open(&path);
            // A session that names its agent by id alone, before anything names it.
            p.apply_batch(batch(
                "s1",
                meta(Some("agent_7"), None),
                vec![request("e1")],
            ))
            .expect("commit");
            assert_eq!(requests(&metrics, "agent_7"), 1.0);
            // Another session of the same agent shows its name: what the id had moves to it,
            // the sum is unchanged, and the id's series are gone.
            p.apply_batch(batch(
                "s2",
                meta(Some("agent_7"), Some("triage")),
                vec![request("e2")],
            ))
            .expect("commit");
            assert_eq!(requests(&metrics, "triage"), 2.0);
            assert_eq!(requests(&metrics, "agent_7"), 0.0);
            assert_eq!(metrics.durable.total(Family::ModelRequests), 2.0);
            assert_eq!(
                p.sessions.get("s1").map(|s| s.agent.as_str()),
                Some("triage")
            );
            // Learning it again changes nothing.
            p.apply_batch(batch("s2", meta(Some("agent_7"), Some("triage")), vec![]))
                .expect("commit");
            assert_eq!(requests(&metrics, "triage"), 2.0);
        }
        // After a restart the name is known before anything is counted: a new id-only session
        // counts under the name, and the stored series hold the merged values.
        let (mut p, metrics, stored) = open(&path);
        assert!(stored.iter().all(|s| s.state.agent == "triage"));
        assert_eq!(requests(&metrics, "triage"), 2.0);
        p.apply_batch(batch(
            "s3",
            meta(Some("agent_7"), None),
            vec![request("e3")],
        ))
        .expect("commit");
        assert_eq!(requests(&metrics, "triage"), 3.0);
        assert_eq!(requests(&metrics, "agent_7"), 0.0);
    }

    /// An id the API returns again is skipped however many events later it comes, across a
    /// restart, while the same id on another session counts.
    #[test]
    fn an_event_counts_once_however_late_the_api_repeats_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        {
            let (mut p, metrics, _) = open(&path);
            let first: Vec<Item> = (0..100).map(|n| request(&format!("e{n}"))).collect();
            p.apply_batch(batch("s1", meta(None, Some("a")), first))
                .expect("commit");
            p.apply_batch(batch(
                "s1",
                meta(None, Some("a")),
                vec![request("e0"), request("e100"), request("e50")],
            ))
            .expect("commit");
            assert_eq!(requests(&metrics, "a"), 101.0);
            assert_eq!(metrics.process.events_duplicate.get(), 2);
        }
        let (mut p, metrics, _) = open(&path);
        p.apply_batch(batch(
            "s1",
            meta(None, Some("a")),
            vec![request("e1"), request("e101")],
        ))
        .expect("commit");
        p.apply_batch(batch("s2", meta(None, Some("a")), vec![request("e1")]))
            .expect("commit");
        assert_eq!(requests(&metrics, "a"), 103.0);
        assert_eq!(metrics.process.events_duplicate.get(), 1);
    }

    /// A sub-agent's event its thread's stream counted long ago (past the tracker's window of
    /// the thread's ids) and the session's stream cross-posts late counts once.
    #[test]
    fn a_late_cross_post_of_a_counted_thread_event_counts_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut p, metrics, _) = open(&dir.path().join("s.db"));
        let own = |items: Vec<Item>| Batch {
            session_id: "s1".into(),
            items,
            ..Batch::default()
        };
        let thread = |items: Vec<Item>, at_end: bool| Batch {
            session_id: "s1".into(),
            thread: Some("t1".into()),
            items,
            at_end,
            ..Batch::default()
        };
        p.apply_batch(own(vec![event(
            r#"{"id":"c1","type":"session.thread_created","session_thread_id":"t1","agent_name":"sub"}"#,
        )]))
        .expect("created");
        let on_thread: Vec<Item> = (0..600)
            .map(|n| {
                event(&format!(
                    r#"{{"id":"x{n}","type":"agent.custom","session_thread_id":"t1"}}"#
                ))
            })
            .collect();
        p.apply_batch(thread(on_thread, false)).expect("thread");
        let before = metrics.durable.total(Family::Events);
        p.apply_batch(own(vec![event(
            r#"{"id":"x0","type":"agent.custom","session_thread_id":"t1"}"#,
        )]))
        .expect("cross-post");
        p.apply_batch(thread(vec![], true)).expect("at end");
        assert_eq!(metrics.durable.total(Family::Events), before);
    }

    #[test]
    fn histograms_merge_bucket_by_bucket() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut p, metrics, _) = open(&dir.path().join("s.db"));
        let tool = |id: &str, use_at: &str, result_at: &str| {
            vec![
                event(&format!(
                    r#"{{"id":"{id}u","type":"agent.tool_use","name":"Read","processed_at":"{use_at}"}}"#
                )),
                event(&format!(
                    r#"{{"id":"{id}r","type":"agent.tool_result","tool_use_id":"{id}u","processed_at":"{result_at}"}}"#
                )),
            ]
        };
        p.apply_batch(batch(
            "s1",
            meta(Some("agent_7"), None),
            tool("a", "2026-10-01T00:00:00Z", "2026-10-01T00:00:02Z"),
        ))
        .expect("commit");
        p.apply_batch(batch(
            "s2",
            meta(Some("agent_7"), Some("triage")),
            tool("b", "2026-10-01T00:00:00Z", "2026-10-01T00:00:30Z"),
        ))
        .expect("commit");
        let text = String::from_utf8(metrics.render(Exposition::Text).0).expect("utf8");
        assert!(
            text.contains(
                r#"qoder_tool_call_duration_seconds_count{agent="triage",tool="Read"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("agent_7"), "{text}");
    }
}

/// Log records: one per counted event, in the right turn, with the right names.
#[cfg(test)]
mod record_tests {
    use super::*;
    use crate::sinks::metrics::Family;
    use crate::source::wire;

    fn event(raw: &str) -> Item {
        Item::event(Event::from_wire(
            wire::decode_event(raw).expect("event").event,
        ))
    }

    fn logs_pipeline(path: &std::path::Path) -> (Pipeline, Metrics) {
        let metrics = Metrics::new().expect("metrics");
        let store = StateStore::open(path).expect("store");
        let (p, _) = Pipeline::new(store, metrics.clone(), None).expect("pipeline");
        let p = p
            .with_logs(log_outbox::LogsConfig {
                max_records: 1000,
                notify: Arc::new(Notify::new()),
                event_types: None,
                content_max: None,
            })
            .expect("logs");
        (p, metrics)
    }

    /// Every counted event has exactly one record: a cross-post held on the session's stream
    /// and released when the thread's stream ends without it is counted too.
    #[test]
    fn a_held_cross_post_released_at_its_threads_end_has_a_record() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut p, metrics) = logs_pipeline(&dir.path().join("s.db"));
        let own = |items: Vec<Item>| Batch {
            session_id: "s1".into(),
            items,
            ..Batch::default()
        };
        p.apply_batch(own(vec![event(
            r#"{"id":"c1","type":"session.thread_created","session_thread_id":"t1","agent_name":"sub"}"#,
        )]))
        .expect("created");
        p.apply_batch(own(vec![event(
            r#"{"id":"x1","type":"agent.tool_use","name":"Read","session_thread_id":"t1"}"#,
        )]))
        .expect("cross-post (held)");
        p.apply_batch(Batch {
            session_id: "s1".into(),
            thread: Some("t1".into()),
            at_end: true,
            ..Batch::default()
        })
        .expect("thread read to its end without it");
        let counted = metrics.durable.total(Family::Events);
        let records = p.store.outbox_len(Outbox::Records).expect("len");
        assert_eq!(
            metrics.durable.counter(Family::ToolCalls, &["Read", "sub"]),
            1.0,
            "the held tool use is counted"
        );
        assert_eq!((counted, records), (2.0, 2), "one record per counted event");
    }

    /// A request-end record names the model its metrics count it under.
    #[test]
    fn a_request_end_record_names_the_model_its_request_is_counted_under() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut p, metrics) = logs_pipeline(&dir.path().join("s.db"));
        p.apply_batch(Batch {
            session_id: "s1".into(),
            meta: Some(SessionMeta { agent_name: Some("coder".into()), model: Some("qwen".into()), ..SessionMeta::default() }),
            items: vec![
                event(r#"{"id":"u1","type":"user.message","content":"hi"}"#),
                event(r#"{"id":"r1","type":"span.model_request_start","model":"claude-x"}"#),
                event(r#"{"id":"r2","type":"span.model_request_end","model_request_start_id":"r1","model_usage":{"input_tokens":3}}"#),
            ],
            ..Batch::default()
        })
        .expect("commit");
        let counted_under = metrics
            .durable
            .counter(Family::ModelRequests, &["coder", "claude-x"]);
        let rows = p
            .store
            .outbox_peek::<EventRecord>(Outbox::Records, 10)
            .expect("peek");
        let end = rows
            .iter()
            .filter_map(|(_, r)| r.as_ref())
            .find(|r| r.event_id == "r2")
            .expect("record");
        assert_eq!(counted_under, 1.0);
        assert_eq!(end.model.as_deref(), Some("claude-x"));
    }

    /// The first event of a new turn points at the new turn's trace, not at the turn its
    /// arrival closed.
    #[test]
    fn the_event_that_opens_a_turn_points_at_that_turn_not_the_one_it_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut p, _metrics) = logs_pipeline(&dir.path().join("s.db"));
        p.apply_batch(Batch {
            session_id: "s1".into(),
            meta: Some(SessionMeta { agent_name: Some("coder".into()), ..SessionMeta::default() }),
            items: vec![
                event(r#"{"id":"a1","type":"user.message","content":"hi","turn_id":"turn_1","processed_at":"2026-10-01T00:00:00Z"}"#),
                event(r#"{"id":"a2","type":"agent.message","content":"x","turn_id":"turn_1","processed_at":"2026-10-01T00:00:01Z"}"#),
                event(r#"{"id":"b1","type":"user.message","content":"again","turn_id":"turn_2","processed_at":"2026-10-01T00:01:00Z"}"#),
                event(r#"{"id":"b2","type":"agent.message","content":"y","turn_id":"turn_2","processed_at":"2026-10-01T00:01:01Z"}"#),
            ],
            ..Batch::default()
        })
        .expect("commit");
        let rows = p
            .store
            .outbox_peek::<EventRecord>(Outbox::Records, 10)
            .expect("peek");
        let b1 = rows
            .iter()
            .filter_map(|(_, r)| r.as_ref())
            .find(|r| r.event_id == "b1")
            .expect("b1");
        assert_eq!(
            b1.turn.as_ref().map(|t| t.span_event_id.as_str()),
            Some("b1")
        );
    }
}
