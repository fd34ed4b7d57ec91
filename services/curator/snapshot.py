"""Versioned, content-addressed data set snapshots in the artifact store.

Layout (the trainer reads exactly this)::

    <artifacts>/datasets/<agent_id>/<snapshot_id>/
        train.jsonl      one JSON object per line, keys sorted:
        holdout.jsonl    {"gold", "intent", "messages": [{"content", "role"}...], "request_id", "target"}
        prompt.json      {"few_shot": [[user turn, assistant turn]...], "system_prompt"}
        manifest.json    every DatasetSnapshot field + source query, time range, counts, filter statistics,
                         the prompt, code version, parent snapshot

``snapshot_id`` = ``"ds-"`` + the first 16 hex digits of the sha256 over the canonical bytes of train.jsonl,
holdout.jsonl and prompt.json (``content_hash`` is the whole digest). A snapshot is written to a temporary
folder and renamed into place; an id that exists already holds the same content and is reused, never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from services.core.provenance import code_version
from services.core.records import DatasetSnapshot
from services.curator.filters import Pair, canonical_answer
from services.curator.prompt import StudentPrompt

FILES = ("train.jsonl", "holdout.jsonl", "prompt.json")


def dataset_record(pair: Pair) -> dict[str, Any]:
    """One line of train/holdout: the request as the client sent it, the canonical teacher answer as target."""
    obj = pair.answer()
    if obj is None:
        raise ValueError(f"{pair.request_id}: no JSON answer (curation should have removed it)")
    return {
        "request_id": pair.request_id,
        "intent": pair.intent,
        "messages": [{"role": m["role"], "content": m["content"]} for m in pair.messages],
        "target": canonical_answer(obj),
        "gold": pair.gold,
    }


def jsonl_bytes(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Canonical JSON lines: sorted keys, compact separators, UTF-8, one trailing newline per record."""
    return "".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records
    ).encode("utf-8")


def content_digest(files: Mapping[str, bytes]) -> str:
    """sha256 over each file's name, length and bytes in FILES order (length-prefixed: no ambiguity)."""
    h = hashlib.sha256()
    for name in FILES:
        data = files[name]
        h.update(f"{name}\n{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def snapshot_id_for(digest: str) -> str:
    return "ds-" + digest[:16]


def counts(train: Sequence[Mapping[str, Any]], holdout: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(per split, per intent) counts; per intent is {"<intent>": total} (the record field is a flat map)."""
    split_counts = {"train": len(train), "holdout": len(holdout)}
    intents = Counter(r["intent"] or "" for r in (*train, *holdout))
    return split_counts, dict(sorted(intents.items()))


def intent_split_counts(train: Sequence[Mapping[str, Any]], holdout: Sequence[Mapping[str, Any]]) -> dict:
    per: dict[str, dict[str, int]] = {}
    for split_name, records in (("train", train), ("holdout", holdout)):
        for r in records:
            entry = per.setdefault(r["intent"] or "", {"train": 0, "holdout": 0})
            entry[split_name] += 1
    return dict(sorted(per.items()))


@dataclass(frozen=True)
class WrittenSnapshot:
    record: DatasetSnapshot
    path: Path
    reused: bool  # the id existed: same content, written before


def snapshot_dir(artifacts: Path, agent_id: str, snapshot_id: str) -> Path:
    return artifacts / "datasets" / agent_id / snapshot_id


def write_snapshot(
    artifacts: Path,
    agent_id: str,
    train: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    prompt: StudentPrompt,
    *,
    version: int,
    parent_snapshot_id: str | None,
    trigger_reason: str | None,
    source_query: str,
    time_from: datetime | None,
    time_to: datetime | None,
    filter_stats: Mapping[str, int],
    extra_manifest: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> WrittenSnapshot:
    files = {
        "train.jsonl": jsonl_bytes(train),
        "holdout.jsonl": jsonl_bytes(holdout),
        "prompt.json": (prompt.to_json() + "\n").encode("utf-8"),
    }
    digest = content_digest(files)
    sid = snapshot_id_for(digest)
    final = snapshot_dir(artifacts, agent_id, sid)
    if (final / "manifest.json").is_file():
        return _reuse(final)

    split_counts, intent_counts = counts(train, holdout)
    extra: dict[str, Any] = {}
    if created_at is not None:
        extra["created_at"] = created_at
    record = DatasetSnapshot(
        snapshot_id=sid,
        agent_id=agent_id,
        version=version,
        content_hash=digest,
        uri=str(final),
        split_counts=split_counts,
        intent_counts=intent_counts,
        filter_stats=dict(filter_stats),
        prompt=prompt.to_json(),
        source_query=source_query,
        time_from=time_from,
        time_to=time_to,
        parent_snapshot_id=parent_snapshot_id,
        trigger_reason=trigger_reason,
        code_version=code_version(),
        **extra,
    )
    manifest = {
        **record.model_dump(mode="json"),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
        "intent_split_counts": intent_split_counts(train, holdout),
        "stage1_prompt": prompt.to_dict(),
        "target_format": "compact JSON of the teacher's answer, keys intent, tool, arguments, reply first",
        **(extra_manifest or {}),
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sid}.", dir=final.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)  # atomic; fails if another writer got there first (same content)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return _reuse(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WrittenSnapshot(record, final, False)


def _reuse(final: Path) -> WrittenSnapshot:
    """The snapshot already at ``final`` (same id = same content): its record from the manifest."""
    manifest = json.loads((final / "manifest.json").read_text())
    fields = {k: manifest[k] for k in DatasetSnapshot.model_fields if k in manifest}
    return WrittenSnapshot(DatasetSnapshot.model_validate(fields), final, True)


def read_snapshot(path: Path) -> tuple[list[dict], list[dict], StudentPrompt, dict]:
    """(train, holdout, prompt, manifest) of a snapshot folder: what the trainer reads."""
    train = [json.loads(line) for line in (path / "train.jsonl").read_text("utf-8").splitlines() if line]
    holdout = [json.loads(line) for line in (path / "holdout.jsonl").read_text("utf-8").splitlines() if line]
    prompt = StudentPrompt.from_dict(json.loads((path / "prompt.json").read_text("utf-8")))
    manifest = json.loads((path / "manifest.json").read_text("utf-8"))
    return train, holdout, prompt, manifest
