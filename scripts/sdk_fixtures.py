#!/usr/bin/env python3
# Regenerate with:
#   d=$(mktemp -d) && python3 -m venv $d && $d/bin/pip install qca-sdk==0.11.0 && $d/bin/python scripts/sdk_fixtures.py tests/fixtures/sdk-0.11
#
# Writes JSON fixtures built FROM the Qoder Python SDK's own models (qca-sdk 0.11.0, import `qca`,
# models under qca/managed/types/). Every object is made with `Model.model_validate(dict)`, every
# key the script relies on is checked to be a DECLARED field of that model (recursively; the few
# documented extras are named explicitly at the call site), and every object is written as
# `model.model_dump(mode="json", exclude_unset=True)` (exclude_unset, not exclude_none, so an
# explicit `null` such as the primary thread's `parent_thread_id` is kept), pretty-printed with
# sorted keys. Each written file is then read back and validated again (round trip), list pages
# are parsed the way the SDK parses them (`SyncPage[Item]`, strict and lenient) and their paging
# is checked with the SDK's own `_next_query`, and the totals in tests/fixtures/sdk-0.11/README.md
# are recomputed from the files and asserted. Output is deterministic (no clock, no randomness).
#
# The README.md in the output directory is written by hand; this script never touches it.
from __future__ import annotations

import json
import sys
import typing
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import qca
import qca.managed.types as T  # importing the package runs model_rebuild() on every model
from pydantic import BaseModel as PydanticBaseModel
from qca.common._models import _construct_response
from qca.common.pagination import SyncPage

assert qca.__version__ == "0.11.0", f"expected qca-sdk 0.11.0, got {qca.__version__}"

SessionEvent = T.SessionEvent
Session = T.Session
SessionThread = T.SessionThread


# --------------------------------------------------------------------------------------------
# Declared-field check and building
# --------------------------------------------------------------------------------------------


def _models_in(annotation) -> list[type[PydanticBaseModel]]:
    """Every pydantic model class reachable through Optional/Union/List in an annotation."""
    if isinstance(annotation, type) and issubclass(annotation, PydanticBaseModel):
        return [annotation]
    found: list[type[PydanticBaseModel]] = []
    for arg in typing.get_args(annotation):
        # Dict[str, X] values are free maps here (metadata); only follow list/union arguments.
        if typing.get_origin(annotation) is dict:
            continue
        for m in _models_in(arg):
            if m not in found:
                found.append(m)
    return found


def check_declared(models: list[type[PydanticBaseModel]], data: dict, path: str, extras: set[str], where: str):
    """Every key of `data` must be a declared field of at least one of `models` (several for the
    SDK's untagged unions), unless its dotted path (no list indices) is listed in `extras`, i.e. a
    documented extra. Recurses into nested models and lists of models."""
    for key, value in data.items():
        kpath = f"{path}.{key}" if path else key
        owners = [m for m in models if key in m.model_fields]
        if not owners:
            if kpath in extras:
                continue
            names = ", ".join(m.__name__ for m in models)
            raise AssertionError(f"{where}: `{kpath}` is not a declared field of {names}")
        nested: list[type[PydanticBaseModel]] = []
        for m in owners:
            for sub in _models_in(m.model_fields[key].annotation):
                if sub not in nested:
                    nested.append(sub)
        if not nested:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                check_declared(nested, item, kpath, extras, where)


def build(model: type[PydanticBaseModel], data: dict, where: str, extras: tuple[str, ...] = ()) -> dict:
    """Validate `data` with the SDK model, check declared fields, return the JSON dump."""
    for e in extras:
        assert e.split(".")[-1] not in _all_fields(model, e), f"{where}: `{e}` is declared, not an extra"
        assert e.split(".")[0] in data, f"{where}: extra `{e}` not used"
    check_declared([model], data, "", set(extras), where)
    dumped = model.model_validate(data).model_dump(mode="json", exclude_unset=True)
    # Also acceptable to pydantic's strict JSON mode (values have the declared types, e.g. ints
    # are ints and timestamps parse), which the SDK's lenient parsing would not notice.
    model.model_validate_json(json.dumps(dumped), strict=True)
    return dumped


def _all_fields(model: type[PydanticBaseModel], dotted: str) -> set[str]:
    """Declared field names of the model that owns the last segment of `dotted`."""
    parts = dotted.split(".")
    models = [model]
    for p in parts[:-1]:
        nxt = []
        for m in models:
            if p in m.model_fields:
                nxt += _models_in(m.model_fields[p].annotation)
        models = nxt
    names: set[str] = set()
    for m in models:
        names |= set(m.model_fields)
    return names


def page(item_model, items: list[dict], where: str, *, next_page: str | None = None) -> dict:
    """A list envelope as the SDK's BasePage declares it: data, has_more, first_id, last_id, next_page."""
    body: dict = {"data": items, "has_more": next_page is not None}
    if items:
        body["first_id"] = items[0]["id"]
        body["last_id"] = items[-1]["id"]
    if next_page is not None:
        body["next_page"] = next_page
    check_declared([SyncPage], {k: v for k, v in body.items() if k != "data"}, "", set(), where)
    for i, it in enumerate(items):
        check_declared([item_model], it, "", _EXTRAS_BY_ID.get(it.get("id"), set()), f"{where} data[{i}]")
    dumped = SyncPage[item_model].model_validate(body).model_dump(mode="json", exclude_unset=True)
    assert dumped == body, f"{where}: page did not round-trip"
    return body


