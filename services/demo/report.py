# ruff: noqa: S608 - the f-string joins constant fragments; every value is a ClickHouse query parameter
"""The demo's final report: figures per phase from ClickHouse, the stage timeline from the lifecycle events,
and their rendering as Markdown (pure, apart from ``phase_figures`` which runs one query).

Agreement is the SQL cookbook's (docs/sql.md, `shadow_agreement`): same intent, same tool, same arguments.
Live agreement counts shadow samples only (requests the student served and the teacher answered in the
background): fallbacks are the student's unsure answers, so counting them would understate it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.core.agents import DEFAULT_TIERS, Tier
from services.core.clickhouse import param_time
from services.core.lifecycle import LifecycleEvent
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered
from services.core.sql_fragments import AGREE, SHADOW_SAMPLE

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

PHASE_SQL = f"""
WITH {AGREE},
    {SHADOW_SAMPLE} AS shadow_sample,
    if(served_by = 'student', student_answer, teacher_answer) AS served_answer
SELECT
    count() AS requests,
    countIf(served_by = 'student') AS student,
    countIf(served_by = 'teacher') AS teacher,
    countIf(served_by = 'none') AS failed,
    countIf(student_ran) AS student_eligible,
    countIf(route_reason = 'low_confidence') AS fallbacks,
    countIf(shadow_sample) AS shadow_samples,
    countIf(shadow_sample AND agree) AS shadow_agreed,
    countIf(metadata['gold_intent'] != '') AS gold_total,
    countIf(metadata['gold_intent'] != '' AND JSONExtractString(served_answer, 'intent') = metadata['gold_intent'])
        AS gold_correct,
    sum(cost_usd) AS cost_usd,
    sum(teacher_only_cost_usd) AS teacher_only_cost_usd,
    countIf(student_ran AND student_error IS NULL) AS student_answers,
    sumIf(student_input_tokens, student_ran AND student_error IS NULL) AS student_input_tokens,
    sumIf(student_output_tokens, student_ran AND student_error IS NULL) AS student_output_tokens,
    quantileExactIf(0.95)(teacher_latency_ms, teacher_ran AND teacher_error IS NULL) AS teacher_p95_ms,
    quantileExactIf(0.95)(student_latency_ms, student_ran AND student_error IS NULL) AS student_p95_ms
FROM interactions FINAL
WHERE agent_id = {{agent:String}}
  AND received_at >= {{start:DateTime64(6)}} AND received_at < {{end:DateTime64(6)}}
"""


@dataclass
class PhaseFigures:
    name: str
    title: str
    started_at: datetime
    ended_at: datetime
    requests: int = 0
    student: int = 0
    teacher: int = 0
    failed: int = 0
    student_eligible: int = 0
    fallbacks: int = 0
    shadow_samples: int = 0
    shadow_agreed: int = 0
    gold_total: int = 0
    gold_correct: int = 0
    cost_usd: float = 0.0
    teacher_only_cost_usd: float = 0.0
    student_answers: int = 0  # the student answered (served, fell back or shadowed): each is billed
    student_input_tokens: int = 0  # what the student read and generated over those answers
    student_output_tokens: int = 0
    teacher_p95_ms: float = 0.0
    student_p95_ms: float = 0.0

    @property
    def student_share(self) -> float:
        return self.student / self.requests if self.requests else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.student_eligible if self.student_eligible else 0.0

    @property
    def live_agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_samples if self.shadow_samples else None

    @property
    def agreement_after_fallback(self) -> float | None:
        """Agreement with the teacher of what was served: teacher answers agree by definition, student answers
        at the shadow samples' rate (None without shadow samples while the student served)."""
        served = self.student + self.teacher
        if not served or (self.student and not self.shadow_samples):
            return None
        return (self.teacher + self.student * (self.live_agreement or 0.0)) / served

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_total if self.gold_total else None

    @property
    def savings(self) -> float:
        return 1 - self.cost_usd / self.teacher_only_cost_usd if self.teacher_only_cost_usd else 0.0

    def prices(self, tier: Tier) -> dict[str, float]:
        """The phase's cost at the tier's list price (as logged) and at the self-hosted price (the student's
        answers at its machine's cost per answer instead of per token), each with its saving against teacher-only,
        and the ideal saving: every request answered by the student alone (no fallback, no shadow)."""
        student_list = tier.student.cost(self.student_input_tokens, self.student_output_tokens)
        per_answer_list = student_list / self.student_answers if self.student_answers else 0.0
        per_answer_self = tier.student_self_hosted.cost_per_answer()
        self_hosted = self.cost_usd - student_list + self.student_answers * per_answer_self
        base = self.teacher_only_cost_usd

        def saving(cost: float) -> float:
            return 1 - cost / base if base else 0.0

        return {
            "cost_usd": self.cost_usd,
            "savings": saving(self.cost_usd),
            "cost_self_hosted_usd": self_hosted,
            "savings_self_hosted": saving(self_hosted),
            "ideal_savings": saving(self.requests * per_answer_list) if self.student_answers else 0.0,
            "ideal_savings_self_hosted": saving(self.requests * per_answer_self) if self.student_answers else 0.0,
        }


