"""Stage 1, prompt optimisation (pure): the student's system prompt and few-shot examples, built from the
teacher's curated answers, and ``student_messages``, the one way to turn a request into the student's input
(the trainer, its holdout evaluation and the serving path must all build it the same way).

The prompt states what the answers showed: the output format (the answer keys in the order the teacher
uses), the tools, the intents seen (most frequent first) and per tool the argument names seen. It is kept
short on purpose: every prompt token is paid on every training step and every answer on 2 CPU cores.
Few-shot examples cover the most frequent intents, one each, the shortest training message of that intent
(shorter is cheaper), and come from the training split only, never the holdout they are measured on.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.agents import AgentConfig
from services.curator.filters import CANONICAL_KEYS

DEFAULT_ROLE = "You are a customer-support router."


@dataclass(frozen=True)
class StudentPrompt:
    system_prompt: str
    few_shot: list[list[dict[str, str]]] = field(default_factory=list)  # each: [user turn, assistant turn]

    def to_dict(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt, "few_shot": self.few_shot}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentPrompt:
        return cls(str(data["system_prompt"]), [list(turns) for turns in data.get("few_shot", [])])

    def to_json(self) -> str:
        """Canonical text (sorted keys, compact), as stored in ``prompt.json`` and hashed into the snapshot id."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _answer(record: Mapping[str, Any]) -> dict[str, Any]:
    try:
        obj = json.loads(record["target"])
    except (ValueError, KeyError, TypeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def build_prompt(agent: AgentConfig, train: Sequence[Mapping[str, Any]], few_shot: int | None = None) -> StudentPrompt:
    """The stage-1 prompt from the training records (``{"request_id", "intent", "messages", "target"}``)."""
    n_examples = agent.curation.few_shot_examples if few_shot is None else few_shot
    answers = [_answer(r) for r in train]
    intents = Counter(r["intent"] for r in train if r.get("intent"))
    tools = Counter(a["tool"] for a in answers if isinstance(a.get("tool"), str))
    keys: list[str] = [k for k in CANONICAL_KEYS if any(k in a for a in answers)]
    for a in answers:
        keys.extend(k for k in a if k not in keys)
    args_by_tool: dict[str, set[str]] = defaultdict(set)
    for a in answers:
        if isinstance(a.get("tool"), str) and isinstance(a.get("arguments"), dict):
            args_by_tool[a["tool"]].update(a["arguments"])

    role = (agent.system_prompt or agent.description or DEFAULT_ROLE).strip()
    shape = ",".join(f'"{k}":{_placeholder(k)}' for k in keys)
    lines = [role, f"Answer with one JSON object on one line: {{{shape}}}"]
    if tools:
        lines.append("Tools: " + ", ".join(name for name, _ in _ranked(tools)))
    if intents:
        lines.append("Intents: " + ", ".join(name for name, _ in _ranked(intents)))
    conventions = [f"{tool}: {', '.join(sorted(names))}" for tool, names in sorted(args_by_tool.items()) if names]
    if conventions:
        lines.append("Arguments by tool: " + "; ".join(conventions) + ". Otherwise {}.")
    return StudentPrompt("\n".join(lines), pick_few_shot(train, n_examples))


def _placeholder(key: str) -> str:
    return {"intent": "<intent>", "tool": "<tool>", "arguments": "{...}", "reply": "<short sentence>"}.get(key, "...")


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    """Most frequent first, ties by name: deterministic whatever the input order."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def pick_few_shot(train: Sequence[Mapping[str, Any]], n: int) -> list[list[dict[str, str]]]:
    """One example per intent for the ``n`` most frequent intents: the shortest user message of the intent
    (ties: request id), as a user turn and the teacher's answer as the assistant turn."""
    if n <= 0:
        return []
    by_intent: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in train:
        if record.get("intent"):
            by_intent[record["intent"]].append(record)
    counts = Counter({intent: len(rs) for intent, rs in by_intent.items()})
    examples = []
    for intent, _ in _ranked(counts)[:n]:
        best = min(by_intent[intent], key=lambda r: (len(_last_user(r["messages"])), r["request_id"]))
        examples.append(
            [
                {"role": "user", "content": _last_user(best["messages"])},
                {"role": "assistant", "content": best["target"]},
            ]
        )
    return examples


def _last_user(messages: Sequence[Mapping[str, Any]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def student_messages(
    prompt: StudentPrompt, messages: Sequence[Mapping[str, Any]], *, few_shot: bool = True
) -> list[dict[str, str]]:
    """The student's input for a request: one system message (the stage-1 prompt, with any system message
    the client sent appended), the few-shot turns (unless ``few_shot=False``, e.g. to train on shorter
    sequences: then serve without them too), then the request's other messages as role/content."""
    system = prompt.system_prompt
    rest: list[dict[str, str]] = []
    for m in messages:
        if m.get("role") == "system":
            system = f"{system}\n{m['content']}"
        else:
            rest.append({"role": str(m["role"]), "content": str(m.get("content") or "")})
    out = [{"role": "system", "content": system}]
    if few_shot:
        for turns in prompt.few_shot:
            out.extend({"role": t["role"], "content": t["content"]} for t in turns)
    return out + rest