# Extras (undeclared keys) allowed per event id, filled in by ev().
_EXTRAS_BY_ID: dict[str, set[str]] = {}


def ev(data: dict, where: str, extras: tuple[str, ...] = ()) -> dict:
    out = build(SessionEvent, data, where, extras)
    _EXTRAS_BY_ID[data["id"]] = set(extras)
    assert out["id"].startswith("sevt_"), where
    assert out["processed_at"].endswith("Z"), where
    return out


# --------------------------------------------------------------------------------------------
# Writing and reading back
# --------------------------------------------------------------------------------------------

OUT: Path
WRITTEN: list[Path] = []


def write(rel: str, obj) -> None:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    WRITTEN.append(path)


def load(rel: str):
    return json.loads((OUT / rel).read_text(encoding="utf-8"))


def roundtrip(model, rel: str) -> None:
    raw = load(rel)
    again = model.model_validate(raw).model_dump(mode="json", exclude_unset=True)
    assert again == raw, f"{rel}: round trip through {model.__name__} changed the object"


def roundtrip_page(item_model, rel: str, style: str, expect_next: dict | None) -> list:
    raw = load(rel)
    # Strict path (pydantic validation) and the lenient path the SDK uses by default.
    strict = SyncPage[item_model].model_validate(raw)
    lenient = _construct_response(SyncPage[item_model], raw)
    for p in (strict, lenient):
        assert p.model_dump(mode="json", exclude_unset=True) == raw, f"{rel}: page round trip changed it"
        assert all(isinstance(x, item_model) for x in p.data), f"{rel}: items are not {item_model.__name__}"
        p._style = style
        p._query = {"limit": 100}
        q = p._next_query()
        got = None if q is None else {k: v for k, v in q.items() if v is not None and k != "limit"}
        assert got == expect_next, f"{rel}: SDK next query {got!r}, expected {expect_next!r}"
    return raw["data"]


# --------------------------------------------------------------------------------------------
# Shared snapshots
# --------------------------------------------------------------------------------------------

COORD_AGENT = {
    "id": "agent_coord",
    "name": "coordinator",
    "description": "Plans the change and delegates review.",
    "model": "qwen3-coder",
    "version": 3,
    "system": "You coordinate a small team of agents.",
    "multiagent": {
        "type": "coordinator",
        "agents": [
            {
                "id": "agent_rev",
                "name": "reviewer",
                "description": "Reviews diffs.",
                "model": "qwen3-coder-flash",
                "version": 1,
            }
        ],
    },
}
REV_THREAD_AGENT = {"id": "agent_rev", "name": "reviewer", "model": "qwen3-coder-flash", "version": 1}
COORD_THREAD_AGENT = {"id": "agent_coord", "name": "coordinator", "model": "qwen3-coder", "version": 3}


def ts(hms: str, day: str = "2026-10-05") -> str:
    return f"{day}T{hms}Z"


# --------------------------------------------------------------------------------------------
# A. One sample event per type (not part of the multi-agent scenario)
# --------------------------------------------------------------------------------------------


def sid(type_: str) -> str:
    """Id of the sample event of this type (ids and times follow SAMPLE_TYPES order)."""
    return f"sevt_ex{SAMPLE_TYPES.index(type_) + 1:02d}"


def sample_time(type_: str) -> str:
    return ts(f"10:00:{SAMPLE_TYPES.index(type_):02d}")


