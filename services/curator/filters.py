"""Curation filters (pure): which request/teacher-answer pairs become training data.

Each per-pair filter is a small function ``(pair, agent) -> reason | None``; ``curate`` applies them in a fixed
order and counts, per filter, the pairs it removed (a pair is counted once, by the first filter that removes
it). The set-level filters (exact and near duplicates of the input, the per-intent cap) run after them, on
the survivors in request_id order, so "the first" of a group of duplicates is always the same pair.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from services.core.agents import AgentConfig
from services.curator.labelling import answer_object

FINAL_REASONS = frozenset({"stop", "tool_calls"})
CANONICAL_KEYS = ("intent", "tool", "arguments", "reply")


@dataclass(frozen=True)
class Pair:
    """A candidate pair: the request and the teacher's answer (one ``interactions`` row)."""

    request_id: str
    messages: tuple[dict[str, str], ...]  # {"role", "content"}, as the client sent them
    user_text: str
    teacher_content: str | None
    teacher_tool_calls: str = "[]"
    teacher_error: str | None = None
    finish_reason: str | None = None  # teacher_finish_reason (0004); None when unknown: not judged
    intent: str | None = None  # the effective intent (client > teacher > cluster)
    gold: str | None = None  # metadata gold_intent
    received_at: datetime | None = None

    def answer(self) -> dict[str, Any] | None:
        return answer_object(self.teacher_content, self.teacher_tool_calls)


Filter = Callable[[Pair, AgentConfig], "str | None"]


# Per-pair filters -------------------------------------------------------------------------------------------
def empty_input(pair: Pair, agent: AgentConfig) -> str | None:
    """Nothing to learn from a request without user text."""
    return None if normalise_text(pair.user_text) else "empty user message"


def teacher_error(pair: Pair, agent: AgentConfig) -> str | None:
    if pair.teacher_error:
        return f"teacher error: {pair.teacher_error[:80]}"
    if pair.teacher_content is None and not _calls(pair.teacher_tool_calls):
        return "teacher gave no answer"
    return None


def not_final(pair: Pair, agent: AgentConfig) -> str | None:
    """A cut answer (finish_reason ``length``, ``content_filter``...) is not what the teacher meant to say.

    Unknown (None: rows from before 0004, servers that send none) or empty is not judged; the JSON filters
    still catch a cut object. Compared case-folded, as servers differ in case."""
    reason = (pair.finish_reason or "").strip().casefold()
    if not reason or reason in FINAL_REASONS:
        return None
    return f"finish_reason {pair.finish_reason}"


def unparseable(pair: Pair, agent: AgentConfig) -> str | None:
    if agent.output.format != "json":
        return None
    return None if pair.answer() is not None else "answer is not a JSON object"


def schema_mismatch(pair: Pair, agent: AgentConfig) -> str | None:
    schema = agent.output.json_schema
    if not schema:
        return None
    obj = pair.answer()
    problems = validate_schema(obj, schema)
    return "; ".join(problems[:2]) if problems else None


def invalid_tool(pair: Pair, agent: AgentConfig) -> str | None:
    valid = set(agent.output.valid_tools)
    if not valid:
        return None
    names = [c.get("name") for c in _calls(pair.teacher_tool_calls)]
    obj = pair.answer()
    if obj is not None and "tool" in obj:
        names.append(obj.get("tool"))
    bad = [n for n in names if n not in valid]
    return f"invalid tool {bad[0]!r}" if bad else None


