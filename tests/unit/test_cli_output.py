"""The CLI's tables outside a terminal: wide enough that figures stay whole (issue 15 item 5)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from services.cli import WIDE_OUTPUT, output_width


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sets_its_own_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert output_width(FakeTerminal()) is None
    assert output_width(io.StringIO()) == WIDE_OUTPUT
    monkeypatch.setenv("COLUMNS", "132")
    assert output_width(io.StringIO()) == 132


def test_a_phase_table_keeps_its_numbers_whole_in_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    table = Table()
    for column in ("phase", "requests", "student share", "fallback rate", "cost", "teacher-only", "saved", "p95"):
        table.add_column(column)
    table.add_row("recovery", "500", "63.4 %", "25.2 %", "$0.0486", "$0.0577", "15.7 %", "949 ms")
    Console(file=out, width=output_width(out)).print(table)
    text = out.getvalue()
    assert "…" not in text and "$0.0486" in text and "student share" in text
