"""Reading the lifecycle events back from ClickHouse, the durable record the logger writes
(``model_events``, ``datasets``, ``retrain_events``), so a starting service knows every agent's stage even
when the broker kept nothing."""

from __future__ import annotations

import json
from datetime import timezone
from typing import TYPE_CHECKING

from services.core.lifecycle import LifecycleEvent
from services.core.records import DatasetSnapshot, GateVerdict, ModelEvent, RetrainTriggered

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


def _utc(value):
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def read_lifecycle_events(ch: Client) -> list[LifecycleEvent]:
    """Every lifecycle event of every agent, oldest first."""
    events: list[LifecycleEvent] = []
    models = ch.query(
        "SELECT event_id, agent_id, kind, model_name, model_version, base_model, adapter_uri, snapshot_id, metrics, "
        "gate_passed, gate_mode, gate_reasons, confidence_threshold, lineage, code_version, created_at, error "
        "FROM model_events FINAL"
    )
    for r in models.named_results():
        gate = None
        if r["gate_passed"] is not None:
            gate = GateVerdict(passed=bool(r["gate_passed"]), mode=r["gate_mode"], reasons=list(r["gate_reasons"]))
        events.append(
            ModelEvent(
                event_id=r["event_id"],
                agent_id=r["agent_id"],
                kind=r["kind"],
                model_name=r["model_name"],
                model_version=r["model_version"],
                base_model=r["base_model"],
                adapter_uri=r["adapter_uri"],
                snapshot_id=r["snapshot_id"],
                metrics=dict(r["metrics"]),
                gate=gate,
                confidence_threshold=r["confidence_threshold"],
                lineage=dict(r["lineage"]),
                code_version=r["code_version"],
                created_at=_utc(r["created_at"]),
                error=r["error"],
            )
        )
    retrains = ch.query("SELECT event_id, agent_id, reason, evidence, created_at FROM retrain_events FINAL")
    for r in retrains.named_results():
        events.append(
            RetrainTriggered(
                event_id=r["event_id"],
                agent_id=r["agent_id"],
                reason=r["reason"],
                evidence=r["evidence"] or json.dumps({}),
                created_at=_utc(r["created_at"]),
            )
        )
    # The prompt and the source query stay out: they are long and no lifecycle reader needs them.
    snapshots = ch.query(
        "SELECT snapshot_id, agent_id, version, content_hash, uri, split_counts, intent_counts, filter_stats, "
        "time_from, time_to, parent_snapshot_id, trigger_reason, code_version, created_at FROM datasets FINAL"
    )
    for r in snapshots.named_results():
        events.append(
            DatasetSnapshot(
                snapshot_id=r["snapshot_id"],
                agent_id=r["agent_id"],
                version=r["version"],
                content_hash=r["content_hash"],
                uri=r["uri"],
                split_counts=dict(r["split_counts"]),
                intent_counts=dict(r["intent_counts"]),
                filter_stats=dict(r["filter_stats"]),
                time_from=_utc(r["time_from"]),
                time_to=_utc(r["time_to"]),
                parent_snapshot_id=r["parent_snapshot_id"],
                trigger_reason=r["trigger_reason"],
                code_version=r["code_version"],
                created_at=_utc(r["created_at"]),
            )
        )
    return sorted(events, key=lambda e: e.created_at)
