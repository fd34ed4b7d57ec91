"""`flywheel demo`'s run on the real local stack, shrunk: a tiny base model and a few dozen requests per phase,
every service a process. The whole flywheel turns once and a half: grace period → training → promotion → the
student live → held-back intents arrive → the drift monitor fires → the curator's new snapshot → retrain →
promotion of a second version → recovery; then the report's figures and timeline come from ClickHouse.

It runs on a data set of its own, as `flywheel demo --data` does: labels that no built-in workload has, with a
mapping to tools, registered where the stack's reference teacher (its own process) finds it."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from services.core.settings import Settings
from services.demo.plan import DemoPlan, Phase
from services.demo.run import Demo, check_fresh
from tests.helpers.tiny_model import LAX_VALIDATION

pytestmark = pytest.mark.integration

AGENT = f"demo-{uuid.uuid4().hex[:6]}"
# The data set's labels, from BANKING77 messages relabelled: a contract the reference teacher has no table for.
RELABEL = {
    "card_arrival": "where_is_my_card",
    "exchange_rate": "fx_rate",
    "top_up_failed": "topup_failed",
    "lost_or_stolen_card": "card_lost",
    "card_swallowed": "atm_kept_card",
    "atm_support": "atm_help",
}
INTENTS = ("where_is_my_card", "fx_rate", "topup_failed", "card_lost")
HELD_BACK = ("atm_kept_card", "atm_help")
DATA_SET = f"own-{AGENT}"


def own_data_set(folder: Path, home: Path):
    """The test's data set as a user would write it (JSONL and a mapping), loaded and registered."""
    from services.core.settings import REPO_ROOT
    from services.teacher.datasets import load_file, register
    from services.teacher.workloads import load_workload

    banking = load_workload("banking77", REPO_ROOT / "data")
    data = folder / f"{DATA_SET}.jsonl"
    with data.open("w") as fh:
        for e in banking.examples():
            if e.intent in RELABEL:
                row = {"text": e.text, "label": RELABEL[e.intent], "arguments": dict(e.arguments), "split": e.split}
                fh.write(json.dumps(row) + "\n")
    mapping = folder / "mapping.yaml"
    tools = {"card_lost": "block_card", "atm_kept_card": "block_card", "fx_rate": "rates"}
    mapping.write_text(yaml.safe_dump({"labels": {label: {"tool": tool} for label, tool in tools.items()}}))
    workload = load_file(data, mapping)
    register(workload, home)
    return workload


@pytest.fixture(scope="module")
def demo_settings(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory):
    from tests.conftest import start_services
    from tests.helpers.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("demo-base"))
    agents_file = tmp_path_factory.mktemp("demo-agents") / "agents.yaml"
    workload = own_data_set(agents_file.parent, settings.home.absolute())
    agent = {
        "teacher": {"model": workload.model},
        "grace_period": {"min_conversations": 40, "min_unique_intents": 4},
        "distillation": {
            "base_model": str(base),
            "epochs": 1,
            "learning_rate": 0.001,
            "max_train_examples": 48,
            "max_seq_len": 128,
        },
        # A tiny random model cannot agree with the teacher: the gate is open so the run follows the promotion
        # path (the gate has its own tests). The teacher shadows every answer, so every request has an intent.
        "validation": LAX_VALIDATION,
        "routing": {"canary_steps": [1.0], "shadow_rate": 1.0},
        "drift": {"window_minutes": 1.0, "min_samples": 10},
    }
    agents_file.write_text(yaml.safe_dump({"agents": {AGENT: agent}}))
    svc = settings.model_copy(
        update={"agents_file": agents_file, "curator_check_interval_s": 1.0, "drift_check_interval_s": 1.0}
    )
    start_services(stack_manager, svc, ("logger", "router", "curator", "trainer", "drift_monitor"))
    yield svc
    for name in ("curator", "trainer", "drift_monitor"):
        stack_manager.stop(name)


async def test_the_demo_turns_the_flywheel_and_reports_it(demo_settings: Settings, tmp_path) -> None:
    check_fresh(demo_settings, AGENT)  # a new agent: nothing in the store yet
    plan = DemoPlan(
        agent_id=AGENT,
        workload=DATA_SET,
        intents=INTENTS,
        held_back=HELD_BACK,
        phases=(
            Phase("grace", "grace", 48, "train", concurrency=16, seed=3),
            Phase("live", "live", 12, "test", concurrency=4, seed=5),
            Phase("drift", "drift", 24, "test", held_back_share=0.75, concurrency=4, seed=7),
            Phase("recovery", "recovery", 8, "test", held_back_share=0.5, concurrency=4, seed=9),
        ),
        wait_training_s=600,
        wait_drift_s=240,
        retries=0,
    )
    out = io.StringIO()
    report = await Demo(demo_settings, plan, Console(file=out, width=140), tmp_path).run()
    text = out.getvalue()

    assert [p.name for p in report.phases] == ["grace", "live", "drift", "recovery"], (report.notes, text)
    grace, live, drift, recovery = report.phases
    assert [p.requests for p in (grace, live, recovery)] == [48, 12, 8]
    assert 0 < drift.requests <= 24  # the drift phase stops when the monitor fires
    assert grace.teacher == 48 and grace.student == 0
    assert live.student_eligible == 12 and live.shadow_samples > 0  # the student answered, the teacher shadowed
    assert all(p.failed == 0 for p in report.phases)
    events = [t.what for t in report.timeline]
    assert events[0] == "retrain triggered: grace_complete", events
    drift_triggers = [e for e in events if e.startswith("retrain triggered:") and "grace_complete" not in e]
    assert len(drift_triggers) == 1, events  # one drift, one retrain (the cool-down holds)
    promotions = [e for e in events if e.startswith("promoted as version")]
    assert len(promotions) == 2, events
    assert events.index(drift_triggers[0]) < events.index(promotions[1])
    assert recovery.requests == 8 and report.notes == []

    saved = json.loads((tmp_path / "report.json").read_text())
    for key in (
        "agreement_holdout",
        "agreement_live",
        "fallback_rate",
        "student_share",
        "cost_usd",
        "teacher_only_cost_usd",
        "savings_pct",
        "teacher_p95_ms",
        "student_p95_ms",
    ):
        assert key in saved, key
    assert saved["requests"] == 68 + drift.requests and len(saved["timeline"]) == len(report.timeline)
    md = (tmp_path / "report.md").read_text()
    assert "## Stage timeline" in md and "| recovery | 8 |" in md
    with pytest.raises(Exception, match="already been through the flywheel"):
        check_fresh(demo_settings, AGENT)
