"""Lifecycle stages folded from events, and the router's per-agent state."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from services.core.agents import parse_agents
from services.core.lifecycle import AgentLifecycle, apply, fold
from services.core.records import AgentControl, DatasetSnapshot, ModelEvent, RetrainTriggered
from services.router.state import RouterState

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(minutes: int) -> datetime:
    return T + timedelta(minutes=minutes)


def model(kind: str, minutes: int, version: int | None = None, **kw) -> ModelEvent:
    return ModelEvent(
        agent_id="a", kind=kind, model_name="student_a", model_version=version, created_at=at(minutes), **kw
    )


def snapshot(minutes: int) -> DatasetSnapshot:
    return DatasetSnapshot(
        snapshot_id=f"s{minutes}", agent_id="a", version=1, content_hash="h", uri="u", created_at=at(minutes)
    )


def test_first_cycle() -> None:
    s = AgentLifecycle("a")
    assert s.stage == "grace" and not s.has_student
    s = apply(s, RetrainTriggered(agent_id="a", reason="grace_complete", created_at=at(1)))
    assert s.stage == "training"
    s = apply(s, snapshot(2))
    assert s.stage == "training"
    s = apply(s, model("candidate", 3))
    assert s.stage == "validating"
    s = apply(s, model("promoted", 4, version=1, confidence_threshold=0.7, metrics={"agreement": 0.95}))
    assert (s.stage, s.model_version, s.confidence_threshold, s.validation_agreement) == ("live", 1, 0.7, 0.95)


def test_rejected_without_a_student_goes_back_to_collecting() -> None:
    s = fold(
        "a",
        [
            RetrainTriggered(agent_id="a", reason="grace_complete", created_at=at(1)),
            model("candidate", 2),
            model("rejected", 3),
        ],
    )
    assert s.stage == "grace" and not s.has_student


def test_retrain_while_live_keeps_serving() -> None:
    s = fold(
        "a",
        [model("promoted", 1, version=1), RetrainTriggered(agent_id="a", reason="agreement_drift", created_at=at(2))],
    )
    assert (s.stage, s.model_version) == ("retraining", 1)
    s = apply(s, model("rejected", 3))
    assert (s.stage, s.model_version) == ("live", 1)
    s = apply(s, model("promoted", 4, version=2))
    assert (s.stage, s.model_version) == ("live", 2)
    s = apply(s, model("rolled_back", 5, version=1))
    assert (s.stage, s.model_version) == ("live", 1)


def test_fold_sorts_by_time_and_ignores_other_agents() -> None:
    other = ModelEvent(agent_id="b", kind="promoted", model_name="student_b", model_version=9, created_at=at(0))
    s = fold("a", [model("promoted", 5, version=2), model("candidate", 4), other])
    assert (s.stage, s.model_version) == ("live", 2)


AGENTS = parse_agents({"agents": {"a": {"routing": {"canary_steps": [0.5, 1.0], "canary_step_requests": 2}}}})


def test_a_failed_job_leaves_training_and_is_remembered_until_a_job_succeeds() -> None:
    trigger = RetrainTriggered(agent_id="a", reason="grace_complete", created_at=at(1))
    failed = model("failed", 3, error="OSError: snapshot folder not found")
    s = fold("a", [trigger, snapshot(2), failed])
    assert s.stage == "grace" and s.last_failure == (
        "2026-01-01 00:03:00 UTC, snapshot None: OSError: snapshot folder not found"
    )
    live = fold("a", [model("promoted", 1, version=1), snapshot(2), failed])
    assert live.stage == "live" and live.model_version == 1 and live.last_failure
    assert fold("a", [trigger, snapshot(2), failed, model("candidate", 4)]).last_failure is None


def test_router_state_view_follows_promotion_and_canary() -> None:
    state = RouterState(AGENTS)
    assert state.view("a").stage == "grace"
    state.apply_lifecycle(model("promoted", 1, version=1, confidence_threshold=0.6))
    v = state.view("a")
    assert (v.stage, v.has_student, v.confidence_threshold, v.canary_share) == ("live", True, 0.6, 0.5)
    state.count_eligible("a")
    state.count_eligible("a")
    assert state.view("a").canary_share == 1.0
    # A new promotion restarts the ramp; a replayed event is ignored.
    event = model("promoted", 2, version=2)
    state.apply_lifecycle(event)
    assert state.view("a").canary_share == 0.5
    state.count_eligible("a")
    state.count_eligible("a")
    state.apply_lifecycle(event)
    assert state.view("a").canary_share == 1.0


def test_control_changes_and_refusals() -> None:
    state = RouterState(AGENTS)
    refused = state.apply_control(AgentControl(agent_id="a", mode="student"))
    assert refused and "no promoted student" in refused
    assert state.apply_control(AgentControl(agent_id="zz", mode="teacher"))
    assert state.apply_control(AgentControl(agent_id="a", tier="gold"))
    assert state.apply_control(AgentControl(agent_id="a", mode="teacher", thresholds={"shadow_rate": 0.5})) is None
    v = state.view("a")
    assert (v.mode, v.shadow_rate) == ("teacher", 0.5)


def test_effective_settings_name_their_source() -> None:
    state = RouterState(AGENTS)
    before = {e.name: (e.value, e.source) for e in state.effective("a")}
    assert before["mode"] == (AGENTS.agent("a").mode, "agents.yaml")
    assert before["confidence_threshold"][1] == "agents.yaml"
    state.apply_lifecycle(model("promoted", 1, version=3, confidence_threshold=0.6))
    state.apply_control(
        AgentControl(
            agent_id="a",
            mode="student",
            thresholds={"shadow_rate": 0.2},
            changed_by="flywheel agent set",
            created_at=at(5),
        )
    )
    state.apply_control(AgentControl(agent_id="a", tier="gold", created_at=at(6)))  # refused: changes nothing
    after = {e.name: (e.value, e.source) for e in state.effective("a")}
    assert after["mode"] == ("student", "flywheel agent set, 2026-01-01 00:05:00 UTC")
    assert after["shadow_rate"] == ("0.200", "flywheel agent set, 2026-01-01 00:05:00 UTC")
    assert after["confidence_threshold"] == ("0.600", "calibrated with version 3")
    assert after["tier"] == (AGENTS.agent("a").tier, "agents.yaml")
    state.apply_lifecycle(model("promoted", 1, version=1))
    assert state.apply_control(AgentControl(agent_id="a", mode="student", tier="accuracy-optimized")) is None
    assert state.view("a").mode == "student"
    assert state.tier("a").teacher.output_per_1m == 15.0