def phase_figures(ch: Client, agent_id: str, name: str, title: str, start: datetime, end: datetime) -> PhaseFigures:
    result = ch.query(PHASE_SQL, parameters={"agent": agent_id, "start": param_time(start), "end": param_time(end)})
    row = dict(zip(result.column_names, result.result_rows[0], strict=True)) if result.result_rows else {}
    clean = {k: (0 if v is None or v != v else v) for k, v in row.items()}  # NaN quantiles of empty sets
    return PhaseFigures(name, title, start, end, **clean)


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    what: str


def describe_event(event: LifecycleEvent) -> str:
    if isinstance(event, RetrainTriggered):
        return f"retrain triggered: {event.reason}"
    if isinstance(event, DatasetSnapshot):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(event.split_counts.items()))
        return f"snapshot {event.snapshot_id} v{event.version} ({counts})"
    assert isinstance(event, ModelEvent)
    m = event.metrics
    if event.kind == "candidate":
        return f"candidate trained in {m.get('train_seconds', 0):.0f} s"
    if event.kind == "promoted":
        return (
            f"promoted as version {event.model_version}: holdout agreement {m.get('agreement', 0):.3f}, "
            f"confidence threshold {event.confidence_threshold or 0:.2f}"
        )
    if event.kind == "rejected":
        reasons = "; ".join(event.gate.reasons) if event.gate else ""
        return f"rejected: {reasons}"
    return f"{event.kind} (version {event.model_version})"


def timeline(events: list[LifecycleEvent], agent_id: str, since: datetime) -> list[TimelineEntry]:
    mine = sorted((e for e in events if e.agent_id == agent_id and e.created_at >= since), key=lambda e: e.created_at)
    return [TimelineEntry(e.created_at, describe_event(e)) for e in mine]


