"""The drift monitor service: watches every live student's traffic and triggers a retrain when it drifts.

On start it reads every agent's lifecycle from ClickHouse (``model_events``, ``datasets``, ``retrain_events``:
the durable record), then follows ``flywheel.models``, ``flywheel.retrain`` and ``flywheel.datasets`` from
their start, the way the curator does. Every ``drift_check_interval_s`` it checks each agent whose student is
live (``rules.blocked``: stage ``live``, outside the cool-down after its latest retrain trigger) over the
window since the current promotion (``rules.window``), runs the three rules of ``rules`` on figures read with
the SQL of ``queries``, and when one fires emits ``RetrainTriggered`` (reason ``agreement_drift``,
``intent_shift`` or ``fallback_rate``; the evidence names the window, the figures, the test and the query) on
``flywheel.retrain``.

The trigger is observed at once, which moves the agent to ``retraining``; the cool-down is derived from the
triggers' ``created_at`` (read back from ClickHouse and the topic at start), so a restart neither repeats a
trigger nor forgets one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.core import topics
from services.core.agents import AgentConfig, AgentsFile, load_agents
from services.core.codec import AvroCodec
from services.core.kafka import Publisher
from services.core.lifecycle import AgentLifecycle, LifecycleEvent, event_key, fold
from services.core.lifecycle_service import LifecycleService
from services.core.records import DatasetSnapshot, RetrainTriggered, utcnow
from services.core.settings import Settings
from services.drift_monitor import queries, rules
from services.trainer.evaluate import agrees

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("flywheel.drift_monitor")
SERVICE = "drift_monitor"


class DriftMonitor(LifecycleService):
    SERVICE = SERVICE

    def __init__(
        self,
        settings: Settings,
        agents: AgentsFile,
        codec: AvroCodec | None = None,
        check_interval_s: float | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.agents = agents
        self.codec = codec or AvroCodec()
        self.check_interval_s = check_interval_s or settings.drift_check_interval_s
        self.clock = clock
        self.events: dict[tuple[str, str], LifecycleEvent] = {}
        self.trained_intents: dict[str, dict[str, int]] = {}  # snapshot id -> intent counts (immutable)
        self.last_results: dict[str, dict[str, Any]] = {}  # agent -> latest check, for logs and tests
        self.publisher: Publisher | None = None
        self.stats: Counter[str] = Counter()

    # State --------------------------------------------------------------------------------------------
    def observe(self, event: LifecycleEvent) -> None:
        super().observe(event)
        if event.agent_id in self.agents.agents:
            if isinstance(event, DatasetSnapshot) and event.intent_counts:
                self.trained_intents[event.snapshot_id] = dict(event.intent_counts)

    def mine(self, agent_id: str) -> list[LifecycleEvent]:
        return [e for e in self.events.values() if e.agent_id == agent_id]

    # Figures (ClickHouse reads) -----------------------------------------------------------------------
    def _trained(self, ch: Client, agent_id: str, snapshot_id: str | None) -> dict[str, int] | None:
        if snapshot_id is None:
            return None
        if snapshot_id not in self.trained_intents:
            rows = ch.query(
                queries.TRAINED_INTENTS_SQL, parameters={"agent": agent_id, "snapshot": snapshot_id}
            ).result_rows
            if not rows or not rows[0][0]:
                return None  # not logged yet: ask again next check
            self.trained_intents[snapshot_id] = {str(k): int(v) for k, v in rows[0][0].items()}
        return self.trained_intents[snapshot_id]

    @staticmethod
    def _fallbacks(ch: Client, params: dict[str, str]) -> tuple[int, int, int]:
        row = ch.query(queries.FALLBACK_SQL, parameters=params).result_rows[0]
        return int(row[1]), int(row[0]), int(row[2])

    def check(self, ch: Client, agent: AgentConfig, now: datetime) -> RetrainTriggered | None:
        """One agent's check: the trigger to emit, or None."""
        agent_id, drift = agent.agent_id, agent.drift
        events = self.mine(agent_id)
        state: AgentLifecycle = fold(agent_id, events)
        why_not = rules.blocked(state, rules.cooldown_until(agent_id, events, drift), now)
        if why_not is not None or state.promoted_at is None:
            self.last_results[agent_id] = {"blocked": why_not}
            return None
        model = rules.current_model(agent_id, events)
        span = rules.window(now, drift, state.promoted_at)
        if span.empty:
            self.last_results[agent_id] = {"blocked": "empty window"}
            return None
        params = queries.window_parameters(agent_id, span.start, span.end)
        used: dict[str, tuple[str, dict[str, Any]]] = {}

        pairs = ch.query(queries.SHADOW_PAIRS_SQL, parameters=params).result_rows
        agreed = sum(agrees(student, teacher) for _, teacher, student in pairs)
        used[rules.AGREEMENT] = (queries.SHADOW_PAIRS_SQL, params)
        agreement = rules.agreement_drift(agreed, len(pairs), state.validation_agreement, drift)

        counts = ch.query(queries.INTENTS_SQL, parameters=params).result_rows
        trained = self._trained(ch, agent_id, rules.snapshot_of(model) if model is not None else None)
        used[rules.INTENT] = (queries.INTENTS_SQL, params)
        shift = rules.intent_shift({intent: int(n) for intent, n in counts}, trained, drift)

        # The fallback reference: the calibration, else the first window after the promotion, once it is
        # over; then the current window starts after it, so the two never share a request.
        baseline: tuple[int, int] | None = None
        fallback_span = span
        first = rules.baseline_window(drift, state.promoted_at)
        needs_baseline = rules.fallback_reference(model, drift, None) is None
        if needs_baseline and now >= first.end:
            k0, n0, _ = self._fallbacks(ch, queries.window_parameters(agent_id, first.start, first.end))
            baseline = (k0, n0)
            fallback_span = rules.Window(max(span.start, first.end), span.end)
        fallback_params = queries.window_parameters(agent_id, fallback_span.start, fallback_span.end)
        fallbacks, eligible, errors = self._fallbacks(ch, fallback_params)
        used[rules.FALLBACK] = (queries.FALLBACK_SQL, fallback_params)
        reference = rules.fallback_reference(model, drift, baseline)
        fallback = rules.fallback_rate(fallbacks, eligible, reference, drift)
        if baseline is not None:
            fallback = _with_details(fallback, baseline_window=first.evidence(), window=fallback_span.evidence())
        fallback = _with_details(fallback, student_errors=errors)

        results = [agreement, shift, fallback]
        self.last_results[agent_id] = {r.rule: r.why for r in results}
        chosen = rules.choose(results)
        if chosen is None:
            log.debug("drift: %s no drift: %s", agent_id, "; ".join(r.why for r in results))
            return None
        evidence = rules.evidence(state, model, span, chosen, results, used, drift)
        return RetrainTriggered(agent_id=agent_id, reason=chosen.rule, evidence=json.dumps(evidence), created_at=now)

    # One round of work (blocking I/O: run it in a thread from the event loop) ----------------------------
    def step(self, ch: Client) -> list[RetrainTriggered]:
        """Check every agent; returns the triggers to publish (already observed, so the cool-down and the
        ``retraining`` stage hold from now on)."""
        now = self.clock()
        out: list[RetrainTriggered] = []
        for agent_id, agent in self.agents.agents.items():
            try:
                trigger = self.check(ch, agent, now)
            except Exception:  # one agent's bad row must not stop the others' checks
                log.exception("drift: check of %s failed", agent_id)
                self.stats["check_errors"] += 1
                continue
            self.stats["checks"] += 1
            if trigger is not None:
                log.warning("drift: %s %s: %s", agent_id, trigger.reason, json.loads(trigger.evidence)["summary"])
                self.observe(trigger)
                out.append(trigger)
        return out

    # Kafka --------------------------------------------------------------------------------------------
    async def publish(self, records: Iterable[RetrainTriggered]) -> None:
        assert self.publisher is not None
        pending = list(records)
        while pending:
            record = pending[0]
            try:
                await self.publisher.send(topics.RETRAIN, record, record.agent_id)
            except Exception:
                # Not sent: forget the triggers, so the next check decides again instead of a cool-down
                # (and a retraining stage) resting on a trigger nobody received.
                for unsent in pending:
                    self.events.pop(event_key(unsent), None)
                raise
            pending.pop(0)
            self.stats[f"emitted_{record.reason}"] += 1


def _with_details(result: rules.RuleResult, **details: Any) -> rules.RuleResult:
    return replace(result, details={**result.details, **details})


async def _main(settings: Settings) -> None:
    monitor = DriftMonitor(settings, load_agents(settings.agents_file))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await monitor.run(stop)
    finally:
        log.info("drift: stopped; %s", json.dumps(dict(monitor.stats)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(Settings.load()))
