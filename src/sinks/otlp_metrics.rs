//! Metrics over OTLP: every family `/metrics` serves, pushed on an interval with the same values.
//!
//! The push reads what a scrape reads (the registry and the durable families, gathered as
//! Prometheus families) and converts it, so the two cannot disagree. Names and units are chosen
//! so that an OpenTelemetry Collector's Prometheus exporter, with its default name translation,
//! gives back the `/metrics` names: a counter loses `_total` (re-added for a monotonic sum)
//! unless that would give it another family's name, a `_seconds` or `_bytes` suffix becomes the
//! unit `s` or `By` (re-added from the unit).
//!
//! Start times: the event-derived (durable) families count since the state file was created,
//! and that time is kept in the state file, so a restart continues the same cumulative series;
//! the process's own families count since the process started.
//!
//! Delivery: a cumulative push carries the totals, so a failed push loses nothing (the next one
//! carries the same totals, and more); there is no queue, and an endpoint that is down costs no
//! memory. With delta temporality, what changed is measured from the last push the endpoint
//! accepted, so a failed push is folded into the next one; a restart starts from the totals at
//! startup (a crash loses the changes since the last accepted push; a SIGTERM pushes once more
//! before exit).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Exemplar, Gauge, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exemplar, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::proto::{self as prom, MetricType};

use crate::config::Temporality;
use crate::event::unix_nanos;
use crate::sinks::drain::StopSignal;
use crate::sinks::metrics::{DurableMetrics, Family, Metrics};
use crate::sinks::otlp_send::{OtlpSender, SendError};

/// When each kind of series started counting, in Unix nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// The event-derived families: when the state file was created (kept in it).
    pub durable: u64,
    /// Everything else: when this process started.
    pub process: u64,
}

/// The OTLP name and unit for a Prometheus family (see the module documentation).
pub(crate) fn otlp_name(prom_name: &str, kind: MetricType) -> (&str, &'static str) {
    let name = match kind {
        MetricType::COUNTER => super::openmetrics::counter_stem(prom_name).unwrap_or(prom_name),
        _ => prom_name,
    };
    for (suffix, unit) in [("_seconds", "s"), ("_bytes", "By")] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return (stem, unit);
        }
    }
    (name, "")
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

/// A series' identity across pushes: the family and its label pairs, in name order.
type SeriesId = (String, Vec<(String, String)>);

/// What a series had reached at the last accepted push (delta temporality).
#[derive(Debug, Clone, PartialEq)]
pub enum Reached {
    Counter(f64),
    Histogram { counts: Vec<u64>, sum: f64 },
}

/// The totals of the last accepted push, and when it was taken (delta temporality).
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    at: u64,
    series: BTreeMap<SeriesId, Reached>,
    /// The durable relabels (agent id → name) this baseline's series reflect.
    relabels_seen: usize,
}

impl Baseline {
    /// This baseline with the durable series of `moves` (agent `from` → `to`, in order) moved
    /// as the metrics moved them: what was pushed under the id counts as pushed under the
    /// name, so the next delta of the name's series is only what is new.
    fn relabelled(&self, moves: &[(String, String)], durable: &HashSet<&str>) -> Baseline {
        let mut series = self.series.clone();
        for (from, to) in moves {
            let from_agent = ("agent".to_owned(), from.clone());
            let moving: Vec<SeriesId> = series
                .keys()
                .filter(|(name, labels)| {
                    durable.contains(name.as_str()) && labels.contains(&from_agent)
                })
                .cloned()
                .collect();
            for id in moving {
                let Some(reached) = series.remove(&id) else {
                    continue;
                };
                let (name, mut labels) = id;
                for pair in &mut labels {
                    if *pair == from_agent {
                        pair.1.clone_from(to);
                    }
                }
                let merged = match (series.remove(&(name.clone(), labels.clone())), reached) {
                    (Some(Reached::Counter(a)), Reached::Counter(b)) => {
                        Reached::Counter(micro_diff(a + b, 0.0))
                    }
                    (
                        Some(Reached::Histogram { counts: a, sum: sa }),
                        Reached::Histogram { counts: b, sum: sb },
                    ) if a.len() == b.len() => Reached::Histogram {
                        counts: a.iter().zip(&b).map(|(x, y)| x + y).collect(),
                        sum: micro_diff(sa + sb, 0.0),
                    },
                    (_, reached) => reached,
                };
                series.insert((name, labels), merged);
            }
        }
        Baseline {
            at: self.at,
            series,
            relabels_seen: self.relabels_seen + moves.len(),
        }
    }
}

