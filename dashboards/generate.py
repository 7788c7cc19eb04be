#!/usr/bin/env python3
"""Generates the Grafana dashboards (and the Kubernetes PrometheusRule) from one source.

    python3 dashboards/generate.py          # write dashboards/*.json, deploy/kubernetes/base/prometheusrule.yaml,
                                            # tests/rules/dashboards_test.yml, the runbook URLs in rules and tests
    python3 dashboards/generate.py --check  # fail if the committed files differ from what this writes,
                                            # or if a check below fails

Dashboards use the classic JSON model: fixed uid, datasource/job/agent template variables,
a unit on every panel, $__rate_interval in every rate. Panels that show an agent, model, tool,
stop reason or error type link to a trace search for exactly what they show, in the trace
datasource of TRACE_BACKEND (Jaeger by default: the one the compose stack provisions; "tempo"
makes TraceQL links instead). "In range" panels count counter series born inside the range in
full (see new_or_increase); their PromQL is tested by promtool against series that are born,
interrupted by an outage and carried across a restart (tests/rules/dashboards_test.yml, written
here from RANGE_TESTS and run by --check when promtool is installed).

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
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

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
DASHBOARD_TESTS = ROOT / "tests/rules/dashboards_test.yml"
RULE_TESTS = sorted(p for p in (ROOT / "tests/rules").glob("*.yml") if p != DASHBOARD_TESTS)
ALERTMANAGER = ROOT / "deploy/alertmanager/alertmanager.yml"

# Alerts without `for:` on purpose (each says why in rules.yml): a counted event the API already
# reported; the expression stays true for its whole window, so `for:` would only delay it.
IMMEDIATE = {"QoderSessionRetriesExhausted", "QoderSessionTerminalErrors", "QoderSessionBudgetReached", "QoderSpansDropped",
             "QoderOTLPDataDropped"}
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

# Explore links into the trace datasource: spans carry the same agent/model/error values the
# metrics use as labels (see README, "From metrics to traces"). TRACE_BACKEND must be the type of
# a datasource that deploy/docker-compose provisions (--check verifies it); Jaeger needs a service
# name to search, the dashboards' "trace_service" variable (default TRACE_SERVICE).
TRACE_BACKEND = "jaeger"
TRACE_SERVICE = "qoder-exporter"
COMPOSE_DATASOURCES = ROOT / "deploy/docker-compose/grafana/provisioning/datasources/datasources.yml"


def trace_link(title, attributes):
    """A link to the traces whose spans carry every one of `attributes` (name -> value)."""
    if TRACE_BACKEND == "tempo":
        query = {"refId": "A", "datasource": {"type": "tempo", "uid": "${traces}"}, "queryType": "traceql",
                 "query": "{ " + " && ".join(f'span.{k} = "{v}"' for k, v in attributes.items()) + " }"}
    else:
        query = {"refId": "A", "datasource": {"type": "jaeger", "uid": "${traces}"}, "queryType": "search",
                 "service": "${trace_service}", "tags": " ".join(f'{k}="{v}"' for k, v in attributes.items())}
    panes = {"traces": {"datasource": "${traces}", "queries": [query], "range": {"from": "${__from}", "to": "${__to}"}}}
    # Grafana's ${...} variables stay as they are, to be filled in when the link is followed.
    url = "/explore?schemaVersion=1&orgId=1&panes=" + urllib.parse.quote(json.dumps(panes, separators=(",", ":")), safe="${}_.:,")
    return {"title": title, "url": url, "targetBlank": True}


AGENT_TRACES = trace_link("Traces of this agent", {"gen_ai.agent.name": "${__field.labels.agent}"})
MODEL_TRACES = trace_link("Model requests of this model", {"gen_ai.request.model": "${__field.labels.model}", "gen_ai.operation.name": "chat"})
ERROR_TRACES = trace_link("Turns that failed with this error", {"error.type": "${__field.labels.error_type}"})
STOP_TRACES = trace_link("Turns that ended this way", {"qoder.stop_reason": "${__field.labels.stop_reason}"})
TOOL_TRACES = trace_link("Calls of this tool", {"gen_ai.tool.name": "${__field.labels.tool}"})
SESSION_TRACES = trace_link("Traces of this session", {"session.id": "${__field.labels.session_id}"})


class Board:
    def __init__(self, uid, title, tags):
        self.uid, self.title, self.tags = uid, title, tags
        self.panels, self.y, self.next_id = [], 0, 1
        self.x, self.h = 0, 8

    def row(self, title):
        if self.x > 0:  # finish a half-filled line of panels first
            self.y += self.h
        self.panels.append({"type": "row", "title": title, "id": self.next_id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1
        self.x = 0

    def panel(self, title, kind, targets, unit, w=12, h=8, links=None, description="", overrides=None, stack=False, thresholds=None, instant=False):
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
        if instant:
            for t in p["targets"]:
                t["instant"], t["range"] = True, False
        if kind == "bargauge":
            p["options"].update({"orientation": "horizontal", "displayMode": "basic", "showUnfilled": True})
        if stack:
            p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
        if thresholds:
            p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
        self.panels.append(p)
        self.next_id += 1
        self.h = h
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
        {"name": "traces", "label": "Traces", "type": "datasource", "query": TRACE_BACKEND, "current": {}},
        {"name": "job", "label": "Job", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(qoder_exporter_build_info, job)", "refId": "job"},
         "definition": "label_values(qoder_exporter_build_info, job)", "includeAll": True, "multi": True, "refresh": 2, "current": {}},
    ]
    if TRACE_BACKEND == "jaeger":
        v.append({"name": "trace_service", "label": "Trace service", "type": "textbox", "query": TRACE_SERVICE,
                  "current": {"text": TRACE_SERVICE, "value": TRACE_SERVICE},
                  "description": "service.name of the exporter's spans (OTEL_SERVICE_NAME), searched by the trace links"})
    if with_agent:
        v.append({"name": "agent", "label": "Agent", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                  "query": {"query": 'label_values(qoder_events_total{job=~"$job"}, agent)', "refId": "agent"},
                  "definition": 'label_values(qoder_events_total{job=~"$job"}, agent)', "includeAll": True, "multi": True, "refresh": 2, "current": {}})
    return v


EXHAUSTED = f'qoder_session_errors_total{{{SEL}, retry_status="exhausted"}}'


def priced(expr, by=""):
    """`expr` (with a job label) in money where the job's exporter has a price, else in credits:
    qoder_credit_price{currency} exists only with --cost.credit-price/--cost.currency; without it
    the series say currency="credits"."""
    keep = f"{by}, currency" if by else "currency"
    return (f'sum by ({keep}) ({expr} * on (job) group_left (currency) max by (job, currency) (qoder_credit_price{{{J}}})) '
            f'or sum by ({keep}) (label_replace({expr} unless on (job) qoder_credit_price{{{J}}}, "currency", "credits", "", ""))')


BILLED = f"qoder_session_credits_total{{{SEL}}}"
MODEL_BILLED = f'qoder_session_credits_total{{{SEL}, kind="model"}}'
SANDBOX_BILLED = f'qoder_session_credits_total{{{SEL}, kind="sandbox_runtime"}}'
BUDGET_PAUSES = f'qoder_turns_total{{{SEL}, stop_reason="budget_reached"}}'


def overview():
    b = Board("qoder-agents-overview", "Qoder agents overview", ["qoder", "agents"])
    b.row("Cost")
    b.panel("Billed credits per hour by agent and kind", "timeseries",
            [(f'sum by (agent, kind) (rate({BILLED}[$__rate_interval])) * 3600', "{{agent}} / {{kind}}")],
            "short", stack=True, links=[AGENT_TRACES],
            description="What the account is charged: increases of the sessions' cumulative usage snapshots, model and sandbox runtime, under the session's agent.")
    b.panel("Spend per hour by agent", "timeseries",
            [(priced(f'sum by (job, agent) (rate({BILLED}[$__rate_interval])) * 3600', "agent"), "{{agent}} ({{currency}})")],
            "short", stack=True, links=[AGENT_TRACES],
            description="Billed credits × qoder_credit_price when the exporter runs with --cost.credit-price and --cost.currency; in credits (currency \"credits\") otherwise.")
    b.panel("Spend in range", "stat",
            [(priced(f'sum by (job) ({new_or_increase(BILLED, "$__range")})'), "{{currency}}")], "short", w=6,
            description="Money when a credit price is configured, else credits. A label set first seen in the range counts in full.")
    b.panel("Spend in the last 24 hours", "stat",
            [(f'sum by (currency) (job_agent_kind_currency:qoder_session_cost:increase1d{{{SEL}}}) '
              f'or sum by (currency) (label_replace(sum by (job) (job_agent_kind:qoder_session_credits:increase1d{{{SEL}}}) '
              f'unless on (job) qoder_credit_price{{{J}}}, "currency", "credits", "", ""))', "{{currency}}")], "short", w=6,
            description="From the recording rules the cost alerts use.")
    b.panel("Sandbox share of billed credits in range", "stat",
            [(f'sum({new_or_increase(SANDBOX_BILLED, "$__range")}) / sum({new_or_increase(BILLED, "$__range")})', "sandbox runtime")],
            "percentunit", w=6, description="Sandbox runtime is priced on active seconds: time with a thread running.")
    b.panel("Budget-reached pauses in range", "stat",
            [(f'sum({new_or_increase(BUDGET_PAUSES, "$__range")})', "paused turns")], "short", w=6,
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}],
            description="Turns that stopped at the session's credit budget; the session waits until someone raises it.")
    b.panel("Billed credits in range by agent and kind", "bargauge",
            [(f'sum by (agent, kind) ({new_or_increase(BILLED, "$__range")})', "{{agent}} / {{kind}}")], "short", links=[AGENT_TRACES])
    b.panel("Top sessions by current spend", "bargauge",
            [(f'topk(10, sum by (session_id) (qoder_session_credits{{{J}}}))', "{{session_id}}")], "short", instant=True, links=[SESSION_TRACES],
            description="Credits of each recently active session's latest usage snapshot (model + sandbox). Only the most recently active sessions have these series (--metrics.session-series-limit); not filtered by agent.")
    b.panel("Unattributed model credits", "timeseries",
            [(f'sum by (job) (qoder_session_credits_total{{{J}, kind="model"}}) - sum by (job) (qoder_credits_total{{{J}}})', "{{job}}")], "short",
            description="Billed model credits no model request reported (work no span describes): Σ session model credits − Σ request credits, cumulative. Per job only: session credits count under the session's agent, request credits under the agent (or sub-agent) that made the request.")
    b.row("Tokens and request credits")
    b.panel("Tokens per second by type", "timeseries",
            [(f'sum by (token_type) (job_agent_model_token_type:qoder_tokens:rate5m{{{SEL}}})', "{{token_type}}")],
            "short", stack=True, description="Input excludes cache reads and writes; a turn's tokens count once. From a 5m recording rule.")
    b.panel("Tokens per second by model", "timeseries",
            [(f'sum by (model) (rate(qoder_tokens_total{{{SEL}}}[$__rate_interval]))', "{{model}}")],
            "short", stack=True, links=[MODEL_TRACES])
    b.panel("Request credits per hour by agent and model", "timeseries",
            [(f'sum by (agent, model) (job_agent_model:qoder_credits:rate5m{{{SEL}}}) * 3600', "{{agent}} / {{model}}")],
            "short", links=[AGENT_TRACES, MODEL_TRACES], description="Credits the model requests reported (span.model_request_end); the billed total is in the Cost row.")
    b.panel("Request credits in range", "stat",
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
    b.row("Sub-agents and runtime")
    b.panel("Thread turns per minute by agent and stop reason", "timeseries",
            [(f'sum by (agent, stop_reason) (rate(qoder_thread_turns_total{{{SEL}}}[$__rate_interval])) * 60', "{{agent}} / {{stop_reason}}")],
            "short", stack=True, links=[AGENT_TRACES, STOP_TRACES],
            description="session.thread_status_idle, under the thread's agent; the session-level turns are in the Turns row.")
    b.panel("Sub-agents started per hour", "timeseries",
            [(f'sum by (agent) (rate(qoder_threads_created_total{{{SEL}}}[$__rate_interval])) * 3600', "{{agent}}")],
            "short", stack=True, links=[AGENT_TRACES])
    b.panel("Sessions running (active seconds per second) by agent", "timeseries",
            [(f'sum by (agent) (rate(qoder_session_active_seconds_total{{{SEL}}}[$__rate_interval]))', "{{agent}}")],
            "short", stack=True, links=[AGENT_TRACES],
            description="Active seconds per second: how many sessions had a thread running, on average. Sandbox runtime is priced on it.")
    b.panel("Server tool uses per minute by agent and tool", "timeseries",
            [(f'sum by (agent, tool) (rate(qoder_server_tool_uses_total{{{SEL}}}[$__rate_interval])) * 60', "{{agent}} / {{tool}}")],
            "short", stack=True, links=[AGENT_TRACES, TOOL_TRACES],
            description="Tools the platform runs itself (web_search, web_fetch), from the usage snapshots.")
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
             (f'sum by (reason) (rate(qoder_exporter_event_fields_dropped_total{{{J}}}[$__rate_interval]))', "fields dropped: {{reason}}")], "short")
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
    b.panel("OTLP metrics and logs delivered and dropped", "timeseries",
            [(f'sum by (signal) (rate(qoder_exporter_otlp_exported_total{{{J}}}[$__rate_interval]))', "{{signal}} exported"),
             (f'sum by (signal, reason) (rate(qoder_exporter_otlp_dropped_total{{{J}}}[$__rate_interval]))', "{{signal}} dropped: {{reason}}"),
             (f'sum by (signal) (rate(qoder_exporter_otlp_export_failures_total{{{J}}}[$__rate_interval]))', "{{signal}} failed pushes")], "short",
            description="Per second; empty unless --otlp.metrics.exporter or --otlp.logs.exporter is otlp. Metrics count data points (every series at every push), logs count records. "
                        "A failed metrics push loses nothing (the next carries the totals); failed log records stay in the outbox.")
    b.panel("Log outbox (records waiting for the OTLP endpoint)", "timeseries",
            [(f'max(qoder_exporter_log_outbox_records{{{J}}})', "records")], "short",
            description="Only with --otlp.logs.exporter otlp. Grows while the OTLP endpoint is unreachable; past --otlp.logs.outbox-max-records the oldest are dropped.")
    b.panel("Pipeline queue depth", "timeseries", [(f'max(qoder_exporter_pipeline_queue_depth{{{J}}})', "batches")], "short")
    b.row("Guards")
    b.panel("State file takes commits", "stat", [(f'min(qoder_exporter_state_writable{{{J}}})', "writable")], "bool_yes_no", w=6,
            description="0 from a failed commit (disk full, read-only, locked) until one succeeds; /readyz fails meanwhile.",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    b.panel("Open connections on the web port", "stat", [(f'sum(qoder_exporter_http_connections{{{J}}})', "open")], "short", w=6,
            description="Bounded by --web.max-connections (512); past it new connections are closed and counted.")
    b.panel("Guards at work per second", "timeseries",
            [(f'sum(rate(qoder_exporter_series_dropped_total{{{J}}}[$__rate_interval]))', "label sets folded into other (series budget)"),
             (f'sum by (kind) (rate(qoder_exporter_api_anomalies_total{{{J}}}[$__rate_interval]))', "API paging anomaly: {{kind}}"),
             (f'sum(rate(qoder_exporter_http_connections_refused_total{{{J}}}[$__rate_interval]))', "connections refused"),
             (f'sum(rate(qoder_exporter_sessions_not_followed_total{{{J}}}[$__rate_interval]))', "sessions waiting (--qoder.max-sessions)"),
             (f'sum(rate(qoder_exporter_events_duplicate_total{{{J}}}[$__rate_interval]))', "repeated events skipped")], "short",
            description="What the exporter refused or folded to stay exact and bounded; each has an alert and a runbook.")
    return b.json(variables(False))


# The "in range" panels' PromQL, run by promtool over series that are born (instance a), come back
# unchanged after an outage (b, down 6m-9m) and carry their value across a restart with a new
# version (d, restarted at 7m), plus a job without a credit price (unpriced). At 15m with a 15m
# range only what was born counts; at 25m nothing happened in the range.
RANGE = "15m"
RANGE_SERIES = [
    ('qoder_exporter_build_info{job="qoder-exporter",instance="a",version="1",revision="x"}', "1x30"),
    ('qoder_exporter_build_info{job="qoder-exporter",instance="b",version="1",revision="x"}', "1x5 stale _x3 1x20"),
    ('qoder_exporter_build_info{job="qoder-exporter",instance="d",version="1",revision="x"}', "1x6 stale"),
    ('qoder_exporter_build_info{job="qoder-exporter",instance="d",version="2",revision="y"}', "_x8 1x21"),
    ('qoder_exporter_build_info{job="unpriced",instance="u",version="1",revision="x"}', "1x30"),
    ('qoder_credit_price{job="qoder-exporter",instance="a",currency="USD"}', "0.01x30"),
    ('qoder_credit_price{job="qoder-exporter",instance="b",currency="USD"}', "0.01x5 stale _x3 0.01x20"),
    ('qoder_credit_price{job="qoder-exporter",instance="d",currency="USD"}', "0.01x6 stale 0.01x21"),
    ('qoder_session_credits_total{job="unpriced",instance="u",agent="coder",kind="model"}', "_x5 2x24"),
]
for family, labels, born in [
        ("qoder_credits_total", 'agent="coder",model="m"', 1),
        ("qoder_tokens_total", 'agent="coder",model="m",token_type="input"', 1),
        ("qoder_session_errors_total", 'agent="coder",error_type="e",retry_status="exhausted"', 1),
        ("qoder_turns_total", 'agent="coder",stop_reason="budget_reached"', 1),
        ("qoder_session_credits_total", 'agent="coder",kind="model"', 1),
        ("qoder_session_credits_total", 'agent="coder",kind="sandbox_runtime"', 3)]:
    RANGE_SERIES += [
        (f'{family}{{job="qoder-exporter",instance="a",{labels}}}', f"_x5 {born}x24"),
        (f'{family}{{job="qoder-exporter",instance="b",{labels}}}', "2x5 stale _x3 2x20"),
        (f'{family}{{job="qoder-exporter",instance="d",{labels}}}', "4x6 stale 4x21"),
    ]
# Panel title -> {eval time: [(labels, value)]}. Every panel whose query uses $__range needs one.
RANGE_TESTS = {
    "Request credits in range": {"15m": [("{}", 1)], "25m": [("{}", 0)]},
    "Tokens in range": {"15m": [("{}", 1)], "25m": [("{}", 0)]},
    "Retry exhaustion in range": {"15m": [("{}", 1)], "25m": [("{}", 0)]},
    "Budget-reached pauses in range": {"15m": [("{}", 1)], "25m": [("{}", 0)]},
    "Spend in range": {"15m": [('{currency="USD"}', 0.04), ('{currency="credits"}', 2)],
                       "25m": [('{currency="USD"}', 0), ('{currency="credits"}', 0)]},
    "Sandbox share of billed credits in range": {"15m": [("{}", 0.5)]},
    "Billed credits in range by agent and kind": {"15m": [('{agent="coder",kind="model"}', 3), ('{agent="coder",kind="sandbox_runtime"}', 3)],
                                                  "25m": [('{agent="coder",kind="model"}', 0), ('{agent="coder",kind="sandbox_runtime"}', 0)]},
}


def concrete(expr, rng=RANGE):
    """A panel's PromQL with Grafana's variables replaced as a query over everything would."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", rng).replace("$job", ".*").replace("$agent", ".*")


