//! Logs on: every counted event (of the chosen types) becomes an [`EventRecord`] in the log
//! outbox, written in the transaction of the batch that counted it, so a record exists exactly
//! when its counts do; the log shipper drains the outbox through the pipeline, the one writer
//! of the state file. Bounded like the span outbox: past `max_records` the oldest go, counted.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Notify;

use super::{Pipeline, PipelineHandle};
use crate::record::EventRecord;
use crate::sinks::drain::{OutboxError, OutboxSource};
use crate::state::{Outbox, StateError};

/// What goes to the log outbox.
#[derive(Debug, Clone)]
pub(crate) struct LogsConfig {
    /// Past this many records, the oldest are dropped (`otlp_dropped_total{reason="outbox_full"}`).
    pub max_records: u64,
    /// Woken after a commit that added records.
    pub notify: Arc<Notify>,
    /// `None`: every event type.
    pub event_types: Option<BTreeSet<String>>,
    /// Message text in records, cut to this many bytes (`--otlp.logs.include-content`).
    pub content_max: Option<usize>,
}

/// The log outbox as the pipeline tracks it.
#[derive(Debug)]
pub(super) struct LogOutbox {
    pub(super) config: LogsConfig,
    len: u64,
    /// The records being exported end here: trimming must not drop them.
    leased_through: Option<i64>,
}

impl LogOutbox {
    /// Whether events of this type become records.
    pub(super) fn wants(&self, type_name: &str) -> bool {
        self.config
            .event_types
            .as_ref()
            .is_none_or(|t| t.contains(type_name))
    }

    /// The record of counted event `ev` (read on `thread`'s stream), when its type is wanted;
    /// `context` (who counted it, its turn) is asked only then.
    pub(super) fn record_of(
        &self,
        session_id: &str,
        thread: Option<&str>,
        ev: &crate::event::Event,
        context: impl FnOnce() -> crate::record::RecordContext,
    ) -> Option<EventRecord> {
        self.wants(&ev.type_name)
            .then(|| EventRecord::of(session_id, thread, ev, context(), self.config.content_max))
    }
}

impl Pipeline {
    /// Turns logs on: counted events from here on also go to the log outbox.
    pub(crate) fn with_logs(mut self, config: LogsConfig) -> Result<Pipeline, StateError> {
        let len = self.store.outbox_len(Outbox::Records)?;
        self.metrics
            .process
            .log_outbox_records
            .set(i64::try_from(len).unwrap_or(i64::MAX));
        self.logs = Some(LogOutbox {
            config,
            len,
            leased_through: None,
        });
        Ok(self)
    }

    fn set_log_len(&mut self, len: u64) {
        if let Some(l) = &mut self.logs {
            l.len = len;
        }
        self.metrics
            .process
            .log_outbox_records
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    pub(super) fn log_peek(
        &mut self,
        limit: usize,
    ) -> Result<Vec<(i64, Option<EventRecord>)>, StateError> {
        let rows = self.store.outbox_peek(Outbox::Records, limit);
        if let (Ok(r), Some(l)) = (&rows, &mut self.logs) {
            l.leased_through = r.last().map(|(seq, _)| *seq);
        }
        rows
    }

    pub(super) fn log_remove(&mut self, through: i64) -> Result<(), StateError> {
        let Some(len) = self.logs.as_mut().map(|l| {
            l.leased_through = None;
            l.len
        }) else {
            return Ok(());
        };
        let removed = self.store.outbox_remove_through(Outbox::Records, through);
        self.note_write(&removed);
        self.set_log_len(len.saturating_sub(removed? as u64));
        Ok(())
    }

    pub(super) fn log_release(&mut self) {
        if let Some(l) = &mut self.logs {
            l.leased_through = None;
        }
    }

    /// After a commit that added `added` records: bound the outbox and wake the shipper.
    pub(super) fn logs_committed(&mut self, added: usize) {
        let Some(l) = &self.logs else {
            return;
        };
        if added == 0 {
            return;
        }
        let (len, max, leased) = (l.len + added as u64, l.config.max_records, l.leased_through);
        let notify = l.config.notify.clone();
        self.set_log_len(len);
        if len > max {
            match self
                .store
                .outbox_trim::<serde::de::IgnoredAny>(Outbox::Records, max, leased)
            {
                Ok(dropped) => {
                    self.metrics
                        .process
                        .otlp_dropped
                        .with_label_values(&["logs", "outbox_full"])
                        .inc_by(dropped.len() as u64);
                    tracing::warn!(
                        records = dropped.len(),
                        max_records = max,
                        "log outbox full (is the OTLP endpoint down?): dropped the oldest records"
                    );
                    self.set_log_len(len.saturating_sub(dropped.len() as u64));
                }
                Err(e) => tracing::warn!(error = %e, "trimming the log outbox failed"),
            }
        }
        notify.notify_one();
    }
}

/// The log shipper drains the log outbox through the pipeline.
impl OutboxSource<EventRecord> for PipelineHandle {
    async fn peek(&self, limit: usize) -> Result<Vec<(i64, Option<EventRecord>)>, OutboxError> {
        self.call(|ack| super::Command::LogPeek(limit, ack))
            .await
            .map_err(super::outbox_error)
    }

    async fn remove_through(&self, seq: i64) -> Result<(), OutboxError> {
        self.call(|ack| super::Command::LogRemove(seq, ack))
            .await
            .map_err(super::outbox_error)
    }

    async fn release(&self) -> Result<(), OutboxError> {
        self.call(super::Command::LogRelease)
            .await
            .map_err(super::outbox_error)
    }
}
