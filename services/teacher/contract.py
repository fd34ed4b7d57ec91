"""The output contract an agent answers in (teacher and student alike), over a labelled data set: ``Workload``.

The contract is one JSON object, kept short on purpose because the student trains on 2 CPU cores and every
answer token costs training and inference time::

    {"intent": "<label>", "tool": "<tool name>", "arguments": {...}, "reply": "<one short sentence>"}

* ``intent``: the data set's label. BANKING77 has one intent per message; NLU++ has several, written as the
  sorted labels joined by ``+`` (``"card+lost_stolen"``) so that one string comparison decides agreement.
* ``tool``: derived from the intent by a fixed table (tool -> intents; the built-in ones are in ``tables.py``,
  a data set of your own gives its mapping or gets one tool per label).
* ``arguments``: what can be read from the message itself. NLU++: each annotated slot's text span
  (``{"amount_of_money": "73 pounds", "date": "last night"}``). BANKING77 has no slot annotation: ``amount`` and
  ``currency`` when the message names them, else ``{}``. Your own data: its ``arguments`` column.
* ``reply``: one sentence per intent (single-label data sets) or per tool (NLU++).

``Workload`` exposes ``name``, ``intents``, ``tools``, ``tool_for_intent``, ``examples(split)``,
``output_schema()`` (a JSON schema for agents.yaml and format checks), ``answer_for(example)`` and
``check_output(text)`` (the format-compliance check without a JSON-schema library), and for plan-and-execute
(docs/plan-execute.md) ``plan_for(text, example)`` (one step per intent) and ``intent_answer(intent, arguments)``
(a step's answer). Pure: no file is read here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.teacher.tables import NO_INTENT

SPLITS = ("train", "test", "all")
# The instruction of a step in the reference teacher's plans; it answers a request whose last user message has
# this form for that one intent (``STEP_INSTRUCTION_RE``), reading the arguments from the quoted message.
STEP_INSTRUCTION = "Handle only the '{intent}' part of: {text}"
STEP_INSTRUCTION_RE = re.compile(r"^Handle only the '(?P<intent>[^'\n]+)' part of: (?P<text>.+)$", re.DOTALL)


@dataclass(frozen=True)
class Example:
    """One labelled message: ``intent`` is the contract's label, ``intents`` its parts (one for BANKING77)."""

    text: str
    intent: str
    intents: tuple[str, ...]
    arguments: Mapping[str, str] = field(default_factory=dict)
    split: str = "train"


def nlupp_label(intents: Iterable[str]) -> str:
    """The contract's label for a set of NLU++ intents: sorted, ``+``-joined; no intent at all is ``inform``."""
    parts = sorted(set(intents))
    return "+".join(parts) if parts else NO_INTENT


