//! `--log.format logfmt`: `ts=… level=… target=… msg="…" key=value`, one event a line, the
//! format of the Prometheus exporters' logs (what Loki's and Grafana's logfmt parsers read).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The logfmt event formatter.
#[derive(Debug, Default, Clone, Copy)]
pub struct Logfmt;

/// A value as logfmt wants it: bare when it can be, else quoted with `"` and `\` escaped and
/// control characters written as escapes (a value never breaks the line).
fn value(s: &str) -> String {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=');
    if bare {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, v: &str) {
        if field.name() == "message" {
            self.message = v.to_owned();
        } else {
            self.pairs.push((field.name(), v.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        self.record_str(field, &format!("{v:?}"));
    }
}

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        write!(
            w,
            "ts={ts} level={} target={} msg={}",
            meta.level().as_str().to_ascii_lowercase(),
            value(meta.target()),
            value(&fields.message)
        )?;
        for (k, v) in fields.pairs {
            write!(w, " {k}={}", value(&v))?;
        }
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bare_or_quoted_and_never_break_the_line() {
        assert_eq!(value("sess_1"), "sess_1");
        assert_eq!(value("two words"), "\"two words\"");
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(
            value("say \"hi\"\nforged=1"),
            "\"say \\\"hi\\\"\\nforged=1\""
        );
        assert_eq!(value(""), "\"\"");
    }
}