def hedging(pair: Pair, agent: AgentConfig) -> str | None:
    """An unsure teacher answer teaches the student to be unsure; phrases are matched case-insensitively,
    typographic apostrophes folded to ASCII."""
    obj = pair.answer()
    # Match in the decoded strings (the reply...), not the JSON text, where "\u2019" would hide a phrase.
    text = _fold(" ".join(_strings(obj)) if obj is not None else pair.teacher_content or "")
    for phrase in agent.curation.hedging_phrases:
        if _fold(phrase) in text:
            return f"hedging {phrase!r}"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _fold(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").casefold()


def _calls(tool_calls_json: str | None) -> list[dict[str, Any]]:
    try:
        calls = json.loads(tool_calls_json or "[]")
    except ValueError:
        return []
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


# Order matters only for which filter gets the count: the cheapest and most basic reasons first.
PAIR_FILTERS: tuple[tuple[str, Filter], ...] = (
    ("empty_input", empty_input),
    ("teacher_error", teacher_error),
    ("not_final", not_final),
    ("unparseable", unparseable),
    ("invalid_tool", invalid_tool),
    ("schema", schema_mismatch),
    ("hedging", hedging),
)


# Set-level filters ------------------------------------------------------------------------------------------
_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    """The input as compared for duplicates: NFKC, case-folded, punctuation dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def exact_duplicates(pairs: Sequence[Pair]) -> list[bool]:
    """True for each pair whose normalised input an earlier pair already had."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        key = normalise_text(pair.user_text)
        out.append(key in seen)
        seen.add(key)
    return out


def shingles(text: str, n: int = 4) -> frozenset[str]:
    norm = normalise_text(text)
    if len(norm) <= n:
        return frozenset({norm})
    return frozenset(norm[i : i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def near_duplicates(pairs: Sequence[Pair], threshold: float, vectors: np.ndarray | None = None) -> list[bool]:
    """True for each pair whose input is at least ``threshold`` similar to an earlier kept pair's: cosine of
    the (normalised) embeddings when given, else Jaccard of character 4-gram shingles (cheap, no model)."""
    kept_idx: list[int] = []
    out: list[bool] = []
    if vectors is not None:
        vecs = np.asarray(vectors, dtype=np.float32)
        for i in range(len(pairs)):
            dup = bool(kept_idx) and float(np.max(vecs[kept_idx] @ vecs[i])) >= threshold
            out.append(dup)
            if not dup:
                kept_idx.append(i)
        return out
    sh = [shingles(p.user_text) for p in pairs]
    for i in range(len(pairs)):
        dup = any(jaccard(sh[i], sh[j]) >= threshold for j in kept_idx)
        out.append(dup)
        if not dup:
            kept_idx.append(i)
    return out


def over_intent_cap(pairs: Sequence[Pair], cap: int | None) -> list[bool]:
    """True past the first ``cap`` pairs of each intent (keeps the set balanced when one intent floods)."""
    if cap is None:
        return [False] * len(pairs)
    seen: Counter[str] = Counter()
    out = []
    for pair in pairs:
        key = pair.intent or ""
        seen[key] += 1
        out.append(seen[key] > cap)
    return out


@dataclass
class CurationResult:
    kept: list[Pair]
    stats: dict[str, int] = field(default_factory=dict)  # candidates, <filter>: removed, kept
    examples: dict[str, list[str]] = field(default_factory=dict)  # filter -> a few removed request ids


STAT_KEYS = (
    "candidates",
    *(name for name, _ in PAIR_FILTERS),
    "exact_duplicate",
    "near_duplicate",
    "over_intent_cap",
    "kept",
)


def curate(
    pairs: Sequence[Pair],
    agent: AgentConfig,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> CurationResult:
    """Apply every filter; the kept pairs come back in request_id order with one counter per filter.
    ``embed`` (texts -> normalised vectors) makes the near-duplicate check semantic; without it, shingles."""
    stats: Counter[str] = Counter({key: 0 for key in STAT_KEYS})
    examples: dict[str, list[str]] = {}
    ordered = sorted(pairs, key=lambda p: p.request_id)
    stats["candidates"] = len(ordered)

    def drop(name: str, pair: Pair) -> None:
        stats[name] += 1
        bucket = examples.setdefault(name, [])
        if len(bucket) < 5:
            bucket.append(pair.request_id)

    survivors: list[Pair] = []
    for pair in ordered:
        for name, check in PAIR_FILTERS:
            if check(pair, agent) is not None:
                drop(name, pair)
                break
        else:
            survivors.append(pair)

    for name, mask_of in (
        ("exact_duplicate", exact_duplicates),
        (
            "near_duplicate",
            lambda ps: near_duplicates(
                ps,
                agent.curation.near_duplicate_threshold,
                embed([p.user_text for p in ps]) if embed is not None and ps else None,
            ),
        ),
        ("over_intent_cap", lambda ps: over_intent_cap(ps, agent.curation.max_per_intent)),
    ):
        mask = mask_of(survivors)
        for pair, removed in zip(survivors, mask, strict=True):
            if removed:
                drop(name, pair)
        survivors = [p for p, removed in zip(survivors, mask, strict=True) if not removed]

    stats["kept"] = len(survivors)
    return CurationResult(survivors, dict(stats), examples)


# Output schema ----------------------------------------------------------------------------------------------
def validate_schema(obj: Any, schema: dict[str, Any]) -> list[str]:
    """Problems of ``obj`` against a JSON schema: with the ``jsonschema`` package when it is installed, else
    a minimal validator (type, required, properties, additionalProperties, enum, pattern, string lengths)
    that covers the agents' answer schemas."""
    if obj is None:
        return ["no JSON object"]
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - depends on the environment
        return _minimal_validate(obj, schema, "$")
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '$'}: {e.message}" for e in validator.iter_errors(obj)]


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _minimal_validate(obj: Any, schema: dict[str, Any], path: str) -> list[str]:
    problems: list[str] = []
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _TYPES:
        ok = isinstance(obj, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(obj, bool))
        if not ok:
            return [f"{path}: expected {kind}"]
    if "enum" in schema and obj not in schema["enum"]:
        problems.append(f"{path}: {obj!r} is not one of the allowed values")
    if isinstance(obj, str):
        if "minLength" in schema and len(obj) < schema["minLength"]:
            problems.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(obj) > schema["maxLength"]:
            problems.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], obj):
            problems.append(f"{path}: does not match {schema['pattern'][:40]}")
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                problems.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in obj.items():
            if key in props:
                problems.extend(_minimal_validate(value, props[key], f"{path}.{key}"))
            elif extra is False:
                problems.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                problems.extend(_minimal_validate(value, extra, f"{path}.{key}"))
    return problems


# The target -------------------------------------------------------------------------------------------------
def canonical_answer(obj: dict[str, Any]) -> str:
    """The exact text the student learns to emit: compact JSON, keys intent, tool, arguments, reply first (in
    that order), any others after in the teacher's order, non-ASCII kept as UTF-8. Compact because every
    answer token costs training and inference time on CPU."""
    ordered = {k: obj[k] for k in CANONICAL_KEYS if k in obj}
    ordered.update({k: v for k, v in obj.items() if k not in ordered})
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
