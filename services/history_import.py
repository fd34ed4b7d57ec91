"""Importing an agent's history: logs of its teacher become interactions, so they count toward the grace period
and are curated like live traffic (``flywheel import --agent A FILE``).

Two line formats, one JSON object per line (told apart per line):

* chat fine-tuning JSONL: ``{"messages": [..., {"role": "assistant", ...}]}``; the last assistant turn is the
  teacher's answer, the turns before it the request;
* request/response pairs as gateways log them: ``{"request": {a chat completion request}, "response": {a chat
  completion}}``; the answer is the response's first choice, with its usage, model and creation time.

A line's request id is a hash of the agent and the line's content, so importing the same file again adds
nothing (the logger skips request ids it has stored). A line that cannot be read is reported with its number and
reason and the others still land. Pure parsing: nothing here talks to Kafka (``import_file`` does).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.records import Answer, ChatMessage, Interaction
from services.openai_shape import ShapeError, chat_messages, message_tool_calls, text_of, tools_text
from services.router import routing
from services.teacher.base import approx_tokens, messages_tokens

if TYPE_CHECKING:
    from services.core.agents import Tier
    from services.core.settings import Settings

ROUTE_REASON = "imported"


LineError = ShapeError  # why one line cannot be imported


@dataclass(frozen=True)
class BadLine:
    number: int
    reason: str
    text: str


@dataclass(frozen=True)
class Parsed:
    interactions: list[Interaction]
    bad: list[BadLine]


def parse_lines(lines: Iterator[str], agent_id: str, tier: Tier, now: datetime | None = None) -> Parsed:
    """Every line of a history file as an interaction, or a bad line with its reason (blank lines skipped)."""
    now = now or datetime.now(timezone.utc)
    good: list[Interaction] = []
    bad: list[BadLine] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            good.append(interaction_from_line(text, agent_id, tier, now))
        except LineError as exc:
            bad.append(BadLine(number, str(exc), text.rstrip("\n")))
    return Parsed(good, bad)


def interaction_from_line(text: str, agent_id: str, tier: Tier, now: datetime) -> Interaction:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise LineError("not a JSON object")
    if "messages" in obj:
        messages, answer, tools, received = _chat_line(obj)
    elif "request" in obj and "response" in obj:
        messages, answer, tools, received = _pair_line(obj)
    else:
        raise LineError('neither {"messages": [...]} nor {"request": ..., "response": ...}')
    request_id = "imp-" + hashlib.sha256(f"{agent_id}\0{_canonical(obj)}".encode()).hexdigest()[:32]
    usage = routing.Usage(answer.input_tokens, answer.output_tokens)
    costs = routing.costs(tier, usage, None)
    teacher = answer.model_copy(update={"cost_usd": costs.teacher_usd})
    at = received or now
    return Interaction(
        request_id=request_id,
        conversation_id=str(obj.get("conversation_id") or request_id),
        agent_id=agent_id,
        messages=messages,
        tools=tools,
        metadata={"source": "import"},
        teacher=teacher,
        served_by="teacher",
        route_reason=ROUTE_REASON,
        training_candidate=True,
        lifecycle_stage="grace",
        cost_usd=costs.cost_usd,
        teacher_only_cost_usd=costs.teacher_only_cost_usd,
        received_at=at,
        responded_at=at,
    )


def _chat_line(obj: dict[str, Any]) -> tuple[list[ChatMessage], Answer, str | None, datetime | None]:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise LineError("messages must be a non-empty list")
    last = raw[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise LineError("the last message must be the assistant's answer")
    messages = chat_messages(raw[:-1])
    answer = _answer(last, obj.get("model") or "imported", messages, None)
    return messages, answer, tools_text(obj.get("tools")), None


def _pair_line(obj: dict[str, Any]) -> tuple[list[ChatMessage], Answer, str | None, datetime | None]:
    request, response = obj["request"], obj["response"]
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise LineError("request and response must be JSON objects")
    messages = chat_messages(request.get("messages"))
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LineError("response.choices is missing or empty")
    if response.get("error"):
        raise LineError(f"the response is an error: {response['error']}")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise LineError("response.choices[0].message is missing")
    answer = _answer(
        message, response.get("model") or request.get("model") or "imported", messages, response.get("usage")
    )
    answer = answer.model_copy(update={"finish_reason": choices[0].get("finish_reason")})
    created = response.get("created")
    received = datetime.fromtimestamp(created, timezone.utc) if isinstance(created, int | float) else None
    return messages, answer, tools_text(request.get("tools")), received


def _answer(raw: dict[str, Any], model: str, messages: list[ChatMessage], usage: Any) -> Answer:
    content = text_of(raw.get("content"))
    calls = message_tool_calls(raw.get("tool_calls"), "answer")
    if not content and not calls:
        raise LineError("the answer has neither content nor tool calls")
    tokens_in = tokens_out = None
    if isinstance(usage, dict):
        tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    written = (content or "") + "".join(c.arguments for c in calls)
    return Answer(
        content=content,
        tool_calls=calls,
        model=str(model),
        latency_ms=0.0,
        input_tokens=int(tokens_in) if isinstance(tokens_in, int) else messages_tokens(messages),
        output_tokens=int(tokens_out) if isinstance(tokens_out, int) else approx_tokens(written),
    )


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rejected_path(path: Path) -> Path:
    """Where a file's bad lines are reported: beside it."""
    return path.with_name(path.name + ".rejected.jsonl")


def already_stored(settings: Settings, request_ids: list[str]) -> set[str]:
    """The request ids that ClickHouse already holds (an earlier import of the same lines)."""
    from services.core.clickhouse import client

    if not request_ids:
        return set()
    ch = client(settings)
    try:
        rows = ch.query(
            "SELECT DISTINCT request_id FROM interaction_ids WHERE request_id IN {ids:Array(String)}",
            parameters={"ids": request_ids},
        ).result_rows
    finally:
        ch.close()
    return {row[0] for row in rows}


async def import_file(settings: Settings, agent_id: str, path: Path) -> tuple[int, int, list[BadLine]]:
    """Parse the file, send its new interactions to flywheel.interactions (acknowledged), report the bad lines
    beside it. Lines already stored are not sent again (the logger would drop them anyway: this is what tells
    the user). Returns (interactions sent, lines already imported, bad lines)."""
    from services.core import topics
    from services.core.agents import load_agents
    from services.core.codec import AvroCodec
    from services.core.kafka import Publisher, create_producer

    agents = load_agents(settings.agents_file)
    tier = agents.tier(agents.agent(agent_id))  # an unknown agent is refused with the known ones named
    with path.open(encoding="utf-8") as handle:
        parsed = parse_lines(handle, agent_id, tier)
    report = rejected_path(path)
    if parsed.bad:
        report.write_text(
            "".join(json.dumps({"line": b.number, "reason": b.reason, "text": b.text}) + "\n" for b in parsed.bad)
        )
    elif report.exists():
        report.unlink()  # from an earlier import of a file since fixed
    stored = await asyncio.to_thread(already_stored, settings, [rec.request_id for rec in parsed.interactions])
    fresh = [rec for rec in parsed.interactions if rec.request_id not in stored]
    producer = create_producer(settings)
    await producer.start()
    try:
        publisher = Publisher(producer, AvroCodec())
        pending = [await publisher.send_nowait(topics.INTERACTIONS, rec, rec.request_id) for rec in fresh]
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    return len(fresh), len(parsed.interactions) - len(fresh), parsed.bad
