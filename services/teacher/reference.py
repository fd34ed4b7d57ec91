"""The **reference teacher**: the offline stand-in for a frontier model. It is not a model and knows nothing
beyond its data sets: it answers a conversation's last user message from a labelled public data set
(``workloads.py``) in the agent's JSON contract, with a latency model and a configurable rate of realistic
flaws, so that the flywheel (curation, training, agreement, cost) can run end to end without network access.

How an answer is found: an exact match of the message (case and whitespace folded) in the workload's examples
(train and test) in O(1); else the nearest example by TF-IDF cosine over words and character trigrams (built
once at start; typos and paraphrases still land on a plausible intent); a message sharing no feature with any
example gets an example chosen by a hash of its text.

Flaws, for curation to catch, are chosen from a hash of (seed, message text), so a run is reproducible and a
repeated message gets the same answer; each kind has probability ``flaw_rate / 3``:

* ``hedge``: the reply hedges ("I'm not sure, but ...", "I cannot be certain ..."); the JSON stays valid;
* ``invalid_tool``: the tool is a plausible name that is not in the workload's tool list;
* ``malformed_json``: a cut-off object (finish_reason ``length``), a trailing comma, or Python-style quotes.

Latency: lognormal with median ``latency_ms`` and shape ``latency_sigma`` (0.4: p95 ≈ 1.9 × median, about
what hosted frontier models show for short answers), capped at 10 × the median; 0 means instant. Token counts
are approximate (``approx_tokens``: characters / 4, rounded up).

Plan-and-execute (docs/plan-execute.md): a chat whose system messages carry the router's plan marker
(``services.router.plan.PLAN_MARKER``) gets a plan, ``{"steps": [{"instruction", "intent", "tool"}, ...]}`` with
one step per intent of the last user message (``Workload.plan_for``); a message in the form of one of those
instructions (``STEP_INSTRUCTION``) is answered for that step's intent alone, like a single-intent message.

``ReferenceTeacher`` also implements the ``Teacher`` interface in process (for unit tests of code that needs a
teacher); the local stack serves it over HTTP (``server.py``) so the router always talks HTTP to its teacher.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.core.records import ChatMessage, ToolCall
from services.router.plan import is_plan_request
from services.teacher.base import Completion, TeacherError, TeacherOptions, approx_tokens
from services.teacher.contract import STEP_INSTRUCTION_RE, Example, Workload
from services.teacher.datasets import NAME_RE, DataSetError, load_registered, registry_dir
from services.teacher.workloads import load_workloads, registered_names

if TYPE_CHECKING:
    from services.core.settings import Settings

MODEL_PREFIX = "reference/"
FLAW_KINDS = ("hedge", "invalid_tool", "malformed_json")
DEFAULT_LATENCY_SIGMA = 0.4
NEAREST_CACHE = 65536  # memoised nearest-neighbour lookups per workload
LATENCY_CAP = 10.0  # × median: a lognormal tail past this is no longer realistic, only slow tests
PLAN_FLAW_SALT = "plan\x1f"  # a plan's flaw is drawn apart from the flaw of the same message's direct answer

# Hedging, as language models do it; {r} is the reply with its first letter lower-cased, {R} as is.
HEDGE_TEMPLATES = (
    "I'm not sure, but {r}",
    "I cannot be certain, but {r}",
    "{R} I cannot be certain this is right.",
    "{R} I might be wrong, though.",
)
HEDGE_PHRASES = ("i'm not sure", "i cannot be certain", "i might be wrong")
# Tool names a model invents when it does not stick to the list it was given.
INVENTED_TOOLS = ("lookup_account", "search_knowledge_base", "escalate_ticket", "check_status", "customer_support")

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPACE_RE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The exact-match key: case folded, whitespace collapsed."""
    return _SPACE_RE.sub(" ", text).strip().casefold()


def features(text: str) -> list[str]:
    """Words (prefixed, so they never collide with trigrams) and the character trigrams of each padded word."""
    words = _TOKEN_RE.findall(text.casefold())
    out = ["\x01" + w for w in words]
    for w in words:
        padded = f"#{w}#"
        out.extend(padded[i : i + 3] for i in range(len(padded) - 2))
    return out