@dataclass
class Workload:
    name: str
    intents: list[str]  # the atomic labels (NLU++: the parts of a "+"-joined label)
    tools: list[str]
    tool_table: dict[str, tuple[str, ...]]  # tool -> intents, in rank order (first listed wins for NLU++)
    replies: dict[str, str]  # intent (BANKING77) or tool (NLU++) -> reply
    multi_label: bool
    _examples: list[Example] = field(default_factory=list, repr=False)
    # Reads a message's arguments from its text; None: the nearest example's values found in it.
    extractor: Callable[[str], dict[str, str]] | None = field(default=None, repr=False)
    _rank: dict[str, int] = field(default_factory=dict, repr=False)
    _tool_of: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for rank, (tool, intents) in enumerate(self.tool_table.items()):
            for intent in intents:
                self._tool_of[intent] = tool
                self._rank[intent] = rank

    @property
    def model(self) -> str:
        """The model name that selects this workload on the reference teacher."""
        return f"reference/{self.name}"

    def split_intent(self, intent: str) -> tuple[str, ...]:
        return tuple(intent.split("+")) if self.multi_label else (intent,)

    def tool_for_intent(self, intent: str) -> str:
        """The tool for a contract label (for NLU++ a ``+``-joined label: its highest-ranked part decides).
        Raises KeyError for a label outside the workload."""
        parts = self.split_intent(intent)
        best = min(parts, key=lambda p: self._rank[p])
        return self._tool_of[best]

    def reply_for(self, intent: str) -> str:
        return self.replies[self.tool_for_intent(intent) if self.multi_label else intent]

    def has_intent(self, intent: str) -> bool:
        """Whether ``intent`` is one of the workload's atomic labels (NLU++: one part of a ``+`` label)."""
        return intent in self._tool_of

    def intent_answer(self, intent: str, arguments: Mapping[str, str]) -> dict[str, Any]:
        """The contract's answer for one atomic intent: what a plan step for that intent is answered with."""
        return {
            "intent": intent,
            "tool": self.tool_for_intent(intent),
            "arguments": dict(arguments),
            "reply": self.reply_for(intent),
        }

    def plan_for(self, text: str, example: Example) -> list[dict[str, str]]:
        """A plan for ``text``, labelled like ``example`` (itself or its nearest neighbour): one step per atomic
        intent, in tool-table rank order (most specific first: block a lost card before answering a question),
        ties by name; each step's instruction quotes the whole message (``STEP_INSTRUCTION``), so it stands on
        its own and its arguments can be read from it."""
        intents = sorted(set(example.intents), key=lambda i: (self._rank.get(i, len(self._rank)), i))
        return [
            {"instruction": STEP_INSTRUCTION.format(intent=i, text=text), "intent": i, "tool": self.tool_for_intent(i)}
            for i in intents
        ]

    def examples(self, split: str = "all") -> list[Example]:
        """Labelled messages of a split: ``train``, ``test`` or ``all`` (how each data set is split:
        ``datasets.py``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split == "all":
            return list(self._examples)
        return [e for e in self._examples if e.split == split]

    def answer_for(self, example: Example, text: str | None = None) -> dict[str, Any]:
        """The contract's answer for a labelled message (key order fixed: the JSON text is canonical). With
        ``text``, the answer is for that (unlabelled) message, labelled like ``example``, its nearest neighbour:
        the arguments are then read from ``text`` (``arguments_for``)."""
        arguments = dict(example.arguments) if text is None else self.arguments_for(text, example)
        return {
            "intent": example.intent,
            "tool": self.tool_for_intent(example.intent),
            "arguments": arguments,
            "reply": self.reply_for(example.intent),
        }

    def arguments_for(self, text: str, neighbour: Example) -> dict[str, str]:
        """Arguments of a message outside the data set: the workload's extractor (BANKING77's amounts), else the
        neighbour's values that occur in the message (a neighbour's "yesterday" is no argument of a message
        without it)."""
        if self.extractor is not None:
            return self.extractor(text)
        return {
            k: v
            for k, v in neighbour.arguments.items()
            if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", text, re.IGNORECASE)
        }

    def output_schema(self, intents: Iterable[str] | None = None) -> dict[str, Any]:
        """JSON schema of an answer; ``intents`` narrows it to an agent's subset of (atomic) intents."""
        chosen = list(self.intents if intents is None else intents)
        unknown = [i for i in chosen if i not in self._tool_of]
        if unknown:
            raise ValueError(f"{self.name}: unknown intents {unknown}")
        tools = [t for t in self.tools if any(self._tool_of[i] == t for i in chosen)]
        if self.multi_label:
            alternatives = "|".join(re.escape(i) for i in sorted(chosen))
            intent_schema: dict[str, Any] = {
                "type": "string",
                "pattern": rf"^(?:{alternatives})(?:\+(?:{alternatives}))*$",
                "description": "the intents, sorted and joined with '+'",
            }
        else:
            intent_schema = {"type": "string", "enum": chosen}
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{self.name} agent answer",
            "type": "object",
            "required": ["intent", "tool", "arguments", "reply"],
            "additionalProperties": False,
            "properties": {
                "intent": intent_schema,
                "tool": {"type": "string", "enum": tools},
                "arguments": {"type": "object", "additionalProperties": {"type": "string"}},
                "reply": {"type": "string", "minLength": 1, "maxLength": 200},
            },
        }

    def check_output(self, text: str | None) -> list[str]:
        """Format compliance of an answer text: the problems found (empty when it parses, has exactly the
        contract's keys, a known intent, a valid tool and string arguments). Hedging is a content problem,
        not a format one, and is not checked here."""
        if text is None:
            return ["no content"]
        try:
            data = json.loads(text)
        except ValueError as exc:
            return [f"not valid JSON: {exc}"]
        if not isinstance(data, dict):
            return ["not a JSON object"]
        problems = []
        expected = {"intent", "tool", "arguments", "reply"}
        if set(data) != expected:
            problems.append(f"keys {sorted(data)} instead of {sorted(expected)}")
        intent = data.get("intent")
        if not isinstance(intent, str) or not all(p in self._tool_of for p in self.split_intent(intent)):
            problems.append(f"unknown intent {intent!r}")
        if data.get("tool") not in self.tools:
            problems.append(f"invalid tool {data.get('tool')!r}")
        args = data.get("arguments")
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            problems.append("arguments must be an object of strings")
        reply = data.get("reply")
        if not isinstance(reply, str) or not reply or len(reply) > 200:
            problems.append("reply must be a non-empty string of at most 200 characters")
        return problems
