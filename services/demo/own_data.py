"""``flywheel demo --data FILE``: the demo on a labelled data set of your own.

The data set becomes a workload (``teacher.datasets``), registered where the reference teacher answers for it
as ``reference/<name>``. Its agent, ``<name>-bot``, is the demo agent's (``support-bot``'s) settings with the
data set's contract: its tools, labels and answer schema, and a cluster threshold measured on its messages
(the drift monitor's unseen intents depend on it). It is written, beside the agents already configured,
to ``FLYWHEEL_HOME/agents.yaml``, which the stack's services then read (pure but for ``write_agents_file``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from services.core.agents import AgentConfig, load_agents
from services.teacher.contract import Workload

TEMPLATE_AGENT = "support-bot"  # the demo agent whose settings a data set's agent takes
HELD_BACK = 5  # intents kept for the drift phase, as in the built-in demo
CALIBRATION_MESSAGES = 40  # train messages per intent embedded to calibrate the cluster threshold


class OwnDataError(ValueError):
    """A data set too small for the demo, or an agents file it cannot extend; the message says which."""


def demo_sizes(n_labels: int, wanted: int) -> tuple[int, int]:
    """(intents served from the start, intents held back for the drift phase) for a data set of ``n_labels``
    labels, the agent asking for ``wanted`` distinct intents in its grace period."""
    held_back = HELD_BACK if n_labels >= 4 * HELD_BACK else max(1, n_labels // 4)
    first = min(wanted, n_labels - held_back)
    if first < 2:
        raise OwnDataError(
            f"the demo needs at least 3 labels (2 served, 1 for the drift phase); the data has {n_labels}"
        )
    return first, held_back


def agent_id_for(workload: Workload) -> str:
    return f"{workload.name}-bot"[:63]


def cluster_threshold(workload: Workload, intents: list[str], embed: Callable[[list[str]], Any]) -> float:
    """The curator's cluster threshold for this data set (``labelling.calibrate_threshold``), measured on the
    train messages of the intents the agent starts with (at most ``CALIBRATION_MESSAGES`` of each)."""
    from services.curator.labelling import calibrate_threshold
    from services.curator.service import CENTROID_SAMPLES

    chosen = set(intents)
    per_intent: dict[str, list[str]] = {}
    for e in workload.examples("train"):
        if e.intent in chosen and len(per_intent.setdefault(e.intent, [])) < CALIBRATION_MESSAGES:
            per_intent[e.intent].append(e.text)
    labels = [label for label, texts in per_intent.items() for _ in texts]
    texts = [text for group in per_intent.values() for text in group]
    return round(calibrate_threshold(labels, embed(texts), CENTROID_SAMPLES), 3)


def demo_agent(
    workload: Workload, template: AgentConfig, n_intents: int, threshold: float | None = None
) -> AgentConfig:
    """The data set's agent: the template's settings, the data set's teacher model and contract (and, when
    given, the cluster threshold calibrated on it)."""
    data = template.model_dump(mode="json")
    data.update(
        agent_id=agent_id_for(workload),
        description=f"Your data set {workload.name}: {len(workload.intents)} labels, one per message.",
        output={
            "format": "json",
            "valid_tools": list(workload.tools),
            "intents": list(workload.intents),
            "json_schema": workload.output_schema(),
        },
    )
    data["teacher"] = {**data["teacher"], "model": workload.model}
    data["grace_period"] = {**data["grace_period"], "min_unique_intents": n_intents}
    data["system_prompt"] = None
    if threshold is not None:
        data["curation"] = {**data["curation"], "cluster_threshold": threshold}
    return AgentConfig.model_validate(data)


def write_agents_file(base: Path, agent: AgentConfig, target: Path) -> Path:
    """``base``'s agents and tiers plus ``agent`` (replacing one of that id), written to ``target``; the result
    is validated as the services will read it."""
    raw: dict[str, Any] = yaml.safe_load(base.read_text(encoding="utf-8")) or {}
    agents = dict(raw.get("agents") or {})
    agents[agent.agent_id] = agent.model_dump(mode="json", exclude={"agent_id"})
    raw["agents"] = agents
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `flywheel demo --data`: the agents of {base} plus {agent.agent_id}, the agent of your data "
        "set.\n"
    )
    target.write_text(header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    load_agents(target)  # refuse here, not in five services, a file they cannot read
    return target
