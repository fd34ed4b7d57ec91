"""Reading a curated snapshot and turning it into training tensors (loss on the answer tokens only).

Snapshot layout (written by the curator; ``write_snapshot`` below writes the same layout for tests and
benchmarks)::

    <artifacts>/datasets/<agent_id>/<snapshot_id>/
        train.jsonl, holdout.jsonl   {"request_id", "intent", "messages": [{"role","content"}...],
                                      "target": "<teacher answer text>", "gold": "<gold intent or null>"}
        manifest.json                DatasetSnapshot fields, counts, filter stats, the stage-1 prompt
        prompt.json                  {"system_prompt": str, "few_shot": [[user turn, assistant turn]...]}

Prompts are rendered by the student runtime's ``render_prompt``, so a student is trained
on exactly the text Triton will feed it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100  # label of tokens the loss ignores (prompt, padding)
LABEL_PREFIX = '{"intent": "'  # the answer text after which the intent label is constrained
LABEL_SUFFIX = '"'
# Stage 2 trains on a short system prompt: the fine-tuned student no longer needs the stage-1 prompt's tool
# list and few-shot examples, and every prompt token costs training time on two cores (the answer format is
# learnt from the targets; valid labels are enforced by constrained decoding).
COMPACT_SYSTEM_PROMPT = "Classify the customer message. Answer with JSON: intent, tool, arguments, reply."
COMPACT_TEMPLATE_PROMPT = "Classify the customer message. Answer with JSON: {fields}."
LABEL_FIELD = "intent"


@dataclass(frozen=True)
class Example:
    request_id: str
    intent: str | None
    messages: list[dict[str, str]]
    target: str
    gold: str | None = None


@dataclass(frozen=True)
class StagePrompt:
    """The stage-1 prompt of a snapshot (the curator's ``StudentPrompt`` shape)."""

    system_prompt: str = ""
    few_shot: list[list[dict[str, str]]] = field(default_factory=list)  # each: [user turn, assistant turn]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePrompt:
        shots = list(data.get("few_shot") or [])
        if shots and isinstance(shots[0], dict):  # a flat list of turns: one group
            shots = [shots]
        return cls(str(data.get("system_prompt") or ""), [list(turns) for turns in shots])


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]
    prompt: StagePrompt
    train: list[Example]
    holdout: list[Example]

    @property
    def snapshot_id(self) -> str:
        return str(self.manifest.get("snapshot_id") or self.path.name)

    @property
    def agent_id(self) -> str:
        return str(self.manifest.get("agent_id") or self.path.parent.name)


