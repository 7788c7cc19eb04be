//! What the OTLP shippers share: the outbox they read from, the loop that drains it, and
//! how they are stopped.
//!
//! A shipper works in rounds: peek the oldest items, send them, remove them once the endpoint
//! took them (or release them when it did not). The loop runs rounds while there is work,
//! waits for a commit when the outbox is empty, and backs off after a failure. A stop request
//! carries a deadline shared by every shipper: a round in flight is finished, never cut short
//! by the request itself (cut after the endpoint took a batch, the batch would be sent again
//! by the flush that follows), then rounds go on until the outbox is empty, an attempt fails or
//! the deadline passes. What is left is sent at the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where a shipper takes its items from: an outbox the pipeline keeps in the state file (an
/// item enters it in the transaction of the batch that produced it).
pub(crate) trait OutboxSource<T>: Send + Sync {
    /// The oldest items waiting, at most `limit`, with their sequence numbers (`None`: a row
    /// that no longer decodes). They stay leased until removed or released.
    fn peek(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(i64, Option<T>)>, OutboxError>> + Send;
    /// Items up to `seq` were exported (or given up on).
    fn remove_through(&self, seq: i64) -> impl Future<Output = Result<(), OutboxError>> + Send;
    /// The export of the last peeked items failed: they may be trimmed again.
    fn release(&self) -> impl Future<Output = Result<(), OutboxError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxError {
    /// The pipeline stopped: the shipper stops too (what is left is sent at the next start).
    Gone,
    /// The state file refused the read or write: tried again after a back-off.
    Store,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// The outbox is empty.
    Idle,
    /// Something was sent (or dropped); look again at once.
    Progress,
    /// The endpoint (or the state file) failed; wait before trying again.
    Failed,
    /// The pipeline is gone.
    Stopped,
}

impl From<OutboxError> for Round {
    fn from(e: OutboxError) -> Round {
        match e {
            OutboxError::Gone => Round::Stopped,
            OutboxError::Store => Round::Failed,
        }
    }
}

/// One signal's shipper, as the drain loop drives it.
pub(crate) trait Rounds: Send {
    /// `spans`, `logs`: for log lines.
    const SIGNAL: &'static str;
    /// One round: the oldest items sent, then removed or released.
    fn round(&mut self) -> impl Future<Output = Round> + Send;
    fn endpoint(&self) -> &str;
}

/// Asks a background task to stop, with the deadline every task shares (the sending side).
#[derive(Debug)]
pub(crate) struct StopRequest(watch::Sender<Option<Instant>>);

/// A task's view of [`StopRequest`].
#[derive(Debug, Clone)]
pub(crate) struct StopSignal(watch::Receiver<Option<Instant>>);

/// A linked request and signal.
pub(crate) fn stop_pair() -> (StopRequest, StopSignal) {
    let (tx, rx) = watch::channel(None);
    (StopRequest(tx), StopSignal(rx))
}

impl StopRequest {
    /// Stop, finishing by `deadline`.
    pub(crate) fn stop_by(&self, deadline: Instant) {
        self.0.send_replace(Some(deadline));
    }
}

impl StopSignal {
    /// Resolves once stopping is asked for, with the deadline to finish by (now, if the asking
    /// side is gone).
    pub(crate) async fn requested(&self) -> Instant {
        let mut rx = self.0.clone();
        loop {
            if let Some(deadline) = *rx.borrow_and_update() {
                return deadline;
            }
            if rx.changed().await.is_err() {
                return Instant::now();
            }
        }
    }

    /// The deadline, once stopping is asked for.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    /// Runs `work` to its end, unless stopping is asked for and the deadline passes first
    /// (`None`). The request alone never cuts it short.
    pub(crate) async fn finish<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        tokio::select! {
            out = &mut work => Some(out),
            deadline = self.requested() => tokio::time::timeout_at(deadline, work).await.ok(),
        }
    }
}

/// Drains an outbox with `rounds` until stopped (see the module documentation); `notify` is
/// woken by a commit that added items.
pub(crate) async fn drain<R: Rounds>(mut rounds: R, notify: Arc<Notify>, stop: StopSignal) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(round) = stop.finish(rounds.round()).await else {
            not_flushed(R::SIGNAL, rounds.endpoint());
            return;
        };
        if stop.deadline().is_some() {
            // Stopping: rounds until empty; one failure ends it (the deadline would not do).
            match round {
                Round::Progress => continue,
                Round::Idle => tracing::info!(signal = R::SIGNAL, "outbox flushed"),
                Round::Stopped => tracing::warn!(
                    signal = R::SIGNAL,
                    "the pipeline stopped before the outbox was flushed; what is left is sent at the next start"
                ),
                Round::Failed => not_flushed(R::SIGNAL, rounds.endpoint()),
            }
            return;
        }
        match round {
            Round::Progress => backoff = BACKOFF_MIN,
            Round::Idle => {
                tokio::select! {
                    () = notify.notified() => {}
                    _ = stop.requested() => {}
                }
            }
            Round::Failed => {
                let wait = backoff.mul_f64(0.5 + fastrand::f64());
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.requested() => {}
                }
            }
            Round::Stopped => return,
        }
    }
}

