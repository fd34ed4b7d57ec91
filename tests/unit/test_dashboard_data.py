"""The dashboard's data assembly (services.dashboard.data): literal rows and events in, JSON documents out."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from services.core.agents import parse_agents
from services.core.records import DatasetSnapshot, GateVerdict, ModelEvent, RetrainTriggered
from services.dashboard import data
from services.dashboard.data import AgentTotals, AgreementRow, CostRow, LatencyRow, TrafficRow, Window, WindowRows

NOW = datetime(2025, 3, 10, 12, 7, 30, tzinfo=timezone.utc)
T0 = int(datetime(2025, 3, 10, 11, 0, tzinfo=timezone.utc).timestamp())


def window(buckets: int = 3, bucket_s: int = 600) -> Window:
    since = datetime.fromtimestamp(T0, timezone.utc)
    return Window("test", since, since + timedelta(seconds=bucket_s * (buckets - 1) + 5), bucket_s)


def at(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


AGENTS = parse_agents(
    {
        "agents": {
            "support-bot": {"validation": {"quality_threshold": 0.9}, "routing": {"shadow_rate": 0.1}},
            "router-bot": {"mode": "teacher", "tier": "accuracy-optimized"},
        }
    }
)


def events() -> list:
    return [
        RetrainTriggered(agent_id="support-bot", reason="grace_complete", evidence='{"conversations": 300}',
                         created_at=at(50)),
        DatasetSnapshot(snapshot_id="snap-1", agent_id="support-bot", version=1, content_hash="h", uri="file:///s",
                        created_at=at(45)),
        ModelEvent(agent_id="support-bot", kind="candidate", model_name="student_support-bot", model_version=None,
                   metrics={"agreement": 0.95}, created_at=at(40)),
        ModelEvent(agent_id="support-bot", kind="promoted", model_name="student_support-bot", model_version=1,
                   metrics={"agreement": 0.95, "coverage": 0.7}, gate=GateVerdict(passed=True, mode="overall"),
                   confidence_threshold=0.8, created_at=at(30)),
        RetrainTriggered(agent_id="support-bot", reason="agreement_drift", evidence="not json", created_at=at(10)),
        ModelEvent(agent_id="support-bot", kind="rejected", model_name="student_support-bot", model_version=2,
                   metrics={"agreement": 0.8},
                   gate=GateVerdict(passed=False, mode="overall", reasons=["agreement 0.80 < 0.90"]),
                   created_at=at(5)),
        RetrainTriggered(agent_id="other", reason="manual", created_at=at(1)),
    ]  # fmt: skip


# The window ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("span", "bucket"),
    [
        (timedelta(minutes=15), 60),
        (timedelta(hours=1), 60),
        (timedelta(hours=1, seconds=1), 120),
        (timedelta(hours=6), 600),
        (timedelta(hours=24), 1800),
        (timedelta(days=7), 10800),
        (timedelta(days=30), 43200),
        (timedelta(days=90), 2 * 86400),
    ],
)
def test_bucket_for_keeps_at_most_max_buckets(span: timedelta, bucket: int) -> None:
    assert data.bucket_for(span) == bucket
    assert span.total_seconds() / bucket <= data.MAX_BUCKETS


def test_fixed_window_is_floored_to_whole_buckets() -> None:
    w = data.choose_window("1h", NOW, first_seen=None)
    assert w.bucket_s == 60
    assert w.since == datetime(2025, 3, 10, 11, 7, tzinfo=timezone.utc)
    assert w.until == NOW
    starts = w.starts()
    assert starts[0] == int(w.since.timestamp())
    assert starts[-1] == int(datetime(2025, 3, 10, 12, 7, tzinfo=timezone.utc).timestamp())
    assert len(starts) == 61


def test_auto_window_spans_the_agents_traffic_with_a_minimum() -> None:
    w = data.choose_window("auto", NOW, first_seen=NOW - timedelta(hours=2))
    assert w.bucket_s == 120
    assert w.since <= NOW - timedelta(hours=2) < w.since + timedelta(seconds=w.bucket_s)
    fresh = data.choose_window("auto", NOW, first_seen=NOW - timedelta(seconds=30))
    assert NOW - fresh.since >= data.AUTO_MIN
    nothing = data.choose_window("auto", NOW, first_seen=None)
    assert nothing.bucket_s == 60
    ancient = data.choose_window("auto", NOW, first_seen=NOW - timedelta(days=400))
    assert NOW - ancient.since <= data.AUTO_MAX + timedelta(seconds=ancient.bucket_s)


def test_unknown_window_names_the_known_ones() -> None:
    with pytest.raises(data.WindowError, match=r"window '2w' is not known; use one of auto, 1h, 6h, 24h, 7d, 30d"):
        data.choose_window("2w", NOW, None)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        data.choose_window("1h", NOW.replace(tzinfo=None), None)


# Panels --------------------------------------------------------------------------------------------------
def test_traffic_fills_empty_buckets_and_orders_student_first() -> None:
    starts = window().starts()
    rows = [
        TrafficRow(T0, "teacher", "grace_period", 5),
        TrafficRow(T0 + 1200, "student", "confident", 6),
        TrafficRow(T0 + 1200, "teacher", "low_confidence", 2),
        TrafficRow(T0 + 1200, "none", "canary_holdout", 1),
        TrafficRow(T0 + 99_999, "student", "confident", 7),  # after now: not drawn
    ]
    panel = data.traffic_panel(rows, starts)
    assert panel["buckets"] == [T0, T0 + 600, T0 + 1200]
    assert [(s["served_by"], s["route_reason"], s["counts"]) for s in panel["series"]] == [
        ("student", "confident", [0, 0, 6]),
        ("teacher", "grace_period", [5, 0, 0]),
        ("teacher", "low_confidence", [0, 0, 2]),
        ("none", "canary_holdout", [0, 0, 1]),
    ]
    assert panel["total"] == 14
    assert panel["by_server"] == {"student": 6, "teacher": 7, "none": 1}
    assert panel["student_share"] == pytest.approx(6 / 14)


def test_traffic_of_nothing() -> None:
    panel = data.traffic_panel([], window().starts())
    assert panel["series"] == [] and panel["total"] == 0 and panel["student_share"] is None


def test_agreement_per_bucket_and_overall_with_its_lines() -> None:
    rows = [AgreementRow(T0, 4, 3), AgreementRow(T0 + 1200, 2, 2)]
    panel = data.agreement_panel(rows, window().starts(), threshold=0.92, validation_agreement=0.95)
    assert [(b["samples"], b["agreed"], b["agreement"]) for b in panel["buckets"]] == [
        (4, 3, 0.75),
        (0, 0, None),  # no shadow samples: a gap, not 0 %
        (2, 2, 1.0),
    ]
    assert (panel["samples"], panel["agreed"]) == (6, 5)
    assert panel["agreement"] == pytest.approx(5 / 6)
    assert (panel["threshold"], panel["validation_agreement"]) == (0.92, 0.95)
    empty = data.agreement_panel([], window().starts(), 0.92, None)
    assert empty["agreement"] is None and empty["validation_agreement"] is None


def test_cost_is_cumulative_and_saved_against_the_teacher_only_baseline() -> None:
    rows = [CostRow(T0, 4, 0.008, 0.008), CostRow(T0 + 1200, 12, 0.018, 0.024)]
    panel = data.cost_panel(rows, window().starts())
    assert [round(b["cumulative_actual_usd"], 6) for b in panel["buckets"]] == [0.008, 0.008, 0.026]
    assert [round(b["cumulative_teacher_only_usd"], 6) for b in panel["buckets"]] == [0.008, 0.008, 0.032]
    assert panel["saved_usd"] == pytest.approx(0.006)
    assert panel["saved_share"] == pytest.approx(0.1875)
    # Shadows during the grace period cost more than the teacher alone: the saving is negative.
    negative = data.cost_panel([CostRow(T0, 1, 0.0025, 0.002)], window().starts())
    assert negative["saved_usd"] == pytest.approx(-0.0005)
    assert data.cost_panel([], window().starts())["saved_share"] is None


def test_latency_orders_servers_and_drops_nan() -> None:
    rows = [
        LatencyRow("teacher", 3, 450.0, 700.0, 712.0),
        LatencyRow("student", 6, 44.0, float("nan"), 60.0),
    ]
    assert data.latency_panel(rows) == [
        {"served_by": "student", "requests": 6, "p50_ms": 44.0, "p95_ms": None, "p95_end_to_end_ms": 60.0},
        {"served_by": "teacher", "requests": 3, "p50_ms": 450.0, "p95_ms": 700.0, "p95_end_to_end_ms": 712.0},
    ]


def test_event_panels_newest_first_with_gate_and_evidence() -> None:
    evs = [e for e in events() if e.agent_id == "support-bot"]
    models = data.model_events_panel(evs)
    assert [(m["kind"], m["model_version"]) for m in models] == [("rejected", 2), ("promoted", 1), ("candidate", None)]
    assert models[0]["gate_passed"] is False and models[0]["gate_reasons"] == ["agreement 0.80 < 0.90"]
    assert models[1]["agreement"] == 0.95 and models[1]["confidence_threshold"] == 0.8
    assert models[2]["gate_passed"] is None
    assert models[0]["created_at"].endswith("Z")
    retrains = data.retrain_events_panel(evs)
    assert [r["reason"] for r in retrains] == ["agreement_drift", "grace_complete"]
    assert retrains[0]["evidence"] == "not json"  # shown as it is
    assert retrains[1]["evidence"] == {"conversations": 300}
    assert data.retrain_events_panel(evs, limit=1) == retrains[:1]
    assert [d["snapshot_id"] for d in data.datasets_panel(evs)] == ["snap-1"]


def test_config_panel_of_a_configured_and_an_unknown_agent() -> None:
    cfg = data.config_panel(AGENTS.agent("support-bot"))
    assert cfg["configured"] is True
    assert (cfg["quality_threshold"], cfg["shadow_rate"], cfg["mode"]) == (0.9, 0.1, "auto")
    assert data.config_panel(None) == {"configured": False, "quality_threshold": 0.92}


# The documents ---------------------------------------------------------------------------------------------
def totals(agent_id: str, last_minutes: float, **kw: float) -> AgentTotals:
    base = {
        "requests": 16,
        "student_served": 10,
        "teacher_served": 6,
        "failed": 0,
        "actual_usd": 0.026,
        "teacher_only_usd": 0.032,
        "shadow_samples": 4,
        "shadow_agreed": 3,
    }
    return AgentTotals(agent_id=agent_id, first_at=at(120), last_at=at(last_minutes), **{**base, **kw})  # type: ignore[arg-type]


def test_agent_list_configured_first_then_others_by_latest_request() -> None:
    listed = data.agent_list(AGENTS, [totals("support-bot", 1), totals("old-bot", 60), totals("new-bot", 2)], events())
    assert [a["agent_id"] for a in listed] == ["support-bot", "router-bot", "new-bot", "old-bot", "other"]
    bot = listed[0]
    assert (bot["stage"], bot["model_version"], bot["mode"], bot["configured"]) == ("live", 1, "auto", True)
    assert bot["saved_usd"] == pytest.approx(0.006)
    assert bot["agreement"] == 0.75
    assert bot["student_share"] == pytest.approx(10 / 16)
    router = listed[1]  # configured, no traffic, no events
    assert (router["stage"], router["requests"], router["agreement"], router["mode"]) == ("grace", 0, None, "teacher")
    other = listed[-1]  # only an event
    assert (other["stage"], other["configured"], other["mode"]) == ("training", False, None)
    json.dumps(listed)  # the document is JSON as it is


def test_agent_page_assembles_every_panel() -> None:
    w = window()
    rows = WindowRows(
        traffic=[TrafficRow(T0, "student", "confident", 6)],
        agreement=[AgreementRow(T0, 4, 3)],
        cost=[CostRow(T0, 6, 0.003, 0.012)],
        latency=[LatencyRow("student", 6, 44.0, 50.0, 60.0)],
    )
    page = data.agent_page("support-bot", w, AGENTS.agent("support-bot"), events(), rows, totals("support-bot", 1))
    assert page["lifecycle"]["stage"] == "live"  # the rejected retrain keeps v1 serving
    assert page["lifecycle"]["model_version"] == 1
    assert page["lifecycle"]["validation_agreement"] == 0.95
    assert page["agreement"]["threshold"] == 0.9  # from agents.yaml, not the default
    assert page["agreement"]["validation_agreement"] == 0.95
    assert page["agreement"]["agreement"] == 0.75
    assert page["cost"]["saved_usd"] == pytest.approx(0.009)
    assert page["window"] == {"name": "test", "since": "2025-03-10T11:00:00Z", "until": "2025-03-10T11:20:05Z",
                              "bucket_s": 600}  # fmt: skip
    assert [r["reason"] for r in page["retrain_events"]] == ["agreement_drift", "grace_complete"]  # not "other"'s
    assert len(page["model_events"]) == 3
    assert page["all_time"]["requests"] == 16
    json.dumps(page)


def test_known_agents() -> None:
    assert data.known("router-bot", AGENTS, None, [])
    assert data.known("other", None, None, events())
    assert data.known("x", None, totals("x", 1), [])
    assert not data.known("nobody", AGENTS, None, events())
