"""What `flywheel demo` does, as data: the agent, its narrow intents, the held-back intents of the drift phase
and the traffic of each phase (pure; ``run.py`` executes it).

The demo agent is narrow, as distillation wants: the workload's most frequent intents first (20 for the
BANKING77 support desk, its grace period's minimum), with a few more intents held back until the drift phase,
where they make up ``drift_share`` of the traffic. The grace period replays the data set's train split; the live
phases replay its test split, so the student is measured on messages it never saw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from services.teacher.contract import Workload

AGENT_FOR_WORKLOAD = {"banking77": "support-bot", "nlupp": "banking-nlu"}
GRACE_REQUESTS = 1200  # about 1,000 training pairs after curation and the holdout: what the student needs


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    requests: int
    split: str  # the workload split the messages come from
    held_back_share: float = 0.0  # share of requests drawn from the held-back intents
    concurrency: int = 16
    seed: int = 7


@dataclass(frozen=True)
class DemoPlan:
    agent_id: str
    workload: str
    intents: tuple[str, ...]  # served from the start
    held_back: tuple[str, ...]  # appear only from the drift phase on
    phases: tuple[Phase, ...]
    wait_training_s: float = 3600.0  # the longest wait for a training job's verdict
    wait_drift_s: float = 600.0  # the longest wait for the drift monitor to fire
    retries: int = 1  # rejected candidates the demo answers with more traffic before giving up

    def phase(self, name: str) -> Phase:
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise KeyError(f"the demo has no phase {name!r}")


def frequent_intents(workload: Workload, split: str = "train") -> list[str]:
    """The workload's intents, most frequent first (ties by name): a deterministic order."""
    counts = Counter(e.intent for e in workload.examples(split))
    return sorted(counts, key=lambda k: (-counts[k], k))


def make_plan(
    workload: Workload,
    n_intents: int,
    short: bool = False,
    agent_id: str | None = None,
    held_back: int = 5,
    student_concurrency: int = 4,
    grace_conversations: int = 0,
) -> DemoPlan:
    """The demo's plan. ``short`` is for a first look: shorter live and recovery phases. The grace period and
    the drift phase keep their size: the student needs about 1,000 training pairs to pass the gate (a third of
    them gave holdout agreement 0.40, coverage 0.10) and the drift monitor needs enough requests in its window to
    be sure; the grace period costs seconds, training is what takes time.

    The grace phase sends the agent's ``grace_conversations`` (its ``grace_period.min_conversations``; each
    replayed message is a conversation) and at least 1,200: the grace period completes with the phase's last
    requests, so the first snapshot holds all of them. Met earlier, the curator snapshots whatever is stored
    by then (736 training pairs in one run against 935 in another, and a rejection)."""
    ordered = frequent_intents(workload)
    if n_intents < 1 or n_intents + held_back > len(ordered):
        raise ValueError(f"the demo needs {n_intents} + {held_back} intents but {workload.name} has {len(ordered)}")
    scale = 0.4 if short else 1.0
    # The student answers about 0.7 requests/s on 2 cores (batching barely helps: the prompt's prefill
    # dominates), so the live phases keep few requests in flight: at 8 (16 in the drift phase's two replays)
    # some waited past the router's 30 s deadline and fell back to the teacher as student errors.

    def n(full: int) -> int:
        return max(50, int(full * scale))

    phases = (
        Phase(
            "grace",
            "grace period: the teacher answers everything",
            max(GRACE_REQUESTS, grace_conversations),
            "train",
            concurrency=64,
            seed=7,
        ),
        # 1,000 requests: the canary ramp after a promotion (by default 10 % then 50 % of 50 requests each) keeps
        # 70 of the first 100 with the teacher; over 600 requests that alone capped the student's share at
        # 88 %, over 1,000 at 93 %: the phase shows the steady state, as hours of production traffic would.
        Phase(
            "live",
            "live: the student serves, the teacher checks a shadow share",
            n(1000),
            "test",
            concurrency=student_concurrency,
            seed=11,
        ),
        Phase(
            "drift",
            "drift: held-back intents arrive",
            500,
            "test",
            held_back_share=0.5,
            concurrency=student_concurrency,
            seed=13,
        ),
        Phase(
            "recovery",
            "recovery: the retrained student serves the new mix",
            n(500),
            "test",
            held_back_share=0.5,
            concurrency=student_concurrency,
            seed=17,
        ),
    )
    return DemoPlan(
        agent_id=agent_id or AGENT_FOR_WORKLOAD.get(workload.name, workload.name),
        workload=workload.name,
        intents=tuple(ordered[:n_intents]),
        held_back=tuple(ordered[n_intents : n_intents + held_back]),
        phases=phases,
    )


def split_counts(total: int, share: float) -> tuple[int, int]:
    """(from the usual intents, from the held-back intents) for ``total`` requests."""
    held = round(total * share)
    return total - held, held


def phase_intents(plan: DemoPlan, phase: Phase) -> Sequence[tuple[Sequence[str], int]]:
    """The replays a phase runs side by side: (intents, requests) pairs."""
    usual, held = split_counts(phase.requests, phase.held_back_share)
    out: list[tuple[Sequence[str], int]] = []
    if usual:
        out.append((plan.intents, usual))
    if held:
        out.append((plan.held_back, held))
    return out
