//! One handler per event kind: what the event does to the session's turn, its open requests and
//! tools, and the metrics. [`SessionState::apply_admitted`](super::SessionState) dispatches
//! here; a new kind of event is one arm there and one function here.

use super::{
    ChildDetail, ChildSpan, ClosedTurn, MAX_OPEN_REQUESTS, MAX_OPEN_TOOLS, MAX_TURN_ERRORS,
    OpenRequest, OpenTool, SessionState, TurnEnd, TurnError, push_child,
};
use crate::event::{Event, RetryStatus, ThreadPhase, Tokens, ToolKind};
use crate::outcome::{Example, RequestFinished, Tally};
use crate::turn::Turn;

/// What every handler needs besides the event's own fields.
pub(super) struct Cx<'a> {
    pub session_id: &'a str,
    pub ev: &'a Event,
    /// The `agent` label of the tracker (the session's agent, or the sub-agent's).
    pub agent: &'a str,
    pub tally: &'a mut dyn Tally,
    pub closed: &'a mut Vec<ClosedTurn>,
}

/// A `span.model_request_end`'s fields.
pub(super) struct RequestEnd<'a> {
    pub start_id: Option<&'a str>,
    pub span_id: Option<&'a str>,
    pub is_error: bool,
    pub tokens: Option<&'a Tokens>,
    pub credits: Option<f64>,
}

/// Where an increment made during turn `turn` of `session_id` at `time_ns` points: the turn's
/// trace (a sub-agent's turn is in the trace of the session turn it ran in) and root span.
pub(super) fn example_at<'a>(
    session_id: &'a str,
    turn: &'a Turn,
    time_ns: Option<i64>,
) -> Example<'a> {
    Example {
        session_id,
        trace_key: turn.parent.as_ref().map_or(&turn.key, |p| &p.key),
        span_event_id: &turn.first_event_id,
        time_ns,
    }
}

impl SessionState {
    /// `user.message`, `session.status_running`/`_rescheduled`: a turn runs. A turn that
    /// failed and never idled ends here, as failed.
    pub(super) fn on_turn_running(&mut self, cx: &mut Cx<'_>) {
        if let Some(turn) = &self.turn
            && let Some((error_type, at)) = turn.failed.clone()
        {
            let end = at.or(turn.last_ns);
            self.close_turn(
                cx.session_id,
                end,
                TurnEnd::Failed { error_type },
                cx.tally,
                cx.closed,
            );
        }
        self.status = "running".to_owned();
        self.ensure_turn(cx.ev);
    }

    /// `session.status_idle`: the turn is counted and closed; its idle usage counts unless
    /// its model requests already reported tokens.
    pub(super) fn on_idle(
        &mut self,
        cx: &mut Cx<'_>,
        stop_reason: Option<&str>,
        tokens: Option<&Tokens>,
    ) {
        let stop = stop_reason.unwrap_or("unknown").to_owned();
        let at = self
            .turn
            .as_ref()
            .map(|turn| example_at(cx.session_id, turn, cx.ev.time_ns));
        cx.tally.turn_ended(cx.agent, &stop, at);
        let from_requests = self.turn.as_ref().is_some_and(|t| t.tokens_from_requests);
        if let Some(tokens) = tokens
            && !from_requests
        {
            let model = self
                .turn
                .as_ref()
                .and_then(|t| t.last_model.clone())
                .unwrap_or_else(|| self.model_or_unknown());
            cx.tally.tokens_used(cx.agent, &model, tokens);
            if let Some(turn) = &mut self.turn {
                turn.tokens.add(tokens);
                turn.tokens_reported = true;
            }
        }
        self.status = "idle".to_owned();
        if self.turn.is_some() {
            self.close_turn(
                cx.session_id,
                cx.ev.time_ns,
                TurnEnd::Idle { stop_reason: stop },
                cx.tally,
                cx.closed,
            );
        }
    }

    /// `terminated`, `session.status_terminated`, `session.deleted`: everything open closes.
    pub(super) fn on_terminated(&mut self, cx: &mut Cx<'_>) {
        self.status = "terminated".to_owned();
        if let Some(turn) = &self.turn {
            let end = match &turn.failed {
                Some((error_type, _)) => TurnEnd::Failed {
                    error_type: error_type.clone(),
                },
                None => TurnEnd::Terminated,
            };
            let at = cx.ev.time_ns.or(turn.last_ns);
            self.close_turn(cx.session_id, at, end, cx.tally, cx.closed);
        }
        self.requests.clear();
        self.tools.clear();
    }

    /// `session.error`: counted, attached to the turn as a span event; retries exhausted (or a
    /// terminal error) fail the turn.
    pub(super) fn on_error(
        &mut self,
        cx: &mut Cx<'_>,
        error_type: &str,
        retry_status: RetryStatus,
        message: Option<&str>,
        code: Option<&String>,
    ) {
        let at = self
            .turn
            .as_ref()
            .map(|turn| example_at(cx.session_id, turn, cx.ev.time_ns));
        cx.tally
            .session_error(cx.agent, error_type, retry_status.as_label(), at);
        if let Some(turn) = &mut self.turn {
            if turn.errors.len() < MAX_TURN_ERRORS {
                turn.errors.push(TurnError {
                    time_ns: cx.ev.time_ns,
                    error_type: error_type.to_owned(),
                    retry_status: retry_status.as_label().to_owned(),
                    message: message.map(str::to_owned),
                    code: code.cloned(),
                });
            }
            if retry_status.ends_turn() {
                turn.failed = Some((error_type.to_owned(), cx.ev.time_ns));
                turn.error_code = code.cloned();
            }
        }
        if retry_status == RetryStatus::Terminal {
            self.status = "terminating".to_owned();
        }
    }

