"""Thread settings: parsing (named errors) and the pure rule of how many cores a busy neighbour leaves."""

from __future__ import annotations

import pytest

from services.core.settings import Settings, SettingsError
from services.core.threads import AdaptiveThreads, free_cores, parse_threads


def test_thread_settings_are_auto_or_a_count() -> None:
    assert parse_threads("auto", "x") is None and parse_threads(None, "x") is None and parse_threads(" ", "x") is None
    assert parse_threads("3", "x") == 3 and parse_threads(2, "x") == 2
    with pytest.raises(ValueError, match="student_threads: 'many' is neither 'auto' nor a number"):
        parse_threads("many", "student_threads")
    with pytest.raises(ValueError, match="trainer_threads: 0 threads"):
        parse_threads("0", "trainer_threads")


def test_settings_refuse_a_bad_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().thread_count("student_threads") is None
    monkeypatch.setenv("FLYWHEEL_TRAINER_THREADS", "1")
    assert Settings().thread_count("trainer_threads") == 1
    monkeypatch.setenv("FLYWHEEL_STUDENT_THREADS", "lots")
    with pytest.raises((SettingsError, ValueError), match="student_threads"):
        Settings()


def test_a_busy_neighbour_leaves_its_share() -> None:
    assert free_cores(0.0, 2) == 2
    assert free_cores(0.2, 2) == 2  # a little background work does not count
    assert free_cores(0.5, 2) == 2  # nor Triton's and the client's share of the serving path
    assert free_cores(0.7, 2) == 1
    assert free_cores(0.9, 2) == 1  # a core kept busy by another process
    assert free_cores(2.0, 2) == 1  # never fewer than one
    assert free_cores(1.5, 8) == 7 and free_cores(1.7, 8) == 6


def test_a_fixed_count_is_kept() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        threads = AdaptiveThreads(fixed=1)
        assert threads.update() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
