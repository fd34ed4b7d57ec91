"""Small snapshots from the reference teacher's workloads, in the curator's layout, for tests and benchmarks.

The pairs are what the reference teacher serves (``Workload.answer_for``: the same answers, without the
deliberate flaws that curation would remove), split train/holdout by a seeded hash of the request id.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

from services.trainer.data import Example, StagePrompt, write_snapshot


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def workload_pairs(
    data_dir: Path,
    workload: str = "banking77",
    intents: int = 20,
    per_intent: int = 50,
    seed: int = 0,
    split: str = "all",
) -> list[Example]:
    """Up to ``per_intent`` teacher answers for each of the first ``intents`` intents (by frequency, ties by
    name), chosen deterministically."""
    from services.teacher.workloads import load_workload

    wl = load_workload(workload, data_dir)
    by_intent: dict[str, list] = defaultdict(list)
    for ex in wl.examples(split):
        by_intent[ex.intent].append(ex)
    counts = Counter({k: len(v) for k, v in by_intent.items()})
    chosen = sorted(counts, key=lambda k: (-counts[k], k))[:intents]
    out = []
    for intent in sorted(chosen):
        pool = sorted(by_intent[intent], key=lambda e: _unit(seed, e.text))[:per_intent]
        for ex in pool:
            rid = hashlib.sha256(f"{workload}:{ex.split}:{ex.text}".encode()).hexdigest()[:16]
            target = json.dumps(wl.answer_for(ex), ensure_ascii=False)
            out.append(Example(rid, ex.intent, [{"role": "user", "content": ex.text}], target, ex.intent))
    return out


def split_pairs(pairs: list[Example], holdout_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Stratified by intent: within each intent, the lowest seeded hashes form the holdout."""
    by_intent: dict[str | None, list[Example]] = defaultdict(list)
    for ex in pairs:
        by_intent[ex.intent].append(ex)
    train, holdout = [], []
    for _intent, group in sorted(by_intent.items(), key=lambda kv: str(kv[0])):
        group = sorted(group, key=lambda e: _unit(seed, e.request_id))
        n = max(1, round(len(group) * holdout_fraction)) if len(group) > 1 else 0
        holdout.extend(group[:n])
        train.extend(group[n:])
    return train, holdout


def build_snapshot(
    artifacts: Path,
    agent_id: str,
    data_dir: Path,
    intents: int = 5,
    per_intent: int = 10,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    workload: str = "banking77",
    system_prompt: str | None = None,
) -> Path:
    """Write a snapshot under ``<artifacts>/datasets/<agent_id>/<snapshot_id>/`` and return its directory."""
    pairs = workload_pairs(data_dir, workload, intents, per_intent, seed)
    train, holdout = split_pairs(pairs, holdout_fraction, seed)
    labels = sorted({e.intent for e in pairs if e.intent})
    prompt = StagePrompt(
        system_prompt
        or (
            "You route customer messages. Answer with one JSON object with keys intent, tool, arguments, reply. "
            f"Intents: {', '.join(labels)}."
        ),
        [
            [{"role": "user", "content": e.messages[-1]["content"]}, {"role": "assistant", "content": e.target}]
            for e in train[:: max(1, len(train) // 3)][:3]
        ],
    )
    blob = json.dumps([[e.request_id, e.target] for e in train + holdout]).encode()
    snapshot_id = hashlib.sha256(blob).hexdigest()[:16]
    manifest = {
        "snapshot_id": snapshot_id,
        "agent_id": agent_id,
        "version": 1,
        "split_counts": {"train": len(train), "holdout": len(holdout)},
        "intent_counts": dict(Counter(e.intent for e in pairs if e.intent)),
        "filter_stats": {},
        "source": f"fixture:{workload}",
    }
    return write_snapshot(artifacts / "datasets" / agent_id / snapshot_id, manifest, prompt, train, holdout)