    /// `span.model_request_start`: a request opens, to be paired with its end.
    pub(super) fn on_request_start(
        &mut self,
        ev: &Event,
        model: Option<&String>,
        span_id: Option<&String>,
    ) {
        self.ensure_turn(ev);
        if self.requests.len() == MAX_OPEN_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(OpenRequest {
            start_id: ev.id.clone(),
            span_id: span_id.cloned(),
            model: model.cloned(),
            start_ns: ev.time_ns,
        });
    }

    /// `span.model_request_end`: the request is counted (tokens, credits, duration when its
    /// start was seen) and becomes a child span of the turn.
    pub(super) fn on_request_end(&mut self, cx: &mut Cx<'_>, end: &RequestEnd<'_>) {
        let ev = cx.ev;
        self.ensure_turn(ev);
        let open = self.take_request(end.start_id, end.span_id);
        let model = open
            .as_ref()
            .and_then(|r| r.model.clone())
            .unwrap_or_else(|| self.model_or_unknown());
        let start_ns = open.as_ref().and_then(|r| r.start_ns);
        cx.tally.request_finished(RequestFinished {
            agent: cx.agent,
            model: &model,
            is_error: end.is_error,
            duration_ns: start_ns.zip(ev.time_ns).map(|(s, e)| e.saturating_sub(s)),
            credits: end.credits,
            example: self
                .turn
                .as_ref()
                .map(|turn| example_at(cx.session_id, turn, ev.time_ns)),
        });
        if let Some(t) = end.tokens {
            cx.tally.tokens_used(cx.agent, &model, t);
        }
        if let Some(turn) = &mut self.turn {
            if let Some(t) = end.tokens {
                turn.tokens_from_requests = true;
                turn.tokens_reported = true;
                turn.tokens.add(t);
            }
            if let Some(c) = end.credits {
                turn.credits += c;
                turn.credits_reported = true;
            }
            turn.last_model = Some(model.clone());
            push_child(
                turn,
                ChildSpan {
                    id: open.map_or_else(|| ev.id.clone(), |r| r.start_id),
                    detail: ChildDetail::Chat {
                        model,
                        tokens: end.tokens.copied(),
                        credits: end.credits,
                    },
                    start_ns: start_ns.or(ev.time_ns),
                    end_ns: ev.time_ns,
                    is_error: end.is_error,
                    incomplete: false,
                },
            );
        }
    }

    /// `agent.tool_use` (and the MCP and custom kinds): counted, and opened to be paired with
    /// its result.
    pub(super) fn on_tool_use(
        &mut self,
        cx: &mut Cx<'_>,
        kind: ToolKind,
        use_id: &str,
        name: &str,
    ) {
        let ev = cx.ev;
        self.ensure_turn(ev);
        cx.tally.tool_called(cx.agent, name);
        if self.tools.len() == MAX_OPEN_TOOLS {
            self.tools.pop_front();
        }
        self.tools.push_back(OpenTool {
            kind,
            use_id: use_id.to_owned(),
            event_id: ev.id.clone(),
            name: name.to_owned(),
            start_ns: ev.time_ns,
            span_emitted: false,
        });
    }

    /// `agent.tool_result`: paired with its use; an error is counted under the tool's name,
    /// the duration observed, and the call becomes a child span of the turn.
    pub(super) fn on_tool_result(
        &mut self,
        cx: &mut Cx<'_>,
        kind: ToolKind,
        use_id: Option<&str>,
        is_error: bool,
    ) {
        let ev = cx.ev;
        let open = use_id.and_then(|u| self.take_tool(kind, u));
        let name = open
            .as_ref()
            .map_or("unknown", |t| t.name.as_str())
            .to_owned();
        let started = open.as_ref().and_then(|t| t.start_ns);
        let duration_ns = started.zip(ev.time_ns).map(|(s, e)| e.saturating_sub(s));
        cx.tally
            .tool_finished(cx.agent, &name, is_error, duration_ns);
        if let (Some(turn), Some(tool)) = (&mut self.turn, open)
            && !tool.span_emitted
        {
            push_child(
                turn,
                ChildSpan {
                    id: tool.event_id,
                    detail: ChildDetail::Tool {
                        name,
                        call_id: tool.use_id,
                        kind: tool.kind,
                    },
                    start_ns: tool.start_ns,
                    end_ns: ev.time_ns,
                    is_error,
                    incomplete: false,
                },
            );
        }
    }

    /// `session.thread_status_*`: a sub-agent's idle counts a thread turn; on a thread's own
    /// tracker the status also drives its turns (the session's own thread status leaves the
    /// session's turns to the session status events).
    pub(super) fn on_thread_status(&mut self, cx: &mut Cx<'_>, phase: &ThreadPhase) {
        if let ThreadPhase::Idle { stop_reason } = phase {
            let stop = stop_reason.as_deref().unwrap_or("unknown");
            cx.tally.thread_turn_ended(cx.agent, stop);
        }
        if self.thread_id.is_some() {
            self.thread_status(cx.session_id, cx.ev, phase, cx.tally, cx.closed);
        }
    }
}
