"""Plan-and-execute mode, the pure part (no clients, no clock): the planning request, the plan's validation,
the step requests, and the combined answer (docs/plan-execute.md).

For an agent with ``execution.mode: plan_and_execute`` the router

1. asks the teacher for a plan: the request's messages with one more system message, the planning prompt,
   which opens with ``PLAN_MARKER`` (how the reference teacher knows a plan is asked for; a real model just
   follows the prompt). The answer is JSON: ``{"steps": [{"instruction", "intent", "tool"}, ...]}``;
2. checks it (``parse_plan``): valid JSON, 1 to ``max_steps`` steps, each with an instruction, and intent and
   tool names the agent knows. A bad plan raises ``PlanError`` naming the problem; the router then answers the
   request directly with the teacher, as in direct mode;
3. executes each step as a request of its own (``step_request``): the request's system messages and the step's
   instruction as the user message, routed by the same rules as a direct request (``routing.py``);
4. answers the client once, with every step's answer in order (``combine``).

Each step is recorded as its own ``Interaction`` (metadata ``plan_id``, ``step_index``, ``step_count``,
``step``), and the plan as one more, so cost and agreement are plain SQL per step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from services.core.records import ChatMessage, InferenceRequest, Server, ToolCall

PLAN_MARKER = "[flywheel:plan]"

# Metadata keys of the plan's and the steps' interactions (the schema's metadata is a string map).
PLAN_ID = "plan_id"
STEP_INDEX = "step_index"
STEP_COUNT = "step_count"
STEP = "step"  # the step's instruction
STEP_INTENT = "step_intent"  # what the plan said the step needs (absent when the plan did not say)
STEP_TOOL = "step_tool"
PLAN_ERROR = "plan_error"  # on the plan's interaction when the plan was refused

PLAN_PROMPT = (
    PLAN_MARKER + " Do not answer the request yet: plan it. Split the last user message into steps, one per "
    "thing it asks for (one per intent), in the order they should be carried out, at most {max_steps}. Each "
    "step's instruction must stand on its own: quote the details it needs from the message. Answer with JSON "
    'only: {{"steps": [{{"instruction": "<one sentence>", "intent": "<intent label>", "tool": "<tool name>"}}]}}'
)

_FENCE = re.compile(r"^\s*```(?:json)?\s*(?P<body>.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


class PlanError(ValueError):
    """The teacher's plan cannot be executed; the message says why (the request is then answered directly)."""


@dataclass(frozen=True)
class Step:
    instruction: str
    intent: str | None = None
    tool: str | None = None


@dataclass(frozen=True)
class ExecutionPlan:
    steps: tuple[Step, ...]


# 1. The planning request -------------------------------------------------------------------------------------
def plan_prompt(max_steps: int) -> str:
    return PLAN_PROMPT.format(max_steps=max_steps)


def plan_messages(messages: Sequence[ChatMessage], max_steps: int) -> list[ChatMessage]:
    """The request's messages with the planning prompt as a system message after the leading system messages
    (so the agent's own system prompt, which carries its contract, still comes first)."""
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    prompt = ChatMessage(role="system", content=plan_prompt(max_steps))
    return [*messages[:lead], prompt, *messages[lead:]]


def is_plan_request(messages: Sequence[tuple[str, str]]) -> bool:
    """Whether a chat (``(role, text)`` pairs) asks for a plan: a system message opening with the marker."""
    return any(role == "system" and text.lstrip().startswith(PLAN_MARKER) for role, text in messages)


# 2. The plan's validation ------------------------------------------------------------------------------------
def parse_plan(
    content: str | None,
    *,
    max_steps: int,
    valid_tools: Collection[str] = (),
    valid_intents: Collection[str] = (),
) -> ExecutionPlan:
    """The teacher's plan, checked. Accepts ``{"steps": [...]}`` or a bare list of steps, optionally inside a
    Markdown code fence (as chat models often write JSON). ``valid_tools`` / ``valid_intents`` (the agent's
    output contract; empty = not checked) refuse names outside the contract. Raises PlanError."""
    if content is None or not content.strip():
        raise PlanError("the teacher's plan is empty")
    fenced = _FENCE.match(content)
    text = fenced.group("body") if fenced else content
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PlanError(f"the teacher's plan is not valid JSON ({exc}): {_clip(content)}") from exc
    if isinstance(data, dict):
        if "steps" not in data:
            raise PlanError(f"the teacher's plan has no 'steps' list: {_clip(content)}")
        data = data["steps"]
    if not isinstance(data, list):
        raise PlanError(f"the teacher's plan: 'steps' must be a list, got {type(data).__name__}")
    if not data:
        raise PlanError("the teacher's plan has no steps")
    if len(data) > max_steps:
        raise PlanError(f"the teacher's plan has {len(data)} steps, more than execution.max_steps {max_steps}")
    return ExecutionPlan(tuple(_step(i, raw, valid_tools, valid_intents) for i, raw in enumerate(data)))