/// Counters in the durable families are exact to a millionth; differences are taken in those
/// units so that a delta sums back to the exact total.
fn micro_diff(now: f64, before: f64) -> f64 {
    ((now * 1e6).round() - (before * 1e6).round()) / 1e6
}

/// Builds one push from gathered Prometheus families.
#[derive(Debug)]
pub struct Conversion<'a> {
    pub starts: StartTimes,
    pub now: u64,
    pub temporality: Temporality,
    /// Delta: the last accepted push (read; relabelled when the series moved since), and
    /// the totals of this one (written).
    baseline: Cow<'a, Baseline>,
    reached: BTreeMap<SeriesId, Reached>,
    pub points: u64,
    durable: HashSet<&'static str>,
    /// Where the durable series' exemplars come from.
    exemplars: Option<&'a DurableMetrics>,
}

impl<'a> Conversion<'a> {
    pub fn new(
        starts: StartTimes,
        now: u64,
        temporality: Temporality,
        baseline: &'a Baseline,
    ) -> Conversion<'a> {
        Conversion {
            starts,
            now,
            temporality,
            baseline: Cow::Borrowed(baseline),
            reached: BTreeMap::new(),
            points: 0,
            durable: Family::ALL.iter().map(|f| f.name()).collect(),
            exemplars: None,
        }
    }

    /// The baseline of the next delta, once this push is accepted.
    pub fn accepted(self) -> Baseline {
        Baseline {
            at: self.now,
            series: self.reached,
            relabels_seen: self.baseline.relabels_seen,
        }
    }

    /// The exemplar of a series, as OTLP has it.
    fn exemplars(&self, (family, labels): &SeriesId) -> Vec<Exemplar> {
        let Some(e) = self.exemplars.and_then(|d| d.exemplar_of(family, labels)) else {
            return Vec::new();
        };
        vec![Exemplar {
            time_unix_nano: e
                .time_ns
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(self.now),
            trace_id: e.trace_id.to_vec(),
            span_id: e.span_id.to_vec(),
            value: Some(exemplar::Value::AsDouble(e.value)),
            ..Exemplar::default()
        }]
    }

    fn temporality(&self) -> i32 {
        match self.temporality {
            Temporality::Cumulative => AggregationTemporality::Cumulative as i32,
            Temporality::Delta => AggregationTemporality::Delta as i32,
        }
    }

    /// The start of a cumulative series, or of a delta: the last accepted push (or, for a
    /// series new since then, the same: it was zero then).
    fn start(&self, family: &str) -> u64 {
        match self.temporality {
            Temporality::Delta if self.baseline.at > 0 => self.baseline.at,
            _ if self.durable.contains(family) => self.starts.durable,
            _ => self.starts.process,
        }
    }

    /// Converts one family; `None` for a family without series or of a kind OTLP metrics
    /// from this exporter never have (summaries).
    pub fn family(&mut self, f: &prom::MetricFamily) -> Option<Metric> {
        let kind = f.get_field_type();
        let (name, unit) = otlp_name(f.name(), kind);
        let start = self.start(f.name());
        let data = match kind {
            MetricType::COUNTER => {
                let mut points = Vec::new();
                for m in f.get_metric() {
                    let id = series_id(f.name(), m);
                    let total = m.get_counter().value();
                    let value = match (self.temporality, self.baseline.series.get(&id)) {
                        (Temporality::Delta, Some(Reached::Counter(before)))
                            if total >= *before =>
                        {
                            micro_diff(total, *before)
                        }
                        _ => total,
                    };
                    if self.temporality == Temporality::Delta {
                        self.reached.insert(id.clone(), Reached::Counter(total));
                    }
                    let mut point = self.number_point(&id, start, value);
                    point.exemplars = self.exemplars(&id);
                    points.push(point);
                }
                metric::Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: self.temporality(),
                    is_monotonic: true,
                })
            }
            MetricType::GAUGE | MetricType::UNTYPED => {
                let points = f
                    .get_metric()
                    .iter()
                    .map(|m| {
                        let id = series_id(f.name(), m);
                        let v = if kind == MetricType::GAUGE {
                            m.get_gauge().value()
                        } else {
                            m.untyped.value()
                        };
                        let mut p = self.number_point(&id, 0, v);
                        p.start_time_unix_nano = 0;
                        p
                    })
                    .collect();
                metric::Data::Gauge(Gauge {
                    data_points: points,
                })
            }
            MetricType::HISTOGRAM => {
                let mut points = Vec::new();
                for m in f.get_metric() {
                    let id = series_id(f.name(), m);
                    let h = m.get_histogram();
                    let (bounds, counts) = bucket_counts(h);
                    let sum = h.get_sample_sum();
                    let (counts_out, sum_out) =
                        match (self.temporality, self.baseline.series.get(&id)) {
                            (
                                Temporality::Delta,
                                Some(Reached::Histogram {
                                    counts: before,
                                    sum: before_sum,
                                }),
                            ) if before.len() == counts.len()
                                && before.iter().zip(&counts).all(|(b, c)| c >= b) =>
                            {
                                (
                                    counts.iter().zip(before).map(|(c, b)| c - b).collect(),
                                    micro_diff(sum, *before_sum),
                                )
                            }
                            _ => (counts.clone(), sum),
                        };
                    if self.temporality == Temporality::Delta {
                        self.reached
                            .insert(id.clone(), Reached::Histogram { counts, sum });
                    }
                    self.points += 1;
                    points.push(HistogramDataPoint {
                        exemplars: self.exemplars(&id),
                        attributes: attributes(&id),
                        start_time_unix_nano: start,
                        time_unix_nano: self.now,
                        count: counts_out.iter().sum(),
                        sum: Some(sum_out),
                        bucket_counts: counts_out,
                        explicit_bounds: bounds,
                        ..HistogramDataPoint::default()
                    });
                }
                metric::Data::Histogram(Histogram {
                    data_points: points,
                    aggregation_temporality: self.temporality(),
                })
            }
            _ => return None,
        };
        Some(Metric {
            name: name.to_owned(),
            description: f.help().to_owned(),
            unit: unit.to_owned(),
            data: Some(data),
            ..Metric::default()
        })
    }

    fn number_point(&mut self, id: &SeriesId, start: u64, value: f64) -> NumberDataPoint {
        self.points += 1;
        NumberDataPoint {
            attributes: attributes(id),
            start_time_unix_nano: start,
            time_unix_nano: self.now,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..NumberDataPoint::default()
        }
    }
}