class SimilarityIndex:
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised) cosine nearest neighbour, numpy only: postings
    (document ids and weights per feature, sorted by feature) are gathered for the query's features and summed
    with ``bincount``, so a query costs the length of its postings, not the size of a dense matrix."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        vocab: dict[str, int] = {}
        doc_ids: list[int] = []
        feat_ids: list[int] = []
        counts: list[int] = []
        for doc, text in enumerate(texts):
            for feat, n in Counter(features(text)).items():
                doc_ids.append(doc)
                feat_ids.append(vocab.setdefault(feat, len(vocab)))
                counts.append(n)
        self.vocab = vocab
        docs = np.asarray(doc_ids, dtype=np.int32)
        feats = np.asarray(feat_ids, dtype=np.int32)
        df = np.bincount(feats, minlength=len(vocab)).astype(np.float64)
        self.idf = (np.log((1.0 + self.size) / (1.0 + df)) + 1.0).astype(np.float32)
        weights = (1.0 + np.log(np.asarray(counts, dtype=np.float32))) * self.idf[feats]
        norms = np.sqrt(np.bincount(docs, weights=weights.astype(np.float64) ** 2, minlength=self.size))
        weights = (weights / np.maximum(norms[docs], 1e-12)).astype(np.float32)
        order = np.argsort(feats, kind="stable")
        self.post_docs = docs[order]
        self.post_weights = weights[order]
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(feats, minlength=len(vocab)))]).astype(np.int64)

    def nearest(self, text: str) -> tuple[int, float]:
        """(document index, cosine similarity); similarity 0.0 (index -1) when nothing is shared."""
        query = Counter(f for f in features(text) if f in self.vocab)
        if not query:
            return -1, 0.0
        ids = np.fromiter((self.vocab[f] for f in query), dtype=np.int64, count=len(query))
        tf = 1.0 + np.log(np.fromiter(query.values(), dtype=np.float32, count=len(query)))
        qw = tf * self.idf[ids]
        qw /= max(float(np.linalg.norm(qw)), 1e-12)
        starts, ends = self.offsets[ids], self.offsets[ids + 1]
        docs = np.concatenate([self.post_docs[s:e] for s, e in zip(starts, ends, strict=True)])
        weights = np.concatenate([self.post_weights[s:e] * w for s, e, w in zip(starts, ends, qw, strict=True)])
        scores = np.bincount(docs, weights=weights, minlength=self.size)
        best = int(np.argmax(scores))
        return best, float(scores[best])


