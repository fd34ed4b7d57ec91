"""The benchmark report: which figure of which benchmark is compared with which goal, and the Markdown table.

Pure: fed the figures each benchmark wrote (``--json``: a flat dict name -> number) and how it ran, it returns
rows and text; no processes, no clock. ``run_all.py`` does the running.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

MINUS = "\u2212"  # typographic minus: "−3 %" reads as a shortfall, not a hyphen
TIMES = "\u00d7"

Direction = Literal["min", "max", "equal"]


@dataclass(frozen=True)
class Goal:
    """``min``: the value must be >= target; ``max``: <= target; ``equal``: == target (e.g. 0 failures)."""

    direction: Direction
    target: float
    text: str  # as the issues state it, e.g. "≥ 2,000 req/s"


@dataclass(frozen=True)
class Figure:
    """One row of the table: ``key`` in a benchmark's JSON, shown as ``measure`` with ``unit``."""

    bench: str
    key: str
    measure: str
    # "req/s", "ms", "s", "ratio" / "share" (fractions, shown as %), "pct" (already percent), "usd", "x" (a
    # factor), "agreement" (3 decimals), "" (a plain number)
    unit: str = ""
    goal: Goal | None = None  # None: reported only


@dataclass(frozen=True)
class Row:
    bench: str
    measure: str
    value: str
    goal: str
    distance: str
    command: str


def distance(value: float, goal: Goal | None) -> str:
    """How far ``value`` is from ``goal``: "met", "−3 %" (short of a minimum), "+12 %" (above a maximum),
    "3.3× under" / "3.3× over" once the gap is a factor of 2 or more, "5 over" for an exact goal."""
    if goal is None:
        return ""  # the goal column already says "report only"
    if not math.isfinite(value):
        return "n/a"
    target = goal.target
    if goal.direction == "equal":
        if value == target:
            return "met"
        gap = value - target
        return f"{_number(abs(gap))} {'over' if gap > 0 else 'under'}"
    if goal.direction == "min":
        if value >= target:
            return "met"
        if value <= 0:
            return f"{MINUS}100 %"
        ratio = value / target
        return f"{_factor(target / value)} under" if ratio <= 0.5 else f"{MINUS}{_pct(1 - ratio)} %"
    if value <= target:
        return "met"
    if target <= 0:
        return f"{_number(value - target)} over"
    ratio = value / target
    return f"{_factor(ratio)} over" if ratio >= 2 else f"+{_pct(ratio - 1)} %"


def _factor(ratio: float) -> str:
    return f"{ratio:.1f}{TIMES}" if ratio < 10 else f"{ratio:,.0f}{TIMES}"


def _pct(fraction: float) -> str:
    """A gap in percent: whole percents, one decimal below 10 % so a near miss does not read as "0 %"."""
    percent = fraction * 100
    return f"{percent:.1f}" if percent < 10 else f"{percent:.0f}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.3g}"


def format_value(value: float, unit: str) -> str:
    """A figure for people: thousands separators for rates, sensible decimals for each unit."""
    if not math.isfinite(value):
        return "n/a"
    if unit in ("ratio", "share"):
        return f"{value * 100:.1f} %"
    if unit == "usd":
        return f"${value:,.4f}" if abs(value) < 100 else f"${value:,.2f}"
    if unit in ("req/s", "msg/s", "rows/s", "interactions/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:,.1f} s" if value < 100 else f"{value:,.0f} s"
    if unit == "pct":
        return f"{value:.1f} %"
    if unit == "x":
        return f"{value:.2f}{TIMES}"
    if unit == "agreement":
        return f"{value:.3f}"
    return _number(value)


def rows_for(
    figures: Iterable[Figure],
    values: Mapping[str, object] | None,
    command: str,
    status: str | None = None,
) -> list[Row]:
    """The rows of one benchmark. ``values`` is what it wrote (None when it did not run); ``status`` says why
    not ("skipped (use --full)", "failed (exit 1)", "not run"). A benchmark that did not run shows only its
    figures that have a goal (so the goal stays in view), or one row naming its figures when none has. A key
    the benchmark did not write reads "not reported"."""
    figures = list(figures)
    if values is None or status:
        status = status or "not run"
        with_goal = [f for f in figures if f.goal]
        if not with_goal and figures:
            names = ", ".join(f.key for f in figures)
            return [Row(figures[0].bench, f"all figures ({names})", status, "report only", "", command)]
        return [Row(f.bench, f.measure, status, f.goal.text, "", command) for f in with_goal if f.goal]
    rows = []
    for fig in figures:
        goal = fig.goal.text if fig.goal else "report only"
        raw = values.get(fig.key)
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            rows.append(Row(fig.bench, fig.measure, "not reported", goal, "", command))
            continue
        value = float(raw)
        rows.append(Row(fig.bench, fig.measure, format_value(value, fig.unit), goal, distance(value, fig.goal),
                        command))  # fmt: skip
    return rows


def derive(bench: str, values: Mapping[str, object]) -> dict[str, object]:
    """Figures computed from what a benchmark wrote: the training goal is per 1,000 pairs, whatever the run's
    size (training time grows linearly with the pairs seen)."""
    out = dict(values)
    if bench == "distillation":
        seconds, pairs = values.get("train_seconds"), values.get("train_pairs")
        if isinstance(seconds, int | float) and isinstance(pairs, int | float) and pairs > 0:
            out["train_seconds_per_1000_pairs"] = seconds * 1000 / pairs
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Iterable[Row]) -> str:
    lines = ["| benchmark | measure | value | goal | distance | command |", "|---|---|---|---|---|---|"]
    for row in rows:
        # GitHub's tables split cells on "|" even inside code spans; "\|" is the escape they honour there.
        command = f"`{row.command}`" if row.command else ""
        cells = (row.bench, row.measure, row.value, row.goal, row.distance, command)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_report(rows: Iterable[Row], machine: Mapping[str, str], notes: Iterable[str] = ()) -> str:
    """The whole RESULTS.md: a header naming when and where, the table, then notes (failures, logs)."""
    head = ["# Benchmark results", ""]
    head += [f"* {key}: {value}" for key, value in machine.items()]
    head.append("")
    text = "\n".join(head) + "\n" + render_table(rows)
    extra = list(notes)
    if extra:
        text += "\n" + "\n".join(f"* {note}" for note in extra) + "\n"
    return text


