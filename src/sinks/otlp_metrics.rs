//! Metrics over OTLP: every family `/metrics` serves, pushed on an interval with the same values.
//!
//! The push reads what a scrape reads (the registry and the durable families, gathered as
//! Prometheus families) and converts it, so the two cannot disagree. Names and units are chosen
//! so that an OpenTelemetry Collector's Prometheus exporter, with its default name translation,
//! gives back the `/metrics` names: a counter loses `_total` (re-added for a monotonic sum), a
//! `_seconds` or `_bytes` suffix becomes the unit `s` or `By` (re-added from the unit).
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
use tokio_util::sync::CancellationToken;

use crate::config::Temporality;
use crate::event::unix_nanos;
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
        MetricType::COUNTER => prom_name.strip_suffix("_total").unwrap_or(prom_name),
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
#[derive(Debug, Default)]
pub struct Baseline {
    at: u64,
    series: BTreeMap<SeriesId, Reached>,
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
    /// Delta: the last accepted push (read), and the totals of this one (written).
    pub baseline: &'a Baseline,
    pub reached: BTreeMap<SeriesId, Reached>,
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
            baseline,
            reached: BTreeMap::new(),
            points: 0,
            durable: Family::ALL.iter().map(|f| f.name()).collect(),
            exemplars: None,
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
    families.extend(prometheus::core::Collector::collect(&*metrics.durable));
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
    pub async fn run(self, stop: CancellationToken, flush_within: Duration) {
        let mut baseline = Baseline::default();
        if self.temporality == Temporality::Delta {
            // Counted before this start was pushed by the last run (or lost with a crash):
            // deltas start from the totals at startup.
            let mut conv = Conversion::new(
                self.starts,
                unix_nanos(SystemTime::now()),
                self.temporality,
                &baseline,
            );
            let _ = request(&self.metrics, &self.resource, &mut conv);
            let (at, reached) = (conv.now, conv.reached);
            baseline = Baseline {
                at,
                series: reached,
            };
        }
        let mut failing = false;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            self.push(&mut baseline, &mut failing).await;
        }
        // Stopping: the pipeline has committed its last batch; push the final totals.
        if tokio::time::timeout(flush_within, self.push(&mut baseline, &mut failing))
            .await
            .is_err()
        {
            tracing::warn!(endpoint = %self.sender.endpoint(), "the last metrics push did not finish before exit");
        }
    }

    /// One push; returns whether the endpoint accepted it.
    pub async fn push(&self, baseline: &mut Baseline, failing: &mut bool) -> bool {
        let now = unix_nanos(SystemTime::now());
        let mut conv = Conversion::new(self.starts, now, self.temporality, baseline);
        let req = request(&self.metrics, &self.resource, &mut conv);
        let (points, reached) = (conv.points, conv.reached);
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
            *baseline = Baseline {
                at: now,
                series: reached,
            };
        }
        advance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::metrics::Delta;

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
        let at = crate::sinks::metrics::ExampleAt {
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
                base = Baseline {
                    at: round * 10,
                    series: conv.reached,
                };
            }
        }
        assert!((sum - 0.7).abs() < 1e-12, "{sum}");
        assert!((m.durable.counter(Family::Credits, &["coder", "qwen"]) - 0.7).abs() < 1e-12);
    }
}
