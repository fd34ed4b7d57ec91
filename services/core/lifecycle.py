"""Each agent's lifecycle stage, derived from the lifecycle events (pure; every service folds the same
events the same way).

    grace ──grace_complete──► training ──candidate──► validating ──promoted──► live
      ▲                           ▲                        │                   │ retrain triggered
      └──── rejected / failed ────┴────────────────────────┘                   ▼
                (no student yet)             rejected / failed / promoted ◄── retraining

Services rebuild the state at start from ClickHouse (``model_events``, ``datasets``, ``retrain_events``, the
durable record), then follow the topics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered

LifecycleEvent = ModelEvent | RetrainTriggered | DatasetSnapshot


@dataclass(frozen=True)
class AgentLifecycle:
    agent_id: str
    stage: str = "grace"
    model_name: str | None = None
    model_version: int | None = None  # the version serving (promoted or rolled back to)
    confidence_threshold: float | None = None  # calibrated on the holdout, carried by the promotion
    validation_agreement: float | None = None
    promoted_at: datetime | None = None
    last_event_at: datetime | None = None
    last_failure: str | None = None  # the last training job that failed (when, why), until a job succeeds

    @property
    def has_student(self) -> bool:
        return self.model_version is not None


def apply(state: AgentLifecycle, event: LifecycleEvent) -> AgentLifecycle:
    """The state after one event. Events of another agent are ignored."""
    if event.agent_id != state.agent_id:
        return state
    live = state.has_student
    state = replace(state, last_event_at=event.created_at)
    if isinstance(event, RetrainTriggered):
        return replace(state, stage="retraining" if live else "training")
    if isinstance(event, DatasetSnapshot):
        return replace(state, stage="retraining" if live else "training")
    if event.kind == "candidate":
        return replace(state, stage="retraining" if live else "validating", last_failure=None)
    if event.kind == "failed":
        when = f"{event.created_at:%Y-%m-%d %H:%M:%S} UTC"
        state = replace(state, last_failure=f"{when}, snapshot {event.snapshot_id}: {event.error or 'no reason given'}")
    if event.kind in ("promoted", "rolled_back"):
        return replace(
            state,
            stage="live",
            model_name=event.model_name,
            model_version=event.model_version,
            confidence_threshold=event.confidence_threshold,
            validation_agreement=event.metrics.get("agreement", state.validation_agreement),
            promoted_at=event.created_at,
        )
    # rejected, or failed (the job could not finish): a live student keeps serving; without one, collect more data.
    return replace(state, stage="live" if live else "grace")


def fold(agent_id: str, events: list[LifecycleEvent]) -> AgentLifecycle:
    state = AgentLifecycle(agent_id)
    for event in sorted(events, key=lambda e: e.created_at):
        state = apply(state, event)
    return state


def event_key(event: LifecycleEvent) -> tuple[str, str]:
    """The identity of a lifecycle event, so one read from ClickHouse and again from a topic counts once. A
    snapshot announced again (a reused snapshot serving a new trigger) is a new event: its created_at differs."""
    if isinstance(event, DatasetSnapshot):
        return ("ds", f"{event.snapshot_id}@{event.created_at.isoformat()}")
    return (type(event).__name__, event.event_id)