# The catalogue: every figure the table shows, by benchmark, with the goals the issues set. -------------------
def _min(target: float, text: str) -> Goal:
    return Goal("min", target, text)


def _max(target: float, text: str) -> Goal:
    return Goal("max", target, text)


# fmt: off
FIGURES: dict[str, list[Figure]] = {
    "broker": [
        Figure("broker", "produce_msg_s", "produce, 1 KB messages, acks=all", "msg/s"),
        Figure("broker", "consume_msg_s", "consume, 1 KB messages", "msg/s"),
    ],
    "clickhouse": [
        Figure("clickhouse", "native_passthrough_ratio", "endpoint raw Native insert vs in-process chDB Native",
               "ratio", _min(0.60, "≥ 60 %")),
        Figure("clickhouse", "best_client_ratio", "endpoint best clickhouse-connect path vs in-process Python(df)",
               "ratio"),
        Figure("clickhouse", "endpoint_raw_insert_native_rows_s", "endpoint raw Native insert", "rows/s"),
    ],
    "triton": [
        Figure("triton", "echo_grpc_sequential_p95_ms", "echo model p95, gRPC, sequential", "ms"),
        Figure("triton", "echo_http_sequential_p95_ms", "echo model p95, HTTP, sequential", "ms"),
        Figure("triton", "echo_grpc_concurrent_req_per_s", "echo model, gRPC, 4 clients", "req/s"),
    ],
    "router": [
        Figure("router", "student_rps", "student path, sustained", "req/s", _min(2000, "≥ 2,000 req/s")),
        Figure("router", "student_added_p95_ms", "student path, added latency p95 at 200 req/s", "ms",
               _max(5.0, "≤ 5 ms")),
        Figure("router", "teacher_rps", "teacher path (instant teacher), sustained", "req/s"),
        Figure("router", "teacher_added_p95_ms", "teacher path, added latency p95 at 200 req/s", "ms"),
    ],
    "logger": [
        Figure("logger", "end_to_end_per_s", "end to end: topic → logger → ClickHouse", "interactions/s",
               _min(100_000, "≥ 100,000/s")),
        Figure("logger", "sink_rows_s", "sink alone (Avro records → ClickHouse)", "rows/s"),
    ],
    "student_latency": [
        Figure("student_latency", "student_p95_ms", "trained student p95 through Triton, concurrency 1", "ms",
               _max(150, "≤ 150 ms")),
        Figure("student_latency", "student_answers_per_s", "trained student through Triton, concurrency 16",
               "answers/s", _min(25, "≥ 25/s")),
        Figure("student_latency", "forward_passes_per_answer", "forward passes per answer", "",
               _max(4, "≤ 4")),
        Figure("student_latency", "agreement_with_reference", "served answers = the plain decode's (same weights)",
               "share", _min(0.995, "≥ 0.995")),
        Figure("student_latency", "holdout_agreement_fp32", "holdout agreement, plain decode, fp32", "agreement"),
        Figure("student_latency", "holdout_agreement_served", "holdout agreement, served (format chosen)",
               "agreement"),
        Figure("student_latency", "in_process_plain_fp32_p95_ms", "before: plain fp32 decode p95, in process, batch 1",
               "ms"),
        Figure("student_latency", "teacher_p95_ms", "reference teacher p95 over HTTP (default latency model)", "ms"),
        Figure("student_latency", "p95_ratio", "student p95 / teacher p95", "x"),
    ],
    "contention": [
        Figure("contention", "serve_auto_kept", "student serving beside a busy core / alone (threads auto)",
               "share", _min(0.5, "≥ 50 %")),
        Figure("contention", "train_auto_kept", "training beside a busy core / alone (threads auto)", "share",
               _min(0.5, "≥ 50 %")),
        Figure("contention", "serve_2_kept", "student serving beside a busy core / alone (2 threads fixed)",
               "share"),
        Figure("contention", "train_2_kept", "training beside a busy core / alone (2 threads fixed)", "share"),
    ],
    "hotswap": [
        Figure("hotswap", "failed_requests", "failed requests while publishing new versions", "",
               Goal("equal", 0, "0")),
        Figure("hotswap", "fallbacks_during_swaps", "fallbacks to the teacher during swaps"),
        Figure("hotswap", "p95_during_swaps_ms", "latency p95 during swaps", "ms"),
        Figure("hotswap", "p95_outside_swaps_ms", "latency p95 outside swaps", "ms"),
    ],
    "distillation": [
        Figure("distillation", "stage2_agreement", "stage-2 holdout agreement", "agreement", _min(0.96, "≥ 0.96")),
        Figure("distillation", "train_seconds_per_1000_pairs", "training time per 1,000 pairs", "s",
               _max(600, "≤ 600 s")),
        Figure("distillation", "train_seconds", "training time", "s"),
        Figure("distillation", "train_pairs", "training pairs"),
        Figure("distillation", "stage1_agreement", "stage-1 holdout agreement (base + prompt)", "agreement"),
        Figure("distillation", "format_compliance", "stage-2 format compliance", "share"),
        Figure("distillation", "gold_accuracy", "stage-2 accuracy against gold labels", "share"),
        Figure("distillation", "threshold", "calibrated confidence threshold", "agreement"),
        Figure("distillation", "coverage", "coverage at the threshold", "share"),
        Figure("distillation", "selective_agreement", "agreement at or above the threshold", "agreement"),
        Figure("distillation", "coverage_at_agreement_0.95", "coverage at 0.95 agreement on what is served", "share",
               _min(0.85, "≥ 0.85")),
        Figure("distillation", "student_p95_ms", "trained student p95, in process, batch 1", "ms"),
        Figure("distillation", "teacher_p95_ms", "teacher p95 (latency model)", "ms"),
    ],
    "demo": [
        Figure("demo", "agreement_holdout", "holdout agreement", "agreement", _min(0.92, "≥ 0.92 (the overall gate)")),
        Figure("demo", "agreement_live", "live (shadow) agreement", "agreement"),
        Figure("demo", "fallback_rate", "fallback rate", "share"),
        # The best live phase's share (issue 5: the student serves ≥ 95 % of the traffic).
        Figure("demo", "student_share", "share served by the student (best live phase)", "share",
               _min(0.95, "≥ 95 %")),
        Figure("demo", "cost_usd", "cost", "usd"),
        Figure("demo", "teacher_only_cost_usd", "teacher-only cost", "usd"),
        Figure("demo", "savings_pct", "savings", "pct"),
        Figure("demo", "teacher_p95_ms", "teacher p95", "ms"),
        Figure("demo", "student_p95_ms", "student p95", "ms"),
        # The live phase alone (issue 13: the seed's promise on the demo, one full run on 2 cores).
        Figure("demo", "student_share_live", "live phase: share served by the student", "share",
               _min(0.90, "≥ 90 %")),
        Figure("demo", "fallback_rate_live", "live phase: fallback rate", "share", _max(0.10, "≤ 10 %")),
        Figure("demo", "agreement_after_fallback_live", "live phase: agreement of what was served", "agreement",
               _min(0.97, "≥ 0.97")),
        Figure("demo", "savings_pct_live", "live phase: savings at list prices", "pct", _min(50, "≥ 50 %")),
        Figure("demo", "savings_pct_self_hosted_live", "live phase: savings at the self-hosted price", "pct"),
        Figure("demo", "ideal_savings_pct_live", "live phase: savings if the student answered everything", "pct"),
        Figure("demo", "student_p95_ms_live", "live phase: student p95", "ms"),
        Figure("demo", "duration_s", "whole demo", "s", _max(1800, "≤ 30 min")),
    ],
}
# fmt: on