def panel_targets():
    for board in (overview(), health()):
        for p in board["panels"]:
            for t in p.get("targets", []):
                yield board["uid"], p["title"], t["expr"]


def range_tests():
    tests = []
    for _, title, expr in panel_targets():
        for at, samples in RANGE_TESTS.get(title, {}).items():
            tests.append({"expr": concrete(expr), "eval_time": at,
                          "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]})
    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": sr, "values": v} for sr, v in RANGE_SERIES],
        "promql_expr_test": tests}]}
    return ("# Generated by dashboards/generate.py (RANGE_SERIES, RANGE_TESTS); do not edit.\n"
            "# The dashboards' \"in range\" queries over series that are born, interrupted by an outage and\n"
            "# carried across a restart. promtool test rules tests/rules/dashboards_test.yml\n"
            + yaml.safe_dump(doc, sort_keys=False, width=1000))


def promtool_problems():
    """Every panel query parses (promtool check rules), and the range tests pass."""
    if not shutil.which("promtool"):
        print("promtool not found: panel queries and tests/rules/dashboards_test.yml not run")
        return []
    found = []
    with tempfile.TemporaryDirectory() as d:
        rules = {"groups": [{"name": "panels", "rules": [
            {"record": f"panel:query:{i}", "expr": concrete(e)} for i, (_, _, e) in enumerate(panel_targets())]}]}
        path = pathlib.Path(d) / "panels.yml"
        path.write_text(yaml.safe_dump(rules, width=1000))
        r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            found.append("panel queries: " + r.stdout + r.stderr)
    r = subprocess.run(["promtool", "test", "rules", str(ROOT / "tests/rules/dashboards_test.yml")], capture_output=True, text=True)
    if r.returncode != 0:
        found.append("tests/rules/dashboards_test.yml: " + r.stdout + r.stderr)
    return found


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
    # Every "in range" panel has a range test.
    for uid, title, expr in panel_targets():
        if "$__range" in expr and title not in RANGE_TESTS:
            found.append(f"{uid}/{title}: uses $__range but has no RANGE_TESTS entry")
    # The trace links point at a datasource type the compose stack provisions.
    provisioned = {d.get("type") for d in yaml.safe_load(COMPOSE_DATASOURCES.read_text()).get("datasources", [])}
    if TRACE_BACKEND not in provisioned:
        found.append(f"TRACE_BACKEND {TRACE_BACKEND!r} is not provisioned in {COMPOSE_DATASOURCES.relative_to(ROOT)} ({sorted(provisioned)})")
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
    out[DASHBOARD_TESTS] = range_tests()
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
    if not stale:
        found += promtool_problems()
    if stale:
        print("out of date (run python3 dashboards/generate.py):", *stale, sep="\n  ")
    if found:
        print("problems:", *found, sep="\n  ")
    if stale or found:
        sys.exit(1)


if __name__ == "__main__":
    main()
