"""The dashboard's data assembly (pure): query rows, lifecycle events and the agents' configuration in, the
JSON documents of ``/api/agents`` and ``/api/agent/<id>`` out. No clients and no wall clock here: the store
(``services.dashboard.store``) reads, the server passes ``now``.

Time buckets are epoch-aligned Unix timestamps (``t``, seconds); every series has one entry per bucket of the
window, empty buckets included, so the page draws gaps as gaps rather than joining distant points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from services.core.agents import AgentConfig, AgentsFile, Validation
from services.core.lifecycle import AgentLifecycle, LifecycleEvent, fold
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered

# Fixed windows the page offers; "auto" spans the agent's traffic (at most AUTO_MAX, at least AUTO_MIN).
WINDOWS: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
AUTO = "auto"
AUTO_MIN = timedelta(minutes=15)
AUTO_MAX = timedelta(days=30)
# Bucket widths that read well on an axis; each divides a day, so buckets line up with UTC days.
NICE_BUCKETS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_BUCKETS = 60
RECENT_EVENTS = 20
# The order of servers in the traffic chart's stack: who answers the client most often in a healthy flywheel.
SERVER_ORDER = {"student": 0, "teacher": 1, "none": 2}


class WindowError(ValueError):
    """A ``window`` the dashboard does not know; the message lists the known ones."""


# Rows as the store reads them ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgentTotals:
    """All-time figures of one agent (``SUMMARY_SQL``)."""

    agent_id: str
    requests: int
    student_served: int
    teacher_served: int
    failed: int
    actual_usd: float
    teacher_only_usd: float
    shadow_samples: int
    shadow_agreed: int
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True)
class TrafficRow:
    t: int
    served_by: str
    route_reason: str
    requests: int


@dataclass(frozen=True)
class AgreementRow:
    t: int
    samples: int
    agreed: int


@dataclass(frozen=True)
class CostRow:
    t: int
    requests: int
    actual_usd: float
    teacher_only_usd: float


@dataclass(frozen=True)
class LatencyRow:
    served_by: str
    requests: int
    p50_ms: float
    p95_ms: float
    p95_end_to_end_ms: float


@dataclass(frozen=True)
class WindowRows:
    """Everything the store reads for one agent over one window."""

    traffic: list[TrafficRow]
    agreement: list[AgreementRow]
    cost: list[CostRow]
    latency: list[LatencyRow]


# The window ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    name: str
    since: datetime  # the first bucket's start (aware, UTC)
    until: datetime  # now
    bucket_s: int

    def starts(self) -> list[int]:
        """Every bucket's start, oldest first."""
        first = int(self.since.timestamp())
        last = int(self.until.timestamp()) // self.bucket_s * self.bucket_s
        return list(range(first, last + 1, self.bucket_s))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "since": _iso(self.since), "until": _iso(self.until), "bucket_s": self.bucket_s}


def bucket_for(span: timedelta) -> int:
    """The narrowest nice bucket that covers ``span`` in at most MAX_BUCKETS buckets."""
    seconds = max(span.total_seconds(), 1.0)
    for width in NICE_BUCKETS_S:
        if seconds / width <= MAX_BUCKETS:
            return width
    return math.ceil(seconds / MAX_BUCKETS / 86400) * 86400


def choose_window(name: str, now: datetime, first_seen: datetime | None) -> Window:
    """The window called ``name`` ending at ``now``; ``auto`` starts at the agent's first request (``first_seen``)
    within AUTO_MAX, and spans at least AUTO_MIN so a fresh agent still gets a readable axis."""
    if now.tzinfo is None:
        raise ValueError("choose_window: now must be timezone-aware")
    if name == AUTO:
        start = first_seen if first_seen is not None else now - AUTO_MIN
        span = min(max(now - start, AUTO_MIN), AUTO_MAX)
    elif name in WINDOWS:
        span = WINDOWS[name]
    else:
        known = ", ".join([AUTO, *WINDOWS])
        raise WindowError(f"window {name!r} is not known; use one of {known}")
    bucket = bucket_for(span)
    since_ts = int((now - span).timestamp()) // bucket * bucket  # floored: the first bucket is whole
    return Window(name, datetime.fromtimestamp(since_ts, timezone.utc), now.astimezone(timezone.utc), bucket)


# Panels --------------------------------------------------------------------------------------------------
def traffic_panel(rows: Iterable[TrafficRow], starts: Sequence[int]) -> dict[str, Any]:
    """Requests per bucket, one series per (served_by, route_reason): the stacked bars of the traffic split."""
    index = {t: i for i, t in enumerate(starts)}
    series: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if row.t not in index:
            continue  # a request stamped after ``now`` (clock skew between hosts): not drawn
        counts = series.setdefault((row.served_by, row.route_reason), [0] * len(starts))
        counts[index[row.t]] += row.requests
    ordered = sorted(series.items(), key=lambda kv: (SERVER_ORDER.get(kv[0][0], 9), -sum(kv[1]), kv[0][1]))
    total = sum(sum(c) for c in series.values())
    by_server: dict[str, int] = {}
    for (served_by, _), counts in series.items():
        by_server[served_by] = by_server.get(served_by, 0) + sum(counts)
    return {
        "buckets": list(starts),
        "series": [
            {"served_by": served_by, "route_reason": reason, "counts": counts, "total": sum(counts)}
            for (served_by, reason), counts in ordered
        ],
        "total": total,
        "by_server": dict(sorted(by_server.items(), key=lambda kv: SERVER_ORDER.get(kv[0], 9))),
        "student_share": _ratio(by_server.get("student", 0), total),
    }


