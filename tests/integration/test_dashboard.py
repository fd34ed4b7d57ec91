"""``flywheel dashboard`` on the real local ClickHouse endpoint: seeded interactions and lifecycle events, the
command run as a person runs it (a subprocess), its JSON checked figure by figure, and the page rendered by
headless Chromium with the seeded figures in its DOM.

Rows are written the way the logger writes them (its sinks), under an agent id of this run's own, with an
agents file of this module's own (quality threshold 0.9, so the page's threshold is visibly the configured one).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.core.codec import AvroCodec
from services.core.records import (
    Answer,
    ChatMessage,
    DatasetSnapshot,
    GateVerdict,
    Interaction,
    ModelEvent,
    RetrainTriggered,
)
from services.core.settings import Settings
from services.logger.rows import DATASETS, MODEL_EVENTS, RETRAIN_EVENTS
from services.logger.sink import InteractionSink, LifecycleSink
from services.stack.process import free_port
from tests.integration.test_cli import _env, _flywheel

pytestmark = pytest.mark.integration

AGENT = f"dash-{uuid.uuid4().hex[:8]}"
NOW = datetime.now(timezone.utc)
CHROMIUM = Path("/usr/bin/chromium")
TEACHER_COST, STUDENT_COST = 0.002, 0.0005


def content(intent: str, card: str = "visa") -> str:
    return f'{{"intent": "{intent}", "tool": "lookup", "arguments": {{"card": "{card}"}}, "reply": "ok"}}'


def interaction(
    name: str, minutes_ago: float, *, served_by: str, reason: str, stage: str, teacher: str | None = None,
    student: str | None = None, shadow: bool = False, cost: float, baseline: float,
) -> Interaction:  # fmt: skip
    at = NOW - timedelta(minutes=minutes_ago)
    t = Answer(content=teacher, model="reference/banking77", latency_ms=400.0) if teacher else None
    s = Answer(content=student, model="student", latency_ms=50.0, confidence=0.9) if student else None
    return Interaction(
        request_id=f"{AGENT}-{name}",
        conversation_id=f"{AGENT}-{name}",
        agent_id=AGENT,
        messages=[ChatMessage(role="user", content=f"question {name}")],
        teacher=t,
        student=s,
        served_by=served_by,  # type: ignore[arg-type]
        route_reason=reason,
        shadow=shadow,
        lifecycle_stage=stage,
        cost_usd=cost,
        teacher_only_cost_usd=baseline,
        received_at=at,
        responded_at=at + timedelta(milliseconds=60),
    )


def seed_interactions() -> list[Interaction]:
    t, s = TEACHER_COST, STUDENT_COST
    live = {"stage": "live"}
    rows = [
        interaction(f"grace-{i}", 110 - 5 * i, served_by="teacher", reason="grace_period", stage="grace",
                    teacher=content("balance"), cost=t, baseline=t)
        for i in range(4)
    ]  # fmt: skip
    rows += [
        interaction(f"confident-{i}", 60 - i, **live, served_by="student", reason="confident",
                    student=content("balance"), cost=s, baseline=t)
        for i in range(6)
    ]  # fmt: skip
    # Four shadow samples: three agree, one names other arguments.
    rows += [
        interaction(f"shadow-{i}", 50 - i, **live, served_by="student", reason="confident", shadow=True,
                    teacher=content("card_arrival"), student=content("card_arrival", "amex" if i == 3 else "visa"),
                    cost=t + s, baseline=t)
        for i in range(4)
    ]  # fmt: skip
    rows += [
        interaction(f"low-{i}", 40 - i, **live, served_by="teacher", reason="low_confidence",
                    teacher=content("balance"), student=content("balance"), cost=t + s, baseline=t)
        for i in range(2)
    ]  # fmt: skip
    return rows


# 16 requests: actual 4t + 6s + 4(t+s) + 2(t+s) = 0.026; teacher-only 16t = 0.032; saved 0.006.
EXPECTED_SAVED = 0.006
EXPECTED_AGREEMENT = 0.75


def seed_events() -> dict[Any, list]:
    def ago(minutes: float) -> datetime:
        return NOW - timedelta(minutes=minutes)

    model = f"student_{AGENT}"
    return {
        RETRAIN_EVENTS: [
            RetrainTriggered(agent_id=AGENT, reason="grace_complete", evidence='{"conversations": 300}',
                             created_at=ago(90)),
            RetrainTriggered(agent_id=AGENT, reason="agreement_drift",
                             evidence='{"agreement": 0.75, "samples": 4}', created_at=ago(20)),
        ],
        DATASETS: [
            DatasetSnapshot(snapshot_id=f"{AGENT}-snap-1", agent_id=AGENT, version=1, content_hash="h",
                            uri="file:///snap", created_at=ago(85)),
        ],
        MODEL_EVENTS: [
            ModelEvent(agent_id=AGENT, kind="candidate", model_name=model, metrics={"agreement": 0.95},
                       created_at=ago(80)),
            ModelEvent(agent_id=AGENT, kind="promoted", model_name=model, model_version=1,
                       metrics={"agreement": 0.95}, gate=GateVerdict(passed=True, mode="overall"),
                       confidence_threshold=0.8, created_at=ago(75)),
            ModelEvent(agent_id=AGENT, kind="rejected", model_name=model, model_version=2,
                       metrics={"agreement": 0.81},
                       gate=GateVerdict(passed=False, mode="overall", reasons=["agreement 0.8100 < 0.9000"]),
                       created_at=ago(10)),
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def seeded(clickhouse, settings: Settings) -> None:
    codec = AvroCodec()
    records = seed_interactions()
    sink = InteractionSink(settings, codec=codec)
    try:
        assert sink.write([codec.encode(r) for r in records]).written == len(records)
    finally:
        sink.close()
    lifecycle = LifecycleSink(settings)
    try:
        for spec, events in seed_events().items():
            assert lifecycle.write(spec, events).written == len(events)
    finally:
        lifecycle.close()


@pytest.fixture(scope="module")
def agents_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dashboard") / "agents.yaml"
    path.write_text(yaml.safe_dump({"agents": {AGENT: {"validation": {"quality_threshold": 0.9}}}}))
    return path


def _dashboard_env(settings: Settings, agents_file: Path, **extra: str) -> dict[str, str]:
    return _env(settings, FLYWHEEL_AGENTS_FILE=str(agents_file), **extra)


@pytest.fixture(scope="module")
def dashboard(seeded, settings: Settings, agents_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flywheel dashboard`` in a subprocess; yields its base URL; stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    logs = tmp_path_factory.mktemp("dashboard-logs")
    out, err = (logs / "stdout").open("w+"), (logs / "stderr").open("w+")
    proc = subprocess.Popen(
        [*_flywheel(), "dashboard", "--port", str(port)],
        env=_dashboard_env(settings, agents_file),
        stdout=out,
        stderr=err,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120  # a shared 2-core machine: generous
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flywheel dashboard exited with {proc.returncode}: {(logs / 'stderr').read_text()}")
            try:
                if httpx.get(url + "health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"flywheel dashboard did not answer on {url} within 120 s: {(logs / 'stderr').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        out.close()
        err.close()
    stdout = (logs / "stdout").read_text()
    assert url in stdout, f"the URL is not printed: {stdout!r}"
    assert proc.returncode == 0, (logs / "stderr").read_text()


def test_agent_api_shows_the_seeded_figures(dashboard: str) -> None:
    page = httpx.get(f"{dashboard}api/agent/{AGENT}", timeout=60).json()
    assert page["lifecycle"]["stage"] == "live"  # the rejected v2 leaves v1 serving
    assert page["lifecycle"]["model_version"] == 1
    assert page["window"]["name"] == "auto" and page["window"]["bucket_s"] == 120
    traffic = page["traffic"]
    assert traffic["total"] == 16
    assert traffic["by_server"] == {"student": 10, "teacher": 6}
    series = {(s["served_by"], s["route_reason"]): s["total"] for s in traffic["series"]}
    assert series == {("student", "confident"): 10, ("teacher", "grace_period"): 4, ("teacher", "low_confidence"): 2}
    assert all(len(s["counts"]) == len(traffic["buckets"]) for s in traffic["series"])
    ag = page["agreement"]
    assert (ag["samples"], ag["agreed"]) == (4, 3)
    assert ag["agreement"] == EXPECTED_AGREEMENT
    assert ag["threshold"] == 0.9  # from this module's agents file
    assert ag["validation_agreement"] == 0.95  # the promoted model's holdout agreement
    cost = page["cost"]
    assert cost["actual_usd"] == pytest.approx(0.026)
    assert cost["teacher_only_usd"] == pytest.approx(0.032)
    assert cost["saved_usd"] == pytest.approx(EXPECTED_SAVED)
    latency = {r["served_by"]: r for r in page["latency"]}
    assert latency["student"]["p50_ms"] == pytest.approx(50.0)
    assert latency["teacher"]["p95_ms"] == pytest.approx(400.0)
    assert [e["reason"] for e in page["retrain_events"]] == ["agreement_drift", "grace_complete"]
    assert [(e["kind"], e["model_version"]) for e in page["model_events"]] == [
        ("rejected", 2),
        ("promoted", 1),
        ("candidate", None),
    ]
    assert page["model_events"][0]["gate_reasons"] == ["agreement 0.8100 < 0.9000"]


def test_agents_api_lists_the_agent_first(dashboard: str) -> None:
    agents = httpx.get(f"{dashboard}api/agents", timeout=60).json()["agents"]
    mine = agents[0]  # configured agents come first; the session's other agents follow
    assert mine["agent_id"] == AGENT and mine["configured"] is True
    assert (mine["stage"], mine["requests"], mine["agreement"]) == ("live", 16, EXPECTED_AGREEMENT)
    assert mine["saved_usd"] == pytest.approx(EXPECTED_SAVED)


def test_api_errors_name_the_problem(dashboard: str) -> None:
    missing = httpx.get(f"{dashboard}api/agent/nobody-{AGENT}", timeout=60)
    assert missing.status_code == 404 and "nobody-" in missing.json()["error"]
    bad = httpx.get(f"{dashboard}api/agent/{AGENT}?window=2w", timeout=60)
    assert bad.status_code == 400 and "window '2w' is not known" in bad.json()["error"]
    fixed = httpx.get(f"{dashboard}api/agent/{AGENT}?window=6h", timeout=60).json()
    assert fixed["window"]["bucket_s"] == 600 and fixed["traffic"]["total"] == 16


def _text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'<[^>]*\bid="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id} in the rendered page"
    return match.group(1).strip()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_page_renders_the_seeded_figures_in_chromium(dashboard: str, tmp_path: Path) -> None:
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom",
        f"{dashboard}?agent={AGENT}",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)
    dom = out.stdout
    assert 'data-state="ready"' in dom, f"the page did not load its data: {dom[-3000:]!r} {out.stderr[-2000:]!r}"
    assert _text_of(dom, "agent-id") == AGENT
    assert _text_of(dom, "stage") == "live"
    assert _text_of(dom, "student-model") == f"student student_{AGENT} v1"
    assert _text_of(dom, "cost-saved") == "$0.0060"
    assert _text_of(dom, "agreement") == "75.0%"
    assert "threshold 90.0%" in _text_of(dom, "agreement-sub")
    assert _text_of(dom, "validation-agreement") == "95.0%"
    assert _text_of(dom, "requests") == "16"
    # The event tables and the charts are drawn.
    retrains = re.search(r'<table id="retrain-events">(.*?)</table>', dom, flags=re.S)
    assert retrains and "agreement_drift" in retrains.group(1) and "grace_complete" in retrains.group(1)
    models = re.search(r'<table id="model-events">(.*?)</table>', dom, flags=re.S)
    assert models and "rejected" in models.group(1) and "promoted" in models.group(1)
    assert "<rect" in dom and "threshold 90.0%" in dom  # traffic bars, the agreement chart's threshold line


def test_port_taken_is_a_clear_error(seeded, settings: Settings, agents_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [*_flywheel(), "dashboard"],
            env=_dashboard_env(settings, agents_file, FLYWHEEL_DASHBOARD_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "FLYWHEEL_DASHBOARD_PORT" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_clickhouse_unreachable_is_a_clear_error(settings: Settings, agents_file: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [*_flywheel(), "dashboard", "--port", str(free_port())],
        env=_dashboard_env(settings, agents_file, FLYWHEEL_CLICKHOUSE_URL=nowhere),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert nowhere in out.stderr and "FLYWHEEL_CLICKHOUSE_URL" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("database", [f"nothing_{uuid.uuid4().hex[:8]}", "system"], ids=["missing", "no-tables"])
def test_database_without_the_tables_is_a_clear_error(
    seeded, settings: Settings, agents_file: Path, database: str
) -> None:
    out = subprocess.run(
        [*_flywheel(), "dashboard", "--port", str(free_port())],
        env=_dashboard_env(settings, agents_file, FLYWHEEL_CLICKHOUSE_DATABASE=database),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "FLYWHEEL_CLICKHOUSE_DATABASE" in out.stderr and database in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