@dataclass
class DemoReport:
    agent_id: str
    workload: str
    gate_mode: str
    tier: str
    started_at: datetime
    finished_at: datetime
    phases: list[PhaseFigures] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    holdout: dict[str, float] = field(default_factory=dict)  # the last promotion's metrics (or a rejected first)
    notes: list[str] = field(default_factory=list)
    prices: Tier = field(default_factory=lambda: DEFAULT_TIERS["cost-optimized"])  # the tier's prices

    def totals(self) -> PhaseFigures:
        total = PhaseFigures("total", "all phases", self.started_at, self.finished_at)
        for p in self.phases:
            for key in (
                "requests",
                "student",
                "teacher",
                "failed",
                "student_eligible",
                "fallbacks",
                "shadow_samples",
                "shadow_agreed",
                "gold_total",
                "gold_correct",
            ):
                setattr(total, key, getattr(total, key) + getattr(p, key))
            for key in (
                "cost_usd",
                "teacher_only_cost_usd",
                "student_answers",
                "student_input_tokens",
                "student_output_tokens",
            ):
                setattr(total, key, getattr(total, key) + getattr(p, key))
        total.teacher_p95_ms = max((p.teacher_p95_ms for p in self.phases), default=0.0)
        served = [p for p in self.phases if p.student]
        total.student_p95_ms = max((p.student_p95_ms for p in served), default=0.0)
        return total

    def summary(self) -> dict[str, Any]:
        """Headline figures (what `benchmarks/run_all.py` reads from report.json)."""
        total = self.totals()
        live = [p for p in self.phases if p.name != "grace"]
        shadow = sum(p.shadow_samples for p in live)
        return {
            "agreement_holdout": self.holdout.get("agreement"),
            "selective_agreement_holdout": self.holdout.get("selective_agreement"),
            "coverage_holdout": self.holdout.get("coverage"),
            "agreement_live": sum(p.shadow_agreed for p in live) / shadow if shadow else None,
            "shadow_samples": shadow,
            "fallback_rate": (sum(p.fallbacks for p in live) / s)
            if (s := sum(p.student_eligible for p in live))
            else None,
            "student_share": max((p.student_share for p in live), default=0.0),
            "cost_usd": total.cost_usd,
            "teacher_only_cost_usd": total.teacher_only_cost_usd,
            "savings_pct": 100 * total.savings,
            **self._price_summary(total),
            "teacher_p95_ms": total.teacher_p95_ms,
            "student_p95_ms": total.student_p95_ms,
            "requests": total.requests,
            "failed": total.failed,
            "duration_s": (self.finished_at - self.started_at).total_seconds(),
            **self._live_summary(),
        }

    def _live_summary(self) -> dict[str, float | None]:
        """The live phase's figures (the student serving traffic like its training data): issue 13's goals."""
        live = next((p for p in self.phases if p.name == "live"), None)
        if live is None:
            return {}
        priced = live.prices(self.prices)
        return {
            "student_share_live": live.student_share,
            "fallback_rate_live": live.fallback_rate,
            "shadow_agreement_live": live.live_agreement,
            "agreement_after_fallback_live": live.agreement_after_fallback,
            "savings_pct_live": 100 * priced["savings"],
            "savings_pct_self_hosted_live": 100 * priced["savings_self_hosted"],
            "ideal_savings_pct_live": 100 * priced["ideal_savings"],
            "teacher_p95_ms_live": live.teacher_p95_ms,
            "student_p95_ms_live": live.student_p95_ms,
        }

    def _price_summary(self, total: PhaseFigures) -> dict[str, float]:
        priced = total.prices(self.prices)
        return {
            "cost_self_hosted_usd": priced["cost_self_hosted_usd"],
            "savings_pct_self_hosted": 100 * priced["savings_self_hosted"],
            "ideal_savings_pct": 100 * priced["ideal_savings"],
            "ideal_savings_pct_self_hosted": 100 * priced["ideal_savings_self_hosted"],
            "student_usd_per_answer_self_hosted": self.prices.student_self_hosted.cost_per_answer(),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "workload": self.workload,
            "gate_mode": self.gate_mode,
            "tier": self.tier,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            **self.summary(),
            "phases": [
                {
                    **{k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(p).items()},
                    "student_share": p.student_share,
                    "fallback_rate": p.fallback_rate,
                    "live_agreement": p.live_agreement,
                    "gold_accuracy": p.gold_accuracy,
                    "savings": p.savings,
                    **p.prices(self.prices),
                }
                for p in self.phases
            ],
            "timeline": [{"at": t.at.isoformat(), "what": t.what} for t in self.timeline],
            "holdout": self.holdout,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        def pct(x: float | None) -> str:
            return "–" if x is None else f"{100 * x:.1f} %"

        minutes = (self.finished_at - self.started_at).total_seconds() / 60
        lines = [
            f"# flywheel demo: {self.agent_id} ({self.workload}), {minutes:.1f} min",
            "",
            f"Tier {self.tier}; quality gate `{self.gate_mode}`.",
            "",
            "## Stage timeline",
            "",
            "| time (UTC) | event |",
            "|---|---|",
            *[f"| {t.at:%H:%M:%S} | {t.what} |" for t in self.timeline],
            "",
            "## Traffic, quality and cost per phase",
            "",
            "| phase | requests | student share | fallback rate | live agreement (shadow n) | gold accuracy "
            "| cost | teacher-only | saved | teacher p95 | student p95 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in [*self.phases, self.totals()]:
            agreement = f"{pct(p.live_agreement)} ({p.shadow_samples})"
            student_p95 = f"{p.student_p95_ms:.0f} ms" if p.student_eligible else "–"
            lines.append(
                f"| {p.name} | {p.requests} | {pct(p.student_share)} | {pct(p.fallback_rate)} | {agreement} "
                f"| {pct(p.gold_accuracy)} | ${p.cost_usd:.4f} | ${p.teacher_only_cost_usd:.4f} | {pct(p.savings)} "
                f"| {p.teacher_p95_ms:.0f} ms | {student_p95} |"
            )
        total = self.totals().prices(self.prices)
        hosted = self.prices.student_self_hosted
        lines += [
            "",
            f"At the tier's list prices the flywheel saved {pct(total['savings'])} against teacher-only; with every "
            f"request answered by the student alone it would save {pct(total['ideal_savings'])}. Self-hosted "
            f"(a ${hosted.usd_per_hour:.2f}/h machine serving {hosted.answers_per_s:g} answers/s: "
            f"${hosted.cost_per_answer():.7f} an answer): {pct(total['savings_self_hosted'])} saved, "
            f"{pct(total['ideal_savings_self_hosted'])} ideally.",
        ]
        live = self._live_summary()
        if live:
            after = live["agreement_after_fallback_live"]
            lines += [
                "",
                f"Live phase: the student served {pct(live['student_share_live'])} (fallback "
                f"{pct(live['fallback_rate_live'])}); what was served agreed with the teacher at "
                f"{'–' if after is None else f'{after:.3f}'}; saved {live['savings_pct_live']:.1f} % at list prices, "
                f"{live['savings_pct_self_hosted_live']:.1f} % self-hosted, {live['ideal_savings_pct_live']:.1f} % "
                f"ideally; student p95 {live['student_p95_ms_live']:.0f} ms against the teacher's "
                f"{live['teacher_p95_ms_live']:.0f} ms.",
            ]
        h = self.holdout
        if h:
            lines += [
                "",
                "## Holdout (last promoted student)",
                "",
                f"agreement {h.get('agreement', 0):.3f} overall; {h.get('selective_agreement', 0):.3f} on the "
                f"{pct(h.get('coverage'))} of answers at or above the confidence threshold; format compliance "
                f"{h.get('format_compliance', 0):.3f}; gold accuracy {h.get('task_accuracy', 0):.3f}.",
            ]
        if self.notes:
            lines += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"
