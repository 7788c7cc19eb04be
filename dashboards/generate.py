#!/usr/bin/env python3
"""Generates the Grafana dashboards (and the Kubernetes PrometheusRule) from one source.

    python3 dashboards/generate.py          # write dashboards/*.json and deploy/kubernetes/base/prometheusrule.yaml
    python3 dashboards/generate.py --check  # fail if the committed files differ from what this writes

Dashboards use the classic JSON model: fixed uid, datasource/job/agent template variables,
a unit on every panel, $__rate_interval in every rate. Panels that show an agent, model or
error type link to a trace search (TraceQL) for exactly what they show.

The alerts' runbook_url values come from RUNBOOK_BASE_URL below (or the environment variable
QODER_RUNBOOK_BASE_URL): this script rewrites them in deploy/prometheus/rules.yml and in the rule
tests (tests/rules/*.yml), and --check fails when they differ, when an alert has no section in
docs/runbooks.md, lacks severity/class labels, lacks `for:` without being listed as immediate
below, or has no promtool test.
"""
import json
import os
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEL = 'job=~"$job", agent=~"$agent"'
J = 'job=~"$job"'

# The one place the runbooks' address is written: every alert's runbook_url is this + "#" + the
# alert name in lower case (the GitHub anchor of its "## Name" section in docs/runbooks.md).
RUNBOOK_BASE_URL = os.environ.get(
    "QODER_RUNBOOK_BASE_URL", "https://github.com/qoder-exporter/qoder-exporter/blob/main/docs/runbooks.md")

RULES = ROOT / "deploy/prometheus/rules.yml"
RUNBOOKS = ROOT / "docs/runbooks.md"
RULE_TESTS = sorted((ROOT / "tests/rules").glob("*.yml"))
ALERTMANAGER = ROOT / "deploy/alertmanager/alertmanager.yml"

# Alerts without `for:` on purpose (each says why in rules.yml): a counted event the API already
# reported; the expression stays true for its whole window, so `for:` would only delay it.
IMMEDIATE = {"QoderSessionRetriesExhausted", "QoderSessionTerminalErrors", "QoderSpansDropped"}
SEVERITIES = {"critical", "warning", "info"}
CLASSES = {"exporter", "data"}


def new_or_increase(selector, window, job=J):
    """What a counter added over `window`, counting series born inside it in full.

    A labelled counter series is born with its first value (often 1) and increase() over a
    series whose samples all carry that value is 0. A series with fewer samples in the window
    than its exporter has successful scrapes (qoder_exporter_build_info is in every one) was
    absent from one and is new. See the header of deploy/prometheus/rules.yml."""
    return (f"({selector} and count_over_time({selector}[{window}]) < on (job, instance) group_left "
            f"sum by (job, instance) (count_over_time(qoder_exporter_build_info{{{job}}}[{window}]))) "
            f"or increase({selector}[{window}])")

# Explore link into the trace datasource: spans carry the same agent/model/error values the
# metrics use as labels (see README, "From metrics to traces").
def trace_link(title, traceql):
    query = json.dumps({"datasource": "${traces}", "queries": [{"refId": "A", "queryType": "traceql", "query": traceql}], "range": {"from": "${__from}", "to": "${__to}"}})
    return {"title": title, "url": "/explore?left=" + query.replace('"', "%22").replace(" ", "%20"), "targetBlank": True}

AGENT_TRACES = trace_link("Traces of this agent", '{ span.gen_ai.agent.name = "${__field.labels.agent}" }')
MODEL_TRACES = trace_link("Model requests of this model", '{ span.gen_ai.request.model = "${__field.labels.model}" && span.gen_ai.operation.name = "chat" }')
ERROR_TRACES = trace_link("Turns that failed with this error", '{ span.error.type = "${__field.labels.error_type}" }')
STOP_TRACES = trace_link("Turns that ended this way", '{ span.qoder.stop_reason = "${__field.labels.stop_reason}" }')
TOOL_TRACES = trace_link("Calls of this tool", '{ span.gen_ai.tool.name = "${__field.labels.tool}" }')


class Board:
    def __init__(self, uid, title, tags):
        self.uid, self.title, self.tags = uid, title, tags
        self.panels, self.y, self.next_id = [], 0, 1

    def row(self, title):
        self.panels.append({"type": "row", "title": title, "id": self.next_id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1
        self.x = 0

    def panel(self, title, kind, targets, unit, w=12, h=8, links=None, description="", overrides=None, stack=False, thresholds=None):
        if self.x + w > 24:
            self.x = 0
            self.y += h
        p = {
            "type": kind, "title": title, "id": self.next_id, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, "links": links or []}, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}, "tooltip": {"mode": "multi"}} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        }
        if stack:
            p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
        if thresholds:
            p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
        self.panels.append(p)
        self.next_id += 1
        self.x += w
        if self.x >= 24:
            self.x = 0
            self.y += h

    def json(self, variables):
        return {
            "uid": self.uid, "title": self.title, "tags": self.tags, "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "browser",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": variables},
            "annotations": {"list": []},
            "panels": self.panels,
        }