fn series_id(family: &str, m: &prom::Metric) -> SeriesId {
    let mut labels: Vec<(String, String)> = m
        .get_label()
        .iter()
        .map(|l| (l.name().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (family.to_owned(), labels)
}

fn attributes((_, labels): &SeriesId) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| string_kv(k, v)).collect()
}

/// Prometheus buckets are cumulative and leave `+Inf` implicit; OTLP's are per bucket with
/// the overflow bucket last.
fn bucket_counts(h: &prom::Histogram) -> (Vec<f64>, Vec<u64>) {
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    let mut below = 0u64;
    for b in h.get_bucket() {
        if !b.upper_bound().is_finite() {
            continue;
        }
        bounds.push(b.upper_bound());
        counts.push(b.cumulative_count().saturating_sub(below));
        below = b.cumulative_count();
    }
    counts.push(h.get_sample_count().saturating_sub(below));
    (bounds, counts)
}

/// Everything `/metrics` serves, as one OTLP request (and the series totals, for delta).
pub fn request<'a>(
    metrics: &'a Metrics,
    resource: &Resource,
    conv: &mut Conversion<'a>,
) -> ExportMetricsServiceRequest {
    let mut families = metrics.registry.gather();
    let (durable, moved) = metrics.durable.collect_since(conv.baseline.relabels_seen);
    families.extend(durable);
    if !moved.is_empty() {
        conv.baseline = Cow::Owned(conv.baseline.relabelled(&moved, &conv.durable));
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
    conv.exemplars = Some(&metrics.durable);
    let out: Vec<Metric> = families.iter().filter_map(|f| conv.family(f)).collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "qoder-exporter".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                metrics: out,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

/// The resource every signal is reported under, as OTLP attributes (the spans' resource).
pub(crate) fn proto_resource(r: &opentelemetry_sdk::Resource) -> Resource {
    let mut attributes: Vec<KeyValue> = r
        .iter()
        .map(|(k, v)| string_kv(k.as_str(), &v.as_str()))
        .collect();
    attributes.sort_by(|a, b| a.key.cmp(&b.key));
    Resource {
        attributes,
        ..Resource::default()
    }
}

/// Pushes the metrics every `interval` until stopped, then once more.
#[derive(Debug)]
pub(crate) struct MetricsPusher {
    pub sender: OtlpSender,
    pub metrics: Metrics,
    pub resource: Resource,
    pub starts: StartTimes,
    pub interval: Duration,
    pub temporality: Temporality,
}

impl MetricsPusher {
    /// Where the first delta starts: the totals now (cumulative: nothing). Taken before the
    /// pipeline counts anything, so what it counts from here is in a delta; what was counted
    /// before was pushed by the last run (or lost with a crash).
    pub fn first_baseline(&self) -> Baseline {
        let baseline = Baseline::default();
        if self.temporality == Temporality::Cumulative {
            return baseline;
        }
        let now = unix_nanos(SystemTime::now());
        let mut conv = Conversion::new(self.starts, now, self.temporality, &baseline);
        let _ = request(&self.metrics, &self.resource, &mut conv);
        conv.accepted()
    }

    /// Pushes every interval until `stop` is asked for (only once the pipeline has committed
    /// everything it was sent); then the final totals, by the stop's deadline. A
    /// push in flight is finished, not cut, unless the deadline passes: a delta cut after the
    /// endpoint took it would be sent again.
    pub async fn run(self, mut baseline: Baseline, stop: StopSignal) {
        let mut failing = false;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => break,
            }
            if stop
                .finish(self.push(&mut baseline, &mut failing))
                .await
                .is_none()
            {
                break;
            }
        }
        if stop
            .finish(self.push(&mut baseline, &mut failing))
            .await
            .is_none()
        {
            tracing::warn!(endpoint = %self.sender.endpoint(), "the last metrics push did not finish before exit");
        }
    }

    /// One push; returns whether the endpoint accepted it.
    pub async fn push(&self, baseline: &mut Baseline, failing: &mut bool) -> bool {
        let now = unix_nanos(SystemTime::now());
        let mut conv = Conversion::new(self.starts, now, self.temporality, baseline);
        let req = request(&self.metrics, &self.resource, &mut conv);
        let points = conv.points;
        let p = &self.metrics.process;
        let advance = match self.sender.metrics(req).await {
            Ok(accepted) => {
                p.otlp_exported
                    .with_label_values(&["metrics"])
                    .inc_by(points.saturating_sub(accepted.rejected));
                if accepted.rejected > 0 {
                    tracing::warn!(endpoint = %self.sender.endpoint(), rejected = accepted.rejected,
                        message = %accepted.message, "the OTLP endpoint dropped some metric data points");
                    p.otlp_dropped
                        .with_label_values(&["metrics", "rejected"])
                        .inc_by(accepted.rejected);
                }
                #[allow(clippy::cast_precision_loss, reason = "Unix seconds")]
                p.otlp_last_success
                    .with_label_values(&["metrics"])
                    .set(now as f64 / 1e9);
                if std::mem::take(failing) {
                    tracing::info!(endpoint = %self.sender.endpoint(), "OTLP endpoint accepts metrics again");
                }
                true
            }
            Err(SendError::Rejected(m)) => {
                p.otlp_export_failures.with_label_values(&["metrics"]).inc();
                p.otlp_dropped
                    .with_label_values(&["metrics", "rejected"])
                    .inc_by(points);
                tracing::warn!(endpoint = %self.sender.endpoint(), error = %m, points,
                    "the OTLP endpoint refused a metrics push as malformed");
                // Sending the same totals again cannot help; a delta moves past them.
                true
            }
            Err(SendError::Failed(m)) => {
                p.otlp_export_failures.with_label_values(&["metrics"]).inc();
                if !std::mem::replace(failing, true) {
                    tracing::warn!(endpoint = %self.sender.endpoint(), error = %m,
                        "OTLP metrics push failed; the next push carries the same totals");
                } else {
                    tracing::debug!(endpoint = %self.sender.endpoint(), error = %m, "OTLP metrics push failed again");
                }
                false
            }
        };
        if advance && self.temporality == Temporality::Delta {
            *baseline = conv.accepted();
        }
        advance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::metrics::{Delta, Exposition};

    /// Metrics with a series in every durable family, a session's gauges, and the OTLP
    /// delivery families.
    fn every_family() -> Metrics {
        let m = Metrics::new().expect("metrics");
        m.process.otlp_signal_on(&m.registry, "metrics");
        m.process.otlp_signal_on(&m.registry, "logs");
        let mut d = Delta::default();
        for f in Family::ALL {
            let labels = vec!["x"; f.label_names().len()];
            match f.buckets() {
                Some(_) => d.observe_ns(f, &labels, 1_000_000),
                None => d.inc(f, &labels, 1.0),
            }
        }
        m.durable.publish(m.durable.stage(&d));
        m.sessions.set_limit(10);
        let view = crate::sinks::session_series::SessionView {
            agent: "coder".into(),
            status: "running".into(),
            credits: [("model".to_owned(), 1.5)].into(),
            budget: Some(10.0),
        };
        m.sessions.update("sess_1", view, true);
        m
    }

    #[test]
    fn every_family_has_a_name_of_its_own_in_openmetrics_and_in_otlp() {
        let m = every_family();
        let (body, _) = m.render(Exposition::OpenMetrics);
        let body = String::from_utf8(body).expect("utf-8");
        let mut declared: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(
            declared.contains(&"qoder_session_credits"),
            "the gauge is there"
        );
        assert!(
            declared.contains(&"qoder_session_credits_total"),
            "the counter too"
        );
        let n = declared.len();
        declared.sort_unstable();
        declared.dedup();
        assert_eq!(declared.len(), n, "a family declared twice:\n{body}");
        let base = Baseline::default();
        let mut conv = Conversion::new(
            StartTimes {
                durable: 1,
                process: 1,
            },
            2,
            Temporality::Cumulative,
            &base,
        );
        let req = request(&m, &Resource::default(), &mut conv);
        let mut names: Vec<&str> = req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|x| x.name.as_str())
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "two OTLP metrics share a name: {names:?}");
    }

    #[test]
    fn names_come_back_through_the_collectors_translation() {
        assert_eq!(
            otlp_name("qoder_credits_total", MetricType::COUNTER),
            ("qoder_credits", "")
        );
        assert_eq!(
            otlp_name("qoder_session_active_seconds_total", MetricType::COUNTER),
            ("qoder_session_active", "s")
        );
        assert_eq!(
            otlp_name("qoder_turn_duration_seconds", MetricType::HISTOGRAM),
            ("qoder_turn_duration", "s")
        );
        assert_eq!(
            otlp_name("process_resident_memory_bytes", MetricType::GAUGE),
            ("process_resident_memory", "By")
        );
        assert_eq!(otlp_name("qoder_up", MetricType::GAUGE), ("qoder_up", ""));
    }

    fn metrics_with(n: f64) -> Metrics {
        let m = Metrics::new().expect("metrics");
        let mut d = Delta::default();
        d.inc(Family::Credits, &["coder", "qwen"], n);
        d.observe_ns(Family::TurnDuration, &["coder"], 3_000_000_000);
        d.observe_ns(Family::TurnDuration, &["coder"], 7_200_000_000_000);
        d.inc(Family::ModelRequests, &["coder", "qwen"], 1.0);
        let at = crate::outcome::Example {
            session_id: "s",
            trace_key: "t",
            span_event_id: "e",
            time_ns: Some(77),
        };
        d.exemplar(Family::ModelRequests, &["coder", "qwen"], at, 1.0);
        m.durable.publish(m.durable.stage(&d));
        m
    }

    fn find<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> &'a metric::Data {
        req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.data.as_ref())
            .unwrap_or_else(|| panic!("{name} pushed"))
    }

    #[test]
    fn a_cumulative_push_carries_the_stored_start_and_per_bucket_counts() {
        let m = metrics_with(1.25);
        let starts = StartTimes {
            durable: 1_000,
            process: 2_000,
        };
        let base = Baseline::default();
        let mut conv = Conversion::new(starts, 9_000, Temporality::Cumulative, &base);
        let req = request(&m, &Resource::default(), &mut conv);
        let metric::Data::Sum(credits) = find(&req, "qoder_credits") else {
            panic!("a sum")
        };
        assert!(credits.is_monotonic);
        let p = &credits.data_points[0];
        assert_eq!(p.start_time_unix_nano, 1_000, "the durable start");
        assert_eq!(p.value, Some(number_data_point::Value::AsDouble(1.25)));
        let metric::Data::Histogram(turns) = find(&req, "qoder_turn_duration") else {
            panic!("a histogram")
        };
        let h = &turns.data_points[0];
        assert_eq!(h.count, 2);
        assert_eq!(h.bucket_counts.len(), h.explicit_bounds.len() + 1);
        assert_eq!(
            h.bucket_counts.last(),
            Some(&1),
            "two hours: past the last bound"
        );
        assert_eq!(h.bucket_counts.iter().sum::<u64>(), 2);
        let metric::Data::Sum(model) = find(&req, "qoder_model_requests") else {
            panic!("a sum")
        };
        let e = &model.data_points[0].exemplars;
        assert_eq!(e.len(), 1, "the model request's exemplar");
        assert_eq!(
            e[0].trace_id,
            crate::sinks::traces::trace_id("s", "t").to_bytes().to_vec()
        );
        assert_eq!(e[0].time_unix_nano, 77);
        assert!(
            credits.data_points[0].exemplars.is_empty(),
            "credits carry none"
        );
        let metric::Data::Sum(requests) = find(&req, "qoder_exporter_api_requests") else {
            panic!("a sum")
        };
        assert_eq!(
            requests.data_points[0].start_time_unix_nano, 2_000,
            "a process counter starts with the process"
        );
    }

    #[test]
    fn deltas_sum_back_to_the_total_and_a_failed_push_folds_into_the_next() {
        let m = metrics_with(0.1);
        let starts = StartTimes {
            durable: 1,
            process: 1,
        };
        let mut base = Baseline::default();
        let credits = |req: &ExportMetricsServiceRequest| {
            let metric::Data::Sum(s) = find(req, "qoder_credits") else {
                panic!("sum")
            };
            assert_eq!(
                s.aggregation_temporality,
                AggregationTemporality::Delta as i32
            );
            match s.data_points[0].value {
                Some(number_data_point::Value::AsDouble(v)) => v,
                _ => panic!("double"),
            }
        };
        let mut sum = 0.0;
        for (round, accepted) in [(1, true), (2, false), (3, true), (4, true)] {
            if round > 1 {
                let mut d = Delta::default();
                d.inc(Family::Credits, &["coder", "qwen"], 0.2);
                m.durable.publish(m.durable.stage(&d));
            }
            let mut conv = Conversion::new(starts, round * 10, Temporality::Delta, &base);
            let req = request(&m, &Resource::default(), &mut conv);
            let v = credits(&req);
            if accepted {
                sum += v;
                base = conv.accepted();
            }
        }
        assert!((sum - 0.7).abs() < 1e-12, "{sum}");
        assert!((m.durable.counter(Family::Credits, &["coder", "qwen"]) - 0.7).abs() < 1e-12);
    }
}

