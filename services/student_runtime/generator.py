"""``StudentGenerator``: a student loaded from its spec, answering PROMPT strings greedily with a confidence.

The spec (a version's ``spec.json``, written by ``services.core.model_repository``) names the base model (a
local directory or a Hugging Face id, optionally a ``gguf_file`` inside it), an optional PEFT adapter directory
(relative to the version folder), generation settings, the valid labels decoding is constrained to, the answer
template of compact answers, the drafts of each label's usual tail and the prompt limit of training.

Confidence is the minimum probability of the answer's generated tokens (not the mean, which easy JSON
punctuation inflates). A constrained label counts as one decision whose probability is the product of its
tokens' probabilities renormalised over the tokens that keep it a valid label: the probability mass of the
chosen name among the valid names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.threads import AdaptiveThreads, parse_threads
from services.student_runtime.answer import expand_answer
from services.student_runtime.decode import FastDecoder, NoLabels, Row
from services.student_runtime.label_head import LabelHead, head_path
from services.student_runtime.labels import LabelTrie
from services.student_runtime.prompt import PromptError, fit_prompt, parse_prompt, render_prompt, shared_prefix_ids
from services.student_runtime.reference import reference_decode
from services.student_runtime.weights import apply_weight_format

SPEC_FILE = "spec.json"
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a LoRA adapter


def student_threads(spec: dict[str, Any]) -> int | None:
    """The spec's ``num_threads``, else the ``student_threads`` setting; None: auto. Read from the environment
    (``FLYWHEEL_STUDENT_THREADS``, validated by ``Settings`` in the processes that start Triton) so the Triton
    process needs no more than torch and transformers."""
    if spec.get("num_threads"):
        return parse_threads(spec["num_threads"], "num_threads")
    return parse_threads(os.environ.get("FLYWHEEL_STUDENT_THREADS"), "FLYWHEEL_STUDENT_THREADS")


def load_spec(version_dir: Path) -> dict[str, Any]:
    return json.loads((Path(version_dir) / SPEC_FILE).read_text())


def adapter_dir_of(spec: dict[str, Any], version_dir: Path | None) -> Path | None:
    """The spec's LoRA adapter folder (``adapter_path``: relative to the version's folder unless absolute);
    None for a spec without an adapter (a merged model)."""
    adapter = spec.get("adapter_path")
    if not adapter:
        return None
    path = Path(adapter)
    return version_dir / path if not path.is_absolute() and version_dir is not None else path


def answer_end_id(model: Any, tokenizer: Any) -> int:
    """The token that ends an assistant turn, as training appends it: the generation config's EOS when it has one
    (SmolLM2's <|im_end|>), else the tokenizer's."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, list | tuple) and gen:
        gen = gen[0]
    if isinstance(gen, int):
        return gen
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers would never end")
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class Answer:
    """One row's answer, or its error (``error`` set, the rest empty)."""

    text: str = ""
    confidence: float = 0.0
    input_tokens: int = 0  # the prompt the student read (after truncation), system prompt included
    output_tokens: int = 0  # the tokens it generated (template-filled fields are not generated), EOS excluded
    forward_passes: int = 0
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the generated tokens, EOS included (tests compare decoders on them)


@dataclass(frozen=True)
class Prepared:
    text: str
    ids: list[int]
    shares_prefix: bool


class StudentGenerator:
    """Loads a student from a spec and answers prompts (no Triton needed)."""

    def __init__(self, spec: dict[str, Any], version_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.threads = AdaptiveThreads(fixed=student_threads(spec))
        base = str(spec["base_model"])
        # A local directory must never fall through to a hub download (the local stack is offline), and a
        # missing one must say so rather than fail as a malformed hub id.
        local = Path(base).exists()
        if not local and base.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"base model directory {base} does not exist")
        load_kwargs: dict[str, Any] = {"local_files_only": local}
        if spec.get("gguf_file"):
            load_kwargs["gguf_file"] = spec["gguf_file"]
        self.tokenizer = AutoTokenizer.from_pretrained(base, **load_kwargs)
        self.tokenizer.padding_side = "left"
        dtype = getattr(torch, str(spec.get("dtype") or "float32"))
        import transformers

        # transformers renamed torch_dtype to dtype (4.56); the project allows versions on both sides.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(base, **{dtype_kw: dtype}, **load_kwargs)
        adapter_dir = adapter_dir_of(spec, version_dir)
        self.adapter_dir: Path | None = None
        if adapter_dir is not None:
            from peft import PeftModel

            if not (adapter_dir / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(f"LoRA adapter {adapter_dir} has no {ADAPTER_CONFIG}")
            # Merged into the base weights: inference then costs exactly what the base model costs.
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            self.adapter_dir = adapter_dir
        model.eval()
        # A format that cannot be applied fails the load (Triton then keeps the previous version serving).
        self.weight_format = str(spec.get("weight_format") or "fp32")
        self.model = apply_weight_format(model, self.weight_format)
        self.torch = torch
        self.max_new_tokens = int(spec.get("max_new_tokens") or 64)
        self.max_prompt_tokens = int(spec.get("max_prompt_tokens") or 0) or None
        self.system_prompt = spec.get("system_prompt")
        self.answer_template = spec.get("answer_template") or None

        eos: set[int] = set()
        for value in (self.tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(int(v) for v in value)
        if not eos:
            raise ValueError(f"tokenizer of {base} has no EOS token: answers would never end")
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(eos)
        self.special_ids = set(self.tokenizer.all_special_ids) | eos
        end_id = min(eos) if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id
        labels = [str(x) for x in spec.get("labels") or []]
        self.labels = (
            LabelTrie(
                self.tokenizer, labels, str(spec.get("label_prefix") or ""), str(spec.get("label_suffix") or ""), end_id
            )
            if labels
            else None
        )
        self.label_head = self._load_label_head(spec, Path(base) if local else None, model)
        # The head's tail decision ends most answers after one pass; ``tail_decision: false`` in a spec turns it
        # off (the label is then fed and the model writes the tail, as before the decision existed).
        self.tail_decision = bool(
            self.label_head is not None and self.label_head.decides_tail and spec.get("tail_decision", True)
        )
        self.end_id = answer_end_id(model, self.tokenizer)
        self.prefix_ids = shared_prefix_ids(self.tokenizer, self.system_prompt)
        self.fast = FastDecoder(self)
        self.fast.cache_prefix(self.prefix_ids)
        if self.labels:
            # The drafts stop before EOS: the last draft position's own decision says whether the answer ends.
            tails = {str(k): str(v) for k, v in (spec.get("label_tails") or {}).items()}
            encoded = {
                tuple(self.labels.sequences[label]): list(self.tokenizer.encode(tail, add_special_tokens=False))
                for label, tail in tails.items()
                if label in self.labels.sequences
            }
            default = str(spec.get("default_tail") or "")
            self.fast.set_tails(encoded, list(self.tokenizer.encode(default, add_special_tokens=False)))
            corpus = [str(t) for t in spec.get("tail_corpus") or []]
            self.fast.set_corpus([list(self.tokenizer.encode(t, add_special_tokens=False)) for t in corpus])

    def _load_label_head(self, spec: dict[str, Any], base_dir: Path | None, model: Any) -> LabelHead | None:
        """The version's label head, from beside the adapter (or the merged model); None without one."""
        name = spec.get("label_head")
        if not name:
            return None
        if not self.labels:
            raise ValueError(f"spec names a label head ({name}) but no labels")
        path = head_path(str(name), self.adapter_dir, base_dir)
        sequences = list(self.labels.sequences.values())  # in the order of the spec's labels, as trained
        return LabelHead(path, sequences, int(model.get_output_embeddings().weight.shape[1]))

    # Prompts ------------------------------------------------------------------------------------------------
    def prompt_text(self, raw: str) -> tuple[str, bool]:
        """(text, from_chat) for a PROMPT input; chat-rendered text already carries its special tokens."""
        messages, tools = parse_prompt(raw)
        if messages is None:
            return raw, False
        return render_prompt(self.tokenizer, messages, self.system_prompt, tools), True

    def prepare(self, raw: str) -> Prepared:
        """The prompt's text and token ids as the student reads them (truncated as in training)."""
        text, from_chat = self.prompt_text(raw)
        ids = list(self.tokenizer.encode(text, add_special_tokens=not from_chat))
        if not ids:
            raise PromptError("PROMPT has no tokens")
        ids = fit_prompt(ids, self.max_prompt_tokens, self.prefix_ids)
        shares = (
            bool(self.prefix_ids) and len(ids) > len(self.prefix_ids) and ids[: len(self.prefix_ids)] == self.prefix_ids
        )
        return Prepared(text, ids, shares)

    # Answers ------------------------------------------------------------------------------------------------
    def answer(self, raws: list[str], max_new_tokens: int | None = None, reference: bool = False) -> list[Answer]:
        """One ``Answer`` per PROMPT; a bad one gets an ``Answer`` with its error and the others are answered."""
        limit = int(max_new_tokens or self.max_new_tokens)
        self.threads.update()  # the cores the rest of the machine leaves free now
        out: list[Answer | None] = [None] * len(raws)
        prepared: dict[int, Prepared] = {}
        for index, raw in enumerate(raws):
            try:
                prepared[index] = self.prepare(raw)
            except PromptError as exc:
                out[index] = Answer(error=str(exc))
        if prepared and reference:
            for index, (tokens, probs, start, end, passes) in self._reference(prepared, limit).items():
                out[index] = self._answer(prepared[index], tokens, probs, start, end, passes)
        elif prepared:
            rows = [self.start_row(index, prep, limit) for index, prep in prepared.items()]
            self.fast.decode(rows)
            for row in rows:
                out[row.index] = self.finish_row(prepared[row.index], row)
        return [a if a is not None else Answer(error="not answered") for a in out]

    def start_row(self, index: int, prep: Prepared, limit: int | None = None) -> Row:
        """A row of the fast decoder for a prepared prompt (``index``: the caller's)."""
        cursor = self.labels.cursor(prep.text) if self.labels else NoLabels()
        skip = len(self.prefix_ids) if prep.shares_prefix else 0
        return Row(
            index=index,
            cursor=cursor,
            feed=prep.ids[skip:],
            pos=skip,
            limit=int(limit or self.max_new_tokens),
            prefix=prep.shares_prefix,
        )

    def finish_row(self, prep: Prepared, row: Row) -> Answer:
        """The answer of a decoded row."""
        return self._answer(prep, row.tokens, row.probs, row.cursor.start, row.cursor.end, row.passes)

    def _answer(
        self, prep: Prepared, tokens: list[int], probs: list[float], start: int | None, end: int | None, passes: int
    ) -> Answer:
        return Answer(
            text=self._text(tokens),
            confidence=self._confidence(tokens, probs, start, end),
            input_tokens=len(prep.ids),
            output_tokens=sum(1 for t in tokens if t not in self.eos_ids),
            forward_passes=passes,
            token_ids=tuple(tokens),
        )

    def generate(self, raws: list[str], max_new_tokens: int | None = None) -> list[tuple[str, float]]:
        """(text, confidence) per PROMPT with the fast decoder; a bad PROMPT answers ("", 0.0)."""
        return [(a.text, a.confidence) for a in self.answer(raws, max_new_tokens)]

    def generate_reference(self, raws: list[str], max_new_tokens: int | None = None) -> list[tuple[str, float]]:
        """(text, confidence) per PROMPT with the plain decode (one forward pass per token)."""
        return [(a.text, a.confidence) for a in self.answer(raws, max_new_tokens, reference=True)]

    def _reference(self, prepared: dict[int, Prepared], limit: int) -> dict[int, tuple]:
        order = list(prepared)
        results = reference_decode(self, [(prepared[i].text, prepared[i].ids) for i in order], limit)
        out = {}
        for index, (tokens, probs, state, passes) in zip(order, results, strict=True):
            start = state["start"] if state else None
            end = state["end"] if state else None
            out[index] = (tokens, probs, start, end, passes)
        return out

    def _text(self, toks: list[int]) -> str:
        kept = [t for t in toks if t not in self.eos_ids]
        return expand_answer(str(self.tokenizer.decode(kept, skip_special_tokens=True)).strip(), self.answer_template)

    def _confidence(self, toks: list[int], probs: list[float], start: int | None, end: int | None) -> float:
        if start is not None and end is None:
            end = len(toks)
        decisions: list[float] = []
        if start is not None and end is not None and end > start:
            decisions.append(math.prod(probs[start:end]))
        for i, (tok, prob) in enumerate(zip(toks, probs, strict=True)):
            if start is not None and end is not None and start <= i < end:
                continue
            if tok not in self.special_ids:
                decisions.append(prob)
        if not decisions:  # an empty answer is no answer
            return 0.0
        return float(min(1.0, max(0.0, min(decisions))))