def _step(index: int, raw: Any, valid_tools: Collection[str], valid_intents: Collection[str]) -> Step:
    where = f"the teacher's plan, step {index}"
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: must be an object with an 'instruction', got {type(raw).__name__}")
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise PlanError(f"{where}: 'instruction' must be a non-empty string")
    names: dict[str, str | None] = {}
    for key, valid in (("intent", valid_intents), ("tool", valid_tools)):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise PlanError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        value = (value or "").strip() or None
        if value is not None and valid and value not in valid:
            raise PlanError(f"{where}: unknown {key} {value!r} (not in the agent's output.{key}s)")
        names[key] = value
    return Step(instruction.strip(), names["intent"], names["tool"])


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# 3. The steps -------------------------------------------------------------------------------------------------
def step_request_id(plan_id: str, index: int) -> str:
    """Derived from the request id, so a replayed request's steps land on the same ids (the logger and the
    ReplacingMergeTree then keep one row each)."""
    return f"{plan_id}:step:{index}"


def fallback_request_id(plan_id: str) -> str:
    return f"{plan_id}:direct"


def plan_metadata(request: InferenceRequest, plan: ExecutionPlan | None, error: str | None = None) -> dict[str, str]:
    meta = {**request.metadata, PLAN_ID: request.request_id}
    if plan is not None:
        meta[STEP_COUNT] = str(len(plan.steps))
    if error is not None:
        meta[PLAN_ERROR] = error[:500]
    return meta


def step_request(request: InferenceRequest, plan: ExecutionPlan, index: int) -> InferenceRequest:
    """Step ``index`` as a request of its own: the request's system messages (the agent's contract) and the
    instruction as the user message; the client's tools; the plan keys in the metadata. The client's intent
    label was for the whole request, so a step carries none (the plan's is in ``step_intent``)."""
    step = plan.steps[index]
    metadata = {
        **request.metadata,
        PLAN_ID: request.request_id,
        STEP_INDEX: str(index),
        STEP_COUNT: str(len(plan.steps)),
        STEP: step.instruction,
    }
    if step.intent is not None:
        metadata[STEP_INTENT] = step.intent
    if step.tool is not None:
        metadata[STEP_TOOL] = step.tool
    system = [m for m in request.messages if m.role == "system"]
    return InferenceRequest(
        request_id=step_request_id(request.request_id, index),
        conversation_id=request.conversation_id,
        agent_id=request.agent_id,
        messages=[*system, ChatMessage(role="user", content=step.instruction)],
        tools=request.tools,
        intent=None,
        metadata=metadata,
        reply_topic=request.reply_topic,
        created_at=request.created_at,
    )


# 4. The combined answer ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    """What one executed step gave (its served answer) and cost."""

    index: int
    instruction: str
    served_by: Server  # "none" when the step failed
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    confidence: float | None = None
    model_version: str | None = None
    error: str | None = None
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Combined:
    content: str
    tool_calls: list[ToolCall]
    served_by: Server
    confidence: float | None
    model_version: str | None
    error: str | None
    cost_usd: float  # the plan's cost plus every step's (shadows included): what the request cost


def combine(plan_cost_usd: float, results: Sequence[StepResult]) -> Combined:
    """One answer for the client: ``{"steps": [{"index", "instruction", "served_by", "answer"}, ...]}`` in step
    order, ``answer`` being the step's JSON object when it is one, else its text (``error`` instead when the step
    failed); the steps' tool calls in order, their ids prefixed with the step (``s0_call_1``) to stay unique.

    ``served_by``: ``student`` when the student served every step that was answered, ``teacher`` when any was
    the teacher's, ``none`` when every step failed; ``confidence`` (the lowest) and ``model_version`` only when
    the student served them all. ``error`` names the failed steps, if any (the other steps' answers are kept)."""
    results = sorted(results, key=lambda r: r.index)
    steps: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    for r in results:
        entry: dict[str, Any] = {"index": r.index, "instruction": r.instruction, "served_by": r.served_by}
        if r.error is not None:
            entry["error"] = r.error
        else:
            entry["answer"] = _as_json(r.content)
            calls.extend(c.model_copy(update={"id": f"s{r.index}_{c.id}"}) for c in r.tool_calls)
        steps.append(entry)
    served = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    if not served:
        served_by: Server = "none"
    elif all(r.served_by == "student" for r in served):
        served_by = "student"
    else:
        served_by = "teacher"
    student_all = served_by == "student"
    confidences = [r.confidence for r in results if r.confidence is not None]
    error = None
    if failed:
        error = f"{len(failed)} of {len(results)} plan steps failed: " + "; ".join(
            f"step {r.index}: {r.error}" for r in failed
        )
    return Combined(
        content=json.dumps({"steps": steps}, separators=(",", ":"), ensure_ascii=False),
        tool_calls=calls,
        served_by=served_by,
        confidence=min(confidences) if student_all and confidences else None,
        model_version=results[0].model_version if student_all and results else None,
        error=error,
        cost_usd=plan_cost_usd + sum(r.cost_usd for r in results),
    )


def _as_json(content: str | None) -> Any:
    if content is None:
        return None
    try:
        data = json.loads(content)
    except ValueError:
        return content
    return data if isinstance(data, dict | list) else content