def sample_events() -> None:
    def e(type_: str, extras: tuple[str, ...] = (), **fields) -> None:
        data = {"id": sid(type_), "type": type_, "processed_at": sample_time(type_), **fields}
        write(f"events/{type_}.json", ev(data, f"events/{type_}", extras))

    text = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    e("user.message", content=text("Please review the open PR."))
    e("user.interrupt", session_thread_id="sthr_ex_rev")
    e("user.tool_confirmation", tool_use_id=sid("agent.tool_use"), result="deny", deny_message="Not on main.")
    e("user.tool_result", tool_use_id=sid("agent.tool_use"), content=text("ok"), is_error=False)
    e("user.custom_tool_result", custom_tool_use_id=sid("agent.custom_tool_use"), content=text("42 rows"), is_error=False)
    e(
        "user.define_outcome",
        outcome_id="outc_ex01",
        description="All tests pass",
        rubric={"type": "text", "content": "cargo test exits 0"},
        max_iterations=3,
    )
    e("system.message", content=text("Workspace restored from snapshot."))
    # x_future_field: an unknown field; the SDK keeps it (extra="allow"), so must the exporter.
    e("agent.message", extras=("x_future_field",), content=text("Done."), x_future_field={"anything": [1, 2]})
    e("agent.thinking")
    e("agent.tool_use", name="Bash", input={"command": "cargo test"}, evaluated_permission="allow")
    e("agent.custom_tool_use", name="lookup_ticket", input={"id": "QA-7"})
    e("agent.mcp_tool_use", name="search_issues", input={"q": "flaky"}, mcp_server_name="github", evaluated_permission="allow")
    e("agent.tool_result", tool_use_id=sid("agent.tool_use"), content=text("test result: ok"), is_error=False)
    e("agent.mcp_tool_result", mcp_tool_use_id=sid("agent.mcp_tool_use"), content=text("3 issues"), is_error=True)
    e(
        "agent.thread_message_sent",
        from_session_thread_id="sthr_ex_main",
        from_agent_name="coordinator",
        to_session_thread_id="sthr_ex_rev",
        to_agent_name="reviewer",
        content=text("Review src/lib.rs"),
    )
    e(
        "agent.thread_message_received",
        from_session_thread_id="sthr_ex_rev",
        from_agent_name="reviewer",
        to_session_thread_id="sthr_ex_main",
        to_agent_name="coordinator",
        content=text("LGTM"),
    )
    e("agent.thread_context_compacted", session_thread_id="sthr_ex_rev")
    e(
        "agent.artifact_delivered",
        file_id="file_ex01",
        original_filename="report.md",
        size=2048,
        content_type="text/markdown",
    )
    # x_future_field again, on a payload-less event.
    e("session.status_running", extras=("x_future_field",), x_future_field="v2")
    e("session.status_rescheduled")
    e(
        "session.status_idle",
        stop_reason={"type": "end_turn"},
        usage={
            "active_seconds": 42.5,
            "input_tokens": 5200,
            "output_tokens": 900,
            "cache_read_input_tokens": 3100,
            "cache_creation": {"ephemeral_5m_input_tokens": 700, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0},
            "list_cost": {"amount": "0.31", "currency": "USD"},
        },
    )
    e("session.status_terminated")
    e("session.deleted")
    e(
        "session.error",
        error={
            "type": "model_overloaded_error",
            "message": "The model is overloaded; retrying.",
            "retry_status": {"type": "retrying"},
            "qoder_error_code": "QCA-5291",
        },
    )
    e("session.updated", budget={"type": "limit", "max_credit_cost": "25.00"})
    e(
        "session.usage",
        model_credits=2.4,
        sandbox_runtime_credits=0.6,
        total_credits=3.0,
        usage={
            "active_seconds": 120.0,
            "input_tokens": 15000,
            "output_tokens": 3000,
            "cache_read_input_tokens": 9000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 300},
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
        },
    )
    e("session.thread_created", session_thread_id="sthr_ex_rev", agent_name="reviewer")
    e("session.thread_status_running", session_thread_id="sthr_ex_rev", agent_name="reviewer")
    e("session.thread_status_idle", session_thread_id="sthr_ex_rev", agent_name="reviewer", stop_reason={"type": "end_turn"})
    e("session.thread_status_terminated", session_thread_id="sthr_ex_rev", agent_name="reviewer")
    # `model` is NOT a declared SessionEvent field (§11.4: span.model_request_start has no payload);
    # it is sent as an extra, which the SDK keeps.
    e("span.model_request_start", extras=("model",), model="qwen3-coder")
    e(
        "span.model_request_end",
        model_request_start_id=sid("span.model_request_start"),
        is_error=False,
        model_usage={
            "credits": 0.12,
            "input_tokens": 1800,
            "output_tokens": 240,
            "cache_read_input_tokens": 1024,
            "cache_creation_input_tokens": 256,
            "speed": "standard",
        },
    )
    e("span.outcome_evaluation_start", outcome_id="outc_ex01", iteration=1)
    e("span.outcome_evaluation_ongoing", outcome_id="outc_ex01", iteration=1, outcome_evaluation_start_id=sid("span.outcome_evaluation_start"))
    e(
        "span.outcome_evaluation_end",
        outcome_id="outc_ex01",
        iteration=1,
        outcome_evaluation_start_id=sid("span.outcome_evaluation_start"),
        result="satisfied",
        explanation="cargo test exits 0",
        usage={
            "credits": 0.05,
            "input_tokens": 700,
            "output_tokens": 60,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "speed": "standard",
        },
    )


SAMPLE_TYPES = [
    "user.message", "user.interrupt", "user.tool_confirmation", "user.tool_result", "user.custom_tool_result",
    "user.define_outcome", "system.message", "agent.message", "agent.thinking", "agent.tool_use",
    "agent.custom_tool_use", "agent.mcp_tool_use", "agent.tool_result", "agent.mcp_tool_result",
    "agent.thread_message_sent", "agent.thread_message_received", "agent.thread_context_compacted",
    "agent.artifact_delivered", "session.status_running", "session.status_rescheduled", "session.status_idle",
    "session.status_terminated", "session.deleted", "session.error", "session.updated", "session.usage",
    "session.thread_created", "session.thread_status_running", "session.thread_status_idle",
    "session.thread_status_terminated", "span.model_request_start", "span.model_request_end",
    "span.outcome_evaluation_start", "span.outcome_evaluation_ongoing", "span.outcome_evaluation_end",
]


# --------------------------------------------------------------------------------------------
# B, C. A fully populated Session and SessionThread (standalone samples)
# --------------------------------------------------------------------------------------------