fn not_flushed(signal: &str, endpoint: &str) {
    tracing::warn!(
        signal,
        endpoint,
        "could not flush the outbox before exit; what is left is sent at the next start"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Rounds that take `takes` each and count what they sent.
    struct Slow {
        takes: Duration,
        left: u32,
        sent: Arc<Mutex<u32>>,
        fail: bool,
    }

    impl Rounds for Slow {
        const SIGNAL: &'static str = "test";
        async fn round(&mut self) -> Round {
            if self.left == 0 {
                return Round::Idle;
            }
            tokio::time::sleep(self.takes).await;
            if self.fail {
                return Round::Failed;
            }
            self.left -= 1;
            *self.sent.lock().expect("sent") += 1;
            Round::Progress
        }
        fn endpoint(&self) -> &str {
            "test"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_in_flight_when_stop_comes_is_finished_not_cut_and_the_rest_is_flushed() {
        let sent = Arc::new(Mutex::new(0));
        let (request, signal) = stop_pair();
        let rounds = Slow {
            takes: Duration::from_secs(1),
            left: 3,
            sent: sent.clone(),
            fail: false,
        };
        let task = tokio::spawn(drain(rounds, Arc::new(Notify::new()), signal));
        // Half-way through the first round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        request.stop_by(Instant::now() + Duration::from_secs(5));
        task.await.expect("drain");
        assert_eq!(*sent.lock().expect("sent"), 3, "finished, then flushed");
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_deadline_cuts_a_round_that_would_end_after_it() {
        let sent = Arc::new(Mutex::new(0));
        let (request, signal) = stop_pair();
        let rounds = Slow {
            takes: Duration::from_secs(60),
            left: 3,
            sent: sent.clone(),
            fail: false,
        };
        let started = Instant::now();
        let task = tokio::spawn(drain(rounds, Arc::new(Notify::new()), signal));
        tokio::time::sleep(Duration::from_secs(1)).await;
        request.stop_by(Instant::now() + Duration::from_secs(5));
        task.await.expect("drain");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(6) && took < Duration::from_millis(6100),
            "cut at the deadline: {took:?}"
        );
        assert_eq!(*sent.lock().expect("sent"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_stopping_ends_the_flush_and_a_backoff_does_not_delay_the_stop() {
        let (request, signal) = stop_pair();
        let rounds = Slow {
            takes: Duration::from_millis(10),
            left: 1,
            sent: Arc::default(),
            fail: true,
        };
        let started = Instant::now();
        let task = tokio::spawn(drain(rounds, Arc::new(Notify::new()), signal));
        // Several failed rounds with back-offs in between.
        tokio::time::sleep(Duration::from_secs(3)).await;
        request.stop_by(Instant::now() + Duration::from_secs(5));
        task.await.expect("drain");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
}