def variables(with_agent):
    v = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}},
        {"name": "traces", "label": "Traces", "type": "datasource", "query": "tempo", "current": {}},
        {"name": "job", "label": "Job", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(qoder_exporter_build_info, job)", "refId": "job"},
         "definition": "label_values(qoder_exporter_build_info, job)", "includeAll": True, "multi": True, "refresh": 2, "current": {}},
    ]
    if with_agent:
        v.append({"name": "agent", "label": "Agent", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                  "query": {"query": 'label_values(qoder_events_total{job=~"$job"}, agent)', "refId": "agent"},
                  "definition": 'label_values(qoder_events_total{job=~"$job"}, agent)', "includeAll": True, "multi": True, "refresh": 2, "current": {}})
    return v


EXHAUSTED = f'qoder_session_errors_total{{{SEL}, retry_status="exhausted"}}'


def overview():
    b = Board("qoder-agents-overview", "Qoder agents overview", ["qoder", "agents"])
    b.row("Cost")
    b.panel("Tokens per second by type", "timeseries",
            [(f'sum by (token_type) (job_agent_model_token_type:qoder_tokens:rate5m{{{SEL}}})', "{{token_type}}")],
            "short", stack=True, description="Input excludes cache reads and writes; a turn's tokens count once. From a 5m recording rule.")
    b.panel("Tokens per second by model", "timeseries",
            [(f'sum by (model) (rate(qoder_tokens_total{{{SEL}}}[$__rate_interval]))', "{{model}}")],
            "short", stack=True, links=[MODEL_TRACES])
    b.panel("Credits per hour by agent and model", "timeseries",
            [(f'sum by (agent, model) (job_agent_model:qoder_credits:rate5m{{{SEL}}}) * 3600', "{{agent}} / {{model}}")],
            "short", links=[AGENT_TRACES, MODEL_TRACES])
    b.panel("Credits in range", "stat",
            [(f'sum({new_or_increase(f"qoder_credits_total{{{SEL}}}", "$__range")})', "credits")], "short", w=6,
            description="Credits the model requests reported; a label set first seen in the range counts in full.")
    b.panel("Tokens in range", "stat",
            [(f'sum({new_or_increase(f"qoder_tokens_total{{{SEL}}}", "$__range")})', "tokens")], "short", w=6)
    b.row("Turns")
    b.panel("Turns per minute by stop reason", "timeseries",
            [(f'sum by (stop_reason) (rate(qoder_turns_total{{{SEL}}}[$__rate_interval])) * 60', "{{stop_reason}}")],
            "short", stack=True, links=[STOP_TRACES])
    b.panel("Turn duration p50 / p95", "timeseries",
            [(f'histogram_quantile({q}, sum by (le) (job_agent:qoder_turn_duration_seconds_bucket:rate5m{{{SEL}}}))', f"p{int(q * 100)}") for q in (0.5, 0.95)],
            "s")
    b.row("Errors")
    b.panel("Session errors by type and retry status", "timeseries",
            [(f'sum by (error_type, retry_status) (rate(qoder_session_errors_total{{{SEL}}}[$__rate_interval])) * 60', "{{error_type}} ({{retry_status}})")],
            "short", links=[ERROR_TRACES], description="Per minute. retry_status=exhausted: the server gave up on the turn.",
            overrides=[{"matcher": {"id": "byRegexp", "options": ".*exhausted.*"}, "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}, {"id": "custom.lineWidth", "value": 3}]}])
    b.panel("Retry exhaustion in range", "stat",
            [(f'sum({new_or_increase(EXHAUSTED, "$__range")})', "exhausted")],
            "short", w=6, links=[ERROR_TRACES], thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}])
    b.panel("Model request error ratio", "stat",
            [(f'sum(rate(qoder_model_request_errors_total{{{SEL}}}[$__rate_interval])) / sum(rate(qoder_model_requests_total{{{SEL}}}[$__rate_interval]))', "errors")],
            "percentunit", w=6, thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.05}, {"color": "red", "value": 0.1}])
    b.row("Model requests")
    b.panel("Model request latency p50 / p95 / p99", "timeseries",
            [(f'histogram_quantile({q}, sum by (le) (job_agent_model:qoder_model_request_duration_seconds_bucket:rate5m{{{SEL}}}))', f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)],
            "s")
    b.panel("Model requests per second by model", "timeseries",
            [(f'sum by (model) (rate(qoder_model_requests_total{{{SEL}}}[$__rate_interval]))', "{{model}}"),
             (f'sum by (model) (rate(qoder_model_request_errors_total{{{SEL}}}[$__rate_interval]))', "{{model}} errors")],
            "reqps", links=[MODEL_TRACES])
    b.row("Tools")
    b.panel("Tool calls per second by tool", "timeseries",
            [(f'sum by (tool) (rate(qoder_tool_calls_total{{{SEL}}}[$__rate_interval]))', "{{tool}}")],
            "reqps", stack=True, links=[TOOL_TRACES])
    b.panel("Tool error ratio by tool", "timeseries",
            [(f'sum by (tool) (rate(qoder_tool_call_errors_total{{{SEL}}}[$__rate_interval])) / sum by (tool) (rate(qoder_tool_calls_total{{{SEL}}}[$__rate_interval]))', "{{tool}}")],
            "percentunit", links=[TOOL_TRACES])
    b.row("Sessions")
    b.panel("Sessions followed by status", "timeseries",
            [('sum by (status) (qoder_sessions{job=~"$job"})', "{{status}}")], "short", stack=True)
    b.panel("Events per second by type", "timeseries",
            [(f'sum by (event_type) (rate(qoder_events_total{{{SEL}}}[$__rate_interval]))', "{{event_type}}")], "short")
    return b.json(variables(True))