def sample_session_and_thread() -> None:
    session = {
        "id": "sesn_sample01",
        "type": "session",
        "status": "idle",
        "title": "Review the open PR",
        "environment_id": "env_ex01",
        "agent": COORD_AGENT,
        "budget": {"type": "limit", "max_credit_cost": "25.00"},
        "metadata": {"team": "platform", "ticket": "QA-7"},
        "outcome_evaluations": [
            {
                "type": "outcome_evaluation",
                "outcome_id": "outc_ex01",
                "description": "All tests pass",
                "iteration": 1,
                "result": "satisfied",
                "explanation": "cargo test exits 0",
                "completed_at": sample_time("span.outcome_evaluation_end"),
            }
        ],
        "stats": {"active_seconds": 120.0, "duration_seconds": 300.0},
        "usage": {
            "model_credits": 2.4,
            "sandbox_runtime_credits": 0.6,
            "total_credits": 3.0,
            "active_seconds": 120.0,
            "input_tokens": 15000,
            "output_tokens": 3000,
            "cache_read_input_tokens": 9000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 300},
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
            "list_cost": {"amount": "0.42", "currency": "USD"},
        },
        "archived_at": None,
        "created_at": ts("09:55:00"),
        "updated_at": ts("10:00:35"),
    }
    write("session.json", build(Session, session, "session.json"))
    thread = {
        "id": "sthr_ex_rev",
        "type": "session_thread",
        "session_id": "sesn_sample01",
        "parent_thread_id": "sthr_ex_main",
        "status": "idle",
        "agent": REV_THREAD_AGENT,
        "stats": {"active_seconds": 30.0, "duration_seconds": 45.0, "startup_seconds": 1.5},
        "usage": {
            "active_seconds": 30.0,
            "input_tokens": 4000,
            "output_tokens": 500,
            "cache_read_input_tokens": 2000,
            "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 1},
            "list_cost": {"amount": "0.08", "currency": "USD"},
        },
        "archived_at": None,
        "created_at": ts("09:56:00"),
        "updated_at": ts("09:56:45"),
    }
    write("thread.json", build(SessionThread, thread, "thread.json"))


# --------------------------------------------------------------------------------------------
# D. The multi-agent scenario
# --------------------------------------------------------------------------------------------

S1, S2 = "sesn_multi01", "sesn_plain02"
PRIMARY, REV = "sthr_coord01", "sthr_rev01"


def mu(credits, inp, out, cread, ccreate, speed="standard") -> dict:
    return {
        "credits": credits,
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": cread,
        "cache_creation_input_tokens": ccreate,
        "speed": speed,
    }


