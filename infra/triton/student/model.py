"""Triton Python-backend model for a student: a Hugging Face causal LM (+ optional LoRA adapter), greedy.

Each version folder holds this file and ``spec.json`` (written by ``services/core/model_repository.py``): the
base model (a local directory or a Hugging Face id, optionally a ``gguf_file`` inside it), an optional PEFT
adapter directory (relative paths are relative to the version folder), generation settings and an optional
list of valid labels that decoding is constrained to.

Inputs / outputs (all with a leading batch dimension; Triton's dynamic batcher groups requests):

* ``PROMPT`` (BYTES, [1]): UTF-8. If it parses as JSON and is a list of chat messages
  (``[{"role": ..., "content": ...}, ...]``) or an object ``{"messages": [...], "tools": [...]}`` it is
  rendered with the tokenizer's chat template (``add_generation_prompt=True``; a plain ``role: content``
  layout when the tokenizer has no template), the spec's ``system_prompt`` being prepended when the messages
  carry none.
  Anything else is taken as an already-formatted prompt and tokenised as is.
* ``TEXT`` (BYTES, [1]): the generated answer, special tokens removed, stripped.
* ``CONFIDENCE`` (FP32, [1], in [0, 1]): the minimum probability of the answer's generated tokens (not the
  mean, which easy JSON punctuation inflates). When the answer contains a constrained label, the label counts
  as one decision whose probability is the product of its tokens' probabilities renormalised over the tokens
  that keep it a valid label: the probability mass of the chosen name among the valid names.

An optional ``answer_template`` in the spec holds the answer fields that are fixed per label in the teacher's
answers (for example each intent's tool and reply). The student is then trained to write only the rest (the
label and the arguments: a third of the tokens, which is most of the training and serving time on a CPU), and
``expand_answer`` puts the fixed fields back, in the teacher's key order, before the answer leaves the model.

The generation code does not depend on Triton (``triton_python_backend_utils`` is only imported when present),
so the trainer can load this file and evaluate a candidate with exactly the serving code path
(``services.core.model_repository.student_runtime()``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the trainer / tests for the generation code
    pb_utils = None

SPEC_FILE = "spec.json"
WARMUP_MESSAGES = [{"role": "user", "content": "Hello, I need help with my card."}]


# Prompt rendering -------------------------------------------------------------------------------------------
def parse_prompt(raw: str) -> tuple[list[dict[str, Any]] | None, list[Any] | None]:
    """(messages, tools) when ``raw`` is JSON chat messages, else (None, None): a pre-formatted prompt."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None, None
    tools = None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        tools = data.get("tools") if isinstance(data.get("tools"), list) else None
        data = data["messages"]
    if isinstance(data, list) and data and all(isinstance(m, dict) and "role" in m for m in data):
        messages = [{**m, "content": "" if m.get("content") is None else m["content"]} for m in data]
        return messages, tools
    return None, None


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    system_prompt: str | None = None,
    tools: list | None = None,
) -> str:
    """The prompt text the student sees for chat ``messages`` (the trainer must train on this rendering)."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        return str(tokenizer.apply_chat_template(messages, **kwargs))
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


# Answer templates -------------------------------------------------------------------------------------------
def expand_answer(text: str, template: dict[str, Any] | None) -> str:
    """The full answer for a compact one: the label's fixed fields added back, keys in the teacher's order.
    Text that is not a JSON object with a known label is returned as is (the format check judges it)."""
    if not template:
        return text
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return text
    label_field = str(template.get("label_field") or "intent")
    if not isinstance(data, dict) or not isinstance(data.get(label_field), str):
        return text
    fixed = (template.get("by_label") or {}).get(data[label_field])
    if not fixed:
        return text
    merged = {**fixed, **data}
    order = [k for k in template.get("fields") or [] if k in merged]
    ordered = {k: merged[k] for k in order} | {k: v for k, v in merged.items() if k not in order}
    return json.dumps(ordered, ensure_ascii=False)


# Constrained labels -----------------------------------------------------------------------------------------
_END = -1  # trie key marking a complete label sequence


class LabelConstraint:
    """Forces the text after ``prefix`` to be one of ``labels`` then ``suffix`` (a prefix trie of token ids).

    Only the first occurrence of the prefix in an answer is constrained. With an empty prefix the whole answer
    starts with the label (classification); with an empty suffix the label ends the answer (EOS follows it).
    """

    def __init__(self, tokenizer: Any, labels: list[str], prefix: str, suffix: str, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.trie: dict[int, Any] = {}
        for label in labels:
            seq = list(tokenizer.encode(label + suffix, add_special_tokens=False))
            if not suffix:
                seq.append(eos_id)
            node = self.trie
            for tok in seq:
                node = node.setdefault(tok, {})
            node[_END] = {}

    def new_state(self, prompt: str) -> dict[str, Any]:
        started = 0 if (self.prefix == "" or prompt.endswith(self.prefix)) else None
        return {"start": started, "end": None}

    def allowed(self, state: dict[str, Any], generated: list[int]) -> list[int] | None:
        """Token ids allowed next for one row, or None when this step is unconstrained."""
        if state["end"] is not None:
            return None
        if state["start"] is None:
            text = self.tokenizer.decode(generated, skip_special_tokens=False)
            if not text.endswith(self.prefix):
                return None
            state["start"] = len(generated)
        node = self.trie
        for tok in generated[state["start"] :]:
            node = node.get(tok, {})
        if _END in node:  # the label (and its suffix) is complete: free generation again
            state["end"] = len(generated)
            return None
        children = [t for t in node if t != _END]
        return children or None


# Generation -------------------------------------------------------------------------------------------------
class StudentGenerator:
    """Loads a student from a spec and answers prompts greedily with a confidence (no Triton needed)."""

    def __init__(self, spec: dict[str, Any], version_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        threads = int(spec.get("num_threads") or os.cpu_count() or 1)
        torch.set_num_threads(max(1, threads))
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
        # transformers renamed torch_dtype to dtype (4.56); the project allows versions on both sides.
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(base, **{dtype_kw: dtype}, **load_kwargs)
        adapter = spec.get("adapter_path")
        self.adapter_dir: Path | None = None
        if adapter:
            from peft import PeftModel

            adapter_dir = Path(adapter)
            if not adapter_dir.is_absolute() and version_dir is not None:
                adapter_dir = version_dir / adapter_dir
            if not (adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"LoRA adapter {adapter_dir} has no adapter_config.json")
            # Merged into the base weights: inference then costs exactly what the base model costs.
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            self.adapter_dir = adapter_dir
        model.eval()
        self.model = model
        self.torch = torch
        self.max_new_tokens = int(spec.get("max_new_tokens") or 64)
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
        labels = [str(x) for x in spec.get("labels") or []]
        self.constraint = (
            LabelConstraint(
                self.tokenizer,
                labels,
                str(spec.get("label_prefix") or ""),
                str(spec.get("label_suffix") or ""),
                min(eos) if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id,
            )
            if labels
            else None
        )
        # Ask the model for the last position's logits only: full-vocabulary logits for every prompt token
        # (49k x 300 x 8 floats for SmolLM2) are the largest allocation of the whole forward pass.
        params = inspect.signature(model.forward).parameters
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in params else None

    def prompt_text(self, raw: str) -> tuple[str, bool]:
        """(text, from_chat) for a PROMPT input; chat-rendered text already carries its special tokens."""
        messages, tools = parse_prompt(raw)
        if messages is None:
            return raw, False
        return render_prompt(self.tokenizer, messages, self.system_prompt, tools), True

    def generate(self, raws: list[str], max_new_tokens: int | None = None) -> list[tuple[str, float]]:
        """Greedy answers and confidences for a batch of PROMPT strings (left-padded, one forward a token)."""
        torch = self.torch
        limit = int(max_new_tokens or self.max_new_tokens)
        prompts = [self.prompt_text(r) for r in raws]
        encoded = [list(self.tokenizer.encode(text, add_special_tokens=not from_chat)) for text, from_chat in prompts]
        # An empty prompt still needs one position to predict from: start it with BOS (or EOS).
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.eos_ids)
        encoded = [seq or [start] for seq in encoded]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            if seq:
                ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        states = [self.constraint.new_state(text) if self.constraint else None for text, _ in prompts]
        tokens: list[list[int]] = [[] for _ in encoded]
        probs: list[list[float]] = [[] for _ in encoded]
        done = [False] * len(encoded)
        past = None
        step_ids, step_pos = ids, positions
        with torch.inference_mode():
            for _ in range(limit):
                kwargs: dict[str, Any] = {
                    "input_ids": step_ids,
                    "attention_mask": mask,
                    "position_ids": step_pos,
                    "past_key_values": past,
                    "use_cache": True,
                }
                if self._logits_kw:
                    kwargs[self._logits_kw] = 1
                out = self.model(**kwargs)
                past = out.past_key_values
                logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
                chosen = logprobs.argmax(dim=-1)
                for row in range(len(encoded)):
                    if done[row]:
                        chosen[row] = self.pad_id
                        continue
                    allowed = (
                        self.constraint.allowed(states[row], tokens[row])
                        if self.constraint and states[row] is not None
                        else None
                    )
                    if allowed:
                        # Greedy among the tokens that keep the label valid; the probability is renormalised
                        # over them, so a label's product is its mass among the valid labels.
                        allowed_t = torch.tensor(allowed, dtype=torch.long)
                        sub = logprobs[row, allowed_t]
                        best = int(sub.argmax())
                        tok = allowed[best]
                        prob = float(torch.exp(sub[best] - torch.logsumexp(sub, dim=0)))
                    else:
                        tok = int(chosen[row])
                        prob = float(torch.exp(logprobs[row, tok]))
                    chosen[row] = tok
                    tokens[row].append(tok)
                    probs[row].append(prob)
                    if tok in self.eos_ids:
                        done[row] = True
                if all(done):
                    break
                step_ids = chosen.unsqueeze(-1)
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((len(encoded), 1), dtype=mask.dtype)], dim=-1)
        results = []
        for row in range(len(encoded)):
            if self.constraint and states[row] is not None:
                self.constraint.allowed(states[row], tokens[row])  # closes a label completed on the last step
            results.append((self._text(tokens[row]), self._confidence(tokens[row], probs[row], states[row])))
        return results

    def _text(self, toks: list[int]) -> str:
        kept = [t for t in toks if t not in self.eos_ids]
        return expand_answer(str(self.tokenizer.decode(kept, skip_special_tokens=True)).strip(), self.answer_template)

    def _confidence(self, toks: list[int], probs: list[float], state: dict[str, Any] | None) -> float:
        start = end = None
        if state is not None and state["start"] is not None:
            start, end = state["start"], state["end"] if state["end"] is not None else len(toks)
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


def load_spec(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / SPEC_FILE).read_text())


# Triton entry point -----------------------------------------------------------------------------------------
class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.max_batch = max(1, int(config.get("max_batch_size") or 1))
        self.name = f"{args['model_name']} version {args['model_version']}"
        spec = load_spec(version_dir)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars would garble the Triton log
        self.generator = StudentGenerator(spec, version_dir)
        if spec.get("warmup", True):
            # A version that cannot answer must fail its load (the previous version then keeps serving), and
            # the first real request should not pay for lazy initialisation.
            _answer, confidence = self.generator.generate([json.dumps(WARMUP_MESSAGES)], max_new_tokens=4)[0]
            if not 0.0 <= confidence <= 1.0:
                raise ValueError(f"{self.name}: warm-up confidence {confidence} is outside [0, 1]")
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {spec['base_model']}"
            + (f" with adapter {self.generator.adapter_dir}" if self.generator.adapter_dir else "")
        )

    def execute(self, requests: list) -> list:
        # Flatten every request's rows into one batch, answer in chunks of max_batch, then split back.
        rows: list[tuple[int, str]] = []
        shapes: list[tuple[int, ...]] = []
        errors: dict[int, str] = {}
        for index, request in enumerate(requests):
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
            shapes.append(prompt.shape)
            try:
                for item in prompt.reshape(-1):
                    raw = item.decode("utf-8") if isinstance(item, bytes) else str(item)
                    rows.append((index, raw))
            except UnicodeDecodeError as exc:
                errors[index] = f"PROMPT is not UTF-8: {exc}"
        valid = [(index, raw) for index, raw in rows if index not in errors]
        answers: list[tuple[str, float]] = []
        for begin in range(0, len(valid), self.max_batch):
            chunk = valid[begin : begin + self.max_batch]
            answers.extend(self.generator.generate([raw for _, raw in chunk]))
        per_request: dict[int, list[tuple[str, float]]] = {}
        for (index, _), answer in zip(valid, answers, strict=True):
            per_request.setdefault(index, []).append(answer)
        responses = []
        for index, shape in enumerate(shapes):
            if index in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[index])))
                continue
            got = per_request.get(index, [])
            text = np.array([a[0].encode("utf-8") for a in got], dtype=np.object_).reshape(shape)
            conf = np.array([a[1] for a in got], dtype=np.float32).reshape(shape)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("TEXT", text), pb_utils.Tensor("CONFIDENCE", conf)]
                )
            )
        return responses

    def finalize(self) -> None:
        self.generator = None