def agreement_panel(
    rows: Iterable[AgreementRow], starts: Sequence[int], threshold: float, validation_agreement: float | None
) -> dict[str, Any]:
    """Agreement on shadow samples per bucket and over the window, with the lines it is judged against: the
    agent's quality threshold and the promoted student's agreement on the holdout."""
    index = {t: i for i, t in enumerate(starts)}
    samples = [0] * len(starts)
    agreed = [0] * len(starts)
    for row in rows:
        if row.t in index:
            samples[index[row.t]] += row.samples
            agreed[index[row.t]] += row.agreed
    total, total_agreed = sum(samples), sum(agreed)
    return {
        "buckets": [
            {"t": t, "samples": n, "agreed": a, "agreement": _ratio(a, n)}
            for t, n, a in zip(starts, samples, agreed, strict=True)
        ],
        "samples": total,
        "agreed": total_agreed,
        "agreement": _ratio(total_agreed, total),
        "threshold": threshold,
        "validation_agreement": validation_agreement,
    }


def cost_panel(rows: Iterable[CostRow], starts: Sequence[int]) -> dict[str, Any]:
    """Actual cost against the teacher-only baseline, per bucket and cumulative; saved = baseline - actual
    (negative while the student is not serving yet: shadows cost extra)."""
    index = {t: i for i, t in enumerate(starts)}
    actual = [0.0] * len(starts)
    baseline = [0.0] * len(starts)
    for row in rows:
        if row.t in index:
            actual[index[row.t]] += row.actual_usd
            baseline[index[row.t]] += row.teacher_only_usd
    buckets, cum_actual, cum_baseline = [], 0.0, 0.0
    for t, a, b in zip(starts, actual, baseline, strict=True):
        cum_actual += a
        cum_baseline += b
        buckets.append(
            {
                "t": t,
                "actual_usd": a,
                "teacher_only_usd": b,
                "cumulative_actual_usd": cum_actual,
                "cumulative_teacher_only_usd": cum_baseline,
            }
        )
    saved = cum_baseline - cum_actual
    return {
        "buckets": buckets,
        "actual_usd": cum_actual,
        "teacher_only_usd": cum_baseline,
        "saved_usd": saved,
        "saved_share": _ratio(saved, cum_baseline),
    }


def latency_panel(rows: Iterable[LatencyRow]) -> list[dict[str, Any]]:
    """p50 / p95 of the served answer per server (student first)."""
    ordered = sorted(rows, key=lambda r: (SERVER_ORDER.get(r.served_by, 9), r.served_by))
    return [
        {
            "served_by": r.served_by,
            "requests": r.requests,
            "p50_ms": _finite(r.p50_ms),
            "p95_ms": _finite(r.p95_ms),
            "p95_end_to_end_ms": _finite(r.p95_end_to_end_ms),
        }
        for r in ordered
    ]


