"""The ``flywheel`` command line, run as a person runs it (a subprocess), against the session's stack."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.settings import Settings

pytestmark = pytest.mark.integration


def _flywheel() -> list[str]:
    script = Path(sys.executable).parent / "flywheel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_HOME=str(settings.home),
        FLYWHEEL_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        FLYWHEEL_CLICKHOUSE_URL=settings.clickhouse_url,
        FLYWHEEL_TRITON_HTTP_URL=settings.triton_http_url,
        FLYWHEEL_TRITON_GRPC_URL=settings.triton_grpc_url,
        FLYWHEEL_TRITON_METRICS_PORT=str(settings.triton_metrics_port),
        FLYWHEEL_TEACHER_URL=settings.teacher_url,
        FLYWHEEL_GATEWAY_URL=settings.gateway_url,
        COLUMNS="200",
    )
    env.update(extra)
    return env


def run(settings: Settings, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_flywheel(), *args], env=_env(settings, **env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def stack(broker, clickhouse, triton, teacher):
    return broker, clickhouse, triton, teacher


def test_status_shows_each_part_and_the_broker_caveat(stack, settings: Settings) -> None:
    out = run(settings, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    services = ("logger", "router", "curator", "trainer", "drift_monitor")
    for part in ("broker", "clickhouse", "triton", "teacher", *services):
        row = next((line for line in lines if f" {part} " in line), "")
        # This module starts only the infrastructure; the services may or may not run by now.
        assert ("running" in row) if part in ("broker", "clickhouse", "triton", "teacher") else row, part
    assert (
        "do not survive a broker restart" in out.stdout.replace("\n", " ").replace("│", " ") or "memory" in out.stdout
    )


def test_sql_table_csv_and_json(stack, settings: Settings) -> None:
    query = "SELECT number AS n, toString(number * 2) AS s FROM system.numbers LIMIT 3"
    table = run(settings, "sql", query)
    assert table.returncode == 0, table.stderr
    assert "3 rows" in table.stdout
    csv_out = run(settings, "sql", query, "--format", "csv")
    assert csv_out.stdout.strip().splitlines() == ["n,s", "0,0", "1,2", "2,4"]
    rows = json.loads(run(settings, "sql", query, "--format", "json").stdout)
    assert rows[2] == {"n": 2, "s": "4"}


def test_sql_with_parameters(stack, settings: Settings) -> None:
    out = run(
        settings,
        "sql",
        "SELECT {a:String} AS a, {n:UInt32} + 1 AS n",
        "--param",
        "a=support-bot",
        "--param",
        "n=41",
        "--format",
        "csv",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["a,n", "support-bot,42"]


def test_sql_error_shows_clickhouse_text(stack, settings: Settings) -> None:
    out = run(settings, "sql", "SELECT * FROM no_such_table")
    assert out.returncode == 1
    assert "no_such_table" in out.stderr
    assert "Traceback" not in out.stderr


def test_migrations_applied_once(stack, settings: Settings) -> None:
    out = run(settings, "sql", "SELECT name FROM schema_migrations ORDER BY version", "--format", "csv")
    names = out.stdout.strip().splitlines()[1:]
    assert names and len(names) == len(set(names))
    assert len(names) == len(list(Path("infra/clickhouse").glob("[0-9]*.sql")))


def test_smoke_round_trip(stack, settings: Settings, stack_manager) -> None:
    from tests.conftest import start_services

    start_services(stack_manager, settings)  # with the shipped agents.yaml
    out = run(settings, "smoke", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("✓") == 4


def test_replay_and_send_through_the_router(stack, settings: Settings, stack_manager) -> None:
    from tests.conftest import start_services

    if stack_manager.running_pid("router") is None:
        start_services(stack_manager, settings)
    out = run(settings, "replay", "--agent", "support-bot", "--count", "20", "--rate", "0", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "20/20 answered" in out.stdout and "teacher: 20" in out.stdout
    sent = run(settings, "send", "My card has not arrived yet", "--agent", "support-bot", "--json")
    assert sent.returncode == 0, sent.stderr
    response = json.loads(sent.stdout)
    assert response["served_by"] == "teacher" and '"intent"' in response["content"]
    unknown = run(settings, "send", "hello", "--agent", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr and "support-bot" in unknown.stderr


def test_agent_list_shows_run_time_changes_and_where_each_setting_came_from(stack, settings: Settings) -> None:
    before = run(settings, "agent", "list", COLUMNS="400")
    assert before.returncode == 0, before.stderr
    line = next(x for x in before.stdout.splitlines() if "support-bot" in x)
    assert "(agents.yaml)" in line
    changed = run(
        settings, "agent", "set", "support-bot", "--tier", "accuracy-optimized", "--threshold", "shadow_rate=0.25"
    )
    assert changed.returncode == 0, changed.stderr
    after = run(settings, "agent", "list", COLUMNS="400")
    assert after.returncode == 0, after.stderr
    line = next(x for x in after.stdout.splitlines() if "support-bot" in x)
    assert "accuracy-optimized (flywheel agent set, " in line and "0.250 (flywheel agent set, " in line


def test_unreachable_clickhouse_is_named(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run(settings, "sql", "SELECT 1", FLYWHEEL_CLICKHOUSE_URL=f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_bad_setting_is_named(settings: Settings) -> None:
    out = run(settings, "status", FLYWHEEL_KAFKA_BOOTSTRAP="not-a-host-port")
    assert out.returncode == 1
    assert "FLYWHEEL_KAFKA_BOOTSTRAP" in out.stderr


def test_up_refuses_a_taken_port(tmp_path: Path, settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run(settings, "up", FLYWHEEL_HOME=str(tmp_path), FLYWHEEL_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "FLYWHEEL_KAFKA_BOOTSTRAP" in out.stderr


def test_up_names_a_missing_binary(tmp_path: Path, settings: Settings) -> None:
    from services.stack.process import free_port

    out = run(
        settings,
        "up",
        FLYWHEEL_HOME=str(tmp_path),
        FLYWHEEL_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        FLYWHEEL_TANSU_BIN="/nonexistent/tansu",
    )
    assert out.returncode == 1
    assert "/nonexistent/tansu" in out.stderr and "FLYWHEEL_TANSU_BIN" in out.stderr


def test_up_status_down_cycle(tmp_path: Path, settings: Settings) -> None:
    """A whole local stack of its own: up shows where each part listens, a second up adopts it, down stops it."""
    from services.stack.process import free_port

    ports = dict(
        FLYWHEEL_HOME=str(tmp_path),
        FLYWHEEL_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        FLYWHEEL_CLICKHOUSE_URL=f"http://127.0.0.1:{free_port()}",
        FLYWHEEL_TRITON_HTTP_URL=f"127.0.0.1:{free_port()}",
        FLYWHEEL_TRITON_GRPC_URL=f"127.0.0.1:{free_port()}",
        FLYWHEEL_TRITON_METRICS_PORT=str(free_port()),
        FLYWHEEL_TEACHER_URL=f"http://127.0.0.1:{free_port()}/v1",
        FLYWHEEL_GATEWAY_URL=f"http://127.0.0.1:{free_port()}",
    )
    try:
        up = run(settings, "up", timeout=300, **ports)
        assert up.returncode == 0, up.stdout + up.stderr
        for where in (ports["FLYWHEEL_KAFKA_BOOTSTRAP"], ports["FLYWHEEL_CLICKHOUSE_URL"]):
            assert where in up.stdout
        again = run(settings, "up", timeout=120, **ports)
        assert again.returncode == 0 and again.stdout.count("already running") == 10, again.stdout
    finally:
        down = run(settings, "down", **ports)
    assert down.returncode == 0, down.stderr
    parts = ("broker", "triton", "teacher", "router", "logger", "gateway", "curator", "trainer", "drift_monitor")
    assert all(part in down.stdout for part in parts)
    status = run(settings, "status", **ports)
    assert status.stdout.count("stopped") == 10


def test_dlq_list_show_and_replay(stack, settings: Settings) -> None:
    import uuid

    from services.core.clickhouse import client
    from services.core.codec import AvroCodec
    from services.core.records import ChatMessage, DeadLetter, InferenceRequest
    from services.logger.rows import DEAD_LETTERS, StoredDeadLetter, dead_letter_row

    marker = uuid.uuid4().hex[:12]
    request = InferenceRequest(
        conversation_id=f"c-{marker}", agent_id=f"nobody-{marker}", messages=[ChatMessage(role="user", content="hi")]
    )
    letter_id = f"flywheel.requests.dlq:0:{marker}"
    letter = DeadLetter(
        source_topic="flywheel.requests",
        partition=1,
        offset=7,
        key=request.conversation_id.encode(),
        value=AvroCodec().encode(request),
        error_kind="unknown_agent",
        error=f"unknown agent nobody-{marker}",
        service="router",
    )
    ch = client(settings)
    try:  # as the logger stores a dead letter of flywheel.requests.dlq
        stored = StoredDeadLetter(letter_id, "flywheel.requests.dlq", letter)
        ch.insert(DEAD_LETTERS.table, [dead_letter_row(stored)], column_names=list(DEAD_LETTERS.columns))
    finally:
        ch.close()
    listed = run(settings, "dlq", "list", "--topic", "requests", "--kind", "unknown_agent")
    assert listed.returncode == 0, listed.stderr
    assert letter_id in listed.stdout and f"nobody-{marker}" in listed.stdout
    shown = run(settings, "dlq", "show", letter_id)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["record"]["agent_id"] == f"nobody-{marker}" and detail["source"]["offset"] == 7
    fixed = Path(settings.home) / f"fixed-{marker}.json"
    fixed.write_text(json.dumps({**detail["record"], "agent_id": "support-bot"}))
    replayed = run(settings, "dlq", "replay", letter_id, "--fixed", str(fixed))
    assert replayed.returncode == 0 and "replayed 1 dead letter" in replayed.stdout, replayed.stderr
    again = json.loads(run(settings, "dlq", "show", letter_id).stdout)
    assert again["replays"] == 1
    missing = run(settings, "dlq", "show", "flywheel.requests.dlq:0:999999999")
    assert missing.returncode == 1 and "no dead letter" in missing.stderr


def test_import_history_twice_adds_it_once_and_reports_bad_lines(
    stack, settings: Settings, stack_manager, tmp_path: Path
) -> None:
    import time
    import uuid

    from services.core.clickhouse import client
    from tests.conftest import start_services

    if stack_manager.running_pid("logger") is None:
        start_services(stack_manager, settings, ("logger",))
    marker = uuid.uuid4().hex[:8]
    history = tmp_path / "history.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"[{marker}] question {i}: where is my card?"},
                    {"role": "assistant", "content": '{"intent": "card_arrival", "tool": "card_delivery_status"}'},
                ]
            }
        )
        for i in range(500)
    ]
    history.write_text("\n".join([*lines[:250], "{broken", *lines[250:]]) + "\n")

    def stored() -> int:
        ch = client(settings)
        try:
            sql = "SELECT count() FROM interactions WHERE route_reason = 'imported' AND user_text LIKE {m:String}"
            return int(ch.command(sql, parameters={"m": f"[{marker}]%"}))
        finally:
            ch.close()

    def wait_for(n: int) -> int:
        deadline = time.monotonic() + 90
        while (got := stored()) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        return got

    out = run(settings, "import", "--agent", "support-bot", str(history))
    assert out.returncode == 0, out.stderr
    assert "imported 500 interactions" in out.stdout and "1 bad line" in out.stderr and "line 251" in out.stderr
    rejected = [json.loads(x) for x in (tmp_path / "history.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in rejected] == [(251, "{broken")]
    assert wait_for(500) == 500
    again = run(settings, "import", "--agent", "support-bot", str(history))
    assert again.returncode == 0, again.stderr
    assert "imported 0 interactions for support-bot" in again.stdout and "(500 already imported)" in again.stdout
    # A new line after the re-import: once it is stored, the re-imported ones have been read (and skipped).
    extra = tmp_path / "extra.jsonl"
    extra.write_text(lines[0].replace("question 0", "question 500") + "\n")
    assert run(settings, "import", "--agent", "support-bot", str(extra)).returncode == 0
    assert wait_for(501) == 501
    time.sleep(2)
    assert stored() == 501
    unknown = run(settings, "import", "--agent", "nobody", str(extra))
    assert unknown.returncode == 1 and "nobody" in unknown.stderr


async def test_replay_of_your_own_data_set_and_the_teacher_answers_it(stack, settings: Settings, stack_manager) -> None:
    """`flywheel replay --data` reads a CSV the project has never seen, registers it, and the stack's reference
    teacher (its own process, started before) answers it as reference/<name>; a bad file is refused by line."""
    from services.core.records import ChatMessage
    from services.teacher.openai_client import OpenAICompatibleTeacher
    from tests.conftest import start_services

    if stack_manager.running_pid("router") is None:
        start_services(stack_manager, settings)
    data = settings.home / "smart_home.csv"
    rows = ["turn the lights off,lights_off", "switch off the lamp,lights_off", "lights on please,lights_on"]
    rows += ["what's the temperature inside,thermostat_query", "is it warm in the kitchen,thermostat_query"]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = run(settings, "replay", "--agent", "support-bot", "--data", str(data), "--count", "6", "--rate", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6/6 answered" in out.stdout and "reference/smart_home" in out.stderr  # the agent's teacher differs
    async with OpenAICompatibleTeacher(settings.teacher_url, max_retries=0) as teacher:
        done = await teacher.complete(
            [ChatMessage(role="user", content="turn the lights off")], model="reference/smart_home"
        )
    assert json.loads(done.content or "{}")["intent"] == "lights_off"
    bad = settings.home / "bad.csv"
    bad.write_text("text,label\nfine,ok\n,empty\n")
    refused = run(settings, "replay", "--agent", "support-bot", "--data", str(bad))
    assert refused.returncode == 1 and "line 3: 'text' is missing or empty" in refused.stderr
