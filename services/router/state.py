"""What the router knows per agent: configuration, run-time overrides from the control topic, the lifecycle
(from the lifecycle events) and the canary's progress. Pure: fed records, asked for an ``AgentView``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.core.agents import AgentConfig, AgentsFile, Tier
from services.core.lifecycle import AgentLifecycle, LifecycleEvent, apply
from services.core.records import AgentControl, DatasetSnapshot
from services.router.routing import AgentView, canary_share

log = logging.getLogger(__name__)


@dataclass
class AgentRuntime:
    config: AgentConfig
    lifecycle: AgentLifecycle
    mode: str
    tier: str
    thresholds: dict[str, float] = field(default_factory=dict)
    eligible_since_promotion: int = 0  # student-eligible requests since the last promotion (canary ramp)
    changed: dict[str, str] = field(default_factory=dict)  # setting -> who changed it at run time, and when


@dataclass(frozen=True)
class Effective:
    """A setting as the router applies it, and where the value came from."""

    name: str
    value: str
    source: str


class RouterState:
    def __init__(self, agents: AgentsFile) -> None:
        self.agents = agents
        self.runtime = {
            agent_id: AgentRuntime(cfg, AgentLifecycle(agent_id), cfg.mode, cfg.tier)
            for agent_id, cfg in agents.agents.items()
        }
        self._seen: set[str] = set()

    def runtime_of(self, agent_id: str) -> AgentRuntime:
        """Raises UnknownAgentError (naming the known agents) for an agent not in agents.yaml."""
        self.agents.agent(agent_id)
        return self.runtime[agent_id]

    def tier(self, agent_id: str) -> Tier:
        return self.agents.tiers[self.runtime_of(agent_id).tier]

    def view(self, agent_id: str) -> AgentView:
        rt = self.runtime_of(agent_id)
        routing = rt.config.routing
        threshold = rt.thresholds.get(
            "confidence_threshold",
            rt.lifecycle.confidence_threshold
            if rt.lifecycle.confidence_threshold is not None
            else routing.confidence_threshold,
        )
        return AgentView(
            mode=rt.mode,  # type: ignore[arg-type]
            stage=rt.lifecycle.stage,  # type: ignore[arg-type]
            has_student=rt.lifecycle.has_student,
            confidence_threshold=threshold,
            shadow_rate=rt.thresholds.get("shadow_rate", routing.shadow_rate),
            canary_share=canary_share(routing.canary_steps, rt.eligible_since_promotion, routing.canary_step_requests),
        )

    def count_eligible(self, agent_id: str) -> None:
        self.runtime[agent_id].eligible_since_promotion += 1

    def apply_lifecycle(self, event: LifecycleEvent) -> None:
        key = event.snapshot_id if isinstance(event, DatasetSnapshot) else event.event_id
        if key in self._seen or event.agent_id not in self.runtime:
            return
        self._seen.add(key)
        rt = self.runtime[event.agent_id]
        before = rt.lifecycle
        rt.lifecycle = apply(before, event)
        if rt.lifecycle.model_version != before.model_version and rt.lifecycle.has_student:
            rt.eligible_since_promotion = 0  # a new student starts its canary ramp from the first step
        if rt.lifecycle.stage != before.stage:
            log.info("%s: stage %s -> %s", event.agent_id, before.stage, rt.lifecycle.stage)

    def apply_control(self, control: AgentControl) -> str | None:
        """Apply a run-time change; returns why it was refused, or None."""
        rt = self.runtime.get(control.agent_id)
        if rt is None:
            return f"unknown agent {control.agent_id!r}"
        if control.mode == "student" and not rt.lifecycle.has_student:
            return f"{control.agent_id}: mode student refused, the agent has no promoted student"
        if control.tier is not None and control.tier not in self.agents.tiers:
            return f"{control.agent_id}: unknown tier {control.tier!r}"
        who = f"{control.changed_by or 'a control record'}, {control.created_at:%Y-%m-%d %H:%M:%S} UTC"
        if control.mode is not None:
            rt.mode = control.mode
            rt.changed["mode"] = who
        if control.tier is not None:
            rt.tier = control.tier
            rt.changed["tier"] = who
        rt.thresholds.update(control.thresholds)
        rt.changed.update(dict.fromkeys(control.thresholds, who))
        return None

    def effective(self, agent_id: str) -> list[Effective]:
        """Mode, tier and thresholds as routing applies them now, each with its source: agents.yaml, the
        promotion's calibration, or a run-time change (``flywheel agent set``)."""
        rt = self.runtime_of(agent_id)
        view = self.view(agent_id)
        config = "agents.yaml"
        if "confidence_threshold" in rt.changed:
            threshold_source = rt.changed["confidence_threshold"]
        elif rt.lifecycle.confidence_threshold is not None:
            threshold_source = f"calibrated with version {rt.lifecycle.model_version}"
        else:
            threshold_source = config
        return [
            Effective("mode", rt.mode, rt.changed.get("mode", config)),
            Effective("tier", rt.tier, rt.changed.get("tier", config)),
            Effective("confidence_threshold", f"{view.confidence_threshold:.3f}", threshold_source),
            Effective("shadow_rate", f"{view.shadow_rate:.3f}", rt.changed.get("shadow_rate", config)),
        ]