def model_events_panel(events: Iterable[LifecycleEvent], limit: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """The most recent model events (candidate, promoted, rejected, rolled back), newest first."""
    found = sorted((e for e in events if isinstance(e, ModelEvent)), key=lambda e: e.created_at, reverse=True)
    return [
        {
            "created_at": _iso(e.created_at),
            "kind": e.kind,
            "model_name": e.model_name,
            "model_version": e.model_version,
            "metrics": {k: _finite(v) for k, v in sorted(e.metrics.items())},
            "agreement": _finite(e.metrics.get("agreement")),
            "gate_passed": e.gate.passed if e.gate else None,
            "gate_mode": e.gate.mode if e.gate else None,
            "gate_reasons": list(e.gate.reasons) if e.gate else [],
            "confidence_threshold": e.confidence_threshold,
            "snapshot_id": e.snapshot_id,
        }
        for e in found[:limit]
    ]


def retrain_events_panel(events: Iterable[LifecycleEvent], limit: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """The most recent retrain triggers, newest first, with their evidence (a JSON object when it parses)."""
    found = sorted((e for e in events if isinstance(e, RetrainTriggered)), key=lambda e: e.created_at, reverse=True)
    return [
        {"created_at": _iso(e.created_at), "reason": e.reason, "evidence": _evidence(e.evidence)} for e in found[:limit]
    ]


def datasets_panel(events: Iterable[LifecycleEvent], limit: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """The most recent dataset snapshots, newest first (what each training run learned from)."""
    found = sorted((e for e in events if isinstance(e, DatasetSnapshot)), key=lambda e: e.created_at, reverse=True)
    return [
        {"created_at": _iso(e.created_at), "snapshot_id": e.snapshot_id, "version": e.version} for e in found[:limit]
    ]


def lifecycle_panel(state: AgentLifecycle) -> dict[str, Any]:
    return {
        "stage": state.stage,
        "model_name": state.model_name,
        "model_version": state.model_version,
        "confidence_threshold": state.confidence_threshold,
        "validation_agreement": state.validation_agreement,
        "promoted_at": _iso(state.promoted_at),
        "last_event_at": _iso(state.last_event_at),
    }


def config_panel(config: AgentConfig | None) -> dict[str, Any]:
    """What agents.yaml says about the agent; an agent seen in the data but not configured gets the defaults,
    marked so the page can say so."""
    if config is None:
        return {"configured": False, "quality_threshold": Validation().quality_threshold}
    return {
        "configured": True,
        "description": config.description,
        "mode": config.mode,
        "tier": config.tier,
        "quality_threshold": config.validation.quality_threshold,
        "gate_mode": config.validation.gate_mode,
        "confidence_threshold": config.routing.confidence_threshold,
        "shadow_rate": config.routing.shadow_rate,
    }


# The two documents ---------------------------------------------------------------------------------------
def lifecycles(events: Iterable[LifecycleEvent]) -> dict[str, AgentLifecycle]:
    """Each agent's lifecycle state, folded from its events (services.core.lifecycle)."""
    by_agent: dict[str, list[LifecycleEvent]] = {}
    for event in events:
        by_agent.setdefault(event.agent_id, []).append(event)
    return {agent_id: fold(agent_id, evs) for agent_id, evs in by_agent.items()}


def agent_list(
    agents: AgentsFile | None, totals: Iterable[AgentTotals], events: Iterable[LifecycleEvent]
) -> list[dict[str, Any]]:
    """``/api/agents``: every agent that is configured, has traffic or has lifecycle events; configured ones
    first (in file order), then the others by their latest request."""
    by_id = {t.agent_id: t for t in totals}
    states = lifecycles(events)
    configured = list(agents.agents) if agents else []
    others = sorted(
        (set(by_id) | set(states)) - set(configured),
        key=lambda a: (-(by_id[a].last_at.timestamp() if a in by_id else 0.0), a),
    )
    out = []
    for agent_id in [*configured, *others]:
        t = by_id.get(agent_id)
        state = states.get(agent_id, AgentLifecycle(agent_id))
        out.append(
            {
                "agent_id": agent_id,
                "configured": agent_id in configured,
                "mode": agents.agents[agent_id].mode if agents and agent_id in agents.agents else None,
                "stage": state.stage,
                "model_version": state.model_version,
                "requests": t.requests if t else 0,
                "student_share": _ratio(t.student_served, t.requests) if t else None,
                "saved_usd": (t.teacher_only_usd - t.actual_usd) if t else 0.0,
                "agreement": _ratio(t.shadow_agreed, t.shadow_samples) if t else None,
                "last_request_at": _iso(t.last_at) if t else None,
            }
        )
    return out


def agent_page(
    agent_id: str,
    window: Window,
    config: AgentConfig | None,
    events: Iterable[LifecycleEvent],
    rows: WindowRows,
    totals: AgentTotals | None,
) -> dict[str, Any]:
    """``/api/agent/<id>``: every panel of one agent over one window."""
    mine = [e for e in events if e.agent_id == agent_id]
    state = fold(agent_id, mine)
    cfg = config_panel(config)
    starts = window.starts()
    traffic = traffic_panel(rows.traffic, starts)
    return {
        "agent_id": agent_id,
        "window": window.as_json(),
        "config": cfg,
        "lifecycle": lifecycle_panel(state),
        "traffic": traffic,
        "agreement": agreement_panel(rows.agreement, starts, cfg["quality_threshold"], state.validation_agreement),
        "cost": cost_panel(rows.cost, starts),
        "latency": latency_panel(rows.latency),
        "retrain_events": retrain_events_panel(mine),
        "model_events": model_events_panel(mine),
        "datasets": datasets_panel(mine),
        "all_time": {
            "requests": totals.requests if totals else 0,
            "saved_usd": (totals.teacher_only_usd - totals.actual_usd) if totals else 0.0,
            "first_request_at": _iso(totals.first_at) if totals else None,
            "last_request_at": _iso(totals.last_at) if totals else None,
        },
    }


def known(
    agent_id: str, agents: AgentsFile | None, totals: AgentTotals | None, events: Iterable[LifecycleEvent]
) -> bool:
    """Whether the dashboard has anything to show for ``agent_id``."""
    configured = agents is not None and agent_id in agents.agents
    return configured or totals is not None or any(e.agent_id == agent_id for e in events)


# Helpers -------------------------------------------------------------------------------------------------
def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _finite(value: float | None) -> float | None:
    """JSON has no NaN (quantile of nothing): None instead."""
    return value if value is not None and math.isfinite(value) else None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # ClickHouse DateTime64(…, 'UTC') read back naive by some client versions
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _evidence(raw: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw
