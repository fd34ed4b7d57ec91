"""Holdout evaluation of a candidate student: agreement with the teacher, format compliance, task accuracy
against gold labels, confidences for calibration, and latency.

The comparisons at the top are pure. ``evaluate_holdout`` generates the answers with the serving code itself
(``services.student_runtime.StudentGenerator``, which the Triton model file wraps), so what is measured
here is what Triton will serve; ``triton_latency`` measures the published version through Triton.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.agents import Output

CONTRACT_KEYS = frozenset({"intent", "tool", "arguments", "reply"})
MAX_REPLY_CHARS = 200


# Pure comparisons -------------------------------------------------------------------------------------------
def parse_answer(text: str | None) -> dict[str, Any] | None:
    """The answer object, or None when the text is not a JSON object."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def _norm_arguments(value: Any) -> dict[str, str] | None:
    # Argument values are compared as whitespace-collapsed, case-folded strings: "20 EUR" and "20 eur" are
    # the same argument to any tool; a missing or non-object "arguments" is no answer at all.
    if not isinstance(value, dict):
        return None
    return {str(k): " ".join(str(v).split()).casefold() for k, v in value.items()}


def agrees(student: str | None, teacher: str | None) -> bool:
    """Same intent, same tool and same arguments; a malformed answer on either side never agrees."""
    a, b = parse_answer(student), parse_answer(teacher)
    if a is None or b is None:
        return False
    if not isinstance(a.get("intent"), str) or a.get("intent") != b.get("intent"):
        return False
    if a.get("tool") != b.get("tool"):
        return False
    args_a, args_b = _norm_arguments(a.get("arguments")), _norm_arguments(b.get("arguments"))
    return args_a is not None and args_a == args_b


def format_problems(text: str | None, output: Output) -> list[str]:
    """Why an answer does not fit the agent's contract (empty: compliant). Config-driven twin of
    ``Workload.check_output``: exact keys, a known intent (every '+'-joined part), a valid tool, string
    arguments, a short non-empty reply."""
    data = parse_answer(text)
    if data is None:
        return ["not a JSON object"]
    problems = []
    required = set(output.json_schema.get("required") or CONTRACT_KEYS)
    if set(data) != required and not (output.json_schema.get("additionalProperties", False) and required <= set(data)):
        problems.append(f"keys {sorted(data)} instead of {sorted(required)}")
    intent = data.get("intent")
    if not isinstance(intent, str) or not intent:
        problems.append(f"intent {intent!r} is not a non-empty string")
    elif output.intents and not all(part in output.intents for part in intent.split("+")):
        problems.append(f"unknown intent {intent!r}")
    tool = data.get("tool")
    if not isinstance(tool, str) or (output.valid_tools and tool not in output.valid_tools):
        problems.append(f"invalid tool {tool!r}")
    args = data.get("arguments")
    if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
        problems.append("arguments must be an object of strings")
    reply = data.get("reply")
    if not isinstance(reply, str) or not reply or len(reply) > MAX_REPLY_CHARS:
        problems.append(f"reply must be a non-empty string of at most {MAX_REPLY_CHARS} characters")
    return problems


def answer_intent(text: str | None) -> str | None:
    data = parse_answer(text)
    intent = data.get("intent") if data else None
    return intent if isinstance(intent, str) else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


@dataclass(frozen=True)
class Judged:
    """One holdout answer, judged."""

    request_id: str
    answer: str
    confidence: float
    agreed: bool
    compliant: bool
    correct: bool | None  # against gold; None when the example has no gold label


@dataclass
class HoldoutReport:
    judged: list[Judged] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # per answer (batch time / batch size)
    format_agreements: dict[str, float] = field(default_factory=dict)  # agreement of each weight format tried
    format_speeds: dict[str, float] = field(default_factory=dict)  # answers/s of each format's probe batch

    @property
    def size(self) -> int:
        return len(self.judged)

    @property
    def agreement(self) -> float:
        return sum(j.agreed for j in self.judged) / self.size if self.size else 0.0

    @property
    def format_compliance(self) -> float:
        return sum(j.compliant for j in self.judged) / self.size if self.size else 0.0

    @property
    def task_accuracy(self) -> float | None:
        gold = [j.correct for j in self.judged if j.correct is not None]
        return sum(gold) / len(gold) if gold else None

    @property
    def scored(self) -> list[tuple[float, bool]]:
        return [(j.confidence, j.agreed) for j in self.judged]


def judge(request_id: str, answer: str, confidence: float, target: str, gold: str | None, output: Output) -> Judged:
    return Judged(
        request_id=request_id,
        answer=answer,
        confidence=confidence,
        agreed=agrees(answer, target),
        compliant=not format_problems(answer, output),
        correct=None if gold is None else answer_intent(answer) == gold,
    )


# Generation (I/O) -------------------------------------------------------------------------------------------
def evaluate_holdout(
    generate: Callable[[list[str]], list[tuple[str, float]]],
    examples: Sequence[Any],
    prompts: Sequence[str],
    output: Output,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> HoldoutReport:
    """Answer every holdout example (``prompts[i]`` is the PROMPT string Triton would receive for
    ``examples[i]``) with ``generate`` and judge the answers."""
    report = HoldoutReport()
    for begin in range(0, len(prompts), batch_size):
        chunk = list(prompts[begin : begin + batch_size])
        started = time.perf_counter()
        answers = generate(chunk)
        per_answer = (time.perf_counter() - started) * 1000 / max(1, len(chunk))
        for example, (text, confidence) in zip(examples[begin : begin + batch_size], answers, strict=True):
            report.judged.append(judge(example.request_id, text, confidence, example.target, example.gold, output))
            report.latencies_ms.append(per_answer)
        if progress:
            progress(min(begin + batch_size, len(prompts)), len(prompts))
    return report


def triton_latency(probe: Callable[[str], Any], prompts: Sequence[str]) -> list[float]:
    """Milliseconds per request through Triton, one request at a time (what a lone client waits)."""
    out = []
    for prompt in prompts:
        started = time.perf_counter()
        probe(prompt)
        out.append((time.perf_counter() - started) * 1000)
    return out