def health():
    b = Board("qoder-exporter-health", "Qoder exporter health", ["qoder", "exporter"])
    b.row("API")
    b.panel("API reachable, token accepted", "stat", [(f'min(qoder_up{{{J}}})', "up")], "bool_yes_no", w=6,
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    b.panel("Time since last successful poll", "stat",
            [(f'time() - max(qoder_exporter_last_successful_poll_timestamp_seconds{{{J}}} > 0)', "age")], "s", w=6,
            description="Empty until the first successful poll.",
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 120}, {"color": "red", "value": 600}])
    b.panel("Build", "stat", [(f'max by (version, revision) (qoder_exporter_build_info{{{J}}})', "{{version}} ({{revision}})")], "none", w=12)
    b.panel("API requests per second by endpoint", "timeseries",
            [(f'sum by (endpoint) (rate(qoder_exporter_api_requests_total{{{J}}}[$__rate_interval]))', "{{endpoint}}")], "reqps")
    b.panel("API failures per second by reason", "timeseries",
            [(f'sum by (endpoint, reason) (rate(qoder_exporter_api_request_failures_total{{{J}}}[$__rate_interval]))', "{{endpoint}} {{reason}}")], "reqps")
    b.panel("API request latency p50 / p99", "timeseries",
            [(f'histogram_quantile({q}, sum by (le, endpoint) (rate(qoder_exporter_api_request_duration_seconds_bucket{{{J}}}[$__rate_interval])))', f"p{int(q * 100)} {{{{endpoint}}}}") for q in (0.5, 0.99)], "s")
    b.row("Pipeline")
    b.panel("Invalid events and dropped fields", "timeseries",
            [(f'sum by (reason) (rate(qoder_exporter_events_invalid_total{{{J}}}[$__rate_interval]))', "invalid: {{reason}}"),
             (f'sum(rate(qoder_exporter_event_fields_dropped_total{{{J}}}[$__rate_interval]))', "fields dropped")], "short")
    b.panel("State commits per second and p99 commit time", "timeseries",
            [(f'sum(rate(qoder_exporter_state_commits_total{{{J}}}[$__rate_interval]))', "commits/s"),
             (f'histogram_quantile(0.99, sum by (le) (rate(qoder_exporter_state_commit_duration_seconds_bucket{{{J}}}[$__rate_interval])))', "p99 commit (s)")], "short")
    b.panel("Spans exported and dropped", "timeseries",
            [(f'sum(rate(qoder_exporter_spans_exported_total{{{J}}}[$__rate_interval]))', "exported"),
             (f'sum by (reason) (rate(qoder_exporter_spans_dropped_total{{{J}}}[$__rate_interval]))', "dropped: {{reason}}"),
             (f'sum(rate(qoder_exporter_span_export_failures_total{{{J}}}[$__rate_interval]))', "failed export attempts")], "short")
    b.panel("Span outbox (turns waiting for the OTLP endpoint)", "timeseries",
            [(f'max(qoder_exporter_span_outbox_turns{{{J}}})', "turns")], "short",
            description="Grows while the OTLP endpoint is unreachable; past --otlp.outbox-max-turns the oldest are dropped.")
    b.panel("Pipeline queue depth", "timeseries", [(f'max(qoder_exporter_pipeline_queue_depth{{{J}}})', "batches")], "short")
    return b.json(variables(False))