/// Delta temporality across a relabel.
#[cfg(test)]
mod relabel_tests {
    use super::*;
    use crate::sinks::metrics::Delta;

    fn sum_points(req: &ExportMetricsServiceRequest, name: &str) -> Vec<(String, f64)> {
        let Some(metric::Data::Sum(s)) = req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.data.as_ref())
        else {
            return Vec::new();
        };
        s.data_points
            .iter()
            .map(|p| {
                let agent = p
                    .attributes
                    .iter()
                    .find(|a| a.key == "agent")
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                let v = match p.value {
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    _ => f64::NAN,
                };
                (agent, v)
            })
            .collect()
    }

    /// Σ of every delta pushed must equal the total counted.
    #[test]
    fn deltas_sum_to_the_total_across_an_agent_id_to_name_relabel() {
        let m = Metrics::new().expect("metrics");
        let starts = StartTimes {
            durable: 1,
            process: 1,
        };
        let mut base = Baseline::default();
        let mut pushed = 0.0;
        let push = |m: &Metrics, base: &mut Baseline, at: u64| {
            let mut conv = Conversion::new(starts, at, Temporality::Delta, base);
            let req = request(m, &Resource::default(), &mut conv);
            let pts = sum_points(&req, "qoder_model_requests");
            *base = conv.accepted();
            pts.iter().map(|(_, v)| v).sum::<f64>()
        };
        // One request under the agent's id, one under its name: both pushed.
        let mut d = Delta::default();
        d.inc(Family::ModelRequests, &["agent_7", "qwen"], 1.0);
        d.inc(Family::ModelRequests, &["triage", "qwen"], 1.0);
        m.durable.publish(m.durable.stage(&d));
        pushed += push(&m, &mut base, 10);
        // The id's name is learned: its series move to the name (the pipeline's learn_agent).
        let r = m.durable.stage_relabel("agent_7", "triage");
        m.durable.publish_relabel(r);
        pushed += push(&m, &mut base, 20);
        let total = m.durable.total(Family::ModelRequests);
        assert_eq!(pushed, total, "Σ deltas = total");
    }
}
