"""The benchmark report's pure parts: distance to a goal, value formatting, rows and the Markdown table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    # benchmarks/ is a folder of scripts, not an installed package: load the module from its file.
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


report = _load("report")
Goal, Figure = report.Goal, report.Figure


@pytest.mark.parametrize(
    ("value", "goal", "expected"),
    [
        (2500, Goal("min", 2000, ""), "met"),
        (2000, Goal("min", 2000, ""), "met"),
        (1940, Goal("min", 2000, ""), "\u22123.0 %"),
        (1500, Goal("min", 2000, ""), "\u221225 %"),
        (600, Goal("min", 2000, ""), "3.3\u00d7 under"),
        (0, Goal("min", 0.96, ""), "\u2212100 %"),
        (4.2, Goal("max", 5, ""), "met"),
        (5.6, Goal("max", 5, ""), "+12 %"),
        (16.5, Goal("max", 5, ""), "3.3\u00d7 over"),
        (195, Goal("max", 5, ""), "39\u00d7 over"),
        (0, Goal("equal", 0, ""), "met"),
        (5, Goal("equal", 0, ""), "5 over"),
        (1.0, None, ""),
        (float("nan"), Goal("min", 1, ""), "n/a"),
    ],
)
def test_distance(value: float, goal, expected: str) -> None:
    assert report.distance(value, goal) == expected


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (2345.6, "req/s", "2,346 req/s"),
        (0.8123, "ratio", "81.2 %"),
        (3.14159, "ms", "3.1 ms"),
        (1234.5, "ms", "1,234 ms"),
        (524.2, "s", "524 s"),
        (0.9634, "agreement", "0.963"),
        (0.01234, "usd", "$0.0123"),
        (62.5, "pct", "62.5 %"),
        (0.12, "x", "0.12\u00d7"),
        (7, "", "7"),
        (float("inf"), "ms", "n/a"),
    ],
)
def test_format_value(value: float, unit: str, expected: str) -> None:
    assert report.format_value(value, unit) == expected


FIGS = [
    Figure("router", "student_rps", "student path", "req/s", Goal("min", 2000, "≥ 2,000 req/s")),
    Figure("router", "teacher_rps", "teacher path", "req/s"),
]


def test_rows_compare_each_figure_with_its_goal() -> None:
    rows = report.rows_for(FIGS, {"student_rps": 1940.0, "teacher_rps": 3000}, "python benchmarks/bench_router.py")
    assert [(r.measure, r.value, r.goal, r.distance) for r in rows] == [
        ("student path", "1,940 req/s", "≥ 2,000 req/s", "\u22123.0 %"),
        ("teacher path", "3,000 req/s", "report only", ""),
    ]
    assert {r.command for r in rows} == {"python benchmarks/bench_router.py"}


def test_rows_of_a_benchmark_that_did_not_run_or_lacks_a_key() -> None:
    # Not run: only the figures with a goal, so the goal stays in view; or one row naming every figure.
    skipped = report.rows_for(FIGS, None, "cmd", "skipped (use --full)")
    assert [(r.measure, r.value, r.goal) for r in skipped] == [
        ("student path", "skipped (use --full)", "≥ 2,000 req/s")
    ]
    assert [r.value for r in report.rows_for(FIGS, {"student_rps": 1.0}, "cmd", "failed (exit 1)")] == [
        "failed (exit 1)"
    ]
    (demo,) = report.rows_for(FIGS[1:], None, "cmd")
    assert (demo.measure, demo.value) == ("all figures (teacher_rps)", "not run")
    partial = report.rows_for(FIGS, {"student_rps": "fast", "other": 1}, "cmd")
    assert [r.value for r in partial] == ["not reported", "not reported"]
    assert report.rows_for(FIGS, {"student_rps": True}, "cmd")[0].value == "not reported"


def test_training_goal_is_per_thousand_pairs() -> None:
    values = report.derive("distillation", {"train_seconds": 300.0, "train_pairs": 500})
    assert values["train_seconds_per_1000_pairs"] == 600.0
    assert "train_seconds_per_1000_pairs" not in report.derive("distillation", {"train_seconds": 300.0})
    assert report.derive("router", {"x": 1}) == {"x": 1}


def test_demo_tolerates_missing_keys() -> None:
    rows = report.rows_for(report.FIGURES["demo"], {"savings_pct": 62.5}, "flywheel demo")
    by_key = {f.key: r.value for f, r in zip(report.FIGURES["demo"], rows, strict=True)}
    assert by_key["savings_pct"] == "62.5 %"
    assert by_key["cost_usd"] == "not reported"


def test_markdown_table_and_report() -> None:
    rows = report.rows_for(FIGS[:1], {"student_rps": 2500}, "python bench.py --a|b")
    table = report.render_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| benchmark | measure | value | goal | distance | command |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| router | student path | 2,500 req/s | ≥ 2,000 req/s | met | `python bench.py --a\\|b` |"
    text = report.render_report(rows, {"date": "2026-01-01 00:00 UTC", "machine": "box: 2 cores"}, ["a note"])
    assert text.startswith("# Benchmark results\n\n* date: 2026-01-01 00:00 UTC\n* machine: box: 2 cores\n")
    assert table in text and text.endswith("* a note\n")


def test_every_goal_in_the_catalogue_is_stated() -> None:
    for bench, figures in report.FIGURES.items():
        assert figures and all(f.bench == bench for f in figures)
        keys = [f.key for f in figures]
        assert len(keys) == len(set(keys)), bench
    goals = {(f.bench, f.key): f.goal for figs in report.FIGURES.values() for f in figs if f.goal}
    assert goals[("router", "student_rps")].target == 2000
    assert goals[("router", "student_added_p95_ms")].target == 5
    assert goals[("logger", "end_to_end_per_s")].target == 100_000
    assert goals[("clickhouse", "native_passthrough_ratio")].target == 0.6
    assert goals[("distillation", "stage2_agreement")].target == 0.96
    assert goals[("distillation", "train_seconds_per_1000_pairs")].target == 600
    assert goals[("hotswap", "failed_requests")].direction == "equal"
