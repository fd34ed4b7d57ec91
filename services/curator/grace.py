"""The grace-period criteria (pure): is there enough varied teacher traffic to train a first student?

An agent leaves the grace period when it has served ``min_conversations`` conversations and seen
``min_unique_intents`` distinct (effective) intents. If ``max_duration_days`` pass first, the status names the
minimums that were not met and, per ``on_timeout``, proceeds anyway (train on what there is) or waits.
The figures come from ClickHouse (``queries.GRACE_SQL``); this module only decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from services.core.agents import GracePeriod

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class GraceCounts:
    """What an agent has served so far (one row of ``GRACE_SQL``)."""

    agent_id: str
    conversations: int = 0
    unique_intents: int = 0
    first_at: datetime | None = None  # the agent's first interaction; None = no traffic yet
    last_at: datetime | None = None


@dataclass(frozen=True)
class GraceStatus:
    agent_id: str
    conversations: int
    min_conversations: int
    unique_intents: int
    min_unique_intents: int
    elapsed_days: float
    max_duration_days: float
    on_timeout: str
    complete: bool
    # minimums_met | timeout_proceed | timeout_wait | collecting | no_traffic
    reason: str
    unmet: tuple[str, ...] = field(default_factory=tuple)  # "conversations" / "intents" below the minimum

    @property
    def timed_out(self) -> bool:
        return self.elapsed_days >= self.max_duration_days

    @property
    def day(self) -> int:
        """The day of the grace period we are in (1 on the first day; 0 before any traffic)."""
        if self.reason == "no_traffic":
            return 0
        return math.floor(self.elapsed_days) + 1

    def describe(self) -> str:
        """One line for ``flywheel status``, e.g.
        ``support-bot: grace 212/300 conversations, 41/50 intents, day 3/14``."""
        max_days = f"{self.max_duration_days:g}"
        line = (
            f"{self.agent_id}: grace {self.conversations}/{self.min_conversations} conversations, "
            f"{self.unique_intents}/{self.min_unique_intents} intents, day {self.day}/{max_days}"
        )
        if self.reason == "minimums_met":
            return line + " (complete)"
        if self.reason in ("timeout_proceed", "timeout_wait"):
            missing = ", ".join(self._unmet_text())
            action = "proceeding anyway" if self.reason == "timeout_proceed" else "waiting (on_timeout: wait)"
            return f"{line}; {max_days} days passed below the minimum ({missing}): {action}"
        if self.reason == "no_traffic":
            return line + " (no traffic yet)"
        return line

    def _unmet_text(self) -> list[str]:
        out = []
        if "conversations" in self.unmet:
            out.append(f"conversations {self.conversations}/{self.min_conversations}")
        if "intents" in self.unmet:
            out.append(f"intents {self.unique_intents}/{self.min_unique_intents}")
        return out

    def evidence(self) -> dict[str, object]:
        """The figures behind the decision, for ``RetrainTriggered.evidence``."""
        return {
            "conversations": self.conversations,
            "min_conversations": self.min_conversations,
            "unique_intents": self.unique_intents,
            "min_unique_intents": self.min_unique_intents,
            "elapsed_days": round(self.elapsed_days, 4),
            "max_duration_days": self.max_duration_days,
            "on_timeout": self.on_timeout,
            "reason": self.reason,
            "unmet": list(self.unmet),
        }


def grace_status(counts: GraceCounts, config: GracePeriod, now: datetime) -> GraceStatus:
    """Decide an agent's grace period from its figures and its ``grace_period`` config."""
    elapsed = 0.0
    if counts.first_at is not None:
        elapsed = max(0.0, (now - counts.first_at).total_seconds() / SECONDS_PER_DAY)
    unmet = tuple(
        name
        for name, have, need in (
            ("conversations", counts.conversations, config.min_conversations),
            ("intents", counts.unique_intents, config.min_unique_intents),
        )
        if have < need
    )
    if counts.first_at is None or counts.conversations == 0:
        complete, reason = False, "no_traffic"
    elif not unmet:
        complete, reason = True, "minimums_met"
    elif elapsed >= config.max_duration_days:
        proceed = config.on_timeout == "proceed"
        complete, reason = proceed, "timeout_proceed" if proceed else "timeout_wait"
    else:
        complete, reason = False, "collecting"
    return GraceStatus(
        agent_id=counts.agent_id,
        conversations=counts.conversations,
        min_conversations=config.min_conversations,
        unique_intents=counts.unique_intents,
        min_unique_intents=config.min_unique_intents,
        elapsed_days=elapsed,
        max_duration_days=config.max_duration_days,
        on_timeout=config.on_timeout,
        complete=complete,
        reason=reason,
        unmet=unmet,
    )


def retry_due(conversations_now: int, conversations_at_rejection: int, growth: float) -> bool:
    """After a rejected student (and none live), train again once the traffic grew by ``growth`` (a share):
    retraining on the same data would give the same verdict."""
    needed = math.ceil(conversations_at_rejection * (1.0 + growth))
    return conversations_now >= max(needed, conversations_at_rejection + 1)
