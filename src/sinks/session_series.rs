//! Per-session series, bounded: `qoder_session_info{session_id,agent,status}`,
//! `qoder_session_credits{session_id,kind}` (the latest billed snapshot) and
//! `qoder_session_budget_credits{session_id}`, for the most recently active sessions only.
//!
//! A session id is a label here, which the event-derived families never allow: these are
//! gauges of *current* state for "which session is burning credits now" and per-session budget
//! alerts, bounded like kube-state-metrics. At most `limit` sessions are shown (the most
//! recently active), and a session not active for [`SESSION_SERIES_TTL`] drops out. They are
//! rebuilt from what the pipeline commits, so they start empty after a restart and fill as
//! sessions are read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};

/// A session not active (no new events, no new usage) for this long loses its series.
pub(crate) const SESSION_SERIES_TTL: Duration = Duration::from_secs(3600);

/// What the series of one session show.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionView {
    pub agent: String,
    pub status: String,
    /// Billed credits by kind (`model`, `sandbox_runtime`), from the latest snapshot applied.
    pub credits: BTreeMap<String, f64>,
    pub budget: Option<f64>,
}

#[derive(Debug)]
struct Entry {
    view: SessionView,
    active_at: Instant,
}

/// The collector; `limit` 0 shows nothing.
#[derive(Debug)]
pub struct SessionSeries {
    limit: AtomicUsize,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    descs: Vec<Desc>,
}

const INFO: &str = "qoder_session_info";
const CREDITS: &str = "qoder_session_credits";
const BUDGET: &str = "qoder_session_budget_credits";
/// Every family these series are in (all gauges).
pub(crate) const GAUGE_NAMES: [&str; 3] = [INFO, CREDITS, BUDGET];

impl SessionSeries {
    pub fn new(limit: usize) -> SessionSeries {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_owned(),
                help.to_owned(),
                labels.iter().map(|l| (*l).to_owned()).collect(),
                HashMap::new(),
            )
            .ok()
        };
        let descs = [
            desc(INFO, "A recently active session; always 1.", &["session_id", "agent", "status"]),
            desc(CREDITS, "A recently active session's billed credits so far (its latest usage snapshot), by kind.", &["session_id", "kind"]),
            desc(BUDGET, "A recently active session's credit budget (budget.max_credit_cost).", &["session_id"]),
        ]
        .into_iter()
        .flatten()
        .collect();
        SessionSeries {
            limit: AtomicUsize::new(limit),
            ttl: SESSION_SERIES_TTL,
            entries: Mutex::new(HashMap::new()),
            descs,
        }
    }

    /// `--metrics.session-series-limit`.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Records what a commit left a session at. `active`: it moved (events or usage) now.
    pub(crate) fn update(&self, session_id: &str, view: SessionView, active: bool) {
        self.update_at(session_id, view, active, Instant::now());
    }

    fn update_at(&self, session_id: &str, view: SessionView, active: bool, now: Instant) {
        let limit = self.limit();
        if limit == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get_mut(session_id) {
            Some(e) => {
                e.view = view;
                if active {
                    e.active_at = now;
                }
            }
            None if active => {
                entries.insert(
                    session_id.to_owned(),
                    Entry {
                        view,
                        active_at: now,
                    },
                );
            }
            None => {}
        }
        // Keep memory bounded too: past twice the limit, forget the least recently active.
        if entries.len() > limit.saturating_mul(2).max(16) {
            let mut by_age: Vec<(Instant, String)> = entries
                .iter()
                .map(|(id, e)| (e.active_at, id.clone()))
                .collect();
            by_age.sort();
            let excess = entries.len() - limit;
            for (_, id) in by_age.into_iter().take(excess) {
                entries.remove(&id);
            }
        }
    }

    /// The sessions shown now: the `limit` most recently active within the TTL.
    fn shown(&self) -> Vec<(String, SessionView)> {
        self.shown_at(Instant::now())
    }

    fn shown_at(&self, now: Instant) -> Vec<(String, SessionView)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut live: Vec<(&String, &Entry)> = entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.active_at) <= self.ttl)
            .collect();
        live.sort_by(|a, b| b.1.active_at.cmp(&a.1.active_at).then(a.0.cmp(b.0)));
        live.truncate(self.limit());
        live.sort_by(|a, b| a.0.cmp(b.0));
        live.into_iter()
            .map(|(id, e)| (id.clone(), e.view.clone()))
            .collect()
    }
}

fn gauge(labels: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    let mut pairs: Vec<proto::LabelPair> = labels
        .iter()
        .map(|(n, v)| {
            let mut p = proto::LabelPair::default();
            p.set_name((*n).to_owned());
            p.set_value((*v).to_owned());
            p
        })
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    m.set_label(pairs);
    let mut g = proto::Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

impl Collector for SessionSeries {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut info = Vec::new();
        let mut credits = Vec::new();
        let mut budget = Vec::new();
        for (id, v) in self.shown() {
            info.push(gauge(
                &[
                    ("session_id", &id),
                    ("agent", &v.agent),
                    ("status", &v.status),
                ],
                1.0,
            ));
            for (kind, c) in &v.credits {
                credits.push(gauge(&[("session_id", &id), ("kind", kind)], *c));
            }
            if let Some(b) = v.budget {
                budget.push(gauge(&[("session_id", &id)], b));
            }
        }
        [(INFO, info), (CREDITS, credits), (BUDGET, budget)]
            .into_iter()
            .zip(&self.descs)
            .filter(|((_, metrics), _)| !metrics.is_empty())
            .map(|((name, metrics), desc)| {
                let mut mf = proto::MetricFamily::default();
                mf.set_name(name.to_owned());
                mf.set_help(desc.help.clone());
                mf.set_field_type(MetricType::GAUGE);
                mf.set_metric(metrics);
                mf
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(model: f64) -> SessionView {
        SessionView {
            agent: "a".into(),
            status: "idle".into(),
            credits: BTreeMap::from([("model".to_owned(), model)]),
            budget: Some(5.0),
        }
    }

    #[test]
    fn only_the_most_recently_active_are_shown() {
        let s = SessionSeries::new(2);
        let t0 = Instant::now();
        for (i, id) in ["s1", "s2", "s3"].iter().enumerate() {
            s.update_at(id, view(1.0), true, t0 + Duration::from_secs(i as u64));
        }
        let at = |secs| t0 + Duration::from_secs(secs);
        let shown =
            |now| -> Vec<String> { s.shown_at(now).into_iter().map(|(id, _)| id).collect() };
        assert_eq!(shown(at(3)), ["s2", "s3"]);
        // s1 is active again: it is shown, the least recent (s2) is not.
        s.update_at("s1", view(2.0), true, at(4));
        assert_eq!(shown(at(5)), ["s1", "s3"]);
        // Past the TTL only what moved since is left.
        assert_eq!(shown(at(4) + SESSION_SERIES_TTL), ["s1"]);
    }

    #[test]
    fn limit_zero_turns_them_off() {
        let off = SessionSeries::new(0);
        off.update("s1", view(1.0), true);
        assert!(off.collect().is_empty());
        let on = SessionSeries::new(10);
        on.update("s1", view(1.0), true);
        on.update("s2", view(2.0), false);
        assert_eq!(on.shown().len(), 1, "a session never active is not shown");
    }
}