def _unit(seed: int, text: str) -> tuple[float, int]:
    """A uniform number in [0, 1) and a second independent integer, both from a hash of (seed, text)."""
    digest = hashlib.blake2b(f"{seed}\x1f{text}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:], "big")


def flaw_for(seed: int, text: str, rate: float) -> str | None:
    """The flaw kind for a message, or None; each kind has probability ``rate / 3``."""
    if rate <= 0:
        return None
    u, _ = _unit(seed, text)
    if u >= rate:
        return None
    return FLAW_KINDS[min(int(u / rate * 3), 2)]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != "I " else text


def hedge(reply: str, choice: int) -> str:
    template = HEDGE_TEMPLATES[choice % len(HEDGE_TEMPLATES)]
    return template.format(r=_lower_first(reply), R=reply)


def invented_tool(tool: str, valid: Iterable[str], choice: int) -> str:
    """A plausible tool name outside ``valid``: the right one mangled, or a generic invention."""
    parts = tool.split("_")
    candidates = [
        parts[0] + "".join(p.title() for p in parts[1:]),  # camelCase
        f"get_{tool}",
        f"{tool}_v2",
        *INVENTED_TOOLS,
    ]
    valid_set = set(valid)
    usable = [c for c in candidates if c not in valid_set]
    return usable[choice % len(usable)]


def malform(obj: dict[str, Any], text: str, choice: int) -> tuple[str, str]:
    """(broken JSON text, variant): cut off (half the cases), a trailing comma, or Python-style quotes."""
    variant = ("cut_off", "cut_off", "trailing_comma", "python_quotes")[choice % 4]
    if variant == "cut_off":
        # Cut between 40 % and 90 % of the text: never a complete object, always some content.
        cut = max(1, int(len(text) * (0.4 + 0.5 * ((choice >> 2) % 1000) / 1000)))
        return text[:cut], variant
    if variant == "trailing_comma":
        return text[:-1] + ", }" if text.endswith("}") else text + ",", variant
    broken = repr(obj)
    if broken == text or broken == "{}":  # repr can coincide with JSON (empty object): fall back to a cut
        return text[: max(1, len(text) // 2)], "cut_off"
    return broken, variant


@dataclass(frozen=True)
class ReferenceAnswer:
    """One answer of the reference teacher, with what it was based on (for tests and diagnostics)."""

    model: str
    content: str
    tool_call: tuple[str, str] | None  # (tool name, arguments JSON) when the request offered tools
    finish_reason: str
    flaw: str | None
    match: str  # "exact", "nearest" or "hashed" (nothing in common with any example)
    similarity: float
    example: Example
    kind: str = "answer"  # "answer", "step" (a plan step's instruction, for its intent) or "plan"


class UnknownModel(LookupError):
    def __init__(self, model: str, known: Sequence[str], why: str = "") -> None:
        reason = why or f"known models: {', '.join(known)}"
        super().__init__(f"model {model!r} is not served by the reference teacher; {reason}")
        self.model = model
        self.known = list(known)


@dataclass
class _Served:
    """A workload prepared for fast answers: every example's answer and its JSON text are precomputed."""

    workload: Workload
    examples: list[Example]
    exact: dict[str, int]
    answers: list[dict[str, Any]]
    texts: list[str]
    argument_texts: list[str]
    index: SimilarityIndex
    nearest: Callable[[str], tuple[int, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Unseen messages cost a few hundred microseconds each; traffic repeats them (retries, shadow samples,
        # a replayed workload), so the lookups are memoised.
        self.nearest = functools.lru_cache(maxsize=NEAREST_CACHE)(self.index.nearest)

    @classmethod
    def build(cls, workload: Workload) -> _Served:
        examples = workload.examples("all")
        exact: dict[str, int] = {}
        for i, ex in enumerate(examples):
            exact.setdefault(normalise(ex.text), i)  # the few duplicate texts keep their first label
        answers = [workload.answer_for(ex) for ex in examples]
        return cls(
            workload=workload,
            examples=examples,
            exact=exact,
            answers=answers,
            texts=[json.dumps(a) for a in answers],
            argument_texts=[json.dumps(a["arguments"]) for a in answers],
            index=SimilarityIndex([ex.text for ex in examples]),
        )

    def find(self, text: str) -> tuple[int, str, float]:
        i = self.exact.get(normalise(text))
        if i is not None:
            return i, "exact", 1.0
        best, score = self.nearest(text)
        if score > 0.0:
            return best, "nearest", score
        _, h = _unit(0, text)
        return h % len(self.examples), "hashed", 0.0


def last_user_text(messages: Iterable[tuple[str, str]]) -> str:
    """The text the answer is for: the last user message (else the last message of any role)."""
    pairs = list(messages)
    for role, content in reversed(pairs):
        if role == "user":
            return content
    return pairs[-1][1] if pairs else ""


class ReferenceTeacher:
    """The reference teacher over a set of workloads, model name ``reference/<workload>``."""

    def __init__(
        self,
        workloads: Mapping[str, Workload],
        *,
        latency_ms: float = 0.0,
        latency_sigma: float = DEFAULT_LATENCY_SIGMA,
        flaw_rate: float = 0.0,
        seed: int = 0,
        registry: Path | None = None,
    ) -> None:
        if not 0.0 <= flaw_rate <= 1.0:
            raise ValueError(f"flaw_rate must be within [0, 1], got {flaw_rate}")
        if latency_ms < 0 or latency_sigma < 0:
            raise ValueError("latency_ms and latency_sigma must not be negative")
        self.latency_ms = latency_ms
        self.latency_sigma = latency_sigma
        self.flaw_rate = flaw_rate
        self.seed = seed
        self._rng = random.Random(seed)
        self._served = {MODEL_PREFIX + name: _Served.build(w) for name, w in workloads.items()}
        # Data sets registered while the server runs (flywheel replay/demo --data): read on first use, and again
        # when registered anew; keyed by model, with the file's change time.
        self.registry = registry
        self._registered: dict[str, tuple[int, _Served]] = {}

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, **kwargs: Any) -> ReferenceTeacher:
        return cls(load_workloads(data_dir), **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings, *, seed: int = 0) -> ReferenceTeacher:
        return cls.from_data_dir(
            settings.data_dir,
            latency_ms=settings.reference_teacher_latency_ms,
            flaw_rate=settings.reference_teacher_flaw_rate,
            seed=seed,
            registry=registry_dir(settings.home),
        )

    @property
    def models(self) -> list[str]:
        return [*self._served, *(MODEL_PREFIX + name for name in registered_names(self.registry))]

    def workload(self, model: str) -> Workload:
        return self._served_for(model).workload

    def _served_for(self, model: str) -> _Served:
        served = self._served.get(model)
        if served is None:
            served = self._registered_for(model)
        if served is None:
            raise UnknownModel(model, self.models)
        return served

    def _registered_for(self, model: str) -> _Served | None:
        name = model.removeprefix(MODEL_PREFIX)
        if self.registry is None or name == model or not NAME_RE.match(name):
            return None
        try:  # one stat a request: whether it is registered, and whether anew
            changed = (self.registry / name / "examples.jsonl").stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._registered.get(model)
        if cached is None or cached[0] != changed:
            try:
                cached = (changed, _Served.build(load_registered(self.registry / name)))
            except DataSetError as exc:
                raise UnknownModel(model, self.models, f"its data set does not read: {exc}") from exc
            self._registered[model] = cached
        return cached[1]

    def flaw_for(self, text: str) -> str | None:
        return flaw_for(self.seed, text, self.flaw_rate)

    def answer_chat(
        self,
        model: str,
        messages: Sequence[tuple[str, str]],
        *,
        tools: bool = False,
        flaws: bool = True,
        max_tokens: int | None = None,
    ) -> ReferenceAnswer:
        """The answer to a chat (``(role, text)`` pairs): a plan when a system message carries the plan marker,
        else the answer to the last user message (``answer``)."""
        text = last_user_text(messages)
        if is_plan_request(messages):
            return self.plan(model, text, flaws=flaws, max_tokens=max_tokens)
        return self.answer(model, text, tools=tools, flaws=flaws, max_tokens=max_tokens)

    def plan(self, model: str, text: str, *, flaws: bool = True, max_tokens: int | None = None) -> ReferenceAnswer:
        """A plan for one user message: ``{"steps": [...]}``, one step per intent of the message (of its nearest
        example when it is not in the data set). Flaws, drawn apart from the direct answer's: an invented tool
        in the first step, or broken JSON (a hedge has nothing to hedge in a plan: no flaw then)."""
        served = self._served_for(model)
        i, match, similarity = served.find(text)
        obj = {"steps": served.workload.plan_for(text, served.examples[i])}
        content = json.dumps(obj)
        finish = "stop"
        flaw = self.flaw_for(PLAN_FLAW_SALT + text) if flaws else None
        if flaw == "hedge":
            flaw = None
        elif flaw is not None:
            _, choice = _unit(self.seed + 1, PLAN_FLAW_SALT + text)
            if flaw == "invalid_tool":
                first = obj["steps"][0]
                first["tool"] = invented_tool(first["tool"], served.workload.tools, choice)
                content = json.dumps(obj)
            else:
                content, variant = malform(obj, content, choice)
                finish = "length" if variant == "cut_off" else finish
        if max_tokens is not None and approx_tokens(content) > max_tokens:
            content, finish = content[: max(0, max_tokens) * 4], "length"
        return ReferenceAnswer(model, content, None, finish, flaw, match, similarity, served.examples[i], "plan")

    def answer(
        self, model: str, text: str, *, tools: bool = False, flaws: bool = True, max_tokens: int | None = None
    ) -> ReferenceAnswer:
        """The answer to one user message. ``tools``: the request offered tools, so the answer also carries a
        tool call. ``flaws=False`` switches flaws off (tests, the X-Reference-Flaws: 0 header). A message in
        the form of a plan step's instruction (``STEP_INSTRUCTION``) naming an intent of the workload is
        answered for that intent alone, with the arguments of the message it quotes."""
        served = self._served_for(model)
        kind = "answer"
        step = STEP_INSTRUCTION_RE.match(text)
        if step is not None and served.workload.has_intent(step["intent"]):
            kind = "step"
            quoted = step["text"]
            i, match, similarity = served.find(quoted)
            example = served.examples[i]
            args = example.arguments if match == "exact" else served.workload.arguments_for(quoted, example)
            base = served.workload.intent_answer(step["intent"], args)
            content, arguments = json.dumps(base), json.dumps(base["arguments"])
        else:
            i, match, similarity = served.find(text)
            if match == "exact":  # the hot path: precomputed
                base, content, arguments = served.answers[i], served.texts[i], served.argument_texts[i]
            else:
                base = served.workload.answer_for(served.examples[i], text)
                content, arguments = json.dumps(base), json.dumps(base["arguments"])
        tool = base["tool"]
        finish = "stop"
        flaw = self.flaw_for(text) if flaws else None
        if flaw is not None:
            _, choice = _unit(self.seed + 1, text)  # independent of the draw that chose the kind
            obj = dict(base)
            if flaw == "hedge":
                obj["reply"] = hedge(obj["reply"], choice)
                content = json.dumps(obj)
            elif flaw == "invalid_tool":
                tool = obj["tool"] = invented_tool(tool, served.workload.tools, choice)
                content = json.dumps(obj)
            else:
                content, variant = malform(obj, content, choice)
                arguments, _ = malform(base["arguments"], arguments, choice)
                if variant == "cut_off":
                    finish = "length"
        tool_call = (tool, arguments) if tools else None
        if max_tokens is not None and approx_tokens(content) > max_tokens:
            # Like a real model hitting its token limit: the text stops mid-way and no tool call completes.
            content, tool_call, finish = content[: max(0, max_tokens) * 4], None, "length"
        elif tool_call is not None and finish == "stop":
            finish = "tool_calls"
        return ReferenceAnswer(model, content, tool_call, finish, flaw, match, similarity, served.examples[i], kind)

    def sample_latency_ms(self, median_ms: float | None = None, sigma: float | None = None) -> float:
        """One draw of the latency model (milliseconds)."""
        median = self.latency_ms if median_ms is None else median_ms
        shape = self.latency_sigma if sigma is None else sigma
        if median <= 0:
            return 0.0
        return min(median * math.exp(shape * self._rng.gauss(0.0, 1.0)), median * LATENCY_CAP)

    # The Teacher interface, in process --------------------------------------------------------------------
    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        options: TeacherOptions | None = None,  # the stand-in answers in its contract's JSON whatever they say
    ) -> Completion:
        start = time.perf_counter()
        try:
            ans = self.answer_chat(
                model,
                [(m.role, m.content) for m in messages],
                tools=bool(tools and tools.strip() not in ("", "[]", "null")),
                max_tokens=max_tokens,
            )
        except UnknownModel as exc:
            raise TeacherError(f"reference teacher (in process): {exc}", status=404) from exc
        delay = self.sample_latency_ms()
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        calls = [ToolCall(id="call_0", name=ans.tool_call[0], arguments=ans.tool_call[1])] if ans.tool_call else []
        return Completion(
            content=ans.content,
            tool_calls=calls,
            model=model,
            input_tokens=prompt_tokens([m.content for m in messages], tools),
            output_tokens=approx_tokens(ans.content),
            latency_ms=(time.perf_counter() - start) * 1000.0,
            finish_reason=ans.finish_reason,
        )

    async def aclose(self) -> None:
        return None


def prompt_tokens(contents: Iterable[str | None], tools: str | None = None) -> int:
    """Approximate prompt tokens: the messages' text, about 4 tokens of framing per message, and the tool
    definitions (which real APIs also bill as prompt)."""
    total = 0
    for content in contents:
        total += approx_tokens(content) + 4
    return total + approx_tokens(tools)