def with_runbook_urls(text, alert_key):
    """Rewrites every runbook_url line to RUNBOOK_BASE_URL#<alert>, the alert being the last
    `alert_key: Name` line above it (`- alert:` in rules, `alertname:` in rule tests)."""
    out, alert = [], None
    key = re.compile(rf"^\s*(?:- )?{alert_key}:\s*(\S+)\s*$")
    for line in text.splitlines(keepends=True):
        m = key.match(line)
        if m:
            alert = m.group(1)
        m = re.match(r"^(\s*runbook_url:\s*)\S.*?(\r?\n)?$", line)
        if m and alert:
            line = f"{m.group(1)}{RUNBOOK_BASE_URL}#{alert.lower()}{m.group(2) or ''}"
        out.append(line)
    return "".join(out)


def rules_text():
    return with_runbook_urls(RULES.read_text(), "alert")


def prometheus_rule(text):
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "qoder-exporter", "labels": {"app.kubernetes.io/name": "qoder-exporter"}},
        "spec": yaml.safe_load(text),
    }


def github_anchor(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def problems(rules):
    """What --check finds wrong beyond stale files."""
    found = []
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", RUNBOOKS.read_text(), re.M)}
    tested = set()
    for t in RULE_TESTS:
        tested |= set(re.findall(r"alertname:\s*(\S+)", t.read_text()))
    for group in rules["groups"]:
        for r in group["rules"]:
            name = r.get("alert")
            if not name:
                continue
            url = r.get("annotations", {}).get("runbook_url", "")
            base, _, anchor = url.partition("#")
            if base != RUNBOOK_BASE_URL or anchor != name.lower():
                found.append(f"{name}: runbook_url {url!r} is not {RUNBOOK_BASE_URL}#{name.lower()}")
            if anchor not in anchors:
                found.append(f"{name}: docs/runbooks.md has no section with anchor #{anchor}")
            labels = r.get("labels", {})
            if labels.get("severity") not in SEVERITIES:
                found.append(f"{name}: severity {labels.get('severity')!r} not in {sorted(SEVERITIES)}")
            if labels.get("class") not in CLASSES:
                found.append(f"{name}: class {labels.get('class')!r} not in {sorted(CLASSES)} (the Alertmanager inhibition uses it)")
            if "for" not in r and name not in IMMEDIATE:
                found.append(f"{name}: no `for:` and not listed in IMMEDIATE")
            if name not in tested:
                found.append(f"{name}: no promtool test in tests/rules/")
    # The Alertmanager example names alerts and classes: they must exist.
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    am = yaml.safe_load(ALERTMANAGER.read_text())
    for rule in am.get("inhibit_rules", []):
        for m in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            key, value = re.match(r'(\w+)\s*=~?\s*"(.*)"', m).groups()
            names = value.split("|")
            if key == "alertname":
                found += [f"{ALERTMANAGER.relative_to(ROOT)}: no alert {n}" for n in names if n not in alerts]
            if key == "class":
                found += [f"{ALERTMANAGER.relative_to(ROOT)}: no class {n}" for n in names if n not in CLASSES]
    return found


def outputs():
    header = "# Generated by dashboards/generate.py from deploy/prometheus/rules.yml; do not edit.\n"
    rules = rules_text()
    out = {
        ROOT / "dashboards/qoder-agents-overview.json": json.dumps(overview(), indent=2) + "\n",
        ROOT / "dashboards/qoder-exporter-health.json": json.dumps(health(), indent=2) + "\n",
        RULES: rules,
        ROOT / "deploy/kubernetes/base/prometheusrule.yaml": header + yaml.safe_dump(prometheus_rule(rules), sort_keys=False, width=1000),
    }
    for t in RULE_TESTS:
        out[t] = with_runbook_urls(t.read_text(), "alertname")
    return out


def main():
    check = "--check" in sys.argv
    stale = []
    for path, text in outputs().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        elif not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    found = problems(yaml.safe_load(rules_text()))
    if stale:
        print("out of date (run python3 dashboards/generate.py):", *stale, sep="\n  ")
    if found:
        print("problems:", *found, sep="\n  ")
    if stale or found:
        sys.exit(1)


if __name__ == "__main__":
    main()