def scenario() -> None:
    text = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    on_rev = {"session_thread_id": REV}

    # Both streams, in processed_at order. (stream, data, extras); stream P = session list only,
    # T = reviewer thread list only, PT = the same event (same id) on both.
    # `model` on span.model_request_start is an undeclared extra (see sample_events()).
    timeline: list[tuple[str, dict, tuple[str, ...]]] = [
        ("P", {"id": "sevt_p01", "type": "user.message", "processed_at": ts("09:00:00"), "content": text("Refactor the parser and get it reviewed.")}, ()),
        ("P", {"id": "sevt_p02", "type": "session.status_running", "processed_at": ts("09:00:01")}, ()),
        ("P", {"id": "sevt_p03", "type": "span.model_request_start", "processed_at": ts("09:00:02"), "model": "qwen3-coder"}, ("model",)),
        ("P", {"id": "sevt_p04", "type": "span.model_request_end", "processed_at": ts("09:00:05"), "model_request_start_id": "sevt_p03", "is_error": False, "model_usage": mu(0.40, 1200, 300, 0, 800)}, ()),
        ("P", {"id": "sevt_p05", "type": "session.thread_created", "processed_at": ts("09:00:06"), "session_thread_id": REV, "agent_name": "reviewer"}, ()),
        ("P", {"id": "sevt_p06", "type": "agent.thread_message_sent", "processed_at": ts("09:00:07"), "from_session_thread_id": PRIMARY, "from_agent_name": "coordinator", "to_session_thread_id": REV, "to_agent_name": "reviewer", "content": text("Please review src/parser.rs.")}, ()),
        # Snapshot taken before the reviewer's first request ends, so 0.40 = all model credits so far.
        ("P", {"id": "sevt_p07", "type": "session.usage", "processed_at": ts("09:00:08"), "model_credits": 0.40, "sandbox_runtime_credits": 0.10, "total_credits": 0.50,
               "usage": {"active_seconds": 7.0, "input_tokens": 1200, "output_tokens": 300, "cache_read_input_tokens": 0,
                         "cache_creation": {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 0},
                         "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0}}}, ()),
        ("T", {"id": "sevt_t01", "type": "session.thread_status_running", "processed_at": ts("09:00:09"), **on_rev, "agent_name": "reviewer"}, ()),
        ("T", {"id": "sevt_t02", "type": "span.model_request_start", "processed_at": ts("09:00:10"), **on_rev, "model": "qwen3-coder-flash"}, ("model",)),
        ("T", {"id": "sevt_t03", "type": "span.model_request_end", "processed_at": ts("09:00:13"), **on_rev, "model_request_start_id": "sevt_t02", "is_error": False, "model_usage": mu(0.25, 900, 150, 400, 0)}, ()),
        ("PT", {"id": "sevt_x01", "type": "agent.tool_use", "processed_at": ts("09:00:14"), **on_rev, "name": "Read", "input": {"file_path": "src/parser_old.rs"}, "evaluated_permission": "allow"}, ()),
        ("T", {"id": "sevt_t04", "type": "agent.tool_result", "processed_at": ts("09:00:15"), **on_rev, "tool_use_id": "sevt_x01", "is_error": True, "content": text("File does not exist: src/parser_old.rs")}, ()),
        ("P", {"id": "sevt_p08", "type": "session.error", "processed_at": ts("09:00:16"), "error": {"type": "model_overloaded_error", "message": "The model is overloaded; retrying.", "retry_status": {"type": "retrying"}, "qoder_error_code": "QCA-5291"}}, ()),
        ("T", {"id": "sevt_t05", "type": "span.model_request_start", "processed_at": ts("09:00:18"), **on_rev, "model": "qwen3-coder-flash"}, ("model",)),
        ("T", {"id": "sevt_t06", "type": "span.model_request_end", "processed_at": ts("09:00:21"), **on_rev, "model_request_start_id": "sevt_t05", "is_error": False, "model_usage": mu(0.15, 600, 120, 700, 0)}, ()),
        ("PT", {"id": "sevt_x02", "type": "session.thread_status_idle", "processed_at": ts("09:00:22"), **on_rev, "agent_name": "reviewer", "stop_reason": {"type": "end_turn"}}, ()),
        ("P", {"id": "sevt_p09", "type": "agent.thread_message_received", "processed_at": ts("09:00:23"), "from_session_thread_id": REV, "from_agent_name": "reviewer", "to_session_thread_id": PRIMARY, "to_agent_name": "coordinator", "content": text("One suggestion; otherwise fine.")}, ()),
        ("P", {"id": "sevt_p10", "type": "span.model_request_start", "processed_at": ts("09:00:24"), "model": "qwen3-coder"}, ("model",)),
        ("P", {"id": "sevt_p11", "type": "span.model_request_end", "processed_at": ts("09:00:27"), "model_request_start_id": "sevt_p10", "is_error": False, "model_usage": mu(0.30, 800, 250, 800, 200)}, ()),
        ("P", {"id": "sevt_p12", "type": "session.status_idle", "processed_at": ts("09:00:28"), "stop_reason": {"type": "budget_reached"}}, ()),
        ("P", {"id": "sevt_p13", "type": "session.updated", "processed_at": ts("09:01:00"), "budget": {"type": "limit", "max_credit_cost": "5.00"}}, ()),
        ("P", {"id": "sevt_p14", "type": "user.message", "processed_at": ts("09:01:10"), "content": text("Budget raised; finish up.")}, ()),
        ("P", {"id": "sevt_p15", "type": "session.status_running", "processed_at": ts("09:01:11")}, ()),
        ("P", {"id": "sevt_p16", "type": "span.model_request_start", "processed_at": ts("09:01:12"), "model": "qwen3-coder"}, ("model",)),
        ("P", {"id": "sevt_p17", "type": "span.model_request_end", "processed_at": ts("09:01:15"), "model_request_start_id": "sevt_p16", "is_error": False, "model_usage": mu(0.20, 500, 180, 1000, 0, "fast")}, ()),
        ("P", {"id": "sevt_p18", "type": "session.usage", "processed_at": ts("09:01:16"), "model_credits": 1.30, "sandbox_runtime_credits": 0.35, "total_credits": 1.65,
               "usage": {"active_seconds": 33.0, "input_tokens": 4000, "output_tokens": 1000, "cache_read_input_tokens": 2900,
                         "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
                         "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0}}}, ()),
        ("P", {"id": "sevt_p19", "type": "session.status_idle", "processed_at": ts("09:01:17"), "stop_reason": {"type": "end_turn"}}, ()),
    ]
    primary = [ev(d, f"multiagent {d['id']}", x) for s, d, x in timeline if "P" in s]
    rev = [ev(d, f"multiagent {d['id']}", x) for s, d, x in timeline if "T" in s]

    final_usage = {
        "model_credits": 1.30,
        "sandbox_runtime_credits": 0.35,
        "total_credits": 1.65,
        "active_seconds": 33.0,
        "input_tokens": 4000,
        "output_tokens": 1000,
        "cache_read_input_tokens": 2900,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
    }
    s1 = build(Session, {
        "id": S1,
        "type": "session",
        "status": "idle",
        "title": "Refactor the parser",
        "environment_id": "env_multi",
        "agent": COORD_AGENT,
        "budget": {"type": "limit", "max_credit_cost": "5.00"},
        "metadata": {"team": "platform"},
        "stats": {"active_seconds": 33.0, "duration_seconds": 79.0},
        "usage": final_usage,
        "created_at": ts("08:59:58"),
        "updated_at": ts("09:01:17"),
    }, S1)
    s2 = build(Session, {
        "id": S2,
        "type": "session",
        "status": "idle",
        "title": "Fix the flaky test",
        "environment_id": "env_plain",
        "agent": {"id": "agent_solo", "name": "solo", "model": "qwen3-coder", "version": 1},
        "metadata": {"team": "platform"},
        "stats": {"active_seconds": 600.0, "duration_seconds": 1200.0},
        "usage": {
            "model_credits": 1.5,
            "sandbox_runtime_credits": 0.25,
            "total_credits": 1.75,
            "active_seconds": 600.0,
            "input_tokens": 30000,
            "output_tokens": 6000,
            "cache_read_input_tokens": 12000,
            "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        },
        "created_at": ts("14:00:00", "2026-10-04"),
        "updated_at": ts("14:20:00", "2026-10-04"),
    }, S2)

    coord_thread = build(SessionThread, {
        "id": PRIMARY,
        "type": "session_thread",
        "session_id": S1,
        "parent_thread_id": None,  # the primary (coordinator) thread: kept as explicit null
        "status": "idle",
        "agent": COORD_THREAD_AGENT,
        "stats": {"active_seconds": 18.0, "duration_seconds": 79.0, "startup_seconds": 0.8},
        "usage": {
            "active_seconds": 18.0,
            "input_tokens": 2500,
            "output_tokens": 730,
            "cache_read_input_tokens": 1800,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
        },
        "created_at": ts("08:59:58"),
        "updated_at": ts("09:01:17"),
    }, PRIMARY)
    rev_thread = build(SessionThread, {
        "id": REV,
        "type": "session_thread",
        "session_id": S1,
        "parent_thread_id": PRIMARY,
        "status": "idle",
        "agent": REV_THREAD_AGENT,
        "stats": {"active_seconds": 13.0, "duration_seconds": 16.0, "startup_seconds": 1.0},
        "usage": {
            "active_seconds": 13.0,
            "input_tokens": 1500,
            "output_tokens": 270,
            "cache_read_input_tokens": 1100,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        },
        "created_at": ts("09:00:06"),
        "updated_at": ts("09:00:22"),
    }, REV)

    write("multiagent/sessions.page1.json", page(Session, [s1], "sessions.page1", next_page="pg_2"))
    write("multiagent/sessions.page2.json", page(Session, [s2], "sessions.page2"))
    write(f"multiagent/session.{S1}.json", s1)
    write(f"multiagent/session.{S2}.json", s2)
    write(f"multiagent/events.{S1}.json", page(SessionEvent, primary, f"events.{S1}"))
    write(f"multiagent/events.{S2}.json", page(SessionEvent, [], f"events.{S2}"))
    write(f"multiagent/threads.{S1}.json", page(SessionThread, [coord_thread, rev_thread], f"threads.{S1}"))
    write(f"multiagent/threads.{S2}.json", page(SessionThread, [], f"threads.{S2}"))
    write(f"multiagent/thread.{S1}.{REV}.json", rev_thread)
    write(f"multiagent/thread_events.{S1}.{REV}.json", page(SessionEvent, rev, f"thread_events.{S1}.{REV}"))


# --------------------------------------------------------------------------------------------
# Verification: round trips, scenario invariants, and the README's totals
# --------------------------------------------------------------------------------------------

D = lambda x: Decimal(str(x))  # noqa: E731

EXPECTED = {
    "session_credits": {
        S1: {"model": D("1.30"), "sandbox_runtime": D("0.35"), "total": D("1.65")},
        S2: {"model": D("1.5"), "sandbox_runtime": D("0.25"), "total": D("1.75")},
    },
    "all_sessions_credits": {"model": D("2.80"), "sandbox_runtime": D("0.60"), "total": D("3.40")},
    "request_credits_by_agent": {"coordinator": D("0.90"), "reviewer": D("0.40")},
    "requests_by_agent": {"coordinator": 3, "reviewer": 2},
    "requests_by_model": {"qwen3-coder": 3, "qwen3-coder-flash": 2},
    "requests_by_speed": {"standard": 4, "fast": 1},
    "tokens_by_agent": {
        "coordinator": {"input_tokens": 2500, "output_tokens": 730, "cache_read_input_tokens": 1800, "cache_creation_input_tokens": 1000},
        "reviewer": {"input_tokens": 1500, "output_tokens": 270, "cache_read_input_tokens": 1100, "cache_creation_input_tokens": 0},
    },
    "tool_calls_by_agent": {"reviewer": 1},
    "tool_errors_by_agent": {"reviewer": 1},
    "session_turns_by_stop_reason": {"end_turn": 1, "budget_reached": 1},
    "thread_turns": {("reviewer", "end_turn"): 1},
    "threads_created": {"reviewer": 1},
    "session_errors": {("model_overloaded_error", "retrying"): 1},
    "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
    "rows": {"primary": 21, "reviewer_thread": 8, "unique": 27, "cross_posted": 2},
    "unique_by_type": {
        "user.message": 2, "session.status_running": 2, "span.model_request_start": 5,
        "span.model_request_end": 5, "session.thread_created": 1, "agent.thread_message_sent": 1,
        "session.usage": 2, "session.thread_status_running": 1, "agent.tool_use": 1, "agent.tool_result": 1,
        "session.error": 1, "session.thread_status_idle": 1, "agent.thread_message_received": 1,
        "session.status_idle": 2, "session.updated": 1,
    },
    "budget_max_credit_cost": {S1: D("5.00")},
}


def verify() -> None:
    # Sample events: one file per §11.4 type, each round-trips through SessionEvent (and the
    # stream models, which declare the same fields plus event/event_id/delta).
    files = sorted(p.stem for p in (OUT / "events").glob("*.json"))
    assert files == sorted(SAMPLE_TYPES), set(files) ^ set(SAMPLE_TYPES)
    ids = set()
    for t in SAMPLE_TYPES:
        roundtrip(SessionEvent, f"events/{t}.json")
        roundtrip(T.SessionStreamEvent, f"events/{t}.json")
        roundtrip(T.StreamSessionThreadEventsUnion, f"events/{t}.json")
        raw = load(f"events/{t}.json")
        assert raw["type"] == t and raw["id"] not in ids
        ids.add(raw["id"])
    assert sum("x_future_field" in load(f"events/{t}.json") for t in SAMPLE_TYPES) >= 2
    samples = {load(f"events/{t}.json")["id"]: load(f"events/{t}.json") for t in SAMPLE_TYPES}
    refs = {"tool_use_id": "agent.tool_use", "custom_tool_use_id": "agent.custom_tool_use",
            "mcp_tool_use_id": "agent.mcp_tool_use", "model_request_start_id": "span.model_request_start",
            "outcome_evaluation_start_id": "span.outcome_evaluation_start"}
    for ex in samples.values():
        for field, target in refs.items():
            if field in ex:
                assert samples[ex[field]]["type"] == target, (ex["id"], field)
    roundtrip(Session, "session.json")
    roundtrip(SessionThread, "thread.json")

    m = "multiagent/"
    for s in (S1, S2):
        roundtrip(Session, f"{m}session.{s}.json")
    roundtrip(SessionThread, f"{m}thread.{S1}.{REV}.json")
    p1 = roundtrip_page(Session, f"{m}sessions.page1.json", "BidirectionalPageCursor", {"page": "pg_2"})
    p2 = roundtrip_page(Session, f"{m}sessions.page2.json", "BidirectionalPageCursor", None)
    assert [s["id"] for s in p1 + p2] == [S1, S2]
    assert p1[0] == load(f"{m}session.{S1}.json") and p2[0] == load(f"{m}session.{S2}.json")
    prim = roundtrip_page(SessionEvent, f"{m}events.{S1}.json", "PageCursor", None)
    assert roundtrip_page(SessionEvent, f"{m}events.{S2}.json", "PageCursor", None) == []
    threads = roundtrip_page(SessionThread, f"{m}threads.{S1}.json", "PageCursor", None)
    assert roundtrip_page(SessionThread, f"{m}threads.{S2}.json", "PageCursor", None) == []
    revs = roundtrip_page(SessionEvent, f"{m}thread_events.{S1}.{REV}.json", "PageCursor", None)
    assert threads[1] == load(f"{m}thread.{S1}.{REV}.json")

    # Thread tree: primary = parent_thread_id null.
    agent_of_thread = {t["id"]: t["agent"]["name"] for t in threads}
    assert [t["parent_thread_id"] for t in threads] == [None, PRIMARY]
    assert agent_of_thread == {PRIMARY: "coordinator", REV: "reviewer"}

    # Ordering, ids, cross-posts.
    for rows in (prim, revs):
        times = [r["processed_at"] for r in rows]
        assert times == sorted(times) and len(set(times)) == len(times), "processed_at must strictly increase"
    by_id: dict[str, dict] = {}
    for r in prim + revs:
        if r["id"] in by_id:
            assert by_id[r["id"]] == r, f"cross-posted {r['id']} differs between streams"
        by_id[r["id"]] = r
    cross = {r["id"] for r in prim} & {r["id"] for r in revs}
    assert cross == {"sevt_x01", "sevt_x02"}
    assert all(by_id[i]["session_thread_id"] == REV for i in cross)
    assert all(r.get("session_thread_id") == REV for r in revs)
    all_times = sorted(r["processed_at"] for r in by_id.values())
    assert len(set(all_times)) == len(all_times), "processed_at must be distinct across both streams"
    assert {r.get("session_thread_id") for r in prim} <= {None, REV}

    # Attribution: an event's agent is its thread's agent; no session_thread_id = primary stream.
    def agent(r):
        return agent_of_thread[r.get("session_thread_id", PRIMARY)]

    uniq = sorted(by_id.values(), key=lambda r: r["processed_at"])
    got: dict = {}
    got["rows"] = {"primary": len(prim), "reviewer_thread": len(revs), "unique": len(uniq), "cross_posted": len(cross)}
    got["unique_by_type"] = dict(Counter(r["type"] for r in uniq))
    ends = [r for r in uniq if r["type"] == "span.model_request_end"]
    starts = {r["id"]: r for r in uniq if r["type"] == "span.model_request_start"}
    for r in ends:
        st = starts[r["model_request_start_id"]]
        assert st.get("session_thread_id") == r.get("session_thread_id") and st["processed_at"] < r["processed_at"]
    rc: dict = defaultdict(Decimal)
    toks: dict = defaultdict(Counter)
    for r in ends:
        rc[agent(r)] += D(r["model_usage"]["credits"])
        for k in EXPECTED["tokens_by_agent"]["coordinator"]:
            toks[agent(r)][k] += r["model_usage"][k]
    got["request_credits_by_agent"] = dict(rc)
    got["requests_by_agent"] = dict(Counter(agent(r) for r in ends))
    got["requests_by_model"] = dict(Counter(starts[r["model_request_start_id"]]["model"] for r in ends))
    got["requests_by_speed"] = dict(Counter(r["model_usage"]["speed"] for r in ends))
    got["tokens_by_agent"] = {a: dict(c) for a, c in toks.items()}
    tool_types = ("agent.tool_use", "agent.custom_tool_use", "agent.mcp_tool_use")
    got["tool_calls_by_agent"] = dict(Counter(agent(r) for r in uniq if r["type"] in tool_types))
    got["tool_errors_by_agent"] = dict(Counter(
        agent(r) for r in uniq if r["type"] in ("agent.tool_result", "agent.mcp_tool_result") and r.get("is_error")))
    got["session_turns_by_stop_reason"] = dict(Counter(
        r["stop_reason"]["type"] for r in uniq if r["type"] == "session.status_idle"))
    got["thread_turns"] = dict(Counter(
        (r["agent_name"], r["stop_reason"]["type"]) for r in uniq if r["type"] == "session.thread_status_idle"))
    got["threads_created"] = dict(Counter(r["agent_name"] for r in uniq if r["type"] == "session.thread_created"))
    got["session_errors"] = dict(Counter(
        (r["error"]["type"], r["error"]["retry_status"]["type"]) for r in uniq if r["type"] == "session.error"))

    sessions = {s: load(f"{m}session.{s}.json") for s in (S1, S2)}
    got["session_credits"] = {
        s: {"model": D(o["usage"]["model_credits"]), "sandbox_runtime": D(o["usage"]["sandbox_runtime_credits"]),
            "total": D(o["usage"]["total_credits"])} for s, o in sessions.items()}
    got["all_sessions_credits"] = {
        k: sum((v[k] for v in got["session_credits"].values()), Decimal()) for k in ("model", "sandbox_runtime", "total")}
    stu: Counter = Counter()
    for o in sessions.values():
        stu.update(o["usage"]["server_tool_use"])
    got["server_tool_use"] = dict(stu)
    got["budget_max_credit_cost"] = {S1: D(sessions[S1]["budget"]["max_credit_cost"])}

    # Consistency between the views.
    snaps = [r for r in uniq if r["type"] == "session.usage"]
    last = snaps[-1]
    u1 = sessions[S1]["usage"]
    for k in ("model_credits", "sandbox_runtime_credits", "total_credits"):
        assert D(last[k]) == D(u1[k]), k
    for k in ("active_seconds", "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation", "server_tool_use"):
        assert last["usage"][k] == u1[k], k
    for o in sessions.values():
        u = o["usage"]
        assert D(u["model_credits"]) + D(u["sandbox_runtime_credits"]) == D(u["total_credits"])
    for sn in snaps:
        assert D(sn["model_credits"]) + D(sn["sandbox_runtime_credits"]) == D(sn["total_credits"])
        # A snapshot's model credits = all request credits (every stream) ended before it.
        before = sum((D(r["model_usage"]["credits"]) for r in ends if r["processed_at"] < sn["processed_at"]), Decimal())
        assert before == D(sn["model_credits"]), (sn["id"], before)
        tb = Counter()
        for r in ends:
            if r["processed_at"] < sn["processed_at"]:
                for k in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
                    tb[k] += r["model_usage"][k]
                tb["cc"] += r["model_usage"]["cache_creation_input_tokens"]
        cc = sn["usage"]["cache_creation"]
        assert tb["cc"] == cc["ephemeral_5m_input_tokens"] + cc["ephemeral_1h_input_tokens"]
        assert all(tb[k] == sn["usage"][k] for k in ("input_tokens", "output_tokens", "cache_read_input_tokens"))
    assert sum(got["request_credits_by_agent"].values(), Decimal()) == D(u1["model_credits"])
    for t in threads:  # thread usage tokens = that thread's span tokens
        a = t["agent"]["name"]
        cc = t["usage"]["cache_creation"]
        assert t["usage"]["input_tokens"] == toks[a]["input_tokens"]
        assert t["usage"]["output_tokens"] == toks[a]["output_tokens"]
        assert t["usage"]["cache_read_input_tokens"] == toks[a]["cache_read_input_tokens"]
        assert cc["ephemeral_5m_input_tokens"] + cc["ephemeral_1h_input_tokens"] == toks[a]["cache_creation_input_tokens"]
    # The tool result answers the cross-posted tool use; the budget stop precedes the update.
    assert next(r for r in uniq if r["type"] == "agent.tool_result")["tool_use_id"] == "sevt_x01"
    assert by_id["sevt_p12"]["processed_at"] < by_id["sevt_p13"]["processed_at"]

    for key, want in EXPECTED.items():
        assert got[key] == want, f"{key}: computed {got[key]!r}, README says {want!r}"


def main() -> None:
    global OUT
    if len(sys.argv) != 2:
        sys.exit("usage: sdk_fixtures.py OUT_DIR   (e.g. tests/fixtures/sdk-0.11)")
    OUT = Path(sys.argv[1])
    for sub in ("events", "multiagent"):
        for old in (OUT / sub).glob("*.json"):
            old.unlink()
    sample_events()
    sample_session_and_thread()
    scenario()
    verify()
    for p in WRITTEN:
        print(p)
    print(f"{len(WRITTEN)} files written and verified with qca-sdk {qca.__version__}")


if __name__ == "__main__":
    main()
