"""``flywheel models ID`` and ``flywheel rollback ID [VERSION]``: versions and metrics per agent from
ClickHouse ``model_events`` (the durable record), and returning to an earlier version.

Rollback republishes the earlier version's folder (spec, adapter) as the *next* version number rather than
reloading the old number: the repository serves only its newest version (``version_policy: latest 1``) and
never reuses or rewrites a number, and the router addresses the version the lifecycle names. The event
``rolled_back`` carries the new number, the old one in ``lineage.rolled_back_to``, and the old version's
metrics and confidence threshold.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.model_repository import ModelRepository, student_model_name
from services.core.provenance import code_version
from services.core.records import ModelEvent

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


class RollbackError(RuntimeError):
    """No version to roll back to, or the one asked for does not exist; the message says which exist."""


@dataclass(frozen=True)
class VersionRow:
    version: int
    kind: str  # promoted or rolled_back
    created_at: Any
    snapshot_id: str | None
    base_model: str
    confidence_threshold: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    serving: bool = False


def read_model_events(ch: Client, agent_id: str) -> list[dict[str, Any]]:
    result = ch.query(
        "SELECT event_id, kind, model_name, model_version, base_model, adapter_uri, snapshot_id, metrics, "
        "gate_passed, gate_mode, gate_reasons, confidence_threshold, lineage, code_version, created_at, error "
        "FROM model_events FINAL WHERE agent_id = {agent:String} ORDER BY created_at, event_id",
        parameters={"agent": agent_id},
    )
    return [dict(r) for r in result.named_results()]


def versions_from_events(events: list[dict[str, Any]]) -> list[VersionRow]:
    """The versions that served (promoted or rolled back to), oldest first; the last one is serving (pure)."""
    rows = [
        VersionRow(
            version=int(e["model_version"]),
            kind=str(e["kind"]),
            created_at=e["created_at"],
            snapshot_id=e.get("snapshot_id"),
            base_model=str(e.get("base_model") or ""),
            confidence_threshold=e.get("confidence_threshold"),
            metrics=dict(e.get("metrics") or {}),
            lineage=dict(e.get("lineage") or {}),
        )
        for e in events
        if e["kind"] in ("promoted", "rolled_back") and e.get("model_version") is not None
    ]
    if rows:
        last = rows[-1]
        rows[-1] = VersionRow(**{**last.__dict__, "serving": True})
    return rows


def format_versions(agent_id: str, rows: list[VersionRow], rejected: int = 0) -> str:
    """The table ``flywheel models ID`` prints."""
    if not rows:
        return f"{agent_id}: no promoted student yet" + (f" ({rejected} rejected candidates)" if rejected else "")
    note = f" ({rejected} rejected candidates)" if rejected else ""
    lines = [f"{agent_id}: {student_model_name(agent_id)}{note}"]
    header = f"{'ver':>4} {'kind':<11} {'agree':>6} {'format':>6} {'cover':>6} {'thresh':>6} {'p95 ms':>7}"
    lines.append(f"  {header}  snapshot")
    for r in rows:
        m = r.metrics
        source = f" (copy of {r.lineage['rolled_back_to']})" if "rolled_back_to" in r.lineage else ""
        lines.append(
            f"{'*' if r.serving else ' '} {r.version:>4} {r.kind:<11} {m.get('agreement', float('nan')):>6.3f} "
            f"{m.get('format_compliance', float('nan')):>6.3f} {m.get('coverage', float('nan')):>6.3f} "
            f"{(r.confidence_threshold if r.confidence_threshold is not None else float('nan')):>6.3f} "
            f"{m.get('latency_p95_ms', float('nan')):>7.0f}  {r.snapshot_id or '-'}{source}"
        )
    return "\n".join(lines)


def choose_rollback_target(rows: list[VersionRow], version: int | None) -> VersionRow:
    """The row to return to: ``version`` when given, else the one that served before the current (pure)."""
    if not rows:
        raise RollbackError("no promoted version exists")
    current = rows[-1].version
    if version is None:
        earlier = [r for r in rows if r.version != current]
        if not earlier:
            raise RollbackError(f"version {current} is the only one ever promoted: nothing to roll back to")
        return earlier[-1]
    matches = [r for r in rows if r.version == version]
    if not matches:
        known = ", ".join(str(r.version) for r in rows)
        raise RollbackError(f"version {version} was never promoted; promoted versions: {known}")
    if version == current:
        raise RollbackError(f"version {version} is already serving")
    return matches[-1]


def rollback(repo: ModelRepository, agent_id: str, rows: list[VersionRow], version: int | None = None) -> ModelEvent:
    """Serve an earlier version again (as a new version number) and return the ``rolled_back`` event to emit."""
    target = choose_rollback_target(rows, version)
    model = student_model_name(agent_id)
    source = repo.model_dir(model) / str(target.version)
    if not source.is_dir():
        raise RollbackError(f"{model} version {target.version} is no longer in the repository at {source}")

    def render(dest: Path) -> None:
        shutil.copytree(source, dest, dirs_exist_ok=True)

    # The model's config.pbtxt (shared by its versions) is re-rendered with the values it already has.
    values = _config_values((repo.model_dir(model) / "config.pbtxt").read_text())
    published = repo.publish(model, "student", render, values)
    return ModelEvent(
        agent_id=agent_id,
        kind="rolled_back",
        model_name=model,
        model_version=published.version,
        base_model=target.base_model,
        snapshot_id=target.snapshot_id,
        metrics=target.metrics,
        confidence_threshold=target.confidence_threshold,
        lineage={**target.lineage, "rolled_back_to": str(target.version), "rolled_back_from": str(rows[-1].version)},
        code_version=code_version(),
    )


def _config_values(config: str) -> dict[str, int]:
    """The placeholders of the student config.pbtxt, read back from the rendered file (kept unchanged)."""
    import re

    def grab(pattern: str, default: int) -> int:
        match = re.search(pattern, config)
        return int(match.group(1)) if match else default

    return {
        "max_batch_size": grab(r"max_batch_size:\s*(\d+)", 8),
        "max_queue_delay_us": grab(r"max_queue_delay_microseconds:\s*(\d+)", 0),
        "instance_count": grab(r"count:\s*(\d+)", 1),
    }