def _read_jsonl(path: Path) -> list[Example]:
    out = []
    if not path.is_file():
        return out
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(
                Example(
                    request_id=str(row["request_id"]),
                    intent=row.get("intent"),
                    messages=[{"role": m["role"], "content": m.get("content") or ""} for m in row["messages"]],
                    target=str(row["target"]),
                    gold=row.get("gold"),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{line_no}: not a snapshot row ({exc})") from exc
    return out


def read_snapshot(path: Path | str) -> Snapshot:
    """Read a snapshot directory (``DatasetSnapshot.uri``; a ``file://`` URL is accepted)."""
    folder = Path(str(path).removeprefix("file://"))
    if not folder.is_dir():
        raise FileNotFoundError(f"snapshot directory {folder} does not exist")
    manifest_path, prompt_path = folder / "manifest.json", folder / "prompt.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    raw_prompt = json.loads(prompt_path.read_text()) if prompt_path.is_file() else {}
    prompt = StagePrompt.from_dict(raw_prompt)
    train = _read_jsonl(folder / "train.jsonl")
    if not train:
        raise ValueError(f"snapshot {folder} has no training examples (train.jsonl)")
    return Snapshot(folder, manifest, prompt, train, _read_jsonl(folder / "holdout.jsonl"))


def write_snapshot(
    folder: Path, manifest: dict[str, Any], prompt: StagePrompt, train: Sequence[Example], holdout: Sequence[Example]
) -> Path:
    """Write a snapshot in the curator's layout (tests and benchmarks; the curator owns real snapshots)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("holdout.jsonl", holdout)):
        lines = [
            json.dumps(
                {
                    "request_id": e.request_id,
                    "intent": e.intent,
                    "messages": e.messages,
                    "target": e.target,
                    "gold": e.gold,
                },
                ensure_ascii=False,
                sort_keys=True,
            )
            for e in rows
        ]
        (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    (folder / "prompt.json").write_text(
        json.dumps({"system_prompt": prompt.system_prompt, "few_shot": prompt.few_shot}, indent=2) + "\n"
    )
    return folder


# Messages ---------------------------------------------------------------------------------------------------
def student_messages(prompt: StagePrompt, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Stage-1 messages: the snapshot's system prompt, its few-shot turns, then the conversation. The curator's
    ``services.curator.prompt.student_messages`` is used when it exists, so both sides build them one way."""
    try:
        from services.curator.prompt import StudentPrompt
        from services.curator.prompt import student_messages as curator_messages
    except ImportError:  # the curator is optional for the trainer's own tests
        head = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
        return [*head, *(turn for turns in prompt.few_shot for turn in turns), *messages]
    return list(curator_messages(StudentPrompt(prompt.system_prompt, prompt.few_shot), messages))


def training_messages(messages: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """Stage-2 messages: the conversation behind one (short) system prompt, which the published spec also
    carries, so serving prepends exactly it to the router's messages."""
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages] if system_prompt else list(messages)


def prompt_json(messages: list[dict[str, str]]) -> str:
    """The PROMPT string Triton receives for these messages (as ``services.core.student.prompt_json``)."""
    return json.dumps(messages, ensure_ascii=False)


# Answer templates (compact targets) -------------------------------------------------------------------------
def _answer_object(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get(LABEL_FIELD), str) else None


def build_answer_template(targets: Iterable[str], min_share: float = 0.9) -> dict[str, Any]:
    """The answer fields fixed per label in the teacher's answers (BANKING77: each intent's tool and reply), as
    ``{"label_field", "fields" (the teacher's key order), "by_label": {label: {field: value}}}``; empty when
    nothing is fixed. The student need not learn to write these (``compact_target``); serving puts them back
    (``expand_answer`` in the student runtime).

    A field is fixed when, for every label, one value makes at least ``min_share`` of that label's answers (a
    stray hedged reply that curation let through does not unfix a reply). It must hold for every label, so
    that every compact answer has the same shape: a field that varies for some labels (arguments read from the
    message) is written by the student for all of them."""
    fields: list[str] = []
    seen: dict[str, list[dict[str, Any]]] = {}
    for text in targets:
        data = _answer_object(text)
        if data is None:
            continue
        for key in data:
            if key not in fields:
                fields.append(key)
        seen.setdefault(data[LABEL_FIELD], []).append(data)
    if not seen:
        return {}
    top: dict[str, dict[str, Any]] = {label: {} for label in seen}
    fixed_fields = []
    for key in fields:
        if key == LABEL_FIELD:
            continue
        ok = True
        for label, answers in seen.items():
            values = Counter(json.dumps(a[key], sort_keys=True) for a in answers if key in a)
            value, count = values.most_common(1)[0] if values else (None, 0)
            if value is None or count < min_share * len(answers):
                ok = False
                break
            top[label][key] = json.loads(value)
        if ok:
            fixed_fields.append(key)
    if not fixed_fields:
        return {}
    by_label = {label: {k: v for k, v in values.items() if k in fixed_fields} for label, values in sorted(top.items())}
    return {"label_field": LABEL_FIELD, "fields": fields, "by_label": by_label}


def compact_target(target: str, template: dict[str, Any]) -> str:
    """The answer without its label's fixed fields (label first, so constrained decoding still applies);
    an answer whose label has no template (or that is not an answer object) stays as it is."""
    data = _answer_object(target)
    fixed = (template.get("by_label") or {}).get(data[LABEL_FIELD]) if data and template else None
    if not data or not fixed:
        return target
    kept = {k: v for k, v in data.items() if k not in fixed or k == LABEL_FIELD}
    return json.dumps({LABEL_FIELD: kept.pop(LABEL_FIELD), **kept}, ensure_ascii=False)


def template_prompt(template: dict[str, Any]) -> str:
    """The stage-2 system prompt naming the fields the student writes."""
    if not template:
        return COMPACT_SYSTEM_PROMPT
    fixed = set.intersection(*(set(v) for v in template["by_label"].values()))
    written = [f for f in template["fields"] if f not in fixed or f == LABEL_FIELD]
    return COMPACT_TEMPLATE_PROMPT.format(fields=", ".join(written))


# Tokenisation -----------------------------------------------------------------------------------------------
def target_segments(target: str, prefix: str = LABEL_PREFIX, suffix: str = LABEL_SUFFIX) -> list[str]:
    """The answer split where constrained decoding splits it: [text up to and including the label prefix,
    label + suffix, the rest]. Tokenising the pieces separately makes the trained token sequence the one
    the serving constraint produces (BPE would otherwise merge the closing quote with the next comma)."""
    if not prefix or not target.startswith(prefix):
        return [target]
    end = target.find(suffix, len(prefix)) if suffix else -1
    if end < 0:
        return [target]
    cut = end + len(suffix)
    pieces = [prefix, target[len(prefix) : cut], target[cut:]]
    return [p for p in pieces if p]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    # The label head's example: the position whose hidden state decides the label (the prefix's last token) and
    # the label's index among the version's labels; -1 when the answer has no known label.
    head_pos: int = -1
    head_label: int = -1
    # The tail decision's example: 1 when the answer goes on with its label's usual tail, 0 when not, -1 unknown.
    head_usual: int = -1

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def encode_example(
    tokenizer: Any,
    prompt_text: str,
    target: str,
    eos_id: int,
    max_len: int,
    prefix: str = LABEL_PREFIX,
    suffix: str = LABEL_SUFFIX,
    prompt_limit: int | None = None,
    prefix_ids: Sequence[int] = (),
    label_index: Mapping[str, int] | None = None,
    label_tails: Mapping[str, str] | None = None,
) -> Encoded | None:
    """Prompt + answer + EOS as ids, labels IGNORE on the prompt. The prompt text is chat-rendered (its
    special tokens are in the text), so it is encoded without adding more.

    A prompt over ``prompt_limit`` tokens is cut by the student runtime's ``fit_prompt`` (the shared
    ``prefix_ids`` and its end kept), the rule serving applies to the same prompt; without a limit it is cut to what
    ``max_len`` leaves beside the answer. None when the example does not fit ``max_len``. With ``label_index``
    (label -> index) the example also says where the label head reads and which label it should choose; with
    ``label_tails`` too, whether the answer goes on with its label's usual tail (the tail decision)."""
    from services.student_runtime.prompt import fit_prompt

    prompt_ids = list(tokenizer.encode(prompt_text, add_special_tokens=False))
    answer_ids = answer_token_ids(tokenizer, target, eos_id, prefix, suffix)
    if len(answer_ids) >= max_len:
        return None
    limit = prompt_limit if prompt_limit is not None else max_len - len(answer_ids)
    prompt_ids = fit_prompt(prompt_ids, limit, list(prefix_ids))
    if len(prompt_ids) + len(answer_ids) > max_len:
        return None
    head_pos = head_label = head_usual = -1
    pieces = target_segments(target, prefix, suffix)
    if label_index is not None and len(pieces) >= 2 and pieces[0] == prefix:
        label = pieces[1][: len(pieces[1]) - len(suffix)] if suffix else pieces[1]
        if label in label_index:
            head_pos = len(prompt_ids) + len(tokenizer.encode(prefix, add_special_tokens=False)) - 1
            head_label = label_index[label]
            if label_tails is not None and label in label_tails:
                head_usual = int((pieces[2] if len(pieces) > 2 else "") == label_tails[label])
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, head_pos, head_label, head_usual)


def answer_token_ids(
    tokenizer: Any, target: str, eos_id: int, prefix: str = LABEL_PREFIX, suffix: str = LABEL_SUFFIX
) -> list[int]:
    """The answer's token ids as trained (and as constrained decoding produces them), EOS included."""
    answer_ids: list[int] = []
    for piece in target_segments(target, prefix, suffix):
        answer_ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    answer_ids.append(eos_id)
    return answer_ids


def prompt_limit(max_len: int, answer_lengths: Sequence[int]) -> int:
    """The prompt tokens a version reads at most: what ``max_len`` leaves beside the longest trained answer
    (at least half of it). Training cuts every prompt to it and the spec carries it, so serving cuts alike."""
    longest = max(answer_lengths, default=0)
    return max(max_len // 2, max_len - longest)


def label_tails(targets: Iterable[str], prefix: str = LABEL_PREFIX, suffix: str = LABEL_SUFFIX
                ) -> tuple[dict[str, str], str]:  # fmt: skip
    """The usual text after each label in these answers (``{label: tail}``) and the usual one overall: the
    fast decoder feeds it as a draft and verifies it in one forward pass instead of generating it."""
    per_label: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for target in targets:
        pieces = target_segments(target, prefix, suffix)
        if len(pieces) < 2 or pieces[0] != prefix:
            continue
        label = pieces[1][: len(pieces[1]) - len(suffix)] if suffix else pieces[1]
        tail = pieces[2] if len(pieces) > 2 else ""
        per_label.setdefault(label, Counter())[tail] += 1
        overall[tail] += 1
    tails = {label: counts.most_common(1)[0][0] for label, counts in sorted(per_label.items())}
    return tails, (overall.most_common(1)[0][0] if overall else "")


def tail_corpus(targets: Iterable[str], limit: int = 64, prefix: str = LABEL_PREFIX, suffix: str = LABEL_SUFFIX
                ) -> list[str]:  # fmt: skip
    """The most common texts after the label in these answers, most common first: where an answer leaves its
    label's usual tail (it has arguments), the fast decoder drafts what follows its last tokens in them (the
    arguments' keys and punctuation, common values) and verifies the draft in one pass."""
    counts: Counter[str] = Counter()
    for target in targets:
        pieces = target_segments(target, prefix, suffix)
        if len(pieces) > 2 and pieces[0] == prefix:
            counts[pieces[2]] += 1
    return [tail for tail, _ in counts.most_common(limit)]


def batches(items: Sequence[Encoded], batch_size: int, seed: int, bucket: int = 16) -> list[list[Encoded]]:
    """One epoch's batches: shuffled with ``seed``, then within windows of ``bucket`` batches sorted by length
    so a batch pads little (padding is wasted compute on CPU), then the batches shuffled again."""
    rng = random.Random(seed)
    order = list(items)
    rng.shuffle(order)
    out: list[list[Encoded]] = []
    window = batch_size * bucket
    for begin in range(0, len(order), window):
        chunk = sorted(order[begin : begin + window], key=lambda e: len(e.input_ids))
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def collate(batch: Iterable[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding); with the label head's
    examples also head_pos, head_label and head_usual (-1: none)."""
    import torch

    rows = list(batch)
    width = max(len(e.input_ids) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.head_label >= 0 for e in rows):
        out["head_pos"] = torch.tensor([e.head_pos for e in rows], dtype=torch.long)
        out["head_label"] = torch.tensor([e.head_label for e in rows], dtype=torch.long)
        out["head_usual"] = torch.tensor([e.head_usual for e in rows], dtype=torch.long)
    return out
