"""`flywheel demo`: the whole flywheel on the local stack, end to end.

grace period (the teacher answers the replayed traffic) → grace complete → snapshot → LoRA training of the
default base → gate → the student goes live (canary, then most traffic) → the held-back intents arrive →
the drift monitor fires → retrain → the new student serves the new mix. Then a report: the stage timeline,
the traffic split, agreement (holdout and live), fallback rate, cost against teacher-only and latency p95.

Everything the demo shows comes from where a user would look: the lifecycle events and the interactions in
ClickHouse, and the trainer's progress file. The services do the work; the demo only sends traffic and
watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.core.agents import AgentConfig, load_agents
from services.core.clickhouse import client
from services.core.lifecycle import LifecycleEvent, fold
from services.core.lifecycle_store import read_lifecycle_events
from services.core.records import ModelEvent, RetrainTriggered, utcnow
from services.core.settings import Settings
from services.demo.plan import DemoPlan, Phase, phase_intents
from services.demo.report import DemoReport, PhaseFigures, phase_figures, timeline
from services.workload import ReplayResult, replay

DRIFT_REASONS = ("agreement_drift", "intent_shift", "fallback_rate")
POLL_S = 2.0


class DemoError(RuntimeError):
    """The demo cannot go on (the message says why and what to do)."""


def reset_home(settings: Settings) -> None:
    """Stop the local stack and delete its state (``--reset``): the demo then starts from an empty store."""
    from services.stack.local import LocalStack

    LocalStack(settings).down()
    home = settings.home.absolute()
    if home.exists():
        shutil.rmtree(home)


def events_of(settings: Settings, agent_id: str) -> list[LifecycleEvent]:
    ch = client(settings)
    try:
        return [e for e in read_lifecycle_events(ch) if e.agent_id == agent_id]
    finally:
        ch.close()


def check_fresh(settings: Settings, agent_id: str) -> None:
    events = events_of(settings, agent_id)
    if events:
        state = fold(agent_id, events)
        student = f", student version {state.model_version}" if state.has_student else ""
        raise DemoError(
            f"{agent_id} has already been through the flywheel in {settings.home.absolute()} (stage {state.stage}"
            f"{student}). Run `flywheel demo --reset` to start over from an empty store, or set FLYWHEEL_HOME "
            "to a new directory."
        )


@dataclass
class Watch:
    """What the demo waits for, from the lifecycle events after ``since``."""

    settings: Settings
    agent_id: str

    def after(self, since: datetime) -> list[LifecycleEvent]:
        return sorted(
            (e for e in events_of(self.settings, self.agent_id) if e.created_at >= since), key=lambda e: e.created_at
        )


class Demo:
    def __init__(self, settings: Settings, plan: DemoPlan, console: Console, out_dir: Path) -> None:
        self.settings = settings
        self.plan = plan
        self.console = console
        self.out_dir = out_dir
        self.agent: AgentConfig = load_agents(settings.agents_file).agent(plan.agent_id)
        self.watch = Watch(settings, plan.agent_id)
        self.started = utcnow()
        self.phases: list[PhaseFigures] = []
        self.notes: list[str] = []
        self.holdout: dict[str, float] = {}
        self.sent: dict[str, int] = {}  # requests answered per phase (fewer than planned when a phase stopped)

    def _progress(self, spinner: bool = False) -> Progress:
        """The demo's progress display: description, bar, count, a free-text field, time elapsed."""
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        ]
        # Two redraws a second, not rich's ten: the demo shares two cores with the training it shows (the demo
        # process took 12 % of a core while a training ran beside the idle stack).
        return Progress(*([SpinnerColumn()] if spinner else []), *columns, console=self.console, refresh_per_second=2)

    # Traffic ----------------------------------------------------------------------------------------------
    async def traffic(
        self,
        phase: Phase,
        extra: Callable[[Progress], asyncio.Task] | None = None,
        stop: Callable[[datetime], Awaitable[object]] | None = None,
    ) -> tuple[datetime, object | None]:
        """Send the phase's requests (side-by-side replays when it mixes in held-back intents). ``stop``, when
        given, is awaited beside the replays: when it returns first, the rest of the phase is not sent. Returns
        the phase's start time and what ``stop`` returned (None when the phase ran to its end)."""
        start = utcnow()
        self.console.rule(f"[bold]{phase.title}[/]")
        stopped: object | None = None
        with self._progress() as bar:
            task = bar.add_task("requests", total=phase.requests, info="")
            results: list[ReplayResult] = []

            def progress(_r: ReplayResult) -> None:
                done = sum(r.answered + r.errors for r in results)
                served: dict[str, int] = {}
                for r in results:
                    for k, v in r.served_by.items():
                        served[k] = served.get(k, 0) + v
                total = sum(served.values()) or 1
                split = " ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(served.items()))
                errors = sum(r.errors for r in results)
                bar.update(task, completed=done, info=split + (f" errors {errors}" if errors else ""))

            watcher = extra(bar) if extra else None
            jobs = []
            for i, (intents, count) in enumerate(phase_intents(self.plan, phase)):
                result = ReplayResult()
                results.append(result)
                jobs.append(self._replay(phase, intents, count, phase.seed + 100 * i, result, progress))
            sending = asyncio.ensure_future(asyncio.gather(*jobs))
            if stop is None:
                await sending
            else:
                waiting = asyncio.ensure_future(stop(start))
                await asyncio.wait({sending, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done() and not sending.done():
                    stopped = waiting.result()
                    sending.cancel()
                else:
                    waiting.cancel()
                for future in (sending, waiting):
                    with contextlib.suppress(asyncio.CancelledError):
                        await future
            if watcher:
                await asyncio.sleep(POLL_S)
                watcher.cancel()
        self.sent[phase.name] = sum(r.answered + r.errors for r in results)
        errors = sum(r.errors for r in results)
        if errors:
            self.notes.append(f"{phase.name}: {errors} requests got an error response")
        return start, stopped

    async def _replay(
        self, phase: Phase, intents, count: int, seed: int, into: ReplayResult, progress: Callable[[ReplayResult], None]
    ) -> None:
        def copy(r: ReplayResult) -> None:
            into.answered, into.errors, into.served_by = r.answered, r.errors, r.served_by
            progress(r)

        done = await replay(
            self.settings,
            self.plan.agent_id,
            self.plan.workload,
            count,
            None,
            list(intents),
            phase.split,
            0.0,
            seed,
            concurrency=phase.concurrency,
            progress=copy,
        )
        copy(done)

    def grace_watcher(self, bar: Progress) -> asyncio.Task:
        from services.curator.service import grace_progress

        cfg = self.agent.grace_period
        conv = bar.add_task("grace: conversations", total=cfg.min_conversations, info="")
        intents = bar.add_task("grace: unique intents", total=cfg.min_unique_intents, info="")

        async def poll() -> None:
            while True:
                with _quiet():
                    for status in await asyncio.to_thread(grace_progress, self.settings):
                        if status.agent_id == self.plan.agent_id:
                            bar.update(conv, completed=min(status.conversations, cfg.min_conversations))
                            bar.update(intents, completed=min(status.unique_intents, cfg.min_unique_intents))
                await asyncio.sleep(POLL_S)

        return asyncio.ensure_future(poll())

    def record_phase(self, phase: Phase, start: datetime) -> PhaseFigures:
        end = utcnow()
        ch = client(self.settings)
        try:
            # The logger flushes by size and age: wait (briefly) until the phase's requests are all stored.
            deadline = time.monotonic() + 30
            while True:
                figures = phase_figures(ch, self.plan.agent_id, phase.name, phase.title, start, end)
                if figures.requests >= self.sent.get(phase.name, phase.requests) or time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            ch.close()
        self.phases.append(figures)
        self.console.print(
            f"  {phase.name}: {figures.requests} requests, student {100 * figures.student_share:.0f} %, "
            f"fallback rate {100 * figures.fallback_rate:.0f} %, cost ${figures.cost_usd:.4f} "
            f"(teacher-only ${figures.teacher_only_cost_usd:.4f})",
            highlight=False,
        )
        return figures

    # Waiting on the services ------------------------------------------------------------------------------
    async def wait_training(self, since: datetime) -> ModelEvent:
        """Follow a training job from the retrain trigger to the gate's verdict, with the trainer's progress."""
        from services.trainer.service import progress_path

        progress_file = progress_path(self.settings)
        deadline = time.monotonic() + self.plan.wait_training_s
        with self._progress(spinner=True) as bar:
            task = bar.add_task("waiting for the curator's snapshot", total=None, info="")
            while time.monotonic() < deadline:
                events = await asyncio.to_thread(self.watch.after, since)
                verdicts = [e for e in events if isinstance(e, ModelEvent) and e.kind in ("promoted", "rejected")]
                if verdicts:
                    bar.update(task, description="done", info=verdicts[-1].kind)
                    return verdicts[-1]
                snapshots = [e for e in events if type(e).__name__ == "DatasetSnapshot"]
                if any(isinstance(e, ModelEvent) and e.kind == "candidate" for e in events):
                    bar.update(task, description="gate: publishing to Triton", info="")
                elif snapshots:
                    info = _read_progress(progress_file, self.plan.agent_id, snapshots[-1].snapshot_id)
                    if info is None:
                        counts = snapshots[-1].split_counts
                        bar.update(
                            task,
                            description=f"training on snapshot {snapshots[-1].snapshot_id}",
                            info=f"train {counts.get('train', 0)}, holdout {counts.get('holdout', 0)}",
                        )
                    elif info["step"] >= info["steps"]:
                        bar.update(
                            task,
                            description="evaluating on the holdout",
                            total=info["steps"],
                            completed=info["step"],
                            info="",
                        )
                    else:
                        bar.update(
                            task,
                            description="training (LoRA)",
                            total=info["steps"],
                            completed=info["step"],
                            info=f"loss {info['loss']:.3f}, {info['examples_per_s']:.1f} ex/s, "
                            f"ETA {info['eta_s'] / 60:.1f} min",
                        )
                await asyncio.sleep(POLL_S)
        raise DemoError(
            f"no gate verdict for {self.plan.agent_id} within {self.plan.wait_training_s:.0f} s; see "
            f"{self.settings.log_dir}/trainer.log and curator.log"
        )

    async def first_drift(self, since: datetime) -> RetrainTriggered | None:
        """The first drift trigger after ``since``, if the monitor has fired."""
        events = await asyncio.to_thread(self.watch.after, since)
        return next((e for e in events if isinstance(e, RetrainTriggered) and e.reason in DRIFT_REASONS), None)

    async def drift_fired(self, since: datetime) -> RetrainTriggered:
        """The first drift trigger after ``since`` (polls until there is one)."""
        while True:
            with _quiet():
                if fired := await self.first_drift(since):
                    return fired
            await asyncio.sleep(POLL_S)

    async def wait_drift(self, since: datetime) -> RetrainTriggered | None:
        deadline = time.monotonic() + self.plan.wait_drift_s
        with self.console.status("waiting for the drift monitor (it checks sliding windows of live traffic)..."):
            while time.monotonic() < deadline:
                if fired := await self.first_drift(since):
                    return fired
                await asyncio.sleep(POLL_S)
        return None

    async def train_until_verdict(self, since: datetime, attempt_traffic: Phase) -> ModelEvent:
        verdict = await self.wait_training(since)
        attempts = 0
        while verdict.kind == "rejected" and attempts < self.plan.retries:
            attempts += 1
            reasons = "; ".join(verdict.gate.reasons) if verdict.gate else ""
            self.console.print(f"[yellow]candidate rejected[/] ({reasons}): the curator waits for more data")
            more = Phase(
                f"{attempt_traffic.name}-more",
                "more traffic after a rejected candidate",
                max(50, int(attempt_traffic.requests * self.agent.curation.retry_growth) + 50),
                attempt_traffic.split,
                attempt_traffic.held_back_share,
                attempt_traffic.concurrency,
                attempt_traffic.seed + 1000 * attempts,
            )
            start, _ = await self.traffic(more)
            self.record_phase(more, start)
            verdict = await self.wait_training(start)
        return verdict

    def _promoted(self, event: ModelEvent) -> None:
        m = event.metrics
        self.holdout = dict(m)
        self.console.print(
            f"[green]promoted[/] {event.model_name} version {event.model_version}: holdout agreement "
            f"{m.get('agreement', 0):.3f}, selective {m.get('selective_agreement', 0):.3f} at coverage "
            f"{m.get('coverage', 0):.2f}, threshold {event.confidence_threshold or 0:.2f}, trained in "
            f"{m.get('train_seconds', 0):.0f} s",
            highlight=False,
        )

    # The run --------------------------------------------------------------------------------------------
    async def run(self) -> DemoReport:
        plan = self.plan
        self.console.print(
            f"agent [bold]{plan.agent_id}[/] ({plan.workload}): {len(plan.intents)} intents at first, "
            f"{len(plan.held_back)} held back for the drift phase ({', '.join(plan.held_back)}); quality gate "
            f"[bold]{self.agent.validation.gate_mode}[/] (agreement ≥ {self.agent.validation.quality_threshold})",
            highlight=False,
        )
        grace = plan.phase("grace")
        start, _ = await self.traffic(grace, self.grace_watcher)
        self.record_phase(grace, start)
        verdict = await self.train_until_verdict(start, grace)
        if verdict.kind != "promoted":
            self.holdout = dict(verdict.metrics)  # the rejected candidate's figures: how far it was
            # train_until_verdict retries after more traffic: the figures are the last candidate's.
            self.notes.append(
                f"no candidate passed the gate (the last one's holdout agreement "
                f"{verdict.metrics.get('agreement', float('nan')):.3f}): the student never went live"
            )
            return self.report()
        self._promoted(verdict)

        live = plan.phase("live")
        live_start, _ = await self.traffic(live)
        self.record_phase(live, live_start)

        # The monitor may fire on the live traffic itself (intents the teacher gives outside the agent's, or
        # messages the curator's clusters take for new intents): that retrain is the one the demo follows.
        if early := await self.first_drift(live_start):
            self.notes.append(
                f"the drift monitor fired during the live phase, before the held-back intents arrived: {early.reason}"
                f" ({_brief(early.evidence).get('summary', '')}); the drift phase was skipped"
            )
            self.console.print(f"[yellow]drift detected in the live phase[/]: {early.reason}", highlight=False)
            return await self.retrain_and_recover(early, live)

        # The drift phase ends when the monitor fires: on 2 cores, serving the rest of it beside the retrain
        # slowed both about fivefold (training at 0.46 examples/s against 2.9, the student at 0.25 answers/s).
        drift = plan.phase("drift")
        start, fired = await self.traffic(drift, stop=self.drift_fired)
        self.record_phase(drift, start)
        trigger = fired if isinstance(fired, RetrainTriggered) else await self.wait_drift(start)
        if fired is not None:
            self.console.print(
                f"  the drift phase stopped after {self.sent[drift.name]} of {drift.requests} "
                "requests: the monitor had fired",
                highlight=False,
            )
        if trigger is None:
            self.notes.append(f"the drift monitor did not fire within {plan.wait_drift_s:.0f} s of the drift phase")
            return self.report()
        self.console.print(
            f"[yellow]drift detected[/]: {trigger.reason} {json.dumps(_brief(trigger.evidence))}", highlight=False
        )
        return await self.retrain_and_recover(trigger, drift)

    async def retrain_and_recover(self, trigger: RetrainTriggered, traffic: Phase) -> DemoReport:
        """Wait for the retrain the trigger started (more ``traffic`` after a rejection), then the recovery."""
        verdict = await self.train_until_verdict(trigger.created_at - timedelta(seconds=1), traffic)
        if verdict.kind != "promoted":
            self.notes.append("the retrained candidate was rejected: the previous student kept serving")
        else:
            self._promoted(verdict)
        recovery = self.plan.phase("recovery")
        start, _ = await self.traffic(recovery)
        self.record_phase(recovery, start)
        return self.report()

    def report(self) -> DemoReport:
        events = events_of(self.settings, self.plan.agent_id)
        report = DemoReport(
            agent_id=self.plan.agent_id,
            workload=self.plan.workload,
            gate_mode=self.agent.validation.gate_mode,
            tier=self.agent.tier,
            started_at=self.started,
            finished_at=utcnow(),
            phases=self.phases,
            timeline=timeline(events, self.plan.agent_id, self.started - timedelta(seconds=1)),
            holdout=self.holdout,
            notes=self.notes,
            prices=load_agents(self.settings.agents_file).tier(self.agent),
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        (self.out_dir / "report.md").write_text(report.markdown())
        return report


def _brief(evidence: str) -> dict[str, object]:
    """The short figures of a trigger's evidence, its one-line summary first (the SQL and long lists left
    out)."""
    try:
        data = json.loads(evidence)
    except ValueError:
        return {"evidence": evidence[:80]}
    if not isinstance(data, dict):
        return {"evidence": str(data)[:80]}
    brief = {k: v for k, v in data.items() if k not in ("query", "sql") and len(str(v)) < 80}
    if isinstance(data.get("summary"), str):
        brief = {"summary": data["summary"], **brief}
    return brief


def _read_progress(path: Path, agent_id: str, snapshot_id: str) -> dict[str, float] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if info.get("agent_id") != agent_id or info.get("snapshot_id") != snapshot_id:
        return None
    return info


class _quiet:
    """Polling ClickHouse for a progress bar must not end the demo on one failed query."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, Exception)
