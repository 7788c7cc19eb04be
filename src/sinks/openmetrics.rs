//! The OpenMetrics 1.0.0 text format, served to scrapers that ask for it (every Prometheus
//! does, first), with exemplars on the series that carry them. The classic text format stays
//! byte for byte what it was for the scrapers that do not ask.
//!
//! Against the classic format: `# TYPE` and `# HELP` name a counter without its `_total`, HELP
//! escapes `"` too, `untyped` is `unknown`, an exemplar may follow a counter's `_total` sample
//! or a histogram bucket, and the body ends with `# EOF`. Sample names, labels and values are
//! the same, so Prometheus stores the same series either way (no `_created` series is written:
//! Prometheus 2 would store those as series of their own).

use prometheus::proto::{self, MetricType};

use super::metrics::Exemplar;

/// The content type of an OpenMetrics response.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn push_escaped(out: &mut Vec<u8>, v: &str) {
    for b in v.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'"' => out.extend_from_slice(b"\\\""),
            _ => out.push(b),
        }
    }
}

fn push_value(out: &mut Vec<u8>, v: f64) {
    use std::io::Write;
    if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

fn hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

/// `# TYPE` and `# HELP` of a family (a counter named by its stem, without `_total`; one whose
/// stem is taken is `unknown` under its full name, see [`counter_stem`]).
pub fn header(out: &mut Vec<u8>, name: &str, help: &str, kind: MetricType) {
    let (base, word) = match kind {
        MetricType::COUNTER => match counter_stem(name) {
            Some(stem) => (stem, "counter"),
            None => (name, "unknown"),
        },
        MetricType::GAUGE => (name, "gauge"),
        MetricType::HISTOGRAM => (name, "histogram"),
        MetricType::SUMMARY => (name, "summary"),
        MetricType::UNTYPED => (name, "unknown"),
    };
    out.extend_from_slice(b"# TYPE ");
    out.extend_from_slice(base.as_bytes());
    out.push(b' ');
    out.extend_from_slice(word.as_bytes());
    out.extend_from_slice(b"\n# HELP ");
    out.extend_from_slice(base.as_bytes());
    out.push(b' ');
    push_escaped(out, help);
    out.push(b'\n');
}

/// The name OpenMetrics and OTLP give counter `name`: without its `_total`, unless that stem is
/// another family's name (the per-session gauge `qoder_session_credits` next to the counter
/// `qoder_session_credits_total`), or there is no `_total`. Such a counter keeps its full name:
/// OpenMetrics declares it `unknown` (one name, one family), OTLP sends a sum under the full
/// name (which the Collector's Prometheus translation leaves as it is).
pub(crate) fn counter_stem(name: &str) -> Option<&str> {
    name.strip_suffix("_total")
        .filter(|stem| !super::session_series::GAUGE_NAMES.contains(stem))
}

/// ` # {trace_id="…",span_id="…"} value timestamp`, after a sample's value (the two ids are 63
/// characters of labels, inside the limit of 128).
pub fn exemplar(out: &mut Vec<u8>, e: &Exemplar) {
    out.extend_from_slice(b" # {trace_id=\"");
    hex(out, &e.trace_id);
    out.extend_from_slice(b"\",span_id=\"");
    hex(out, &e.span_id);
    out.extend_from_slice(b"\"} ");
    push_value(out, e.value);
    if let Some(ns) = e.time_ns.filter(|t| *t > 0) {
        use std::io::Write;
        let _ = write!(out, " {}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    }
}

fn sample(
    out: &mut Vec<u8>,
    name: &str,
    suffix: &str,
    labels: &[proto::LabelPair],
    extra: Option<(&str, &str)>,
    v: f64,
) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
    let mut first = true;
    for (k, val) in pairs {
        out.push(if first { b'{' } else { b',' });
        first = false;
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"=\"");
        push_escaped(out, val);
        out.push(b'"');
    }
    if !first {
        out.push(b'}');
    }
    out.push(b' ');
    push_value(out, v);
    out.push(b'\n');
}

/// One gathered family (the process's own metrics: no exemplars).
pub(crate) fn write_family(out: &mut Vec<u8>, f: &proto::MetricFamily) {
    if f.get_metric().is_empty() {
        return;
    }
    let kind = f.get_field_type();
    header(out, f.name(), f.help(), kind);
    let name = f.name();
    for m in f.get_metric() {
        let labels = m.get_label();
        match kind {
            MetricType::COUNTER => sample(out, name, "", labels, None, m.get_counter().value()),
            MetricType::GAUGE => sample(out, name, "", labels, None, m.get_gauge().value()),
            MetricType::UNTYPED => sample(out, name, "", labels, None, m.untyped.value()),
            MetricType::HISTOGRAM => {
                let h = m.get_histogram();
                let mut inf_written = false;
                for b in h.get_bucket() {
                    let bound = b.upper_bound();
                    let le = if bound.is_infinite() {
                        inf_written = true;
                        "+Inf".to_owned()
                    } else {
                        bound.to_string()
                    };
                    #[allow(clippy::cast_precision_loss, reason = "a count")]
                    let n = b.cumulative_count() as f64;
                    sample(out, name, "_bucket", labels, Some(("le", &le)), n);
                }
                #[allow(clippy::cast_precision_loss, reason = "a count")]
                let count = h.get_sample_count() as f64;
                if !inf_written {
                    sample(out, name, "_bucket", labels, Some(("le", "+Inf")), count);
                }
                sample(out, name, "_sum", labels, None, h.get_sample_sum());
                sample(out, name, "_count", labels, None, count);
            }
            MetricType::SUMMARY => {
                let s = m.get_summary();
                for q in s.get_quantile() {
                    let quantile = q.quantile().to_string();
                    sample(
                        out,
                        name,
                        "",
                        labels,
                        Some(("quantile", &quantile)),
                        q.value(),
                    );
                }
                sample(out, name, "_sum", labels, None, s.sample_sum());
                #[allow(clippy::cast_precision_loss, reason = "a count")]
                sample(out, name, "_count", labels, None, s.sample_count() as f64);
            }
        }
    }
}

/// The end of every OpenMetrics body.
pub(crate) const EOF: &[u8] = b"# EOF\n";
