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
    t.committed({"p0": 13})
    assert t.committable() == {}  # unchanged: nothing to commit
    assert t.in_flight() == 0


def test_a_failed_commit_is_offered_again() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    t.started("p0", 3)
    t.finished("p0", 3)
    assert t.committable() == {"p0": 4}
    assert t.committable() == {"p0": 4}  # not recorded until the commit went through


def test_partitions_are_independent() -> None:
    t: OffsetTracker[int] = OffsetTracker()
    t.started(0, 5)
    t.started(1, 7)
    t.finished(1, 7)
    assert t.committable() == {0: 5, 1: 8}
    assert t.committable(owned={1}) == {1: 8}  # only partitions still owned are committed
    assert t.in_flight({0}) == 1 and t.in_flight({1}) == 0


def test_forgotten_partitions_are_not_committed() -> None:
    t: OffsetTracker[int] = OffsetTracker()
    t.started(0, 5)
    t.forget([0])
    t.finished(0, 5)  # finishes after the partition went to another consumer: changes nothing
    assert t.committable() == {} and t.in_flight() == 0
