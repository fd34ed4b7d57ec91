from services.core.offsets import OffsetTracker


def test_commits_only_up_to_the_oldest_unfinished() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    for off in (10, 11, 12):
        t.started("p0", off)
    t.finished("p0", 12)
    t.finished("p0", 11)
    assert t.committable() == {"p0": 10}  # 10 still running: nothing past it
    t.finished("p0", 10)
    assert t.committable() == {"p0": 13}
    assert t.committable() == {}  # unchanged: nothing to commit
    assert t.in_flight() == 0


def test_partitions_are_independent() -> None:
    t: OffsetTracker[int] = OffsetTracker()
    t.started(0, 5)
    t.started(1, 7)
    t.finished(1, 7)
    assert t.committable() == {0: 5, 1: 8}
